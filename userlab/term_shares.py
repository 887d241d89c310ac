"""Why a run starts slowly: which loss term pushes the embeddings, and where similarities sit.

:func:`attach_term_shares` wraps a Trainer's model so that every ``every``-th training step also
records, from the very batch being trained on (no extra encoder passes):

* ``share_batch_negative`` / ``share_batch_positive`` / ``share_queue``: each term's share of
  the gradient norm on the query embeddings ``(v, t)``. The mini-batch part of the objective
  (UTO's ``λ·L_mb`` or the triplet loss) reaches the embeddings only through ``S = v tᵀ``, so
  its gradient ``G = ∂L/∂S`` is split into the diagonal (positive pairs) and the off-diagonal
  (negatives): ``‖(G_part t, G_partᵀ v)‖``. The queue term ``L_q`` is differentiated directly.
  Shares are the three norms over their sum.
* ``frac_neg_above_gamma``: fraction of in-batch negatives with ``S_ij > γ`` (UTO's threshold
  below which a negative contributes almost no gradient).
* ``pos_mean``, ``neg_mean``, ``neg_std``, ``gap`` (pos − neg): where similarities sit and how
  spread they are.

The rows go to ``<run_dir>/term_shares.csv``; :func:`per_epoch` averages them per epoch.
Costs one small backward through the loss (not the encoders) per recorded step.
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Optional

import pandas as pd
import torch

COLUMNS = ("step", "epoch", "share_batch_negative", "share_batch_positive", "share_queue",
           "frac_neg_above_gamma", "pos_mean", "neg_mean", "neg_std", "gap")


def term_gradient_norms(loss: Any, outputs: dict[str, torch.Tensor], objective: str,
                        lambda_batch: float) -> dict[str, float]:
    """Gradient norms on ``(v, t)`` of the batch negatives, batch positives and queue term.

    Args:
        loss: the model's :class:`~userlab.losses.LossOutput` (its graph still alive).
        outputs: the model's outputs: ``sim (B, B)``, ``img (B, E)``, ``txt (B, E)``.
        objective: ``"uto"``, ``"triplet"`` or ``"infonce"``.
        lambda_batch: UTO's λ (the batch term enters the total as ``λ·L_mb``).
    """
    sim, img, txt = outputs["sim"], outputs["img"], outputs["txt"]
    batch_term = loss.terms["batch"] * lambda_batch if objective == "uto" else loss.total
    (g,) = torch.autograd.grad(batch_term, sim, retain_graph=True)
    g = g.detach().float()
    v, t = img.detach().float(), txt.detach().float()
    eye = torch.eye(g.shape[0], dtype=torch.bool, device=g.device)

    def norm(part: torch.Tensor) -> float:
        return float(torch.sqrt((part @ t).pow(2).sum() + (part.t() @ v).pow(2).sum()))

    out = {"batch_positive": norm(g * eye), "batch_negative": norm(g.masked_fill(eye, 0.0)),
           "queue": 0.0}
    if "queue" in loss.terms:
        gq = torch.autograd.grad(loss.terms["queue"], (img, txt), retain_graph=True, allow_unused=True)
        out["queue"] = float(torch.sqrt(sum((x.detach().float().pow(2).sum() for x in gq
                                             if x is not None), torch.tensor(0.0))))
    return out


def similarity_row(sim: torch.Tensor, gamma: float) -> dict[str, float]:
    s = sim.detach().float()
    eye = torch.eye(s.shape[0], dtype=torch.bool, device=s.device)
    neg = s[~eye]
    pos = s.diagonal()
    return {"frac_neg_above_gamma": float((neg > gamma).float().mean()),
            "pos_mean": float(pos.mean()), "neg_mean": float(neg.mean()),
            "neg_std": float(neg.std()), "gap": float(pos.mean() - neg.mean())}


class _Recorder:
    def __init__(self, trainer: Any, every: int, path: Path):
        self.trainer, self.every, self.path = trainer, every, path
        self.original = trainer.model.forward
        cfg = trainer.cfg
        self.objective, self.lam, self.gamma = cfg.loss.objective, cfg.loss.lambda_batch, cfg.loss.gamma

    def __call__(self, batch):
        loss, outputs = self.original(batch)
        tr = self.trainer
        if tr.model.training and tr.step % self.every == 0 and tr.rank == 0:
            norms = term_gradient_norms(loss, outputs, self.objective, self.lam)
            total = sum(norms.values()) or 1.0
            row = {"step": tr.step, "epoch": tr.epoch,
                   "share_batch_negative": norms["batch_negative"] / total,
                   "share_batch_positive": norms["batch_positive"] / total,
                   "share_queue": norms["queue"] / total,
                   **similarity_row(outputs["sim"], getattr(tr.model, "current_gamma", self.gamma))}
            new = not self.path.is_file()
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", newline="") as fh:
                w = csv.DictWriter(fh, fieldnames=COLUMNS)
                if new:
                    w.writeheader()
                w.writerow(row)
        return loss, outputs


def attach_term_shares(trainer: Any, every: int = 5, path: Optional[str | Path] = None) -> Path:
    """Record term shares every ``every`` steps of ``trainer`` (see the module docstring)."""
    path = Path(path) if path is not None else Path(trainer.run_dir) / "term_shares.csv"
    trainer.model.forward = _Recorder(trainer, every, path)
    return path


def per_epoch(path: str | Path) -> pd.DataFrame:
    """Mean of every column per epoch (epoch 1 = the first epoch)."""
    df = pd.read_csv(path)
    out = df.drop(columns=["step"]).groupby("epoch").mean().reset_index()
    out["epoch"] += 1
    return out


__all__ = ["COLUMNS", "attach_term_shares", "per_epoch", "similarity_row", "term_gradient_norms"]

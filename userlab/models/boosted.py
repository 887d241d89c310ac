"""Deep Boosting Learning schedules around any backbone (method notes section 4.3).

:class:`BoostedModel` holds several :class:`RetrievalModel` branches of one architecture; the last
one is the **target**, the only one used at test time and in ``model.safetensors``. Each branch's
own objective plays DBL's "raw" loss (for the VSE++ backbone it is exactly the released
hardest-negative triplet; for USER it is the unified objective), and the strategy term of
:mod:`userlab.boosting` is added with weight ``alpha``:

- ``offline``: branch 0 is an anchor trained beforehand and frozen (eval mode, no gradient);
  the target starts from the anchor's weights (see :func:`userlab.experiment.fit_experiment`).
- ``online``: ``num_branches`` branches, initialised independently and trained together on the
  same batches; branch ``m`` is boosted against the mean over all earlier branches (a cascade);
  with the ``mutual`` strategy every branch learns from every other (mutual learning).
- ``momentum``: the anchor is an EMA copy of the target, with momentum following a cosine
  schedule from ``boost.momentum_teacher`` up to 1 over the run (DINO's schedule), in eval mode.

Anchor scores never carry gradients (the strategies detach them; the anchors also run under
``torch.no_grad``).
"""
from __future__ import annotations

import copy
from typing import Any, Optional

import torch
from torch import nn

from ..boosting import get_strategy, peer_kl
from ..config import ExperimentConfig
from ..losses import LossOutput
from ..momentum import cosine_momentum, ema_update_
from .user import RetrievalModel


class BoostedModel(nn.Module):
    """Branches of one backbone trained with a DBL schedule; the last branch is the target.

    Args:
        cfg: experiment config; ``cfg.boost.schedule`` is offline, online or momentum.
        vocab: word vocabulary for GRU text encoders.
        anchor: offline schedule only: the trained anchor; the target starts from its weights.
    """

    def __init__(self, cfg: ExperimentConfig, vocab: Any = None, anchor: Optional[RetrievalModel] = None):
        super().__init__()
        self.cfg = cfg
        self.schedule = cfg.boost.schedule
        self.strategy = get_strategy(cfg.boost.strategy)
        # Warm-up epochs (``loss.warmup_epochs``) avoid hardest negatives in every term: the
        # max-form boosting losses use their sum form then, as VSE0 stands in for VSE++. A
        # hardest-negative hinge from a random start collapses all similarities together.
        sum_form = f"{cfg.boost.strategy}_sum"
        self.warmup_strategy = (get_strategy(sum_form) if cfg.boost.strategy in ("relative", "absolute")
                                else self.strategy)
        self._progress = (0, 1)
        if self.schedule == "online":
            branches = [RetrievalModel(cfg, vocab=vocab) for _ in range(cfg.boost.num_branches)]
            self.frozen = 0
        elif self.schedule in ("offline", "momentum"):
            target = RetrievalModel(cfg, vocab=vocab)
            if anchor is not None:
                target.encoder.load_state_dict(anchor.encoder.state_dict())
                if anchor.uses_queues and target.uses_queues:
                    target.load_momentum_state(anchor.momentum_state())
            frozen = RetrievalModel(cfg, vocab=vocab, with_momentum=False)
            frozen.encoder.load_state_dict(target.encoder.state_dict())
            frozen.requires_grad_(False)
            branches = [frozen, target]
            self.frozen = 1
        else:
            raise ValueError(f"BoostedModel needs a boost schedule, got {self.schedule!r}")
        self.branches = nn.ModuleList(branches)

    # -- what the Trainer and evaluation use --------------------------------------------------
    @property
    def target(self) -> RetrievalModel:
        return self.branches[-1]

    @property
    def trainable(self) -> list[RetrievalModel]:
        return list(self.branches)[self.frozen:]

    @property
    def max_violation(self) -> bool:
        return self.target.max_violation

    @max_violation.setter
    def max_violation(self, value: bool) -> None:
        for branch in self.branches:
            branch.max_violation = value

    @property
    def current_strategy(self):
        """The boosting term in use: the sum form during warm-up (``max_violation`` off)."""
        return self.strategy if self.max_violation else self.warmup_strategy

    def set_progress(self, step: int, total_steps: int) -> None:
        """Where training stands, for the momentum schedule's cosine momentum."""
        self._progress = (step, max(1, total_steps))

    def anchor_momentum(self) -> float:
        return cosine_momentum(*self._progress, base=self.cfg.boost.momentum_teacher)

    def encode_image(self, batch: dict[str, torch.Tensor]):
        return self.target.encode_image(batch)

    def encode_text(self, batch: dict[str, torch.Tensor]):
        return self.target.encode_text(batch)

    def query_parameters(self) -> list[nn.Parameter]:
        return [p for branch in self.trainable for p in branch.query_parameters()]

    def param_groups(self, lr: float, text_lr_scale: float, weight_decay: float) -> list[dict]:
        groups = []
        for i, branch in enumerate(self.trainable):
            for group in branch.param_groups(lr, text_lr_scale, weight_decay):
                groups.append({**group, "name": f"branch{i + self.frozen}.{group.get('name', 'main')}"})
        return groups

    def train(self, mode: bool = True) -> "BoostedModel":
        super().train(mode)
        if self.frozen:
            self.branches[0].eval()  # DBL runs the frozen / EMA anchor in eval mode
        return self

    # -- one step --------------------------------------------------------------------------
    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[LossOutput, dict[str, torch.Tensor]]:
        boost = self.cfg.boost
        if self.schedule == "momentum":
            ema_update_(self.branches[0].encoder, self.target.encoder, self.anchor_momentum())
        if self.frozen:
            with torch.no_grad():
                img, txt = self.branches[0].encoder(batch)
                anchor_sims = [(img.embedding @ txt.embedding.t()).detach()]
            loss, outputs = self.target(batch)
            term = self.current_strategy(outputs["sim"], anchor_sims[0], boost)
            total = loss.total + boost.alpha * term.total
            terms = {**loss.terms, "boost": term.total.detach()}
            outputs["anchor_sim"] = anchor_sims[0]
            return LossOutput(total=total, terms=terms), outputs
        # online: every branch learns from the ones before it (or, mutual, from all others)
        results = [branch(batch) for branch in self.branches]
        sims = [out["sim"] for _, out in results]
        total = 0.0
        terms: dict[str, torch.Tensor] = {}
        for m, (loss, _) in enumerate(results):
            peers = range(len(sims)) if boost.strategy == "mutual" else range(m)
            peer_terms = [self._peer_term(sims[m], sims[n]) for n in peers if n != m]
            branch_boost = torch.stack(peer_terms).mean() if peer_terms else sims[m].new_zeros(())
            total = total + loss.total + boost.alpha * branch_boost
            terms[f"branch{m}"] = loss.total.detach()
            terms[f"boost{m}"] = branch_boost.detach()
        outputs = dict(results[-1][1])
        outputs["anchor_sim"] = sims[0].detach()
        return LossOutput(total=total, terms=terms), outputs

    def _peer_term(self, s_m: torch.Tensor, s_n: torch.Tensor) -> torch.Tensor:
        if self.cfg.boost.strategy == "mutual":
            return peer_kl(s_m, s_n.detach()).total
        return self.current_strategy(s_m, s_n.detach(), self.cfg.boost).total

    # -- checkpoints ----------------------------------------------------------------------------
    def inference_state(self) -> dict[str, torch.Tensor]:
        """The target's query encoders (what evaluation and export use)."""
        return self.target.inference_state()

    def load_inference_state(self, state: dict[str, torch.Tensor], source: Any = "<memory>") -> None:
        self.target.load_inference_state(state, source)

    def momentum_state(self) -> dict[str, Any]:
        """Every branch's encoders and momentum state (checkpoints keep all branches)."""
        return {"branches": [b.encoder.state_dict() for b in self.branches],
                "branch_momentum": [b.momentum_state() for b in self.branches]}

    def load_momentum_state(self, state: dict[str, Any]) -> None:
        for branch, enc, mom in zip(self.branches, state["branches"], state["branch_momentum"]):
            branch.encoder.load_state_dict(enc)
            branch.load_momentum_state(mom)


def copy_anchor(model: RetrievalModel) -> RetrievalModel:
    """A frozen deep copy (used by notebooks to compare anchor and target)."""
    anchor = copy.deepcopy(model)
    anchor.requires_grad_(False)
    return anchor.eval()

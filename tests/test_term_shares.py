"""Per-term gradient shares against independent autograd computations of each term."""
from __future__ import annotations

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from tiny import tiny_config, tiny_data
from userlab.losses import LossOutput, batch_hal_loss, triplet_loss, unified_objective
from userlab.term_shares import attach_term_shares, per_epoch, similarity_row, term_gradient_norms
from userlab.train import Trainer


def _embeddings(b=12, e=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    v = F.normalize(torch.randn(b, e, generator=g), dim=1)
    t = F.normalize(v + 0.9 * torch.randn(b, e, generator=g), dim=1)
    return v, t


def _grad_norm(value, leaves):
    grads = torch.autograd.grad(value, leaves, allow_unused=True)
    return float(torch.sqrt(sum(g.pow(2).sum() for g in grads if g is not None)))


def test_uto_shares_equal_each_term_differentiated_on_its_own():
    v0, t0 = _embeddings()
    k = 20
    g = torch.Generator().manual_seed(3)
    qv, qt = F.normalize(torch.randn(16, k, generator=g), dim=0), F.normalize(torch.randn(16, k, generator=g), dim=0)
    lam = 20.0
    # the function under test sees a graph img/txt -> sim -> loss, as the model builds it
    leaf_v, leaf_t = v0.clone().requires_grad_(), t0.clone().requires_grad_()
    img, txt = leaf_v * 1.0, leaf_t * 1.0
    sim = img @ txt.t()
    loss = unified_objective(sim, img, txt, v0, t0, qv, qt, mu=10.0, gamma=0.2, lambda_batch=lam)
    got = term_gradient_norms(loss, {"sim": sim, "img": img, "txt": txt}, "uto", lam)

    def fresh():
        a, b = v0.clone().requires_grad_(), t0.clone().requires_grad_()
        return a, b

    a, b = fresh()
    neg = batch_hal_loss(a @ b.t(), mu=10.0, gamma=0.2).terms["negative"] * lam
    assert got["batch_negative"] == pytest.approx(_grad_norm(neg, (a, b)), rel=1e-5)
    a, b = fresh()
    pos = batch_hal_loss(a @ b.t(), mu=10.0, gamma=0.2).terms["positive"] * lam
    assert got["batch_positive"] == pytest.approx(_grad_norm(pos, (a, b)), rel=1e-5)
    a, b = fresh()
    full = unified_objective(a @ b.t(), a, b, v0, t0, qv, qt, mu=10.0, gamma=0.2, lambda_batch=lam)
    assert got["queue"] == pytest.approx(_grad_norm(full.terms["queue"], (a, b)), rel=1e-5)
    assert got["queue"] > 0


def test_triplet_shares_split_positive_and_negative_paths():
    v0, t0 = _embeddings(seed=1)
    img, txt = v0.clone().requires_grad_(), t0.clone().requires_grad_()
    sim = img @ txt.t()
    loss = triplet_loss(sim, margin=0.2, max_violation=True)
    got = term_gradient_norms(loss, {"sim": sim, "img": img, "txt": txt}, "triplet", 1.0)
    eye = torch.eye(len(v0), dtype=torch.bool)
    a, b = v0.clone().requires_grad_(), t0.clone().requires_grad_()
    s = a @ b.t()
    only_neg = torch.where(eye, s.detach(), s)      # positives frozen: the negatives' gradient
    assert got["batch_negative"] == pytest.approx(_grad_norm(triplet_loss(only_neg).total, (a, b)), rel=1e-5)
    a, b = v0.clone().requires_grad_(), t0.clone().requires_grad_()
    s = a @ b.t()
    only_pos = torch.where(eye, s, s.detach())
    assert got["batch_positive"] == pytest.approx(_grad_norm(triplet_loss(only_pos).total, (a, b)), rel=1e-5)
    assert got["queue"] == 0.0


def test_similarity_row_counts_negatives_above_gamma():
    sim = torch.tensor([[0.9, 0.6, 0.1], [0.2, 0.8, 0.7], [0.0, 0.55, 0.4]])
    row = similarity_row(sim, gamma=0.5)
    assert row["frac_neg_above_gamma"] == pytest.approx(3 / 6)
    assert row["pos_mean"] == pytest.approx(0.7) and row["neg_mean"] == pytest.approx(2.15 / 6)
    assert row["gap"] == pytest.approx(0.7 - 2.15 / 6)


@pytest.mark.parametrize("objective,queue", [("uto", True), ("triplet", False)])
def test_recorder_writes_rows_during_training(tmp_path, objective, queue):
    data = tiny_data(tmp_path / "data")
    over = {"optim.epochs": 2, "loss.objective": objective, "momentum.enabled": queue}
    trainer = Trainer(tiny_config(data, tmp_path / "run", **over), progress=False)
    path = attach_term_shares(trainer, every=2)
    trainer.fit()
    df = pd.read_csv(path)
    assert df["step"].tolist() == list(range(0, trainer.step, 2))
    shares = df[["share_batch_negative", "share_batch_positive", "share_queue"]].sum(axis=1)
    assert shares.to_numpy() == pytest.approx(1.0)
    assert (df["share_queue"] > 0).all() == queue and (df["share_queue"] == 0).all() == (not queue)
    epochs = per_epoch(path)
    assert epochs["epoch"].tolist() == [1, 2]

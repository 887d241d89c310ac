"""UTO's optional gamma warm-up (a documented departure from the paper, off by default)."""
from __future__ import annotations

import pytest
import torch

from tiny import tiny_config, tiny_data
from userlab.losses import unified_objective
from userlab.models.user import build_model
from userlab.pipeline import prepare_data


def test_gamma_ramps_linearly_then_stays_and_the_loss_uses_it(tmp_path):
    data = tiny_data(tmp_path / "data")
    cfg = tiny_config(data, tmp_path / "run", **{"loss.gamma_warmup_epochs": 1.0, "loss.gamma_start": 0.1,
                                                 "optim.epochs": 4, "momentum.enabled": False})
    bundle = prepare_data(cfg)
    model = build_model(cfg, vocab=bundle.vocab)
    total = 40                                   # 10 steps per epoch
    seen = []
    for step in (0, 5, 10, 30):
        model.set_progress(step, total)
        seen.append(model.current_gamma)
    assert seen == pytest.approx([0.1, 0.3, 0.5, 0.5])
    from userlab.data.precomp import collate_batch
    batch = collate_batch([bundle.train[i] for i in range(8)])
    model.eval()
    model.set_progress(0, total)
    loss, out = model(batch)
    expected = unified_objective(out["sim"], out["img"], out["txt"], mu=cfg.loss.mu, gamma=0.1,
                                 lambda_batch=cfg.loss.lambda_batch)
    assert float(loss.total.detach()) == pytest.approx(float(expected.total.detach()), rel=1e-6)
    assert float(loss.total.detach()) != pytest.approx(float(unified_objective(
        out["sim"], out["img"], out["txt"], mu=cfg.loss.mu, gamma=0.5,
        lambda_batch=cfg.loss.lambda_batch).total), rel=1e-6)


def test_default_is_the_paper_gamma(tmp_path):
    data = tiny_data(tmp_path / "data")
    cfg = tiny_config(data, tmp_path / "run")
    model = build_model(cfg.replace(**{"model.vocab_size": 50}))
    model.set_progress(0, 100)
    assert model.current_gamma == cfg.loss.gamma == 0.5

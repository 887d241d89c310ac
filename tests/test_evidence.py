"""Truthful demo rows, the post-warm-up best checkpoint, and the region-attention variant."""
from __future__ import annotations

import pytest
import torch

from userlab import checkpoint as ckpt
from userlab.config import preset
from userlab.demo import what_ran
from userlab.diagnostics import attention_entropy
from userlab.errors import ConfigError
from userlab.models.image import region_attention
from userlab.models.pooling import l2norm
from userlab.train import Trainer


def _fake_dev(values):
    """An evaluate_dev that reports the given rSums epoch by epoch."""
    it = iter(values)

    def evaluate_dev(self):
        return {"rsum": float(next(it))}
    return evaluate_dev


@pytest.mark.parametrize("objective,warmup,expect_epoch", [
    ("triplet", 1, 2),   # epoch 1 is VSE0 warm-up: not eligible even though its dev rSum is higher
    ("triplet", 0, 1),   # no warm-up: the usual best-of-all rule
    ("uto", 1, 1),       # the warm-up does not change UTO: every epoch is eligible
])
def test_best_checkpoint_after_warmup(tmp_path, monkeypatch, one_thread, objective, warmup, expect_epoch):
    from tiny import tiny_config, tiny_data
    data = tiny_data(tmp_path / "data")
    cfg = tiny_config(data, tmp_path / "run", **{
        "optim.epochs": 2, "loss.objective": objective, "loss.warmup_epochs": warmup,
        "model.enhancement": "none", "momentum.enabled": objective == "uto"})
    monkeypatch.setattr(Trainer, "evaluate_dev", _fake_dev([300.0, 200.0]))
    Trainer(cfg, progress=False).fit()
    state = ckpt.load_train_state(ckpt.find_checkpoint(tmp_path / "run", "best"))
    assert int(state["epoch"]) == expect_epoch
    row = what_ran("X", cfg)
    assert row["checkpoint"].startswith(f"best dev: epoch {expect_epoch} of ")
    assert row["enhancement"] == "none"
    # tiny_config: lr 1e-3 with x0.1 after 2 epochs, so both epochs here ran at 1e-3
    assert row["lr"].startswith("constant lr 0.001 for 2 epochs")
    if objective == "triplet":
        assert row["queue"] == "none"
        assert ("warm-up" in row["objective"]) == (warmup > 0)
    else:
        assert row["queue"].startswith("2 x 20") and row["objective"].startswith("UTO")


def test_warmup_only_run_keeps_usual_rule(tmp_path, monkeypatch, one_thread):
    from tiny import tiny_config, tiny_data
    data = tiny_data(tmp_path / "data")
    cfg = tiny_config(data, tmp_path / "run", **{"optim.epochs": 1, "loss.objective": "triplet",
                                                 "loss.warmup_epochs": 1, "momentum.enabled": False})
    monkeypatch.setattr(Trainer, "evaluate_dev", _fake_dev([100.0]))
    Trainer(cfg, progress=False).fit()
    assert ckpt.find_checkpoint(tmp_path / "run", "best")
    row = what_ran("VSE++", cfg)
    assert "every epoch was warm-up" in row["objective"] and row["checkpoint"] == "best dev: epoch 1 of 1-1"


def test_demo_preset_is_full_user():
    cfg = preset("demo")
    assert cfg.model.enhancement == "sge+cge" and cfg.momentum.enabled and cfg.loss.objective == "uto"
    base = preset("vsepp")
    assert base.model.enhancement == "none" and base.loss.warmup_epochs == 1


def test_region_attention_variants():
    gen = torch.Generator().manual_seed(0)
    regions = torch.rand(3, 12, 64, generator=gen) * torch.linspace(1, 6, 12).view(1, 12, 1)  # norms ~2-25
    g = l2norm(torch.randn(3, 64, generator=gen))
    _, beta_raw = region_attention(regions, g, 1.0, "none")
    enhanced, beta_l2 = region_attention(regions, g, 10.0, "l2")
    # independent computation of the variant: softmax over cosines, then L2 over regions
    cos = torch.nn.functional.cosine_similarity(regions, g.unsqueeze(1), dim=-1)
    w = torch.softmax(10.0 * cos, dim=1)
    assert torch.allclose(beta_l2, w / w.norm(dim=1, keepdim=True), atol=1e-6)
    assert torch.allclose(enhanced, regions + beta_l2.unsqueeze(-1) * g.unsqueeze(1), atol=1e-6)
    assert attention_entropy(beta_l2, "l2")["normalised"] > attention_entropy(beta_raw, "l2")["normalised"]
    with pytest.raises(ConfigError, match="attention_norm"):
        region_attention(regions, g, 1.0, "l3")
    with pytest.raises(ConfigError, match="model.attention_norm"):
        preset("demo").replace(**{"model.attention_norm": "cosine"})

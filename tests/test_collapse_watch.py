"""The near-collapse check: positives and negatives both ~0.997, loss at 2·B·margin."""
from __future__ import annotations

import warnings

import pytest
import torch

from tiny import tiny_config, tiny_data
from userlab.collapse_watch import CollapseWatch, batch_similarity_stats
from userlab.losses import CollapseWarning, check_collapse, triplet_loss
from userlab.train import Trainer


def near_collapsed_sim(b: int = 128, seed: int = 0) -> torch.Tensor:
    """Unit embeddings crowded around one direction: pairwise cosines ~0.997, spread > 1e-3."""
    g = torch.Generator().manual_seed(seed)
    centre = torch.nn.functional.normalize(torch.randn(64, generator=g), dim=0)
    img = torch.nn.functional.normalize(centre + 0.007 * torch.randn(b, 64, generator=g), dim=1)
    txt = torch.nn.functional.normalize(centre + 0.007 * torch.randn(b, 64, generator=g), dim=1)
    return img @ txt.t()


def healthy_sim(b: int = 128, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    img = torch.nn.functional.normalize(torch.randn(b, 64, generator=g), dim=1)
    txt = torch.nn.functional.normalize(img + 0.8 * torch.randn(b, 64, generator=g), dim=1)
    return img @ txt.t()


def test_the_issue_state_is_caught_by_the_batch_check_and_by_the_watch():
    sim = near_collapsed_sim()
    stats = batch_similarity_stats(sim)
    assert 0.99 < stats["neg"] < 1 and abs(stats["pos"] - stats["neg"]) < 0.01
    # the hardest-negative triplet loss sits at (about) 2·B·margin, as in the issue (51.2)
    assert triplet_loss(sim, margin=0.2).total.item() == pytest.approx(2 * 128 * 0.2, rel=0.05)
    # the per-batch check flags it too (pos and neg both above 0.9, apart by under 0.01) ...
    with pytest.warns(CollapseWarning):
        check_collapse(sim)
    # ... the watch adds persistence: one odd batch is not a collapse, a stretch of them is
    watch = CollapseWatch(patience=3)
    with pytest.warns(CollapseWarning, match=r"near-collapse since step 10.*0\.99\d.*2·B·margin = 51\.2"):
        flags = [watch.update(near_collapsed_sim(seed=k), step=10 + k) for k in range(5)]
    assert flags == [False, False, True, False, False]      # warned once, after `patience` steps
    assert watch.since_step == 10


def test_the_watch_stays_silent_on_healthy_and_random_start_batches_and_on_blips():
    watch = CollapseWatch(patience=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for k in range(10):
            assert not watch.update(healthy_sim(seed=k), step=k)
        g = torch.Generator().manual_seed(1)
        start = torch.nn.functional.normalize(torch.randn(32, 16, generator=g), dim=1)
        assert not watch.update(start @ start.roll(1, 0).t(), step=10)   # cosines near 0
        # two near-collapsed batches, then a healthy one: the stretch restarts
        for k, sim in enumerate([near_collapsed_sim(), near_collapsed_sim(seed=1), healthy_sim()]):
            assert not watch.update(sim, step=20 + k)
    assert watch.since_step is None


def crowded_trainer(tmp_path, epochs: int) -> Trainer:
    """A tiny run whose loss trains as usual but whose logged similarities are near-collapsed."""
    data = tiny_data(tmp_path / "data")
    trainer = Trainer(tiny_config(data, tmp_path / "run", **{"optim.epochs": epochs}), progress=False)
    trainer.collapse_watch.patience = 2
    original = trainer.model.forward

    def crowded(batch):
        loss, outputs = original(batch)
        outputs["sim"] = near_collapsed_sim(outputs["sim"].shape[0], seed=trainer.step)
        return loss, outputs

    trainer.model.forward = crowded
    return trainer


def test_trainer_flags_a_near_collapsed_run(tmp_path):
    trainer = crowded_trainer(tmp_path, epochs=1)
    with pytest.warns(CollapseWarning, match="near-collapse since step 0"):
        trainer.fit()
    assert trainer.collapse_watch.since_step == 0


def test_f8k_vsepp_preset_uses_hardest_negatives_only_at_a_low_learning_rate():
    """The recipe fix: VSE0 warm-up at 1e-3, hardest negatives (which near-collapsed at 1e-3 on
    Flickr8k grid features) only once the lr has dropped to 2e-4 or below."""
    from userlab.config import preset
    from userlab.pipeline import lr_at_epoch
    cfg = preset("f8k-cpu-vsepp")
    assert cfg.loss.objective == "triplet" and not cfg.momentum.enabled and cfg.model.enhancement == "none"
    lrs = [lr_at_epoch(cfg.optim.lr, e, cfg.optim.lr_step, cfg.optim.lr_decay) for e in range(cfg.optim.epochs)]
    hardest = [lr for e, lr in enumerate(lrs) if e >= cfg.loss.warmup_epochs]
    assert hardest and max(hardest) <= 2e-4 + 1e-12
    user = preset("f8k-cpu")
    assert user.model.enhancement == "sge+cge" and user.model.guide_dim == user.model.region_dim == 1280
    assert user.model.num_regions == 49 and user.optim.epochs == cfg.optim.epochs
    for name in ("region_dim", "num_regions", "embed_size", "mlp_hidden", "word_dim"):
        assert getattr(user.model, name) == getattr(cfg.model, name)


def test_a_collapsed_run_gets_each_warning_once(tmp_path):
    """The batch check and the watch each warn once per run, not at every logged step."""
    import warnings
    trainer = crowded_trainer(tmp_path, epochs=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit()
    messages = [str(w.message) for w in caught if issubclass(w.category, CollapseWarning)]
    assert trainer.step >= 6
    assert sum("near-collapse since" in m for m in messages) == 1
    assert sum("differ by less than" in m for m in messages) == 1, messages

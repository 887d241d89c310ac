"""DBL schedules on tiny data: offline, online and momentum run, checkpoint every branch, resume."""
from __future__ import annotations

import pytest
import torch

from tiny import tiny_config, tiny_data
from userlab import checkpoint as ckpt
from userlab.experiment import fit_experiment
from userlab.models.boosted import BoostedModel
from userlab.momentum import cosine_momentum
from userlab.train import load_model


def test_cosine_momentum_schedule_values():
    assert cosine_momentum(0, 100, base=0.99) == pytest.approx(0.99)
    assert cosine_momentum(50, 100, base=0.99) == pytest.approx(0.995)
    assert cosine_momentum(100, 100, base=0.99) == pytest.approx(1.0)
    assert cosine_momentum(25, 100, base=0.9) < cosine_momentum(75, 100, base=0.9)


CASES = [("vsepp", "online", "relative"), ("vsepp", "online", "mutual"), ("vsepp", "momentum", "absolute"),
         ("vsepp", "momentum", "dino"), ("vsepp", "offline", "relative"),
         ("vsepp", "offline", "similarity_preserving"), ("user", "online", "relative"),
         ("user", "momentum", "absolute"), ("user", "offline", "relative")]


@pytest.mark.parametrize("backbone, schedule, strategy", CASES)
def test_schedule_runs_and_keeps_every_branch(tmp_path, backbone, schedule, strategy):
    root = tiny_data(tmp_path / "data")
    overrides = {"boost.schedule": schedule, "boost.strategy": strategy, "optim.epochs": 1,
                 "boost.num_branches": 3 if schedule == "online" else 2, "boost.momentum_teacher": 0.9}
    if backbone == "vsepp":
        overrides.update({"model.enhancement": "none", "momentum.enabled": False, "loss.objective": "triplet"})
    cfg = tiny_config(root, tmp_path / "run", **overrides)
    trainer = fit_experiment(cfg, progress=False)
    model = trainer.model
    assert isinstance(model, BoostedModel)
    n_branches = 3 if schedule == "online" else 2
    assert len(model.branches) == n_branches
    log = trainer.step_log.path.read_text()
    assert "boost" in log.splitlines()[0]

    state = ckpt.load_train_state(ckpt.find_checkpoint(tmp_path / "run", "last"))
    assert len(state["momentum"]["branches"]) == n_branches
    # every branch round-trips through the checkpoint
    for branch, saved in zip(model.branches, state["momentum"]["branches"]):
        for k, v in branch.encoder.state_dict().items():
            assert torch.equal(v.cpu(), saved[k].cpu()), k
    # evaluation and export use the target
    loaded, _, _ = load_model(tmp_path / "run", tag="last")
    for k, v in model.target.encoder.state_dict().items():
        assert torch.equal(v.cpu(), loaded.encoder.state_dict()[k].cpu()), k
    if schedule in ("offline", "momentum"):
        assert not any(p.requires_grad for p in model.branches[0].parameters())
        if schedule == "offline":
            assert (tmp_path / "run" / "anchor" / "checkpoints" / "best.txt").is_file()


def test_anchor_gets_no_gradient_and_target_does(tmp_path):
    root = tiny_data(tmp_path / "data")
    cfg = tiny_config(root, tmp_path / "run", **{"boost.schedule": "momentum", "boost.strategy": "relative"})
    from userlab.pipeline import prepare_data
    from userlab.data.precomp import collate_batch
    data = prepare_data(cfg)
    model = BoostedModel(cfg, vocab=data.vocab).train()
    batch = collate_batch([data.train[i] for i in range(8)])
    loss, out = model(batch)
    loss.total.backward()
    assert all(p.grad is None for p in model.branches[0].parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.target.encoder.parameters())
    assert "boost" in loss.terms and not out["anchor_sim"].requires_grad


def test_momentum_anchor_follows_target_with_the_schedule(tmp_path):
    root = tiny_data(tmp_path / "data")
    cfg = tiny_config(root, tmp_path / "run", **{"boost.schedule": "momentum", "boost.momentum_teacher": 0.5})
    from userlab.pipeline import prepare_data
    from userlab.data.precomp import collate_batch
    data = prepare_data(cfg)
    model = BoostedModel(cfg, vocab=data.vocab).train()
    name, anchor_p = next(iter(model.branches[0].encoder.named_parameters()))
    target_p = dict(model.target.encoder.named_parameters())[name]
    with torch.no_grad():
        target_p.add_(1.0)  # move the target away from the anchor
    before = anchor_p.detach().clone()
    model.set_progress(0, 10)  # momentum = base = 0.5
    batch = collate_batch([data.train[i] for i in range(8)])
    model(batch)
    expected = 0.5 * before + 0.5 * target_p.detach()
    assert torch.allclose(anchor_p, expected, atol=1e-6)


@pytest.mark.parametrize("strategy", ["relative", "absolute"])
def test_warm_up_uses_the_sum_form_of_the_boosting_term(tmp_path, strategy):
    from userlab.boosting import STRATEGIES
    from userlab.data.precomp import collate_batch
    from userlab.pipeline import prepare_data
    root = tiny_data(tmp_path / "data")
    cfg = tiny_config(root, tmp_path / "run", **{"boost.schedule": "online", "boost.strategy": strategy,
                                                 "model.enhancement": "none", "momentum.enabled": False,
                                                 "loss.objective": "triplet"})
    data = prepare_data(cfg)
    model = BoostedModel(cfg, vocab=data.vocab).eval()  # eval: no dropout, same sims every call
    batch = collate_batch([data.train[i] for i in range(8)])
    expected = {}
    with torch.no_grad():
        sims = [b(batch)[1]["sim"] for b in model.branches]
        for form, name in (("max", strategy), ("sum", f"{strategy}_sum")):
            expected[form] = STRATEGIES[name](sims[1], sims[0], cfg.boost).total
        assert not torch.allclose(expected["max"], expected["sum"])
        for max_violation, form in ((True, "max"), (False, "sum")):
            model.max_violation = max_violation
            loss, _ = model(batch)
            torch.testing.assert_close(loss.terms["boost1"], expected[form])

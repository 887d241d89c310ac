"""The finite guard: non-finite steps change nothing, are counted and logged, N in a row stop the
run with a NonFiniteError; a checkpoint with NaN/Inf is never written, so the last finite one
always survives pruning."""
from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest
import torch

from tiny import tiny_config, tiny_data
from userlab import checkpoint as ckpt
from userlab.data.precomp import collate_batch
from userlab.errors import CheckpointError, NonFiniteError, UserlabError
from userlab.guard import FiniteGuard, first_nonfinite
from userlab.train import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

# lr 1e5 (valid: the range is lr > 0) overflows the tiny model within one or two steps
DIVERGING = {"optim.lr": 1e5, "optim.weight_decay": 0.0, "optim.max_nonfinite_steps": 3}


def _state(trainer: Trainer) -> dict[str, torch.Tensor]:
    """Every tensor a step may change: weights, buffers (BN statistics, queues), AdamW moments."""
    out = {f"m.{k}": v.detach().clone() for k, v in trainer.model.state_dict().items()}
    for i, st in enumerate(trainer.optimizer.state.values()):
        out.update({f"o.{i}.{k}": v.clone() for k, v in st.items() if isinstance(v, torch.Tensor)})
    return out


def _batch(trainer: Trainer, start: int = 0) -> dict[str, torch.Tensor]:
    b = trainer.cfg.data.batch_size
    return collate_batch([trainer.data.train[i] for i in range(start, start + b)])


def _all_finite(state: dict[str, torch.Tensor]) -> bool:
    return all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point())


def test_a_nan_batch_is_skipped_and_changes_nothing(tmp_path):
    root = tiny_data(tmp_path / "data")
    trainer = Trainer(tiny_config(root, tmp_path / "run"), progress=False)
    trainer.train_step(_batch(trainer))          # AdamW has moments to protect from now on
    before = _state(trainer)
    bad = _batch(trainer, 8)
    bad["regions"][0, 0, 0] = float("nan")
    row = trainer.train_step(bad)
    after = _state(trainer)
    assert math.isnan(row["loss"]) and row["skipped"] == 1
    assert trainer.guard.skipped == 1 and trainer.guard.consecutive == 1 and trainer.guard.last_skipped
    # weights, BN running statistics, queue keys / ids / pointers and AdamW moments: bit-identical
    assert before.keys() == after.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    # the key encoders' EMA of the (finite, unchanged) query weights is the one allowed change
    assert all(k.startswith("m.key_encoder.") for k in changed), changed
    assert _all_finite(after)
    # a finite step afterwards trains and resets the run of non-finite steps
    row = trainer.train_step(_batch(trainer, 16))
    assert math.isfinite(row["loss"]) and row["skipped"] == 1 and trainer.guard.consecutive == 0
    trained = _state(trainer)
    assert any(not torch.equal(trained[k], after[k]) for k in after if k.startswith("m.encoder."))


def test_diverging_lr_skips_then_stops_with_named_error_and_keeps_finite_checkpoint(tmp_path):
    root = tiny_data(tmp_path / "data")
    cfg = tiny_config(root, tmp_path / "run", **DIVERGING)
    trainer = Trainer(cfg, progress=False, checkpoint_every=1)
    with pytest.raises(NonFiniteError) as info:
        trainer.fit()
    err = info.value
    assert isinstance(err, UserlabError)
    # three in a row: the last one is the step that raised
    assert err.consecutive == 3 and err.skipped == 3 and err.step == trainer.step
    assert "total" in err.terms and {"batch", "queue"} <= set(err.terms)
    text = str(err)
    assert f"step {err.step}" in text and "optim.max_nonfinite_steps" in text
    assert "learning rate too high" in err.cause and "optim.lr = 100000" in err.cause
    assert "\n" not in text
    # every skipped step is in the log, counted
    log = pd.read_csv(tmp_path / "run" / "train_log.csv")
    skipped_rows = log[log.skipped.diff().fillna(log.skipped) > 0]
    assert list(skipped_rows.skipped) == list(range(1, len(skipped_rows) + 1)) and len(skipped_rows) == 2
    # the last checkpoint (saved after every step, keep=1) is the last finite step's, and finite
    folder = ckpt.find_checkpoint(tmp_path / "run", "last")
    weights = ckpt.load_model_state(folder)
    state = ckpt.load_train_state(folder)
    assert _all_finite(weights) and first_nonfinite(state) == (0, None)
    assert {p.name for p in (tmp_path / "run" / "checkpoints").iterdir()} == {"last.txt", folder.name}
    # it resumes, counting the skips it had seen when saved
    resumed = Trainer(cfg, progress=False)
    assert resumed.step == int(state["step"]) and resumed.guard.skipped == state["guard"]["skipped"]


def test_nonfinite_weights_are_never_checkpointed_and_the_finite_one_survives(tmp_path):
    root = tiny_data(tmp_path / "data")
    trainer = Trainer(tiny_config(root, tmp_path / "run"), progress=False, max_steps=2)
    trainer.fit()                                 # stops inside epoch 0: saves last-00000002
    checkpoints = tmp_path / "run" / "checkpoints"
    good = ckpt.find_checkpoint(tmp_path / "run", "last")
    listing = sorted(p.name for p in checkpoints.iterdir())
    pointer = (checkpoints / "last.txt").read_text()
    with torch.no_grad():
        next(trainer.model.encoder.parameters()).view(-1)[0] = float("inf")
    trainer.step += 1
    with pytest.raises(CheckpointError, match=r"last-00000003: refusing to write a checkpoint with "
                                              r"non-finite values: 1 tensor\(s\) of model\.safetensors"):
        trainer.save("last")
    with pytest.raises(CheckpointError, match="best-00000003: refusing"):
        trainer.save("best")
    # nothing written, nothing pruned: the pointer still names the finite checkpoint
    assert sorted(p.name for p in checkpoints.iterdir()) == listing
    assert (checkpoints / "last.txt").read_text() == pointer
    assert _all_finite(ckpt.load_model_state(good))
    # NaN in the training state (e.g. an AdamW moment) is refused too
    with torch.no_grad():
        next(trainer.model.encoder.parameters()).view(-1)[0] = 0.0
    moment = next(iter(trainer.optimizer.state.values()))["exp_avg"]
    moment.view(-1)[0] = float("nan")
    with pytest.raises(CheckpointError, match=r"state\.pt hold NaN or Inf \(e\.g\. optimizer\.state\."):
        trainer.save("last")
    assert sorted(p.name for p in checkpoints.iterdir()) == listing


def test_first_nonfinite_walks_nested_states_and_ignores_python_floats():
    state = {"a": torch.ones(2), "b": [torch.zeros(1), {"c": torch.tensor([1.0, float("nan")])}],
             "best_rsum": -math.inf, "ids": torch.tensor([-1, 2]), "d": torch.tensor([float("inf")])}
    assert first_nonfinite(state) == (2, "b.1.c")
    assert first_nonfinite({"x": torch.ones(3)}) == (0, None)


class _FakeScaler:
    """Stands in for an fp16 GradScaler (CPU machines cannot enable the real one)."""

    def __init__(self, scale: float):
        self.scale = scale

    def is_enabled(self) -> bool:
        return True

    def get_scale(self) -> float:
        return self.scale


def test_fp16_scaler_overflows_count_only_once_the_scale_is_spent():
    model = torch.nn.Linear(2, 2)
    scaler = _FakeScaler(2.0**16)
    guard = FiniteGuard(2, scaler, amp=torch.float16)
    args = dict(model=model, loss=torch.tensor(1.0), terms={}, lr=1e-3, grad_clip=2.0)
    for step in range(5):  # scaled-gradient overflows while the scaler can still back off
        guard.snapshot(model)
        assert not guard.is_finite(torch.tensor(1.0), torch.tensor(math.inf), step)
        guard.skip(step=step, **args)
    assert guard.skipped == 5 and guard.consecutive == 0
    scaler.scale = 1.0
    guard.snapshot(model)
    assert not guard.is_finite(torch.tensor(1.0), torch.tensor(math.inf), 5)
    guard.skip(step=5, **args)
    guard.snapshot(model)
    assert not guard.is_finite(torch.tensor(1.0), torch.tensor(math.inf), 6)
    with pytest.raises(NonFiniteError, match="fp16 overflow"):
        guard.skip(step=6, **args)
    # a non-finite loss always counts, whatever the scale
    guard = FiniteGuard(1, _FakeScaler(2.0**16), amp=torch.float16)
    guard.snapshot(model)
    assert not guard.is_finite(torch.tensor(math.nan), torch.tensor(math.nan), 0)
    with pytest.raises(NonFiniteError, match="very first step"):
        guard.skip(step=0, **{**args, "loss": torch.tensor(math.nan)})


def test_guard_counts_consecutive_and_resets(tmp_path):
    model = torch.nn.BatchNorm1d(3)
    guard = FiniteGuard(3)
    pattern = [True, False, False, True, False, False]
    for step, ok in enumerate(pattern):
        guard.snapshot(model)
        loss = torch.tensor(1.0 if ok else math.nan)
        assert guard.is_finite(loss, torch.tensor(0.5), step) is ok
        if not ok:
            guard.skip(model, step, loss, {}, 1e-3, 2.0)
    assert guard.skipped == 4 and guard.consecutive == 2
    assert FiniteGuard(3).state_dict() == {"skipped": 0, "consecutive": 0}
    other = FiniteGuard(3)
    other.load_state_dict(guard.state_dict())
    assert (other.skipped, other.consecutive) == (4, 2)


def test_buffer_overflow_with_a_finite_loss_is_caught_and_undone():
    """An Inf BatchNorm statistic behind a finite (normalised) loss: the step is skipped and the
    statistic restored."""
    bn = torch.nn.BatchNorm1d(2)
    guard = FiniteGuard(5)
    guard.snapshot(bn)
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    bn(torch.tensor([[1e38, 0.0], [-1e38, 1.0]]))   # the variance overflows to Inf
    assert not torch.isfinite(bn.running_var).all()
    assert not guard.is_finite(torch.tensor(0.3), torch.tensor(1.0), 0)
    guard.skip(bn, 0, torch.tensor(0.3), {}, 1e-3, 2.0)
    assert all(torch.equal(before[k], v) for k, v in bn.state_dict().items())


@pytest.mark.slow
def test_ddp_ranks_skip_a_nonfinite_step_together(tmp_path):
    """Only rank 1 sees step 1 go non-finite (a BatchNorm statistic); both ranks skip it (the
    decision is all-reduced) and end with identical weights and queues. Without the all-reduce
    rank 0 would step and rank 1 would not, and their weights would part."""
    import os
    import subprocess
    import sys
    root_dir = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": f"{root_dir}{os.pathsep}{root_dir / 'tests'}", "OMP_NUM_THREADS": "1"}
    root = tiny_data(tmp_path / "data", n_train=40)
    cfg = tiny_config(root, tmp_path / "run", **{"momentum.queue_size": 64})
    cfg.to_json(tmp_path / "cfg.json")
    out = tmp_path / "out"
    out.mkdir()
    torchrun = Path(sys.executable).with_name("torchrun")
    subprocess.run([str(torchrun), "--nproc_per_node=2", "--master_port", str(29600 + os.getpid() % 1000),
                    str(root_dir / "tests" / "ddp_nan_worker.py"), str(tmp_path / "cfg.json"), str(out), "3"],
                   env=env, check=True, capture_output=True, timeout=300)
    r0, r1 = (torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["skipped"] == r1["skipped"] == 1
    assert torch.equal(r0["image_keys"], r1["image_keys"])
    for k in r0["encoder"]:
        if "running" in k or "num_batches" in k:
            continue  # BatchNorm statistics are per rank
        assert torch.allclose(r0["encoder"][k], r1["encoder"][k], atol=1e-6), k
        assert torch.isfinite(r0["encoder"][k]).all(), k

"""``--tensorboard``: the optional ``userlab[tensorboard]`` extra logs the same numbers as the CSVs."""
from __future__ import annotations

import importlib.util

import pandas as pd
import pytest

from tiny import tiny_config, tiny_data
from userlab import cli


def _config_file(tmp_path):
    cfg = tiny_config(tiny_data(tmp_path / "data"), tmp_path / "run",
                      **{"optim.epochs": 2, "log_every": 2})
    path = tmp_path / "cfg.json"
    cfg.to_json(path)
    return path


def test_tensorboard_logs_the_csv_numbers(tmp_path):
    pytest.importorskip("tensorboard", reason="the userlab[tensorboard] extra is not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert cli.main(["train", "--config", str(_config_file(tmp_path)), "--tensorboard", "--no-progress"]) == 0
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    steps = pd.read_csv(tmp_path / "run" / "train_log.csv")
    evals = pd.read_csv(tmp_path / "run" / "eval_log.csv")
    loss = {e.step: e.value for e in events.Scalars("train/loss")}
    # a CSV row carries the step count before its step, TensorBoard the count after it
    assert sorted(loss) == sorted(int(s) + 1 for s in steps["step"])
    for s, value in zip(steps["step"], steps["loss"]):
        assert loss[int(s) + 1] == pytest.approx(value, rel=1e-6)
    rsum = [e.value for e in events.Scalars("dev/rsum")]
    assert rsum == pytest.approx(list(evals["rsum"]), rel=1e-6)
    assert len(rsum) == 2


def test_tensorboard_without_the_extra_is_a_named_error(tmp_path, monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: None if name == "tensorboard" else real(name, *a, **k))
    assert cli.main(["train", "--config", str(_config_file(tmp_path)), "--tensorboard", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "userlab[tensorboard]" in err and "tensorboard" in err
    assert not (tmp_path / "run" / "train_log.csv").exists()

"""userlab.probe (linear probes behind notebook claims) and userlab.cost (compute per schedule)."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from userlab import checkpoint as ckpt
from userlab.config import ExperimentConfig
from userlab.cost import cost_table, training_cost
from userlab.errors import CheckpointError, ConfigError, DataError
from userlab.probe import linear_probe


# -- probe ---------------------------------------------------------------------------------------
def test_probe_reads_a_linearly_coded_label_and_not_noise():
    rng = np.random.default_rng(0)
    labels = np.repeat(["red", "green", "blue"], 40)
    centres = rng.standard_normal((3, 16)) * 3.0
    x = centres[np.searchsorted(["blue", "green", "red"], labels)] + rng.standard_normal((120, 16))
    coded = linear_probe(x, labels, folds=4)
    assert coded.accuracy > 0.95 and coded.chance == pytest.approx(1 / 3)
    assert coded.classes == ("blue", "green", "red") and len(coded.per_class) == 3
    noise = linear_probe(rng.standard_normal((120, 16)), rng.permutation(labels), folds=4)
    assert noise.accuracy < 0.6                        # no signal: about chance
    assert coded.lift > 2.5 and "vs chance 33.3%" in str(coded)


def test_probe_chance_is_the_majority_rate_and_folds_are_checked():
    x = np.random.default_rng(1).standard_normal((30, 4))
    labels = ["a"] * 20 + ["b"] * 10
    assert linear_probe(x, labels, folds=5).chance == pytest.approx(20 / 30)
    with pytest.raises(ConfigError, match="rarest class: 2"):
        linear_probe(x[:22], labels[:22][:20] + ["b", "b"], folds=3)
    with pytest.raises(DataError, match="two classes"):
        linear_probe(x, ["a"] * 30)
    with pytest.raises(DataError, match=r"\(N, D\)"):
        linear_probe(x[:, 0], labels)


# -- cost ----------------------------------------------------------------------------------------
def _fake_run(folder, schedule: str, epochs: int, steps_per_epoch: int, seconds: float,
              branches: int = 2) -> None:
    cfg = ExperimentConfig()
    cfg.boost.schedule = schedule
    cfg.boost.num_branches = branches
    folder.mkdir(parents=True, exist_ok=True)
    cfg.to_json(folder / "config.json")
    steps = epochs * steps_per_epoch
    ckpt.save_checkpoint(folder, "last", steps, {"w": torch.zeros(1)},
                         {"step": steps, "epoch": epochs}, json.dumps(cfg.to_dict()))
    rows = [{"step": e * steps_per_epoch + s, "epoch": e, "time": seconds * (s + 1) / steps_per_epoch}
            for e in range(epochs) for s in range(steps_per_epoch)]
    pd.DataFrame(rows).to_csv(folder / "train_log.csv", index=False)


def test_cost_counts_both_offline_stages_and_online_branches(tmp_path):
    _fake_run(tmp_path / "plain", "none", 4, 10, 2.0)
    _fake_run(tmp_path / "offline" / "anchor", "none", 3, 10, 2.0)
    _fake_run(tmp_path / "offline", "offline", 4, 10, 2.5)
    _fake_run(tmp_path / "online", "online", 4, 10, 4.0, branches=3)
    stages = training_cost(tmp_path / "offline")
    assert stages["stage"].tolist() == ["anchor", "main"]
    assert stages["epochs"].tolist() == [3, 4] and stages["frozen_passes"].tolist() == [0, 40]
    table = cost_table({"VSE++": tmp_path / "plain", "DBL offline": tmp_path / "offline",
                        "DBL online": tmp_path / "online"}).set_index("model")
    assert table.loc["DBL offline", "epochs"] == 7 and table.loc["VSE++", "epochs"] == 4
    assert table.loc["DBL offline", "trained_passes"] == 70
    assert table.loc["DBL online", "trained_passes"] == 120        # 3 branches x 40 steps
    assert table.loc["DBL offline", "train_seconds"] == pytest.approx(3 * 2.0 + 4 * 2.5)
    assert table.loc["DBL offline", "stages"] == "anchor 3 ep + main 4 ep"


def test_cost_of_a_folder_that_is_no_run(tmp_path):
    with pytest.raises(CheckpointError, match="config.json"):
        training_cost(tmp_path)

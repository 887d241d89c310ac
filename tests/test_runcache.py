"""Checkpoints keyed by config: reuse what was trained, train only what is missing; lesson parameters."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import jupytext
import numpy as np
import pandas as pd
import pytest

from tiny import tiny_data, tiny_config
from userlab import experiment, runcache
from userlab.errors import ConfigError, DataError
from userlab.notebook import MarginRecorder, feature_info, open_lesson
from userlab.runcache import config_key, fit_cached, is_finished

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def tiny(tmp_path):
    data = tiny_data(tmp_path / "data")
    cfg = tiny_config(data, tmp_path / "unused", **{"optim.epochs": 2, "optim.lr_step": 0})
    return cfg, tmp_path / "runs"


def _count_trainings(monkeypatch) -> list:
    calls = []
    real = experiment.fit_experiment

    def counting(cfg, *args, **kwargs):
        calls.append(cfg.run_dir)
        return real(cfg, *args, **kwargs)

    monkeypatch.setattr(experiment, "fit_experiment", counting)
    return calls


def test_key_ignores_where_and_how_it_runs_but_not_what_it_learns(tiny, tmp_path):
    cfg, _ = tiny
    key = config_key(cfg)
    same = cfg.replace(**{"run_dir": "elsewhere", "optim.device": "cpu", "log_every": 7,
                          "data.num_workers": 2, "model.vocab_size": 123})
    assert config_key(same) == key
    for field, value in (("optim.lr", 2e-3), ("optim.epochs", 3), ("model.enhancement", "sge"),
                         ("data.train_max_images", 10)):
        assert config_key(cfg.replace(**{field: value})) != key, field
    # the same data elsewhere (a copy) is other data: its files' times differ
    copy = tmp_path / "copy"
    shutil.copytree(cfg.data.root, copy)
    os.utime(copy / "train_ims.npy", (1, 1))
    assert config_key(cfg.replace(**{"data.root": str(copy)})) != key
    # a relative root is resolved against the given base folder
    rel = cfg.replace(**{"data.root": "data"})
    assert config_key(rel, base=Path(cfg.data.root).parent) == key


def test_trains_once_then_reuses_and_reuses_a_run_trained_elsewhere(tiny, monkeypatch):
    cfg, runs = tiny
    calls = _count_trainings(monkeypatch)
    first = fit_cached(cfg, runs, progress=False)
    assert first.trained and first.run_dir == runs / "cache" / config_key(cfg)
    assert is_finished(first.run_dir, cfg) and list(first.history["epoch"]) == [1, 2]
    assert json.loads((first.run_dir / runcache.MARKER).read_text())["key"] == config_key(cfg)
    again = fit_cached(cfg.replace(run_dir="ignored"), runs, progress=False)
    assert not again.trained and again.run_dir == first.run_dir and len(calls) == 1
    assert again.best_rsum == pytest.approx(first.best_rsum)
    assert again.load().cfg.optim.epochs == 2

    # a run made elsewhere (like make demo's runs/demo_user) with the same config is reused
    other = cfg.replace(**{"optim.seed": 5})
    experiment.fit_experiment(other.replace(run_dir=str(runs / "demo_like")), progress=False)
    n = len(calls)
    reused = fit_cached(other, runs, progress=False)
    assert not reused.trained and reused.run_dir == runs / "demo_like" and len(calls) == n

    # an interrupted run is not finished: it is trained (resumed) in the cache
    third = cfg.replace(**{"optim.seed": 9})
    experiment.fit_experiment(third.replace(run_dir=str(runs / "cache" / config_key(third))),
                              progress=False, max_steps=2)
    assert not is_finished(runs / "cache" / config_key(third), third)
    done = fit_cached(third, runs, progress=False)
    assert done.trained and is_finished(done.run_dir, third)


def test_a_reused_run_trained_with_a_relative_root_reads_the_lessons_data(tiny, monkeypatch):
    """make demo trains from the repo root with data.root = "data/demo"; a notebook kernel runs
    in notebooks/ (or a book's build folder), where that relative path names nothing."""
    cfg, runs = tiny
    data = Path(cfg.data.root)
    monkeypatch.chdir(data.parent)
    trained = cfg.replace(**{"data.root": data.name, "run_dir": str(runs / "demo_like")})
    experiment.fit_experiment(trained, progress=False)
    monkeypatch.chdir(runs.parent.parent)        # somewhere the relative root does not resolve
    assert not (Path.cwd() / data.name / "train_ims.npy").exists()
    reused = fit_cached(cfg, runs, progress=False, base=data.parent)
    assert not reused.trained and reused.run_dir == runs / "demo_like"
    loaded = reused.load()
    assert Path(loaded.cfg.data.root) == data
    from userlab.runs import encode_run
    img, cap, split = encode_run(loaded, split="dev")
    assert img.shape[0] == split.num_images and cap.shape[0] == len(split.captions)


def test_recorded_margins_come_back_and_a_run_without_them_is_trained(tiny, monkeypatch):
    cfg, runs = tiny
    calls = _count_trainings(monkeypatch)
    experiment.fit_experiment(cfg.replace(run_dir=str(runs / "no_records")), progress=False)
    rec = MarginRecorder("SGE", max_images=8)
    run = fit_cached(cfg, runs, callbacks=[rec], progress=False)
    assert run.trained and run.run_dir.parent.name == "cache"   # the finished run had no margins
    assert sorted(rec.records["epoch"].unique()) == [1, 2] and len(calls) == 2
    again = MarginRecorder("SGE", max_images=8)
    reused = fit_cached(cfg, runs, callbacks=[again], progress=False)
    assert not reused.trained and len(calls) == 2
    pd.testing.assert_frame_equal(again.records, rec.records, check_dtype=False)
    # records an older recorder wrote (a column missing) do not count: recorded afresh
    margins = reused.run_dir / runcache.RECORDS_DIR / "margins.csv"
    pd.read_csv(margins).drop(columns=["hardest_negative"]).to_csv(margins, index=False)
    assert not MarginRecorder("SGE").load(margins.parent)
    assert fit_cached(cfg, runs, callbacks=[MarginRecorder("SGE", max_images=8)], progress=False).trained


def test_trainer_view_restores_queues_without_touching_the_run(tiny):
    cfg, runs = tiny
    run = fit_cached(cfg, runs, progress=False)
    before = {p.name: p.read_bytes() for p in run.run_dir.iterdir() if p.is_file()}
    trainer = run.trainer()
    assert trainer.epoch == 2 and int((trainer.model.text_queue.ids >= 0).sum()) > 0
    assert {p.name: p.read_bytes() for p in run.run_dir.iterdir() if p.is_file()} == before


def test_open_lesson_reads_parameters_and_environment(tiny, tmp_path, monkeypatch):
    cfg, runs = tiny
    monkeypatch.setenv("USERLAB_DATA", cfg.data.root)
    monkeypatch.setenv("USERLAB_RUNS", str(runs))
    monkeypatch.setenv("USERLAB_DEVICE", "cpu")
    lesson = open_lesson(smoke=True)
    assert (lesson.data_root, lesson.runs_root, lesson.device, lesson.demo) == (Path(cfg.data.root), runs, "cpu", False)
    assert lesson.features.layout == "regions" and lesson.features.grid == (1, 4) and lesson.has_guide
    user = lesson.config("demo")
    assert (user.model.region_dim, user.model.num_regions, user.model.guide_dim) == (8, 4, 6)
    assert user.optim.device == "cpu" and user.data.batch_size == 16
    assert (user.data.train_max_images, user.data.dev_max_images) == (200, 100)   # smoke: a slice
    explicit = open_lesson(data_dir=cfg.data.root, runs_dir=str(tmp_path / "r2"), device="cuda:1", smoke=True)
    assert explicit.runs_root == tmp_path / "r2" and explicit.device == "cuda:1"
    with pytest.raises(DataError, match="data folder not found"):
        open_lesson(data_dir=str(tmp_path / "nowhere"))


def test_lesson_refuses_cge_without_guide_features(tmp_path):
    data = tiny_data(tmp_path / "noguide", guide_dim=None)
    lesson = open_lesson(data_dir=str(data), runs_dir=str(tmp_path / "runs"), smoke=True)
    assert not lesson.has_guide
    with pytest.raises(ConfigError, match="guide features"):
        lesson.config("demo", **{"model.enhancement": "cge"})


def test_feature_layout_from_boxes(tmp_path):
    from userlab.data.features import grid_boxes
    from userlab.data.precomp import write_precomp_split
    ims = np.random.default_rng(0).standard_normal((2, 4, 8)).astype(np.float32)
    caps = [f"caption {i}" for i in range(10)]
    grid = np.stack([grid_boxes(64, 48, 2, 2)] * 2)
    write_precomp_split(tmp_path / "g", "train", ims, caps, boxes=grid)
    assert (feature_info(tmp_path / "g").layout, feature_info(tmp_path / "g").grid) == ("grid", (2, 2))
    boxes = grid.copy()
    boxes[:, 0] = [3, 4, 30, 40]                      # an object box: not a grid any more
    write_precomp_split(tmp_path / "b", "train", ims, caps, boxes=boxes)
    assert (feature_info(tmp_path / "b").layout, feature_info(tmp_path / "b").grid) == ("boxes", None)


@pytest.mark.parametrize("nb_path", sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")), ids=lambda p: p.stem)
def test_each_notebook_opens_with_one_parameters_cell(nb_path):
    nb = jupytext.read(nb_path)
    code = [c for c in nb.cells if c.cell_type == "code"]
    tagged = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1 and tagged[0] is code[0], f"{nb_path.name}: the first code cell must be the only parameters cell"
    names = {}
    exec(tagged[0].source, {}, names)   # plain assignments only
    assert names == {"data_dir": None, "runs_dir": None, "device": None, "preset": None}
    assert "open_lesson(data_dir, runs_dir, device, preset)" in code[1].source


def test_the_preset_parameter_picks_the_lessons_config_and_reuses_a_run_trained_with_it(tmp_path, monkeypatch):
    """A finished ``userlab train --preset f8k-cpu`` run is what the lessons load when the
    parameters cell names that preset; an unknown name is refused with the parameter's name."""
    from userlab.config import preset
    from userlab.errors import ConfigError
    from userlab.data.precomp import write_precomp_split
    from userlab.lesson import open_lesson
    rng = np.random.default_rng(0)
    ims = rng.standard_normal((12, 49, 8)).astype(np.float32)
    write_precomp_split(tmp_path / "d", "train", ims, [f"a photo number {i}" for i in range(60)],
                        guide=rng.standard_normal((12, 8)).astype(np.float32))
    monkeypatch.delenv("USERLAB_PRESET", raising=False)
    lesson = open_lesson(str(tmp_path / "d"), str(tmp_path / "runs"), "cpu", smoke=False, progress=False)
    assert lesson.preset == "demo" and lesson.config().optim.epochs == preset("demo").optim.epochs
    assert lesson.eval_split == "dev"                 # no test split written: evaluate on dev
    write_precomp_split(tmp_path / "d", "test", ims[:4], [f"a photo number {i}" for i in range(20)])
    assert lesson.eval_split == "test"
    lesson = open_lesson(str(tmp_path / "d"), str(tmp_path / "runs"), "cpu", "f8k-cpu", smoke=False, progress=False)
    cfg = lesson.config()
    assert cfg.model.enhancement == "sge+cge" and cfg.optim.epochs == preset("f8k-cpu").optim.epochs
    assert (cfg.model.num_regions, cfg.model.region_dim) == (49, 8)      # sized to the features
    assert lesson.config("vsepp").loss.objective == "triplet"
    monkeypatch.setenv("USERLAB_PRESET", "f31k")
    with pytest.raises(ConfigError, match="preset.*f31k"):
        open_lesson(str(tmp_path / "d"), str(tmp_path / "runs"), "cpu", smoke=False, progress=False)


def test_lessons_on_own_data_draw_into_a_git_ignored_folder(tmp_path):
    """Figures of a user's photos must not overwrite the demo's committed figures."""
    import subprocess
    from userlab.data.precomp import write_precomp_split
    from userlab.lesson import open_lesson
    from userlab.notebook import figures_dir
    ims = np.random.default_rng(0).standard_normal((6, 4, 8)).astype(np.float32)
    write_precomp_split(tmp_path / "d", "train", ims, [f"a photo number {i}" for i in range(30)])
    try:
        open_lesson(str(tmp_path / "d"), str(tmp_path / "runs"), "cpu", smoke=False, progress=False)
        own = figures_dir(smoke=False)
        assert own == ROOT / "figures" / "own"
        if (ROOT / ".git").exists():
            ignored = subprocess.run(["git", "check-ignore", "-q", str(own / "x.png")], cwd=ROOT)
            assert ignored.returncode == 0, "figures/own/ must be git-ignored"
    finally:
        from userlab.notebook import use_own_data_figures
        use_own_data_figures(False)
    assert figures_dir(smoke=False) == ROOT / "figures"

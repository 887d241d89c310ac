"""Ablation runner: cell configs, a 2x2x1 grid on tiny random data, resume, summary, figure, subset."""
from __future__ import annotations

import math

import matplotlib
import numpy as np
import pandas as pd
import pytest

from tiny import tiny_config, tiny_data
from userlab import ablation, experiment
from userlab.ablation import (BACKBONES, AblationGrid, format_summary, make_train_subset, plot_ablation,
                              run_ablation, slug, strategy_overrides, summarize)
from userlab.config import preset
from userlab.errors import ConfigError

matplotlib.use("Agg")

BACKBONE_PAIR = ("VSE++", "full USER")
STRATEGY_PAIR = ("none", "DBL relative")


# -- cell configurations ------------------------------------------------------------------------
def test_folder_names_are_safe_and_distinct():
    names = [slug(b) for b in BACKBONES] + [slug(s) for s in ablation.STRATEGY_NAMES]
    assert slug("VSE++") == "vsepp" and slug("+queue/UTO") == "queue-uto" and slug("DBL relative") == "dbl-relative"
    assert len(set(names)) == len(names)
    assert all(n and "/" not in n and " " not in n and "+" not in n for n in names)


def test_cell_configs_switch_the_right_parts_on(tmp_path):
    grid = AblationGrid(backbones=tuple(BACKBONES), strategies=ablation.STRATEGY_NAMES, seeds=(7,), epochs=4,
                        data_root=str(tmp_path / "d"), out_dir=str(tmp_path / "out"))
    expected = {"VSE++": ("none", False, "triplet"), "+SGE": ("sge", False, "triplet"),
                "+queue/UTO": ("none", True, "uto"), "+CGE": ("cge", True, "uto"),
                "full USER": ("sge+cge", True, "uto")}
    for backbone, (enh, mom, objective) in expected.items():
        cfg = grid.config(backbone, "DBL absolute", 7)
        assert (cfg.model.enhancement, cfg.momentum.enabled, cfg.loss.objective) == (enh, mom, objective)
        # the demo preset keeps lr constant (lr_step 0), and so does every cell
        assert cfg.optim.seed == 7 and cfg.optim.epochs == 4 and cfg.optim.lr_step == 0
        assert cfg.data.root == str(tmp_path / "d")
        assert cfg.run_dir == str(tmp_path / "out" / slug(backbone) / "dbl-absolute" / "seed7")
        # the rest comes from the demo preset
        assert cfg.model.region_dim == 1280 and cfg.model.embed_size == 256
    # a base config with a decay step gets it moved to 3/4 of the cells' epochs
    decaying = AblationGrid(backbones=("VSE++",), strategies=("none",), seeds=(7,), epochs=4,
                            base=preset("demo").replace(**{"optim.lr_step": 2}))
    assert decaying.config("VSE++", "none", 7).optim.lr_step == 3
    boost = {s: (grid.config("VSE++", s, 7).boost.schedule, grid.config("VSE++", s, 7).boost.strategy)
             for s in ablation.STRATEGY_NAMES}
    assert boost == {"none": ("none", "none"), "DBL relative": ("online", "relative"),
                     "DBL absolute": ("online", "absolute"), "distillation": ("online", "score_matching"),
                     "mutual learning": ("online", "mutual")}
    assert grid.config("full USER", "mutual learning", 7).boost.num_branches == 2
    # the momentum schedule moves DBL and distillation, not mutual learning
    table = strategy_overrides("momentum")
    assert table["DBL relative"]["boost.schedule"] == "momentum"
    assert table["distillation"]["boost.schedule"] == "momentum"
    assert table["mutual learning"]["boost.schedule"] == "online"
    # signatures: seeds differ, folders do not matter
    assert grid.signature(grid.config("VSE++", "none", 7)) != grid.signature(grid.config("VSE++", "none", 7).replace(
        **{"optim.seed": 8}))
    assert grid.signature(grid.config("VSE++", "none", 7)) == grid.signature(grid.config("VSE++", "none", 7).replace(
        **{"run_dir": "elsewhere"}))


def test_bad_grids_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="unknown backbone"):
        AblationGrid(backbones=("VSE+++",))
    with pytest.raises(ConfigError, match="unknown strategy"):
        AblationGrid(strategies=("DBL",))
    with pytest.raises(ConfigError, match="dbl_schedule"):
        AblationGrid(dbl_schedule="async")
    with pytest.raises(ConfigError, match="seeds"):
        AblationGrid(seeds=(1, 1))
    with pytest.raises(ConfigError, match="epochs"):
        AblationGrid(epochs=0)


# -- a real grid ---------------------------------------------------------------------------------
def _tiny_grid(tmp_path, **changes) -> AblationGrid:
    root = tmp_path / "data"
    if not (root / "train_ims.npy").is_file():
        tiny_data(root, n_train=8, n_dev=6)
    base = tiny_config(root, tmp_path / "unused")
    kwargs = dict(backbones=BACKBONE_PAIR, strategies=STRATEGY_PAIR, seeds=(1,), epochs=1, data_root=str(root),
                  out_dir=str(tmp_path / "out"), base=base)
    kwargs.update(changes)
    return AblationGrid(**kwargs)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """The 2x2x1 grid, run once, with every fit_experiment call counted."""
    tmp_path = tmp_path_factory.mktemp("ablation")
    grid = _tiny_grid(tmp_path)
    calls = []

    def counting_fit(cfg, *args, **kwargs):
        calls.append(cfg.run_dir)
        return real_fit(cfg, *args, **kwargs)

    real_fit = experiment.fit_experiment
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(experiment, "fit_experiment", counting_fit)
        df = run_ablation(grid, progress=False, log=None, threads=1)
        first_calls = list(calls)
        again = run_ablation(grid, progress=False, log=None, threads=1)
    return grid, df, again, first_calls, calls


def test_grid_writes_one_row_per_cell(finished):
    grid, df, _, first_calls, _ = finished
    assert len(first_calls) == 4
    assert list(zip(df["backbone"], df["strategy"], df["seed"])) == list(grid.cells())
    on_disk = pd.read_csv(f"{grid.out_dir}/ablation.csv")
    assert len(on_disk) == 4
    for col in ("rsum", "i2t_R@1", "t2i_R@1", "train_seconds", "signature", "run_dir"):
        assert col in on_disk.columns
    recall = [f"{d}_R@{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)]
    assert np.allclose(on_disk["rsum"], on_disk[recall].sum(axis=1))
    assert (on_disk["n_images"] == 6).all() and (on_disk["n_captions"] == 30).all()
    assert (on_disk["train_seconds"] > 0).all()
    assert set(on_disk["schedule"]) == {"none", "online"}
    for _, row in on_disk.iterrows():
        assert (grid.run_dir(row["backbone"], row["strategy"], row["seed"]) / "checkpoints" / "best.txt").is_file()


def test_row_metrics_match_an_explicit_ranking_of_the_saved_model(finished):
    from userlab.runs import similarity_for_run
    grid, df, *_ = finished
    row = df[(df["backbone"] == "full USER") & (df["strategy"] == "DBL relative")].iloc[0]
    sims = similarity_for_run(row["run_dir"], split="test", data_root=grid.data_root, tag=row["tag"])
    S = sims.double().numpy()
    n_img, n_cap = S.shape
    i2t_hits = 0
    for i in range(n_img):
        best = max(range(n_cap), key=lambda c: (S[i, c], -c))
        i2t_hits += best // 5 == i
    t2i_hits = 0
    for c in range(n_cap):
        best = max(range(n_img), key=lambda i: (S[i, c], -i))
        t2i_hits += best == c // 5
    assert row["i2t_R@1"] == pytest.approx(100.0 * i2t_hits / n_img)
    assert row["t2i_R@1"] == pytest.approx(100.0 * t2i_hits / n_cap)


def test_second_call_trains_nothing_and_returns_the_same_rows(finished):
    _, df, again, first_calls, calls = finished
    assert calls == first_calls  # no new fit_experiment call
    pd.testing.assert_frame_equal(df, again)


def test_missing_row_retrains_only_that_cell_and_changed_settings_retrain(finished, tmp_path, monkeypatch):
    import shutil
    grid, df, *_ = finished
    out = tmp_path / "copy"
    shutil.copytree(grid.out_dir, out)
    # forget one finished cell's row; its run folder (a finished checkpoint) stays
    rows = pd.read_csv(out / "ablation.csv")
    rows = rows[~((rows["backbone"] == "VSE++") & (rows["strategy"] == "none"))]
    rows.to_csv(out / "ablation.csv", index=False)
    calls = []
    real_fit = experiment.fit_experiment
    monkeypatch.setattr(experiment, "fit_experiment",
                        lambda cfg, *a, **k: calls.append(cfg.run_dir) or real_fit(cfg, *a, **k))
    moved = AblationGrid(**{**{f: getattr(grid, f) for f in AblationGrid.__dataclass_fields__}, "out_dir": str(out)})
    redone = run_ablation(moved, progress=False, log=None, threads=1)
    assert calls == [str(moved.run_dir("VSE++", "none", 1))]
    # the finished checkpoint was resumed, not retrained: same test metrics as before
    before = df[(df["backbone"] == "VSE++") & (df["strategy"] == "none")].iloc[0]
    after = redone[(redone["backbone"] == "VSE++") & (redone["strategy"] == "none")].iloc[0]
    assert after["rsum"] == pytest.approx(before["rsum"]) and after["steps"] == before["steps"]
    # another seed is a new cell; the old rows stay
    calls.clear()
    more = AblationGrid(**{**{f: getattr(moved, f) for f in AblationGrid.__dataclass_fields__},
                           "backbones": ("VSE++",), "strategies": ("none",), "seeds": (2,)})
    run_ablation(more, progress=False, log=None, threads=1)
    assert calls == [str(more.run_dir("VSE++", "none", 2))]
    assert len(pd.read_csv(out / "ablation.csv")) == 5


# -- summary and figure --------------------------------------------------------------------------
def _fake_results() -> pd.DataFrame:
    rng = np.random.default_rng(3)
    rows = []
    for backbone in ("full USER", "VSE++"):          # deliberately not in table order
        for strategy in ("mutual learning", "none", "DBL relative"):
            for seed in (1, 2, 3):
                rows.append({"backbone": backbone, "strategy": strategy, "seed": seed,
                             "rsum": float(rng.uniform(100, 300)), "i2t_R@1": float(rng.uniform(0, 50)),
                             "t2i_R@1": float(rng.uniform(0, 50))})
    rows.append({"backbone": "VSE++", "strategy": "DBL absolute", "seed": 1, "rsum": 200.0,
                 "i2t_R@1": 10.0, "t2i_R@1": 5.0})
    return pd.DataFrame(rows)


def test_summary_mean_and_sample_std_by_hand():
    df = _fake_results()
    summary = summarize(df)
    assert list(zip(summary["backbone"], summary["strategy"])) == [
        ("VSE++", "none"), ("VSE++", "DBL relative"), ("VSE++", "DBL absolute"), ("VSE++", "mutual learning"),
        ("full USER", "none"), ("full USER", "DBL relative"), ("full USER", "mutual learning")]
    for _, r in summary.iterrows():
        part = [row for _, row in df.iterrows()
                if row["backbone"] == r["backbone"] and row["strategy"] == r["strategy"]]
        assert r["seeds"] == len(part)
        for metric in ("rsum", "i2t_R@1", "t2i_R@1"):
            values = [float(p[metric]) for p in part]
            mean = sum(values) / len(values)
            assert r[f"{metric}_mean"] == pytest.approx(mean, rel=1e-12)
            if len(values) == 1:
                assert math.isnan(r[f"{metric}_std"])
            else:
                var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
                assert r[f"{metric}_std"] == pytest.approx(math.sqrt(var), rel=1e-12)


def test_format_summary_shows_mean_pm_std_and_delta():
    df = _fake_results()
    summary = summarize(df)
    text = format_summary(summary)
    lines = text.splitlines()
    assert lines[0].startswith("| backbone | strategy | seeds | rSum | i2t R@1 | t2i R@1 | Δ rSum vs none")
    assert len(lines) == 2 + len(summary)
    r = summary[(summary["backbone"] == "VSE++") & (summary["strategy"] == "DBL relative")].iloc[0]
    base = summary[(summary["backbone"] == "VSE++") & (summary["strategy"] == "none")].iloc[0]
    line = next(l for l in lines if l.startswith("| VSE++ | DBL relative |"))
    assert f"{r['rsum_mean']:.1f} ± {r['rsum_std']:.1f}" in line
    assert f"{r['rsum_mean'] - base['rsum_mean']:+.1f}" in line
    single = next(l for l in lines if l.startswith("| VSE++ | DBL absolute |"))
    assert "| 200.0 |" in single and "±" not in single.split("|")[4]


def test_plot_shows_the_seed_means(tmp_path):
    from userlab import viz
    df = _fake_results()
    fig = plot_ablation(df)
    assert len(fig.axes) == 3
    ax = fig.axes[0]
    plotted = np.concatenate([line.get_ydata() for line in ax.lines if line.get_marker() not in (None, "None", "")])
    means = df.groupby(["backbone", "strategy"])["rsum"].mean().to_numpy()
    for m in means:
        assert np.isclose(plotted, m).any(), m
    path = viz.save(fig, "ablation", tmp_path)
    assert path.is_file() and path.stat().st_size > 5000


def test_summary_rejects_missing_columns():
    from userlab.errors import DataError
    with pytest.raises(DataError, match="rsum"):
        summarize(pd.DataFrame({"backbone": ["x"], "strategy": ["none"]}))


# -- training subset -----------------------------------------------------------------------------
def test_train_subset_keeps_the_first_images_and_links_the_rest(tmp_path):
    from userlab.data.precomp import PrecompDataset
    from userlab.data.text import Vocabulary, build_vocab
    root = tiny_data(tmp_path / "data", n_train=10, n_dev=4)
    out = make_train_subset(root, tmp_path / "sub", 3, vocab_threshold=1)
    full = PrecompDataset(root, "train", validate=False)
    sub = PrecompDataset(out / "precomp", "train", validate=False)
    assert sub.num_images == 3 and sub.captions == full.captions[:15]
    assert np.array_equal(np.asarray(sub.ims), np.asarray(full.ims)[:3])
    assert np.array_equal(np.asarray(sub.guide), np.asarray(full.guide)[:3])
    assert list(sub.ids) == list(full.ids[:3])
    assert (out / "precomp" / "test_ims.npy").is_symlink()
    test = PrecompDataset(out / "precomp", "test", validate=False)
    assert test.num_images == 4
    vocab = Vocabulary.load(out / "precomp" / "vocab.json")
    assert vocab.to_json() == build_vocab(full.captions, threshold=1).to_json()
    stamp = (out / "precomp" / "subset.json").stat().st_mtime_ns
    make_train_subset(root, tmp_path / "sub", 3, vocab_threshold=1)  # cached
    assert (out / "precomp" / "subset.json").stat().st_mtime_ns == stamp
    with pytest.raises(Exception, match="train_images=99"):
        make_train_subset(root, tmp_path / "sub2", 99)


def test_triplet_cells_drop_the_lr_when_their_vse0_warm_up_ends(tmp_path):
    """On the constant-lr demo base, the triplet backbones follow the VSE++ preset's recipe (lr x0.2
    once hardest negatives start); the UTO backbones keep the demo's constant lr."""
    from userlab.pipeline import lr_at_epoch
    grid = ablation.default_grid(data_root=str(tmp_path / "d"), out_dir=str(tmp_path / "out"))
    for backbone in BACKBONES:
        cfg = grid.config(backbone, "none", 1)
        lrs = [lr_at_epoch(cfg.optim.lr, e, cfg.optim.lr_step, cfg.optim.lr_decay) for e in range(cfg.optim.epochs)]
        if cfg.loss.objective == "triplet":
            assert cfg.loss.warmup_epochs == 1 and lrs == pytest.approx([1e-3, 2e-4])
        else:
            assert lrs == pytest.approx([1e-3, 1e-3])

"""The DBL / USER ablation grid: backbones x training strategies x seeds, resumable, with a summary.

A *cell* is one (backbone, strategy, seed). Every cell is built from one base configuration
(``preset("demo")`` unless the grid says otherwise) by two sets of dotted overrides:

- :data:`BACKBONES` says which USER parts are switched on (section 2 of the method notes):
  ``VSE++`` (no enhancement, no queues, hardest-negative triplet), ``+SGE``, ``+queue/UTO``
  (momentum encoders, two queues, unified objective), ``+CGE`` and ``full USER`` (SGE + CGE +
  queues + UTO).
- :func:`strategy_overrides` says how the model is trained (section 4): ``none`` (one model),
  ``DBL relative`` / ``DBL absolute``, ``distillation`` and ``mutual learning``.

Schedules and compute. DBL runs on the **online** schedule by default: two branches initialised
independently and trained together on the same batches, the target (branch 1) boosted against
branch 0. Mutual learning (always online, two branches learning from each other) then costs the
same per step, which is the comparison DBL's abstract makes ("at the same computational cost").
``distillation`` follows DBL's schedule with the ``score_matching`` strategy (DBL's ``rkd``:
smooth-L1 between the score matrices x10, section 4.4): it is the purest "imitate the peer's
scores" baseline, the opposite of DBL's "beat the peer's margins", and with the same schedule the
only difference from DBL is the loss term. With ``dbl_schedule="momentum"`` the anchor is an EMA
copy of the target (one backward pass per step, cheaper than online); mutual learning stays
online because it needs two trained peers.

Outputs of :func:`run_ablation` under ``grid.out_dir``:

- ``<backbone>/<strategy>/seed<k>/``: each cell's run folder (names made filesystem-safe by
  :func:`slug`, e.g. ``vsepp/dbl-relative/seed1``);
- ``ablation.csv``: one row per finished cell (test metrics, train time), rewritten atomically
  after every cell; a cell whose row is there with the same configuration signature is skipped.

Typical use::

    grid = default_grid()                   # CPU-sized: 2 backbones x 4 strategies x 3 seeds
    df = run_ablation(grid, workers=2, threads=1)
    print(format_summary(summarize(df)))
    viz.save(plot_ablation(df), "ablation", grid.out_dir)
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import pandas as pd

from .config import HARDEST_NEGATIVE_LR_FACTOR, ExperimentConfig, preset
from .errors import ConfigError, DataError
from .evaluate import METRIC_COLUMNS
from .io import atomic_write_text

# -- what the grid is made of -------------------------------------------------------------------
#: USER parts switched on, as dotted overrides of the base config.
BACKBONES: dict[str, dict[str, Any]] = {
    "VSE++": {"model.enhancement": "none", "momentum.enabled": False, "loss.objective": "triplet"},
    "+SGE": {"model.enhancement": "sge", "momentum.enabled": False, "loss.objective": "triplet"},
    "+queue/UTO": {"model.enhancement": "none", "momentum.enabled": True, "loss.objective": "uto"},
    "+CGE": {"model.enhancement": "cge", "momentum.enabled": True, "loss.objective": "uto"},
    "full USER": {"model.enhancement": "sge+cge", "momentum.enabled": True, "loss.objective": "uto"},
}

#: The strategy the ``distillation`` baseline uses (DBL's ``rkd``; see the module docstring).
DISTILLATION_STRATEGY = "score_matching"
#: Strategy names in table order.
STRATEGY_NAMES: tuple[str, ...] = ("none", "DBL relative", "DBL absolute", "distillation", "mutual learning")
DBL_SCHEDULES = ("online", "momentum", "offline")


def strategy_overrides(dbl_schedule: str = "online") -> dict[str, dict[str, Any]]:
    """Dotted ``boost.*`` overrides of every training strategy.

    Args:
        dbl_schedule: schedule of DBL and of the distillation baseline: ``online`` (default,
            two branches, the same compute as mutual learning), ``momentum`` or ``offline``.
    """
    if dbl_schedule not in DBL_SCHEDULES:
        raise ConfigError("dbl_schedule", f"{dbl_schedule!r} is not one of {', '.join(DBL_SCHEDULES)}")
    two = {"boost.num_branches": 2}
    return {
        "none": {"boost.schedule": "none", "boost.strategy": "none"},
        "DBL relative": {"boost.schedule": dbl_schedule, "boost.strategy": "relative", **two},
        "DBL absolute": {"boost.schedule": dbl_schedule, "boost.strategy": "absolute", **two},
        "distillation": {"boost.schedule": dbl_schedule, "boost.strategy": DISTILLATION_STRATEGY, **two},
        "mutual learning": {"boost.schedule": "online", "boost.strategy": "mutual", **two},
    }


#: The strategies with DBL on the online schedule.
STRATEGIES: dict[str, dict[str, Any]] = strategy_overrides("online")

RESULTS_FILE = "ablation.csv"
SUMMARY_METRICS = ("rsum", "i2t_R@1", "t2i_R@1")
_KEY = ["backbone", "strategy", "seed"]


def slug(name: str) -> str:
    """A folder name for a backbone or strategy: ``VSE++`` -> ``vsepp``, ``+queue/UTO`` ->
    ``queue-uto``, ``DBL relative`` -> ``dbl-relative``."""
    text = name.lower().replace("++", "pp").lstrip("+")
    text = re.sub(r"[^a-z0-9]+", "-", text).strip("-")
    if not text:
        raise ConfigError("ablation", f"name {name!r} has no letters or digits to make a folder name")
    return text


# -- the grid -------------------------------------------------------------------------------------
@dataclass
class AblationGrid:
    """Backbones x strategies x seeds on one data set.

    Args:
        backbones: keys of :data:`BACKBONES`.
        strategies: keys of :func:`strategy_overrides`.
        seeds: ``optim.seed`` of each repetition.
        epochs: ``optim.epochs`` of every cell; a base config that decays the lr (``lr_step``
            > 0) decays it after ``max(1, 3*epochs//4)`` epochs, one with a constant lr (the
            demo preset) keeps it constant. None keeps the base config's epochs and lr step.
        data_root: data root (``data.root``) of every cell.
        out_dir: where the run folders and ``ablation.csv`` go.
        dbl_schedule: see :func:`strategy_overrides`.
        base: base configuration (default ``preset("demo")``); its ``data.root`` and ``run_dir``
            are replaced.
        overrides: extra dotted overrides applied to every cell last (e.g. batch size).
        train_images: train on the first N training images only (a subset folder is written under
            ``out_dir/_data``; dev and test stay whole); None: the whole split.
        test_images: evaluate on the first N test images; None: the whole test split.
        test_split: the split the metrics are computed on.
        max_steps: stop every cell after this many optimiser steps (smoke runs).
    """

    backbones: Sequence[str] = ("VSE++", "full USER")
    strategies: Sequence[str] = ("none", "DBL relative", "DBL absolute", "mutual learning")
    seeds: Sequence[int] = (1, 2, 3)
    epochs: Optional[int] = 2
    data_root: str = "data/demo"
    out_dir: str = "runs/ablation"
    dbl_schedule: str = "online"
    base: Optional[ExperimentConfig] = None
    overrides: dict[str, Any] = field(default_factory=dict)
    train_images: Optional[int] = None
    test_images: Optional[int] = None
    test_split: str = "test"
    max_steps: Optional[int] = None

    def __post_init__(self) -> None:
        self.backbones, self.strategies = tuple(self.backbones), tuple(self.strategies)
        self.seeds = tuple(int(s) for s in self.seeds)
        table = strategy_overrides(self.dbl_schedule)
        for name in self.backbones:
            if name not in BACKBONES:
                raise ConfigError("ablation.backbones", f"unknown backbone {name!r} (known: {', '.join(BACKBONES)})")
        for name in self.strategies:
            if name not in table:
                raise ConfigError("ablation.strategies", f"unknown strategy {name!r} (known: {', '.join(table)})")
        if not (self.backbones and self.strategies and self.seeds):
            raise ConfigError("ablation", "the grid needs at least one backbone, strategy and seed")
        for what, values in (("backbones", self.backbones), ("strategies", self.strategies),
                             ("seeds", self.seeds)):
            if len(set(values)) != len(values):
                raise ConfigError(f"ablation.{what}", f"repeated entries in {list(values)}")
        for what, value in (("epochs", self.epochs), ("train_images", self.train_images),
                            ("test_images", self.test_images), ("max_steps", self.max_steps)):
            if value is not None and value < 1:
                raise ConfigError(f"ablation.{what}", f"must be >= 1 or None, got {value}")

    # -- cells ---------------------------------------------------------------------------------
    def cells(self) -> Iterator[tuple[str, str, int]]:
        """``(backbone, strategy, seed)`` in run order: seed-major, so that a grid stopped early
        already holds one complete repetition."""
        for seed in self.seeds:
            for backbone in self.backbones:
                for strategy in self.strategies:
                    yield backbone, strategy, seed

    def __len__(self) -> int:
        return len(self.backbones) * len(self.strategies) * len(self.seeds)

    def run_dir(self, backbone: str, strategy: str, seed: int) -> Path:
        return Path(self.out_dir) / slug(backbone) / slug(strategy) / f"seed{seed}"

    def train_root(self) -> str:
        """The data root cells train on: ``data_root``, or the subset folder of ``train_images``."""
        if self.train_images is None:
            return str(self.data_root)
        return str(Path(self.out_dir) / "_data" / f"train{self.train_images}")

    def config(self, backbone: str, strategy: str, seed: int) -> ExperimentConfig:
        """The full configuration of one cell."""
        base = self.base if self.base is not None else preset("demo")
        dotted: dict[str, Any] = {"data.root": self.train_root(), "optim.seed": int(seed),
                                  "run_dir": str(self.run_dir(backbone, strategy, seed))}
        dotted.update(BACKBONES[backbone])
        dotted.update(strategy_overrides(self.dbl_schedule)[strategy])
        if self.epochs is not None:
            dotted["optim.epochs"] = self.epochs
            if base.optim.lr_step:
                dotted["optim.lr_step"] = max(1, (3 * self.epochs) // 4)
        dotted.update(self.overrides)
        cfg = base.replace(**dotted)
        if cfg.loss.objective == "triplet" and base.optim.lr_step == 0 and cfg.loss.warmup_epochs:
            # constant-lr base (the demo): the triplet backbones still drop the lr when their
            # VSE0 warm-up ends, as the VSE++ preset does; hardest negatives at 1e-3 near-collapse
            cfg.optim.lr_step, cfg.optim.lr_decay = cfg.loss.warmup_epochs, HARDEST_NEGATIVE_LR_FACTOR
        return cfg

    def signature(self, cfg: ExperimentConfig) -> str:
        """Short hash of everything that decides a cell's result (not where it is written)."""
        data = cfg.to_dict()
        data.pop("run_dir")
        data["model"].pop("vocab_size")  # filled in by the Trainer, not chosen
        data["data"].pop("root")        # the subset folder name already encodes train_images
        data["_grid"] = {"data_root": str(Path(self.data_root).resolve()), "train_images": self.train_images,
                         "test_images": self.test_images, "test_split": self.test_split,
                         "max_steps": self.max_steps}
        blob = json.dumps(data, sort_keys=True).encode()
        return hashlib.sha1(blob).hexdigest()[:12]


def default_grid(data_root: str = "data/demo", out_dir: str = "runs/ablation", dbl_schedule: str = "online",
                 seeds: Sequence[int] = (1, 2, 3)) -> AblationGrid:
    """CPU-sized: VSE++ and full USER x none / DBL relative / DBL absolute / mutual learning x 3
    seeds; two epochs over the first 750 training scenes (3750 captions, batches of 64: 118
    steps at the demo preset's constant lr 1e-3), the first epoch of the triplet backbone with VSE0
    warm-up as in the demo's baseline, tested on the whole test split. 24 cells, 42
    single-model trainings' worth of compute (the boosted cells train two branches): about 20
    minutes on 2 idle CPU cores with ``workers=2, threads=1``. Short training: it ranks early
    learning, not converged models."""
    return AblationGrid(backbones=("VSE++", "full USER"),
                        strategies=("none", "DBL relative", "DBL absolute", "mutual learning"),
                        seeds=seeds, epochs=2, data_root=data_root, out_dir=out_dir,
                        dbl_schedule=dbl_schedule, train_images=750,
                        overrides={"data.batch_size": 64, "loss.warmup_epochs": 1})


def full_grid(data_root: str = "data/demo", out_dir: str = "runs/ablation_full", dbl_schedule: str = "online",
              seeds: Sequence[int] = (1, 2, 3), epochs: Optional[int] = None) -> AblationGrid:
    """Every backbone x every strategy x seeds on the whole training split (GPU-sized; the base
    config's 8 epochs unless ``epochs`` is given)."""
    return AblationGrid(backbones=tuple(BACKBONES), strategies=STRATEGY_NAMES, seeds=seeds, epochs=epochs,
                        data_root=data_root, out_dir=out_dir, dbl_schedule=dbl_schedule)


def component_grid(data_root: str = "data/demo", out_dir: str = "runs/ablation_components",
                   seeds: Sequence[int] = (1, 2, 3)) -> AblationGrid:
    """The component ladder (VSE++, +SGE, +queue/UTO, +CGE, full USER) trained alone, at the
    default grid's CPU budget (two epochs over the first 750 scenes, batch 64, VSE0 warm-up for
    the triplet backbones); :func:`component_steps` gives each step's Δ rSum with intervals."""
    grid = default_grid(data_root=data_root, out_dir=out_dir, seeds=seeds)
    grid.backbones, grid.strategies = tuple(BACKBONES), ("none",)
    return grid


SMOKE_DATA = "data/demo_smoke"


def smoke_grid(data_root: Optional[str] = None, out_dir: str = "runs/ablation_smoke",
               base: Optional[ExperimentConfig] = None, max_steps: int = 4) -> AblationGrid:
    """Seconds-sized: VSE++ and full USER x none / DBL relative x seed 1, one epoch cut at
    ``max_steps`` steps, small batches and queues.

    Args:
        data_root: data to use; None builds (once) the tiny demo scenes in ``data/demo_smoke``
            with :meth:`SceneConfig.tiny` (needs the feature backbone, like ``make demo``).
        base: base config (default ``preset("demo")`` with batch 16 and queue 64).
    """
    if data_root is None:
        from .data.scenes import SceneConfig, build_demo_data
        build_demo_data(SMOKE_DATA, SceneConfig.tiny(), progress=False)
        data_root = SMOKE_DATA
    if base is None:
        base = preset("demo").replace(**{"data.batch_size": 16, "momentum.queue_size": 64})
    return AblationGrid(backbones=("VSE++", "full USER"), strategies=("none", "DBL relative"), seeds=(1,),
                        epochs=1, data_root=data_root, out_dir=out_dir, base=base, max_steps=max_steps)


def _quiet_warnings() -> None:
    """Worker processes print warnings as the command line does: one line, no source line."""
    import warnings
    from .errors import one_line_warning
    warnings.formatwarning = one_line_warning


# -- training-subset folder -------------------------------------------------------------------------
def _source_fingerprint(folder: Path, split: str) -> dict[str, Any]:
    files = sorted(folder.glob(f"{split}_*"))
    return {p.name: [p.stat().st_size, int(p.stat().st_mtime)] for p in files if p.is_file()}


def make_train_subset(data_root: str | os.PathLike, out_root: str | os.PathLike, n_images: int,
                      name: str = "", train_split: str = "train", vocab_threshold: int = 4) -> Path:
    """A data root whose train split is the first ``n_images`` images of ``data_root``'s.

    The other splits' files (and an ``images/`` folder) are symbolic links to the source; the
    word vocabulary is built from the *whole* source train split (or copied from the source's
    ``vocab.json``) so the subset and full runs share one. ``subset.json`` is written last and a
    later call with the same source files returns at once.

    Returns:
        ``out_root`` (a data root holding ``precomp/``).
    """
    from .data.precomp import CAPTIONS_PER_IMAGE, PrecompDataset, find_precomp_dir, write_precomp_split
    from .data.text import Vocabulary, build_vocab

    src = find_precomp_dir(data_root, name)
    dst = Path(out_root) / "precomp"
    stamp = {"source": str(src.resolve()), "n_images": int(n_images), "train_split": train_split,
             "vocab_threshold": int(vocab_threshold), "files": _source_fingerprint(src, train_split)}
    marker = dst / "subset.json"
    if marker.is_file() and json.loads(marker.read_text(encoding="utf-8")) == stamp:
        return Path(out_root)
    marker.unlink(missing_ok=True)
    dst.mkdir(parents=True, exist_ok=True)

    full = PrecompDataset(src, train_split, validate=False)
    if n_images > full.total_images:
        raise DataError(full.caps_path, f"train_images={n_images} but the split holds {full.total_images} images")
    n_caps = n_images * CAPTIONS_PER_IMAGE
    rows = n_caps // full.im_div
    guide = np.asarray(full.guide[:n_images]) if full.has_guide else None
    boxes = np.asarray(full.boxes[:n_images]) if full.boxes is not None else None
    write_precomp_split(dst, train_split, np.asarray(full.ims[:rows]), full.captions[:n_caps],
                        ids=[int(i) for i in full.ids[:n_images]], guide=guide, boxes=boxes)

    for item in src.iterdir():
        if item.name.startswith(f"{train_split}_") or item.name in ("vocab.json", "subset.json"):
            continue
        link = dst / item.name
        if link.is_symlink() or link.exists():
            if link.is_symlink() or link.is_file():
                link.unlink()
            else:
                continue
        link.symlink_to(item.resolve(), target_is_directory=item.is_dir())
    if (src / "vocab.json").is_file():
        vocab = Vocabulary.load(src / "vocab.json")
    else:
        vocab = build_vocab(full.captions, threshold=vocab_threshold)
    vocab.save(dst / "vocab.json")
    atomic_write_text(marker, json.dumps(stamp, indent=1, sort_keys=True) + "\n")
    return Path(out_root)


# -- running ------------------------------------------------------------------------------------------
def read_results(path: str | os.PathLike) -> pd.DataFrame:
    """``ablation.csv`` as a DataFrame (empty when missing)."""
    path = Path(path)
    if not path.is_file():
        return pd.DataFrame(columns=_KEY)
    try:
        return pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DataError(path, f"not a readable ablation results CSV ({exc})") from None


def _write_results(path: Path, df: pd.DataFrame) -> None:
    atomic_write_text(path, df.to_csv(index=False))


def _comparable(d: dict[str, Any]) -> dict[str, Any]:
    d = json.loads(json.dumps(d))
    try:  # fill fields added to the config since the run was made with their defaults
        d = ExperimentConfig.from_dict(d).to_dict()
    except ConfigError:
        pass
    d.pop("run_dir", None)
    d.get("model", {}).pop("vocab_size", None)
    return d


def _clear_stale_run(run_dir: Path, cfg: ExperimentConfig, out_dir: Path, force: bool) -> None:
    """Remove a cell's folder when it was made with another config (or ``force``), so that the
    Trainer does not resume somebody else's checkpoint. Only folders inside ``out_dir``."""
    if not run_dir.exists():
        return
    if not run_dir.resolve().is_relative_to(out_dir.resolve()):
        raise ConfigError("ablation.out_dir", f"refusing to clear {run_dir}: not inside {out_dir}")
    saved = run_dir / "config.json"
    stale = force
    if saved.is_file() and not force:
        try:
            stale = _comparable(json.loads(saved.read_text(encoding="utf-8"))) != _comparable(cfg.to_dict())
        except json.JSONDecodeError:
            stale = True
    if stale:
        shutil.rmtree(run_dir)


def _checkpoint_tag(run_dir: Path) -> str:
    """``best`` (chosen on dev) when the run reached an epoch end, else ``last``."""
    return "best" if (run_dir / "checkpoints" / "best.txt").is_file() else "last"


def evaluate_cell(run_dir: str | os.PathLike, data_root: str, split: str = "test",
                  max_images: Optional[int] = None, tag: Optional[str] = None,
                  progress: bool = False) -> tuple[pd.DataFrame, str]:
    """Test metrics of one finished cell: ``(one-row evaluate_sims frame, checkpoint tag)``.

    The same steps as :func:`userlab.runs.similarity_for_run` (load the target, encode the split,
    cosine similarities), with the image count and progress bars under the caller's control.
    """
    from .evaluate import evaluate_sims, similarity
    from .runs import encode_run, load_run

    run_dir = Path(run_dir)
    tag = tag or _checkpoint_tag(run_dir)
    run = load_run(run_dir, tag=tag)
    img, cap, _ = encode_run(run, split=split, data_root=data_root, max_images=max_images, progress=progress)
    sims = similarity(img, cap).cpu()
    save_test_ranks(run_dir, sims, split, max_images, tag)
    df = evaluate_sims(sims, protocol="full")
    df.attrs["diagnostics"] = cell_diagnostics(run, img, cap, data_root, split, max_images)
    return df, tag


def cell_diagnostics(run, img, cap, data_root: str, split: str, max_images: Optional[int]) -> dict[str, float]:
    """Key diagnostics of a cell (:func:`userlab.diagnostics.key_numbers`), written to its row."""
    from . import diagnostics as dg
    from .pipeline import open_split
    cfg = run.cfg.replace(**{"data.root": str(data_root)})
    ds = open_split(cfg, split, run.tokenizer, max_images=max_images)
    report = dg.diagnose_embeddings(img, cap, ds)
    att = dg.collect_attention(run.model, ds)
    report["attention"] = {}
    if "alpha" in att:
        report["attention"]["alpha"] = dg.attention_entropy(att["alpha"])
    if "beta" in att:
        report["attention"]["beta"] = dg.attention_entropy(att["beta"], "l2")
    if Path(run.cfg.run_dir).is_dir():
        dg.write_report(report, Path(run.cfg.run_dir) / dg.DIAGNOSTICS_FILE)
    return {f"diag_{k}": float(v) for k, v in dg.key_numbers(report).items()}


RANKS_FILE = "test_ranks.npz"


def save_test_ranks(run_dir: Path, sims, split: str, max_images: Optional[int], tag: str) -> Path:
    """Per-query ranks of a cell (``i2t (N,)``, ``t2i (5N,)``) for paired bootstraps later."""
    from .evaluate import retrieval_ranks
    i2t, t2i = retrieval_ranks(sims)
    path = Path(run_dir) / RANKS_FILE
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, i2t=np.asarray(i2t.cpu() if hasattr(i2t, "cpu") else i2t, dtype=np.int64),
             t2i=np.asarray(t2i.cpu() if hasattr(t2i, "cpu") else t2i, dtype=np.int64),
             split=split, max_images=-1 if max_images is None else int(max_images), tag=tag)
    os.replace(tmp, path)
    return path


def train_and_test_cell(grid: AblationGrid, backbone: str, strategy: str, seed: int, progress: bool = False,
                        resume: bool = True, threads: Optional[int] = None) -> dict[str, Any]:
    """Train one cell with :func:`~userlab.experiment.fit_experiment` and test its target.

    Returns:
        The cell's CSV row (see :func:`run_ablation`).
    """
    from . import experiment  # looked up at call time so tests can count fit_experiment calls

    if threads:
        import torch
        torch.set_num_threads(threads)
    cfg = grid.config(backbone, strategy, seed)
    run_dir = Path(cfg.run_dir)
    t0 = time.perf_counter()
    trainer = experiment.fit_experiment(cfg, progress=progress, resume=resume, max_steps=grid.max_steps)
    train_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    metrics, tag = evaluate_cell(run_dir, str(grid.data_root), split=grid.test_split,
                                 max_images=grid.test_images, progress=progress)
    eval_s = time.perf_counter() - t1
    first = metrics.iloc[0]
    row: dict[str, Any] = {"backbone": backbone, "strategy": strategy, "seed": int(seed)}
    row.update({k: float(first[k]) for k in METRIC_COLUMNS})
    row.update({"n_images": int(first["n_images"]), "n_captions": int(first["n_captions"]),
                "train_seconds": round(train_s, 2), "eval_seconds": round(eval_s, 2),
                "steps": int(getattr(trainer, "step", 0)), "epochs": int(getattr(trainer, "epoch", 0)),
                "tag": tag, "schedule": cfg.boost.schedule, "boost_strategy": cfg.boost.strategy,
                "signature": grid.signature(cfg), "run_dir": str(run_dir)})
    row.update(metrics.attrs.get("diagnostics", {}))
    return row


def run_ablation(grid: AblationGrid, progress: bool = True, resume: bool = True,
                 log: Optional[Callable[[str], None]] = print, workers: int = 1,
                 threads: Optional[int] = None) -> pd.DataFrame:
    """Train and test every cell of ``grid``; returns the rows of ``out_dir/ablation.csv``.

    Each cell is trained with :func:`~userlab.experiment.fit_experiment` into
    ``grid.run_dir(...)`` and its target evaluated on ``grid.test_split`` (``protocol="full"``).
    After every cell the CSV is rewritten atomically (by this process only), so an interrupted
    grid loses at most the cells in progress, which themselves resume from their last checkpoint.

    Args:
        grid: what to run.
        progress: tqdm bars inside each training run (never in worker processes).
        resume: skip cells whose row is in the CSV with the same signature, and continue partly
            trained cells; False retrains every cell from scratch and replaces its row.
        log: one line per cell (None: silent).
        workers: cells trained at once, each in its own (spawned) process; 1 trains in this process.
        threads: ``torch.set_num_threads`` for the training (None: leave it). On a small, busy CPU
            one thread per process is several times faster than two fighting over the cores.

    Returns:
        The rows of the grid's cells, in grid order, with columns ``backbone, strategy, seed,
        rsum, i2t_R@1, ..., t2i_meanr, n_images, n_captions, train_seconds, eval_seconds,
        steps, epochs, tag, schedule, boost_strategy, signature, run_dir``. ``train_seconds``
        counts this call only (a resumed cell reports the time of its remaining steps).
    """
    if workers < 1:
        raise ConfigError("workers", f"must be >= 1, got {workers}")
    out_dir = Path(grid.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path = out_dir / RESULTS_FILE
    results = read_results(csv_path)
    if grid.train_images is not None:
        base = grid.base or preset("demo")
        make_train_subset(grid.data_root, grid.train_root(), grid.train_images, name=base.data.name,
                          train_split=base.data.train_split, vocab_threshold=base.data.vocab_threshold)
    say = log or (lambda _msg: None)
    started = time.perf_counter()

    todo = []
    for i, (backbone, strategy, seed) in enumerate(grid.cells(), start=1):
        cfg = grid.config(backbone, strategy, seed)
        same = _cell_mask(results, backbone, strategy, seed)
        if resume and "signature" in results.columns and (same & (results["signature"] == grid.signature(cfg))).any():
            say(f"[{i}/{len(grid)}] {backbone} | {strategy} | seed {seed}: done before, skipped")
            continue
        _clear_stale_run(Path(cfg.run_dir), cfg, out_dir, force=not resume)
        todo.append((i, backbone, strategy, seed))

    def record(i: int, row: dict[str, Any]) -> None:
        nonlocal results
        keep = ~_cell_mask(results, row["backbone"], row["strategy"], row["seed"])
        results = pd.concat([results[keep], pd.DataFrame([row])], ignore_index=True)
        _write_results(csv_path, results)
        say(f"[{i}/{len(grid)}] {row['backbone']} | {row['strategy']} | seed {row['seed']}: rSum {row['rsum']:.1f} "
            f"(i2t R@1 {row['i2t_R@1']:.1f}, t2i R@1 {row['t2i_R@1']:.1f}), train {row['train_seconds']:.0f} s, "
            f"elapsed {time.perf_counter() - started:.0f} s")

    if workers == 1 or len(todo) <= 1:
        import torch
        before = torch.get_num_threads()
        try:
            for i, backbone, strategy, seed in todo:
                record(i, train_and_test_cell(grid, backbone, strategy, seed, progress, resume, threads))
        finally:
            torch.set_num_threads(before)
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed
        ctx = multiprocessing.get_context("spawn")  # fork would copy torch's thread pools
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_quiet_warnings) as pool:
            futures = {pool.submit(train_and_test_cell, grid, b, s, k, False, resume, threads): i
                       for i, b, s, k in todo}
            for future in as_completed(futures):
                record(futures[future], future.result())
    return grid_rows(read_results(csv_path), grid)  # read back: the same dtypes on every call


def _cell_mask(df: pd.DataFrame, backbone: str, strategy: str, seed: int) -> pd.Series:
    if not len(df):
        return pd.Series(False, index=df.index)
    return (df["backbone"] == backbone) & (df["strategy"] == strategy) & (df["seed"].astype(int) == int(seed))


def grid_rows(df: pd.DataFrame, grid: AblationGrid) -> pd.DataFrame:
    """The rows of ``df`` that belong to ``grid``'s cells, in grid order."""
    order = {cell: k for k, cell in enumerate(grid.cells())}
    if not len(df):
        return df.reset_index(drop=True)
    keys = [(b, s, int(k)) for b, s, k in zip(df["backbone"], df["strategy"], df["seed"])]
    mask = [key in order for key in keys]
    part = df[mask].copy()
    part["_order"] = [order[key] for key, m in zip(keys, mask) if m]
    return part.sort_values("_order").drop(columns="_order").reset_index(drop=True)


# -- summary ----------------------------------------------------------------------------------------
def _rank(names: Sequence[str], known: Sequence[str]) -> list[int]:
    known = list(known)
    return [known.index(n) if n in known else len(known) for n in names]


def summarize(df: pd.DataFrame, metrics: Sequence[str] = SUMMARY_METRICS) -> pd.DataFrame:
    """Mean and standard deviation over seeds per (backbone, strategy).

    The standard deviation is the sample one (``ddof=1``, pandas' default); NaN with one seed.

    Returns:
        One row per (backbone, strategy) in table order (:data:`BACKBONES`, then
        :data:`STRATEGY_NAMES`; other names after, in order of appearance), with columns
        ``backbone, strategy, seeds`` and ``<metric>_mean``, ``<metric>_std`` per metric.
    """
    missing = [c for c in ["backbone", "strategy", *metrics] if c not in df.columns]
    if missing:
        raise DataError(None, f"ablation results lack columns {', '.join(missing)}")
    if not len(df):
        raise DataError(None, "no ablation results to summarise")
    grouped = df.groupby(["backbone", "strategy"], sort=False)
    stats = grouped[list(metrics)].agg(["mean", "std"])
    stats.columns = [f"{m}_{s}" for m, s in stats.columns]
    stats.insert(0, "seeds", grouped.size())
    out = stats.reset_index()
    first_seen = {name: k for k, name in enumerate(dict.fromkeys(df["backbone"]))}
    out["_b"] = _rank(out["backbone"], list(BACKBONES))
    out["_b2"] = [first_seen[b] for b in out["backbone"]]
    out["_s"] = _rank(out["strategy"], STRATEGY_NAMES)
    out = out.sort_values(["_b", "_b2", "_s"], kind="stable").drop(columns=["_b", "_b2", "_s"])
    return out.reset_index(drop=True)


def _pm(mean: float, std: float, digits: int) -> str:
    if pd.isna(std):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


_LABELS = {"rsum": "rSum", "i2t_R@1": "i2t R@1", "t2i_R@1": "t2i R@1"}


def format_summary(summary: pd.DataFrame, digits: int = 1, baseline: str = "none") -> str:
    """A markdown table of :func:`summarize`'s output: ``mean ± std`` per metric, plus the change
    of mean rSum against the ``baseline`` strategy of the same backbone (when it is present)."""
    metrics = [c[: -len("_mean")] for c in summary.columns if c.endswith("_mean")]
    has_delta = "rsum" in metrics and (summary["strategy"] == baseline).any()
    head = ["backbone", "strategy", "seeds"] + [_LABELS.get(m, m) for m in metrics]
    if has_delta:
        head.append(f"Δ rSum vs {baseline}")
    lines = ["| " + " | ".join(head) + " |",
             "|---|---|---:|" + "---:|" * (len(metrics) + int(has_delta))]
    for _, r in summary.iterrows():
        cells = [str(r["backbone"]), str(r["strategy"]), str(int(r["seeds"]))]
        cells += [_pm(r[f"{m}_mean"], r[f"{m}_std"], digits) for m in metrics]
        if has_delta:
            base = summary[(summary["backbone"] == r["backbone"]) & (summary["strategy"] == baseline)]
            cells.append("" if r["strategy"] == baseline or not len(base)
                         else f"{r['rsum_mean'] - float(base['rsum_mean'].iloc[0]):+.{digits}f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_ablation(df: pd.DataFrame, metrics: Sequence[str] = SUMMARY_METRICS):
    """One panel per metric: mean over seeds per strategy (points, ± one standard deviation),
    one colour per backbone, and every seed's value as a small dot.

    Returns:
        A matplotlib Figure (save it with :func:`userlab.viz.save`).
    """
    import matplotlib.pyplot as plt
    import seaborn as sns

    from . import viz

    summarize(df, metrics)  # same column checks
    sns.set_theme(context="notebook", style="whitegrid", palette="colorblind")
    strategies = [s for s in STRATEGY_NAMES if s in set(df["strategy"])]
    strategies += [s for s in dict.fromkeys(df["strategy"]) if s not in strategies]
    backbones = [b for b in BACKBONES if b in set(df["backbone"])]
    backbones += [b for b in dict.fromkeys(df["backbone"]) if b not in backbones]
    from .viz import palette_for
    palette = palette_for(backbones, strict=False)   # one colour per model in every figure
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.6 * len(metrics), 3.9), squeeze=False)
    several = len(backbones) > 1   # seaborn divides the dodge by (backbones - 1)
    for ax, metric in zip(axes[0], metrics):
        sns.stripplot(data=df, x="strategy", y=metric, hue="backbone", order=strategies, hue_order=backbones,
                      palette=palette, dodge=several, size=3.5, alpha=0.55, jitter=0.08, legend=False, ax=ax)
        sns.pointplot(data=df, x="strategy", y=metric, hue="backbone", order=strategies, hue_order=backbones,
                      palette=palette, errorbar="sd", dodge=0.4 if several else False, linestyle="none",
                      markers="D", capsize=0.08, ax=ax)
        ax.set(xlabel="", ylabel=_LABELS.get(metric, metric), title=f"test {_LABELS.get(metric, metric)}")
        ax.tick_params(axis="x", rotation=25)
        legend = ax.get_legend()
        if legend is not None:
            legend.remove()
            if ax is axes[0][-1]:   # one legend, beside the last panel, where it hides no data
                viz.legend_outside(ax, title="backbone")
    n_seeds = df.groupby(["backbone", "strategy"]).size().max()
    fig.suptitle(f"ablation: mean ± sd over seeds (up to {n_seeds} per cell)", fontsize=11)
    fig.tight_layout()
    return fig


def write_report(df: pd.DataFrame, folder: str | os.PathLike, command: str = "") -> tuple[Path, Path]:
    """Write ``summary.md`` (the markdown table and the command) and ``ablation.png`` to ``folder``."""
    import matplotlib.pyplot as plt

    from . import viz
    folder = Path(folder)
    text = format_summary(summarize(df)) + "\n"
    if command:
        text = f"Command: `{command}`\n\n" + text
    md = folder / "summary.md"
    atomic_write_text(md, text)
    fig = plot_ablation(df)
    png = viz.save(fig, "ablation", folder)
    plt.close(fig)
    return md, png


# -- component steps with paired bootstrap intervals -------------------------------------------------
#: The component ladder's steps ``(with, without)``: each adds one part of USER to the other.
COMPONENT_STEPS: tuple[tuple[str, str], ...] = (
    ("+SGE", "VSE++"),             # SGE on the triplet baseline
    ("+queue/UTO", "VSE++"),       # momentum queues + unified objective instead of the triplet
    ("+CGE", "+queue/UTO"),        # CGE on the queue/UTO model
    ("full USER", "+CGE"),         # SGE on top of CGE (queue/UTO)
    ("full USER", "VSE++"),        # everything
)


def per_image_rsum(i2t: Any, t2i: Any, ks: Sequence[int] = (1, 5, 10)) -> np.ndarray:
    """Each test image's share of rSum, ``(N,)``; their mean is the split's rSum.

    ``rSum = sum_K 100 * mean_i [i2t_i < K] + 100 * mean_c [t2i_c < K]``; with ``P`` captions per
    image, caption ``c`` belongs to image ``c // P``, so ``rSum = mean_i d_i`` with
    ``d_i = 100 * sum_K ([i2t_i < K] + (1/P) * #{c of i : t2i_c < K})``. Resampling test images
    (with their captions) and averaging ``d`` is the bootstrap of rSum over test queries.
    """
    i2t = np.asarray(i2t).reshape(-1)
    t2i = np.asarray(t2i).reshape(-1)
    if t2i.size % i2t.size:
        raise DataError(None, f"{t2i.size} caption ranks for {i2t.size} images")
    per = t2i.size // i2t.size
    caps = t2i.reshape(i2t.size, per)
    return 100.0 * sum((i2t < k).astype(np.float64) + (caps < k).sum(1) / per for k in ks)


def paired_bootstrap(d_with: Any, d_without: Any, n_boot: int = 5000, seed: int = 0,
                     level: float = 0.95) -> dict[str, float]:
    """Percentile bootstrap of ``mean(d_with - d_without)`` resampling test images (paired).

    Args:
        d_with, d_without: per-image rSum shares ``(N,)`` of the two models on the same images
            (:func:`per_image_rsum`), or their means over seeds.
        n_boot: resamples; seed: their RNG seed; level: interval coverage.

    Returns:
        ``delta`` (on the full split), ``low``, ``high`` (the interval), ``p_le_0`` (share of
        resamples with a difference <= 0).
    """
    a, b = np.asarray(d_with, dtype=np.float64), np.asarray(d_without, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or a.size < 2:
        raise DataError(None, f"paired bootstrap needs two equal 1-d samples, got {a.shape} and {b.shape}")
    diff = a - b
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot)
    for start in range(0, n_boot, 500):          # (500, N) index blocks keep memory small
        stop = min(n_boot, start + 500)
        idx = rng.integers(0, diff.size, size=(stop - start, diff.size))
        means[start:stop] = diff[idx].mean(1)
    tail = (1.0 - level) / 2
    return {"delta": float(diff.mean()), "low": float(np.quantile(means, tail)),
            "high": float(np.quantile(means, 1 - tail)), "p_le_0": float(np.mean(means <= 0))}


def load_cell_ranks(run_dir: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """``(i2t, t2i)`` ranks a cell saved at test time (``test_ranks.npz``)."""
    path = Path(run_dir) / RANKS_FILE
    if not path.is_file():
        raise DataError(path, "no saved test ranks (cells tested before ranks were saved): run "
                              "userlab.ablation.evaluate_cell(run_dir, data_root) once to write them")
    with np.load(path) as z:
        return z["i2t"], z["t2i"]


def component_steps(df: pd.DataFrame, steps: Sequence[tuple[str, str]] = COMPONENT_STEPS,
                    strategy: str = "none", n_boot: int = 5000) -> pd.DataFrame:
    """Δ rSum of each component step, per seed and pooled, with paired bootstrap intervals.

    For each step ``(with, without)`` present in ``df`` (rows of :func:`run_ablation`, same
    ``strategy``), the seeds both cells share are paired. Returns one row per step with
    ``seeds``, ``delta_mean`` and ``delta_std`` (over seeds of the per-seed rSum differences),
    ``seed_deltas``, and the paired bootstrap over test images of the seed-averaged per-image
    rSum shares (``delta``, ``low``, ``high``, ``p_le_0``), and ``verdict``: ``holds`` (interval
    above 0 and every seed's Δ > 0), ``reversed`` (interval below 0 and every seed's Δ < 0) or
    ``undecided``.
    """
    part = df[df["strategy"] == strategy]
    rows = []
    for with_, without in steps:
        a = part[part["backbone"] == with_].set_index("seed")
        b = part[part["backbone"] == without].set_index("seed")
        seeds = sorted(set(a.index) & set(b.index))
        if not seeds:
            continue
        da, db, deltas = [], [], []
        for seed in seeds:
            ra, rb = load_cell_ranks(a.loc[seed, "run_dir"]), load_cell_ranks(b.loc[seed, "run_dir"])
            da.append(per_image_rsum(*ra))
            db.append(per_image_rsum(*rb))
            deltas.append(float(da[-1].mean() - db[-1].mean()))
        boot = paired_bootstrap(np.mean(da, 0), np.mean(db, 0), n_boot=n_boot)
        all_pos, all_neg = all(d > 0 for d in deltas), all(d < 0 for d in deltas)
        verdict = ("holds" if boot["low"] > 0 and all_pos else
                   "reversed" if boot["high"] < 0 and all_neg else "undecided")
        rows.append({"step": f"{without} → {with_}", "with": with_, "without": without, "seeds": len(seeds),
                     "rsum_with": float(a.loc[seeds, "rsum"].mean()), "rsum_without": float(b.loc[seeds, "rsum"].mean()),
                     "delta_mean": float(np.mean(deltas)),
                     "delta_std": float(np.std(deltas, ddof=1)) if len(deltas) > 1 else float("nan"),
                     "seed_deltas": " ".join(f"{d:+.1f}" for d in deltas), **boot, "verdict": verdict})
    return pd.DataFrame(rows)


def format_steps(steps: pd.DataFrame, digits: int = 1) -> str:
    """Markdown table of :func:`component_steps`."""
    head = "| step | seeds | rSum without | rSum with | Δ rSum (mean ± sd over seeds) | per seed | paired bootstrap 95 % CI | verdict |"
    lines = [head, "|---|---:|---:|---:|---:|---|---|---|"]
    for _, r in steps.iterrows():
        sd = "" if pd.isna(r["delta_std"]) else f" ± {r['delta_std']:.{digits}f}"
        lines.append(f"| {r['step']} | {int(r['seeds'])} | {r['rsum_without']:.{digits}f} | {r['rsum_with']:.{digits}f} | "
                     f"{r['delta_mean']:+.{digits}f}{sd} | {r['seed_deltas']} | "
                     f"[{r['low']:+.{digits}f}, {r['high']:+.{digits}f}] | {r['verdict']} |")
    return "\n".join(lines)


# -- command line ---------------------------------------------------------------------------------
GRIDS = {"default": default_grid, "full": full_grid, "smoke": smoke_grid, "components": component_grid}


def add_ablate_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``userlab ablate``."""
    p.add_argument("--grid", choices=sorted(GRIDS), default="default",
                   help="default (CPU-sized), components (the USER component ladder, CPU-sized), full (every "
                        "backbone and strategy) or smoke (seconds)")
    p.add_argument("--data", help="data root (default: data/demo; smoke: data/demo_smoke, built when missing)")
    p.add_argument("--out", help="output folder (default: runs/ablation, runs/ablation_full or runs/ablation_smoke)")
    p.add_argument("--backbones", nargs="+", metavar="NAME", help=f"subset of: {', '.join(BACKBONES)}")
    p.add_argument("--strategies", nargs="+", metavar="NAME", help=f"subset of: {', '.join(STRATEGY_NAMES)}")
    p.add_argument("--seeds", nargs="+", type=int, help="seeds (default 1 2 3; smoke: 1)")
    p.add_argument("--epochs", type=int, help="epochs per cell")
    p.add_argument("--train-images", type=int, help="train on the first N training images")
    p.add_argument("--test-images", type=int, help="evaluate on the first N test images")
    p.add_argument("--dbl-schedule", choices=DBL_SCHEDULES, help="schedule of DBL and distillation (default online)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="config override for every cell (repeatable)")
    p.add_argument("--no-resume", action="store_true", help="retrain every cell")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--workers", type=int, default=1, help="cells trained at once, one process each (default 1)")
    p.add_argument("--threads", type=int, help="torch threads per training process (default: torch's)")


def grid_from_args(args: argparse.Namespace) -> AblationGrid:
    kwargs: dict[str, Any] = {}
    if args.data:
        kwargs["data_root"] = args.data
    if args.out:
        kwargs["out_dir"] = args.out
    grid = GRIDS[args.grid](**kwargs)
    changes: dict[str, Any] = {}
    for name in ("backbones", "strategies", "seeds", "epochs", "train_images", "test_images", "dbl_schedule"):
        value = getattr(args, name, None)
        if value is not None:
            changes[name] = value
    if args.set:
        from .cli import parse_value
        extra = dict(grid.overrides)
        for item in args.set:
            if "=" not in item:
                raise ConfigError(item, "--set expects KEY=VALUE, e.g. --set data.batch_size=64")
            key, value = item.split("=", 1)
            extra[key.strip()] = parse_value(value)
        changes["overrides"] = extra
    if changes:
        fields = {f: getattr(grid, f) for f in AblationGrid.__dataclass_fields__}
        fields.update(changes)
        grid = AblationGrid(**fields)
    return grid


def cmd_ablate(args: argparse.Namespace) -> int:
    """``userlab ablate``: run the grid, print the summary, write summary.md and ablation.png."""
    import shlex
    import sys
    grid = grid_from_args(args)
    df = run_ablation(grid, progress=not args.no_progress, resume=not args.no_resume, workers=args.workers,
                      threads=args.threads)
    command = "userlab ablate " + " ".join(shlex.quote(a) for a in sys.argv[1:] if a != "ablate")
    md, png = write_report(df, grid.out_dir, command=command.strip())
    print(format_summary(summarize(df)))
    steps = component_steps(df) if "none" in set(df["strategy"]) else pd.DataFrame()
    if len(steps):
        table = format_steps(steps)
        print("\ncomponent steps (paired bootstrap over test images):\n" + table)
        atomic_write_text(md, md.read_text(encoding="utf-8") + "\nComponent steps (Δ rSum, paired bootstrap "
                          "95 % interval over test images of the seed-averaged scores):\n\n" + table + "\n")
    print(f"\nrows: {Path(grid.out_dir) / RESULTS_FILE}; summary: {md}; figure: {png}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m userlab.ablation [--debug] ...``: runs ``userlab [--debug] ablate ...``."""
    import sys

    from .cli import main as cli_main
    args = list(sys.argv[1:] if argv is None else argv)
    debug = ["--debug"] if "--debug" in args else []
    return cli_main(debug + ["ablate"] + [a for a in args if a != "--debug"])


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())

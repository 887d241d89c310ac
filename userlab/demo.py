"""``make demo``: demo scenes -> USER and VSE++ trained the same way -> test metrics -> figures."""
from __future__ import annotations

import json
import time
from math import comb
from pathlib import Path
from typing import Optional

import pandas as pd

from .runfolder import move_run_aside
from .config import ExperimentConfig, preset, triplet_schedule


def chance_metrics(n_images: int, captions_per_image: int = 5) -> dict[str, float]:
    """Expected R@K of a model that ranks at random (percent), and their rSum."""
    out = {}
    n_caps = n_images * captions_per_image
    for k in (1, 5, 10):
        # i2t: at least one of the image's captions among the top K of n_caps
        miss = comb(n_caps - captions_per_image, k) / comb(n_caps, k)
        out[f"i2t_R@{k}"] = 100.0 * (1.0 - miss)
        out[f"t2i_R@{k}"] = 100.0 * k / n_images
    out["rsum"] = sum(out.values())
    return out


def _fresh_run_dir(cfg: ExperimentConfig) -> None:
    """Keep a finished or interrupted run only if it was made with exactly this config; a run
    made with another config is moved aside (``<run>.old-<time>``), never deleted."""
    run = Path(cfg.run_dir)
    saved = run / "config.json"

    def comparable(d: dict) -> dict:
        d = json.loads(json.dumps(d))
        d["model"].pop("vocab_size", None)  # filled in from the vocabulary at training time
        return d

    if saved.is_file() and comparable(json.loads(saved.read_text())) != comparable(cfg.to_dict()):
        aside = move_run_aside(run)
        print(f"{run}: made with another config; moved to {aside}")


def demo_configs(data_root: str, runs: str, epochs: Optional[int] = None, smoke: bool = False
                 ) -> dict[str, ExperimentConfig]:
    """The two configurations the demo compares: USER and a VSE++ baseline on the same data."""
    configs = {}
    for name, key in (("USER", "demo"), ("VSE++", "vsepp")):
        cfg = preset(key)
        cfg.data.root = data_root
        cfg.run_dir = str(Path(runs) / f"demo_{key if key != 'demo' else 'user'}")
        if epochs is not None and key == "vsepp":
            triplet_schedule(cfg, epochs)
        elif epochs is not None:
            cfg.optim.epochs = epochs
            cfg.optim.lr_step = max(1, (3 * epochs) // 4)
        if smoke:
            cfg.data.batch_size = 16
            cfg.momentum.queue_size = 64
            cfg.optim.epochs, cfg.optim.lr_step = 1, 0
            cfg.run_dir = str(Path(runs) / f"smoke_{Path(cfg.run_dir).name}")
        configs[name] = cfg
    return configs


def run_demo(out: str = "data/demo", runs: str = "runs", figures: str = "figures", data_only: bool = False,
             epochs: Optional[int] = None, smoke: bool = False) -> Optional[pd.DataFrame]:
    """Build the demo data, train USER and VSE++, evaluate on test, print and draw the results."""
    from .data.scenes import SceneConfig, build_demo_data

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    scene_cfg = SceneConfig.tiny() if smoke else SceneConfig()
    if smoke:
        out = str(Path(out).parent / (Path(out).name + "_smoke"))
    folder = build_demo_data(out, scene_cfg, progress=True)
    timings["build demo data"] = time.perf_counter() - t0
    print(describe_folder(folder))
    if data_only:
        print(f"demo data ready in {folder} ({timings['build demo data']:.1f} s)")
        return None

    from .runs import evaluate_runs
    from .train import Trainer
    configs = demo_configs(out, runs, epochs=epochs, smoke=smoke)
    for name, cfg in configs.items():
        _fresh_run_dir(cfg)
        t = time.perf_counter()
        print(f"\n== training {name} ({cfg.run_dir}) ==")
        # smoke: one short epoch (12 steps of 16 on the tiny scenes) so a best checkpoint exists
        Trainer(cfg).fit()
        timings[f"train {name}"] = time.perf_counter() - t

    t = time.perf_counter()
    table = evaluate_runs({name: cfg.run_dir for name, cfg in configs.items()}, split="test", data_root=out)
    timings["evaluate"] = time.perf_counter() - t
    n_images = scene_cfg.n_test
    chance = chance_metrics(n_images)
    table = pd.concat([table, pd.DataFrame([{"model": "chance", "protocol": "full", **chance}])],
                      ignore_index=True)
    ran = pd.DataFrame([what_ran(name, cfg) for name, cfg in configs.items()])
    table = table.merge(ran, on="model", how="left")
    from .evaluate import format_table
    print(f"\n== test split: {n_images} images, {5 * n_images} captions ==")
    print(format_table(table))
    print("\n== what each row trained ==")
    print(format_what_ran(ran))

    from . import viz
    fig_dir = Path(figures)
    paths = viz.demo_figures({name: cfg.run_dir for name, cfg in configs.items()}, table, fig_dir)
    print("\nfigures: " + ", ".join(str(p) for p in paths))
    print("\ntimings: " + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()))
    return table


#: Columns :func:`what_ran` adds to the demo table.
RAN_COLUMNS = ("enhancement", "objective", "queue", "epochs", "lr", "checkpoint")


def what_ran(name: str, cfg: ExperimentConfig) -> dict[str, str]:
    """What a demo row trained, read from its run folder's config and best checkpoint.

    ``enhancement`` (none / sge / cge / sge+cge), ``objective`` (UTO, or the triplet with its
    VSE0 warm-up epochs), ``queue`` (two queues of N keys, or none), ``epochs`` trained and
    ``lr`` (the schedule in words, :func:`userlab.pipeline.describe_lr_schedule`) and
    ``checkpoint`` (the epoch of the reported ``best`` checkpoint and the epochs it was chosen
    from: after the warm-up when the warm-up changes the objective).
    """
    from . import checkpoint as ckpt
    from .pipeline import describe_lr_schedule
    run = Path(cfg.run_dir)
    saved = run / "config.json"
    if saved.is_file():
        cfg = ExperimentConfig.from_json(saved)   # what ran, even if the preset changed since
    obj = cfg.loss.objective
    if obj == "uto":
        objective = f"UTO (mu {cfg.loss.mu:g}, lambda {cfg.loss.lambda_batch:g})"
    elif obj == "triplet":
        hard = "hardest negative" if cfg.loss.max_violation else "sum of negatives (VSE0)"
        warm = cfg.loss.warmup_epochs if cfg.loss.max_violation else 0
        if warm >= cfg.optim.epochs:   # the warm-up never ended: say so
            objective = "triplet, sum of negatives (VSE0) only: every epoch was warm-up"
        else:
            objective = f"triplet, {hard}" + (f" after {warm} VSE0 warm-up epoch{'s' * (warm > 1)}" if warm else "")
    else:
        objective = f"InfoNCE (t {cfg.loss.temperature:g})"
    queue = (f"2 x {cfg.momentum.queue_size} (momentum {cfg.momentum.momentum:g})"
             if cfg.momentum.enabled and obj == "uto" else "none")
    checkpoint = "-"
    try:
        state = ckpt.load_train_state(ckpt.find_checkpoint(run, tag="best"))
        warm = cfg.loss.warmup_epochs
        changes = obj == "triplet" or cfg.boost.schedule != "none"
        first = warm + 1 if (warm > 0 and changes and cfg.optim.epochs > warm) else 1
        checkpoint = f"best dev: epoch {int(state['epoch'])} of {first}-{cfg.optim.epochs}"
    except Exception:  # noqa: BLE001 - a missing checkpoint just leaves the cell empty
        pass
    return {"model": name, "enhancement": cfg.model.enhancement, "objective": objective, "queue": queue,
            "epochs": str(cfg.optim.epochs), "lr": describe_lr_schedule(cfg), "checkpoint": checkpoint}


def format_what_ran(ran: pd.DataFrame) -> str:
    """Markdown table of :func:`what_ran` rows."""
    cols = ["model", *RAN_COLUMNS]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for _, r in ran.iterrows()]
    return "\n".join(lines)


def describe_folder(folder: Path) -> str:
    from .data.precomp import describe
    return describe(folder).to_string(index=False)

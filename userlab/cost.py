"""What a finished run cost to train: epochs, optimiser steps, branch passes and time, per stage.

Read from a run folder (its ``config.json``, last checkpoint and ``train_log.csv``), so a notebook
can print the compute behind "same epochs" claims for runs trained earlier or just now. The
offline DBL schedule has two stages (``<run>/anchor`` then ``<run>``); each is one row.

Counting (per optimiser step, one batch):

- ``trained_passes``: forward + backward passes of trained branches (1 for a plain model or the
  offline / momentum target, ``num_branches`` for the online schedule);
- ``frozen_passes``: forward-only passes of a frozen or EMA anchor (1 for offline / momentum);
- momentum key encoders (USER) add a forward pass per trained branch in every schedule alike and
  are not counted.
"""
from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from .config import ExperimentConfig
from .errors import CheckpointError


def _stage_row(run_dir: Path, stage: str) -> dict:
    from .checkpoint import find_checkpoint, load_train_state
    cfg_path = run_dir / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(cfg_path, "no config.json: is this a trained run folder?")
    cfg = ExperimentConfig.from_json(cfg_path)
    state = load_train_state(find_checkpoint(run_dir, tag="last"), map_location="cpu")
    schedule = cfg.boost.schedule
    trained = cfg.boost.num_branches if schedule == "online" else 1
    frozen = 1 if schedule in ("offline", "momentum") else 0
    log_path = run_dir / "train_log.csv"
    seconds = float("nan")
    if log_path.is_file():
        log = pd.read_csv(log_path)
        if "time" in log.columns and len(log):
            # time restarts every epoch; its last logged value per epoch is that epoch's time
            seconds = float(log.groupby("epoch")["time"].max().sum())
    steps = int(state["step"])
    return {"stage": stage, "schedule": schedule, "epochs": int(state["epoch"]), "steps": steps,
            "trained_passes": steps * trained, "frozen_passes": steps * frozen,
            "train_seconds": seconds}


def training_cost(run_dir: str | os.PathLike) -> pd.DataFrame:
    """One row per training stage of the run in ``run_dir`` (the anchor stage first, if any).

    Columns: ``stage`` (``anchor`` / ``main``), ``schedule``, ``epochs``, ``steps`` (optimiser
    steps), ``trained_passes`` and ``frozen_passes`` (see the module docstring),
    ``train_seconds`` (logged training time, without evaluation; approximate to ``log_every``
    steps).
    """
    run = Path(run_dir)
    rows = []
    if (run / "anchor" / "config.json").is_file():
        rows.append(_stage_row(run / "anchor", "anchor"))
    rows.append(_stage_row(run, "main"))
    return pd.DataFrame(rows)


def cost_table(runs: dict[str, str | os.PathLike]) -> pd.DataFrame:
    """Per run: stages, total epochs, steps, trained and frozen branch passes, training seconds."""
    rows = []
    for name, path in runs.items():
        df = training_cost(path)
        rows.append({"model": name, "stages": " + ".join(f"{r.stage} {r.epochs} ep" for r in df.itertuples()),
                     "epochs": int(df["epochs"].sum()), "steps": int(df["steps"].sum()),
                     "trained_passes": int(df["trained_passes"].sum()),
                     "frozen_passes": int(df["frozen_passes"].sum()),
                     "train_seconds": float(df["train_seconds"].sum())})
    return pd.DataFrame(rows)

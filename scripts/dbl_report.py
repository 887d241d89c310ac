"""Tables for the DBL section of docs/ablation-components.md: DBL against training alone,
distillation and mutual learning, per schedule, with paired bootstrap intervals.

    python scripts/dbl_report.py runs/ablation_ladder_demo runs/ablation_dbl_offline \
        runs/ablation_dbl_momentum runs/ablation_vsepp_4ep [--backbone VSE++]

Every cell becomes one *arm* named by what trained: ``VSE++`` (alone), ``VSE++ + DBL relative
(online)``, ... and ``VSE++, 4 epochs`` for a folder whose cells trained twice the epochs (the
single model at the compute of two branches). Arms are then paired seed by seed and compared
with :func:`userlab.ablation.component_steps` (Δ rSum per seed, paired bootstrap over the test
images of the seed-averaged per-image rSum shares, verdict rule of the component ladder).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from userlab import ablation


def arm_name(row: pd.Series, base_epochs: int) -> str:
    name = row["backbone"]
    if int(row["epochs"]) != base_epochs:
        name += f", {int(row['epochs'])} epochs"
    if row["strategy"] != "none":
        name += f" + {row['strategy']} ({row['schedule']})"
    return name


def read_arms(folders: list[str], backbone: str) -> pd.DataFrame:
    frames = [ablation.read_results(Path(f) / ablation.RESULTS_FILE) for f in folders]
    df = pd.concat(frames, ignore_index=True)
    df = df[df["backbone"] == backbone].copy()
    base_epochs = int(df.loc[df["strategy"] == "none", "epochs"].min())
    df["arm"] = [arm_name(r, base_epochs) for _, r in df.iterrows()]
    df = df.drop_duplicates(subset=["arm", "seed"], keep="last")
    # component_steps pairs cells by backbone name under one strategy: arms play the backbones
    df["backbone"], df["strategy"] = df["arm"], "none"
    return df


def comparisons(arms: list[str], alone: str) -> list[tuple[str, str]]:
    """(with, without) pairs: every arm against training alone; each DBL arm against the
    distillation and mutual-learning arms of the same schedule (equal compute) and absolute
    against relative boosting; every arm against the single model trained for twice the
    epochs (``VSE++, 4 epochs``: the compute of two branches), when that folder is given."""
    pairs = [(a, alone) for a in arms if a != alone]
    for a in arms:
        if "DBL" not in a:
            continue
        schedule = a[a.rindex("("):]
        for b in arms:
            if b != a and b.endswith(schedule) and ("distillation" in b or "mutual" in b):
                pairs.append((a, b))
        if "DBL absolute" in a:
            other = a.replace("DBL absolute", "DBL relative")
            if other in arms:
                pairs.append((a, other))
    # the single model trained at the compute of two branches (twice the epochs), if it ran
    for longer in (x for x in arms if x.startswith(f"{alone}, ") and " + " not in x):
        pairs += [(a, longer) for a in arms if a not in (alone, longer)]
    return pairs


def cell_table(df: pd.DataFrame) -> str:
    g = df.groupby("arm", sort=False)
    mean, std, n = g.mean(numeric_only=True), g.std(numeric_only=True), g.size()
    lines = ["| arm | seeds | rSum | i2t R@1 | t2i R@1 | per seed | training s per cell |",
             "|---|---:|---:|---:|---:|---|---:|"]
    for arm in mean.index:
        seeds = " ".join(f"{v:.1f}" for v in df[df["arm"] == arm].sort_values("seed")["rsum"])
        lines.append(f"| {arm} | {n[arm]} | {mean.loc[arm, 'rsum']:.1f} ± {std.loc[arm, 'rsum']:.1f} | "
                     f"{mean.loc[arm, 'i2t_R@1']:.1f} | {mean.loc[arm, 't2i_R@1']:.1f} | {seeds} | "
                     f"{mean.loc[arm, 'train_seconds']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("folders", nargs="+")
    p.add_argument("--backbone", default="VSE++")
    args = p.parse_args()
    df = read_arms(args.folders, args.backbone)
    arms = list(dict.fromkeys(df["arm"]))
    print("## cells (mean ± sample sd over seeds)\n")
    print(cell_table(df))
    steps = ablation.component_steps(df, steps=comparisons(arms, args.backbone))
    print("\n## comparisons: Δ rSum with paired bootstrap 95 % intervals\n")
    print(ablation.format_steps(steps))
    assert np.isfinite(steps[["delta", "low", "high"]].to_numpy()).all()


if __name__ == "__main__":
    main()

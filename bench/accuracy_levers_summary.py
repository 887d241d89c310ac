"""Summarise bench/accuracy_levers.sh runs: dev rSum per backbone and ``optim.amp``, mean ± std.

    python bench/accuracy_levers_summary.py /tmp/acc      # prints a markdown table

For every run folder ``<preset>_<amp>_s<seed>`` it reads ``eval_log.csv`` (dev rSum after each
epoch) and reports the last epoch's rSum and the best one (the checkpoint the Trainer keeps),
the mean ± sample standard deviation over seeds, the paired bf16 - fp32 difference per seed,
and the wall time from ``config.json`` (written when training starts) to the last evaluation.
"""
from __future__ import annotations

import re
import statistics
import sys
from pathlib import Path

import pandas as pd

NAMES = {"demo": "USER", "vsepp": "VSE++"}
AMPS = {"off": "fp32 (optim.amp=off)", "auto": "bf16 (optim.amp=auto)"}


def collect(out: Path) -> pd.DataFrame:
    rows = []
    for run in sorted(p for p in out.iterdir() if p.is_dir()):
        m = re.fullmatch(r"(demo|vsepp)_(off|auto)_s(\d+)", run.name)
        log = run / "eval_log.csv"
        if not m or not log.is_file():
            continue
        ev = pd.read_csv(log)
        if len(ev) < 2:
            continue  # still training
        wall = log.stat().st_mtime - (run / "config.json").stat().st_mtime
        rows.append({"backbone": NAMES[m[1]], "amp": m[2], "seed": int(m[3]),
                     "final": float(ev["rsum"].iloc[-1]), "best": float(ev["rsum"].max()), "wall_min": wall / 60})
    return pd.DataFrame(rows)


def mean_std(values) -> str:
    values = list(values)
    if len(values) < 2:
        return f"{values[0]:.1f} (1 seed)" if values else "-"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    df = collect(Path(argv[0]))
    if df.empty:
        print("no finished runs")
        return 1
    lines = ["| backbone | precision | seeds | dev rSum, last epoch (mean ± std) | runs | best epoch (mean ± std) | wall per run (min) |",
             "|---|---|---|---:|---|---:|---:|"]
    for backbone in ("USER", "VSE++"):
        for amp in ("off", "auto"):
            d = df[(df.backbone == backbone) & (df.amp == amp)].sort_values("seed")
            if d.empty:
                continue
            lines.append(f"| {backbone} | {AMPS[amp]} | {', '.join(map(str, d.seed))} | {mean_std(d.final)} | "
                         f"{', '.join(f'{v:.1f}' for v in d.final)} | {mean_std(d.best)} | "
                         f"{statistics.median(d.wall_min):.1f} |")
    lines += ["", "| backbone | seed | bf16 - fp32, last epoch | bf16 - fp32, best |", "|---|---:|---:|---:|"]
    for backbone in ("USER", "VSE++"):
        for seed in sorted(df.seed.unique()):
            a = df[(df.backbone == backbone) & (df.seed == seed)].set_index("amp")
            if {"off", "auto"} <= set(a.index):
                lines.append(f"| {backbone} | {seed} | {a.final['auto'] - a.final['off']:+.1f} | "
                             f"{a.best['auto'] - a.best['off']:+.1f} |")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

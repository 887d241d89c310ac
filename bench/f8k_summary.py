"""Tables for docs/real-data.md from run folders of bench/f8k_run.py and bench/plain_vsepp.py.

    PYTHONPATH=. python bench/f8k_summary.py LABEL=RUN_DIR ... [--shares] [--group LABEL=DIR,DIR,...]

Default: dev rSum after each epoch, with seconds per epoch (training + evaluation) when
recorded. ``--shares``: the start diagnostics per epoch (term_shares.csv means).
``--group``: mean ± std (sample std, n-1) of the final dev rSum over several seeds.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd


def main() -> None:
    from userlab.term_shares import per_epoch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="*", help="LABEL=RUN_DIR")
    ap.add_argument("--shares", action="store_true")
    ap.add_argument("--group", action="append", default=[], help="LABEL=DIR,DIR,... (seeds)")
    ap.add_argument("--epoch", type=int, help="--group: the epoch to compare (default: last)")
    args = ap.parse_args()
    for spec in args.runs:
        label, run = spec.split("=", 1)
        run = Path(run)
        if args.shares:
            df = per_epoch(run / "term_shares.csv")
            cols = ["epoch", "share_batch_negative", "share_batch_positive", "share_queue",
                    "frac_neg_above_gamma", "pos_mean", "neg_mean", "neg_std", "gap"]
            print(f"## {label}\n{df[cols].round(3).to_string(index=False)}\n")
            continue
        ev = pd.read_csv(run / "eval_log.csv")
        line = " / ".join(f"{v:.1f}" for v in ev["rsum"])
        times = run / "epoch_times.csv"
        if times.is_file():
            secs = pd.read_csv(times)["seconds"]
            line += f"   ({secs.mean():.0f} s per epoch on average)"
        elif "train_s" in ev:
            line += f"   ({ev['train_s'].mean():.0f} s training per epoch on average)"
        print(f"{label}: dev rSum per epoch {line}")
    for spec in args.group:
        label, dirs = spec.split("=", 1)
        finals = []
        for d in dirs.split(","):
            ev = pd.read_csv(Path(d) / "eval_log.csv")
            row = ev.iloc[-1] if args.epoch is None else ev[ev["epoch"] == args.epoch].iloc[0]
            finals.append(float(row["rsum"]))
        std = float(np.std(finals, ddof=1)) if len(finals) > 1 else float("nan")
        print(f"{label}: dev rSum {np.mean(finals):.1f} ± {std:.1f} over {len(finals)} seed(s) "
              f"({', '.join(f'{v:.1f}' for v in finals)})")


if __name__ == "__main__":
    main()

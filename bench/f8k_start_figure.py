"""Figure of the start diagnostics of several runs (``term_shares.csv`` of bench/f8k_run.py).

    PYTHONPATH=. python bench/f8k_start_figure.py --out figures/f8k_start.png \\
        USER=runs/a "+queue/UTO"=runs/b "+SGE triplet"=runs/c VSE++=runs/d

Four panels against the training step: the batch negatives' and the queue's share of the
gradient on the embeddings, the fraction of in-batch negatives above gamma, and the mean
positive and negative similarity. Only metrics are drawn (no photos, no features).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd


def main() -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--smooth", type=int, default=3, help="rolling mean over this many rows")
    ap.add_argument("runs", nargs="+", help="LABEL=RUN_DIR")
    args = ap.parse_args()
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    panels = [("share_batch_negative", "batch negatives' gradient share"),
              ("share_queue", "queue term's gradient share"),
              ("frac_neg_above_gamma", "negatives above γ = 0.5"),
              (None, "mean similarity (solid: positive, dashed: negative)")]
    for spec in args.runs:
        label, run = spec.split("=", 1)
        df = pd.read_csv(Path(run) / "term_shares.csv")
        roll = df.rolling(args.smooth, min_periods=1).mean()
        for ax, (col, title) in zip(axes, panels):
            if col is None:
                line, = ax.plot(df["step"], roll["pos_mean"], label=label)
                ax.plot(df["step"], roll["neg_mean"], "--", color=line.get_color())
            else:
                ax.plot(df["step"], roll[col], label=label)
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("training step (128 captions)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

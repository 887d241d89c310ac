"""``userlab train`` plus the start diagnostics: per-term gradient shares and similarity spread.

    PYTHONPATH=. python bench/f8k_run.py --preset f8k-cpu --data data/f8k --run-dir runs/x \\
        [--set optim.epochs=2 ...] [--every 5]

Trains exactly as ``userlab train`` would (same config, same Trainer, dev metrics printed after
each evaluation), and records every ``--every``-th step into ``<run-dir>/term_shares.csv``
(:mod:`userlab.term_shares`); the seconds per epoch go to ``<run-dir>/epoch_times.csv``.
"""
from __future__ import annotations

import argparse
import time

import pandas as pd


def main() -> None:
    from userlab.cli import PrintDevMetrics, build_config
    from userlab.interrupt import graceful_stop
    from userlab.term_shares import attach_term_shares, per_epoch
    from userlab.train import Callback, Trainer

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="f8k-cpu")
    ap.add_argument("--config")
    ap.add_argument("--data")
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--set", action="append")
    ap.add_argument("--every", type=int, default=5)
    args = ap.parse_args()
    cfg = build_config(args)

    class EpochTimes(Callback):
        def __init__(self):
            self.t0, self.rows = time.perf_counter(), []

        def on_epoch_end(self, trainer):
            now = time.perf_counter()
            self.rows.append({"epoch": trainer.epoch, "seconds": now - self.t0})
            self.t0 = now
            pd.DataFrame(self.rows).to_csv(trainer.run_dir / "epoch_times.csv", index=False)

    with graceful_stop():
        trainer = Trainer(cfg, callbacks=[PrintDevMetrics(), EpochTimes()], progress=False)
        path = attach_term_shares(trainer, every=args.every)
        trainer.fit()
    print(per_epoch(path).round(3).to_string(index=False))


if __name__ == "__main__":
    main()

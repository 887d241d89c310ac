"""Cost of a demo-preset USER training step with SGE only vs SGE + CGE (full USER).

    python bench/demo_enhancement_cost.py [--steps 6] [--data data/demo]

Builds both models from ``preset("demo")`` (batch 128, queues 2 x 1024) and times forward +
backward + AdamW step on the same real demo batches, alternating the two models step by step
so that a busy machine slows both alike. Prints the median seconds per step and the ratio.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from userlab.config import preset
from userlab.data.precomp import collate_batch
from userlab.models.user import build_model
from userlab.pipeline import prepare_data


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--data", default="data/demo")
    args = p.parse_args()
    torch.set_num_threads(1)
    base = preset("demo").replace(**{"data.root": args.data})
    data = prepare_data(base, splits=("train",))
    models, opts, times = {}, {}, {}
    for name in ("sge", "sge+cge"):
        torch.manual_seed(0)
        cfg = base.replace(**{"model.enhancement": name})
        models[name] = build_model(cfg, vocab=data.vocab).train()
        opts[name] = torch.optim.AdamW(models[name].parameters(), lr=1e-3)
        times[name] = []
    n = base.data.batch_size
    for step in range(args.steps + 1):
        batch = collate_batch([data.train[i] for i in range(step * n, (step + 1) * n)])
        for name, model in models.items():
            t0 = time.perf_counter()
            loss, _ = model(batch)
            opts[name].zero_grad()
            loss.total.backward()
            opts[name].step()
            if step:                       # the first step warms up allocators
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    for k, v in med.items():
        print(f"{k}: {v:.3f} s/step (median of {len(times[k])})")
    print(f"sge+cge / sge = {med['sge+cge'] / med['sge']:.2f}")


if __name__ == "__main__":
    main()

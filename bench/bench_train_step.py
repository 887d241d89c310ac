"""Benchmark: one USER training step vs one plain VSE++ step on the same encoders.

Both models use the same image encoder (SGE, FC + MLP, GPO) and text encoder; USER adds the EMA
update of the key encoders, their forward pass, the two queue terms and the enqueue. Batch 128,
BUTD-shaped regions (36 x 2048) and a 1024-d joint space by default. Prints a markdown table and
appends it to bench/RESULTS.md. Target: USER / VSE++ time ratio <= 1.45.

    python bench/bench_train_step.py                    # BUTD shapes
    python bench/bench_train_step.py --regions 12 --dim 1280 --embed 256   # demo shapes
"""
from __future__ import annotations

import argparse
import datetime as dt
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_eval import append_results, load_text, machine_lines  # noqa: E402

from userlab.config import ExperimentConfig  # noqa: E402
from userlab.models.user import RetrievalModel  # noqa: E402
from userlab.train import amp_dtype, pick_device  # noqa: E402


def synthetic_batch(b: int, regions: int, dim: int, vocab: int, length: int, device) -> dict:
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(length // 2, length + 1, (b,), generator=g)
    tokens = torch.randint(5, vocab, (b, length), generator=g)
    mask = torch.arange(length)[None] < lengths[:, None]
    tokens = tokens * mask
    batch = {"regions": torch.randn(b, regions, dim, generator=g), "tokens": tokens, "lengths": lengths,
             "attention_mask": mask.long(), "image_id": torch.arange(b), "image_index": torch.arange(b),
             "caption_index": torch.arange(b)}
    return {k: v.to(device) for k, v in batch.items()}


def make(cfg: ExperimentConfig, user: bool) -> ExperimentConfig:
    if user:
        return cfg.replace(**{"momentum.enabled": True, "loss.objective": "uto"})
    return cfg.replace(**{"momentum.enabled": False, "loss.objective": "triplet"})


def time_steps(model, batch, steps: int, warmup: int, device, amp) -> list[float]:
    opt = torch.optim.AdamW(model.query_parameters(), lr=1e-4)
    times = []
    for i in range(warmup + steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        ctx = torch.autocast(device.type, dtype=amp) if amp else torch.autocast(device.type, enabled=False)
        with ctx:
            loss, _ = model(batch)
        opt.zero_grad(set_to_none=True)
        loss.total.backward()
        torch.nn.utils.clip_grad_norm_(model.query_parameters(), 2.0)
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t)
    return times


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--regions", type=int, default=36)
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--embed", type=int, default=1024)
    p.add_argument("--queue", type=int, default=2048)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="auto")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)

    device = pick_device(args.device)
    amp = amp_dtype("auto", device)
    cfg = ExperimentConfig()
    cfg.model.region_dim, cfg.model.num_regions, cfg.model.embed_size = args.dim, args.regions, args.embed
    cfg.model.vocab_size, cfg.model.word_dim = 8000, 300
    cfg.momentum.queue_size = args.queue
    cfg.data.batch_size = args.batch
    batch = synthetic_batch(args.batch, args.regions, args.dim, cfg.model.vocab_size, 16, device)
    results = {}
    for name, user in (("VSE++ step", False), ("USER step", True)):
        torch.manual_seed(0)
        model = RetrievalModel(make(cfg, user)).to(device).train()
        results[name] = time_steps(model, batch, args.steps, args.warmup, device, amp)
    med = {k: statistics.median(v) for k, v in results.items()}
    ratio = med["USER step"] / med["VSE++ step"]
    lines = [f"## Training step: USER vs VSE++ ({dt.datetime.now():%Y-%m-%d %H:%M})", "",
             *machine_lines(device), f"- load average before/after: {load_text()}",
             f"- command: `python bench/bench_train_step.py --batch {args.batch} --regions {args.regions} "
             f"--dim {args.dim} --embed {args.embed} --queue {args.queue} --steps {args.steps}`"
             f" (amp: {amp})", "",
             "| step | median (s) | runs (s) |", "|---|---:|---|"]
    for name, ts in results.items():
        lines.append(f"| {name} | {med[name]:.3f} | {', '.join(f'{t:.3f}' for t in ts)} |")
    lines += ["", f"USER / VSE++ ratio: **{ratio:.2f}** (target <= 1.45)", ""]
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        append_results(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

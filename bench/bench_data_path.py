"""Benchmark: is the data path ever the bottleneck of training?

On the demo data (``data/demo``: 12 x 1280 region features, 5 captions per image) it measures, for
the Trainer's own loader (``EpochBatchSampler`` + ``PrecompDataset`` + ``collate_batch``):

- loader batches/s with the features **in RAM** (the whole ``train_ims.npy`` read into memory),
  **on disk** (userlab's default: each row read with ``os.pread`` from the file, page cache as the
  OS left it) and through **DataLoader workers** (``data.num_workers`` = 1, 2);
- what one batch costs on the training thread without workers: caption tokenisation +
  augmentation (``caption_item``) and feature reads (``image_item``) separately;
- the **compute limit**: USER training steps/s on one fixed batch (bf16 where ``optim.amp=auto``
  picks it, as the Trainer does), and full training steps/s with the loader at 0 and 2 workers.

Headroom = loader batches/s / compute steps/s: above 1 the loader keeps up. Runs with 1 torch
thread in this process (the machine is shared) and appends a section to bench/RESULTS.md.

    python bench/bench_data_path.py --data data/demo --batches 20
"""
from __future__ import annotations

import argparse
import datetime as dt
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_eval import append_results, load_text, machine_lines  # noqa: E402
from bench_train_step import peak_rss_mb, stub_trainer  # noqa: E402

from userlab.config import preset  # noqa: E402
from userlab.data.precomp import PrecompDataset, collate_batch  # noqa: E402
from userlab.models.user import RetrievalModel  # noqa: E402
from userlab.pipeline import EpochBatchSampler, prepare_data  # noqa: E402
from userlab.train import amp_dtype, pick_device  # noqa: E402


class InRamDataset(PrecompDataset):
    """The same dataset with every feature row served from one in-memory array."""

    def load_into_ram(self) -> "InRamDataset":
        self._ram = np.ascontiguousarray(np.load(self.ims_path, allow_pickle=False)[: self.num_images],
                                         dtype=np.float32)
        return self

    def _read_row(self, row: int) -> np.ndarray:
        return self._ram[row].copy()


def loader(dataset, batch: int, workers: int, epoch: int = 0) -> torch.utils.data.DataLoader:
    sampler = EpochBatchSampler(len(dataset), batch, 1, epoch)
    dataset.set_epoch(epoch, 1)
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_batch,
                                       num_workers=workers, generator=torch.Generator().manual_seed(epoch))


def loader_rate(dataset, batch: int, workers: int, batches: int) -> tuple[float, float]:
    """``(batches/s after the first batch, first-batch latency s)``."""
    it = iter(loader(dataset, batch, workers))
    t0 = time.perf_counter()
    next(it)
    first = time.perf_counter() - t0
    t1 = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches / (time.perf_counter() - t1), first


def per_batch_parts(dataset, batch: int, batches: int) -> tuple[float, float, float]:
    """Seconds per batch on the calling thread: captions (tokenise + augment), features, collate."""
    dataset.set_epoch(0, 1)
    idx = list(EpochBatchSampler(len(dataset), batch, 1, 0))[:batches]
    cap = feat = coll = 0.0
    for rows in idx:
        t = time.perf_counter()
        caps = [dataset.caption_item(c) for c in rows]
        cap += time.perf_counter() - t
        t = time.perf_counter()
        ims = [dataset.image_item(c["image_index"]) for c in caps]
        feat += time.perf_counter() - t
        t = time.perf_counter()
        collate_batch([{**c, **i} for c, i in zip(caps, ims)])
        coll += time.perf_counter() - t
    return cap / batches, feat / batches, coll / batches


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="data/demo")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--batches", type=int, default=20, help="batches per loader measurement")
    p.add_argument("--steps", type=int, default=6, help="training steps per compute measurement")
    p.add_argument("--repeats", type=int, default=3, help="interleaved repeats")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    device = pick_device("cpu")
    load_before = load_text()
    started = time.perf_counter()

    cfg = preset("demo")
    cfg.data.root = args.data
    data = prepare_data(cfg, splits=("train",))
    disk = data.train
    ram = InRamDataset(disk.folder, disk.split, tokenizer=disk.tokenizer, train=True).load_into_ram()
    amp = amp_dtype(cfg.optim.amp, device)
    torch.manual_seed(0)
    model = RetrievalModel(cfg, vocab=data.vocab).to(device).train()
    trainer = stub_trainer(cfg, model, device, amp)

    def compute_rate() -> float:
        batch = next(iter(loader(disk, args.batch, 0)))
        trainer.train_step(batch, with_row=False)
        t = time.perf_counter()
        for _ in range(args.steps):
            trainer.train_step(batch, with_row=False)
        return args.steps / (time.perf_counter() - t)

    def train_rate(workers: int) -> float:
        it = iter(loader(disk, args.batch, workers, epoch=1))
        trainer.train_step(next(it), with_row=False)   # worker start-up not counted
        t = time.perf_counter()
        for _ in range(args.steps):
            trainer.train_step(next(it), with_row=False)
        return args.steps / (time.perf_counter() - t)

    modes = {"features in RAM, 0 workers": lambda: loader_rate(ram, args.batch, 0, args.batches),
             "on disk (os.pread), 0 workers": lambda: loader_rate(disk, args.batch, 0, args.batches),
             "on disk, 1 worker": lambda: loader_rate(disk, args.batch, 1, args.batches),
             "on disk, 2 workers": lambda: loader_rate(disk, args.batch, 2, args.batches)}
    rates: dict[str, list[float]] = {k: [] for k in modes}
    firsts: dict[str, list[float]] = {k: [] for k in modes}
    compute, train0, train2, parts = [], [], [], []
    for rep in range(args.repeats):
        for name, fn in modes.items():
            r, first = fn()
            rates[name].append(r)
            firsts[name].append(first)
        parts.append(per_batch_parts(disk, args.batch, min(args.batches, 10)))
        compute.append(compute_rate())
        train0.append(train_rate(0))
        train2.append(train_rate(2))
        print(f"repeat {rep + 1}: compute {compute[-1]:.2f} steps/s, load {load_text()}", flush=True)
    med = statistics.median
    limit = med(compute)
    cap, feat, coll = (med(x[i] for x in parts) for i in range(3))
    wall = time.perf_counter() - started
    m = cfg.model
    lines = [f"## Data path vs compute limit, demo data ({dt.datetime.now():%Y-%m-%d %H:%M})", "",
             *machine_lines(device),
             f"- load average (1/5/15 min) before: {load_before}; after: {load_text()} "
             "(the machine is shared with other jobs; measurements interleaved)",
             f"- command: `python bench/bench_data_path.py --data {args.data} --batches {args.batches} "
             f"--steps {args.steps} --repeats {args.repeats}` ({wall / 60:.1f} min; peak RSS "
             f"{peak_rss_mb():.0f} MiB, main process)",
             f"- data: {disk.num_images} train images x {disk.num_regions} x {disk.feature_dim} float32 "
             f"({disk.ims_path.stat().st_size / 2**20:.0f} MiB file, page cache warm: the file was read "
             f"before); batch {args.batch}; model: demo preset USER (embed {m.embed_size}), "
             f"amp {str(amp).replace('torch.', '')}, 1 torch thread; medians of {args.repeats} repeats", "",
             "| data path | loader batches/s | first batch (s) | headroom vs compute |", "|---|---:|---:|---:|"]
    for name in modes:
        r = med(rates[name])
        lines.append(f"| {name} | {r:.1f} | {med(firsts[name]):.2f} | {r / limit:.1f}x |")
    lines += ["", "| training thread, 0 workers, per batch | ms |", "|---|---:|",
              f"| captions: tokenise + augment (`caption_item`) | {cap * 1e3:.1f} |",
              f"| features: read rows (`image_item`) | {feat * 1e3:.1f} |",
              f"| collate | {coll * 1e3:.1f} |", "",
              "| training | steps/s |", "|---|---:|",
              f"| compute limit (one fixed batch, no loader) | {limit:.2f} |",
              f"| loader with 0 workers + compute | {med(train0):.2f} |",
              f"| loader with 2 workers + compute | {med(train2):.2f} |", ""]
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        append_results(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

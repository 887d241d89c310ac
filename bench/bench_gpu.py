"""Benchmark for a GPU: F30K-sized training throughput per AMP mode, COCO-5K evaluation time.

Not yet run by the project (no GPU was available when it was written); it runs with one command
on a CUDA machine and appends its section to bench/RESULTS.md:

    bash bench/run_gpu.sh            # this script, then bench_train_step.py --device cuda --sizes issue

What it measures, on synthetic features of the real shapes (BUTD: 36 x 2048 float32 per image,
5 captions per image, the f30k preset: batch 128, embed 1024, queue 2048, GRU text encoder):

- training captions/s and the implied epoch time (``--images`` x 5 captions; F30K: 29,000 x 5)
  for ``optim.amp`` = off / bf16 / fp16, USER and VSE++, with the features **resident on the GPU**
  (batches gathered on the device) and **read from disk** (userlab's ``PrecompDataset`` + DataLoader
  workers + pinned memory, as the Trainer does);
- peak GPU memory of each run (``torch.cuda.max_memory_allocated``);
- COCO-5K evaluation: ``userlab.evaluate.evaluate`` on 5,000 images x 25,000 captions, end to end.

``--smoke`` runs everything at toy sizes on any device (a check of the script, no figures).
"""
from __future__ import annotations

import argparse
import datetime as dt
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_eval import append_results, load_text, machine_lines  # noqa: E402
from bench_train_step import make, stub_trainer  # noqa: E402

from userlab.config import preset  # noqa: E402
from userlab.data.precomp import PrecompDataset, collate_batch  # noqa: E402
from userlab.data.text import WordTokenizer, build_vocab  # noqa: E402
from userlab.evaluate import evaluate, move_batch  # noqa: E402
from userlab.models.user import RetrievalModel  # noqa: E402
from userlab.pipeline import EpochBatchSampler  # noqa: E402
from userlab.train import amp_dtype, pick_device  # noqa: E402

WORDS = ("a man woman dog cat child red blue green small large running sitting on in the with "
         "street park water ball grass shirt holding looking two three people near next to").split()


def write_split(folder: Path, split: str, n: int, regions: int, dim: int, seed: int) -> None:
    """A precomputed split of random features (written in chunks) and random captions."""
    rng = np.random.default_rng(seed)
    ims = np.lib.format.open_memmap(folder / f"{split}_ims.npy", mode="w+", dtype=np.float32,
                                    shape=(n, regions, dim))
    for start in range(0, n, 1000):
        stop = min(n, start + 1000)
        ims[start:stop] = rng.standard_normal((stop - start, regions, dim), dtype=np.float32)
    ims.flush()
    del ims
    pick = random.Random(seed)
    with open(folder / f"{split}_caps.txt", "w", encoding="utf-8") as fh:
        for _ in range(5 * n):
            fh.write(" ".join(pick.choice(WORDS) for _ in range(pick.randint(8, 16))) + "\n")


def time_steps(trainer, batches, steps: int, warmup: int, device) -> list[float]:
    times = []
    for i in range(warmup + steps):
        batch = next(batches)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        trainer.train_step(move_batch(batch, device), with_row=(i % 10 == 0))
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t)
    return times


def resident_batches(ds: PrecompDataset, feats: torch.Tensor, batch: int, device):
    """Endless batches gathered on the device: features and captions (tokenised once, with
    epoch 0's augmentation) resident there, so no host work but the indices per step."""
    ds.set_epoch(0, 1)
    caps = collate_batch([ds.caption_item(c) for c in range(ds.num_captions)])
    tokens, lengths = caps["tokens"].to(device), caps["lengths"].to(device)
    image_index = caps["image_index"].to(device)
    epoch = 0
    while True:
        for rows in EpochBatchSampler(ds.num_captions, batch, 1, epoch):
            idx = torch.as_tensor(rows, device=device)
            width = int(lengths[idx].max())
            yield {"regions": feats[image_index[idx]], "tokens": tokens[idx, :width],
                   "lengths": lengths[idx], "image_index": image_index[idx], "caption_index": idx,
                   "image_id": image_index[idx]}
        epoch += 1


def disk_batches(ds: PrecompDataset, batch: int, workers: int, pin: bool):
    epoch = 0
    while True:
        ds.set_epoch(epoch, 1)
        sampler = EpochBatchSampler(ds.num_captions, batch, 1, epoch)
        yield from torch.utils.data.DataLoader(ds, batch_sampler=sampler, collate_fn=collate_batch,
                                               num_workers=workers, pin_memory=pin,
                                               persistent_workers=False)
        epoch += 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=29000, help="train images (F30K: 29,000)")
    p.add_argument("--eval-images", type=int, default=5000, help="COCO-5K: 5,000")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--workers", type=int, default=8, help="DataLoader workers for the disk path")
    p.add_argument("--amps", default="off,bf16,fp16")
    p.add_argument("--folder", help="where the synthetic features go (default: a temporary folder)")
    p.add_argument("--device", default="auto")
    p.add_argument("--smoke", action="store_true", help="toy sizes on any device; nothing written")
    args = p.parse_args(argv)
    device = pick_device(args.device)
    if device.type != "cuda" and not args.smoke:
        print("bench_gpu.py: no CUDA device here; run it on a GPU machine (or pass --smoke)", file=sys.stderr)
        return 2
    cfg = preset("f30k")
    regions, dim = cfg.model.num_regions, cfg.model.region_dim
    if args.smoke:
        args.images, args.eval_images, args.steps, args.warmup, args.workers = 60, 40, 2, 1, 0
        cfg.model.region_dim = dim = 64
        cfg.model.embed_size, cfg.momentum.queue_size, cfg.data.batch_size = 32, 64, 16
    batch = cfg.data.batch_size
    started, load_before = time.perf_counter(), load_text()
    tmp = tempfile.TemporaryDirectory(dir=args.folder)
    folder = Path(tmp.name)
    t = time.perf_counter()
    write_split(folder, "train", args.images, regions, dim, seed=0)
    write_split(folder, "test", args.eval_images, regions, dim, seed=1)
    write_s = time.perf_counter() - t
    train = PrecompDataset(folder, "train", train=True, validate=False)
    vocab = build_vocab(train.captions, threshold=1)
    train.tokenizer = WordTokenizer(vocab, max_len=cfg.data.max_caption_len, augment_prob=cfg.data.augment_prob)
    cfg.model.vocab_size = len(vocab)
    feats = torch.from_numpy(np.load(folder / "train_ims.npy")).to(device)

    rows, peak = [], {}
    for amp_name in [a for a in args.amps.split(",") if a]:
        if device.type != "cuda" and amp_name == "fp16":
            continue
        amp = amp_dtype(amp_name, device)
        for backbone in ("USER", "VSE++"):
            for where in ("resident on GPU", f"from disk, {args.workers} workers"):
                torch.manual_seed(0)
                model = RetrievalModel(make(cfg, backbone == "USER"), vocab=vocab).to(device).train()
                trainer = stub_trainer(cfg, model, device, amp)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats(device)
                batches = (resident_batches(train, feats, batch, device) if where.startswith("resident")
                           else disk_batches(train, batch, args.workers, device.type == "cuda"))
                times = time_steps(trainer, batches, args.steps, args.warmup, device)
                step = statistics.median(times)
                mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
                rows.append((amp_name, backbone, where, step, batch / step, 5 * args.images * step / batch / 60, mem))
                print(rows[-1], flush=True)
                del model, trainer, batches

    test = PrecompDataset(folder, "test", validate=False, tokenizer=WordTokenizer(vocab, max_len=cfg.data.max_caption_len))
    torch.manual_seed(0)
    model = RetrievalModel(make(cfg, True), vocab=vocab, with_momentum=False).to(device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    t = time.perf_counter()
    metrics = evaluate(model, test, protocol="coco_5k" if args.eval_images == 5000 else "full",
                       batch_size=512, device=device, num_workers=args.workers, progress=False)
    if device.type == "cuda":
        torch.cuda.synchronize()
    eval_s = time.perf_counter() - t
    eval_mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    tmp.cleanup()

    lines = [f"## GPU: F30K-sized training throughput and COCO-5K evaluation ({dt.datetime.now():%Y-%m-%d %H:%M})", "",
             *machine_lines(device),
             f"- load average (1/5/15 min) before: {load_before}; after: {load_text()}",
             f"- command: `python bench/bench_gpu.py --images {args.images} --steps {args.steps} --workers {args.workers}"
             f" --amps {args.amps}`{' --smoke' if args.smoke else ''} ({(time.perf_counter() - started) / 60:.1f} min; "
             f"synthetic features written in {write_s:.0f} s, not counted)",
             f"- f30k preset: batch {batch}, {regions} x {dim} float32 regions, embed {cfg.model.embed_size}, queue "
             f"{cfg.momentum.queue_size}, GRU text encoder (vocab {len(vocab)}); {args.images} images x 5 captions per epoch; "
             f"median of {args.steps} steps after {args.warmup} warm-up", "",
             "| amp | backbone | features | s/step | captions/s | epoch (min) | peak GPU memory (GiB) |",
             "|---|---|---|---:|---:|---:|---:|"]
    for amp_name, backbone, where, step, cps, epoch_min, mem in rows:
        lines.append(f"| {amp_name} | {backbone} | {where} | {step:.4f} | {cps:,.0f} | {epoch_min:.1f} | {mem:.2f} |")
    lines += ["", f"COCO-5K evaluation ({args.eval_images} images x {5 * args.eval_images} captions, encode + "
                  f"ranks, fp16 autocast as `evaluate` uses on CUDA): **{eval_s:.1f} s**, peak GPU memory "
                  f"{eval_mem:.2f} GiB; rSum of the untrained model {float(metrics['rsum'].iloc[0]):.1f} (a sanity value)", ""]
    text = "\n".join(lines)
    print(text)
    if not args.smoke:
        append_results(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

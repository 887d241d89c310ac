"""Benchmark: training from an 8 GB memory-mapped feature file within a 3 GB resident set.

Writes a BUTD-shaped ``train_ims.npy`` (``N x 36 x 2048`` float32; 27,126 images = 8.0 GB at the
default ``--gb 8``) chunk by chunk with ``np.lib.format.open_memmap`` into a temporary folder,
with 5 captions per image and a small dev split, then trains a :class:`userlab.train.Trainer`
(region_dim 2048, 36 regions, SGE, embed 256, batch 128, random batches) for ``--steps`` steps
in a child process and reports that process's peak resident set (``VmHWM``) and the peaks of
its two parts sampled every step: ``RssAnon`` (heap: model, batches) and ``RssFile`` (mapped file
pages, which is where a memory-mapped dataset grows when its pages are never released).

``--compare`` also runs the child the way rows were read before (copied out of the memory map,
pages never released) to show what reading with ``os.pread`` saves. The feature file
is removed at the end (``--keep`` keeps it). The result is appended to ``bench/RESULTS.md``.

Run from the repository root::

    python bench/bench_memmap.py                      # 8 GB, 200 steps
    python bench/bench_memmap.py --gb 1 --steps 50 --no-write   # quick look
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import mmap
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
REGIONS, WIDTH = 36, 2048
ROW_BYTES = REGIONS * WIDTH * 4
WORDS = ("a", "man", "woman", "dog", "cat", "red", "blue", "small", "large", "street", "park",
         "runs", "sits", "on", "in", "the", "with", "ball", "car", "tree", "near", "green")


def proc_status() -> dict[str, int]:
    """``VmHWM``, ``VmRSS``, ``RssAnon``, ``RssFile`` of this process in MiB (Linux)."""
    out = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem"):
                out[key] = int(value.split()[0]) // 1024
    return out


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------
def _captions(n_images: int, rng: np.random.Generator) -> list[str]:
    return [" ".join(rng.choice(WORDS, size=8)) for _ in range(5 * n_images)]


def write_split(folder: Path, split: str, n_images: int, seed: int, chunk: int = 256) -> float:
    """Write ``{split}_ims.npy`` (``(n, 36, 2048)`` float32) and captions; returns seconds.

    Chunks are flushed and their pages released as they are written, so writing 8 GB does not
    fill this process's resident set either.
    """
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{split}_caps.txt").write_text("\n".join(_captions(n_images, rng)) + "\n")
    arr = np.lib.format.open_memmap(folder / f"{split}_ims.npy", mode="w+", dtype=np.float32,
                                    shape=(n_images, REGIONS, WIDTH))
    for start in range(0, n_images, chunk):
        stop = min(n_images, start + chunk)
        arr[start:stop] = rng.standard_normal((stop - start, REGIONS, WIDTH), dtype=np.float32)
        arr.flush()
        arr._mmap.madvise(mmap.MADV_DONTNEED)
    del arr
    return time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------
# The child: train and sample memory
# ---------------------------------------------------------------------------------------------
def child(args: argparse.Namespace) -> int:
    import torch

    from userlab.config import ExperimentConfig
    from userlab.data.precomp import PrecompDataset
    from userlab.train import Trainer

    if args.mmap_reads:
        # the behaviour before os.pread: rows copied out of the mapping, pages never released
        PrecompDataset.release_every_bytes = 0
        PrecompDataset._read_row = lambda self, row: np.array(self.ims[row], dtype=np.float32)
    cfg = ExperimentConfig()
    cfg.data.root = args.data
    cfg.data.batch_size = args.batch_size
    cfg.data.dev_max_images = None
    cfg.data.vocab_threshold = 1
    cfg.model.region_dim, cfg.model.num_regions = WIDTH, REGIONS
    cfg.model.enhancement = args.enhancement
    cfg.model.embed_size, cfg.model.mlp_hidden, cfg.model.word_dim = args.embed, 256, 128
    cfg.momentum.queue_size = 1024
    cfg.optim.epochs = 1
    cfg.run_dir = args.run_dir
    cfg.log_every = 50
    start = proc_status()
    peaks = {"RssAnon": 0, "RssFile": 0, "VmRSS": 0}
    times = []

    class Sample:
        def on_step(self, trainer, row):
            times.append(time.perf_counter())
            for key, value in proc_status().items():
                if key in peaks:
                    peaks[key] = max(peaks[key], value)

        def on_eval(self, trainer, row):
            pass

        def on_epoch_end(self, trainer):
            pass

    t0 = time.perf_counter()
    trainer = Trainer(cfg, callbacks=[Sample()], progress=False, resume=False, max_steps=args.steps)
    setup = time.perf_counter() - t0
    after_setup = proc_status()
    trainer.fit()
    end = proc_status()
    ds = trainer.data.train
    steps_s = (times[-1] - times[0]) / max(1, len(times) - 1) if len(times) > 1 else float("nan")
    result = {"start": start, "after_setup": after_setup, "end": end, "peaks": peaks, "steps": trainer.step, "setup_s": setup,
              "s_per_step": steps_s, "rows_read": trainer.step * args.batch_size,
              "threads": torch.get_num_threads(),
              "images": ds.num_images}
    print("RESULT " + json.dumps(result))
    return 0


def run_child(data: Path, run_dir: Path, args: argparse.Namespace, mmap_reads: bool) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--data", str(data),
           "--run-dir", str(run_dir), "--steps", str(args.steps), "--batch-size", str(args.batch_size),
           "--embed", str(args.embed), "--enhancement", args.enhancement]
    if mmap_reads:
        cmd += ["--mmap-reads"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"child failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gb", type=float, default=8.0, help="feature file size in GB (1e9 bytes)")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--embed", type=int, default=256)
    parser.add_argument("--enhancement", default="sge", help="none, sge (default), ...")
    parser.add_argument("--dir", default=None, help="where to put the temporary data (default: system temp)")
    parser.add_argument("--limit-gb", type=float, default=3.0, help="peak RSS budget checked (GiB)")
    parser.add_argument("--compare", action="store_true", help="also run without page release")
    parser.add_argument("--keep", action="store_true", help="keep the generated data")
    parser.add_argument("--no-write", action="store_true", help="do not append to bench/RESULTS.md")
    # child mode
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", help=argparse.SUPPRESS)
    parser.add_argument("--mmap-reads", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args)

    sys.path.insert(0, str(BENCH))
    sys.path.insert(0, str(ROOT))
    import torch
    from bench_eval import append_results, load_text, machine_lines

    n_images = max(64, int(args.gb * 1e9 // ROW_BYTES))
    size = n_images * ROW_BYTES
    base = Path(args.dir) if args.dir else Path(tempfile.gettempdir())
    free = shutil.disk_usage(base).free
    if free < size * 1.1 + 2**30:
        raise SystemExit(f"{base}: {free / 1e9:.1f} GB free, need {size * 1.1 / 1e9 + 1:.1f} GB; "
                         f"use --dir or a smaller --gb")
    work = Path(tempfile.mkdtemp(prefix="userlab_memmap_", dir=base))
    data = work / "data"
    load_before = load_text()
    try:
        print(f"writing {n_images:,} x {REGIONS} x {WIDTH} float32 = {size / 1e9:.2f} GB to {data}")
        write_s = write_split(data, "train", n_images, seed=0)
        write_split(data, "dev", 64, seed=1)
        print(f"  written in {write_s:.0f} s")
        runs = [("os.pread per row (userlab)", run_child(data, work / "run", args, False))]
        if args.compare:
            runs.append(("rows copied from the memmap, never released (before)",
                         run_child(data, work / "run_mmap", args, True)))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    load_after = load_text()

    limit_mb = args.limit_gb * 1024
    rows = []
    ok = True
    for name, r in runs:
        hwm = r["end"]["VmHWM"]
        within = hwm <= limit_mb
        ok &= within or "before" in name
        touched_gb = r["rows_read"] * ROW_BYTES / 1e9
        rows.append(f"| {name} | {r['steps']} | {r['rows_read']:,} ({touched_gb:.1f} GB) | "
                    f"{r['start']['RssAnon']} / {r['start']['RssFile']} | {r['after_setup']['VmHWM']} | "
                    f"{r['peaks']['RssAnon']} | "
                    f"{r['peaks']['RssFile']} | **{hwm}** | {'yes' if within else 'no'} | "
                    f"{r['s_per_step']:.2f} |")
        print(f"{name}: {json.dumps(r)}")
    stamp = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    section = "\n".join(
        [f"## Training from a {size / 1e9:.1f} GB memory-mapped feature file ({stamp})", ""]
        + machine_lines(torch.device("cpu"))
        + [f"- load average (1/5/15 min) before: {load_before}; after: {load_after} "
           f"(the CPU is shared with other jobs)",
           f"- `train_ims.npy` {n_images:,} x {REGIONS} x {WIDTH} float32 on local disk (written in "
           f"{write_s:.0f} s, not counted); Trainer: enhancement {args.enhancement}, embed {args.embed}, "
           f"batch {args.batch_size}, random batches, {args.steps} steps, 0 loader workers; memory in MiB, peaks sampled every "
           f"step in the training process; budget {args.limit_gb:g} GiB peak RSS (VmHWM)",
           f"- command: `python bench/bench_memmap.py --gb {args.gb:g} --steps {args.steps} "
           f"--enhancement {args.enhancement}"
           f"{' --compare' if args.compare else ''}`", "",
           "| feature reads | steps | feature rows read | RssAnon / RssFile at start | VmHWM after set-up | "
           "peak RssAnon (training) | peak RssFile (training) | peak RSS (VmHWM, whole run) | within budget | s/step |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|"]
        + rows + [""])
    print()
    print(section)
    if not args.no_write:
        append_results(section)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())

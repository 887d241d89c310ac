"""Benchmark: whole-dataset feature extraction (:func:`userlab.data.extract.extract_dataset`).

Generates ``--images`` JPEG photos-like images (smooth colour fields with a few shapes, the size
of Flickr photos by default) and a Flickr8k-style token file with split lists (80 / 10 / 10) in a
temporary folder, then extracts them once per ``--workers`` setting, each run in a fresh
subprocess so that its peak memory is its own. Reports images per second (extraction only: the
subprocess's own import and model loading are timed separately) and peak resident memory of the
main process (VmHWM) and of the largest DataLoader worker (``RUSAGE_CHILDREN``; a forked worker's
RSS counts the pages it shares with the main process, so it overstates what it adds). The
backbone alone is also timed on a random batch in the same process, as the ceiling for the
machine's load at that moment. Appends a
markdown table with a description of the machine to ``bench/RESULTS.md``.

Run from the repository root::

    python bench/bench_extract.py                       # 10,000 images, workers 0 and 2
    python bench/bench_extract.py --images 1000 --no-write
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_eval import append_results, load_text, machine_lines  # noqa: E402  (shared helpers)


_RUNNER = r"""
import json, os, resource, sys, time
t0 = time.perf_counter()
import torch
from userlab.data.extract import extract_dataset
from userlab.data.features import RegionBackbone
args = json.loads(sys.argv[1])
torch.set_num_threads(args.pop("threads"))
backbone = RegionBackbone(args["device"], input_size=args["input_size"])
t_import = time.perf_counter() - t0
# The backbone alone on a random batch: the ceiling extraction can reach on this machine now.
x = torch.randint(0, 256, (args["batch_size"], 3, args["input_size"], args["input_size"]), dtype=torch.uint8)
backbone.encode(x)
tf = time.perf_counter()
for _ in range(2):
    backbone.encode(x)
forward_rate = 2 * args["batch_size"] / (time.perf_counter() - tf)
del backbone
t1 = time.perf_counter()
out = extract_dataset(**args)
seconds = time.perf_counter() - t1
hwm = 0
for line in open("/proc/self/status"):
    if line.startswith("VmHWM:"):
        hwm = int(line.split()[1]) / 1024
children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
size = sum(p.stat().st_size for p in out.iterdir() if p.is_file()) / 2**30
print("RESULT " + json.dumps({"seconds": seconds, "startup": t_import, "forward_rate": forward_rate, "hwm_mb": hwm,
                              "child_mb": children, "out_gb": size}))
"""


def generate(folder: Path, n: int, size: tuple[int, int], seed: int = 0) -> dict:
    """``n`` JPEGs plus a Flickr8k-style token file and split lists; returns extraction args."""
    from PIL import Image, ImageDraw

    images = folder / "Flicker8k_Dataset"
    images.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    w, h = size
    names, lines = [], []
    for i in range(n):
        name = f"{1000000 + i}_{i:06x}.jpg"
        base = Image.fromarray(rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)).resize((w, h), Image.BILINEAR)
        draw = ImageDraw.Draw(base)
        for _ in range(3):
            x0, y0 = int(rng.integers(0, w - 40)), int(rng.integers(0, h - 40))
            box = (x0, y0, x0 + int(rng.integers(20, w // 2)), y0 + int(rng.integers(20, h // 2)))
            colour = tuple(int(v) for v in rng.integers(0, 256, 3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
        base.save(images / name, quality=90)
        names.append(name)
        lines += [f"{name}#{k}\tgenerated picture {i} caption {k}" for k in range(5)]
    (folder / "Flickr8k.token.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    cut1, cut2 = int(n * 0.8), int(n * 0.9)
    lists = {}
    for split, part in (("train", names[:cut1]), ("dev", names[cut1:cut2]), ("test", names[cut2:])):
        lists[split] = str(folder / f"Flickr_8k.{split}Images.txt")
        Path(lists[split]).write_text("\n".join(part) + "\n", encoding="utf-8")
    return {"format": "flickr", "captions_path": str(folder / "Flickr8k.token.txt"),
            "image_root": str(images), "split_files": lists}


def run_once(dataset: dict, out: Path, workers: int, args) -> dict:
    params = dict(dataset, out_dir=str(out), num_workers=workers, batch_size=args.batch_size,
                  chunk_size=args.chunk_size, input_size=args.input_size, device=args.device,
                  progress=False, threads=args.threads)
    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(repo) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", _RUNNER, json.dumps(params)], cwd=repo, env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"extraction failed:\n{proc.stderr[-3000:]}")
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=10000)
    parser.add_argument("--size", default="500x375", help="generated image size WxH (Flickr-like)")
    parser.add_argument("--workers", default="0,2", help="comma-separated DataLoader worker counts")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--chunk-size", type=int, default=1000)
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the main process")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--keep", help="generate into (and keep) this folder instead of a temp dir")
    parser.add_argument("--no-write", action="store_true", help="do not append to RESULTS.md")
    args = parser.parse_args(argv)
    w, h = (int(v) for v in args.size.lower().split("x"))
    load_before = load_text()

    with tempfile.TemporaryDirectory(prefix="bench_extract_") as tmp:
        folder = Path(args.keep) if args.keep else Path(tmp)
        t0 = time.perf_counter()
        dataset = generate(folder / "data", args.images, (w, h))
        gen_s = time.perf_counter() - t0
        print(f"generated {args.images} images of {w}x{h} in {gen_s:.1f} s", flush=True)
        rows = []
        for workers in (int(v) for v in args.workers.split(",")):
            out = folder / f"out_w{workers}"
            res = run_once(dataset, out, workers, args)
            res.update(workers=workers, rate=args.images / res["seconds"])
            rows.append(res)
            print(f"workers={workers}: {res['seconds']:.1f} s, {res['rate']:.1f} img/s (backbone alone "
                  f"{res['forward_rate']:.1f} img/s), peak RSS main "
                  f"{res['hwm_mb']:.0f} MB, worker {res['child_mb']:.0f} MB, output {res['out_gb']:.2f} GiB",
                  flush=True)

    import torch

    grid = (args.input_size // 32) ** 2
    stamp = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    lines = [f"## Dataset extraction: {args.images:,} generated {w}x{h} JPEGs, Flickr format ({stamp})", ""]
    lines += machine_lines(torch.device(args.device))
    lines += [f"- load average (1/5/15 min) before: {load_before}; after: {load_text()} "
              f"(the CPU is shared with other jobs)",
              f"- EfficientNet-Lite0 at {args.input_size} px, grid regions R={grid} x 1280 float32, "
              f"backbone guide; batch {args.batch_size}, chunk {args.chunk_size}, torch threads "
              f"{args.threads}; image generation took {gen_s:.0f} s (not counted)",
              f"- command: `python bench/bench_extract.py --images {args.images} --workers {args.workers}`",
              "",
              "| workers | images | extraction (s) | images/s | start-up (s) | peak RSS main (MB) | "
              "peak RSS largest worker (MB) | output (GiB) | backbone alone (images/s) |",
              "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['workers']} | {args.images:,} | {r['seconds']:.1f} | {r['rate']:.1f} | "
                     f"{r['startup']:.1f} | {r['hwm_mb']:.0f} | {r['child_mb']:.0f} | {r['out_gb']:.2f} | "
                     f"{r['forward_rate']:.1f} |")
    section = "\n".join(lines)
    print(section)
    if not args.no_write:
        append_results(section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

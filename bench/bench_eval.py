"""Benchmark: userlab's vectorised retrieval evaluation against the per-query argsort loop.

Scores a random COCO-5K-shaped similarity matrix (5000 images x 25000 captions, float32) under
the ``coco_5k`` and ``coco_1k_5fold`` protocols twice: with :func:`userlab.evaluate.evaluate_sims`
and with the straightforward SCAN / VSE++ style loop (one stable descending ``np.argsort`` per
query). It checks that both give identical ranks and metrics, prints a markdown table with the
times and the speed-up, and appends it, with a description of the machine, to
``bench/RESULTS.md``.

Run from the repository root::

    python bench/bench_eval.py                # full size, appends to bench/RESULTS.md
    python bench/bench_eval.py --images 1000 --no-write   # quick look
"""
from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from userlab.io import atomic_write_text
from userlab.evaluate import METRIC_COLUMNS, evaluate_sims, recall_metrics, retrieval_ranks

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
FOLDS, FOLD_IMAGES = 5, 1000


# ---------------------------------------------------------------------------------------------
# The per-query reference
# ---------------------------------------------------------------------------------------------
def loop_ranks(sims: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Ranks by one stable descending argsort per query (images, then captions)."""
    n_img, n_cap = sims.shape
    i2t = np.empty(n_img, dtype=np.int64)
    for i in range(n_img):
        order = np.argsort(-sims[i], kind="stable")
        positions = np.flatnonzero(order // k == i)
        i2t[i] = positions[0]
    columns = np.ascontiguousarray(sims.T)   # one copy, so each caption's scores are contiguous
    t2i = np.empty(n_cap, dtype=np.int64)
    for c in range(n_cap):
        order = np.argsort(-columns[c], kind="stable")
        t2i[c] = np.flatnonzero(order == c // k)[0]
    return i2t, t2i


def loop_metrics(sims: np.ndarray, protocol: str, k: int) -> tuple[dict, list]:
    """Reference metrics and ranks of a protocol (``coco_5k`` or ``coco_1k_5fold``)."""
    if protocol == "coco_5k":
        ranks = [loop_ranks(sims, k)]
    else:
        ranks = [loop_ranks(sims[FOLD_IMAGES * f:FOLD_IMAGES * (f + 1),
                                 k * FOLD_IMAGES * f:k * FOLD_IMAGES * (f + 1)], k)
                 for f in range(FOLDS)]
    per_fold = [recall_metrics(*r) for r in ranks]
    metrics = {key: float(np.mean([m[key] for m in per_fold])) for key in METRIC_COLUMNS}
    metrics["rsum"] = sum(metrics[f"{d}_R@{kk}"] for d in ("i2t", "t2i") for kk in (1, 5, 10))
    return metrics, ranks


def userlab_ranks(sims, protocol: str, k: int) -> list:
    if protocol == "coco_5k":
        return [tuple(r.cpu().numpy() for r in retrieval_ranks(sims, k))]
    return [tuple(r.cpu().numpy() for r in retrieval_ranks(
        sims[FOLD_IMAGES * f:FOLD_IMAGES * (f + 1), k * FOLD_IMAGES * f:k * FOLD_IMAGES * (f + 1)],
        k)) for f in range(FOLDS)]


# ---------------------------------------------------------------------------------------------
# Machine description
# ---------------------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def append_results(section: str) -> None:
    """Append one benchmark's markdown section to ``bench/RESULTS.md`` (atomically)."""
    previous = RESULTS.read_text(encoding="utf-8") if RESULTS.exists() else "# Benchmarks\n\n"
    atomic_write_text(RESULTS, previous.rstrip("\n") + "\n\n" + section + "\n")
    print(f"appended to {RESULTS}")


def machine_lines(device: torch.device) -> list[str]:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    dev = (f"cuda ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "cpu")
    return [f"- CPU: {cpu_model()}, {cores} cores usable ({os.cpu_count()} online), "
            f"torch threads {torch.get_num_threads()}",
            f"- torch {torch.__version__}, numpy {np.__version__}, Python "
            f"{platform.python_version()}, device: {dev}"]


def load_text() -> str:
    try:
        one, five, fifteen = os.getloadavg()
        return f"{one:.2f} / {five:.2f} / {fifteen:.2f}"
    except OSError:
        return "n/a"


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=5000,
                        help="images (a multiple of 1000 for the 5-fold protocol; 5000 = COCO)")
    parser.add_argument("--captions-per-image", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3,
                        help="userlab runs per protocol (the best is reported)")
    parser.add_argument("--device", default="cpu", help="device for userlab's sims (cpu, cuda)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-write", action="store_true", help="do not append to RESULTS.md")
    args = parser.parse_args(argv)

    k, n = args.captions_per_image, args.images
    device = torch.device(args.device)
    rng = np.random.default_rng(args.seed)
    sims = rng.random((n, k * n), dtype=np.float32)
    sims_dev = torch.from_numpy(sims).to(device)
    protocols = ["coco_5k", "coco_1k_5fold"] if n == 5000 else ["full"]
    if n != 5000 and n % FOLD_IMAGES == 0 and n // FOLD_IMAGES == FOLDS:
        protocols.append("coco_1k_5fold")
    load_before = load_text()
    print(f"sims {n} x {k * n} float32 on {device}; load average before: {load_before}")

    rows = []
    for protocol in protocols:
        ref_protocol = "coco_5k" if protocol == "full" else protocol
        times = []
        for _ in range(max(1, args.repeats)):
            t0 = time.perf_counter()
            df = evaluate_sims(sims_dev, protocol, captions_per_image=k)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        ref, ref_ranks = loop_metrics(sims, ref_protocol, k)
        loop_s = time.perf_counter() - t0

        ours_ranks = userlab_ranks(sims_dev, ref_protocol, k)
        same_ranks = all(np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
                         for a, b in zip(ours_ranks, ref_ranks))
        same_metrics = all(abs(float(df.loc[0, key]) - ref[key]) <= 1e-9 for key in METRIC_COLUMNS)
        rows.append({"protocol": protocol, "shape": f"{n} x {k * n}", "userlab_s": min(times),
                     "userlab_all": times, "loop_s": loop_s, "identical": same_ranks and same_metrics,
                     "rsum": float(df.loc[0, "rsum"])})
        print(f"{protocol}: userlab {min(times):.3f} s (runs {', '.join(f'{t:.3f}' for t in times)}), "
              f"loop {loop_s:.1f} s, identical ranks {same_ranks}, identical metrics {same_metrics}")
    load_after = load_text()

    table = ["| protocol | sims | userlab (s, best of runs) | userlab runs (s) | per-query loop (s) "
             "| speed-up | identical ranks & metrics |",
             "|---|---|---:|---|---:|---:|---|"]
    for r in rows:
        table.append(f"| {r['protocol']} | {r['shape']} | {r['userlab_s']:.3f} | "
                     f"{', '.join(f'{t:.2f}' for t in r['userlab_all'])} | {r['loop_s']:.1f} | "
                     f"{r['loop_s'] / r['userlab_s']:.0f}x | {'yes' if r['identical'] else 'NO'} |")
    total_ours = sum(r["userlab_s"] for r in rows)
    total_loop = sum(r["loop_s"] for r in rows)
    table.append(f"| **total** | | {total_ours:.3f} | | {total_loop:.1f} | "
                 f"{total_loop / total_ours:.0f}x | |")
    stamp = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    section = "\n".join(
        [f"## Retrieval evaluation: vectorised ranks vs per-query argsort ({stamp})", ""]
        + machine_lines(device)
        + [f"- load average (1/5/15 min) before: {load_before}; after: {load_after} "
           f"(the CPU is shared with other jobs)",
           f"- command: `python bench/bench_eval.py --images {n} --repeats {args.repeats} "
           f"--device {args.device}`", ""]
        + table + [""])
    print()
    print(section)
    if not args.no_write:
        append_results(section)
    return 0 if all(r["identical"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())

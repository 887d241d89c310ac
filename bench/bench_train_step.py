"""Benchmark: the training step of both backbones (USER and VSE++), lever by lever.

Each lever is added on top of the previous one, starting from the step as userlab ran it before
issue 15 (float32, GPO sorting the strided region axis, a log row with its host syncs every step):

1. ``fp32 (before)``   the old step;
2. ``+ rows when logged``  the Trainer reads numbers back to the host only on logged steps (1 in 10);
3. ``+ GPO contiguous sort``  GPO sorts a contiguous axis and skips masks for full rows;
4. ``+ bf16 autocast``  ``optim.amp=bf16`` (what ``auto`` picks on CPUs with native bf16);
5. ``+ torch.compile``  (only with ``--compile``) the image encoder's SGE and MLP compiled.

The key encoder's forward already runs under ``torch.no_grad()`` (``RetrievalModel._momentum_keys``)
in every variant. Each (size, backbone) runs in its own subprocess per repeat, with a fresh model
per lever and the levers in a rotated order (interleaved); the table gives the median over repeats
of each block's median step time, as **CPU time** of the process (``time.process_time``: with one
torch thread it counts the work of the step, not the time other jobs on a shared machine took the
core) and as wall time, and the peak resident memory sampled during the lever's steps. Sizes: ``issue`` (batch 128, 36 x 2048 regions, embed
1024, queue 2048, the authors' sizes), ``demo`` (the demo preset: 12 x 1280, embed 256, queue 1024)
and ``grid`` (the demo preset on Flickr8k-style 49 x 1280 grid features). Appends a markdown
section to bench/RESULTS.md with the machine and the load average.

    python bench/bench_train_step.py                                  # all sizes, 3 repeats
    python bench/bench_train_step.py --sizes demo,grid --repeats 5
    python bench/bench_train_step.py --device cuda --sizes issue      # a GPU (amp: bf16)
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_eval import append_results, load_text, machine_lines  # noqa: E402

from userlab.config import ExperimentConfig, preset  # noqa: E402
from userlab.models import pooling  # noqa: E402
from userlab.models.user import RetrievalModel  # noqa: E402
from userlab.train import Trainer, amp_dtype, pick_device  # noqa: E402

SIZES = ("issue", "demo", "grid")
LEVERS = ("fp32 (before)", "+ rows when logged", "+ GPO contiguous sort", "+ bf16 autocast",
          "+ torch.compile")
BACKBONES = ("VSE++", "USER")
LOG_EVERY = 10
ORIGINAL_SORT_POOL = pooling.sort_pool


def legacy_sort_pool(features: torch.Tensor, lengths: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """GPO's pooling as before issue 15: masks always, sort along the strided dim 1."""
    valid = pooling.length_mask(lengths, features.shape[1]).unsqueeze(-1)
    ranked = features.masked_fill(~valid, float("-inf")).sort(dim=1, descending=True).values
    ranked = ranked.masked_fill(~valid, 0.0)
    return (ranked * weights.unsqueeze(-1).to(ranked.dtype)).sum(1)


def synthetic_batch(b: int, regions: int, dim: int, vocab: int, length: int, device) -> dict:
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(length // 2, length + 1, (b,), generator=g)
    lengths[0] = length
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


CUSTOM: dict[str, int] = {}   # --regions/--dim/--embed/--queue: the "custom" size (issue size otherwise)


def size_config(size: str, batch: int) -> ExperimentConfig:
    if size == "custom":
        cfg = size_config("issue", batch)
        cfg.model.num_regions = CUSTOM.get("regions", 36)
        cfg.model.region_dim = CUSTOM.get("dim", 2048)
        cfg.model.embed_size = CUSTOM.get("embed", 1024)
        cfg.momentum.queue_size = CUSTOM.get("queue", 2048)
        return cfg
    if size == "issue":
        cfg = ExperimentConfig()
        cfg.model.region_dim, cfg.model.num_regions, cfg.model.embed_size = 2048, 36, 1024
        cfg.model.word_dim, cfg.momentum.queue_size = 300, 2048
    elif size in ("demo", "grid"):
        cfg = preset("demo")
        if size == "grid":
            cfg.model.num_regions = 49
    else:
        raise SystemExit(f"unknown size {size!r} (known: {', '.join(SIZES)})")
    cfg.model.vocab_size = 8000
    cfg.data.batch_size = batch
    return cfg


def size_text(cfg: ExperimentConfig) -> str:
    m = cfg.model
    return (f"batch {cfg.data.batch_size}, {m.num_regions} x {m.region_dim} regions, embed {m.embed_size}, "
            f"queue {cfg.momentum.queue_size}, word dim {m.word_dim}, captions <= 16 tokens")


def stub_trainer(cfg: ExperimentConfig, model: RetrievalModel, device, amp) -> Trainer:
    """A Trainer without data: enough for :meth:`Trainer.train_step`, the code that is timed."""
    trainer = Trainer.__new__(Trainer)
    trainer.cfg, trainer.model, trainer.device = cfg, model, device
    trainer.rank, trainer.world, trainer.step, trainer.epoch = 0, 1, 0, 0
    trainer.amp = amp
    trainer.optimizer = torch.optim.AdamW(
        model.param_groups(cfg.optim.lr, cfg.optim.text_lr_scale, cfg.optim.weight_decay),
        lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    trainer.scaler = torch.amp.GradScaler("cuda", enabled=amp == torch.float16)
    return trainer


def peak_rss_mb() -> float:
    try:
        with open("/proc/self/status", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class RssSampler:
    """Peak VmRSS (MiB) of this process, sampled every 5 ms by a thread while ``with`` is open."""

    def __enter__(self) -> "RssSampler":
        import threading
        self.peak, self._stop = current_rss_mb(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, current_rss_mb())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def current_rss_mb() -> float:
    try:
        with open("/proc/self/statm", encoding="ascii") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, AttributeError):
        return float("nan")


def run_lever(size: str, backbone: str, lever: int, steps: int, warmup: int, batch: int,
              device, gpu_amp: str) -> dict:
    """Time ``steps`` training steps (after ``warmup``) with levers ``0..lever`` switched on."""
    cfg = make(size_config(size, batch), backbone == "USER")
    import userlab.models.pooling as pool_module
    pool_module.sort_pool = legacy_sort_pool if lever < 2 else ORIGINAL_SORT_POOL
    amp = None
    if lever >= 3:
        amp = amp_dtype("bf16" if device.type == "cpu" else gpu_amp, device)
    torch.manual_seed(0)
    model = RetrievalModel(cfg).to(device).train()
    compile_s = None
    if lever >= 4:
        from userlab.accel import compile_dense_parts
        compile_dense_parts(model)
    trainer = stub_trainer(cfg, model, device, amp)
    data = synthetic_batch(batch, cfg.model.num_regions, cfg.model.region_dim, cfg.model.vocab_size, 16, device)
    wall, cpu = [], []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with RssSampler() as rss:
        for i in range(warmup + steps):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t, c = time.perf_counter(), time.process_time()
            trainer.train_step(data, with_row=lever == 0 or i % LOG_EVERY == 0)
            trainer.step += 1
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i == 0 and lever >= 4:
                compile_s = time.perf_counter() - t
            if i >= warmup:
                wall.append(time.perf_counter() - t)
                cpu.append(time.process_time() - c)
    out = {"times": wall, "cpu": cpu, "rss_mb": rss.peak, "compile_s": compile_s}
    if device.type == "cuda":
        out["gpu_peak_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


def run_group(size: str, backbone: str, levers: list[int], rotate: int, steps: int, warmup: int,
              batch: int, device_name: str, gpu_amp: str) -> dict:
    device = pick_device(device_name)
    order = levers[rotate % len(levers):] + levers[:rotate % len(levers)]
    return {str(lever): run_lever(size, backbone, lever, steps, warmup, batch, device, gpu_amp)
            for lever in order}


def spawn_group(args, size: str, backbone: str, levers: list[int], rotate: int) -> dict[int, dict]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", size, backbone,
           ",".join(map(str, levers)), str(rotate),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--batch", str(args.batch),
           "--device", args.device, "--gpu-amp", args.gpu_amp, "--threads", str(args.threads)]
    cmd += [x for k, v in CUSTOM.items() for x in (f"--{k}", str(v))]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise SystemExit(f"group {size}/{backbone} failed:\n{res.stderr[-3000:]}")
    return {int(k): v for k, v in json.loads(res.stdout.strip().splitlines()[-1]).items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="issue,demo,grid", help="comma list of issue, demo, grid, custom")
    for name in ("regions", "dim", "embed", "queue"):
        p.add_argument(f"--{name}", type=int, help=f"custom size: {name} (implies --sizes custom)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=3, help="timed steps per block")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3, help="interleaved repeats of every block")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: fair on a shared machine)")
    p.add_argument("--compile", action="store_true", help="also time torch.compile (slow to compile)")
    p.add_argument("--levers", help="comma list of lever numbers to time (default: all; 0 is always timed)")
    p.add_argument("--device", default="auto")
    p.add_argument("--gpu-amp", default="auto", help="optim.amp on CUDA for the bf16 lever: auto, bf16, fp16")
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--worker", nargs=4, metavar=("SIZE", "BACKBONE", "LEVERS", "ROTATE"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    CUSTOM.update({k: getattr(args, k) for k in ("regions", "dim", "embed", "queue") if getattr(args, k)})
    if CUSTOM and "--sizes" not in (argv if argv is not None else sys.argv):
        args.sizes = "custom"
    if args.worker:
        size, backbone, levers, rotate = args.worker
        print(json.dumps(run_group(size, backbone, [int(x) for x in levers.split(",")], int(rotate),
                                   args.steps, args.warmup, args.batch, args.device, args.gpu_amp)))
        return 0

    device = pick_device(args.device)
    sizes = [s for s in args.sizes.split(",") if s]
    levers = list(range(len(LEVERS) if args.compile else len(LEVERS) - 1))
    if args.levers:
        levers = sorted({0} | {int(x) for x in args.levers.split(",") if x})
    load_before = load_text()
    started = time.perf_counter()
    runs: dict[tuple, list[dict]] = {}
    for rep in range(args.repeats):
        for size in sizes:
            for backbone in BACKBONES:
                group = spawn_group(args, size, backbone, levers, rep)
                for lever in levers:
                    runs.setdefault((size, backbone, lever), []).append(group[lever])
                    print(f"repeat {rep + 1} {size} {backbone} {LEVERS[lever]}: cpu "
                          f"{statistics.median(group[lever]['cpu']):.3f} s/step, wall "
                          f"{statistics.median(group[lever]['times']):.3f}, load {load_text()}", flush=True)
    wall = time.perf_counter() - started
    cmd = (f"python bench/bench_train_step.py --sizes {args.sizes} --steps {args.steps} --warmup {args.warmup} "
           f"--repeats {args.repeats} --threads {args.threads}" + (" --compile" if args.compile else "")
           + (f" --levers {args.levers}" if args.levers else "")
           + (f" --device {args.device}" if args.device != "auto" else "")
           + "".join(f" --{k} {v}" for k, v in CUSTOM.items()))
    lines = [f"## Training step lever by lever, USER and VSE++ ({dt.datetime.now():%Y-%m-%d %H:%M})", "",
             *machine_lines(device),
             f"- CPU bf16: capability {torch.backends.cpu.get_cpu_capability()}, native bf16 "
             f"{__import__('userlab.train', fromlist=['x']).cpu_has_native_bf16()}",
             f"- load average (1/5/15 min) before: {load_before}; after: {load_text()} "
             "(the machine is shared with other jobs; blocks are interleaved)",
             f"- command: `{cmd}` ({wall / 60:.1f} min)",
             f"- per repeat one process per (size, backbone), a fresh model per lever, levers in rotated "
             f"order; {args.warmup} warm-up + {args.steps} timed steps per lever; median over {args.repeats} "
             "repeats of the per-lever medians; CPU = process CPU time per step (1 torch thread), speed-up = "
             "fp32 (before) / lever on CPU time; peak RSS = highest VmRSS sampled during the lever's steps",
             ""]
    for size in sizes:
        lines += [f"### {size}: {size_text(size_config(size, args.batch))}", "",
                  "| backbone | lever (cumulative) | CPU s/step | steps/s (CPU) | speed-up | runs (CPU s/step) "
                  "| wall s/step | peak RSS (MiB) |" + (" compile + 1st step (s) |" if args.compile else ""),
                  "|---|---|---:|---:|---:|---|---:|---:|" + ("---:|" if args.compile else "")]
        for backbone in BACKBONES:
            base = statistics.median(statistics.median(b["cpu"]) for b in runs[(size, backbone, 0)])
            for lever in levers:
                blocks = runs[(size, backbone, lever)]
                med = statistics.median(statistics.median(b["cpu"]) for b in blocks)
                wall_med = statistics.median(statistics.median(b["times"]) for b in blocks)
                row = (f"| {backbone} | {LEVERS[lever]} | {med:.3f} | {1 / med:.2f} | {base / med:.2f}x | "
                       f"{', '.join('%.3f' % statistics.median(b['cpu']) for b in blocks)} | {wall_med:.3f} | "
                       f"{max(b['rss_mb'] for b in blocks):.0f} |")
                if args.compile:
                    cs = [b["compile_s"] for b in blocks if b["compile_s"] is not None]
                    row += f" {statistics.median(cs):.1f} |" if cs else " |"
                lines.append(row)
        user_new = statistics.median(statistics.median(b["cpu"]) for b in runs[(size, "USER", levers[-1])])
        vse_new = statistics.median(statistics.median(b["cpu"]) for b in runs[(size, "VSE++", levers[-1])])
        lines += ["", f"USER / VSE++ CPU time per step with every lever: {user_new / vse_new:.2f}", ""]
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        append_results(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

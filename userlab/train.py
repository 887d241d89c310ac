"""The Trainer: AMP, AdamW with the notes' parameter groups, step decay, clipping, dev
evaluation each epoch, best checkpoint, exact resume, CSV logs, callbacks, and DDP via torchrun.

Typical use (notebook or script)::

    cfg = preset("demo")
    trainer = Trainer(cfg)
    history = trainer.fit()          # pandas DataFrame of dev metrics per epoch

Resume: a Trainer whose ``run_dir`` holds a ``last`` checkpoint continues from it. Batches are
a pure function of ``(seed, epoch)`` and RNG states are saved, so on CPU a run killed at any
point and resumed ends with the same metrics as one never interrupted.

Distributed: ``torchrun --nproc_per_node=N -m userlab train ...`` (gloo on CPU, NCCL on GPU).
Every rank starts from rank 0's weights; gradients are averaged with one all-reduce per step
over a flat buffer; queue keys are gathered from all ranks (``MomentumQueue.enqueue``); only
rank 0 writes logs and checkpoints.
"""
from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import random
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from . import checkpoint as ckpt
from .config import ExperimentConfig
from .data.precomp import collate_batch
from .evaluate import evaluate, move_batch
from .interrupt import TrainingInterrupted, stop_requested
from .collapse_watch import CollapseWatch
from .losses import check_collapse
from .models.boosted import BoostedModel
from .models.user import RetrievalModel, build_model
from .pipeline import DataBundle, EpochBatchSampler, lr_at_epoch, prepare_data


# -- devices, precision, seeds -------------------------------------------------------------------
def pick_device(name: str = "auto") -> torch.device:
    """``auto``: CUDA when present, else CPU (under torchrun: the local rank's GPU)."""
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def amp_dtype(setting: str, device: torch.device) -> Optional[torch.dtype]:
    """Autocast dtype: bf16 where the GPU supports it, else fp16 (with a GradScaler); none on CPU."""
    if setting == "off" or device.type != "cuda":
        return None
    if setting == "bf16" or (setting == "auto" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return torch.float16


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# -- distributed -------------------------------------------------------------------------------
def init_distributed(device: torch.device) -> tuple[int, int]:
    """Join the process group torchrun describes in the environment; ``(rank, world)``."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch.distributed as dist
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size()


def _broadcast_module(module: torch.nn.Module) -> None:
    import torch.distributed as dist
    for tensor in list(module.parameters()) + list(module.buffers()):
        dist.broadcast(tensor.data, src=0)


def _all_reduce_gradients(params: Sequence[torch.nn.Parameter], world: int) -> None:
    import torch.distributed as dist
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset:offset + n].view_as(p).clone()
        offset += n


# -- callbacks ---------------------------------------------------------------------------------
class Callback:
    """Hooks a notebook can implement to draw live curves. All are optional."""

    def on_step(self, trainer: "Trainer", row: dict[str, float]) -> None: ...
    def on_eval(self, trainer: "Trainer", row: dict[str, float]) -> None: ...
    def on_epoch_end(self, trainer: "Trainer") -> None: ...


class CSVLog:
    """Append-only CSV with a fixed header; on resume, rows past the checkpoint are dropped."""

    def __init__(self, path: Path, key: str = "step"):
        self.path, self.key = path, key
        self.fields: Optional[list[str]] = None

    def truncate_after(self, value: float) -> None:
        if not self.path.is_file():
            return
        df = pd.read_csv(self.path)
        df = df[df[self.key] <= value]
        # atomically: a kill during this rewrite must not lose rows that will not be logged again
        from .io import atomic_write_text
        atomic_write_text(self.path, df.to_csv(index=False))
        self.fields = list(df.columns)

    def write(self, row: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        new = not self.path.is_file()
        if self.fields is None:
            self.fields = list(row) if new else pd.read_csv(self.path, nrows=0).columns.tolist()
        with open(self.path, "a", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=self.fields, extrasaction="ignore")
            if new:
                writer.writeheader()
            writer.writerow(row)


# -- the trainer -------------------------------------------------------------------------------
class Trainer:
    """Trains a :class:`RetrievalModel` as the config says.

    Args:
        cfg: experiment config; ``cfg.run_dir`` receives logs and checkpoints.
        data: datasets (default: :func:`prepare_data`).
        model: a model (default: built from the config).
        callbacks: objects with ``on_step`` / ``on_eval`` / ``on_epoch_end``.
        resume: continue from ``run_dir``'s last checkpoint when there is one.
        progress: tqdm progress bars.
        max_steps: stop after this many optimiser steps in total (smoke runs, tests).
        checkpoint_every: also save the ``last`` checkpoint every N steps (0: epoch ends only).
    """

    def __init__(self, cfg: ExperimentConfig, data: Optional[DataBundle] = None,
                 model: Optional[RetrievalModel] = None, callbacks: Iterable[Callback] = (),
                 resume: bool = True, progress: bool = True, max_steps: Optional[int] = None,
                 checkpoint_every: int = 0, tensorboard: bool = False):
        self.cfg = cfg
        self.device = pick_device(cfg.optim.device)
        self.rank, self.world = init_distributed(self.device)
        seed_everything(cfg.optim.seed)
        self.data = data if data is not None else prepare_data(cfg)
        if model is None:
            model = (BoostedModel(cfg, vocab=self.data.vocab) if cfg.boost.schedule in ("online", "momentum")
                     else build_model(cfg, vocab=self.data.vocab))
        self.model = model
        self.model.to(self.device)
        if self.world > 1:
            _broadcast_module(self.model)
        self.optimizer = torch.optim.AdamW(
            self.model.param_groups(cfg.optim.lr, cfg.optim.text_lr_scale, cfg.optim.weight_decay),
            lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
        for group in self.optimizer.param_groups:
            group["base_lr"] = group["lr"]
        self.amp = amp_dtype(cfg.optim.amp, self.device)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp == torch.float16)
        self.callbacks = list(callbacks)
        self.progress = progress and self.rank == 0
        self.max_steps = max_steps
        self.checkpoint_every = checkpoint_every
        self.run_dir = Path(cfg.run_dir)
        self.step = 0
        self.epoch = 0
        self.step_in_epoch = 0
        self.best_rsum = -math.inf
        self.history: list[dict[str, float]] = []
        self.collapse_watch = CollapseWatch(margin=cfg.loss.margin)  # pos ~ neg ~ 1 for many steps
        self.step_log = CSVLog(self.run_dir / "train_log.csv", key="step")
        self.eval_log = CSVLog(self.run_dir / "eval_log.csv", key="epoch")
        self.writer = None
        if tensorboard and self.rank == 0:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(self.run_dir / "tensorboard"))
        if resume:
            self.try_resume()
        elif self.rank == 0:
            # a fresh run in a used folder starts fresh logs (checkpoints are replaced as it goes)
            for log in (self.step_log.path, self.eval_log.path):
                log.unlink(missing_ok=True)

    # -- checkpoints ---------------------------------------------------------------------
    def train_state(self) -> dict[str, Any]:
        return {
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "momentum": self.model.momentum_state(),
            "step": self.step, "epoch": self.epoch, "step_in_epoch": self.step_in_epoch,
            "best_rsum": float(self.best_rsum), "rng": ckpt.rng_state(),
            "world": self.world,
        }

    def save(self, tag: str = "last") -> Optional[Path]:
        if self.rank != 0:
            return None
        vocab = self.data.vocab
        return ckpt.save_checkpoint(
            self.run_dir, tag, self.step, self.model.inference_state(), self.train_state(),
            json.dumps(self.cfg.to_dict(), indent=2, sort_keys=True) + "\n",
            vocab_json=vocab.to_json() if vocab is not None else None)

    def try_resume(self) -> bool:
        """Load ``run_dir``'s last checkpoint if there is one; True when resumed."""
        try:
            folder = ckpt.find_checkpoint(self.run_dir, tag="last")
        except ckpt.CheckpointError:
            # No pointer: a fresh run. A pointer naming a broken folder is an error, not a
            # reason to silently start again over the user's run (crashes never leave one).
            if (self.run_dir / "checkpoints" / "last.txt").is_file():
                raise
            return False
        self.model.load_inference_state(ckpt.load_model_state(folder), folder / ckpt.MODEL_FILE)
        state = ckpt.load_train_state(folder, map_location=self.device)
        try:
            self.model.load_momentum_state(state["momentum"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scaler.load_state_dict(state["scaler"])
            self.step, self.epoch = int(state["step"]), int(state["epoch"])
            self.step_in_epoch, self.best_rsum = int(state["step_in_epoch"]), float(state["best_rsum"])
            ckpt.set_rng_state(state["rng"])
        except (RuntimeError, ValueError, KeyError, TypeError) as exc:
            # e.g. momentum.queue_size changed since the checkpoint: torch's message is many lines
            raise ckpt.CheckpointError(folder / ckpt.STATE_FILE, "does not match this run's config "
                                       f"(changed queue size or optimiser?): {' '.join(str(exc).split())[:300]}"
                                       ) from None
        if self.rank == 0:
            # A step row carries the step count *before* its step, an eval row the epochs done;
            # rows the resumed run will write again must go, or a kill leaves duplicates.
            self.step_log.truncate_after(self.step - 1)
            self.eval_log.truncate_after(self.epoch)
            if self.eval_log.path.is_file():
                self.history = pd.read_csv(self.eval_log.path).to_dict("records")
        return True

    # -- training ------------------------------------------------------------------------
    def _loader(self, epoch: int, skip: int) -> torch.utils.data.DataLoader:
        sampler = EpochBatchSampler(len(self.data.train), self.cfg.data.batch_size, self.cfg.optim.seed,
                                    epoch, self.rank, self.world, skip=skip)
        self.data.train.set_epoch(epoch, self.cfg.optim.seed)
        # An explicit generator keeps the DataLoader from drawing on the global RNG.
        return torch.utils.data.DataLoader(
            self.data.train, batch_sampler=sampler, collate_fn=collate_batch,
            num_workers=self.cfg.data.num_workers, pin_memory=self.device.type == "cuda",
            generator=torch.Generator().manual_seed(epoch), persistent_workers=False)

    def set_lr(self, epoch: int) -> float:
        factor = lr_at_epoch(1.0, epoch, self.cfg.optim.lr_step, self.cfg.optim.lr_decay)
        for group in self.optimizer.param_groups:
            group["lr"] = group["base_lr"] * factor
        return self.optimizer.param_groups[0]["lr"]

    def train_step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        """One optimiser step on a batch (already on the device); returns the logged numbers."""
        self.model.train()
        autocast = (torch.autocast(self.device.type, dtype=self.amp) if self.amp is not None
                    else contextlib.nullcontext())
        with autocast:
            loss, outputs = self.model(batch)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss.total).backward()
        self.scaler.unscale_(self.optimizer)
        params = self.model.query_parameters()
        if self.world > 1:
            _all_reduce_gradients(params, self.world)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.optim.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        sim = outputs["sim"].detach().float()
        check_collapse(sim)
        self.collapse_watch.update(sim, self.step)
        row = {"step": self.step, "epoch": self.epoch, "lr": self.optimizer.param_groups[0]["lr"],
               "loss": float(loss.total.detach()), "grad_norm": float(grad_norm),
               "pos_sim": float(sim.diag().mean()),
               "neg_sim": float((sim.sum() - sim.diag().sum()) / max(1, sim.numel() - sim.shape[0]))}
        row.update({f"loss_{k}": float(v.detach()) for k, v in loss.terms.items()})
        return row

    def evaluate_dev(self) -> dict[str, float]:
        df = evaluate(self.model, self.data.val, protocol="full", device=self.device,
                      batch_size=max(128, self.cfg.data.batch_size), progress=False)
        return {k: float(v) for k, v in df.iloc[0].items() if k != "protocol"}

    def fit(self) -> pd.DataFrame:
        """Train to ``optim.epochs`` (or ``max_steps``); returns dev metrics per epoch."""
        cfg = self.cfg
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            cfg.to_json(self.run_dir / "config.json")
        while self.epoch < cfg.optim.epochs and not self._done():
            epoch = self.epoch
            lr = self.set_lr(epoch)
            self.model.max_violation = cfg.loss.max_violation and epoch >= cfg.loss.warmup_epochs
            loader = self._loader(epoch, self.step_in_epoch)
            bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.optim.epochs}", disable=not self.progress,
                       leave=False, dynamic_ncols=True)
            t0 = time.perf_counter()
            total_steps = cfg.optim.epochs * loader.batch_sampler.batches_per_epoch()
            for batch in bar:
                batch = move_batch(batch, self.device)
                if hasattr(self.model, "set_progress"):
                    self.model.set_progress(self.step, total_steps)
                row = self.train_step(batch)
                self.step += 1
                self.step_in_epoch += 1
                row["time"] = time.perf_counter() - t0
                if self.rank == 0 and (self.step % cfg.log_every == 0 or self.step_in_epoch == 1):
                    self.step_log.write(row)
                    if self.writer is not None:
                        for k, v in row.items():
                            self.writer.add_scalar(f"train/{k}", v, self.step)
                for cb in self.callbacks:
                    cb.on_step(self, row)
                bar.set_postfix(loss=f"{row['loss']:.3f}", lr=f"{lr:.1e}")
                if self.checkpoint_every and self.step % self.checkpoint_every == 0:
                    self.save("last")
                if stop_requested():  # Ctrl-C under `userlab train`: save between steps, stop
                    self.save("last")
                    raise TrainingInterrupted(self.run_dir, self.step, self.epoch)
                if self._done():
                    break
            if self.step_in_epoch < loader.batch_sampler.batches_per_epoch():
                self.save("last")  # stopped by max_steps inside the epoch
                break
            self.epoch += 1
            self.step_in_epoch = 0
            if self.epoch % cfg.eval_every == 0 or self.epoch == cfg.optim.epochs:
                self._evaluate_and_keep_best()
            for cb in self.callbacks:
                cb.on_epoch_end(self)
            self.save("last")
            if stop_requested():
                raise TrainingInterrupted(self.run_dir, self.step, self.epoch)
        return pd.DataFrame(self.history)

    def _done(self) -> bool:
        return self.max_steps is not None and self.step >= self.max_steps

    def _evaluate_and_keep_best(self) -> None:
        metrics = self.evaluate_dev()
        row = {"epoch": self.epoch, "step": self.step, **metrics}
        self.history.append(row)
        if self.rank == 0:
            self.eval_log.write(row)
            if self.writer is not None:
                for k, v in metrics.items():
                    self.writer.add_scalar(f"dev/{k}", v, self.step)
        for cb in self.callbacks:
            cb.on_eval(self, row)
        if metrics["rsum"] > self.best_rsum:
            self.best_rsum = metrics["rsum"]
            self.save("best")


def load_model(path: str | os.PathLike, tag: str = "best", device: Optional[torch.device] = None
               ) -> tuple[RetrievalModel, ExperimentConfig, Any]:
    """Load a trained model for inference from a run folder or checkpoint folder.

    Returns:
        ``(model, cfg, vocab)``; the model is in eval mode on ``device`` (default: auto).
    """
    from .data.text import Vocabulary
    folder = ckpt.find_checkpoint(path, tag=tag)
    cfg = ExperimentConfig.from_json(folder / ckpt.CONFIG_FILE)
    vocab = Vocabulary.load(folder / "vocab.json") if (folder / "vocab.json").is_file() else None
    model = RetrievalModel(cfg, vocab=vocab, with_momentum=False)
    model.load_inference_state(ckpt.load_model_state(folder), folder / ckpt.MODEL_FILE)
    device = device or pick_device(cfg.optim.device)
    return model.to(device).eval(), cfg, vocab

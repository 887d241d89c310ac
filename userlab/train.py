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
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from . import checkpoint as ckpt
from . import fingerprint
from .config import ExperimentConfig, validate
from .data.precomp import collate_batch
from .errors import ConfigError
from .evaluate import evaluate, move_batch
from .guard import FiniteGuard
from .interrupt import TrainingInterrupted, stop_requested
from .collapse_watch import CollapseWatch
from .losses import check_collapse
from .models.boosted import BoostedModel
from .models.user import RetrievalModel, build_model
from .pipeline import DataBundle, EpochBatchSampler, lr_at_epoch, prepare_data
from .devices import check_device
from .runfolder import RunFolderLock, check_resume_config, move_run_aside


# -- devices, precision, seeds -------------------------------------------------------------------
def pick_device(name: str = "auto") -> torch.device:
    """``auto``: CUDA when present, else CPU (under torchrun: the local rank's GPU).

    Raises:
        ConfigError: the named device is not available here (e.g. ``cuda`` without CUDA).
    """
    if name != "auto":
        return check_device(name)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def cpu_has_native_bf16() -> bool:
    """True when this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX-BF16) and oneDNN is on.

    ``torch.backends.cpu.get_cpu_capability()`` says "AVX512" both for CPUs with and without the
    BF16 extension, and oneDNN also runs bf16 on plain AVX512 by emulation (slower than fp32), so
    the CPU flags are read as well (Linux ``/proc/cpuinfo``; elsewhere: False).
    """
    if torch.backends.cpu.get_cpu_capability() not in ("AVX512", "AMX"):
        return False
    if not (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
        return False
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            flags = next((line for line in fh if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def amp_dtype(setting: str, device: torch.device) -> Optional[torch.dtype]:
    """Autocast dtype for ``optim.amp``.

    CUDA: ``auto`` is bf16 where the GPU supports it, else fp16 (with a GradScaler). CPU: ``auto``
    is bf16 on CPUs with native bf16 (:func:`cpu_has_native_bf16`; about 2x faster steps at the
    same dev rSum, bench/RESULTS.md), otherwise off; ``bf16`` forces it; fp16 autocast is refused
    on CPU (slow there, and it would need a GradScaler). Losses always run in float32.
    """
    if setting == "off":
        return None
    if device.type == "cpu":
        if setting == "fp16":
            from .errors import ConfigError
            raise ConfigError("optim.amp", "fp16 autocast needs a CUDA device; use bf16 or off on CPU")
        if setting == "bf16" or (setting == "auto" and cpu_has_native_bf16()):
            return torch.bfloat16
        return None
    if device.type != "cuda":
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


def tensorboard_writer(folder: Path) -> Any:
    """A ``SummaryWriter`` logging into ``folder``; needs the ``tensorboard`` extra.

    Raises:
        ConfigError: tensorboard is not installed (``pip install 'userlab[tensorboard]'``).
    """
    import importlib.util
    if importlib.util.find_spec("tensorboard") is None:
        from .errors import ConfigError
        raise ConfigError("tensorboard", "logging to TensorBoard needs the tensorboard package: "
                                         "pip install 'userlab[tensorboard]'")
    from torch.utils.tensorboard import SummaryWriter
    return SummaryWriter(str(folder))


# -- callbacks ---------------------------------------------------------------------------------
class Callback:
    """Hooks a notebook can implement to draw live curves. All are optional."""

    def on_step(self, trainer: "Trainer", row: dict[str, float]) -> None: ...
    def on_eval(self, trainer: "Trainer", row: dict[str, float]) -> None: ...
    def on_epoch_end(self, trainer: "Trainer") -> None: ...


class PrintDevMetrics(Callback):
    """Callback: one line of dev metrics after each evaluation (rank 0 only)."""

    def on_eval(self, trainer, row) -> None:
        if trainer.rank != 0:
            return
        best = max(trainer.best_rsum, row["rsum"])
        tqdm.write(f"epoch {row['epoch']}/{trainer.cfg.optim.epochs} dev: rSum {row['rsum']:.1f} "
                   f"(best {best:.1f}) | i2t R@1/5/10 {row['i2t_R@1']:.1f}/{row['i2t_R@5']:.1f}/"
                   f"{row['i2t_R@10']:.1f} | t2i R@1/5/10 {row['t2i_R@1']:.1f}/{row['t2i_R@5']:.1f}/"
                   f"{row['t2i_R@10']:.1f}", file=sys.stdout)
        sys.stdout.flush()


class CSVLog:
    """Append-only CSV with a fixed header; on resume, rows past the checkpoint are dropped."""

    def __init__(self, path: Path, key: str = "step"):
        self.path, self.key = path, key
        self.fields: Optional[list[str]] = None

    def _read(self, nrows: Optional[int] = None) -> Optional[pd.DataFrame]:
        """The log as a DataFrame; None when there is none yet. A 0-byte file (a kill between
        creating the file and writing its first row) counts as none; anything else that is not
        this log's CSV is a :class:`DataError` naming the file."""
        from .errors import DataError
        if not self.path.is_file() or self.path.stat().st_size == 0:
            return None
        hint = "move it away (or train with --no-resume, which moves the old run aside)"
        try:
            df = pd.read_csv(self.path, nrows=nrows)
        except UnicodeDecodeError as exc:
            raise DataError(self.path, f"training log is not UTF-8 text (byte {exc.start}); {hint}") from None
        except (pd.errors.ParserError, pd.errors.EmptyDataError, ValueError) as exc:
            raise DataError(self.path, f"training log is not a readable CSV "
                                       f"({' '.join(str(exc).split())[:120]}); {hint}") from None
        if self.key not in df.columns:
            raise DataError(self.path, f"training log has no '{self.key}' column (columns: "
                                       f"{', '.join(map(str, df.columns[:6]))}); {hint}")
        if nrows is None and not pd.api.types.is_numeric_dtype(df[self.key]):
            # a torn last row (a kill mid-write) may be cut anywhere; other junk is an error
            values = pd.to_numeric(df[self.key], errors="coerce")
            if values.iloc[:-1].isna().any():
                raise DataError(self.path, f"training log has non-numeric '{self.key}' values; {hint}")
            df = df[values.notna()].assign(**{self.key: values[values.notna()]})
        return df

    def truncate_after(self, value: float) -> None:
        df = self._read()
        if df is None:
            self.path.unlink(missing_ok=True)
            return
        df = df[df[self.key] <= value]
        # atomically: a kill during this rewrite must not lose rows that will not be logged again
        from .io import atomic_write_text
        atomic_write_text(self.path, df.to_csv(index=False))
        self.fields = list(df.columns)

    def write(self, row: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        new = not self.path.is_file() or self.path.stat().st_size == 0
        if self.fields is None:
            self.fields = list(row) if new else self._read(nrows=0).columns.tolist()
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
        allow_config_change: on resume, apply config fields that differ from the checkpoint's
            (lr, weight decay, clipping, batch size, loss, ...) and record each change in
            ``config_changes.jsonl``; without it such a resume is refused (ConfigError).
        allow_data_mismatch: on resume, continue even when the data or vocabulary differ from
            the checkpoint's fingerprint (recorded in ``config_changes.jsonl`` as well).

    Run folder: the Trainer holds an advisory lock on ``run_dir`` from construction to the end
    of :meth:`fit` (a second Trainer on the folder raises RunLockedError at once). A fresh start
    (``resume=False``) moves an earlier run's files to ``<run_dir>.old-<time>``; nothing is
    deleted. The data fingerprint (:mod:`userlab.fingerprint`) goes to ``run_dir/data.json``
    and into every checkpoint.
    """

    def __init__(self, cfg: ExperimentConfig, data: Optional[DataBundle] = None,
                 model: Optional[RetrievalModel] = None, callbacks: Iterable[Callback] = (),
                 resume: bool = True, progress: bool = True, max_steps: Optional[int] = None,
                 checkpoint_every: int = 0, tensorboard: bool = False,
                 allow_config_change: bool = False, allow_data_mismatch: bool = False):
        self.cfg = validate(cfg)  # configs edited in Python after from_dict are checked too
        self.allow_config_change = allow_config_change
        self.allow_data_mismatch = allow_data_mismatch
        self.resumed_from: Optional[Path] = None
        self.moved_aside: Optional[Path] = None
        self.device = pick_device(cfg.optim.device)
        self.rank, self.world = init_distributed(self.device)
        seed_everything(cfg.optim.seed)
        self.data = data if data is not None else prepare_data(cfg)
        if model is None:
            model = (BoostedModel(cfg, vocab=self.data.vocab) if cfg.boost.schedule in ("online", "momentum")
                     else build_model(cfg, vocab=self.data.vocab))
        self.model = model
        self.model.to(self.device)
        if cfg.optim.compile:
            from .accel import compile_dense_parts
            compile_dense_parts(self.model)
        if self.world > 1:
            _broadcast_module(self.model)
        self.optimizer = torch.optim.AdamW(
            self.model.param_groups(cfg.optim.lr, cfg.optim.text_lr_scale, cfg.optim.weight_decay),
            lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
        for group in self.optimizer.param_groups:
            group["base_lr"] = group["lr"]
        self.amp = amp_dtype(cfg.optim.amp, self.device)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp == torch.float16)
        self.guard = FiniteGuard(cfg.optim.max_nonfinite_steps, self.scaler, self.world, self.amp)
        self.callbacks = list(callbacks)
        # rows are read back to the host (a sync) only when logged or when a callback uses them
        self.callbacks_want_rows = any(getattr(type(cb), "on_step", None) is not Callback.on_step
                                       for cb in self.callbacks)
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
        self._collapse_warned = False
        self.step_log = CSVLog(self.run_dir / "train_log.csv", key="step")
        self.eval_log = CSVLog(self.run_dir / "eval_log.csv", key="epoch")
        self.writer = None
        self.lock = RunFolderLock(self.run_dir)
        self.data_fingerprint: Optional[dict[str, Any]] = None
        if self.rank == 0:
            self.lock.acquire()  # before anything in the folder is read or changed
        try:
            if self.rank == 0:
                self.data_fingerprint = fingerprint.data_fingerprint(self.data.folder, self.data.vocab)
            if resume:
                self.try_resume()
            elif self.rank == 0:
                # a fresh run in a used folder: the old run is moved aside, never deleted
                self.moved_aside = move_run_aside(self.run_dir)
                if self.moved_aside is not None:
                    print(f"--no-resume: moved the previous run in {self.run_dir} to {self.moved_aside}",
                          flush=True)
            if tensorboard and self.rank == 0:
                self.writer = tensorboard_writer(self.run_dir / "tensorboard")
        except BaseException:
            self.lock.release(cleanup=True)  # a run that failed to start leaves no lock file
            raise

    # -- checkpoints ---------------------------------------------------------------------
    def train_state(self) -> dict[str, Any]:
        return {
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "momentum": self.model.momentum_state(),
            "step": self.step, "epoch": self.epoch, "step_in_epoch": self.step_in_epoch,
            "best_rsum": float(self.best_rsum), "rng": ckpt.rng_state(),
            "world": self.world, "guard": self.guard.state_dict(),
        }

    def save(self, tag: str = "last") -> Optional[Path]:
        if self.rank != 0:
            return None
        vocab = self.data.vocab
        extra = {fingerprint.FILE_NAME: fingerprint.to_json(self.data_fingerprint)} if self.data_fingerprint else {}
        return ckpt.save_checkpoint(
            self.run_dir, tag, self.step, self.model.inference_state(), self.train_state(),
            json.dumps(self.cfg.to_dict(), indent=2, sort_keys=True) + "\n",
            vocab_json=vocab.to_json() if vocab is not None else None, extra_files=extra)

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
            self.guard.load_state_dict(state.get("guard", {}))  # absent in older checkpoints
        except (RuntimeError, ValueError, KeyError, TypeError) as exc:
            # e.g. momentum.queue_size changed since the checkpoint: torch's message is many lines
            raise ckpt.CheckpointError(folder / ckpt.STATE_FILE, "does not match this run's config "
                                       f"(changed queue size or optimiser?): {' '.join(str(exc).split())[:300]}"
                                       ) from None
        changes = self._check_resume_identity(folder)
        if changes:
            self._apply_changed_optimiser_settings()
        if self.rank == 0:
            # A step row carries the step count *before* its step, an eval row the epochs done;
            # rows the resumed run will write again must go, or a kill leaves duplicates.
            self.step_log._read(), self.eval_log._read()  # both readable before either is rewritten
            self.step_log.truncate_after(self.step - 1)
            self.eval_log.truncate_after(self.epoch)
            history = self.eval_log._read()
            if history is not None:
                self.history = history.to_dict("records")
            self._record_changes(changes)
            print(f"resumed {self.run_dir} from {folder.name}: step {self.step}, epoch {self.epoch} "
                  f"(+{self.step_in_epoch} steps into epoch {self.epoch + 1}), best dev rSum "
                  f"{self.best_rsum:.2f}", flush=True)
        self.resumed_from = folder
        return True

    def _check_resume_identity(self, folder: Path) -> dict[str, tuple[Any, Any]]:
        """The checkpoint's config, data and vocabulary against this run's; returns the
        accepted differences ``{field: (saved, now)}`` (refused ones raise)."""
        from .errors import DataMismatchError
        config_file = folder / ckpt.CONFIG_FILE
        try:
            saved = json.loads(config_file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ckpt.CheckpointError(config_file, f"not a readable config ({exc})") from None
        if not isinstance(saved, dict):
            raise ckpt.CheckpointError(config_file, "not a config object")
        changes = check_resume_config(saved, self.cfg.to_dict(), config_file, allow=self.allow_config_change)
        vocab_file = folder / ckpt.VOCAB_FILE
        if self.data.vocab is not None and vocab_file.is_file():
            if vocab_file.read_text(encoding="utf-8") != self.data.vocab.to_json():
                if not self.allow_data_mismatch:
                    raise DataMismatchError(vocab_file, "the checkpoint's vocabulary differs from this "
                                            "run's (data vocab.json or data.vocab_path): word ids would "
                                            "silently change meaning. Pass --allow-data-mismatch to resume anyway")
                changes["vocabulary"] = ("checkpoint", "data folder")
        recorded = fingerprint.read_fingerprint(folder)
        if recorded is not None and self.data_fingerprint is not None:
            for split in (self.cfg.data.train_split, self.cfg.data.val_split):
                actual = self.data_fingerprint["splits"].get(split)
                rec = recorded["splits"].get(split)
                diff = fingerprint.differences(rec, actual) if rec and actual else []
                if diff and not self.allow_data_mismatch:
                    raise DataMismatchError(self.data.folder / f"{split}_ims.npy",
                                            f"split '{split}' differs from the one the checkpoint {folder} was "
                                            f"trained on (in {recorded.get('folder')}): {'; '.join(diff[:4])}. "
                                            f"Pass --allow-data-mismatch to resume anyway, or --no-resume")
                if diff:
                    changes[f"data.{split}"] = (recorded.get("folder"), "; ".join(diff[:4]))
        return changes

    def _apply_changed_optimiser_settings(self) -> None:
        """The optimizer state restores the saved lr / weight decay; use this run's config."""
        fresh = self.model.param_groups(self.cfg.optim.lr, self.cfg.optim.text_lr_scale, self.cfg.optim.weight_decay)
        for group, new in zip(self.optimizer.param_groups, fresh):
            group["base_lr"] = group["lr"] = new.get("lr", self.cfg.optim.lr)
            group["weight_decay"] = new.get("weight_decay", self.cfg.optim.weight_decay)

    def _record_changes(self, changes: dict[str, tuple[Any, Any]]) -> None:
        if not changes:
            return
        from .io import atomic_write_text
        path = self.run_dir / "config_changes.jsonl"
        old = path.read_text(encoding="utf-8") if path.is_file() else ""
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        rows = [json.dumps({"time": stamp, "step": self.step, "epoch": self.epoch, "field": k,
                            "saved": v[0], "now": v[1]}, default=str) for k, v in changes.items()]
        atomic_write_text(path, old + "\n".join(rows) + "\n")
        for k, (a, b) in changes.items():
            print(f"resume: {k} changed from {a!r} to {b!r} (applied; recorded in {path})", flush=True)

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

    def train_step(self, batch: dict[str, torch.Tensor], with_row: bool = True
                   ) -> Optional[dict[str, float]]:
        """One optimiser step on a batch (already on the device); returns the logged numbers.

        With ``with_row=False`` no row is made (None): the row's numbers are read back to the
        host in one ``.tolist()``, a sync that stalls a GPU, so :meth:`fit` asks for one only
        when a log row is due or a callback wants it.
        """
        self.model.train()
        self.guard.snapshot(self.model)
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
        if self.guard.is_finite(loss.total, grad_norm, self.step):
            self.scaler.step(self.optimizer)
        else:  # skipped: weights, optimizer moments and buffers stay as before the step
            self.guard.skip(self.model, self.step, loss.total, loss.terms,
                            self.optimizer.param_groups[0]["lr"], self.cfg.optim.grad_clip)
        self.scaler.update()
        if not with_row and not self.guard.last_skipped:  # a skipped step is always logged
            return None
        sim = outputs["sim"].detach().float()
        if not self._collapse_warned:       # once per run: the state persists, the message need not
            self._collapse_warned = check_collapse(sim)
        self.collapse_watch.update(sim, self.step)   # counts the steps that make a row
        diag_sum = sim.diagonal().sum()
        names = list(loss.terms)
        values = torch.stack([t.detach().float().reshape(()) for t in (
            loss.total, grad_norm, diag_sum / sim.shape[0],
            (sim.sum() - diag_sum) / max(1, sim.numel() - sim.shape[0]),
            *(torch.as_tensor(loss.terms[k], device=sim.device) for k in names))]).tolist()
        row = {"step": self.step, "epoch": self.epoch, "lr": self.optimizer.param_groups[0]["lr"],
               "loss": values[0], "grad_norm": values[1], "pos_sim": values[2], "neg_sim": values[3],
               "skipped": self.guard.skipped}
        row.update({f"loss_{k}": v for k, v in zip(names, values[4:])})
        return row

    def evaluate_dev(self) -> dict[str, float]:
        """Dev metrics, plus the dev matrix's spread, collapse score and hubness (``dev_*``)."""
        from .diagnostics import hubness, similarity_stats
        df, sims = evaluate(self.model, self.data.val, protocol="full", device=self.device,
                            batch_size=max(128, self.cfg.data.batch_size), progress=False,
                            return_sims=True)
        row = {k: float(v) for k, v in df.iloc[0].items() if k != "protocol"}
        stats = similarity_stats(sims, margin=self.cfg.loss.margin)
        hub = hubness(sims, k=min(10, sims.shape[0]))
        row.update({"dev_pos_sim": stats["pos_mean"], "dev_neg_sim": stats["neg_mean"],
                    "dev_sim_gap": stats["gap"], "dev_collapse": stats["collapse"],
                    "dev_hub_skew_t2i": hub["t2i"]["skewness"], "dev_hub_skew_i2t": hub["i2t"]["skewness"]})
        return row

    def close(self) -> None:
        """Release the run folder's lock (a Trainer that will not train after all)."""
        self.lock.release()

    def fit(self) -> pd.DataFrame:
        """Train to ``optim.epochs`` (or ``max_steps``); returns dev metrics per epoch."""
        if self.rank == 0:
            self.lock.acquire()  # no-op when still held since construction
        try:
            return self._fit()
        finally:
            self.lock.release()

    def _fit(self) -> pd.DataFrame:
        cfg = self.cfg
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            cfg.to_json(self.run_dir / "config.json")
            if self.data_fingerprint is not None:
                from .io import atomic_write_text
                atomic_write_text(self.run_dir / fingerprint.FILE_NAME, fingerprint.to_json(self.data_fingerprint))
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
                log_due = self.rank == 0 and ((self.step + 1) % cfg.log_every == 0 or self.step_in_epoch == 0)
                row = self.train_step(batch, with_row=log_due or self.callbacks_want_rows)
                self.step += 1
                self.step_in_epoch += 1
                if row is not None:
                    row["time"] = time.perf_counter() - t0
                    if log_due or (self.rank == 0 and self.guard.last_skipped):  # skipped steps always
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
        if self.writer is not None:
            self.writer.flush()
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
        if metrics["rsum"] > self.best_rsum and self.selectable_epoch(self.epoch):
            self.best_rsum = metrics["rsum"]
            self.save("best")

    def selectable_epoch(self, epoch: int) -> bool:
        """May the model after ``epoch`` epochs become ``best``?

        Not during a warm-up that changes the objective (``loss.warmup_epochs`` with the triplet
        loss or DBL): a VSE0 warm-up model often scores higher on dev than the first
        hardest-negative epochs, and choosing it would report a model trained with another loss
        than the one named. A run with no epoch after its warm-up keeps the usual rule.
        """
        cfg = self.cfg
        warm = cfg.loss.warmup_epochs
        changes_objective = cfg.loss.objective == "triplet" or cfg.boost.schedule != "none"
        if warm <= 0 or not changes_objective or cfg.optim.epochs <= warm:
            return True
        return epoch > warm


def load_model(path: str | os.PathLike, tag: str = "best", device: Optional[torch.device] = None
               ) -> tuple[RetrievalModel, ExperimentConfig, Any]:
    """Load a trained model for inference from a run folder or checkpoint folder.

    Returns:
        ``(model, cfg, vocab)``; the model is in eval mode on ``device`` (default: auto).
    """
    from .data.text import Vocabulary
    folder = ckpt.find_checkpoint(path, tag=tag)
    cfg = ExperimentConfig.from_json(folder / ckpt.CONFIG_FILE)
    vocab_file = folder / ckpt.VOCAB_FILE
    vocab = Vocabulary.load(vocab_file) if vocab_file.is_file() else None
    if vocab is None and cfg.model.text_encoder == "gru":
        raise ckpt.CheckpointError(vocab_file, "missing: the checkpoint's GRU text encoder needs the "
                                               "vocabulary it was trained with (every checkpoint userlab "
                                               "writes holds one; copy the whole checkpoint folder)")
    model = RetrievalModel(cfg, vocab=vocab, with_momentum=False)
    model.load_inference_state(ckpt.load_model_state(folder), folder / ckpt.MODEL_FILE)
    if device is None:
        try:
            device = pick_device(cfg.optim.device)
        except ConfigError:  # trained on a device this machine lacks: inference runs anywhere
            device = pick_device("auto")
    return model.to(device).eval(), cfg, vocab

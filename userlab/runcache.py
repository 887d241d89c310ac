"""Checkpoints keyed by their config: reuse a finished run, train only what is missing.

The notebooks ask for models by configuration, not by folder. :func:`fit_cached` looks for a
finished run made with the same configuration (``make demo``'s ``runs/demo_user``, a run an
earlier notebook trained, or ``runs/cache/<key>``) and loads it; only when none exists does it
train, into ``runs/cache/<key>``, resuming a run that was interrupted there.

The key (:func:`config_key`) is a hash of the config dict without what does not change the
weights (``run_dir``, ``log_every``, ``optim.device``, ``data.num_workers``, the
``model.vocab_size`` filled in at training time), with ``data.root`` replaced by the resolved
feature folder and the size and modification time of the files the run reads: rebuilding the
data invalidates the cache, moving the repository does not.

Callbacks that record something during training (:class:`userlab.notebook.MarginRecorder`,
:class:`userlab.notebook.LiveCurves`) may implement ``save(folder)`` and ``load(folder) -> bool``:
their records are saved beside the checkpoint after training and loaded back when the run is
reused. A finished run without a callback's records (``make demo`` records no margins) counts as
missing for that request and is trained again into the cache.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

import pandas as pd

from .config import ExperimentConfig

#: Dotted config fields that do not change what a run learns.
IGNORED_FIELDS = ("run_dir", "log_every", "model.vocab_size", "optim.device", "data.num_workers")
#: Marker a finished cached run carries: the key it was trained for.
MARKER = "cache.json"
#: Folder (inside a run) that holds callbacks' saved records.
RECORDS_DIR = "records"


def _drop(d: dict[str, Any], dotted: str) -> None:
    *parents, last = dotted.split(".")
    for part in parents:
        d = d.get(part, {})
    d.pop(last, None)


def data_fingerprint(cfg: ExperimentConfig, base: Optional[Path] = None) -> dict[str, Any]:
    """Resolved feature folder and ``(size, mtime)`` of the train / dev files a run reads.

    Args:
        base: folder a relative ``data.root`` is relative to (default: the current folder).
    """
    from .data.precomp import find_precomp_dir
    root = Path(cfg.data.root)
    if not root.is_absolute() and base is not None:
        root = Path(base) / root
    try:
        folder = find_precomp_dir(root, cfg.data.name).resolve()
    except Exception:  # data missing: the key still differs from any run made with data
        return {"folder": str(root), "files": None}
    files = {}
    for split in (cfg.data.train_split, cfg.data.val_split):
        for suffix in ("_ims.npy", "_caps.txt", "_guide.npy"):
            path = folder / f"{split}{suffix}"
            if path.is_file():
                stat = path.stat()
                files[path.name] = [stat.st_size, int(stat.st_mtime)]
    # <folder>/vocab.json is built from the train captions on first use (covered above); an
    # explicit vocabulary file is part of what the run learns
    if cfg.data.vocab_path and Path(cfg.data.vocab_path).is_file():
        files["vocab"] = hashlib.sha256(Path(cfg.data.vocab_path).read_bytes()).hexdigest()[:16]
    return {"folder": str(folder), "files": files}


def config_key(cfg: ExperimentConfig, base: Optional[Path] = None) -> str:
    """12 hex digits naming what a run learns: its config (less :data:`IGNORED_FIELDS`) and data."""
    d = json.loads(json.dumps(cfg.to_dict()))
    for name in IGNORED_FIELDS:
        _drop(d, name)
    d["data"]["root"] = data_fingerprint(cfg, base)
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


def is_finished(run_dir: Path, cfg: ExperimentConfig) -> bool:
    """True when ``run_dir`` holds a best checkpoint and a dev evaluation after the last epoch."""
    run_dir = Path(run_dir)
    log = run_dir / "eval_log.csv"
    if not (run_dir / "checkpoints" / "best.txt").is_file() or not log.is_file():
        return False
    try:
        epochs = pd.read_csv(log)["epoch"]
    except (ValueError, KeyError, pd.errors.ParserError):
        return False
    return len(epochs) > 0 and int(epochs.max()) >= cfg.optim.epochs


def candidate_runs(runs_root: Path) -> list[Path]:
    """Run folders that may be reused: ``runs_root/*`` and ``runs_root/cache/*`` with a config."""
    runs_root = Path(runs_root)
    found = []
    for pattern in ("*/config.json", "cache/*/config.json"):
        found += [p.parent for p in sorted(runs_root.glob(pattern))]
    return found


def find_finished_runs(cfg: ExperimentConfig, runs_root: Path, base: Optional[Path] = None) -> list[Path]:
    """Finished runs under ``runs_root`` made with ``cfg`` (same :func:`config_key`)."""
    key = config_key(cfg, base)
    found = []
    for run in candidate_runs(runs_root):
        try:
            saved = ExperimentConfig.from_json(run / "config.json")
        except Exception:  # a foreign or broken config is simply not a match
            continue
        if config_key(saved, base) == key and is_finished(run, cfg):
            found.append(run)
    return found


@dataclass
class CachedRun:
    """A finished run: where it is, whether this call trained it, its dev history.

    Attributes:
        cfg: the requested config, with ``run_dir`` pointing at the run used.
        trained: True when :func:`fit_cached` trained it now; False when it was reused.
        history: dev metrics per epoch (``eval_log.csv``).
    """

    cfg: ExperimentConfig
    run_dir: Path
    trained: bool
    history: pd.DataFrame
    _loaded: dict = field(default_factory=dict, repr=False)

    @property
    def best_rsum(self) -> float:
        return float(self.history["rsum"].max()) if len(self.history) else float("nan")

    def load(self, tag: str = "best", device: Any = None):
        """The run's checkpoint as a :class:`userlab.runs.LoadedRun` (cached per tag)."""
        from .runs import load_run
        if tag not in self._loaded:
            run = load_run(self.run_dir, tag=tag, device=device)
            # a reused run may have been trained from another working folder (make demo's
            # relative "data/demo"); read the data from where the requesting lesson found it
            run.cfg = run.cfg.replace(**{"data.root": self.cfg.data.root})
            self._loaded[tag] = run
        return self._loaded[tag]

    def trainer(self):
        """A :class:`userlab.train.Trainer` restored from the last checkpoint, queues included.

        Nothing is trained; use it to look at training-time state (the momentum queues, the
        optimiser). The run folder is opened read-only: logs are not rewritten.
        """
        import tempfile
        from .train import Trainer
        if "trainer" not in self._loaded:
            # built over an empty scratch folder (a fresh Trainer clears the logs of its folder),
            # then filled from this run's last checkpoint
            scratch = tempfile.mkdtemp(prefix="userlab-trainer-")
            trainer = Trainer(self.cfg.replace(run_dir=scratch), resume=False, progress=False)
            _restore_quietly(trainer, self.run_dir)
            self._loaded["trainer"] = trainer
        return self._loaded["trainer"]


def _restore_quietly(trainer, run_dir: Path) -> None:
    """Load ``run_dir``'s last checkpoint (weights, queues, counters) into ``trainer``."""
    from . import checkpoint as ckpt
    folder = ckpt.find_checkpoint(run_dir, tag="last")
    trainer.model.load_inference_state(ckpt.load_model_state(folder), folder / ckpt.MODEL_FILE)
    state = ckpt.load_train_state(folder, map_location=trainer.device)
    trainer.model.load_momentum_state(state["momentum"])
    trainer.step, trainer.epoch = int(state["step"]), int(state["epoch"])


def _history(run_dir: Path) -> pd.DataFrame:
    log = Path(run_dir) / "eval_log.csv"
    return pd.read_csv(log) if log.is_file() else pd.DataFrame()


def _records_load(callbacks: Iterable[Any], run_dir: Path) -> bool:
    """Load every recording callback's records from ``run_dir``; False if one has none there."""
    ok = True
    for cb in callbacks:
        if hasattr(cb, "load"):
            ok = cb.load(Path(run_dir) / RECORDS_DIR) and ok
    return ok


def fit_cached(cfg: ExperimentConfig, runs_root: str | os.PathLike, callbacks: Iterable[Any] = (),
               progress: bool = True, base: Optional[Path] = None, max_steps: Optional[int] = None
               ) -> CachedRun:
    """Reuse the finished run made with ``cfg``, or train it into ``runs_root/cache/<key>``.

    Args:
        cfg: experiment config (its ``run_dir`` is ignored: the cache decides where).
        runs_root: folder searched for finished runs, and whose ``cache/`` receives new ones.
        callbacks: training callbacks; those with ``save``/``load`` have their records saved
            beside the checkpoint and reloaded on reuse.
        progress: tqdm progress bars while training.
        base: folder a relative ``data.root`` is relative to (the project root).
        max_steps: stop training after this many steps (smoke tests).

    Returns:
        :class:`CachedRun`; ``trained`` says whether anything was trained.
    """
    from .experiment import fit_experiment
    callbacks = list(callbacks)
    runs_root = Path(runs_root)
    key = config_key(cfg, base)
    cache_dir = runs_root / "cache" / key
    for found in find_finished_runs(cfg, runs_root, base):
        if _records_load(callbacks, found):
            return CachedRun(cfg.replace(run_dir=str(found)), found, False, _history(found))
    # Train. A half-finished cached run resumes, unless callbacks must see every epoch (or it
    # finished without the records asked for): then it starts afresh.
    recording = any(hasattr(cb, "save") for cb in callbacks)
    resume = not (recording and (cache_dir / "checkpoints").is_dir())
    run_cfg = cfg.replace(run_dir=str(cache_dir))
    cache_dir.mkdir(parents=True, exist_ok=True)
    (cache_dir / MARKER).unlink(missing_ok=True)
    fit_experiment(run_cfg, callbacks=callbacks, progress=progress, resume=resume, max_steps=max_steps)
    for cb in callbacks:
        if hasattr(cb, "save"):
            cb.save(cache_dir / RECORDS_DIR)
    from .io import atomic_write_text
    atomic_write_text(cache_dir / MARKER, json.dumps({"key": key}) + "\n")
    return CachedRun(run_cfg, cache_dir, True, _history(cache_dir))

"""Run folders: one writer at a time, fresh starts that keep the old run, honest resumes.

* :class:`RunFolderLock` takes an advisory lock (the ``filelock`` package) on
  ``<run_dir>/.userlab.lock``; a second process on the same folder fails at once with
  :class:`~userlab.errors.RunLockedError` naming the folder and the holder (pid, host, start time,
  read from ``.userlab.lock.owner``). The kernel drops the lock when its holder dies, so a killed
  run never blocks the next one.
* :func:`move_run_aside` moves what a previous run left (logs, checkpoints, config) into a
  timestamped sibling folder ``<name>.old-YYYYmmdd-HHMMSS`` instead of deleting it.
* :func:`check_resume_config` compares the config a checkpoint was trained with against the
  config of the resuming run and refuses silent changes to the training recipe.
"""
from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any, Optional

from .errors import ConfigError, RunLockedError

LOCK_NAME = ".userlab.lock"
OWNER_NAME = ".userlab.lock.owner"
#: Names in a run folder that belong to the lock, not to the run (never moved aside).
LOCK_FILES = (LOCK_NAME, OWNER_NAME)

#: Config fields a resumed run may change freely: where things are, how long to train, how
#: often to log, which device. Everything else shapes the optimisation and is compared with
#: the checkpoint's config (data identity is checked by fingerprint, see userlab.fingerprint).
RESUMABLE_CHANGES = frozenset({
    "run_dir", "log_every", "eval_every", "optim.epochs", "optim.device", "data.root",
    "optim.max_nonfinite_steps",
    "data.num_workers", "data.dev_max_images", "data.test_split", "data.vocab_path",
    "model.vocab_size", "model.transformer_path",
})


class RunFolderLock:
    """An advisory, non-blocking lock on a run folder.

    Args:
        run_dir: the run folder (created when missing).

    Use ``acquire()`` / ``release()`` or ``with RunFolderLock(run_dir): ...``. Acquiring twice
    in one object is a no-op; two objects (in one process or two) exclude each other.
    """

    def __init__(self, run_dir: str | os.PathLike):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self.owner_path = self.run_dir / OWNER_NAME
        self._lock = None
        self._created: list[Path] = []

    @property
    def held(self) -> bool:
        return self._lock is not None

    def acquire(self) -> "RunFolderLock":
        """Take the lock or raise :class:`RunLockedError` at once (never waits)."""
        if self._lock is not None:
            return self
        from filelock import FileLock, Timeout
        created = []
        if not self.run_dir.exists():
            created.append(self.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if not self.path.exists():
            created.insert(0, self.path)
        lock = FileLock(str(self.path), timeout=0)
        try:
            lock.acquire()
        except Timeout:
            holder = self.holder()
            if holder and holder.startswith(f"pid {os.getpid()} "):
                holder += (" (this very process: another Trainer on the same folder, e.g. a notebook cell "
                           "run twice; call .close() or .fit() on the first one, or del it)")
            raise RunLockedError(self.run_dir, holder) from None
        self._lock = lock
        self._created = created
        owner = {"pid": os.getpid(), "host": socket.gethostname(),
                 "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        from .io import atomic_write_text
        atomic_write_text(self.owner_path, json.dumps(owner) + "\n")
        return self

    def holder(self) -> Optional[str]:
        """``pid N on HOST since TIME`` of the current holder, when it left its note."""
        try:
            owner = json.loads(self.owner_path.read_text(encoding="utf-8"))
            return f"pid {int(owner['pid'])} on {owner['host']} since {owner['started']}"
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def release(self, cleanup: bool = False) -> None:
        """Drop the lock. ``cleanup``: also remove the lock file (and the run folder) when this
        lock created them and nothing else was written there (a run that failed to start)."""
        if self._lock is None:
            return
        self.owner_path.unlink(missing_ok=True)
        self._lock.release()
        self._lock = None
        if cleanup:
            for path in self._created:
                try:
                    path.rmdir() if path.is_dir() else path.unlink()
                except OSError:
                    pass  # not empty or already gone: keep it
        self._created = []

    def __enter__(self) -> "RunFolderLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def move_run_aside(run_dir: str | os.PathLike, keep: tuple[str, ...] = LOCK_FILES) -> Optional[Path]:
    """Move everything in ``run_dir`` (but ``keep``) into ``<run_dir>.old-<timestamp>``.

    Each entry is moved with one ``os.replace`` (same file system, so nothing is copied): a
    process killed half-way leaves every file either in the old place or the new, never lost.

    Returns:
        The folder the old run now lives in, or None when there was nothing to move.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return None
    entries = sorted(p for p in run_dir.iterdir() if p.name not in keep)
    if not entries:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside = run_dir.with_name(f"{run_dir.name}.old-{stamp}")
    n = 1
    while aside.exists():
        n += 1
        aside = run_dir.with_name(f"{run_dir.name}.old-{stamp}-{n}")
    aside.mkdir(parents=True)
    for entry in entries:
        os.replace(entry, aside / entry.name)
    return aside


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def config_changes(saved: dict[str, Any], current: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{field: (saved, current)}`` for every field that differs and is not resumable."""
    old, new = _flatten(saved), _flatten(current)
    return {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new))
            if k not in RESUMABLE_CHANGES and old.get(k) != new.get(k) and k in old and k in new}


def check_resume_config(saved: dict[str, Any], current: dict[str, Any], source: str | os.PathLike,
                        allow: bool = False) -> dict[str, tuple[Any, Any]]:
    """Refuse a resume whose recipe silently differs from the checkpoint's.

    Args:
        saved: the checkpoint's ``config.json`` as a dict.
        current: the resuming run's config as a dict.
        source: the checkpoint's config file (for the message).
        allow: apply the changes instead (the caller records them).

    Returns:
        The changes (empty when none).

    Raises:
        ConfigError: naming the first changed field, both values, and the two ways out.
    """
    changes = config_changes(saved, current)
    if changes and not allow:
        field, (old, new) = next(iter(changes.items()))
        more = f" (and {len(changes) - 1} more: {', '.join(list(changes)[1:4])})" if len(changes) > 1 else ""
        raise ConfigError(field, f"the checkpoint {source} was trained with {old!r}, this run asks for "
                                 f"{new!r}{more}; resuming would silently change the training recipe. "
                                 f"Pass --allow-config-change (Trainer(allow_config_change=True)) to "
                                 f"apply the new values (recorded in config_changes.jsonl), or "
                                 f"--no-resume to start afresh")
    return changes

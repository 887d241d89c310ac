"""Stop training cleanly on Ctrl-C (SIGINT) or SIGTERM: finish the step, save, say how to resume.

``userlab train`` runs inside :func:`graceful_stop`. The first signal only sets a flag; the
Trainer looks at it after every optimiser step (:func:`stop_requested`), saves its ``last``
checkpoint there and raises :class:`TrainingInterrupted`, which the command line turns into one
line ("rerun the same command to resume"). Stopping between steps, never inside one, keeps the
saved state exactly that of an uninterrupted run at that step, so the resumed run is identical.
A second signal restores the default behaviour and interrupts at once (the previous checkpoint
stays intact: checkpoints are written atomically).

Outside :func:`graceful_stop` (notebooks, scripts) nothing changes: Ctrl-C raises
``KeyboardInterrupt`` as usual.
"""
from __future__ import annotations

import contextlib
import signal
import threading
from pathlib import Path
from typing import Iterator

from .errors import UserlabError

_requested = threading.Event()


class TrainingInterrupted(UserlabError):
    """Training stopped on request after saving a checkpoint it can resume from.

    Args:
        run_dir: the run folder holding ``checkpoints/last``.
        step: optimiser steps done (and saved).
        epoch: epochs completed.
    """

    def __init__(self, run_dir: str | Path, step: int, epoch: int):
        self.run_dir, self.step, self.epoch = str(run_dir), int(step), int(epoch)
        super().__init__(f"interrupted after step {self.step} ({self.epoch} full epoch(s) done); "
                         f"saved {Path(self.run_dir) / 'checkpoints'}: rerun the same command "
                         f"to resume")


def stop_requested() -> bool:
    """True once a stop signal arrived inside :func:`graceful_stop`."""
    return _requested.is_set()


def request_stop() -> None:
    """Ask the running Trainer to stop after its current step (what the signal handler does)."""
    _requested.set()


@contextlib.contextmanager
def graceful_stop(signals: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM)) -> Iterator[None]:
    """Within the block, the first of ``signals`` requests a stop; a second one interrupts.

    Only the main thread can install signal handlers; elsewhere this is a no-op.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in signals}

    def handler(signum, frame):  # noqa: ARG001 - signal handler signature
        if _requested.is_set():
            # second signal: give the user the default behaviour back (KeyboardInterrupt / exit)
            signal.signal(signum, previous.get(signum) or signal.SIG_DFL)
            signal.raise_signal(signum)
            return
        _requested.set()

    _requested.clear()
    for s in signals:
        signal.signal(s, handler)
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)
        _requested.clear()


__all__ = ["TrainingInterrupted", "graceful_stop", "request_stop", "stop_requested"]

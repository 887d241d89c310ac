"""Error types of userlab.

Every error raised for bad input names the file (or config field) and the problem, so a
researcher sees at once what to fix. All derive from :class:`UserlabError`.
"""
from __future__ import annotations

import os


class UserlabError(Exception):
    """Base class of every error userlab raises on purpose."""


class DataError(UserlabError, ValueError):
    """A data file (features, captions, ids, images) is missing or malformed.

    Args:
        path: the offending file or folder.
        problem: what is wrong with it, in words.
    """

    def __init__(self, path: str | os.PathLike | None, problem: str):
        self.path = None if path is None else str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path else problem)


class ConfigError(UserlabError, ValueError):
    """A configuration field is unknown, of the wrong type, or out of range."""

    def __init__(self, field: str, problem: str):
        self.field = field
        self.problem = problem
        super().__init__(f"config field '{field}': {problem}")


class CheckpointError(UserlabError, RuntimeError):
    """A checkpoint is missing, unsafe, or does not match the model."""

    def __init__(self, path: str | os.PathLike | None, problem: str):
        self.path = None if path is None else str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path else problem)


class RunLockedError(UserlabError, RuntimeError):
    """Another process is training in this run folder (the folder's advisory lock is held).

    Args:
        path: the run folder.
        holder: who holds it (``pid N on HOST since TIME``), when known.
    """

    def __init__(self, path: str | os.PathLike, holder: str | None = None):
        self.path = str(path)
        self.holder = holder
        who = f" by {holder}" if holder else " by another process"
        super().__init__(f"{self.path}: run folder is in use{who}; wait for that run to finish, "
                         f"stop it, or choose another --run-dir")


class DataMismatchError(DataError):
    """Data that is well-formed but not the data it should be: a split that differs from the one a
    run was trained beside, runs of an ensemble evaluated on different data, a vocabulary built
    from other captions."""

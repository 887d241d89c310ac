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


class NonFiniteError(UserlabError, FloatingPointError):
    """Training produced NaN/Inf losses or gradients for too many steps in a row.

    Args:
        step: the global step of the last (skipped) non-finite step.
        terms: that step's loss terms (``total`` first), as Python floats.
        consecutive: non-finite steps in a row (the limit, ``optim.max_nonfinite_steps``).
        skipped: non-finite steps skipped in the whole run.
        cause: the likely cause, in words.
    """

    def __init__(self, step: int, terms: dict[str, float], consecutive: int, skipped: int, cause: str):
        self.step, self.terms, self.consecutive, self.skipped, self.cause = step, terms, consecutive, skipped, cause
        shown = ", ".join(f"{k} {v:.4g}" for k, v in terms.items())
        super().__init__(f"training stopped at step {step}: {consecutive} non-finite steps in a row "
                         f"(optim.max_nonfinite_steps; {skipped} skipped in this run, weights unchanged by "
                         f"them). Loss terms at step {step}: {shown}. Likely cause: {cause}")
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


def one_line_warning(message, category, filename, lineno, line=None) -> str:
    """Warnings as ``userlab: <Category>: message`` (no file name and source line of the kit);
    a ``warnings.formatwarning`` for the command line and its worker processes."""
    return f"userlab: {category.__name__}: {message}\n"

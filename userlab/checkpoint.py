"""Checkpoints: written atomically, loaded without unpickling arbitrary objects.

A checkpoint is a folder::

    <run_dir>/checkpoints/<tag>-<step>/
        model.safetensors   the query encoders (what inference and export need)
        config.json         the ExperimentConfig of the run
        state.pt            tensors and plain containers only: optimizer, lr schedule, scaler,
                            momentum encoders, queues (keys, ids, pointer), step, epoch, RNG states
        vocab.json          the word vocabulary, when the text encoder uses one
        data.json           the fingerprint of the data it was trained on (userlab.fingerprint)

The folder is first written under a temporary name and renamed into place; then the small
pointer file ``<run_dir>/checkpoints/<tag>.txt`` is replaced atomically. A checkpoint saved
again at the same step is renamed aside before anything is deleted, with the pointer naming a
complete copy throughout (see :func:`save_checkpoint`). A process killed at any moment therefore
leaves the pointer naming a complete folder (checked by ``tests/test_checkpoint_faults.py``). ``state.pt`` is read with
``torch.load(weights_only=True)``, which refuses pickled code.
"""
from __future__ import annotations

import os
import pickle
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .errors import CheckpointError
from .io import atomic_write_text

MODEL_FILE = "model.safetensors"
STATE_FILE = "state.pt"
CONFIG_FILE = "config.json"
VOCAB_FILE = "vocab.json"


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch RNG states as tensors / plain containers (weights_only-safe)."""
    np_state = np.random.get_state()
    state = {
        "python": _python_state_to_list(random.getstate()),
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    random.setstate(_python_state_from_list(state["python"]))
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _python_state_to_list(state: tuple) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _python_state_from_list(state: list) -> tuple:
    version, internal, gauss = state
    return (version, tuple(internal), gauss)


def save_checkpoint(run_dir: str | os.PathLike, tag: str, step: int, model_state: dict[str, torch.Tensor],
                    train_state: dict[str, Any], config_json: str, vocab_json: Optional[str] = None,
                    keep: int = 1, extra_files: Optional[dict[str, str]] = None) -> Path:
    """Write a checkpoint folder atomically and point ``<tag>.txt`` at it.

    The pointer names a complete folder at every moment (``tests/test_checkpoint_faults.py``
    kills the process before each file-system operation and checks this):

    1. the new checkpoint is written and fsynced under a hidden temporary name;
    2. fresh step: the folder is renamed to ``<tag>-<step>``, then the pointer switches to it;
    3. same step saved again (``<tag>-<step>`` exists and may be the one pointed at): the pointer
       first switches to the complete temporary folder, the old folder is *renamed* aside, a
       hard-linked twin of the new one is renamed into its place, the pointer switches back to
       the stable name, and only then is anything deleted.

    Args:
        run_dir: the run's folder.
        tag: ``"last"`` or ``"best"`` (any word).
        step: global step, part of the folder name.
        model_state: flat ``{name: tensor}`` of the query encoders.
        train_state: everything else (tensors and plain containers only).
        config_json: the run's config as JSON text.
        vocab_json: the vocabulary as JSON text, if any.
        keep: how many folders of this tag to keep (older ones are removed after the switch).
        extra_files: more small text files for the folder, ``{name: text}`` (e.g. the data
            fingerprint).

    Returns:
        The checkpoint folder.

    Raises:
        CheckpointError: a tensor holds NaN/Inf; nothing is written, the pointer and the
            existing (finite) checkpoints stay as they were.
        CheckpointError: the disk refused a write (full, read-only, permissions); the previous
            checkpoint and its pointer are left as they were.
    """
    refuse_nonfinite(Path(run_dir) / "checkpoints" / f"{tag}-{step:08d}", model_state, train_state)
    root = Path(run_dir) / "checkpoints"
    final = root / f"{tag}-{step:08d}"
    pointer = root / f"{tag}.txt"
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{tag}-", dir=root))
        try:
            _write_folder(tmp, model_state, train_state, config_json, vocab_json, extra_files or {})
            if not final.exists():
                os.replace(tmp, final)
                _fsync_dir(root)
            else:
                _replace_pointed_folder(root, tmp, final, pointer, tag)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        atomic_write_text(pointer, final.name + "\n")
    except OSError as exc:
        where = exc.filename or root
        raise CheckpointError(where, f"could not write the {tag} checkpoint of step {step}: "
                                     f"{exc.strerror or exc} (disk full or not writable?); the "
                                     f"previous {tag} checkpoint is intact") from None
    # temporary pointer files of a save that was killed while writing the pointer
    for stale in root.glob(f".{pointer.name}.*.tmp"):
        stale.unlink(missing_ok=True)
    _prune(root, tag, keep, current=final.name)
    return final


def refuse_nonfinite(folder: Path, model_state: dict[str, torch.Tensor], train_state: dict[str, Any]) -> None:
    """Raise CheckpointError, before anything is written, if a tensor to be saved holds NaN/Inf.

    Because no non-finite checkpoint is ever written, :func:`_prune` (which only removes folders
    older than the one just written) can never remove the last finite checkpoint."""
    from .guard import first_nonfinite
    for label, state in ((MODEL_FILE, model_state), (STATE_FILE, train_state)):
        count, name = first_nonfinite(state)
        if count:
            raise CheckpointError(folder, f"refusing to write a checkpoint with non-finite values: {count} "
                                          f"tensor(s) of {label} hold NaN or Inf (e.g. {name}); the last "
                                          "finite checkpoint is kept")
def _write_folder(folder: Path, model_state: dict[str, torch.Tensor], train_state: dict[str, Any],
                  config_json: str, vocab_json: Optional[str], extra_files: dict[str, str]) -> None:
    # safetensors refuses shared storage; contiguous copies make every tensor its own.
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model_state.items()}
    save_file(tensors, str(folder / MODEL_FILE))
    torch.save(train_state, folder / STATE_FILE)
    (folder / CONFIG_FILE).write_text(config_json, encoding="utf-8")
    if vocab_json is not None:
        (folder / VOCAB_FILE).write_text(vocab_json, encoding="utf-8")
    for name, text in extra_files.items():
        (folder / name).write_text(text, encoding="utf-8")
    for name in os.listdir(folder):
        with open(folder / name, "rb") as fh:
            os.fsync(fh.fileno())


def _replace_pointed_folder(root: Path, tmp: Path, final: Path, pointer: Path, tag: str) -> None:
    """Put the complete folder ``tmp`` at ``final`` (which exists) without a moment in which the
    pointer names nothing: rename before delete, and re-point before each rename."""
    atomic_write_text(pointer, tmp.name + "\n")          # names the new, complete folder
    trash = Path(tempfile.mkdtemp(prefix=f".{tag}-old-", dir=root))
    os.replace(final, trash / final.name)                 # the old folder: renamed, not deleted
    twin = Path(tempfile.mkdtemp(prefix=f".{tag}-", dir=root))
    for name in os.listdir(tmp):                          # a second name for the same files
        try:
            os.link(tmp / name, twin / name)
        except OSError:  # file systems without hard links
            shutil.copy2(tmp / name, twin / name)
    os.replace(twin, final)
    _fsync_dir(root)
    atomic_write_text(pointer, final.name + "\n")
    shutil.rmtree(trash)
    shutil.rmtree(tmp)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _prune(root: Path, tag: str, keep: int, current: str) -> None:
    # ``current`` passed refuse_nonfinite, so removing older folders never loses the last finite one
    folders = sorted(p for p in root.glob(f"{tag}-*") if p.is_dir() and p.name != current)
    for old in folders[: max(0, len(folders) - (keep - 1))]:
        shutil.rmtree(old, ignore_errors=True)
    # half-written ``.{tag}-XXXX`` folders of a process killed while saving (never pointed at)
    for stale in root.glob(f".{tag}-*"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)


def find_checkpoint(path: str | os.PathLike, tag: str = "best") -> Path:
    """Resolve a run folder, a checkpoints folder or a checkpoint folder to a checkpoint folder.

    Raises:
        CheckpointError: nothing loadable there (names the path and what was looked for).
    """
    path = Path(path)
    if (path / MODEL_FILE).is_file():
        return path
    for root in (path / "checkpoints", path):
        pointer = root / f"{tag}.txt"
        if pointer.is_file():
            folder = root / read_pointer(pointer)
            if (folder / MODEL_FILE).is_file():
                return folder
            raise CheckpointError(pointer, f"points at {folder.name}, which has no {MODEL_FILE}")
    if not path.exists():
        raise CheckpointError(path, "no such file or folder")
    raise CheckpointError(path, f"no checkpoint here: expected {MODEL_FILE} or checkpoints/{tag}.txt")


def read_pointer(pointer: Path) -> str:
    """The folder name a ``<tag>.txt`` pointer holds, checked to be a plain name in its folder."""
    try:
        name = pointer.read_bytes().decode("utf-8").strip()
    except UnicodeDecodeError as exc:
        raise CheckpointError(pointer, f"is not UTF-8 text (byte {exc.start}); it should hold the "
                                       "name of a checkpoint folder such as last-00000100") from None
    except OSError as exc:
        raise CheckpointError(pointer, f"cannot be read ({exc.strerror or exc})") from None
    if not name or "\n" in name or "/" in name or "\\" in name or name in (".", ".."):
        shown = name if len(name) <= 60 else name[:57] + "..."
        raise CheckpointError(pointer, f"should hold one checkpoint folder name (e.g. last-00000100) "
                                       f"in {pointer.parent}, holds {shown!r}")
    return name


def load_model_state(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read ``model.safetensors`` from a checkpoint folder."""
    file = Path(folder) / MODEL_FILE
    if not file.is_file():
        raise CheckpointError(file, "missing")
    try:
        return load_file(str(file))
    except Exception as exc:  # safetensors raises its own error types on torn files
        raise CheckpointError(file, f"not a readable safetensors file ({exc})") from None


def load_train_state(folder: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read ``state.pt`` with ``weights_only=True``: pickled code is refused, never run."""
    file = Path(folder) / STATE_FILE
    if not file.is_file():
        raise CheckpointError(file, "missing")
    try:
        return torch.load(file, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(file, "refused: it holds pickled objects other than tensors and "
                                    f"plain containers, which userlab never writes ({exc})".splitlines()[0]) from None
    except (RuntimeError, EOFError, OSError) as exc:
        raise CheckpointError(file, f"not a readable checkpoint state ({exc})".splitlines()[0]) from None


def load_state_dict_checked(module: torch.nn.Module, state: dict[str, torch.Tensor], source: str | os.PathLike) -> None:
    """``module.load_state_dict`` with a message that names the file and the mismatching tensors."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        parts = []
        if wrong:
            k = wrong[0]
            parts.append(f"{len(wrong)} tensors of the wrong shape (e.g. {k}: file {tuple(state[k].shape)}, "
                         f"model {tuple(own[k].shape)})")
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        raise CheckpointError(source, "does not match the model: " + "; ".join(parts)
                              + ". Was it trained with a different model variant or config?")
    module.load_state_dict(state)

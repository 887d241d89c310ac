"""Fault injection: kill the process before every file-system operation of ``save_checkpoint``.

The file-system operations are enumerated, not listed by hand: a counting run wraps every
function through which Python touches the disk (``os.*``, ``shutil.*``, ``tempfile.*``,
``open``, ``Path.write_*``, ``torch.save`` and safetensors' ``save_file``) and records each call,
nested calls included (the unlinks inside ``shutil.rmtree``, the ``os.open`` inside
``mkstemp``). Then, for every ``k``, a forked child runs the same save and dies with
``os._exit`` right before operation ``k`` (no ``finally``, no cleanup: a real kill). The parent
checks that the pointer names a complete, loadable checkpoint holding either the old or the new
weights, and that the next save succeeds and cleans up.
"""
from __future__ import annotations

import builtins
import os
import pathlib
import shutil
import tempfile

import pytest
import torch

from userlab import checkpoint as ckpt

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")

#: (owner, attribute) of every function wrapped; the enumeration counts calls through them.
FS_FUNCTIONS = [(os, name) for name in ("replace", "rename", "link", "mkdir", "makedirs", "unlink", "remove",
                                        "rmdir", "fsync", "open", "chmod", "truncate", "ftruncate")]
FS_FUNCTIONS += [(shutil, "rmtree"), (shutil, "copy2"), (shutil, "copyfile"), (tempfile, "mkdtemp"),
                 (tempfile, "mkstemp"), (builtins, "open"), (pathlib.Path, "write_text"),
                 (pathlib.Path, "write_bytes"), (torch, "save"), (ckpt, "save_file")]


class _Hooks:
    """Wrap every FS function; ``on_call(name)`` runs before each call."""

    def __init__(self, on_call):
        self.on_call = on_call
        self.saved = []

    def __enter__(self):
        for owner, name in FS_FUNCTIONS:
            original = getattr(owner, name)
            self.saved.append((owner, name, original))
            setattr(owner, name, self._wrap(f"{getattr(owner, '__name__', owner)}.{name}", original))
        return self

    def _wrap(self, label, original):
        on_call = self.on_call

        def wrapper(*args, **kwargs):
            on_call(label)
            return original(*args, **kwargs)
        return wrapper

    def __exit__(self, *exc):
        for owner, name, original in reversed(self.saved):
            setattr(owner, name, original)


def _weights(value: float) -> dict[str, torch.Tensor]:
    return {"w": torch.full((3, 4), value), "b": torch.full((4,), value)}


def _save(run, step: int, value: float, tag: str = "last"):
    return ckpt.save_checkpoint(run, tag, step, _weights(value), {"step": step, "value": value},
                                '{"run": 1}\n', vocab_json='{"idx2word": []}\n',
                                extra_files={"data.json": '{"splits": {}}\n'})


def _enumerate(run, step: int, value: float) -> list[str]:
    calls: list[str] = []
    with _Hooks(calls.append):
        _save(run, step, value)
    return calls


def _killed_save(run, step: int, value: float, kill_at: int) -> int:
    """Fork; the child saves and dies right before FS operation ``kill_at``; exit status."""
    pid = os.fork()
    if pid == 0:  # child
        count = [0]

        def on_call(label):
            if count[0] == kill_at:
                os._exit(77)
            count[0] += 1
        try:
            with _Hooks(on_call):
                _save(run, step, value)
        except BaseException:
            os._exit(3)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def _pointed(run, tag: str = "last") -> tuple[float, int]:
    """Load what the pointer names, completely; ``(weight value, step)``."""
    folder = ckpt.find_checkpoint(run, tag)
    weights = ckpt.load_model_state(folder)
    state = ckpt.load_train_state(folder)
    assert (folder / ckpt.CONFIG_FILE).read_text() == '{"run": 1}\n'
    assert (folder / ckpt.VOCAB_FILE).read_text() == '{"idx2word": []}\n'
    assert (folder / "data.json").read_text() == '{"splits": {}}\n'
    value = float(weights["w"][0, 0])
    assert torch.equal(weights["w"], torch.full((3, 4), value))
    assert torch.equal(weights["b"], torch.full((4,), value))
    assert state["value"] == value
    return value, int(state["step"])


def _leftovers(run) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").iterdir())


@pytest.mark.parametrize("scenario", ["fresh_step", "same_step"])
def test_kill_before_every_fs_operation_leaves_pointer_on_a_complete_checkpoint(tmp_path, scenario):
    """fresh_step: ``last`` is at step 1 (weights 1.0); step 2 (weights 2.0) is saved.
    same_step: ``last`` is at step 2 (weights 1.0); step 2 is saved again (weights 2.0)."""
    new_step = 2
    old_step = 1 if scenario == "fresh_step" else 2
    probe = tmp_path / "probe"
    _save(probe, old_step, 1.0)
    ops = _enumerate(probe, new_step, 2.0)
    assert _pointed(probe) == (2.0, 2)
    n = len(ops)
    # every kind of operation the save performs shows up (so every gap is covered)
    kinds = {op.split(".")[-1] for op in ops}
    assert {"mkdtemp", "save_file", "save", "write_text", "fsync", "replace"} <= kinds, kinds
    if scenario == "same_step":
        assert {"link", "rmtree"} <= kinds, kinds
    outcomes = {"old": 0, "new": 0}
    for k in range(n + 1):
        run = tmp_path / f"k{k}"
        _save(run, old_step, 1.0)
        code = _killed_save(run, new_step, 2.0, kill_at=k)
        assert code == (77 if k < n else 0), f"kill point {k}/{n} ({ops[k] if k < n else 'none'}): exit {code}"
        value, step = _pointed(run)  # raises if the pointer names anything incomplete
        assert (value, step) in ((1.0, old_step), (2.0, new_step)), (k, value, step)
        outcomes["old" if value == 1.0 else "new"] += 1
        # the next save works and cleans up whatever the killed one left
        _save(run, 3, 3.0)
        assert _pointed(run) == (3.0, 3)
        assert _leftovers(run) == ["last-00000003", "last.txt"], (k, _leftovers(run))
    # the kill points straddle the switch: some leave the old checkpoint, the rest the new one
    assert outcomes["old"] >= 1 and outcomes["new"] >= 1, outcomes
    print(f"{scenario}: {n} fs operations, {n + 1} kill points, outcomes {outcomes}")


def test_same_step_resave_renames_before_it_deletes(tmp_path):
    """The old folder at the same step is renamed aside, never deleted while pointed at."""
    _save(tmp_path, 2, 1.0)
    log: list[str] = []
    real_rmtree, real_replace = shutil.rmtree, os.replace
    pointer = tmp_path / "checkpoints" / "last.txt"

    def rmtree(path, *a, **k):
        log.append(f"rmtree {pathlib.Path(path).name} while pointer={pointer.read_text().strip()}")
        return real_rmtree(path, *a, **k)

    def replace(src, dst, *a, **k):
        log.append(f"replace {pathlib.Path(src).name}->{pathlib.Path(dst).name}")
        return real_replace(src, dst, *a, **k)
    shutil.rmtree, os.replace = rmtree, replace
    try:
        _save(tmp_path, 2, 2.0)
    finally:
        shutil.rmtree, os.replace = real_rmtree, real_replace
    assert _pointed(tmp_path) == (2.0, 2)
    renames = [e for e in log if e.startswith("replace") and "last-00000002" in e.split("->")[0]]
    assert renames, log  # the old last-00000002 was renamed ...
    first_rename = log.index(renames[0])
    deletes = [k for k, e in enumerate(log) if e.startswith("rmtree")]
    assert deletes and min(deletes) > first_rename, log  # ... before anything was deleted
    assert all("pointer=last-00000002" in log[k] for k in deletes), log


def test_disk_full_during_save_is_a_checkpoint_error_and_keeps_the_old_one(tmp_path, monkeypatch):
    import errno
    _save(tmp_path, 1, 1.0)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(args[-1]))
    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(ckpt.CheckpointError, match=r"could not write the last checkpoint of step 2: "
                                                   r"No space left on device"):
        _save(tmp_path, 2, 2.0)
    assert _pointed(tmp_path) == (1.0, 1)
    assert _leftovers(tmp_path) == ["last-00000001", "last.txt"]

import os
import pickle
import random

import numpy as np
import pytest
import torch

from userlab import checkpoint as ckpt
from userlab.errors import CheckpointError
from userlab.io import atomic_save_npy, atomic_write_text


def _save(tmp_path, step=3, tag="last", **extra):
    model = {"w": torch.arange(6.0).view(2, 3), "b": torch.zeros(2)}
    state = {"step": step, "optimizer": {"state": {}, "param_groups": [{"lr": 0.1}]},
             "rng": ckpt.rng_state(), **extra}
    return ckpt.save_checkpoint(tmp_path, tag, step, model, state, '{"a": 1}\n')


def test_round_trip_and_pointer(tmp_path):
    folder = _save(tmp_path)
    assert ckpt.find_checkpoint(tmp_path, "last") == folder
    assert ckpt.find_checkpoint(folder) == folder
    state = ckpt.load_model_state(folder)
    assert torch.equal(state["w"], torch.arange(6.0).view(2, 3))
    train = ckpt.load_train_state(folder)
    assert train["step"] == 3 and train["optimizer"]["param_groups"][0]["lr"] == 0.1


def test_old_folders_are_pruned(tmp_path):
    _save(tmp_path, step=1)
    newest = _save(tmp_path, step=2)
    folders = sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.is_dir())
    assert folders == [newest.name]


def test_rng_state_round_trip():
    random.seed(5); np.random.seed(5); torch.manual_seed(5)
    state = ckpt.rng_state()
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    ckpt.set_rng_state(state)
    b = (random.random(), np.random.rand(), torch.rand(1).item())
    assert a == b


class _Planted:
    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def test_pickled_code_is_refused_and_never_runs(tmp_path):
    folder = _save(tmp_path)
    target = tmp_path / "pwned"
    planted = _Planted()
    planted.target = target
    with open(folder / ckpt.STATE_FILE, "wb") as fh:
        pickle.dump({"step": planted}, fh)
    with pytest.raises(CheckpointError, match="state.pt"):
        ckpt.load_train_state(folder)
    assert not target.exists()


def test_missing_and_torn_files(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        ckpt.find_checkpoint(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="no checkpoint here"):
        ckpt.find_checkpoint(tmp_path)
    folder = _save(tmp_path)
    data = (folder / ckpt.MODEL_FILE).read_bytes()
    (folder / ckpt.MODEL_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="safetensors"):
        ckpt.load_model_state(folder)


def test_shape_mismatch_names_tensor(tmp_path):
    module = torch.nn.Linear(3, 2)
    bad = {"weight": torch.zeros(4, 3), "bias": torch.zeros(2)}
    with pytest.raises(CheckpointError, match=r"weight: file \(4, 3\), model \(2, 3\)"):
        ckpt.load_state_dict_checked(module, bad, "x.safetensors")
    with pytest.raises(CheckpointError, match="missing"):
        ckpt.load_state_dict_checked(module, {"weight": torch.zeros(2, 3)}, "x.safetensors")


def test_atomic_writers_leave_no_temp_files(tmp_path):
    atomic_write_text(tmp_path / "a.txt", "hello")
    atomic_save_npy(tmp_path / "a.npy", np.arange(4))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npy", "a.txt"]
    assert np.load(tmp_path / "a.npy").tolist() == [0, 1, 2, 3]

    class Boom(Exception):
        pass

    from userlab.io import atomic_path
    with pytest.raises(Boom):
        with atomic_path(tmp_path / "b.txt") as tmp:
            tmp.write_text("partial")
            raise Boom()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npy", "a.txt"]

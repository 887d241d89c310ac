"""Crash safety: SIGKILL at random points never leaves a torn file, and a rerun ends the same.

Two writers are killed over and over:

* feature extraction (``userlab.data.features.extract_folder`` on 12 small generated images, in
  a subprocess), both by an outside SIGKILL after a random delay and by a SIGKILL the child sends
  itself right after its k-th ``fsync`` or ``os.replace`` (k random), which lands inside the
  write sequence that a timer almost never hits;
* training (``python -m userlab train --config ... --checkpoint-every 1``), by an outside SIGKILL
  at a random moment after the first checkpoint.

After every kill each file present must be whole: every ``.npy`` loads, every checkpoint folder
named by a pointer loads with ``load_model_state`` / ``load_train_state``, a split whose
``_ims.npy`` exists opens and validates, and anything else is a temporary name (``.*.tmp``
files, ``.last-*`` folders) that readers ignore and the next successful write removes. The rerun
must then give exactly what an uninterrupted run gives.
"""
from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from tiny import tiny_config, tiny_data
from userlab import checkpoint as ckpt
from userlab.config import ExperimentConfig
from userlab.data.precomp import PrecompDataset

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}", "OMP_NUM_THREADS": "1",
       "HF_HUB_OFFLINE": "1"}
ROUNDS = 3


pytestmark = pytest.mark.usefixtures("one_thread")

SHORT = {"optim.epochs": 2, "optim.lr_step": 1}
TMP_NAME = re.compile(r"^\..+\.tmp$")          # userlab.io.atomic_path temporaries
SPLIT_FILES = ("train_ims.npy", "train_caps.txt", "train_ids.txt", "train_guide.npy",
               "train_boxes.npy", "train_images.txt")

# The child: extract a folder; optionally SIGKILL itself right after the k-th fsync / replace.
EXTRACT_CHILD = r"""
import os, signal, sys
images, out, mode, k = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
if mode in ("fsync", "replace"):
    real = getattr(os, mode)
    calls = [0]
    def patched(*args, **kwargs):
        result = real(*args, **kwargs)
        calls[0] += 1
        if calls[0] == k:
            os.kill(os.getpid(), signal.SIGKILL)
        return result
    setattr(os, mode, patched)
from userlab.data.features import extract_folder
extract_folder(images, os.path.join(images, "captions.txt"), out, device="cpu", progress=False,
               input_size=64, batch_size=2)
"""


# ---------------------------------------------------------------------------------------------
# Feature extraction
# ---------------------------------------------------------------------------------------------
def _images(folder: Path, n: int = 12) -> Path:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    lines = []
    for i in range(n):
        small = Image.fromarray(rng.integers(0, 256, (3, 4, 3), dtype=np.uint8))
        small.resize((40 + i, 32), Image.BILINEAR).save(folder / f"im{i:02d}.jpg")
        lines += [f"im{i:02d}.jpg\tpicture {i} caption {j}" for j in range(5)]
    (folder / "captions.txt").write_text("\n".join(lines) + "\n")
    return folder


def _extract(images: Path, out: Path, mode: str = "none", k: int = 0) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", EXTRACT_CHILD, str(images), str(out), mode, str(k)],
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def check_extract_output(out: Path) -> set[str]:
    """Every file in ``out`` is whole or a temporary; returns the final names present."""
    if not out.exists():
        return set()
    finals = set()
    for p in out.iterdir():
        if TMP_NAME.match(p.name):
            continue
        assert p.name in SPLIT_FILES, f"unexpected file {p.name}"
        finals.add(p.name)
        if p.suffix == ".npy":
            arr = np.load(p, allow_pickle=False)          # whole file read: torn files fail here
            assert np.isfinite(arr).all()
    if "train_ims.npy" in finals:
        # features are written last: once they exist the whole split is there and consistent
        assert finals == set(SPLIT_FILES), finals
        ds = PrecompDataset(out, "train", full_check=True)
        assert ds.num_images == 12
    return finals


@pytest.mark.slow  # ~8 subprocesses
def test_extraction_killed_at_random_points_then_rerun_matches(tmp_path):
    images = _images(tmp_path / "images")
    clean = tmp_path / "clean"
    t0 = time.perf_counter()
    proc = _extract(images, clean)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err.decode()
    duration = time.perf_counter() - t0
    reference = {name: (clean / name).read_bytes() for name in SPLIT_FILES if not name.endswith(".npy")}
    arrays = {name: np.load(clean / name) for name in SPLIT_FILES if name.endswith(".npy")}

    out = tmp_path / "killed"
    rng = random.Random(7)
    kills = []
    # outside kills at random moments (mostly during import/compute), then kills placed inside
    # the write sequence: 6 files -> 6 fsyncs and 6 replaces
    plans = [("timer", rng.uniform(0.3, 1.0) * duration) for _ in range(ROUNDS)]
    plans += [("fsync", rng.randint(1, 6)), ("replace", rng.randint(1, 5)), ("replace", 6)]
    for mode, arg in plans:
        if mode == "timer":
            proc = _extract(images, out)
            try:
                proc.wait(timeout=arg)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
            proc.wait()
        else:
            proc = _extract(images, out, mode, int(arg))
            proc.wait(timeout=300)
        kills.append((mode, arg, proc.returncode))
        check_extract_output(out)
    assert sum(rc == -signal.SIGKILL for _, _, rc in kills) >= 4, kills
    # a kill right after the 6th replace left a complete split; some round left temporaries
    proc = _extract(images, out)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err.decode()
    assert check_extract_output(out) == set(SPLIT_FILES)
    assert sorted(p.name for p in out.iterdir()) == sorted(SPLIT_FILES), "temporaries left behind"
    for name, data in reference.items():
        assert (out / name).read_bytes() == data, name
    for name, arr in arrays.items():
        np.testing.assert_array_equal(np.load(out / name), arr, err_msg=name)


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------
def _train(cfg_path: Path) -> list[str]:
    return [sys.executable, "-m", "userlab", "train", "--config", str(cfg_path), "--no-progress",
            "--checkpoint-every", "1"]


def check_run_folder(run: Path) -> dict[str, int]:
    """Everything a killed run left must be whole; returns ``{tag: step}`` of its pointers."""
    steps = {}
    root = run / "checkpoints"
    pointed = set()
    if root.exists():
        for pointer in root.glob("*.txt"):
            tag = pointer.stem
            folder = ckpt.find_checkpoint(run, tag)
            pointed.add(folder.name)
            weights = ckpt.load_model_state(folder)
            assert weights and all(torch.isfinite(t).all() for t in weights.values() if t.is_floating_point())
            state = ckpt.load_train_state(folder)
            ExperimentConfig.from_json(folder / ckpt.CONFIG_FILE)
            assert int(state["step"]) == int(folder.name.rsplit("-", 1)[1])
            steps[tag] = int(state["step"])
        for p in root.iterdir():
            if p.is_file():
                assert p.suffix == ".txt" or TMP_NAME.match(p.name), p.name
            elif p.name not in pointed:
                # a temp folder of an interrupted save, or an older folder being pruned: both
                # are never pointed at and go at the next successful save
                tag, _, step = p.name.lstrip(".").partition("-")
                assert p.name.startswith(".") or int(step) <= steps.get(tag, 10**9), p.name
    for log in ("train_log.csv", "eval_log.csv"):
        if (run / log).exists():
            df = pd.read_csv(run / log)
            assert df["step"].notna().all()
    if (run / "config.json").exists():
        ExperimentConfig.from_json(run / "config.json")
    return steps


@pytest.mark.slow  # ~5 subprocesses
def test_training_killed_at_random_points_then_rerun_matches(tmp_path):
    root = tiny_data(tmp_path / "data", n_train=16)   # 10 steps per epoch, 2 epochs
    clean = tiny_config(root, tmp_path / "clean", **SHORT)
    clean.to_json(tmp_path / "clean.json")
    subprocess.run(_train(tmp_path / "clean.json"), env=ENV, check=True, capture_output=True, timeout=300)

    killed = tiny_config(root, tmp_path / "killed", **SHORT)
    killed.to_json(tmp_path / "killed.json")
    pointer = tmp_path / "killed" / "checkpoints" / "last.txt"
    rng = random.Random(11)
    kills, progress = 0, []
    for _ in range(ROUNDS):
        start = pointer.read_text() if pointer.exists() else ""
        proc = subprocess.Popen(_train(tmp_path / "killed.json"), env=ENV,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None and (
                not pointer.exists() or pointer.read_text() == start):
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.6))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
        progress.append(check_run_folder(tmp_path / "killed").get("last", 0))
    assert kills >= 2, progress
    assert progress == sorted(progress), "a later round went back to an earlier checkpoint"
    subprocess.run(_train(tmp_path / "killed.json"), env=ENV, check=True, capture_output=True, timeout=300)
    check_run_folder(tmp_path / "killed")
    leftovers = [p.name for p in (tmp_path / "killed" / "checkpoints").iterdir() if p.name.startswith(".")]
    assert not leftovers, leftovers

    a = pd.read_csv(tmp_path / "clean" / "eval_log.csv")
    b = pd.read_csv(tmp_path / "killed" / "eval_log.csv")
    pd.testing.assert_frame_equal(a, b)
    la = pd.read_csv(tmp_path / "clean" / "train_log.csv").drop(columns="time")
    lb = pd.read_csv(tmp_path / "killed" / "train_log.csv").drop(columns="time")
    pd.testing.assert_frame_equal(la, lb)
    for tag in ("last", "best"):
        wa = ckpt.load_model_state(ckpt.find_checkpoint(tmp_path / "clean", tag))
        wb = ckpt.load_model_state(ckpt.find_checkpoint(tmp_path / "killed", tag))
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), tag


def test_interrupted_save_leaves_old_checkpoint_and_next_save_cleans_up(tmp_path, monkeypatch):
    """In process: a save that dies after writing its temp folder keeps the pointer on the old
    checkpoint; the next save removes the half-written temp folder."""
    model = {"w": torch.arange(4.0)}
    state = {"step": 1}
    first = ckpt.save_checkpoint(tmp_path, "last", 1, model, state, "{}")

    def boom(src, dst):
        raise KeyboardInterrupt  # what a Ctrl-C between writing and renaming looks like

    real_replace = os.replace
    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(tmp_path, "last", 2, {"w": torch.zeros(4)}, {"step": 2}, "{}")
    monkeypatch.setattr(os, "replace", real_replace)
    assert ckpt.find_checkpoint(tmp_path, "last") == first
    # simulate the SIGKILL variant: a temp folder that no exception handler removed
    stale = tmp_path / "checkpoints" / ".last-stale"
    stale.mkdir()
    (stale / ckpt.MODEL_FILE).write_bytes(b"half")
    second = ckpt.save_checkpoint(tmp_path, "last", 3, {"w": torch.ones(4)}, {"step": 3}, "{}")
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["last-00000003", "last.txt"]
    assert torch.equal(ckpt.load_model_state(second)["w"], torch.ones(4))


class _Killed(Exception):
    pass


class _DieAt:
    """Raise in a callback: the process dies after a log row, before the next checkpoint."""

    def __init__(self, hook: str, when: int):
        self.hook, self.when = hook, when

    def on_step(self, trainer, row):
        if self.hook == "on_step" and trainer.step == self.when:
            raise _Killed()

    def on_eval(self, trainer, row):
        if self.hook == "on_eval" and trainer.epoch == self.when:
            raise _Killed()

    def on_epoch_end(self, trainer):
        pass


@pytest.mark.parametrize("hook,when", [("on_step", 7), ("on_eval", 1)])
def test_resume_after_death_between_log_row_and_checkpoint_has_no_duplicate_rows(tmp_path, hook, when):
    """A death after a row is logged but before the checkpoint that covers it: the resumed run
    writes that row again, so resume must drop it (train rows are keyed by the step count
    before their step, eval rows by epochs done)."""
    from userlab.train import Trainer
    root = tiny_data(tmp_path / "data", n_train=8)    # 5 steps per epoch, 2 epochs
    Trainer(tiny_config(root, tmp_path / "clean", **SHORT), progress=False, checkpoint_every=1).fit()
    cfg = tiny_config(root, tmp_path / "killed", **SHORT)
    with pytest.raises(_Killed):
        Trainer(cfg, progress=False, checkpoint_every=1, callbacks=[_DieAt(hook, when)]).fit()
    Trainer(cfg, progress=False, checkpoint_every=1).fit()
    for log in ("train_log.csv", "eval_log.csv"):
        a = pd.read_csv(tmp_path / "clean" / log).drop(columns="time", errors="ignore")
        b = pd.read_csv(tmp_path / "killed" / log).drop(columns="time", errors="ignore")
        assert b["step"].is_unique if log == "train_log.csv" else b["epoch"].is_unique
        pd.testing.assert_frame_equal(a, b)


# ---------------------------------------------------------------------------------------------
# Memory: reading a whole memory-mapped feature file keeps the resident set bounded
# ---------------------------------------------------------------------------------------------
def _rss_mb() -> dict[str, float]:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("RssFile", "RssAnon"):
            out[key] = int(value.split()[0]) / 1024
    return out


@pytest.mark.skipif(not Path("/proc/self/status").exists() or "RssFile" not in
                    Path("/proc/self/status").read_text(), reason="needs Linux /proc RssFile")
def test_reading_every_row_of_a_memmap_keeps_rss_file_bounded(tmp_path):
    """A 256 MiB feature file read whole, row by row. Through the dataset (``os.pread``) the
    mapped-file part of RSS does not grow; full validation (through the mapping, released every
    chunk) grows by about one chunk; the control, plain reads through the memory map, grows by
    about the whole file -- which shows the measurement sees mapped pages at all."""
    import mmap
    from conftest import make_captions
    n, regions, width = 1024, 32, 2048                   # 1024 rows x 256 KiB = 256 MiB
    size_mb = n * regions * width * 4 / 2**20
    arr = np.lib.format.open_memmap(tmp_path / "train_ims.npy", mode="w+", dtype=np.float32,
                                    shape=(n, regions, width))
    for start in range(0, n, 128):
        arr[start:start + 128] = np.float32(start / n)
        arr.flush()
        arr._mmap.madvise(mmap.MADV_DONTNEED)            # the writer's pages must not count
    del arr
    (tmp_path / "train_caps.txt").write_text("\n".join(make_captions(n)) + "\n")
    ds = PrecompDataset(tmp_path, "train", validate=False)

    def growth(read) -> float:
        from userlab.data.precomp import _release_pages
        _release_pages(ds.ims)
        base = peak = _rss_mb()["RssFile"]
        for i in range(n):
            read(i)
            if i % 16 == 0:
                peak = max(peak, _rss_mb()["RssFile"])
        _release_pages(ds.ims)
        return peak - base

    def via_dataset(i):
        value = float(ds.image_item(i)["regions"][1, 2])
        assert value == np.float32(i // 128 * 128 / n)

    validation = []

    def via_validation(i):
        if i == 0:
            validation.append(ds.validate_rows(chunk_rows=64))   # 16 MiB chunks

    dataset = growth(via_dataset)
    validate = growth(via_validation)
    control = growth(lambda i: np.array(ds.ims[i]))
    assert validation == [n]
    assert dataset < 0.05 * size_mb, (dataset, validate, control)
    assert validate < 0.35 * size_mb, (dataset, validate, control)
    assert control > 0.7 * size_mb, (dataset, validate, control)

"""The Trainer: a short run learns, resume after SIGKILL is exact, DDP keeps ranks identical."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from tiny import tiny_config, tiny_data
from userlab import checkpoint as ckpt
from userlab.config import preset
from userlab.pipeline import EpochBatchSampler, describe_lr_schedule, describe_optim, lr_at_epoch
from userlab.train import Trainer, load_model

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}", "OMP_NUM_THREADS": "1"}


def test_lr_schedule_and_step_zero_means_no_decay():
    assert lr_at_epoch(1.0, 9, 10, 0.1) == 1.0
    assert lr_at_epoch(1.0, 10, 10, 0.1) == pytest.approx(0.1)
    assert lr_at_epoch(1.0, 25, 10, 0.1) == pytest.approx(0.01)
    assert lr_at_epoch(1.0, 100, 0, 0.1) == 1.0


def test_schedule_in_words_follows_the_config():
    demo = preset("demo")                                  # the notebooks' preset: lr_step = 0
    assert describe_lr_schedule(demo) == "constant lr 0.001 for 2 epochs"
    said = describe_optim(demo)
    assert said.startswith("AdamW (weight decay 0.0001), constant lr 0.001 for 2 epochs, gradient norm clipped at 2")
    assert "decay" not in said.replace("weight decay", "")
    assert describe_lr_schedule(preset("f30k")) == "lr 0.0005 in epochs 1-10, x0.1 after epoch 10: 5e-05 in epochs 11-20"
    assert describe_lr_schedule(preset("f8k-cpu-vsepp")) == (
        "lr 0.001 in epochs 1-2, x0.2 after epoch 2: 0.0002 in epochs 3-4")
    late = demo.replace(**{"optim.lr_step": 5})            # a step the run never reaches
    assert describe_lr_schedule(late) == "constant lr 0.001 for 2 epochs (the x0.1 step after epoch 5 lies beyond the run)"
    one = demo.replace(**{"optim.epochs": 1, "eval_every": 3, "optim.amp": "off"})
    assert describe_lr_schedule(one) == "constant lr 0.001 for 1 epoch"
    assert describe_optim(one).endswith("float32 throughout (optim.amp = 'off'), dev rSum every 3 epochs and after the last")
    for epochs, step, decay in [(7, 3, 0.5), (4, 1, 0.1), (5, 2, 1.0)]:   # every epoch's lr is in the words
        cfg = demo.replace(**{"optim.epochs": epochs, "optim.lr_step": step, "optim.lr_decay": decay})
        words = describe_lr_schedule(cfg)
        for e in range(epochs):
            assert f"{lr_at_epoch(1e-3, e, step, decay):g}" in words, (words, e)


def test_epoch_sampler_is_a_function_of_seed_and_epoch():
    a = list(EpochBatchSampler(50, 8, seed=1, epoch=3))
    b = list(EpochBatchSampler(50, 8, seed=1, epoch=3))
    c = list(EpochBatchSampler(50, 8, seed=1, epoch=4))
    assert a == b and a != c and len(a) == 6 and all(len(x) == 8 for x in a)
    assert list(EpochBatchSampler(50, 8, seed=1, epoch=3, skip=2)) == a[2:]
    r0 = list(EpochBatchSampler(50, 8, seed=1, epoch=3, rank=0, world=2))
    r1 = list(EpochBatchSampler(50, 8, seed=1, epoch=3, rank=1, world=2))
    assert r0 == a[0::2][:3] and r1 == a[1::2][:3]
    assert not set(sum(r0, [])) & set(sum(r1, []))


def test_training_writes_logs_checkpoints_and_loads_back(tmp_path):
    root = tiny_data(tmp_path / "data")
    cfg = tiny_config(root, tmp_path / "run")
    seen = []

    class Record:
        def on_step(self, trainer, row): seen.append(row["loss"])
        def on_eval(self, trainer, row): seen.append(("eval", row["rsum"]))
        def on_epoch_end(self, trainer): pass

    history = Trainer(cfg, progress=False, callbacks=[Record()]).fit()
    assert list(history["epoch"]) == [1, 2, 3]
    assert len([s for s in seen if isinstance(s, tuple)]) == 3
    log = pd.read_csv(tmp_path / "run" / "train_log.csv")
    assert {"loss", "loss_batch", "loss_queue", "lr", "grad_norm"} <= set(log.columns)
    # lr decays by 10x at epoch 2 (lr_step = 2)
    assert log[log.epoch == 0].lr.iloc[0] == pytest.approx(1e-3)
    assert log[log.epoch == 2].lr.iloc[0] == pytest.approx(1e-4)
    # the sentence the notebooks print is the schedule the Trainer ran
    assert describe_lr_schedule(cfg) == "lr 0.001 in epochs 1-2, x0.1 after epoch 2: 0.0001 in epoch 3"
    assert log.groupby("epoch").lr.first().tolist() == pytest.approx([1e-3, 1e-3, 1e-4])
    best = ckpt.find_checkpoint(tmp_path / "run", "best")
    state = ckpt.load_train_state(best)          # weights_only=True
    assert "image_queue" in state["momentum"] and int(state["momentum"]["image_queue"]["ptr"]) >= 0
    model, cfg2, vocab = load_model(tmp_path / "run")
    assert cfg2 == cfg and vocab is not None and not model.training


def _train_cmd(cfg_path: Path) -> list[str]:
    return [sys.executable, "-m", "userlab", "train", "--config", str(cfg_path), "--no-progress",
            "--checkpoint-every", "1"]


def test_resume_after_sigkill_gives_identical_metrics(tmp_path):
    root = tiny_data(tmp_path / "data", n_train=40)
    clean = tiny_config(root, tmp_path / "clean")
    clean.to_json(tmp_path / "clean.json")
    subprocess.run(_train_cmd(tmp_path / "clean.json"), env=ENV, check=True, capture_output=True, timeout=300)

    killed = tiny_config(root, tmp_path / "killed")
    killed.to_json(tmp_path / "killed.json")
    rng = random.Random(0)
    kills = 0
    for _ in range(2):
        proc = subprocess.Popen(_train_cmd(tmp_path / "killed.json"), env=ENV,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        pointer = tmp_path / "killed" / "checkpoints" / "last.txt"
        deadline = time.time() + 120
        start = pointer.read_text() if pointer.exists() else ""
        while time.time() < deadline and (not pointer.exists() or pointer.read_text() == start):
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 0.5))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
    assert kills >= 1
    subprocess.run(_train_cmd(tmp_path / "killed.json"), env=ENV, check=True, capture_output=True, timeout=300)

    a = pd.read_csv(tmp_path / "clean" / "eval_log.csv")
    b = pd.read_csv(tmp_path / "killed" / "eval_log.csv")
    pd.testing.assert_frame_equal(a, b)
    wa = ckpt.load_model_state(ckpt.find_checkpoint(tmp_path / "clean", "last"))
    wb = ckpt.load_model_state(ckpt.find_checkpoint(tmp_path / "killed", "last"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.slow
def test_ddp_two_cpu_processes(tmp_path):
    root = tiny_data(tmp_path / "data", n_train=40)
    cfg = tiny_config(root, tmp_path / "run", **{"momentum.queue_size": 64})
    cfg.to_json(tmp_path / "cfg.json")
    out = tmp_path / "out"
    out.mkdir()
    steps = 3
    torchrun = Path(sys.executable).with_name("torchrun")
    subprocess.run([str(torchrun), "--nproc_per_node=2", "--master_port", str(29500 + os.getpid() % 1000),
                    str(ROOT / "tests" / "ddp_worker.py"), str(tmp_path / "cfg.json"), str(out), str(steps)],
                   env=ENV, check=True, capture_output=True, timeout=300)
    r0, r1 = (torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    b = cfg.data.batch_size
    # each step, every rank's queue received the keys of both ranks: 2 x B
    assert int(r0["image_ptr"]) == (steps * 2 * b) % 64 == int(r1["image_ptr"])
    assert torch.equal(r0["image_keys"], r1["image_keys"]) and torch.equal(r0["image_ids"], r1["image_ids"])
    assert (r0["image_ids"] >= 0).sum() == steps * 2 * b
    for k in r0["encoder"]:
        if "running" in k or "num_batches" in k:
            continue  # BatchNorm statistics are per rank
        assert torch.allclose(r0["encoder"][k], r1["encoder"][k], atol=1e-6), k


def test_train_max_images_trains_on_the_first_images_only(tmp_path):
    from userlab.pipeline import prepare_data
    root = tiny_data(tmp_path / "data")
    full = prepare_data(tiny_config(root, tmp_path / "a"))
    part = prepare_data(tiny_config(root, tmp_path / "b", **{"data.train_max_images": 10}))
    assert (len(full.train), len(part.train)) == (24 * 5, 10 * 5)
    assert part.train.num_images == 10 and len(part.val) == len(full.val)
    # the first 10 images' captions, in the same order
    assert [part.train[i]["image_id"] for i in range(0, 50, 5)] == [full.train[i]["image_id"] for i in range(0, 50, 5)]


def test_training_on_a_read_only_data_folder_keeps_the_vocabulary_in_the_run(tmp_path, monkeypatch):
    """A shared, read-only feature folder: the vocabulary cannot be written beside the data, so
    training says so and carries on; the checkpoint holds the vocabulary for evaluation."""
    import errno
    import warnings
    from userlab.checkpoint import VOCAB_FILE
    from userlab.data.text import Vocabulary
    data = tiny_data(tmp_path / "data")

    def read_only(self, path):   # what a read-only mount answers (root would not see EACCES)
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr(Vocabulary, "save", read_only)
    cfg = tiny_config(data, tmp_path / "run", **{"optim.epochs": 1})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Trainer(cfg, progress=False).fit()
    assert any("could not write the word vocabulary (Read-only file system)" in str(w.message) for w in caught)
    assert not list(data.rglob("vocab.json"))
    saved = list((tmp_path / "run" / "checkpoints").rglob(VOCAB_FILE))
    assert saved and json.loads(saved[0].read_text())

"""The own-data path's rough edges end in success or a named error that says what to do.

Generated photos only (``test_extract``'s tiny Flickr-style dataset at a 64-px input): a wrong
image folder, missing images recorded, Kaggle's ``image,caption`` CSV, the dev list passed again
as test, COCO without a dev split, a missing dev split at train time, Ctrl-C during ``train``,
dev metrics printed after each evaluation, and one-line warnings.
"""
from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from test_extract import (IMAGES, SIDE, SPLITS, _args, _caption, _write_dataset,
                          counting_feature_rows, write_coco)
from tiny import tiny_config, tiny_data
from userlab import cli
from userlab.data import extract as extract_module
from userlab.data.captions import read_caption_splits
from userlab.data.extract import extract_dataset
from userlab.data.precomp import PrecompDataset
from userlab.errors import ConfigError, DataError
from userlab.interrupt import TrainingInterrupted, graceful_stop, request_stop
from userlab.train import Callback, Trainer

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


@pytest.fixture()
def dataset(tmp_path):
    return _write_dataset(tmp_path / "flickr8k")


# ---------------------------------------------------------------------------------------------
# Missing images
# ---------------------------------------------------------------------------------------------
def test_wrong_image_folder_with_skip_missing_is_an_error_naming_the_split(dataset, tmp_path, monkeypatch):
    wrong = tmp_path / "elsewhere"
    wrong.mkdir()
    (wrong / "unrelated.jpg").write_bytes(b"x")
    monkeypatch.setattr(extract_module, "_FeatureRunner",
                        lambda *a, **k: pytest.fail("extraction started on an empty split"))
    for skip in (True, False):   # with or without --skip-missing: the folder is named, not skipping
        with pytest.raises(DataError, match=r"none of the 5 images of split 'train'.*check --images") as err:
            extract_dataset(**_args(dataset, tmp_path / "out", image_root=str(wrong), skip_missing=skip))
        assert str(wrong) in str(err.value) and "1001_a.jpg" in str(err.value)
    assert not list((tmp_path / "out").rglob("*_ims.npy"))


def test_one_split_all_missing_is_an_error_even_if_others_are_fine(dataset, tmp_path):
    root = tmp_path / "images"
    shutil.copytree(dataset["image_root"], root)
    for name in SPLITS["dev"]:
        (root / name).unlink()
    with pytest.raises(DataError, match=r"none of the 2 images of split 'dev'"):
        extract_dataset(**_args(dataset, tmp_path / "out", image_root=str(root), skip_missing=True))


def test_missing_images_are_recorded_in_the_split_marker(dataset, tmp_path):
    root = tmp_path / "images"
    shutil.copytree(dataset["image_root"], root)
    (root / "1002_b.jpg").unlink()
    with pytest.warns(UserWarning, match="1 missing"):
        out = extract_dataset(**_args(dataset, tmp_path / "out", image_root=str(root), skip_missing=True))
    train = json.loads((out / ".extract_train.json").read_text())
    assert train["missing"] == ["1002_b.jpg"] and train["left_out"] == ["1002_b.jpg"]
    assert train["images"] == 4 and train["unreadable"] == []
    assert json.loads((out / ".extract_dev.json").read_text())["missing"] == []
    assert PrecompDataset(out, "train").num_images == 4


# ---------------------------------------------------------------------------------------------
# Kaggle's captions.txt and a test list that repeats dev
# ---------------------------------------------------------------------------------------------
def _kaggle_csv(path: Path, captions: dict[str, list[str]]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)       # quotes captions that hold commas, as Kaggle's file does
        writer.writerow(["image", "caption"])
        for name, caps in captions.items():
            for c in caps:
                writer.writerow([name, c])
    return path


def test_kaggle_csv_reads_like_the_token_file(dataset, tmp_path):
    caps = {name: [_caption(name, k) + (", with a comma" if k == 2 else "") for k in range(5)]
            for name, _, _ in IMAGES}
    kaggle = _kaggle_csv(tmp_path / "captions.txt", caps)
    assert '"' in kaggle.read_text()          # the file really holds quoted fields
    token = tmp_path / "token.txt"
    token.write_text("".join(f"{n}#{k}\t{c}\n" for n, cs in caps.items() for k, c in enumerate(cs)))
    from_csv = read_caption_splits("flickr", kaggle, dataset["split_files"])
    from_token = read_caption_splits("flickr", token, dataset["split_files"])
    assert from_csv == from_token
    assert from_csv["train"][0].captions[2] == "picture a sentence 2 with a dog, with a comma"
    with pytest.raises(ConfigError, match=r"Kaggle-style.*--train-list.*--karpathy"):
        read_caption_splits("flickr", kaggle, None)


def test_kaggle_csv_bad_row_and_csv_without_header_name_the_fix(tmp_path, dataset):
    bad = tmp_path / "captions.txt"
    bad.write_text("image,caption\n1001_a.jpg,a dog,,extra\n")
    with pytest.raises(DataError, match=r"line 2 is not 'image,caption'"):
        read_caption_splits("flickr", bad, dataset["split_files"])
    headless = tmp_path / "noheader.txt"
    headless.write_text("1001_a.jpg,a dog runs\n")
    with pytest.raises(DataError, match=r"header line 'image,caption'"):
        read_caption_splits("flickr", headless, dataset["split_files"])


def test_cli_extracts_kaggle_csv(dataset, tmp_path, capsys):
    caps = {name: [_caption(name, k) for k in range(5)] for name, _, _ in IMAGES}
    kaggle = _kaggle_csv(tmp_path / "captions.txt", caps)
    lists = dataset["split_files"]
    rc = cli.main(["extract", "--format", "kaggle", "--captions", str(kaggle), "--images",
                   dataset["image_root"], "--out", str(tmp_path / "out"), "--train-list", lists["train"],
                   "--dev-list", lists["dev"], "--input-size", str(SIDE), "--workers", "0",
                   "--device", "cpu", "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    train = PrecompDataset(tmp_path / "out" / "precomp", "train")
    assert train.captions[:5] == caps["1001_a.jpg"]


def test_dev_list_repeated_as_test_is_extracted_once(dataset, tmp_path):
    split_files = dict(dataset["split_files"], test=dataset["split_files"]["dev"])
    with counting_feature_rows() as calls, pytest.warns(UserWarning, match="'test' is a copy of 'dev'"):
        out = extract_dataset(**_args(dict(dataset, split_files=split_files), tmp_path / "out"))
    assert sum(calls) == len(SPLITS["train"]) + len(SPLITS["dev"])    # dev computed once
    for suffix in ("_ims.npy", "_guide.npy", "_boxes.npy"):
        np.testing.assert_array_equal(np.load(out / f"test{suffix}"), np.load(out / f"dev{suffix}"))
    assert PrecompDataset(out, "test").captions == PrecompDataset(out, "dev").captions


# ---------------------------------------------------------------------------------------------
# No dev split: COCO with its val images as test
# ---------------------------------------------------------------------------------------------
def test_coco_val_as_test_gets_a_dev_split_carved_from_train_and_trains(tmp_path):
    root = tmp_path / "coco"
    files = write_coco(root, {"train2014": list(range(1, 21)), "val2014": [31, 32]})
    with pytest.warns(UserWarning, match=r"no dev split: the last 2 of the 20 train images form 'dev'"):
        out = extract_dataset("coco", files, str(root), str(tmp_path / "data"), coco_val_split="test",
                              chunk_size=4, batch_size=4, num_workers=0, input_size=SIDE,
                              device="cpu", progress=False)
    train, dev, test = (PrecompDataset(out, s) for s in ("train", "dev", "test"))
    assert train.ids.tolist() == list(range(1, 19)) and dev.ids.tolist() == [19, 20]
    assert test.ids.tolist() == [31, 32]
    cfg = tiny_config(tmp_path / "data", tmp_path / "run", **{
        "model.region_dim": 1280, "model.num_regions": (SIDE // 32) ** 2, "model.guide_dim": 1280,
        "optim.epochs": 1})
    trainer = Trainer(cfg, progress=False)
    trainer.fit()
    assert len(trainer.history) == 1 and trainer.history[0]["rsum"] >= 0


def test_missing_dev_split_at_train_time_names_the_splits_and_the_way_on(tmp_path):
    data = tiny_data(tmp_path / "data")
    for p in data.glob("dev_*"):
        p.unlink()
    cfg = tiny_config(data, tmp_path / "run")
    with pytest.raises(DataError, match=r"region features file is missing.*has: test, train.*"
                                        r"--set data.val_split="):
        Trainer(cfg, progress=False)
    trainer = Trainer(cfg.replace(**{"data.val_split": "test", "optim.epochs": 1}), progress=False)
    trainer.fit()
    assert len(trainer.history) == 1


# ---------------------------------------------------------------------------------------------
# Ctrl-C, dev metrics, warnings
# ---------------------------------------------------------------------------------------------
class _StopAt(Callback):
    def __init__(self, step: int):
        self.step = step

    def on_step(self, trainer, row):
        if trainer.step == self.step:
            request_stop()


def test_stop_request_saves_between_steps_and_resume_matches_an_uninterrupted_run(tmp_path):
    data = tiny_data(tmp_path / "data")
    full = Trainer(tiny_config(data, tmp_path / "full"), progress=False)
    full.fit()
    cfg = tiny_config(data, tmp_path / "cut")
    with graceful_stop():
        trainer = Trainer(cfg, callbacks=[_StopAt(4)], progress=False)
        with pytest.raises(TrainingInterrupted, match=r"after step 4 .*rerun the same command"):
            trainer.fit()
    assert (tmp_path / "cut" / "checkpoints" / "last.txt").read_text().strip().endswith("4")
    resumed = Trainer(cfg, progress=False)
    assert resumed.step == 4
    resumed.fit()
    assert resumed.step == full.step
    np.testing.assert_allclose([r["rsum"] for r in resumed.history], [r["rsum"] for r in full.history])


def _train_cmd(data: Path, run: Path, epochs: int) -> list[str]:
    return [sys.executable, "-m", "userlab", "train", "--preset", "demo", "--data", str(data),
            "--run-dir", str(run), "--no-progress",
            "--set", "model.region_dim=8", "--set", "model.num_regions=4", "--set", "model.guide_dim=6",
            "--set", "model.embed_size=16", "--set", "model.mlp_hidden=16", "--set", "model.word_dim=16",
            "--set", "data.batch_size=8", "--set", "data.vocab_threshold=1",
            "--set", "momentum.queue_size=16", "--set", f"optim.epochs={epochs}", "--set", "log_every=1"]


def test_cli_ctrl_c_saves_and_prints_one_line_then_rerun_resumes(tmp_path):
    data = tiny_data(tmp_path / "data", n_train=400)
    run = tmp_path / "run"
    proc = subprocess.Popen(_train_cmd(data, run, epochs=1), env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    log = run / "train_log.csv"
    deadline = time.time() + 120
    while time.time() < deadline and not (log.is_file() and len(log.read_text().splitlines()) > 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert "rerun the same command to resume" in lines[0]
    step = int(lines[0].split("after step ")[1].split()[0])
    assert (run / "checkpoints" / "last.txt").read_text().strip().endswith(str(step))
    rerun = subprocess.run(_train_cmd(data, run, epochs=1), env=ENV, capture_output=True, text=True,
                           timeout=180)
    # resumed inside epoch 1 (not from step 0): the step log continues after the saved step
    assert rerun.returncode == 0, rerun.stderr
    steps = [int(r.split(",")[0]) for r in log.read_text().splitlines()[1:]]
    assert steps == sorted(set(steps)) and steps[-1] >= step


def test_cli_prints_dev_metrics_after_each_evaluation(tmp_path):
    data = tiny_data(tmp_path / "data")
    res = subprocess.run(_train_cmd(data, tmp_path / "run", epochs=2), env=ENV, capture_output=True,
                         text=True, timeout=180)
    assert res.returncode == 0, res.stderr
    lines = [ln for ln in res.stdout.splitlines() if " dev: rSum " in ln]
    evals = json.loads(json.dumps([r for r in csv.DictReader(open(tmp_path / "run" / "eval_log.csv"))]))
    assert [ln.split()[1] for ln in lines] == ["1/2", "2/2"]
    assert [float(ln.split("rSum ")[1].split()[0]) for ln in lines] == pytest.approx(
        [float(r["rsum"]) for r in evals], abs=0.051)


def test_cli_warnings_are_one_line_without_source(dataset, tmp_path):
    root = tmp_path / "images"
    shutil.copytree(dataset["image_root"], root)
    (root / "1002_b.jpg").unlink()
    lists = dataset["split_files"]
    res = subprocess.run([sys.executable, "-m", "userlab", "extract", "--format", "flickr",
                          "--captions", dataset["captions_path"], "--images", str(root),
                          "--out", str(tmp_path / "out"), "--train-list", lists["train"],
                          "--dev-list", lists["dev"], "--input-size", str(SIDE), "--workers", "0",
                          "--device", "cpu", "--no-progress", "--skip-missing"],
                         env=ENV, capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stderr
    warned = [ln for ln in res.stderr.splitlines() if "missing image(s) left out" in ln]
    assert warned and warned[0].startswith("userlab: UserWarning: 1 missing image(s) left out: 1002_b.jpg")
    assert "cli.py" not in res.stderr and "warnings.warn" not in res.stderr

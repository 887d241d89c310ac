"""Run folders: the lock across real processes, --no-resume keeps the old run, resume reports and
records what it changed, eval and ensembles refuse data that is not what the runs saw."""
from __future__ import annotations

import json
import re
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny import tiny_config, tiny_data  # noqa: E402

from userlab import checkpoint as ckpt  # noqa: E402
from userlab import cli  # noqa: E402
from userlab.errors import ConfigError, RunLockedError  # noqa: E402
from userlab.runfolder import RunFolderLock  # noqa: E402
from userlab.train import Trainer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}", "OMP_NUM_THREADS": "1"}
pytestmark = pytest.mark.usefixtures("one_thread")

HOLDER = """
import sys, time
from tiny import tiny_config
from userlab.train import Trainer
trainer = Trainer(tiny_config(sys.argv[1], sys.argv[2]), progress=False)  # holds the lock
print("locked", flush=True)
sys.stdin.read()  # until the test closes stdin (or kills us)
"""


def test_second_process_on_a_run_folder_fails_at_once_naming_the_holder(tmp_path):
    data, run = tiny_data(tmp_path / "data"), tmp_path / "run"
    cfg_file = tmp_path / "cfg.json"
    tiny_config(data, run).to_json(cfg_file)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(data), str(run)], env=ENV, cwd=tmp_path,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked", holder.stderr.read()
        t0 = time.monotonic()
        second = subprocess.run([sys.executable, "-m", "userlab", "train", "--config", str(cfg_file),
                                 "--max-steps", "1", "--no-progress"], env=ENV, cwd=tmp_path,
                                capture_output=True, text=True, timeout=300)
        waited = time.monotonic() - t0
        assert second.returncode == 2, second.stderr
        line = [l for l in second.stderr.splitlines() if l.startswith("userlab train: error:")]
        assert line and str(run) in line[0] and f"pid {holder.pid}" in line[0] and "in use" in line[0], second.stderr
        assert "Traceback" not in second.stderr
        assert not (run / "train_log.csv").exists() and not (run / "checkpoints").exists()
        # the same in-process: RunLockedError, raised without waiting for the holder
        with pytest.raises(RunLockedError, match=f"pid {holder.pid}"):
            Trainer(tiny_config(data, run), progress=False)
    finally:
        holder.send_signal(signal.SIGKILL)  # a holder that dies never blocks the next run
        holder.wait(timeout=60)
    assert waited < 120  # it did not wait for the holder (which never finishes by itself)
    trainer = Trainer(tiny_config(data, run), progress=False, max_steps=2)
    trainer.fit()
    assert ckpt.find_checkpoint(run, "last").name == "last-00000002"
    assert not trainer.lock.held  # released when fit ends
    with RunFolderLock(run):  # and free for the next one
        pass


def test_no_resume_moves_the_old_run_aside(tmp_path, capsys):
    data, run = tiny_data(tmp_path / "data"), tmp_path / "run"
    Trainer(tiny_config(data, run), progress=False, max_steps=3).fit()
    old_files = sorted(str(p.relative_to(run)) for p in run.rglob("*") if not p.name.startswith(".userlab.lock"))
    old_log = (run / "train_log.csv").read_text()
    capsys.readouterr()
    trainer = Trainer(tiny_config(data, run), progress=False, resume=False, max_steps=1)
    out = capsys.readouterr().out
    aside = trainer.moved_aside
    assert aside is not None and aside.parent == run.parent and aside.name.startswith("run.old-")
    assert f"moved the previous run in {run} to {aside}" in out
    moved = sorted(str(p.relative_to(aside)) for p in aside.rglob("*"))
    assert moved == old_files  # everything moved, nothing deleted
    assert (aside / "train_log.csv").read_text() == old_log
    assert ckpt.find_checkpoint(aside, "last").name == "last-00000003"
    assert sorted(p.name for p in run.iterdir()) == [".userlab.lock", ".userlab.lock.owner"]
    trainer.fit()
    assert ckpt.find_checkpoint(run, "last").name == "last-00000001"


def test_resume_reports_step_and_epoch_and_records_an_allowed_lr_change(tmp_path, capsys):
    data, run = tiny_data(tmp_path / "data"), tmp_path / "run"
    Trainer(tiny_config(data, run), progress=False, max_steps=4).fit()  # 15 steps per epoch
    capsys.readouterr()
    resumed = Trainer(tiny_config(data, run), progress=False)
    out = capsys.readouterr().out
    assert resumed.step == 4 and resumed.epoch == 0 and resumed.step_in_epoch == 4
    assert f"resumed {run} from last-00000004: step 4, epoch 0 (+4 steps into epoch 1)" in out
    resumed.lock.release()
    with pytest.raises(ConfigError, match=r"optim\.lr.*trained with 0\.001, this run asks for 0\.003"):
        Trainer(tiny_config(data, run, **{"optim.lr": 3e-3}), progress=False)
    trainer = Trainer(tiny_config(data, run, **{"optim.lr": 3e-3}), progress=False, allow_config_change=True)
    out = capsys.readouterr().out
    assert "optim.lr changed from 0.001 to 0.003 (applied" in out
    # applied: every group's lr (and the base the schedule scales) is the new one
    assert [g["base_lr"] for g in trainer.optimizer.param_groups] == [3e-3] * len(trainer.optimizer.param_groups)
    record = [json.loads(l) for l in (run / "config_changes.jsonl").read_text().splitlines()]
    assert record == [{**record[0], "step": 4, "epoch": 0, "field": "optim.lr", "saved": 1e-3, "now": 3e-3}]
    trainer.lock.release()


def _trained(data: Path, run: Path) -> Path:
    Trainer(tiny_config(data, run, **{"optim.epochs": 1}), progress=False).fit()
    assert (run / "checkpoints" / "best.txt").is_file()
    recorded = json.loads((run / "data.json").read_text())
    assert set(recorded["splits"]) == {"train", "dev", "test"}
    folder = ckpt.find_checkpoint(run, "best")
    assert json.loads((folder / "data.json").read_text()) == recorded
    return run


def _eval(argv, capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = cli.main(["eval", *map(str, argv)])
    out, err = capsys.readouterr()
    return rc, out, err


def test_eval_refuses_a_changed_split_and_ensembles_of_runs_on_different_data(tmp_path, capsys):
    data_a = tiny_data(tmp_path / "data_a")
    data_b = tmp_path / "data_b"
    shutil.copytree(data_a, data_b)
    caps = data_b / "test_caps.txt"
    lines = caps.read_text().splitlines()
    caps.write_text("\n".join([lines[1]] + lines[1:]) + "\n")  # one test caption differs
    run_a, run_b = _trained(data_a, tmp_path / "run_a"), _trained(data_b, tmp_path / "run_b")

    rc, out, _ = _eval([run_a], capsys)
    assert rc == 0 and "rsum" in out.lower()
    # the same run on the other folder's test split: refused, then allowed
    rc, _, err = _eval([run_a, "--data", data_b], capsys)
    assert rc == 2 and "split 'test' differs from the one recorded when" in err and "captions file hash" in err
    assert str(data_b / "test_ims.npy") in err and "--allow-data-mismatch" in err
    assert _eval([run_a, "--data", data_b, "--allow-data-mismatch"], capsys)[0] == 0
    # an ensemble whose members read different test data (each its own folder): refused
    rc, _, err = _eval([run_a, run_b], capsys)
    assert rc == 2 and "ensemble members see different 'test' data" in err, err
    assert _eval([run_a, run_b, "--allow-data-mismatch"], capsys)[0] == 0
    # on one folder: run_b's record for data_a's test differs from data_a, run_a's does not
    rc, _, err = _eval([run_a, run_b, "--data", data_a], capsys)
    assert rc == 2 and str(run_b) in err
    # an identical copy of the data is not a mismatch
    data_c = tmp_path / "data_c"
    shutil.copytree(data_a, data_c)
    assert _eval([run_a, "--data", data_c], capsys)[0] == 0


def test_eval_refuses_captions_the_run_vocabulary_does_not_know(tmp_path, capsys):
    data = tiny_data(tmp_path / "data")
    run = _trained(data, tmp_path / "run")
    other = tmp_path / "other"
    shutil.copytree(data, other)
    n = len((other / "test_caps.txt").read_text().splitlines())
    (other / "test_caps.txt").write_text("".join(f"ein kleines Boot Nummer {k}\n" for k in range(n)))
    rc, _, err = _eval([run, "--data", other], capsys)
    assert rc == 2 and "differs" in err  # the fingerprint catches it first
    shutil.copy(other / "test_caps.txt", data / "test_caps.txt")
    (run / "data.json").unlink()  # an older run without a fingerprint: the vocabulary check remains
    for folder in (run / "checkpoints").iterdir():
        if folder.is_dir():
            (folder / "data.json").unlink()
    rc, _, err = _eval([run], capsys)
    assert rc == 2 and "vocab.json: knows only" in err and "of the" in err, err
    assert re.search(r"knows only (\d+\.\d)% of the \d+ word tokens", err)
    assert float(re.search(r"knows only (\d+\.\d)%", err).group(1)) < 50

import json

import pytest

from userlab.config import ExperimentConfig, preset, validate
from userlab.errors import ConfigError


def test_defaults_match_the_papers():
    cfg = ExperimentConfig()
    assert cfg.momentum.momentum == 0.999 and cfg.momentum.queue_size == 2048
    assert (cfg.loss.mu, cfg.loss.gamma, cfg.loss.lambda_batch) == (90.0, 0.5, 20.0)
    assert (cfg.optim.lr, cfg.optim.text_lr_scale, cfg.optim.weight_decay) == (5e-4, 0.1, 1e-4)
    assert (cfg.optim.epochs, cfg.optim.lr_step, cfg.optim.grad_clip, cfg.optim.seed) == (20, 10, 2.0, 1)
    assert (cfg.boost.margin, cfg.boost.beta, cfg.boost.alpha) == (0.2, 1.0, 1.0)
    coco = preset("coco")
    assert (coco.momentum.queue_size, coco.loss.lambda_batch, coco.optim.epochs, coco.optim.lr_step) == (4096, 1.0, 25, 15)
    f30k = preset("f30k")
    assert (f30k.momentum.queue_size, f30k.loss.lambda_batch, f30k.optim.epochs, f30k.optim.lr_step) == (2048, 20.0, 20, 10)


@pytest.mark.parametrize("name", ["f30k", "coco", "demo", "vsepp"])
def test_json_round_trip(tmp_path, name):
    cfg = preset(name)
    cfg.to_json(tmp_path / "c.json")
    back = ExperimentConfig.from_json(tmp_path / "c.json")
    assert back == cfg


def test_replace_with_dotted_keys():
    cfg = preset("demo").replace(**{"optim.lr": 0.01, "model.enhancement": "cge"})
    assert cfg.optim.lr == 0.01 and cfg.model.enhancement == "cge"


@pytest.mark.parametrize("data, field, word", [
    ({"optim": {"lrr": 1}}, "optim.lrr", "unknown"),
    ({"bogus": 1}, "bogus", "unknown"),
    ({"optim": {"lr": "fast"}}, "optim.lr", "number"),
    ({"optim": {"epochs": 2.5}}, "optim.epochs", "integer"),
    ({"momentum": {"enabled": "yes"}}, "momentum.enabled", "true/false"),
    ({"momentum": {"queue_size": -5}}, "momentum.queue_size", "must be in [1, 2^24], got -5"),
    ({"momentum": {"queue_size": 64}, "data": {"batch_size": 128}}, "momentum.queue_size", "smaller than the batch"),
    ({"model": {"enhancement": "sgee"}}, "model.enhancement", "not one of"),
    ({"momentum": {"momentum": 1.5}}, "momentum.momentum", "[0, 1]"),
    ({"model": {"text_encoder": "transformer"}}, "model.transformer_path", "local model folder"),
])
def test_bad_configs_name_the_field(data, field, word):
    with pytest.raises(ConfigError) as err:
        ExperimentConfig.from_dict(data)
    assert err.value.field == field
    assert word in str(err.value)


def test_bad_json_file_is_named(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="broken.json"):
        ExperimentConfig.from_json(path)
    with pytest.raises(ConfigError, match="file not found"):
        ExperimentConfig.from_json(tmp_path / "missing.json")


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown preset"):
        preset("imagenet")


def test_train_max_images_must_be_positive():
    cfg = preset("demo")
    cfg.data.train_max_images = 0
    with pytest.raises(ConfigError, match="data.train_max_images"):
        validate(cfg)


# -- ranges, NaN/Inf, cross-field rules (issue 14) ---------------------------------------------
import math  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from userlab.config import (INF, RANGES, check_device, check_training_fits,  # noqa: E402
                            numeric_fields)

ROOT = Path(__file__).resolve().parents[1]
RANGES_DOC = ROOT / "docs" / "config-ranges.md"


def _with(dotted: str, value) -> dict:
    data = ExperimentConfig().to_dict()
    node = data
    *parents, last = dotted.split(".")
    for part in parents:
        node = node[part]
    node[last] = value
    return data


def test_every_numeric_field_has_a_documented_range():
    fields = numeric_fields()
    assert len(fields) >= 40
    assert set(fields) == set(RANGES), set(fields) ^ set(RANGES)
    text = RANGES_DOC.read_text(encoding="utf-8")
    assert ranges_markdown() in text, "docs/config-ranges.md is stale: run python tests/test_config.py"


@pytest.mark.parametrize("name", sorted(RANGES))
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nan_and_inf_are_refused_in_every_numeric_field(name, bad):
    with pytest.raises(ConfigError) as err:
        ExperimentConfig.from_dict(_with(name, bad))
    assert type(err.value) is ConfigError and err.value.field == name


def _outside(rng) -> list[float]:
    out = []
    if rng.lo != -INF:
        out.append(rng.lo if rng.lo_open else rng.lo - (1 if float(rng.lo).is_integer() else 1e-3))
    if rng.hi != INF:
        out.append(rng.hi if rng.hi_open else rng.hi + (1 if float(rng.hi).is_integer() else 1e-3))
    return out


@pytest.mark.parametrize("name", sorted(RANGES))
def test_range_edges_are_where_the_table_says(name):
    """Just outside the range: refused naming the field; the closed edges themselves: accepted
    (a cross-field rule may then object, never the range)."""
    rng = RANGES[name]
    is_int = int in (getattr(numeric_fields()[name], "__args__", None) or (numeric_fields()[name],))
    for value in _outside(rng):
        value = int(value) if is_int else float(value)
        with pytest.raises(ConfigError) as err:
            ExperimentConfig.from_dict(_with(name, value))
        assert err.value.field == name and "must be" in str(err.value), (value, str(err.value))
    for edge, is_open in ((rng.lo, rng.lo_open), (rng.hi, rng.hi_open)):
        if is_open or abs(edge) == INF:
            continue
        try:
            ExperimentConfig.from_dict(_with(name, int(edge) if is_int else float(edge)))
        except ConfigError as exc:  # a cross-field rule may object, not the range
            assert exc.field != name or "must be" not in str(exc), str(exc)


@pytest.mark.parametrize("dotted, value, field, word", [
    ("optim.grad_clip", -2.0, "optim.grad_clip", "negative flips the gradient"),
    ("optim.grad_clip", 0.0, "optim.grad_clip", "0 zeroes it"),
    ("optim.lr_decay", -0.1, "optim.lr_decay", "negative flips"),
    ("optim.lr_decay", 2.0, "optim.lr_decay", "> 1 grows it"),
    ("optim.lr", -1e-3, "optim.lr", "trains backwards"),
    ("log_every", 0, "log_every", ">= 1"),
    ("eval_every", 0, "eval_every", ">= 1"),
    ("loss.margin", -0.2, "loss.margin", "trains backwards"),
    ("optim.weight_decay", 2000.0, "optim.weight_decay", "in [0, 1000]"),
    ("optim.lr", "NaN", "optim.lr", "expected a number"),
    ("optim.device", "gpu", "optim.device", "not a device name"),
    ("run_dir", " ", "run_dir", "must not be empty"),
    ("model.gpo_dim", 3, "model.gpo_dim", "even"),
    ("optim.lr", 10**400, "optim.lr", "too large for a number"),
    ("optim.epochs", 10**400, "optim.epochs", "must be in [1, 1000000], got 100000000000000000000000000...(401 chars)"),
    ("optim.lr", "9" * 5000, "optim.lr", "expected a number, got '99999999999999999999999999...(5002 chars)"),
])
def test_issue_cases_are_config_errors(dotted, value, field, word):
    with pytest.raises(ConfigError) as err:
        ExperimentConfig.from_dict(_with(dotted, value))
    assert err.value.field == field and word in str(err.value), str(err.value)


def test_cross_field_rules_without_data():
    with pytest.raises(ConfigError, match=r"lr x weight_decay = 2 >= 1") as err:
        ExperimentConfig.from_dict({"optim": {"lr": 2.0, "weight_decay": 1.0}})
    assert err.value.field == "optim.weight_decay"
    with pytest.raises(ConfigError, match="nothing to learn from") as err:
        ExperimentConfig.from_dict({"boost": {"schedule": "online", "num_branches": 1}})
    assert err.value.field == "boost.num_branches"
    ExperimentConfig.from_dict({"boost": {"schedule": "online", "num_branches": 2}})


def test_lr_nan_is_a_config_error_not_a_raw_value_error(tmp_path):
    """JSON's NaN literal reaches the config through --set and JSON files; AdamW used to raise a
    raw ValueError on it. A config mutated in Python is checked when the Trainer starts."""
    import sys as _sys
    _sys.path.insert(0, str(ROOT / "tests"))
    from tiny import tiny_config, tiny_data
    from userlab.train import Trainer
    with pytest.raises(ConfigError) as err:
        ExperimentConfig.from_dict(json.loads('{"optim": {"lr": NaN}}'))
    assert type(err.value) is ConfigError and err.value.field == "optim.lr"
    assert "finite" in str(err.value)
    root = tiny_data(tmp_path / "data")
    cfg = tiny_config(root, tmp_path / "run")
    cfg.optim.lr = math.nan
    with pytest.raises(ConfigError, match="optim.lr"):
        Trainer(cfg, progress=False)
    assert not (tmp_path / "run").exists() and not (root / "vocab.json").exists()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "userlab", "train", "--preset", "demo", "--set", "optim.lr=NaN",
                           "--run-dir", str(tmp_path / "cli")], env=env, capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "config field 'optim.lr': must be a finite number" in proc.stderr


def test_batch_larger_than_the_split_stops_before_vocab_or_training(tmp_path):
    import sys as _sys
    _sys.path.insert(0, str(ROOT / "tests"))
    from tiny import tiny_config, tiny_data
    from userlab.train import Trainer
    root = tiny_data(tmp_path / "data", n_train=4)              # 20 captions
    cfg = tiny_config(root, tmp_path / "run", **{"data.batch_size": 32, "momentum.queue_size": 32})
    with pytest.raises(ConfigError, match=r"32 x 1 process\(es\) is more than the training split's 20 "
                                          r"captions .*train_ims\.npy.*0 steps") as err:
        Trainer(cfg, progress=False)
    assert err.value.field == "data.batch_size"
    assert not (root / "vocab.json").exists() and not (tmp_path / "run").exists()
    # train_max_images counts: 2 images are 10 captions
    cfg = tiny_config(root, tmp_path / "run", **{"data.batch_size": 16, "data.train_max_images": 2})
    with pytest.raises(ConfigError, match="training split's 10 captions"):
        Trainer(cfg, progress=False)
    check_training_fits(tiny_config(root, tmp_path / "r"), 8, world=1)   # 8 // 8 = one step
    with pytest.raises(ConfigError, match=r"8 x 2 process\(es\)"):
        check_training_fits(tiny_config(root, tmp_path / "r"), 15, world=2)
    # under DDP every step enqueues batch x world keys
    with pytest.raises(ConfigError, match=r"smaller than one step's keys from 4 processes \(32\)") as err:
        check_training_fits(tiny_config(root, tmp_path / "r"), 1000, world=4)
    assert err.value.field == "momentum.queue_size"


def test_device_must_exist_here():
    check_device("auto")
    check_device("cpu")
    with pytest.raises(ConfigError, match=r"'cuda:99' requested but this machine has") as err:
        check_device("cuda:99")
    assert err.value.field == "optim.device"
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no usable CUDA GPU"):
            check_device("cuda")
    with pytest.raises(ConfigError, match="not a device name"):
        check_device("gpu")


def ranges_markdown() -> str:
    """The table of docs/config-ranges.md, from :data:`userlab.config.RANGES`."""
    defaults = ExperimentConfig()
    rows = ["| field | default | allowed | why |", "|---|---|---|---|"]
    for name, hint in numeric_fields().items():
        value = defaults
        for part in name.split("."):
            value = getattr(value, part)
        kind = "integer" if int in (getattr(hint, "__args__", None) or (hint,)) else "number"
        allowed = RANGES[name].text() + (" or null" if type(None) in getattr(hint, "__args__", ()) else "")
        rows.append(f"| `{name}` | {'null' if value is None else value} | {kind} {allowed} | {RANGES[name].why} |")
    return "\n".join(rows) + "\n"


def write_ranges_doc() -> None:
    head = (
        "# Configuration ranges\n\n"
        "<!-- the table is generated by `.venv/bin/python tests/test_config.py` from "
        "`userlab.config.RANGES`; do not edit it by hand -->\n\n"
        "Every numeric field of `ExperimentConfig` and the values `validate` accepts. NaN and "
        "±Inf are refused in every field (JSON's `NaN` / `Infinity` literals parse, so a config "
        "file or `--set optim.lr=NaN` would otherwise reach the optimiser). `[a, b]` includes "
        "both ends, `(a, b]` excludes `a`. A value outside its range is a `ConfigError` naming "
        "the field, the range and why.\n\n"
    )
    tail = (
        "\n## Rules across fields\n\n"
        "Checked by `validate` (every config load, and again when a `Trainer` starts, so a config "
        "edited in Python is covered too):\n\n"
        "- `momentum.queue_size >= data.batch_size` when the queues are on (a smaller queue is "
        "overwritten whole by every step);\n"
        "- `optim.lr × max(1, optim.text_lr_scale) × optim.weight_decay < 1` (AdamW's decoupled decay "
        "multiplies each weight by `1 − lr·wd` per step; at ≥ 1 it zeroes or flips them);\n"
        "- `boost.num_branches >= 2` for the online schedule (one branch has nothing to boost against);\n"
        "- `model.transformer_path` set for a transformer text encoder;\n"
        "- `optim.device` is a device name (`auto`, `cpu`, `cuda`, `cuda:N`, `mps`).\n\n"
        "Checked when a `Trainer` starts, before any data is read (`check_device`): the device exists "
        "here (`cuda` on a machine without CUDA, or `cuda:3` on a one-GPU machine, is a `ConfigError`). "
        "`load_model` (inference) falls back to `auto` instead, so a run trained on a GPU can be "
        "evaluated anywhere.\n\n"
        "Checked as soon as the training split is opened, before its rows are scanned, a vocabulary is "
        "built or a step is taken (`check_training_fits`, from `prepare_data`):\n\n"
        "- at least one step per epoch: `(captions // data.batch_size) // processes >= 1` "
        "(`data.train_max_images` counts; the last incomplete batch is dropped);\n"
        "- under DDP, `momentum.queue_size >= data.batch_size × processes` (every step enqueues "
        "every process's keys).\n\n"
        "## Training that goes non-finite\n\n"
        "`optim.max_nonfinite_steps` (default 10) is how many NaN/Inf steps in a row stop a run. "
        "Each such step (non-finite loss, gradient norm, or a buffer such as a BatchNorm running "
        "variance) is skipped: weights, optimiser moments, BatchNorm statistics and queues stay as "
        "they were, and the `skipped` column of `train_log.csv` counts it (the row is always "
        "logged). The limit raises `NonFiniteError` with the step, its loss terms and a likely cause "
        "(learning rate too high, fp16 overflow, bad input values). With fp16 autocast, gradient "
        "overflows while the GradScaler can still lower its scale are skipped but not counted "
        "toward the limit. A checkpoint holding NaN/Inf is never written (`CheckpointError`), so "
        "pruning never removes the last finite one.\n"
    )
    RANGES_DOC.write_text(head + ranges_markdown() + tail, encoding="utf-8")
    print(f"wrote {RANGES_DOC}")


if __name__ == "__main__":
    write_ranges_doc()


@pytest.mark.parametrize("epochs, warm, lrs", [(1, 1, [1e-3]), (2, 1, [1e-3, 2e-4]),
                                                 (4, 2, [1e-3, 1e-3, 2e-4, 2e-4]),
                                                 (6, 3, [1e-3] * 3 + [2e-4] * 3)])
def test_triplet_schedule_is_vse0_then_hardest_negatives_at_a_fifth_of_the_lr(epochs, warm, lrs):
    from userlab.config import triplet_schedule
    from userlab.pipeline import lr_at_epoch
    cfg = triplet_schedule(preset("vsepp"), epochs)
    got = [lr_at_epoch(cfg.optim.lr, e, cfg.optim.lr_step, cfg.optim.lr_decay) for e in range(epochs)]
    assert cfg.optim.epochs == epochs and cfg.loss.warmup_epochs == warm
    assert got == pytest.approx(lrs)


def test_vsepp_presets_use_the_triplet_schedule():
    demo, f8k = preset("vsepp"), preset("f8k-cpu-vsepp")
    assert (demo.optim.epochs, demo.loss.warmup_epochs, demo.optim.lr_step, demo.optim.lr_decay) == (2, 1, 1, 0.2)
    assert (f8k.optim.epochs, f8k.loss.warmup_epochs, f8k.optim.lr_step, f8k.optim.lr_decay) == (4, 2, 2, 0.2)
    assert preset("f8k-cpu").optim.epochs == 4 and preset("f8k-cpu").optim.lr_step == 3

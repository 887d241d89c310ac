"""A catalogue of malformed inputs: each is refused early, clearly, and without leftovers.

Every case below breaks one thing (a data file, an image folder, a config, a checkpoint, a
command line) and checks three promises:

1. a :class:`userlab.errors.UserlabError` subclass is raised whose message names the file or
   field (``names``) and says what is wrong (``problem``, a regex);
2. it is raised before any training starts: ``Trainer(...)`` construction (through
   ``prepare_data`` and the resume logic) fails, so no ``train_log.csv`` or checkpoint exists;
3. nothing is left behind: the folder tree of the case is byte-for-byte what it was before
   (no new files, no ``.tmp`` files, no ``vocab.json`` written into a broken data folder).

The table in ``docs/bad-inputs.md`` is generated from the same lists::

    .venv/bin/python tests/test_bad_inputs.py        # rewrites docs/bad-inputs.md
"""
from __future__ import annotations

import os
import pickle
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny import tiny_config, tiny_data  # noqa: E402

from userlab import checkpoint as ckpt  # noqa: E402
from userlab import cli  # noqa: E402
from userlab.config import ExperimentConfig  # noqa: E402
from userlab.errors import (CheckpointError, ConfigError, DataError, DataMismatchError,  # noqa: E402
                            RunLockedError, UserlabError)
from userlab.train import Trainer, load_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "bad-inputs.md"
ENV = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}", "OMP_NUM_THREADS": "1"}
SIDE = 64  # backbone input for image cases: a 2x2 grid, fast on CPU


pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------
# Shared material: a valid tiny dataset, a run with a checkpoint, a valid image folder
# ---------------------------------------------------------------------------------------------
def build_base(folder: Path) -> tuple[Path, Path]:
    """A valid tiny dataset without ``vocab.json`` and a run (on its own copy) with a ``last``
    checkpoint of the ``sge+cge`` variant. Returns ``(data, run)``."""
    data = tiny_data(folder / "data")
    ck_data = folder / "ck_data"
    shutil.copytree(data, ck_data)
    run = folder / "ck_run"
    Trainer(tiny_config(ck_data, run), progress=False, max_steps=1).fit()
    return data, run


def _photo(width: int, height: int, seed: int, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, (3, 3, 3), dtype=np.uint8))
    return small.resize((width, height), Image.BILINEAR).convert(mode)


def write_image_folder(folder: Path, names: tuple[str, ...] = ("a.jpg", "b.jpg", "c.jpg")) -> Path:
    """Small valid JPEGs and a ``captions.txt`` with 5 tab-separated captions each."""
    folder.mkdir(parents=True, exist_ok=True)
    for k, name in enumerate(names):
        _photo(48, 40, k).save(folder / name)
    lines = [f"{name}\ta photo number {k} variant {j}" for k, name in enumerate(names) for j in range(5)]
    (folder / "captions.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


@dataclass
class Ctx:
    """What a case may touch: its own copies, all under ``tmp``."""

    tmp: Path
    data: Path        # a copy of the valid dataset (no vocab.json)
    run: Path         # the run folder: absent for data cases, a copy of the trained run otherwise
    images: Path      # a valid image folder with captions.txt
    out: Path         # extraction output folder (absent)
    held_lock: Any = None

    def cfg(self, **overrides) -> ExperimentConfig:
        return tiny_config(self.data, self.run, **overrides)


def make_ctx(tmp: Path, base: tuple[Path, Path], group: str) -> Ctx:
    data, run = base
    ctx = Ctx(tmp=tmp, data=tmp / "data", run=tmp / "run", images=tmp / "images", out=tmp / "out")
    if group in ("data", "start"):
        shutil.copytree(data, ctx.data)
    if group == "checkpoint":  # the run's own data, whose vocab.json it was trained with
        shutil.copytree(run.parent / "ck_data", ctx.data)
        shutil.copytree(run, ctx.run)
    if group == "images":
        write_image_folder(ctx.images)
    return ctx


# ---------------------------------------------------------------------------------------------
# Mutations
# ---------------------------------------------------------------------------------------------
def _rewrite_lines(path: Path, edit: Callable[[list[str]], list[str]]) -> None:
    lines = path.read_text(encoding="utf-8").splitlines()
    path.write_text("\n".join(edit(lines)) + "\n", encoding="utf-8")


def _edit_npy(path: Path, edit: Callable[[np.ndarray], np.ndarray]) -> None:
    arr = np.load(path)
    np.save(path, edit(arr.copy()))


def _set(arr: np.ndarray, index: tuple, value: float) -> np.ndarray:
    arr[index] = value
    return arr


def _truncate(path: Path, keep: float | int) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: keep if isinstance(keep, int) else int(len(data) * keep)])


def _ckpt_folder(ctx: Ctx) -> Path:
    return ckpt.find_checkpoint(ctx.run, "last")


def _per_row_data(ctx: Ctx) -> None:
    """One feature row per caption (SCAN layout) and per-row ids where image 2's rows disagree."""
    ims = np.load(ctx.data / "train_ims.npy")
    np.save(ctx.data / "train_ims.npy", np.repeat(ims, 5, axis=0))
    ids = np.repeat(np.arange(len(ims)), 5)
    ids[11] = 999
    (ctx.data / "train_ids.txt").write_text("".join(f"{i}\n" for i in ids))


def _jpeg_bytes(ctx: Ctx, name: str, keep: float) -> None:
    _truncate(ctx.images / name, keep)


# ---------------------------------------------------------------------------------------------
# The catalogue
# ---------------------------------------------------------------------------------------------
@dataclass
class Case:
    id: str
    group: str                     # data, images, config, start, checkpoint
    input: str                     # what is wrong, in words (for the docs table)
    error: type
    names: str                     # must appear in the message (file or field)
    problem: str                   # regex the message must match
    setup: Callable[[Ctx], Any] = lambda ctx: None
    overrides: dict = field(default_factory=dict)
    trigger: Optional[Callable[[Ctx], Any]] = None   # default per group


def _train(ctx: Ctx, overrides: dict) -> Any:
    return Trainer(ctx.cfg(**overrides), progress=False)


def _extract(ctx: Ctx, overrides: dict) -> Any:
    from userlab.data.features import extract_folder
    return extract_folder(ctx.images, ctx.images / "captions.txt", ctx.out, device="cpu",
                          progress=False, input_size=SIDE, batch_size=2)


def _from_dict(**dotted: Any) -> Callable[[Ctx], Any]:
    def trigger(ctx: Ctx) -> Any:
        data = ExperimentConfig().to_dict()
        for key, value in dotted.items():
            node = data
            *parents, last = key.split(".")
            for part in parents:
                node = node.setdefault(part, {})
            node[last] = value
        return ExperimentConfig.from_dict(data)
    return trigger


DEFAULT_TRIGGER = {"data": _train, "start": _train, "checkpoint": _train, "images": _extract}

CASES: list[Case] = [
    # -- precomputed data files (Trainer -> prepare_data) ----------------------------------
    Case("ims_truncated", "data", "`train_ims.npy` cut to half its bytes", DataError,
         "train_ims.npy", r"truncated: shape \(24, 4, 8\) needs 3072 bytes",
         lambda c: _truncate(c.data / "train_ims.npy", 0.5)),
    Case("ims_truncated_header", "data", "`train_ims.npy` cut inside its header (40 bytes)", DataError,
         "train_ims.npy", r"not a readable \.npy file",
         lambda c: _truncate(c.data / "train_ims.npy", 40)),
    Case("ims_not_npy", "data", "`train_ims.npy` holds text, not an array", DataError,
         "train_ims.npy", r"not a readable \.npy file",
         lambda c: (c.data / "train_ims.npy").write_text("hello, I am not numpy\n")),
    Case("ims_2d", "data", "features of shape `(24, 32)` (2-D)", DataError,
         "train_ims.npy", r"ndim 2 .*expected 3",
         lambda c: np.save(c.data / "train_ims.npy", np.zeros((24, 32), np.float32))),
    Case("ims_object", "data", "object array (pickled Python objects)", DataError,
         "train_ims.npy", r"dtype object; expected float32 or float16",
         lambda c: np.save(c.data / "train_ims.npy", np.full((24, 4, 8), None, dtype=object),
                           allow_pickle=True)),
    Case("ims_int", "data", "int32 features", DataError, "train_ims.npy", r"dtype int32",
         lambda c: np.save(c.data / "train_ims.npy", np.ones((24, 4, 8), np.int32))),
    Case("ims_nan_first_row", "data", "a NaN in row 0", DataError, "train_ims.npy",
         r"row 0 holds NaN or Inf",
         lambda c: _edit_npy(c.data / "train_ims.npy", lambda a: _set(a, (0, 1, 2), np.nan))),
    Case("ims_inf_middle_row", "data", "+Inf in row 13 (not in the sampled rows)", DataError,
         "train_ims.npy", r"row 13 holds NaN or Inf",
         lambda c: _edit_npy(c.data / "train_ims.npy", lambda a: _set(a, (13, 3, 7), np.inf))),
    Case("ims_rows_mismatch", "data", "23 feature rows for 24 images", DataError, "train_ims.npy",
         r"has 23 rows.*120 captions for 24 images",
         lambda c: np.save(c.data / "train_ims.npy", np.zeros((23, 4, 8), np.float32))),
    Case("ims_missing", "data", "`train_ims.npy` deleted", DataError, "train_ims.npy",
         r"region features file is missing",
         lambda c: (c.data / "train_ims.npy").unlink()),
    Case("caps_not_5_per_image", "data", "119 captions (last one removed)", DataError,
         "train_caps.txt", r"119 captions, not 5 per image",
         lambda c: _rewrite_lines(c.data / "train_caps.txt", lambda ls: ls[:-1])),
    Case("caps_empty_line", "data", "caption line 4 is empty", DataError, "train_caps.txt",
         r"empty line at line 4",
         lambda c: _rewrite_lines(c.data / "train_caps.txt", lambda ls: ls[:3] + [""] + ls[4:])),
    Case("caps_not_utf8", "data", "bytes `ff fe` inside line 1", DataError, "train_caps.txt",
         r"not valid UTF-8: line 1",
         lambda c: (c.data / "train_caps.txt").write_bytes(
             b"a dog \xff\xfe here\n" + (c.data / "train_caps.txt").read_bytes().split(b"\n", 1)[1])),
    Case("caps_empty_file", "data", "empty captions file", DataError, "train_caps.txt",
         r"captions file is empty",
         lambda c: (c.data / "train_caps.txt").write_text("")),
    Case("caps_missing", "data", "`train_caps.txt` deleted", DataError, "train_caps.txt",
         r"captions file is missing",
         lambda c: (c.data / "train_caps.txt").unlink()),
    Case("ids_wrong_count", "data", "23 ids for 24 images", DataError, "train_ids.txt",
         r"holds 23 ids; expected one per row \(24\) or one per image",
         lambda c: _rewrite_lines(c.data / "train_ids.txt", lambda ls: ls[:-1])),
    Case("ids_not_integer", "data", "id line 3 is `abc`", DataError, "train_ids.txt",
         r"line 3 is not an integer id: 'abc'",
         lambda c: _rewrite_lines(c.data / "train_ids.txt", lambda ls: ls[:2] + ["abc"] + ls[3:])),
    Case("ids_disagree_within_image", "data", "per-row ids: the 5 rows of image 2 hold two ids",
         DataError, "train_ids.txt", r"rows 10\.\.14 belong to image 2 but hold different ids",
         _per_row_data),
    Case("guide_rows_mismatch", "data", "`train_guide.npy` with 23 rows for 24 images", DataError,
         "train_guide.npy", r"has 23 rows; expected one per image \(24\)",
         lambda c: np.save(c.data / "train_guide.npy", np.zeros((23, 6), np.float32))),
    Case("guide_nan", "data", "NaN in the guide embedding of image 0", DataError, "train_guide.npy",
         r"row 0 holds NaN or Inf",
         lambda c: _edit_npy(c.data / "train_guide.npy", lambda a: _set(a, (0, 0), np.nan))),
    Case("guide_missing_for_cge", "data", "no `train_guide.npy` but the model uses CGE", DataError,
         "train_ims.npy", r"CGE needs guide features",
         lambda c: (c.data / "train_guide.npy").unlink()),
    Case("boxes_wrong_shape", "data", "`train_boxes.npy` with 3 boxes per image for 4 regions",
         DataError, "train_boxes.npy", r"expected \(24, 4, 4\)",
         lambda c: np.save(c.data / "train_boxes.npy", np.zeros((24, 3, 4), np.float32))),
    Case("image_list_wrong_count", "data", "`train_images.txt` lists 2 images for 24", DataError,
         "train_images.txt", r"lists 2 images; expected one per image \(24\)",
         lambda c: (c.data / "train_images.txt").write_text("a.jpg\nb.jpg\n")),
    Case("region_dim_mismatch", "data", "8-d features, `model.region_dim = 16`", DataError,
         "train_ims.npy", r"8-d but model.region_dim is 16",
         overrides={"model.region_dim": 16}),
    Case("num_regions_mismatch", "data", "4 regions, `model.num_regions = 5` with SGE", DataError,
         "train_ims.npy", r"4 regions per image but model.num_regions is 5",
         overrides={"model.num_regions": 5}),
    Case("dev_split_missing", "data", "`dev_ims.npy` deleted (train split fine)", DataError,
         "dev_ims.npy", r"region features file is missing",
         lambda c: (c.data / "dev_ims.npy").unlink()),
    Case("data_root_missing", "data", "`data.root` names no folder", DataError, "nowhere",
         r"no precomputed features found", overrides={"data.root": "__TMP__/nowhere"}),
    Case("vocab_corrupt", "data", "`vocab.json` is not JSON", DataError, "vocab.json",
         r"not valid UTF-8 JSON",
         lambda c: (c.data / "vocab.json").write_text("{not json")),
    # -- image folders (userlab.data.features.extract_folder) -----------------------------
    Case("image_corrupt_jpeg", "images", "`b.jpg` holds random bytes", DataError, "b.jpg",
         r"cannot read image",
         lambda c: (c.images / "b.jpg").write_bytes(np.random.default_rng(0).bytes(2000))),
    Case("image_truncated_jpeg", "images", "`c.jpg` cut to 40% of its bytes", DataError, "c.jpg",
         r"cannot read image", lambda c: _jpeg_bytes(c, "c.jpg", 0.4)),
    Case("image_missing", "images", "`b.jpg` named in captions.txt but absent", DataError, "b.jpg",
         r"image named in captions.txt is missing", lambda c: (c.images / "b.jpg").unlink()),
    Case("image_four_captions", "images", "`a.jpg` has 4 captions", DataError, "captions.txt",
         r"exactly 5 captions: a.jpg has 4",
         lambda c: _rewrite_lines(c.images / "captions.txt", lambda ls: ls[1:])),
    Case("image_caption_no_tab", "images", "a captions line without a tab", DataError,
         "captions.txt", r"line 2 has no tab",
         lambda c: _rewrite_lines(c.images / "captions.txt",
                                  lambda ls: ls[:1] + [ls[1].replace("\t", " ")] + ls[2:])),
    Case("image_captions_not_utf8", "images", "captions.txt in Latin-1 (`caf\\xe9`)", DataError,
         "captions.txt", r"not valid UTF-8",
         lambda c: (c.images / "captions.txt").write_bytes(
             (c.images / "captions.txt").read_bytes().replace(b"photo", b"caf\xe9"))),
    # -- configs ------------------------------------------------------------------------------
    Case("config_unknown_key", "config", "`optim.lrr = 0.1` (typo)", ConfigError, "optim.lrr",
         r"unknown field", trigger=_from_dict(**{"optim.lrr": 0.1})),
    Case("config_wrong_type", "config", "`optim.epochs = \"ten\"`", ConfigError, "optim.epochs",
         r"expected an integer, got 'ten'", trigger=_from_dict(**{"optim.epochs": "ten"})),
    Case("config_bool_as_string", "config", "`momentum.enabled = \"yes\"`", ConfigError,
         "momentum.enabled", r"expected true/false", trigger=_from_dict(**{"momentum.enabled": "yes"})),
    Case("config_negative_queue", "config", "`momentum.queue_size = -8`", ConfigError,
         "momentum.queue_size", r"must be in \[1, 2\^24\], got -8",
         trigger=_from_dict(**{"momentum.queue_size": -8})),
    Case("config_queue_below_batch", "config", "queue 64 < batch 128", ConfigError,
         "momentum.queue_size", r"queue \(64\) is smaller than the batch \(128\)",
         trigger=_from_dict(**{"momentum.queue_size": 64, "data.batch_size": 128})),
    Case("config_bad_choice", "config", "`model.enhancement = \"sgee\"`", ConfigError,
         "model.enhancement", r"'sgee' is not one of none, sge, cge, sge\+cge",
         trigger=_from_dict(**{"model.enhancement": "sgee"})),
    Case("config_section_not_object", "config", "`\"optim\": 5`", ConfigError, "optim",
         r"expected an object, got int", trigger=_from_dict(**{"optim": 5})),
    Case("config_json_broken", "config", "config file with a JSON syntax error", ConfigError,
         "cfg.json", r"not valid JSON", lambda c: (c.tmp / "cfg.json").write_text('{"optim": {'),
         trigger=lambda c: ExperimentConfig.from_json(c.tmp / "cfg.json")),
    Case("config_lr_nan", "config", "`optim.lr = NaN` (JSON's NaN literal)", ConfigError, "optim.lr",
         r"must be a finite number", trigger=_from_dict(**{"optim.lr": float("nan")})),
    Case("config_grad_clip_inf", "config", "`optim.grad_clip = Infinity`", ConfigError, "optim.grad_clip",
         r"must be a finite number", trigger=_from_dict(**{"optim.grad_clip": float("inf")})),
    Case("config_grad_clip_negative", "config", "`optim.grad_clip = -2` (would flip the gradient)",
         ConfigError, "optim.grad_clip", r"must be in \(0, .*negative flips the gradient",
         trigger=_from_dict(**{"optim.grad_clip": -2.0})),
    Case("config_lr_decay_negative", "config", "`optim.lr_decay = -0.1` (negative learning rate)",
         ConfigError, "optim.lr_decay", r"must be in \(0, 1\].*negative flips the lr's sign",
         trigger=_from_dict(**{"optim.lr_decay": -0.1})),
    Case("config_log_every_zero", "config", "`log_every = 0` (was a ZeroDivisionError)", ConfigError,
         "log_every", r"must be >= 1, got 0", trigger=_from_dict(**{"log_every": 0})),
    Case("config_eval_every_zero", "config", "`eval_every = 0` (was a ZeroDivisionError after an epoch)",
         ConfigError, "eval_every", r"must be >= 1, got 0", trigger=_from_dict(**{"eval_every": 0})),
    Case("config_lr_times_weight_decay", "config", "`optim.lr = 2`, `optim.weight_decay = 1`",
         ConfigError, "optim.weight_decay", r"lr x weight_decay = 2 >= 1",
         trigger=_from_dict(**{"optim.lr": 2.0, "optim.weight_decay": 1.0})),
    Case("config_gpo_dim_odd", "config", "`model.gpo_dim = 33` (odd)", ConfigError, "model.gpo_dim",
         r"even, got 33", trigger=_from_dict(**{"model.gpo_dim": 33})),
    Case("config_online_one_branch", "config", "online schedule with `boost.num_branches = 1`",
         ConfigError, "boost.num_branches", r"nothing to learn from",
         trigger=_from_dict(**{"boost.schedule": "online", "boost.num_branches": 1})),
    Case("config_device_name", "config", "`optim.device = \"gpu\"`", ConfigError, "optim.device",
         r"'gpu' is not a device name", trigger=_from_dict(**{"optim.device": "gpu"})),
    # -- configs that only the data or the machine can refute (Trainer start) ------------------
    Case("config_batch_larger_than_split", "start", "`data.batch_size = 128` for 120 training captions",
         ConfigError, "data.batch_size", r"128 x 1 process\(es\) is more than the training split's "
         r"120 captions .*0 steps", overrides={"data.batch_size": 128, "momentum.queue_size": 128}),
    Case("config_device_unavailable", "start", "`optim.device = \"cuda:99\"`", ConfigError, "optim.device",
         r"'cuda:99' requested but this machine has", overrides={"optim.device": "cuda:99"}),
    # -- checkpoints (resume in Trainer(...), load_model) -------------------------------------
    Case("ckpt_model_file_missing", "checkpoint", "`last` names a folder without model.safetensors",
         CheckpointError, "last.txt", r"points at last-\d+, which has no model.safetensors",
         lambda c: (_ckpt_folder(c) / ckpt.MODEL_FILE).unlink()),
    Case("ckpt_pointer_dangling", "checkpoint", "`last.txt` names a folder that does not exist",
         CheckpointError, "last.txt", r"points at last-99999999",
         lambda c: (c.run / "checkpoints" / "last.txt").write_text("last-99999999\n")),
    Case("ckpt_state_missing", "checkpoint", "`state.pt` deleted", CheckpointError, "state.pt",
         r"missing", lambda c: (_ckpt_folder(c) / ckpt.STATE_FILE).unlink()),
    Case("ckpt_safetensors_truncated", "checkpoint", "`model.safetensors` cut in half",
         CheckpointError, "model.safetensors", r"not a readable safetensors file",
         lambda c: _truncate(_ckpt_folder(c) / ckpt.MODEL_FILE, 0.5)),
    Case("ckpt_state_truncated", "checkpoint", "`state.pt` cut in half", CheckpointError,
         "state.pt", r"not a readable checkpoint state",
         lambda c: _truncate(_ckpt_folder(c) / ckpt.STATE_FILE, 0.5)),
    Case("ckpt_wrong_shapes", "checkpoint", "resume with `model.embed_size = 32` (saved: 16)",
         CheckpointError, "model.safetensors", r"tensors of the wrong shape .*file \(16,\), model \(32,\)",
         overrides={"model.embed_size": 32}),
    Case("ckpt_other_variant", "checkpoint", "SGE+CGE checkpoint resumed as `enhancement = none`",
         CheckpointError, "model.safetensors", r"unexpected \(e\.g\. image_encoder\.(sge|cge)",
         overrides={"model.enhancement": "none"}),
    Case("ckpt_queue_size_changed", "checkpoint", "resume with `momentum.queue_size = 40` (saved: 20)",
         CheckpointError, "state.pt", r"does not match this run's config .*size mismatch",
         overrides={"momentum.queue_size": 40}),
    Case("load_model_no_checkpoint", "checkpoint", "`load_model` on a folder with no checkpoint",
         CheckpointError, "empty", r"no checkpoint here",
         lambda c: (c.tmp / "empty").mkdir(), trigger=lambda c: load_model(c.tmp / "empty")),
]


# -- issue 14: run folders, data identity, more raw tracebacks turned into named errors -------
def _png_bomb(path: Path, width: int = 40_000, height: int = 40_000) -> None:
    """A tiny PNG whose header claims ``width x height`` pixels (a decompression bomb)."""
    import io
    import struct
    import zlib
    buf = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    ihdr = 8  # after the signature: length (4), b"IHDR" (4), width (4), height (4), ...
    data[ihdr + 8: ihdr + 16] = struct.pack(">II", width, height)
    body = bytes(data[ihdr + 4: ihdr + 8 + 13])
    data[ihdr + 8 + 13: ihdr + 8 + 17] = struct.pack(">I", zlib.crc32(body) & 0xFFFFFFFF)
    path.write_bytes(bytes(data))


def _four_captions_per_caption_rows(ctx: Ctx) -> None:
    """30 images x 4 captions, one feature row per caption: 120 rows for the 120 captions."""
    per_image = np.random.default_rng(3).standard_normal((30, 4, 8)).astype(np.float32)
    np.save(ctx.data / "train_ims.npy", np.repeat(per_image, 4, axis=0))


def _other_vocab(ctx: Ctx) -> None:
    from userlab.data.text import SPECIAL_TOKENS, Vocabulary
    Vocabulary(list(SPECIAL_TOKENS) + ["zebra", "xylophone", "quartz", "a"]).save(ctx.data / "vocab.json")


def _swap_vocab_words(ctx: Ctx) -> None:
    """Same size, two word ids swapped: shapes still match, meanings do not."""
    import json
    path = ctx.data / "vocab.json"
    payload = json.loads(path.read_text(encoding="utf-8"))
    words = payload["idx2word"]
    words[-1], words[-2] = words[-2], words[-1]
    path.write_text(json.dumps(payload), encoding="utf-8")


def _hold_lock(ctx: Ctx) -> None:
    from userlab.runfolder import RunFolderLock
    ctx.held_lock = RunFolderLock(ctx.run).acquire()


def _train_locked(ctx: Ctx) -> Any:
    assert ctx.held_lock.held  # the holder keeps it (and its owner note) through the attempt
    return Trainer(ctx.cfg(), progress=False)


def _save_on_full_disk(ctx: Ctx) -> Any:
    import errno

    def full(obj, f, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
    real = torch.save
    torch.save = full
    try:
        return ckpt.save_checkpoint(ctx.run, "last", 7, {"w": torch.zeros(2)}, {"step": 7}, "{}\n")
    finally:
        torch.save = real


def _change_one_caption(ctx: Ctx) -> None:
    _rewrite_lines(ctx.data / "train_caps.txt", lambda ls: [ls[1]] + ls[1:])


CASES += [
    Case("vocab_from_other_captions", "data", "`vocab.json` built from other captions (4 words)",
         DataMismatchError, "vocab.json", r"knows only \d+\.\d% of the \d+ word tokens of .*train_caps\.txt",
         _other_vocab),
    Case("per_caption_rows_4_per_image", "data", "30 images x 4 captions, one feature row per caption "
         "(120 rows, 120 captions: would group as 24 x 5)", DataError, "train_ims.npy",
         r"rows 0 and 4 \(image 0, captions 0\.\.4\) differ", _four_captions_per_caption_rows),
    Case("ims_float64_beyond_float32", "data", "float64 features, 1e300 in row 13 (not sampled)", DataError,
         "train_ims.npy", r"row 13 holds values beyond float32's range",
         lambda c: _edit_npy(c.data / "train_ims.npy", lambda a: _set(a.astype(np.float64), (13, 0, 0), 1e300))),
    Case("guide_float64_beyond_float32", "data", "float64 guide, -1e39 in row 20", DataError,
         "train_guide.npy", r"row 20 holds values beyond float32's range",
         lambda c: _edit_npy(c.data / "train_guide.npy", lambda a: _set(a.astype(np.float64), (20, 1), -1e39))),
    Case("boxes_nan", "data", "NaN in `train_boxes.npy` row 9", DataError, "train_boxes.npy",
         r"region boxes row 9 holds NaN or Inf",
         lambda c: np.save(c.data / "train_boxes.npy", _set(np.ones((24, 4, 4), np.float32), (9, 2, 1), np.nan))),
    Case("image_decompression_bomb", "images", "`b.jpg` is a 200-byte PNG claiming 40000 x 40000 pixels",
         DataError, "b.jpg", r"decompression-bomb limit", lambda c: _png_bomb(c.images / "b.jpg")),
    Case("device_missing_gpu", "config", "`optim.device = \"cuda:7\"`", ConfigError, "optim.device",
         r"'cuda:7'", trigger=lambda c: Trainer(c.cfg(**{"optim.device": "cuda:7"}), progress=False)),
    Case("device_unknown", "config", "`optim.device = \"tpu\"`", ConfigError, "optim.device",
         r"'tpu' is not a device name", trigger=lambda c: Trainer(c.cfg(**{"optim.device": "tpu"}), progress=False)),
    Case("log_binary", "checkpoint", "`train_log.csv` holds random bytes", DataError, "train_log.csv",
         r"training log is not (UTF-8 text|a readable CSV)",
         lambda c: (c.run / "train_log.csv").write_bytes(np.random.default_rng(1).bytes(300))),
    Case("log_blank", "checkpoint", "`eval_log.csv` holds only blank lines", DataError, "eval_log.csv",
         r"training log is not a readable CSV", lambda c: (c.run / "eval_log.csv").write_text("\n\n\n")),
    Case("log_foreign_csv", "checkpoint", "`train_log.csv` is some other CSV (no `step` column)", DataError,
         "train_log.csv", r"has no 'step' column", lambda c: (c.run / "train_log.csv").write_text("a,b\n1,2\n")),
    Case("pointer_not_utf8", "checkpoint", "`last.txt` holds bytes `ff fe`", CheckpointError, "last.txt",
         r"is not UTF-8 text", lambda c: (c.run / "checkpoints" / "last.txt").write_bytes(b"\xff\xfelast\n")),
    Case("best_pointer_not_utf8", "checkpoint", "`best.txt` undecodable (`load_model`)", CheckpointError,
         "best.txt", r"is not UTF-8 text", lambda c: (c.run / "checkpoints" / "best.txt").write_bytes(b"\x80\x81"),
         trigger=lambda c: load_model(c.run, tag="best")),
    Case("pointer_leaves_folder", "checkpoint", "`last.txt` holds `../../elsewhere`", CheckpointError, "last.txt",
         r"should hold one checkpoint folder name",
         lambda c: (c.run / "checkpoints" / "last.txt").write_text("../../elsewhere\n")),
    Case("ckpt_vocab_missing", "checkpoint", "checkpoint without `vocab.json` (`load_model`, GRU text encoder)",
         CheckpointError, "vocab.json", r"missing: the checkpoint's GRU text encoder needs the vocabulary",
         lambda c: (_ckpt_folder(c) / "vocab.json").unlink(), trigger=lambda c: load_model(c.run, tag="last")),
    Case("resume_changed_lr", "checkpoint", "resume with `optim.lr = 0.01` (saved: 0.001)", ConfigError,
         "optim.lr", r"trained with 0\.001, this run asks for 0\.01.*--allow-config-change",
         overrides={"optim.lr": 0.01}),
    Case("resume_changed_grad_clip", "checkpoint", "resume with `optim.grad_clip = 5` and batch 4", ConfigError,
         "data.batch_size", r"trained with 8, this run asks for 4 \(and 1 more: optim\.grad_clip\)",
         overrides={"optim.grad_clip": 5.0, "data.batch_size": 4}),
    Case("resume_changed_captions", "checkpoint", "resume after one train caption was replaced", DataMismatchError,
         "train_ims.npy", r"split 'train' differs from the one the checkpoint .* captions file hash",
         _change_one_caption),
    Case("resume_vocab_reordered", "checkpoint", "resume with two word ids of `vocab.json` swapped",
         DataMismatchError, "vocab.json", r"vocabulary differs from this run's", _swap_vocab_words),
    Case("run_folder_locked", "checkpoint", "a second Trainer while another holds the run folder",
         RunLockedError, "run", r"run folder is in use by pid \d+ on .* since", _hold_lock, trigger=_train_locked),
    Case("disk_full_during_save", "checkpoint", "`save_checkpoint` with the disk full (ENOSPC)", CheckpointError,
         "state.pt", r"could not write the last checkpoint of step 7: No space left on device.*previous last "
         r"checkpoint is intact", trigger=_save_on_full_disk),
]


@dataclass
class CliCase:
    id: str
    input: str
    argv: list[str]                # "__TMP__" is replaced by the case folder
    names: str
    problem: str
    subprocess: bool = False       # run ``python -m userlab`` for real (slower) or cli.main()
    setup: Callable[[Path], Any] = lambda tmp: None


CLI_CASES: list[CliCase] = [
    CliCase("cli_set_without_equals", "`userlab train --set nonsense`",
            ["train", "--set", "nonsense", "--run-dir", "__TMP__/run"], "nonsense",
            r"--set expects KEY=VALUE", subprocess=True),
    CliCase("cli_set_unknown_field", "`userlab train --set optim.lrr=1`",
            ["train", "--set", "optim.lrr=1", "--run-dir", "__TMP__/run"], "optim.lrr", r"unknown field"),
    CliCase("cli_set_wrong_type", "`userlab train --set optim.lr=fast`",
            ["train", "--set", "optim.lr=fast", "--run-dir", "__TMP__/run"], "optim.lr",
            r"expected a number, got 'fast'"),
    CliCase("cli_unknown_preset", "`userlab train --preset f31k`",
            ["train", "--preset", "f31k", "--run-dir", "__TMP__/run"], "preset", r"unknown preset 'f31k'"),
    CliCase("cli_config_file_missing", "`userlab train --config missing.json`",
            ["train", "--config", "__TMP__/missing.json", "--run-dir", "__TMP__/run"], "missing.json",
            r"file not found"),
    CliCase("cli_data_root_missing", "`userlab train --data nowhere`",
            ["train", "--data", "__TMP__/nowhere", "--run-dir", "__TMP__/run", "--no-progress"],
            "nowhere", r"no precomputed features found"),
    CliCase("cli_eval_without_checkpoint", "`userlab eval <empty folder>`",
            ["eval", "__TMP__/empty"], "empty", r"no checkpoint here", subprocess=True),
    CliCase("cli_extract_missing_captions", "`userlab extract --captions missing.txt`",
            ["extract", "--images", "__TMP__", "--captions", "__TMP__/missing.txt", "--out", "__TMP__/out"],
            "missing.txt", r"captions file is missing"),
    CliCase("cli_set_lr_nan", "`userlab train --set optim.lr=NaN`",
            ["train", "--set", "optim.lr=NaN", "--run-dir", "__TMP__/run"], "optim.lr",
            r"must be a finite number"),
    CliCase("cli_set_log_every_zero", "`userlab train --set log_every=0`",
            ["train", "--set", "log_every=0", "--run-dir", "__TMP__/run"], "log_every", r"must be >= 1"),
    CliCase("cli_eval_csv_unwritable", "`userlab eval run --csv notes.txt/metrics.csv` (notes.txt is a file)",
            ["eval", "__TMP__/empty", "--csv", "__TMP__/notes.txt/metrics.csv"], "metrics.csv",
            r"--csv: .*notes\.txt is a file, not a folder",
            setup=lambda tmp: (tmp / "notes.txt").write_text("x\n")),
    CliCase("cli_eval_unknown_protocol", "`userlab eval run --protocol f30k`", ["eval", "__TMP__/empty",
            "--protocol", "f30k"], "--protocol", r"'f30k' is not one of f30k_1k, coco_5k"),
    CliCase("cli_extract_missing_gpu", "`userlab extract --device cuda:7`", ["extract", "--images", "__TMP__/imgs",
            "--captions", "__TMP__/imgs/captions.txt", "--out", "__TMP__/out", "--device", "cuda:7"], "device",
            r"'cuda:7'", setup=lambda tmp: write_image_folder(tmp / "imgs")),
    CliCase("cli_train_max_steps_zero", "`userlab train --max-steps 0`", ["train", "--max-steps", "0",
            "--run-dir", "__TMP__/run"], "--max-steps", r"must be >= 1, got 0"),
]


# ---------------------------------------------------------------------------------------------
# Running a case
# ---------------------------------------------------------------------------------------------
def tree(folder: Path) -> dict[str, tuple]:
    """Every file and folder under ``folder`` with its size and modification time."""
    out = {}
    for p in sorted(folder.rglob("*")):
        st = p.stat()
        out[str(p.relative_to(folder))] = ("dir",) if p.is_dir() else (st.st_size, st.st_mtime_ns)
    return out


def run_case(case: Case, tmp: Path, base: tuple[Path, Path]) -> BaseException:
    """Set the case up under ``tmp``, trigger it, return the exception (after the checks)."""
    ctx = make_ctx(tmp, base, case.group)
    case.setup(ctx)
    overrides = {k: (v.replace("__TMP__", str(tmp)) if isinstance(v, str) else v)
                 for k, v in case.overrides.items()}
    trigger = case.trigger or (lambda c: DEFAULT_TRIGGER[case.group](c, overrides))
    before = tree(tmp)
    with pytest.raises(UserlabError) as info:
        trigger(ctx)
    err = info.value
    after = tree(tmp)
    assert after == before, f"{case.id} left changes behind: {set(after) ^ set(before)}"
    assert not (ctx.run / "train_log.csv").exists() or case.group == "checkpoint"
    return err


def check_message(err: BaseException, expected: type, names: str, problem: str) -> str:
    text = str(err)
    assert isinstance(err, expected), f"{type(err).__name__}: {text}"
    assert names in text, f"message does not name {names!r}: {text}"
    assert re.search(problem, text), f"message does not say {problem!r}: {text}"
    assert "\n" not in text, f"message spans several lines: {text!r}"
    return text


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> tuple[Path, Path]:
    return build_base(tmp_path_factory.mktemp("base"))


def test_catalogue_is_large_and_ids_are_unique():
    ids = [c.id for c in CASES] + [c.id for c in CLI_CASES]
    assert len(ids) == len(set(ids)) and len(ids) >= 25


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_refused_early_and_cleanly(case, tmp_path, base):
    err = run_case(case, tmp_path, base)
    check_message(err, case.error, case.names, case.problem)


def _cli_argv(case: CliCase, tmp: Path) -> list[str]:
    return [a.replace("__TMP__", str(tmp)) for a in case.argv]


def run_cli_case(case: CliCase, tmp: Path, capsys=None) -> tuple[int, str, str]:
    (tmp / "empty").mkdir(exist_ok=True)
    case.setup(tmp)
    argv = _cli_argv(case, tmp)
    before = tree(tmp)
    if case.subprocess:
        proc = subprocess.run([sys.executable, "-m", "userlab", *argv], cwd=tmp, env=ENV,
                              capture_output=True, text=True, timeout=120)
        rc, out, err = proc.returncode, proc.stdout, proc.stderr
    else:
        cwd = os.getcwd()
        os.chdir(tmp)  # presets name relative folders (data/demo, runs/...)
        try:
            if capsys is not None:
                capsys.readouterr()
                rc = cli.main(argv)
                out, err = capsys.readouterr()
            else:
                import contextlib
                import io
                buf_out, buf_err = io.StringIO(), io.StringIO()
                with contextlib.redirect_stdout(buf_out), contextlib.redirect_stderr(buf_err):
                    rc = cli.main(argv)
                out, err = buf_out.getvalue(), buf_err.getvalue()
        finally:
            os.chdir(cwd)
    assert tree(tmp) == before, f"{case.id} left files behind"
    return rc, out, err


@pytest.mark.parametrize("case", CLI_CASES, ids=[c.id for c in CLI_CASES])
def test_cli_bad_input_exits_2_with_one_line(case, tmp_path, capsys):
    rc, out, err = run_cli_case(case, tmp_path, capsys)
    assert rc == 2, (rc, out, err)
    lines = [line for line in err.splitlines() if line.strip()]
    # one line, no traceback; python may print unrelated warnings first in a subprocess
    lines = [line for line in lines if "Warning" not in line and not line.startswith("  ")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    command = case.argv[0]
    assert lines[0].startswith(f"userlab {command}: error: "), lines[0]
    assert case.names in lines[0] and re.search(case.problem, lines[0]), lines[0]
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------
# Checkpoints that carry code: refused, never run
# ---------------------------------------------------------------------------------------------
class _Planted:
    """Unpickling this runs ``touch <target>``: proof that code ran."""

    def __init__(self, target: Path):
        self.target = str(target)

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def _plant(path: Path, target: Path) -> None:
    path.write_bytes(pickle.dumps({"encoder.weight": _Planted(target)}))


def test_planted_payload_is_live(tmp_path):
    """Control: the planted bytes do run code when unpickled naively (so the tests below mean
    something)."""
    target = tmp_path / "ran"
    pickle.loads(pickle.dumps(_Planted(target)))
    assert target.exists()


@pytest.mark.parametrize("entry", ["load_model_state", "load_model", "trainer_resume"])
def test_pickle_posing_as_safetensors_is_refused(tmp_path, base, entry):
    ctx = make_ctx(tmp_path, base, "checkpoint")
    folder = ckpt.find_checkpoint(ctx.run, "last")
    target = tmp_path / "pwned"
    _plant(folder / ckpt.MODEL_FILE, target)
    before = tree(tmp_path)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a readable safetensors file"):
        if entry == "load_model_state":
            ckpt.load_model_state(folder)
        elif entry == "load_model":
            load_model(ctx.run, tag="last")
        else:
            Trainer(ctx.cfg(), progress=False)
    assert not target.exists()
    assert tree(tmp_path) == before


def test_pickled_train_state_is_refused_on_resume(tmp_path, base):
    """A planted ``state.pt`` (valid model file beside it) stops the resume; nothing runs."""
    ctx = make_ctx(tmp_path, base, "checkpoint")
    folder = ckpt.find_checkpoint(ctx.run, "last")
    target = tmp_path / "pwned"
    (folder / ckpt.STATE_FILE).write_bytes(pickle.dumps({"step": _Planted(target)}))
    before = tree(tmp_path)
    with pytest.raises(CheckpointError, match=r"state\.pt: refused"):
        Trainer(ctx.cfg(), progress=False)
    assert not target.exists()
    assert tree(tmp_path) == before


# ---------------------------------------------------------------------------------------------
# Unusual inputs that must work
# ---------------------------------------------------------------------------------------------
def test_unusual_images_are_accepted_and_match_their_rgb_versions(tmp_path):
    """Greyscale, CMYK, RGBA and 1x1-pixel images are read (not refused).

    Decision for 1x1 images: they work. The backbone resizes every image to its input square, so
    a 1x1 image becomes a flat colour; its features are valid (finite) if not informative.
    Each odd image must give exactly the features of the same picture stored as plain RGB.
    """
    from userlab.data.features import extract_folder, load_image
    odd, plain = tmp_path / "odd", tmp_path / "plain"
    odd.mkdir(), plain.mkdir()
    _photo(40, 30, 1, "L").save(odd / "grey.jpg")
    _photo(40, 30, 2, "CMYK").save(odd / "cmyk.jpg")
    rgba = _photo(40, 30, 3, "RGBA")
    rgba.putalpha(200)
    rgba.save(odd / "alpha.png")
    Image.new("RGB", (1, 1), (200, 30, 90)).save(odd / "dot.png")
    names = ["grey.jpg", "cmyk.jpg", "alpha.png", "dot.png"]
    assert Image.open(odd / "cmyk.jpg").mode == "CMYK" and Image.open(odd / "grey.jpg").mode == "L"
    for n in names:   # the RGB twin, lossless
        load_image(odd / n).save(plain / (n + ".png"))
    lines = [f"{n}\t{n} caption {j}" for n in names for j in range(5)]
    (odd / "captions.txt").write_text("\n".join(lines) + "\n")
    (plain / "captions.txt").write_text("\n".join(l.replace("\t", ".png\t", 1) for l in lines) + "\n")
    for folder in (odd, plain):
        extract_folder(folder, folder / "captions.txt", folder / "out", device="cpu", progress=False,
                       input_size=SIDE)
    a, b = np.load(odd / "out" / "train_ims.npy"), np.load(plain / "out" / "train_ims.npy")
    assert a.shape == (4, (SIDE // 32) ** 2, 1280) and np.isfinite(a).all()
    np.testing.assert_array_equal(a, b)
    assert np.load(odd / "out" / "train_boxes.npy")[3].max() == 1.0  # the 1x1 image's grid
    # greyscale really went through as 3 equal channels
    grey = np.asarray(load_image(odd / "grey.jpg"))
    assert (grey[..., 0] == grey[..., 1]).all() and (grey[..., 1] == grey[..., 2]).all()


def test_crlf_bom_and_float16_data_are_accepted(tmp_path, base):
    """Windows line endings, a UTF-8 byte-order mark and float16 features are not errors."""
    data = tmp_path / "data"
    shutil.copytree(base[0], data)
    caps = data / "train_caps.txt"
    text = caps.read_text(encoding="utf-8")
    caps.write_bytes(b"\xef\xbb\xbf" + text.replace("\n", "\r\n").encode("utf-8"))
    ims = np.load(data / "train_ims.npy")
    np.save(data / "train_ims.npy", ims.astype(np.float16))
    trainer = Trainer(tiny_config(data, tmp_path / "run"), progress=False)
    assert trainer.data.train.captions == text.splitlines()
    item = trainer.data.train.image_item(3)
    np.testing.assert_array_equal(item["regions"].numpy(), ims[3].astype(np.float16).astype(np.float32))


# ---------------------------------------------------------------------------------------------
# The docs table
# ---------------------------------------------------------------------------------------------
def test_docs_table_lists_every_case():
    text = DOC.read_text(encoding="utf-8")
    rows = {line.split("|")[1].strip().strip("`"): line for line in text.splitlines()
            if line.startswith("| `")}
    for case in CASES:
        assert case.id in rows, f"docs/bad-inputs.md lacks {case.id}: run python tests/test_bad_inputs.py"
        assert case.error.__name__ in rows[case.id]
    for case in CLI_CASES:
        assert case.id in rows, f"docs/bad-inputs.md lacks {case.id}: run python tests/test_bad_inputs.py"


def _cell(text: str, limit: int = 150) -> str:
    text = " ".join(text.split())
    text = text if len(text) <= limit else text[: limit - 1] + "…"
    return text.replace("|", "\\|")


def write_doc() -> None:
    """Run every case and rewrite docs/bad-inputs.md with the messages actually produced."""
    rows_by_group: dict[str, list[str]] = {}
    with tempfile.TemporaryDirectory() as td:
        td = Path(td)
        base_ = build_base(td / "base")
        for k, case in enumerate(CASES):
            tmp = td / f"case{k}"
            tmp.mkdir()
            err = run_case(case, tmp, base_)
            msg = check_message(err, case.error, case.names, case.problem)
            msg = msg.replace(str(tmp) + "/", "…/").replace(str(tmp), "…")
            # what changes from run to run: pid, host, time, temporary names
            msg = re.sub(r"pid \d+ on \S+ since [\d-]+ [\d:]+", "pid N on HOST since TIME", msg)
            msg = re.sub(r"/\.(last|best)-\w{8}/", r"/.\1-XXXXXXXX/", msg)
            rows_by_group.setdefault(case.group, []).append(
                f"| `{case.id}` | {_cell(case.input)} | `{type(err).__name__}` | {_cell(msg)} |")
        for k, case in enumerate(CLI_CASES):
            tmp = td / f"cli{k}"
            tmp.mkdir()
            rc, _, err = run_cli_case(case, tmp)
            line = [l for l in err.splitlines() if l.startswith("userlab ")][0]
            line = line.replace(str(tmp) + "/", "…/").replace(str(tmp), "…")
            rows_by_group.setdefault("cli", []).append(
                f"| `{case.id}` | {_cell(case.input)} | exit {rc} | {_cell(line)} |")
    titles = {"data": "Precomputed data files (`Trainer(cfg)` → `prepare_data`)",
              "images": "Image folders (`userlab.data.features.extract_folder`)",
              "config": "Configurations (`ExperimentConfig.from_dict` / `from_json`)",
              "start": "Configurations the data or the machine refute (`Trainer(cfg)`, before a row is scanned or a step taken)",
              "checkpoint": "Checkpoints (resume in `Trainer(cfg)`, `load_model`)",
              "cli": "Command line (`python -m userlab ...`)"}
    n = len(CASES) + len(CLI_CASES)
    parts = [
        "# Bad inputs and what userlab says about them",
        "",
        "<!-- generated by `.venv/bin/python tests/test_bad_inputs.py`; do not edit by hand -->",
        "",
        f"{n} malformed inputs, each checked by `tests/test_bad_inputs.py`. For every one, userlab",
        "raises a `userlab.errors.UserlabError` subclass (`DataError` and its `DataMismatchError`,",
        "`ConfigError`, `CheckpointError`, `RunLockedError`) whose one-line message names the file or",
        "config field and the problem.",
        "The error comes before any training starts (while `Trainer(...)` is being built, or before",
        "`extract_folder` writes anything), and the case's folders are left exactly as they were:",
        "no log, no checkpoint, no temporary file, no `vocab.json` written into a broken data folder.",
        "The command line turns these errors into exit status 2 and one line on stderr",
        "(`--debug` shows the traceback). `…/` stands for the case's folder.",
        "",
        "Limits: feature files up to 512 MiB (`pipeline.FULL_CHECK_MAX_BYTES`) are scanned whole for",
        "NaN/Inf before training; larger files are checked on a sample of rows when opened and each",
        "row again when it is read, so a NaN deep inside a large file stops training when its batch",
        "comes up (still a `DataError` naming the file and row).",
        "",
        "The allowed range of every numeric config field, and the rules across fields, are in",
        "`docs/config-ranges.md`; training that turns non-finite is stopped by the finite guard",
        "described there (`NonFiniteError`).",
        "",
    ]
    for group, title in titles.items():
        head = "| case | input | result | message |" if group == "cli" else "| case | input | error | message |"
        parts += [f"## {title}", "", head, "|---|---|---|---|", *rows_by_group[group], ""]
    parts += [
        "## Unusual inputs that are accepted",
        "",
        "| input | behaviour |",
        "|---|---|",
        "| greyscale JPEG (mode `L`) | converted to RGB (three equal channels); features equal those of the RGB copy |",
        "| CMYK JPEG | converted to RGB by Pillow; features equal those of the RGB copy |",
        "| RGBA / LA / transparent palette PNG | laid on white, then RGB |",
        "| 1x1-pixel image | **works**: resized to the backbone's input square like every image (a flat colour); "
        "features are finite but carry no content. Decided so because refusing would stop a whole folder "
        "for one thumbnail; filter such images beforehand if they matter |",
        "| captions with CRLF line ends or a UTF-8 byte-order mark | read as plain lines |",
        "| float16 (or float64) features | read and cast to float32 per row (float64 values beyond float32's "
        "range are refused before training, see `ims_float64_beyond_float32`) |",
        "| a 0-byte `train_log.csv` / `eval_log.csv` in a run folder | treated as no log yet: a process killed "
        "between creating the log and writing its first row leaves exactly this, so refusing it would "
        "block an honest resume (blank lines or other content are errors, see `log_blank`) |",
        "| `eval` on a split that changed since training, or an ensemble of runs that read different data | "
        "refused (`DataMismatchError`, see `tests/test_run_folders.py`); `--allow-data-mismatch` "
        "evaluates anyway |",
        "",
    ]
    DOC.write_text("\n".join(parts), encoding="utf-8")
    print(f"wrote {DOC} ({n} cases)")


if __name__ == "__main__":
    write_doc()

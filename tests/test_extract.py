"""Whole-dataset extraction: features equal the backbone's, splits, bad images, resume, training.

A tiny Flickr-style dataset (8 generated images in RGB, greyscale, CMYK, RGBA and palette modes,
token file and split lists written here) is extracted once at a 64-px backbone input (2x2 grid)
with ``chunk_size=2``; the other tests compare against that reference run.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from userlab.data import captions as captions_module
from userlab.data import extract as extract_module
from userlab.data.extract import ImageFileDataset, collate_images, extract_dataset
from userlab.data.features import RegionBackbone, grid_boxes, load_image
from userlab.data.precomp import PrecompDataset
from userlab.errors import DataError

SIDE = 64
GRID = (SIDE // 32) ** 2
REPO = Path(__file__).resolve().parents[1]
# name, PIL mode, size; the first 5 are train, then 2 dev, 1 test
IMAGES = [("1001_a.jpg", "RGB", (64, 48)), ("1002_b.jpg", "L", (40, 56)),
          ("1003_c.jpg", "CMYK", (50, 50)), ("1004_d.png", "RGBA", (72, 40)),
          ("1005_e.png", "P", (48, 64)), ("1006_f.jpg", "RGB", (80, 60)),
          ("1007_g.jpg", "RGB", (36, 36)), ("1008_h.png", "RGB", (60, 45))]
SPLITS = {"train": [n for n, _, _ in IMAGES[:5]], "dev": [n for n, _, _ in IMAGES[5:7]],
          "test": [IMAGES[7][0]]}


@contextlib.contextmanager
def counting_feature_rows():
    """Record the number of images each backbone batch computes during the ``with`` block."""
    calls: list[int] = []
    original = extract_module._FeatureRunner.__call__

    def counting(self, batch, rows):
        calls.append(len(rows))
        return original(self, batch, rows)

    extract_module._FeatureRunner.__call__ = counting
    try:
        yield calls
    finally:
        extract_module._FeatureRunner.__call__ = original


def _picture(mode: str, size: tuple[int, int], seed: int) -> Image.Image:
    """Smooth colours plus a rectangle, converted to ``mode`` (the backbone sees structure)."""
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (3, 3, 3), dtype=np.uint8)).resize(size, Image.BILINEAR)
    w, h = size
    img.paste(tuple(int(v) for v in rng.integers(0, 256, 3)), (w // 4, h // 4, w // 2, h // 2))
    if mode == "RGBA":
        img = img.convert("RGBA")
        img.putalpha(Image.linear_gradient("L").resize(size))
        return img
    return img.convert(mode)


def _caption(name: str, k: int) -> str:
    return f"picture {name.split('_')[1][0]} sentence {k} with a dog"


def _write_dataset(root: Path) -> dict:
    images = root / "Flicker8k_Dataset"
    images.mkdir(parents=True)
    for seed, (name, mode, size) in enumerate(IMAGES):
        _picture(mode, size, seed).save(images / name)
    lines = [f"{name}#{k}\t{_caption(name, k)}" for name, _, _ in IMAGES for k in range(5)]
    (root / "Flickr8k.token.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    lists = {}
    for split, names in SPLITS.items():
        lists[split] = str(root / f"Flickr_8k.{split}Images.txt")
        Path(lists[split]).write_text("\n".join(names) + "\n", encoding="utf-8")
    return {"format": "flickr", "captions_path": str(root / "Flickr8k.token.txt"),
            "image_root": str(images), "split_files": lists}


def _args(dataset: dict, out: Path, **over) -> dict:
    args = dict(dataset, out_dir=str(out), chunk_size=2, batch_size=2, num_workers=0,
                input_size=SIDE, device="cpu", progress=False)
    args.update(over)
    return args


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """(base folder, dataset arguments, reference precomp folder)."""
    base = tmp_path_factory.mktemp("extract")
    dataset = _write_dataset(base / "flickr8k")
    ref = extract_dataset(**_args(dataset, base / "ref"))
    return base, dataset, ref


@pytest.fixture(scope="module")
def backbone():
    return RegionBackbone("cpu", input_size=SIDE)


# ---------------------------------------------------------------------------------------------
# What is written
# ---------------------------------------------------------------------------------------------
def test_extracted_split_equals_backbone_per_image(data, backbone):
    base, dataset, ref = data
    assert sorted(p.name for p in ref.iterdir() if p.name.endswith("_ims.npy")) == [
        "dev_ims.npy", "test_ims.npy", "train_ims.npy"]
    assert not (ref / ".chunks").exists()                 # chunks removed once assembled
    root = Path(dataset["image_root"])
    for split, names in SPLITS.items():
        ds = PrecompDataset(ref, split)
        assert ds.num_images == len(names) and (ds.num_regions, ds.feature_dim) == (GRID, 1280)
        assert ds.captions == [_caption(n, k) for n in names for k in range(5)]
        assert ds.ids.tolist() == [IMAGES.index(next(i for i in IMAGES if i[0] == n)) for n in names]
        assert ds.image_paths == [(root / n).resolve() for n in names]
        ims = np.load(ref / f"{split}_ims.npy")
        guide = np.load(ref / f"{split}_guide.npy")
        boxes = np.load(ref / f"{split}_boxes.npy")
        for row, name in enumerate(names):
            image = load_image(root / name)
            regions, pooled, _ = backbone.encode([image])
            np.testing.assert_allclose(ims[row], regions[0].numpy(), rtol=1e-4, atol=1e-4)
            np.testing.assert_allclose(guide[row], F.normalize(pooled, dim=-1)[0].numpy(),
                                       rtol=1e-4, atol=1e-5)
            w, h = image.size
            np.testing.assert_array_equal(boxes[row], grid_boxes(w, h, SIDE // 32, SIDE // 32))
        assert np.allclose(np.linalg.norm(guide, axis=1), 1.0, atol=1e-5)


def test_worker_processes_give_the_same_bytes(data):
    base, dataset, ref = data
    out = extract_dataset(**_args(dataset, base / "workers", num_workers=2, splits=["train"]))
    written = _files(out)
    assert written and written == {k: v for k, v in _files(ref).items() if "train" in k}


def test_rerun_is_a_no_op_and_foreign_chunks_are_discarded(data, monkeypatch):
    base, dataset, ref = data
    out = base / "rerun"
    shutil.copytree(ref, out / "precomp")
    before = {p: p.stat().st_mtime_ns for p in (out / "precomp").iterdir()}
    monkeypatch.setattr(extract_module, "_FeatureRunner",
                        lambda *a, **k: pytest.fail("a finished split was recomputed"))
    extract_dataset(**_args(dataset, out))
    assert {p: p.stat().st_mtime_ns for p in (out / "precomp").iterdir()} == before
    monkeypatch.undo()

    # chunks left by a run with other settings must not be mixed in
    fresh = base / "foreign"
    stale = fresh / "precomp" / ".chunks" / "dev"
    stale.mkdir(parents=True)
    (stale / "manifest.json").write_text('{"fingerprint": "other settings"}')
    np.savez(stale / "chunk_00000.npz", ims=np.zeros((2, GRID, 1280), np.float32),
             guide=np.zeros((2, 1280), np.float32), boxes=np.zeros((2, GRID, 4), np.float32),
             ok=np.ones(2, bool), bad=np.array([], str), errors=np.array([], str))
    with pytest.warns(UserWarning, match="discarded"):
        extract_dataset(**_args(dataset, fresh, splits=["dev"]))
    assert _files(fresh / "precomp") == {k: v for k, v in _files(ref).items() if "dev" in k}


_KILL_SCRIPT = textwrap.dedent("""
    import json, sys, time
    from userlab.data import extract
    write = extract._write_chunk
    def slow_write(path, arrays):   # room for the parent to kill us between chunks
        write(path, arrays)
        time.sleep(1.5)
    extract._write_chunk = slow_write
    extract.extract_dataset(**json.loads(sys.argv[1]))
""")


def test_resume_after_sigkill_is_byte_identical(data):
    base, dataset, ref = data
    out = base / "killed"
    args = _args(dataset, out)
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-c", _KILL_SCRIPT, json.dumps(args)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    first = out / "precomp" / ".chunks" / "train" / "chunk_00000.npz"
    deadline = time.monotonic() + 120
    try:
        while not first.exists():
            if proc.poll() is not None:
                pytest.fail(f"extraction subprocess ended early: {proc.stderr.read().decode()[-2000:]}")
            if time.monotonic() > deadline:
                pytest.fail("no chunk appeared within 120 s")
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    chunks = sorted(p.name for p in first.parent.glob("chunk_*.npz"))
    assert chunks and len(chunks) < 3                     # train has 3 chunks of 2, 2, 1 images
    assert not (out / "precomp" / "train_ims.npy").exists()

    with counting_feature_rows() as calls:
        extract_dataset(**args)
    # only the missing train chunks and the dev / test splits were computed
    assert sum(calls) == 5 - 2 * len(chunks) + 2 + 1
    assert _files(out / "precomp") == _files(ref)


# ---------------------------------------------------------------------------------------------
# Bad images
# ---------------------------------------------------------------------------------------------
def test_missing_images_listed_before_any_work(data, tmp_path, monkeypatch):
    base, dataset, ref = data
    root = tmp_path / "images"
    shutil.copytree(dataset["image_root"], root)
    (root / "1002_b.jpg").unlink()
    (root / "1007_g.jpg").unlink()
    monkeypatch.setattr(extract_module, "_FeatureRunner",
                        lambda *a, **k: pytest.fail("extraction started despite missing images"))
    with pytest.raises(DataError, match="2 image.*missing.*1002_b.jpg, 1007_g.jpg") as err:
        extract_dataset(**_args(dataset, tmp_path / "out", image_root=str(root)))
    assert "Flickr8k.token.txt" in str(err.value) and "skip_missing" in str(err.value)
    monkeypatch.undo()
    with pytest.warns(UserWarning, match="2 missing"):
        out = extract_dataset(**_args(dataset, tmp_path / "out", image_root=str(root),
                                      skip_missing=True))
    train = PrecompDataset(out, "train")
    assert train.num_images == 4 and train.captions[5] == _caption("1003_c.jpg", 0)
    ref_ims = np.load(ref / "train_ims.npy")
    np.testing.assert_allclose(np.load(out / "train_ims.npy"), ref_ims[[0, 2, 3, 4]], atol=1e-4)
    assert PrecompDataset(out, "dev").num_images == 1


def test_corrupt_images_reported_then_skipped_without_recomputing(data, tmp_path):
    base, dataset, ref = data
    root = tmp_path / "images"
    shutil.copytree(dataset["image_root"], root)
    jpeg = (root / "1003_c.jpg").read_bytes()
    (root / "1003_c.jpg").write_bytes(jpeg[: len(jpeg) // 2])      # truncated JPEG
    (root / "1006_f.jpg").write_bytes(b"this is not an image at all")
    args = _args(dataset, tmp_path / "out", image_root=str(root), splits=["train", "dev"])
    with pytest.raises(DataError, match="1 image.*'train' could not be read: 1003_c.jpg") as err:
        extract_dataset(**args)
    assert "skip_missing" in str(err.value)
    chunk_dir = tmp_path / "out" / "precomp" / ".chunks" / "train"
    assert len(list(chunk_dir.glob("chunk_*.npz"))) == 3           # work kept for the rerun

    with counting_feature_rows() as calls, pytest.warns(UserWarning, match="unreadable"):
        out = extract_dataset(**args, skip_missing=True)
    assert sum(calls) == 1           # train chunks reused; dev has 1 readable image
    train = PrecompDataset(out, "train")
    assert train.num_images == 4 and "1003_c.jpg" not in str(train.image_paths)
    ref_ims = np.load(ref / "train_ims.npy")
    np.testing.assert_allclose(np.load(out / "train_ims.npy"), ref_ims[[0, 1, 3, 4]], atol=1e-4)
    assert PrecompDataset(out, "dev").captions == [_caption("1007_g.jpg", k) for k in range(5)]
    marker = json.loads((out / ".extract_train.json").read_text())
    assert marker["left_out"] == ["1003_c.jpg"]


def test_image_dataset_reports_bad_files_by_name(data, tmp_path):
    base, dataset, _ = data
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff garbage")
    good = Path(dataset["image_root"]) / "1004_d.png"
    ds = ImageFileDataset([good, bad, tmp_path / "absent.jpg"], side=SIDE, keep_original=True)
    batch = collate_images([ds[0], ds[1], ds[2]])
    assert batch["ok"].tolist() == [True, False, False]
    assert batch["pixels"].shape == (1, 3, SIDE, SIDE) and batch["pixels"].dtype == torch.uint8
    assert batch["sizes"] == [(72, 40)] and batch["originals"][0].shape == (40, 72, 3)
    assert [i for i, _ in batch["errors"]] == [1, 2]
    assert "missing" in batch["errors"][1][1]
    # the worker's resize is the one RegionBackbone.preprocess applies
    rgb = load_image(good)
    expected = np.asarray(rgb.resize((SIDE, SIDE), Image.BILINEAR)).transpose(2, 0, 1)
    np.testing.assert_array_equal(batch["pixels"][0].numpy(), expected)


# ---------------------------------------------------------------------------------------------
# Other formats and region modes
# ---------------------------------------------------------------------------------------------
def write_coco(root: Path, ids: dict[str, list[int]], captions_per_image: int = 5) -> list[str]:
    """COCO's layout: ``<root>/<folder>/COCO_<folder>_<id>.jpg`` and ``captions_<folder>.json``
    for each ``folder -> image ids``; returns the caption files' paths."""
    files = []
    for folder, numbers in ids.items():
        (root / folder).mkdir(parents=True)
        images, anns = [], []
        for i in numbers:
            name = f"COCO_{folder}_{i:012d}.jpg"
            _picture("RGB", (40 + i, 32), i).save(root / folder / name)
            images.append({"id": i, "file_name": name})
            anns += [{"image_id": i, "caption": f"coco image {i} caption {k}"} for k in range(captions_per_image)]
        path = root / f"captions_{folder}.json"
        path.write_text(json.dumps({"images": images, "annotations": anns}))
        files.append(str(path))
    return files


def test_coco_testall_and_its_first_images_as_test(tmp_path, monkeypatch):
    monkeypatch.setattr(captions_module, "COCO_TEST_1K", 2)
    root = tmp_path / "coco"
    ids = {"train2014": [11, 12], "val2014": [21, 22, 23, 24]}
    write_coco(root, ids, captions_per_image=6)
    kp = []
    for folder, numbers in ids.items():
        for i in numbers:
            split = "train" if folder == "train2014" else ("val" if i == 21 else "test")
            kp.append({"filename": f"COCO_{folder}_{i:012d}.jpg", "filepath": folder, "split": split,
                       "cocoid": i, "imgid": len(kp), "sentences": [{"raw": "unused"}] * 5})
    (root / "dataset_coco.json").write_text(json.dumps({"images": kp, "dataset": "coco"}))
    out = extract_dataset("coco", [str(root / "captions_train2014.json"), str(root / "captions_val2014.json")],
                          str(root), str(tmp_path / "out"), split_files=str(root / "dataset_coco.json"),
                          chunk_size=2, batch_size=2, num_workers=0, input_size=SIDE, device="cpu",
                          progress=False)
    testall, test = PrecompDataset(out, "testall"), PrecompDataset(out, "test")
    assert testall.ids.tolist() == [22, 23, 24] and test.ids.tolist() == [22, 23]
    assert test.captions == testall.captions[:10]
    assert test.captions[5] == "coco image 23 caption 0"
    for suffix in ("_ims.npy", "_guide.npy", "_boxes.npy"):
        np.testing.assert_array_equal(np.load(out / f"test{suffix}"), np.load(out / f"testall{suffix}")[:2])
    assert test.image_paths[0] == (root / "val2014" / "COCO_val2014_000000000022.jpg").resolve()
    assert PrecompDataset(out, "train").ids.tolist() == [11, 12]
    assert PrecompDataset(out, "dev").ids.tolist() == [21]


def test_box_regions_are_roi_aligned_on_the_original_pixels(data, backbone, tmp_path):
    base, dataset, _ = data
    boxes = {}
    for seed, (name, _, (w, h)) in enumerate(IMAGES):
        boxes[name] = [[0, 0, w, h], [w / 4, h / 5, w / 2, h * 0.9], [1, 2, 9, 7]]
    (tmp_path / "boxes.json").write_text(json.dumps(boxes))
    out = extract_dataset(**_args(dataset, tmp_path / "out", regions="boxes",
                                  boxes_file=str(tmp_path / "boxes.json"), splits=["dev"]))
    dev = PrecompDataset(out, "dev")
    assert dev.num_regions == 3 and not (out / "train_ims.npy").exists()
    ims = np.load(out / "dev_ims.npy")
    for row, name in enumerate(SPLITS["dev"]):
        np.testing.assert_allclose(dev.boxes[row], np.asarray(boxes[name], np.float32))
        image = load_image(Path(dataset["image_root"]) / name)
        expected = backbone.encode([image], np.asarray([boxes[name]], np.float32))[0][0]
        np.testing.assert_allclose(ims[row], expected.numpy(), rtol=1e-4, atol=1e-4)
    del boxes["1006_f.jpg"]
    (tmp_path / "boxes.json").write_text(json.dumps(boxes))
    with pytest.raises(DataError, match="no boxes for 1 image.*1006_f.jpg"):
        extract_dataset(**_args(dataset, tmp_path / "out2", regions="boxes",
                                boxes_file=str(tmp_path / "boxes.json")))


# ---------------------------------------------------------------------------------------------
# The result trains
# ---------------------------------------------------------------------------------------------
def test_extracted_folder_trains(data, tmp_path):
    from userlab.config import preset
    from userlab.train import Trainer

    base, dataset, ref = data
    shutil.copytree(ref, tmp_path / "data" / "precomp")   # training writes vocab.json there
    cfg = preset("demo")
    cfg.data.root = str(tmp_path / "data")
    cfg.data.batch_size = 8
    cfg.data.vocab_threshold = 1
    cfg.model.region_dim, cfg.model.num_regions, cfg.model.guide_dim = 1280, GRID, 1280
    cfg.model.enhancement = "sge+cge"
    cfg.model.embed_size, cfg.model.mlp_hidden, cfg.model.word_dim = 32, 32, 16
    cfg.momentum.queue_size = 16
    cfg.run_dir = str(tmp_path / "run")
    trainer = Trainer(cfg, max_steps=2, progress=False)
    trainer.fit()
    assert trainer.step == 2
    assert (tmp_path / "run" / "train_log.csv").is_file()

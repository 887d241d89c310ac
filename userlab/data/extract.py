"""Extract a whole captioned dataset (Flickr8k, Flickr30k, COCO) into the precomputed layout.

:func:`extract_dataset` reads a caption file in one of the formats of :mod:`.captions`, finds the
images, runs :class:`~userlab.data.features.RegionBackbone` (and a guide encoder) over them, and
writes ``out_dir/precomp/{split}_ims.npy``, ``_caps.txt``, ``_ids.txt``, ``_guide.npy``,
``_boxes.npy`` and ``_images.txt`` for every split (``docs/interfaces.md``).

How it stays fast, flat in memory and safe to kill:

* Images are opened, converted to RGB and resized in DataLoader worker processes
  (:class:`ImageFileDataset`); the backbone runs in the main process on the GPU when there is one.
  An image that cannot be read is reported by name, never silently dropped.
* The images of a split are cut into chunks of ``chunk_size``. Each chunk is processed as its own
  run of batches and written atomically to ``precomp/.chunks/{split}/chunk_XXXXX.npz`` (features,
  guide, boxes and which images loaded). Because batches never straddle chunks, a chunk's bytes do
  not depend on which other chunks were computed in the same process: after a crash (or Ctrl-C,
  or SIGKILL) a rerun computes only the missing chunks and the result is byte-identical to an
  uninterrupted run (on CPU; cuDNN may pick different algorithms between processes on a GPU).
* The final ``{split}_ims.npy`` is written by streaming chunk after chunk into a temporary ``.npy``
  (header from ``np.lib.format.open_memmap``, rows appended with plain file writes so the page
  cache, not the process, holds them), then renamed into place: peak memory is about one chunk
  (~250 MB for 1,000 images of 7x7x1280 float32), whether the split has 1K or 113K images.
* A marker ``precomp/.extract_{split}.json`` is written when a split is complete; a rerun with
  the same inputs and settings skips it. Chunks made with other settings are discarded (with a
  warning) rather than mixed in.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from ..errors import ConfigError, DataError
from ..io import atomic_path, atomic_write_text
from .captions import (CaptionedImage, CaptionSplits, locate_images, name_list,
                       read_caption_splits)
from .features import GUIDE_BACKENDS, REGION_MODES, GuideEncoder, RegionBackbone, grid_boxes, load_image

EXTRACT_VERSION = 1
CHUNK_DIR = ".chunks"
_DTYPES = ("float32", "float16")


# ---------------------------------------------------------------------------------------------
# Loading images in worker processes
# ---------------------------------------------------------------------------------------------
class ImageFileDataset(Dataset):
    """Opens, converts and resizes image files; one item per file.

    Args:
        paths: image files.
        side: square side the backbone reads (its ``input_size``).
        keep_original: also return the full-size RGB image (CLIP guide encoders preprocess it
            themselves).

    Items are dicts: ``index``; ``pixels`` uint8 ``(3, side, side)`` (None when unreadable);
    ``size`` the original ``(width, height)``; ``original`` uint8 ``(H, W, 3)`` or None;
    ``error`` None or the reason the file could not be read.
    """

    def __init__(self, paths: Sequence[Path], side: int, keep_original: bool = False):
        self.paths = [Path(p) for p in paths]
        self.side = int(side)
        self.keep_original = keep_original

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict:
        from PIL import Image

        item = {"index": i, "pixels": None, "size": (0, 0), "original": None, "error": None}
        try:
            rgb = load_image(self.paths[i])
        except DataError as err:
            item["error"] = err.problem
            return item
        # The same resize RegionBackbone.preprocess applies, done here so it runs in a worker.
        small = rgb.resize((self.side, self.side), Image.BILINEAR)
        item["pixels"] = torch.from_numpy(np.array(small, dtype=np.uint8)).permute(2, 0, 1).contiguous()
        item["size"] = rgb.size
        if self.keep_original:
            item["original"] = torch.from_numpy(np.array(rgb, dtype=np.uint8))
        return item


def collate_images(items: Sequence[dict]) -> dict:
    """Batch of :class:`ImageFileDataset` items.

    Returns:
        dict with ``index`` long ``(B,)``, ``ok`` bool ``(B,)``, ``pixels`` uint8
        ``(B_ok, 3, S, S)`` (readable images only, in order), ``sizes`` list of ``(w, h)`` of the
        readable images, ``originals`` list (or Nones), ``errors`` ``[(index, reason)]``.
    """
    good = [it for it in items if it["error"] is None]
    return {
        "index": torch.tensor([it["index"] for it in items], dtype=torch.long),
        "ok": torch.tensor([it["error"] is None for it in items], dtype=torch.bool),
        "pixels": torch.stack([it["pixels"] for it in good]) if good else None,
        "sizes": [it["size"] for it in good],
        "originals": [it["original"] for it in good],
        "errors": [(it["index"], it["error"]) for it in items if it["error"] is not None],
    }


# ---------------------------------------------------------------------------------------------
# Features of one batch
# ---------------------------------------------------------------------------------------------
class _FeatureRunner:
    """Backbone + guide encoder applied to collated batches."""

    def __init__(self, regions: str, guide: str, guide_model, guide_path, device, input_size: int,
                 boxes: np.ndarray | None):
        self.backbone = RegionBackbone(device, input_size=input_size)
        self.side = self.backbone.input_size
        self.grid = self.backbone.grid_side
        self.regions = regions
        self.boxes = boxes  # (N, R, 4) pixel boxes for regions="boxes"
        self.guide = None if guide == "backbone" else GuideEncoder(
            guide, model_name=guide_model, path=guide_path, device=self.backbone.device)
        self.num_regions = self.grid * self.grid if boxes is None else int(boxes.shape[1])
        self.feature_dim = int(self.backbone.feature_dim)
        self.guide_dim = int(self.feature_dim if self.guide is None else self.guide.dim)

    def __call__(self, batch: dict, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Features of the readable images of ``batch``; ``rows`` are their indices in the split.

        Returns:
            ``regions (B_ok, R, 1280)``, ``guide (B_ok, G)`` (unit norm) and ``boxes (B_ok, R, 4)``
            in pixels of the original images, all float32 numpy.
        """
        sizes = batch["sizes"]
        if self.boxes is None:
            boxes = np.stack([grid_boxes(w, h, self.grid, self.grid) for (w, h) in sizes])
            scaled = None
        else:
            boxes = self.boxes[rows]
            # The backbone sees the resized image: scale the boxes from original pixels to it.
            factor = np.array([[self.side / w, self.side / h] * 2 for (w, h) in sizes], np.float32)
            scaled = boxes * factor[:, None, :]
        regions, pooled, _ = self.backbone.encode(batch["pixels"], scaled)
        if self.guide is None:
            guide = F.normalize(pooled.float(), dim=-1)
        else:
            guide = self.guide.encode(batch["originals"])
        return (regions.float().cpu().numpy(), guide.float().cpu().numpy(),
                boxes.astype(np.float32, copy=False))


# ---------------------------------------------------------------------------------------------
# Chunk files
# ---------------------------------------------------------------------------------------------
@dataclass
class _Split:
    """One split to compute, plus the splits that are prefixes of it (COCO's ``test``)."""

    name: str
    items: list[CaptionedImage]
    derived: dict[str, int]          # derived split -> number of leading candidate images
    boxes: np.ndarray | None


def _chunk_path(folder: Path, k: int) -> Path:
    return folder / f"chunk_{k:05d}.npz"


def _write_chunk(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    """Write one chunk atomically (a killed run leaves it whole or absent)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)


def _chunk_is_whole(path: Path) -> bool:
    if not path.is_file():
        return False
    try:
        with np.load(path, allow_pickle=False) as z:
            return {"ims", "guide", "boxes", "ok", "bad", "errors"} <= set(z.files)
    except (OSError, ValueError, EOFError):
        return False


class _ChunkBuffer:
    """Rows of one chunk while its batches come in."""

    def __init__(self, k: int, lo: int, hi: int, runner: _FeatureRunner, dtype: np.dtype):
        self.k, self.lo, self.hi = k, lo, hi
        m = hi - lo
        self.ims = np.zeros((m, runner.num_regions, runner.feature_dim), dtype=dtype)
        self.guide = np.zeros((m, runner.guide_dim), dtype=np.float32)
        self.boxes = np.zeros((m, runner.num_regions, 4), dtype=np.float32)
        self.ok = np.zeros(m, dtype=bool)
        self.seen = 0
        self.bad: list[str] = []
        self.errors: list[str] = []

    def arrays(self) -> dict[str, np.ndarray]:
        keep = self.ok
        if keep.all():   # the usual case: no copy of a ~250 MB buffer
            ims, guide, boxes = self.ims, self.guide, self.boxes
        else:
            ims, guide, boxes = self.ims[keep], self.guide[keep], self.boxes[keep]
        return {"ims": ims, "guide": guide, "boxes": boxes,
                "ok": self.ok, "bad": np.array(self.bad, dtype=str),
                "errors": np.array(self.errors, dtype=str), "start": np.int64(self.lo)}


def _extract_chunks(split: _Split, paths: list[Path], runner: _FeatureRunner, chunk_dir: Path,
                    chunk_size: int, batch_size: int, num_workers: int, dtype: np.dtype,
                    progress: bool) -> int:
    """Compute the chunks of ``split`` that are not on disk yet; returns the chunk count."""
    from tqdm.auto import tqdm

    n = len(split.items)
    n_chunks = math.ceil(n / chunk_size)
    pending = [k for k in range(n_chunks) if not _chunk_is_whole(_chunk_path(chunk_dir, k))]
    batches = []
    for k in pending:
        lo, hi = k * chunk_size, min(n, (k + 1) * chunk_size)
        batches += [list(range(s, min(hi, s + batch_size))) for s in range(lo, hi, batch_size)]
    if not batches:
        return n_chunks
    done = n - sum(min(n, (k + 1) * chunk_size) - k * chunk_size for k in pending)
    dataset = ImageFileDataset(paths, runner.side, keep_original=runner.guide is not None)
    loader = DataLoader(dataset, batch_sampler=batches, num_workers=num_workers,
                        collate_fn=collate_images)
    bar = tqdm(total=n, initial=done, unit="img", desc=f"extract {split.name}",
               disable=not progress, dynamic_ncols=True, smoothing=0.05)
    buffer: _ChunkBuffer | None = None
    try:
        for batch in loader:
            index = batch["index"].numpy()
            k = int(index[0]) // chunk_size
            if buffer is None:
                buffer = _ChunkBuffer(k, k * chunk_size, min(n, (k + 1) * chunk_size), runner, dtype)
            local = index - buffer.lo
            ok = batch["ok"].numpy()
            if ok.any():
                regions, guide, boxes = runner(batch, index[ok])
                buffer.ims[local[ok]] = regions.astype(dtype, copy=False)
                buffer.guide[local[ok]] = guide
                buffer.boxes[local[ok]] = boxes
            buffer.ok[local[ok]] = True
            for i, reason in batch["errors"]:
                buffer.bad.append(split.items[i].path)
                buffer.errors.append(reason)
            buffer.seen += len(index)
            bar.update(len(index))
            if buffer.seen == buffer.hi - buffer.lo:
                _write_chunk(_chunk_path(chunk_dir, buffer.k), buffer.arrays())
                buffer = None
    finally:
        bar.close()
    return n_chunks


# ---------------------------------------------------------------------------------------------
# Assembling a split from its chunks
# ---------------------------------------------------------------------------------------------
def _chunk_masks(chunk_dir: Path, n_chunks: int) -> tuple[np.ndarray, list[tuple[str, str]]]:
    masks, bad = [], []
    for k in range(n_chunks):
        with np.load(_chunk_path(chunk_dir, k), allow_pickle=False) as z:
            masks.append(z["ok"])
            bad += list(zip(z["bad"].tolist(), z["errors"].tolist()))
    return np.concatenate(masks), bad


def _iter_chunk_rows(chunk_dir: Path, n_chunks: int, key: str, limit_rows: int) -> Iterator[np.ndarray]:
    """The first ``limit_rows`` kept rows of array ``key``, one chunk at a time."""
    left = limit_rows
    for k in range(n_chunks):
        if left <= 0:
            return
        with np.load(_chunk_path(chunk_dir, k), allow_pickle=False) as z:
            arr = z[key]
        yield arr[:left]
        left -= min(left, len(arr))


def _stream_npy(path: Path, shape: tuple[int, ...], dtype: np.dtype, blocks: Iterator[np.ndarray]) -> None:
    """Write a ``.npy`` of ``shape`` from consecutive row blocks, atomically.

    ``open_memmap`` writes the standard header (the same bytes ``np.save`` writes); the rows are
    then appended with ordinary writes, so they pass through the page cache instead of the
    process's resident memory.
    """
    with atomic_path(path) as tmp:
        header = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=shape)
        offset = header.offset
        del header
        rows = 0
        with open(tmp, "r+b") as fh:
            fh.seek(offset)
            for block in blocks:
                block = np.ascontiguousarray(block, dtype=dtype)
                fh.write(block.tobytes())
                rows += len(block)
        if rows != shape[0]:
            raise DataError(path, f"internal error: wrote {rows} rows, expected {shape[0]}")


def _relative_image_paths(items: Sequence[CaptionedImage], image_root: Path, precomp: Path) -> list[str]:
    root, here = image_root.resolve(), precomp.resolve()
    return [os.path.relpath(root / it.path, here).replace(os.sep, "/") for it in items]


def _write_split_files(precomp: Path, split: str, kept: list[CaptionedImage], image_root: Path,
                       chunk_dir: Path, n_chunks: int, runner: _FeatureRunner, dtype: np.dtype) -> None:
    """Text files, guide and boxes first, features last (their presence means a whole split)."""
    n, r = len(kept), runner.num_regions
    atomic_write_text(precomp / f"{split}_caps.txt", "".join(f"{c}\n" for it in kept for c in it.captions))
    atomic_write_text(precomp / f"{split}_ids.txt", "".join(f"{it.image_id}\n" for it in kept))
    atomic_write_text(precomp / f"{split}_images.txt",
                      "".join(f"{p}\n" for p in _relative_image_paths(kept, image_root, precomp)))
    _stream_npy(precomp / f"{split}_guide.npy", (n, runner.guide_dim), np.dtype(np.float32),
                _iter_chunk_rows(chunk_dir, n_chunks, "guide", n))
    _stream_npy(precomp / f"{split}_boxes.npy", (n, r, 4), np.dtype(np.float32),
                _iter_chunk_rows(chunk_dir, n_chunks, "boxes", n))
    _stream_npy(precomp / f"{split}_ims.npy", (n, r, runner.feature_dim), dtype,
                _iter_chunk_rows(chunk_dir, n_chunks, "ims", n))


# ---------------------------------------------------------------------------------------------
# Bookkeeping: fingerprints, stale temporary files, derived splits
# ---------------------------------------------------------------------------------------------
def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode("utf-8")).hexdigest()


def _remove_temporaries(folder: Path, prefix: str = ".") -> None:
    """Temporary files a killed writer left behind (``userlab.io.atomic_path`` names them so)."""
    if folder.is_dir():
        for p in folder.glob(f"{prefix}*.tmp"):
            p.unlink(missing_ok=True)


def _derived_splits(splits: CaptionSplits) -> dict[str, tuple[str, int]]:
    """Splits that are the head of another are cut from its chunks instead of being extracted
    twice: COCO's ``test`` (1K) of ``testall`` (5K), or a ``test`` list that repeats ``dev``."""
    out = {}
    for small, big in (("test", "testall"), ("test", "dev")):
        head, whole = splits.get(small), splits.get(big)
        if small not in out and head and whole and len(head) <= len(whole) and all(
                a.path == b.path for a, b in zip(head, whole)):
            out[small] = (big, len(head))
    return out


#: Without a dev split, ``userlab train`` has nothing to select checkpoints on: this many images
#: at most (and a tenth of train at most) are moved from the end of train to a new ``dev`` split.
CARVED_DEV_MAX = 1000


def _carve_dev_split(table: CaptionSplits) -> CaptionSplits:
    """``dev`` from the last images of ``train`` when the captions define no dev split (COCO
    with ``coco_val_split`` "test" or "train", Flickr lists without a dev list)."""
    train = table.get("train", [])
    if "dev" in table or len(train) < 2:
        return table
    k = max(1, min(CARVED_DEV_MAX, len(train) // 10))
    warnings.warn(f"the captions define no dev split: the last {k} of the {len(train)} train images "
                  f"form 'dev' (and are not trained on), so `userlab train` can select checkpoints; "
                  f"pass a dev list or a Karpathy split file to choose dev yourself", stacklevel=3)
    carved = dict(table, train=train[:-k], dev=train[-k:])
    order = ("train", "restval", "dev")
    return {**{s: carved[s] for s in order if s in carved},
            **{s: v for s, v in carved.items() if s not in order}}


def _missing_per_split(wanted: CaptionSplits, missing: set[str], image_root, source
                       ) -> dict[str, list[str]]:
    """Missing images of each split; a split left with no image at all is an error (training
    on it would fail later, far from the cause: usually a wrong ``--images`` folder)."""
    out = {}
    for split, items in wanted.items():
        gone = [it.path for it in items if it.path in missing]
        out[split] = gone
        if items and len(gone) == len(items):
            example = Path(image_root) / items[0].path
            raise DataError(image_root, f"none of the {len(items)} images of split '{split}' named "
                                        f"in {Path(source).name} is in this folder (e.g. {example} "
                                        f"does not exist): check --images; an empty split cannot "
                                        f"be trained on or evaluated")
    return out


def _load_boxes_file(boxes_file, splits: CaptionSplits) -> dict[str, np.ndarray]:
    """``{image path or file name: [[x0, y0, x1, y1], ...]}`` JSON -> boxes per split."""
    if boxes_file is None:
        raise ConfigError("boxes_file", "regions='boxes' needs a JSON file mapping image paths "
                                        "(or file names) to [[x0, y0, x1, y1], ...]")
    path = Path(boxes_file)
    if not path.is_file():
        raise DataError(path, "boxes file is missing")
    try:
        table = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise DataError(path, f"not valid JSON: {err}") from None
    if not isinstance(table, dict):
        raise DataError(path, "expected a JSON object {image: [[x0, y0, x1, y1], ...]}")
    rows: dict[str, list[np.ndarray]] = {}
    absent, counts = [], set()
    for split, items in splits.items():
        for it in items:
            value = table.get(it.path, table.get(it.path.rsplit("/", 1)[-1]))
            if value is None:
                absent.append(it.path)
                continue
            arr = np.asarray(value, dtype=np.float32)
            if arr.ndim != 2 or arr.shape[1] != 4 or not np.isfinite(arr).all():
                raise DataError(path, f"boxes of {it.path} must be a finite [[x0, y0, x1, y1], ...] list")
            counts.add(arr.shape[0])
            rows.setdefault(split, []).append(arr)
    if absent:
        raise DataError(path, f"no boxes for {len(absent)} image(s): {name_list(absent)}")
    if len(counts) != 1:
        raise DataError(path, f"every image needs the same number of boxes; found {sorted(counts)}")
    out = {split: np.stack(r) for split, r in rows.items()}
    return out


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------
def extract_dataset(format: str, captions_path, image_root: str | os.PathLike,
                    out_dir: str | os.PathLike, split_files=None, regions: str = "grid",
                    guide: str = "backbone", guide_model: str | None = None,
                    guide_path: str | os.PathLike | None = None, batch_size: int = 32,
                    num_workers: int = 2, device: str | torch.device | None = None,
                    chunk_size: int = 1000, skip_missing: bool = False, progress: bool = True,
                    max_images: int | None = None, *, boxes_file: str | os.PathLike | None = None,
                    input_size: int = 224, dtype: str = "float32", restval: str = "train",
                    coco_val_split: str = "dev", splits: Sequence[str] | None = None) -> Path:
    """Extract region and guide features of a whole dataset into ``out_dir/precomp``.

    Args:
        format: ``"karpathy"``, ``"flickr"`` or ``"coco"`` (see :mod:`userlab.data.captions`).
        captions_path: Karpathy JSON, Flickr token file, or COCO ``captions_*.json`` (one path
            or a list).
        image_root: folder holding the images (Flickr: the folder of ``*.jpg``; COCO: the folder
            holding ``train2014/`` and ``val2014/``, or a flat folder).
        out_dir: output root; features go to ``out_dir/precomp`` (what ``--data out_dir`` finds).
        split_files: flickr: ``{"train": list, "dev": list, "test": list}`` or a Karpathy JSON;
            coco: optional Karpathy ``dataset_coco.json``.
        regions: ``"grid"`` (every feature-map cell, R = (input_size/32)^2: 49 at 224) or
            ``"boxes"`` (RoIAlign over ``boxes_file`` boxes).
        guide: ``"backbone"`` (pooled backbone map, 1280-d), ``"open_clip"`` or ``"hf_clip"``
            (local weights: ``guide_model`` / ``guide_path``, see :class:`GuideEncoder`).
        batch_size: images per backbone pass.
        num_workers: DataLoader worker processes that read and resize images (0: in-process).
        device: torch device; default CUDA when available.
        chunk_size: images per chunk file (the unit of resumption and of peak memory).
        skip_missing: leave out images that are missing or unreadable (listed in a warning)
            instead of raising.
        progress: tqdm progress bar with an ETA.
        max_images: keep only the first ``max_images`` images of every split (trial runs).
        boxes_file: JSON ``{image path or file name: [[x0, y0, x1, y1], ...]}`` for
            ``regions="boxes"`` (pixels of the original image; same R for every image).
        input_size: backbone input side, a multiple of 32.
        dtype: ``"float32"`` or ``"float16"`` for ``{split}_ims.npy`` (half the disk).
        restval: ``"train"`` or ``"separate"`` (Karpathy's restval images).
        coco_val_split: split of ``captions_val*.json`` images when COCO has no Karpathy file.
        splits: only these splits (default: all the format defines).

    Returns:
        The precomp folder ``out_dir/precomp``.

    Raises:
        DataError: bad caption files, missing or unreadable images (without ``skip_missing``;
            chunks already extracted are kept, so a rerun with ``skip_missing=True`` only
            assembles), a split left with no images.
        ConfigError: a bad option.
    """
    if regions not in REGION_MODES:
        raise ConfigError("regions", f"must be one of {', '.join(REGION_MODES)}, got {regions!r}")
    if guide not in GUIDE_BACKENDS:
        raise ConfigError("guide", f"must be one of {', '.join(GUIDE_BACKENDS)}, got {guide!r}")
    for name, value, low in (("batch_size", batch_size, 1), ("chunk_size", chunk_size, 1),
                             ("num_workers", num_workers, 0)):
        if not isinstance(value, int) or value < low:
            raise ConfigError(name, f"must be an integer >= {low}, got {value!r}")
    if max_images is not None and max_images < 1:
        raise ConfigError("max_images", f"must be >= 1, got {max_images}")
    if dtype not in _DTYPES:
        raise ConfigError("dtype", f"must be one of {', '.join(_DTYPES)}, got {dtype!r}")
    np_dtype = np.dtype(dtype)

    table = read_caption_splits(format, captions_path, split_files, restval=restval,
                                coco_val_split=coco_val_split)
    if splits is not None:
        unknown = sorted(set(splits) - set(table))
        if unknown:
            raise ConfigError("splits", f"{', '.join(unknown)} not in this dataset "
                                        f"(it has {', '.join(table)})")
        table = {s: v for s, v in table.items() if s in splits}
    else:
        table = _carve_dev_split(table)
    if max_images is not None:
        table = {s: v[:max_images] for s, v in table.items()}
    source = captions_path[0] if isinstance(captions_path, (list, tuple)) else captions_path
    wanted = table
    table, missing = locate_images(table, image_root, source, skip_missing=True)
    # An emptied split (wrong folder) is named first: "pass --skip-missing" would not help.
    missing_in = _missing_per_split(wanted, set(missing), image_root, source)
    if missing and not skip_missing:
        locate_images(wanted, image_root, source, skip_missing=False)  # raises, listing them
    if missing:
        warnings.warn(f"{len(missing)} missing image(s) left out: {name_list(missing)}", stacklevel=2)
    box_table = _load_boxes_file(boxes_file, table) if regions == "boxes" else {}

    image_root = Path(image_root)
    precomp = Path(out_dir) / "precomp"
    precomp.mkdir(parents=True, exist_ok=True)
    derived = _derived_splits(table)
    plan = [_Split(name, items, {d: n for d, (big, n) in derived.items() if big == name},
                   box_table.get(name)) for name, items in table.items() if name not in derived]
    settings = {"version": EXTRACT_VERSION, "regions": regions, "guide": guide,
                "guide_model": str(guide_model), "guide_path": str(guide_path),
                "input_size": input_size, "chunk_size": chunk_size, "batch_size": batch_size,
                "dtype": dtype}

    runner: _FeatureRunner | None = None
    for split in plan:
        chunk_fp = _digest({**settings, "paths": [it.path for it in split.items],
                            "boxes": None if split.boxes is None else hashlib.sha256(
                                split.boxes.tobytes()).hexdigest()})
        outputs = {split.name: None, **split.derived}
        done_fp = _digest({"chunks": chunk_fp, "outputs": outputs, "captions": [
            (it.image_id, it.captions) for it in split.items]})
        marker = precomp / f".extract_{split.name}.json"
        if _is_complete(marker, done_fp, precomp, outputs):
            continue
        if runner is None:
            boxes_any = next((p.boxes for p in plan if p.boxes is not None), None)
            runner = _FeatureRunner(regions, guide, guide_model, guide_path, device, input_size,
                                    boxes_any)
        runner.boxes = split.boxes
        chunk_dir = precomp / CHUNK_DIR / split.name
        _prepare_chunk_dir(chunk_dir, chunk_fp)
        paths = [image_root / it.path for it in split.items]
        n_chunks = _extract_chunks(split, paths, runner, chunk_dir, chunk_size, batch_size,
                                   num_workers, np_dtype, progress)
        ok, bad = _chunk_masks(chunk_dir, n_chunks)
        if bad:
            listed = name_list([f"{p} ({why})" for p, why in bad])
            if not skip_missing:
                raise DataError(image_root, f"{len(bad)} image(s) of split '{split.name}' could not "
                                            f"be read: {listed}. Extracted chunks are kept in "
                                            f"{chunk_dir}; rerun with skip_missing=True "
                                            f"(--skip-missing) to leave these images out")
            warnings.warn(f"split '{split.name}': {len(bad)} unreadable image(s) left out: {listed}",
                          stacklevel=2)
        kept = [it for it, good in zip(split.items, ok) if good]
        if not kept:
            raise DataError(image_root, f"split '{split.name}' has no readable images")
        _remove_temporaries(precomp, f".{split.name}_")
        _write_split_files(precomp, split.name, kept, image_root, chunk_dir, n_chunks, runner, np_dtype)
        for name, lead in split.derived.items():
            _remove_temporaries(precomp, f".{name}_")
            sub = [it for it, good in zip(split.items[:lead], ok[:lead]) if good]
            _write_split_files(precomp, name, sub, image_root, chunk_dir, n_chunks, runner, np_dtype)
        not_found = missing_in.get(split.name, [])
        atomic_write_text(marker, json.dumps({
            "fingerprint": done_fp, "outputs": sorted(outputs), "images": len(kept),
            "left_out": not_found + [p for p, _ in bad],
            "missing": not_found, "unreadable": [f"{p} ({why})" for p, why in bad]},
            indent=1) + "\n")
        shutil.rmtree(chunk_dir)
    chunks_root = precomp / CHUNK_DIR
    if chunks_root.is_dir() and not any(chunks_root.iterdir()):
        chunks_root.rmdir()
    return precomp


def _is_complete(marker: Path, fingerprint: str, precomp: Path, outputs: Mapping[str, object]) -> bool:
    if not marker.is_file():
        return False
    try:
        saved = json.loads(marker.read_text(encoding="utf-8"))
    except ValueError:
        return False
    return saved.get("fingerprint") == fingerprint and all(
        (precomp / f"{s}_ims.npy").is_file() for s in outputs)


def _prepare_chunk_dir(chunk_dir: Path, fingerprint: str) -> None:
    """Keep chunks made with the same inputs and settings; discard any others."""
    manifest = chunk_dir / "manifest.json"
    if chunk_dir.is_dir():
        saved = None
        if manifest.is_file():
            try:
                saved = json.loads(manifest.read_text(encoding="utf-8")).get("fingerprint")
            except ValueError:
                saved = None
        if saved != fingerprint:
            if any(chunk_dir.glob("chunk_*.npz")):
                warnings.warn(f"{chunk_dir}: chunks from a run with other images or settings are "
                              f"discarded", stacklevel=3)
            shutil.rmtree(chunk_dir)
    _remove_temporaries(chunk_dir)
    if not manifest.is_file():
        atomic_write_text(manifest, json.dumps({"fingerprint": fingerprint}) + "\n")


__all__ = ["ImageFileDataset", "collate_images", "extract_dataset"]

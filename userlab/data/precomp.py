"""Precomputed region features in the SCAN / VSE layout: find, validate, read, write, batch.

A split ``S`` of a precomp folder is ``S_ims.npy`` (``(N_rows, R, F)`` float features, one row per
image or one per caption) plus ``S_caps.txt`` (5 consecutive captions per image), with optional
``S_ids.txt`` and userlab's extras ``S_guide.npy``, ``S_boxes.npy`` and ``S_images.txt``
(docs/interfaces.md, "Precomputed layout").

The feature file is memory-mapped, never read whole: COCO's ``train_ims.npy`` is 33 GB. Opening a
split checks headers, counts and shapes, and scans a bounded sample of rows for NaN/Inf; each row
is checked again when it is fetched, and :meth:`PrecompDataset.validate_rows` scans every row in
chunks on request.

Pages of a memory-mapped file that a process has read count in its resident set (``RssFile``)
for as long as they stay mapped, so reading a whole 33 GB file once through the mapping would
show as 33 GB of RSS (and the kernel maps whole large folios around each row, about 3x the bytes
read). Training therefore reads each row with ``os.pread`` into a fresh array: the data pass
through the page cache but are never mapped into the process. Paths that do read through the
mapping (full validation, Fortran-ordered files) hand the mapped pages back to the kernel
(``madvise(MADV_DONTNEED)``) every chunk or every :attr:`PrecompDataset.release_every_bytes`.
"""
from __future__ import annotations

import mmap
import os
import random
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import DataError
from ..io import atomic_save_npy, atomic_write_text

CAPTIONS_PER_IMAGE = 5
#: Extra files of a split (beyond ``_ims.npy`` / ``_caps.txt``) that userlab reads.
OPTIONAL_SUFFIXES = ("_ids.txt", "_guide.npy", "_boxes.npy", "_images.txt")
_SAMPLE_EDGE_ROWS = 2     # rows checked at each end of the file when a split is opened
_SAMPLE_RANDOM_ROWS = 4   # plus this many random rows (fixed seed, so the check is repeatable)


# ---------------------------------------------------------------------------------------------
# Locating a precomp folder
# ---------------------------------------------------------------------------------------------
def _holds_features(folder: Path) -> bool:
    return folder.is_dir() and any(folder.glob("*_ims.npy"))


def find_precomp_dir(root: str | os.PathLike, name: str = "") -> Path:
    """Resolve the folder holding ``{split}_ims.npy`` files.

    Looks, in order, at ``<root>/{name}_precomp`` (SCAN / DBL, only when ``name`` is given),
    ``<root>/precomp`` (VSE∞ / USER) and ``<root>`` itself.

    Raises:
        DataError: none of them holds a ``*_ims.npy`` file; the message lists every place
            looked at.
    """
    root = Path(root)
    candidates = ([root / f"{name}_precomp"] if name else []) + [root / "precomp", root]
    for folder in candidates:
        if _holds_features(folder):
            return folder
    looked = "; ".join(
        f"{c} ({'exists, but holds no *_ims.npy' if c.is_dir() else 'no such folder'})"
        for c in candidates)
    raise DataError(root, f"no precomputed features found: looked for *_ims.npy in {looked}")


# ---------------------------------------------------------------------------------------------
# Reading files
# ---------------------------------------------------------------------------------------------
def _open_npy(path: Path, what: str, ndim: int) -> np.ndarray:
    """Memory-map a float ``.npy`` file after checking its header and size.

    ``np.load`` errors for truncated or corrupt files are cryptic; reading the header first lets
    us say what is wrong (dtype, ndim, missing bytes) before mapping anything.
    """
    if not path.is_file():
        raise DataError(path, f"{what} file is missing")
    try:
        with open(path, "rb") as fh:
            version = np.lib.format.read_magic(fh)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh)
            else:
                shape = fortran = dtype = None  # rare (v3.0); numpy validates it below
            data_start = fh.tell()
    except (ValueError, OSError, EOFError) as err:
        raise DataError(path, f"not a readable .npy file (truncated or corrupt header?): {err}") from None
    if dtype is not None:
        if dtype.hasobject or dtype.kind != "f":
            raise DataError(path, f"{what} has dtype {dtype}; expected float32 or float16")
        if len(shape) != ndim:
            raise DataError(path, f"{what} has ndim {len(shape)} (shape {shape}); expected {ndim}")
        expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        actual = path.stat().st_size - data_start
        if actual < expected:
            raise DataError(path, f"{what} is truncated: shape {shape} needs {expected} bytes of "
                                  f"data, the file holds {actual}")
        if expected == 0:
            raise DataError(path, f"{what} is empty (shape {shape})")
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise DataError(path, f"cannot memory-map {what} (truncated or corrupt .npy?): {err}") from None
    if arr.dtype.kind != "f" or arr.ndim != ndim:
        raise DataError(path, f"{what} has dtype {arr.dtype} and shape {arr.shape}; expected a "
                              f"{ndim}-d float array")
    return arr


def _read_lines(path: Path, what: str) -> list[str]:
    """Lines of a UTF-8 text file, stripped; a final newline is optional, empty lines are errors."""
    if not path.is_file():
        raise DataError(path, f"{what} file is missing")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise DataError(path, f"{what} is not valid UTF-8: line {line}, byte offset {err.start} "
                              f"({err.reason})") from None
    if text.startswith("\ufeff"):
        text = text[1:]  # byte-order mark written by some editors
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    out = []
    for number, line in enumerate(lines, start=1):
        line = line.strip()
        if not line:
            raise DataError(path, f"{what} has an empty line at line {number}")
        out.append(line)
    return out


_FLOAT32_MAX = float(np.finfo(np.float32).max)


def _good_rows(block: np.ndarray) -> np.ndarray:
    """Bool ``(n,)``: rows of ``block`` (``(n, ...)``) that are finite and, in float64 files,
    inside float32's range (they are cast to float32 when read; beyond it they become Inf)."""
    flat = block.reshape(len(block), -1)
    good = np.isfinite(flat).all(axis=1)
    if block.dtype.itemsize > 4 and good.any():
        good &= ~(np.abs(flat) > _FLOAT32_MAX).any(axis=1)
    return good


def _bad_row_problem(arr: np.ndarray, row: int, what: str) -> str:
    values = np.asarray(arr[row])
    if np.isfinite(values).all():
        return (f"{what} row {row} holds values beyond float32's range (|x| up to "
                f"{float(np.abs(values).max()):.3g} > {_FLOAT32_MAX:.3g}); they would become Inf "
                f"when cast to float32")
    return f"{what} row {row} holds NaN or Inf values"


def _check_finite_row(arr: np.ndarray, row: int, path: Path, what: str) -> None:
    if not _good_rows(np.asarray(arr[row: row + 1])).all():
        raise DataError(path, _bad_row_problem(arr, row, what))


def _release_pages(arr: np.ndarray | None) -> None:
    """Unmap the resident pages of a read-only ``np.memmap`` (Linux ``MADV_DONTNEED``).

    The mapping stays valid: the next access faults the pages back in from the page cache. A
    no-op for arrays that are not memory-mapped and on systems without ``madvise``.
    """
    handle = getattr(arr, "_mmap", None)
    if handle is None or not hasattr(mmap, "MADV_DONTNEED"):
        return
    try:
        handle.madvise(mmap.MADV_DONTNEED)
    except (OSError, ValueError):  # closed mapping or a kernel refusing the advice: harmless
        pass


def _sample_rows(n: int) -> list[int]:
    """A bounded, repeatable sample: the first and last few rows plus a few random ones."""
    edge = list(range(min(n, _SAMPLE_EDGE_ROWS))) + list(range(max(0, n - _SAMPLE_EDGE_ROWS), n))
    extra = np.random.default_rng(0).integers(0, n, size=_SAMPLE_RANDOM_ROWS).tolist() if n else []
    return sorted(set(edge) | set(extra))


# ---------------------------------------------------------------------------------------------
# Dataset
# ---------------------------------------------------------------------------------------------
class PrecompDataset(Dataset):
    """Captions of one precomputed split, each paired with its image's region features.

    Item ``c`` is caption ``c`` merged with image ``c // 5``. The feature row of caption ``c`` is
    ``c // im_div`` with ``im_div = 5`` when the file has one row per image and 1 when it has one
    row per caption (method notes, section 1.1).

    Args:
        folder: the precomp folder (see :func:`find_precomp_dir`).
        split: split name, e.g. ``"train"``, ``"dev"``, ``"test"``, ``"testall"``.
        tokenizer: callable ``tokenizer(caption, train) -> LongTensor (L,)``; without one,
            caption items carry the text only.
        train: passed to the tokenizer, which augments captions when True.
        max_images: keep only the first ``max_images`` images (and their 5 captions each), e.g.
            1000 for the dev shortcut of both papers.
        validate: check a sample of rows for NaN/Inf on open and each row when it is read;
            structural checks (files, counts, shapes, dtypes) always run.
        full_check: also scan every row in chunks on open (see :meth:`validate_rows`).

    Attributes:
        num_images, num_captions, num_rows: sizes after truncation.
        im_div: 5 (one row per image) or 1 (one row per caption).
        num_regions, feature_dim: ``R`` and ``F`` of the ``(N_rows, R, F)`` feature file.
        captions: the captions, ``captions[c]`` belongs to image ``c // 5``.
        ids: int64 ``(num_images,)`` image ids (from ``_ids.txt``, else the image index).
        has_guide, guide_dim: whether ``_guide.npy`` is present and its width ``G``.
        boxes: ``(num_images, R, 4)`` memory-mapped boxes, or None.
        image_paths: absolute image paths (list of Path, one per image), or None.
        release_every_bytes: after this many feature bytes read, the mapped pages are released
            so the resident set stays bounded (class default 256 MiB; 0 disables).
    """

    release_every_bytes: int = 256 * 2**20

    def __init__(self, folder: str | os.PathLike, split: str,
                 tokenizer: Callable[[str, bool], torch.Tensor] | None = None,
                 train: bool = False, max_images: int | None = None,
                 validate: bool = True, full_check: bool = False):
        self.folder = Path(folder)
        self.split = split
        self.tokenizer = tokenizer
        self.train = train
        self.validate = validate
        self._epoch_seed: int | None = None
        self._bytes_since_release = 0
        self._fh = None  # file handle for os.pread of feature rows, opened on first read
        if not self.folder.is_dir():
            raise DataError(self.folder, "precomp folder not found")
        if max_images is not None and max_images < 1:
            raise DataError(self.folder, f"max_images must be >= 1, got {max_images}")

        self.ims_path = self.folder / f"{split}_ims.npy"
        self.caps_path = self.folder / f"{split}_caps.txt"
        self.ids_path = self.folder / f"{split}_ids.txt"
        self.guide_path = self.folder / f"{split}_guide.npy"
        self.boxes_path = self.folder / f"{split}_boxes.npy"
        self.images_path = self.folder / f"{split}_images.txt"
        for p, what in ((self.ims_path, "region features"), (self.caps_path, "captions")):
            if not p.is_file():
                raise DataError(p, f"{what} file is missing (split '{split}' needs "
                                   f"{self.ims_path.name} and {self.caps_path.name})")

        ims = _open_npy(self.ims_path, "region features", ndim=3)
        captions = _read_lines(self.caps_path, "captions file")
        if not captions:
            raise DataError(self.caps_path, "captions file is empty")
        total_captions = len(captions)
        if total_captions % CAPTIONS_PER_IMAGE:
            raise DataError(self.caps_path, f"holds {total_captions} captions, not 5 per image "
                                            f"({total_captions} is not a multiple of 5)")
        total_images = total_captions // CAPTIONS_PER_IMAGE
        total_rows = ims.shape[0]
        if total_rows == total_captions:
            self.im_div = 1
        elif total_rows == total_images:
            self.im_div = CAPTIONS_PER_IMAGE
        else:
            raise DataError(self.ims_path, f"has {total_rows} rows, but the captions file holds "
                                           f"{total_captions} captions for {total_images} images: "
                                           f"rows must equal images or captions")

        self.total_images = total_images
        self.num_images = total_images if max_images is None else min(max_images, total_images)
        self.num_captions = self.num_images * CAPTIONS_PER_IMAGE
        self.num_rows = self.num_captions // self.im_div
        self.num_regions, self.feature_dim = int(ims.shape[1]), int(ims.shape[2])
        self.dtype = ims.dtype
        self.captions = captions[: self.num_captions]
        self.ids = self._read_ids(total_rows, total_images)[: self.num_images]

        self.has_guide = self.guide_path.is_file()
        self.guide_dim = None
        guide = None
        if self.has_guide:
            guide = _open_npy(self.guide_path, "guide embeddings", ndim=2)
            if guide.shape[0] != total_images:
                raise DataError(self.guide_path, f"has {guide.shape[0]} rows; expected one per "
                                                 f"image ({total_images})")
            self.guide_dim = int(guide.shape[1])
        self.boxes = None
        if self.boxes_path.is_file():
            boxes = _open_npy(self.boxes_path, "region boxes", ndim=3)
            expected = (total_images, self.num_regions, 4)
            if tuple(boxes.shape) != expected:
                raise DataError(self.boxes_path, f"has shape {tuple(boxes.shape)}; expected "
                                                 f"{expected} (images, regions, x0 y0 x1 y1)")
            self.boxes = boxes[: self.num_images]
        self.image_paths = None
        if self.images_path.is_file():
            names = _read_lines(self.images_path, "image list")
            if len(names) != total_images:
                raise DataError(self.images_path, f"lists {len(names)} images; expected one per "
                                                  f"image ({total_images})")
            self.image_paths = [(self.folder / n).resolve() for n in names[: self.num_images]]

        self._ims: np.ndarray | None = ims
        self._guide: np.ndarray | None = guide
        if validate:
            for row in _sample_rows(self.num_rows):
                _check_finite_row(ims, row, self.ims_path, "region features")
            if self.has_guide:
                for row in _sample_rows(self.num_images):
                    _check_finite_row(self.guide, row, self.guide_path, "guide embeddings")
            if self.boxes is not None:
                for row in _sample_rows(self.num_images):
                    _check_finite_row(self.boxes, row, self.boxes_path, "region boxes")
            if self.im_div == 1:
                for image in _sample_rows(self.num_images):
                    self._check_rows_of_image(image)
        if full_check:
            self.validate_rows()

    # -- optional files ----------------------------------------------------------------------
    def _read_ids(self, total_rows: int, total_images: int) -> np.ndarray:
        """Image ids, one per image; ``_ids.txt`` may hold one per row or one per image."""
        if not self.ids_path.is_file():
            return np.arange(total_images, dtype=np.int64)
        lines = _read_lines(self.ids_path, "ids file")
        try:
            values = np.array([int(s) for s in lines], dtype=np.int64)
        except ValueError:
            bad = next(k for k, s in enumerate(lines, 1) if not s.lstrip("+-").isdigit())
            raise DataError(self.ids_path, f"line {bad} is not an integer id: {lines[bad - 1]!r}") from None
        if len(values) == total_images:
            return values
        if len(values) == total_rows and total_rows == total_images * CAPTIONS_PER_IMAGE:
            per_image = values.reshape(total_images, CAPTIONS_PER_IMAGE)
            bad = np.flatnonzero((per_image != per_image[:, :1]).any(axis=1))
            if len(bad):
                i = int(bad[0])
                raise DataError(self.ids_path, f"rows {5 * i}..{5 * i + 4} belong to image {i} "
                                               f"but hold different ids {per_image[i].tolist()}")
            return per_image[:, 0].copy()
        raise DataError(self.ids_path, f"holds {len(values)} ids; expected one per row "
                                       f"({total_rows}) or one per image ({total_images})")

    # -- arrays (re-opened lazily so pickling for DataLoader workers never copies data) -------
    @property
    def ims(self) -> np.ndarray:
        """The memory-mapped ``(N_rows, R, F)`` feature array (whole file, untruncated)."""
        if self._ims is None:
            self._ims = np.load(self.ims_path, mmap_mode="r", allow_pickle=False)
        return self._ims

    @property
    def guide(self) -> np.ndarray | None:
        """The memory-mapped ``(N_images, G)`` guide array, or None."""
        if not self.has_guide:
            return None
        if self._guide is None:
            self._guide = np.load(self.guide_path, mmap_mode="r", allow_pickle=False)
        return self._guide

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_ims"] = None
        state["_guide"] = None
        state["_fh"] = None
        if self.boxes is not None:
            state["boxes"] = None
            state["_reopen_boxes"] = True
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        reopen = state.pop("_reopen_boxes", False)
        self.__dict__.update(state)
        if reopen:
            self.boxes = np.load(self.boxes_path, mmap_mode="r")[: self.num_images]

    # -- checks ------------------------------------------------------------------------------
    def _check_rows_of_image(self, image: int, block: np.ndarray | None = None, start: int = 0) -> None:
        """One feature row per caption: the 5 rows of ``image`` must be the same features.

        ``rows == captions`` is ambiguous: 30 images x 4 captions stored one row per caption also
        has 120 rows for 120 captions, and would be grouped as 24 x 5 with features of
        different images under one id. Rows that differ within a group of 5 give it away.
        """
        first = image * CAPTIONS_PER_IMAGE
        rows = (np.asarray(self.ims[first: first + CAPTIONS_PER_IMAGE]) if block is None
                else block[first - start: first - start + CAPTIONS_PER_IMAGE])
        if np.isnan(rows).any():
            return  # reported as NaN by the finiteness checks, which name the row
        same = (rows == rows[:1]).reshape(len(rows), -1).all(axis=1)
        if not same.all():
            other = first + int(np.argmin(same))
            raise DataError(self.ims_path, f"one feature row per caption ({self.ims.shape[0]} rows for "
                                           f"{self.total_images * CAPTIONS_PER_IMAGE} captions), but rows "
                                           f"{first} and {other} (image {image}, captions {first}..{first + 4}) "
                                           f"differ: the 5 captions of an image must share identical rows. "
                                           f"Does the file hold another number of captions per image "
                                           f"(e.g. 4)? userlab needs 5 per image, consecutive")

    def validate_rows(self, chunk_rows: int = 1024, features: bool = True) -> int:
        """Scan every used row of every array file (features, guide, boxes), ``chunk_rows`` at
        a time, for NaN/Inf and (float64 files) values beyond float32's range; with one row per
        caption, also check that the 5 rows of each image are identical.

        Memory stays at one chunk (``chunk_rows * R * F`` values) however large the file.

        Args:
            features: also scan the region features (the guide and boxes are always scanned).

        Returns:
            The number of feature rows checked.

        Raises:
            DataError: naming the file and the first bad row.
        """
        if chunk_rows < 1:
            raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
        arrays = [(self.ims, self.num_rows, self.ims_path, "region features")] if features else []
        if self.has_guide:
            arrays.append((self.guide, self.num_images, self.guide_path, "guide embeddings"))
        if self.boxes is not None:
            arrays.append((self.boxes, self.num_images, self.boxes_path, "region boxes"))
        if self.im_div == 1:  # whole images per chunk, for the identical-rows check
            chunk_rows = max(CAPTIONS_PER_IMAGE, chunk_rows - chunk_rows % CAPTIONS_PER_IMAGE)
        for arr, n, path, what in arrays:
            for start in range(0, n, chunk_rows):
                block = np.asarray(arr[start: min(n, start + chunk_rows)])
                good = _good_rows(block)
                if not good.all():
                    _release_pages(arr)
                    raise DataError(path, _bad_row_problem(arr, start + int(np.argmin(good)), what))
                if arr is self.ims and self.im_div == 1:
                    for image in range(start // CAPTIONS_PER_IMAGE, (start + len(block)) // CAPTIONS_PER_IMAGE):
                        self._check_rows_of_image(image, block, start)
                _release_pages(arr)  # keep RSS at one chunk, not the whole file
        return self.num_rows if features else 0

    # -- items ---------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.num_captions

    def row_of_caption(self, caption_index: int) -> int:
        return caption_index // self.im_div

    def row_of_image(self, image_index: int) -> int:
        return image_index * CAPTIONS_PER_IMAGE // self.im_div

    def image_item(self, i: int) -> dict[str, Any]:
        """Image ``i``: ``regions`` float32 ``(R, F)``, ``guide`` ``(G,)`` when present,
        ``image_index`` and ``image_id``."""
        i = _check_index(i, self.num_images, "image")
        row = self.row_of_image(i)
        regions = self._read_row(row)
        if self.validate and not np.isfinite(regions).all():
            raise DataError(self.ims_path, _bad_row_problem(self.ims, row, "region features")
                            + f" (image {i})")
        item: dict[str, Any] = {"regions": torch.from_numpy(regions), "image_index": i,
                                "image_id": int(self.ids[i])}
        if self.has_guide:
            guide = np.array(self.guide[i], dtype=np.float32)
            if self.validate and not np.isfinite(guide).all():
                raise DataError(self.guide_path, _bad_row_problem(self.guide, i, "guide embeddings"))
            item["guide"] = torch.from_numpy(guide)
        return item

    def _read_row(self, row: int) -> np.ndarray:
        """Feature row ``row`` as a new float32 ``(R, F)`` array.

        C-ordered files are read with ``os.pread`` (no pages mapped into this process, so the
        resident set does not grow with the rows read); others through the mapping, with the
        mapped pages released every ``release_every_bytes``.
        """
        arr = self.ims
        offset = getattr(arr, "offset", None)
        if offset is None or not arr.flags.c_contiguous:
            regions = np.array(arr[row], dtype=np.float32)
            self._count_read(regions.nbytes)
            return regions
        if getattr(self, "_fh", None) is None:
            self._fh = open(self.ims_path, "rb")
        nbytes = self.num_regions * self.feature_dim * arr.dtype.itemsize
        data = os.pread(self._fh.fileno(), nbytes, offset + row * nbytes)
        if len(data) != nbytes:
            raise DataError(self.ims_path, f"region features row {row} is cut short (the file "
                                           f"shrank after it was opened?)")
        return np.frombuffer(data, dtype=arr.dtype).reshape(self.num_regions, self.feature_dim
                                                            ).astype(np.float32)  # a copy

    def __del__(self) -> None:
        fh = getattr(self, "_fh", None)
        if fh is not None:
            fh.close()

    def _count_read(self, nbytes: int) -> None:
        """Release the mapped feature pages once ``release_every_bytes`` have been read."""
        self._bytes_since_release = getattr(self, "_bytes_since_release", 0) + nbytes
        if self.release_every_bytes and self._bytes_since_release >= self.release_every_bytes:
            _release_pages(self._ims)
            _release_pages(self._guide)
            self._bytes_since_release = 0

    def caption_item(self, c: int) -> dict[str, Any]:
        """Caption ``c``: ``caption`` text, ``tokens`` (when a tokenizer is set; augmented when
        ``train``), ``caption_index``, ``image_index`` and ``image_id``."""
        c = _check_index(c, self.num_captions, "caption")
        image = c // CAPTIONS_PER_IMAGE
        item: dict[str, Any] = {"caption": self.captions[c], "caption_index": c,
                                "image_index": image, "image_id": int(self.ids[image])}
        if self.tokenizer is not None:
            if self.train and self._epoch_seed is not None and hasattr(self.tokenizer, "encode"):
                # Augmentation drawn from (seed, epoch, caption): identical whichever worker
                # reads the caption, and after a resume.
                rng = random.Random(self._epoch_seed * 1_000_003 + c)
                ids = self.tokenizer.encode(self.captions[c], augment=True, rng=rng)
                item["tokens"] = torch.tensor(ids, dtype=torch.long)
            else:
                item["tokens"] = self.tokenizer(self.captions[c], self.train)
        return item

    def set_epoch(self, epoch: int, seed: int) -> None:
        """Make caption augmentation a pure function of ``(seed, epoch, caption index)``."""
        self._epoch_seed = seed * 10_007 + epoch

    def __getitem__(self, c: int) -> dict[str, Any]:
        item = self.caption_item(c)
        item.update(self.image_item(item["image_index"]))
        return item

    def __repr__(self) -> str:
        return (f"PrecompDataset({str(self.folder)!r}, split={self.split!r}, images={self.num_images}, "
                f"captions={self.num_captions}, R={self.num_regions}, F={self.feature_dim}, "
                f"im_div={self.im_div}, guide={self.guide_dim})")


def _check_index(index: int, size: int, what: str) -> int:
    index = int(index)
    if index < 0:
        index += size
    if not 0 <= index < size:
        raise IndexError(f"{what} index {index} out of range for {size} {what}s")
    return index


class ImageView(Dataset):
    """The images of a :class:`PrecompDataset`, one item per image (for encoding a split once)."""

    def __init__(self, dataset: PrecompDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return self.dataset.num_images

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.dataset.image_item(i)


class CaptionView(Dataset):
    """The captions of a :class:`PrecompDataset`, one item per caption, no features read."""

    def __init__(self, dataset: PrecompDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return self.dataset.num_captions

    def __getitem__(self, c: int) -> dict[str, Any]:
        return self.dataset.caption_item(c)


# ---------------------------------------------------------------------------------------------
# Batching
# ---------------------------------------------------------------------------------------------
_INDEX_KEYS = ("image_index", "caption_index", "image_id")


def collate_batch(items: Sequence[Mapping[str, Any]], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Stack dataset items into the batch dict of docs/interfaces.md ("Batches").

    Works for full items, image-only items (:class:`ImageView`) and caption-only items
    (:class:`CaptionView`); only the keys present in the items appear in the batch.

    Returns:
        ``regions`` float ``(B, R, F)``; ``guide`` float ``(B, G)``; ``tokens`` long ``(B, L)``
        right-padded with ``pad_id``; ``lengths`` long ``(B,)``; ``attention_mask`` long
        ``(B, L)`` (1 on real tokens); ``image_index``, ``caption_index``, ``image_id`` long
        ``(B,)``.
    """
    if len(items) == 0:
        raise ValueError("cannot collate an empty batch")
    first = items[0]
    batch: dict[str, torch.Tensor] = {}
    if "regions" in first:
        batch["regions"] = torch.stack([torch.as_tensor(it["regions"], dtype=torch.float32)
                                        for it in items])
    if "guide" in first:
        batch["guide"] = torch.stack([torch.as_tensor(it["guide"], dtype=torch.float32)
                                      for it in items])
    if "tokens" in first:
        seqs = [torch.as_tensor(it["tokens"], dtype=torch.long).reshape(-1) for it in items]
        lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
        width = int(lengths.max())
        tokens = torch.full((len(seqs), width), pad_id, dtype=torch.long)
        for row, seq in enumerate(seqs):
            tokens[row, : len(seq)] = seq
        batch["tokens"] = tokens
        batch["lengths"] = lengths
        batch["attention_mask"] = (torch.arange(width)[None, :] < lengths[:, None]).long()
    for key in _INDEX_KEYS:
        if key in first:
            batch[key] = torch.tensor([int(it[key]) for it in items], dtype=torch.long)
    return batch


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------
def write_precomp_split(folder: str | os.PathLike, split: str, ims: np.ndarray,
                        captions: Sequence[str], ids: Sequence[int] | None = None,
                        guide: np.ndarray | None = None, boxes: np.ndarray | None = None,
                        image_names: Sequence[str] | None = None) -> Path:
    """Write one split in the precomp layout, every file atomically.

    The features are written last, so a folder whose ``{split}_ims.npy`` exists holds the
    whole split even if the writer was killed.

    Args:
        folder: target folder (created when missing).
        split: split name.
        ims: float ``(N_rows, R, F)``, one row per image or one per caption.
        captions: 5 per image, consecutive; no newlines inside a caption.
        ids: one integer image id per image or per row.
        guide: float ``(N_images, G)``.
        boxes: float ``(N_images, R, 4)``.
        image_names: one path per image, relative to ``folder``.

    Returns:
        The folder.
    """
    folder = Path(folder)
    ims_path = folder / f"{split}_ims.npy"
    caps_path = folder / f"{split}_caps.txt"
    ims = np.asarray(ims)
    if ims.ndim != 3 or ims.dtype.kind != "f":
        raise DataError(ims_path, f"features must be a 3-d float array, got {ims.dtype} {ims.shape}")
    captions = [str(c) for c in captions]
    if not captions or len(captions) % CAPTIONS_PER_IMAGE:
        raise DataError(caps_path, f"{len(captions)} captions given; need 5 per image")
    for k, cap in enumerate(captions):
        if "\n" in cap or "\r" in cap or not cap.strip():
            raise DataError(caps_path, f"caption {k} is empty or contains a line break: {cap!r}")
    n_images = len(captions) // CAPTIONS_PER_IMAGE
    if ims.shape[0] not in (n_images, len(captions)):
        raise DataError(ims_path, f"{ims.shape[0]} feature rows for {n_images} images / "
                                  f"{len(captions)} captions: rows must equal one or the other")
    _check_extra(folder / f"{split}_ids.txt", ids, (n_images, ims.shape[0]), "ids")
    _check_extra(folder / f"{split}_images.txt", image_names, (n_images,), "image names")
    if guide is not None:
        guide = np.asarray(guide)
        if guide.ndim != 2 or guide.shape[0] != n_images:
            raise DataError(folder / f"{split}_guide.npy",
                            f"guide must be (N_images={n_images}, G), got {guide.shape}")
    if boxes is not None:
        boxes = np.asarray(boxes)
        if boxes.shape != (n_images, ims.shape[1], 4):
            raise DataError(folder / f"{split}_boxes.npy",
                            f"boxes must be {(n_images, ims.shape[1], 4)}, got {boxes.shape}")

    atomic_write_text(caps_path, "\n".join(c.strip() for c in captions) + "\n")
    if ids is not None:
        atomic_write_text(folder / f"{split}_ids.txt", "".join(f"{int(i)}\n" for i in ids))
    if image_names is not None:
        atomic_write_text(folder / f"{split}_images.txt", "".join(f"{n}\n" for n in image_names))
    if guide is not None:
        atomic_save_npy(folder / f"{split}_guide.npy", guide)
    if boxes is not None:
        atomic_save_npy(folder / f"{split}_boxes.npy", boxes.astype(np.float32, copy=False))
    atomic_save_npy(ims_path, ims)
    # temporary files of an earlier writer of this split that was killed (atomic_path names)
    for stale in folder.glob(f".{split}_*.tmp"):
        stale.unlink(missing_ok=True)
    return folder


def _check_extra(path: Path, values: Sequence | None, allowed: Iterable[int], what: str) -> None:
    if values is None:
        return
    allowed = tuple(dict.fromkeys(allowed))
    if len(values) not in allowed:
        raise DataError(path, f"{len(values)} {what} given; expected {' or '.join(map(str, allowed))}")


# ---------------------------------------------------------------------------------------------
# Overview
# ---------------------------------------------------------------------------------------------
def list_splits(folder: str | os.PathLike) -> list[str]:
    """Names of the splits in ``folder`` (every ``{split}_ims.npy``), sorted."""
    return sorted(p.name[: -len("_ims.npy")] for p in Path(folder).glob("*_ims.npy"))


def describe(folder: str | os.PathLike):
    """A pandas DataFrame with one row per split of a precomp folder.

    Columns: split, rows, images, captions, im_div, R, F, dtype, guide_dim, boxes, ids,
    images_listed, size_mb (all files of the split on disk), problem (the validation error of
    a broken split, else empty). Only headers and caption files are read.
    """
    import pandas as pd

    folder = Path(folder)
    records = []
    for split in list_splits(folder):
        files = [folder / f"{split}{s}" for s in ("_ims.npy", "_caps.txt") + OPTIONAL_SUFFIXES]
        size_mb = sum(p.stat().st_size for p in files if p.is_file()) / 2**20
        record: dict[str, Any] = {"split": split, "size_mb": round(size_mb, 3), "problem": ""}
        try:
            ds = PrecompDataset(folder, split, validate=False)
        except DataError as err:
            record["problem"] = str(err)
        else:
            record.update(rows=ds.num_rows, images=ds.num_images, captions=ds.num_captions,
                          im_div=ds.im_div, R=ds.num_regions, F=ds.feature_dim,
                          dtype=str(ds.dtype), guide_dim=ds.guide_dim,
                          boxes=ds.boxes is not None, ids=ds.ids_path.is_file(),
                          images_listed=ds.image_paths is not None)
        records.append(record)
    columns = ["split", "rows", "images", "captions", "im_div", "R", "F", "dtype", "guide_dim",
               "boxes", "ids", "images_listed", "size_mb", "problem"]
    return pd.DataFrame.from_records(records, columns=columns)

"""Caption files of Flickr8k, Flickr30k and MS-COCO, read as they are distributed.

Three formats, one result: an ordered list of :class:`CaptionedImage` (relative image path,
integer image id, exactly five captions) per split.

``karpathy``
    Karpathy's split files ``dataset_flickr8k.json``, ``dataset_flickr30k.json`` and
    ``dataset_coco.json``: ``{"images": [{"filename", "filepath"?, "split", "sentences":
    [{"raw", "tokens"}], "imgid", "cocoid"?}]}``. The image path is ``filepath/filename`` when
    ``filepath`` is present (COCO: ``val2014/COCO_val2014_....jpg``), else ``filename``. The id is
    ``cocoid`` when present, else ``imgid``. Captions are the ``raw`` sentences (the ``tokens``
    joined by spaces when ``raw`` is absent), in sentence order.
``flickr``
    The Flickr8k / Flickr30k token files (``Flickr8k.token.txt``, ``results_20130124.token``):
    lines ``<image>#<n>\\t<caption>``. Captions are ordered by ``n`` (file order among equal
    ``n``). The split comes from the official lists (``Flickr_8k.trainImages.txt``,
    ``Flickr_8k.devImages.txt``, ``Flickr_8k.testImages.txt``: one file name per line) given as
    ``{"train": path, "dev": path, "test": path}``, or from a Karpathy JSON (Flickr30k has no
    official lists). Images of the token file that no list names are left out (Flickr8k's token
    file covers 8,092 images, its lists 8,000). The id is the image's position in the token file
    (order of first appearance).
``coco``
    COCO's ``captions_train2014.json`` / ``captions_val2014.json`` (``{"images": [{"id",
    "file_name"}], "annotations": [{"image_id", "caption"}]}``), one or several files. Images
    sit in a folder named after the annotation file (``captions_val2014.json`` ->
    ``val2014/``); a flat folder works too (see :func:`locate_images`). The split comes from a
    Karpathy ``dataset_coco.json`` (matched by ``cocoid``, in Karpathy's order) or, without one,
    from the file: ``train*`` files -> ``train`` and ``val*`` files -> ``coco_val_split``
    (``"dev"`` by default; no ``test``/``testall`` is written then). Captions keep annotation
    order. The id is COCO's image id.

Rules shared by all formats:

* Split names are ``train``, ``dev`` (Karpathy's ``val``), ``test``, and for COCO with a
  Karpathy split also ``testall``: the 5,000 Karpathy test images, of which ``test`` holds the
  first 1,000 (SCAN's ``coco_precomp`` convention; the 5-fold 1K protocol runs on ``testall``).
* Karpathy's ``restval`` images (COCO: 30,504) join ``train`` (113,287 images in all, as in the
  papers); pass ``restval="separate"`` to write them as their own split ``restval``.
* Every image keeps exactly 5 captions: images with 6 or 7 (a few hundred COCO images) keep the
  first 5 in the order above; fewer than 5 raises :class:`~userlab.errors.DataError` naming the
  images and the file. Captions are cleaned of newlines, tabs and repeated spaces; an empty
  caption raises a DataError naming its image.
"""
from __future__ import annotations

import json
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from ..errors import ConfigError, DataError

CAPTIONS_PER_IMAGE = 5
FORMATS = ("karpathy", "flickr", "coco")
#: Split names in the order they are written.
SPLIT_ORDER = ("train", "restval", "dev", "test", "testall")
COCO_TEST_1K = 1000
LIST_LIMIT = 20   # names listed in an error message before "and N more"

_KARPATHY_SPLITS = {"train": "train", "val": "dev", "test": "test", "restval": "restval"}


@dataclass(frozen=True)
class CaptionedImage:
    """One image of a split.

    Attributes:
        path: image path relative to the image root, ``/``-separated.
        image_id: integer id (one per image, unique within the dataset).
        captions: exactly 5 cleaned captions.
    """

    path: str
    image_id: int
    captions: tuple[str, ...]


CaptionSplits = dict[str, list[CaptionedImage]]


# ---------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------
def clean_caption(text: str) -> str:
    """Collapse every run of whitespace (newlines, tabs, spaces) into one space and strip."""
    return " ".join(str(text).split())


def name_list(names: Sequence[str], limit: int = LIST_LIMIT) -> str:
    """``"a, b, c"`` or ``"a, b, ... (and 12 more)"`` for error messages."""
    shown = ", ".join(str(n) for n in names[:limit])
    return shown + (f" (and {len(names) - limit} more)" if len(names) > limit else "")


def _five_captions(raw: Sequence[str], image: str, source: Path,
                   too_few: list[str], empty: list[str]) -> tuple[str, ...]:
    """The first 5 cleaned captions; record images with too few or with an empty caption."""
    cleaned = [clean_caption(c) for c in raw]
    if any(not c for c in cleaned):
        empty.append(image)
    if len(cleaned) < CAPTIONS_PER_IMAGE:
        too_few.append(f"{image} ({len(cleaned)})")
    return tuple(cleaned[:CAPTIONS_PER_IMAGE])


def _raise_caption_problems(source: Path, too_few: list[str], empty: list[str]) -> None:
    if too_few:
        raise DataError(source, f"{len(too_few)} image(s) have fewer than {CAPTIONS_PER_IMAGE} "
                                f"captions (count in brackets): {name_list(too_few)}")
    if empty:
        raise DataError(source, f"{len(empty)} image(s) have an empty caption: {name_list(empty)}")


def _load_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise DataError(path, f"{what} file is missing")
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError as err:
        raise DataError(path, f"not valid UTF-8: {err}") from None
    except ValueError as err:
        raise DataError(path, f"not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise DataError(path, f"expected a JSON object at the top level of the {what} file")
    return data


def _read_text_lines(path: Path, what: str) -> list[str]:
    if not path.is_file():
        raise DataError(path, f"{what} file is missing")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataError(path, f"{what} is not valid UTF-8: {err}") from None
    return text.splitlines()


def _check_restval(restval: str) -> None:
    if restval not in ("train", "separate"):
        raise ConfigError("restval", f"must be 'train' or 'separate', got {restval!r}")


def _ordered(splits: Mapping[str, list[CaptionedImage]]) -> CaptionSplits:
    """Drop empty splits and order them as :data:`SPLIT_ORDER`."""
    rank = {s: k for k, s in enumerate(SPLIT_ORDER)}
    return {s: list(splits[s]) for s in sorted(splits, key=lambda s: rank.get(s, len(rank)))
            if splits[s]}


def _add_coco_test_1k(splits: dict[str, list[CaptionedImage]]) -> None:
    """COCO: Karpathy's 5K test images become ``testall``; ``test`` is their first 1K."""
    if splits.get("test"):
        splits["testall"] = splits["test"]
        splits["test"] = splits["testall"][:COCO_TEST_1K]


# ---------------------------------------------------------------------------------------------
# Karpathy JSON
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _KarpathyEntry:
    path: str
    image_id: int
    split: str
    sentences: tuple[str, ...]
    cocoid: int | None


def _karpathy_entries(path: Path) -> tuple[list[_KarpathyEntry], bool]:
    """Entries of a Karpathy split file, and whether it describes COCO."""
    data = _load_json(path, "Karpathy split")
    images = data.get("images")
    if not isinstance(images, list) or not images:
        raise DataError(path, "expected a non-empty list under the key 'images'")
    entries = []
    for k, item in enumerate(images):
        if not isinstance(item, dict) or "filename" not in item or "split" not in item:
            raise DataError(path, f"images[{k}] lacks 'filename' or 'split'")
        split = _KARPATHY_SPLITS.get(item["split"])
        if split is None:
            raise DataError(path, f"images[{k}] ({item['filename']}) has unknown split "
                                  f"{item['split']!r} (known: {', '.join(_KARPATHY_SPLITS)})")
        rel = "/".join(p for p in (item.get("filepath") or "", item["filename"]) if p)
        sentences = []
        for s in item.get("sentences") or []:
            raw = s.get("raw") if isinstance(s, dict) else None
            if raw is None and isinstance(s, dict):
                raw = " ".join(s.get("tokens") or [])
            sentences.append("" if raw is None else str(raw))
        cocoid = item.get("cocoid")
        image_id = cocoid if cocoid is not None else item.get("imgid", k)
        try:
            image_id = int(image_id)
        except (TypeError, ValueError):
            raise DataError(path, f"images[{k}] ({rel}) has a non-integer id {image_id!r}") from None
        entries.append(_KarpathyEntry(rel, image_id, split, tuple(sentences),
                                      None if cocoid is None else int(cocoid)))
    is_coco = str(data.get("dataset", "")).lower() == "coco" or any(
        e.cocoid is not None for e in entries)
    return entries, is_coco


def read_karpathy(path: str | os.PathLike, restval: str = "train") -> CaptionSplits:
    """Read a Karpathy split file (``dataset_{flickr8k,flickr30k,coco}.json``).

    Args:
        path: the JSON file.
        restval: ``"train"`` (default) merges ``restval`` into ``train`` in file order;
            ``"separate"`` keeps it as split ``restval``.

    Returns:
        ``{split: [CaptionedImage, ...]}`` in file order; COCO files also get ``testall``.

    Raises:
        DataError: unreadable file, unknown split, fewer than 5 or empty captions.
    """
    _check_restval(restval)
    path = Path(path)
    entries, is_coco = _karpathy_entries(path)
    splits: dict[str, list[CaptionedImage]] = {}
    too_few: list[str] = []
    empty: list[str] = []
    for e in entries:
        caps = _five_captions(e.sentences, e.path, path, too_few, empty)
        split = "train" if (e.split == "restval" and restval == "train") else e.split
        splits.setdefault(split, []).append(CaptionedImage(e.path, e.image_id, caps))
    _raise_caption_problems(path, too_few, empty)
    if is_coco:
        _add_coco_test_1k(splits)
    return _ordered(splits)


# ---------------------------------------------------------------------------------------------
# Flickr token files
# ---------------------------------------------------------------------------------------------
_TOKEN_KEY = re.compile(r"^(?P<name>.+)#(?P<n>\d+)$")


def read_flickr_tokens(path: str | os.PathLike,
                       split_files: Mapping[str, str | os.PathLike] | str | os.PathLike,
                       restval: str = "train") -> CaptionSplits:
    """Read a Flickr8k / Flickr30k token file and assign splits.

    Args:
        path: token file, lines ``<image>#<n>\\t<caption>``.
        split_files: ``{"train": list, "dev": list, "test": list}`` (official Flickr8k lists,
            one image file name per line; the key ``"val"`` is read as ``"dev"``), or the path
            of a Karpathy JSON whose ``split`` fields assign the images by file name.
        restval: as :func:`read_karpathy` (only used with a Karpathy JSON).

    Returns:
        ``{split: [CaptionedImage, ...]}``, each split in the order of its list.

    Raises:
        DataError: malformed lines, images listed in a split but absent from the token file,
            an image in two splits, fewer than 5 or empty captions.
    """
    _check_restval(restval)
    path = Path(path)
    lines = _read_text_lines(path, "token")
    kaggle = _is_kaggle_csv(lines)
    if split_files is None or (isinstance(split_files, Mapping) and not split_files):
        if kaggle:
            raise ConfigError("split_files", f"{path.name} is a Kaggle-style 'image,caption' CSV, "
                                             "which carries no split: pass the official lists "
                                             "(--train-list Flickr_8k.trainImages.txt --dev-list "
                                             "Flickr_8k.devImages.txt --test-list "
                                             "Flickr_8k.testImages.txt) or --karpathy "
                                             "dataset_flickr8k.json")
    assignment = _flickr_split_lists(split_files, restval)
    per_image = _kaggle_captions(lines, path) if kaggle else _token_captions(lines, path)
    if not per_image:
        raise DataError(path, "no captions found")
    position = {name: k for k, name in enumerate(per_image)}

    unknown = [n for names in assignment.values() for n in names if n not in per_image]
    if unknown:
        raise DataError(path, f"{len(unknown)} image(s) of the split lists have no captions in "
                              f"this file: {name_list(unknown)}")
    splits: dict[str, list[CaptionedImage]] = {}
    too_few: list[str] = []
    empty: list[str] = []
    for split, names in assignment.items():
        for name in names:
            ordered = [c for _, _, c in sorted(per_image[name])]  # by n, then line number
            caps = _five_captions(ordered, name, path, too_few, empty)
            splits.setdefault(split, []).append(CaptionedImage(name, position[name], caps))
    _raise_caption_problems(path, too_few, empty)
    return _ordered(splits)


def _token_captions(lines: list[str], path: Path) -> dict[str, list[tuple[int, int, str]]]:
    """``<image>#<n>\\t<caption>`` lines -> image -> ``[(n, line number, caption)]``."""
    per_image: dict[str, list[tuple[int, int, str]]] = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        key, sep, caption = line.partition("\t")
        match = _TOKEN_KEY.match(key.strip())
        if not sep or match is None:
            hint = ("; a CSV needs the header line 'image,caption' (Kaggle's captions.txt)"
                    if "," in line and not sep else "")
            raise DataError(path, f"line {number} is not '<image>#<n>\\t<caption>': {line[:80]!r}{hint}")
        per_image.setdefault(match["name"], []).append((int(match["n"]), number, caption))
    return per_image


def _is_kaggle_csv(lines: list[str]) -> bool:
    """Kaggle's Flickr8k ``captions.txt`` starts with the header ``image,caption``."""
    first = next((ln for ln in lines if ln.strip()), "")
    return first.replace(" ", "").lower() == "image,caption"


def _kaggle_captions(lines: list[str], path: Path) -> dict[str, list[tuple[int, int, str]]]:
    """Kaggle's ``image,caption`` CSV (header, captions quoted when they hold commas) ->
    image -> ``[(order, line number, caption)]``; captions keep file order."""
    import csv

    per_image: dict[str, list[tuple[int, int, str]]] = {}
    reader = csv.reader(lines)
    next(reader, None)  # the header
    for row in reader:
        number = reader.line_num
        if not row or not any(cell.strip() for cell in row):
            continue
        if len(row) != 2 or not row[0].strip():
            raise DataError(path, f"line {number} is not 'image,caption' (a CSV row of two fields; "
                                  f"quote captions that hold commas): {','.join(row)[:80]!r}")
        name, caption = row[0].strip(), row[1]
        # Kaggle's copy has names like '1000268201_693b08cb0e.jpg#0' nowhere, but accept them.
        match = _TOKEN_KEY.match(name)
        if match is not None:
            name = match["name"]
        entries = per_image.setdefault(name, [])
        entries.append((len(entries), number, caption))
    return per_image


def _flickr_split_lists(split_files, restval: str) -> dict[str, list[str]]:
    """Split -> image names, from official list files or a Karpathy JSON."""
    if split_files is None or (isinstance(split_files, Mapping) and not split_files):
        raise ConfigError("split_files", "the flickr format needs the split lists "
                                         "({'train': ..., 'dev': ..., 'test': ...}) or a Karpathy JSON")
    if not isinstance(split_files, Mapping):
        entries, _ = _karpathy_entries(Path(split_files))
        out: dict[str, list[str]] = {}
        for e in entries:
            split = "train" if (e.split == "restval" and restval == "train") else e.split
            out.setdefault(split, []).append(e.path.rsplit("/", 1)[-1])
        return out
    out = {}
    seen: dict[str, str] = {}
    for split, list_path in split_files.items():
        split = "dev" if split == "val" else split
        if split not in SPLIT_ORDER:
            raise ConfigError("split_files", f"unknown split {split!r} (use train, dev, test)")
        list_path = Path(list_path)
        names = [ln.strip() for ln in _read_text_lines(list_path, f"{split} image list") if ln.strip()]
        if not names:
            raise DataError(list_path, f"the {split} image list is empty")
        same_as = next((other for other, listed in out.items() if listed == names), None)
        if same_as is not None:
            # e.g. the dev list passed again as test (Flickr8k without its test images):
            # allowed, and extraction computes the images once (see extract._derived_splits).
            warnings.warn(f"the {split} list {list_path.name} names exactly the {same_as} "
                          f"images: '{split}' is a copy of '{same_as}', not held-out data",
                          stacklevel=4)
            out[split] = list(names)
            continue
        twice = [n for n in names if n in seen]
        if twice:
            raise DataError(list_path, f"{len(twice)} image(s) are also in the {seen[twice[0]]} "
                                       f"list: {name_list(twice)}")
        seen.update((n, split) for n in names)
        out.setdefault(split, []).extend(names)
    return out


# ---------------------------------------------------------------------------------------------
# COCO annotation files
# ---------------------------------------------------------------------------------------------
def _coco_folder(path: Path) -> str:
    """``captions_val2014.json`` -> ``val2014`` (the folder COCO ships those images in)."""
    stem = path.stem
    return stem[len("captions_"):] if stem.startswith("captions_") else stem


def read_coco_captions(paths: str | os.PathLike | Sequence[str | os.PathLike],
                       karpathy: str | os.PathLike | None = None, restval: str = "train",
                       coco_val_split: str = "dev") -> CaptionSplits:
    """Read COCO caption annotation files and assign splits.

    Args:
        paths: one or more ``captions_*.json`` files.
        karpathy: ``dataset_coco.json`` giving Karpathy's split by ``cocoid`` (then the splits
            are train (+restval), dev, test (1K) and testall (5K), in Karpathy's order).
        restval: as :func:`read_karpathy`.
        coco_val_split: without ``karpathy``, the split of the ``val*`` files' images
            (default ``"dev"``); ``train*`` files go to ``train``, in file order.

    Raises:
        DataError: unreadable files, annotations of unknown images, Karpathy images missing from
            the files, fewer than 5 or empty captions.
    """
    _check_restval(restval)
    if coco_val_split not in ("dev", "test", "train"):
        raise ConfigError("coco_val_split", f"must be dev, test or train, got {coco_val_split!r}")
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    paths = [Path(p) for p in paths]
    if not paths:
        raise ConfigError("captions_path", "no COCO caption file given")
    # image id -> (relative path, raw captions, source file, file-based split)
    images: dict[int, tuple[str, list[str], Path, str | None]] = {}
    for path in paths:
        data = _load_json(path, "COCO captions")
        if not isinstance(data.get("images"), list) or not isinstance(data.get("annotations"), list):
            raise DataError(path, "expected the lists 'images' and 'annotations' (a COCO captions file)")
        folder = _coco_folder(path)
        kind = "train" if folder.startswith("train") else "val" if folder.startswith("val") else None
        local: dict[int, tuple[str, list[str]]] = {}
        for k, im in enumerate(data["images"]):
            try:
                local[int(im["id"])] = (f"{folder}/{im['file_name']}", [])
            except (KeyError, TypeError, ValueError):
                raise DataError(path, f"images[{k}] needs an integer 'id' and a 'file_name'") from None
        for k, ann in enumerate(data["annotations"]):
            try:
                image_id, caption = int(ann["image_id"]), ann["caption"]
            except (KeyError, TypeError, ValueError):
                raise DataError(path, f"annotations[{k}] needs 'image_id' and 'caption'") from None
            if image_id not in local:
                raise DataError(path, f"annotations[{k}] names image id {image_id}, which is not "
                                      f"in this file's 'images'")
            local[image_id][1].append("" if caption is None else str(caption))
        for image_id, (rel, caps) in local.items():
            if image_id in images:
                raise DataError(path, f"image id {image_id} is also in {images[image_id][2]}")
            images[image_id] = (rel, caps, path, kind)

    order: dict[str, list[int]] = {}
    if karpathy is not None:
        entries, _ = _karpathy_entries(Path(karpathy))
        absent = []
        for e in entries:
            image_id = e.cocoid if e.cocoid is not None else e.image_id
            if image_id not in images:
                absent.append(f"{e.path} (id {image_id})")
                continue
            split = "train" if (e.split == "restval" and restval == "train") else e.split
            order.setdefault(split, []).append(image_id)
        if absent:
            raise DataError(karpathy, f"{len(absent)} image(s) of the Karpathy split are in none "
                                      f"of the COCO files {', '.join(p.name for p in paths)}: "
                                      f"{name_list(absent)}")
    else:
        for image_id, (rel, _, path, kind) in images.items():
            if kind is None:
                raise DataError(path, "cannot tell the split from the file name (expected "
                                      "captions_train*.json or captions_val*.json); pass a "
                                      "Karpathy dataset_coco.json as split_files")
            order.setdefault("train" if kind == "train" else coco_val_split, []).append(image_id)

    splits: dict[str, list[CaptionedImage]] = {}
    too_few: dict[Path, list[str]] = {}
    empty: dict[Path, list[str]] = {}
    for split, ids in order.items():
        for image_id in ids:
            rel, caps, path, _ = images[image_id]
            five = _five_captions(caps, rel, path, too_few.setdefault(path, []),
                                  empty.setdefault(path, []))
            splits.setdefault(split, []).append(CaptionedImage(rel, image_id, five))
    for path in paths:
        _raise_caption_problems(path, too_few.get(path, []), empty.get(path, []))
    if karpathy is not None:
        _add_coco_test_1k(splits)
    return _ordered(splits)


# ---------------------------------------------------------------------------------------------
# One entry point
# ---------------------------------------------------------------------------------------------
def read_caption_splits(format: str, captions_path, split_files=None, restval: str = "train",
                        coco_val_split: str = "dev") -> CaptionSplits:
    """Read a dataset's captions in one of :data:`FORMATS`.

    Args:
        format: ``"karpathy"``, ``"flickr"`` or ``"coco"``.
        captions_path: the Karpathy JSON, the token file, or one / several COCO caption files.
        split_files: flickr: ``{"train", "dev", "test"}`` lists or a Karpathy JSON; coco: an
            optional Karpathy ``dataset_coco.json``; karpathy: unused.
        restval, coco_val_split: see the readers.
    """
    if format == "karpathy":
        if split_files:
            raise ConfigError("split_files", "the karpathy format takes its splits from the JSON itself")
        return read_karpathy(captions_path, restval=restval)
    if format == "flickr":
        return read_flickr_tokens(captions_path, split_files, restval=restval)
    if format == "coco":
        if isinstance(split_files, Mapping):
            raise ConfigError("split_files", "the coco format takes a Karpathy dataset_coco.json path")
        return read_coco_captions(captions_path, karpathy=split_files, restval=restval,
                                  coco_val_split=coco_val_split)
    raise ConfigError("format", f"unknown caption format {format!r} (known: {', '.join(FORMATS)})")


def locate_images(splits: CaptionSplits, image_root: str | os.PathLike, source: str | os.PathLike,
                  skip_missing: bool = False) -> tuple[CaptionSplits, list[str]]:
    """Find every image on disk and drop (or complain about) the missing ones.

    An image is looked for at ``image_root/path`` and, failing that, at
    ``image_root/<file name>`` (a flat folder of COCO images works too).

    Args:
        splits: from a reader; paths relative to ``image_root``.
        image_root: the image folder.
        source: the caption file, named in the error message.
        skip_missing: leave missing images out (their names are returned) instead of raising.

    Returns:
        ``(splits, missing)``: splits whose paths point at existing files (relative to
        ``image_root``) and the sorted relative paths of the missing images.

    Raises:
        DataError: ``image_root`` is not a folder, or images are missing and ``skip_missing``
            is False; the message lists them (the first 20 and a count).
    """
    root = Path(image_root)
    if not root.is_dir():
        raise DataError(root, "image folder not found")
    found: dict[str, str | None] = {}
    for items in splits.values():
        for item in items:
            if item.path in found:
                continue
            flat = item.path.rsplit("/", 1)[-1]
            found[item.path] = (item.path if (root / item.path).is_file()
                                else flat if (root / flat).is_file() else None)
    missing = sorted(p for p, where in found.items() if where is None)
    if missing and not skip_missing:
        raise DataError(root, f"{len(missing)} image(s) named in {Path(source).name} are missing "
                              f"from this folder: {name_list(missing)}; pass skip_missing=True "
                              f"(--skip-missing) to leave them out")
    out = {split: [CaptionedImage(found[i.path], i.image_id, i.captions) for i in items
                   if found[i.path] is not None]
           for split, items in splits.items()}
    return {s: items for s, items in out.items() if items}, missing


__all__ = [
    "CAPTIONS_PER_IMAGE", "COCO_TEST_1K", "FORMATS", "SPLIT_ORDER", "CaptionSplits",
    "CaptionedImage", "clean_caption", "locate_images", "name_list", "read_caption_splits",
    "read_coco_captions", "read_flickr_tokens", "read_karpathy",
]

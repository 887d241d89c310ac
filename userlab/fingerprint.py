"""Data identity: a fingerprint of the data a run was trained on, checked at resume and eval.

A run records ``data.json`` (in the run folder and in every checkpoint folder)::

    {"format": 1, "folder": "/abs/path/precomp",
     "splits": {"train": {"images": 29000, "captions": 145000, "rows": 29000,
                          "captions_sha256": "...", "ids_sha256": "..." | null,
                          "ims": {"shape": [29000, 36, 2048], "dtype": "float32", "sha256": "...",
                                  "hashed": "all" | "sample"},
                          "guide": {...} | null, "boxes": {...} | null}, "dev": {...}, ...},
     "vocab": {"size": 8481, "sha256": "..."} | null}

Every split of the data folder is recorded, so ``userlab eval`` can compare the split it is
about to evaluate with the one that sat beside the training data. Caption and id files are
hashed whole; array files up to :data:`FULL_HASH_MAX_BYTES` are hashed whole, larger ones on
their header plus a fixed sample of rows (first, last, and evenly spaced ones), which keeps
the fingerprint cheap on COCO's 33 GB while still telling two different feature files apart.
The folder path is recorded for the message only; it is never compared (copies are fine).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable, Optional

import numpy as np

from .errors import DataError, DataMismatchError

FORMAT = 1
FILE_NAME = "data.json"
#: Arrays up to this size are hashed whole; larger ones on a sample of rows.
FULL_HASH_MAX_BYTES = 64 * 2**20
_SAMPLE_ROWS = 16
#: A stored vocabulary must know at least this share of the caption word tokens.
MIN_VOCAB_COVERAGE = 0.5
#: Captions tokenized to estimate the coverage (evenly spaced; all when fewer).
COVERAGE_SAMPLE = 20_000


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _array_fingerprint(path: Path) -> Optional[dict[str, Any]]:
    if not path.is_file():
        return None
    arr = np.load(path, mmap_mode="r", allow_pickle=False)
    out: dict[str, Any] = {"shape": list(arr.shape), "dtype": str(arr.dtype)}
    if path.stat().st_size <= FULL_HASH_MAX_BYTES:
        out["sha256"], out["hashed"] = _sha256_file(path), "all"
        return out
    digest = hashlib.sha256(json.dumps(out, sort_keys=True).encode())
    n = arr.shape[0]
    for row in sorted(set(np.linspace(0, n - 1, _SAMPLE_ROWS).astype(int).tolist())):
        digest.update(np.ascontiguousarray(arr[row]).tobytes())
    out["sha256"], out["hashed"] = digest.hexdigest(), "sample"
    return out


def split_fingerprint(folder: str | os.PathLike, split: str) -> dict[str, Any]:
    """The fingerprint of one split (sizes, hashes, shapes, dtypes); see the module doc.

    Reads only headers, the caption and id files, and (sampled) array bytes; the split's
    structure is validated where it is opened for use, not here.

    Raises:
        DataError: a file of the split is missing or not readable.
    """
    folder = Path(folder)
    caps, ims = folder / f"{split}_caps.txt", folder / f"{split}_ims.npy"
    ids = folder / f"{split}_ids.txt"
    for path in (caps, ims):
        if not path.is_file():
            raise DataError(path, "missing")
    try:
        text = caps.read_bytes()
        captions = text.count(b"\n") + (1 if text and not text.endswith(b"\n") else 0)
        return {
            "images": captions // 5, "captions": captions,
            "rows": int(np.load(ims, mmap_mode="r", allow_pickle=False).shape[0]),
            "captions_sha256": hashlib.sha256(text).hexdigest(),
            "ids_sha256": _sha256_file(ids) if ids.is_file() else None,
            "ims": _array_fingerprint(ims),
            "guide": _array_fingerprint(folder / f"{split}_guide.npy"),
            "boxes": _array_fingerprint(folder / f"{split}_boxes.npy"),
        }
    except (OSError, ValueError, EOFError) as exc:
        raise DataError(folder / f"{split}_*", f"cannot fingerprint split '{split}': {exc}") from None


def vocab_fingerprint(vocab: Any) -> Optional[dict[str, Any]]:
    if vocab is None:
        return None
    return {"size": len(vocab), "sha256": hashlib.sha256(vocab.to_json().encode("utf-8")).hexdigest()}


def data_fingerprint(folder: str | os.PathLike, vocab: Any = None,
                     splits: Optional[Iterable[str]] = None) -> dict[str, Any]:
    """Fingerprint every split of a precomp folder (a broken split is recorded as a problem,
    not raised: it may not be one this run uses) and the vocabulary."""
    from .data.precomp import list_splits
    folder = Path(folder)
    out: dict[str, Any] = {"format": FORMAT, "folder": str(folder.resolve()), "splits": {},
                           "vocab": vocab_fingerprint(vocab)}
    for split in (list(splits) if splits is not None else list_splits(folder)):
        try:
            out["splits"][split] = split_fingerprint(folder, split)
        except DataError as err:
            out["splits"][split] = {"problem": str(err)}
    return out


def to_json(fingerprint: dict[str, Any]) -> str:
    return json.dumps(fingerprint, indent=1, sort_keys=True) + "\n"


def read_fingerprint(path: str | os.PathLike) -> Optional[dict[str, Any]]:
    """The fingerprint recorded for a run or checkpoint folder, or None for older runs.

    Looks at ``<path>/data.json`` (checkpoint folder), then the run folder two levels up.
    """
    path = Path(path)
    for candidate in (path / FILE_NAME, path.parent.parent / FILE_NAME):
        if candidate.is_file():
            try:
                data = json.loads(candidate.read_text(encoding="utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise DataError(candidate, f"data fingerprint is not valid JSON ({exc})") from None
            if not isinstance(data, dict) or not isinstance(data.get("splits"), dict):
                raise DataError(candidate, "data fingerprint lacks its 'splits' object")
            return data
    return None


def differences(recorded: dict[str, Any], actual: dict[str, Any]) -> list[str]:
    """What differs between two split fingerprints, in words (empty: identical)."""
    out = []
    for key in ("images", "captions", "rows"):
        if recorded.get(key) != actual.get(key):
            out.append(f"{key} {recorded.get(key)} vs {actual.get(key)}")
    for key, what in (("captions_sha256", "captions"), ("ids_sha256", "ids")):
        if recorded.get(key) != actual.get(key):
            out.append(f"{what} file hash {str(recorded.get(key))[:10]} vs {str(actual.get(key))[:10]}")
    for key in ("ims", "guide", "boxes"):
        a, b = recorded.get(key), actual.get(key)
        if (a is None) != (b is None):
            out.append(f"{key} {'present' if a else 'absent'} vs {'present' if b else 'absent'}")
        elif a is not None:
            if a.get("shape") != b.get("shape") or a.get("dtype") != b.get("dtype"):
                out.append(f"{key} {tuple(a.get('shape'))} {a.get('dtype')} vs {tuple(b.get('shape'))} {b.get('dtype')}")
            elif a.get("sha256") != b.get("sha256"):
                out.append(f"{key} values (hash {str(a.get('sha256'))[:10]} vs {str(b.get('sha256'))[:10]})")
    if "problem" in recorded or "problem" in actual:
        out.append(f"problem {recorded.get('problem')} vs {actual.get('problem')}")
    return out


def check_split(recorded: Optional[dict[str, Any]], actual: dict[str, Any], split: str,
                run: str | os.PathLike, where: str | os.PathLike, allow: bool = False) -> list[str]:
    """Refuse evaluating ``run`` on a split that differs from the one recorded at training.

    Returns:
        The differences (empty when identical or nothing was recorded).

    Raises:
        DataMismatchError: they differ and ``allow`` is False.
    """
    if recorded is None:
        return []
    rec = recorded.get("splits", {}).get(split)
    if rec is None:
        return []  # the split did not exist when the run was trained: nothing to compare
    diff = differences(rec, actual)
    if diff and not allow:
        raise DataMismatchError(where, f"split '{split}' differs from the one recorded when {run} was "
                                       f"trained (in {recorded.get('folder')}): {'; '.join(diff[:4])}. "
                                       f"Pass --allow-data-mismatch to evaluate anyway")
    return diff


def vocab_coverage(vocab: Any, captions: list[str], sample: int = COVERAGE_SAMPLE) -> tuple[float, int, list[str]]:
    """Share of word tokens of ``captions`` (an evenly spaced sample) that ``vocab`` knows.

    Returns:
        ``(coverage in [0, 1], tokens counted, up to 5 frequent unknown words)``.
    """
    from collections import Counter
    from .data.text import tokenize_words
    if not captions:
        return 1.0, 0, []
    step = max(1, len(captions) // sample)
    known = total = 0
    unknown: Counter = Counter()
    for caption in captions[::step]:
        for word in tokenize_words(caption):
            total += 1
            if word in vocab:
                known += 1
            else:
                unknown[word] += 1
    return (known / total if total else 1.0), total, [w for w, _ in unknown.most_common(5)]


def check_vocab_coverage(vocab: Any, captions: list[str], vocab_path: str | os.PathLike,
                         captions_path: str | os.PathLike, minimum: float = MIN_VOCAB_COVERAGE,
                         advice: str = "Delete it to rebuild it from these captions, or set "
                                       "data.vocab_path to the right one") -> float:
    """Raise :class:`DataMismatchError` when ``vocab`` knows under ``minimum`` of the tokens."""
    coverage, total, unknown = vocab_coverage(vocab, captions)
    if total and coverage < minimum:
        raise DataMismatchError(vocab_path, f"knows only {100 * coverage:.1f}% of the {total} word tokens "
                                            f"of {captions_path} (at least {100 * minimum:.0f}% expected; "
                                            f"unknown e.g. {', '.join(unknown)}): it was built from other "
                                            f"captions. {advice}")
    return coverage

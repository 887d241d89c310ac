"""Shared test fixtures.

``write_precomp`` writes a small, valid precomputed split (features, 5 captions per image, ids,
optionally guide / boxes / image list) with :func:`userlab.data.precomp.write_precomp_split` and
returns what it wrote, so a test can compare the loader's output against the source arrays.
"""
from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from userlab.data.precomp import write_precomp_split

# Offline everywhere: nothing in the test suite may reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

_COLOURS = ["red", "blue", "green", "yellow", "black", "white"]
_THINGS = ["dog", "cat", "horse", "bicycle", "boat", "kite"]
_PLACES = ["park", "beach", "street", "field", "room"]
_TEMPLATES = [
    "a {c} {t} in the {p} .",
    "the {t} is {c} and stands near a {p}",
    "A {c} {t}, next to the {p}.",
    "there is a {t} that is {c} in this {p}",
    "one {c} {t} on a {p} !",
]


def make_captions(n_images: int, seed: int = 0) -> list[str]:
    """Five template captions per image, words drawn from small pools (repeatable by seed)."""
    rng = np.random.default_rng(seed)
    captions = []
    for _ in range(n_images):
        c, t, p = (_COLOURS[rng.integers(len(_COLOURS))], _THINGS[rng.integers(len(_THINGS))],
                   _PLACES[rng.integers(len(_PLACES))])
        captions += [tpl.format(c=c, t=t, p=p) for tpl in _TEMPLATES]
    return captions


def write_precomp_files(folder: str | os.PathLike, split: str = "train", n_images: int = 6,
                        regions: int = 4, dim: int = 8, im_div: int = 5,
                        dtype=np.float32, guide_dim: int | None = None, boxes: bool = False,
                        ids: str | None = "per_image", image_list: bool = False,
                        seed: int = 0) -> SimpleNamespace:
    """Write a valid split and return its source data.

    Args:
        folder: where to write.
        im_div: 5 for one feature row per image, 1 for one row per caption (each image's row
            repeated 5 times, as in SCAN's redundant files).
        guide_dim: also write ``_guide.npy`` with this width.
        boxes: also write ``_boxes.npy``.
        ids: ``"per_image"``, ``"per_row"`` or None (no ids file). Ids are ``1000 + 7 * i``.
        image_list: also write ``_images.txt`` (``img/{i}.jpg``).

    Returns:
        Namespace with folder, split, per_image (``(N, R, F)`` float32 features, one per
        image), ims (what was written), captions, ids (per image), guide, boxes, image_names.
    """
    rng = np.random.default_rng(seed)
    per_image = rng.standard_normal((n_images, regions, dim)).astype(np.float32)
    ims = per_image if im_div == 5 else np.repeat(per_image, 5, axis=0)
    ims = ims.astype(dtype)
    captions = make_captions(n_images, seed)
    image_ids = 1000 + 7 * np.arange(n_images)
    if ids == "per_image":
        ids_written = image_ids.tolist()
    elif ids == "per_row":
        ids_written = np.repeat(image_ids, 5 // im_div).tolist()
    else:
        ids_written = None
    guide = rng.standard_normal((n_images, guide_dim)).astype(np.float32) if guide_dim else None
    box_arr = (rng.uniform(0, 100, (n_images, regions, 4)).astype(np.float32) if boxes else None)
    names = [f"img/{i}.jpg" for i in range(n_images)] if image_list else None
    write_precomp_split(folder, split, ims, captions, ids=ids_written, guide=guide,
                        boxes=box_arr, image_names=names)
    return SimpleNamespace(folder=Path(folder), split=split, per_image=per_image, ims=ims,
                           captions=captions, ids=image_ids if ids else np.arange(n_images),
                           guide=guide, boxes=box_arr, image_names=names)


@pytest.fixture
def write_precomp():
    """The function :func:`write_precomp_files`: ``write_precomp(tmp_path, split=..., ...)``."""
    return write_precomp_files


@pytest.fixture
def one_thread():
    """Tiny models and tensors: one torch thread avoids oversubscribing a busy 2-core machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

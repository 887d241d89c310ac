"""Demo scenes: determinism, truthful and varied captions, hard negatives, boxes, files, cache.

Captions are parsed here with the test's own word lists and regular expressions, and every
statement found (relations, counts, corners) is checked against the scene's geometry.
"""
from __future__ import annotations

import json
import re
import time
from collections import Counter

import numpy as np
import pytest
import torch

from userlab.data import scenes as sc
from userlab.data.scenes import (SHAPE_NOUNS, SceneConfig, build_demo_data, generate_scenes,
                                 load_scenes, render_scene, scene_boxes)
from userlab.errors import ConfigError, DataError

TINY = SceneConfig.tiny()
COLOURS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "black")
NUMBERS = {"two": 2, "three": 3, "four": 4, "five": 5}
SINGULAR = {s: shape for shape, names in SHAPE_NOUNS.items() for s, _ in names}
PLURAL = {p: shape for shape, names in SHAPE_NOUNS.items() for _, p in names}
_SING = "|".join(sorted(map(re.escape, SINGULAR), key=len, reverse=True))
_PLUR = "|".join(sorted(map(re.escape, PLURAL), key=len, reverse=True))
_COL = "|".join(COLOURS)
_SIZE = r"(?:(?:small|little|tiny|large|big) )?"
_REL = {"to the left of": "L", "on the left of": "L", "left of": "L",
        "to the right of": "R", "on the right of": "R", "right of": "R",
        "above": "A", "over": "A", "below": "B", "under": "B", "beneath": "B"}
_RELS = "|".join(sorted(map(re.escape, _REL), key=len, reverse=True))
RELATION_RE = re.compile(
    rf"\b(?:an?|the) {_SIZE}({_COL}) ({_SING}) (?:is |sits |placed )?({_RELS}) "
    rf"(?:an?|the) {_SIZE}({_COL}) ({_SING})\b")
COUNT_RE = re.compile(rf"\b(two|three|four|five) ({_COL}) ({_PLUR})\b")
CORNER_RE = re.compile(rf"\b(?:an?|the) {_SIZE}({_COL}) ({_SING}) in the (top|bottom) (left|right) corner")


def _centres(scene):
    return [(o.shape, o.colour, o.cx, o.cy) for o in scene.objects]


def _holds(code: str, a, b) -> bool:
    """Independent geometry: a is left of / right of / above / below b by centre."""
    (_, _, ax, ay), (_, _, bx, by) = a, b
    return {"L": ax < bx, "R": ax > bx, "A": ay < by, "B": ay > by}[code]


@pytest.fixture(scope="module")
def tiny_scenes():
    return {split: generate_scenes(TINY, split) for split in sc.SPLITS}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    start = time.perf_counter()
    folder = build_demo_data(root, TINY, progress=False)
    return root, folder, time.perf_counter() - start


# ---------------------------------------------------------------------------------------------
# Determinism
# ---------------------------------------------------------------------------------------------
def test_same_seed_same_scenes_pixels_and_captions():
    a = generate_scenes(TINY, "dev")
    b = generate_scenes(TINY, "dev")
    assert [s.captions for s in a] == [s.captions for s in b]
    assert all(sc._png_bytes(render_scene(x)) == sc._png_bytes(render_scene(y)) for x, y in zip(a, b))
    other = generate_scenes(SceneConfig.tiny(seed=1), "dev")
    assert [s.captions for s in other] != [s.captions for s in a]
    assert sc._png_bytes(render_scene(other[0])) != sc._png_bytes(render_scene(a[0]))
    # splits are different draws too
    assert generate_scenes(TINY, "test")[0].captions != a[0].captions


# ---------------------------------------------------------------------------------------------
# Captions
# ---------------------------------------------------------------------------------------------
def test_five_distinct_captions_in_many_frames(tiny_scenes):
    frames = Counter()
    for scenes in tiny_scenes.values():
        for s in scenes:
            assert len(s.captions) == 5
            assert len({c.lower().rstrip(".") for c in s.captions}) == 5
            for c in s.captions:
                assert c.strip() == c and "\n" not in c and "  " not in c
                # the caption's frame: content words replaced by placeholders
                frame = re.sub(rf"\b({_COL})\b", "C", c.lower().rstrip("."))
                frame = re.sub(rf"\b({_PLUR}|{_SING})\b", "N", frame)
                frame = re.sub(r"\b(a|an|the|one|two|three|four|five)\b", "D", frame)
                frames[frame] += 1
    assert len(frames) > 100, f"only {len(frames)} distinct caption frames"
    text = " ".join(c.lower() for scenes in tiny_scenes.values() for s in scenes for c in s.captions)
    for word in ("left of", "right of", "above", "below", "ball", "box", "corner", "two ",
                 "background"):
        assert word in text, f"no caption uses {word!r}"
    assert any(w in text for w in ("next to", "beside", "near ", "close together"))


def test_relations_counts_and_corners_are_true(tiny_scenes):
    checked = Counter()
    size = TINY.image_size
    for scenes in tiny_scenes.values():
        for s in scenes:
            objs = _centres(s)
            for cap in s.captions:
                low = cap.lower()
                for ca, na, rel, cb, nb in RELATION_RE.findall(low):
                    sa, sb = SINGULAR[na], SINGULAR[nb]
                    ok = any(_holds(_REL[rel], a, b) for a in objs for b in objs
                             if a is not b and a[:2] == (sa, ca) and b[:2] == (sb, cb))
                    assert ok, f"false relation in {cap!r} for {objs}"
                    checked["relation"] += 1
                for num, colour, noun in COUNT_RE.findall(low):
                    n = sum(1 for o in objs if o[:2] == (PLURAL[noun], colour))
                    assert n == NUMBERS[num], f"wrong count in {cap!r} for {objs}"
                    checked["count"] += 1
                for colour, noun, vert, horiz in CORNER_RE.findall(low):
                    ok = any(o[:2] == (SINGULAR[noun], colour)
                             and (o[2] < size / 3 if horiz == "left" else o[2] > 2 * size / 3)
                             and (o[3] < size / 3 if vert == "top" else o[3] > 2 * size / 3)
                             for o in objs)
                    assert ok, f"false corner in {cap!r} for {objs}"
                    checked["corner"] += 1
    # the parsers found enough statements for the check to mean something
    assert checked["relation"] >= 20 and checked["count"] >= 3 and checked["corner"] >= 1, checked


def test_inventory_caption_names_every_object(tiny_scenes):
    # one caption per image binds every object's colour to its shape: the multiset of
    # (colour, shape) mentioned equals the scene's
    for s in tiny_scenes["train"]:
        truth = Counter((o.colour, o.shape) for o in s.objects)
        found = False
        for cap in s.captions:
            low = cap.lower()
            said = Counter()
            for num, colour, noun in COUNT_RE.findall(low):
                said[(colour, PLURAL[noun])] += NUMBERS[num]
            for colour, noun in re.findall(rf"\ban? ({_COL}) ({_SING})\b", low):
                said[(colour, SINGULAR[noun])] += 1
            if said == truth and not RELATION_RE.search(low):
                found = True
        assert found, f"no full inventory among {s.captions} for {truth}"


# ---------------------------------------------------------------------------------------------
# Hard negatives
# ---------------------------------------------------------------------------------------------
def test_hard_negative_twins_share_objects_but_differ(tiny_scenes):
    twins = [(scenes[s.twin_of], s) for scenes in tiny_scenes.values() for s in scenes
             if s.twin_of is not None]
    assert len(twins) >= 5
    kinds = Counter(t.twin_kind for _, t in twins)
    assert kinds["colours"] >= 1 and kinds["mirror"] + kinds["flip"] >= 1, kinds
    for base, twin in twins:
        assert Counter(o.shape for o in base.objects) == Counter(o.shape for o in twin.objects)
        assert Counter(o.colour for o in base.objects) == Counter(o.colour for o in twin.objects)
        if twin.twin_kind == "colours":
            # same places, but some shape now has another colour
            assert [(o.cx, o.cy) for o in base.objects] == [(o.cx, o.cy) for o in twin.objects]
            assert (Counter((o.shape, o.colour) for o in base.objects)
                    != Counter((o.shape, o.colour) for o in twin.objects))
        else:
            axis = 0 if twin.twin_kind == "mirror" else 1
            flipped = False
            for (a0, b0), (a1, b1) in zip(
                    [(p, q) for p in base.objects for q in base.objects if p is not q],
                    [(p, q) for p in twin.objects for q in twin.objects if p is not q]):
                d0 = (b0.cx - a0.cx, b0.cy - a0.cy)[axis]
                d1 = (b1.cx - a1.cx, b1.cy - a1.cy)[axis]
                flipped |= d0 * d1 < 0
            assert flipped
        assert sc._png_bytes(render_scene(base)) != sc._png_bytes(render_scene(twin))


# ---------------------------------------------------------------------------------------------
# Boxes and configuration
# ---------------------------------------------------------------------------------------------
def test_boxes_objects_first_then_context(tiny_scenes):
    size = TINY.image_size
    for s in tiny_scenes["train"]:
        boxes = scene_boxes(s, TINY.num_regions)
        assert boxes.shape == (TINY.num_regions, 4) and boxes.dtype == np.float32
        assert (boxes >= 0).all() and (boxes <= size).all()
        assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
        k = len(s.objects)
        for o, box in zip(s.objects, boxes[:k]):
            # the box holds the object's circle of radius r (polygons lie inside it)
            assert box[0] <= o.cx <= box[2] and box[1] <= o.cy <= box[3]
            assert box[2] - box[0] < 2 * o.radius + 0.1 * size
        np.testing.assert_array_equal(boxes[k], [0, 0, size, size])     # whole image next
        np.testing.assert_array_equal(boxes[k + 1], [size / 4, size / 4, 3 * size / 4, 3 * size / 4])


def test_config_validation_names_the_field():
    with pytest.raises(ConfigError, match="num_regions"):
        SceneConfig.tiny(num_regions=5).validate()
    with pytest.raises(ConfigError, match="backbone_size"):
        SceneConfig.tiny(backbone_size=100).validate()
    with pytest.raises(ConfigError, match="min_objects"):
        SceneConfig.tiny(min_objects=4, max_objects=3).validate()
    SceneConfig().validate()


# ---------------------------------------------------------------------------------------------
# Built files
# ---------------------------------------------------------------------------------------------
def test_layout_matches_the_interface(built, tiny_scenes):
    from userlab.data.precomp import PrecompDataset, find_precomp_dir

    root, folder, _ = built
    assert find_precomp_dir(root) == folder == root / "precomp"
    for split, n in TINY.split_sizes().items():
        ims = np.load(folder / f"{split}_ims.npy")
        assert ims.shape == (n, TINY.num_regions, 1280) and ims.dtype == np.float32
        assert np.isfinite(ims).all()
        caps = (folder / f"{split}_caps.txt").read_text(encoding="utf-8").splitlines()
        assert caps == [c for s in tiny_scenes[split] for c in s.captions]
        assert (folder / f"{split}_ids.txt").read_text().split() == [str(i) for i in range(n)]
        guide = np.load(folder / f"{split}_guide.npy")
        assert guide.shape == (n, 1280) and guide.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(guide, axis=1), 1.0, atol=1e-5)
        boxes = np.load(folder / f"{split}_boxes.npy")
        assert boxes.shape == (n, TINY.num_regions, 4)
        names = (folder / f"{split}_images.txt").read_text().splitlines()
        assert len(names) == n
        records = load_scenes(folder, split)
        for i, (name, rec, scene) in enumerate(zip(names, records, tiny_scenes[split])):
            assert rec["image"] == name and rec["n_objects"] == len(scene.objects)
            assert rec["captions"] == scene.captions
            # stored PNG = the deterministic rendering; boxes = scene_boxes
            assert (folder / name).read_bytes() == sc._png_bytes(render_scene(scene))
            np.testing.assert_array_equal(boxes[i], scene_boxes(scene, TINY.num_regions))
            for obj, box in zip(rec["objects"], boxes[i][: rec["n_objects"]]):
                x0, y0, x1, y1 = obj["bbox"]
                assert box[0] <= x0 and box[1] <= y0 and box[2] >= x1 and box[3] >= y1
        ds = PrecompDataset(folder, split)
        assert ds.num_images == n and ds.im_div == 5 and ds.has_guide and ds.guide_dim == 1280
    manifest = json.loads((folder / sc.MANIFEST_NAME).read_text())
    assert manifest["version"] == sc.DEMO_DATA_VERSION and manifest["config"]["n_train"] == 40


def test_stored_features_are_roi_align_of_the_stored_images(built):
    from userlab.data.features import RegionBackbone, load_image

    _, folder, _ = built
    names = (folder / "dev_images.txt").read_text().splitlines()[:3]
    images = [load_image(folder / n) for n in names]
    boxes = torch.from_numpy(np.load(folder / "dev_boxes.npy")[:3])
    regions, pooled, _ = RegionBackbone("cpu", input_size=TINY.backbone_size).encode(images, boxes)
    ims = np.load(folder / "dev_ims.npy")[:3]
    np.testing.assert_allclose(ims, regions.numpy(), rtol=1e-3, atol=1e-3)
    guide = np.load(folder / "dev_guide.npy")[:3]
    expected = pooled.double() / pooled.double().norm(dim=1, keepdim=True)
    np.testing.assert_allclose(guide, expected.numpy(), rtol=1e-4, atol=1e-4)
    # object regions differ from each other (the boxes select different content)
    assert not np.allclose(ims[0, 0], ims[0, 1], atol=1e-3)


def test_cache_hit_is_fast_and_touches_nothing(built):
    root, folder, first_seconds = built
    stamp = {p: p.stat().st_mtime_ns for p in folder.iterdir() if p.is_file()}
    start = time.perf_counter()
    assert build_demo_data(root, TINY, progress=False) == folder
    elapsed = time.perf_counter() - start
    assert elapsed < 1.0 and elapsed < first_seconds / 5
    assert stamp == {p: p.stat().st_mtime_ns for p in folder.iterdir() if p.is_file()}
    assert not sc._manifest_matches(folder, SceneConfig.tiny(seed=3))


def test_interrupted_or_damaged_build_is_redone(tmp_path, monkeypatch):
    micro = SceneConfig.tiny(n_train=3, n_dev=2, n_test=2, batch_size=2)
    folder = build_demo_data(tmp_path, micro, progress=False)
    assert sc._manifest_matches(folder, micro)
    (folder / "images" / "dev" / "dev_00001.png").unlink()
    assert not sc._manifest_matches(folder, micro)

    # a forced rebuild killed half-way leaves no manifest, so the next call builds again
    real = sc.atomic_write_text

    def crash(path, text):
        if str(path).endswith("scenes_dev.json"):
            raise KeyboardInterrupt
        real(path, text)

    monkeypatch.setattr(sc, "atomic_write_text", crash)
    with pytest.raises(KeyboardInterrupt):
        build_demo_data(tmp_path, micro, progress=False, force=True)
    assert not (folder / sc.MANIFEST_NAME).exists()
    monkeypatch.setattr(sc, "atomic_write_text", real)
    build_demo_data(tmp_path, micro, progress=False)
    assert sc._manifest_matches(folder, micro)
    assert (folder / "images" / "dev" / "dev_00001.png").is_file()
    assert not list(folder.rglob("*.tmp"))


def test_load_scenes_missing_file(tmp_path):
    with pytest.raises(DataError, match="scenes_train.json"):
        load_scenes(tmp_path, "train")


@pytest.mark.slow
def test_larger_build_keeps_every_statement_true(tmp_path):
    config = SceneConfig(n_train=300, n_dev=30, n_test=30)
    folder = build_demo_data(tmp_path, config, progress=False)
    scenes = generate_scenes(config, "train")
    assert sum(s.twin_of is not None for s in scenes) > 30
    size = config.image_size
    for s in scenes:
        objs = _centres(s)
        for cap in s.captions:
            for ca, na, rel, cb, nb in RELATION_RE.findall(cap.lower()):
                assert any(_holds(_REL[rel], a, b) for a in objs for b in objs if a is not b
                           and a[:2] == (SINGULAR[na], ca) and b[:2] == (SINGULAR[nb], cb)), cap
    assert np.load(folder / "train_ims.npy", mmap_mode="r").shape == (300, 12, 1280)
    assert size == 224

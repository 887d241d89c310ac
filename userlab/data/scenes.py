"""Embedded demo data: compositional scenes of coloured shapes, each with 5 human-like captions.

No captioned image set installs offline, so userlab draws its own. A scene holds 2-5 shapes
(8 kinds, 8 colours, small or large) on a pale, lightly patterned background. Its captions are
derived from the scene itself, so every statement in them is true: counts ("two red circles"),
colour-shape bindings, spatial relations computed from the object centres ("a blue star to the
left of a green box"), positions in the frame, size contrasts, synonyms ("ball", "box", "plus
sign") and partial descriptions, in many sentence frames and casual styles.

Retrieval cannot be solved by bags of words: about a third of the scenes have a *twin* right
after them with the same objects but the colours swapped between shapes, or the layout mirrored
(so left/right or above/below flip). Telling twins apart needs colour-object binding and
relations.

Region features come from a real pretrained CNN (EfficientNet-Lite0, ImageNet, see
:mod:`userlab.data.features`): one backbone pass per image and RoIAlign over ``num_regions``
boxes, the objects' boxes first and then fixed context boxes (whole image, centre, quadrants,
halves, grid cells), as detector region features are made. The guide vector (CGE's CLIP input
in USER) is the L2-normalised pooled feature map of the same pass: the offline stand-in for CLIP.

Speed choice: the backbone sees the 224-px images resized to ``backbone_size`` = 192 (a 6x6
feature map, ~37 image pixels per cell). On 2 CPU cores EfficientNet-Lite0 needs ~58 ms per
image at 224 but ~33 ms at 192, which keeps the default 6,500 images inside the 5-minute budget;
the PNGs on disk stay 224 px.

:func:`build_demo_data` writes everything in the precomp layout of ``docs/interfaces.md`` and
caches it behind a manifest written last.
"""
from __future__ import annotations

import dataclasses
import functools
import io
import json
import math
import os
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image, ImageDraw

from ..errors import ConfigError, DataError
from ..io import atomic_write_bytes, atomic_write_text

#: Bump when the rendering, captions, boxes or features change, so caches are rebuilt.
DEMO_DATA_VERSION = "scenes-v1"
MANIFEST_NAME = "demo_manifest.json"
SPLITS = ("train", "dev", "test")

SHAPES = ("circle", "square", "triangle", "star", "ring", "cross", "diamond", "hexagon")
#: (singular, plural) names per shape; the first is the plain name, the rest are synonyms.
SHAPE_NOUNS: dict[str, tuple[tuple[str, str], ...]] = {
    "circle": (("circle", "circles"), ("ball", "balls"), ("disc", "discs"), ("dot", "dots")),
    "square": (("square", "squares"), ("box", "boxes"), ("block", "blocks")),
    "triangle": (("triangle", "triangles"),),
    "star": (("star", "stars"),),
    "ring": (("ring", "rings"), ("donut", "donuts"), ("hoop", "hoops")),
    "cross": (("cross", "crosses"), ("plus sign", "plus signs")),
    "diamond": (("diamond", "diamonds"), ("rhombus", "rhombuses")),
    "hexagon": (("hexagon", "hexagons"),),
}
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (214, 39, 40), "orange": (244, 136, 24), "yellow": (238, 204, 28),
    "green": (44, 160, 64), "blue": (38, 84, 208), "purple": (128, 52, 168),
    "pink": (240, 118, 178), "black": (28, 28, 28),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (246, 246, 242), "grey": (196, 196, 196), "beige": (232, 220, 190),
    "light blue": (200, 220, 242), "pale green": (208, 232, 204),
}
PATTERNS = ("plain", "gradient", "stripes", "dots", "checks")
PATTERN_WORDS = {"plain": "plain", "gradient": "shaded", "stripes": "striped",
                 "dots": "dotted", "checks": "checkered"}
SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big")}
RELATION_WORDS = {
    "left of": ("to the left of", "left of", "on the left of"),
    "right of": ("to the right of", "right of", "on the right of"),
    "above": ("above", "over"),
    "below": ("below", "under", "beneath"),
}
NEAR_WORDS = ("next to", "beside", "near")
NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven"}

# Geometry, as fractions of the image side (so scenes scale with image_size).
_SMALL_RADIUS = (0.060, 0.085)
_LARGE_RADIUS = (0.120, 0.150)
_GAP = 0.03               # free space between two objects
_BOX_PAD = 0.02           # object boxes are padded by this much on every side
RELATION_MARGIN = 0.08    # "A left of B": A's centre is at least this much further left
NEAR_DISTANCE = 0.42      # "A next to B": centres closer than this


# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SceneConfig:
    """Size and look of the demo data set.

    Attributes:
        n_train, n_dev, n_test: images per split (5 captions each).
        image_size: side of the square PNGs.
        min_objects, max_objects: objects per scene.
        num_regions: boxes (regions) per image: objects first, then context boxes.
        seed: everything (scenes, captions, pixels) follows from it.
        backbone_size: side the backbone sees (multiple of 32); see the module docstring.
        hard_negative_rate: chance that a scene is followed by its twin (colours swapped or
            layout mirrored).
        batch_size: images per backbone pass.
    """

    n_train: int = 5000
    n_dev: int = 500
    n_test: int = 1000
    image_size: int = 224
    min_objects: int = 2
    max_objects: int = 5
    num_regions: int = 12
    seed: int = 0
    backbone_size: int = 192
    hard_negative_rate: float = 0.3
    batch_size: int = 32

    @classmethod
    def tiny(cls, **overrides: Any) -> "SceneConfig":
        """A 40/10/10-image configuration for tests and notebook smoke runs."""
        values = dict(n_train=40, n_dev=10, n_test=10)
        values.update(overrides)
        return cls(**values)

    def split_sizes(self) -> dict[str, int]:
        return {"train": self.n_train, "dev": self.n_dev, "test": self.n_test}

    def validate(self) -> "SceneConfig":
        """Raise :class:`ConfigError` naming the first bad field; return self."""
        for name in ("n_train", "n_dev", "n_test"):
            if getattr(self, name) < 1:
                raise ConfigError(name, f"must be >= 1, got {getattr(self, name)}")
        if self.image_size < 64:
            raise ConfigError("image_size", f"must be >= 64, got {self.image_size}")
        if not 1 <= self.min_objects <= self.max_objects:
            raise ConfigError("min_objects", f"need 1 <= min_objects <= max_objects, got "
                                             f"{self.min_objects} and {self.max_objects}")
        if self.max_objects > 7:
            raise ConfigError("max_objects", f"at most 7 objects fit, got {self.max_objects}")
        if self.num_regions < self.max_objects + 1:
            raise ConfigError("num_regions", f"needs room for {self.max_objects} objects plus the "
                                             f"whole image, got {self.num_regions}")
        if self.num_regions - self.min_objects > len(_CONTEXT_BOXES):
            raise ConfigError("num_regions", f"at most {self.min_objects + len(_CONTEXT_BOXES)} "
                                             f"(min_objects + {len(_CONTEXT_BOXES)} context boxes)")
        if self.backbone_size < 32 or self.backbone_size % 32:
            raise ConfigError("backbone_size", f"must be a multiple of 32, got {self.backbone_size}")
        if not 0.0 <= self.hard_negative_rate < 1.0:
            raise ConfigError("hard_negative_rate", f"must be in [0, 1), got {self.hard_negative_rate}")
        if self.batch_size < 1:
            raise ConfigError("batch_size", f"must be >= 1, got {self.batch_size}")
        return self


#: Tiny configuration for tests and smoke runs.
SMOKE = SceneConfig.tiny()


# ---------------------------------------------------------------------------------------------
# Scene model
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SceneObject:
    """One shape: kind, colour, size class and geometry in pixels.

    ``bbox`` is the tight box of the drawn shape ``(x0, y0, x1, y1)``; ``rgb`` is the colour
    actually drawn (the named colour with a small jitter).
    """

    shape: str
    colour: str
    size: str
    cx: float
    cy: float
    radius: float
    rgb: tuple[int, int, int]

    @property
    def bbox(self) -> tuple[float, float, float, float]:
        pts = _outline(self.shape, self.cx, self.cy, self.radius)
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        return (min(xs), min(ys), max(xs), max(ys))


@dataclass
class Scene:
    """Objects on a background, plus the captions that describe it.

    ``twin_of`` is the index (in the same split) of the scene this one is a hard negative of,
    and ``twin_kind`` how it differs: ``"colours"`` (colours swapped between objects),
    ``"mirror"`` (left/right flipped) or ``"flip"`` (top/bottom flipped).
    """

    objects: tuple[SceneObject, ...]
    background: str
    pattern: str
    pattern_params: tuple[float, ...]
    image_size: int
    twin_of: int | None = None
    twin_kind: str | None = None
    captions: list[str] = field(default_factory=list)
    caption_frames: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "background": self.background, "pattern": self.pattern,
            "twin_of": self.twin_of, "twin_kind": self.twin_kind,
            "n_objects": len(self.objects), "captions": list(self.captions),
            "caption_frames": list(self.caption_frames),
            "objects": [{"shape": o.shape, "colour": o.colour, "size": o.size,
                         "centre": [round(o.cx, 2), round(o.cy, 2)], "radius": round(o.radius, 2),
                         "bbox": [round(v, 2) for v in o.bbox]} for o in self.objects],
        }


def _outline(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Polygon of a shape (circle and ring: their bounding square's corners)."""
    if shape in ("circle", "ring"):
        return [(cx - r, cy - r), (cx + r, cy + r)]
    if shape == "square":
        h = 0.82 * r
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        return [(cx + r * math.cos(a), cy + r * math.sin(a) + 0.2 * r)
                for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    if shape == "star":
        return [(cx + rr * math.cos(a), cy + rr * math.sin(a))
                for k in range(10)
                for rr, a in [((r if k % 2 == 0 else 0.45 * r), -math.pi / 2 + k * math.pi / 5)]]
    if shape == "diamond":
        return [(cx, cy - r), (cx + 0.72 * r, cy), (cx, cy + r), (cx - 0.72 * r, cy)]
    if shape == "hexagon":
        return [(cx + r * math.cos(a), cy + r * math.sin(a))
                for a in [k * math.pi / 3 for k in range(6)]]
    if shape == "cross":
        a, b = 0.85 * r, 0.3 * r
        return [(cx - b, cy - a), (cx + b, cy - a), (cx + b, cy - b), (cx + a, cy - b),
                (cx + a, cy + b), (cx + b, cy + b), (cx + b, cy + a), (cx - b, cy + a),
                (cx - b, cy + b), (cx - a, cy + b), (cx - a, cy - b), (cx - b, cy - b)]
    raise ValueError(f"unknown shape {shape!r}")


# ---------------------------------------------------------------------------------------------
# Relations (all captions are checked against these)
# ---------------------------------------------------------------------------------------------
def relation(a: SceneObject, b: SceneObject, image_size: int) -> str | None:
    """The dominant spatial relation of ``a`` to ``b``, or None when they are too close to say.

    ``"left of"``: ``a.cx < b.cx - margin`` and the horizontal offset is the larger one;
    likewise ``"right of"``, ``"above"`` (smaller y) and ``"below"``. ``margin`` is
    :data:`RELATION_MARGIN` times the image side.
    """
    dx, dy = b.cx - a.cx, b.cy - a.cy
    margin = RELATION_MARGIN * image_size
    if abs(dx) >= abs(dy) and abs(dx) > margin:
        return "left of" if dx > 0 else "right of"
    if abs(dy) > abs(dx) and abs(dy) > margin:
        return "above" if dy > 0 else "below"
    return None


def is_near(a: SceneObject, b: SceneObject, image_size: int) -> bool:
    """``a`` is "next to" ``b``: centres closer than :data:`NEAR_DISTANCE` of the image side."""
    return math.hypot(a.cx - b.cx, a.cy - b.cy) < NEAR_DISTANCE * image_size


def frame_position(o: SceneObject, image_size: int) -> str | None:
    """Where in the frame an object lies: ``"top left"``, ``"left"``, ``"bottom"``, ... or None.

    Thirds of the image: a centre in the left third is "left", in the top third "top".
    """
    third = image_size / 3
    horiz = "left" if o.cx < third else "right" if o.cx > 2 * third else ""
    vert = "top" if o.cy < third else "bottom" if o.cy > 2 * third else ""
    return " ".join(p for p in (vert, horiz) if p) or None


# ---------------------------------------------------------------------------------------------
# Sampling scenes
# ---------------------------------------------------------------------------------------------
def _jitter(rgb: tuple[int, int, int], rng: random.Random) -> tuple[int, int, int]:
    return tuple(int(min(255, max(0, c + rng.randint(-14, 14)))) for c in rgb)


def _place(radii: Sequence[float], size: int, rng: random.Random) -> list[tuple[float, float]] | None:
    """Non-overlapping centres for circles of the given radii, or None after many tries."""
    for _ in range(40):
        placed: list[tuple[float, float, float]] = []
        for r in radii:
            margin = r + 0.02 * size
            for _ in range(60):
                x, y = rng.uniform(margin, size - margin), rng.uniform(margin, size - margin)
                if all(math.hypot(x - px, y - py) > r + pr + _GAP * size for px, py, pr in placed):
                    placed.append((x, y, r))
                    break
            else:
                break
        if len(placed) == len(radii):
            return [(x, y) for x, y, _ in placed]
    return None


def random_scene(config: SceneConfig, rng: random.Random) -> Scene:
    """Draw one scene; some objects repeat an earlier (colour, shape) so counts occur."""
    size = config.image_size
    while True:
        n = rng.randint(config.min_objects, config.max_objects)
        specs: list[tuple[str, str, str]] = []
        for i in range(n):
            if i and rng.random() < 0.25:
                shape, colour, _ = rng.choice(specs)
            else:
                shape, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
            specs.append((shape, colour, rng.choice(("small", "large"))))
        radii = [rng.uniform(*(_SMALL_RADIUS if s == "small" else _LARGE_RADIUS)) * size
                 for _, _, s in specs]
        centres = _place(radii, size, rng)
        if centres is not None:
            break
    objects = tuple(SceneObject(shape, colour, sz, round(x, 2), round(y, 2), round(r, 2),
                                _jitter(COLOURS[colour], rng))
                    for (shape, colour, sz), (x, y), r in zip(specs, centres, radii))
    pattern = rng.choice(PATTERNS)
    params = (rng.uniform(0.05, 0.12) * size, float(rng.randint(0, 1)), rng.uniform(6, 16))
    return Scene(objects, rng.choice(list(BACKGROUNDS)), pattern, params, size)


def twin_scene(base: Scene, base_index: int, rng: random.Random) -> Scene | None:
    """A hard negative of ``base``: same objects, colours swapped or layout flipped.

    Returns None when no twin that differs from ``base`` can be made (single-colour scenes
    whose flip leaves every relation unchanged are vanishingly rare).
    """
    size = base.image_size
    kinds = ["colours", "mirror", "flip"]
    rng.shuffle(kinds)
    for kind in kinds:
        objs = list(base.objects)
        if kind == "colours":
            colours = [o.colour for o in objs]
            before = Counter((o.shape, o.colour) for o in objs)
            for _ in range(20):
                rng.shuffle(colours)
                if Counter(zip((o.shape for o in objs), colours)) != before:
                    break
            else:
                continue
            new = [dataclasses.replace(o, colour=c, rgb=_jitter(COLOURS[c], rng))
                   for o, c in zip(objs, colours)]
        else:
            new = [dataclasses.replace(o, cx=round(size - o.cx, 2)) if kind == "mirror"
                   else dataclasses.replace(o, cy=round(size - o.cy, 2)) for o in objs]
            # a twin whose relations do not change is no hard negative
            axis = ("left of", "right of") if kind == "mirror" else ("above", "below")
            if not any(relation(a, b, size) in axis for a in objs for b in objs if a is not b):
                continue
        return dataclasses.replace(base, objects=tuple(new), twin_of=base_index,
                                   twin_kind=kind, captions=[], caption_frames=[])
    return None


def generate_scenes(config: SceneConfig, split: str) -> list[Scene]:
    """All scenes of a split, captions included; a pure function of ``(config, split)``."""
    config.validate()
    n = config.split_sizes()[split]
    rng = random.Random(f"userlab-scenes:{config.seed}:{split}")
    scenes: list[Scene] = []
    while len(scenes) < n:
        scene = None
        prev = scenes[-1] if scenes else None
        if prev is not None and prev.twin_of is None and rng.random() < config.hard_negative_rate:
            scene = twin_scene(prev, len(scenes) - 1, rng)
        if scene is None:
            scene = random_scene(config, rng)
        scene.captions, scene.caption_frames = describe_scene_with_frames(scene, rng)
        scenes.append(scene)
    return scenes


# ---------------------------------------------------------------------------------------------
# Captions
# ---------------------------------------------------------------------------------------------
def _article(phrase: str) -> str:
    return ("an " if phrase[:1].lower() in "aeiou" else "a ") + phrase


def _noun(shape: str, rng: random.Random, plural: bool = False) -> str:
    names = SHAPE_NOUNS[shape]
    pick = names[0] if rng.random() < 0.55 else rng.choice(names)
    return pick[1] if plural else pick[0]


def _join(items: Sequence[str]) -> str:
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + " and " + items[-1]


class _Writer:
    """Caption frames for one scene; each method returns a caption or None if it does not fit."""

    def __init__(self, scene: Scene, rng: random.Random):
        self.scene, self.rng, self.size = scene, rng, scene.image_size
        self.objs = list(scene.objects)

    # -- noun phrases ------------------------------------------------------------------------
    def ref(self, o: SceneObject, colour: bool | None = None, size: bool | None = None,
            definite: bool = True) -> str:
        """'a small red ball' / 'the red ball' / 'a star': always true of ``o``."""
        rng = self.rng
        colour = rng.random() < 0.85 if colour is None else colour
        size = rng.random() < 0.25 if size is None else size
        words = ([rng.choice(SIZE_WORDS[o.size])] if size else []) + ([o.colour] if colour else [])
        phrase = " ".join(words + [_noun(o.shape, rng)])
        matches = [p for p in self.objs if p.shape == o.shape
                   and (not colour or p.colour == o.colour) and (not size or p.size == o.size)]
        if definite and len(matches) == 1 and rng.random() < 0.4:
            return "the " + phrase
        return _article(phrase)

    def background(self) -> str:
        bg = self.scene.background
        if self.scene.pattern != "plain" and self.rng.random() < 0.5:
            bg = f"{PATTERN_WORDS[self.scene.pattern]} {bg}"
        return _article(bg) + self.rng.choice((" background", " backdrop", " background"))

    def inventory_items(self, with_colour: bool = True) -> list[str]:
        keyed = Counter((o.shape, o.colour if with_colour else "") for o in self.objs)
        groups = list(keyed.items())
        self.rng.shuffle(groups)
        items = []
        for (shape, colour), k in groups:
            head = f"{colour} " if colour else ""
            if k == 1:
                items.append(_article(head + _noun(shape, self.rng)))
            else:
                items.append(f"{NUMBER_WORDS[k]} {head}{_noun(shape, self.rng, plural=True)}")
        return items

    def pairs(self, test: Callable[[SceneObject, SceneObject], Any]) -> list[tuple]:
        return [(a, b, test(a, b)) for a in self.objs for b in self.objs
                if a is not b and test(a, b)]

    # -- frames ------------------------------------------------------------------------------
    def inventory(self) -> str:
        listed = _join(self.inventory_items())
        first_plural = not listed.startswith(("a ", "an "))
        frames = [f"{listed}", f"{listed} on {self.background()}",
                  f"there {'are' if first_plural else 'is'} {listed}",
                  f"an image of {listed}", f"a picture showing {listed}",
                  f"{listed} scattered on {self.background()}"]
        return self.rng.choice(frames)

    def relation_caption(self) -> str | None:
        rel_pairs = self.pairs(lambda a, b: relation(a, b, self.size))
        if not rel_pairs:
            return None
        a, b, rel = self.rng.choice(rel_pairs)
        words = self.rng.choice(RELATION_WORDS[rel])
        if (a.shape, a.colour, a.size) == (b.shape, b.colour, b.size):
            # two look-alikes: "a blue star right of a blue star" reads oddly
            names = SHAPE_NOUNS[a.shape]
            noun, nouns = names[0] if self.rng.random() < 0.55 else self.rng.choice(names)
            return self.rng.choice([f"one {a.colour} {noun} is {words} another",
                                    f"{a.colour} {nouns}, one {words} another"])
        same_look = (a.shape, a.colour) == (b.shape, b.colour)
        ra = self.ref(a, colour=self.rng.random() < 0.9, size=True if same_look else None)
        rb = self.ref(b, colour=self.rng.random() < 0.9, size=True if same_look else None)
        plain_a = ra if not ra.startswith("the ") else _article(ra[4:])
        frames = [f"{ra} {words} {rb}", f"{ra} is {words} {rb}", f"there is {plain_a} {words} {rb}",
                  f"{ra} placed {words} {rb}", f"you can see {plain_a} {words} {rb}"]
        if ra.startswith("the "):
            frames.append(f"{ra} sits {words} {rb}")
        return self.rng.choice(frames)

    def two_relations(self) -> str | None:
        rel_pairs = self.pairs(lambda a, b: relation(a, b, self.size))
        if len(rel_pairs) < 3:
            return None
        (a, b, r1), (c, d, r2) = self.rng.sample(rel_pairs, 2)
        if {id(a), id(b)} == {id(c), id(d)}:
            return None
        looks = [((p.shape, p.colour) == (q.shape, q.colour), p.size == q.size) for p, q in ((a, b), (c, d))]
        if any(same and same_size for same, same_size in looks):
            return None  # "a blue diamond left of a blue diamond" reads oddly
        w1, w2 = self.rng.choice(RELATION_WORDS[r1]), self.rng.choice(RELATION_WORDS[r2])
        sz1, sz2 = (True if same else None for same, _ in looks)
        first = f"{self.ref(a, colour=True, size=sz1)} {w1} {self.ref(b, colour=True, size=sz1)}"
        rc, rd = self.ref(c, colour=True, size=sz2), self.ref(d, colour=True, size=sz2)
        return self.rng.choice([f"{first}, and {rc} {w2} {rd}", f"{first} while {rc} is {w2} {rd}",
                                f"{first}; {rc} {w2} {rd}"])

    def near_caption(self) -> str | None:
        near = self.pairs(lambda a, b: is_near(a, b, self.size))
        if not near:
            return None
        a, b, _ = self.rng.choice(near)
        ra, rb = self.ref(a), self.ref(b)
        word = self.rng.choice(NEAR_WORDS)
        return self.rng.choice([f"{ra} {word} {rb}", f"{ra} is {word} {rb}",
                                f"{ra} and {rb} close together"])

    def count_caption(self) -> str:
        n = NUMBER_WORDS[len(self.objs)]
        thing = self.rng.choice(("shapes", "objects", "figures"))
        o = self.rng.choice(self.objs)
        return self.rng.choice([
            f"{n} {thing} on {self.background()}", f"a picture with {n} {thing}",
            f"{n} colourful {thing}, one of them {self.ref(o, definite=False)}",
            f"a total of {n} {thing}", f"{n} {thing} drawn on {self.background()}"])

    def shapes_only(self) -> str:
        listed = _join(self.inventory_items(with_colour=False))
        return self.rng.choice([listed, f"some shapes: {listed}", f"{listed} on {self.background()}",
                                f"a drawing of {listed}"])

    def colours_only(self) -> str:
        colours = list(dict.fromkeys(o.colour for o in self.objs))
        self.rng.shuffle(colours)
        if len(colours) == 1:
            c, n = colours[0], NUMBER_WORDS[len(self.objs)]
            return self.rng.choice([f"all the shapes are {c}", f"{n} {c} shapes",
                                    f"only {c} shapes on {self.background()}"])
        return self.rng.choice([f"shapes in {_join(colours)}", f"{_join(colours)} shapes",
                                f"{_join(colours)} shapes on {self.background()}",
                                f"some {_join(colours)} figures"])

    def single_object(self) -> str:
        o = self.rng.choice(self.objs)
        r = self.ref(o, definite=False)
        others = len(self.objs) - 1
        frames = [f"{r} and some other shapes", f"there is {r} in the picture",
                  f"{self.background()} with {r} on it", f"at least one {o.colour} {_noun(o.shape, self.rng)}"]
        if others:
            frames.append(f"{r} among {NUMBER_WORDS[others]} other "
                          f"{'shape' if others == 1 else 'shapes'}")
        return self.rng.choice(frames)

    def size_contrast(self) -> str | None:
        small = [o for o in self.objs if o.size == "small"]
        large = [o for o in self.objs if o.size == "large"]
        if not small or not large:
            return None
        s, g = self.rng.choice(small), self.rng.choice(large)
        rs, rg = self.ref(s, size=True), self.ref(g, size=True)
        if (g.shape, g.colour) == (s.shape, s.colour):
            bigger = f"one {g.colour} {_noun(g.shape, self.rng)} is bigger than another"
        else:
            bigger = f"{self.ref(g, size=False)} is bigger than {self.ref(s, size=False, definite=False)}"
        return self.rng.choice([f"{rg} and {rs}", f"{rs} and {rg}", bigger])

    def frame_caption(self) -> str | None:
        placed = [(o, frame_position(o, self.size)) for o in self.objs]
        placed = [(o, p) for o, p in placed if p]
        if not placed:
            return None
        o, pos = self.rng.choice(placed)
        where = f"in the {pos} corner" if " " in pos else self.rng.choice(
            [f"on the {pos}", f"at the {pos}"] if pos in ("top", "bottom") else
            [f"on the {pos}", f"on the {pos} side"])
        r, some = self.ref(o), self.ref(o, definite=False)
        return self.rng.choice([f"{r} {where}", f"there is {some} {where}", f"{where} there is {some}"])

    def unique_attribute(self) -> str | None:
        shapes = Counter(o.shape for o in self.objs)
        colours = Counter(o.colour for o in self.objs)
        options = []
        for o in self.objs:
            if shapes[o.shape] == 1:
                noun = _noun(o.shape, self.rng)
                options += [f"the only {noun} is {o.colour}", f"the {noun} is {o.colour}",
                            f"there is just one {noun} and it is {o.colour}"]
            if colours[o.colour] == 1:
                options.append(f"the only {o.colour} shape is {_article(_noun(o.shape, self.rng))}")
        return self.rng.choice(options) if options else None


#: Optional frames (a caption set always has an inventory and a relation caption when possible).
_EXTRA_FRAMES = ("two_relations", "near_caption", "count_caption", "shapes_only", "colours_only",
                 "single_object", "size_contrast", "frame_caption", "unique_attribute",
                 "relation_caption", "inventory")


def _finish(text: str, rng: random.Random) -> str:
    """Casual surface style: capitalisation and final full stop vary like people's do."""
    text = " ".join(text.split())
    if rng.random() < 0.65:
        text = text[0].upper() + text[1:]
    if rng.random() < 0.6:
        text += "."
    return text


#: Coarse caption kind of each caption frame (what a caption tests; see :func:`describe_scene`).
FRAME_KINDS: dict[str, str] = {
    "inventory": "colour binding", "unique_attribute": "colour binding",
    "size_contrast": "colour binding",
    "relation_caption": "relations", "two_relations": "relations", "near_caption": "relations",
    "frame_caption": "relations",
    "count_caption": "counts",
    "shapes_only": "partial", "colours_only": "partial", "single_object": "partial",
}
CAPTION_KINDS = ("counts", "relations", "colour binding", "partial")


def describe_scene_with_frames(scene: Scene, rng: random.Random, n: int = 5
                               ) -> tuple[list[str], list[str]]:
    """:func:`describe_scene` and the frame (writer method) each caption came from.

    Draws exactly the random numbers :func:`describe_scene` draws (that function calls this
    one), so recording frames never changes the captions of a seed.
    """
    writer = _Writer(scene, rng)
    captions: list[str] = []
    frames_used: list[str] = []

    def add(text: str | None, frame: str) -> None:
        if text is None:
            return
        text = _finish(text, rng)
        if text.lower().rstrip(".") not in {c.lower().rstrip(".") for c in captions}:
            captions.append(text)
            frames_used.append(frame)

    add(writer.inventory(), "inventory")
    add(writer.relation_caption(), "relation_caption")
    frames = list(_EXTRA_FRAMES)
    rng.shuffle(frames)
    for attempt in range(60):
        if len(captions) >= n:
            break
        frame = frames[attempt % len(frames)]
        add(getattr(writer, frame)(), frame)
    if len(captions) < n:  # pragma: no cover - the frames above give far more than 5 variants
        raise RuntimeError(f"could not write {n} distinct captions for a scene")
    pairs = list(zip(captions[:n], frames_used[:n]))
    rng.shuffle(pairs)  # same draws as shuffling the captions alone: shuffle depends on length only
    return [c for c, _ in pairs], [f for _, f in pairs]


def describe_scene(scene: Scene, rng: random.Random, n: int = 5) -> list[str]:
    """``n`` distinct true captions of a scene, in varied frames and a random order.

    One caption lists every object with its colour and count; one states a spatial relation
    (when any pair has one); the rest come from different frames (counts, shapes only, colours
    only, one object, size contrast, position in the frame, two relations, "the only ...").
    :data:`FRAME_KINDS` groups the frames into the kinds of :data:`CAPTION_KINDS`.
    """
    return describe_scene_with_frames(scene, rng, n)[0]


# ---------------------------------------------------------------------------------------------
# Rendering and boxes
# ---------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=4)
def _pixel_grid(side: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32)
    return yy, xx


def _background(scene: Scene) -> Image.Image:
    s = scene.image_size
    period, vertical, strength = scene.pattern_params
    period = max(4, int(period))
    yy, xx = _pixel_grid(s)
    along = xx if vertical else yy
    # A 2-d brightness offset, added to every channel of the background colour.
    if scene.pattern == "gradient":
        shade = (along * (1.0 / (s - 1)) - 0.5) * (3.0 * strength)
    elif scene.pattern == "stripes":
        shade = ((along // period) % 2 == 0) * np.float32(-strength)
    elif scene.pattern == "checks":
        shade = (((xx // period) + (yy // period)) % 2 == 0) * np.float32(-0.8 * strength)
    elif scene.pattern == "dots":
        dot = max(1.5, period * 0.12)
        dist2 = ((xx % period) - period / 2) ** 2 + ((yy % period) - period / 2) ** 2
        shade = (dist2 < dot * dot) * np.float32(-1.5 * strength)
    else:
        shade = np.zeros((s, s), dtype=np.float32)
    base = np.asarray(BACKGROUNDS[scene.background], dtype=np.float32)
    img = np.clip(np.rint(shade[..., None] + base), 0, 255).astype(np.uint8)
    return Image.fromarray(img, "RGB")


def render_scene(scene: Scene) -> Image.Image:
    """Draw a scene as an RGB PIL image ``(image_size, image_size)``; deterministic."""
    img = _background(scene)
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        pts = _outline(o.shape, o.cx, o.cy, o.radius)
        if o.shape == "circle":
            draw.ellipse(pts, fill=o.rgb)
        elif o.shape == "ring":
            draw.ellipse(pts, outline=o.rgb, width=max(3, int(round(0.35 * o.radius))))
        else:
            draw.polygon(pts, fill=o.rgb)
    return img


def _context_boxes(s: float) -> list[tuple[float, float, float, float]]:
    h, q, t = s / 2, s / 4, s / 3
    boxes = [(0, 0, s, s), (q, q, 3 * q, 3 * q),                     # whole image, centre
             (0, 0, h, h), (h, 0, s, h), (0, h, h, s), (h, h, s, s),  # quadrants
             (0, 0, h, s), (h, 0, s, s), (0, 0, s, h), (0, h, s, s)]  # halves: left right top bottom
    boxes += [(c * t, r * t, (c + 1) * t, (r + 1) * t) for r in range(3) for c in range(3)]
    return boxes


_CONTEXT_BOXES = _context_boxes(1.0)


def scene_boxes(scene: Scene, num_regions: int) -> np.ndarray:
    """Region boxes of a scene, float32 ``(num_regions, 4)`` ``x0, y0, x1, y1`` in pixels.

    Rows ``0..n_objects-1`` are the objects' boxes (in ``scene.objects`` order, padded by
    2% of the side and clipped to the image); the rest are context boxes in a fixed order:
    whole image, centre, four quadrants, left/right/top/bottom halves, 3x3 grid cells.
    """
    s = float(scene.image_size)
    pad = _BOX_PAD * s
    rows = [(max(0.0, x0 - pad), max(0.0, y0 - pad), min(s, x1 + pad), min(s, y1 + pad))
            for (x0, y0, x1, y1) in (o.bbox for o in scene.objects)]
    context = _context_boxes(s)
    need = num_regions - len(rows)
    if need < 0 or need > len(context):
        raise ConfigError("num_regions", f"{num_regions} regions cannot hold {len(rows)} objects "
                                         f"plus up to {len(context)} context boxes")
    return np.asarray(rows + context[:need], dtype=np.float32)


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=3)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# Building the demo data set
# ---------------------------------------------------------------------------------------------
def _image_name(split: str, index: int) -> str:
    return f"images/{split}/{split}_{index:05d}.png"


def _split_files(split: str) -> list[str]:
    return [f"{split}_ims.npy", f"{split}_caps.txt", f"{split}_ids.txt", f"{split}_guide.npy",
            f"{split}_boxes.npy", f"{split}_images.txt", f"scenes_{split}.json"]


def _manifest_matches(folder: Path, config: SceneConfig) -> bool:
    path = folder / MANIFEST_NAME
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if manifest.get("version") != DEMO_DATA_VERSION or manifest.get("config") != dataclasses.asdict(config):
        return False
    for split, n in config.split_sizes().items():
        if not all((folder / f).is_file() for f in _split_files(split)):
            return False
        if not all((folder / _image_name(split, i)).is_file() for i in range(n)):
            return False
    return True


def build_demo_data(out_dir: str | os.PathLike = "data/demo", config: SceneConfig | None = None,
                    progress: bool = True, force: bool = False, device=None) -> Path:
    """Render the scenes, extract region and guide features, and write the precomp layout.

    Writes into ``<out_dir>/precomp/``, per split ``S`` in train / dev / test:
    ``S_ims.npy`` float32 ``(N, num_regions, 1280)`` (one row per image), ``S_caps.txt``
    (5 per image), ``S_ids.txt`` (0..N-1), ``S_guide.npy`` float32 ``(N, 1280)`` (unit
    norm), ``S_boxes.npy`` float32 ``(N, num_regions, 4)``, ``S_images.txt`` and the PNGs
    ``images/S/S_#####.png``, plus ``scenes_S.json`` (every scene's objects, background,
    twin link, ``n_objects`` and captions). ``demo_manifest.json`` is written last; a later
    call with the same config and version returns at once when every file is there.

    Args:
        out_dir: data root (``DataConfig.root``).
        config: what to build; default :class:`SceneConfig` ``()`` (5000/500/1000 images).
        progress: show tqdm progress bars.
        force: rebuild even when the cache is valid.
        device: torch device for the backbone (default CUDA when available, else CPU).

    Returns:
        The precomp folder ``<out_dir>/precomp``.
    """
    import torch
    from tqdm.auto import tqdm

    from .features import RegionBackbone, steady_allocations
    from .precomp import write_precomp_split

    config = (config or SceneConfig()).validate()
    folder = Path(out_dir) / "precomp"
    if not force and _manifest_matches(folder, config):
        return folder
    # Drop the old manifest first: a build killed half-way must not look finished.
    (folder / MANIFEST_NAME).unlink(missing_ok=True)
    folder.mkdir(parents=True, exist_ok=True)

    started = time.perf_counter()
    backbone = RegionBackbone(device, input_size=config.backbone_size)
    total = sum(config.split_sizes().values())
    bar = tqdm(total=total, desc="demo scenes", unit="img", disable=not progress)
    with steady_allocations():
        for split in SPLITS:
            scenes = generate_scenes(config, split)
            n, r = len(scenes), config.num_regions
            ims = np.empty((n, r, backbone.feature_dim), dtype=np.float32)
            guide = np.empty((n, backbone.feature_dim), dtype=np.float32)
            boxes = np.stack([scene_boxes(s, r) for s in scenes])
            for start in range(0, n, config.batch_size):
                stop = min(n, start + config.batch_size)
                images = [render_scene(s) for s in scenes[start:stop]]
                for i, img in zip(range(start, stop), images):
                    atomic_write_bytes(folder / _image_name(split, i), _png_bytes(img))
                with torch.inference_mode():
                    regions, pooled, _ = backbone.encode(images, torch.from_numpy(boxes[start:stop]))
                    pooled = torch.nn.functional.normalize(pooled, dim=-1)
                ims[start:stop] = regions.cpu().numpy()
                guide[start:stop] = pooled.cpu().numpy()
                bar.update(stop - start)
            captions = [c for s in scenes for c in s.captions]
            names = [_image_name(split, i) for i in range(n)]
            write_precomp_split(folder, split, ims, captions, ids=list(range(n)), guide=guide,
                                boxes=boxes, image_names=names)
            record = {"split": split, "image_size": config.image_size, "num_regions": r,
                      "scenes": [dict(s.to_json(), image=name) for s, name in zip(scenes, names)]}
            atomic_write_text(folder / f"scenes_{split}.json", json.dumps(record, indent=1))
    bar.close()
    manifest = {
        "version": DEMO_DATA_VERSION, "config": dataclasses.asdict(config),
        "splits": config.split_sizes(),
        "backbone": f"EfficientNet-Lite0 ImageNet, input {config.backbone_size}px, RoIAlign "
                    f"{backbone.roi_output_size}x{backbone.roi_output_size} bins averaged",
        "guide": "L2-normalised mean of the same feature map (offline stand-in for CLIP)",
        "build_seconds": round(time.perf_counter() - started, 1),
    }
    atomic_write_text(folder / MANIFEST_NAME, json.dumps(manifest, indent=1))
    return folder


def load_scenes(folder: str | os.PathLike, split: str) -> list[dict[str, Any]]:
    """The scene records of ``scenes_{split}.json`` in a demo precomp folder.

    Each record: ``image`` (path relative to the folder), ``objects`` (shape, colour, size,
    centre, radius, bbox), ``n_objects`` (the first ``n_objects`` rows of the split's boxes
    are objects, the rest context boxes), ``background``, ``pattern``, ``twin_of``,
    ``twin_kind`` and ``captions``.
    """
    path = Path(folder) / f"scenes_{split}.json"
    if not path.is_file():
        raise DataError(path, "scene file is missing (is this a demo folder built by build_demo_data?)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))["scenes"]
    except (ValueError, KeyError) as err:
        raise DataError(path, f"not a valid scene file: {err}") from None


__all__ = [
    "CAPTION_KINDS", "COLOURS", "DEMO_DATA_VERSION", "FRAME_KINDS", "SHAPES", "SHAPE_NOUNS", "SMOKE", "Scene", "SceneConfig",
    "SceneObject", "build_demo_data", "describe_scene", "describe_scene_with_frames", "frame_position", "generate_scenes",
    "is_near", "load_scenes", "relation", "render_scene", "scene_boxes",
]

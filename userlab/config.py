"""Configuration dataclasses with the papers' defaults, presets, and JSON round trips.

One dataclass per concern; :class:`ExperimentConfig` groups them. Defaults are USER's F30K
settings (method notes, sections 2.4-2.6) and DBL's (section 4); :func:`preset` gives F30K,
COCO and a small CPU demo configuration. Every run writes its config next to its checkpoint
(``config.json``); :func:`ExperimentConfig.from_dict` rejects unknown keys and wrong types with a
:class:`~userlab.errors.ConfigError` that names the field, and :func:`validate` checks every
numeric field against its range in :data:`RANGES` (``docs/config-ranges.md``), refusing NaN/Inf.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from .errors import ConfigError

ENHANCEMENTS = ("none", "sge", "cge", "sge+cge")
ATTENTION_NORMS = ("none", "l2")
TEXT_ENCODERS = ("gru", "transformer")
OBJECTIVES = ("uto", "triplet", "infonce")
BOOST_SCHEDULES = ("none", "offline", "online", "momentum")
BOOST_STRATEGIES = ("none", "relative", "absolute", "relative_sum", "absolute_sum",
                    "score_matching", "similarity_preserving", "mutual", "dino")


@dataclass
class DataConfig:
    """Where the precomputed features are and how batches are made.

    ``root`` may point at ``<root>/{name}_precomp``, ``<root>/precomp`` or the folder holding
    ``{split}_ims.npy`` itself (see :func:`userlab.data.precomp.find_precomp_dir`).
    """

    root: str = "data/demo"
    name: str = ""                      # "f30k" / "coco" selects <root>/{name}_precomp
    train_split: str = "train"
    val_split: str = "dev"
    test_split: str = "test"
    dev_max_images: Optional[int] = 1000  # both repos cut dev to its first 5000 captions
    train_max_images: Optional[int] = None  # train on the first N images only (quick runs)
    batch_size: int = 128
    num_workers: int = 0
    caption_augment: bool = True        # 20% of words masked / replaced / deleted
    augment_prob: float = 0.2
    vocab_threshold: int = 4            # DBL/SCAN word-count threshold
    vocab_path: str = ""                # empty: <data dir>/vocab.json, built when missing
    max_caption_len: int = 64


@dataclass
class ModelConfig:
    """Dual encoder shape: region side, text side, enhancement modules, GPO."""

    region_dim: int = 2048              # BUTD features; the demo backbone gives 1280
    num_regions: int = 36               # SGE's BatchNorm1d runs over the region axis
    embed_size: int = 1024
    enhancement: str = "sge"            # one of ENHANCEMENTS
    guide_dim: int = 512                # CLIP ViT-B/32 image embedding width
    sge_dropout: float = 0.4
    attention_lambda: float = 1.0       # region-attention softmax temperature (USER: 1)
    # Region-attention affinity <g, R_k>: "none" uses the raw regions (released code); "l2" uses
    # L2-normalised regions (cosines in [-1, 1]), so beta no longer saturates on the region with
    # the largest norm (raw demo/BUTD norms are 10-60, which makes softmax(<g, R_k>) one-hot).
    attention_norm: str = "none"
    mlp_hidden: int = 512               # FC + MLP residual: Linear(D, 512) -> BN -> ReLU -> Linear
    gpo_dim: int = 32
    text_encoder: str = "gru"           # one of TEXT_ENCODERS
    word_dim: int = 300
    glove: bool = False                 # initialise word embeddings from GloVe 6B-50d
    vocab_size: int = 0                 # filled in from the vocabulary at build time
    transformer_path: str = ""          # local Hugging Face folder (BERT family)
    text_dropout: float = 0.0


@dataclass
class MomentumConfig:
    """MoCo-style key encoders and the two dynamic queues (USER section 2.4)."""

    enabled: bool = True
    momentum: float = 0.999
    queue_size: int = 2048              # 2048 on F30K, 4096 on COCO
    mask_same_image: bool = False       # False reproduces the original method exactly


@dataclass
class LossConfig:
    """Training objective. ``uto`` is USER's Unified Training Objective."""

    objective: str = "uto"              # one of OBJECTIVES
    mu: float = 90.0                    # UTO scale
    gamma: float = 0.5                  # UTO absolute similarity threshold
    lambda_batch: float = 20.0          # weight of the mini-batch term (20 F30K, 1 COCO)
    margin: float = 0.2                 # triplet margin
    max_violation: bool = True          # VSE++ hardest negative (False: VSE0 sum)
    warmup_epochs: int = 0              # VSE0 (and DBL's sum forms) this many epochs, then hardest negatives
    temperature: float = 0.05           # InfoNCE
    # Departure from the paper (off by default): UTO's gamma rises linearly from gamma_start to
    # gamma over the first gamma_warmup_epochs, so that in-batch negatives, which start far
    # below gamma = 0.5 on real features, give gradient from the first step (docs/real-data.md).
    gamma_warmup_epochs: float = 0.0
    gamma_start: float = 0.0


@dataclass
class OptimConfig:
    """AdamW, step decay and the rest of the optimisation recipe (USER section 2.6)."""

    lr: float = 5e-4
    text_lr_scale: float = 0.1          # transformer text encoder at lr x 0.1
    weight_decay: float = 1e-4
    epochs: int = 20
    lr_step: int = 10                   # lr x lr_decay every lr_step epochs; 0 = no decay
    lr_decay: float = 0.1
    grad_clip: float = 2.0
    amp: str = "auto"                   # auto: bf16/fp16 on CUDA, bf16 on CPUs with native bf16; off, bf16, fp16
    compile: bool = False               # torch.compile the image encoders' dense blocks (userlab.accel)
    seed: int = 1
    device: str = "auto"                # auto, cpu, cuda, cuda:N, mps (checked available at Trainer start)
    max_nonfinite_steps: int = 10       # this many NaN/Inf steps in a row (each skipped) stop the run


@dataclass
class BoostConfig:
    """Deep Boosting Learning (method notes section 4)."""

    schedule: str = "none"              # one of BOOST_SCHEDULES
    strategy: str = "relative"          # one of BOOST_STRATEGIES
    margin: float = 0.2
    beta: float = 1.0
    alpha: float = 1.0
    soft_adaptation: str = "none"       # none, hard, soft
    num_branches: int = 2               # online schedule
    momentum_teacher: float = 0.9995    # momentum schedule start, cosine up to 1
    anchor_epochs: int = 0              # offline: epochs of the anchor stage (0 = optim.epochs)


@dataclass
class ExperimentConfig:
    """Everything one run needs; saved as ``config.json`` beside its checkpoint."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    momentum: MomentumConfig = field(default_factory=MomentumConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    boost: BoostConfig = field(default_factory=BoostConfig)
    run_dir: str = "runs/default"
    log_every: int = 10
    eval_every: int = 1                 # epochs between dev evaluations

    # -- round trips -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self, path: str | os.PathLike) -> None:
        from .io import atomic_write_text
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ExperimentConfig":
        cfg = _from_dict(cls, data, prefix="")
        validate(cfg)
        return cfg

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "ExperimentConfig":
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(str(path), "file not found") from None
        except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError, or a number too long to parse
            raise ConfigError(str(path), f"not valid JSON ({exc})") from None
        if not isinstance(data, dict):
            raise ConfigError(str(path), "top level must be a JSON object")
        return cls.from_dict(data)

    def replace(self, **dotted: Any) -> "ExperimentConfig":
        """Copy with dotted overrides, e.g. ``cfg.replace(**{"optim.lr": 1e-3})``."""
        data = self.to_dict()
        for key, value in dotted.items():
            set_dotted(data, key, value)
        return ExperimentConfig.from_dict(data)


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    """Set ``data["a"]["b"] = value`` for ``key = "a.b"``; unknown keys raise ConfigError."""
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            raise ConfigError(key, "unknown field")
        node = node[part]
    if parts[-1] not in node:
        raise ConfigError(key, "unknown field")
    node[parts[-1]] = value


def _from_dict(cls: type, data: dict[str, Any], prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(prefix.rstrip(".") or "<root>", f"expected an object, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(prefix + unknown[0], f"unknown field (known: {', '.join(sorted(names))})")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(hints[name], value, prefix + name)
    return cls(**kwargs)


def _show(value: Any, limit: int = 40, repr_: bool = True) -> str:
    """A value for an error message, cut short (a pasted 5000-digit number stays one line)."""
    text = repr(value) if repr_ else str(value)
    return text if len(text) <= limit else f"{text[:limit - 13]}...({len(text)} chars)"


def _coerce(hint: Any, value: Any, name: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return _from_dict(hint, value, name + ".")
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        return _coerce(args[0], value, name)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(name, f"expected true/false, got {_show(value)}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(name, f"expected an integer, got {_show(value)}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(name, f"expected a number, got {_show(value)}")
        try:
            return float(value)
        except OverflowError:  # a JSON integer with hundreds of digits
            raise ConfigError(name, f"{_show(value)} is too large for a number") from None
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(name, f"expected a string, got {_show(value)}")
        return value
    return value


# -- validation ------------------------------------------------------------------------------
INF = math.inf


@dataclass(frozen=True)
class Range:
    """Allowed values of one numeric field: ``lo <= x <= hi`` (``<`` where open); always finite.

    ``why`` says in a few words what goes wrong outside the range (shown in the error and in
    ``docs/config-ranges.md``).
    """

    lo: float = -INF
    hi: float = INF
    lo_open: bool = False
    hi_open: bool = False
    why: str = ""
    multiple: int = 1               # integers only: must be a multiple of this

    def contains(self, x: float) -> bool:
        if isinstance(x, float) and not math.isfinite(x):
            return False
        above = x > self.lo if self.lo_open else x >= self.lo
        below = x < self.hi if self.hi_open else x <= self.hi
        return above and below and (self.multiple == 1 or x % self.multiple == 0)

    def text(self) -> str:
        """``[0, 1)``, ``> 0``, ``>= 1``: the range as a reader writes it."""
        if self.hi == INF:
            text = f"{'>' if self.lo_open else '>='} {_num(self.lo)}"
        else:
            text = f"{'(' if self.lo_open else '['}{_num(self.lo)}, {_num(self.hi)}{')' if self.hi_open else ']'}"
        return text + (", even" if self.multiple == 2 else f", a multiple of {self.multiple}"
                       if self.multiple > 1 else "")


def _num(x: float) -> str:
    if isinstance(x, float) and x.is_integer() and abs(x) < 1e6:
        x = int(x)
    if isinstance(x, int) and x >= 2**16 and (x & (x - 1) == 0 or (x + 1) & x == 0):
        return f"2^{(x + 1).bit_length() - 1}{'' if x & (x - 1) == 0 else ' - 1'}"
    return f"{x:g}" if isinstance(x, float) else str(x)


def _r(lo: float = -INF, hi: float = INF, why: str = "", lo_open: bool = False, hi_open: bool = False,
       multiple: int = 1) -> Range:
    return Range(lo, hi, lo_open, hi_open, why, multiple)


_DIM = 2**16    # wider is a typo, not an experiment: a GRU that wide holds 3·2^32 weights (51 GB) per direction

#: The range of every numeric field (dotted name). ``tests/test_config.py`` checks that no numeric
#: field is missing, and ``docs/config-ranges.md`` is generated from this table.
RANGES: dict[str, Range] = {
    "data.dev_max_images": _r(1, why="empty dev split (null: all images)"),
    "data.train_max_images": _r(1, why="empty training split (null: all images)"),
    "data.batch_size": _r(2, 2**20, why="a contrastive batch needs a negative; BatchNorm needs 2 rows"),
    "data.num_workers": _r(0, 256, why="DataLoader worker processes"),
    "data.augment_prob": _r(0, 1, why="a probability"),
    "data.vocab_threshold": _r(1, why="how often a word must occur to get its own id"),
    "data.max_caption_len": _r(3, 4096, why="start, one word and end need 3 ids"),
    "model.region_dim": _r(1, _DIM, why="feature width"),
    "model.num_regions": _r(1, 4096, why="regions per image"),
    "model.embed_size": _r(1, _DIM, why="joint embedding width"),
    "model.guide_dim": _r(1, _DIM, why="guide (CLIP) embedding width"),
    "model.sge_dropout": _r(0, 1, hi_open=True, why="dropout 1 drops everything"),
    "model.attention_lambda": _r(0, 1e4, lo_open=True, why="softmax scale; <= 0 attends to the least similar regions"),
    "model.mlp_hidden": _r(1, _DIM, why="hidden width"),
    "model.gpo_dim": _r(2, 4096, multiple=2, why="GPO's positional-encoding width (sin/cos pairs)"),
    "model.word_dim": _r(1, _DIM, why="word embedding width"),
    "model.vocab_size": _r(0, 2**31 - 1, why="filled in from the vocabulary"),
    "model.text_dropout": _r(0, 1, hi_open=True, why="dropout 1 drops everything"),
    "momentum.momentum": _r(0, 1, why="EMA factor"),
    "momentum.queue_size": _r(1, 2**24, why="keys per queue"),
    "loss.mu": _r(0, 1e4, lo_open=True, why="UTO scale; <= 0 inverts or flattens the loss"),
    "loss.gamma": _r(-1, 1, why="a cosine threshold"),
    "loss.lambda_batch": _r(0, 1e4, why="a loss weight; negative would train the batch term backwards"),
    "loss.margin": _r(0, 2, why="cosines differ by at most 2; negative trains backwards"),
    "loss.warmup_epochs": _r(0, why="epochs of VSE0 before hardest negatives"),
    "loss.gamma_warmup_epochs": _r(0, why="epochs over which UTO's gamma ramps up (0: off, as the paper)"),
    "loss.gamma_start": _r(-1, 1, why="UTO's gamma at the start of its warm-up (a cosine threshold)"),
    "loss.temperature": _r(1e-4, 1e4, why="InfoNCE temperature; tiny values overflow"),
    "optim.lr": _r(0, lo_open=True, why="a negative or zero lr trains backwards or not at all; "
                                         "divergence at a high lr is caught by the finite guard"),
    "optim.text_lr_scale": _r(0, 1e3, why="0 freezes a transformer text encoder"),
    "optim.weight_decay": _r(0, 1e3, why="decoupled decay per unit lr; negative grows the weights"),
    "optim.epochs": _r(1, 10**6, why="at least one epoch"),
    "optim.lr_step": _r(0, 10**6, why="0: constant lr"),
    "optim.lr_decay": _r(0, 1, lo_open=True, why="a decay factor; negative flips the lr's sign, > 1 grows it"),
    "optim.grad_clip": _r(0, 1e6, lo_open=True, why="a norm; negative flips the gradient, 0 zeroes it"),
    "optim.seed": _r(0, 2**32 - 1, why="NumPy's seed range"),
    "optim.max_nonfinite_steps": _r(1, 10**6, why="consecutive NaN/Inf steps before the run stops"),
    "boost.margin": _r(0, 2, why="cosines differ by at most 2; negative trains backwards"),
    "boost.beta": _r(0, 1e3, why="margin scale; negative flips the margin"),
    "boost.alpha": _r(0, 1e3, why="boosting loss weight; negative trains it backwards"),
    "boost.num_branches": _r(1, 64, why="online schedule: branches (>= 2 to boost)"),
    "boost.momentum_teacher": _r(0, 1, why="EMA factor"),
    "boost.anchor_epochs": _r(0, 10**6, why="0: optim.epochs"),
    "log_every": _r(1, why="steps between log rows"),
    "eval_every": _r(1, why="epochs between dev evaluations"),
}


def numeric_fields(cls: type = None, prefix: str = "") -> dict[str, Any]:
    """``{dotted name: type hint}`` of every int / float / Optional[int] field of the config."""
    cls = cls or ExperimentConfig
    out: dict[str, Any] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            out.update(numeric_fields(hint, prefix + f.name + "."))
            continue
        args = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
        if args[0] in (int, float):
            out[prefix + f.name] = hint
    return out


def _get(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def validate(cfg: ExperimentConfig) -> ExperimentConfig:
    """Check types, ranges (:data:`RANGES`), choices and cross-field rules that need no data;
    raise ConfigError naming the first bad field.

    NaN and Inf are refused in every numeric field. Rules that need the data or the machine
    (steps per epoch, device present) are in :func:`check_training_fits` and :func:`check_device`,
    which the Trainer runs before training.
    """
    def choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
        if value not in allowed:
            raise ConfigError(name, f"{_show(value)} is not one of {', '.join(allowed)}")

    for name, hint in numeric_fields().items():
        value = _get(cfg, name)
        optional = type(None) in typing.get_args(hint)
        if value is None and optional:
            continue
        want_int = int in (typing.get_args(hint) or (hint,))
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (want_int and not isinstance(value, int)):
            raise ConfigError(name, f"expected {'an integer' if want_int else 'a number'}, got {_show(value)}")
        rng = RANGES[name]
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(name, f"must be a finite number, got {_show(value, repr_=False)} (allowed: {rng.text()})")
        if not rng.contains(value):
            raise ConfigError(name, f"must be {rng.text() if rng.hi == INF else 'in ' + rng.text()}, "
                                    f"got {_show(value, repr_=False)} ({rng.why})")
    choice("model.enhancement", cfg.model.enhancement, ENHANCEMENTS)
    choice("model.text_encoder", cfg.model.text_encoder, TEXT_ENCODERS)
    choice("model.attention_norm", cfg.model.attention_norm, ATTENTION_NORMS)
    choice("loss.objective", cfg.loss.objective, OBJECTIVES)
    choice("boost.schedule", cfg.boost.schedule, BOOST_SCHEDULES)
    choice("boost.strategy", cfg.boost.strategy, BOOST_STRATEGIES)
    choice("boost.soft_adaptation", cfg.boost.soft_adaptation, ("none", "hard", "soft"))
    choice("optim.amp", cfg.optim.amp, ("auto", "off", "bf16", "fp16"))
    _check_device_name(cfg.optim.device)
    for name in ("data.root", "run_dir"):
        if not _get(cfg, name).strip():
            raise ConfigError(name, "must not be empty")
    # -- cross-field rules that need no data ---------------------------------------------------
    if cfg.momentum.enabled and cfg.momentum.queue_size < cfg.data.batch_size:
        raise ConfigError("momentum.queue_size",
                          f"queue ({cfg.momentum.queue_size}) is smaller than the batch "
                          f"({cfg.data.batch_size}); each step would overwrite the whole queue")
    top_lr = cfg.optim.lr * max(1.0, cfg.optim.text_lr_scale)
    if top_lr * cfg.optim.weight_decay >= 1.0:
        raise ConfigError("optim.weight_decay",
                          f"lr x weight_decay = {top_lr * cfg.optim.weight_decay:g} >= 1: AdamW's decoupled "
                          "decay would multiply every weight by a factor <= 0 each step")
    if cfg.boost.schedule == "online" and cfg.boost.num_branches < 2:
        raise ConfigError("boost.num_branches",
                          f"the online schedule boosts each branch against earlier ones; "
                          f"{cfg.boost.num_branches} branch has nothing to learn from (use >= 2)")
    if cfg.model.text_encoder == "transformer" and not cfg.model.transformer_path:
        raise ConfigError("model.transformer_path", "a transformer text encoder needs a local model folder")
    return cfg


def _check_device_name(name: Any) -> None:
    if not isinstance(name, str):
        raise ConfigError("optim.device", f"expected a string, got {name!r}")
    if name == "auto":
        return
    import torch  # only here: reading a config should not need torch
    try:
        torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError("optim.device", f"{name!r} is not a device name (auto, cpu, cuda, cuda:N, mps)") from None


def check_device(name: str) -> None:
    """The requested device exists on this machine (``cuda`` without CUDA is a ConfigError).

    Not part of :func:`validate`: a config written on a GPU machine must still load elsewhere
    (``userlab eval`` picks its own device). The machine check itself is
    :func:`userlab.devices.check_device`, shared with extraction."""
    _check_device_name(name)
    if name == "auto":
        return
    from .devices import check_device as device_on_this_machine
    device_on_this_machine(name)


def check_training_fits(cfg: ExperimentConfig, n_captions: int, world: int = 1,
                        source: str = "") -> None:
    """Cross-field rules that need the training split's size: at least one step per epoch, and
    a queue that holds one step's keys from every process. Called by :func:`prepare_data`
    right after the split is opened, before any vocabulary is built or step taken.

    Args:
        n_captions: captions in the (possibly ``train_max_images``-cut) training split.
        world: DDP processes; each takes its own batch of ``data.batch_size``.
        source: the split's file, named in the message.
    """
    b = cfg.data.batch_size
    if (n_captions // b) // world < 1:
        where = f" ({source})" if source else ""
        raise ConfigError("data.batch_size",
                          f"{b} x {world} process(es) is more than the training split's {n_captions} "
                          f"captions{where}: an epoch would have 0 steps (lower the batch size)")
    if cfg.momentum.enabled and world > 1 and cfg.momentum.queue_size < b * world:
        raise ConfigError("momentum.queue_size",
                          f"queue ({cfg.momentum.queue_size}) is smaller than one step's keys from "
                          f"{world} processes ({b * world}); each step would overwrite the whole queue")


def preset(name: str) -> ExperimentConfig:
    """Named configurations.

    ``f30k`` and ``coco`` follow USER's scripts (queue 2048/4096, lambda 20/1, 20/25 epochs with
    lr x0.1 at 10/15). ``demo`` is full USER (SGE + CGE, two queues, UTO; the demo data carries a
    guide vector per image for CGE) sized for the embedded scenes on a 2-core CPU: two epochs at a
    constant lr keep USER and the baseline together within ten minutes of training (``--epochs N``
    trains longer, with the decay at 3N/4). CGE adds ~6 % to a demo training step
    (``bench/demo_enhancement_cost.py``). ``vsepp`` is the demo's VSE++ baseline (no
    enhancement, no queues, hardest-negative triplet) with one epoch of VSE0 (sum over negatives)
    warm-up first, as VSE-infinity trains it (hardest negatives from a random start barely move in
    two epochs, which would make the baseline look worse than the method it stands for), and its
    hardest-negative epoch at lr 2e-4 (:func:`triplet_schedule`): at the demo's 1e-3 the
    embeddings near-collapse within ~60 steps (docs/ablation-components.md).
    """
    if name == "f30k":
        cfg = ExperimentConfig()
        cfg.data.name = "f30k"
        return cfg
    if name == "coco":
        cfg = ExperimentConfig()
        cfg.data.name = "coco"
        cfg.momentum.queue_size = 4096
        cfg.loss.lambda_batch = 1.0
        cfg.optim.epochs, cfg.optim.lr_step = 25, 15
        return cfg
    if name in ("demo", "vsepp"):
        cfg = _cpu_sized("data/demo", num_regions=12, vsepp=name == "vsepp")
        cfg.optim.epochs, cfg.optim.lr_step = 2, 0
        cfg.run_dir = "runs/demo_vsepp" if name == "vsepp" else "runs/demo_user"
        if name == "vsepp":
            triplet_schedule(cfg)
        return validate(cfg)
    if name in ("f8k-cpu", "f8k-cpu-vsepp"):
        return _f8k_cpu(vsepp=name.endswith("vsepp"))
    raise ConfigError("preset", f"unknown preset {name!r} (known: {', '.join(PRESETS)})")


PRESETS = ("f30k", "coco", "demo", "vsepp", "f8k-cpu", "f8k-cpu-vsepp")


def _f8k_cpu(vsepp: bool) -> ExperimentConfig:
    """Real photos on a CPU: grid features from ``userlab extract`` (7x7 = 49 regions of 1280,
    the pooled backbone map as the 1280-d guide) at the demo's model sizes.

    ``f8k-cpu`` is USER with SGE + CGE on the backbone guide, 4 epochs at lr 1e-3, x0.1 for the
    last. ``f8k-cpu-vsepp`` is the fair VSE++ baseline (no enhancement, no queues): two epochs of
    VSE0 (hinge summed over all negatives) at lr 1e-3, then the hardest-negative triplet (VSE++)
    at 2e-4 for two epochs. Hardest negatives at 1e-3 near-collapse on these features (positive
    and negative similarities both -> ~1, loss at 2·B·margin); from a random start, or after a
    short VSE0 warm-up at 2e-4, they crowd more slowly but still. Four epochs keep three seeds
    of both presets within an afternoon on 2 CPU cores. See docs/real-data.md for the
    measurements behind these choices.
    """
    cfg = _cpu_sized("data/f8k", num_regions=49, vsepp=vsepp)
    cfg.optim.epochs, cfg.optim.lr_step = 4, 3
    cfg.run_dir = "runs/f8k_vsepp" if vsepp else "runs/f8k_user"
    if vsepp:
        triplet_schedule(cfg)
    return validate(cfg)


#: lr factor once a triplet run leaves VSE0 for hardest negatives (see :func:`triplet_schedule`).
HARDEST_NEGATIVE_LR_FACTOR = 0.2


def triplet_schedule(cfg: ExperimentConfig, epochs: Optional[int] = None) -> ExperimentConfig:
    """The kit's VSE++ recipe over ``epochs`` (default ``cfg.optim.epochs``), in place.

    VSE0 (the hinge summed over all negatives) for the first half of the epochs at ``optim.lr``,
    then the hardest-negative hinge at ``optim.lr x 0.2`` (step decay every ``epochs // 2``
    epochs, so a longer second half decays again). Hardest negatives at the full lr 1e-3
    near-collapse on the demo scenes and on Flickr8k grid features alike: positive and negative
    similarities both climb to ~0.99 and the loss sits at 2·B·margin (docs/real-data.md, and
    docs/ablation-components.md for the demo). One epoch is all VSE0.
    """
    for dotted, value in triplet_schedule_fields(cfg.optim.epochs if epochs is None else epochs).items():
        section, name = dotted.split(".")
        setattr(getattr(cfg, section), name, value)
    return cfg


def triplet_schedule_fields(epochs: int) -> dict[str, Any]:
    """:func:`triplet_schedule` as dotted overrides, e.g. for ``cfg.replace(**...)``."""
    warm = max(1, int(epochs) // 2)
    return {"optim.epochs": int(epochs), "loss.warmup_epochs": warm, "optim.lr_step": warm,
            "optim.lr_decay": HARDEST_NEGATIVE_LR_FACTOR}


def _cpu_sized(root: str, num_regions: int, vsepp: bool) -> ExperimentConfig:
    """The CPU presets' shared shape: 1280-d regions and guide (the kit's EfficientNet-Lite0),
    embed 256, batch 128, lr 1e-3, queues of 1024; full USER (SGE + CGE + queues + UTO), or with
    ``vsepp`` the VSE++ baseline (no enhancement, no queues, hardest-negative triplet)."""
    cfg = ExperimentConfig()
    cfg.data.root = root
    cfg.data.batch_size = 128
    cfg.data.dev_max_images = None
    cfg.model.region_dim = 1280
    cfg.model.num_regions = num_regions
    cfg.model.embed_size = 256
    cfg.model.guide_dim = 1280
    cfg.model.mlp_hidden = 256
    cfg.model.word_dim = 128
    cfg.model.enhancement = "sge+cge"   # full USER: what the tables call USER
    cfg.momentum.queue_size = 1024
    cfg.optim.lr = 1e-3
    if vsepp:
        cfg.model.enhancement = "none"
        cfg.momentum.enabled = False
        cfg.loss.objective = "triplet"
    return cfg

"""Configuration dataclasses with the papers' defaults, presets, and JSON round trips.

One dataclass per concern; :class:`ExperimentConfig` groups them. Defaults are USER's F30K
settings (method notes, sections 2.4-2.6) and DBL's (section 4); :func:`preset` gives F30K,
COCO and a small CPU demo configuration. Every run writes its config next to its checkpoint
(``config.json``); :func:`ExperimentConfig.from_dict` rejects unknown keys and wrong types with a
:class:`~userlab.errors.ConfigError` that names the field.
"""
from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from .errors import ConfigError

ENHANCEMENTS = ("none", "sge", "cge", "sge+cge")
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
    amp: str = "auto"                   # auto (bf16/fp16 on CUDA, off on CPU), off, bf16, fp16
    seed: int = 1
    device: str = "auto"


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
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
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
            raise ConfigError(name, f"expected true/false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(name, f"expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(name, f"expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(name, f"expected a string, got {value!r}")
        return value
    return value


def validate(cfg: ExperimentConfig) -> ExperimentConfig:
    """Check ranges and choices; raise ConfigError naming the first bad field."""
    def choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
        if value not in allowed:
            raise ConfigError(name, f"{value!r} is not one of {', '.join(allowed)}")

    def positive(name: str, value: float, allow_zero: bool = False) -> None:
        if value < 0 or (value == 0 and not allow_zero):
            raise ConfigError(name, f"must be {'>= 0' if allow_zero else '> 0'}, got {value}")

    choice("model.enhancement", cfg.model.enhancement, ENHANCEMENTS)
    choice("model.text_encoder", cfg.model.text_encoder, TEXT_ENCODERS)
    choice("loss.objective", cfg.loss.objective, OBJECTIVES)
    choice("boost.schedule", cfg.boost.schedule, BOOST_SCHEDULES)
    choice("boost.strategy", cfg.boost.strategy, BOOST_STRATEGIES)
    choice("boost.soft_adaptation", cfg.boost.soft_adaptation, ("none", "hard", "soft"))
    choice("optim.amp", cfg.optim.amp, ("auto", "off", "bf16", "fp16"))
    positive("data.batch_size", cfg.data.batch_size)
    positive("data.num_workers", cfg.data.num_workers, allow_zero=True)
    for name in ("dev_max_images", "train_max_images"):
        if getattr(cfg.data, name) is not None:
            positive(f"data.{name}", getattr(cfg.data, name))
    positive("model.region_dim", cfg.model.region_dim)
    positive("model.num_regions", cfg.model.num_regions)
    positive("model.embed_size", cfg.model.embed_size)
    positive("momentum.queue_size", cfg.momentum.queue_size)
    positive("optim.lr", cfg.optim.lr)
    positive("optim.epochs", cfg.optim.epochs)
    positive("optim.lr_step", cfg.optim.lr_step, allow_zero=True)
    positive("loss.mu", cfg.loss.mu)
    positive("loss.gamma_warmup_epochs", cfg.loss.gamma_warmup_epochs, allow_zero=True)
    positive("boost.num_branches", cfg.boost.num_branches)
    if not 0.0 <= cfg.momentum.momentum <= 1.0:
        raise ConfigError("momentum.momentum", f"must lie in [0, 1], got {cfg.momentum.momentum}")
    if not 0.0 <= cfg.data.augment_prob <= 1.0:
        raise ConfigError("data.augment_prob", f"must lie in [0, 1], got {cfg.data.augment_prob}")
    if cfg.momentum.enabled and cfg.momentum.queue_size < cfg.data.batch_size:
        raise ConfigError("momentum.queue_size",
                          f"queue ({cfg.momentum.queue_size}) is smaller than the batch "
                          f"({cfg.data.batch_size}); each step would overwrite the whole queue")
    if cfg.model.text_encoder == "transformer" and not cfg.model.transformer_path:
        raise ConfigError("model.transformer_path", "a transformer text encoder needs a local model folder")
    return cfg


def preset(name: str) -> ExperimentConfig:
    """Named configurations.

    ``f30k`` and ``coco`` follow USER's scripts (queue 2048/4096, lambda 20/1, 20/25 epochs with
    lr x0.1 at 10/15). ``demo`` is sized for the embedded scenes on a 2-core CPU: two epochs at a
    constant lr keep USER and the baseline together within ten minutes of training (``--epochs N``
    trains longer, with the decay at 3N/4). ``vsepp`` is the demo's VSE++ baseline (no
    enhancement, no queues, hardest-negative triplet) with one epoch of VSE0 (sum over negatives)
    warm-up first, as VSE-infinity trains it: hardest negatives from a random start barely move in
    two epochs, which would make the baseline look worse than the method it stands for.
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
        cfg = ExperimentConfig()
        cfg.data.root = "data/demo"
        cfg.data.batch_size = 128
        cfg.data.dev_max_images = None
        cfg.model.region_dim = 1280
        cfg.model.num_regions = 12
        cfg.model.embed_size = 256
        cfg.model.guide_dim = 1280
        cfg.model.mlp_hidden = 256
        cfg.model.word_dim = 128
        cfg.momentum.queue_size = 1024
        cfg.optim.lr = 1e-3
        cfg.optim.epochs, cfg.optim.lr_step = 2, 0
        cfg.run_dir = "runs/demo_user"
        if name == "vsepp":
            cfg.model.enhancement = "none"
            cfg.momentum.enabled = False
            cfg.loss.objective = "triplet"
            cfg.loss.warmup_epochs = 1
            cfg.run_dir = "runs/demo_vsepp"
        return validate(cfg)
    if name in ("f8k-cpu", "f8k-cpu-vsepp"):
        return _f8k_cpu(vsepp=name.endswith("vsepp"))
    raise ConfigError("preset", f"unknown preset {name!r} (known: {', '.join(PRESETS)})")


PRESETS = ("f30k", "coco", "demo", "vsepp", "f8k-cpu", "f8k-cpu-vsepp")


def _f8k_cpu(vsepp: bool) -> ExperimentConfig:
    """Real photos on a CPU: grid features from ``userlab extract`` (7x7 = 49 regions of 1280,
    the pooled backbone map as the 1280-d guide) at the demo's model sizes.

    ``f8k-cpu`` is USER with SGE + CGE on the backbone guide, 6 epochs at lr 1e-3, x0.1 for the
    last two. ``f8k-cpu-vsepp`` is the fair VSE++ baseline (no enhancement, no queues): two
    epochs of VSE0 (hinge summed over all negatives) at lr 1e-3, then the hardest-negative
    triplet (VSE++) at 2e-4 for two epochs and 4e-5 for the last two. Hardest negatives at 1e-3
    near-collapse on these features (positive and negative similarities both -> ~1, loss at
    2·B·margin); from a random start, or after a short VSE0 warm-up at 2e-4, they crowd more
    slowly but still. See docs/real-data.md for the measurements behind these choices.
    """
    cfg = ExperimentConfig()
    cfg.data.root = "data/f8k"
    cfg.data.batch_size = 128
    cfg.data.dev_max_images = None
    cfg.model.region_dim = 1280
    cfg.model.num_regions = 49
    cfg.model.embed_size = 256
    cfg.model.guide_dim = 1280
    cfg.model.mlp_hidden = 256
    cfg.model.word_dim = 128
    cfg.model.enhancement = "sge+cge"
    cfg.momentum.queue_size = 1024
    cfg.optim.lr = 1e-3
    cfg.optim.epochs, cfg.optim.lr_step = 6, 4
    cfg.run_dir = "runs/f8k_user"
    if vsepp:
        cfg.model.enhancement = "none"
        cfg.momentum.enabled = False
        cfg.loss.objective = "triplet"
        cfg.loss.warmup_epochs = 2
        cfg.optim.lr = 1e-3
        cfg.optim.lr_step, cfg.optim.lr_decay = 2, 0.2
        cfg.run_dir = "runs/f8k_vsepp"
    return validate(cfg)

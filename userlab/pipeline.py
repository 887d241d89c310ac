"""From a config to datasets, tokenizer and batches: the glue the Trainer and the CLI share."""
from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

from .config import ExperimentConfig, check_training_fits
from .data.precomp import PrecompDataset, find_precomp_dir
from .data.text import HFTokenizer, Vocabulary, WordTokenizer, build_vocab
from .errors import DataError


@dataclass
class DataBundle:
    """Datasets of one experiment and the tokenizer they share."""

    folder: Path
    tokenizer: Any
    vocab: Optional[Vocabulary]
    train: Optional[PrecompDataset]
    val: Optional[PrecompDataset]


def load_vocabulary(cfg: ExperimentConfig, folder: Path) -> Vocabulary:
    """The run's vocabulary: ``data.vocab_path``, else ``<folder>/vocab.json``, else built from
    the train captions with the count threshold and saved there."""
    from .fingerprint import check_vocab_coverage
    path = Path(cfg.data.vocab_path) if cfg.data.vocab_path else folder / "vocab.json"
    train = PrecompDataset(folder, cfg.data.train_split, validate=False)
    captions = train.captions
    if cfg.data.vocab_path or path.is_file():
        # a vocabulary left from other captions would turn most words into <unk> without a word
        vocab = Vocabulary.load(path)
        check_vocab_coverage(vocab, captions, path, train.caps_path)
        return vocab
    vocab = build_vocab(captions, threshold=cfg.data.vocab_threshold)
    try:
        vocab.save(path)
    except OSError as exc:  # a read-only data folder: the run keeps its vocabulary in its checkpoints
        warnings.warn(f"{path}: could not write the word vocabulary ({exc.strerror or exc}); it is "
                      f"rebuilt from the training captions on each run and stored in every checkpoint "
                      f"(set data.vocab_path to keep one elsewhere)", UserWarning, stacklevel=2)
    return vocab


def make_tokenizer(cfg: ExperimentConfig, folder: Path) -> tuple[Any, Optional[Vocabulary]]:
    """Word tokenizer (GRU text encoder) or Hugging Face tokenizer (transformer), per config."""
    if cfg.model.text_encoder == "transformer":
        return HFTokenizer(cfg.model.transformer_path, max_len=cfg.data.max_caption_len,
                           augment_prob=cfg.data.augment_prob), None
    vocab = load_vocabulary(cfg, folder)
    return WordTokenizer(vocab, max_len=cfg.data.max_caption_len, augment_prob=cfg.data.augment_prob), vocab


#: Feature files up to this size are scanned whole for NaN/Inf before training; larger ones are
#: sampled when opened and checked row by row as they are read (a full scan of COCO's 33 GB
#: would cost minutes on every start).
FULL_CHECK_MAX_BYTES = 512 * 2**20


def prepare_data(cfg: ExperimentConfig, splits: tuple[str, ...] = ("train", "val")) -> DataBundle:
    """Open (and validate) the train / dev splits of ``cfg.data`` and fill ``cfg.model.vocab_size``.

    Checks the features against the model config here, before any training starts. The splits
    are opened before the tokenizer is made, so a broken split fails before a missing
    ``vocab.json`` is built and written into the data folder.
    """
    folder = find_precomp_dir(cfg.data.root, cfg.data.name)
    train = val = None
    if "train" in splits:
        train = PrecompDataset(folder, cfg.data.train_split, train=cfg.data.caption_augment,
                               max_images=cfg.data.train_max_images)
        check_training_fits(cfg, len(train), int(os.environ.get("WORLD_SIZE", "1")), str(train.ims_path))
        check_features_match(cfg, train)
    if "val" in splits:
        _check_val_split_exists(folder, cfg.data.val_split)
        val = PrecompDataset(folder, cfg.data.val_split, train=False, max_images=cfg.data.dev_max_images)
        check_features_match(cfg, val)
    for ds in (train, val):
        # every array file is scanned before training; only region features beyond the size
        # limit are left to the sample checked on open and the per-row check on read
        if ds is not None:
            ds.validate_rows(features=ds.ims_path.stat().st_size <= FULL_CHECK_MAX_BYTES)
    tokenizer, vocab = make_tokenizer(cfg, folder)
    if vocab is not None:
        cfg.model.vocab_size = len(vocab)
    for ds in (train, val):
        if ds is not None:
            ds.tokenizer = tokenizer
    return DataBundle(folder=folder, tokenizer=tokenizer, vocab=vocab, train=train, val=val)


def _check_val_split_exists(folder: Path, split: str) -> None:
    """A missing validation split: say which splits exist and the two ways on."""
    ims = folder / f"{split}_ims.npy"
    if ims.is_file():
        return
    others = sorted(p.name[:-len("_ims.npy")] for p in folder.glob("*_ims.npy"))
    raise DataError(ims, f"region features file is missing (split '{split}' needs {ims.name} and "
                         f"{split}_caps.txt; this folder has: {', '.join(others) or 'no split'}). "
                         f"Re-extract with `userlab extract` (it writes a dev split, carved from "
                         f"train when the captions have none), or validate on another split with "
                         f"--set data.val_split=NAME (then that split is no longer held out)")


def open_split(cfg: ExperimentConfig, split: str, tokenizer: Any, max_images: Optional[int] = None) -> PrecompDataset:
    folder = find_precomp_dir(cfg.data.root, cfg.data.name)
    ds = PrecompDataset(folder, split, tokenizer=tokenizer, train=False, max_images=max_images)
    check_features_match(cfg, ds)
    return ds


def check_features_match(cfg: ExperimentConfig, ds: PrecompDataset) -> None:
    """The features' region count and width must be what the model was configured for."""
    regions, width = ds.num_regions, ds.feature_dim
    path = ds.ims_path
    if width != cfg.model.region_dim:
        raise DataError(path, f"regions are {width}-d but model.region_dim is {cfg.model.region_dim}")
    if cfg.model.enhancement in ("sge", "sge+cge") and regions != cfg.model.num_regions:
        raise DataError(path, f"{regions} regions per image but model.num_regions is "
                              f"{cfg.model.num_regions} (SGE's BatchNorm runs over the region axis)")
    if cfg.model.enhancement in ("cge", "sge+cge"):
        if not ds.has_guide:
            raise DataError(path, "CGE needs guide features ({split}_guide.npy) beside the regions")
        if ds.guide_dim != cfg.model.guide_dim:
            raise DataError(path, f"guide features are {ds.guide_dim}-d but model.guide_dim is {cfg.model.guide_dim}")


class EpochBatchSampler(torch.utils.data.Sampler):
    """Caption batches of one epoch, a pure function of ``(seed, epoch)``.

    The permutation does not depend on any global RNG, so a run resumed in the middle of an
    epoch sees the same batches as one never interrupted (``skip`` drops those already done).
    Under DDP each rank takes every ``world``-th batch of the shared permutation.

    Args:
        n: number of captions.
        batch_size: per-process batch size; the last incomplete batch is dropped (as USER).
    """

    def __init__(self, n: int, batch_size: int, seed: int, epoch: int, rank: int = 0, world: int = 1, skip: int = 0):
        self.n, self.batch_size, self.seed, self.epoch = n, batch_size, seed, epoch
        self.rank, self.world, self.skip = rank, world, skip

    def batches_per_epoch(self) -> int:
        return (self.n // self.batch_size) // self.world

    def __len__(self) -> int:
        return max(0, self.batches_per_epoch() - self.skip)

    def __iter__(self) -> Iterator[list[int]]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        perm = torch.randperm(self.n, generator=g)
        total = self.batches_per_epoch()
        for b in range(self.skip, total):
            k = b * self.world + self.rank
            yield perm[k * self.batch_size:(k + 1) * self.batch_size].tolist()


def steps_per_epoch(n_captions: int, batch_size: int, world: int = 1) -> int:
    return (n_captions // batch_size) // world


def lr_at_epoch(lr: float, epoch: int, step: int, decay: float) -> float:
    """Step decay: ``lr * decay ** (epoch // step)``; ``step == 0`` means no decay."""
    return lr if step == 0 else lr * decay ** math.floor(epoch / step)


_AMP_WORDS = {"auto": "autocast where the device has it (optim.amp = 'auto': bf16/fp16 on CUDA, "
                      "bf16 on CPUs with native bf16)",
              "off": "float32 throughout (optim.amp = 'off')",
              "bf16": "bf16 autocast", "fp16": "fp16 autocast (CUDA)"}


def _epochs(first: int, last: int) -> str:
    return f"epoch {first}" if first == last else f"epochs {first}-{last}"


def describe_lr_schedule(cfg: ExperimentConfig) -> str:
    """The learning rate of every epoch of ``cfg`` in words, as the Trainer will set it.

    Each epoch's rate comes from :func:`lr_at_epoch`, the function :meth:`Trainer.set_lr` calls,
    so the words cannot drift from the schedule that runs. Epochs are counted from 1.

    Returns:
        e.g. ``"constant lr 0.001 for 2 epochs"``, or ``"lr 0.0005 in epochs 1-10, x0.1 after
        epoch 10: 5e-05 in epochs 11-20"``.
    """
    o = cfg.optim
    segments: list[list] = []                    # [first epoch, last epoch, lr], 1-based
    for epoch in range(o.epochs):
        lr = lr_at_epoch(o.lr, epoch, o.lr_step, o.lr_decay)
        if segments and math.isclose(segments[-1][2], lr, rel_tol=1e-9):
            segments[-1][1] = epoch + 1
        else:
            segments.append([epoch + 1, epoch + 1, lr])
    if len(segments) == 1:
        text = f"constant lr {o.lr:g} for {o.epochs} epoch{'s' if o.epochs != 1 else ''}"
        if o.lr_step and o.lr_decay != 1.0:
            text += f" (the x{o.lr_decay:g} step after epoch {o.lr_step} lies beyond the run)"
    else:
        first, last, lr = segments[0]
        text = ", ".join([f"lr {lr:g} in {_epochs(first, last)}"] + [
            f"x{o.lr_decay:g} after epoch {first - 1}: {lr:g} in {_epochs(first, last)}"
            for first, last, lr in segments[1:]])
    if cfg.model.text_encoder == "transformer":
        text += f" (the text backbone at x{o.text_lr_scale:g})"
    return text


def describe_optim(cfg: ExperimentConfig) -> str:
    """The optimisation recipe of ``cfg`` in one sentence: AdamW's weight decay, the learning-rate
    schedule (:func:`describe_lr_schedule`), gradient clipping, autocast and dev evaluations."""
    o = cfg.optim
    evals = ("after every epoch" if cfg.eval_every == 1
             else f"every {cfg.eval_every} epochs and after the last")
    return (f"AdamW (weight decay {o.weight_decay:g}), {describe_lr_schedule(cfg)}, gradient norm "
            f"clipped at {o.grad_clip:g}, {_AMP_WORDS.get(o.amp, f'optim.amp = {o.amp!r}')}, "
            f"dev rSum {evals}")

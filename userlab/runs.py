"""Working with finished runs: load a checkpoint with its tokenizer, encode a split, compare runs."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import pandas as pd
import torch

from .config import ExperimentConfig
from .data.precomp import PrecompDataset
from .data.text import HFTokenizer, WordTokenizer
from .errors import DataMismatchError
from .evaluate import encode_split, evaluate_sims, similarity
from .fingerprint import check_split, check_vocab_coverage, differences, read_fingerprint, split_fingerprint
from .data.precomp import find_precomp_dir
from .models.user import RetrievalModel
from .pipeline import open_split


@dataclass
class LoadedRun:
    """A trained model ready for retrieval, with what it needs to read captions."""

    model: RetrievalModel
    cfg: ExperimentConfig
    tokenizer: Any
    vocab: Any
    folder: Optional[Path] = None   # the checkpoint folder it was loaded from


def load_run(path: str | os.PathLike, tag: str = "best", device: Optional[torch.device] = None) -> LoadedRun:
    """Load a run folder's ``best`` (or ``last``) checkpoint and the tokenizer it was trained with."""
    from .checkpoint import find_checkpoint
    from .train import load_model
    model, cfg, vocab = load_model(path, tag=tag, device=device)
    if cfg.model.text_encoder == "transformer":
        tokenizer = HFTokenizer(cfg.model.transformer_path, max_len=cfg.data.max_caption_len)
    else:
        tokenizer = WordTokenizer(vocab, max_len=cfg.data.max_caption_len)
    return LoadedRun(model=model, cfg=cfg, tokenizer=tokenizer, vocab=vocab, folder=find_checkpoint(path, tag=tag))


def eval_split_fingerprint(run: LoadedRun, split: str = "test", data_root: Optional[str] = None,
                           allow_data_mismatch: bool = False, name: Optional[str] = None) -> dict:
    """Fingerprint the split ``run`` is about to be evaluated on and check it against the one
    recorded when the run was trained (:mod:`userlab.fingerprint`).

    Raises:
        DataMismatchError: they differ (unless ``allow_data_mismatch``).
    """
    root = run.cfg.data.root if data_root is None else str(data_root)
    folder = find_precomp_dir(root, run.cfg.data.name)
    actual = split_fingerprint(folder, split)
    check_split(read_fingerprint(run.folder) if run.folder else None, actual, split, name or run.folder,
                folder / f"{split}_ims.npy", allow=allow_data_mismatch)
    if run.vocab is not None and not allow_data_mismatch:
        # the run's own vocabulary must know these captions' words (else nearly all are <unk>)
        from .data.precomp import _read_lines
        caps = folder / f"{split}_caps.txt"
        check_vocab_coverage(run.vocab, _read_lines(caps, "captions file"), Path(run.folder or ".") / "vocab.json",
                             caps, advice="Are these captions of the language/dataset the run was trained "
                                          "on? Pass --allow-data-mismatch to evaluate anyway")
    actual["folder"] = str(folder.resolve())
    return actual


def check_same_data(fingerprints: dict[str, dict], split: str, allow: bool = False) -> None:
    """Runs of an ensemble must have been evaluated on identical data (else DataMismatchError)."""
    names = list(fingerprints)
    first = fingerprints[names[0]]
    for name in names[1:]:
        diff = differences(first, fingerprints[name])
        if diff and not allow:
            raise DataMismatchError(Path(fingerprints[name]["folder"]) / f"{split}_ims.npy",
                                    f"ensemble members see different '{split}' data: {names[0]} reads "
                                    f"{first['folder']}, {name} reads {fingerprints[name]['folder']} "
                                    f"({'; '.join(diff[:3])}); averaging their similarities would mix "
                                    f"different images. Pass --data to evaluate all on one folder, or "
                                    f"--allow-data-mismatch")


def encode_run(run: LoadedRun, split: str = "test", data_root: Optional[str] = None,
               max_images: Optional[int] = None, progress: bool = True
               ) -> tuple[torch.Tensor, torch.Tensor, PrecompDataset]:
    """Image and caption embeddings ``(N, E)``, ``(5N, E)`` of a split, and the dataset."""
    cfg = run.cfg if data_root is None else run.cfg.replace(**{"data.root": str(data_root)})
    ds = open_split(cfg, split, run.tokenizer, max_images=max_images)
    device = next(run.model.parameters()).device
    img, cap = encode_split(run.model, ds, device=device, progress=progress)
    return img, cap, ds


def similarity_for_run(path: str | os.PathLike, split: str = "test", data_root: Optional[str] = None,
                       tag: str = "best", allow_data_mismatch: bool = False,
                       fingerprints: Optional[dict[str, dict]] = None) -> torch.Tensor:
    """The ``(N_images, N_captions)`` similarity matrix of a run on a split (CPU tensor).

    The split is first checked against the data the run was trained beside (DataMismatchError
    unless ``allow_data_mismatch``); its fingerprint is stored in ``fingerprints[str(path)]``
    when a dict is given (for :func:`check_same_data`).
    """
    run = load_run(path, tag=tag)
    fp = eval_split_fingerprint(run, split, data_root, allow_data_mismatch, name=str(path))
    if fingerprints is not None:
        fingerprints[str(path)] = fp
    img, cap, _ = encode_run(run, split=split, data_root=data_root)
    return similarity(img, cap).cpu()


def evaluate_runs(paths: dict[str, str | os.PathLike], split: str = "test", protocol: str = "full",
                  data_root: Optional[str] = None) -> pd.DataFrame:
    """One metrics row per named run: ``{"USER": "runs/demo_user", ...}``."""
    rows = []
    for name, path in paths.items():
        df = evaluate_sims(similarity_for_run(path, split=split, data_root=data_root), protocol=protocol)
        df.insert(0, "model", name)
        rows.append(df)
    return pd.concat(rows, ignore_index=True)

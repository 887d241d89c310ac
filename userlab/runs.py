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
from .evaluate import encode_split, evaluate_sims, similarity
from .models.user import RetrievalModel
from .pipeline import open_split


@dataclass
class LoadedRun:
    """A trained model ready for retrieval, with what it needs to read captions."""

    model: RetrievalModel
    cfg: ExperimentConfig
    tokenizer: Any
    vocab: Any


def load_run(path: str | os.PathLike, tag: str = "best", device: Optional[torch.device] = None) -> LoadedRun:
    """Load a run folder's ``best`` (or ``last``) checkpoint and the tokenizer it was trained with."""
    from .train import load_model
    model, cfg, vocab = load_model(path, tag=tag, device=device)
    if cfg.model.text_encoder == "transformer":
        tokenizer = HFTokenizer(cfg.model.transformer_path, max_len=cfg.data.max_caption_len)
    else:
        tokenizer = WordTokenizer(vocab, max_len=cfg.data.max_caption_len)
    return LoadedRun(model=model, cfg=cfg, tokenizer=tokenizer, vocab=vocab)


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
                       tag: str = "best") -> torch.Tensor:
    """The ``(N_images, N_captions)`` similarity matrix of a run on a split (CPU tensor)."""
    run = load_run(path, tag=tag)
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

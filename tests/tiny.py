"""A tiny experiment on random features, for engine tests (seconds on a CPU)."""
from __future__ import annotations

from pathlib import Path

from conftest import write_precomp_files
from userlab.config import ExperimentConfig


def tiny_data(root: Path, n_train: int = 24, n_dev: int = 8, regions: int = 4, dim: int = 8,
              guide_dim: int | None = 6) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    write_precomp_files(root, "train", n_images=n_train, regions=regions, dim=dim, guide_dim=guide_dim, seed=0)
    write_precomp_files(root, "dev", n_images=n_dev, regions=regions, dim=dim, guide_dim=guide_dim, seed=1)
    write_precomp_files(root, "test", n_images=n_dev, regions=regions, dim=dim, guide_dim=guide_dim, seed=2)
    return root


def tiny_config(root: Path, run_dir: Path, **overrides) -> ExperimentConfig:
    cfg = ExperimentConfig()
    cfg.data.root = str(root)
    cfg.data.batch_size = 8
    cfg.data.vocab_threshold = 1
    cfg.data.dev_max_images = None
    cfg.model.region_dim, cfg.model.num_regions, cfg.model.guide_dim = 8, 4, 6
    cfg.model.embed_size, cfg.model.mlp_hidden, cfg.model.word_dim = 16, 16, 16
    cfg.model.enhancement = "sge+cge"
    cfg.momentum.queue_size = 20
    cfg.optim.epochs, cfg.optim.lr_step, cfg.optim.lr = 3, 2, 1e-3
    cfg.run_dir = str(run_dir)
    cfg.log_every = 1
    return cfg.replace(**overrides) if overrides else cfg

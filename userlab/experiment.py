"""One entry point for a whole experiment, whatever its schedule.

``fit_experiment(cfg)`` trains a plain model (``boost.schedule = "none"``), an online or momentum
DBL run (one Trainer over a :class:`~userlab.models.boosted.BoostedModel`), or the offline DBL
schedule in two stages:

1. ``<run_dir>/anchor``: the anchor alone with its own objective, for ``boost.anchor_epochs``
   epochs (0: ``optim.epochs``);
2. ``<run_dir>``: the target, initialised from the anchor's best checkpoint, trained against the
   frozen anchor. ``lr_step = 0`` keeps the learning rate constant (the released offline script
   crashes on it).

Both stages resume from their own checkpoints.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Optional

import pandas as pd

from .config import ExperimentConfig
from .models.boosted import BoostedModel
from .pipeline import prepare_data
from .train import Callback, Trainer, load_model


def anchor_config(cfg: ExperimentConfig) -> ExperimentConfig:
    """The offline schedule's first stage: same model, no boosting, its own folder."""
    epochs = cfg.boost.anchor_epochs or cfg.optim.epochs
    return cfg.replace(**{"boost.schedule": "none", "run_dir": str(Path(cfg.run_dir) / "anchor"),
                          "optim.epochs": epochs})


def fit_experiment(cfg: ExperimentConfig, callbacks: Iterable[Callback] = (), progress: bool = True,
                   resume: bool = True, max_steps: Optional[int] = None, checkpoint_every: int = 0,
                   tensorboard: bool = False, allow_config_change: bool = False,
                   allow_data_mismatch: bool = False) -> Trainer:
    """Train as ``cfg`` says; returns the (last) Trainer, whose ``history`` holds dev metrics.

    ``resume=False`` moves an earlier run in ``cfg.run_dir`` aside (``<run_dir>.old-<time>``);
    for the offline schedule the whole folder, anchor stage included, is moved once.
    """
    kwargs = dict(callbacks=callbacks, progress=progress, resume=resume, max_steps=max_steps,
                  checkpoint_every=checkpoint_every, tensorboard=tensorboard,
                  allow_config_change=allow_config_change, allow_data_mismatch=allow_data_mismatch)
    if cfg.boost.schedule != "offline":
        trainer = Trainer(cfg, **kwargs)
        trainer.fit()
        return trainer
    if not resume:
        # move the whole earlier run (anchor included) aside once; the stages then start afresh
        from .runfolder import RunFolderLock, move_run_aside
        with RunFolderLock(cfg.run_dir):
            moved = move_run_aside(cfg.run_dir)
        if moved is not None:
            print(f"--no-resume: moved the previous run in {cfg.run_dir} to {moved}", flush=True)
        kwargs["resume"] = True
    stage1 = anchor_config(cfg)
    anchor_trainer = Trainer(stage1, **kwargs)
    anchor_trainer.fit()
    data = prepare_data(cfg)
    anchor, _, _ = load_model(stage1.run_dir, tag="best", device=anchor_trainer.device)
    model = BoostedModel(cfg, vocab=data.vocab, anchor=anchor)
    trainer = Trainer(cfg, data=data, model=model, **kwargs)
    trainer.fit()
    return trainer


def history_of(trainer: Trainer) -> pd.DataFrame:
    return pd.DataFrame(trainer.history)

"""Small helpers the notebooks share: parameters, smoke mode, data, cached runs, recorders.

``USERLAB_SMOKE=1`` (set by ``make test``) makes every notebook use the tiny demo data and a few
training steps, so the whole notebook runs in seconds; without it the notebooks use the default
demo data and the demo preset.

Every notebook opens with one parameters cell (``data_dir``, ``runs_dir``, ``device``; tagged
``parameters`` for papermill) and hands it to :func:`open_lesson`. ``None`` falls back to the
environment (``USERLAB_DATA``, ``USERLAB_RUNS``, ``USERLAB_DEVICE``), then to the demo data and
``runs/``; see :mod:`userlab.lesson` (re-exported here). :meth:`Lesson.fit` trains through
:func:`userlab.runcache.fit_cached`: a model whose configuration was trained before (by
``make demo`` or an earlier notebook) is loaded, not retrained.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import numpy as np

from .config import ExperimentConfig, preset

#: True when the notebooks should run on tiny data (``USERLAB_SMOKE=1``).
SMOKE = os.environ.get("USERLAB_SMOKE", "") not in ("", "0", "false", "False")


def repo_root() -> Path:
    """The project folder (notebooks run from ``notebooks/``, scripts from the root)."""
    here = Path.cwd()
    for folder in (here, *here.parents):
        if (folder / "pyproject.toml").is_file() and (folder / "userlab").is_dir():
            return folder
    return here


def demo_root(smoke: Optional[bool] = None) -> Path:
    smoke = SMOKE if smoke is None else smoke
    return repo_root() / "data" / ("demo_smoke" if smoke else "demo")


def demo_data(smoke: Optional[bool] = None, progress: bool = True) -> Path:
    """Build (or reuse the cached) demo scenes; returns their precomp folder."""
    from .data.scenes import SceneConfig, build_demo_data
    smoke = SMOKE if smoke is None else smoke
    return build_demo_data(demo_root(smoke), SceneConfig.tiny() if smoke else SceneConfig(), progress=progress)


def demo_config(name: str = "demo", smoke: Optional[bool] = None, run: Optional[str] = None,
                **overrides) -> ExperimentConfig:
    """A demo preset pointed at the demo data; smoke mode shrinks batch, queue and epochs.

    Args:
        name: ``demo`` (USER) or ``vsepp`` (baseline).
        run: run folder name under ``runs/`` (default: ``notebook_<name>``).
        overrides: dotted config overrides, e.g. ``**{"model.enhancement": "cge"}``.
    """
    smoke = SMOKE if smoke is None else smoke
    cfg = preset(name)
    cfg.data.root = str(demo_root(smoke))
    cfg.run_dir = str(repo_root() / "runs" / (run or f"notebook_{name}") / ("smoke" if smoke else "full"))
    if smoke:
        cfg.data.batch_size = 16
        cfg.momentum.queue_size = 64
        cfg.optim.epochs, cfg.optim.lr_step = 2, 0
    return cfg.replace(**overrides) if overrides else cfg


#: Set by :func:`userlab.lesson.open_lesson`: the open lesson runs on data other than the demo's.
_OWN_DATA = False


def use_own_data_figures(own: bool) -> None:
    """Route :func:`figures_dir` to ``figures/own/`` (True) or back to ``figures/`` (False)."""
    global _OWN_DATA
    _OWN_DATA = bool(own)


def figures_dir(smoke: Optional[bool] = None) -> Path:
    """``figures/`` for the demo, ``figures/smoke/`` in smoke mode and ``figures/own/`` when the
    lesson runs on other data (both git-ignored: figures of a user's photos never overwrite the
    demo's, and are never committed by accident)."""
    smoke = SMOKE if smoke is None else smoke
    folder = repo_root() / "figures" / ("smoke" if smoke else "own" if _OWN_DATA else "")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


class LiveCurves:
    """Trainer callback that redraws loss terms and dev rSum in a notebook while training runs.

    Args:
        every: redraw every this many logged steps (and after each evaluation).
        terms: loss terms to draw (default: every ``loss_*`` key the model reports).
        name: the run's model, for its colour in the rSum panel.
    """

    def __init__(self, every: int = 20, terms: Optional[list[str]] = None, name: str = "USER"):
        self.every, self.terms, self.name = every, terms, name
        self.steps: list[dict] = []
        self.evals: list[dict] = []
        self.figure = None

    def on_step(self, trainer, row) -> None:
        self.steps.append(dict(row))
        if len(self.steps) % self.every == 0:
            self.draw()

    def on_eval(self, trainer, row) -> None:
        self.evals.append(dict(row))
        self.draw()

    def on_epoch_end(self, trainer) -> None:
        pass

    def load(self, folder: Path) -> bool:
        """A reused run: draw its logged curves once (``folder`` is ``<run>/records``)."""
        import pandas as pd
        run = Path(folder).parent
        if not (run / "train_log.csv").is_file():
            return True   # nothing to draw, nothing to retrain for
        self.steps = pd.read_csv(run / "train_log.csv").to_dict("records")
        if (run / "eval_log.csv").is_file():
            self.evals = pd.read_csv(run / "eval_log.csv").to_dict("records")
        self.draw()
        return True

    def draw(self):
        """Redraw both panels with :func:`userlab.viz.plot_training_curves` (steps and epochs on
        whole-number ticks, as in every figure of :mod:`userlab.viz`)."""
        import matplotlib.pyplot as plt
        import pandas as pd

        from . import viz
        if self.figure is not None:
            plt.close(self.figure)
        fig = viz.plot_training_curves(pd.DataFrame(self.steps), pd.DataFrame(self.evals), name=self.name,
                                       terms=self.terms)
        self.figure = fig
        try:
            from IPython.display import clear_output, display
            clear_output(wait=True)
            display(fig)
        except ImportError:  # pragma: no cover - outside IPython
            pass
        return fig


class MarginRecorder:
    """Trainer callback: after each dev evaluation, the margin (positive minus hardest negative
    similarity) of every dev query, as rows for :func:`userlab.viz.plot_margin_distributions`.

    For a boosted model every branch is recorded (``anchor`` / ``target`` for two branches), and
    :attr:`violations` holds, per epoch, how often the target violates the boosting margin
    against the anchor on a dev batch (:func:`userlab.boosting.violation_rate`).

    Args:
        name: label of the run in the records (``model`` column).
        max_images: dev images to use (the first ones).
    """

    def __init__(self, name: str, max_images: int = 200, batch: int = 64):
        self.name, self.max_images, self.batch = name, max_images, batch
        self.frames: list = []
        self.violation_rows: list[dict] = []

    def on_step(self, trainer, row) -> None:
        pass

    def on_epoch_end(self, trainer) -> None:
        pass

    def _branches(self, model):
        branches = list(getattr(model, "branches", [model]))
        if len(branches) == 1:
            return {self.name: branches[0]}
        if len(branches) == 2:
            return {"anchor": branches[0], "target": branches[1]}
        return {f"branch {i}": b for i, b in enumerate(branches)}

    def on_eval(self, trainer, row) -> None:
        from .boosting import violation_rate
        from .data.precomp import PrecompDataset
        from .evaluate import encode_split, similarity
        from .viz import margin_records
        val = trainer.data.val
        ds = PrecompDataset(val.folder, val.split, tokenizer=val.tokenizer,
                            max_images=min(self.max_images, val.num_images))
        batch_sims = {}
        for name, branch in self._branches(trainer.model).items():
            img, cap = encode_split(branch, ds, device=trainer.device, progress=False)
            sims = similarity(img, cap).cpu()
            self.frames.append(margin_records(sims, epoch=row["epoch"], name=name))
            n = min(self.batch, sims.shape[0])
            batch_sims[name] = sims[:n, 0:5 * n:5]   # first caption of each image: a (n, n) batch
        names = list(batch_sims)
        if len(names) >= 2:
            strategy = trainer.cfg.boost.strategy
            strategy = strategy if strategy in ("relative", "absolute") else "relative"
            rate = violation_rate(batch_sims[names[-1]], batch_sims[names[0]],
                                  margin=trainer.cfg.boost.margin, strategy=strategy)
            self.violation_rows.append({"epoch": row["epoch"], "model": self.name, "violation_rate": rate})

    @property
    def records(self):
        import pandas as pd
        return pd.concat(self.frames, ignore_index=True) if self.frames else pd.DataFrame()

    # -- kept beside the checkpoint by userlab.runcache ----------------------------------------
    def _paths(self, folder: Path) -> tuple[Path, Path]:
        return Path(folder) / "margins.csv", Path(folder) / "violations.csv"

    def save(self, folder: Path) -> None:
        """Write the records (``margins.csv``, ``violations.csv``) into ``folder``."""
        from .io import atomic_write_text
        margins, violations = self._paths(folder)
        margins.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(violations, self.violations.to_csv(index=False))
        atomic_write_text(margins, self.records.to_csv(index=False))

    def load(self, folder: Path) -> bool:
        """Read records saved by :meth:`save` (the name column is set to this recorder's name
        for a single-branch model); False when there are none."""
        import pandas as pd
        margins, violations = self._paths(folder)
        if not margins.is_file():
            return False
        records = pd.read_csv(margins)
        from .viz import margin_records
        expected = set(margin_records(np.eye(2), epoch=0, name=self.name).columns)
        if not expected <= set(records.columns):
            return False   # saved by an older recorder: record again
        if "model" in records.columns and records["model"].nunique() == 1 and \
                records["model"].iloc[0] not in ("anchor", "target"):
            records["model"] = self.name
        self.frames = [records]
        try:
            self.violation_rows = pd.read_csv(violations).to_dict("records")
        except (FileNotFoundError, pd.errors.EmptyDataError):
            self.violation_rows = []
        return True

    @property
    def violations(self):
        import pandas as pd
        return pd.DataFrame(self.violation_rows)


# the parameters cell and what it resolves to (defined in userlab.lesson, imported from here)
from .lesson import (ENV_DATA, ENV_DEVICE, ENV_RUNS, FeatureInfo, Lesson, feature_info,  # noqa: E402
                     open_lesson)

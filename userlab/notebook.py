"""Small helpers the notebooks share: smoke mode, demo data, demo configs and runs.

``USERLAB_SMOKE=1`` (set by ``make test``) makes every notebook use the tiny demo data and a few
training steps, so the whole notebook runs in seconds; without it the notebooks use the default
demo data and the demo preset (minutes on a 2-core CPU).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

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
    cfg = cfg.replace(**overrides) if overrides else cfg
    # A notebook run folder made with another config (e.g. before the demo preset became full
    # USER) cannot be resumed: start it afresh, as `userlab demo` does with its runs.
    from .demo import _fresh_run_dir
    _fresh_run_dir(cfg)
    return cfg


def figures_dir(smoke: Optional[bool] = None) -> Path:
    """``figures/`` (``figures/smoke/`` in smoke mode, which git ignores)."""
    smoke = SMOKE if smoke is None else smoke
    folder = repo_root() / "figures" / ("smoke" if smoke else "")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


class LiveCurves:
    """Trainer callback that redraws loss terms and dev rSum in a notebook while training runs.

    Args:
        every: redraw every this many logged steps (and after each evaluation).
        terms: loss terms to draw (default: every ``loss_*`` key the model reports).
    """

    def __init__(self, every: int = 20, terms: Optional[list[str]] = None):
        self.every, self.terms = every, terms
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

    def draw(self):
        import matplotlib.pyplot as plt
        import pandas as pd
        steps = pd.DataFrame(self.steps)
        if self.figure is not None:
            plt.close(self.figure)
        fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.5))
        terms = self.terms or [c for c in steps.columns if c.startswith("loss_")] or ["loss"]
        for term in terms:
            a.plot(steps["step"], steps[term].rolling(5, min_periods=1).mean(), label=term.removeprefix("loss_"))
        a.set(xlabel="step", title="loss terms")
        a.legend(fontsize=8)
        if self.evals:
            ev = pd.DataFrame(self.evals)
            b.plot(ev["epoch"], ev["rsum"], marker="o")
        b.set(xlabel="epoch", ylabel="dev rSum", title="validation")
        fig.tight_layout()
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

    @property
    def violations(self):
        import pandas as pd
        return pd.DataFrame(self.violation_rows)

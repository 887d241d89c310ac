"""Small helpers the notebooks share: parameters, smoke mode, data, cached runs, recorders.

``USERLAB_SMOKE=1`` (set by ``make test``) makes every notebook use the tiny demo data and a few
training steps, so the whole notebook runs in seconds; without it the notebooks use the default
demo data and the demo preset.

Every notebook opens with one parameters cell (``data_dir``, ``runs_dir``, ``device``; tagged
``parameters`` for papermill) and hands it to :func:`open_lesson`. ``None`` falls back to the
environment (``USERLAB_DATA``, ``USERLAB_RUNS``, ``USERLAB_DEVICE``), then to the demo data and
``runs/``. :meth:`Lesson.fit` trains through :func:`userlab.runcache.fit_cached`: a model whose
configuration was trained before (by ``make demo`` or an earlier notebook) is loaded, not retrained.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional

import numpy as np

from .config import ExperimentConfig, preset
from .errors import ConfigError, DataError

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


# ---------------------------------------------------------------------------------------------
# the parameters cell
# ---------------------------------------------------------------------------------------------
#: Smoke mode on data other than the demo trains on the first / evaluates on the first images.
SMOKE_TRAIN_IMAGES, SMOKE_DEV_IMAGES = 200, 100
#: Environment variables that fill parameters left at None.
ENV_DATA, ENV_RUNS, ENV_DEVICE = "USERLAB_DATA", "USERLAB_RUNS", "USERLAB_DEVICE"


@dataclass
class FeatureInfo:
    """What a feature folder holds, read from its train split.

    Attributes:
        folder: the folder with ``{split}_ims.npy``.
        num_regions, feature_dim: ``R`` and ``F`` of the region features.
        guide_dim: width of ``{split}_guide.npy`` (None: no guide features, so no CGE).
        layout: ``"boxes"`` (region boxes saved), ``"grid"`` (boxes that tile the image as a
            square grid: ``userlab extract --regions grid``) or ``"regions"`` (no boxes, e.g.
            SCAN's BUTD features: no geometry to draw on).
        grid: ``(h, w)`` of the heat map that shows the weights: the feature grid, or
            ``(1, R)`` (a strip over the region index) for ``"regions"``; None for boxes.
    """

    folder: Path
    num_regions: int
    feature_dim: int
    guide_dim: Optional[int]
    layout: str
    grid: Optional[tuple[int, int]]


def _is_grid(boxes: np.ndarray) -> Optional[tuple[int, int]]:
    """``(g, g)`` when the ``(R, 4)`` boxes tile their image as a row-major ``g x g`` grid."""
    from .data.features import grid_boxes
    r = boxes.shape[0]
    g = int(round(math.sqrt(r)))
    if g * g != r or g < 2:
        return None
    width, height = float(boxes[:, 2].max()), float(boxes[:, 3].max())
    return (g, g) if np.allclose(boxes, grid_boxes(width, height, g, g), atol=1e-3) else None


def feature_info(folder: Path, split: str = "train") -> FeatureInfo:
    """Describe the features in ``folder`` (see :class:`FeatureInfo`)."""
    from .data.precomp import PrecompDataset
    ds = PrecompDataset(folder, split, validate=False)
    grid = _is_grid(np.asarray(ds.boxes[0], dtype=np.float64)) if ds.boxes is not None else None
    if grid is not None:
        layout = "grid"
    elif ds.boxes is not None:
        layout = "boxes"
    else:   # no geometry known (SCAN's BUTD regions): weights in a strip over the region index
        layout, grid = "regions", (1, ds.num_regions)
    return FeatureInfo(Path(folder), ds.num_regions, ds.feature_dim, ds.guide_dim, layout, grid)


@dataclass
class Lesson:
    """What a notebook runs on: resolved parameters, and configs and runs that fit the data.

    Build it with :func:`open_lesson`. ``demo`` is True on the demo scenes (which carry the
    scene descriptions some lessons use); otherwise the data are SCAN / VSE features or the
    output of ``userlab extract``.
    """

    data_root: Path
    runs_root: Path
    device: str
    smoke: bool
    demo: bool
    features: FeatureInfo

    @property
    def has_guide(self) -> bool:
        """Guide features present (CGE can be trained)."""
        return self.features.guide_dim is not None

    def config(self, name: str = "demo", **overrides: Any) -> ExperimentConfig:
        """The ``demo`` (USER) or ``vsepp`` preset sized to these features and this mode.

        On other data the model's region width, region count and guide width are read from the
        features; smoke mode shrinks batch, queue and epochs as :func:`demo_config` does, and on
        other data also trains on the first 200 images and evaluates on the first 100 dev images.
        ``overrides`` are dotted config fields, e.g. ``**{"model.enhancement": "cge"}``.
        """
        cfg = preset(name)
        cfg.data.root = str(self.data_root)
        cfg.optim.device = self.device
        if not self.demo:
            cfg.model.region_dim = self.features.feature_dim
            cfg.model.num_regions = self.features.num_regions
            cfg.model.guide_dim = self.features.guide_dim or cfg.model.guide_dim
        if self.smoke:
            cfg.data.batch_size = 16
            cfg.momentum.queue_size = 64
            cfg.optim.epochs, cfg.optim.lr_step = 2, 0
            if not self.demo:   # own data may be Flickr-sized: seconds means a slice of it
                cfg.data.train_max_images, cfg.data.dev_max_images = SMOKE_TRAIN_IMAGES, SMOKE_DEV_IMAGES
        cfg = cfg.replace(**overrides) if overrides else cfg
        if "cge" in cfg.model.enhancement and not self.has_guide:
            raise ConfigError("model.enhancement", f"{cfg.model.enhancement!r} needs guide features "
                                                   f"({self.features.folder}/train_guide.npy is missing)")
        return cfg

    def fit(self, cfg: ExperimentConfig, callbacks: Iterable[Any] = (), progress: bool = True):
        """Load the finished run trained with ``cfg``, or train it (see :mod:`userlab.runcache`).

        Returns:
            :class:`userlab.runcache.CachedRun`; it says whether it was ``trained`` now.
        """
        from .runcache import fit_cached
        run = fit_cached(cfg, self.runs_root, callbacks=callbacks, progress=progress, base=repo_root())
        print(f"{'trained' if run.trained else 'reused'} {run.run_dir}")
        return run

    def run_folder(self, name: str) -> Path:
        """A folder under the runs root for outputs that are not checkpoints (ablation grids)."""
        return self.runs_root / (f"{name}_smoke" if self.smoke else name)

    def image(self, dataset: Any, i: int) -> Any:
        """Image ``i`` of ``dataset`` as a file path, or None when there are no image files."""
        paths = getattr(dataset, "image_paths", None)
        if self.features.layout == "regions" or paths is None or not Path(paths[i]).is_file():
            return None
        return paths[i]

    def draw_attention(self, dataset: Any, i: int, weights: Any, title: Optional[str] = None,
                       ax: Any = None, scale: Optional[float] = None, annotate: int = 3):
        """Region attention of image ``i``: boxes when the data have boxes, a heat map over the
        grid for grid features, bars over the region index otherwise; works without image files.

        Args:
            dataset: a :class:`~userlab.data.precomp.PrecompDataset` (``boxes``, ``image_paths``).
            weights: ``(R,)`` weights, or None (uniform).
            scale, annotate: passed to :func:`userlab.viz.plot_region_attention` (boxes only).
        """
        from . import viz
        info = self.features
        if info.layout == "boxes":
            return viz.plot_region_attention(self.image(dataset, i), dataset.boxes[i], weights,
                                             title=title, ax=ax, scale=scale, annotate=annotate)
        if weights is None:
            weights = np.full(info.num_regions, 1.0 / info.num_regions)
        return viz.plot_grid_attention(self.image(dataset, i), weights, info.grid, title=title, ax=ax)

    def images(self, dataset: Any, n: int) -> list:
        """The first ``n`` images as paths (None where there is no file, or no geometry)."""
        return [self.image(dataset, i) for i in range(n)]

    def attention_explorer(self, dataset: Any, attention: dict, n: int):
        """:class:`userlab.widgets.AttentionExplorer` over the first ``n`` images of ``dataset``
        with boxes, grid heat maps or region strips as the features allow."""
        from .widgets import AttentionExplorer
        boxes = np.asarray(dataset.boxes[:n]) if self.features.layout == "boxes" else None
        return AttentionExplorer(self.images(dataset, n), boxes, attention,
                                 grid=None if boxes is not None else self.features.grid)


def open_lesson(data_dir: Optional[str] = None, runs_dir: Optional[str] = None, device: Optional[str] = None,
                smoke: Optional[bool] = None, progress: bool = True) -> Lesson:
    """Resolve a notebook's parameters cell.

    Args:
        data_dir: folder with the features (``{split}_ims.npy`` in it, or in ``precomp/`` or
            ``{name}_precomp/`` below it). None: ``$USERLAB_DATA``, else the demo scenes (built
            and cached on first use).
        runs_dir: where checkpoints are looked up and new ones cached (``<runs_dir>/cache/``).
            None: ``$USERLAB_RUNS``, else ``runs/`` in the project.
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:1``… None: ``$USERLAB_DEVICE``, else auto.
        smoke: tiny data and few steps (default: ``USERLAB_SMOKE``).
    """
    from .data.precomp import find_precomp_dir
    smoke = SMOKE if smoke is None else smoke
    data_dir = data_dir or os.environ.get(ENV_DATA) or None
    runs_dir = runs_dir or os.environ.get(ENV_RUNS) or None
    device = device or os.environ.get(ENV_DEVICE) or "auto"
    if data_dir is None:
        root, demo = demo_data(smoke, progress=progress), True
    else:
        root, demo = Path(data_dir).expanduser(), False
        if not root.exists():
            raise DataError(root, "data folder not found (the data_dir parameter or $USERLAB_DATA)")
    folder = find_precomp_dir(root)
    runs = Path(runs_dir).expanduser() if runs_dir else repo_root() / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    lesson = Lesson(data_root=Path(root), runs_root=runs, device=device, smoke=smoke, demo=demo,
                    features=feature_info(folder))
    print(f"data: {folder} ({lesson.features.layout}, R={lesson.features.num_regions}) | runs: {runs} | "
          f"device: {device} | smoke: {smoke}")
    return lesson


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

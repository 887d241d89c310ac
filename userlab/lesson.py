"""What a notebook runs on: its parameters cell resolved into data, runs folder and device.

:func:`open_lesson` turns the parameters cell (``data_dir``, ``runs_dir``, ``device``) into a
:class:`Lesson`: the feature folder and its layout (:class:`FeatureInfo`: boxes, grid or bare
regions), configs sized to those features, cached training (:meth:`Lesson.fit`) and attention
drawn the way the features allow. Imported by the notebooks through :mod:`userlab.notebook`.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional

import numpy as np

from .config import PRESETS, ExperimentConfig, preset
from .errors import ConfigError, DataError

#: Smoke mode on data other than the demo trains on the first / evaluates on the first images.
SMOKE_TRAIN_IMAGES, SMOKE_DEV_IMAGES = 200, 100
#: Environment variables that fill parameters left at None.
ENV_DATA, ENV_RUNS, ENV_DEVICE, ENV_PRESET = "USERLAB_DATA", "USERLAB_RUNS", "USERLAB_DEVICE", "USERLAB_PRESET"


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
    preset: str = "demo"

    @property
    def eval_split(self) -> str:
        """The split lessons evaluate on: ``test``, or ``dev`` where the features have no test
        split (e.g. Flickr8k extracted from its train and dev lists only)."""
        return "test" if (self.features.folder / "test_ims.npy").is_file() else "dev"

    @property
    def has_guide(self) -> bool:
        """Guide features present (CGE can be trained)."""
        return self.features.guide_dim is not None

    def config(self, name: Optional[str] = None, **overrides: Any) -> ExperimentConfig:
        """A preset (default: the lesson's, ``demo`` unless the parameters cell names another,
        e.g. ``f8k-cpu``; ``vsepp`` for the baseline) sized to these features and this mode.

        On other data the model's region width, region count and guide width are read from the
        features; smoke mode shrinks batch, queue and epochs as :func:`demo_config` does, and on
        other data also trains on the first 200 images and evaluates on the first 100 dev images.
        ``overrides`` are dotted config fields, e.g. ``**{"model.enhancement": "cge"}``.
        """
        cfg = preset(name or self.preset)
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
        from .notebook import repo_root
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
                preset: Optional[str] = None, smoke: Optional[bool] = None, progress: bool = True) -> Lesson:
    """Resolve a notebook's parameters cell.

    Args:
        data_dir: folder with the features (``{split}_ims.npy`` in it, or in ``precomp/`` or
            ``{name}_precomp/`` below it). None: ``$USERLAB_DATA``, else the demo scenes (built
            and cached on first use).
        runs_dir: where checkpoints are looked up and new ones cached (``<runs_dir>/cache/``).
            None: ``$USERLAB_RUNS``, else ``runs/`` in the project.
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:1``… None: ``$USERLAB_DEVICE``, else auto.
        preset: the config preset the lesson's USER models start from (``demo``; ``f8k-cpu``
            for Flickr8k grid features, so that a finished ``userlab train --preset f8k-cpu``
            run in ``runs_dir`` is reused). None: ``$USERLAB_PRESET``, else ``demo``.
        smoke: tiny data and few steps (default: ``USERLAB_SMOKE``).
    """
    from .data.precomp import find_precomp_dir
    from .notebook import SMOKE, demo_data, repo_root, use_own_data_figures
    smoke = SMOKE if smoke is None else smoke
    data_dir = data_dir or os.environ.get(ENV_DATA) or None
    runs_dir = runs_dir or os.environ.get(ENV_RUNS) or None
    device = device or os.environ.get(ENV_DEVICE) or "auto"
    preset_name = preset or os.environ.get(ENV_PRESET) or "demo"
    if preset_name not in PRESETS:
        raise ConfigError("preset", f"unknown preset {preset_name!r} (the preset parameter or "
                                    f"${ENV_PRESET}; known: {', '.join(PRESETS)})")
    if data_dir is None:
        root, demo = demo_data(smoke, progress=progress), True
    else:
        root, demo = Path(data_dir).expanduser(), False
        if not root.exists():
            raise DataError(root, "data folder not found (the data_dir parameter or $USERLAB_DATA)")
    folder = find_precomp_dir(root)
    use_own_data_figures(not demo)
    runs = Path(runs_dir).expanduser() if runs_dir else repo_root() / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    lesson = Lesson(data_root=Path(root), runs_root=runs, device=device, smoke=smoke, demo=demo,
                    features=feature_info(folder), preset=preset_name)
    print(f"data: {folder} ({lesson.features.layout}, R={lesson.features.num_regions}) | runs: {runs} | "
          f"device: {device} | preset: {preset_name} | smoke: {smoke}")
    if lesson.eval_split != "test":
        print(f"no test split in {folder}: the lessons evaluate on '{lesson.eval_split}' (the split "
              f"models are selected on, so its numbers are optimistic)")
    return lesson

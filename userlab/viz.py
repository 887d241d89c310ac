"""Figures. Every plotting function returns a matplotlib Figure; :func:`save` writes one to ``figures/``.

Groups:

- runs: :func:`plot_loss_terms`, :func:`plot_dev_rsum`, :func:`plot_training_curves` (one run
  while it trains, drawn by :class:`userlab.notebook.LiveCurves`), :func:`plot_recall_bars`
  (one panel per protocol), :func:`demo_figures`;
- attention: :func:`plot_region_attention` (weighted boxes), :func:`plot_grid_attention`
  (heat map over a feature grid), :func:`plot_gpo_weights`, :func:`plot_attention_comparison`
  (SGE vs CGE vs none for one image), :func:`attention_weights` (the maps of an ImageOutput);
- margins: :func:`margin_records` (positive minus hardest negative per query),
  :func:`plot_margin_distributions` (per epoch, with the violation rate), :func:`plot_margin_epoch`;
- queues: :func:`plot_queue_state` (key ages, queue vs batch negatives, same-image keys),
  :func:`same_image_counts`;
- embeddings: :func:`embedding_map_2d`, :func:`plot_embedding_map`;
- retrieval: :func:`plot_retrieval_gallery`, :func:`plot_query_results`,
  :func:`plot_worst_failures`.

Figure conventions (docs/figures.md): one colour per model / branch everywhere
(:data:`MODEL_COLOURS`, :func:`palette_for`, :func:`hue_order`), whole-number ticks for epochs
and ranks (:func:`integer_ticks`), legends beside the data (:func:`legend_outside`), shared
scales where panels are compared, and margin views judged by the threshold of the objective the
model was trained with (:func:`objective_threshold`).

Conventions: similarity matrices are ``(N_img, N_cap)`` with rows = images and captions
``k*i .. k*i+k-1`` belonging to image ``i`` (docs/interfaces.md); tensors may live on any device
and are copied to the CPU here. Everything works headless: without a display matplotlib picks the
Agg backend by itself. Ground truth is drawn in :data:`HIT_COLOUR` (green), other retrieved items
in :data:`MISS_COLOUR` (red); retrieved items carry ``gid = "candidate:<index>"`` so a test or a
notebook can find them.
"""
from __future__ import annotations

import functools
import os
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import matplotlib.colors as mcolors
import matplotlib.pyplot as plt  # headless: matplotlib falls back to Agg by itself
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.collections import LineCollection
from matplotlib.patches import Rectangle

from .errors import ConfigError, DataError
from .io import atomic_path

__all__ = [
    "FIGURES", "HIT_COLOUR", "MISS_COLOUR", "MODEL_COLOURS",
    "register_colours", "palette_for", "hue_order", "integer_ticks", "legend_outside",
    "colour_word_palette", "ObjectiveThreshold", "objective_threshold", "as_threshold",
    "snapshot_queue", "plot_queues", "modality_gap", "plot_colour_scatter", "plot_pair_similarity",
    "plot_probe",
    "save", "read_logs", "plot_loss_terms", "plot_dev_rsum", "plot_training_curves",
    "plot_recall_bars", "demo_figures",
    "attention_weights", "plot_region_attention", "plot_grid_attention", "plot_gpo_weights",
    "plot_attention_comparison",
    "margin_records", "violation_table", "plot_margin_distributions", "plot_margin_epoch",
    "same_image_counts", "plot_queue_state",
    "embedding_map_2d", "plot_embedding_map",
    "load_thumbnail", "plot_retrieval_gallery", "plot_query_results", "plot_worst_failures",
]

FIGURES = Path("figures")
HIT_COLOUR = "#1a9850"    # ground truth retrieved
MISS_COLOUR = "#d73027"   # a wrong item in the top k
_BOX_COLOUR = "#ffbf00"   # attention boxes: amber reads well on photos and on flat scenes
_PLACEHOLDER_GREY = 0.86
_THUMB_SIZE = 128


def _style() -> None:
    sns.set_theme(context="notebook", style="whitegrid", palette="colorblind")


# ---------------------------------------------------------------------------------------------
# conventions (docs/figures.md): one colour per model / branch, integer ticks, legends off the data
# ---------------------------------------------------------------------------------------------
#: The colour of every model, branch and series the notebooks draw. One name, one colour, in
#: every figure: a reader who learned "USER is blue" in one figure can trust it in the next.
#: Names that stand for the same model share a colour ("USER" / "full USER", "SGE" / "+SGE").
MODEL_COLOURS: dict[str, str] = {
    "USER": "#0173b2", "full USER": "#0173b2",          # blue
    "VSE++": "#de8f05",                                  # orange
    "SGE": "#029e73", "+SGE": "#029e73",                 # green (USER variant / ablation backbone)
    "CGE": "#cc78bc", "+CGE": "#cc78bc",                 # pink
    "none": "#949494",                                   # grey: USER without enhancement
    "+queue/UTO": "#56b4e9",                             # light blue
    "anchor": "#ca9161",                                 # brown: DBL's anchor branch
    "target": "#d55e00",                                 # vermillion: DBL's target branch
    "DBL offline": "#882255", "offline": "#882255",      # wine
    "DBL online": "#332288", "online": "#332288",        # indigo
    "DBL momentum": "#44aa99", "momentum": "#44aa99",    # teal
    "image queries": "#0173b2", "caption queries": "#de8f05",
    "queue negatives": "#cc78bc", "batch negatives": "#029e73", "random initial keys": "#949494",
}
#: Colours for names not in :data:`MODEL_COLOURS` (``strict=False``): picked by a hash of the
#: name, so a name keeps its colour from figure to figure; none of them is a registered colour.
_EXTRA_COLOURS = ("#4d4d4d", "#7f3b08", "#542788", "#1b7837", "#b2182b", "#2166ac", "#8c6d31",
                  "#c51b7d", "#01665e", "#e08214")


def register_colours(colours: Mapping[str, str]) -> None:
    """Give new model names their colour (e.g. your own runs), checked by matplotlib."""
    for name, colour in colours.items():
        if not mcolors.is_color_like(colour):
            raise ConfigError("colours", f"{colour!r} (for {name!r}) is not a matplotlib colour")
        MODEL_COLOURS[str(name)] = mcolors.to_hex(colour)


def palette_for(names: Sequence[Any], strict: bool = True) -> dict[str, str]:
    """``{name: hex colour}`` for the given model / branch names, from :data:`MODEL_COLOURS`.

    Args:
        names: names in legend order (duplicates are dropped).
        strict: raise on a name without a registered colour (the convention's check). With
            ``strict=False`` such a name gets a colour chosen by a hash of the name (stable across
            figures, distinct within one call, never one of the registered colours).

    Raises:
        ConfigError: ``strict`` and some names are not registered (see :func:`register_colours`).
    """
    import zlib
    names = [str(n) for n in dict.fromkeys(names)]
    unknown = [n for n in names if n not in MODEL_COLOURS]
    if unknown and strict:
        raise ConfigError("palette", f"no colour registered for {', '.join(map(repr, unknown))} "
                                     f"(known: {', '.join(MODEL_COLOURS)}; add yours with "
                                     "viz.register_colours)")
    out = {n: MODEL_COLOURS[n] for n in names if n in MODEL_COLOURS}
    taken: set[str] = set()
    for name in sorted(unknown):
        start = zlib.crc32(name.encode()) % len(_EXTRA_COLOURS)
        for step in range(len(_EXTRA_COLOURS)):
            colour = _EXTRA_COLOURS[(start + step) % len(_EXTRA_COLOURS)]
            if colour not in taken or step == len(_EXTRA_COLOURS) - 1:
                break
        taken.add(colour)
        out[name] = colour
    return {n: out[n] for n in names}


def hue_order(names: Sequence[Any]) -> list[str]:
    """Registered names in :data:`MODEL_COLOURS` order first, then the others in given order:
    the same models stand in the same legend order in every figure."""
    names = [str(n) for n in dict.fromkeys(names)]
    known = [n for n in MODEL_COLOURS if n in names]
    return known + [n for n in names if n not in MODEL_COLOURS]


def integer_ticks(ax: plt.Axes, axis: str = "x") -> None:
    """Only whole-number ticks on ``axis`` (``"x"``, ``"y"`` or ``"both"``): epochs, ranks, counts."""
    from matplotlib.ticker import MaxNLocator
    if axis not in ("x", "y", "both"):
        raise ConfigError("axis", f"{axis!r} is not one of x, y, both")
    for which in (("x", "y") if axis == "both" else (axis,)):
        getattr(ax, f"{which}axis").set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        lo, hi = sorted(getattr(ax, f"get_{which}lim")())
        if hi - lo < 1.0:  # a single epoch: widen so one whole number stands in the view
            mid = float(np.round((lo + hi) / 2))
            getattr(ax, f"set_{which}lim")(mid - 0.5, mid + 0.5)


def legend_outside(ax: plt.Axes, title: Optional[str] = None, where: str = "right", **kwargs) -> Any:
    """A legend beside the axis (``where="right"``) or under it (``"below"``), where it covers
    no data; None when nothing is labelled."""
    handles, labels = ax.get_legend_handles_labels()
    if not handles:
        return None
    if where not in ("right", "below"):
        raise ConfigError("where", f"{where!r} is not one of right, below")
    place = (dict(loc="upper left", bbox_to_anchor=(1.01, 1.0)) if where == "right"
             else dict(loc="upper center", bbox_to_anchor=(0.5, -0.3)))
    return ax.legend(handles, labels, title=title, borderaxespad=0.0, fontsize=8, title_fontsize=8,
                     **place, **kwargs)


def colour_word_palette(words: Sequence[str]) -> dict[str, str]:
    """Each colour word drawn in its own colour (``"blue"`` in blue): for plots coloured by a
    colour name, where any other palette contradicts the legend."""
    out = {}
    for word in dict.fromkeys(str(w) for w in words):
        if not mcolors.is_color_like(word):
            raise ConfigError("colours", f"{word!r} is not a colour matplotlib knows")
        out[word] = mcolors.to_hex(word)
    return out


def save(fig: plt.Figure, name: str, folder: str | os.PathLike = FIGURES, dpi: int = 120) -> Path:
    """Write ``fig`` to ``folder/name`` (PNG unless the name says otherwise), atomically."""
    path = Path(folder) / (name if Path(name).suffix else f"{name}.png")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format=path.suffix.lstrip(".") or "png")
    return path


# ---------------------------------------------------------------------------------------------
# small conversions
# ---------------------------------------------------------------------------------------------
def _numpy(x: Any, what: str, dtype=np.float64) -> np.ndarray:
    """Tensor / array / list -> numpy array on the CPU (float64 by default)."""
    if x is None:
        raise DataError(None, f"{what} is missing")
    if hasattr(x, "detach"):  # torch tensor, any device, any dtype
        x = x.detach().float().cpu().numpy() if x.is_floating_point() else x.detach().cpu().numpy()
    arr = np.asarray(x)
    return arr.astype(dtype) if dtype is not None else arr


def _as_image(image: Any) -> Optional[np.ndarray]:
    """``(H, W, 3)`` float array in ``[0, 1]`` from an array, a PIL image or a path (None stays None)."""
    if image is None:
        return None
    if isinstance(image, (str, os.PathLike)):
        from PIL import Image
        path = Path(image)
        if not path.is_file():
            raise DataError(path, "image file not found")
        with Image.open(path) as img:
            image = img.convert("RGB")
    if hasattr(image, "convert") and hasattr(image, "size"):  # PIL image
        image = np.asarray(image.convert("RGB"))
    arr = _numpy(image, "image", dtype=None)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise DataError(None, f"image must be (H, W, 3), got shape {arr.shape}")
    arr = arr[..., :3]
    if arr.dtype.kind in "ui" or arr.max() > 1.0:
        arr = arr.astype(np.float64) / 255.0
    return np.clip(arr.astype(np.float64), 0.0, 1.0)


def _canvas_for(boxes: np.ndarray) -> np.ndarray:
    """A light grey canvas large enough for ``boxes`` when no image is at hand."""
    w = int(np.ceil(max(1.0, float(boxes[:, 2].max()) if len(boxes) else 1.0)))
    h = int(np.ceil(max(1.0, float(boxes[:, 3].max()) if len(boxes) else 1.0)))
    return np.full((h, w, 3), _PLACEHOLDER_GREY)


def _check_boxes_weights(boxes: Any, weights: Any) -> tuple[np.ndarray, Optional[np.ndarray]]:
    b = _numpy(boxes, "boxes")
    if b.ndim != 2 or b.shape[1] != 4:
        raise DataError(None, f"boxes must be (R, 4) x0 y0 x1 y1 in pixels, got shape {b.shape}")
    if weights is None:
        return b, None
    w = _numpy(weights, "weights").reshape(-1)
    if w.shape[0] != b.shape[0]:
        raise DataError(None, f"{w.shape[0]} attention weights for {b.shape[0]} boxes")
    if not np.isfinite(w).all():
        raise DataError(None, "attention weights hold NaN or Inf")
    return b, w


def _wrap(text: str, width: int) -> str:
    return "\n".join(textwrap.wrap(str(text), width=width)) or str(text)


# ---------------------------------------------------------------------------------------------
# runs
# ---------------------------------------------------------------------------------------------
def read_logs(run_dir: str | os.PathLike) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(train_log, eval_log)`` of a run folder (empty frames when missing)."""
    run = Path(run_dir)
    train = pd.read_csv(run / "train_log.csv") if (run / "train_log.csv").is_file() else pd.DataFrame()
    dev = pd.read_csv(run / "eval_log.csv") if (run / "eval_log.csv").is_file() else pd.DataFrame()
    return train, dev


def _loss_panel(ax: plt.Axes, log: pd.DataFrame, smooth: int, terms: Optional[Sequence[str]] = None,
                title: Optional[str] = None) -> None:
    """One line per loss term over the logged steps (``loss_*`` columns unless ``terms``)."""
    terms = list(terms or [c for c in log.columns if c.startswith("loss_")] or ["loss"])
    for term in terms:
        ax.plot(log["step"], log[term].rolling(smooth, min_periods=1).mean(), label=term.removeprefix("loss_"))
    ax.set(title=title, xlabel="step", ylabel="loss")
    integer_ticks(ax, "x")
    legend_outside(ax, title="term")


def _rsum_panel(ax: plt.Axes, eval_logs: Mapping[str, pd.DataFrame], legend: bool = True,
                title: str = "validation rSum") -> None:
    """Dev rSum per epoch, one line per run in its model colour; epochs on whole-number ticks."""
    palette = palette_for(eval_logs, strict=False)
    for name in hue_order(eval_logs):
        log = eval_logs[name]
        if len(log):
            ax.plot(log["epoch"], log["rsum"], marker="o", label=name, color=palette[name])
    ax.set(xlabel="epoch", ylabel="dev rSum", title=title)
    integer_ticks(ax, "x")
    if legend:
        legend_outside(ax)


def plot_loss_terms(train_logs: Mapping[str, pd.DataFrame], smooth: int = 5) -> plt.Figure:
    """Training curves: one panel per run, one line per loss term (``loss_*`` columns)."""
    _style()
    fig, axes = plt.subplots(1, max(1, len(train_logs)), figsize=(7 * max(1, len(train_logs)), 3.6),
                             squeeze=False)
    for ax, (name, log) in zip(axes[0], train_logs.items()):
        if not len(log):
            ax.set(title=f"{name} (no log)")
            continue
        _loss_panel(ax, log, smooth, title=name)
    fig.tight_layout()
    return fig


def plot_dev_rsum(eval_logs: Mapping[str, pd.DataFrame]) -> plt.Figure:
    """Dev rSum per epoch of several runs on one axis."""
    _style()
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    _rsum_panel(ax, eval_logs)
    fig.tight_layout()
    return fig


def plot_training_curves(train_log: pd.DataFrame, eval_log: pd.DataFrame, name: str = "USER",
                         terms: Optional[Sequence[str]] = None, smooth: int = 5) -> plt.Figure:
    """One run while it trains: loss terms per step (left), dev rSum per epoch (right).

    What :class:`userlab.notebook.LiveCurves` redraws; the panels are those of
    :func:`plot_loss_terms` and :func:`plot_dev_rsum` (steps and epochs on whole-number ticks).

    Args:
        train_log: rows of ``train_log.csv`` so far (``step`` and ``loss_*`` columns); may be empty.
        eval_log: rows of ``eval_log.csv`` so far (``epoch``, ``rsum``); may be empty.
        name: the run's model, for its colour.
        terms: loss columns to draw (default every ``loss_*`` column, else ``loss``).
        smooth: rolling-mean window over logged steps.
    """
    _style()
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.5))
    if len(train_log):
        _loss_panel(a, train_log, smooth, terms, title="loss terms")
    else:
        a.set(title="loss terms (nothing logged yet)", xlabel="step")
        integer_ticks(a, "x")
    _rsum_panel(b, {name: eval_log}, legend=False, title=f"validation ({name})")
    fig.tight_layout()
    return fig


def plot_recall_bars(table: pd.DataFrame, ks: Sequence[int] = (1, 5, 10)) -> plt.Figure:
    """Grouped bars of R@K per model, image-to-text and text-to-image side by side.

    One panel per protocol when ``table`` has a ``protocol`` column with several values (e.g. the
    rows of ``coco_1k_5fold`` and ``coco_5k`` runs concatenated), sharing the y axis.

    Args:
        table: one row per (model, protocol) with columns ``model`` (or ``name``), optionally
            ``protocol``, and ``i2t_R@K`` / ``t2i_R@K`` for every K in ``ks``.
        ks: the recall cut-offs to draw.
    """
    _style()
    label = "model" if "model" in table.columns else "name" if "name" in table.columns else None
    if label is None:
        raise DataError(None, "recall table needs a 'model' (or 'name') column")
    missing = [f"{d}_R@{k}" for d in ("i2t", "t2i") for k in ks if f"{d}_R@{k}" not in table.columns]
    if missing:
        raise DataError(None, f"recall table lacks columns {', '.join(missing)}")
    rows = []
    for _, r in table.iterrows():
        for direction in ("i2t", "t2i"):
            for k in ks:
                rows.append({"model": str(r[label]), "protocol": str(r.get("protocol", "")),
                             "metric": f"{direction} R@{k}", "value": float(r[f"{direction}_R@{k}"])})
    long = pd.DataFrame(rows)
    protocols = list(dict.fromkeys(long["protocol"]))
    order = hue_order(long["model"])
    palette = palette_for(order, strict=False)
    fig, axes = plt.subplots(1, len(protocols), figsize=(8 * len(protocols) + 1.5, 3.8), squeeze=False,
                             sharey=True)
    for ax, protocol in zip(axes[0], protocols):
        part = long[long["protocol"] == protocol]
        sns.barplot(data=part, x="metric", y="value", hue="model", hue_order=order, palette=palette,
                    saturation=1.0, ax=ax)
        ax.set(ylabel="recall (%)", xlabel="", title=f"retrieval recall ({protocol})" if protocol
               else "retrieval recall")
        ax.set_ylim(0, 100)
        if ax.get_legend() is not None:
            ax.get_legend().remove()
    legend_outside(axes[0][-1], title="model")
    fig.tight_layout()
    return fig


def demo_figures(runs: Mapping[str, str | os.PathLike], table: pd.DataFrame,
                 folder: str | os.PathLike = FIGURES) -> list[Path]:
    """The three figures ``make demo`` writes: loss terms, dev rSum per epoch, recall bars."""
    logs = {name: read_logs(path) for name, path in runs.items()}
    paths = []
    for name, fig in (("demo_loss_terms", plot_loss_terms({n: l[0] for n, l in logs.items()})),
                      ("demo_dev_rsum", plot_dev_rsum({n: l[1] for n, l in logs.items()})),
                      ("demo_recall_bars", plot_recall_bars(table))):
        paths.append(save(fig, name, folder))
        plt.close(fig)
    return paths


# ---------------------------------------------------------------------------------------------
# attention
# ---------------------------------------------------------------------------------------------
def attention_weights(output: Any, index: int = 0) -> dict[str, Optional[np.ndarray]]:
    """The attention maps of one image of an ``ImageOutput``, as float64 arrays ``(R,)``.

    Args:
        output: an :class:`userlab.models.ImageOutput` (``alpha``, ``beta``, ``guide_beta``,
            ``gpo_weights``, each ``(B, R)`` or None).
        index: which image of the batch.

    Returns:
        ``{"alpha": SGE's global-vector weights, "beta": region attention (SGE's when SGE runs),
        "guide_beta": CGE's region attention, "gpo": GPO's weights over ranks}``; absent maps are
        None.
    """
    out = {}
    for key, attr in (("alpha", "alpha"), ("beta", "beta"), ("guide_beta", "guide_beta"),
                      ("gpo", "gpo_weights")):
        value = getattr(output, attr, None)
        out[key] = None if value is None else _numpy(value, attr)[index]
    return out


def plot_region_attention(image: Any, boxes: Any, weights: Any, title: Optional[str] = None,
                          ax: Optional[plt.Axes] = None, annotate: int = 3,
                          scale: Optional[float] = None, max_linewidth: float = 4.0,
                          colour: str = _BOX_COLOUR) -> plt.Figure:
    """Region attention drawn over the image: stronger regions get more opaque, thicker boxes.

    Box ``k`` gets edge alpha ``w_k / scale`` and line width ``max_linewidth * w_k / scale``
    with ``scale = max_k w_k`` unless given, so both are proportional to the weight whatever its
    normalisation (SGE's ``alpha`` sums to 1, ``beta`` has unit L2 norm). Boxes are drawn from
    the weakest to the strongest so strong boxes end on top; each patch has
    ``gid = "region:<k>"``. The ``annotate`` strongest boxes are labelled ``#k w``.

    Args:
        image: ``(H, W, 3)`` array (uint8 or float in [0, 1]), PIL image, path, or None (a grey
            canvas that fits the boxes).
        boxes: ``(R, 4)`` ``x0, y0, x1, y1`` in pixels of ``image``.
        weights: ``(R,)`` non-negative attention weights, or None (uniform thin outlines).
        title: axis title.
        ax: draw into this axis (its figure is returned) instead of a new figure.
        annotate: how many of the strongest boxes get a text label.
        scale: weight that maps to full opacity (default the largest weight); give the same
            value to several panels to compare them on one scale.
        max_linewidth: line width of a box at full weight.
        colour: box colour.
    """
    _style()
    b, w = _check_boxes_weights(boxes, weights)
    img = _as_image(image)
    if img is None:
        img = _canvas_for(b)
    if ax is None:
        fig, ax = plt.subplots(figsize=(4.2, 4.2 * img.shape[0] / max(1, img.shape[1])))
    else:
        fig = ax.figure
    ax.imshow(img, extent=(0, img.shape[1], img.shape[0], 0), interpolation="bilinear")
    rgb = np.array(mcolors.to_rgb(colour))
    if w is None:
        strength = np.full(len(b), 0.35)
        order = np.arange(len(b))
    else:
        top = float(scale) if scale is not None else float(w.max()) if len(w) else 1.0
        top = top if top > 0 else 1.0
        strength = np.clip(w / top, 0.0, 1.0)
        order = np.argsort(w, kind="stable")
    for k in order:
        x0, y0, x1, y1 = b[k]
        a = float(strength[k])
        patch = Rectangle((x0, y0), x1 - x0, y1 - y0, linewidth=max_linewidth * a,
                          edgecolor=(*rgb, a), facecolor=(*rgb, 0.18 * a), gid=f"region:{int(k)}")
        ax.add_patch(patch)
    if w is not None and annotate > 0:
        for k in np.argsort(-w, kind="stable")[:annotate]:
            x0, y0 = b[k, 0], b[k, 1]
            ax.text(x0 + 2, y0 + 2, f"#{int(k)} {w[k]:.2f}", fontsize=7, va="top", ha="left",
                    color="black", bbox=dict(facecolor="white", alpha=0.7, pad=1, lw=0),
                    gid=f"label:{int(k)}")
    ax.set_xlim(0, img.shape[1])
    ax.set_ylim(img.shape[0], 0)
    _bare_axis(ax, title)
    return fig


def plot_grid_attention(image: Any, weights: Any, grid: tuple[int, int],
                        title: Optional[str] = None, ax: Optional[plt.Axes] = None,
                        alpha: float = 0.55, cmap: str = "magma") -> plt.Figure:
    """Attention over a feature grid as a heat map laid over the image.

    Grid features are regions in row-major order (``R = h*w``, docs/interfaces.md), so weight
    ``k`` covers cell ``(k // w, k % w)``. The overlay is the second image of the axis
    (``ax.images[1]``), its array the ``(h, w)`` weights; a colour bar is added.

    Args:
        image: ``(H, W, 3)`` array, PIL image, path, or None (grey canvas of ``grid`` size x 32).
        weights: ``(h*w,)`` weights.
        grid: ``(h, w)``.
        title: axis title.
        ax: target axis.
        alpha: overlay opacity.
        cmap: colour map of the overlay.
    """
    _style()
    h, w_cells = int(grid[0]), int(grid[1])
    weights = _numpy(weights, "weights").reshape(-1)
    if weights.shape[0] != h * w_cells:
        raise DataError(None, f"{weights.shape[0]} weights do not fill a {h}x{w_cells} grid "
                              f"({h * w_cells} cells)")
    img = _as_image(image)
    if img is None:
        img = np.full((32 * h, 32 * w_cells, 3), _PLACEHOLDER_GREY)
    if ax is None:
        fig, ax = plt.subplots(figsize=(4.6, 4.2 * img.shape[0] / max(1, img.shape[1])))
    else:
        fig = ax.figure
    extent = (0, img.shape[1], img.shape[0], 0)
    ax.imshow(img, extent=extent)
    heat = ax.imshow(weights.reshape(h, w_cells), extent=extent, alpha=alpha, cmap=cmap,
                     interpolation="nearest")
    fig.colorbar(heat, ax=ax, fraction=0.046, pad=0.04)
    _bare_axis(ax, title)
    return fig


def plot_gpo_weights(weights: Any, title: Optional[str] = None,
                     ax: Optional[plt.Axes] = None) -> plt.Figure:
    """GPO's pooling weights as bars, one bar per rank.

    GPO weighs the *k-th largest value* of every dimension (not region ``k`` itself), so the x
    axis is the rank; weights of padded ranks are 0.

    Args:
        weights: ``(R,)`` weights of one sequence, or ``{name: (R,)}`` (e.g. image and text):
            one panel per entry.
        title: figure title (single series) or suptitle.
        ax: target axis (single series only).
    """
    _style()
    series = dict(weights) if isinstance(weights, Mapping) else {"": weights}
    series = {name: _numpy(v, f"GPO weights {name}").reshape(-1) for name, v in series.items()}
    if ax is not None and len(series) != 1:
        raise ConfigError("ax", "an axis can hold one series of GPO weights")
    if ax is None:  # one y scale: the panels are there to be compared
        fig, axes = plt.subplots(1, len(series), figsize=(4.2 * len(series), 3.0), squeeze=False,
                                 sharey=True)
        axes = list(axes[0])
    else:
        fig, axes = ax.figure, [ax]
    colours = palette_for([n for n in series if n], strict=False)
    for a, (name, w) in zip(axes, series.items()):
        a.bar(np.arange(1, len(w) + 1), w, color=colours.get(name, MODEL_COLOURS["USER"]))
        a.set(xlabel="rank (k-th largest value)", ylabel="GPO weight", title=name or None)
        integer_ticks(a, "x")
    if title and len(series) == 1:
        axes[0].set_title(title)
    elif title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_attention_comparison(image: Any, boxes: Any, attention: Mapping[str, Any],
                              title: Optional[str] = None, shared_scale: bool = False,
                              annotate: int = 3) -> plt.Figure:
    """One panel per attention map of the same image, e.g. ``{"SGE": β1, "CGE": β2, "none": None}``.

    Args:
        image: the image (see :func:`plot_region_attention`).
        boxes: ``(R, 4)`` region boxes in pixels.
        attention: name -> ``(R,)`` weights, or None for a model without enhancement (its panel
            shows plain outlines).
        title: suptitle.
        shared_scale: map the largest weight over all panels to full opacity (compare
            strengths), instead of each panel's own maximum (compare where each one looks).
        annotate: labels per panel.
    """
    _style()
    if not attention:
        raise ConfigError("attention", "needs at least one named attention map")
    img = _as_image(image)
    scale = None
    if shared_scale:
        tops = [float(_numpy(w, name).max()) for name, w in attention.items() if w is not None]
        scale = max(tops) if tops else None
    n = len(attention)
    fig, axes = plt.subplots(1, n, figsize=(3.6 * n, 3.8), squeeze=False)
    for ax, (name, w) in zip(axes[0], attention.items()):
        plot_region_attention(img, boxes, w, title=name if w is not None else f"{name} (no attention)",
                              ax=ax, annotate=annotate, scale=scale)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------------
# margins
# ---------------------------------------------------------------------------------------------
def _captions_per_image(shape: tuple[int, int]) -> int:
    n_img, n_cap = shape
    if n_img == 0 or n_cap % n_img:
        raise DataError(None, f"similarity matrix {shape}: captions ({n_cap}) are not a whole "
                              f"multiple of images ({n_img})")
    return n_cap // n_img


def margin_records(sim: Any, epoch: int, name: Optional[str] = None,
                   column: str = "model") -> pd.DataFrame:
    """Positive minus hardest negative for every query of a similarity matrix.

    For ``(B, B)`` batch scores (pair ``(i, i)`` positive) and for ``(N, kN)`` evaluation scores
    (captions ``k*i..k*i+k-1`` of image ``i``):

    - image query ``i``: ``positive`` = its best caption's score, ``hardest_negative`` = the best
      score among the other images' captions;
    - caption query ``c``: ``positive = S[c // k, c]``, ``hardest_negative = max_{i != c//k} S[i, c]``.

    ``margin = positive − hardest_negative``: positive iff the query is ranked first (R@1 hit,
    ties aside); below DBL's γ = 0.2 the VSE++ hinge of that query is active. With one image the
    hardest negative is ``-inf`` and the margin ``+inf``.

    Args:
        sim: ``(B, B)`` or ``(N, kN)`` tensor or array, rows = images.
        epoch: stored in the ``epoch`` column.
        name: model / branch name, stored in ``column`` when given.
        column: the column that holds ``name`` (``"model"`` or ``"branch"``).

    Returns:
        DataFrame with columns ``epoch, direction ("i2t"/"t2i"), query, positive,
        hardest_negative, margin`` (+ ``column``), image queries first.
    """
    S = _numpy(sim, "sim")
    if S.ndim != 2:
        raise DataError(None, f"sim must be 2-d (images, captions), got shape {S.shape}")
    k = _captions_per_image(S.shape)
    n_img, n_cap = S.shape
    owner = np.arange(n_cap) // k                                  # image of each caption
    is_pos = owner[None, :] == np.arange(n_img)[:, None]            # (N, kN)
    with np.errstate(invalid="ignore"):
        i2t_pos = np.where(is_pos, S, -np.inf).max(axis=1)
        i2t_neg = np.where(is_pos, -np.inf, S).max(axis=1)
        t2i_pos = S[owner, np.arange(n_cap)]
        t2i_neg = np.where(is_pos, -np.inf, S).max(axis=0)
    frames = []
    for direction, pos, neg in (("i2t", i2t_pos, i2t_neg), ("t2i", t2i_pos, t2i_neg)):
        frames.append(pd.DataFrame({"epoch": epoch, "direction": direction,
                                    "query": np.arange(len(pos)), "positive": pos,
                                    "hardest_negative": neg, "margin": pos - neg}))
    df = pd.concat(frames, ignore_index=True)
    if name is not None:
        df[column] = name
    return df


def _hue_column(records: pd.DataFrame, hue: Optional[str]) -> Optional[str]:
    if hue is not None:
        if hue not in records.columns:
            raise DataError(None, f"margin records have no column {hue!r}")
        return hue
    return next((c for c in ("model", "branch") if c in records.columns), None)


def _check_records(records: pd.DataFrame) -> pd.DataFrame:
    missing = [c for c in ("epoch", "margin") if c not in records.columns]
    if missing:
        raise DataError(None, f"margin records lack columns {', '.join(missing)} "
                              "(build them with margin_records)")
    return records[np.isfinite(records["margin"].to_numpy(dtype=np.float64))]


@dataclass(frozen=True)
class ObjectiveThreshold:
    """The line a model's training objective draws for one query, to judge margins by.

    - VSE++ / DBL (triplet objective): the hardest-negative hinge is active while
      ``margin = positive − hardest negative < γ`` (``column = "margin"``, ``value`` = the
      triplet margin, 0.2);
    - USER (unified objective): negatives are pushed down while their similarity exceeds the
      absolute threshold γ (0.5); the objective has no margin, so the query is judged by its
      ``hardest_negative > γ``.

    Build it from a config with :func:`objective_threshold`; a plain float means a margin
    threshold (``margin < value``).
    """

    objective: str
    column: str            # "margin" or "hardest_negative"
    value: float
    label: str             # what the dashed line is, e.g. "UTO γ = 0.5"

    def __post_init__(self) -> None:
        if self.column not in ("margin", "hardest_negative"):
            raise ConfigError("threshold.column", f"{self.column!r} is not margin or hardest_negative")

    @property
    def rule(self) -> str:
        """The violation rule in words, e.g. ``"margin < 0.2"``."""
        return (f"hardest negative > {self.value:g}" if self.column == "hardest_negative"
                else f"margin < {self.value:g}")

    @property
    def axis_label(self) -> str:
        return ("hardest negative similarity" if self.column == "hardest_negative"
                else "margin (positive − hardest negative)")

    def violated(self, values: Any) -> np.ndarray:
        v = np.asarray(values, dtype=np.float64)
        return v > self.value if self.column == "hardest_negative" else v < self.value

    def with_value(self, value: float) -> "ObjectiveThreshold":
        """The same rule at another value (a slider moving γ or the margin), label to match."""
        return ObjectiveThreshold(self.objective, self.column, float(value),
                                  _threshold_label(self.objective, float(value)))


def _threshold_label(objective: str, value: float) -> str:
    """What the dashed line of ``objective`` at ``value`` is, in words."""
    if objective == "uto":
        return f"UTO γ = {value:g}"
    if objective == "triplet":
        return f"triplet margin {value:g}"
    if objective == "margin":
        return f"margin {value:g}"
    if value == 0.0:
        return f"{objective}: no threshold, 0 = R@1 miss"
    return f"{objective}: margin {value:g}"


def as_threshold(threshold: "float | ObjectiveThreshold") -> ObjectiveThreshold:
    """A float ``t`` is the margin rule ``margin < t``; an :class:`ObjectiveThreshold` stays."""
    if isinstance(threshold, ObjectiveThreshold):
        return threshold
    value = float(threshold)
    return ObjectiveThreshold("margin", "margin", value, _threshold_label("margin", value))


def objective_threshold(*configs: Any) -> ObjectiveThreshold:
    """The threshold of the objective the models of ``configs`` were trained with.

    ``loss.objective == "uto"`` (USER) gives ``hardest_negative > loss.gamma``; ``"triplet"``
    (VSE++, and DBL's raw loss) gives ``margin < loss.margin``; ``"infonce"`` has no threshold and
    gives ``margin < 0`` (R@1 misses).

    Raises:
        ConfigError: no config, or configs whose objectives draw different lines (draw those
            models in separate figures).
    """
    if not configs:
        raise ConfigError("configs", "give the config of at least one trained model")
    found = []
    for cfg in configs:
        loss = cfg.loss
        if loss.objective == "uto":
            column, value = "hardest_negative", float(loss.gamma)
        elif loss.objective == "triplet":
            column, value = "margin", float(loss.margin)
        else:
            column, value = "margin", 0.0
        found.append(ObjectiveThreshold(str(loss.objective), column, value,
                                        _threshold_label(str(loss.objective), value)))
    if len(set(found)) > 1:
        raise ConfigError("configs", "models trained with different objectives ("
                          + "; ".join(sorted({t.label for t in found}))
                          + ") are judged by different thresholds: draw them in separate figures")
    return found[0]


def violation_table(records: pd.DataFrame, threshold: "float | ObjectiveThreshold" = 0.2,
                    hue: Optional[str] = None) -> pd.DataFrame:
    """Fraction of queries that violate ``threshold`` per epoch (and per ``hue``).

    ``threshold``: an :class:`ObjectiveThreshold` (its rule), or a float ``t`` (``margin < t``).
    """
    rule = as_threshold(threshold)
    records = _check_records(records)
    hue = _hue_column(records, hue)
    keys = ["epoch"] + ([hue] if hue else [])
    out = (records.assign(violated=rule.violated(records[rule.column]))
           .groupby(keys, sort=True)["violated"].mean().rename("violation_rate").reset_index())
    return out


def _int_epochs(records: pd.DataFrame) -> pd.DataFrame:
    """Whole-number epochs as ints (so categorical axes read ``1`` and not ``1.0``)."""
    epochs = records["epoch"].to_numpy()
    if np.issubdtype(epochs.dtype, np.floating) and np.all(np.mod(epochs, 1) == 0):
        records = records.assign(epoch=epochs.astype(np.int64))
    return records


def plot_margin_distributions(records: pd.DataFrame, threshold: "float | ObjectiveThreshold" = 0.2,
                              hue: Optional[str] = None, direction: Optional[str] = None,
                              violations: Optional[pd.DataFrame] = None) -> plt.Figure:
    """Per-query distributions per epoch (left) and the violation rate per epoch (right).

    What is drawn depends on the objective (see :class:`ObjectiveThreshold`): the margin with the
    triplet margin for VSE++ / DBL, the hardest negative's similarity with γ for USER's unified
    objective. The dashed line and both titles say which threshold it is. Colours come from
    :func:`palette_for` (the same model has the same colour in both panels and in every figure).

    Args:
        records: rows of :func:`margin_records` (columns ``epoch``, ``margin``,
            ``hardest_negative``, optionally ``direction`` and ``model`` / ``branch``), several
            epochs concatenated.
        threshold: :func:`objective_threshold` of the trained models, or a float ``t``
            (``margin < t``; 0 counts R@1 misses).
        hue: column that separates models / branches (default ``model`` or ``branch`` if present).
        direction: keep only ``"i2t"`` or ``"t2i"`` queries (default both).
        violations: optional precomputed rates (columns ``epoch``, ``violation_rate`` and the
            hue column), drawn instead of the rates derived from ``records``.
    """
    _style()
    rule = as_threshold(threshold)
    if direction is not None:
        if "direction" not in records.columns:
            raise DataError(None, "margin records have no 'direction' column to filter on")
        records = records[records["direction"] == direction]
    records = _check_records(records)
    if rule.column not in records.columns:
        raise DataError(None, f"margin records have no {rule.column!r} column (build them with "
                              "margin_records)")
    if not len(records):
        raise DataError(None, "no finite margins to plot")
    records = _int_epochs(records)
    hue = _hue_column(records, hue)
    rates = violation_table(records, rule, hue) if violations is None else violations
    order = hue_order(records[hue]) if hue else None
    palette = palette_for(order, strict=False) if hue else None
    fig, (ax_d, ax_v) = plt.subplots(1, 2, figsize=(12, 3.8), gridspec_kw={"width_ratios": [2, 1]})
    sns.violinplot(data=records, x="epoch", y=rule.column, hue=hue, hue_order=order, palette=palette,
                   cut=0, inner="quartile", density_norm="width", ax=ax_d, linewidth=0.8,
                   saturation=1.0,  # the palette's colour itself, as in the rate panel
                   legend=False, color=None if hue else MODEL_COLOURS["USER"])
    if rule.column == "margin" and rule.value != 0.0:
        ax_d.axhline(0.0, color="black", lw=0.8)
    values = records[rule.column].to_numpy(dtype=np.float64)
    lo, hi = float(values.min()), float(values.max())
    span = max(hi - lo, 1e-9)
    if lo - span <= rule.value <= hi + span:
        ax_d.axhline(rule.value, color=MISS_COLOUR, lw=1.0, ls="--", gid="threshold")
    else:  # far off the data: say where it is instead of squashing every violin to a line
        above = rule.value > hi
        ax_d.annotate(f"{'↑' if above else '↓'} {rule.label} lies off the scale, at {rule.value:g}",
                      xy=(0.99, 0.97 if above else 0.03), xycoords="axes fraction", ha="right",
                      va="top" if above else "bottom", color=MISS_COLOUR, fontsize=9, gid="threshold")
    ax_d.set(title=f"{rule.axis_label} per query; threshold: {rule.label}", ylabel=rule.axis_label)
    groups = [(None, rates)] if hue is None else [(n, rates[rates[hue] == n]) for n in order]
    for name, part in groups:
        part = _int_epochs(part).sort_values("epoch")
        ax_v.plot(part["epoch"].to_numpy(), 100.0 * part["violation_rate"].to_numpy(), marker="o",
                  label=None if name is None else str(name),
                  color=MODEL_COLOURS["USER"] if name is None else palette[name])
    ax_v.set(xlabel="epoch", ylabel="violating queries (%)", title=f"{rule.rule} ({rule.label})")
    ax_v.set_ylim(-2, 102)
    integer_ticks(ax_v, "x")
    if hue is not None:
        legend_outside(ax_v, title=hue)
    fig.tight_layout()
    return fig


def plot_margin_epoch(records: pd.DataFrame, epoch: Any, threshold: "float | ObjectiveThreshold" = 0.2,
                      hue: Optional[str] = None, bins: int = 30) -> plt.Figure:
    """Histogram of one epoch's margins (or hardest negatives, for USER), threshold marked.

    The title gives the epoch and the violation rate (fraction of queries breaking the
    threshold's rule), per model when ``hue`` applies.
    """
    _style()
    rule = as_threshold(threshold)
    records = _check_records(records)
    part = records[records["epoch"] == epoch]
    if not len(part):
        raise DataError(None, f"no margin records for epoch {epoch!r} (have "
                              f"{sorted(records['epoch'].unique().tolist())})")
    hue = _hue_column(part, hue)
    order = hue_order(part[hue]) if hue else None
    fig, ax = plt.subplots(figsize=(6, 3.6))
    sns.histplot(data=part, x=rule.column, hue=hue, hue_order=order,
                 palette=palette_for(order, strict=False) if hue else None, bins=bins,
                 element="step", stat="density", common_norm=False, ax=ax)
    if rule.column == "margin":
        ax.axvline(0.0, color="black", lw=0.8)
    ax.axvline(rule.value, color=MISS_COLOUR, lw=0.8, ls="--", gid="threshold")
    rates = violation_table(part, rule, hue)
    if hue is None:
        rate_text = f"{100 * rates['violation_rate'].iloc[0]:.1f}%"
    else:
        rate_text = ", ".join(f"{r[hue]} {100 * r['violation_rate']:.1f}%" for _, r in rates.iterrows())
    ax.set(title=f"epoch {epoch}: {rule.rule} for {rate_text}", xlabel=rule.axis_label)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------------
# queues
# ---------------------------------------------------------------------------------------------
def same_image_counts(queue_ids: Any, query_ids: Any) -> np.ndarray:
    """How many queue keys share each query's image id: int64 ``(B,)``.

    Never-written slots carry id ``-1`` and match no real id. These keys are false negatives
    when masking is off (as in the released USER).
    """
    q = _numpy(queue_ids, "queue ids", dtype=np.int64).reshape(-1)
    ids = _numpy(query_ids, "query ids", dtype=np.int64).reshape(-1)
    valid = q >= 0
    return (ids[:, None] == np.where(valid, q, np.iinfo(np.int64).min)[None, :]).sum(axis=1)


def _off_diagonal(sims: Any) -> np.ndarray:
    s = _numpy(sims, "batch negatives")
    if s.ndim == 2 and s.shape[0] == s.shape[1]:
        return s[~np.eye(s.shape[0], dtype=bool)]
    return s.reshape(-1)


def snapshot_queue(queue: Any) -> Any:
    """A frozen CPU copy of a :class:`userlab.momentum.MomentumQueue`.

    Take it *before* the forward pass whose queries you draw: the forward pass enqueues the
    batch's own keys, and a queue drawn afterwards holds every query's own image (100 % same-image
    keys, an artefact of the order).
    """
    import copy
    return copy.deepcopy(queue).cpu()


def _queue_age_panel(ax: plt.Axes, queue: Any, current_step: Optional[int], bins: int,
                     name: str = "") -> None:
    written = _numpy(queue.written_at, "queue.written_at", dtype=np.int64)
    filled = written >= 0
    step = int(queue.num_enqueued) if current_step is None else int(current_step)
    ages = step - written[filled]
    if len(ages):
        ax.hist(ages, bins=np.arange(ages.min(), ages.max() + 2) - 0.5 if ages.max() - ages.min() < bins
                else bins, color="0.45")
    ax.set(xlabel="key age (steps)", ylabel="keys",
           title=f"{name + ': ' if name else ''}{int(filled.sum())} keys, {int((~filled).sum())} unfilled")
    integer_ticks(ax, "both")


def _negatives_panel(ax: plt.Axes, queue: Any, query_emb: Any, batch_neg_sims: Any, bins: int,
                     edges: Any = None, title: str = "negatives") -> None:
    groups = []
    if query_emb is not None:
        scores = _queue_scores(queue, query_emb)
        filled = _numpy(queue.written_at, "queue.written_at", dtype=np.int64) >= 0
        used = filled | bool(getattr(queue, "include_unfilled", True))
        written = filled[used]                     # columns of ``scores`` that hold real keys
        groups.append(("queue negatives", scores[:, written].reshape(-1)))
        if (~written).any():                       # USER's random initial keys, still in use
            groups.append(("random initial keys", scores[:, ~written].reshape(-1)))
    if batch_neg_sims is not None:
        groups.append(("batch negatives", _off_diagonal(batch_neg_sims)))
    values = [v for _, v in groups if len(v)]
    if edges is None:
        edges = np.histogram_bin_edges(np.concatenate(values), bins=bins) if values else bins
    for label, v in groups:
        if len(v):  # one set of bins so the two densities compare bar by bar
            ax.hist(v, bins=edges, density=True, alpha=0.55, color=MODEL_COLOURS[label],
                    label=f"{label} (n={len(v)}, mean {v.mean():.2f})")
    ax.set(xlabel="similarity", ylabel="density", title=title)
    legend_outside(ax, where="below")


def _queue_scores(queue: Any, query_emb: Any) -> np.ndarray:
    """``(B, K_used)`` query-key similarities over the slots the loss uses (never-written random
    keys too when the queue's ``include_unfilled`` is True, as in USER)."""
    q = _numpy(query_emb, "query_emb")
    keys = _numpy(queue.keys, "queue.keys")
    if q.ndim != 2 or q.shape[1] != keys.shape[0]:
        raise DataError(None, f"query_emb must be (B, {keys.shape[0]}), got {q.shape}")
    filled = _numpy(queue.written_at, "queue.written_at", dtype=np.int64) >= 0
    used = filled | bool(getattr(queue, "include_unfilled", True))
    return q @ keys[:, used]


def _same_image_panel(ax: plt.Axes, queue: Any, query_ids: Any, name: str = "query") -> np.ndarray:
    counts = same_image_counts(queue.ids, query_ids)
    ax.bar(np.arange(len(counts)), counts, color=MISS_COLOUR)
    ax.set_ylim(0, max(1, int(counts.max(initial=0))) + 0.5)
    ax.set(xlabel=name, ylabel="same-image keys",
           title=f"same-image keys: {int(counts.sum())} ({(counts > 0).mean() * 100:.0f}% of queries)")
    integer_ticks(ax, "both")
    return counts


def plot_queue_state(queue: Any, current_step: Optional[int] = None, query_emb: Any = None,
                     batch_neg_sims: Any = None, query_ids: Any = None, bins: int = 30) -> plt.Figure:
    """What sits in one :class:`userlab.momentum.MomentumQueue` (see :func:`plot_queues` for
    both queues with both query modalities).

    Panels (the last two only when their inputs are given):

    1. age of the stored keys: ``current_step − written_at`` (in enqueue calls; by default
       ``current_step`` is the queue's ``num_enqueued``, i.e. one enqueue per training step);
       never-written slots (USER's random initial keys) are counted in the title;
    2. similarity of the queries to the queue keys the loss uses (never-written slots only when
       the queue's ``include_unfilled`` is True, as in USER) against the batch negatives
       ``batch_neg_sims`` (off-diagonal of the ``(B, B)`` batch matrix, or a flat array);
    3. keys of the query's own image per query (false negatives when masking is off).

    Args:
        queue: the queue (``keys (E, K)``, ``ids (K,)``, ``written_at (K,)``, ``num_enqueued``),
            best a :func:`snapshot_queue` taken before the queries' forward pass.
        current_step: step to measure ages from.
        query_emb: ``(B, E)`` query embeddings of the *other* modality (image queries against
            the text queue and vice versa).
        batch_neg_sims: ``(B, B)`` batch similarities or a 1-d array of batch negative scores.
        query_ids: ``(B,)`` image ids of the queries.
    """
    _style()
    panels = 1 + int(query_emb is not None or batch_neg_sims is not None) + int(query_ids is not None)
    fig, axes = plt.subplots(1, panels, figsize=(4.6 * panels, 3.6), squeeze=False)
    axes = list(axes[0])
    _queue_age_panel(axes.pop(0), queue, current_step, bins)
    if query_emb is not None or batch_neg_sims is not None:
        _negatives_panel(axes.pop(0), queue, query_emb, batch_neg_sims, bins)
    if query_ids is not None:
        _same_image_panel(axes.pop(0), queue, query_ids)
    fig.tight_layout()
    return fig


def plot_queues(image_queue: Any, text_queue: Any, img_emb: Any, txt_emb: Any, query_ids: Any,
                batch_sims: Any = None, current_step: Optional[int] = None,
                bins: int = 30) -> plt.Figure:
    """Both USER queues as the loss sees them: image queries against the **text** queue (top row)
    and caption queries against the **image** queue (bottom row).

    Each row: key ages, queue negatives beside the batch negatives of the same queries (rows of
    ``batch_sims`` for image queries, columns for caption queries; off-diagonal, as the
    mini-batch term uses them), and same-image keys per query. The similarity panels share their
    bins and x axis, the same-image panels their y axis.

    Args:
        image_queue, text_queue: the queues, snapshots (:func:`snapshot_queue`) taken *before*
            the forward pass that produced the embeddings.
        img_emb: ``(B, E)`` image query embeddings of the batch.
        txt_emb: ``(B, E)`` caption query embeddings of the same batch.
        query_ids: ``(B,)`` image ids of that batch.
        batch_sims: ``(B, B)`` batch similarities ``S = V Tᵀ`` (rows images), optional.
        current_step: step to measure key ages from (default each queue's ``num_enqueued``).
    """
    _style()
    img = _numpy(img_emb, "img_emb")
    txt = _numpy(txt_emb, "txt_emb")
    ids = _numpy(query_ids, "query_ids", dtype=np.int64).reshape(-1)
    if img.shape != txt.shape or img.ndim != 2 or len(ids) != len(img):
        raise DataError(None, f"img_emb {img.shape}, txt_emb {txt.shape} and query_ids ({len(ids)},) "
                              "must describe the same batch")
    S = None if batch_sims is None else _numpy(batch_sims, "batch_sims")
    if S is not None and S.shape != (len(img), len(txt)):
        raise DataError(None, f"batch_sims must be ({len(img)}, {len(txt)}), got {S.shape}")
    rows = [("image queries", "text queue", text_queue, img, S),
            ("caption queries", "image queue", image_queue, txt, None if S is None else S.T)]
    values = [_queue_scores(q, e).reshape(-1) for _, _, q, e, _ in rows]
    if S is not None:
        values.append(_off_diagonal(S))
    edges = np.histogram_bin_edges(np.concatenate(values), bins=bins)
    fig, axes = plt.subplots(2, 3, figsize=(14, 7.2), sharey="col")
    for r, (queries, queue_name, queue, emb, sims) in enumerate(rows):
        _queue_age_panel(axes[r, 0], queue, current_step, bins, name=queue_name)
        _negatives_panel(axes[r, 1], queue, emb, sims, bins, edges,
                         title=f"{queries} vs the {queue_name}")
        _same_image_panel(axes[r, 2], queue, ids, name=queries.replace("queries", "query"))
    axes[1, 1].sharex(axes[0, 1])
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------------
# embedding map
# ---------------------------------------------------------------------------------------------
def embedding_map_2d(points: Any, method: str = "pca", seed: int = 0) -> np.ndarray:
    """2-D coordinates ``(N, 2)`` of ``points (N, E)``.

    ``"pca"``: projection on the two leading principal axes (exact eigen-decomposition of the
    ``E x E`` covariance in float64, signs fixed so each axis's largest loading is positive:
    repeatable). ``"tsne"``: scikit-learn's t-SNE (PCA init, ``random_state=seed``), slow beyond
    a few thousand points.
    """
    x = _numpy(points, "points")
    if x.ndim != 2 or x.shape[0] < 2:
        raise DataError(None, f"need at least two points (N, E), got shape {x.shape}")
    if method == "pca":
        x = x - x.mean(axis=0, keepdims=True)
        vals, vecs = np.linalg.eigh(x.T @ x)
        axes = vecs[:, np.argsort(vals)[::-1][:2]]
        if axes.shape[1] < 2:
            axes = np.pad(axes, ((0, 0), (0, 2 - axes.shape[1])))
        signs = np.sign(axes[np.abs(axes).argmax(axis=0), np.arange(axes.shape[1])])
        return x @ (axes * np.where(signs == 0, 1.0, signs))
    if method == "tsne":
        from sklearn.manifold import TSNE
        perplexity = float(min(30.0, max(2.0, (x.shape[0] - 1) / 3.0)))
        return TSNE(n_components=2, init="pca", random_state=seed,
                    perplexity=perplexity).fit_transform(x)
    raise ConfigError("method", f"{method!r} is not one of pca, tsne")


def plot_colour_scatter(xy: Any, words: Sequence[str], ax: Optional[plt.Axes] = None,
                        title: Optional[str] = None) -> plt.Figure:
    """2-D points coloured by a colour word, each drawn in the colour it names (thin dark edges
    keep yellow and white visible); the legend sits beside the axis.

    Args:
        xy: ``(N, 2)`` coordinates (e.g. :func:`embedding_map_2d`).
        words: ``(N,)`` colour names matplotlib knows (``"red"``, ``"purple"``...).
    """
    _style()
    pts = _numpy(xy, "xy")
    words = np.asarray([str(w) for w in words])
    if pts.ndim != 2 or pts.shape[1] != 2 or len(pts) != len(words):
        raise DataError(None, f"xy must be (N, 2) with N = {len(words)} colour words, got {pts.shape}")
    palette = colour_word_palette(sorted(set(words.tolist())))
    if ax is None:
        fig, ax = plt.subplots(figsize=(5.5, 4.2))
    else:
        fig = ax.figure
    for word, colour in palette.items():
        sel = words == word
        ax.scatter(pts[sel, 0], pts[sel, 1], s=10, color=colour, edgecolor="0.25", linewidth=0.2,
                   label=word, gid=f"colour:{word}")
    ax.set(xticks=[], yticks=[], title=title)
    legend_outside(ax, markerscale=1.5)
    return fig


def plot_probe(result: Any, ax: Optional[plt.Axes] = None, colours: Optional[Mapping[str, str]] = None,
               what: str = "linear probe") -> plt.Figure:
    """Held-out recall per class of a :class:`userlab.probe.ProbeResult`, chance dashed.

    Args:
        result: the probe result (``classes``, ``per_class``, ``accuracy``, ``chance``).
        colours: ``{class: colour}``; colour words default to their own colour.
        what: title prefix.
    """
    _style()
    classes = [str(c) for c in result.classes]
    if colours is None:
        colours = (colour_word_palette(classes) if all(mcolors.is_color_like(c) for c in classes)
                   else dict(zip(classes, sns.color_palette("tab10", len(classes)))))
    if ax is None:
        fig, ax = plt.subplots(figsize=(0.5 * len(classes) + 2.5, 3.6))
    else:
        fig = ax.figure
    ax.bar(classes, 100 * np.asarray(result.per_class, dtype=np.float64), color=[colours[c] for c in classes],
           edgecolor="0.25", linewidth=0.4)
    ax.axhline(100 * result.chance, color="black", ls="--", lw=1, label=f"chance {100 * result.chance:.0f}%")
    ax.set(ylim=(0, 100), ylabel="held-out recall (%)", title=f"{what}: {100 * result.accuracy:.0f}% overall")
    ax.tick_params(axis="x", rotation=45)
    ax.legend(loc="upper right", fontsize=8)
    return fig


def modality_gap(img_emb: Any, cap_emb: Any) -> dict[str, float]:
    """Numbers behind an embedding map: how far apart the two modalities sit.

    Returns ``gap`` (distance between the mean image and the mean caption embedding),
    ``gap_variance_share`` (share of the total variance of images and captions together that lies
    along the gap direction), ``matched_cosine`` (mean image-caption cosine of matching pairs)
    and ``unmatched_cosine`` (mean over all other image-caption pairs).
    """
    img = _numpy(img_emb, "img_emb")
    cap = _numpy(cap_emb, "cap_emb")
    k = _captions_per_image((img.shape[0], cap.shape[0]))
    gap_vec = img.mean(axis=0) - cap.mean(axis=0)
    both = np.concatenate([img, cap])
    centred = both - both.mean(axis=0)
    total = float((centred ** 2).sum())
    unit = gap_vec / max(np.linalg.norm(gap_vec), 1e-12)
    along = float(((centred @ unit) ** 2).sum())
    def unit_rows(x):
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    cos = unit_rows(img) @ unit_rows(cap).T
    owner = np.arange(cap.shape[0]) // k
    is_pos = owner[None, :] == np.arange(img.shape[0])[:, None]
    return {"gap": float(np.linalg.norm(gap_vec)), "gap_variance_share": along / max(total, 1e-12),
            "matched_cosine": float(cos[is_pos].mean()),
            "unmatched_cosine": float(cos[~is_pos].mean()) if (~is_pos).any() else float("nan")}


def plot_pair_similarity(img_emb: Any, cap_emb: Any, ax: Optional[plt.Axes] = None,
                         bins: int = 40, max_pairs: int = 200_000, seed: int = 0) -> plt.Figure:
    """Cosine of matching image-caption pairs against the other pairs, as two densities.

    This is what retrieval rests on, whatever the modality gap: each image must score its own
    captions above the others. Colours: :data:`HIT_COLOUR` for matching pairs, grey for the rest
    (a random sample of ``max_pairs`` when there are more); the legend gives both means.

    Args:
        img_emb: ``(N, E)`` image embeddings.
        cap_emb: ``(kN, E)`` caption embeddings, captions ``k*i..`` of image ``i``.
    """
    _style()
    img = _numpy(img_emb, "img_emb")
    cap = _numpy(cap_emb, "cap_emb")
    k = _captions_per_image((img.shape[0], cap.shape[0]))
    unit = lambda x: x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)  # noqa: E731
    cos = unit(img) @ unit(cap).T
    is_pos = (np.arange(cap.shape[0]) // k)[None, :] == np.arange(img.shape[0])[:, None]
    pos, neg = cos[is_pos], cos[~is_pos]
    if len(neg) > max_pairs:
        neg = np.random.default_rng(seed).choice(neg, max_pairs, replace=False)
    if ax is None:
        fig, ax = plt.subplots(figsize=(5.5, 3.8))
    else:
        fig = ax.figure
    edges = np.histogram_bin_edges(np.concatenate([pos, neg]), bins=bins)
    ax.hist(neg, bins=edges, density=True, alpha=0.6, color="0.55",
            label=f"other pairs (mean {cos[~is_pos].mean():.2f})")
    ax.hist(pos, bins=edges, density=True, alpha=0.6, color=HIT_COLOUR,
            label=f"matching pairs (mean {pos.mean():.2f})")
    ax.set(xlabel="image-caption cosine", ylabel="density", title="matching vs other pairs")
    ax.legend(fontsize=8, loc="best")
    return fig


def plot_embedding_map(img_emb: Any, cap_emb: Any, labels: Any = None, method: str = "pca",
                       n_linked: int = 5, linked: Optional[Sequence[int]] = None,
                       max_images: Optional[int] = 500, seed: int = 0, centre: bool = False,
                       ax: Optional[plt.Axes] = None, label_name: str = "image label") -> plt.Figure:
    """Images and captions in one 2-D map of the joint space.

    Images are dots, captions crosses; with ``labels`` both are coloured by their image's label.
    For ``n_linked`` images (or the indices in ``linked``) lines join the image to each of its
    captions (one ``LineCollection`` with ``gid="links"``): short lines mean the pair is close
    in the joint space.

    Args:
        img_emb: ``(N, E)`` image embeddings.
        cap_emb: ``(kN, E)`` caption embeddings, captions ``k*i..`` of image ``i``.
        labels: optional ``(N,)`` label per image (e.g. the main object's shape).
        method: ``"pca"`` or ``"tsne"`` (see :func:`embedding_map_2d`).
        n_linked: number of images to link to their captions (evenly spaced).
        linked: explicit image indices to link (overrides ``n_linked``).
        max_images: keep only this many images (evenly spaced) and their captions, for speed.
        seed: t-SNE seed.
        centre: subtract each modality's own mean and scale both to the same root-mean-square
            norm first. Without it the leading axis of a trained joint space is usually the
            image/caption gap (:func:`modality_gap`); centred, the map shows how scenes spread
            and whether captions sit by their image.
        ax: draw into this axis (its figure is returned).
        label_name: legend title for ``labels``.
    """
    _style()
    img = _numpy(img_emb, "img_emb")
    cap = _numpy(cap_emb, "cap_emb")
    if img.ndim != 2 or cap.ndim != 2 or img.shape[1] != cap.shape[1]:
        raise DataError(None, f"embeddings must be (N, E) and (kN, E), got {img.shape} and {cap.shape}")
    k = _captions_per_image((img.shape[0], cap.shape[0]))
    lab = None if labels is None else np.asarray(labels)
    if lab is not None and len(lab) != len(img):
        raise DataError(None, f"{len(lab)} labels for {len(img)} images")
    keep = np.arange(len(img))
    if max_images is not None and len(img) > max_images:
        keep = np.unique(np.linspace(0, len(img) - 1, max_images).round().astype(int))
    cap_keep = (keep[:, None] * k + np.arange(k)[None, :]).reshape(-1)
    pts_img, pts_cap = img[keep], cap[cap_keep]
    if centre:  # each modality about its own mean, at the same spread: removes the gap
        pts_img, pts_cap = pts_img - img.mean(axis=0), pts_cap - cap.mean(axis=0)
        pts_img = pts_img / max(float(np.sqrt((pts_img ** 2).sum(axis=1).mean())), 1e-12)
        pts_cap = pts_cap / max(float(np.sqrt((pts_cap ** 2).sum(axis=1).mean())), 1e-12)
    xy = embedding_map_2d(np.concatenate([pts_img, pts_cap]), method, seed)
    xy_img, xy_cap = xy[:len(keep)], xy[len(keep):]
    if ax is None:
        fig, ax = plt.subplots(figsize=(6.4, 5.2))
    else:
        fig = ax.figure
    if lab is None:
        ax.scatter(xy_cap[:, 0], xy_cap[:, 1], marker="x", s=12, alpha=0.5, label="captions",
                   color=MODEL_COLOURS["caption queries"])
        ax.scatter(xy_img[:, 0], xy_img[:, 1], marker="o", s=22, label="images",
                   color=MODEL_COLOURS["image queries"], edgecolor="white", linewidth=0.4)
        ax.legend(fontsize=8, loc="best")
    else:
        names = sorted(dict.fromkeys(lab[keep].tolist()), key=str)
        if all(isinstance(n, str) and mcolors.is_color_like(n) for n in names):
            palette = colour_word_palette(names)    # "red" drawn red
        else:
            palette = dict(zip(names, sns.color_palette("tab10" if len(names) <= 10 else "husl", len(names))))
        cap_lab = np.repeat(lab[keep], k)
        for name in names:
            ax.scatter(*xy_cap[cap_lab == name].T, marker="x", s=12, alpha=0.5, color=palette[name])
            ax.scatter(*xy_img[lab[keep] == name].T, marker="o", s=22, color=palette[name],
                       edgecolor="white", linewidth=0.4, label=str(name))
        legend_outside(ax, title=f"{label_name}\n(dots images, x captions)",
                       ncol=1 + len(names) // 12)
    position = {int(i): j for j, i in enumerate(keep)}
    if linked is None:
        chosen = keep[np.unique(np.linspace(0, len(keep) - 1, min(n_linked, len(keep))).round().astype(int))] \
            if n_linked > 0 else []
    else:
        missing = [int(i) for i in linked if int(i) not in position]
        if missing:
            raise DataError(None, f"linked images {missing} are not drawn (out of range or dropped "
                                  f"by max_images)")
        chosen = [int(i) for i in linked]
    segments = [[xy_img[position[int(i)]], xy_cap[position[int(i)] * k + c]]
                for i in chosen for c in range(k)]
    if segments:
        ax.add_collection(LineCollection(segments, colors="black", linewidths=0.7, alpha=0.6,
                                         gid="links"))
    ax.set(title=f"joint embedding space ({method.upper()}, {len(keep)} images"
                 f"{', modalities centred and scaled' if centre else ''})", xticks=[], yticks=[])
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------------
# retrieval galleries
# ---------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=512)
def _thumbnail_cached(path: str, size: int, mtime: float) -> np.ndarray:
    from PIL import Image
    with Image.open(path) as img:
        img = img.convert("RGB")
        img.thumbnail((size, size))
        return np.asarray(img).astype(np.float64) / 255.0


def load_thumbnail(dataset: Any, index: int, size: int = _THUMB_SIZE) -> Optional[np.ndarray]:
    """Image ``index`` of ``dataset`` as an ``(h, w, 3)`` float array at most ``size`` pixels wide,
    or None when the dataset lists no image files (or the file is gone)."""
    paths = getattr(dataset, "image_paths", None)
    if not paths:
        return None
    path = Path(paths[int(index)])
    try:
        return _thumbnail_cached(str(path), int(size), path.stat().st_mtime)
    except OSError:
        return None


def _bare_axis(ax: plt.Axes, title: Optional[str] = None) -> None:
    """A picture axis: no ticks, no grid, an optional small title."""
    ax.set_xticks([])
    ax.set_yticks([])
    ax.grid(False)
    if title:
        ax.set_title(title, fontsize=10)


def _show_thumbnail(ax: plt.Axes, dataset: Any, index: int) -> None:
    thumb = load_thumbnail(dataset, index)
    if thumb is None:
        ax.imshow(np.full((64, 64, 3), _PLACEHOLDER_GREY), extent=(0, 1, 1, 0))
        ax.text(0.5, 0.5, f"image\n{index}", ha="center", va="center", fontsize=9, color="0.3",
                transform=ax.transAxes)
    else:
        ax.imshow(thumb)
    _bare_axis(ax)


def _frame(ax: plt.Axes, colour: str, width: float, gid: str) -> None:
    ax.add_patch(Rectangle((0, 0), 1, 1, transform=ax.transAxes, fill=False, edgecolor=colour,
                           linewidth=width, clip_on=False, gid=gid))


def _check_gallery_sims(sims: Any, dataset: Any) -> tuple[np.ndarray, int]:
    S = _numpy(sims, "sims")
    if S.ndim != 2:
        raise DataError(None, f"sims must be (N_img, N_cap), got shape {S.shape}")
    k = _captions_per_image(S.shape)
    captions = getattr(dataset, "captions", None)
    if captions is not None and len(captions) != S.shape[1]:
        raise DataError(None, f"sims has {S.shape[1]} captions but the dataset {len(captions)}")
    return S, k


def _caption_text(dataset: Any, c: int) -> str:
    captions = getattr(dataset, "captions", None)
    return captions[c] if captions is not None else f"caption {c}"


def _ranked(scores: np.ndarray) -> np.ndarray:
    """Indices by descending score, ties by index (the evaluation's tie rule)."""
    return np.argsort(-scores, kind="stable")


def plot_retrieval_gallery(sims: Any, dataset: Any, queries: Sequence[int], k: int = 5,
                           direction: str = "i2t", wrap: int = 70) -> plt.Figure:
    """Top-k results of some queries with the ground truth marked.

    - ``"i2t"``: one row per query image: its thumbnail, then its top-k captions, ground truth in
      green and the rest in red; when no ground-truth caption made the top k, a last grey line
      gives the best one and its rank.
    - ``"t2i"``: one row per query caption: the caption, then its top-k images (thumbnails from
      ``dataset.image_paths``, else a grey tile with the index), the ground-truth image framed in
      green, the others in red.

    Retrieved items carry ``gid = "candidate:<index>"`` (caption texts, image frames).

    Args:
        sims: ``(N_img, N_cap)`` similarities, rows = images.
        dataset: anything with ``captions`` (list of ``N_cap`` strings) and optionally
            ``image_paths`` (e.g. :class:`userlab.data.precomp.PrecompDataset`).
        queries: image indices (i2t) or caption indices (t2i).
        k: results per query.
        direction: ``"i2t"`` or ``"t2i"``.
        wrap: characters per caption line.
    """
    _style()
    if direction not in ("i2t", "t2i"):
        raise ConfigError("direction", f"{direction!r} is not one of i2t, t2i")
    S, per_image = _check_gallery_sims(sims, dataset)
    queries = [int(q) for q in queries]
    if not queries:
        raise ConfigError("queries", "give at least one query index")
    limit = S.shape[0] if direction == "i2t" else S.shape[1]
    bad = [q for q in queries if not 0 <= q < limit]
    if bad:
        raise DataError(None, f"query indices {bad} are outside 0..{limit - 1}")
    k = max(1, min(int(k), S.shape[1] if direction == "i2t" else S.shape[0]))
    n = len(queries)
    if direction == "i2t":
        fig, axes = plt.subplots(n, 2, figsize=(10, 0.42 * (k + 2) * n + 0.3), squeeze=False,
                                 gridspec_kw={"width_ratios": [1, 4]})
        for row, i in enumerate(queries):
            ax_img, ax_txt = axes[row]
            _show_thumbnail(ax_img, dataset, i)
            order = _ranked(S[i])
            gt_ranks = np.flatnonzero(order // per_image == i)
            best = int(gt_ranks[0])
            ax_img.set_title(f"image {i}", fontsize=9)
            ax_txt.axis("off")
            ax_txt.set_title(f"image {i}: top-{k} captions, ground truth at rank {best + 1}",
                             fontsize=9, loc="left")
            lines = k + (1 if best >= k else 0)
            for j, c in enumerate(order[:k]):
                hit = c // per_image == i
                ax_txt.text(0.0, 1.0 - (j + 0.5) / lines, f"{j + 1}. ({S[i, c]:.2f}) "
                            + textwrap.shorten(_caption_text(dataset, int(c)), wrap),
                            color=HIT_COLOUR if hit else MISS_COLOUR, fontsize=8.5, va="center",
                            transform=ax_txt.transAxes, gid=f"candidate:{int(c)}",
                            fontweight="bold" if hit else "normal")
            if best >= k:
                c = int(order[best])
                ax_txt.text(0.0, 1.0 - (k + 0.5) / lines, f"{best + 1}. ({S[i, c]:.2f}) "
                            + textwrap.shorten(_caption_text(dataset, c), wrap) + "  [ground truth]",
                            color="0.35", fontsize=8.5, va="center", style="italic",
                            transform=ax_txt.transAxes, gid=f"ground_truth:{c}")
    else:
        fig, axes = plt.subplots(n, k + 1, figsize=(2.6 + 1.6 * k, 1.95 * n + 0.3), squeeze=False,
                                 gridspec_kw={"width_ratios": [1.6] + [1] * k})
        for row, c in enumerate(queries):
            ax_txt = axes[row][0]
            ax_txt.axis("off")
            gt = c // per_image
            order = _ranked(S[:, c])
            rank = int(np.flatnonzero(order == gt)[0])
            ax_txt.text(0.0, 0.5, _wrap(_caption_text(dataset, c), 26)
                        + f"\n\ncaption {c}\nground truth: image {gt}\nat rank {rank + 1}",
                        fontsize=8.5, va="center", transform=ax_txt.transAxes)
            for j, i in enumerate(order[:k]):
                ax = axes[row][j + 1]
                _show_thumbnail(ax, dataset, int(i))
                hit = int(i) == gt
                _frame(ax, HIT_COLOUR if hit else MISS_COLOUR, 4.0 if hit else 1.5,
                       f"candidate:{int(i)}")
                ax.set_title(f"#{j + 1} img {int(i)} ({S[i, c]:.2f})", fontsize=8,
                             color=HIT_COLOUR if hit else "black")
    fig.tight_layout()
    return fig


def plot_query_results(scores: Any, dataset: Any, query: str, k: int = 5,
                       ground_truth: Optional[int] = None, note: str = "") -> plt.Figure:
    """Top-k images for a free-text query scored against every image.

    Args:
        scores: ``(N_img,)`` query-image scores.
        dataset: see :func:`plot_retrieval_gallery` (``image_paths`` for thumbnails).
        query: the query text (shown on the left).
        k: images shown.
        ground_truth: image index to frame green (others red); None frames everything grey.
        note: an extra line under the query (e.g. unknown words).
    """
    _style()
    s = _numpy(scores, "scores").reshape(-1)
    k = max(1, min(int(k), len(s)))
    order = _ranked(s)
    fig, axes = plt.subplots(1, k + 1, figsize=(2.6 + 1.6 * k, 2.2), squeeze=False,
                             gridspec_kw={"width_ratios": [1.6] + [1] * k})
    ax_txt = axes[0][0]
    ax_txt.axis("off")
    ax_txt.text(0.0, 0.5, _wrap(f"“{query}”", 26) + (f"\n\n{_wrap(note, 30)}" if note else ""),
                fontsize=8.5, va="center", transform=ax_txt.transAxes)
    for j, i in enumerate(order[:k]):
        ax = axes[0][j + 1]
        _show_thumbnail(ax, dataset, int(i))
        if ground_truth is None:
            colour, width = "0.5", 1.0
        else:
            hit = int(i) == int(ground_truth)
            colour, width = (HIT_COLOUR, 4.0) if hit else (MISS_COLOUR, 1.5)
        _frame(ax, colour, width, f"candidate:{int(i)}")
        ax.set_title(f"#{j + 1} img {int(i)} ({s[i]:.2f})", fontsize=8)
    fig.tight_layout()
    return fig


def plot_worst_failures(sims: Any, dataset: Any, n: int = 6, direction: str = "i2t",
                        k: int = 5) -> plt.Figure:
    """The ``n`` queries whose ground truth ranks worst, as a retrieval gallery.

    Ranks come from :func:`userlab.evaluate.retrieval_ranks` (same tie rule as the metrics); ties
    between equally bad queries go to the lower index.

    Args:
        sims: ``(N_img, N_cap)`` similarities.
        dataset: see :func:`plot_retrieval_gallery`.
        n: number of queries.
        direction: ``"i2t"`` (worst images) or ``"t2i"`` (worst captions).
        k: results per query.
    """
    from .evaluate import retrieval_ranks
    if direction not in ("i2t", "t2i"):
        raise ConfigError("direction", f"{direction!r} is not one of i2t, t2i")
    S, per_image = _check_gallery_sims(sims, dataset)
    i2t, t2i = retrieval_ranks(S, per_image)
    ranks = (i2t if direction == "i2t" else t2i).cpu().numpy()
    worst = np.argsort(-ranks, kind="stable")[:max(1, int(n))]
    fig = plot_retrieval_gallery(S, dataset, worst.tolist(), k=k, direction=direction)
    fig.suptitle(f"worst {len(worst)} {'image' if direction == 'i2t' else 'caption'} queries "
                 f"(ranks {', '.join(str(int(ranks[q]) + 1) for q in worst)})", fontsize=10)
    fig.tight_layout()
    return fig

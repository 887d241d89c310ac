"""Interactive browsers for notebooks: thin ipywidgets wrappers over :mod:`userlab.viz`.

Every browser exposes

- ``controls``: dict of control name -> widget (set ``controls["image"].value = 3`` to drive it
  from code; the figure is redrawn at once, synchronously, no kernel round trip needed);
- ``widget``: the container to display (a browser also displays itself as the last expression
  of a cell);
- ``figure``: the latest matplotlib Figure drawn by the callback (already closed in pyplot, so
  notebooks do not show it twice and figures do not pile up; still inspectable).

Figures are rendered to PNG into an ``ipywidgets.Image``, which works in JupyterLab, classic
notebooks and VS Code without any matplotlib backend magic. How they behave in JupyterLab:

- **fixed sizes**: the PNG is rendered at twice the display resolution and shown at its own
  size in CSS pixels (``width`` set, height following the aspect ratio, never stretched by the
  flex box around it; narrower than the output area only if the area is narrower), so it is
  sharp on high-DPI screens and never blurred by rescaling;
- **no redraw per slider tick**: sliders have ``continuous_update=False`` (dragging the
  5000-caption slider redraws once, on release; arrow keys step one at a time), and a redraw
  whose controls did not change is skipped;
- **errors stay in the widget**: any exception raised while drawing (a userlab error or not) is
  shown in the browser's status line with its type and message, and the traceback in a fold-out
  below it (:attr:`_FigureBrowser.error` keeps it), instead of going to JupyterLab's log console.

- :class:`RetrievalBrowser`: pick an image (top-k captions) or a caption (top-k images), or type
  a caption: unknown words are flagged and, with an ``encode_caption`` callback, the typed
  caption is scored against every image.
- :class:`AttentionExplorer`: slide over images, toggle between attention maps (SGE / CGE /
  none checkpoints) or show them side by side.
- :class:`MarginExplorer`: slide over epochs of margin records, judged by the threshold of the
  objective the model was trained with (:func:`userlab.viz.objective_threshold`).
- :func:`make_caption_encoder`: the ``encode_caption`` callback for a trained model.
"""
from __future__ import annotations

import html
import io
import traceback
from typing import Any, Callable, Mapping, Optional, Sequence

import ipywidgets as widgets
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from . import viz
from .errors import ConfigError, DataError, UserlabError

__all__ = ["RetrievalBrowser", "AttentionExplorer", "MarginExplorer", "make_caption_encoder"]

_DPI = 90          # display resolution: one inch of figure = 90 CSS pixels
_PIXEL_RATIO = 2   # the PNG carries twice that many pixels, for high-DPI screens


def _png_size(data: bytes) -> tuple[int, int]:
    """``(width, height)`` in pixels from a PNG's IHDR chunk."""
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def slider(kind: type, **kwargs: Any) -> widgets.Widget:
    """A slider that tells the kernel its value on release only (``continuous_update=False``)."""
    return kind(continuous_update=False, **kwargs)


class _FigureBrowser:
    """Shared plumbing: a status line, a PNG view of the latest figure, and ``update``.

    Args:
        render: draw each new figure to PNG for display (False skips the PNG, e.g. in tests
            that only inspect ``figure``).

    Attributes:
        error: the exception of the last failed redraw (None after a successful one).
        draws: how many figures were drawn (a skipped redraw does not count).
    """

    def __init__(self, render: bool = True):
        self.render = render
        self.controls: dict[str, widgets.Widget] = {}
        self.figure: Optional[plt.Figure] = None
        self.error: Optional[BaseException] = None
        self.draws = 0
        self.status = widgets.HTML(value="")
        self.details = widgets.HTML(value="")   # traceback of the last error, folded
        # align_self keeps the column's flex box from stretching the picture to its width
        self._view = widgets.Image(format="png", layout=widgets.Layout(
            max_width="100%", height="auto", align_self="flex-start", object_fit="contain"))
        self._busy = False  # set while a callback changes another control programmatically
        self._drawn_state: Optional[tuple] = None
        self.widget: widgets.Widget = widgets.VBox([])

    def _assemble(self, rows: Sequence[widgets.Widget]) -> None:
        self.widget = widgets.VBox(list(rows) + [self.status, self.details, self._view])

    def _show(self, fig: plt.Figure) -> None:
        if self.render:
            buf = io.BytesIO()
            fig.savefig(buf, format="png", dpi=_DPI * _PIXEL_RATIO, bbox_inches="tight")
            data = buf.getvalue()
            width, _ = _png_size(data)
            self._view.value = data
            self._view.layout.width = f"{width // _PIXEL_RATIO}px"   # its own size, in CSS pixels
        plt.close(fig)  # the PNG (or the attribute) keeps it; pyplot must not
        self.figure = fig
        self.draws += 1

    def _draw(self) -> plt.Figure:  # pragma: no cover - abstract
        raise NotImplementedError

    def _state(self) -> tuple:
        """The control values a figure depends on (equal state: no redraw needed)."""
        return tuple((name, repr(c.value)) for name, c in sorted(self.controls.items()))

    def _show_error(self, err: BaseException) -> None:
        self.error = err
        kind = "" if isinstance(err, UserlabError) else f"{type(err).__name__}: "
        self.status.value = (f"<span style='color:{viz.MISS_COLOUR}'>{html.escape(kind + str(err))}"
                             f"</span>")
        trace = "".join(traceback.format_exception(type(err), err, err.__traceback__))
        self.details.value = ("" if isinstance(err, UserlabError) else
                              "<details><summary>traceback</summary><pre style='font-size:11px'>"
                              f"{html.escape(trace)}</pre></details>")

    def update(self, *_: Any) -> Optional[plt.Figure]:
        """Redraw from the current control values; returns the new figure.

        Nothing is redrawn when the controls hold the values of the figure on show. An error
        (a userlab error such as a bad index, or any other exception) is shown in the status
        line, with the traceback in a fold-out for non-userlab errors, instead of raising inside
        the widget callback, where JupyterLab would only log it.
        """
        if self._busy:
            return self.figure
        state = self._state()
        if state == self._drawn_state and self.error is None and self.figure is not None:
            return self.figure
        open_before = set(plt.get_fignums())
        try:
            fig = self._draw()
            self._show(fig)
        except Exception as err:  # noqa: BLE001 - every error belongs in the widget, not the log
            for number in set(plt.get_fignums()) - open_before:
                plt.close(number)            # a figure the failed draw left half-made
            self._show_error(err)
            return self.figure
        self.error = None
        self.details.value = ""
        self._drawn_state = state
        return fig

    def _set_quietly(self, name: str, value: Any) -> None:
        """Set a control without triggering a redraw (the caller redraws once)."""
        self._busy = True
        try:
            self.controls[name].value = value
        finally:
            self._busy = False

    def _repr_mimebundle_(self, **kwargs: Any):
        return self.widget._repr_mimebundle_(**kwargs)


# ---------------------------------------------------------------------------------------------
# retrieval
# ---------------------------------------------------------------------------------------------
def _tokenize(text: str) -> list[str]:
    from .data.text import tokenize_words
    return tokenize_words(text)


class RetrievalBrowser(_FigureBrowser):
    """Browse retrieval results of a similarity matrix, or type a caption.

    Modes (control ``mode``): ``"i2t"`` shows the top-k captions of image ``controls["image"]``;
    ``"t2i"`` the top-k images of caption ``controls["caption"]``; ``"text"`` the caption typed in
    ``controls["text"]``. Moving a control switches to its mode.

    Typed captions are split with :func:`userlab.data.text.tokenize_words`; words missing from
    ``vocab`` are listed in the status line, in the figure, and in :attr:`unknown_words` (they
    become ``<unk>`` for a word-vocabulary model). With ``encode_caption`` the caption is embedded
    and scored against ``image_embeddings``; a typed caption equal to a dataset caption gets its
    image framed as ground truth.

    Args:
        sims: ``(N_img, N_cap)`` similarities, rows = images.
        dataset: ``captions`` and optionally ``image_paths`` (a PrecompDataset works).
        vocab: word vocabulary (anything supporting ``word in vocab``), or None.
        encode_caption: ``text -> (E,)`` caption embedding (see :func:`make_caption_encoder`).
        image_embeddings: ``(N_img, E)`` image embeddings; needed with ``encode_caption``.
        k: initial number of results.
        render: see :class:`_FigureBrowser`.

    Attributes:
        unknown_words: words of the last typed caption not in ``vocab``.
        scores: ``(N_img,)`` scores of the last typed caption (None before one was scored).
    """

    def __init__(self, sims: Any, dataset: Any, vocab: Any = None,
                 encode_caption: Optional[Callable[[str], Any]] = None,
                 image_embeddings: Any = None, k: int = 5, render: bool = True):
        super().__init__(render)
        self.sims = viz._numpy(sims, "sims")
        if self.sims.ndim != 2:
            raise DataError(None, f"sims must be (N_img, N_cap), got shape {self.sims.shape}")
        self.per_image = viz._captions_per_image(self.sims.shape)
        captions = getattr(dataset, "captions", None)
        if captions is not None and len(captions) != self.sims.shape[1]:
            raise DataError(None, f"sims has {self.sims.shape[1]} captions, the dataset {len(captions)}")
        if encode_caption is not None and image_embeddings is None:
            raise ConfigError("image_embeddings", "encode_caption needs the (N_img, E) image "
                                                  "embeddings to score a typed caption against")
        self.dataset = dataset
        self.vocab = vocab
        self.encode_caption = encode_caption
        self.image_embeddings = (None if image_embeddings is None
                                 else viz._numpy(image_embeddings, "image_embeddings"))
        if self.image_embeddings is not None and self.image_embeddings.shape[0] != self.sims.shape[0]:
            raise DataError(None, f"{self.image_embeddings.shape[0]} image embeddings for "
                                  f"{self.sims.shape[0]} images")
        self._caption_lookup = ({c.strip().casefold(): i for i, c in enumerate(captions)}
                                if captions is not None else {})
        self.unknown_words: list[str] = []
        self.scores: Optional[np.ndarray] = None
        n_img, n_cap = self.sims.shape
        self.controls = {
            "mode": widgets.ToggleButtons(options=[("image → captions", "i2t"),
                                                   ("caption → images", "t2i"),
                                                   ("typed caption", "text")], value="i2t"),
            "image": slider(widgets.IntSlider, value=0, min=0, max=n_img - 1, description="image"),
            "caption": slider(widgets.IntSlider, value=0, min=0, max=n_cap - 1, description="caption"),
            "text": widgets.Text(value="", placeholder="type a caption and press enter",
                                 description="caption", continuous_update=False,
                                 layout=widgets.Layout(width="60%")),
            "k": slider(widgets.IntSlider, value=max(1, min(int(k), 10, n_img)), min=1,
                        max=max(1, min(10, n_img)), description="top k"),
        }
        # 5000 captions are too many to pick by dragging: a number box, linked to the slider
        self.caption_box = widgets.BoundedIntText(value=0, min=0, max=n_cap - 1, continuous_update=False,
                                                  layout=widgets.Layout(width="90px"))
        widgets.link((self.controls["caption"], "value"), (self.caption_box, "value"))
        self.controls["mode"].observe(self.update, names="value")
        self.controls["k"].observe(self.update, names="value")
        for name, mode in (("image", "i2t"), ("caption", "t2i"), ("text", "text")):
            self.controls[name].observe(self._switcher(mode), names="value")
        c = self.controls
        self._assemble([c["mode"], widgets.HBox([c["image"], c["caption"], self.caption_box, c["k"]]),
                        c["text"]])
        self.update()

    def _switcher(self, mode: str) -> Callable[[Any], None]:
        def on_change(_: Any) -> None:
            if self.controls["mode"].value != mode:
                self._set_quietly("mode", mode)
            self.update()
        return on_change

    def flag_unknown(self, text: str) -> list[str]:
        """Words of ``text`` that are not in the vocabulary (empty without a vocabulary)."""
        if self.vocab is None:
            return []
        return [w for w in _tokenize(text) if w not in self.vocab]

    def _text_status(self, text: str, unknown: list[str]) -> str:
        words = []
        for w in _tokenize(text):
            words.append(f"<b style='color:{viz.MISS_COLOUR}'>{html.escape(w)}?</b>" if w in unknown
                         else html.escape(w))
        msg = " ".join(words)
        if unknown:
            msg += (f" &nbsp; <span style='color:{viz.MISS_COLOUR}'>not in the vocabulary: "
                    f"{html.escape(', '.join(unknown))}</span>")
        return msg

    def _draw(self) -> plt.Figure:
        c = self.controls
        mode, k = c["mode"].value, c["k"].value
        if mode == "i2t":
            self.status.value = f"image {c['image'].value}: top-{k} captions"
            return viz.plot_retrieval_gallery(self.sims, self.dataset, [c["image"].value], k=k,
                                              direction="i2t")
        if mode == "t2i":
            self.status.value = f"caption {c['caption'].value}: top-{k} images"
            return viz.plot_retrieval_gallery(self.sims, self.dataset, [c["caption"].value], k=k,
                                              direction="t2i")
        text = c["text"].value.strip()
        self.unknown_words = self.flag_unknown(text)
        note = f"unknown words: {', '.join(self.unknown_words)}" if self.unknown_words else ""
        self.status.value = self._text_status(text, self.unknown_words) if text else "type a caption"
        if not text or self.encode_caption is None:
            self.scores = None
            reason = ("type a caption" if not text else
                      "no caption encoder given: pass encode_caption=make_caption_encoder(model, "
                      "tokenizer) and image_embeddings to score typed captions")
            return _message_figure(f"“{text}”" if text else "", reason, note)
        query = viz._numpy(self.encode_caption(text), "encoded caption").reshape(-1)
        if query.shape[0] != self.image_embeddings.shape[1]:
            raise DataError(None, f"encode_caption returned {query.shape[0]} values; the image "
                                  f"embeddings are {self.image_embeddings.shape[1]}-d")
        self.scores = self.image_embeddings @ query
        match = self._caption_lookup.get(text.casefold())
        gt = None if match is None else match // self.per_image
        return viz.plot_query_results(self.scores, self.dataset, text, k=k, ground_truth=gt,
                                      note=note)


def _message_figure(title: str, message: str, note: str = "") -> plt.Figure:
    fig, ax = plt.subplots(figsize=(7, 1.6))
    ax.axis("off")
    ax.text(0.0, 0.75, title, fontsize=10, transform=ax.transAxes, va="center")
    ax.text(0.0, 0.4, message, fontsize=9, color="0.35", transform=ax.transAxes, va="center", wrap=True)
    if note:
        ax.text(0.0, 0.1, note, fontsize=9, color=viz.MISS_COLOUR, transform=ax.transAxes,
                va="center", gid="unknown_words")
    return fig


def make_caption_encoder(model: Any, tokenizer: Callable[..., Any],
                         device: Any = None) -> Callable[[str], np.ndarray]:
    """``encode_caption`` for :class:`RetrievalBrowser` from a model and its tokenizer.

    Args:
        model: has ``encode_text(batch) -> TextOutput`` (RetrievalModel, DualEncoder).
        tokenizer: ``tokenizer(caption, train=False) -> LongTensor (L,)`` (WordTokenizer,
            HFTokenizer).
        device: where to run (default: the model's parameters' device).

    Returns:
        ``text -> (E,)`` float array. The model runs in eval mode under inference mode; each
        submodule's train/eval flag is restored afterwards.
    """
    import torch

    def encode(text: str) -> np.ndarray:
        ids = torch.as_tensor(tokenizer(text, train=False), dtype=torch.long).reshape(1, -1)
        where = device
        if where is None:
            first = next(iter(model.parameters()), None)
            where = first.device if first is not None else "cpu"
        ids = ids.to(where)
        batch = {"tokens": ids, "lengths": torch.tensor([ids.shape[1]], device=ids.device),
                 "attention_mask": torch.ones_like(ids)}
        modes = [(m, m.training) for m in model.modules()]
        model.eval()
        try:
            with torch.inference_mode():
                emb = model.encode_text(batch).embedding[0]
        finally:
            for module, training in modes:
                module.training = training
        return emb.float().cpu().numpy()

    return encode


# ---------------------------------------------------------------------------------------------
# attention
# ---------------------------------------------------------------------------------------------
ALL = "all (side by side)"


class AttentionExplorer(_FigureBrowser):
    """Slide over images and toggle between attention maps of several checkpoints.

    Args:
        images: ``N`` images (arrays, PIL images, paths or None), or a dataset with
            ``image_paths``; None everywhere draws grey canvases.
        boxes: ``(N, R, 4)`` region boxes in pixels, or None for grid features (give ``grid``).
        attention: name -> ``(N, R)`` weights (e.g. ``{"SGE": beta_sge, "CGE": beta_cge,
            "none": None}``); None for a checkpoint without enhancement.
        grid: ``(h, w)`` for grid features (``R = h*w``) drawn as heat maps.
        render: see :class:`_FigureBrowser`.
    """

    def __init__(self, images: Any, boxes: Any, attention: Mapping[str, Any],
                 grid: Optional[tuple[int, int]] = None, render: bool = True):
        super().__init__(render)
        if not attention:
            raise ConfigError("attention", "needs at least one named attention map")
        self.attention = {name: None if w is None else viz._numpy(w, f"attention[{name!r}]")
                          for name, w in attention.items()}
        sizes = {name: w.shape for name, w in self.attention.items() if w is not None}
        if boxes is None and grid is None:
            raise ConfigError("grid", "give region boxes (N, R, 4) or the feature grid (h, w)")
        self.boxes = None if boxes is None else viz._numpy(boxes, "boxes")
        self.grid = None if grid is None else (int(grid[0]), int(grid[1]))
        paths = getattr(images, "image_paths", None)
        self.images = list(paths) if paths is not None else (None if images is None else list(images))
        n = (self.boxes.shape[0] if self.boxes is not None
             else len(self.images) if self.images is not None
             else next(iter(sizes.values()))[0] if sizes else 0)
        if n == 0:
            raise DataError(None, "no images to explore")
        r = self.boxes.shape[1] if self.boxes is not None else self.grid[0] * self.grid[1]
        for name, shape in sizes.items():
            if len(shape) != 2 or shape != (n, r):
                raise DataError(None, f"attention[{name!r}] has shape {shape}; expected ({n}, {r}) "
                                      f"(images, regions)")
        if self.boxes is not None and (self.boxes.ndim != 3 or self.boxes.shape[2] != 4):
            raise DataError(None, f"boxes must be (N, R, 4), got shape {self.boxes.shape}")
        if self.images is not None and len(self.images) != n:
            raise DataError(None, f"{len(self.images)} images for {n} sets of boxes / weights")
        self.n_images = n
        names = list(self.attention)
        self.controls = {
            "image": slider(widgets.IntSlider, value=0, min=0, max=n - 1, description="image"),
            "name": widgets.ToggleButtons(options=names + ([ALL] if len(names) > 1 else []),
                                          value=names[0]),
        }
        for control in self.controls.values():
            control.observe(self.update, names="value")
        self._assemble([widgets.HBox([self.controls["image"]]), self.controls["name"]])
        self.update()

    def _image(self, i: int) -> Any:
        return None if self.images is None else self.images[i]

    def _panel(self, image: Any, i: int, name: str, ax: Optional[plt.Axes]) -> plt.Figure:
        w = self.attention[name]
        weights = None if w is None else w[i]
        title = f"image {i}: {name}" + ("" if w is not None else " (no attention)")
        if self.boxes is not None:
            return viz.plot_region_attention(image, self.boxes[i], weights, title=title, ax=ax)
        if weights is None:
            fig = ax.figure if ax is not None else plt.subplots(figsize=(4.2, 4.2))[0]
            target = ax if ax is not None else fig.axes[0]
            img = viz._as_image(image)
            target.imshow(img if img is not None else np.full((32, 32, 3), 0.86))
            target.set(title=title, xticks=[], yticks=[])
            return fig
        return viz.plot_grid_attention(image, weights, self.grid, title=title, ax=ax)

    def _draw(self) -> plt.Figure:
        i, name = self.controls["image"].value, self.controls["name"].value
        image = viz._as_image(self._image(i))  # read the file once for every panel
        if name != ALL:
            self.status.value = f"image {i}, {name}"
            return self._panel(image, i, name, None)
        self.status.value = f"image {i}, every map"
        if self.boxes is not None:
            return viz.plot_attention_comparison(
                image, self.boxes[i], {n: None if w is None else w[i] for n, w in self.attention.items()},
                title=f"image {i}")
        fig, axes = plt.subplots(1, len(self.attention), figsize=(4.0 * len(self.attention), 3.8),
                                 squeeze=False)
        for ax, n in zip(axes[0], self.attention):
            self._panel(image, i, n, ax)
        fig.tight_layout()
        return fig


# ---------------------------------------------------------------------------------------------
# margins
# ---------------------------------------------------------------------------------------------
_OBJECTIVE_WORDS = {
    "uto": "USER's unified objective pushes a negative down while its similarity exceeds γ: a "
           "query violates while its hardest negative is above γ",
    "triplet": "the triplet objective (VSE++ / DBL) keeps a query's hinge active while its margin "
               "(positive − hardest negative) is below the triplet margin",
}


class MarginExplorer(_FigureBrowser):
    """Slide over the epochs of margin records (see :func:`userlab.viz.margin_records`), judged
    by the threshold of the objective the model was trained with.

    The threshold is :func:`userlab.viz.objective_threshold` of the model's config: USER (unified
    objective) violates while a query's hardest negative similarity exceeds γ (0.5 in the
    presets), VSE++ / DBL (triplet) while its margin is below the triplet margin (0.2). The line
    above the controls names it. The ``threshold`` slider moves the value, the rule stays.

    Controls: ``epoch`` (a selection slider over the epochs present) and ``threshold`` (described
    as γ for the unified objective, margin for the triplet one).

    Args:
        records: DataFrame with ``epoch``, ``margin``, ``hardest_negative`` (one row per query)
            and optionally ``model`` / ``branch``.
        threshold: ``viz.objective_threshold(cfg)`` of the trained model(s), the config itself
            (anything with a ``loss`` section), or a float ``t`` (the plain rule ``margin < t``).
        render: see :class:`_FigureBrowser`.
    """

    def __init__(self, records: pd.DataFrame, threshold: "viz.ObjectiveThreshold | float | Any",
                 render: bool = True):
        super().__init__(render)
        self.trained = (viz.objective_threshold(threshold) if hasattr(threshold, "loss")
                        else viz.as_threshold(threshold))
        needed = {"epoch", "margin", self.trained.column}
        if not needed <= set(records.columns):
            raise DataError(None, f"margin records need columns {', '.join(sorted(needed))} "
                                  "(build them with userlab.viz.margin_records)")
        self.records = records
        epochs = sorted(records["epoch"].unique().tolist())
        if not epochs:
            raise DataError(None, "margin records are empty")
        name = {"uto": "γ", "triplet": "margin"}.get(self.trained.objective, "threshold")
        self.objective = widgets.HTML(value=self._objective_text(self.trained))
        self.controls = {
            "epoch": slider(widgets.SelectionSlider, options=epochs, value=epochs[0], description="epoch"),
            "threshold": slider(widgets.FloatSlider, value=self.trained.value, min=-1.0, max=1.0, step=0.05,
                                description=name),
        }
        for control in self.controls.values():
            control.observe(self.update, names="value")
        self._assemble([self.objective, widgets.HBox(list(self.controls.values()))])
        self.update()

    def _objective_text(self, rule: "viz.ObjectiveThreshold") -> str:
        why = _OBJECTIVE_WORDS.get(rule.objective, "")
        moved = ("" if abs(rule.value - self.trained.value) < 1e-9   # a slider may send back 0.35000000000000003
                 else f" (trained with {self.trained.value:g})")
        return html.escape(f"threshold of the training objective: {rule.label}{moved}; violation: "
                           f"{rule.rule}" + (f". {why}." if why else ""))

    @property
    def threshold(self) -> "viz.ObjectiveThreshold":
        """The rule at the slider's value."""
        return self.trained.with_value(self.controls["threshold"].value)

    def _draw(self) -> plt.Figure:
        epoch, rule = self.controls["epoch"].value, self.threshold
        rates = viz.violation_table(self.records[self.records["epoch"] == epoch], rule)
        self.objective.value = self._objective_text(rule)
        self.status.value = html.escape(f"epoch {epoch}: {rule.rule} for "
                                        f"{100 * rates['violation_rate'].mean():.1f}% of queries")
        return viz.plot_margin_epoch(self.records, epoch, rule)

"""Image-text retrieval evaluation: ranks, Recall@K, the standard protocols, encoding a split.

The protocol follows SCAN / VSE++ as used by USER and DBL (method notes, section 5):

* ``sims`` is an ``(N_img, N_cap)`` similarity matrix, rows are images, and captions
  ``k*i .. k*i + k-1`` belong to image ``i`` (``k = captions_per_image``, 5 in F30K / COCO).
* **i2t**: the rank of image ``i`` is the 0-based position, in the descending sort of row ``i``,
  of its best-placed ground-truth caption.
* **t2i**: the rank of caption ``c`` is the position of image ``c // k`` in the descending sort
  of column ``c``.
* ``R@K = 100 * mean(rank < K)``, ``medr = floor(median(rank)) + 1``, ``meanr = mean(rank) + 1``,
  ``rsum`` = the six R@K summed (600 at most).

**Tie rule.** Ranks equal those of a *stable* descending argsort (``np.argsort(-row,
kind="stable")``): among equal scores the lower index comes first. So the rank of an entry
``p`` with score ``s`` is ``#{j : x_j > s} + #{j < p : x_j == s}``. For i2t the best-placed
positive is the positive with the highest score, the lowest column among equal ones.

**Vectorised counting.** Ranks are counted, not sorted: one pass over row chunks of ``sims``
serves both directions. The chunk kernels run in torch on the device of ``sims`` (GPU when
there), and in numpy for CPU data, whose comparison loops are several times faster than torch's
CPU kernels; both backends give identical ranks. Within a chunk of image rows
``[r0, r1)`` the columns split in three: for columns left of the chunk's own caption band every
competitor index is below the positive's (i2t) or above it (t2i), right of the band the
opposite, so one comparison (``>=`` or ``>``) per entry applies the tie rule; only the small
diagonal band ``(r1-r0, k*(r1-r0))`` needs an index mask. Memory stays at a few bytes per entry
of one chunk whatever the matrix size.

Protocols (:func:`evaluate_sims`): ``"f30k_1k"`` (1K images), ``"coco_5k"`` (5K images),
``"coco_1k_5fold"`` (5 folds of 1K images out of 5K, metrics averaged, rsum recomputed from the
averaged R@K, which equals the mean of the fold rsums; DBL's printed 5-fold rsum is wrong, see the
notes) and ``"full"`` (any size).
"""
from __future__ import annotations

import math
import os
import time
import warnings
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from .errors import ConfigError, DataError
from .io import atomic_save_npy

__all__ = [
    "PROTOCOLS", "RECALL_KS", "METRIC_COLUMNS",
    "i2t_ranks", "t2i_ranks", "retrieval_ranks", "recall_metrics",
    "evaluate_sims", "format_table",
    "move_batch", "encode_split", "similarity",
    "evaluate", "average_sims", "evaluate_ensemble", "save_sims", "load_sims",
]

RECALL_KS = (1, 5, 10)
#: protocol name -> number of images the similarity matrix must have (None: any)
PROTOCOLS: dict[str, int | None] = {"f30k_1k": 1000, "coco_5k": 5000, "coco_1k_5fold": 5000,
                                    "full": None}
_FOLDS = 5
_FOLD_IMAGES = 1000

#: metric names, in table order
METRIC_COLUMNS = tuple([f"{d}_{m}" for d in ("i2t", "t2i")
                        for m in [f"R@{k}" for k in RECALL_KS] + ["medr", "meanr"]] + ["rsum"])

# uint8 column counts cannot overflow for chunks of at most this many rows
_MAX_U8_ROWS = 255
# target number of matrix entries per chunk when chunk_size is not given (bounded memory)
_CHUNK_ENTRIES = 1 << 23
_GPU_CHUNK_ENTRIES = 1 << 26


# ---------------------------------------------------------------------------------------------
# Ranks
# ---------------------------------------------------------------------------------------------
def _as_tensor(sims: Any) -> torch.Tensor:
    """A 2-d float torch view of ``sims`` (numpy arrays are wrapped, not copied)."""
    if isinstance(sims, np.ndarray):
        with warnings.catch_warnings():
            # read-only arrays (e.g. memory-mapped .npy) are only ever read here
            warnings.simplefilter("ignore", UserWarning)
            sims = torch.from_numpy(sims)
    elif not isinstance(sims, torch.Tensor):
        sims = torch.as_tensor(np.asarray(sims))
    if sims.ndim != 2:
        raise DataError(None, f"similarity matrix must be 2-d (images, captions), got shape "
                              f"{tuple(sims.shape)}")
    if not sims.is_floating_point():
        sims = sims.double()
    return sims


def _check_layout(sims: torch.Tensor, captions_per_image: int) -> tuple[int, int]:
    if int(captions_per_image) != captions_per_image or captions_per_image < 1:
        raise ConfigError("captions_per_image", f"must be a positive integer, got "
                                                f"{captions_per_image!r}")
    n_img, n_cap = sims.shape
    if n_img == 0 or n_cap != captions_per_image * n_img:
        raise DataError(None, f"similarity matrix of shape {tuple(sims.shape)} does not fit "
                              f"{captions_per_image} captions per image: expected "
                              f"({n_img}, {captions_per_image * n_img}) (images, captions)")
    return n_img, n_cap


class _TorchOps:
    """Chunk kernels in torch: used for tensors on an accelerator (or on request)."""

    name = "torch"

    def __init__(self, device: torch.device):
        self.device = device

    def block(self, t: torch.Tensor):
        return t

    def arange(self, n: int):
        return torch.arange(n, device=self.device)

    def zeros(self, n: int):
        return torch.zeros(n, dtype=torch.long, device=self.device)

    def where(self, cond, a, b):
        return torch.where(cond, a, b)

    def row_max(self, x):
        return x.max(1).values

    def row_min(self, x):
        return x.amin(1)

    def count_rows(self, mask):
        """True entries per row of a bool ``(b, n)`` mask, int64 ``(b,)``."""
        return mask.sum(1)

    def count_columns(self, mask):
        """True entries per column of a bool ``(b, n)`` mask, int64 ``(n,)``."""
        if mask.shape[0] <= _MAX_U8_ROWS:
            # byte accumulators cannot overflow for <= 255 rows and are the fastest reduction
            return mask.view(torch.uint8).sum(0, dtype=torch.uint8).long()
        return mask.sum(0)

    def has_nan(self, t: torch.Tensor) -> bool:
        # a single reduction first: the sum is finite unless some entry is NaN or infinite
        return not bool(torch.isfinite(t.sum())) and bool(torch.isnan(t).any())

    def to_torch(self, x):
        return x


class _NumpyOps(_TorchOps):
    """Chunk kernels in numpy for CPU tensors.

    numpy's SIMD comparison and byte-sum loops are several times faster than torch's CPU
    kernels, and, being single-threaded, they do not stall when other processes share the cores.
    """

    name = "numpy"

    def __init__(self):
        super().__init__(torch.device("cpu"))

    def block(self, t: torch.Tensor):
        # float16 / bfloat16 compare slowly (or not at all) in numpy; the cast is exact
        if t.dtype not in (torch.float32, torch.float64):
            t = t.float()
        return t.detach().numpy()

    def arange(self, n: int):
        return np.arange(n)

    def zeros(self, n: int):
        return np.zeros(n, dtype=np.int64)

    def where(self, cond, a, b):
        return np.where(cond, a, b)

    def row_max(self, x):
        return x.max(1)

    def row_min(self, x):
        return x.min(1)

    def count_rows(self, mask):
        if mask.shape[1] < (1 << 31):
            return mask.view(np.uint8).sum(1, dtype=np.int32).astype(np.int64)
        return np.count_nonzero(mask, axis=1)

    def count_columns(self, mask):
        if mask.shape[0] <= _MAX_U8_ROWS:
            return mask.view(np.uint8).sum(0, dtype=np.uint8).astype(np.int64)
        return np.count_nonzero(mask, axis=0).astype(np.int64)

    def has_nan(self, t: torch.Tensor) -> bool:
        arr = self.block(t)
        with np.errstate(invalid="ignore", over="ignore"):   # inf - inf is fine here
            total = arr.sum()
        return not np.isfinite(total) and bool(np.isnan(arr).any())

    def to_torch(self, x):
        return torch.from_numpy(np.ascontiguousarray(x, dtype=np.int64))


def _ops_for(sims: torch.Tensor, backend: str) -> _TorchOps:
    if backend == "auto":
        backend = "numpy" if sims.device.type == "cpu" else "torch"
    if backend == "numpy":
        if sims.device.type != "cpu":
            raise ConfigError("backend", f"'numpy' needs the similarity matrix on the CPU, it is "
                                         f"on {sims.device}")
        return _NumpyOps()
    if backend == "torch":
        return _TorchOps(sims.device)
    raise ConfigError("backend", f"unknown backend {backend!r}; choose 'auto', 'torch' or 'numpy'")


def _default_chunk(n_cap: int, device: torch.device) -> int:
    if device.type == "cuda":
        # GPU kernels want big launches; a 64M-entry chunk costs ~200 MB of masks
        return max(1, _GPU_CHUNK_ENTRIES // n_cap)
    return max(1, min(_MAX_U8_ROWS, _CHUNK_ENTRIES // n_cap))


def retrieval_ranks(sims: Any, captions_per_image: int = 5, chunk_size: int | None = None,
                    backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Ranks of the ground truth in both directions, in one pass over ``sims``.

    Args:
        sims: ``(N_img, N_cap)`` similarities (torch tensor on any device, or numpy array);
            ``N_cap = captions_per_image * N_img``.
        captions_per_image: captions per image ``k``; captions ``k*i .. k*i+k-1`` match image i.
        chunk_size: image rows processed at once (extra memory ~ ``3 * chunk_size * N_cap``
            bytes); default: about 8M entries and at most 255 rows on CPU, 64M entries on
            CUDA.
        backend: ``"torch"`` (on the device of ``sims``), ``"numpy"`` (CPU only) or ``"auto"``:
            numpy for CPU data (faster there), torch otherwise. Both give the same ranks.

    Returns:
        ``(i2t, t2i)``: int64 ``(N_img,)`` and ``(N_cap,)`` 0-based ranks on the device of
        ``sims`` (CPU for arrays), equal to the positions given by a stable descending argsort
        (see the module docstring for the tie rule).

    Raises:
        DataError: ``sims`` is not 2-d, its shape does not fit ``captions_per_image``, or it
            holds NaN.
    """
    sims = _as_tensor(sims).detach()
    k = captions_per_image
    n_img, n_cap = _check_layout(sims, k)
    chunk = _default_chunk(n_cap, sims.device) if chunk_size is None else int(chunk_size)
    if chunk < 1:
        raise ConfigError("chunk_size", f"must be >= 1, got {chunk_size!r}")
    ops = _ops_for(sims, backend)
    if ops.has_nan(sims):
        # NaN compares false with everything: its ranks would silently be meaningless
        raise DataError(None, "similarity matrix holds NaN values")

    with torch.inference_mode():
        captions_t = torch.arange(n_cap, device=sims.device)
        # t2i threshold: score of each caption against its own image, (N_cap,)
        caption_pos_score = ops.block(sims[captions_t // k, captions_t])
        captions = ops.arange(n_cap)
        offsets = ops.arange(k)
        i2t = ops.zeros(n_img)
        t2i = ops.zeros(n_cap)
        for r0 in range(0, n_img, chunk):
            r1 = min(r0 + chunk, n_img)
            c0, c1 = k * r0, k * r1          # the chunk's own caption band
            block = ops.block(sims[r0:r1])   # (b, N_cap)
            local = ops.arange(r1 - r0)
            left, band, right = block[:, :c0], block[:, c0:c1], block[:, c1:]
            band_cols = captions[c0:c1]

            # ---- i2t: best positive per row (highest score, lowest column among equals)
            pos = band[local[:, None], local[:, None] * k + offsets]     # (b, k)
            best = ops.row_max(pos)                                      # (b,)
            first = ops.row_min(ops.where(pos == best[:, None], offsets, k))
            best_col = (local + r0) * k + first                          # absolute column
            thr = best[:, None]
            # every column left of the band is below best_col, so a tie there is ahead
            ahead = ops.count_rows(left >= thr) + ops.count_rows(right > thr)
            ahead_band = (band > thr) | ((band == thr) & (band_cols[None, :] < best_col[:, None]))
            i2t[r0:r1] = ahead + ops.count_rows(ahead_band)

            # ---- t2i: caption c's image is p = c // k; rows i < p win ties
            t2i[:c0] += ops.count_columns(left > caption_pos_score[:c0])     # i > p here
            t2i[c1:] += ops.count_columns(right >= caption_pos_score[c1:])   # i < p here
            band_thr = caption_pos_score[c0:c1]
            row_before_image = (local[:, None] + r0) < (band_cols[None, :] // k)
            ahead_band = (band > band_thr) | ((band == band_thr) & row_before_image)
            t2i[c0:c1] += ops.count_columns(ahead_band)
    return ops.to_torch(i2t), ops.to_torch(t2i)


def i2t_ranks(sims: Any, captions_per_image: int = 5, chunk_size: int | None = None,
              backend: str = "auto") -> torch.Tensor:
    """Image-to-text ranks: int64 ``(N_img,)``, see :func:`retrieval_ranks`.

    Both directions cost one pass together; use :func:`retrieval_ranks` when both are needed.
    """
    return retrieval_ranks(sims, captions_per_image, chunk_size, backend)[0]


def t2i_ranks(sims: Any, captions_per_image: int = 5, chunk_size: int | None = None,
              backend: str = "auto") -> torch.Tensor:
    """Text-to-image ranks: int64 ``(N_cap,)``, see :func:`retrieval_ranks`.

    Both directions cost one pass together; use :func:`retrieval_ranks` when both are needed.
    """
    return retrieval_ranks(sims, captions_per_image, chunk_size, backend)[1]


# ---------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------
def _as_numpy_ranks(ranks: Any) -> np.ndarray:
    if isinstance(ranks, torch.Tensor):
        ranks = ranks.detach().cpu().numpy()
    ranks = np.asarray(ranks)
    if ranks.ndim != 1 or ranks.size == 0:
        raise DataError(None, f"ranks must be a non-empty 1-d array, got shape {ranks.shape}")
    return ranks.astype(np.float64)


def _direction_metrics(prefix: str, ranks: np.ndarray) -> dict[str, float]:
    out = {f"{prefix}_R@{k}": float(100.0 * np.mean(ranks < k)) for k in RECALL_KS}
    out[f"{prefix}_medr"] = float(math.floor(np.median(ranks)) + 1)
    out[f"{prefix}_meanr"] = float(np.mean(ranks) + 1)
    return out


def recall_metrics(i2t: Any, t2i: Any) -> dict[str, float]:
    """Recall@1/5/10, median and mean rank of both directions, and rsum.

    Args:
        i2t: 0-based image-to-text ranks ``(N_img,)`` (tensor or array).
        t2i: 0-based text-to-image ranks ``(N_cap,)``.

    Returns:
        Dict with the keys of :data:`METRIC_COLUMNS`: ``i2t_R@1``, ``i2t_R@5``, ``i2t_R@10``
        (percent), ``i2t_medr`` (``floor(median) + 1``), ``i2t_meanr`` (``mean + 1``), the same
        for ``t2i_``, and ``rsum`` (sum of the six R@K).
    """
    metrics = _direction_metrics("i2t", _as_numpy_ranks(i2t))
    metrics.update(_direction_metrics("t2i", _as_numpy_ranks(t2i)))
    metrics["rsum"] = _rsum(metrics)
    return metrics


def _rsum(metrics: Mapping[str, float]) -> float:
    return float(sum(metrics[f"{d}_R@{k}"] for d in ("i2t", "t2i") for k in RECALL_KS))


# ---------------------------------------------------------------------------------------------
# Protocols
# ---------------------------------------------------------------------------------------------
def _check_protocol(protocol: str, shape: tuple[int, int], captions_per_image: int) -> None:
    if protocol not in PROTOCOLS:
        raise ConfigError("protocol", f"unknown protocol {protocol!r}; choose one of "
                                      f"{', '.join(PROTOCOLS)}")
    n_images = PROTOCOLS[protocol]
    if n_images is None:
        return
    expected = (n_images, n_images * captions_per_image)
    if tuple(shape) != expected:
        raise DataError(None, f"protocol {protocol!r} expects a similarity matrix of shape "
                              f"{expected} (images, captions), got {tuple(shape)}")


def evaluate_sims(sims: Any, protocol: str = "full", captions_per_image: int = 5,
                  chunk_size: int | None = None, backend: str = "auto") -> pd.DataFrame:
    """Retrieval metrics of a similarity matrix under a named protocol.

    Args:
        sims: ``(N_img, N_cap)`` similarities, rows images (tensor on any device, or array).
        protocol: ``"f30k_1k"`` (1000 images), ``"coco_5k"`` (5000), ``"coco_1k_5fold"``
            (5000 images as 5 folds of 1000: images ``[1000f, 1000(f+1))`` against captions
            ``[1000kf, 1000k(f+1))``, metrics averaged over folds) or ``"full"`` (any size).
        captions_per_image: ``k``; captions ``k*i .. k*i+k-1`` belong to image ``i``.
        chunk_size, backend: see :func:`retrieval_ranks`.

    Returns:
        One-row DataFrame: ``protocol``, ``n_images``, ``n_captions`` and the
        :data:`METRIC_COLUMNS`. For ``coco_1k_5fold`` every metric is the mean over folds and
        ``rsum`` is the sum of the averaged R@K; the per-fold metrics are in
        ``df.attrs["folds"]`` (a list of dicts).

    Raises:
        ConfigError: unknown protocol.
        DataError: the shape of ``sims`` does not fit the protocol or ``captions_per_image``.
    """
    sims = _as_tensor(sims)
    _check_protocol(protocol, tuple(sims.shape), captions_per_image)
    k = captions_per_image
    folds: list[dict[str, float]] = []
    if protocol == "coco_1k_5fold":
        for f in range(_FOLDS):
            i0, i1 = f * _FOLD_IMAGES, (f + 1) * _FOLD_IMAGES
            i2t, t2i = retrieval_ranks(sims[i0:i1, k * i0:k * i1], k, chunk_size, backend)
            folds.append(recall_metrics(i2t, t2i))
        metrics = {name: float(np.mean([m[name] for m in folds])) for name in METRIC_COLUMNS}
        # the sum of fold means equals the mean of fold sums; recompute to keep it exact
        metrics["rsum"] = _rsum(metrics)
    else:
        i2t, t2i = retrieval_ranks(sims, k, chunk_size, backend)
        metrics = recall_metrics(i2t, t2i)
    row = {"protocol": protocol, "n_images": int(sims.shape[0]), "n_captions": int(sims.shape[1])}
    row.update({name: metrics[name] for name in METRIC_COLUMNS})
    df = pd.DataFrame([row])
    if folds:
        df.attrs["folds"] = folds
    return df


def format_table(df: pd.DataFrame, digits: int = 1) -> str:
    """A markdown table of evaluation rows (as returned by :func:`evaluate_sims`).

    Columns: optional ``model`` / ``name`` columns, the protocol, then R@1/R@5/R@10/medr/meanr
    for i2t and t2i, and rsum. Rows of several evaluations can be concatenated first
    (``pd.concat([...])``). Missing numbers (e.g. the median rank of the chance row) print as ``-``.
    """
    lead = [c for c in ("model", "name", "protocol") if c in df.columns]
    cols = lead + [c for c in METRIC_COLUMNS if c in df.columns]
    head = [c.replace("_R@", " R@").replace("_medr", " medr").replace("_meanr", " meanr")
            for c in cols]
    lines = ["| " + " | ".join(head) + " |",
             "|" + "|".join("---" if c in lead else "---:" for c in cols) + "|"]
    for _, r in df.iterrows():
        cells = [str(r[c]) if c in lead else ("-" if pd.isna(r[c]) else f"{float(r[c]):.{digits}f}")
                 for c in cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Encoding
# ---------------------------------------------------------------------------------------------
def move_batch(batch: Mapping[str, Any], device: torch.device | str,
               non_blocking: bool = True) -> dict[str, Any]:
    """Copy of a batch dict with every tensor moved to ``device`` (other values kept)."""
    return {key: (value.to(device, non_blocking=non_blocking) if isinstance(value, torch.Tensor)
                  else value)
            for key, value in batch.items()}


def _model_device(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def _embedding_of(output: Any) -> torch.Tensor:
    """The ``embedding`` of an ImageOutput / TextOutput (a bare tensor is accepted too)."""
    emb = getattr(output, "embedding", output)
    if not isinstance(emb, torch.Tensor) or emb.ndim != 2:
        raise TypeError(f"encoder must return an output with a 2-d `embedding`, got "
                        f"{type(output).__name__}")
    return emb


def _encode_view(encode, view, index_key: str, batch_size: int, device: torch.device,
                 num_workers: int, progress: bool, desc: str) -> torch.Tensor:
    """Embeddings ``(len(view), E)`` float32 on ``device``, row ``j`` = item ``j`` of the view."""
    from torch.utils.data import DataLoader

    from userlab.data.precomp import collate_batch

    n = len(view)
    if n == 0:
        raise DataError(None, f"nothing to encode: the {desc} view is empty")
    loader = DataLoader(view, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=collate_batch, pin_memory=device.type == "cuda")
    out: torch.Tensor | None = None
    filled = torch.zeros(n, dtype=torch.bool, device=device)
    for batch in tqdm(loader, desc=desc, disable=not progress, leave=False):
        if index_key not in batch:
            raise DataError(None, f"{desc} batches carry no '{index_key}'")
        batch = move_batch(batch, device)
        with torch.autocast("cuda", dtype=torch.float16, enabled=device.type == "cuda"):
            emb = _embedding_of(encode(batch)).float()
        if out is None:
            out = torch.empty(n, emb.shape[1], dtype=torch.float32, device=device)
        # place rows by the batch's own index so a reordering loader cannot misalign them
        index = batch[index_key].long()
        out[index] = emb
        filled[index] = True
    if not bool(filled.all()):
        raise DataError(None, f"{desc}: {int((~filled).sum())} of {n} items were never encoded")
    return out


def encode_split(model: nn.Module, dataset, batch_size: int = 256,
                 device: torch.device | str | None = None, num_workers: int = 0,
                 progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode every image of a split once and every caption once.

    Runs under ``torch.inference_mode()`` with the model in eval mode (each submodule's
    train/eval flag is restored afterwards) and float16 autocast on CUDA.

    Args:
        model: has ``encode_image(batch) -> ImageOutput`` and ``encode_text(batch) ->
            TextOutput`` (docs/interfaces.md).
        dataset: a :class:`userlab.data.precomp.PrecompDataset` (anything that
            ``ImageView`` / ``CaptionView`` accept).
        batch_size: items per batch.
        device: where to run; default the model's device.
        num_workers: DataLoader workers.
        progress: show tqdm bars.

    Returns:
        ``(img_embs, cap_embs)``: float32 ``(N_img, E)`` and ``(N_cap, E)`` on ``device``,
        in dataset order.
    """
    from userlab.data.precomp import CaptionView, ImageView

    device = _model_device(model) if device is None else torch.device(device)
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.inference_mode():
            img = _encode_view(model.encode_image, ImageView(dataset), "image_index",
                               batch_size, device, num_workers, progress, "images")
            cap = _encode_view(model.encode_text, CaptionView(dataset), "caption_index",
                               batch_size, device, num_workers, progress, "captions")
    finally:
        # restore per module: a model may hold submodules kept in eval on purpose
        for module, training in modes:
            module.training = training
    return img, cap


def similarity(img_embs: torch.Tensor, cap_embs: torch.Tensor,
               chunk: int = 1024) -> torch.Tensor:
    """Cosine-style scores ``img_embs @ cap_embs.T`` computed in row chunks.

    Args:
        img_embs: ``(N_img, E)``.
        cap_embs: ``(N_cap, E)`` (moved to the device of ``img_embs``).
        chunk: image rows per matrix product.

    Returns:
        float32 ``(N_img, N_cap)`` on the device of ``img_embs``.
    """
    if img_embs.ndim != 2 or cap_embs.ndim != 2 or img_embs.shape[1] != cap_embs.shape[1]:
        raise DataError(None, f"embeddings must be (N_img, E) and (N_cap, E) with the same E, "
                              f"got {tuple(img_embs.shape)} and {tuple(cap_embs.shape)}")
    if chunk < 1:
        raise ConfigError("chunk", f"must be >= 1, got {chunk!r}")
    device = img_embs.device
    cap_t = cap_embs.to(device=device, dtype=torch.float32).t()
    sims = torch.empty(img_embs.shape[0], cap_embs.shape[0], dtype=torch.float32, device=device)
    with torch.inference_mode():
        for r0 in range(0, img_embs.shape[0], chunk):
            torch.mm(img_embs[r0:r0 + chunk].float(), cap_t, out=sims[r0:r0 + chunk])
    return sims


def evaluate(model: nn.Module, dataset, protocol: str = "full", batch_size: int = 256,
             device: torch.device | str | None = None, num_workers: int = 0,
             progress: bool = True, return_sims: bool = False,
             chunk_size: int | None = None, backend: str = "auto"):
    """Encode a split, score every image against every caption, and compute the metrics.

    Args:
        model, dataset, batch_size, device, num_workers, progress: see :func:`encode_split`.
        protocol: see :func:`evaluate_sims`.
        return_sims: also return the similarity matrix (e.g. for :func:`evaluate_ensemble`).
        chunk_size, backend: see :func:`retrieval_ranks`.

    Returns:
        The one-row DataFrame of :func:`evaluate_sims` (``df.attrs["timing"]`` holds the
        seconds spent encoding, scoring and ranking), or ``(df, sims)`` with float32
        ``(N_img, N_cap)`` sims on the encoding device when ``return_sims``.
    """
    t0 = time.perf_counter()
    img, cap = encode_split(model, dataset, batch_size, device, num_workers, progress)
    t1 = time.perf_counter()
    sims = similarity(img, cap)
    if sims.is_cuda:
        torch.cuda.synchronize(sims.device)
    t2 = time.perf_counter()
    if sims.shape[1] % sims.shape[0]:
        raise DataError(None, f"{sims.shape[1]} captions for {sims.shape[0]} images is not a "
                              f"whole number of captions per image")
    df = evaluate_sims(sims, protocol, sims.shape[1] // sims.shape[0], chunk_size, backend)
    df.attrs["timing"] = {"encode_s": t1 - t0, "similarity_s": t2 - t1,
                          "metrics_s": time.perf_counter() - t2}
    return (df, sims) if return_sims else df


# ---------------------------------------------------------------------------------------------
# Ensembles and saved similarity matrices
# ---------------------------------------------------------------------------------------------
def average_sims(sims_list: Sequence[Any], weights: Sequence[float] | None = None) -> torch.Tensor:
    """Element-wise (weighted) mean of similarity matrices of the same shape.

    Args:
        sims_list: ``(N_img, N_cap)`` tensors or arrays (moved to the device of the first).
        weights: one non-negative weight per matrix (normalised to sum 1); default equal.

    Returns:
        float32 ``(N_img, N_cap)``.
    """
    mats = [_as_tensor(s) for s in sims_list]
    if not mats:
        raise DataError(None, "an ensemble needs at least one similarity matrix")
    shape = tuple(mats[0].shape)
    for j, m in enumerate(mats):
        if tuple(m.shape) != shape:
            raise DataError(None, f"ensemble member {j} has shape {tuple(m.shape)}, member 0 has "
                                  f"{shape}: all similarity matrices must have the same shape")
    if weights is None:
        weights = [1.0] * len(mats)
    if len(weights) != len(mats) or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ConfigError("weights", f"need {len(mats)} non-negative weights with a positive "
                                     f"sum, got {list(weights)}")
    total = float(sum(weights))
    device = mats[0].device
    out = torch.zeros(shape, dtype=torch.float32, device=device)
    for w, m in zip(weights, mats):
        out.add_(m.to(device=device, dtype=torch.float32), alpha=float(w) / total)
    return out


def evaluate_ensemble(sims_list: Sequence[Any], protocol: str = "full",
                      captions_per_image: int = 5, weights: Sequence[float] | None = None,
                      chunk_size: int | None = None, backend: str = "auto") -> pd.DataFrame:
    """Metrics of the averaged similarity matrix of several checkpoints (USER's ensemble).

    Args:
        sims_list: ``(N_img, N_cap)`` matrices, one per checkpoint.
        protocol, captions_per_image, chunk_size, backend: see :func:`evaluate_sims`.
        weights: see :func:`average_sims`.

    Returns:
        The one-row DataFrame of :func:`evaluate_sims` with ``members`` (the ensemble size).
    """
    df = evaluate_sims(average_sims(sims_list, weights), protocol, captions_per_image,
                       chunk_size, backend)
    df.insert(1, "members", len(sims_list))
    return df


def save_sims(path: str | os.PathLike, sims: Any) -> None:
    """Write a similarity matrix to ``path`` as ``.npy`` (atomically; float32 kept as is)."""
    if isinstance(sims, torch.Tensor):
        sims = sims.detach().cpu().numpy()
    sims = np.asarray(sims)
    if sims.ndim != 2:
        raise DataError(path, f"similarity matrix must be 2-d, got shape {sims.shape}")
    atomic_save_npy(path, sims)


def load_sims(path: str | os.PathLike, mmap: bool = False) -> np.ndarray:
    """Read a similarity matrix written by :func:`save_sims`.

    Args:
        path: the ``.npy`` file.
        mmap: memory-map instead of reading into RAM.

    Returns:
        ``(N_img, N_cap)`` float array.

    Raises:
        DataError: the file is missing, unreadable, not 2-d or not floating point.
    """
    if not os.path.isfile(path):
        raise DataError(path, "similarity file not found")
    try:
        sims = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise DataError(path, f"not a readable .npy similarity matrix ({exc})") from exc
    if sims.ndim != 2 or sims.dtype.kind != "f":
        raise DataError(path, f"expected a 2-d float similarity matrix, got {sims.dtype} "
                              f"{sims.shape}")
    return sims

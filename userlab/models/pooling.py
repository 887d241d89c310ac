"""Pooling over a set of vectors: GPO (VSE-infinity's Generalized Pooling Operator) and helpers.

GPO (method notes section 2.2) learns one weight per *rank* rather than per position: each
feature dimension is sorted in descending order over the valid positions, and the sorted values
are summed with weights that depend only on how many positions are valid. The weights come from
a BiGRU run over sinusoidal positional encodings of ranks ``0..n-1``:

1. sinusoidal encodings ``PE (n, d)``;
2. BiGRU(d -> h) over them, the two directions averaged;
3. ``Linear(h -> 1, no bias)`` gives a score per rank; padded ranks are set to ``-1e4``;
4. ``w = softmax(score / 0.1)`` over ranks;
5. every feature dimension is sorted in descending order over the valid positions;
6. ``pooled = sum_k w_k * sorted_k``.

Also here: :func:`l2norm`, :func:`unit_embedding`, :func:`mean_pool`, :func:`max_pool` and
:func:`length_mask`.
"""
from __future__ import annotations

import math
from typing import Sequence, Union

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from ..errors import DataError

Lengths = Union[torch.Tensor, Sequence[int]]

# VSE-infinity's constants: score of a padded rank, and the softmax temperature.
PAD_SCORE = -1e4
GPO_TEMPERATURE = 0.1


def l2norm(x: torch.Tensor, dim: int = -1, eps: float = 1e-8) -> torch.Tensor:
    """Divide ``x`` by its L2 norm along ``dim``.

    The norm is taken in at least float32 so half-precision inputs cannot overflow, and
    clamped at ``eps`` so an all-zero vector gives zeros instead of NaN.
    """
    acc = torch.promote_types(x.dtype, torch.float32)
    norm = torch.linalg.vector_norm(x, dim=dim, keepdim=True, dtype=acc).clamp_min(eps)
    return (x / norm).to(x.dtype)


def unit_embedding(pooled: torch.Tensor) -> torch.Tensor:
    """Final embedding: ``l2norm(pooled)`` in at least float32.

    Under half-precision autocast the encoders compute in bf16/fp16, but the embeddings feed
    losses with scales like ``mu = 90`` and long-lived queues, so they leave in float32.
    """
    return l2norm(pooled.to(torch.promote_types(pooled.dtype, torch.float32)))


def as_lengths(lengths: Lengths, batch: int, max_len: int, device: torch.device) -> torch.Tensor:
    """Check and convert ``lengths`` to a long tensor ``(B,)`` on ``device``.

    Raises:
        DataError: if there is not one length per row or one lies outside ``[1, max_len]``.
    """
    lengths = torch.as_tensor(lengths, device=device).long().reshape(-1)
    if lengths.numel() != batch:
        raise DataError(None, f"batch 'lengths': {lengths.numel()} lengths for {batch} rows")
    if batch and (int(lengths.min()) < 1 or int(lengths.max()) > max_len):
        raise DataError(None, f"batch 'lengths': every length must lie in [1, {max_len}] "
                              f"(the padded size), got min {int(lengths.min())} "
                              f"max {int(lengths.max())}")
    return lengths


def length_mask(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """Boolean mask ``(B, max_len)``, True on positions ``< lengths[b]``."""
    positions = torch.arange(max_len, device=lengths.device)
    return positions.unsqueeze(0) < lengths.unsqueeze(1)


def mean_pool(features: torch.Tensor, lengths: Lengths) -> torch.Tensor:
    """Mean of ``features (B, K, D)`` over the first ``lengths[b]`` positions -> ``(B, D)``."""
    b, k, _ = features.shape
    lengths = as_lengths(lengths, b, k, features.device)
    mask = length_mask(lengths, k).unsqueeze(-1).to(features.dtype)
    return (features * mask).sum(1) / lengths.unsqueeze(1).to(features.dtype)


def max_pool(features: torch.Tensor, lengths: Lengths) -> torch.Tensor:
    """Maximum of ``features (B, K, D)`` over the first ``lengths[b]`` positions -> ``(B, D)``."""
    b, k, _ = features.shape
    lengths = as_lengths(lengths, b, k, features.device)
    mask = length_mask(lengths, k).unsqueeze(-1)
    return features.masked_fill(~mask, float("-inf")).amax(1)


def sinusoidal_encoding(length: int, dim: int) -> torch.Tensor:
    """Transformer sinusoidal positional encodings ``(length, dim)`` (float32).

    Even columns ``2i`` hold ``sin(pos / 10000^(2i/dim))``, odd columns ``2i+1`` the cosine of
    the same angle.
    """
    if dim % 2:
        raise ValueError(f"positional encoding width must be even, got {dim}")
    pos = torch.arange(length, dtype=torch.float64).unsqueeze(1)
    inv_freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float64) * (-math.log(10000.0) / dim))
    pe = torch.zeros(length, dim, dtype=torch.float64)
    pe[:, 0::2] = torch.sin(pos * inv_freq)
    pe[:, 1::2] = torch.cos(pos * inv_freq)
    return pe.float()


class GPO(nn.Module):
    """Generalized Pooling Operator.

    Args:
        pe_dim: width of the sinusoidal rank encodings (VSE-infinity: 32).
        hidden: hidden width of the BiGRU per direction (VSE-infinity: 32).
    """

    def __init__(self, pe_dim: int = 32, hidden: int = 32):
        super().__init__()
        self.pe_dim = pe_dim
        self.hidden = hidden
        self.gru = nn.GRU(pe_dim, hidden, num_layers=1, batch_first=True, bidirectional=True)
        self.linear = nn.Linear(hidden, 1, bias=False)
        # Encodings are recomputed only when a longer sequence or a new device shows up. A plain
        # dict, not a buffer: it must not enter state_dict or EMA copies, and its size varies.
        self._pe_cache: dict[torch.device, torch.Tensor] = {}

    def positional_encodings(self, length: int, device: torch.device) -> torch.Tensor:
        """Cached ``sinusoidal_encoding(length, pe_dim)`` on ``device``."""
        table = self._pe_cache.get(device)
        if table is None or table.shape[0] < length:
            table = sinusoidal_encoding(max(length, 64), self.pe_dim).to(device)
            self._pe_cache[device] = table
        return table[:length]

    def rank_weights(self, lengths: torch.Tensor, max_len: int) -> torch.Tensor:
        """Pooling weights ``(B, max_len)`` for sequences of the given lengths.

        The weights of a sequence depend on its length only, so the BiGRU runs once per distinct
        length (for images: once per batch) and the result is gathered per row.
        """
        unique, inverse = torch.unique(lengths, return_inverse=True)
        n = unique.numel()
        pe = self.positional_encodings(max_len, lengths.device)
        pe = pe.to(self.gru.weight_ih_l0.dtype).unsqueeze(0).expand(n, -1, -1)
        packed = pack_padded_sequence(pe, unique.cpu(), batch_first=True, enforce_sorted=False)
        out, _ = self.gru(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=max_len)
        out = (out[..., :self.hidden] + out[..., self.hidden:]) / 2
        scores = self.linear(out).squeeze(-1)                              # (n, max_len)
        valid = length_mask(unique, max_len)
        # at least float32: under fp16 autocast, -1e4 / 0.1 would overflow
        scores = scores.to(torch.promote_types(scores.dtype, torch.float32))
        scores = scores.masked_fill(~valid, PAD_SCORE)
        weights = torch.softmax(scores / GPO_TEMPERATURE, dim=1)
        return weights[inverse]

    def forward(self, features: torch.Tensor, lengths: Lengths
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Pool ``features``.

        Args:
            features: ``(B, K, D)``; row ``b`` is valid on its first ``lengths[b]`` positions.
            lengths: ``(B,)`` number of valid positions per row, each in ``[1, K]``.

        Returns:
            ``(pooled (B, D), weights (B, K))``; ``weights[b, k]`` is the weight of the k-th
            largest value of every dimension, zero for ``k >= lengths[b]``.
        """
        b, k, _ = features.shape
        lengths = as_lengths(lengths, b, k, features.device)
        weights = self.rank_weights(lengths, k)
        return sort_pool(features, lengths, weights), weights.to(features.dtype)


def sort_pool(features: torch.Tensor, lengths: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """GPO's pooling step: ``sum_k weights[b, k] * (k-th largest of features[b, :, d])`` -> ``(B, D)``.

    ``features (B, K, D)`` is valid on the first ``lengths[b]`` positions; ``weights (B, K)`` are
    zero past them. The sort runs along a contiguous last axis (``(B, D, K)``), which is faster
    than sorting the strided middle axis (bench/RESULTS.md), and the padding masks are skipped
    when every row is full (image regions always are). Same sorted values and gradients as
    sorting ``dim=1``; the pooled sum may differ in the last float bit (summation order).
    """
    k = features.shape[1]
    columns = features.transpose(1, 2)                                  # (B, D, K), a view
    full = int(lengths.min()) == k
    if not full:
        # -inf sorts padded entries behind every real value, whatever its magnitude; they are
        # then replaced by 0 so that no -inf meets a (zero) weight.
        valid = length_mask(lengths, k).unsqueeze(1)                     # (B, 1, K)
        columns = columns.masked_fill(~valid, float("-inf"))
    ranked = columns.contiguous().sort(dim=-1, descending=True).values  # (B, D, K)
    if not full:
        ranked = ranked.masked_fill(~valid, 0.0)
    return (ranked * weights.unsqueeze(1).to(ranked.dtype)).sum(-1)

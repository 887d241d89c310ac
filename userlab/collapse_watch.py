"""Near-collapse during training: positives and negatives both crowd at similarity ~1.

:func:`userlab.losses.check_collapse` flags a batch whose similarities are all equal within
1e-3. A VSE++ run on Flickr8k grid features at lr 1e-3 reached a state that test misses: mean
positive and mean negative similarity both ~0.997 (spread still above 1e-3), every hardest
negative at or above its positive, the triplet loss pinned at ``2·B·margin`` (51.2 for B = 128),
and dev rSum falling. :class:`CollapseWatch` flags that state when it persists for ``patience``
consecutive steps:

* the mean negative (off-diagonal) similarity is within ``cos_tol`` of 1, and
* the mean positive similarity exceeds it by less than ``cos_tol``.

Healthy retrieval training keeps negatives far below 1 (a random start puts image-caption
cosines near 0), so the two conditions together mean the embeddings of both modalities have
crowded into one direction: the model can no longer rank.
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch

from .losses import CollapseWarning


def batch_similarity_stats(sim: torch.Tensor) -> dict[str, float]:
    """Mean positive (diagonal) and negative (off-diagonal) similarity of a ``(B, B)`` batch,
    and the standard deviation of the negatives."""
    s = sim.detach().float()
    b = s.shape[0]
    pos = s.diagonal()
    off = s[~torch.eye(b, dtype=torch.bool, device=s.device)]
    return {"pos": float(pos.mean()), "neg": float(off.mean()) if off.numel() else float("nan"),
            "neg_std": float(off.std()) if off.numel() > 1 else 0.0}


class CollapseWatch:
    """Warn once (:class:`~userlab.losses.CollapseWarning`) when training sits in near-collapse.

    Args:
        cos_tol: how close to 1 the mean negative similarity, and how close to it the mean
            positive similarity, must be (default 0.05).
        patience: consecutive near-collapsed steps before the warning (a single odd batch is
            not a collapse).
        margin: the triplet margin, only quoted in the message (the loss then sits at
            ``2·B·margin``).

    Attributes:
        since_step: the first step of the near-collapsed stretch that triggered the warning,
            or None.
    """

    def __init__(self, cos_tol: float = 0.05, patience: int = 10, margin: float = 0.2):
        self.cos_tol, self.patience, self.margin = cos_tol, patience, margin
        self.run_start: Optional[int] = None
        self.run_length = 0
        self.since_step: Optional[int] = None

    def is_near_collapse(self, pos: float, neg: float) -> bool:
        return neg > 1.0 - self.cos_tol and pos - neg < self.cos_tol

    def update(self, sim: torch.Tensor, step: int) -> bool:
        """Feed one batch's ``(B, B)`` similarities; True on the step the warning is issued."""
        if sim.dim() != 2 or sim.shape[0] < 2:
            return False
        stats = batch_similarity_stats(sim)
        if not self.is_near_collapse(stats["pos"], stats["neg"]):
            self.run_start, self.run_length = None, 0
            return False
        if self.run_start is None:
            self.run_start = step
        self.run_length += 1
        if self.run_length < self.patience or self.since_step is not None:
            return False
        self.since_step = self.run_start
        b = sim.shape[0]
        warnings.warn(
            f"near-collapse since step {self.run_start}: mean positive similarity "
            f"{stats['pos']:.3f} and mean negative {stats['neg']:.3f} for {self.run_length} "
            f"steps (both within {self.cos_tol:g} of 1): image and caption embeddings crowd into "
            f"one direction and a hardest-negative triplet loss sits near 2·B·margin = "
            f"{2 * b * self.margin:.1f}. Lower optim.lr (the f8k presets use 2e-4), keep "
            f"loss.warmup_epochs >= 1, or try another seed.", CollapseWarning, stacklevel=3)
        return True


__all__ = ["CollapseWatch", "batch_similarity_stats"]

"""Solutions to the exercises of notebook 05_boosting (hide this folder from students)."""
from __future__ import annotations

import math

import torch

from userlab import teach


def relative_boost(S_t: torch.Tensor, S_a: torch.Tensor, margin: float = 0.2) -> torch.Tensor:
    """Exercise 1: DBL's relative boosting, hardest violating negative per query, both directions.

    Row i (image query): [γ + (Sa_ii − Sa_ij) − (St_ii − St_ij)]_+ over j ≠ i, max, summed.
    Column j (caption query): [γ + (Sa_jj − Sa_ij) − (St_jj − St_ij)]_+ over i ≠ j, max, summed.
    """
    eye = torch.eye(S_t.shape[0], dtype=torch.bool)
    gap_t_row = S_t.diagonal()[:, None] - S_t
    gap_a_row = S_a.diagonal()[:, None] - S_a
    gap_t_col = S_t.diagonal()[None, :] - S_t
    gap_a_col = S_a.diagonal()[None, :] - S_a
    rows = (margin + gap_a_row - gap_t_row).clamp_min(0).masked_fill(eye, 0).amax(dim=1)
    cols = (margin + gap_a_col - gap_t_col).clamp_min(0).masked_fill(eye, 0).amax(dim=0)
    return rows.sum() + cols.sum()


def absolute_margins(margin: float = 0.2, beta: float = 1.0) -> tuple[float, float]:
    """Exercise 2: the released code halves γ·β for both absolute margins."""
    return 0.5 * margin * beta, 0.5 * margin * beta


def momentum(step: int, total: int, base: float = 0.9995, final: float = 1.0) -> float:
    """Exercise 3: DINO's cosine schedule from base to final."""
    return final + (base - final) * 0.5 * (1 + math.cos(math.pi * step / total))


def check_all() -> list[teach.Feedback]:
    g = torch.Generator().manual_seed(0)
    S_t, S_a = torch.rand(6, 6, generator=g), torch.rand(6, 6, generator=g)
    return [
        teach.check_relative_boost(S_t, S_a, relative_boost(S_t, S_a)),
        teach.check_relative_boost(S_t, S_a, relative_boost),
        teach.check_absolute_margins(absolute_margins()),
        teach.check_momentum_schedule(300, 1000, momentum(300, 1000)),
        teach.check_momentum_schedule(300, 1000, momentum),
    ]


if __name__ == "__main__":
    check_all()

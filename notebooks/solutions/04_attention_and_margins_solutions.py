"""Solutions to the exercises of notebook 04_attention_and_margins (hide this folder from students)."""
from __future__ import annotations

import torch

from userlab import teach


def attention_sums(weights: torch.Tensor) -> torch.Tensor:
    """Exercise 1: one sum per image, over the regions (last axis).

    SGE's alpha sums to 1; beta does not (its squares do), because USER L2-normalises the
    softmax output again.
    """
    return weights.sum(dim=-1)


def beta(g: torch.Tensor, regions: torch.Tensor, lam: float = 1.0) -> torch.Tensor:
    """Exercise 2: region attention β = l2norm(softmax(λ⟨g, R_k⟩)) over the regions."""
    affinity = torch.einsum("brd,bd->br", regions, g)
    weights = torch.softmax(lam * affinity, dim=1)
    return weights / weights.norm(dim=1, keepdim=True)


def check_all() -> list[teach.Feedback]:
    g = torch.Generator().manual_seed(0)
    regions = torch.randn(3, 5, 4, generator=g)
    glob = torch.nn.functional.normalize(torch.randn(3, 4, generator=g), dim=1)
    b = beta(glob, regions)
    alpha = torch.softmax(torch.randn(3, 5, generator=g), dim=1)
    return [
        teach.check_attention_sums(b, attention_sums(b)),
        teach.check_attention_sums(alpha, attention_sums(alpha)),
        teach.check_beta(glob, regions, b),
        teach.check_beta(glob, regions, beta),
    ]


if __name__ == "__main__":
    check_all()

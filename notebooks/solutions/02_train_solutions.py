"""Solutions to the exercises of notebook 02_train (hide this folder from students)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from userlab import teach


def hal_term(sim: torch.Tensor, mu: float = 90.0, gamma: float = 0.5) -> torch.Tensor:
    """Exercise 1: USER's mini-batch term, written out.

    Both negative sums leave the positive pair out; ``softplus(logsumexp(x)) = log(1 + Σ e^x)``
    stays finite where ``e^{μ(S−γ)}`` would overflow.
    """
    b = sim.shape[0]
    eye = torch.eye(b, dtype=torch.bool, device=sim.device)
    logits = (mu * (sim - gamma)).masked_fill(eye, float("-inf"))
    image_side = F.softplus(torch.logsumexp(logits, dim=1)) / mu     # image i vs other captions
    caption_side = F.softplus(torch.logsumexp(logits, dim=0)) / mu   # caption i vs other images
    positive = -torch.log1p(torch.relu(torch.diagonal(sim)))
    return (image_side + caption_side + positive).mean()


def ema(theta_k: torch.Tensor, theta_q: torch.Tensor, m: float) -> torch.Tensor:
    """Exercise 2: one momentum step of the key encoder."""
    return m * theta_k + (1 - m) * theta_q


def queue_pointer(K: int, B: int, steps: int) -> int:
    """Exercise 3: where the next batch of keys is written."""
    return (steps * B) % K


def check_all() -> list[teach.Feedback]:
    g = torch.Generator().manual_seed(0)
    sim = torch.rand(8, 8, generator=g) * 2 - 1
    theta_k, theta_q = torch.randn(5, generator=g), torch.randn(5, generator=g)
    return [
        teach.check_hal_term(sim, hal_term(sim)),
        teach.check_hal_term(sim, hal_term),
        teach.check_ema(theta_k, theta_q, 0.999, ema(theta_k, theta_q, 0.999)),
        teach.check_queue_pointer(2048, 128, 20, queue_pointer(2048, 128, 20)),
    ]


if __name__ == "__main__":
    check_all()

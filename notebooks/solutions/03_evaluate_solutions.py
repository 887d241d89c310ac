"""Solutions to the exercises of notebook 03_evaluate (hide this folder from students)."""
from __future__ import annotations

import math

import numpy as np
import torch

from userlab import teach


def recall_at_k(sims: torch.Tensor, k: int, direction: str = "i2t") -> float:
    """Exercise 1: R@K in percent from an (N, 5N) similarity matrix.

    i2t: the rank of image i is the best position of any of its 5 captions in its sorted row.
    t2i: the rank of caption c is the position of image c // 5 in its sorted column.
    """
    s = np.asarray(sims, dtype=np.float64)
    n = s.shape[0]
    ranks = []
    if direction == "i2t":
        for i in range(n):
            order = np.argsort(-s[i], kind="stable")
            ranks.append(np.flatnonzero(order // 5 == i).min())
    else:
        for c in range(s.shape[1]):
            order = np.argsort(-s[:, c], kind="stable")
            ranks.append(np.flatnonzero(order == c // 5)[0])
    return 100.0 * float(np.mean(np.asarray(ranks) < k))


def rsum(metrics) -> float:
    """Exercise 2: the six recalls added up."""
    return sum(float(metrics[f"{d}_R@{k}"]) for d in ("i2t", "t2i") for k in (1, 5, 10))


def medr(ranks) -> int:
    """Exercise 3: median rank, 1-based, of 0-based ranks."""
    return math.floor(float(np.median(np.asarray(ranks)))) + 1


def check_all() -> list[teach.Feedback]:
    g = torch.Generator().manual_seed(0)
    sims = torch.rand(12, 60, generator=g)
    metrics = {f"{d}_R@{k}": 10.0 * k + (d == "t2i") for d in ("i2t", "t2i") for k in (1, 5, 10)}
    metrics.update({"i2t_medr": 3.0, "t2i_medr": 4.0, "i2t_meanr": 5.5, "t2i_meanr": 6.5})
    ranks = [0, 3, 1, 8, 2, 5]
    return [
        teach.check_recall_at_k(sims, 5, recall_at_k(sims, 5, "i2t"), "i2t"),
        teach.check_recall_at_k(sims, 1, recall_at_k(sims, 1, "t2i"), "t2i"),
        teach.check_recall_at_k(sims, 10, recall_at_k, "i2t"),
        teach.check_rsum(metrics, rsum(metrics)),
        teach.check_medr(ranks, medr(ranks)),
    ]


if __name__ == "__main__":
    check_all()

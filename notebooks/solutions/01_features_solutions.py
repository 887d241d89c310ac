"""Solutions to the exercises of notebook 01_features (hide this folder from students).

Run ``python notebooks/solutions/01_features_solutions.py`` to see every checker agree.
"""
from __future__ import annotations

import numpy as np

from userlab import teach


def im_div(n_rows: int, n_captions: int) -> int:
    """Exercise 1: captions per feature row. One row per image when rows != captions."""
    return 5 if n_rows != n_captions else 1


def caption_image(caption_index: int) -> int:
    """Exercise 2: captions 5i..5i+4 belong to image i."""
    return caption_index // 5


def region_count(features: np.ndarray) -> int:
    """Exercise 3: regions are axis 1 of (N_rows, R, F)."""
    return features.shape[1]


def check_all() -> list[teach.Feedback]:
    feats = np.zeros((10, 36, 8), dtype=np.float32)
    return [
        teach.check_im_div(1000, 5000, im_div(1000, 5000)),
        teach.check_im_div(5070, 5070, im_div(5070, 5070)),
        teach.check_caption_image(13, caption_image(13)),
        teach.check_caption_image(13, caption_image),
        teach.check_region_count(feats, region_count(feats)),
    ]


if __name__ == "__main__":
    check_all()

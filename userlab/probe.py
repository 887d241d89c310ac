"""Linear probes: does a set of features carry a label linearly?

A notebook sentence such as "the backbone separates colours" is a claim about the features; the
probe measures it. :func:`linear_probe` fits a standardised logistic regression with stratified
k-fold cross-validation and reports held-out accuracy next to chance (the majority class rate), so
the claim stands or falls by a number.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from .errors import ConfigError, DataError


@dataclass(frozen=True)
class ProbeResult:
    """Cross-validated accuracy of a linear probe.

    ``accuracy``/``std``: mean and standard deviation of held-out accuracy over the folds;
    ``chance``: accuracy of always answering the most frequent class; ``n``: samples;
    ``classes``: the labels in sorted order; ``per_class``: held-out recall of each class.
    """

    accuracy: float
    std: float
    chance: float
    n: int
    folds: int
    classes: tuple
    per_class: tuple

    @property
    def lift(self) -> float:
        """How many times chance the probe reaches."""
        return self.accuracy / self.chance if self.chance > 0 else float("inf")

    def __str__(self) -> str:
        return (f"linear probe: {100 * self.accuracy:.1f}% ± {100 * self.std:.1f} held-out accuracy "
                f"({self.folds}-fold, {self.n} samples, {len(self.classes)} classes) vs chance "
                f"{100 * self.chance:.1f}%")


def linear_probe(features: Any, labels: Sequence[Any], folds: int = 5, seed: int = 0,
                 c: float = 1.0, max_iter: int = 2000) -> ProbeResult:
    """Stratified k-fold accuracy of a logistic regression from ``features`` to ``labels``.

    Args:
        features: ``(N, D)`` array (or tensor).
        labels: ``(N,)`` class labels (any hashable values).
        folds: number of folds (each class needs at least this many samples).
        seed: fold shuffling seed.
        c: inverse L2 regularisation strength of the logistic regression.
        max_iter: solver iterations.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x = features.detach().cpu().numpy() if hasattr(features, "detach") else np.asarray(features)
    x = x.astype(np.float64)
    y = np.asarray(list(labels))
    if x.ndim != 2 or len(x) != len(y):
        raise DataError(None, f"features must be (N, D) with N = {len(y)} labels, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise DataError(None, "features hold NaN or Inf")
    classes, counts = np.unique(y, return_counts=True)
    if len(classes) < 2:
        raise DataError(None, f"a probe needs at least two classes, got {classes.tolist()}")
    if int(folds) < 2 or counts.min() < int(folds):
        raise ConfigError("folds", f"{folds} folds need every class at least {folds} times "
                                   f"(rarest class: {int(counts.min())})")
    split = StratifiedKFold(n_splits=int(folds), shuffle=True, random_state=seed)
    accs, predicted = [], np.empty(len(y), dtype=y.dtype)
    for train, test in split.split(x, y):
        model = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=max_iter))
        model.fit(x[train], y[train])
        predicted[test] = model.predict(x[test])
        accs.append(float((predicted[test] == y[test]).mean()))
    per_class = tuple(float((predicted[y == k] == k).mean()) for k in classes)
    return ProbeResult(accuracy=float(np.mean(accs)), std=float(np.std(accs)),
                       chance=float(counts.max() / counts.sum()), n=len(y), folds=int(folds),
                       classes=tuple(classes.tolist()), per_class=per_class)

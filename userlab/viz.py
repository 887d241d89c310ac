"""Figures. Every function returns a matplotlib Figure; :func:`save` writes it to ``figures/``."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Optional, Sequence

import matplotlib.pyplot as plt  # headless: matplotlib falls back to Agg by itself
import pandas as pd
import seaborn as sns

from .io import atomic_path

FIGURES = Path("figures")


def _style() -> None:
    sns.set_theme(context="notebook", style="whitegrid", palette="colorblind")


def save(fig: plt.Figure, name: str, folder: str | os.PathLike = FIGURES, dpi: int = 120) -> Path:
    """Write ``fig`` to ``folder/name`` (PNG unless the name says otherwise), atomically."""
    path = Path(folder) / (name if Path(name).suffix else f"{name}.png")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format=path.suffix.lstrip(".") or "png")
    return path


def read_logs(run_dir: str | os.PathLike) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(train_log, eval_log)`` of a run folder (empty frames when missing)."""
    run = Path(run_dir)
    train = pd.read_csv(run / "train_log.csv") if (run / "train_log.csv").is_file() else pd.DataFrame()
    dev = pd.read_csv(run / "eval_log.csv") if (run / "eval_log.csv").is_file() else pd.DataFrame()
    return train, dev


def plot_loss_terms(train_logs: Mapping[str, pd.DataFrame], smooth: int = 5) -> plt.Figure:
    """Training curves: one panel per run, one line per loss term (``loss_*`` columns)."""
    _style()
    fig, axes = plt.subplots(1, len(train_logs), figsize=(5.5 * len(train_logs), 3.6), squeeze=False)
    for ax, (name, log) in zip(axes[0], train_logs.items()):
        terms = [c for c in log.columns if c.startswith("loss_")] or ["loss"]
        for term in terms:
            ax.plot(log["step"], log[term].rolling(smooth, min_periods=1).mean(), label=term.removeprefix("loss_"))
        ax.set(title=name, xlabel="step", ylabel="loss")
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_dev_rsum(eval_logs: Mapping[str, pd.DataFrame]) -> plt.Figure:
    """Dev rSum per epoch of several runs on one axis."""
    _style()
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for name, log in eval_logs.items():
        if len(log):
            ax.plot(log["epoch"], log["rsum"], marker="o", label=name)
    ax.set(xlabel="epoch", ylabel="dev rSum", title="validation rSum")
    ax.legend()
    fig.tight_layout()
    return fig


def plot_recall_bars(table: pd.DataFrame, ks: Sequence[int] = (1, 5, 10)) -> plt.Figure:
    """Grouped bars of R@K per model, image-to-text and text-to-image side by side."""
    _style()
    rows = []
    for _, r in table.iterrows():
        for direction in ("i2t", "t2i"):
            for k in ks:
                rows.append({"model": r["model"], "metric": f"{direction} R@{k}", "value": r[f"{direction}_R@{k}"]})
    long = pd.DataFrame(rows)
    fig, ax = plt.subplots(figsize=(8, 3.8))
    sns.barplot(data=long, x="metric", y="value", hue="model", ax=ax)
    protocol = table["protocol"].iloc[0] if "protocol" in table else ""
    ax.set(ylabel="recall (%)", xlabel="", title=f"retrieval recall ({protocol})")
    ax.set_ylim(0, 100)
    fig.tight_layout()
    return fig


def demo_figures(runs: Mapping[str, str | os.PathLike], table: pd.DataFrame,
                 folder: str | os.PathLike = FIGURES) -> list[Path]:
    """The three figures ``make demo`` writes: loss terms, dev rSum per epoch, recall bars."""
    logs = {name: read_logs(path) for name, path in runs.items()}
    paths = []
    for name, fig in (("demo_loss_terms", plot_loss_terms({n: l[0] for n, l in logs.items()})),
                      ("demo_dev_rsum", plot_dev_rsum({n: l[1] for n, l in logs.items()})),
                      ("demo_recall_bars", plot_recall_bars(table))):
        paths.append(save(fig, name, folder))
        plt.close(fig)
    return paths

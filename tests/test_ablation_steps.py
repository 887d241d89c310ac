"""Component steps of the ablation: per-image rSum shares, paired bootstrap, verdicts."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.stats
import torch

from userlab import ablation
from userlab.errors import DataError
from userlab.evaluate import evaluate_sims, retrieval_ranks


def _ranks(sims):
    i2t, t2i = retrieval_ranks(torch.as_tensor(sims))
    return i2t.numpy(), t2i.numpy()


def test_per_image_rsum_averages_to_rsum():
    rng = np.random.default_rng(0)
    for n in (7, 40):
        sims = rng.normal(size=(n, 5 * n)).astype(np.float32)
        sims[np.arange(n), 5 * np.arange(n)] += 1.5          # some signal
        d = ablation.per_image_rsum(*_ranks(sims))
        assert d.shape == (n,)
        assert d.mean() == pytest.approx(float(evaluate_sims(sims)["rsum"].iloc[0]), abs=1e-9)
        assert ((0 <= d) & (d <= 600)).all()
    with pytest.raises(DataError):
        ablation.per_image_rsum(np.zeros(3), np.zeros(7))


def test_paired_bootstrap_invariants_and_scipy():
    rng = np.random.default_rng(1)
    a = rng.normal(100, 30, size=400)
    same = ablation.paired_bootstrap(a, a, n_boot=300)
    assert same["delta"] == 0 and same["low"] == 0 and same["high"] == 0 and same["p_le_0"] == 1.0
    shifted = ablation.paired_bootstrap(a + 7.0, a, n_boot=300)
    assert shifted["low"] == pytest.approx(7.0) and shifted["high"] == pytest.approx(7.0)
    b = a + rng.normal(3, 20, size=400)
    ours = ablation.paired_bootstrap(b, a, n_boot=4000, seed=2)
    ref = scipy.stats.bootstrap((b, a), lambda x, y: np.mean(x - y), paired=True, n_resamples=4000,
                                method="percentile", random_state=3, confidence_level=0.95).confidence_interval
    width = ref.high - ref.low
    assert ours["delta"] == pytest.approx(np.mean(b - a))
    assert abs(ours["low"] - ref.low) < 0.1 * width and abs(ours["high"] - ref.high) < 0.1 * width
    # the interval is about mean ± 1.96 standard errors
    se = np.std(b - a, ddof=1) / np.sqrt(400)
    assert ours["high"] - ours["low"] == pytest.approx(2 * 1.96 * se, rel=0.1)
    with pytest.raises(DataError):
        ablation.paired_bootstrap(a, a[:-1])


def _cell(tmp_path, name, seed, sims):
    folder = tmp_path / name / f"seed{seed}"
    folder.mkdir(parents=True)
    i2t, t2i = _ranks(sims)
    np.savez(folder / ablation.RANKS_FILE, i2t=i2t, t2i=t2i)
    return {"backbone": name, "strategy": "none", "seed": seed, "rsum": float(evaluate_sims(sims)["rsum"].iloc[0]),
            "run_dir": str(folder)}


def test_component_steps_verdicts(tmp_path):
    rng = np.random.default_rng(4)
    n = 60
    rows = []
    for seed in (1, 2, 3):
        noise = rng.normal(size=(n, 5 * n))
        strong, weak = noise.copy(), noise.copy()
        strong[np.arange(n).repeat(5), np.arange(5 * n)] += 3.0   # every positive far ahead
        weak[np.arange(n).repeat(5), np.arange(5 * n)] += 0.5
        rows += [_cell(tmp_path, "VSE++", seed, weak), _cell(tmp_path, "+SGE", seed, strong),
                 _cell(tmp_path, "+queue/UTO", seed, weak + 1e-6 * rng.normal(size=weak.shape))]
    steps = ablation.component_steps(pd.DataFrame(rows), n_boot=500).set_index("step")
    assert steps.loc["VSE++ → +SGE", "verdict"] == "holds"
    assert steps.loc["VSE++ → +SGE", "low"] > 0 and steps.loc["VSE++ → +SGE", "seeds"] == 3
    assert steps.loc["VSE++ → +queue/UTO", "verdict"] == "undecided"     # the same model, tiny noise
    assert "+CGE → full USER" not in steps.index                           # cells absent: no row
    text = ablation.format_steps(steps.reset_index())
    assert "VSE++ → +SGE" in text and "holds" in text
    with pytest.raises(DataError):
        ablation.load_cell_ranks(tmp_path / "nowhere")


def test_plot_ablation_with_one_backbone():
    """`userlab ablate --backbones X` (one backbone) used to crash in seaborn's dodge."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    df = pd.DataFrame({"backbone": ["+SGE"] * 3, "strategy": ["none"] * 3, "seed": [1, 2, 3],
                       "rsum": [100.0, 90.0, 70.0], "i2t_R@1": [8.0, 7.0, 5.0], "t2i_R@1": [3.0, 3.0, 2.0]})
    fig = ablation.plot_ablation(df)
    assert len(fig.axes) >= 3
    plt.close(fig)

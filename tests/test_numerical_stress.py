"""Numerical stress: every objective stays finite under fp16/bf16 autocast at extreme similarities.

Each random step draws a scenario (all similarities equal, exactly +-1, near-duplicate
embeddings, all zero, orthogonal, random), builds leaf embeddings, computes the similarity
matrices *inside* ``torch.autocast`` (so they come out in fp16 or bf16, as in a mixed-precision
training step), evaluates every objective -- USER's unified objective with queues (both diagonal
modes, with and without a queue mask), HAL's batch loss, VSE0/VSE++ triplets, InfoNCE, DBL's
relative/absolute boosting (max and sum, soft adaptation none/hard/soft), the comparison
strategies (score matching, similarity preserving, mutual learning, DINO), the online cascade --
and back-propagates their sum. Every loss and every gradient must be finite.

Why the sum suffices for the gradient check: a non-finite entry in any one gradient makes the
sum non-finite too (inf + finite = inf, inf - inf = nan), so checking the summed gradient is
exact; on failure, each objective is re-run alone to name the culprit.

CPU note: torch >= 2.1 runs fp16 autocast on CPU for matmuls. Where a backend refuses it,
:func:`autocast` falls back to half-precision inputs under bf16 autocast (the losses then see
fp16 tensors, which is what matters for them).
"""
from __future__ import annotations

import functools
import math
import warnings
from typing import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from userlab import boosting as bst
from userlab.config import BoostConfig
from userlab.losses import (CollapseWarning, batch_hal_loss, check_collapse, info_nce,
                            triplet_loss, unified_objective)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
B, E, K = 8, 16, 24
SCENARIOS = ("equal", "plus_minus_one", "near_duplicates", "zeros", "orthogonal", "random",
             "one_hot_collision")


pytestmark = pytest.mark.usefixtures("one_thread")


@functools.lru_cache(maxsize=None)
def _autocast_supported(dtype: torch.dtype) -> bool:
    try:
        with torch.autocast(DEVICE.type, dtype=dtype):
            torch.ones(2, 2, device=DEVICE) @ torch.ones(2, 2, device=DEVICE)
        return True
    except RuntimeError:
        return False


def autocast(dtype: torch.dtype):
    """``(context, half_inputs)``: ``torch.autocast`` on the test device; for fp16 on a backend
    without fp16 autocast, a bf16 autocast and ``half_inputs=True`` (the caller feeds fp16)."""
    if _autocast_supported(dtype):
        return torch.autocast(DEVICE.type, dtype=dtype), False
    return torch.autocast(DEVICE.type, dtype=torch.bfloat16), True


# ---------------------------------------------------------------------------------------------
# Scenarios: unit embeddings whose similarities sit at the extremes
# ---------------------------------------------------------------------------------------------
def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True)


def scenario(name: str, g: torch.Generator) -> tuple[torch.Tensor, ...]:
    """``(img (B,E), txt (B,E), img_k, txt_k, img_queue (E,K), txt_queue (E,K))``, float32."""
    randn = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    if name == "equal":                      # every similarity is exactly 1
        v = _unit(randn(1, E))
        img = txt = v.expand(B, E).clone()
        queue = v.t().expand(E, K).clone()
        return img, txt, img.clone(), txt.clone(), queue, queue.clone()
    if name == "plus_minus_one":             # similarities are exactly +1 or -1
        v = _unit(randn(1, E))
        signs = torch.where(torch.rand(B, 1, generator=g) < 0.5, -1.0, 1.0)
        img = v * signs
        txt = v * torch.where(torch.rand(B, 1, generator=g) < 0.5, -1.0, 1.0)
        qs = torch.where(torch.rand(1, K, generator=g) < 0.5, -1.0, 1.0)
        return img, txt, -img, txt, v.t() * qs, -v.t() * qs
    if name == "near_duplicates":            # all within 1e-4 of one point
        v = randn(1, E)
        jitter = lambda *s: 1e-4 * randn(*s)  # noqa: E731
        img, txt = _unit(v + jitter(B, E)), _unit(v + jitter(B, E))
        return (img, txt, _unit(v + jitter(B, E)), _unit(v + jitter(B, E)),
                _unit(v + jitter(K, E)).t(), _unit(v + jitter(K, E)).t())
    if name == "zeros":                      # images and captions live in orthogonal halves
        img = _unit(F.pad(randn(B, E // 2), (0, E // 2)))
        txt = _unit(F.pad(randn(B, E // 2), (E // 2, 0)))
        return img, txt, img.clone(), txt.clone(), img[:1].t().expand(E, K).clone(), txt[:1].t().expand(E, K).clone()
    if name == "orthogonal":                 # one-hot rows: identity similarity, zero queue
        img = torch.eye(B, E)
        return img, img.clone(), img.clone(), img.clone(), torch.zeros(E, K), torch.zeros(E, K)
    if name == "one_hot_collision":          # positives at 0, one negative at exactly 1
        img = torch.eye(B, E)
        txt = torch.roll(img, 1, dims=0)
        return img, txt, txt.clone(), img.clone(), img[:1].t().expand(E, K).clone(), txt[:1].t().expand(E, K).clone()
    img, txt = _unit(randn(B, E)), _unit(randn(B, E))
    return img, txt, _unit(randn(B, E)), _unit(randn(B, E)), _unit(randn(K, E)).t(), _unit(randn(K, E)).t()


# ---------------------------------------------------------------------------------------------
# Objectives: each maps (sim, sim_anchor, img, txt, keys and queues) to a scalar
# ---------------------------------------------------------------------------------------------
def _boost(strategy: str, soft: str = "none") -> Callable:
    cfg = BoostConfig(strategy=strategy, soft_adaptation=soft)
    return lambda t: bst.dbl_loss(t["sim"], t["anchor"], cfg).total


_MASK_GEN = torch.Generator().manual_seed(3)
_QUEUE_MASK = torch.rand(B, K, generator=_MASK_GEN) < 0.7

OBJECTIVES: dict[str, Callable[[dict], torch.Tensor]] = {
    "uto_queues": lambda t: unified_objective(t["sim"], t["img"], t["txt"], t["img_k"], t["txt_k"],
                                              t["img_queue"], t["txt_queue"]).total,
    "uto_queues_zero_diag_masked": lambda t: unified_objective(
        t["sim"], t["img"], t["txt"], t["img_k"], t["txt_k"], t["img_queue"], t["txt_queue"],
        diagonal="zero", queue_mask=_QUEUE_MASK.to(t["sim"].device),
        positive_mask=torch.zeros(B, B, dtype=torch.bool, device=t["sim"].device)).total,
    "uto_queue_all_masked": lambda t: unified_objective(
        t["sim"], t["img"], t["txt"], t["img_k"], t["txt_k"], t["img_queue"], t["txt_queue"],
        queue_mask=torch.zeros(B, K, dtype=torch.bool, device=t["sim"].device)).total,
    "uto_no_queue": lambda t: unified_objective(t["sim"], t["img"], t["txt"]).total,
    "hal_batch_mu1000": lambda t: batch_hal_loss(t["sim"], mu=1000.0).total,
    "triplet_max": lambda t: triplet_loss(t["sim"], max_violation=True).total,
    "triplet_sum": lambda t: triplet_loss(t["sim"], max_violation=False).total,
    "info_nce": lambda t: info_nce(t["sim"]).total,
    "info_nce_t0.001": lambda t: info_nce(t["sim"], temperature=1e-3).total,
    "dbl_relative": _boost("relative"),
    "dbl_relative_sum": _boost("relative_sum"),
    "dbl_absolute": _boost("absolute"),
    "dbl_absolute_sum": _boost("absolute_sum"),
    "dbl_relative_hard": _boost("relative", "hard"),
    "dbl_relative_soft": _boost("relative", "soft"),
    "dbl_absolute_hard": _boost("absolute", "hard"),
    "dbl_absolute_soft": _boost("absolute", "soft"),
    "score_matching": _boost("score_matching"),
    "similarity_preserving": _boost("similarity_preserving"),
    "mutual": _boost("mutual"),
    "dino": _boost("dino"),
    "cascade_3": lambda t: bst.cascade_loss(t["sim"], [t["anchor"], t["sim"].detach()],
                                            BoostConfig(strategy="relative", soft_adaptation="soft")).total,
}


# (scenario, objective) pairs with a known defect (none at present).
KNOWN_ISSUES: set[tuple[str, str]] = set()


def run_step(name: str, dtype: torch.dtype, g: torch.Generator,
             only: str | None = None) -> tuple[dict[str, float], list[str]]:
    """One step: leaf embeddings of scenario ``name``, sims under autocast, every objective
    (or ``only``); returns the loss values and the names of leaves with non-finite gradients."""
    img, txt, img_k, txt_k, q_v, q_t = (x.to(DEVICE) for x in scenario(name, g))
    ctx, half_inputs = autocast(dtype)
    leaves = {"img": img.clone().requires_grad_(True), "txt": txt.clone().requires_grad_(True)}
    with ctx:
        v, t = leaves["img"], leaves["txt"]
        if half_inputs:
            v, t = v.half(), t.half()
        anchor_v = (img + 0.05 * torch.randn(B, E, generator=g).to(DEVICE))
        tensors = {
            "sim": v @ t.t(),                             # fp16/bf16 under autocast
            "anchor": (anchor_v @ txt.t()).detach(),
            "img": v, "txt": t,
            "img_k": img_k.to(v.dtype) if half_inputs else img_k,
            "txt_k": txt_k.to(v.dtype) if half_inputs else txt_k,
            "img_queue": q_v, "txt_queue": q_t,
        }
        assert tensors["sim"].dtype in (torch.float16, torch.bfloat16)
        losses = {k: fn(tensors) for k, fn in OBJECTIVES.items()
                  if only == k or (only is None and (name, k) not in KNOWN_ISSUES)}
    total = sum(losses.values())
    total.backward()
    bad = [k for k, leaf in leaves.items() if leaf.grad is not None and not torch.isfinite(leaf.grad).all()]
    return {k: float(v.detach()) for k, v in losses.items()}, bad


def stress(steps: int, seed: int) -> dict[str, int]:
    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    seen = {s: 0 for s in SCENARIOS}
    for step in range(steps):
        name = SCENARIOS[step % len(SCENARIOS)] if step < 2 * len(SCENARIOS) else rng.choice(SCENARIOS)
        dtype = torch.float16 if step % 2 == 0 else torch.bfloat16
        values, bad = run_step(name, dtype, g)
        nonfinite = [k for k, v in values.items() if not math.isfinite(v)]
        if nonfinite or bad:
            # name the objective(s) whose gradient is broken
            culprits = [k for k in OBJECTIVES
                        if run_step(name, dtype, torch.Generator().manual_seed(seed + step), only=k)[1]]
            pytest.fail(f"step {step}, scenario {name}, {dtype}: non-finite losses {nonfinite}, "
                        f"gradients of {bad} (objectives: {culprits})")
        seen[name] += 1
    return seen


def test_every_objective_is_finite_at_every_scenario_and_precision():
    """Each (scenario, precision) pair once, objective by objective (clear failure messages)."""
    for i, name in enumerate(SCENARIOS):
        for dtype in (torch.float16, torch.bfloat16):
            for obj in OBJECTIVES:
                if (name, obj) in KNOWN_ISSUES:
                    continue
                values, bad = run_step(name, dtype, torch.Generator().manual_seed(i), only=obj)
                assert math.isfinite(values[obj]) and not bad, (name, dtype, obj, values, bad)


def _hal_reference(sim: torch.Tensor, mu: float = 90.0, gamma: float = 0.5) -> float:
    """HAL's batch loss by explicit float64 loops (log-sum-exp shifted by hand)."""
    s = sim.detach().double().cpu().tolist()
    n = len(s)

    def smooth(values: list[float]) -> float:
        logits = [mu * (x - gamma) for x in values]
        top = max(logits)
        lse = top + math.log(sum(math.exp(z - top) for z in logits))
        return (max(lse, 0.0) + math.log1p(math.exp(-abs(lse)))) / mu   # softplus(lse) / mu

    total = 0.0
    for i in range(n):
        total += smooth([s[j][i] for j in range(n) if j != i])   # column i: images vs caption i
        total += smooth([s[i][j] for j in range(n) if j != i])   # row i: captions vs image i
        total -= math.log1p(max(0.0, s[i][i]))
    return total / n


def test_similarity_preserving_gradient_is_finite_at_all_zero_scores():
    """Was a defect: normalising an all-zero row with eps 1e-12 gave an inf fp16 gradient."""
    values, bad = run_step("zeros", torch.float16, torch.Generator().manual_seed(0), only="similarity_preserving")
    assert not bad


def test_extreme_values_are_what_the_formulas_give():
    """Spot checks that the stress scenarios really are extreme, against float64 by hand."""
    g = torch.Generator().manual_seed(0)
    img, txt, *_ = scenario("equal", g)
    sim = (img @ txt.t()).double()
    assert torch.allclose(sim, torch.ones(B, B, dtype=torch.float64), atol=1e-6)
    # VSE++ on a collapsed batch: every hinge is the margin -> 2 * B * margin
    assert triplet_loss(sim).total.item() == pytest.approx(2 * B * 0.2, abs=1e-6)
    # HAL batch loss at S = 1 everywhere, mu = 90, gamma = 0.5: by hand in float64
    per_sum = math.log1p((B - 1) * math.exp(90 * 0.5)) / 90
    expected = 2 * per_sum - math.log(2.0)
    assert batch_hal_loss(sim).total.item() == pytest.approx(expected, rel=1e-9)
    assert _hal_reference(sim) == pytest.approx(expected, rel=1e-12)
    # in fp16 under autocast: the loss equals the float64 formula on the fp16 similarities
    with torch.autocast(DEVICE.type, dtype=torch.float16):
        s16 = img.to(DEVICE) @ txt.to(DEVICE).t()
    assert s16.dtype == torch.float16
    assert batch_hal_loss(s16).total.item() == pytest.approx(_hal_reference(s16), rel=1e-5)
    _, _, _, _, q, _ = scenario("plus_minus_one", g)
    assert set(torch.round(q.t() @ q).unique().tolist()) <= {-1.0, 1.0}


def test_100_random_steps():
    seen = stress(100, seed=1)
    assert all(n >= 5 for n in seen.values()), seen


@pytest.mark.slow
def test_1000_random_steps():
    seen = stress(1000, seed=2)
    assert sum(seen.values()) == 1000 and min(seen.values()) > 100


# ---------------------------------------------------------------------------------------------
# Collapse detection through a real Trainer step
# ---------------------------------------------------------------------------------------------
def _collapsed_data(folder, n_images: int = 4):
    """Every image has identical regions and every caption is the same sentence."""
    from userlab.data.precomp import write_precomp_split
    ims = np.full((n_images, 4, 8), 0.25, dtype=np.float32)
    for split in ("train", "dev"):
        write_precomp_split(folder, split, ims, ["a red dog in the park"] * (5 * n_images))
    return folder


def _trainer(data_root, run_dir):
    from tiny import tiny_config
    from userlab.train import Trainer
    cfg = tiny_config(data_root, run_dir, **{"model.enhancement": "none", "data.caption_augment": False,
                                             "model.guide_dim": 6})
    return Trainer(cfg, progress=False)


def test_trainer_step_warns_on_collapsed_batch(tmp_path):
    trainer = _trainer(_collapsed_data(tmp_path / "data"), tmp_path / "run")
    batch = next(iter(trainer._loader(epoch=0, skip=0)))
    with pytest.warns(CollapseWarning, match="collapsed"):
        row = trainer.train_step(batch)
    # identical inputs give identical embeddings: positive and negative similarity coincide
    assert row["pos_sim"] == pytest.approx(row["neg_sim"], abs=1e-6)
    assert math.isfinite(row["loss"]) and math.isfinite(row["grad_norm"])


def test_trainer_step_does_not_warn_on_ordinary_batch(tmp_path):
    from tiny import tiny_data
    trainer = _trainer(tiny_data(tmp_path / "data"), tmp_path / "run")
    batch = next(iter(trainer._loader(epoch=0, skip=0)))
    with warnings.catch_warnings():
        warnings.simplefilter("error", CollapseWarning)
        trainer.train_step(batch)


def test_check_collapse_threshold():
    with pytest.warns(CollapseWarning):
        assert check_collapse(torch.full((3, 3), 0.7) + 1e-5 * torch.eye(3))
    with warnings.catch_warnings():
        warnings.simplefilter("error", CollapseWarning)
        assert not check_collapse(torch.eye(3))
        assert not check_collapse(torch.ones(1, 1))

"""Tests of userlab.boosting against explicit float64 loops written here.

Every reference below walks over i and j in plain Python (math, lists), taking the max or sum
by hand, so it shares no code with the vectorised implementation.
"""
from __future__ import annotations

import math

import pytest
import torch

from userlab import boosting
from userlab.boosting import (STRATEGIES, absolute_boost, cascade_loss, dbl_loss, dino_distill,
                              infimum_margin, margins, mutual_loss, peer_kl, raw_triplet,
                              relative_boost, score_matching, similarity_preserving,
                              strategy_loss, supremum_margin, violation_rate)
from userlab.config import BOOST_STRATEGIES, BoostConfig
from userlab.errors import ConfigError, DataError

SIZES = (1, 2, 3, 6)
SOFT = (None, "hard", "soft")
REDUCTIONS = ("max", "sum")


def rand_scores(b: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    """Random (b, b) matrix uniform in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(b, b, generator=g, dtype=torch.float64) * 2 - 1).to(dtype)


def pair(b: int, seed: int = 0):
    return rand_scores(b, 2 * seed), rand_scores(b, 2 * seed + 1)


# -- reference loops ------------------------------------------------------------------------
def hinge(x: float) -> float:
    return x if x > 0 else 0.0


def ref_sup(ref: float, m: float, edge: float, mode):
    """Literal formulas of the notes (exp form, not tanh)."""
    if mode is None:
        return m
    if mode == "hard":
        return min(m, edge - ref)
    return 2 * m / (1 + math.exp((2 / m) * (ref - edge))) - m


def ref_inf(ref: float, m: float, edge: float, mode):
    if mode is None:
        return m
    if mode == "hard":
        return min(m, edge + ref)
    return 2 * m / (1 + math.exp(-(2 / m) * (ref + edge))) - m


def combine(values: list[float], reduction: str) -> float:
    if reduction == "sum":
        return sum(values)
    best = 0.0  # hinge values are >= 0, so an empty max is 0
    for v in values:
        if v > best:
            best = v
    return best


def loop_raw(S, margin):
    S = S.tolist()
    b = len(S)
    total = 0.0
    for i in range(b):
        total += combine([hinge(margin + S[i][j] - S[i][i]) for j in range(b) if j != i], "max")
    for j in range(b):
        total += combine([hinge(margin + S[i][j] - S[j][j]) for i in range(b) if i != j], "max")
    return total


def loop_relative(St, Sa, margin, beta, reduction, soft):
    St, Sa = St.tolist(), Sa.tolist()
    b, g = len(St), margin * beta
    total = 0.0
    for i in range(b):
        costs = []
        for j in range(b):
            if j == i:
                continue
            gap_a, gap_t = Sa[i][i] - Sa[i][j], St[i][i] - St[i][j]
            costs.append(hinge(ref_sup(gap_a, g, 2.0, soft) + gap_a - gap_t))
        total += combine(costs, reduction)
    for j in range(b):
        costs = []
        for i in range(b):
            if i == j:
                continue
            gap_a, gap_t = Sa[j][j] - Sa[i][j], St[j][j] - St[i][j]
            costs.append(hinge(ref_sup(gap_a, g, 2.0, soft) + gap_a - gap_t))
        total += combine(costs, reduction)
    return total


def loop_absolute(St, Sa, margin, beta, reduction, soft):
    St, Sa = St.tolist(), Sa.tolist()
    b, g = len(St), 0.5 * margin * beta
    total = 0.0
    for i in range(b):
        total += 2 * hinge(ref_sup(Sa[i][i], g, 1.0, soft) + Sa[i][i] - St[i][i])
    for i in range(b):
        total += combine([hinge(ref_inf(Sa[i][j], g, 1.0, soft) + St[i][j] - Sa[i][j])
                          for j in range(b) if j != i], reduction)
    for j in range(b):
        total += combine([hinge(ref_inf(Sa[i][j], g, 1.0, soft) + St[i][j] - Sa[i][j])
                          for i in range(b) if i != j], reduction)
    return total


def transpose(M):
    return [list(r) for r in zip(*M)]


def softmax_row(row, scale):
    top = max(scale * x for x in row)
    e = [math.exp(scale * x - top) for x in row]
    z = sum(e)
    return [v / z for v in e]


def loop_kl(St, Sa, scale=10.0):
    total = 0.0
    for Mt, Ma in ((St.tolist(), Sa.tolist()), (transpose(St.tolist()), transpose(Sa.tolist()))):
        b = len(Mt)
        acc = 0.0
        for i in range(b):
            p_s, p_t = softmax_row(Mt[i], scale), softmax_row(Ma[i], scale)
            acc += sum(p_t[j] * (math.log(p_t[j]) - math.log(p_s[j])) for j in range(b))
        total += acc / b
    return total


def loop_ce(St, Sa, scale=10.0):
    total = 0.0
    for Mt, Ma in ((St.tolist(), Sa.tolist()), (transpose(St.tolist()), transpose(Sa.tolist()))):
        b = len(Mt)
        acc = 0.0
        for i in range(b):
            p_s, p_t = softmax_row(Mt[i], scale), softmax_row(Ma[i], scale)
            acc += -sum(p_t[j] * math.log(p_s[j]) for j in range(b))
        total += acc / b
    return total


def loop_smooth_l1(St, Sa, scale=10.0):
    St, Sa = St.tolist(), Sa.tolist()
    b = len(St)
    acc = 0.0
    for i in range(b):
        for j in range(b):
            d = abs(St[i][j] - Sa[i][j])
            acc += 0.5 * d * d if d < 1.0 else d - 0.5
    return scale * acc / (b * b)


def loop_sp(St, Sa, scale=10.0):
    total = 0.0
    for Mt, Ma in ((St.tolist(), Sa.tolist()), (transpose(St.tolist()), transpose(Sa.tolist()))):
        b = len(Mt)
        acc = 0.0
        for i in range(b):
            nt = math.sqrt(sum(x * x for x in Mt[i]))
            na = math.sqrt(sum(x * x for x in Ma[i]))
            acc += sum((Mt[i][j] / nt - Ma[i][j] / na) ** 2 for j in range(b))
        total += acc / b
    return scale * total


# -- raw loss ---------------------------------------------------------------------------------
@pytest.mark.parametrize("b", SIZES)
@pytest.mark.parametrize("margin", (0.2, 0.5))
def test_raw_triplet_matches_loop(b, margin):
    S = rand_scores(b, seed=b)
    out = raw_triplet(S, margin)
    assert out.total.dtype == torch.float64
    assert out.total.item() == pytest.approx(loop_raw(S, margin), abs=1e-12)
    assert (out.terms["i2t"] + out.terms["t2i"]).item() == pytest.approx(out.total.item())


def test_raw_triplet_zero_when_positives_dominate():
    S = torch.full((4, 4), -0.5, dtype=torch.float64)
    S.fill_diagonal_(0.5)
    assert raw_triplet(S, 0.2).total.item() == 0.0
    # margin 1.5 > gap 1.0: every query violates by 0.5, 8 queries
    assert raw_triplet(S, 1.5).total.item() == pytest.approx(8 * 0.5)


# -- boosting losses against loops ----------------------------------------------------------
@pytest.mark.parametrize("b", SIZES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("soft", SOFT)
@pytest.mark.parametrize("beta", (1.0, 0.5))
def test_relative_boost_matches_loop(b, reduction, soft, beta):
    for seed in range(3):
        St, Sa = pair(b, seed)
        out = relative_boost(St, Sa, margin=0.2, beta=beta, reduction=reduction, soft=soft)
        expected = loop_relative(St, Sa, 0.2, beta, reduction, soft)
        assert out.total.item() == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("b", SIZES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("soft", SOFT)
@pytest.mark.parametrize("beta", (1.0, 0.5))
def test_absolute_boost_matches_loop(b, reduction, soft, beta):
    for seed in range(3):
        St, Sa = pair(b, seed)
        out = absolute_boost(St, Sa, margin=0.2, beta=beta, reduction=reduction, soft=soft)
        expected = loop_absolute(St, Sa, 0.2, beta, reduction, soft)
        assert out.total.item() == pytest.approx(expected, abs=1e-12)
        parts = out.terms["positive"] + out.terms["i2t"] + out.terms["t2i"]
        assert parts.item() == pytest.approx(out.total.item(), abs=1e-12)


def test_boost_losses_are_nonzero_on_random_inputs():
    # guards against a loop and an implementation that are both trivially zero
    St, Sa = pair(6, 7)
    assert relative_boost(St, Sa).total.item() > 0.1
    assert absolute_boost(St, Sa).total.item() > 0.1


def test_boost_is_zero_when_target_beats_anchor_by_the_margin():
    Sa = rand_scores(5, 3) * 0.5
    eye = torch.eye(5, dtype=torch.bool)
    # target: positives up by 0.1, negatives down by 0.1 -> absolute hinge exactly satisfied
    St = torch.where(eye, Sa + 0.1, Sa - 0.1)
    assert absolute_boost(St, Sa, margin=0.2).total.item() == pytest.approx(0.0, abs=1e-12)
    # every gap grows by 0.2 -> relative hinge exactly at zero
    assert relative_boost(St, Sa, margin=0.2).total.item() == pytest.approx(0.0, abs=1e-12)
    # a larger margin is violated again
    assert relative_boost(St, Sa, margin=0.3).total.item() > 0


def test_sum_form_upper_bounds_max_form():
    St, Sa = pair(6, 4)
    for fn in (relative_boost, absolute_boost):
        assert fn(St, Sa, reduction="sum").total.item() >= fn(St, Sa, reduction="max").total.item()


def test_soft_adaptation_never_increases_the_loss():
    # adapted margins are <= the nominal margin entry by entry, so the hinge can only shrink
    St, Sa = pair(6, 5)
    for fn in (relative_boost, absolute_boost):
        base = fn(St, Sa).total.item()
        assert fn(St, Sa, soft="hard").total.item() <= base + 1e-12
        assert fn(St, Sa, soft="soft").total.item() <= base + 1e-12


# -- anchor never receives gradients --------------------------------------------------------
@pytest.mark.parametrize("name", sorted(set(BOOST_STRATEGIES) - {"none"}))
def test_anchor_is_detached_in_every_strategy(name):
    St = rand_scores(5, 11).requires_grad_(True)
    Sa = rand_scores(5, 12).requires_grad_(True)
    cfg = BoostConfig(strategy=name)
    boost = STRATEGIES[name](St, Sa, cfg).total
    assert boost.requires_grad
    boost.backward()
    assert Sa.grad is None
    assert St.grad is not None and St.grad.abs().sum().item() > 0


@pytest.mark.parametrize("soft", SOFT)
def test_anchor_is_detached_in_dbl_loss(soft):
    for strategy in ("relative", "absolute", "relative_sum", "absolute_sum"):
        St = rand_scores(4, 1).requires_grad_(True)
        Sa = rand_scores(4, 2).requires_grad_(True)
        cfg = BoostConfig(strategy=strategy, soft_adaptation=soft or "none")
        dbl_loss(St, Sa, cfg).total.backward()
        assert Sa.grad is None and St.grad is not None


def test_boost_gradient_matches_finite_differences():
    # piecewise-linear losses at a fixed random point (no ties, no hinge exactly at 0)
    St, Sa = pair(4, 9)
    St.requires_grad_(True)
    for fn in (lambda s: relative_boost(s, Sa, soft="soft").total,
               lambda s: absolute_boost(s, Sa, reduction="sum").total,
               lambda s: peer_kl(s, Sa).total,
               lambda s: dino_distill(s, Sa).total,
               lambda s: similarity_preserving(s, Sa).total,
               lambda s: score_matching(s, Sa).total):
        assert torch.autograd.gradcheck(fn, (St,), eps=1e-7, atol=1e-5)


# -- soft-adaptation margins -----------------------------------------------------------------
@pytest.mark.parametrize("mode", ("hard", "soft"))
@pytest.mark.parametrize("m,edge", [(0.1, 1.0), (0.2, 2.0)])
def test_margins_at_their_bounds(mode, m, edge):
    at_edge = torch.tensor([edge], dtype=torch.float64)
    assert supremum_margin(at_edge, m, edge, mode).item() == pytest.approx(0.0, abs=1e-12)
    assert infimum_margin(-at_edge, m, edge, mode).item() == pytest.approx(0.0, abs=1e-12)
    far = torch.tensor([edge - 10 * m - 1.0], dtype=torch.float64)
    assert supremum_margin(far, m, edge, mode).item() == pytest.approx(m, rel=1e-6)
    assert infimum_margin(-far, m, edge, mode).item() == pytest.approx(m, rel=1e-6)


@pytest.mark.parametrize("mode", ("hard", "soft"))
def test_margins_bounded_and_monotone(mode):
    m, edge = 0.1, 1.0
    ref = torch.linspace(-1.0, 1.0, 401, dtype=torch.float64)
    sup = supremum_margin(ref, m, edge, mode)
    inf = infimum_margin(ref, m, edge, mode)
    assert (sup <= m + 1e-15).all() and (inf <= m + 1e-15).all()
    assert (sup <= edge - ref + 1e-15).all()      # never asks past the upper bound
    assert (inf <= edge + ref + 1e-15).all()      # never asks past the lower bound
    assert (sup >= 0).all() and (inf >= 0).all()  # ref inside [-edge, edge]
    assert (sup[1:] <= sup[:-1]).all()            # shrinks as ref approaches the top
    assert (inf[1:] >= inf[:-1]).all()            # grows as ref leaves the bottom
    if mode == "soft":  # smooth version lies under the hard one, strictly near the kink
        assert (sup <= supremum_margin(ref, m, edge, "hard") + 1e-15).all()
        kink = torch.tensor([edge - m], dtype=torch.float64)
        assert supremum_margin(kink, m, edge, "soft").item() == pytest.approx(m * math.tanh(1.0))


@pytest.mark.parametrize("m,edge", [(0.1, 1.0), (0.2, 2.0)])
def test_soft_margins_match_literal_formulas(m, edge):
    ref = torch.linspace(-edge, edge, 57, dtype=torch.float64)
    sup = supremum_margin(ref, m, edge, "soft")
    inf = infimum_margin(ref, m, edge, "soft")
    hsup = supremum_margin(ref, m, edge, "hard")
    hinf = infimum_margin(ref, m, edge, "hard")
    for k, r in enumerate(ref.tolist()):
        assert sup[k].item() == pytest.approx(ref_sup(r, m, edge, "soft"), abs=1e-12)
        assert inf[k].item() == pytest.approx(ref_inf(r, m, edge, "soft"), abs=1e-12)
        assert hsup[k].item() == pytest.approx(min(m, edge - r), abs=1e-15)
        assert hinf[k].item() == pytest.approx(min(m, edge + r), abs=1e-15)


def test_margins_are_detached_and_validated():
    ref = torch.zeros(3, requires_grad=True)
    assert not supremum_margin(ref, 0.1, 1.0, "soft").requires_grad
    assert not infimum_margin(ref * 2, 0.1, 1.0, "hard").requires_grad
    assert supremum_margin(ref, 0.0, 1.0, "soft").abs().sum().item() == 0.0
    with pytest.raises(ConfigError, match="boost.margin"):
        supremum_margin(ref, -0.1, 1.0, "hard")
    with pytest.raises(ConfigError, match="boost.soft_adaptation"):
        infimum_margin(ref, 0.1, 1.0, "smooth")


# -- DBL objective, cascade, registry --------------------------------------------------------
@pytest.mark.parametrize("strategy", ("relative", "absolute", "relative_sum", "absolute_sum"))
@pytest.mark.parametrize("soft", ("none", "hard", "soft"))
def test_dbl_loss_is_raw_plus_alpha_boost(strategy, soft):
    St, Sa = pair(5, 2)
    cfg = BoostConfig(strategy=strategy, margin=0.3, beta=0.5, alpha=0.7, soft_adaptation=soft)
    out = dbl_loss(St, Sa, cfg)
    loop = loop_relative if strategy.startswith("relative") else loop_absolute
    reduction = "sum" if strategy.endswith("_sum") else "max"
    boost = loop(St, Sa, 0.3, 0.5, reduction, None if soft == "none" else soft)
    raw = loop_raw(St, 0.3)
    assert set(out.terms) == {"raw", "boost"}
    assert out.terms["raw"].item() == pytest.approx(raw, abs=1e-12)
    assert out.terms["boost"].item() == pytest.approx(boost, abs=1e-12)
    assert out.total.item() == pytest.approx(raw + 0.7 * boost, abs=1e-12)


COMPARISON_LOOPS = {
    "score_matching": loop_smooth_l1,
    "similarity_preserving": loop_sp,
    "mutual": loop_kl,
    "dino": loop_ce,
}


@pytest.mark.parametrize("name", sorted(COMPARISON_LOOPS))
@pytest.mark.parametrize("b", (2, 3, 6))
def test_comparison_strategies_match_loops(name, b):
    St, Sa = pair(b, 3)
    cfg = BoostConfig(strategy=name, alpha=0.5)
    out = strategy_loss(name, St, Sa, cfg)
    boost = COMPARISON_LOOPS[name](St, Sa)
    assert boost > 0
    assert out.terms["boost"].item() == pytest.approx(boost, rel=1e-10, abs=1e-12)
    assert out.terms["raw"].item() == pytest.approx(loop_raw(St, 0.2), abs=1e-12)
    assert out.total.item() == pytest.approx(loop_raw(St, 0.2) + 0.5 * boost, rel=1e-10)


def test_smooth_l1_uses_both_branches_of_the_huber_curve():
    # differences above 1 take the linear branch; checks the threshold is on raw scores
    St = torch.tensor([[1.0, -1.0], [0.9, 0.0]], dtype=torch.float64)
    Sa = torch.tensor([[-1.0, 1.0], [0.8, 0.0]], dtype=torch.float64)
    assert score_matching(St, Sa).total.item() == pytest.approx(loop_smooth_l1(St, Sa), abs=1e-12)
    assert score_matching(St, Sa).total.item() == pytest.approx(10 * (1.5 + 1.5 + 0.005) / 4)


def test_distillation_terms_vanish_when_scores_agree():
    S = rand_scores(5, 8)
    assert score_matching(S, S.clone()).total.item() == 0.0
    assert similarity_preserving(S, S.clone()).total.item() == pytest.approx(0.0, abs=1e-12)
    assert peer_kl(S, S.clone()).total.item() == pytest.approx(0.0, abs=1e-12)
    # cross entropy equals the entropy of the teacher, not zero
    assert dino_distill(S, S.clone()).total.item() == pytest.approx(loop_ce(S, S), abs=1e-12)


def test_none_strategy_is_raw_only():
    St, Sa = pair(4, 1)
    out = strategy_loss("none", St, Sa, BoostConfig(strategy="none"))
    assert out.terms["boost"].item() == 0.0
    assert out.total.item() == pytest.approx(loop_raw(St, 0.2), abs=1e-12)


def test_registry_follows_config_and_rejects_unknown_names():
    assert set(STRATEGIES) == set(BOOST_STRATEGIES)
    St, Sa = pair(3)
    with pytest.raises(ConfigError, match="boost.strategy") as info:
        strategy_loss("rkd", St, Sa, BoostConfig())
    assert info.value.field == "boost.strategy" and "rkd" in str(info.value)
    with pytest.raises(ConfigError, match="boost.strategy"):
        dbl_loss(St, Sa, BoostConfig(strategy="boostrel"))
    with pytest.raises(ConfigError, match="boost.soft_adaptation"):
        dbl_loss(St, Sa, BoostConfig(soft_adaptation="tanh"))
    with pytest.raises(ConfigError, match="reduction"):
        relative_boost(St, Sa, reduction="mean")


@pytest.mark.parametrize("strategy", ("relative", "absolute", "dino"))
def test_cascade_loss(strategy):
    cfg = BoostConfig(strategy=strategy, alpha=0.5)
    S0, S1, S2 = (rand_scores(5, 20 + k) for k in range(3))
    first = cascade_loss(S0, [], cfg)
    assert first.total.item() == pytest.approx(loop_raw(S0, 0.2), abs=1e-12)
    assert first.terms["boost"].item() == 0.0
    third = cascade_loss(S2, [S0, S1], cfg)
    if strategy == "dino":
        boosts = [loop_ce(S2, S0), loop_ce(S2, S1)]
    else:
        loop = loop_relative if strategy == "relative" else loop_absolute
        boosts = [loop(S2, S, 0.2, 1.0, "max", None) for S in (S0, S1)]
    expected = loop_raw(S2, 0.2) + 0.5 * (boosts[0] + boosts[1]) / 2
    assert third.total.item() == pytest.approx(expected, abs=1e-12)


def test_cascade_detaches_every_anchor():
    S0 = rand_scores(4, 1).requires_grad_(True)
    S1 = rand_scores(4, 2).requires_grad_(True)
    S2 = rand_scores(4, 3).requires_grad_(True)
    cascade_loss(S2, [S0, S1], BoostConfig()).total.backward()
    assert S0.grad is None and S1.grad is None and S2.grad is not None


def test_mutual_loss_trains_each_branch_from_the_detached_peer():
    S1 = rand_scores(4, 5).requires_grad_(True)
    S2 = rand_scores(4, 6).requires_grad_(True)
    cfg = BoostConfig(alpha=2.0)
    out1, out2 = mutual_loss(S1, S2, cfg)
    with torch.no_grad():
        expected1 = loop_raw(S1, 0.2) + 2 * loop_kl(S1, S2)
        expected2 = loop_raw(S2, 0.2) + 2 * loop_kl(S2, S1)
        assert out1.total.item() == pytest.approx(expected1, abs=1e-12)
        assert out2.total.item() == pytest.approx(expected2, abs=1e-12)
    out1.total.backward()
    assert S2.grad is None and S1.grad is not None
    # summing both sides gives each branch only its own gradient
    g1 = S1.grad.clone()
    S1.grad = None
    out1, out2 = mutual_loss(S1, S2, cfg)
    (out1.total + out2.total).backward()
    assert torch.allclose(S1.grad, g1)
    assert S2.grad is not None


# -- dtype and input checks ------------------------------------------------------------------
def test_float32_under_autocast():
    St = rand_scores(6, 1, dtype=torch.bfloat16).requires_grad_(True)
    Sa = rand_scores(6, 2, dtype=torch.bfloat16)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        for name in BOOST_STRATEGIES:
            out = strategy_loss(name, St, Sa, BoostConfig(strategy=name))
            assert out.total.dtype == torch.float32, name
            assert out.terms["boost"].dtype == torch.float32, name
    out = dbl_loss(St, Sa, BoostConfig())
    St64, Sa64 = St.double(), Sa.double()
    expected = loop_raw(St64, 0.2) + loop_relative(St64, Sa64, 0.2, 1.0, "max", None)
    assert out.total.item() == pytest.approx(expected, abs=1e-4)
    out.total.backward()
    assert St.grad.dtype == torch.bfloat16


def test_bad_shapes_raise_data_error():
    with pytest.raises(DataError, match="square"):
        raw_triplet(torch.zeros(3, 4))
    with pytest.raises(DataError, match="same shape"):
        relative_boost(torch.zeros(3, 3), torch.zeros(4, 4))
    with pytest.raises(DataError, match="S_t"):
        absolute_boost(torch.zeros(3), torch.zeros(3))


# -- diagnostics -----------------------------------------------------------------------------
@pytest.mark.parametrize("b", (2, 3, 6))
def test_margins_match_loop(b):
    S = rand_scores(b, 30 + b)
    i2t, t2i = margins(S)
    L = S.tolist()
    for i in range(b):
        assert i2t[i].item() == pytest.approx(L[i][i] - max(L[i][j] for j in range(b) if j != i))
        assert t2i[i].item() == pytest.approx(L[i][i] - max(L[j][i] for j in range(b) if j != i))


@pytest.mark.parametrize("strategy", ("relative", "absolute"))
@pytest.mark.parametrize("soft", SOFT)
def test_violation_rate_matches_loop(strategy, soft):
    St, Sa = pair(6, 4)
    St = St * 0.8 + 0.2 * Sa  # mix so that some queries are satisfied and some are not
    Lt, La, b = St.tolist(), Sa.tolist(), 6
    active = 0
    for q in range(b):
        for by_row in (True, False):
            hits = []
            for o in range(b):
                if o == q:
                    continue
                i, j = (q, o) if by_row else (o, q)
                if strategy == "relative":
                    gap_a = La[q][q] - La[i][j]
                    gap_t = Lt[q][q] - Lt[i][j]
                    hits.append(ref_sup(gap_a, 0.2, 2.0, soft) + gap_a - gap_t > 0)
                else:
                    hits.append(ref_inf(La[i][j], 0.1, 1.0, soft) + Lt[i][j] - La[i][j] > 0)
            if strategy == "absolute":
                hits.append(ref_sup(La[q][q], 0.1, 1.0, soft) + La[q][q] - Lt[q][q] > 0)
            active += any(hits)
    rate = violation_rate(St, Sa, 0.2, strategy=strategy, soft=soft)
    assert rate == pytest.approx(active / (2 * b))
    assert 0.0 < rate < 1.0 or strategy == "absolute"


def test_violation_rate_zero_when_target_far_ahead_and_rejects_non_boosting():
    Sa = rand_scores(5, 3) * 0.3
    eye = torch.eye(5, dtype=torch.bool)
    St = torch.where(eye, Sa + 0.5, Sa - 0.5)
    assert violation_rate(St, Sa) == 0.0
    assert violation_rate(Sa, St) == 1.0
    with pytest.raises(ConfigError, match="boost.strategy"):
        violation_rate(St, Sa, strategy="dino")


def test_loss_output_shape():
    out = raw_triplet(rand_scores(3, 0))
    assert isinstance(out.total, torch.Tensor) and out.total.dim() == 0
    assert all(isinstance(v, torch.Tensor) for v in out.terms.values())
    assert boosting.LossOutput is type(out)


def test_violation_rate_counts_the_absolute_positive_hinge():
    # negatives comfortably below the anchor; only pair 0's positive falls short
    Sa = rand_scores(4, 9) * 0.3
    eye = torch.eye(4, dtype=torch.bool)
    St = torch.where(eye, Sa + 0.5, Sa - 0.5)
    St[0, 0] = Sa[0, 0]
    # the positive of pair 0 counts for image 0's row and caption 0's column: 2 of 8 queries
    assert violation_rate(St, Sa, 0.2, strategy="absolute") == pytest.approx(2 / 8)
    assert violation_rate(St, Sa, 0.2, strategy="absolute_sum") == pytest.approx(2 / 8)

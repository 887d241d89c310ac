"""Objectives of userlab.losses against explicit float64 loops, PML oracles and analytic values."""
from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from userlab.errors import ConfigError
from userlab.losses import (CollapseWarning, LossInputError, LossOutput, batch_hal_loss,
                            check_collapse, collapse_score, info_nce, triplet_loss, unified_objective)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: extra intra-op threads only fight over the two shared cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# -- independent references: plain Python floats, explicit loops ---------------------------------
def unit_rows(n: int, dim: int, gen: torch.Generator, dtype=torch.float64) -> torch.Tensor:
    return F.normalize(torch.randn(n, dim, generator=gen, dtype=dtype), dim=1)


def dot(a, b) -> float:
    total = 0.0
    for x, y in zip(a, b):
        total += x * y
    return total


def matmul_loop(a: torch.Tensor, b: torch.Tensor) -> list[list[float]]:
    """``a (N, E)`` times ``b (E, M)`` element by element."""
    al, bl = a.tolist(), b.t().tolist()
    return [[dot(row, col) for col in bl] for row in al]


def ref_hal_batch(S, mu, gamma, diagonal="mask", pos_mask=None):
    """L_mb of the method notes, term by term."""
    B = len(S)
    neg_sum = pos_sum = 0.0
    for i in range(B):
        col = row = 0.0
        for j in range(B):
            if j == i:
                if diagonal == "zero":  # the released code: S_ii replaced by 0, kept in the sum
                    col += math.exp(mu * (0.0 - gamma))
                    row += math.exp(mu * (0.0 - gamma))
                continue
            if pos_mask is None or not pos_mask[j][i]:
                col += math.exp(mu * (S[j][i] - gamma))     # caption i vs images j
            if pos_mask is None or not pos_mask[i][j]:
                row += math.exp(mu * (S[i][j] - gamma))     # image i vs captions j
        neg_sum += math.log(1.0 + col) / mu + math.log(1.0 + row) / mu
        pos_sum += -math.log(1.0 + max(0.0, S[i][i]))
    return (neg_sum + pos_sum) / B, neg_sum / B, pos_sum / B


def ref_queue_term(v, t, v_hat, t_hat, q_v, q_t, mu, gamma, mask_v=None, mask_t=None):
    """L_q of the method notes with every dot product written out."""
    B = len(v)
    K_t, K_v = len(q_t[0]), len(q_v[0])
    E = len(v[0])
    total_neg = total_pos = 0.0
    for queries, keys, queue, K, mask in ((v, t_hat, q_t, K_t, mask_v), (t, v_hat, q_v, K_v, mask_t)):
        neg = pos = 0.0
        for i in range(B):
            acc = 0.0
            for k in range(K):
                if mask is not None and not mask[i][k]:
                    continue
                s = 0.0
                for e in range(E):
                    s += queries[i][e] * queue[e][k]
                acc += math.exp(mu * (s - gamma))
            neg += math.log(1.0 + acc) / mu
            p = 0.0
            for e in range(E):
                p += queries[i][e] * keys[i][e]
            pos += -math.log(1.0 + max(0.0, p))
        total_neg += neg / B
        total_pos += pos / B
    return total_neg + total_pos, total_neg, total_pos


def ref_triplet(S, margin, max_violation, pos_mask=None):
    B = len(S)
    i2t = t2i = 0.0
    for i in range(B):
        costs = [0.0]
        for j in range(B):
            if j != i and (pos_mask is None or not pos_mask[i][j]):
                costs.append(max(0.0, margin + S[i][j] - S[i][i]))
        i2t += max(costs) if max_violation else sum(costs)
    for j in range(B):
        costs = [0.0]
        for i in range(B):
            if i != j and (pos_mask is None or not pos_mask[i][j]):
                costs.append(max(0.0, margin + S[i][j] - S[j][j]))
        t2i += max(costs) if max_violation else sum(costs)
    return i2t + t2i, i2t, t2i


def ref_info_nce(S, T):
    B = len(S)
    i2t = t2i = 0.0
    for i in range(B):
        denom = sum(math.exp(S[i][j] / T) for j in range(B))
        i2t += -(S[i][i] / T - math.log(denom))
        denom = sum(math.exp(S[j][i] / T) for j in range(B))
        t2i += -(S[i][i] / T - math.log(denom))
    return (i2t / B + t2i / B) / 2, i2t / B, t2i / B


def random_pos_mask(B, gen):
    """Symmetric 'same image' mask: captions grouped by a random image id."""
    ids = torch.randint(0, max(1, B // 2), (B,), generator=gen)
    return ids.unsqueeze(0) == ids.unsqueeze(1)


# -- UTO ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("B", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("use_mask", [False, True])
def test_batch_hal_matches_loops(B, use_mask):
    gen = torch.Generator().manual_seed(100 + B)
    for mu, gamma in ((90.0, 0.5), (10.0, 0.2), (30.0, -0.1)):
        sim = unit_rows(B, 6, gen) @ unit_rows(B, 6, gen).t()
        mask = random_pos_mask(B, gen) if use_mask else None
        out = batch_hal_loss(sim, mu=mu, gamma=gamma, positive_mask=mask)
        ref_total, ref_neg, ref_pos = ref_hal_batch(sim.tolist(), mu, gamma,
                                                    pos_mask=None if mask is None else mask.tolist())
        assert out.total.item() == pytest.approx(ref_total, rel=1e-10, abs=1e-12)
        assert out.terms["negative"].item() == pytest.approx(ref_neg, rel=1e-10, abs=1e-12)
        assert out.terms["positive"].item() == pytest.approx(ref_pos, rel=1e-10, abs=1e-12)


@pytest.mark.parametrize("B", [2, 4, 7])
def test_batch_hal_zero_diagonal_reproduces_original_and_matches_mask(B):
    gen = torch.Generator().manual_seed(B)
    sim = unit_rows(B, 5, gen) @ unit_rows(B, 5, gen).t()
    zero = batch_hal_loss(sim, diagonal="zero").total.item()
    assert zero == pytest.approx(ref_hal_batch(sim.tolist(), 90.0, 0.5, diagonal="zero")[0], rel=1e-10)
    masked = batch_hal_loss(sim, diagonal="mask").total.item()
    assert abs(zero - masked) < 1e-6
    # Small mu makes e^{-mu*gamma} visible: the two modes must then really differ.
    z = batch_hal_loss(sim, mu=1.0, gamma=0.0, diagonal="zero").total.item()
    m = batch_hal_loss(sim, mu=1.0, gamma=0.0, diagonal="mask").total.item()
    assert abs(z - m) > 1e-3


def test_batch_hal_float32_close_to_float64_reference():
    gen = torch.Generator().manual_seed(7)
    sim = (unit_rows(16, 32, gen) @ unit_rows(16, 32, gen).t()).float()
    out = batch_hal_loss(sim)
    assert out.total.dtype == torch.float32
    assert out.total.item() == pytest.approx(ref_hal_batch(sim.double().tolist(), 90.0, 0.5)[0], rel=1e-5)


def make_uto_inputs(B, E, K_v, K_t, gen, dtype=torch.float64):
    v, t = unit_rows(B, E, gen, dtype), unit_rows(B, E, gen, dtype)
    v_hat, t_hat = unit_rows(B, E, gen, dtype), unit_rows(B, E, gen, dtype)
    q_v, q_t = unit_rows(K_v, E, gen, dtype).t(), unit_rows(K_t, E, gen, dtype).t()
    return v, t, v_hat, t_hat, q_v, q_t


UTO_CASES = [(B, K_v, K_t, kind)
             for B, K_v, K_t in [(1, 3, 3), (2, 5, 4), (4, 8, 8), (6, 11, 7)]
             for kind in ("none", "single", "pair")
             if kind != "single" or K_v == K_t]  # one mask for both needs equal queue sizes


@pytest.mark.parametrize("B,K_v,K_t,mask_kind", UTO_CASES)
def test_unified_objective_matches_loops(B, K_v, K_t, mask_kind):
    gen = torch.Generator().manual_seed(B * 31 + K_v)
    E = 6
    v, t, v_hat, t_hat, q_v, q_t = make_uto_inputs(B, E, K_v, K_t, gen)
    mask_v = mask_t = None
    queue_mask = None
    if mask_kind == "single":
        mask_v = mask_t = torch.rand(B, K_t, generator=gen) > 0.3
        queue_mask = mask_v
    elif mask_kind == "pair":
        mask_v = torch.rand(B, K_t, generator=gen) > 0.3
        mask_t = torch.rand(B, K_v, generator=gen) > 0.5
        mask_t[0] = False  # a query with no allowed negative at all
        queue_mask = (mask_v, mask_t)
    S = matmul_loop(v, t.t())
    sim = v @ t.t()
    mu, gamma, lam = 90.0, 0.5, 20.0
    out = unified_objective(sim, v, t, v_hat, t_hat, q_v, q_t, mu=mu, gamma=gamma,
                            lambda_batch=lam, queue_mask=queue_mask)
    ref_b, ref_b_neg, ref_b_pos = ref_hal_batch(S, mu, gamma)
    ref_q, ref_q_neg, ref_q_pos = ref_queue_term(
        v.tolist(), t.tolist(), v_hat.tolist(), t_hat.tolist(), q_v.tolist(), q_t.tolist(), mu, gamma,
        None if mask_v is None else mask_v.tolist(), None if mask_t is None else mask_t.tolist())
    close = dict(rel=1e-9, abs=1e-12)
    assert out.terms["batch"].item() == pytest.approx(ref_b, **close)
    assert out.terms["batch_negative"].item() == pytest.approx(ref_b_neg, **close)
    assert out.terms["batch_positive"].item() == pytest.approx(ref_b_pos, **close)
    assert out.terms["queue"].item() == pytest.approx(ref_q, **close)
    assert out.terms["queue_negative"].item() == pytest.approx(ref_q_neg, **close)
    assert out.terms["queue_positive"].item() == pytest.approx(ref_q_pos, **close)
    assert out.total.item() == pytest.approx(lam * ref_b + ref_q, **close)


def test_unified_objective_lambda_scales_only_batch_term():
    gen = torch.Generator().manual_seed(3)
    v, t, v_hat, t_hat, q_v, q_t = make_uto_inputs(5, 8, 9, 9, gen)
    sim = v @ t.t()
    outs = {lam: unified_objective(sim, v, t, v_hat, t_hat, q_v, q_t, lambda_batch=lam)
            for lam in (0.0, 1.0, 20.0)}
    l_mb = outs[1.0].terms["batch"].item()
    l_q = outs[1.0].terms["queue"].item()
    assert outs[0.0].total.item() == pytest.approx(l_q, rel=1e-12)
    assert outs[20.0].total.item() == pytest.approx(20 * l_mb + l_q, rel=1e-12)
    assert outs[20.0].total.item() - outs[1.0].total.item() == pytest.approx(19 * l_mb, rel=1e-9)


def test_unified_objective_without_queue_is_scaled_hal():
    gen = torch.Generator().manual_seed(4)
    v, t = unit_rows(6, 8, gen), unit_rows(6, 8, gen)
    sim = v @ t.t()
    out = unified_objective(sim, v, t, lambda_batch=3.0)
    assert "queue" not in out.terms
    assert out.total.item() == pytest.approx(3.0 * ref_hal_batch(sim.tolist(), 90.0, 0.5)[0], rel=1e-10)


def test_unified_objective_rejects_partial_queue_and_bad_shapes():
    gen = torch.Generator().manual_seed(5)
    v, t, v_hat, t_hat, q_v, q_t = make_uto_inputs(4, 8, 6, 6, gen)
    sim = v @ t.t()
    with pytest.raises(LossInputError, match="missing txt_queue"):
        unified_objective(sim, v, t, v_hat, t_hat, q_v, None)
    with pytest.raises(LossInputError, match="img_queue"):
        unified_objective(sim, v, t, v_hat, t_hat, q_v.t(), q_t)
    with pytest.raises(LossInputError, match="queue_mask"):
        unified_objective(sim, v, t, v_hat, t_hat, q_v, q_t, queue_mask=torch.ones(4, 5, dtype=torch.bool))
    with pytest.raises(LossInputError, match="sim"):
        unified_objective(sim[:3], v, t)
    with pytest.raises(ConfigError, match="loss.mu"):
        batch_hal_loss(sim, mu=0.0)


def test_queue_receives_no_gradient_and_keys_are_detached():
    gen = torch.Generator().manual_seed(6)
    v, t, v_hat, t_hat, q_v, q_t = make_uto_inputs(4, 8, 6, 6, gen)
    leaves = [x.clone().requires_grad_(True) for x in (v, t, v_hat, t_hat, q_v, q_t)]
    v_, t_, vh, th, qv, qt = leaves
    unified_objective(v_ @ t_.t(), v_, t_, vh, th, qv, qt).total.backward()
    assert v_.grad is not None and t_.grad is not None
    assert all(x.grad is None for x in (vh, th, qv, qt))


# -- triplet ------------------------------------------------------------------------------------
@pytest.mark.parametrize("B", [1, 2, 3, 6, 9])
@pytest.mark.parametrize("max_violation", [True, False])
@pytest.mark.parametrize("use_mask", [False, True])
def test_triplet_matches_loops(B, max_violation, use_mask):
    gen = torch.Generator().manual_seed(B)
    for margin in (0.2, 0.05, 0.7):
        sim = unit_rows(B, 5, gen) @ unit_rows(B, 5, gen).t()
        mask = random_pos_mask(B, gen) if use_mask else None
        out = triplet_loss(sim, margin=margin, max_violation=max_violation, positive_mask=mask)
        ref = ref_triplet(sim.tolist(), margin, max_violation, None if mask is None else mask.tolist())
        assert out.total.item() == pytest.approx(ref[0], abs=1e-12)
        assert out.terms["i2t"].item() == pytest.approx(ref[1], abs=1e-12)
        assert out.terms["t2i"].item() == pytest.approx(ref[2], abs=1e-12)


def _pml():
    pytest.importorskip("pytorch_metric_learning")
    from pytorch_metric_learning.distances import CosineSimilarity
    from pytorch_metric_learning.losses import NTXentLoss, TripletMarginLoss
    from pytorch_metric_learning.miners import BatchHardMiner
    from pytorch_metric_learning.reducers import SumReducer
    return CosineSimilarity, NTXentLoss, TripletMarginLoss, BatchHardMiner, SumReducer


@pytest.mark.parametrize("B", [2, 5, 12])
def test_triplet_matches_pytorch_metric_learning(B):
    CosineSimilarity, _, TripletMarginLoss, BatchHardMiner, SumReducer = _pml()
    gen = torch.Generator().manual_seed(50 + B)
    im, txt = unit_rows(B, 8, gen), unit_rows(B, 8, gen)
    labels = torch.arange(B)
    loss_fn = TripletMarginLoss(margin=0.2, distance=CosineSimilarity(), reducer=SumReducer())
    # ref_labels must not *be* labels: PML then treats the pair as one set and drops i == j.
    vse0 = (loss_fn(im, labels, ref_emb=txt, ref_labels=labels.clone())
            + loss_fn(txt, labels, ref_emb=im, ref_labels=labels.clone()))
    assert triplet_loss(im @ txt.t(), max_violation=False).total.item() == pytest.approx(vse0.item(), rel=1e-12)
    # The hardest negative by similarity is also the largest hinge (S_ii is fixed per anchor).
    miner = BatchHardMiner(distance=CosineSimilarity())
    hard_i2t = miner(im, labels, txt, labels.clone())
    hard_t2i = miner(txt, labels, im, labels.clone())
    vsepp = (loss_fn(im, labels, hard_i2t, ref_emb=txt, ref_labels=labels.clone())
             + loss_fn(txt, labels, hard_t2i, ref_emb=im, ref_labels=labels.clone()))
    assert triplet_loss(im @ txt.t(), max_violation=True).total.item() == pytest.approx(vsepp.item(), rel=1e-12)


def test_triplet_collapsed_batch_sits_at_two_b_margin():
    B, margin = 6, 0.2
    sim = torch.full((B, B), 0.9)
    assert triplet_loss(sim, margin=margin).total.item() == pytest.approx(2 * B * margin)
    assert triplet_loss(sim, margin=margin, max_violation=False).total.item() == pytest.approx(
        2 * B * (B - 1) * margin)


# -- InfoNCE ------------------------------------------------------------------------------------
@pytest.mark.parametrize("B", [1, 2, 4, 9])
@pytest.mark.parametrize("T", [0.05, 0.5, 1.0])
def test_info_nce_matches_loops(B, T):
    gen = torch.Generator().manual_seed(B)
    sim = unit_rows(B, 6, gen) @ unit_rows(B, 6, gen).t()
    out = info_nce(sim, temperature=T)
    ref = ref_info_nce(sim.tolist(), T)
    for got, want in zip((out.total, out.terms["i2t"], out.terms["t2i"]), ref):
        assert got.item() == pytest.approx(want, rel=1e-10, abs=1e-12)


@pytest.mark.parametrize("B", [3, 10])
def test_info_nce_matches_ntxent(B):
    CosineSimilarity, NTXentLoss, *_ = _pml()
    gen = torch.Generator().manual_seed(B)
    im, txt = unit_rows(B, 8, gen), unit_rows(B, 8, gen)
    labels = torch.arange(B)
    ntx = NTXentLoss(temperature=0.05)
    want = 0.5 * (ntx(im, labels, ref_emb=txt, ref_labels=labels.clone())
                  + ntx(txt, labels, ref_emb=im, ref_labels=labels.clone()))
    assert info_nce(im @ txt.t(), temperature=0.05).total.item() == pytest.approx(want.item(), rel=1e-10)


@pytest.mark.parametrize("B", [1, 4, 33])
def test_info_nce_uniform_logits_is_log_of_class_count(B):
    out = info_nce(torch.full((B, B), 0.37), temperature=0.07)
    assert out.total.item() == pytest.approx(math.log(1 + (B - 1)), abs=1e-6)


def test_info_nce_rejects_bad_temperature():
    with pytest.raises(ConfigError, match="loss.temperature"):
        info_nce(torch.eye(3), temperature=0.0)


# -- collapse -----------------------------------------------------------------------------------
def test_collapse_detection():
    gen = torch.Generator().manual_seed(0)
    healthy = unit_rows(8, 16, gen) @ unit_rows(8, 16, gen).t()
    assert collapse_score(healthy) > 0.1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_collapse(healthy) is False
    collapsed = torch.full((8, 8), 0.999) + 1e-5 * torch.rand(8, 8, generator=gen)
    with pytest.warns(CollapseWarning, match="collapsed"):
        assert check_collapse(collapsed) is True
    assert check_collapse(torch.ones(1, 1)) is False
    # a tighter spread tolerance alone no longer flags it (the near-one test is off here) ...
    assert check_collapse(collapsed, tol=1e-6, near_one=None) is False
    # ... but positives and negatives both ~0.999 are caught by the near-one test
    with pytest.warns(CollapseWarning, match="nearly"):
        assert check_collapse(collapsed, tol=1e-6) is True


def test_collapse_near_one_with_noise():
    """Spread 0.05 passes the spread test; pos ≈ neg ≈ 0.95 must still be flagged."""
    gen = torch.Generator().manual_seed(1)
    noisy = 0.95 + 0.05 * (torch.rand(16, 16, generator=gen) - 0.5)
    assert collapse_score(noisy) > 1e-3
    with pytest.warns(CollapseWarning, match="nearly collapsed"):
        assert check_collapse(noisy) is True
    # a trained-looking batch: positives 0.95, negatives 0.93 (gap 0.02 > min_gap) is not collapse
    healthy = torch.full((16, 16), 0.93) + 0.02 * torch.eye(16)
    healthy = healthy + 1e-3 * torch.rand(16, 16, generator=gen)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_collapse(healthy) is False
        # low similarities with pos == neg are not "near one"
        assert check_collapse(0.3 + 0.05 * torch.rand(16, 16, generator=gen)) is False


def test_loss_output_scalars():
    out = LossOutput(torch.tensor(1.5), {"a": torch.tensor(2.0, requires_grad=True)})
    assert out.scalars() == {"total": 1.5, "a": 2.0}


# -- half precision -----------------------------------------------------------------------------
def extreme_embeddings(kind: str, B: int, E: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairs of (B, E) float32 unit embeddings that push similarities to their limits."""
    base = unit_rows(B, E, gen, torch.float32)
    if kind == "all_equal":
        one = base[:1].expand(B, E).clone()
        return one, one.clone()
    if kind == "plus_minus":
        sign = torch.where(torch.rand(B, 1, generator=gen) > 0.5, 1.0, -1.0)
        return base, base * sign
    if kind == "near_duplicates":
        one = base[:1].expand(B, E)
        return (F.normalize(one + 1e-3 * torch.randn(B, E, generator=gen), dim=1),
                F.normalize(one + 1e-3 * torch.randn(B, E, generator=gen), dim=1))
    return base, unit_rows(B, E, gen, torch.float32)


KINDS = ("all_equal", "plus_minus", "near_duplicates", "random")


def run_all_objectives(img, txt, img_k, txt_k, q_v, q_t):
    sim = img @ txt.t()
    return [unified_objective(sim, img, txt, img_k, txt_k, q_v, q_t).total,
            unified_objective(sim, img, txt, lambda_batch=1.0).total,
            triplet_loss(sim).total, triplet_loss(sim, max_violation=False).total,
            info_nce(sim).total]


def half_trials(n_trials: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    B, E, K = 8, 16, 24
    for trial in range(n_trials):
        kind = KINDS[trial % len(KINDS)]
        img, txt = extreme_embeddings(kind, B, E, gen)
        img_k, txt_k = extreme_embeddings(kind, B, E, gen)
        queue = img[torch.randint(0, B, (K,), generator=gen)].t().contiguous()
        # bf16 autocast (CPU): the matmuls outside the losses run in bf16.
        leaves = [x.clone().requires_grad_(True) for x in (img, txt)]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            losses = run_all_objectives(leaves[0], leaves[1], img_k, txt_k, queue, queue.clone())
        for loss in losses:
            assert loss.dtype == torch.float32 and torch.isfinite(loss), (kind, trial)
        sum(losses).backward()
        assert all(torch.isfinite(x.grad).all() for x in leaves), kind
        # fp16 inputs: the float32 computation inside must keep everything finite.
        leaves = [x.half().requires_grad_(True) for x in (img, txt)]
        losses = run_all_objectives(leaves[0], leaves[1], img_k.half(), txt_k.half(), queue.half(),
                                    queue.half())
        for loss in losses:
            assert loss.dtype == torch.float32 and torch.isfinite(loss), (kind, trial)
        sum(losses).backward()
        assert all(torch.isfinite(x.grad).all() for x in leaves), kind


def test_half_precision_objectives_stay_finite():
    half_trials(n_trials=200, seed=0)


@pytest.mark.slow
def test_half_precision_stress():
    half_trials(n_trials=1000, seed=1)


def test_fp16_inputs_are_computed_in_float32():
    gen = torch.Generator().manual_seed(9)
    img, txt = extreme_embeddings("all_equal", 6, 16, gen)
    img, txt = img.half(), txt.half()
    # The naive half computation overflows: e^{90·(1−0.5)} > 65504.
    assert torch.isinf(torch.exp(90.0 * (img @ txt.t() - 0.5))).all()
    queue = img.t().contiguous()
    half_out = unified_objective(img @ txt.t(), img, txt, img, txt, queue, queue)
    f32_out = unified_objective((img @ txt.t()).float(), img.float(), txt.float(), img.float(),
                                txt.float(), queue.float(), queue.float())
    assert half_out.total.item() == f32_out.total.item()


def test_autocast_is_disabled_inside_the_queue_term():
    gen = torch.Generator().manual_seed(10)
    v, t, v_hat, t_hat, q_v, q_t = make_uto_inputs(8, 32, 16, 16, gen, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        sim = v @ t.t()
        inside = unified_objective(sim, v, t, v_hat, t_hat, q_v, q_t)
    outside = unified_objective(sim, v, t, v_hat, t_hat, q_v, q_t)
    assert sim.dtype == torch.bfloat16
    assert inside.total.item() == outside.total.item()

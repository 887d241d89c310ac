"""Exercise checkers (``userlab.teach``).

Each checker must accept an implementation written here independently (explicit float64 loops),
and reject the typical wrong answers -- a constant, the identity, a sign flip, a dropped term,
a function that ignores an argument or calls the library -- with the right diagnosis, without
printing the expected values.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from userlab import teach


def _right(fb: teach.Feedback) -> None:
    assert isinstance(fb, teach.Feedback)
    assert fb.correct and fb.status == "correct", fb.message


def _wrong(fb: teach.Feedback, *fragments: str) -> None:
    assert not fb.correct and fb.status == "wrong", fb.message
    for fragment in fragments:
        assert fragment in fb.message, f"{fragment!r} not in: {fb.message}"


def _loops(x) -> np.ndarray:
    return (x.double() if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x, float))).numpy()


# -- independent implementations (explicit loops, float64) ----------------------------------------
def loop_minibatch(sim, mu=90.0, gamma=0.5, *, positive=True, one_side=False, sign=1.0):
    S = _loops(sim)
    b = S.shape[0]
    total = 0.0
    for i in range(b):
        col = [mu * (S[j, i] - gamma) for j in range(b) if j != i]
        row = [mu * (S[i, j] - gamma) for j in range(b) if j != i]
        lse = lambda xs: (max(xs) + math.log(sum(math.exp(x - max(xs)) for x in xs))) if xs else -math.inf
        soft = lambda xs: (lse(xs) + math.log1p(math.exp(-lse(xs)))) / mu if xs and lse(xs) > 0 \
            else (math.log1p(math.exp(lse(xs))) / mu if xs else 0.0)
        total += soft(row) + (0.0 if one_side else soft(col))
        if positive:
            total -= math.log1p(max(0.0, S[i, i]))
    return torch.tensor(sign * total / b)


def loop_queue(v, t, v_hat, t_hat, Q_v, Q_t, mu=90.0, gamma=0.5, mask=None, *, same_queue=False):
    v, t, v_hat, t_hat, Q_v, Q_t = (_loops(x) for x in (v, t, v_hat, t_hat, Q_v, Q_t))
    m = None if mask is None else mask.numpy()
    total = 0.0
    for query, key, queue in ((v, t_hat, Q_v if same_queue else Q_t), (t, v_hat, Q_t if same_queue else Q_v)):
        part = 0.0
        for i in range(query.shape[0]):
            xs = [mu * (query[i] @ queue[:, k] - gamma) for k in range(queue.shape[1]) if m is None or m[i, k]]
            top = max(xs) if xs else 0.0
            inside = sum(math.exp(x - top) for x in xs)
            part += (math.log(math.exp(-top) + inside) + top) / mu if xs else 0.0
            part -= math.log1p(max(0.0, query[i] @ key[i]))
        total += part / query.shape[0]
    return torch.tensor(total)


def loop_recall(sims, k):
    S = _loops(sims)
    n, nc = S.shape
    per = nc // n

    def rank(scores, target_set):
        order = sorted(range(len(scores)), key=lambda j: (-scores[j], j))
        return min(order.index(j) for j in target_set)
    i2t = [rank(S[i], range(per * i, per * i + per)) for i in range(n)]
    t2i = [rank(S[:, c], [c // per]) for c in range(nc)]
    return 100.0 * np.mean(np.array(i2t) < k), 100.0 * np.mean(np.array(t2i) < k)


def loop_medr(ranks):
    r = sorted(float(x) for x in _loops(ranks).reshape(-1))
    mid = len(r) // 2
    median = r[mid] if len(r) % 2 else (r[mid - 1] + r[mid]) / 2
    return math.floor(median) + 1


def loop_region_attention(regions, g, lam=1.0):
    R, G = _loops(regions), _loops(g)
    b, k, _ = R.shape
    beta = np.zeros((b, k))
    for i in range(b):
        aff = [lam * float(R[i, j] @ G[i]) for j in range(k)]
        e = [math.exp(a - max(aff)) for a in aff]
        soft = [x / sum(e) for x in e]
        norm = math.sqrt(sum(x * x for x in soft))
        beta[i] = [x / norm for x in soft]
    return torch.from_numpy(R + beta[:, :, None] * G[:, None, :]), torch.from_numpy(beta)


def loop_margin(which):
    def margin(ref, m, edge, mode="hard"):
        out = []
        for r in _loops(ref).reshape(-1):
            room = edge - r if which == "supremum" else edge + r
            if mode == "hard":
                out.append(min(m, room))
            else:
                out.append(0.0 if m == 0 else 2 * m / (1 + math.exp(max(-700.0, min(700.0, -2 * room / m)))) - m)
        return torch.tensor(out).reshape(ref.shape)
    return margin


sup_loop, inf_loop = loop_margin("supremum"), loop_margin("infimum")


def loop_relative(S_t, S_a, margin=0.2, beta=1.0, soft=None):
    St, Sa = _loops(S_t), _loops(S_a)
    b, g = St.shape[0], margin * beta
    total = 0.0
    for i in range(b):       # rows: image i, negatives j
        costs = []
        for j in range(b):
            if j != i:
                gap_a = Sa[i, i] - Sa[i, j]
                m = g if soft is None else float(sup_loop(torch.tensor([gap_a]), g, 2.0, soft))
                costs.append(max(0.0, m + gap_a - (St[i, i] - St[i, j])))
        total += max(costs, default=0.0)
    for j in range(b):       # columns: caption j, negatives i
        costs = []
        for i in range(b):
            if i != j:
                gap_a = Sa[j, j] - Sa[i, j]
                m = g if soft is None else float(sup_loop(torch.tensor([gap_a]), g, 2.0, soft))
                costs.append(max(0.0, m + gap_a - (St[j, j] - St[i, j])))
        total += max(costs, default=0.0)
    return torch.tensor(total)


def loop_absolute(S_t, S_a, margin=0.2, beta=1.0, soft=None, *, drop_positive=False):
    St, Sa = _loops(S_t), _loops(S_a)
    b, h = St.shape[0], 0.5 * margin * beta
    m_pos = lambda a: h if soft is None else float(sup_loop(torch.tensor([a]), h, 1.0, soft))  # noqa: E731
    m_neg = lambda a: h if soft is None else float(inf_loop(torch.tensor([a]), h, 1.0, soft))  # noqa: E731
    total = 0.0 if drop_positive else 2 * sum(max(0.0, m_pos(Sa[i, i]) + Sa[i, i] - St[i, i]) for i in range(b))
    neg = lambda i, j: max(0.0, m_neg(Sa[i, j]) + St[i, j] - Sa[i, j])  # noqa: E731
    total += sum(max([neg(i, j) for j in range(b) if j != i], default=0.0) for i in range(b))
    total += sum(max([neg(i, j) for i in range(b) if i != j], default=0.0) for j in range(b))
    return torch.tensor(total)


# -- correct answers pass ---------------------------------------------------------------------------
@pytest.mark.parametrize("check, fn", [
    (teach.check_im_div, lambda rows, caps: 5 if rows != caps else 1),
    (teach.check_feature_row, lambda c, d: c // d),
    (teach.check_minibatch_term, loop_minibatch),
    (teach.check_queue_term, loop_queue),
    (teach.check_ema_step, lambda k, q, m: k.double() * m + q.double() * (1 - m)),
    (teach.check_recall_at_k, loop_recall),
    (teach.check_median_rank, loop_medr),
    (teach.check_region_attention, loop_region_attention),
    (teach.check_supremum_margin, sup_loop),
    (teach.check_infimum_margin, inf_loop),
    (teach.check_relative_boost, loop_relative),
    (teach.check_absolute_boost, loop_absolute),
], ids=lambda x: getattr(x, "__name__", "fn"))
def test_independent_implementation_passes(check, fn):
    _right(check(fn))


# -- answers that ignore their input ----------------------------------------------------------------
CONSTANT = "returns the same result for all"


@pytest.mark.parametrize("check, fn", [
    (teach.check_im_div, lambda rows, caps: 5),
    (teach.check_feature_row, lambda c, d: 2),
    (teach.check_minibatch_term, lambda s, mu=90, gamma=0.5: torch.tensor(0.1)),
    (teach.check_queue_term, lambda *args: torch.tensor(-0.5)),
    (teach.check_recall_at_k, lambda s, k: (50.0, 40.0)),
    (teach.check_median_rank, lambda r: 3),
    (teach.check_relative_boost, lambda *args: torch.tensor(1.0)),
    (teach.check_absolute_boost, lambda *args: torch.tensor(0.3)),
])
def test_constants_fail(check, fn):
    _wrong(check(fn), CONSTANT)


def test_constant_region_attention_and_ema_fail():
    _wrong(teach.check_region_attention(lambda R, g, lam=1.0: (torch.zeros_like(R), torch.zeros(R.shape[:2]))),
           CONSTANT)
    _wrong(teach.check_ema_step(lambda k, q, m: torch.zeros_like(k)), CONSTANT)
    _wrong(teach.check_supremum_margin(lambda ref, m, edge, mode="hard": torch.full(ref.shape, 0.1)), CONSTANT)
    # the nominal margin m, shaped like its input, is named for what it misses
    _wrong(teach.check_supremum_margin(lambda ref, m, edge, mode="hard": torch.full(ref.shape, float(m))),
           "must shrink near the bound")


def test_identity_fails():
    _wrong(teach.check_minibatch_term(lambda s, mu=90, gamma=0.5: s), "shape (8, 8)", "a scalar is expected")
    _wrong(teach.check_ema_step(lambda k, q, m: k), "returns its input `theta_k` unchanged")
    _wrong(teach.check_region_attention(lambda R, g, lam=1.0: (R, loop_region_attention(R, g, lam)[1])),
           "returns its input `regions` unchanged")
    _wrong(teach.check_supremum_margin(lambda ref, m, edge, mode="hard": ref), "returns its input `ref`")
    _wrong(teach.check_relative_boost(lambda St, Sa, *a, **k: St), "a scalar is expected")
    _wrong(teach.check_recall_at_k(lambda s, k: s), "return a pair")


# -- sign flips ------------------------------------------------------------------------------------
def test_sign_flips_fail():
    _wrong(teach.check_minibatch_term(lambda s, mu=90, gamma=0.5: -loop_minibatch(s, mu, gamma)), "sign")
    _wrong(teach.check_queue_term(lambda *a: -loop_queue(*a)), "sign")
    _wrong(teach.check_ema_step(lambda k, q, m: -(m * k + (1 - m) * q)), "sign")
    _wrong(teach.check_relative_boost(lambda *a: -loop_relative(*a)), "sign")
    _wrong(teach.check_absolute_boost(lambda *a: -loop_absolute(*a)), "sign")
    _wrong(teach.check_region_attention(
        lambda R, g, lam=1.0: (2 * R.double() - loop_region_attention(R, g, lam)[0], loop_region_attention(R, g, lam)[1])),
        "not subtracted")


# -- dropped terms and typical slips ----------------------------------------------------------------
def test_minibatch_slips():
    _wrong(teach.check_minibatch_term(lambda s, mu=90, gamma=0.5: loop_minibatch(s, mu, gamma, positive=False)),
           "positive term", "missing")
    _wrong(teach.check_minibatch_term(lambda s, mu=90, gamma=0.5: loop_minibatch(s, mu, gamma, one_side=True)),
           "two negative sums")
    _wrong(teach.check_minibatch_term(lambda s, mu=90, gamma=0.5: loop_minibatch(s, 90.0, 0.5)),
           "μ = 10, γ = 0.2", "instead of the arguments")

    def naive(s, mu=90.0, gamma=0.5):  # exp in the input's dtype overflows in float16
        b = s.shape[0]
        e = torch.exp(mu * (s - gamma)) * (1 - torch.eye(b, dtype=s.dtype))
        return (torch.log(1 + e.sum(0)) / mu + torch.log(1 + e.sum(1)) / mu
                - torch.log(1 + torch.relu(s.diagonal()))).mean()
    _wrong(teach.check_minibatch_term(naive), "half precision", "NaN or inf", "float16")


def test_queue_slips():
    _wrong(teach.check_queue_term(lambda *a: loop_queue(*a, same_queue=True)), "SAME modality")
    _wrong(teach.check_queue_term(lambda v, t, vh, th, Qv, Qt, mu=90, gamma=0.5, mask=None:
                                  loop_queue(v, t, vh, th, Qv, Qt, mu, gamma, None)), "masked keys", "mask is ignored")
    _wrong(teach.check_queue_term(lambda v, t, vh, th, Qv, Qt, mu=90, gamma=0.5, mask=None:
                                  loop_queue(v, t, v, t, Qv, Qt, mu, gamma, mask)), "momentum key")


def test_ema_slips():
    _wrong(teach.check_ema_step(lambda k, q, m: (1 - m) * k + m * q), "swapped")
    _wrong(teach.check_ema_step(lambda k, q, m: q.mul_(1 - m).add_(m * k)), "changed its input `theta_q`")
    _right(teach.check_ema_step(lambda k, q, m: k.mul_(m).add_((1 - m) * q)))  # in place on theta_k is fine


def test_recall_slips():
    _wrong(teach.check_recall_at_k(lambda s, k: loop_recall(s, k + 1)), "rank < K")
    _wrong(teach.check_recall_at_k(lambda s, k: tuple(x / 100 for x in loop_recall(s, k))), "percentage")

    def optimistic(s, k):  # counts only strictly larger scores: ties fall behind the positive
        S = _loops(s)
        n, nc = S.shape
        i2t = [(S[i] > S[i, 5 * i:5 * i + 5].max()).sum() for i in range(n)]
        t2i = [(S[:, c] > S[c // 5, c]).sum() for c in range(nc)]
        return 100.0 * np.mean(np.array(i2t) < k), 100.0 * np.mean(np.array(t2i) < k)
    _wrong(teach.check_recall_at_k(optimistic), "ties", "lower index")


def test_median_rank_slips():
    _wrong(teach.check_median_rank(lambda r: float(np.median(_loops(r)))), "add 1")
    _wrong(teach.check_median_rank(lambda r: float(np.median(_loops(r))) + 1), "floor")
    _wrong(teach.check_median_rank(lambda r: float(np.mean(_loops(r))) + 1), "meanr")


def test_region_attention_slips():
    def no_l2(R, g, lam=1.0):
        w = torch.softmax(lam * torch.einsum("bkd,bd->bk", R.double(), g.double()), dim=1)
        return R.double() + w.unsqueeze(-1) * g.double().unsqueeze(1), w
    _wrong(teach.check_region_attention(no_l2), "stopped after the softmax")
    _wrong(teach.check_region_attention(lambda R, g, lam=1.0: (R.double() + g.double().unsqueeze(1),
                                                               loop_region_attention(R, g, lam)[1])), "weight it by β_k")
    _wrong(teach.check_region_attention(lambda R, g, lam=1.0: loop_region_attention(R, g, 1.0)), "λ = 3", "lam")
    _wrong(teach.check_region_attention(lambda R, g, lam=1.0: loop_region_attention(R, g, lam)[1]), "return a pair")

    def naive_exp(R, g, lam=1.0):  # softmax without subtracting the maximum overflows
        a = lam * torch.einsum("bkd,bd->bk", R, g)
        w = a.exp() / a.exp().sum(1, keepdim=True)
        beta = w / w.norm(dim=1, keepdim=True)
        return R + beta.unsqueeze(-1) * g.unsqueeze(1), beta
    _wrong(teach.check_region_attention(naive_exp), "large affinities", "NaN or inf")


def test_margin_slips():
    _wrong(teach.check_supremum_margin(lambda ref, m, edge, mode="hard": sup_loop(ref, m, edge, "hard")),
           "soft form")
    _wrong(teach.check_supremum_margin(inf_loop), "infimum margin")
    _wrong(teach.check_infimum_margin(sup_loop), "supremum margin")

    def literal(ref, m, edge, mode="hard"):  # 2m/(1+e^{...}) − m divides by m = 0
        if mode == "hard":
            return torch.clamp(edge - ref.double(), max=m)
        return 2 * m / (1 + torch.exp((2 / torch.tensor(m, dtype=torch.float64)) * (ref.double() - edge))) - m
    _wrong(teach.check_supremum_margin(literal), "m = 0")


def test_boosting_slips():
    _wrong(teach.check_relative_boost(lambda St, Sa, margin=0.2, beta=1.0, soft=None:
                                      loop_relative(Sa, St, margin, beta, soft)), "swapped")
    _wrong(teach.check_relative_boost(lambda St, Sa, margin=0.2, beta=1.0, soft=None:
                                      loop_relative(St, Sa, 0.0, beta, soft)), "margin γ·β is missing")
    _wrong(teach.check_relative_boost(lambda St, Sa, margin=0.2, beta=1.0, soft=None:
                                      loop_relative(St, Sa, margin, beta, None)), "soft", "ignored")
    _wrong(teach.check_absolute_boost(lambda St, Sa, margin=0.2, beta=1.0, soft=None:
                                      loop_absolute(St, Sa, margin, beta, soft, drop_positive=True)),
           "positive term", "missing")
    _wrong(teach.check_absolute_boost(lambda St, Sa, margin=0.2, beta=1.0, soft=None:
                                      loop_absolute(St, Sa, 2 * margin, beta, soft)), "halves γ·β")


def test_feature_row_slip():
    _wrong(teach.check_feature_row(lambda c, d: c // 5), "im_div = 1")


# -- plumbing ---------------------------------------------------------------------------------------
def test_not_implemented_is_reported_not_raised(capsys):
    def stub(*args):
        raise NotImplementedError()
    fb = teach.check_queue_term(stub)
    assert not fb.correct and fb.status == teach.NOT_IMPLEMENTED
    assert "not implemented" in capsys.readouterr().out
    assert teach.check_minibatch_term(None).status == teach.NOT_IMPLEMENTED


def test_non_callable_and_crashing_answers():
    _wrong(teach.check_minibatch_term(0.25), "pass your function itself")
    _wrong(teach.check_minibatch_term(lambda s, mu=90, gamma=0.5: 1 / 0), "ZeroDivisionError")
    _wrong(teach.check_median_rank(lambda r: None), "returned None")


def test_calling_the_library_is_caught():
    from userlab.boosting import relative_boost
    from userlab.evaluate import retrieval_ranks
    from userlab.losses import batch_hal_loss
    from userlab.models.image import region_attention

    _wrong(teach.check_minibatch_term(lambda s, mu=90, gamma=0.5: batch_hal_loss(s, mu, gamma).total),
           "calls userlab's userlab.losses.batch_hal_loss")
    _wrong(teach.check_region_attention(region_attention), "calls userlab's userlab.models.image.region_attention")
    _wrong(teach.check_relative_boost(lambda St, Sa, margin=0.2, beta=1.0, soft=None:
                                      relative_boost(St, Sa, margin, beta, soft=soft).total), "calls userlab's")

    def via_ranks(s, k):
        i2t, t2i = retrieval_ranks(np.asarray(_loops(s)))
        return 100.0 * float((i2t < k).double().mean()), 100.0 * float((t2i < k).double().mean())
    _wrong(teach.check_recall_at_k(via_ranks), "calls userlab's userlab.evaluate.retrieval_ranks")


def test_messages_never_show_the_expected_value():
    from userlab.losses import batch_hal_loss

    fb = teach.check_minibatch_term(lambda s, mu=90, gamma=0.5: loop_minibatch(s, mu, gamma) + 0.01)
    assert not fb.correct
    S = (0.45 + 0.3 * torch.randn(8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)).clamp(-1, 1)
    expected = float(batch_hal_loss(S).total)
    for digits in (3, 4, 6):
        assert f"{expected:.{digits}g}" not in fb.message
    fb = teach.check_median_rank(lambda r: loop_medr(r) + 1)
    assert "should be" not in fb.message and "expected 3" not in fb.message


def test_session_log_collects_feedback():
    teach.session_log(clear=True)
    teach.check_median_rank(loop_medr)
    teach.check_median_rank(None)
    log = teach.session_log()
    assert [fb.status for fb in log] == ["correct", teach.NOT_IMPLEMENTED]


def test_reveal():
    options = {"a": "one", "b": "two", "c": "three"}
    _right(teach.reveal("b", "b", options, "x = 1."))
    wrong = teach.reveal("(a)", "b", options)
    assert not wrong.correct and "(b) two" in wrong.message and "You predicted (a)" in wrong.message
    assert teach.reveal(None, "c", options).status == teach.NOT_IMPLEMENTED
    _wrong(teach.reveal("d", "c", options), "not one of")
    with pytest.raises(ValueError):
        teach.reveal("a", "z", options)


def test_package_holds_no_solution_markers():
    from pathlib import Path
    import userlab
    root = Path(userlab.__file__).parent
    hits = [p for p in root.rglob("*.py") if "### BEGIN SOLUTION" in p.read_text(encoding="utf-8")]
    assert hits == []

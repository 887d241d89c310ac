"""Exercise checkers: right answers pass, typical mistakes fail with the reason named."""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from userlab import teach

SOLUTIONS = sorted((Path(__file__).resolve().parents[1] / "notebooks" / "solutions").glob("[0-9][0-9]_*_solutions.py"))


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _wrong(fb: teach.Feedback, *phrases: str) -> None:
    assert isinstance(fb, teach.Feedback) and not fb.correct and not fb
    for phrase in phrases:
        assert phrase in fb.message, fb.message


def _right(fb: teach.Feedback) -> None:
    assert fb.correct and fb, fb.message
    assert fb.message.startswith("Correct")


def test_feedback_is_printed(capsys):
    fb = teach.check_queue_pointer(10, 4, 3, 2)
    assert capsys.readouterr().out.strip() == str(fb)
    assert str(fb).startswith("✔") and repr(fb) == "Feedback(correct=True)"


def test_missing_answer_and_crashing_function():
    _wrong(teach.check_medr([0, 1, 2], None), "no answer yet")
    _wrong(teach.check_medr([0, 1, 2], lambda r: r[10]), "your function raised IndexError")


# -- 01 features ---------------------------------------------------------------------------------
def test_im_div():
    _right(teach.check_im_div(1000, 5000, 5))
    _wrong(teach.check_im_div(1000, 5000, 1), "im_div is 1 but it should be 5", "serves 5 captions")
    _right(teach.check_im_div(5070, 5070, 1))
    _wrong(teach.check_im_div(5070, 5070, 5), "rows equal captions")


def test_caption_image():
    _right(teach.check_caption_image(13, 2))
    _right(teach.check_caption_image(13, lambda c: c // 5))
    _wrong(teach.check_caption_image(13, 13 / 5), "integer division")
    _wrong(teach.check_caption_image(14, 3), "rounding")          # round(2.8)
    _wrong(teach.check_caption_image(11, 1), "position among")    # 11 % 5
    _wrong(teach.check_caption_image(10, 3), "start at 0")        # 10 // 5 + 1
    _wrong(teach.check_caption_image(13, 3), "rounding", "position among")  # both slips give 3


def test_region_count():
    _right(teach.check_region_count((100, 36, 2048), 36))
    _right(teach.check_region_count(np.zeros((2, 4, 8)), lambda f: f.shape[1]))
    _wrong(teach.check_region_count((100, 36, 2048), 2048), "feature width")
    _wrong(teach.check_region_count((100, 36, 2048), 100), "number of rows")


# -- 02 training ---------------------------------------------------------------------------------
def _hal_loop(S: np.ndarray, mu: float = 90.0, gamma: float = 0.5, *, positive: bool = True,
              diagonal: bool = False, both: bool = True) -> float:
    """HAL's batch term with explicit float64 loops (and switches for typical mistakes)."""
    b = S.shape[0]
    total = 0.0
    for i in range(b):
        row = sum(math.exp(mu * (S[i, j] - gamma)) for j in range(b) if diagonal or j != i)
        col = sum(math.exp(mu * (S[j, i] - gamma)) for j in range(b) if diagonal or j != i)
        total += math.log1p(row) / mu + (math.log1p(col) / mu if both else 0.0)
        if positive:
            total -= math.log1p(max(0.0, S[i, i]))
    return total / b


def test_hal_term():
    S = (torch.rand(6, 6, generator=_gen(0)) * 1.2 - 0.4).double()
    S.diagonal().add_(0.4)
    Sn = S.numpy()
    expected = _hal_loop(Sn)
    _right(teach.check_hal_term(S.float(), expected))
    _right(teach.check_hal_term(S, lambda s: torch.tensor(_hal_loop(s.numpy()))))
    _wrong(teach.check_hal_term(S, _hal_loop(Sn, positive=False)), "left out the positive term")
    _wrong(teach.check_hal_term(S, _hal_loop(Sn, diagonal=True)), "is not a negative")
    _wrong(teach.check_hal_term(S, _hal_loop(Sn, both=False)), "two negative sums")
    _wrong(teach.check_hal_term(S, expected * 6), "average over the 6 pairs")
    _wrong(teach.check_hal_term(S, expected + 1.0), "should be")


def test_ema():
    k, q = torch.randn(4, generator=_gen(1)), torch.randn(4, generator=_gen(2))
    _right(teach.check_ema(k, q, 0.99, 0.99 * k + 0.01 * q))

    def in_place(theta_k, theta_q, m):  # a function that mutates its input is fine
        theta_k.mul_(m).add_((1 - m) * theta_q)
        return theta_k
    before = k.clone()
    _right(teach.check_ema(k, q, 0.99, in_place))
    assert torch.equal(k, before)  # the checker passed copies
    _wrong(teach.check_ema(k, q, 0.99, 0.99 * q + 0.01 * k), "swapped", "keeps m = 0.99 of ITSELF")
    _wrong(teach.check_ema(k, q, 0.99, q), "copies the query weights")


def test_queue_pointer():
    _right(teach.check_queue_pointer(2048, 128, 20, 512))
    _right(teach.check_queue_pointer(2048, 128, 20, lambda K, B, s: (s * B) % K))
    _wrong(teach.check_queue_pointer(2048, 128, 20, 2560), "wraps around")
    _wrong(teach.check_queue_pointer(2048, 128, 20, 20), "moves by 128")
    _wrong(teach.check_queue_pointer(2048, 128, 20, 384), "next slot")


# -- 03 evaluation -------------------------------------------------------------------------------
def _sims_first_vs_best() -> np.ndarray:
    """10 images: for images 0-3 the best caption is first in the row, but caption 5i is not."""
    rng = np.random.default_rng(3)
    S = rng.uniform(0, 1, (10, 50))
    for i in range(4):
        S[i, 5 * i + 2] = 2.0
        S[i, 5 * i] = -1.0
    return S


def _i2t_ranks_loop(S, only_first=False):
    ranks = []
    for i in range(S.shape[0]):
        order = sorted(range(S.shape[1]), key=lambda j: (-S[i, j], j))
        targets = [5 * i] if only_first else range(5 * i, 5 * i + 5)
        ranks.append(min(order.index(t) for t in targets))
    return np.array(ranks)


def _t2i_ranks_loop(S):
    ranks = []
    for c in range(S.shape[1]):
        order = sorted(range(S.shape[0]), key=lambda i: (-S[i, c], i))
        ranks.append(order.index(c // 5))
    return np.array(ranks)


def test_recall_at_k():
    S = _sims_first_vs_best()
    r1 = 100.0 * np.mean(_i2t_ranks_loop(S) < 1)
    first_only = 100.0 * np.mean(_i2t_ranks_loop(S, only_first=True) < 1)
    assert r1 == 40.0 and first_only == 0.0
    _right(teach.check_recall_at_k(S, 1, r1))
    _wrong(teach.check_recall_at_k(S, 1, first_only), "best of the 5 captions")
    _wrong(teach.check_recall_at_k(S, 1, r1 / 100), "percentage")
    r5 = 100.0 * np.mean(_i2t_ranks_loop(S) < 5)
    _right(teach.check_recall_at_k(torch.from_numpy(S), 5, r5))
    t2i = 100.0 * np.mean(_t2i_ranks_loop(S) < 5)
    _right(teach.check_recall_at_k(S, 5, t2i, direction="t2i"))
    wrong_dir = teach.check_recall_at_k(S, 5, r5, direction="t2i")
    assert not wrong_dir and ("i2t recall" in wrong_dir.message or "should be" in wrong_dir.message)


def test_recall_off_by_one():
    rng = np.random.default_rng(4)
    S = rng.uniform(0, 1, (20, 100))
    ranks = _i2t_ranks_loop(S)
    r5, le5 = 100.0 * np.mean(ranks < 5), 100.0 * np.mean(ranks <= 5)
    assert r5 != le5
    _wrong(teach.check_recall_at_k(S, 5, le5), "0-based")


def test_rsum():
    metrics = {"i2t_R@1": 30.0, "i2t_R@5": 60.0, "i2t_R@10": 70.0, "t2i_R@1": 20.0, "t2i_R@5": 50.0,
               "t2i_R@10": 65.0, "i2t_medr": 3.0, "i2t_meanr": 10.5, "t2i_medr": 5.0, "t2i_meanr": 12.0}
    _right(teach.check_rsum(metrics, 295.0))
    import pandas as pd
    _right(teach.check_rsum(pd.DataFrame([metrics]), lambda m: 295.0))
    _wrong(teach.check_rsum(metrics, 160.0), "both directions")
    _wrong(teach.check_rsum(metrics, 295.0 / 6), "not their mean")
    _wrong(teach.check_rsum(metrics, 295.0 + 3 + 10.5 + 5 + 12), "medr and meanr")


def test_medr():
    ranks = [0, 3, 1, 8, 2, 5]   # median 2.5 -> floor 2 -> medr 3
    _right(teach.check_medr(ranks, 3))
    _right(teach.check_medr(torch.tensor(ranks), lambda r: int(np.floor(np.median(r.numpy()))) + 1))
    _wrong(teach.check_medr(ranks, 2.5), "add 1")
    _wrong(teach.check_medr(ranks, 3.5), "floor the median")
    _wrong(teach.check_medr(ranks, np.mean(ranks) + 1), "meanr")


# -- 04 attention ---------------------------------------------------------------------------------
def test_attention_sums():
    logits = torch.randn(3, 5, generator=_gen(5))
    alpha = torch.softmax(logits, dim=1)
    beta = alpha / alpha.norm(dim=1, keepdim=True)
    _right(teach.check_attention_sums(alpha, 1.0))
    _right(teach.check_attention_sums(beta, beta.sum(dim=1)))
    _wrong(teach.check_attention_sums(beta, 1.0), "not a distribution")
    _wrong(teach.check_attention_sums(beta, beta.sum(dim=0)), "batch axis")
    _wrong(teach.check_attention_sums(beta, beta.sum()), "one sum per image")


def _beta_loop(g: torch.Tensor, regions: torch.Tensor, lam: float = 1.0, l2: bool = True) -> torch.Tensor:
    b, r, _ = regions.shape
    out = torch.zeros(b, r, dtype=torch.float64)
    for i in range(b):
        aff = [lam * float(torch.dot(regions[i, k].double(), g[i].double())) for k in range(r)]
        top = max(aff)
        e = [math.exp(a - top) for a in aff]
        soft = [v / sum(e) for v in e]
        norm = math.sqrt(sum(v * v for v in soft)) if l2 else 1.0
        out[i] = torch.tensor([v / norm for v in soft])
    return out


def test_beta():
    regions = torch.randn(2, 4, 3, generator=_gen(6))
    g = torch.nn.functional.normalize(torch.randn(2, 3, generator=_gen(7)), dim=1)
    _right(teach.check_beta(g, regions, _beta_loop(g, regions)))
    _right(teach.check_beta(g[0], regions[0], _beta_loop(g, regions)[0]))  # unbatched
    _wrong(teach.check_beta(g, regions, _beta_loop(g, regions, l2=False)), "stopped after the softmax")
    _right(teach.check_beta(g, regions, _beta_loop(g, regions, lam=3.0), lam=3.0))
    _wrong(teach.check_beta(g, regions, _beta_loop(g, regions), lam=3.0), "λ = 3")
    _wrong(teach.check_beta(g, regions, torch.zeros(2, 5)), "shape (2, 5)")


# -- 05 boosting ---------------------------------------------------------------------------------
def _rel_loop(St: np.ndarray, Sa: np.ndarray, m: float = 0.2, reduce=max) -> float:
    b = St.shape[0]
    total = 0.0
    for i in range(b):
        total += reduce([max(0.0, m + (Sa[i, i] - Sa[i, j]) - (St[i, i] - St[i, j])) for j in range(b) if j != i])
    for j in range(b):
        total += reduce([max(0.0, m + (Sa[j, j] - Sa[i, j]) - (St[j, j] - St[i, j])) for i in range(b) if i != j])
    return total


def test_relative_boost():
    St = torch.rand(5, 5, generator=_gen(8)).double().numpy()
    Sa = torch.rand(5, 5, generator=_gen(9)).double().numpy()
    expected = _rel_loop(St, Sa)
    _right(teach.check_relative_boost(torch.from_numpy(St).float(), torch.from_numpy(Sa).float(), expected))
    _wrong(teach.check_relative_boost(St, Sa, _rel_loop(Sa, St)), "swapped")
    _wrong(teach.check_relative_boost(St, Sa, _rel_loop(St, Sa, m=0.0)), "margin γ·β is missing")
    _wrong(teach.check_relative_boost(St, Sa, _rel_loop(St, Sa, reduce=sum)), "hardest (max)")
    _wrong(teach.check_relative_boost(St, Sa, expected / 5), "no 1/B")


def test_absolute_margins():
    _right(teach.check_absolute_margins((0.1, 0.1)))
    _right(teach.check_absolute_margins(0.1))
    _right(teach.check_absolute_margins(lambda: (0.1, 0.1)))
    _wrong(teach.check_absolute_margins(0.2), "halves γ·β")
    _wrong(teach.check_absolute_margins((0.1, 0.2)), "γ2 too")


def test_momentum_schedule():
    step, total, base = 250, 1000, 0.9995
    expected = 1.0 + (base - 1.0) * 0.5 * (1 + math.cos(math.pi * step / total))
    _right(teach.check_momentum_schedule(step, total, expected))
    _right(teach.check_momentum_schedule(step, total, lambda s, t: 1.0 + (base - 1.0) * 0.5 * (1 + math.cos(math.pi * s / t))))
    _wrong(teach.check_momentum_schedule(step, total, base + (1 - base) * step / total), "linear ramp")
    _wrong(teach.check_momentum_schedule(step, total, base + (1 - base) * 0.5 * (1 + math.cos(math.pi * step / total))),
           "other way")


# -- the hidden solutions pass their own checkers ----------------------------------------------------
@pytest.mark.parametrize("path", SOLUTIONS, ids=lambda p: p.stem)
def test_solutions_pass(path, capsys):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    results = module.check_all()
    assert results and all(isinstance(r, teach.Feedback) for r in results)
    assert all(r.correct for r in results), [r.message for r in results if not r.correct]


def test_every_notebook_topic_has_solutions():
    assert [p.stem.removesuffix("_solutions") for p in SOLUTIONS] == [
        "01_features", "02_train", "03_evaluate", "04_attention_and_margins", "05_boosting"]

"""Checkers for the notebooks' exercises.

Each ``check_*`` function takes the student's answer (a number, a tensor / array, or a function
that computes it from the exercise's inputs), compares it with userlab's own computation, prints
and returns a :class:`Feedback` saying whether it is right and why. A wrong answer is also
compared with the results of typical mistakes (ranks counted from 1, the best of the five
captions forgotten, the margin left out, ...) so the message can name the likely slip:

    >>> check_recall_at_k(sims, 1, 40.0)
    ✘ your i2t R@1 is 40 but it should be 35: did you take the best of the 5 captions? ...

Topics, one group per notebook: 01 features (``check_im_div``, ``check_caption_image``,
``check_region_count``), 02 training (``check_hal_term``, ``check_ema``,
``check_queue_pointer``), 03 evaluation (``check_recall_at_k``, ``check_rsum``,
``check_medr``), 04 attention (``check_attention_sums``, ``check_beta``), 05 boosting
(``check_relative_boost``, ``check_absolute_margins``, ``check_momentum_schedule``).

Reference computations run in float64 on the CPU, so tensors from any device work; numbers are
compared with a relative tolerance of 1e-4 (float32 answers pass).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch

__all__ = [
    "Feedback",
    "check_im_div", "check_caption_image", "check_region_count",
    "check_hal_term", "check_ema", "check_queue_pointer",
    "check_recall_at_k", "check_rsum", "check_medr",
    "check_attention_sums", "check_beta",
    "check_relative_boost", "check_absolute_margins", "check_momentum_schedule",
]

RTOL, ATOL = 1e-4, 1e-6


@dataclass(frozen=True)
class Feedback:
    """The verdict of a checker.

    Attributes:
        correct: whether the answer matches userlab's computation.
        message: what was expected and why (for a wrong answer: the likely mistake).
    """

    correct: bool
    message: str

    def __bool__(self) -> bool:
        return self.correct

    def __str__(self) -> str:
        return ("✔ " if self.correct else "✘ ") + self.message

    def __repr__(self) -> str:  # the message was printed already; keep the echo short
        return f"Feedback(correct={self.correct})"


# ---------------------------------------------------------------------------------------------
# plumbing
# ---------------------------------------------------------------------------------------------
class _NoAnswer(Exception):
    """The student's function raised, or no answer was given; carries the feedback text."""


def _report(correct: bool, message: str) -> Feedback:
    fb = Feedback(bool(correct), message)
    print(fb)
    return fb


def _f64(x: Any) -> torch.Tensor:
    """Any number / array / tensor -> float64 CPU tensor (a copy; the input is never modified)."""
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", torch.float64).clone()
    return torch.as_tensor(np.asarray(x, dtype=np.float64)).clone()


def _resolve(answer: Any, *inputs: Any) -> Any:
    """The answer itself, or what the student's function returns for ``inputs`` (given copies)."""
    if answer is None or answer is Ellipsis:
        raise _NoAnswer("no answer yet: replace the placeholder with your result (or your function)")
    if callable(answer) and not isinstance(answer, (torch.Tensor, np.ndarray)):
        copies = [x.clone() if isinstance(x, torch.Tensor) else
                  x.copy() if isinstance(x, np.ndarray) else x for x in inputs]
        try:
            return answer(*copies)
        except Exception as err:  # any failure of student code becomes feedback
            raise _NoAnswer(f"your function raised {type(err).__name__}: {err}") from None
    return answer


def _matches(answer: Any, expected: Any, rtol: float = RTOL, atol: float = ATOL) -> bool:
    """Same shape (a scalar answer may stand for a constant array) and close values."""
    try:
        a, e = _f64(answer), _f64(expected)
    except (TypeError, ValueError, RuntimeError):
        return False
    if a.numel() == 1 and e.numel() > 1:
        a = a.reshape(()).expand(e.shape)
    if a.numel() == 1 and e.numel() == 1:
        a, e = a.reshape(()), e.reshape(())
    if a.shape != e.shape:
        return False
    both_inf = torch.isinf(a) & torch.isinf(e) & (torch.sign(a) == torch.sign(e))
    close = torch.isclose(a, e, rtol=rtol, atol=atol) | both_inf
    return bool(close.all())


def _fmt(x: Any, digits: int = 6) -> str:
    try:
        t = _f64(x)
    except (TypeError, ValueError, RuntimeError):
        return repr(x)
    if t.numel() == 1:
        v = float(t.reshape(()))
        return f"{v:.{digits}g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.4e}"
    if t.numel() <= 6:
        return "[" + ", ".join(_fmt(v, digits) for v in t.reshape(-1).tolist()) + "]"
    return f"a tensor of shape {tuple(t.shape)}"


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:] if text else text


def _shape_note(answer: Any, expected: Any) -> str:
    try:
        a, e = _f64(answer), _f64(expected)
    except (TypeError, ValueError, RuntimeError):
        return f" (your answer is a {type(answer).__name__}, not a number or tensor)"
    if a.numel() > 1 and tuple(a.shape) != tuple(e.shape):
        return f" (your answer has shape {tuple(a.shape)}, expected {tuple(e.shape)})"
    if a.numel() > 1:
        return f" (largest difference {float((a - e).abs().max()):.3g})"
    return ""


def _judge(answer: Any, expected: Any, what: str, why: str,
           mistakes: Sequence[tuple[Any, str]] = (), fallback: str = "",
           rtol: float = RTOL, atol: float = ATOL) -> Feedback:
    """Compare; on a miss, name every typical mistake whose result equals the answer."""
    digits = 6 if rtol > 0 else 10  # absolute comparisons need every digit shown
    if _matches(answer, expected, rtol, atol):
        return _report(True, f"Correct: {what} is {_fmt(expected, digits)}: {why}".strip())
    shown, wanted = _fmt(answer, digits), _fmt(expected, digits)
    if shown.startswith("a tensor") or wanted.startswith("a tensor"):
        head = f"your {what} ({shown.removeprefix('a ')}) differs from the expected one ({wanted.removeprefix('a ')})"
    else:
        head = f"your {what} is {shown} but it should be {wanted}"
    hints = [hint for value, hint in mistakes
             if value is not None and not _matches(value, expected, rtol, atol)
             and _matches(answer, value, rtol, atol)]
    hints = list(dict.fromkeys(hints))  # two slips can give the same number: name both
    if hints:
        return _report(False, f"{_sentence(head)}: " + " Or: ".join(hints))
    note = _shape_note(answer, expected)
    return _report(False, f"{_sentence(head)}{note}: {fallback or why}".strip())


def _checked(fn: Callable[..., Feedback]) -> Callable[..., Feedback]:
    """Turn a missing answer or a crashing student function into feedback, not a traceback."""
    def wrapper(*args: Any, **kwargs: Any) -> Feedback:
        try:
            return fn(*args, **kwargs)
        except _NoAnswer as err:
            return _report(False, str(err))
    wrapper.__name__, wrapper.__doc__, wrapper.__wrapped__ = fn.__name__, fn.__doc__, fn
    return wrapper


# ---------------------------------------------------------------------------------------------
# 01 features
# ---------------------------------------------------------------------------------------------
@_checked
def check_im_div(n_rows: int, n_captions: int, answer: Any) -> Feedback:
    """How many captions share one feature row: ``im_div = 5`` if rows != captions else 1.

    Args:
        n_rows: rows of ``{split}_ims.npy``.
        n_captions: lines of ``{split}_caps.txt``.
        answer: the student's ``im_div``.
    """
    answer = _resolve(answer, n_rows, n_captions)
    expected = 5 if int(n_rows) != int(n_captions) else 1
    if expected == 5:
        why = (f"the file holds {n_rows} rows for {n_captions} captions, one row per image shared by "
               f"its 5 captions, so caption c reads row c // 5.")
        hint = (f"rows ({n_rows}) differ from captions ({n_captions}): each row is an image and "
                "serves 5 captions, so im_div = 5.")
    else:
        why = ("rows equal captions: the file repeats each image's row once per caption (SCAN's "
               "redundant layout), so caption c reads row c.")
        hint = ("rows equal captions, so every caption has its own (repeated) row: im_div = 1. "
                "The image of caption c is still c // 5.")
    return _judge(answer, expected, "im_div", why, [(1 if expected == 5 else 5, hint)],
                  fallback="im_div is 5 when the feature rows differ from the captions, else 1.")


@_checked
def check_caption_image(caption_index: int, answer: Any, captions_per_image: int = 5) -> Feedback:
    """The image of caption ``c`` is ``c // 5`` (captions ``5i..5i+4`` belong to image ``i``)."""
    c, k = int(caption_index), int(captions_per_image)
    answer = _resolve(answer, c)
    expected = c // k
    mistakes = [
        (c / k, f"use integer division: c // {k}, not c / {k} (an image index is a whole number)."),
        (c % k, f"c % {k} is the caption's position among its image's {k} captions, not the image."),
        (round(c / k), f"rounding goes up when c % {k} >= {math.ceil(k / 2)}; take the floor, c // {k}."),
        (c * k, f"reversed: image i owns captions {k}i..{k}i+{k - 1}, so caption c belongs to c // {k}."),
        (c // k + 1, "image indices start at 0."),
    ]
    return _judge(answer, expected, f"image of caption {c}",
                  f"captions {k * expected}..{k * expected + k - 1} belong to image {expected}.", mistakes)


@_checked
def check_region_count(features: Any, answer: Any) -> Feedback:
    """Regions per image ``R``: axis 1 of the ``(N_rows, R, F)`` feature array.

    Args:
        features: the feature array, its shape, or a dataset with ``num_regions``.
        answer: the student's ``R``.
    """
    if hasattr(features, "num_regions"):
        n, r, f = int(getattr(features, "num_rows", 0)), int(features.num_regions), int(features.feature_dim)
    else:
        shape = tuple(features) if isinstance(features, (tuple, list, torch.Size)) else tuple(np.shape(features))
        if len(shape) != 3:
            raise ValueError(f"check_region_count: features must be (N_rows, R, F), got shape {shape}")
        n, r, f = (int(s) for s in shape)
    answer = _resolve(answer, features)
    mistakes = [
        (f, f"{f} is the feature width F of each region (2048 for BUTD); regions are axis 1."),
        (n, f"{n} is the number of rows (images or captions); regions are axis 1."),
        (r * f, "that is every number of one image; count the regions (axis 1) only."),
    ]
    return _judge(answer, r, "number of regions per image",
                  f"the features are (N_rows, R, F) = ({n}, {r}, {f}); BUTD gives 36 regions.", mistakes)


# ---------------------------------------------------------------------------------------------
# 02 training
# ---------------------------------------------------------------------------------------------
def _hal_parts(S: torch.Tensor, mu: float, gamma: float, keep_diagonal: bool = False
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair parts of HAL's batch term in float64: ``(i2t_neg, t2i_neg, pos, i2t_lse, t2i_lse)``."""
    b = S.shape[0]
    logits = mu * (S - gamma)
    if not keep_diagonal:
        logits = logits.masked_fill(torch.eye(b, dtype=torch.bool), float("-inf"))
    i2t_lse = torch.logsumexp(logits, dim=1)          # image i vs captions j (row i)
    t2i_lse = torch.logsumexp(logits, dim=0)          # caption i vs images j (column i)
    i2t = torch.nn.functional.softplus(i2t_lse) / mu  # (1/μ) log(1 + Σ e^{...})
    t2i = torch.nn.functional.softplus(t2i_lse) / mu
    pos = -torch.log1p(torch.relu(torch.diagonal(S)))
    return i2t, t2i, pos, i2t_lse / mu, t2i_lse / mu


@_checked
def check_hal_term(sim: Any, answer: Any, mu: float = 90.0, gamma: float = 0.5) -> Feedback:
    """USER's mini-batch term ``L_mb`` (HAL's loss) of a ``(B, B)`` similarity matrix.

    ``L_mb = (1/B) Σ_i [(1/μ)log(1 + Σ_{j≠i} e^{μ(S_ji−γ)}) + (1/μ)log(1 + Σ_{j≠i} e^{μ(S_ij−γ)})
    − log(1 + max(0, S_ii))]``, computed by :func:`userlab.losses.batch_hal_loss`.

    Args:
        sim: ``(B, B)`` similarities, rows = images.
        answer: the student's loss value, or a function ``f(sim) -> loss``.
        mu, gamma: scale and threshold (90, 0.5).
    """
    from .losses import batch_hal_loss

    S = _f64(sim)
    if S.dim() != 2 or S.shape[0] != S.shape[1]:
        raise ValueError(f"check_hal_term: sim must be (B, B), got shape {tuple(S.shape)}")
    answer = _resolve(answer, sim)
    b = S.shape[0]
    expected = batch_hal_loss(S, mu=mu, gamma=gamma).total
    i2t, t2i, pos, i2t_lse, t2i_lse = _hal_parts(S, mu, gamma)
    di2t, dt2i, _, _, _ = _hal_parts(S, mu, gamma, keep_diagonal=True)
    mistakes = [
        ((i2t + t2i).mean(), "you left out the positive term −log(1 + max(0, S_ii)) that pulls each pair together."),
        ((di2t + dt2i + pos).mean(), "the positive pair S_ii is not a negative: leave j = i out of both sums."),
        ((i2t + pos).mean(), "there are two negative sums: image i against the other captions (row i) "
                             "AND caption i against the other images (column i)."),
        ((t2i + pos).mean(), "there are two negative sums: image i against the other captions (row i) "
                             "AND caption i against the other images (column i)."),
        ((i2t + t2i + pos).sum(), f"average over the {b} pairs (the 1/B), do not sum."),
        ((mu * (i2t + t2i) + pos).mean(), "each log-sum-exp is divided by μ (it is a smooth max of S − γ)."),
        ((i2t_lse + t2i_lse + pos).mean(), "the 1 inside log(1 + Σ ...) is missing: it keeps the loss at 0 "
                                           "once every negative is well below γ."),
        ((i2t + t2i - torch.log1p(torch.diagonal(S))).mean(), "clip the positive at 0: −log(1 + max(0, S_ii))."),
    ]
    return _judge(answer, expected, "mini-batch UTO term",
                  "with μ = 90 each (1/μ)·log(1 + Σ e^{μ(S−γ)}) is a smooth hinge on the hardest "
                  "negative at γ = 0.5.", mistakes)


@_checked
def check_ema(theta_k: Any, theta_q: Any, m: float, answer: Any) -> Feedback:
    """One momentum step ``θ_k ← m·θ_k + (1−m)·θ_q``.

    Args:
        theta_k: key-encoder weights (a number or tensor).
        theta_q: query-encoder weights.
        m: momentum (0.999 in USER).
        answer: the new key weights, or a function ``f(theta_k, theta_q, m)`` (it gets copies).
    """
    k, q, m = _f64(theta_k), _f64(theta_q), float(m)
    expected = m * k + (1 - m) * q      # computed before the student's function can touch anything
    answer = _resolve(answer, theta_k, theta_q, m)
    mistakes = [
        (m * q + (1 - m) * k, f"m and 1 − m are swapped: the key encoder keeps m = {m:g} of ITSELF and "
                              "takes only 1 − m of the query encoder, so it changes slowly."),
        (q, "that copies the query weights: the key encoder must move slowly (m of itself)."),
        (k, "that leaves the key weights unchanged: mix in (1 − m) of the query weights."),
        (m * k + q, "the query weights are weighted by (1 − m), not 1."),
    ]
    return _judge(answer, expected, "updated key weight",
                  "the key encoder follows the query encoder as an exponential moving average.", mistakes)


@_checked
def check_queue_pointer(K: int, B: int, steps: int, answer: Any) -> Feedback:
    """Queue pointer after ``steps`` enqueues of ``B`` keys into ``K`` slots: ``(steps·B) mod K``.

    The pointer is the next slot to write, which is also the oldest key.
    """
    K, B, steps = int(K), int(B), int(steps)
    answer = _resolve(answer, K, B, steps)
    expected = (steps * B) % K
    mistakes = [
        (steps * B, f"the queue is a ring of {K} slots: the pointer wraps around, take it modulo K."),
        (steps % K, f"each step writes B = {B} keys, so the pointer moves by {B}, not by 1."),
        ((steps * B) // K, "that is how many times the queue has wrapped around, not where the pointer is."),
        (((steps - 1) * B) % K if steps > 0 else None,
         "after `steps` enqueues the pointer is past the last batch (it points at the next slot to write)."),
        (K - (steps * B) % K, "the pointer counts forward from slot 0."),
    ]
    return _judge(answer, expected, "queue pointer",
                  f"{steps} steps × {B} keys = {steps * B} writes, modulo {K} slots; the next write "
                  "overwrites the oldest key.", mistakes)


# ---------------------------------------------------------------------------------------------
# 03 evaluation
# ---------------------------------------------------------------------------------------------
def _first_caption_i2t_ranks(S: np.ndarray, k: int) -> np.ndarray:
    """i2t ranks when only caption ``k*i`` counts as image i's ground truth (a mistake)."""
    ranks = []
    for i in range(S.shape[0]):
        order = np.argsort(-S[i], kind="stable")
        ranks.append(int(np.flatnonzero(order == k * i)[0]))
    return np.asarray(ranks)


def _worst_caption_i2t_ranks(S: np.ndarray, k: int) -> np.ndarray:
    """i2t ranks when the *worst* of the k captions counts (a mistake)."""
    ranks = []
    for i in range(S.shape[0]):
        order = np.argsort(-S[i], kind="stable")
        ranks.append(int(np.flatnonzero(order // k == i).max()))
    return np.asarray(ranks)


@_checked
def check_recall_at_k(sims: Any, k: int, answer: Any, direction: str = "i2t",
                      captions_per_image: int = 5) -> Feedback:
    """``R@K = 100·mean(rank < K)`` of an ``(N, 5N)`` similarity matrix (0-based ranks).

    i2t: an image's rank is the best position of any of its 5 captions in its sorted row. t2i:
    a caption's rank is the position of its image ``c // 5`` in its sorted column.

    Args:
        sims: ``(N_img, N_cap)`` similarities, rows = images.
        k: the K of R@K.
        answer: the student's R@K in percent, or a function ``f(sims, k)``.
        direction: ``"i2t"`` or ``"t2i"``.
        captions_per_image: 5.
    """
    from .evaluate import retrieval_ranks

    if direction not in ("i2t", "t2i"):
        raise ValueError(f"check_recall_at_k: direction must be 'i2t' or 't2i', got {direction!r}")
    S = _f64(sims).numpy()
    cpi = int(captions_per_image)
    answer = _resolve(answer, sims, k)
    i2t, t2i = (r.numpy() for r in retrieval_ranks(S, cpi))
    ranks, other = (i2t, t2i) if direction == "i2t" else (t2i, i2t)
    recall = lambda r, kk=k: 100.0 * float(np.mean(np.asarray(r) < kk))  # noqa: E731
    expected = recall(ranks)
    low_i2t, low_t2i = (r.numpy() for r in retrieval_ranks(-S, cpi))  # ascending sort
    mistakes = [
        (expected / 100.0, "R@K is a percentage: multiply the fraction of hits by 100."),
        (recall(ranks, k + 1), "ranks are 0-based (rank 0 is the top): a hit is rank < K, not rank <= K."),
        (recall(other), f"that is the {'t2i' if direction == 'i2t' else 'i2t'} recall: "
                        f"{'rows (images) rank captions' if direction == 'i2t' else 'columns (captions) rank images'}."),
        (recall(low_i2t if direction == "i2t" else low_t2i),
         "sort the scores in descending order: the most similar item comes first."),
    ]
    if direction == "i2t":
        mistakes += [
            (recall(_first_caption_i2t_ranks(S, cpi)),
             f"did you take the best of the {cpi} captions? An image is a hit when ANY of its captions "
             "is in the top K, not only its first one."),
            (recall(_worst_caption_i2t_ranks(S, cpi)),
             f"an image needs only its best caption in the top K, not all {cpi}."),
        ]
    why = (f"an image's rank is the best position of any of its {cpi} captions in its sorted row"
           if direction == "i2t" else
           f"a caption's rank is the position of its image c // {cpi} in its sorted column")
    return _judge(answer, expected, f"{direction} R@{k}",
                  f"{why}, and R@{k} = 100·mean(rank < {k}) with 0-based ranks.", mistakes)


def _metric(metrics: Any, key: str) -> float:
    if hasattr(metrics, "iloc") and hasattr(metrics, "columns"):  # one-row DataFrame
        return float(metrics[key].iloc[0])
    return float(metrics[key])


@_checked
def check_rsum(metrics: Any, answer: Any) -> Feedback:
    """``rSum`` = the six recalls (R@1, R@5, R@10 of i2t and t2i) added up; 600 at most.

    Args:
        metrics: dict or one-row DataFrame with ``i2t_R@1`` ... ``t2i_R@10`` (and medr / meanr).
        answer: the student's rSum, or a function ``f(metrics)``.
    """
    answer = _resolve(answer, metrics)
    i2t = sum(_metric(metrics, f"i2t_R@{k}") for k in (1, 5, 10))
    t2i = sum(_metric(metrics, f"t2i_R@{k}") for k in (1, 5, 10))
    expected = i2t + t2i
    extras = None
    try:
        extras = expected + sum(_metric(metrics, f"{d}_{m}") for d in ("i2t", "t2i") for m in ("medr", "meanr"))
    except (KeyError, IndexError):
        pass
    mistakes = [
        (expected / 6.0, "rSum is the sum of the six recalls, not their mean (it reaches 600)."),
        (i2t, "add both directions: i2t R@1+R@5+R@10 AND t2i R@1+R@5+R@10."),
        (t2i, "add both directions: i2t R@1+R@5+R@10 AND t2i R@1+R@5+R@10."),
        (extras, "rSum adds only the recalls; medr and meanr are ranks, not recalls."),
        (expected / 100.0, "recalls are in percent; rSum is their plain sum."),
    ]
    return _judge(answer, expected, "rSum", "R@1 + R@5 + R@10 of both directions, at most 600.", mistakes)


@_checked
def check_medr(ranks: Any, answer: Any) -> Feedback:
    """Median rank ``medr = floor(median(rank)) + 1`` of 0-based ranks (1 is the best)."""
    r = _f64(ranks).reshape(-1).numpy()
    if r.size == 0:
        raise ValueError("check_medr: ranks are empty")
    answer = _resolve(answer, ranks)
    med = float(np.median(r))
    expected = math.floor(med) + 1
    mistakes = [
        (med, "ranks are 0-based (0 = top) but medr is 1-based: add 1."),
        (math.floor(med), "ranks are 0-based (0 = top) but medr is 1-based: add 1."),
        (med + 1, "floor the median before adding 1 (the SCAN / VSE++ code does)."),
        (float(np.mean(r)) + 1, "that is meanr (the mean rank + 1); medr uses the median."),
        (float(np.mean(r)), "that is a mean; medr is floor(median) + 1."),
    ]
    return _judge(answer, expected, "medr", "medr = floor(median of 0-based ranks) + 1.", mistakes)


# ---------------------------------------------------------------------------------------------
# 04 attention
# ---------------------------------------------------------------------------------------------
@_checked
def check_attention_sums(weights: Any, answer: Any) -> Feedback:
    """Per-image sum of attention weights ``(B, R) -> (B,)`` (one number if all are equal).

    SGE's ``α`` is a softmax (sums to 1); ``β`` is a softmax L2-normalised again, so its *squares*
    sum to 1 and the weights themselves sum to between 1 and ``√R``.
    """
    w = _f64(weights)
    if w.dim() == 1:
        w = w.unsqueeze(0)
    if w.dim() != 2:
        raise ValueError(f"check_attention_sums: weights must be (B, R), got shape {tuple(w.shape)}")
    answer = _resolve(answer, weights)
    expected = w.sum(dim=1)
    squares = (w ** 2).sum(dim=1)
    unit_l2 = bool(torch.allclose(squares, torch.ones_like(squares), atol=1e-4))
    sums_to_one = bool(torch.allclose(expected, torch.ones_like(expected), atol=1e-4))
    why = ("these weights are a softmax over regions: they sum to 1." if sums_to_one else
           "these weights have unit L2 norm (USER's β: softmax, then L2-normalised), so their squares "
           f"sum to 1 and the weights to between 1 and √R = {math.sqrt(w.shape[1]):.2f}." if unit_l2 else
           "one sum per image, over the regions.")
    mistakes = [
        (1.0, "β is not a distribution: USER L2-normalises the softmax output again, so the squares sum "
              "to 1, not the weights."),
        (squares, "you summed the squares (the L2 norm squared); sum the weights themselves."),
        (w.sum(dim=0), "you summed over the batch axis; sum over the regions (last axis), one sum per image."),
        (w.sum(), "one sum per image, not one over the whole batch."),
    ]
    return _judge(answer, expected if expected.numel() > 1 else expected.reshape(()),
                  "attention sum per image", why, mistakes)


@_checked
def check_beta(g: Any, regions: Any, answer: Any, lam: float = 1.0) -> Feedback:
    """USER's region attention ``β = l2norm_k(softmax_k(λ·⟨g, R_k⟩))``.

    Args:
        g: ``(B, D)`` or ``(D,)`` global vector.
        regions: ``(B, R, D)`` or ``(R, D)`` regions.
        answer: ``β`` (same batch layout as the inputs), or a function ``f(g, regions)``.
        lam: softmax scale λ (1 in USER).
    """
    from .models.image import region_attention

    gg, rr = _f64(g), _f64(regions)
    batched = rr.dim() == 3
    if not batched:
        gg, rr = gg.unsqueeze(0), rr.unsqueeze(0)
    if rr.dim() != 3 or gg.shape != (rr.shape[0], rr.shape[2]):
        raise ValueError(f"check_beta: need g (B, D) and regions (B, R, D), got {tuple(_f64(g).shape)} "
                         f"and {tuple(_f64(regions).shape)}")
    answer = _resolve(answer, g, regions)
    beta = region_attention(rr, gg, lam)[1]
    affinity = torch.einsum("brd,bd->br", rr, gg)
    soft = torch.softmax(lam * affinity, dim=1)
    unbatch = (lambda t: t) if batched else (lambda t: t[0])  # noqa: E731
    l2 = lambda t, dim: t / t.norm(dim=dim, keepdim=True).clamp_min(1e-12)  # noqa: E731
    mistakes = [
        (unbatch(soft), "you stopped after the softmax: USER L2-normalises the softmax output again "
                        "(so Σ β² = 1)."),
        (unbatch(l2(affinity, 1)), "apply the softmax over regions first, then the L2 normalisation."),
        (unbatch(l2(torch.softmax(lam * affinity, dim=0), 1)) if batched else None,
         "the softmax runs over the regions (axis 1), not over the batch."),
        (unbatch(region_attention(rr, gg, 1.0)[1]) if lam != 1.0 else None,
         f"scale the affinities by λ = {lam:g} before the softmax."),
    ]
    return _judge(answer, unbatch(beta), "β", "β_k = softmax_k(λ⟨g, R_k⟩), L2-normalised over the regions.",
                  mistakes, fallback="compute the affinities ⟨g, R_k⟩, a softmax over regions, then "
                                     "divide by the L2 norm over regions.")


# ---------------------------------------------------------------------------------------------
# 05 boosting
# ---------------------------------------------------------------------------------------------
@_checked
def check_relative_boost(S_t: Any, S_a: Any, answer: Any, margin: float = 0.2,
                         beta: float = 1.0) -> Feedback:
    """DBL's relative boosting loss ``L_rel`` (max form, both directions, summed).

    ``Σ_i max_{j≠i}[γβ + (Sa_ii − Sa_ij) − (St_ii − St_ij)]_+ + (the same over columns)``, as in
    :func:`userlab.boosting.relative_boost`.

    Args:
        S_t: ``(B, B)`` target scores.
        S_a: ``(B, B)`` anchor scores.
        answer: the loss value, or a function ``f(S_t, S_a)``.
        margin, beta: γ and β (0.2, 1.0).
    """
    from .boosting import relative_boost

    St, Sa = _f64(S_t), _f64(S_a)
    answer = _resolve(answer, S_t, S_a)
    ref = relative_boost(St, Sa, margin=margin, beta=beta)
    b = St.shape[0]
    mistakes = [
        (relative_boost(Sa, St, margin=margin, beta=beta).total,
         "target and anchor are swapped: the TARGET's gap St_ii − St_ij must beat the anchor's gap "
         "plus γ, so the hinge is [γ + anchor gap − target gap]_+."),
        (relative_boost(St, Sa, margin=0.0).total, "the margin γ·β is missing from the hinge."),
        (ref.terms["i2t"], "add both directions: rows (image queries) and columns (caption queries)."),
        (ref.terms["t2i"], "add both directions: rows (image queries) and columns (caption queries)."),
        (relative_boost(St, Sa, margin=margin, beta=beta, reduction="sum").total,
         "the released DBL keeps only the hardest (max) violating negative per query, not the sum."),
        (ref.total / b, "DBL sums over the batch (no 1/B)."),
    ]
    return _judge(answer, ref.total, "relative boosting loss",
                  "per query the target's positive-minus-negative gap must exceed the anchor's gap "
                  f"by γ·β = {margin * beta:g}.", mistakes)


@_checked
def check_absolute_margins(answer: Any, margin: float = 0.2, beta: float = 1.0) -> Feedback:
    """Absolute boosting's margins in the released code: ``γ1 = γ2 = 0.5·γ·β`` (0.1 at the defaults).

    Args:
        answer: ``(γ1, γ2)`` or one number for both.
        margin, beta: γ and β.
    """
    answer = _resolve(answer)
    half = 0.5 * margin * beta
    expected = (half, half)
    if isinstance(answer, (int, float)) or (isinstance(answer, (torch.Tensor, np.ndarray))
                                            and np.size(answer) == 1):
        answer = (float(answer), float(answer))
    why = (f"the code uses γ·β·0.5 = {half:g} for both: the positive must rise {half:g} above the "
           f"anchor's and each negative fall {half:g} below it.")
    mistakes = [
        ((margin * beta, margin * beta), f"the released code halves γ·β for absolute boosting: "
                                         f"γ1 = γ2 = 0.5·{margin * beta:g} = {half:g}."),
        ((half / 2, half / 2), f"halved once only: γ1 = γ2 = 0.5·γ·β = {half:g}."),
        ((half, margin * beta), f"both margins are halved, γ2 too: {half:g}."),
        ((margin * beta, half), f"both margins are halved, γ1 too: {half:g}."),
    ]
    return _judge(answer, expected, "(γ1, γ2)", why, mistakes)


@_checked
def check_momentum_schedule(step: int, total: int, answer: Any, base: float = 0.9995,
                            final: float = 1.0) -> Feedback:
    """DBL's momentum (MSS) schedule: ``m = final + (base − final)·(1 + cos(π·step/total))/2``.

    Args:
        step, total: current step and schedule length.
        answer: ``m`` at ``step``, or a function ``f(step, total)``.
        base, final: momentum at step 0 and at the end.
    """
    from .momentum import cosine_momentum

    answer = _resolve(answer, step, total)
    expected = cosine_momentum(step, total, base, final)
    p = min(max(step, 0), total) / total
    mistakes = [
        (base + (final - base) * p, "that is a linear ramp; DBL follows DINO's cosine schedule "
                                    "m = final + (base − final)·(1 + cos(π t/T))/2."),
        (base + (final - base) * 0.5 * (1 + math.cos(math.pi * p)),
         f"the schedule runs the other way: it starts at base = {base:g} and rises to {final:g}."),
        (final + (base - final) * math.cos(math.pi * p),
         "(1 + cos)/2 maps the cosine to [0, 1]; a bare cos(π t/T) overshoots past the final value."),
        (final + (base - final) * 0.5 * (1 + math.cos(p)), "the angle is π·t/T, not t/T."),
    ]
    # momenta differ in the 4th decimal: compare absolutely, as Python floats allow
    return _judge(answer, expected, f"momentum at step {step} of {total}",
                  "the anchor starts at base momentum and freezes (m → 1) with a cosine ramp.", mistakes,
                  rtol=0.0, atol=1e-9)

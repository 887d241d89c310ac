"""Checkers for the notebooks' exercises: the student writes a function, a checker runs it.

Every ``check_*`` function takes the student's *function* (not a number), runs it on several
hidden inputs and edge cases (random batches, ``B = 1``, tied scores, masked keys, float16
inputs, other hyper-parameters), compares each result with userlab's own implementation, and
prints and returns a :class:`Feedback` that says **what** is wrong -- the shape, the sign, a
missing term, which case -- without ever printing the expected values:

    >>> check_minibatch_term(minibatch_term)
    ✘ Exercise minibatch_term: wrong on the case 'random batch (B = 8)': the positive term
      −log(1 + max(0, S_ii)) is missing ...

The answer key is the package itself (``userlab.losses``, ``userlab.models.image``,
``userlab.momentum``, ``userlab.boosting``, ``userlab.evaluate``, ``userlab.data.precomp``);
nothing in this module solves an exercise. A function that returns the same result for every
input, or returns its input, or calls the library function it is meant to replace, fails with
that diagnosis. A function that still raises ``NotImplementedError`` is reported as "not
implemented" (a :class:`Feedback` with ``status == "not implemented"``), so a notebook with
unfinished exercises still runs to the end.

Predict-then-run questions use :func:`reveal`: the student's prediction is compared with the
option that the measurement in the notebook selected.

Exercises (one group per notebook): 01 ``check_im_div``, ``check_feature_row``; 02
``check_minibatch_term``, ``check_queue_term``, ``check_ema_step``; 03 ``check_recall_at_k``,
``check_median_rank``; 04 ``check_region_attention``; 05 ``check_supremum_margin``,
``check_infimum_margin``, ``check_relative_boost``, ``check_absolute_boost``.
"""
from __future__ import annotations

import contextlib
import inspect
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import numpy as np
import torch

__all__ = [
    "Feedback", "NOT_IMPLEMENTED", "reveal", "session_log",
    "check_im_div", "check_feature_row",
    "check_minibatch_term", "check_queue_term", "check_ema_step",
    "check_recall_at_k", "check_median_rank",
    "check_region_attention",
    "check_supremum_margin", "check_infimum_margin", "check_relative_boost", "check_absolute_boost",
]

NOT_IMPLEMENTED = "not implemented"
RTOL, ATOL = 1e-4, 1e-6          # float32 / float64 inputs
HALF_RTOL, HALF_ATOL = 1e-2, 1e-2  # float16 inputs: the student may compute in float16 too


@dataclass(frozen=True)
class Feedback:
    """The verdict of a checker.

    Attributes:
        correct: whether every hidden case agrees with userlab.
        message: what was checked, or what is wrong (never the expected values).
        status: ``"correct"``, ``"wrong"`` or ``"not implemented"``.
    """

    correct: bool
    message: str
    status: str = "wrong"

    def __bool__(self) -> bool:
        return self.correct

    def __str__(self) -> str:
        mark = "✔" if self.correct else ("…" if self.status == NOT_IMPLEMENTED else "✘")
        return f"{mark} {self.message}"

    def __repr__(self) -> str:  # the message was printed already; keep the echo short
        return f"Feedback(correct={self.correct}, status={self.status!r})"


_LOG: list[Feedback] = []


def session_log(clear: bool = False) -> list[Feedback]:
    """Every :class:`Feedback` printed since the module was imported (or last cleared)."""
    out = list(_LOG)
    if clear:
        _LOG.clear()
    return out


def _report(correct: bool, message: str, status: Optional[str] = None) -> Feedback:
    fb = Feedback(bool(correct), message, status or ("correct" if correct else "wrong"))
    _LOG.append(fb)
    print(fb)
    return fb


# ---------------------------------------------------------------------------------------------
# running the student's function
# ---------------------------------------------------------------------------------------------
@dataclass
class _Case:
    """One hidden input: ``args`` for the student's function and userlab's result for them.

    ``expected`` is a tuple of float64 tensors (one per returned part). ``mistakes`` are
    ``(parts, diagnosis)`` pairs: the result of a typical slip on this input (``None`` parts
    match anything). ``hint`` says what is special about the case.
    """

    name: str
    args: tuple
    expected: tuple
    mistakes: list = field(default_factory=list)
    hint: str = ""
    half: bool = False
    inplace_ok: tuple = ()


class _BadOutput(Exception):
    pass


class _LibraryCalled(Exception):
    pass


def _code_objects(functions: Sequence[Callable]) -> dict:
    codes = {}
    for fn in functions:
        for f in (fn, inspect.unwrap(fn)):
            code = getattr(f, "__code__", None)
            if code is not None:
                codes[code] = f"{fn.__module__}.{fn.__qualname__}"
    return codes


@contextlib.contextmanager
def _watch(functions: Sequence[Callable]) -> Iterator[list]:
    """Record calls of ``functions`` while the student's code runs (a profile hook)."""
    codes = _code_objects(functions)
    called: list[str] = []
    previous = sys.getprofile()

    def profiler(frame, event, arg):
        if event == "call" and frame.f_code in codes:
            called.append(codes[frame.f_code])
        if previous is not None:
            previous(frame, event, arg)

    sys.setprofile(profiler if codes else previous)
    try:
        yield called
    finally:
        sys.setprofile(previous)


def _copy(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.clone()
    if isinstance(x, np.ndarray):
        return x.copy()
    return x


def _f64(x: Any) -> torch.Tensor:
    """Number / array / tensor -> float64 CPU tensor; anything else raises _BadOutput."""
    if x is None:
        raise _BadOutput("your function returned None: `return` the result")
    if isinstance(x, torch.Tensor):
        if x.is_complex():
            raise _BadOutput("your function returned a complex tensor")
        return x.detach().to("cpu", torch.float64)
    try:
        return torch.as_tensor(np.asarray(x, dtype=np.float64))
    except (TypeError, ValueError) as err:
        raise _BadOutput(f"your function returned a {type(x).__name__}, not a number or tensor "
                         f"({err})") from None


def _shape(t: torch.Tensor) -> str:
    return "a scalar" if t.dim() == 0 else f"shape {tuple(t.shape)}"


def _normalise(answer: Any, expected: tuple, parts: tuple) -> tuple:
    """The answer as a tuple of float64 tensors shaped like ``expected``."""
    if len(expected) > 1:
        if not isinstance(answer, (tuple, list)) or len(answer) != len(expected):
            kind = (f"a {type(answer).__name__} of length {len(answer)}"
                    if isinstance(answer, (tuple, list)) else f"a {type(answer).__name__}")
            raise _BadOutput(f"return a pair ({', '.join(parts)}); your function returned {kind}")
        items = answer
    else:
        items = (answer,)
    out = []
    for item, exp, name in zip(items, expected, parts):
        got = _f64(item)
        if exp.dim() == 0 and got.numel() == 1:
            got = got.reshape(())
        if tuple(got.shape) != tuple(exp.shape):
            raise _BadOutput(f"{name} has {_shape(got)}, but {_shape(exp)} is expected")
        out.append(got)
    return tuple(out)


def _close(a: torch.Tensor, b: torch.Tensor, half: bool) -> bool:
    rtol, atol = (HALF_RTOL, HALF_ATOL) if half else (RTOL, ATOL)
    if a.shape != b.shape:
        return False
    same_inf = torch.isinf(a) & torch.isinf(b) & (torch.sign(a) == torch.sign(b))
    return bool((torch.isclose(a, b, rtol=rtol, atol=atol) | same_inf).all())


def _same(got: tuple, ref: tuple, half: bool = False) -> bool:
    return all(g is None or r is None or _close(g, _f64(r) if not isinstance(r, torch.Tensor)
                                                else r.to(torch.float64), half)
               for g, r in zip(got, ref))


def _as_parts(value: Any, n: int) -> tuple:
    if n == 1:
        return (value,) if not isinstance(value, tuple) else value
    return tuple(value)


def _inputs_changed(case: _Case, copies: tuple) -> Optional[int]:
    for i, (orig, copy) in enumerate(zip(case.args, copies)):
        if i in case.inplace_ok or not isinstance(orig, torch.Tensor):
            continue
        if copy.shape != orig.shape or not torch.equal(copy, orig):
            return i
    return None


def _check(exercise: str, fn: Any, cases: Sequence[_Case], library: Sequence[Callable] = (),
           parts: tuple = ("the result",), arg_names: Sequence[str] = ()) -> Feedback:
    """Run ``fn`` on every case and report the first disagreement with a diagnosis."""
    title = f"Exercise {exercise}"
    if fn is None or fn is Ellipsis:
        return _report(False, f"{title}: {NOT_IMPLEMENTED} yet (no function given).", NOT_IMPLEMENTED)
    if not callable(fn):
        return _report(False, f"{title}: pass your function itself (without calling it), not a "
                              f"{type(fn).__name__}: the checker calls it on hidden inputs.")
    results = []
    for case in cases:
        copies = tuple(_copy(a) for a in case.args)
        try:
            with _watch(library) as called:
                answer = fn(*copies)
        except NotImplementedError:
            return _report(False, f"{title}: {NOT_IMPLEMENTED} yet: replace `raise NotImplementedError` "
                                  "with your code, then run this cell again.", NOT_IMPLEMENTED)
        except Exception as err:  # any failure of the student's code becomes feedback
            return _report(False, f"{title}: on the case '{case.name}' your function raised "
                                  f"{type(err).__name__}: {err}. {case.hint}".strip())
        if called:
            return _report(False, f"{title}: your function calls userlab's {called[0]}, the function this "
                                  "exercise asks you to write: compute it yourself.")
        changed = _inputs_changed(case, copies)
        if changed is not None:
            name = arg_names[changed] if changed < len(arg_names) else f"argument {changed + 1}"
            return _report(False, f"{title}: your function changed its input `{name}` in place; "
                                  "leave the inputs as they are and return a new tensor.")
        try:
            results.append(_normalise(answer, case.expected, parts))
        except _BadOutput as err:
            return _report(False, f"{title}: on the case '{case.name}': {err}.")

    # An answer that does not depend on the input cannot be right on inputs with different results.
    distinct = any(not _same(c.expected, cases[0].expected) for c in cases[1:])
    fills = [_fill_value(r) for r in results]
    filled = all(f is not None for f in fills) and all(abs(f - fills[0]) <= ATOL for f in fills)
    if distinct and len(results) > 1 and (filled or all(_same(r, results[0]) for r in results[1:])):
        return _report(False, f"{title}: your function returns the same result for all {len(cases)} "
                              "hidden inputs, so it ignores its arguments: compute the result from them.")
    for case, got in zip(cases, results):
        if _same(got, case.expected, case.half):
            continue
        first = case.args[0]
        if (isinstance(first, torch.Tensor) and tuple(first.shape) == tuple(got[0].shape)
                and _close(got[0], _f64(first), case.half)):
            return _report(False, f"{title}: on the case '{case.name}' your function returns its input "
                                  f"`{arg_names[0] if arg_names else 'argument 1'}` unchanged.")
        return _report(False, f"{title}: wrong on the case '{case.name}': {_diagnose(case, got, parts)}")
    names = ", ".join(f"'{c.name}'" for c in cases[:8]) + (", ..." if len(cases) > 8 else "")
    return _report(True, f"{title}: correct on all {len(cases)} hidden cases ({names}).", "correct")


def _fill_value(got: tuple) -> Optional[float]:
    """The one number every entry of every part holds, or None."""
    flat = torch.cat([g.reshape(-1) for g in got])
    if flat.numel() == 0 or not torch.isfinite(flat).all() or not bool((flat == flat[0]).all()):
        return None
    return float(flat[0])


def _diagnose(case: _Case, got: tuple, parts: tuple) -> str:
    """What is wrong with ``got`` on ``case``, without the expected values."""
    for g, e, name in zip(got, case.expected, parts):
        if not torch.isfinite(g).all() and torch.isfinite(e).all():
            return f"{name} contains NaN or inf. {case.hint}".strip()
    for g, e, name in zip(got, case.expected, parts):
        if not _close(g, e, case.half) and e.abs().max() > 1e-6 and _close(g, -e, case.half):
            return f"the sign of {name} is flipped. {case.hint}".strip()
    hits = [msg for value, msg in case.mistakes
            if value is not None and _same(got, _as_parts(value, len(parts)), case.half)
            and not _same(case.expected, _as_parts(value, len(parts)), case.half)]
    if hits:
        return " Or: ".join(dict.fromkeys(hits))
    bad = [name for g, e, name in zip(got, case.expected, parts) if not _close(g, e, case.half)]
    where = " and ".join(bad)
    if len(got) == 1 and got[0].dim() == 0:
        side = "larger" if float(got[0]) > float(case.expected[0]) else "smaller"
        return f"{where} is {side} than userlab's. {case.hint}".strip()
    g, e = got[parts.index(bad[0])], case.expected[parts.index(bad[0])]
    wrong = int((~torch.isclose(g, e, rtol=HALF_RTOL if case.half else RTOL,
                                atol=HALF_ATOL if case.half else ATOL)).sum())
    verb = "differ" if len(bad) > 1 else "differs"
    return f"{where} {verb} from userlab's ({bad[0]}: {wrong} of {e.numel()} entries). {case.hint}".strip()


def _t(*parts: Any) -> tuple:
    return tuple(_f64(p) if p is not None else None for p in parts)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _unit(*shape: int, seed: int, dim: int = -1) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.randn(*shape, generator=_gen(seed), dtype=torch.float64), dim=dim)


# ---------------------------------------------------------------------------------------------
# 01 features: the precomp layout (answer key: userlab.data.precomp.PrecompDataset)
# ---------------------------------------------------------------------------------------------
def _precomp_layouts() -> list[tuple[int, int, Any]]:
    """``(rows, captions, dataset)`` for tiny precomp files of both layouts."""
    from .data.precomp import PrecompDataset, write_precomp_split

    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for n_images, per_caption in ((1, False), (1, True), (3, False), (7, False), (7, True)):
            rows = n_images * (5 if per_caption else 1)
            folder = f"{tmp}/{n_images}_{int(per_caption)}"
            write_precomp_split(folder, "test", np.zeros((rows, 1, 2), np.float32),
                                [f"caption {c}" for c in range(5 * n_images)])
            out.append((rows, 5 * n_images, PrecompDataset(folder, "test")))
    return out


def check_im_div(fn: Callable[[int, int], int]) -> Feedback:
    """``im_div(n_rows, n_captions)``: how many captions share one row of ``{split}_ims.npy``."""
    cases = []
    for rows, caps, ds in _precomp_layouts():
        expected = ds.im_div
        cases.append(_Case(f"{rows} rows, {caps} captions", (rows, caps), _t(expected), [
            (_t(1 if expected == 5 else 5), "the two layouts are reversed: when rows and captions differ, "
                                            "one row serves all 5 captions of its image."),
            (_t(caps / rows), "im_div is 5 or 1, the captions per row of the layout"),
        ], hint="rows equal captions in one layout, rows equal images in the other."))
    return _check("im_div", fn, cases, parts=("im_div",), arg_names=("n_rows", "n_captions"))


def check_feature_row(fn: Callable[[int, int], int]) -> Feedback:
    """``feature_row(caption_index, im_div)``: the row of ``{split}_ims.npy`` caption ``c`` reads."""
    cases, seen = [], set()
    for rows, caps, ds in _precomp_layouts()[2:]:
        for c in (0, 4, 5, 13, caps - 1):
            if (c, ds.im_div) in seen:
                continue
            seen.add((c, ds.im_div))
            expected = ds.row_of_caption(c)
            cases.append(_Case(f"caption {c}, im_div {ds.im_div}", (c, ds.im_div), _t(expected), [
                (_t(c / ds.im_div) if ds.im_div > 1 else None, "use integer division: a row index is a whole number."),
                (_t(c // 5) if ds.im_div == 1 else None, "with im_div = 1 every caption has its own (repeated) "
                                                         "row: read row c, not the image index c // 5."),
                (_t(c % ds.im_div) if ds.im_div > 1 else None, "c % im_div is the caption's position among its "
                                                               "image's captions, not the row."),
                (_t(c * ds.im_div) if c else None, "reversed: rows are fewer than (or as many as) captions."),
            ]))
    from .data.precomp import PrecompDataset

    return _check("feature_row", fn, cases, library=(PrecompDataset.row_of_caption,), parts=("row",),
                  arg_names=("caption_index", "im_div"))


# ---------------------------------------------------------------------------------------------
# 02 training: the unified objective and the EMA step (answer key: losses, momentum)
# ---------------------------------------------------------------------------------------------
def _softplus_lse(logits: torch.Tensor, allowed: Optional[torch.Tensor], dim: int) -> torch.Tensor:
    """``log(1 + Σ_allowed e^logits)`` along ``dim`` (float64), the negative part of a UTO sum."""
    if allowed is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))
    return torch.nn.functional.softplus(torch.logsumexp(logits, dim=dim))


def _hal_slips(S: torch.Tensor, mu: float, gamma: float) -> list:
    """Results of typical slips in the mini-batch term (float64)."""
    b = S.shape[0]
    off = ~torch.eye(b, dtype=torch.bool)
    logits = mu * (S - gamma)
    i2t, t2i = _softplus_lse(logits, off, 1) / mu, _softplus_lse(logits, off, 0) / mu
    i2t_d, t2i_d = _softplus_lse(logits, None, 1) / mu, _softplus_lse(logits, None, 0) / mu
    pos = -torch.log1p(torch.relu(S.diagonal()))
    lse = lambda x, d: torch.logsumexp(x.masked_fill(~off, float("-inf")), dim=d)  # noqa: E731
    one_sided = "there are two negative sums per pair: image i against the other captions (row i) AND " \
                "caption i against the other images (column i)."
    return [
        (_t((i2t + t2i).mean()), "the positive term −log(1 + max(0, S_ii)) is missing."),
        (_t((i2t_d + t2i_d + pos).mean()), "the positive pair S_ii is not a negative: leave j = i out of both sums."),
        (_t((i2t + pos).mean()), one_sided),
        (_t((t2i + pos).mean()), one_sided),
        (_t((i2t + t2i + pos).sum()), "average over the B pairs (the 1/B), do not sum."),
        (_t((mu * (i2t + t2i) + pos).mean()), "each log(1 + Σ e^{…}) is divided by μ."),
        (_t(((lse(logits, 1) + lse(logits, 0)) / mu + pos).mean()),
         "the 1 inside log(1 + Σ …) is missing: the loss must reach 0 once every negative is below γ."),
        (_t((i2t + t2i - torch.log1p(S.diagonal())).mean()), "clip the positive at 0: −log(1 + max(0, S_ii))."),
        (_t((i2t + t2i - pos).mean()), "the positive term is subtracted: −log(1 + max(0, S_ii)) is added "
                                       "(it is negative and pulls S_ii up)."),
    ]


def check_minibatch_term(fn: Callable[..., Any]) -> Feedback:
    """``minibatch_term(sim, mu, gamma)``: USER's ``L_mb`` of a ``(B, B)`` similarity matrix.

    Answer key: :func:`userlab.losses.batch_hal_loss`.
    """
    from .losses import _positive_term, _smooth_negatives, batch_hal_loss, unified_objective

    specs = [
        ("random batch (B = 8)", (0.45 + 0.3 * torch.randn(8, 8, generator=_gen(1), dtype=torch.float64)
                                  ).clamp(-1, 1),
         90.0, 0.5, False, ""),
        ("B = 1", torch.tensor([[0.7]], dtype=torch.float64), 90.0, 0.5, False,
         "With one pair there are no negatives: both sums are empty and log(1 + 0) = 0."),
        ("ties: every similarity 0.6", torch.full((5, 5), 0.6, dtype=torch.float64), 90.0, 0.5, False, ""),
        ("other μ and γ (μ = 10, γ = 0.2)", _unit(6, 8, seed=3) @ _unit(6, 8, seed=4).t(), 10.0, 0.2, False,
         "Use the arguments mu and gamma, not the defaults 90 and 0.5."),
        ("half precision (float16, similarities near 1)",
         (0.9 + 0.1 * torch.rand(6, 6, generator=_gen(5), dtype=torch.float64)).half(), 90.0, 0.5, True,
         "e^{μ(S−γ)} reaches e^45, far beyond float16's largest number 65504: compute in float32 "
         "(sim.float()) or through logsumexp / softplus."),
    ]
    cases = []
    for name, S, mu, gamma, half, hint in specs:
        S64 = S.double()
        expected = batch_hal_loss(S64, mu=mu, gamma=gamma).total
        mistakes = _hal_slips(S64, mu, gamma)
        if (mu, gamma) != (90.0, 0.5):
            mistakes.append((_t(batch_hal_loss(S64).total), "you used μ = 90, γ = 0.5 instead of the arguments."))
        cases.append(_Case(name, (S, mu, gamma), _t(expected), mistakes, hint, half))
    return _check("minibatch_term", fn, cases, library=(batch_hal_loss, unified_objective, _smooth_negatives,
                                                        _positive_term),
                  parts=("the loss",), arg_names=("sim", "mu", "gamma"))


def _queue_parts(mu: float, gamma: float, mask: Optional[torch.Tensor]):
    """Per-query negative and positive parts of the queue term (float64), for slips."""
    neg = lambda x, q: _softplus_lse(mu * (x @ q - gamma), mask, 1) / mu  # noqa: E731
    pos = lambda a, b: -torch.log1p(torch.relu((a * b).sum(1)))  # noqa: E731
    return neg, pos


def check_queue_term(fn: Callable[..., Any]) -> Feedback:
    """``queue_term(v, t, v_hat, t_hat, Q_v, Q_t, mu, gamma, mask)``: USER's ``L_q``.

    ``v, t`` are the ``(B, E)`` query embeddings, ``v_hat, t_hat`` the momentum keys of the same
    pairs, ``Q_v, Q_t`` the ``(E, K)`` image and text queues, ``mask`` None or a bool ``(B, K)``
    (True: the key may be a negative) used in both directions. Answer key:
    :func:`userlab.losses.unified_objective` (its ``queue`` term).
    """
    from .losses import _positive_term, _smooth_negatives, batch_hal_loss, unified_objective

    def inputs(b, k, seed, e=8):
        v, t = _unit(b, e, seed=seed), _unit(b, e, seed=seed + 1)
        t = torch.nn.functional.normalize(t + 1.5 * v, dim=1)          # pairs are similar
        v_hat = torch.nn.functional.normalize(v + 0.3 * _unit(b, e, seed=seed + 2), dim=1)
        t_hat = torch.nn.functional.normalize(t + 0.3 * _unit(b, e, seed=seed + 3), dim=1)
        q_v, q_t = _unit(e, k, seed=seed + 4, dim=0), _unit(e, k, seed=seed + 5, dim=0)
        q_v[:, 0], q_t[:, 1] = v[0], t[0]                              # a same-image key in each queue
        return v, t, v_hat, t_hat, q_v, q_t

    masked = torch.rand(4, 12, generator=_gen(7)) > 0.3
    row_masked = masked.clone()
    row_masked[1] = False
    specs = [
        ("random batch (B = 4, K = 12)", inputs(4, 12, 10), 90.0, 0.5, None, False, ""),
        ("B = 1", inputs(1, 6, 20), 90.0, 0.5, None, False, ""),
        ("masked keys (mask given)", inputs(4, 12, 30), 90.0, 0.5, masked, False,
         "Keys where mask is False are not negatives: leave them out of the sums."),
        ("a query with every key masked", inputs(4, 12, 40), 90.0, 0.5, row_masked, False,
         "A query with no allowed key has no negatives: its sum is empty and log(1 + 0) = 0."),
        ("ties: identical queue keys", tuple(x if i < 4 else x[:, :1].expand(-1, 10).clone()
                                             for i, x in enumerate(inputs(3, 10, 50))), 90.0, 0.5, None, False, ""),
        ("other μ and γ (μ = 10, γ = 0.2)", inputs(4, 12, 60), 10.0, 0.2, None, False,
         "Use the arguments mu and gamma."),
        ("half precision (float16)", tuple(x.half() for x in inputs(4, 12, 70)), 90.0, 0.5, None, True,
         "e^{μ(x−γ)} overflows float16: compute in float32 or through logsumexp / softplus."),
    ]
    cases = []
    for name, xs, mu, gamma, mask, half, hint in specs:
        v, t, v_hat, t_hat, q_v, q_t = (x.double() for x in xs)
        out = unified_objective(v @ t.t(), v, t, v_hat, t_hat, q_v, q_t, mu=mu, gamma=gamma,
                                lambda_batch=0.0, queue_mask=mask)
        neg, pos = _queue_parts(mu, gamma, mask)
        nv, nt, pv, pt = neg(v, q_t), neg(t, q_v), pos(v, t_hat), pos(t, v_hat)
        one_dir = ("there are two directions: image queries against the text queue AND text queries "
                   "against the image queue.")
        mistakes = [
            (_t((neg(v, q_v) + pv).mean() + (neg(t, q_t) + pt).mean()),
             "the queue of the SAME modality was used: image queries v are compared with the TEXT queue "
             "Q_t, caption queries t with the IMAGE queue Q_v."),
            (_t((nv + pos(v, t)).mean() + (nt + pos(t, v)).mean()),
             "the positive of image query v_i is the momentum key t̂_i (t_hat), not the query t_i."),
            (_t(nv.mean() + nt.mean()), "the positive terms −log(1 + max(0, v_i·t̂_i)) (and t_i·v̂_i) are missing."),
            (_t((nv + pv).mean()), one_dir), (_t((nt + pt).mean()), one_dir),
            (_t((nv + pv).sum() + (nt + pt).sum()), "average over the B queries (the 1/B), do not sum."),
            (_t((nv + nt + pv + pt).mean() / 2), "the two directions are added, not averaged."),
            (_t((nv - pv).mean() + (nt - pt).mean()), "the positive term is subtracted; it is added "
                                                      "(−log(1 + …) is already negative)."),
        ]
        if mask is not None:
            neg0, _ = _queue_parts(mu, gamma, None)
            neg1, _ = _queue_parts(mu, gamma, ~mask)
            mistakes += [
                (_t((neg0(v, q_t) + pv).mean() + (neg0(t, q_v) + pt).mean()), "the mask is ignored."),
                (_t((neg1(v, q_t) + pv).mean() + (neg1(t, q_v) + pt).mean()),
                 "the mask is inverted: True means the key MAY be a negative."),
            ]
        cases.append(_Case(name, (*xs, mu, gamma, mask), _t(out.terms["queue"]), mistakes, hint, half))
    return _check("queue_term", fn, cases, library=(unified_objective, batch_hal_loss, _smooth_negatives,
                                                    _positive_term), parts=("the loss",),
                  arg_names=("v", "t", "v_hat", "t_hat", "Q_v", "Q_t", "mu", "gamma", "mask"))


def check_ema_step(fn: Callable[..., Any]) -> Feedback:
    """``ema_step(theta_k, theta_q, m)``: the key weights after one momentum step.

    The function may update ``theta_k`` in place; ``theta_q`` must not change. Answer key:
    :func:`userlab.momentum.ema_update_` on a module holding the same weights.
    """
    from .momentum import ema_update_, make_key_encoder

    def reference(k: torch.Tensor, q: torch.Tensor, m: float) -> torch.Tensor:
        query = torch.nn.ParameterList([torch.nn.Parameter(q.double().clone())])
        key = make_key_encoder(query)
        key[0].data.copy_(k.double())
        ema_update_(key, query, m)
        return key[0].detach().clone()

    specs = [
        ("random vector, m = 0.9", torch.randn(6, generator=_gen(1)), torch.randn(6, generator=_gen(2)), 0.9, False),
        ("a weight matrix, m = 0.999", torch.randn(3, 4, generator=_gen(3)), torch.randn(3, 4, generator=_gen(4)),
         0.999, False),
        ("m = 0", torch.randn(5, generator=_gen(5)), torch.randn(5, generator=_gen(6)), 0.0, False),
        ("m = 1", torch.randn(5, generator=_gen(7)), torch.randn(5, generator=_gen(8)), 1.0, False),
        ("a single weight, m = 0.5", torch.tensor([2.0]), torch.tensor([-1.0]), 0.5, False),
        ("half precision (float16), m = 0.99", torch.randn(6, generator=_gen(9)).half(),
         torch.randn(6, generator=_gen(10)).half(), 0.99, True),
    ]
    cases = []
    for name, k, q, m, half in specs:
        k64, q64 = k.double(), q.double()
        mistakes = [
            (_t(reference(q64, k64, m)), "m and 1 − m are swapped: the key encoder keeps m of ITSELF and takes "
                                         "1 − m of the query encoder, so it moves slowly."),
            (_t(q64), "that copies the query weights: the key encoder must keep m of itself."),
            (_t(m * k64 + q64), "the query weights are weighted by (1 − m), not 1."),
        ]
        cases.append(_Case(name, (k, q, m), _t(reference(k64, q64, m)), mistakes, half=half, inplace_ok=(0,)))
    return _check("ema_step", fn, cases, library=(ema_update_,), parts=("the new theta_k",),
                  arg_names=("theta_k", "theta_q", "m"))


# ---------------------------------------------------------------------------------------------
# 03 evaluation: Recall@K and medr (answer key: userlab.evaluate)
# ---------------------------------------------------------------------------------------------
def _slip_ranks(S: np.ndarray, cpi: int, order: str = "stable", positive: str = "best",
                ascending: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Ranks computed with typical slips: another tie order, one positive only, ascending sort."""
    S = -S if ascending else S
    n_img, n_cap = S.shape

    def sort(x: np.ndarray) -> np.ndarray:
        if order == "reversed":                       # ascending stable sort, reversed
            return np.argsort(x, kind="stable")[::-1]
        return np.argsort(-x, kind="stable")

    i2t = np.zeros(n_img)
    for i in range(n_img):
        own = np.arange(cpi * i, cpi * i + cpi)
        if order == "strict":                          # ties counted behind the positive
            i2t[i] = (S[i] > S[i, own].max()).sum()
            continue
        places = np.flatnonzero(np.isin(sort(S[i]), own if positive != "first" else own[:1]))
        i2t[i] = places.max() if positive == "worst" else places.min()
    t2i = np.zeros(n_cap)
    for c in range(n_cap):
        if order == "strict":
            t2i[c] = (S[:, c] > S[c // cpi, c]).sum()
        else:
            t2i[c] = int(np.flatnonzero(sort(S[:, c]) == c // cpi)[0])
    return i2t, t2i


def check_recall_at_k(fn: Callable[..., Any], captions_per_image: int = 5) -> Feedback:
    """``recall_at_k(sims, k)``: ``(i2t R@K, t2i R@K)`` in percent of an ``(N, 5N)`` matrix.

    Answer key: :func:`userlab.evaluate.retrieval_ranks` and :func:`recall_metrics`.
    """
    from . import evaluate as ev

    cpi = captions_per_image
    rng = np.random.default_rng(3)
    tied = rng.integers(0, 3, (6, 30)).astype(np.float64)
    masked = rng.standard_normal((5, 25))
    masked[:, ::4] = -np.inf
    specs = [
        ("random (6 images, 30 captions), K = 1", rng.standard_normal((6, 30)), 1, False, ""),
        ("random (8 images, 40 captions), K = 5", rng.standard_normal((8, 40)), 5, False, ""),
        ("random (12 images, 60 captions), K = 10", rng.standard_normal((12, 60)), 10, False, ""),
        ("one image (N = 1), K = 1", rng.standard_normal((1, 5)), 1, False, ""),
        ("ties: scores 0, 1 or 2, K = 5", tied, 5, False,
         "Among equal scores the lower index comes first (a stable descending sort)."),
        ("masked scores (-inf), K = 5", masked, 5, False, "Masked pairs score -inf and rank last."),
        ("half precision (float16), K = 5", torch.from_numpy(rng.standard_normal((6, 30))).half(), 5, True,
         "float16 scores tie more often: break ties by index."),
    ]
    cases = []
    for name, S, k, half, hint in specs:
        S64 = np.asarray(_f64(S).numpy())
        i2t, t2i = (r.numpy() for r in ev.retrieval_ranks(S64, cpi))
        rec = lambda i, t, kk=k: (100.0 * np.mean(i < kk), 100.0 * np.mean(t < kk))  # noqa: E731
        expected = rec(i2t, t2i)
        ties = "ties are broken by index: among equal scores the lower index comes first (np.argsort(-x, " \
               "kind='stable'))."
        mistakes = [
            (_t(expected[0] / 100, expected[1] / 100), "R@K is a percentage: multiply the fraction of hits by 100."),
            (_t(*rec(i2t, t2i, k + 1)), "ranks are 0-based (0 = top): a hit is rank < K, not rank <= K."),
            (_t(expected[1], expected[0]), "the directions are swapped: i2t ranks captions in each ROW (image), "
                                           "t2i ranks images in each COLUMN (caption)."),
            (_t(*rec(*_slip_ranks(S64, cpi, ascending=True))), "sort in descending order: the most similar comes first."),
            (_t(rec(*_slip_ranks(S64, cpi, positive="first"))[0], None),
             f"i2t: an image is a hit when ANY of its {cpi} captions is in the top K, not only its first."),
            (_t(rec(*_slip_ranks(S64, cpi, positive="worst"))[0], None),
             f"i2t: an image needs only its best caption in the top K, not all {cpi}."),
            (_t(*rec(*_slip_ranks(S64, cpi, order="reversed"))), ties),
            (_t(*rec(*_slip_ranks(S64, cpi, order="strict"))), ties),
        ]
        cases.append(_Case(name, (S, k), _t(*expected), mistakes, hint, False))
    return _check("recall_at_k", fn, cases, library=(ev.retrieval_ranks, ev.i2t_ranks, ev.t2i_ranks,
                                                     ev.recall_metrics, ev.evaluate_sims),
                  parts=("i2t R@K", "t2i R@K"), arg_names=("sims", "k"))


def check_median_rank(fn: Callable[[Any], Any]) -> Feedback:
    """``median_rank(ranks)``: medr of 0-based ranks. Answer key: :func:`evaluate.recall_metrics`."""
    from .evaluate import recall_metrics

    rng = np.random.default_rng(4)
    specs = [("even count (median between two ranks)", np.array([0, 3, 1, 8, 2, 5])),
             ("odd count", np.array([10, 2, 7])), ("a single rank", np.array([4])),
             ("every query ranked first", np.zeros(5, dtype=np.int64)),
             ("101 random ranks", rng.integers(0, 50, 101)),
             ("a torch tensor of ranks", torch.tensor([1, 6, 2, 9]))]
    cases = []
    for name, ranks in specs:
        r = _f64(ranks).numpy()
        expected = recall_metrics(r, r)["i2t_medr"]
        med = float(np.median(r))
        cases.append(_Case(name, (ranks,), _t(expected), [
            (_t(med), "ranks are 0-based (0 = top) but medr is 1-based: add 1."),
            (_t(np.floor(med)), "ranks are 0-based (0 = top) but medr is 1-based: add 1."),
            (_t(med + 1), "floor the median before adding 1 (as the SCAN / VSE++ code does)."),
            (_t(np.mean(r) + 1), "that is meanr (the mean rank + 1); medr uses the median."),
            (_t(round(med) + 1), "floor the median, do not round it."),
        ]))
    return _check("median_rank", fn, cases, library=(recall_metrics,), parts=("medr",), arg_names=("ranks",))


# ---------------------------------------------------------------------------------------------
# 04 attention: SGE steps 5-6 (answer key: userlab.models.image.region_attention)
# ---------------------------------------------------------------------------------------------
def check_region_attention(fn: Callable[..., Any]) -> Feedback:
    """``region_attention(regions, g, lam)``: ``(enhanced (B, R, D), beta (B, R))``.

    ``beta = l2norm_k(softmax_k(lam·<g, R_k>))``, ``enhanced_k = R_k + beta_k·g``.
    """
    from .models.image import region_attention

    def g_of(regions, seed):
        return torch.nn.functional.normalize(regions.mean(1) + 0.5 * torch.randn(
            regions.shape[0], regions.shape[2], generator=_gen(seed), dtype=regions.dtype), dim=1)

    base = torch.randn(3, 5, 8, generator=_gen(1), dtype=torch.float64)
    padded = torch.randn(2, 6, 8, generator=_gen(2), dtype=torch.float64)
    padded[:, 4:] = 0.0
    same = torch.randn(1, 1, 8, generator=_gen(3), dtype=torch.float64).expand(2, 4, 8).clone()
    big = 10 * torch.randn(2, 5, 8, generator=_gen(4))          # float32: e^{100} overflows
    half = torch.randn(2, 5, 8, generator=_gen(5)).half()
    specs = [
        ("random (B = 3, R = 5, D = 8)", base, g_of(base, 11), 1.0, False, ""),
        ("B = 1", base[:1].clone(), g_of(base[:1], 12), 1.0, False, ""),
        ("zero-padded regions (last 2 of 6 are all zeros)", padded, g_of(padded, 13), 1.0, False,
         "A zero region has affinity 0 with g; it still gets a (small) weight."),
        ("ties: identical regions", same, g_of(same, 14), 1.0, False,
         "Identical regions get identical weights; after the L2 normalisation each is 1/√R."),
        ("λ = 3", base, g_of(base, 15), 3.0, False, "Scale the affinities by λ (the argument lam)."),
        ("large affinities (|λ⟨g, R_k⟩| up to ~100)", big, g_of(big, 16), 4.0, False,
         "e^{100} overflows float32: use a softmax that subtracts the maximum (torch.softmax)."),
        ("half precision (float16)", half, g_of(half.float(), 17).half(), 1.0, True,
         "float16 inputs: compute the softmax in float32."),
    ]
    cases = []
    for name, R, g, lam, is_half, hint in specs:
        R64, g64 = R.double(), g.double()
        enhanced, beta = region_attention(R64, g64, lam)
        aff = torch.einsum("brd,bd->br", R64, g64)
        soft = torch.softmax(lam * aff, dim=1)
        l2 = lambda x: x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)  # noqa: E731
        plus = lambda w: R64 + w.unsqueeze(-1) * g64.unsqueeze(1)  # noqa: E731
        mistakes = [
            (_t(plus(soft), soft), "you stopped after the softmax: USER L2-normalises it again, so Σ_k β_k² = 1."),
            (_t(plus(l2(aff)), l2(aff)), "apply the softmax over regions first, then the L2 normalisation."),
            (_t(None, l2(torch.softmax(lam * aff, dim=0))) if R.shape[0] > 1 else None,
             "the softmax runs over the regions (axis 1), not over the batch."),
            (_t(*region_attention(R64, g64, 1.0)) if lam != 1.0 else None, "scale the affinities by λ (lam)."),
            (_t(R64, None), "the enhanced regions are the regions unchanged: add β_k·g to every region R_k."),
            (_t(R64 + g64.unsqueeze(1), None), "g is added with weight 1: weight it by β_k per region."),
            (_t(R64 - beta.unsqueeze(-1) * g64.unsqueeze(1), None), "β_k·g is added to R_k, not subtracted."),
            (_t(beta.unsqueeze(-1) * g64.unsqueeze(1), None), "the enhanced region keeps R_k: R̂_k = R_k + β_k·g."),
        ]
        cases.append(_Case(name, (R, g, lam), _t(enhanced, beta), mistakes, hint, is_half))
    return _check("region_attention", fn, cases, library=(region_attention,), parts=("enhanced", "beta"),
                  arg_names=("regions", "g", "lam"))


# ---------------------------------------------------------------------------------------------
# 05 boosting: soft adaptation, L_rel, L_abs (answer key: userlab.boosting)
# ---------------------------------------------------------------------------------------------
def _margin_cases(which: str) -> list[tuple]:
    ref = torch.linspace(-1.0, 1.0, 9, dtype=torch.float64)
    gaps = torch.linspace(-2.0, 2.0, 9, dtype=torch.float64)
    bound = "ref = edge" if which == "supremum" else "ref = −edge"
    return [
        ("hard, m = 0.1, edge = 1", ref, 0.1, 1.0, "hard", False, ""),
        ("soft, m = 0.1, edge = 1", ref, 0.1, 1.0, "soft", False, ""),
        ("hard, gaps, m = 0.2, edge = 2", gaps, 0.2, 2.0, "hard", False, ""),
        ("soft, gaps, m = 0.2, edge = 2", gaps, 0.2, 2.0, "soft", False, ""),
        (f"at the bound ({bound})", torch.tensor([1.0 if which == "supremum" else -1.0], dtype=torch.float64),
         0.1, 1.0, "soft", False, "At the bound the margin is 0."),
        ("soft, m = 0", ref, 0.0, 1.0, "soft", False,
         "As m → 0 the soft margin goes to 0 (2m/(1 + e^{…}) − m is 0/0 at m = 0 if written literally)."),
        ("half precision (float16), soft", ref.half(), 0.1, 1.0, "soft", True, ""),
    ]


def _check_margin_fn(which: str, fn: Callable[..., Any]) -> Feedback:
    from . import boosting

    ref_fn = boosting.supremum_margin if which == "supremum" else boosting.infimum_margin
    other = boosting.infimum_margin if which == "supremum" else boosting.supremum_margin
    cases = []
    for name, ref, m, edge, mode, half, hint in _margin_cases(which):
        r64 = ref.double()
        flip = "hard" if mode == "soft" else "soft"
        mistakes = [
            (_t(ref_fn(r64, m, edge, flip)), f"the mode is ignored or swapped: this case asks for the {mode} form."),
            (_t(other(r64, m, edge, mode)), ("this is the infimum margin (room edge + ref); the supremum margin "
                                             "uses the room edge − ref.") if which == "supremum" else
             "this is the supremum margin (room edge − ref); the infimum margin uses the room edge + ref."),
            (_t(torch.full_like(r64, m)), "the margin must shrink near the bound, not stay m."),
        ]
        cases.append(_Case(name, (ref, m, edge, mode), _t(ref_fn(r64, m, edge, mode)), mistakes, hint, half))
    return _check(f"{which}_margin", fn, cases, library=(ref_fn, other, boosting._adapted_margin),
                  parts=("the margin",), arg_names=("ref", "m", "edge", "mode"))


def check_supremum_margin(fn: Callable[..., Any]) -> Feedback:
    """``supremum_margin(ref, m, edge, mode)``: DBL's soft-adapted margin below an upper bound."""
    return _check_margin_fn("supremum", fn)


def check_infimum_margin(fn: Callable[..., Any]) -> Feedback:
    """``infimum_margin(ref, m, edge, mode)``: DBL's soft-adapted margin above a lower bound."""
    return _check_margin_fn("infimum", fn)


def _boost_specs() -> list[tuple]:
    St = torch.rand(5, 5, generator=_gen(1), dtype=torch.float64) * 2 - 1
    Sa = torch.rand(5, 5, generator=_gen(2), dtype=torch.float64) * 2 - 1
    St8 = torch.rand(8, 8, generator=_gen(3), dtype=torch.float64) * 1.6 - 0.8
    Sa8 = (St8 + 0.2 * torch.rand(8, 8, generator=_gen(4), dtype=torch.float64)).clamp(-1, 1)
    Sa8.diagonal().copy_(torch.linspace(0.7, 0.99, 8, dtype=torch.float64))   # anchors near the bound
    tie = torch.full((4, 4), 0.3, dtype=torch.float64)
    return [
        ("random (B = 5)", St, Sa, 0.2, 1.0, None, False, ""),
        ("B = 8, anchor near the bound", St8, Sa8, 0.2, 1.0, None, False, ""),
        ("B = 1", St[:1, :1].clone(), Sa[:1, :1].clone(), 0.2, 1.0, None, False,
         "With one pair there are no negatives."),
        ("ties: every score 0.3 in both", tie, tie.clone(), 0.2, 1.0, None, False, ""),
        ("margin 0.4, beta 0.5", St, Sa, 0.4, 0.5, None, False, "The margin is margin·beta."),
        ("soft = 'hard'", St8, Sa8, 0.2, 1.0, "hard", False,
         "With soft adaptation the margin of each entry comes from your supremum_margin / infimum_margin."),
        ("soft = 'soft'", St8, Sa8, 0.2, 1.0, "soft", False,
         "With soft adaptation the margin of each entry comes from your supremum_margin / infimum_margin."),
        ("half precision (float16)", St.half(), Sa.half(), 0.2, 1.0, None, True, ""),
    ]


def check_relative_boost(fn: Callable[..., Any]) -> Feedback:
    """``relative_boost(S_t, S_a, margin, beta, soft)``: DBL's ``L_rel`` (max form, summed).

    Answer key: :func:`userlab.boosting.relative_boost`.
    """
    from . import boosting as bo

    cases = []
    for name, St, Sa, margin, beta, soft, half, hint in _boost_specs():
        t64, a64 = St.double(), Sa.double()
        ref = bo.relative_boost(t64, a64, margin, beta, soft=soft)
        one_dir = "add both directions: rows (image queries) AND columns (caption queries)."
        mistakes = [
            (_t(bo.relative_boost(a64, t64, margin, beta, soft=soft).total),
             "target and anchor are swapped: the TARGET's gap S^t_ii − S^t_ij must beat the anchor's gap by "
             "the margin, so the hinge is [γβ + anchor gap − target gap]_+."),
            (_t(bo.relative_boost(t64, a64, 0.0).total), "the margin γ·β is missing from the hinge."),
            (_t(ref.terms["i2t"]), one_dir), (_t(ref.terms["t2i"]), one_dir),
            (_t(bo.relative_boost(t64, a64, margin, beta, "sum", soft).total),
             "the released DBL keeps only the hardest (max) violating negative per query, not the sum."),
            (_t(ref.total / St.shape[0]), "DBL sums over the batch (no 1/B)."),
            (_t(bo.relative_boost(t64, a64, margin).total) if beta != 1.0 else None, "the margin is margin·beta."),
            (_t(bo.relative_boost(t64, a64, margin, beta).total) if soft else None,
             "the soft argument is ignored: with soft adaptation each margin is supremum_margin(anchor gap, "
             "γβ, 2, soft)."),
            (_t(bo.relative_boost(t64, a64, margin, beta, soft="hard" if soft == "soft" else "soft").total)
             if soft else None, "hard and soft adaptation are swapped."),
        ]
        if soft:
            gap_r = a64.diagonal()[:, None] - a64
            m_row = bo.supremum_margin(gap_r, margin * beta, 1.0, soft)
            m_col = bo.supremum_margin(a64.diagonal()[None, :] - a64, margin * beta, 1.0, soft)
            eye = torch.eye(St.shape[0], dtype=torch.bool)
            row = (m_row + gap_r - (t64.diagonal()[:, None] - t64)).clamp_min(0).masked_fill(eye, 0).amax(1)
            col = (m_col + a64.diagonal()[None, :] - a64 - (t64.diagonal()[None, :] - t64)).clamp_min(0) \
                .masked_fill(eye, 0).amax(0)
            mistakes.append((_t(row.sum() + col.sum()), "gaps lie in [−2, 2]: the supremum margin of a gap uses edge 2."))
        cases.append(_Case(name, (St, Sa, margin, beta, soft), _t(ref.total), mistakes, hint, half))
    return _check("relative_boost", fn, cases,
                  library=(bo.relative_boost, bo._relative_costs, bo.strategy_loss, bo.dbl_loss),
                  parts=("L_rel",), arg_names=("S_t", "S_a", "margin", "beta", "soft"))


def check_absolute_boost(fn: Callable[..., Any]) -> Feedback:
    """``absolute_boost(S_t, S_a, margin, beta, soft)``: DBL's ``L_abs`` (max form, summed).

    Answer key: :func:`userlab.boosting.absolute_boost`.
    """
    from . import boosting as bo

    cases = []
    for name, St, Sa, margin, beta, soft, half, hint in _boost_specs():
        t64, a64 = St.double(), Sa.double()
        ref = bo.absolute_boost(t64, a64, margin, beta, soft=soft)
        pos, i2t, t2i = ref.terms["positive"], ref.terms["i2t"], ref.terms["t2i"]
        one_dir = "the negatives count in both directions: the hardest per row AND per column."
        mistakes = [
            (_t(bo.absolute_boost(t64, a64, 2 * margin, beta, soft=soft).total),
             "the released code halves γ·β for absolute boosting: γ1 = γ2 = 0.5·γ·β."),
            (_t(pos / 2 + i2t + t2i), "the positive term counts once per direction: 2·Σ_i[γ1 + S^a_ii − S^t_ii]_+."),
            (_t(i2t + t2i), "the positive term 2·Σ_i[γ1 + S^a_ii − S^t_ii]_+ is missing."),
            (_t(pos), "the negative terms (hardest per row and per column) are missing."),
            (_t(pos + i2t), one_dir), (_t(pos + t2i), one_dir),
            (_t(bo.absolute_boost(t64, a64, margin, beta, "sum", soft).total),
             "the released DBL keeps only the hardest (max) violating negative per query, not the sum."),
            (_t(bo.absolute_boost(a64, t64, margin, beta, soft=soft).total),
             "target and anchor are swapped: the target's positive must rise ABOVE the anchor's, its "
             "negatives fall BELOW."),
            (_t(ref.total / St.shape[0]), "DBL sums over the batch (no 1/B)."),
            (_t(bo.absolute_boost(t64, a64, margin).total) if beta != 1.0 else None, "the margin is margin·beta."),
            (_t(bo.absolute_boost(t64, a64, margin, beta).total) if soft else None,
             "the soft argument is ignored: γ1 = supremum_margin(S^a_ii, …, 1), γ2 = infimum_margin(S^a_ij, …, 1)."),
            (_t(bo.absolute_boost(t64, a64, margin, beta, soft="hard" if soft == "soft" else "soft").total)
             if soft else None, "hard and soft adaptation are swapped."),
        ]
        cases.append(_Case(name, (St, Sa, margin, beta, soft), _t(ref.total), mistakes, hint, half))
    return _check("absolute_boost", fn, cases,
                  library=(bo.absolute_boost, bo._absolute_costs, bo.strategy_loss, bo.dbl_loss),
                  parts=("L_abs",), arg_names=("S_t", "S_a", "margin", "beta", "soft"))


# ---------------------------------------------------------------------------------------------
# predict, then run
# ---------------------------------------------------------------------------------------------
def reveal(prediction: Any, measured: str, options: Mapping[str, str], evidence: str = "") -> Feedback:
    """Compare a prediction (an option key) with the option the measurement selected.

    Args:
        prediction: the student's choice, e.g. ``"b"``; None when not made yet.
        measured: the option key that the cell's measurement selected.
        options: ``{key: statement}``.
        evidence: one line with the measured numbers.
    """
    if measured not in options:
        raise ValueError(f"reveal: measured option {measured!r} is not one of {sorted(options)}")
    shown = f"Measured: {evidence} So ({measured}) {options[measured]}".strip()
    if prediction is None or prediction is Ellipsis:
        return _report(False, f"No prediction yet ({NOT_IMPLEMENTED}): write one before you look. {shown}",
                       NOT_IMPLEMENTED)
    key = str(prediction).strip().strip("()").lower()
    if key not in options:
        return _report(False, f"Your prediction {prediction!r} is not one of {', '.join(options)}. {shown}")
    if key == measured:
        return _report(True, f"Your prediction ({key}) is right. {shown}", "correct")
    return _report(False, f"You predicted ({key}) {options[key]} {shown}")

"""Deep Boosting Learning (DBL) losses and the strategies it is compared with.

Everything here works on score matrices only, so it is independent of the backbone:
``S_t`` (target) and ``S_a`` (anchor) are ``(B, B)`` with rows = images, columns = captions and
the positives on the diagonal (method notes, section 4). The anchor never receives gradients:
every loss detaches it.

Layout of the module:

* :func:`raw_triplet` -- VSE++ hardest-negative triplet loss ``L_raw``.
* :func:`relative_boost`, :func:`absolute_boost` -- ``L_rel`` and ``L_abs`` in their released
  *max* form, with a *sum* form and the (released-but-commented-out) soft adaptation as options.
* :func:`supremum_margin`, :func:`infimum_margin` -- the soft-adaptation margins.
* :data:`STRATEGIES`, :func:`strategy_loss`, :func:`dbl_loss`, :func:`cascade_loss`,
  :func:`mutual_loss` -- DBL and the comparison strategies (conventional distillation, mutual
  learning, DINO-style self-distillation), selectable by the names of
  ``userlab.config.BOOST_STRATEGIES``.
* :func:`margins`, :func:`violation_rate` -- diagnostics for notebooks.

All losses are computed in at least float32, also under autocast, and return a ``LossOutput``.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .config import BOOST_STRATEGIES, BoostConfig
from .errors import ConfigError, DataError
from .losses import LossOutput

# Temperature of the distillation baselines: DBL's rkd/sp weight and dml/dino "smooth" are 10.
DISTILL_SCALE = 10.0

SOFT_MODES = ("hard", "soft")
REDUCTIONS = ("max", "sum")


# -- input handling ---------------------------------------------------------------------------
def _no_autocast(device: torch.device):
    """Context that switches autocast off on ``device`` so nothing is silently lowered."""
    try:
        return torch.autocast(device_type=device.type, enabled=False)
    except (RuntimeError, ValueError):  # device type without autocast support
        return contextlib.nullcontext()


def _as_scores(S: Tensor, name: str) -> Tensor:
    """Validate a ``(B, B)`` score matrix and promote it to at least float32."""
    if not isinstance(S, Tensor):
        raise DataError(None, f"boosting: {name} must be a torch.Tensor, got {type(S).__name__}")
    if S.dim() != 2 or S.shape[0] != S.shape[1] or S.shape[0] == 0:
        raise DataError(None, f"boosting: {name} must be a non-empty square (B, B) score matrix, "
                              f"got shape {tuple(S.shape)}")
    if not S.is_floating_point() or S.dtype in (torch.float16, torch.bfloat16):
        S = S.float()
    return S


def _as_pair(S_t: Tensor, S_a: Tensor, a_name: str = "S_a") -> tuple[Tensor, Tensor]:
    """Validate target and anchor, give both one dtype (>= float32), detach the anchor."""
    S_t = _as_scores(S_t, "S_t")
    S_a = _as_scores(S_a, a_name)
    if S_t.shape != S_a.shape:
        raise DataError(None, f"boosting: S_t {tuple(S_t.shape)} and {a_name} "
                              f"{tuple(S_a.shape)} must have the same shape")
    dtype = torch.promote_types(S_t.dtype, S_a.dtype)
    # The anchor is a fixed reference: gradients must never reach it (stop-gradient).
    return S_t.to(dtype), S_a.detach().to(dtype)


def _eye(S: Tensor) -> Tensor:
    """Boolean ``(B, B)`` mask of the positives (the diagonal)."""
    return torch.eye(S.shape[0], dtype=torch.bool, device=S.device)


def _soft_mode(soft: Optional[str]) -> Optional[str]:
    """Normalise the soft-adaptation switch: ``None``/``"none"`` -> None, else hard/soft."""
    if soft is None or soft == "none":
        return None
    if soft not in SOFT_MODES:
        raise ConfigError("boost.soft_adaptation", f"{soft!r} is not one of none, hard, soft")
    return soft


def _check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ConfigError("reduction", f"{reduction!r} is not one of {', '.join(REDUCTIONS)}")


def _reduce_negatives(cost: Tensor, positives: Tensor, dim: int, reduction: str) -> Tensor:
    """Hardest (max) or total (sum) hinge over the negatives of each query.

    Args:
        cost: ``(B, B)`` hinge values, all ``>= 0``.
        positives: ``(B, B)`` boolean diagonal mask.
        dim: 1 reduces each row (image queries), 0 each column (caption queries).
    Returns:
        ``(B,)`` per-query cost. Filling the positives with 0 is exact for the max because every
        hinge is ``>= 0``; a query without negatives (B = 1) costs 0.
    """
    cost = cost.masked_fill(positives, 0.0)
    return cost.amax(dim=dim) if reduction == "max" else cost.sum(dim=dim)


# -- soft-adaptation margins (method notes 4.2) -----------------------------------------------
def _check_margin(m: float) -> None:
    if m < 0:
        raise ConfigError("boost.margin", f"margins must be >= 0, got {m}")


def supremum_margin(ref: Tensor, m: float, edge: float, mode: str = "hard") -> Tensor:
    """Margin that shrinks so that ``ref + margin`` never asks to pass the upper bound ``edge``.

    Hard: ``min(m, edge - ref)``. Soft: ``2m / (1 + exp((2/m)(ref - edge))) - m``, computed as the
    identical ``m * tanh((edge - ref) / m)``, which cannot overflow. Used for positives
    (``edge = 1``) and for positive-minus-negative gaps (``edge = 2``).

    Args:
        ref: anchor scores or gaps, any shape.
        m: nominal margin (>= 0).
        edge: upper bound of ``ref``.
        mode: ``"hard"`` or ``"soft"``.
    Returns:
        Detached margins, same shape as ``ref``; 0 at ``ref = edge``, about ``m`` far below it,
        never above ``m``.
    """
    return _adapted_margin(edge - ref.detach(), m, mode)


def infimum_margin(ref: Tensor, m: float, edge: float, mode: str = "hard") -> Tensor:
    """Margin that shrinks so that ``ref - margin`` never asks to pass the lower bound ``-edge``.

    Hard: ``min(m, edge + ref)``. Soft: ``2m / (1 + exp(-(2/m)(ref + edge))) - m``, computed as
    ``m * tanh((edge + ref) / m)``. Used for negative scores (``edge = 1``).

    Args and return value as in :func:`supremum_margin`; 0 at ``ref = -edge``.
    """
    return _adapted_margin(edge + ref.detach(), m, mode)


def _adapted_margin(room: Tensor, m: float, mode: str) -> Tensor:
    """Margin from the room left to the bound: hard ``min(m, room)``, soft ``m tanh(room / m)``."""
    _check_margin(float(m))
    if mode == "hard":
        return torch.clamp(room, max=m).detach()
    if mode == "soft":
        if m == 0:  # limit of m * tanh(room / m) as m -> 0
            return torch.zeros_like(room)
        return (m * torch.tanh(room / m)).detach()
    raise ConfigError("boost.soft_adaptation", f"{mode!r} is not one of hard, soft")


# -- raw loss ---------------------------------------------------------------------------------
def raw_triplet(S: Tensor, margin: float = 0.2) -> LossOutput:
    """VSE++ hardest-negative triplet loss, both directions, summed over the batch.

    ``L_raw = sum_i max_{j!=i}[margin + S_ij - S_ii]_+ + sum_j max_{i!=j}[margin + S_ij - S_jj]_+``

    Args:
        S: ``(B, B)`` scores, rows = images, diagonal = positives.
        margin: triplet margin (0.2).
    Returns:
        ``LossOutput`` with terms ``i2t`` (image queries, rows) and ``t2i`` (caption queries).
    """
    S = _as_scores(S, "S")
    with _no_autocast(S.device):
        pos = S.diagonal()
        eye = _eye(S)
        i2t = _reduce_negatives((margin + S - pos[:, None]).clamp_min(0), eye, 1, "max").sum()
        t2i = _reduce_negatives((margin + S - pos[None, :]).clamp_min(0), eye, 0, "max").sum()
    return LossOutput(total=i2t + t2i, terms={"i2t": i2t, "t2i": t2i})


# -- boosting losses --------------------------------------------------------------------------
def _relative_costs(S_t: Tensor, S_a: Tensor, m: float, reduction: str,
                    soft: Optional[str]) -> tuple[Tensor, Tensor]:
    """Per-query relative boosting costs ``(B,)`` for image queries (rows) and caption queries."""
    pos_t, pos_a = S_t.diagonal(), S_a.diagonal()
    gap_t_row, gap_a_row = pos_t[:, None] - S_t, pos_a[:, None] - S_a   # S_ii - S_ij
    gap_t_col, gap_a_col = pos_t[None, :] - S_t, pos_a[None, :] - S_a   # S_jj - S_ij
    if soft is None:
        m_row = m_col = m
    else:  # gaps lie in [-2, 2]: never ask the target for a gap beyond 2
        m_row = supremum_margin(gap_a_row, m, 2.0, soft)
        m_col = supremum_margin(gap_a_col, m, 2.0, soft)
    eye = _eye(S_t)
    row = _reduce_negatives((m_row + gap_a_row - gap_t_row).clamp_min(0), eye, 1, reduction)
    col = _reduce_negatives((m_col + gap_a_col - gap_t_col).clamp_min(0), eye, 0, reduction)
    return row, col


def _absolute_costs(S_t: Tensor, S_a: Tensor, m: float, reduction: str,
                    soft: Optional[str]) -> tuple[Tensor, Tensor, Tensor]:
    """Per-pair positive cost and per-query negative costs ``(B,)`` of absolute boosting."""
    pos_t, pos_a = S_t.diagonal(), S_a.diagonal()
    if soft is None:
        m_pos = m_neg = m
    else:  # scores lie in [-1, 1]
        m_pos = supremum_margin(pos_a, m, 1.0, soft)
        m_neg = infimum_margin(S_a, m, 1.0, soft)
    pos = (m_pos + pos_a - pos_t).clamp_min(0)
    neg = (m_neg + S_t - S_a).clamp_min(0)
    eye = _eye(S_t)
    return pos, _reduce_negatives(neg, eye, 1, reduction), _reduce_negatives(neg, eye, 0, reduction)


def relative_boost(S_t: Tensor, S_a: Tensor, margin: float = 0.2, beta: float = 1.0,
                   reduction: str = "max", soft: Optional[str] = None) -> LossOutput:
    """Relative boosting ``L_rel``: the target's gaps must beat the anchor's gaps by a margin.

    ``sum_i max_{j!=i}[g + (Sa_ii - Sa_ij) - (St_ii - St_ij)]_+
    + sum_j max_{i!=j}[g + (Sa_jj - Sa_ij) - (St_jj - St_ij)]_+`` with ``g = margin * beta``.

    Args:
        S_t: ``(B, B)`` target scores (receives gradients).
        S_a: ``(B, B)`` anchor scores (detached here).
        margin, beta: the margin is ``margin * beta``.
        reduction: ``"max"`` (released form, hardest negative) or ``"sum"`` (all negatives).
        soft: ``None``/``"none"``, ``"hard"`` or ``"soft"``: replace ``g`` per entry by
            ``supremum_margin(anchor gap, g, 2, soft)``.
    Returns:
        ``LossOutput`` with terms ``i2t`` and ``t2i``.
    """
    _check_reduction(reduction)
    soft = _soft_mode(soft)
    S_t, S_a = _as_pair(S_t, S_a)
    with _no_autocast(S_t.device):
        row, col = _relative_costs(S_t, S_a, margin * beta, reduction, soft)
        i2t, t2i = row.sum(), col.sum()
    return LossOutput(total=i2t + t2i, terms={"i2t": i2t, "t2i": t2i})


def absolute_boost(S_t: Tensor, S_a: Tensor, margin: float = 0.2, beta: float = 1.0,
                   reduction: str = "max", soft: Optional[str] = None) -> LossOutput:
    """Absolute boosting ``L_abs``: positives above the anchor's, negatives below.

    ``2 sum_i [g1 + Sa_ii - St_ii]_+ + sum_i max_{j!=i}[g2 + St_ij - Sa_ij]_+
    + sum_j max_{i!=j}[g2 + St_ij - Sa_ij]_+`` with ``g1 = g2 = margin * beta * 0.5``; the factor 2
    counts the positive term once per direction.

    Args:
        S_t: ``(B, B)`` target scores (receives gradients).
        S_a: ``(B, B)`` anchor scores (detached here).
        margin, beta: ``g1 = g2 = 0.5 * margin * beta``.
        reduction: ``"max"`` (released) or ``"sum"`` over the negatives of each row / column.
        soft: ``None``/``"none"``, ``"hard"`` or ``"soft"``: per entry
            ``g1 = supremum_margin(Sa_ii, g1, 1)``, ``g2 = infimum_margin(Sa_ij, g2, 1)``.
    Returns:
        ``LossOutput`` with terms ``positive`` (already x2), ``i2t`` and ``t2i`` (negatives).
    """
    _check_reduction(reduction)
    soft = _soft_mode(soft)
    S_t, S_a = _as_pair(S_t, S_a)
    with _no_autocast(S_t.device):
        pos, row, col = _absolute_costs(S_t, S_a, 0.5 * margin * beta, reduction, soft)
        positive, i2t, t2i = 2.0 * pos.sum(), row.sum(), col.sum()
    return LossOutput(total=positive + i2t + t2i,
                      terms={"positive": positive, "i2t": i2t, "t2i": t2i})


# -- comparison strategies --------------------------------------------------------------------
def score_matching(S_t: Tensor, S_a: Tensor, scale: float = DISTILL_SCALE) -> LossOutput:
    """Conventional distillation by score imitation (DBL's ``rkd`` baseline).

    ``scale * mean_ij smoothL1(St_ij - Sa_ij)`` with the usual threshold 1; this is the released
    form (weight 10 on the mean smooth-L1 of the raw scores).

    Returns:
        ``LossOutput`` with the term ``score_matching``.
    """
    S_t, S_a = _as_pair(S_t, S_a)
    with _no_autocast(S_t.device):
        loss = scale * F.smooth_l1_loss(S_t, S_a, reduction="mean", beta=1.0)
    return LossOutput(total=loss, terms={"score_matching": loss})


#: Smallest norm similarity-preserving distillation divides by (see :func:`similarity_preserving`).
SP_EPS = 1e-3


def similarity_preserving(S_t: Tensor, S_a: Tensor, scale: float = DISTILL_SCALE) -> LossOutput:
    """Similarity-preserving distillation (DBL's ``sp`` baseline) on score matrices.

    Rows of both matrices are L2-normalised and compared by squared distance averaged over rows;
    the same on columns; the sum is multiplied by ``scale``:
    ``scale * [(1/B) sum_i ||n(St_i) - n(Sa_i)||^2 + (1/B) sum_j ||n(St_:j) - n(Sa_:j)||^2]``.

    Returns:
        ``LossOutput`` with terms ``i2t`` (rows) and ``t2i`` (columns), both scaled.
    """
    S_t, S_a = _as_pair(S_t, S_a)
    with _no_autocast(S_t.device):
        # eps 1e-3, not 1e-12: an all-zero score row has gradient ~1/eps, which must survive
        # the cast back to an fp16 similarity matrix; rows of real scores are far longer.
        rows = (F.normalize(S_t, dim=1, eps=SP_EPS) - F.normalize(S_a, dim=1, eps=SP_EPS)).pow(2).sum(1).mean()
        cols = (F.normalize(S_t, dim=0, eps=SP_EPS) - F.normalize(S_a, dim=0, eps=SP_EPS)).pow(2).sum(0).mean()
        i2t, t2i = scale * rows, scale * cols
    return LossOutput(total=i2t + t2i, terms={"i2t": i2t, "t2i": t2i})


def _kl_rows(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """``(1/B) sum_i KL(softmax(teacher_i) || softmax(student_i))`` over rows."""
    log_p_s = F.log_softmax(student_logits, dim=1)
    log_p_t = F.log_softmax(teacher_logits, dim=1)
    return (log_p_t.exp() * (log_p_t - log_p_s)).sum(1).mean()


def _ce_rows(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """``(1/B) sum_i CE(softmax(teacher_i), log_softmax(student_i))`` over rows."""
    return -(F.softmax(teacher_logits, dim=1) * F.log_softmax(student_logits, dim=1)).sum(1).mean()


def peer_kl(S_t: Tensor, S_a: Tensor, scale: float = DISTILL_SCALE) -> LossOutput:
    """One side of mutual learning (DBL's ``dml``): KL from the detached peer to the student.

    ``(1/B) sum_i KL(p^a_i || p^t_i)`` over rows plus the same over columns, with
    ``p = softmax(scale * S)``.

    Returns:
        ``LossOutput`` with terms ``i2t`` (rows) and ``t2i`` (columns).
    """
    S_t, S_a = _as_pair(S_t, S_a, a_name="peer")
    with _no_autocast(S_t.device):
        i2t = _kl_rows(scale * S_t, scale * S_a)
        t2i = _kl_rows(scale * S_t.t(), scale * S_a.t())
    return LossOutput(total=i2t + t2i, terms={"i2t": i2t, "t2i": t2i})


def dino_distill(S_t: Tensor, S_a: Tensor, scale: float = DISTILL_SCALE) -> LossOutput:
    """Self-distillation in the DINO style (DBL's ``dino`` baseline).

    Cross entropy of the student's ``log_softmax(scale * S_t)`` against the teacher's
    ``softmax(scale * S_a)``, averaged over rows, plus the same over columns.

    Returns:
        ``LossOutput`` with terms ``i2t`` and ``t2i``.
    """
    S_t, S_a = _as_pair(S_t, S_a)
    with _no_autocast(S_t.device):
        i2t = _ce_rows(scale * S_t, scale * S_a)
        t2i = _ce_rows(scale * S_t.t(), scale * S_a.t())
    return LossOutput(total=i2t + t2i, terms={"i2t": i2t, "t2i": t2i})


# A strategy maps (S_t, S_a, cfg) to its boosting term only; strategy_loss adds L_raw.
Strategy = Callable[[Tensor, Tensor, BoostConfig], LossOutput]


def _no_boost(S_t: Tensor, S_a: Tensor, cfg: BoostConfig) -> LossOutput:
    zero = _as_scores(S_t, "S_t").new_zeros(())
    return LossOutput(total=zero, terms={})


def _boosting(fn: Callable[..., LossOutput], reduction: str) -> Strategy:
    def strategy(S_t: Tensor, S_a: Tensor, cfg: BoostConfig) -> LossOutput:
        return fn(S_t, S_a, margin=cfg.margin, beta=cfg.beta, reduction=reduction,
                  soft=cfg.soft_adaptation)
    strategy.__name__ = f"{fn.__name__}_{reduction}"
    return strategy


STRATEGIES: dict[str, Strategy] = {
    "none": _no_boost,
    "relative": _boosting(relative_boost, "max"),
    "absolute": _boosting(absolute_boost, "max"),
    "relative_sum": _boosting(relative_boost, "sum"),
    "absolute_sum": _boosting(absolute_boost, "sum"),
    "score_matching": lambda S_t, S_a, cfg: score_matching(S_t, S_a),
    "similarity_preserving": lambda S_t, S_a, cfg: similarity_preserving(S_t, S_a),
    "mutual": lambda S_t, S_a, cfg: peer_kl(S_t, S_a),
    "dino": lambda S_t, S_a, cfg: dino_distill(S_t, S_a),
}
assert set(STRATEGIES) == set(BOOST_STRATEGIES), "STRATEGIES must follow config.BOOST_STRATEGIES"


def get_strategy(name: str) -> Strategy:
    """The boosting-term function registered under ``name``; unknown names raise ConfigError."""
    try:
        return STRATEGIES[name]
    except (KeyError, TypeError):
        raise ConfigError("boost.strategy",
                          f"unknown strategy {name!r} (known: {', '.join(STRATEGIES)})") from None


def strategy_loss(name: str, S_t: Tensor, S_a: Tensor, cfg: BoostConfig) -> LossOutput:
    """``L_raw(S_t) + alpha * boost_name(S_t, sg(S_a))`` for any registered strategy.

    Args:
        name: a key of :data:`STRATEGIES` (``config.BOOST_STRATEGIES``).
        S_t: ``(B, B)`` target scores.
        S_a: ``(B, B)`` anchor (or teacher / peer) scores; detached.
        cfg: margin, beta, alpha and soft adaptation.
    Returns:
        ``LossOutput`` with terms ``raw`` and ``boost`` (the unweighted boosting term).
    """
    strategy = get_strategy(name)
    raw = raw_triplet(S_t, cfg.margin).total
    boost = strategy(S_t, S_a, cfg).total
    return LossOutput(total=raw + cfg.alpha * boost, terms={"raw": raw, "boost": boost})


def dbl_loss(S_t: Tensor, S_a: Tensor, cfg: BoostConfig) -> LossOutput:
    """Target objective ``L_raw(S_t) + alpha * L_boo(S_t, sg(S_a))`` with ``cfg.strategy``.

    Returns:
        ``LossOutput`` with terms ``raw`` and ``boost``.
    """
    return strategy_loss(cfg.strategy, S_t, S_a, cfg)


def cascade_loss(S_m: Tensor, anchors: Sequence[Tensor], cfg: BoostConfig) -> LossOutput:
    """Online (OSS) cascade: branch ``m`` learns from every earlier branch ``n < m``.

    ``L_raw(S^m) + alpha * mean_{n<m} L_boo(S^m, sg(S^n))``; with no anchors (branch 0) only
    ``L_raw``.

    Args:
        S_m: ``(B, B)`` scores of branch ``m``.
        anchors: the ``(B, B)`` scores of branches ``0..m-1`` (detached here).
        cfg: strategy, margin, beta, alpha, soft adaptation.
    Returns:
        ``LossOutput`` with terms ``raw`` and ``boost`` (the mean, unweighted; 0 for branch 0).
    """
    strategy = get_strategy(cfg.strategy)
    raw = raw_triplet(S_m, cfg.margin).total
    if len(anchors) == 0:
        return LossOutput(total=raw, terms={"raw": raw, "boost": torch.zeros_like(raw)})
    boost = torch.stack([strategy(S_m, S_n, cfg).total for S_n in anchors]).mean()
    return LossOutput(total=raw + cfg.alpha * boost, terms={"raw": raw, "boost": boost})


def mutual_loss(S_1: Tensor, S_2: Tensor,
                cfg: Optional[BoostConfig] = None) -> tuple[LossOutput, LossOutput]:
    """Deep mutual learning between two peers: each learns from the other, detached.

    Branch k gets ``L_raw(S_k) + alpha * KL-term(S_k, sg(S_other))`` (see :func:`peer_kl`). The
    two totals can be summed and back-propagated once: no gradient crosses between branches.

    Args:
        S_1, S_2: ``(B, B)`` scores of the two peers.
        cfg: margin and alpha (defaults: ``BoostConfig()``).
    Returns:
        ``(loss of branch 1, loss of branch 2)``, each with terms ``raw`` and ``boost``.
    """
    cfg = cfg or BoostConfig()
    return (strategy_loss("mutual", S_1, S_2, cfg), strategy_loss("mutual", S_2, S_1, cfg))


# -- diagnostics ------------------------------------------------------------------------------
@torch.no_grad()
def margins(S: Tensor) -> tuple[Tensor, Tensor]:
    """Positive minus hardest negative, per image and per caption.

    Args:
        S: ``(B, B)`` scores.
    Returns:
        ``(i2t, t2i)``, both ``(B,)``: ``S_ii - max_{j!=i} S_ij`` (image ``i``'s row) and
        ``S_jj - max_{i!=j} S_ij`` (caption ``j``'s column). Positive means ranked first;
        ``+inf`` when ``B = 1``.
    """
    S = _as_scores(S, "S").detach()
    masked = S.masked_fill(_eye(S), float("-inf"))
    pos = S.diagonal()
    return pos - masked.amax(dim=1), pos - masked.amax(dim=0)


@torch.no_grad()
def violation_rate(S_t: Tensor, S_a: Tensor, margin: float = 0.2, strategy: str = "relative",
                   beta: float = 1.0, soft: Optional[str] = None) -> float:
    """Fraction of the ``2B`` queries (rows and columns) whose boosting hinge is active.

    For ``relative``/``relative_sum`` a query is active when any of its negatives violates
    ``L_rel``; for ``absolute``/``absolute_sum`` when its positive or any negative violates
    ``L_abs`` (the positive of pair ``i`` counts for row ``i`` and column ``i``). Sum and max
    forms are active on the same queries.

    Returns:
        A number in ``[0, 1]``; 0 means the target already beats the anchor everywhere.
    """
    soft = _soft_mode(soft)
    S_t, S_a = _as_pair(S_t, S_a)
    if strategy in ("relative", "relative_sum"):
        row, col = _relative_costs(S_t, S_a, margin * beta, "max", soft)
    elif strategy in ("absolute", "absolute_sum"):
        pos, row, col = _absolute_costs(S_t, S_a, 0.5 * margin * beta, "max", soft)
        row, col = row + pos, col + pos
    else:
        raise ConfigError("boost.strategy", f"violation_rate needs a boosting strategy "
                                            f"(relative, absolute, *_sum), got {strategy!r}")
    return float(torch.cat([row > 0, col > 0]).float().mean())

"""Training objectives over image-text similarity matrices.

- :func:`unified_objective`: USER's Unified Training Objective (method notes 2.5), HAL's
  log-sum-exp loss over mini-batch negatives plus the same loss over the momentum queues.
- :func:`batch_hal_loss`: its mini-batch term alone.
- :func:`triplet_loss`: VSE0 (all negatives) and VSE++ (hardest negative) hinge losses.
- :func:`info_nce`: symmetric InfoNCE.
- :func:`check_collapse`: warns when every similarity of a batch is (nearly) the same.

Conventions: ``sim`` is ``(B, B)`` with rows = images and columns = captions, pair ``(i, i)``
is the positive. Every objective returns :class:`LossOutput` so training curves can show each
term. Half-precision inputs are cast up and everything runs in float32 (float64 stays float64)
with autocast disabled, and exponentials only ever enter through ``logsumexp``/``softplus``, so
fp16/bf16 training cannot overflow here (``e^{μ(S−γ)}`` reaches ``e^{45}`` for μ=90, beyond
fp16's range).
"""
from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from .errors import ConfigError, UserlabError

__all__ = [
    "LossInputError",
    "CollapseWarning",
    "LossOutput",
    "batch_hal_loss",
    "unified_objective",
    "triplet_loss",
    "info_nce",
    "collapse_score",
    "check_collapse",
]

DIAGONAL_MODES = ("mask", "zero")

# Fill value for excluded logits: exp(fill − anything reachable) is exactly 0 in float32/64, yet
# a row with every entry excluded still has a finite logsumexp, hence finite gradients.
_EXCLUDED = -1e30

QueueMask = Union[None, torch.Tensor, Sequence[Optional[torch.Tensor]]]


class LossInputError(UserlabError, ValueError):
    """A tensor handed to an objective has the wrong shape or dtype."""


class CollapseWarning(UserWarning):
    """All similarities of a batch are (nearly) equal: the embeddings have collapsed."""


@dataclass
class LossOutput:
    """What every objective returns.

    Attributes:
        total: scalar to back-propagate.
        terms: named scalar parts (still attached to the graph), for per-term curves.
    """

    total: torch.Tensor
    terms: dict[str, torch.Tensor] = field(default_factory=dict)

    def scalars(self) -> dict[str, float]:
        """``{"total": ..., **terms}`` as Python floats (synchronises with the device)."""
        out = {"total": float(self.total.detach())}
        out.update({name: float(value.detach()) for name, value in self.terms.items()})
        return out


# -- helpers ---------------------------------------------------------------------------------------
@contextlib.contextmanager
def _autocast_off(device: torch.device) -> Iterator[None]:
    """Disable autocast for ``device`` so matmuls here stay in the dtype we chose."""
    try:
        ctx = torch.autocast(device_type=device.type, enabled=False)
    except RuntimeError:  # a backend without autocast support: nothing to switch off
        ctx = contextlib.nullcontext()
    with ctx:
        yield


def _up(t: torch.Tensor) -> torch.Tensor:
    """Cast fp16/bf16 up to float32; float32/float64 pass through unchanged."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _check_sim(sim: torch.Tensor, where: str) -> int:
    if not isinstance(sim, torch.Tensor) or sim.dim() != 2 or sim.shape[0] != sim.shape[1]:
        shape = tuple(sim.shape) if isinstance(sim, torch.Tensor) else type(sim).__name__
        raise LossInputError(f"{where}: sim must be a square (B, B) tensor, got {shape}")
    if not sim.is_floating_point():
        raise LossInputError(f"{where}: sim must be floating point, got {sim.dtype}")
    if sim.shape[0] == 0:
        raise LossInputError(f"{where}: sim is empty (batch of size 0)")
    return sim.shape[0]


def _check_mask(mask: Optional[torch.Tensor], shape: tuple[int, ...], device: torch.device,
                where: str, name: str) -> Optional[torch.Tensor]:
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        kind = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise LossInputError(f"{where}: {name} must be a bool tensor, got {kind}")
    if tuple(mask.shape) != shape:
        raise LossInputError(f"{where}: {name} must have shape {shape}, got {tuple(mask.shape)}")
    return mask.to(device)


def _check_embeddings(t: torch.Tensor, rows: int, where: str, name: str) -> int:
    if not isinstance(t, torch.Tensor) or t.dim() != 2 or t.shape[0] != rows:
        shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise LossInputError(f"{where}: {name} must be ({rows}, E), got {shape}")
    return t.shape[1]


def _smooth_negatives(logits: torch.Tensor, allowed: Optional[torch.Tensor], mu: float) -> torch.Tensor:
    """Per row ``(1/μ)·log(1 + Σ_{allowed j} e^{logits_j})`` as ``softplus(logsumexp)/μ``.

    Args:
        logits: ``(N, M)`` already scaled, ``μ(S − γ)``.
        allowed: bool ``(N, M)`` or None (all allowed).

    Returns:
        ``(N,)``.
    """
    if allowed is not None:
        logits = logits.masked_fill(~allowed, _EXCLUDED)
    return F.softplus(torch.logsumexp(logits, dim=1)) / mu


def _positive_term(pos: torch.Tensor) -> torch.Tensor:
    """``−log(1 + max(0, s))`` per positive similarity ``s``."""
    return -torch.log1p(F.relu(pos))


def _check_mu(mu: float) -> None:
    if not mu > 0:
        raise ConfigError("loss.mu", f"must be > 0, got {mu}")


# -- USER: Unified Training Objective --------------------------------------------------------------
def batch_hal_loss(sim: torch.Tensor, mu: float = 90.0, gamma: float = 0.5, diagonal: str = "mask",
                   positive_mask: Optional[torch.Tensor] = None) -> LossOutput:
    """HAL's mini-batch loss, the term ``L_mb`` of USER's objective (method notes 2.5).

    ``L_mb = (1/B) Σ_i [ (1/μ)·log(1 + Σ_{j≠i} e^{μ(S_ji−γ)})
    + (1/μ)·log(1 + Σ_{j≠i} e^{μ(S_ij−γ)}) − log(1 + max(0, S_ii)) ]``

    The released code zeroes the diagonal instead of excluding it, so each sum also holds
    ``e^{−μγ}`` (``e^{−45} ≈ 3e−20`` at the defaults). ``diagonal="mask"`` (default) excludes it
    exactly; ``"zero"`` reproduces the original. The two differ by less than ``e^{−μγ}/μ`` per
    sum, far below float32 resolution at the defaults.

    Args:
        sim: ``(B, B)`` similarities, rows = images.
        mu: scale μ (90).
        gamma: absolute similarity threshold γ (0.5).
        diagonal: ``"mask"`` or ``"zero"``, see above.
        positive_mask: optional bool ``(B, B)``; True entries (e.g. another caption of the same
            image) are not used as negatives. The diagonal is always the positive.

    Returns:
        ``total = L_mb``; terms ``negative`` (both log-sum-exp parts, batch mean),
        ``positive`` (batch mean of ``−log(1 + max(0, S_ii))``).
    """
    where = "batch_hal_loss"
    _check_mu(mu)
    if diagonal not in DIAGONAL_MODES:
        raise ConfigError("diagonal", f"{diagonal!r} is not one of {', '.join(DIAGONAL_MODES)}")
    b = _check_sim(sim, where)
    positive_mask = _check_mask(positive_mask, (b, b), sim.device, where, "positive_mask")
    with _autocast_off(sim.device):
        s = _up(sim)
        eye = torch.eye(b, dtype=torch.bool, device=s.device)
        allowed = None
        if diagonal == "mask":
            allowed = ~eye
            scores = s
        else:
            scores = s.masked_fill(eye, 0.0)
        if positive_mask is not None:
            extra = ~(positive_mask & ~eye)
            allowed = extra if allowed is None else allowed & extra
        logits = mu * (scores - gamma)
        i2t = _smooth_negatives(logits, allowed, mu)            # row i: image i vs captions
        t2i = _smooth_negatives(logits.t(), None if allowed is None else allowed.t(), mu)
        negative = (i2t + t2i).mean()
        positive = _positive_term(torch.diagonal(s)).mean()
        total = negative + positive
    return LossOutput(total, {"negative": negative, "positive": positive})


def _split_queue_mask(queue_mask: QueueMask) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    if queue_mask is None or isinstance(queue_mask, torch.Tensor):
        return queue_mask, queue_mask
    if isinstance(queue_mask, (tuple, list)) and len(queue_mask) == 2:
        return queue_mask[0], queue_mask[1]
    raise LossInputError("unified_objective: queue_mask must be None, a (B, K) bool tensor, or a "
                         "pair (image-queries vs text queue, text-queries vs image queue)")


def unified_objective(sim: torch.Tensor, img_q: torch.Tensor, txt_q: torch.Tensor,
                      img_k: Optional[torch.Tensor] = None, txt_k: Optional[torch.Tensor] = None,
                      img_queue: Optional[torch.Tensor] = None, txt_queue: Optional[torch.Tensor] = None,
                      mu: float = 90.0, gamma: float = 0.5, lambda_batch: float = 20.0,
                      queue_mask: QueueMask = None, diagonal: str = "mask",
                      positive_mask: Optional[torch.Tensor] = None) -> LossOutput:
    """USER's Unified Training Objective ``L = λ·L_mb + L_q`` (method notes 2.5).

    ``L_mb`` is :func:`batch_hal_loss`. The queue term uses the momentum keys of the same pair
    as positives and the whole opposite-modality queue as negatives:

    ``L_q = (1/B) Σ_i [ (1/μ)·log(1 + Σ_k e^{μ(v_i·Q_t[:,k] − γ)}) − log(1 + max(0, v_i·t̂_i)) ]
    + (1/B) Σ_i [ (1/μ)·log(1 + Σ_k e^{μ(t_i·Q_v[:,k] − γ)}) − log(1 + max(0, t_i·v̂_i)) ]``

    The queues receive no gradient (they are detached and copied, so the caller may enqueue
    before calling ``backward``). Without queues (``img_queue``/``txt_queue`` None) the queue
    term is absent and this is HAL's batch loss scaled by λ.

    Args:
        sim: ``(B, B)`` query similarities ``v tᵀ``, rows = images.
        img_q: ``(B, E)`` image query embeddings ``v``.
        txt_q: ``(B, E)`` text query embeddings ``t``.
        img_k: ``(B, E)`` image momentum keys ``v̂`` (positives of the text queries).
        txt_k: ``(B, E)`` text momentum keys ``t̂`` (positives of the image queries).
        img_queue: ``(E, K_v)`` image key queue ``Q_v`` (negatives of the text queries).
        txt_queue: ``(E, K_t)`` text key queue ``Q_t`` (negatives of the image queries).
        mu: scale μ (90).
        gamma: threshold γ (0.5).
        lambda_batch: weight λ of ``L_mb`` (20 on F30K, 1 on COCO).
        queue_mask: None (USER: every queue key is a negative), one bool ``(B, K)`` used for both
            directions, or a pair ``(mask for img_q vs txt_queue, mask for txt_q vs img_queue)``
            whose entries may be None; True = the key may be a negative.
        diagonal: how ``L_mb`` leaves out the positive pair, see :func:`batch_hal_loss`.
        positive_mask: optional bool ``(B, B)`` of in-batch false negatives for ``L_mb``.

    Returns:
        ``total = λ·L_mb + L_q``; terms ``batch`` (``L_mb``, unweighted), ``batch_positive``,
        ``batch_negative`` and, with queues, ``queue`` (``L_q``), ``queue_positive``,
        ``queue_negative``.
    """
    where = "unified_objective"
    b = _check_sim(sim, where)
    dim = _check_embeddings(img_q, b, where, "img_q")
    if _check_embeddings(txt_q, b, where, "txt_q") != dim:
        raise LossInputError(f"{where}: img_q and txt_q widths differ ({dim} vs {txt_q.shape[1]})")
    queue_parts = {"img_k": img_k, "txt_k": txt_k, "img_queue": img_queue, "txt_queue": txt_queue}
    given = [name for name, value in queue_parts.items() if value is not None]
    if given and len(given) != len(queue_parts):
        missing = [name for name in queue_parts if name not in given]
        raise LossInputError(f"{where}: the queue term needs img_k, txt_k, img_queue and txt_queue; "
                             f"missing {', '.join(missing)}")
    batch = batch_hal_loss(sim, mu=mu, gamma=gamma, diagonal=diagonal, positive_mask=positive_mask)
    terms = {"batch": batch.total, "batch_positive": batch.terms["positive"],
             "batch_negative": batch.terms["negative"]}
    total = lambda_batch * batch.total
    if not given:
        return LossOutput(total, terms)

    for name, key in (("img_k", img_k), ("txt_k", txt_k)):
        if _check_embeddings(key, b, where, name) != dim:
            raise LossInputError(f"{where}: {name} must be ({b}, {dim}), got {tuple(key.shape)}")
    for name, queue in (("img_queue", img_queue), ("txt_queue", txt_queue)):
        if queue.dim() != 2 or queue.shape[0] != dim:
            raise LossInputError(f"{where}: {name} must be ({dim}, K), got {tuple(queue.shape)}")
    mask_v, mask_t = _split_queue_mask(queue_mask)
    mask_v = _check_mask(mask_v, (b, txt_queue.shape[1]), sim.device, where, "queue_mask (image queries)")
    mask_t = _check_mask(mask_t, (b, img_queue.shape[1]), sim.device, where, "queue_mask (text queries)")

    with _autocast_off(sim.device):
        v, t = _up(img_q), _up(txt_q)
        v_hat, t_hat = _up(img_k).detach(), _up(txt_k).detach()
        # A private copy: enqueueing in place must not invalidate the saved tensor for backward.
        q_v = _up(img_queue.detach()).clone().to(v.dtype)
        q_t = _up(txt_queue.detach()).clone().to(v.dtype)
        v_neg = _smooth_negatives(mu * (v @ q_t - gamma), mask_v, mu)       # (B,)
        t_neg = _smooth_negatives(mu * (t @ q_v - gamma), mask_t, mu)
        v_pos = _positive_term((v * t_hat.to(v.dtype)).sum(dim=1))
        t_pos = _positive_term((t * v_hat.to(t.dtype)).sum(dim=1))
        queue_negative = v_neg.mean() + t_neg.mean()
        queue_positive = v_pos.mean() + t_pos.mean()
        queue_total = queue_negative + queue_positive
    terms.update({"queue": queue_total, "queue_positive": queue_positive,
                  "queue_negative": queue_negative})
    return LossOutput(total + queue_total, terms)


# -- VSE triplet --------------------------------------------------------------------------------------
def triplet_loss(sim: torch.Tensor, margin: float = 0.2, max_violation: bool = True,
                 positive_mask: Optional[torch.Tensor] = None) -> LossOutput:
    """Bidirectional hinge triplet loss of VSE0 / VSE++ (DBL's ``L_raw``), summed over the batch.

    ``i2t = Σ_i agg_{j≠i} [m + S_ij − S_ii]_+`` (image i, negative captions j) and
    ``t2i = Σ_j agg_{i≠j} [m + S_ij − S_jj]_+`` (caption j, negative images i), with ``agg`` the
    max (VSE++, ``max_violation=True``) or the sum (VSE0).

    Args:
        sim: ``(B, B)`` similarities, rows = images.
        margin: hinge margin m.
        max_violation: hardest negative only (VSE++) instead of all negatives.
        positive_mask: optional bool ``(B, B)``; True entries are not negatives (e.g. a second
            caption of the same image in the batch). The diagonal is always the positive.

    Returns:
        ``total = i2t + t2i``; terms ``i2t``, ``t2i``.
    """
    where = "triplet_loss"
    b = _check_sim(sim, where)
    positive_mask = _check_mask(positive_mask, (b, b), sim.device, where, "positive_mask")
    with _autocast_off(sim.device):
        s = _up(sim)
        diag = torch.diagonal(s)
        blocked = torch.eye(b, dtype=torch.bool, device=s.device)
        if positive_mask is not None:
            blocked = blocked | positive_mask
        cost_i2t = (margin + s - diag.unsqueeze(1)).clamp_min(0).masked_fill(blocked, 0.0)
        cost_t2i = (margin + s - diag.unsqueeze(0)).clamp_min(0).masked_fill(blocked, 0.0)
        if max_violation:
            i2t = cost_i2t.max(dim=1).values.sum()
            t2i = cost_t2i.max(dim=0).values.sum()
        else:
            i2t = cost_i2t.sum()
            t2i = cost_t2i.sum()
    return LossOutput(i2t + t2i, {"i2t": i2t, "t2i": t2i})


# -- InfoNCE ------------------------------------------------------------------------------------------
def info_nce(sim: torch.Tensor, temperature: float = 0.05) -> LossOutput:
    """Symmetric InfoNCE: cross entropy of ``sim / T`` over rows and over columns.

    Args:
        sim: ``(B, B)`` similarities, rows = images; the diagonal holds the positives.
        temperature: T > 0.

    Returns:
        ``total = (i2t + t2i) / 2``; terms ``i2t`` (row-wise CE, batch mean), ``t2i``.
    """
    where = "info_nce"
    b = _check_sim(sim, where)
    if not temperature > 0:
        raise ConfigError("loss.temperature", f"must be > 0, got {temperature}")
    with _autocast_off(sim.device):
        logits = _up(sim) / temperature
        target = torch.arange(b, device=sim.device)
        i2t = F.cross_entropy(logits, target)
        t2i = F.cross_entropy(logits.t(), target)
    return LossOutput((i2t + t2i) / 2, {"i2t": i2t, "t2i": t2i})


# -- collapse detection -------------------------------------------------------------------------------
def collapse_score(sim: torch.Tensor) -> float:
    """Spread ``max − min`` of a similarity matrix; 0 when every pair scores the same.

    Collapsed embeddings (all images and captions mapped to one point) make every similarity
    equal, and a VSE++ loss then sits at ``2·B·margin``.
    """
    if not isinstance(sim, torch.Tensor) or sim.numel() == 0:
        raise LossInputError("collapse_score: sim must be a non-empty tensor")
    s = _up(sim.detach())
    return float(s.max() - s.min())


def check_collapse(sim: torch.Tensor, tol: float = 1e-3, near_one: Optional[float] = 0.9,
                   min_gap: float = 0.01) -> bool:
    """True, with a :class:`CollapseWarning`, when the batch looks collapsed.

    Two signs: all similarities lie within ``tol`` of each other (spread), or, for a square
    batch matrix with positives on the diagonal, positives and negatives both average above
    ``near_one`` and differ by less than ``min_gap`` (every embedding near one point, with
    enough noise left that the spread test alone misses it). ``near_one=None`` turns the
    second test off. A single similarity (B = 1) cannot show collapse and returns False.
    """
    if isinstance(sim, torch.Tensor) and sim.numel() < 2:
        return False
    spread = collapse_score(sim)
    b = sim.shape[0]
    if spread < tol:
        warnings.warn(
            f"all {sim.numel()} similarities of the batch lie within {spread:.2e} of each other "
            f"(tolerance {tol:g}): the embeddings have collapsed; a triplet loss now stays at "
            f"2·B·margin = {2 * b}·margin. Try a lower learning rate, VSE0 warm-up epochs or "
            "a different seed.", CollapseWarning, stacklevel=2)
        return True
    if near_one is not None and sim.dim() == 2 and sim.shape[0] == sim.shape[1] and b > 1:
        s = _up(sim.detach())
        pos = float(s.diagonal().mean())
        neg = float((s.sum() - s.diagonal().sum()) / (s.numel() - b))
        if pos > near_one and neg > near_one and pos - neg < min_gap:
            warnings.warn(
                f"positive ({pos:.3f}) and negative ({neg:.3f}) similarities are both above "
                f"{near_one:g} and differ by less than {min_gap:g}: the embeddings have nearly "
                "collapsed to one point. Try a lower learning rate, VSE0 warm-up epochs or a "
                "smaller boosting weight.", CollapseWarning, stacklevel=2)
            return True
    return False

"""Non-finite guard: a training step whose loss or gradient norm is NaN/Inf changes nothing.

Why: one overflowing step would otherwise write NaN into every weight (and into AdamW's moment
estimates, which never forget it); the run would go on, checkpoint NaN weights and prune the
last good checkpoint. With the guard, such a step is skipped and counted, and
``optim.max_nonfinite_steps`` skipped steps in a row stop the run with a
:class:`~userlab.errors.NonFiniteError` that names the step, the loss terms and a likely cause.

Per step the Trainer calls::

    guard.snapshot(model)                      # buffers the forward pass changes
    loss = model(batch); backward; unscale; grad_norm = clip_grad_norm_(...)
    if guard.is_finite(loss.total, grad_norm):  # one host sync
        optimizer step
    else:
        guard.skip(model, step, loss.terms, ...)  # restore buffers; raise after N in a row

"Changes nothing" covers the buffers too: a forward pass over overflowing activations has
already folded NaN into BatchNorm's running statistics and pushed NaN keys into the momentum
queues, so :meth:`FiniteGuard.snapshot` copies every buffer before the forward pass and
:meth:`FiniteGuard.skip` copies them back. (The momentum encoders' EMA step of that forward
pass is kept: it averages finite query weights, so it stays finite.)
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

import torch

from .errors import NonFiniteError


class FiniteGuard:
    """Skips and counts non-finite steps; raises after ``max_consecutive`` of them in a row.

    Args:
        max_consecutive: ``optim.max_nonfinite_steps``.
        fp16_scaler: the run's GradScaler when fp16 autocast is on. Its first overflows are
            expected (it starts at scale 2^16 and halves on each), so a step whose loss is
            finite but whose scaled gradient overflowed is skipped and counted, but only counts
            toward the limit once the scale has fallen to 1 or below.
        world: DDP processes; the finite/non-finite decision is agreed by all of them.

    Attributes:
        skipped: non-finite steps skipped in this run (saved in checkpoints; logged per row).
        consecutive: non-finite steps in a row, up to the last one checked.
        last_skipped: whether the last checked step was skipped.
    """

    def __init__(self, max_consecutive: int, fp16_scaler: Optional[torch.amp.GradScaler] = None,
                 world: int = 1, amp: Optional[torch.dtype] = None):
        self.max_consecutive = int(max_consecutive)
        self.fp16_scaler = fp16_scaler if fp16_scaler is not None and fp16_scaler.is_enabled() else None
        self.world = world
        self.amp = amp
        self.skipped = 0
        self.consecutive = 0
        self.last_skipped = False
        self._saved: list[torch.Tensor] = []
        self._float_buffers: list[torch.Tensor] = []
        self._bad = 0
        self._last_finite: Optional[tuple[int, torch.Tensor, torch.Tensor]] = None

    # -- buffers ---------------------------------------------------------------------------------
    def snapshot(self, model: torch.nn.Module) -> None:
        """Copy every buffer of ``model`` (BatchNorm statistics, queue keys / ids / pointers)."""
        buffers = list(model.buffers())
        self._float_buffers = [b for b in buffers if b.is_floating_point() and b.numel()]
        if len(buffers) != len(self._saved) or any(
                s.shape != b.shape or s.dtype != b.dtype or s.device != b.device
                for s, b in zip(self._saved, buffers)):
            self._saved = [b.detach().clone() for b in buffers]
            return
        if not buffers:
            return
        with torch.no_grad():
            if hasattr(torch, "_foreach_copy_"):
                torch._foreach_copy_(self._saved, [b.detach() for b in buffers])  # one kernel on CUDA
            else:  # pragma: no cover - older torch
                for s, b in zip(self._saved, buffers):
                    s.copy_(b)

    def restore(self, model: torch.nn.Module) -> None:
        """Put the buffers back as :meth:`snapshot` found them."""
        buffers = list(model.buffers())
        if len(buffers) != len(self._saved):  # pragma: no cover - a module added a buffer mid-step
            return
        with torch.no_grad():
            for s, b in zip(self._saved, buffers):
                b.copy_(s)

    # -- the check -------------------------------------------------------------------------------
    def is_finite(self, loss: torch.Tensor, grad_norm: torch.Tensor, step: int = 0) -> bool:
        """True when the loss, the (all-reduced) gradient norm and the buffers the forward pass
        updated (as of :meth:`snapshot`) are finite; one host sync.

        The buffers matter on their own: overflowing activations can turn a BatchNorm running
        variance to Inf while the normalised loss stays finite.

        Args:
            loss: scalar total loss of the step.
            grad_norm: what ``clip_grad_norm_`` returned (the norm before clipping).
        """
        loss, grad_norm = loss.detach().float(), grad_norm.detach().float().to(loss.device)
        bad = (~torch.isfinite(loss)).to(torch.int32) * 2 + (~torch.isfinite(grad_norm)).to(torch.int32)
        if self._float_buffers:
            # one fused kernel on CUDA; a NaN/Inf element makes its tensor's norm NaN/Inf
            norms = torch._foreach_norm(self._float_buffers) if hasattr(torch, "_foreach_norm") \
                else [b.norm() for b in self._float_buffers]
            total = torch.stack([n.float().to(loss.device) for n in norms]).sum()
            bad = bad + (~torch.isfinite(total)).to(torch.int32) * 4
        if self.world > 1:
            import torch.distributed as dist
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)  # every rank skips together
        self._bad = int(bad)
        if self._bad == 0:
            self._last_finite = (step, loss, grad_norm)  # tensors: no extra sync on the good path
            self.consecutive = 0
            self.last_skipped = False
            return True
        return False

    def skip(self, model: torch.nn.Module, step: int, loss: torch.Tensor,
             terms: Mapping[str, torch.Tensor], lr: float, grad_clip: float) -> None:
        """Record a non-finite step, undo its buffer changes, raise after too many in a row.

        Raises:
            NonFiniteError: ``max_consecutive`` non-finite steps in a row.
        """
        self.restore(model)
        self.skipped += 1
        self.last_skipped = True
        loss_finite = not self._bad & 2
        scaler_overflow = False
        if self.fp16_scaler is not None and loss_finite:
            # the scaled gradient overflowed; the scaler lowers its scale in update()
            scaler_overflow = self.fp16_scaler.get_scale() > 1.0
        if not scaler_overflow:
            self.consecutive += 1
        if self.consecutive < self.max_consecutive:
            return
        values = {"total": float(loss.detach())}
        values.update({k: float(v.detach()) for k, v in terms.items()})
        raise NonFiniteError(step, values, self.consecutive, self.skipped,
                             self.likely_cause(model, loss_finite, lr, grad_clip))

    def likely_cause(self, model: torch.nn.Module, loss_finite: bool, lr: float, grad_clip: float) -> str:
        """A short diagnosis from what the run has seen (weights, last finite step, precision)."""
        with torch.no_grad():
            params = [p.detach() for p in model.parameters() if p.numel()]
            broken = sum(not bool(torch.isfinite(p).all()) for p in params)
            top = max((float(p.abs().max()) for p in params if torch.isfinite(p).all()), default=0.0)
        hints = []
        if broken:
            hints.append(f"{broken} weight tensors already hold NaN/Inf (an optimiser step overflowed: "
                         f"learning rate too high, optim.lr = {lr:g})")
        if self.amp == torch.float16:
            hints.append("fp16 overflow (set optim.amp to bf16 or off)")
        if self._last_finite is None:
            hints.append("bad input values or an extreme loss setting: the very first step was "
                         "non-finite (check the features and loss.mu / loss.temperature)")
        elif top > 1e4:
            hints.append(f"learning rate too high: weights have grown to |w| = {top:.3g} "
                         f"(optim.lr = {lr:g}; try 10x lower)")
        else:
            step, l, g = self._last_finite
            hints.append(f"learning rate too high or bad input values: the last finite step was "
                         f"{step} (loss {float(l):.4g}, gradient norm {float(g):.4g} before clipping "
                         f"to {grad_clip:g}; optim.lr = {lr:g})")
        if not loss_finite:
            hints.append("the loss itself is non-finite")
        if self._bad & 4:
            hints.append("activations overflowed into a buffer (a BatchNorm running statistic or a "
                         "momentum queue) during the forward pass")
        return "; ".join(hints)

    # -- checkpoints -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"skipped": self.skipped, "consecutive": self.consecutive}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.skipped = int(state.get("skipped", 0))
        self.consecutive = int(state.get("consecutive", 0))


def first_nonfinite(tensors: Mapping[str, Any], prefix: str = "") -> tuple[int, Optional[str]]:
    """Count the floating tensors holding NaN/Inf in a (nested) state; ``(count, first name)``.

    Walks dicts, lists and tuples; integers, strings and Python floats are not inspected (a
    state's ``best_rsum`` is legitimately ``-inf`` before the first evaluation).
    """
    count, first = 0, None
    items = (tensors.items() if isinstance(tensors, Mapping)
             else enumerate(tensors) if isinstance(tensors, (list, tuple)) else ())
    for key, value in items:
        name = f"{prefix}{key}"
        if isinstance(value, torch.Tensor):
            if value.is_floating_point() and value.numel() and not bool(torch.isfinite(value).all()):
                count += 1
                first = first or name
        elif isinstance(value, (Mapping, list, tuple)):
            n, f = first_nonfinite(value, name + ".")
            count += n
            first = first or f
    return count, first

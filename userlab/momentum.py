"""Momentum (key) encoders, the EMA step, and the dynamic key queues of USER (method notes 2.4).

USER keeps a deep copy of each query encoder, the *key encoder*, that never receives gradients
and instead follows the query encoder by an exponential moving average (MoCo):
``θ_k ← m·θ_k + (1−m)·θ_q`` with ``m = 0.999``, taken every step *before* the keys are computed.
The keys of every batch are pushed into two FIFO queues (image keys and text keys, ``(E, K)``
each) *after* the loss, and the queue of the other modality serves as extra negatives.

DBL's momentum scenario (notes 4.3, MSS) uses the same EMA step with a cosine momentum schedule
(:func:`cosine_momentum`).

Under DistributedDataParallel every rank gathers the keys of all ranks before enqueueing
(:func:`concat_all_gather`), so all queues stay identical and grow by ``world_size·B`` per step.
"""
from __future__ import annotations

import copy
import math
import weakref
from typing import Optional

import torch
from torch import nn

from .errors import ConfigError, UserlabError

__all__ = [
    "QueueInputError",
    "make_key_encoder",
    "ema_update_",
    "clear_ema_cache",
    "cosine_momentum",
    "concat_all_gather",
    "distributed_world_size",
    "MomentumQueue",
]

BUFFER_MODES = ("copy", "ema", "keep")


class QueueInputError(UserlabError, ValueError):
    """Tensors handed to the momentum machinery have the wrong shape, dtype or pairing."""


# -- key encoders and the EMA step -----------------------------------------------------------
def make_key_encoder(module: nn.Module) -> nn.Module:
    """Deep copy of ``module`` whose parameters never require gradients.

    The copy keeps the train/eval mode of ``module``. USER never switches its key encoders to
    eval mode (notes 2.4: dropout stays on, BatchNorm uses batch statistics); the caller decides.

    Args:
        module: the query encoder.

    Returns:
        The key encoder, on the same device and dtype as ``module``.
    """
    key = copy.deepcopy(module)
    for param in key.parameters():
        param.requires_grad_(False)
    return key


class _ParamPairs:
    """The matched parameter lists of one (key, query) module pair, gathered once."""

    def __init__(self, key_module: nn.Module, query_module: nn.Module):
        key_named = list(key_module.named_parameters())
        query_named = list(query_module.named_parameters())
        key_names = [n for n, _ in key_named]
        query_names = [n for n, _ in query_named]
        if key_names != query_names:
            missing = sorted(set(query_names) ^ set(key_names))
            raise QueueInputError(
                "ema_update_: key and query modules have different parameters "
                f"(first difference: {missing[0] if missing else 'order'}); build the key encoder "
                "with make_key_encoder(query_module)")
        for (name, k), (_, q) in zip(key_named, query_named):
            if k.shape != q.shape:
                raise QueueInputError(
                    f"ema_update_: parameter '{name}' has shape {tuple(k.shape)} in the key module "
                    f"and {tuple(q.shape)} in the query module")
            if k.requires_grad:
                raise QueueInputError(
                    f"ema_update_: key parameter '{name}' requires grad; the key encoder must be "
                    "frozen (use make_key_encoder)")
        self.query_ref = weakref.ref(query_module)
        self.key_params = [p for _, p in key_named]
        self.query_params = [p for _, p in query_named]


# Keyed by the key module, so the cache entry dies with it.
_PAIR_CACHE: "weakref.WeakKeyDictionary[nn.Module, _ParamPairs]" = weakref.WeakKeyDictionary()


def clear_ema_cache() -> None:
    """Forget the cached parameter lists (needed only after parameters were *replaced*).

    Moving a module with ``.to()``/``.cuda()``/``.half()`` or ``load_state_dict`` keeps the
    same ``Parameter`` objects, so the cache stays valid; assigning a new ``nn.Parameter`` to an
    attribute does not.
    """
    _PAIR_CACHE.clear()


def _pairs_for(key_module: nn.Module, query_module: nn.Module) -> _ParamPairs:
    pairs = _PAIR_CACHE.get(key_module)
    if pairs is None or pairs.query_ref() is not query_module:
        pairs = _ParamPairs(key_module, query_module)
        _PAIR_CACHE[key_module] = pairs
    return pairs


@torch.no_grad()
def ema_update_(key_module: nn.Module, query_module: nn.Module, m: float, buffers: str = "copy") -> None:
    """One in-place EMA step ``θ_k ← m·θ_k + (1−m)·θ_q`` over every parameter.

    The arithmetic runs as one fused ``torch._foreach_lerp_`` over the parameter lists, which
    are gathered once per module pair and cached (a Python loop per parameter costs more than
    the update itself for a BERT-sized encoder).

    Buffers (BatchNorm running statistics) are not parameters; MoCo leaves them alone. USER's key
    encoders always run in train mode, so their running statistics are never read during
    training; copying the query encoder's statistics (the default) keeps the key encoder usable
    in eval mode, which DBL's momentum anchor needs.

    Args:
        key_module: the frozen key encoder (from :func:`make_key_encoder`), updated in place.
        query_module: the query encoder with the same parameter names and shapes.
        m: momentum in ``[0, 1]``; ``m = 0`` copies the query weights, ``m = 1`` keeps the keys.
        buffers: ``"copy"`` (default) copies the query buffers, ``"ema"`` averages floating
            buffers like parameters (integer ones such as ``num_batches_tracked`` are copied),
            ``"keep"`` leaves the key buffers untouched.

    Raises:
        ConfigError: ``m`` outside ``[0, 1]`` or an unknown ``buffers`` mode.
        QueueInputError: the two modules do not match.
    """
    if not 0.0 <= float(m) <= 1.0:
        raise ConfigError("momentum.momentum", f"must lie in [0, 1], got {m}")
    if buffers not in BUFFER_MODES:
        raise ConfigError("buffers", f"{buffers!r} is not one of {', '.join(BUFFER_MODES)}")
    pairs = _pairs_for(key_module, query_module)
    if pairs.key_params:
        # lerp(k, q, w) = k + w·(q − k) = (1−w)·k + w·q, so w = 1 − m.
        torch._foreach_lerp_(pairs.key_params, pairs.query_params, 1.0 - float(m))
    if buffers == "keep":
        return
    # Buffers are re-read every call: Module.to() rebinds buffer tensors (not parameters).
    key_bufs = list(key_module.buffers())
    query_bufs = list(query_module.buffers())
    if len(key_bufs) != len(query_bufs):
        raise QueueInputError(
            f"ema_update_: key module has {len(key_bufs)} buffers, query module {len(query_bufs)}")
    if not key_bufs:
        return
    if buffers == "copy":
        torch._foreach_copy_(key_bufs, query_bufs)
        return
    float_pairs = [(k, q) for k, q in zip(key_bufs, query_bufs) if k.is_floating_point()]
    other_pairs = [(k, q) for k, q in zip(key_bufs, query_bufs) if not k.is_floating_point()]
    if float_pairs:
        torch._foreach_lerp_([k for k, _ in float_pairs], [q for _, q in float_pairs], 1.0 - float(m))
    if other_pairs:
        torch._foreach_copy_([k for k, _ in other_pairs], [q for _, q in other_pairs])


def cosine_momentum(step: int, total_steps: int, base: float = 0.9995, final: float = 1.0) -> float:
    """Cosine schedule of the EMA momentum from ``base`` (step 0) to ``final`` (last step).

    ``m(step) = final + (base − final)·(1 + cos(π·step/total_steps))/2``, the shape of DINO's
    ``cosine_scheduler`` that DBL's momentum scenario uses. Unlike DINO's precomputed array the
    end point is reached exactly at ``step == total_steps``; steps outside ``[0, total_steps]``
    are clamped.

    Args:
        step: current optimisation step (0-based).
        total_steps: number of steps of the whole schedule, ``> 0``.
        base: momentum at step 0 (DBL: 0.9995 by default, 0.99995 in its scripts).
        final: momentum at the end (1.0: the anchor freezes).
    """
    if total_steps <= 0:
        raise ConfigError("total_steps", f"must be > 0, got {total_steps}")
    progress = min(max(step, 0), total_steps) / total_steps
    return final + (base - final) * 0.5 * (1.0 + math.cos(math.pi * progress))


# -- distributed gather ------------------------------------------------------------------------
def distributed_world_size() -> int:
    """Number of processes in the default group, 1 when not running distributed."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


@torch.no_grad()
def concat_all_gather(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` from every rank along dim 0, in rank order (no gradient).

    Works with gloo (CPU tensors) and nccl (CUDA tensors). Ranks may hold different numbers of
    rows (e.g. a short last batch): the row counts are exchanged first and the tensors are padded
    to the longest, because ``all_gather`` needs equal shapes. Without an initialised process
    group, or with one process, the tensor is returned detached and unchanged.

    Args:
        tensor: ``(n, ...)`` on this rank.

    Returns:
        ``(Σ_r n_r, ...)``, identical on every rank.
    """
    tensor = tensor.detach()
    world = distributed_world_size()
    if world == 1:
        return tensor
    dist = torch.distributed
    count = torch.tensor([tensor.shape[0]], dtype=torch.long, device=tensor.device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    sizes = [int(c.item()) for c in counts]
    longest = max(sizes)
    padded = tensor
    if tensor.shape[0] < longest:
        pad = tensor.new_zeros((longest - tensor.shape[0],) + tuple(tensor.shape[1:]))
        padded = torch.cat([tensor, pad], dim=0)
    padded = padded.contiguous()
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded)
    return torch.cat([g[:n] for g, n in zip(gathered, sizes)], dim=0)


# -- the queue ------------------------------------------------------------------------------------
class MomentumQueue(nn.Module):
    """A FIFO of ``K`` key embeddings with the image id of each key.

    All state lives in persistent buffers, so ``state_dict`` saves and restores the queue exactly:

    - ``keys``       float ``(E, K)``: one key per column. Initialised as USER does:
      uniform ``[0, 1)`` values, L2-normalised per column.
    - ``ids``        long ``(K,)``: image id of each key; ``-1`` for a slot never written.
    - ``ptr``        long ``()``: the next slot to write, which is also the oldest key.
    - ``written_at`` long ``(K,)``: value of ``num_enqueued`` when the slot was written
      (``-1`` never); key age in enqueue calls is ``num_enqueued − written_at``.
    - ``num_enqueued`` long ``()``: number of :meth:`enqueue` calls so far.

    Unlike the released code, any batch size works: writes wrap around the end of the buffer,
    and a batch larger than ``K`` keeps its last ``K`` keys. Reading the columns from ``ptr``
    onwards (cyclically) always gives the stored keys from oldest to newest.

    Args:
        dim: key width ``E``.
        size: number of slots ``K``.
        include_unfilled: whether :meth:`negatives_mask` allows never-written slots (the random
            initial keys) as negatives. True reproduces USER, which uses them from step 0.
        generator: optional RNG for the initial keys.
    """

    keys: torch.Tensor
    ids: torch.Tensor
    ptr: torch.Tensor
    written_at: torch.Tensor
    num_enqueued: torch.Tensor

    def __init__(self, dim: int, size: int, include_unfilled: bool = True,
                 generator: Optional[torch.Generator] = None):
        super().__init__()
        if int(dim) <= 0:
            raise ConfigError("model.embed_size", f"queue key width must be > 0, got {dim}")
        if int(size) <= 0:
            raise ConfigError("momentum.queue_size", f"must be > 0, got {size}")
        self.dim, self.size = int(dim), int(size)
        self.include_unfilled = include_unfilled
        keys = torch.rand(self.dim, self.size, generator=generator)
        keys = keys / keys.norm(dim=0, keepdim=True).clamp_min(1e-12)
        self.register_buffer("keys", keys, persistent=True)
        self.register_buffer("ids", torch.full((self.size,), -1, dtype=torch.long), persistent=True)
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long), persistent=True)
        self.register_buffer("written_at", torch.full((self.size,), -1, dtype=torch.long), persistent=True)
        self.register_buffer("num_enqueued", torch.zeros((), dtype=torch.long), persistent=True)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, size={self.size}, include_unfilled={self.include_unfilled}"

    @property
    def filled(self) -> torch.Tensor:
        """Bool ``(K,)``: slots that hold a real key (written at least once)."""
        return self.written_at >= 0

    def age(self) -> torch.Tensor:
        """Long ``(K,)``: enqueue calls since each slot was written (``-1`` for unfilled slots)."""
        return torch.where(self.filled, self.num_enqueued - self.written_at,
                           torch.full_like(self.written_at, -1))

    def ordered(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys ``(E, K)`` and ids ``(K,)`` rotated so column 0 is the oldest slot."""
        order = (torch.arange(self.size, device=self.ids.device) + self.ptr) % self.size
        return self.keys[:, order], self.ids[order]

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor, ids: torch.Tensor) -> None:
        """Push a batch of keys (oldest first) and their image ids; no gradient flows.

        Under DDP the batch is first gathered from every rank (rank order), so each rank's queue
        receives the same ``world_size·B`` keys.

        Args:
            keys: ``(B, E)`` key embeddings (any float dtype; stored in the queue's dtype).
            ids: ``(B,)`` integer image ids.
        """
        if keys.dim() != 2 or keys.shape[1] != self.dim:
            raise QueueInputError(f"MomentumQueue.enqueue: keys must be (B, {self.dim}), got {tuple(keys.shape)}")
        if ids.dim() != 1 or ids.shape[0] != keys.shape[0]:
            raise QueueInputError(
                f"MomentumQueue.enqueue: ids must be ({keys.shape[0]},) to match keys, got {tuple(ids.shape)}")
        if ids.is_floating_point() or ids.is_complex():
            raise QueueInputError(f"MomentumQueue.enqueue: ids must be integers, got {ids.dtype}")
        # Both on the keys' device: nccl gathers CUDA tensors only.
        keys = concat_all_gather(keys.detach())
        ids = concat_all_gather(ids.detach().to(keys.device))
        batch = keys.shape[0]
        if batch > 0:
            # Only the newest K keys can survive; they land where one-by-one pushes would put them.
            kept = min(batch, self.size)
            offsets = torch.arange(batch - kept, batch, device=self.ids.device)
            slots = (self.ptr + offsets) % self.size
            self.keys.index_copy_(1, slots, keys[batch - kept:].t().to(self.keys.device, self.keys.dtype))
            self.ids.index_copy_(0, slots, ids[batch - kept:].to(self.ids.device, torch.long))
            self.written_at.index_fill_(0, slots, self.num_enqueued)
            self.ptr.copy_((self.ptr + batch) % self.size)
        self.num_enqueued.add_(1)  # counts calls, empty ones included (keys age per call)

    @torch.no_grad()
    def negatives_mask(self, query_ids: torch.Tensor, same_image: bool = True) -> torch.Tensor:
        """Which queue keys each query may use as a negative.

        Args:
            query_ids: ``(B,)`` image ids of the queries.
            same_image: exclude keys whose image id equals the query's (other captions of the
                same image are false negatives). The released USER does not mask; callers that
                reproduce it simply pass no mask to the loss.

        Returns:
            Bool ``(B, K)`` on the queue's device, True where the key may be a negative. Never
            written slots are allowed iff ``include_unfilled`` (their id ``-1`` matches no query).
        """
        if query_ids.dim() != 1:
            raise QueueInputError(
                f"MomentumQueue.negatives_mask: query_ids must be (B,), got {tuple(query_ids.shape)}")
        query_ids = query_ids.to(self.ids.device, torch.long)
        allowed = torch.ones(query_ids.shape[0], self.size, dtype=torch.bool, device=self.ids.device)
        if same_image:
            allowed &= self.ids.unsqueeze(0) != query_ids.unsqueeze(1)
        if not self.include_unfilled:
            allowed &= self.filled.unsqueeze(0)
        return allowed

"""Key encoders, the EMA step, the momentum schedule and the key queues (userlab.momentum)."""
from __future__ import annotations

import math
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from userlab.errors import ConfigError
from userlab.losses import unified_objective
from userlab.momentum import (MomentumQueue, QueueInputError, concat_all_gather, cosine_momentum,
                              ema_update_, make_key_encoder)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: extra intra-op threads only fight over the two shared cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def small_encoder(seed: int = 0, dtype=torch.float64) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.ReLU(), nn.Linear(7, 3)).to(dtype)


# -- key encoders and EMA ---------------------------------------------------------------------
def test_make_key_encoder_is_a_frozen_independent_copy():
    query = small_encoder()
    key = make_key_encoder(query)
    for (name, q), (_, k) in zip(query.named_parameters(), key.named_parameters()):
        assert torch.equal(q, k), name
        assert q.data_ptr() != k.data_ptr(), name
        assert not k.requires_grad and q.requires_grad
    assert key.training == query.training


@pytest.mark.parametrize("m", [0.999, 0.5, 0.9])
def test_ema_one_step_matches_manual(m):
    query = small_encoder(0)
    key = make_key_encoder(small_encoder(1))  # different weights, same structure
    before_k = {n: p.clone() for n, p in key.named_parameters()}
    q_params = dict(query.named_parameters())
    ema_update_(key, query, m)
    for name, k in key.named_parameters():
        expected = m * before_k[name] + (1 - m) * q_params[name].detach()
        assert torch.allclose(k, expected, rtol=0, atol=1e-12), name
    # A second step keeps following (the cached lists are the live parameters).
    with torch.no_grad():
        for p in query.parameters():
            p.add_(1.0)
    before_k = {n: p.clone() for n, p in key.named_parameters()}
    ema_update_(key, query, m)
    for name, k in key.named_parameters():
        expected = m * before_k[name] + (1 - m) * q_params[name].detach()
        assert torch.allclose(k, expected, rtol=0, atol=1e-12), name


def test_ema_extremes_copy_and_keep():
    query, other = small_encoder(0), small_encoder(1)
    key = make_key_encoder(other)
    ema_update_(key, query, 0.0)
    assert all(torch.equal(k, q) for k, q in zip(key.parameters(), query.parameters()))
    key = make_key_encoder(other)
    ema_update_(key, query, 1.0)
    assert all(torch.equal(k, o) for k, o in zip(key.parameters(), other.parameters()))


def test_ema_buffer_modes():
    query = small_encoder(0)
    query.train()
    query(torch.randn(16, 5, dtype=torch.float64))  # moves the BN running statistics
    bn_q = query[1]

    key = make_key_encoder(small_encoder(1))
    ema_update_(key, query, 0.9)  # default: copy
    assert torch.equal(key[1].running_mean, bn_q.running_mean)
    assert torch.equal(key[1].num_batches_tracked, bn_q.num_batches_tracked)

    key = make_key_encoder(small_encoder(1))
    old_mean = key[1].running_mean.clone()
    ema_update_(key, query, 0.9, buffers="ema")
    assert torch.allclose(key[1].running_mean, 0.9 * old_mean + 0.1 * bn_q.running_mean, atol=1e-12)
    assert torch.equal(key[1].num_batches_tracked, bn_q.num_batches_tracked)

    key = make_key_encoder(small_encoder(1))
    old_var = key[1].running_var.clone()
    ema_update_(key, query, 0.9, buffers="keep")
    assert torch.equal(key[1].running_var, old_var)


def test_ema_survives_module_conversion():
    query = small_encoder(0, torch.float32)
    key = make_key_encoder(small_encoder(1, torch.float32))
    ema_update_(key, query, 0.5)
    key.double()
    query.double()  # parameters keep their identity; buffers are rebound
    query(torch.randn(4, 5, dtype=torch.float64))
    before = [p.clone() for p in key.parameters()]
    ema_update_(key, query, 0.5)
    for b, k, q in zip(before, key.parameters(), query.parameters()):
        assert k.dtype == torch.float64
        assert torch.allclose(k, 0.5 * b + 0.5 * q.detach(), atol=1e-12)
    assert torch.equal(key[1].running_mean, query[1].running_mean)


def test_ema_rejects_mismatched_modules_and_bad_momentum():
    query = small_encoder(0)
    with pytest.raises(QueueInputError, match="different parameters"):
        ema_update_(make_key_encoder(nn.Linear(5, 7).double()), query, 0.9)
    with pytest.raises(QueueInputError, match="requires grad"):
        ema_update_(small_encoder(1), query, 0.9)
    with pytest.raises(ConfigError, match="momentum.momentum"):
        ema_update_(make_key_encoder(query), query, 1.5)


def test_no_gradient_reaches_the_key_encoder():
    query = small_encoder(0, torch.float32)
    key = make_key_encoder(query)
    x = torch.randn(6, 5)
    q = F.normalize(query(x), dim=1)
    k = F.normalize(key(x), dim=1)
    queue = F.normalize(torch.rand(3, 10), dim=0)
    loss = unified_objective(q @ q.t(), q, q, k, k, queue, queue).total
    loss.backward()
    assert all(p.grad is None for p in key.parameters())
    assert all(p.grad is not None for p in query.parameters())
    assert not k.requires_grad


# -- cosine momentum schedule ---------------------------------------------------------------------
def test_cosine_momentum_schedule():
    base, final, total = 0.9995, 1.0, 1000
    assert cosine_momentum(0, total, base, final) == pytest.approx(base, abs=1e-15)
    assert cosine_momentum(total, total, base, final) == pytest.approx(final, abs=1e-15)
    assert cosine_momentum(total // 2, total, base, final) == pytest.approx((base + final) / 2, abs=1e-15)
    assert cosine_momentum(250, total, 0.0, 1.0) == pytest.approx(0.5 - 0.5 * math.cos(math.pi / 4))
    values = [cosine_momentum(s, total, base, final) for s in range(total + 1)]
    assert all(a <= b for a, b in zip(values, values[1:]))
    assert cosine_momentum(-5, total) == cosine_momentum(0, total)
    assert cosine_momentum(total + 5, total) == cosine_momentum(total, total)
    with pytest.raises(ConfigError, match="total_steps"):
        cosine_momentum(0, 0)


# -- queue ----------------------------------------------------------------------------------------
def test_queue_initial_state_and_buffers():
    queue = MomentumQueue(8, 20, generator=torch.Generator().manual_seed(0))
    assert queue.keys.shape == (8, 20)
    assert torch.allclose(queue.keys.norm(dim=0), torch.ones(20), atol=1e-6)
    assert (queue.keys >= 0).all()
    assert (queue.ids == -1).all() and queue.ids.dtype == torch.long
    assert int(queue.ptr) == 0 and queue.ptr.dtype == torch.long
    assert not queue.filled.any()
    assert set(queue.state_dict()) == {"keys", "ids", "ptr", "written_at", "num_enqueued"}
    with pytest.raises(ConfigError, match="momentum.queue_size"):
        MomentumQueue(8, 0)


def key_block(start: int, n: int, dim: int) -> torch.Tensor:
    """Keys whose first coordinate is their global sequence number (identifies them)."""
    keys = torch.zeros(n, dim)
    keys[:, 0] = torch.arange(start, start + n, dtype=torch.float32)
    keys[:, 1] = 0.5
    return keys


@settings(max_examples=60, deadline=None)
@given(size=st.integers(1, 9), batches=st.lists(st.integers(0, 20), min_size=1, max_size=8))
def test_queue_fifo_invariants(size, batches):
    dim = 3
    queue = MomentumQueue(dim, size)
    pushed: list[int] = []        # sequence numbers, in push order
    pushed_call: list[int] = []   # enqueue call of each pushed key
    for call, batch in enumerate(batches):
        keys = key_block(len(pushed), batch, dim)
        ids = 1000 + torch.arange(len(pushed), len(pushed) + batch)
        queue.enqueue(keys, ids)
        pushed += list(range(len(pushed), len(pushed) + batch))
        pushed_call += [call] * batch
        total = len(pushed)
        assert int(queue.ptr) == total % size
        assert int(queue.num_enqueued) == call + 1
        ordered_keys, ordered_ids = queue.ordered()
        kept = min(total, size)
        assert int(queue.filled.sum()) == kept
        newest = pushed[total - kept:]
        # The last K keys, oldest first, fill the newest `kept` positions of the ordered view.
        assert ordered_keys[0, size - kept:].long().tolist() == newest
        assert ordered_ids[size - kept:].tolist() == [1000 + s for s in newest]
        assert (ordered_ids[:size - kept] == -1).all()
        # Ids travel with keys, slot by slot.
        filled = queue.filled
        assert (queue.ids[filled] == 1000 + queue.keys[0, filled].long()).all()
        # Age: enqueue calls since each surviving key was written.
        order = [(int(queue.ptr) + i) % size for i in range(size)]
        ages = queue.age()
        for pos, seq in zip(order[size - kept:], newest):
            assert int(ages[pos]) == (call + 1) - pushed_call[seq]


@pytest.mark.parametrize("size,batch", [(8, 3), (5, 5), (4, 11), (7, 1), (7, 2)])
def test_queue_wraps_for_batches_not_dividing_size(size, batch):
    queue = MomentumQueue(2, size)
    total = 0
    for _ in range(5):
        queue.enqueue(key_block(total, batch, 2), torch.arange(total, total + batch))
        total += batch
    # Slot j holds the newest key whose sequence number is j mod size.
    for slot in range(size):
        seqs = [s for s in range(total) if s % size == slot]
        if not seqs:  # never reached: still the initial state
            assert int(queue.ids[slot]) == -1 and int(queue.written_at[slot]) == -1
            continue
        assert int(queue.ids[slot]) == max(seqs)
        assert int(queue.keys[0, slot]) == max(seqs)


@settings(max_examples=40, deadline=None)
@given(size=st.integers(1, 12), n_ids=st.integers(1, 4), query_ids=st.lists(st.integers(0, 5), min_size=1, max_size=6),
       pushes=st.integers(0, 15), include_unfilled=st.booleans())
def test_negatives_mask_excludes_exactly_same_image_keys(size, n_ids, query_ids, pushes, include_unfilled):
    queue = MomentumQueue(2, size, include_unfilled=include_unfilled)
    ids = torch.arange(pushes) % n_ids
    queue.enqueue(torch.randn(pushes, 2), ids)
    q = torch.tensor(query_ids)
    mask = queue.negatives_mask(q)
    plain = queue.negatives_mask(q, same_image=False)
    assert mask.shape == (len(query_ids), size) and mask.dtype == torch.bool
    for b, qid in enumerate(query_ids):
        for k in range(size):
            filled = int(queue.written_at[k]) >= 0
            usable = filled or include_unfilled
            assert bool(plain[b, k]) == usable
            assert bool(mask[b, k]) == (usable and int(queue.ids[k]) != qid)


def test_queue_state_dict_round_trip():
    queue = MomentumQueue(4, 10, generator=torch.Generator().manual_seed(0))
    for start in (0, 7, 14):
        queue.enqueue(torch.randn(7, 4), torch.arange(start, start + 7))
    restored = MomentumQueue(4, 10, generator=torch.Generator().manual_seed(99))
    assert not torch.equal(restored.keys, queue.keys)
    restored.load_state_dict(queue.state_dict())
    for name in ("keys", "ids", "ptr", "written_at", "num_enqueued"):
        assert torch.equal(getattr(restored, name), getattr(queue, name)), name
    batch = torch.randn(3, 4)
    queue.enqueue(batch, torch.tensor([1, 2, 3]))
    restored.enqueue(batch, torch.tensor([1, 2, 3]))
    assert torch.equal(restored.keys, queue.keys) and torch.equal(restored.ids, queue.ids)


def test_enqueue_is_detached_and_checks_shapes():
    queue = MomentumQueue(4, 6)
    keys = torch.randn(3, 4, requires_grad=True)
    queue.enqueue(keys * 2, torch.arange(3))
    assert not queue.keys.requires_grad and queue.keys.grad_fn is None
    assert torch.allclose(queue.keys[:, :3], (keys * 2).detach().t())
    with pytest.raises(QueueInputError, match=r"keys must be \(B, 4\)"):
        queue.enqueue(torch.randn(3, 5), torch.arange(3))
    with pytest.raises(QueueInputError, match="ids must be"):
        queue.enqueue(torch.randn(3, 4), torch.arange(2))
    with pytest.raises(QueueInputError, match="integers"):
        queue.enqueue(torch.randn(3, 4), torch.zeros(3))


def test_backward_after_enqueue_still_works():
    """The loss copies the queue, so the caller may enqueue before calling backward."""
    queue_v, queue_t = MomentumQueue(4, 8), MomentumQueue(4, 8)
    v = F.normalize(torch.randn(3, 4), dim=1).requires_grad_(True)
    t = F.normalize(torch.randn(3, 4), dim=1).requires_grad_(True)
    loss = unified_objective(v @ t.t(), v, t, v.detach(), t.detach(), queue_v.keys, queue_t.keys,
                             queue_mask=(queue_t.negatives_mask(torch.arange(3)),
                                         queue_v.negatives_mask(torch.arange(3))))
    queue_v.enqueue(v.detach(), torch.arange(3))
    queue_t.enqueue(t.detach(), torch.arange(3))
    loss.total.backward()
    assert torch.isfinite(v.grad).all()


def test_concat_all_gather_without_process_group_is_identity():
    x = torch.randn(3, 2, requires_grad=True)
    out = concat_all_gather(x)
    assert torch.equal(out, x.detach()) and not out.requires_grad


# -- distributed: two gloo processes ----------------------------------------------------------
DDP_B, DDP_K, DDP_E, DDP_STEPS = 3, 16, 4, 4


def _ddp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        queue = MomentumQueue(DDP_E, DDP_K, generator=torch.Generator().manual_seed(0))
        ptrs = []
        for step in range(DDP_STEPS):
            n = DDP_B + (rank if step == DDP_STEPS - 1 else 0)  # last step: ranks differ in size
            ids = 1000 * (rank + 1) + 10 * step + torch.arange(n)
            keys = ids.float().unsqueeze(1).repeat(1, DDP_E)
            queue.enqueue(keys, ids)
            ptrs.append(int(queue.ptr))
        torch.save({"state": queue.state_dict(), "ptrs": ptrs}, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ddp_enqueue_gathers_from_all_ranks(tmp_path):
    import torch.distributed as dist
    import torch.multiprocessing as mp
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    start = time.perf_counter()
    world = 2
    mp.spawn(_ddp_worker, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    for name, value in results[0]["state"].items():
        assert torch.equal(value, results[1]["state"][name]), name
    # world·B keys per step; the last step brings B + (B + 1).
    per_step = [world * DDP_B] * (DDP_STEPS - 1) + [2 * DDP_B + 1]
    totals = [sum(per_step[:i + 1]) for i in range(DDP_STEPS)]
    assert results[0]["ptrs"] == [t % DDP_K for t in totals]
    # The newest keys, oldest first: step by step, rank 0's batch then rank 1's.
    expected = []
    for step in range(DDP_STEPS):
        for rank in range(world):
            n = DDP_B + (rank if step == DDP_STEPS - 1 else 0)
            expected += [1000 * (rank + 1) + 10 * step + i for i in range(n)]
    queue = MomentumQueue(DDP_E, DDP_K)
    queue.load_state_dict(results[0]["state"])
    keys, ids = queue.ordered()
    assert ids.tolist() == expected[-DDP_K:]
    assert keys[0].long().tolist() == expected[-DDP_K:]
    assert time.perf_counter() - start < 60

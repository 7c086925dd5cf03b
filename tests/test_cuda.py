"""The CUDA path of the tiers: a hot pool on the GPU, the side copy stream and its events, pinned
warm memory. Every test is marked ``cuda`` and skipped without a GPU; ``python -m
tierstore.tools.gpu_check`` runs them and then measures transfer rates and overlap."""

from __future__ import annotations


import pytest
import torch

import tierstore
from tierstore.layout import KVLayout
from tierstore.tiers.warm import WarmPool, pinning_available

from support import key_of, random_kv, tiny

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

LAYOUT = KVLayout(num_layers=2, kv_heads=3, head_dim=64, block_tokens=64, dtype=torch.float16)
ONE = KVLayout(num_layers=1, kv_heads=3, head_dim=64, block_tokens=64, dtype=torch.float16)


def busy(stream: torch.cuda.Stream, ms: float = 50.0) -> None:
    """Queue about ``ms`` milliseconds of work on ``stream`` (returns at once)."""
    with torch.cuda.stream(stream):
        torch.cuda._sleep(int(ms * 1e6 * _cycles_per_ns()))


_CPN: float | None = None


def _cycles_per_ns() -> float:
    global _CPN
    if _CPN is None:   # GPU clock: cycles per nanosecond, measured once
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        torch.cuda._sleep(10_000_000)
        e.record()
        torch.cuda.synchronize()
        _CPN = 10_000_000 / (s.elapsed_time(e) * 1e6)
    return _CPN


def write_and_adopt(store, layout: KVLayout, nblocks: int, tag: str, gen: torch.Generator):
    """Write ``nblocks`` blocks per layer through a CUDA sequence, then return a fresh sequence
    that knows them only as durable in cold, and the reference K/V (on the GPU)."""
    m = store.manager
    bt = layout.block_tokens
    ref = [(k.to("cuda"), v.to("cuda")) for k, v in random_kv(layout, nblocks * bt, gen)]
    w = m.open_sequence(f"{tag}-w", layout, "cuda")
    for i in range(nblocks):
        for layer, (k, v) in enumerate(ref):
            m.append(w, layer, k[:, i * bt:(i + 1) * bt], v[:, i * bt:(i + 1) * bt])
        m.set_keys(w, {i: [key_of(tag, i, layer) for layer in range(layout.num_layers)]})
    m.flush(w)
    m.close_sequence(w)
    r = m.open_sequence(f"{tag}-r", layout, "cuda")
    for layer in range(layout.num_layers):
        for i in range(nblocks):
            m.adopt(r, layer, i, bt, key_of(tag, i, layer), None)
    return r, ref


def test_pools_on_cuda_and_pinned_warm(tmp_path):
    assert pinning_available()
    w = WarmPool(ONE, 4)
    assert w.pinned and w.k.is_pinned() and w.v.is_pinned()
    with tierstore.open(tmp_path / "s", hot=8 * ONE.block_bytes, warm=8 * ONE.block_bytes) as store:
        seq = store.manager.open_sequence("a", ONE, "cuda")
        assert seq.hot.is_cuda and seq.hot.k.is_cuda and isinstance(seq.hot.copy_stream, torch.cuda.Stream)
        assert seq.hot.copy_stream != torch.cuda.current_stream()
        assert seq.warm.k.is_pinned() and seq.warm.k.device.type == "cpu"
        assert seq.hot.k.nbytes + seq.hot.v.nbytes <= store.config.hot_bytes


def test_copy_in_between_pinned_host_and_device_needs_no_device_temporaries():
    from tierstore.tiers.hot import HotPool
    w, h = WarmPool(ONE, 3), HotPool(ONE, 3, "cuda")
    w.k.copy_(torch.randn(w.k.shape).to(torch.float16))
    w.v.copy_(torch.randn(w.v.shape).to(torch.float16))
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with torch.cuda.stream(h.copy_stream):
        h.copy_in(2, w, 1, non_blocking=True)           # H2D, async from pinned memory
    h.copy_stream.synchronize()
    back = WarmPool(ONE, 3)
    back.copy_in(0, h, 2, non_blocking=True)            # D2H into pinned memory
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() == base
    assert torch.equal(back.k[:, 0], w.k[:, 1]) and torch.equal(back.v[:, 0], w.v[:, 1])


def test_append_demote_promote_round_trip(tmp_path):
    gen = torch.Generator().manual_seed(0)
    with tierstore.open(tmp_path / "s", hot=6 * LAYOUT.block_bytes, warm=4 * LAYOUT.block_bytes) as store:
        m = store.manager
        seq = m.open_sequence("a", LAYOUT, "cuda")
        bt = LAYOUT.block_tokens
        n = 12
        ref = [(torch.randn(LAYOUT.kv_heads, n * bt + 5, LAYOUT.head_dim, generator=gen).to("cuda", torch.float16),
                torch.randn(LAYOUT.kv_heads, n * bt + 5, LAYOUT.head_dim, generator=gen).to("cuda", torch.float16))
               for _ in range(2)]
        for t in range(0, n * bt + 5, 40):                     # chunks that straddle blocks
            for layer, (k, v) in enumerate(ref):
                m.append(seq, layer, k[:, t:t + 40], v[:, t:t + 40])
            full = min(t + 40, n * bt + 5) // bt
            m.set_keys(seq, {i: [key_of("a", i, layer) for layer in range(2)] for i in range(full)})
        m.flush(seq)
        s = store.stats()
        assert s.demotions.get("hot", 0) > 0 and s.hot_used_bytes <= store.config.hot_bytes
        for layer in range(2):
            for i in range(n + 1):
                with m.acquire(seq, layer, [i], transient=True) as (b,):
                    k, v = m.hot_view(b)
                    assert k.is_cuda
                    sl = slice(i * bt, i * bt + b.ntok)
                    assert torch.equal(k, ref[layer][0][:, sl]) and torch.equal(v, ref[layer][1][:, sl])
        assert store.stats().promotions.get("cold", 0) > 0


def test_acquire_waits_for_the_copy_under_a_busy_compute_stream(tmp_path):
    gen = torch.Generator().manual_seed(1)
    with tierstore.open(tmp_path / "s", hot=40 * ONE.block_bytes, warm=40 * ONE.block_bytes) as store:
        m = store.manager
        seq, ref = write_and_adopt(store, ONE, 16, "b", gen)
        compute = torch.cuda.current_stream()
        k_ref, v_ref = ref[0]
        bt = ONE.block_tokens
        m.prefetch(seq, 0, range(8))                           # copies on the side stream, in flight
        busy(compute, 30)                                      # the compute stream is far behind
        outs = []
        for i in range(16):                                    # 8 prefetched, 8 fetched on demand
            with m.acquire(seq, 0, [i]) as (b,):
                k, v = m.hot_view(b)
                outs.append((k.clone(), v.clone()))             # ordered on the compute stream
        torch.cuda.synchronize()
        for i, (k, v) in enumerate(outs):
            assert torch.equal(k, k_ref[:, i * bt:(i + 1) * bt]) and torch.equal(v, v_ref[:, i * bt:(i + 1) * bt]), i


def test_a_reused_hot_slot_is_not_overwritten_under_queued_readers(tmp_path):
    """A transient block's slot is reused for the next block while a kernel that reads it is still
    queued on the busy compute stream: the copy in must wait for that kernel."""
    gen = torch.Generator().manual_seed(2)
    with tierstore.open(tmp_path / "s", hot=2 * ONE.block_bytes, warm=8 * ONE.block_bytes) as store:
        m = store.manager
        seq, ref = write_and_adopt(store, ONE, 6, "c", gen)
        k_ref = ref[0][0]
        bt = ONE.block_tokens
        compute = torch.cuda.current_stream()
        sums = []
        for i in range(6):                                     # 2 hot slots: every block reuses a slot
            with m.acquire(seq, 0, [i], transient=True) as (b,):
                busy(compute, 20)
                sums.append(m.hot_view(b)[0].float().sum())    # queued behind the busy kernel
        torch.cuda.synchronize()
        want = torch.stack([k_ref[:, i * bt:(i + 1) * bt].float().sum() for i in range(6)])
        assert torch.allclose(torch.stack(sums), want, rtol=1e-4, atol=1e-2), (sums, want)   # another block: far off


def test_device_memory_is_bounded_by_the_hot_pool(tmp_path):
    gen = torch.Generator().manual_seed(3)
    torch.cuda.synchronize()
    with tierstore.open(tmp_path / "s", hot=8 * ONE.block_bytes, warm=8 * ONE.block_bytes) as store:
        m = store.manager
        seq, ref = write_and_adopt(store, ONE, 24, "d", gen)
        del ref
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        for i in range(24):
            with m.acquire(seq, 0, [i], transient=True) as (b,):
                m.hot_view(b)                                  # views: no device allocation
        torch.cuda.synchronize()
        assert torch.cuda.max_memory_allocated() - base == 0
        assert store.stats().hot_used_bytes <= store.config.hot_bytes


def test_sparse_decode_on_cuda(tmp_path):
    """Sparse attention with the hot pool on the GPU (summaries and scores in host memory): at a
    budget >= the context it reproduces DynamicCache; under a small budget with a small hot pool
    it recalls blocks and still generates."""
    from transformers import DynamicCache

    from tierstore.adapters.hf import TieredCache
    model = tiny().to("cuda")
    ids = torch.randint(1, 128, (1, 200), device="cuda")
    kw = dict(do_sample=False, max_new_tokens=12, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    ref = model.generate(ids, cache=DynamicCache(), **kw)
    bb = KVLayout(2, 2, 16, 8, torch.float32).block_bytes
    for policy in ("quest", "hybrid", "h2o"):
        with tierstore.open(tmp_path / policy, hot=bb * 64, warm=bb * 64, block_tokens=8) as st, \
                TieredCache(st, model, policy=policy, budget_tokens=10_000) as cache:
            out = model.generate(ids, cache=cache, **kw)
        assert torch.equal(out.sequences, ref.sequences)
        assert max((a - b).abs().max().item() for a, b in zip(out.scores, ref.scores)) < 1e-3
        with tierstore.open(tmp_path / f"{policy}-small", hot=bb * 16, warm=bb * 64, block_tokens=8) as st, \
                TieredCache(st, model, policy=policy, budget_tokens=32) as cache:
            out = model.generate(ids, cache=cache, **kw)
            assert out.sequences.shape[1] == ids.shape[1] + 12
            assert max(cache.attended.values()) <= 32
            assert st.stats().promotions.get("cold", 0) + st.stats().promotions.get("warm", 0) > 0

"""SeqReader: what attention sees of a sequence. Whatever the tier of each block (hot, warm read
in place, cold recalled in groups), a span or a selection holds the stored bits in position
order, and every pin is given back when the read ends."""

from __future__ import annotations

import pytest
import torch
from support import key_of, random_layer_kv, same_bits

from tierstore.layout import KVLayout
from tierstore.reader import SeqReader

LAY = KVLayout(num_layers=1, kv_heads=2, head_dim=4, block_tokens=4, dtype=torch.bfloat16)
BT, BB = LAY.block_tokens, LAY.block_bytes
N = 37  # 9 full blocks and a partial one


def _sequence(store, n: int = N, durable: bool = True):
    m = store.manager
    k, v = random_layer_kv(LAY, n, 3, kind="bits")
    seq = m.open_sequence("r", LAY, "cpu")
    m.append(seq, 0, k, v)
    if durable:
        m.set_keys(seq, {i: [key_of("r", i, 0)] for i in range(n // BT)})
        m.flush(seq)
    return m, seq, k, v


def _no_pins(seq) -> bool:
    return all(b.pins == 0 for layer in seq.layers for b in layer)


def _cold_only(store, n: int):
    """A sequence of ``n`` full blocks whose blocks are only in cold (as after a resume)."""
    m, writer, k, v = _sequence(store, n * BT)
    m.close_sequence(writer)
    seq = m.open_sequence("reader", LAY, "cpu")
    for i in range(n):
        m.adopt(seq, 0, i, BT, key_of("r", i, 0), None)
    return m, seq, k, v


@pytest.mark.parametrize("where", ["hot", "warm", "cold"])
def test_span_holds_the_stored_bits_in_position_order(store_factory, where):
    hot_blocks = {"hot": 64, "warm": 4, "cold": 5}[where]
    st = store_factory(hot=hot_blocks * BB, warm=8 * BB, block_tokens=BT, codec="raw")
    m, seq, k, v = _cold_only(st, 10) if where == "cold" else _sequence(st)
    n = 10 * BT if where == "cold" else N
    r = SeqReader(m, seq)
    assert r.length(0) == n and r.n_blocks(0) == 10
    for start, stop in [(0, 10), (2, 7), (9, 10), (0, 1)]:
        with r.span(0, start, stop) as (sk, sv):
            lo, hi = start * BT, min(n, stop * BT)
            assert same_bits(sk, k[:, lo:hi]) and same_bits(sv, v[:, lo:hi])
        assert _no_pins(seq)
    c = st.manager.counters
    assert {"hot": c.warm_in_place == 0, "warm": c.warm_in_place > 0,
            "cold": c.promotions.get("cold", 0) >= 10}[where]


def test_a_span_in_one_run_is_a_view_of_the_pool(store_factory):
    st = store_factory(hot=64 * BB, warm=4 * BB, block_tokens=BT)
    m, seq, _, _ = _sequence(st, durable=False)
    r = SeqReader(m, seq)
    pool = seq.hot
    lo, hi = pool.kv.data_ptr(), pool.kv.data_ptr() + pool.kv.numel() * pool.kv.element_size()
    with r.span(0, 0, 10) as (sk, _):
        assert lo <= sk.data_ptr() < hi  # no copy: the blocks sit in consecutive slots


def test_select_gathers_in_block_order_with_positions_and_valid_tokens(store_factory):
    st = store_factory(hot=4 * BB, warm=16 * BB, block_tokens=BT)
    m, seq, k, v = _sequence(st, durable=False)
    r = SeqReader(m, seq)
    ids = [0, 3, 4, 9]  # blocks in hot and warm; 9 is the partial tail (1 token)
    assert {b.hot is not None for b in (seq.layers[0][i] for i in ids)} == {True, False}
    with r.acquire(0, ids) as got:
        sk, sv, pos, valid = r.select(got, torch.device("cpu"))
    want = torch.cat([torch.arange(i * BT, (i + 1) * BT) for i in ids])
    assert torch.equal(pos, want)
    assert valid is not None and int(valid.sum()) == 3 * BT + 1
    real = pos[valid]
    assert same_bits(sk[:, valid], k[:, real]) and same_bits(sv[:, valid], v[:, real])
    assert _no_pins(seq)


def test_interleaved_layers_keep_each_piece_in_one_run(store_factory, monkeypatch):
    """Layers appended in turn (as a forward does) still place each attention piece of each
    layer in one run of slots, in hot and, once demoted, in warm: pieces are read as views."""
    from tierstore import attention
    from tierstore.reader import _runs
    monkeypatch.setattr(attention, "SEGMENT_TOKENS", 4 * BT)  # 4 blocks a piece
    monkeypatch.setattr("tierstore.placement.SEGMENT_TOKENS", 4 * BT)
    lay = KVLayout(num_layers=3, kv_heads=2, head_dim=4, block_tokens=BT, dtype=torch.float32)
    st = store_factory(hot=64 * lay.block_bytes, warm=64 * lay.block_bytes, block_tokens=BT)
    m = st.manager
    seq = m.open_sequence("i", lay, "cpu")
    kv = [random_layer_kv(lay, 16 * BT, layer) for layer in range(3)]
    for t in range(0, 16 * BT, BT):          # one block per layer at a time
        for layer in range(3):
            m.append(seq, layer, kv[layer][0][:, t:t + BT], kv[layer][1][:, t:t + BT])
    for layer in range(3):
        blocks = seq.layers[layer]
        assert all(len(_runs(blocks[p:p + 4])) == 1 for p in range(0, 16, 4)), [b.hot for b in blocks]
    with m.lock:
        m.placement.evict_hot(seq.hot, 24)   # demote: the oldest blocks of every layer go to warm
    for layer in range(3):
        warm = [b for b in seq.layers[layer] if b.hot is None]
        assert warm and all(b.warm is not None for b in warm)
        for p in range(0, 16, 4):
            piece = [b for b in warm if p <= b.index < p + 4]
            if len(piece) == 4:
                assert len(_runs(piece)) == 1, [b.warm for b in piece]


def _in_pool(t: torch.Tensor, seq) -> bool:
    for pool in (seq.hot, seq.warm):
        lo = pool.kv.data_ptr()
        if lo <= t.data_ptr() < lo + pool.kv.numel() * pool.kv.element_size():
            return True
    return False


@pytest.mark.parametrize("where", ["hot", "mixed", "cold"])
def test_chunks_hold_the_stored_bits_and_scattered_ones_are_compacted_into_one_run(store_factory, where):
    """``chunks`` cuts by block count alone: each chunk holds the stored bits in position order
    whatever the residency. A complete chunk whose blocks were scattered over runs or pools is
    moved into one run after the read, so the next read of it is a view of a pool; the partial
    last chunk is copied. No pin outlives a read."""
    hot_blocks = {"hot": 64, "mixed": 4, "cold": 5}[where]
    st = store_factory(hot=hot_blocks * BB, warm=16 * BB, block_tokens=BT, codec="raw")
    m, seq, k, v = _cold_only(st, 10) if where == "cold" else _sequence(st)
    n = 10 * BT if where == "cold" else N
    r = SeqReader(m, seq)
    every = 3
    if where == "hot":  # scatter the hot blocks: swap the slots of blocks 1 and 7 (bits moved too)
        a, b = seq.layers[0][1], seq.layers[0][7]
        pool = seq.hot
        ka, va = [t.clone() for t in pool.block(a.hot)]
        pool.copy_in(a.hot, pool, b.hot)
        pool.block(b.hot)[0].copy_(ka), pool.block(b.hot)[1].copy_(va)
        for blk, slot in ((a, b.hot), (b, a.hot)):
            blk.hot = slot
            pool.owner[slot] = blk
    for read in range(2):
        with r.chunks(0, 0, 10, every) as got:
            assert [c[0].shape[1] for c in got] == [min(n, (i + every) * BT) - i * BT for i in range(0, 10, every)]
            assert same_bits(torch.cat([c[0] for c in got], 1), k[:, :n])
            assert same_bits(torch.cat([c[1] for c in got], 1), v[:, :n])
            views = [_in_pool(c[0], seq) and _in_pool(c[1], seq) for c in got]
        assert _no_pins(seq)
        if read == 1 and where != "cold":
            assert all(views[:-1]), views  # every complete chunk is one run now
    if where == "hot":
        assert st.manager.counters.compacted >= 2 * every  # the two chunks that held blocks 1 and 7
        assert all(b.hot is not None for b in seq.layers[0])  # compacted within hot: hot had room
    assert st.manager.counters.warm_in_place == 0 or where != "hot"


def test_a_pinned_block_is_never_compacted(store_factory):
    st = store_factory(hot=4 * BB, warm=16 * BB, block_tokens=BT, codec="raw")
    m, seq, _, _ = _sequence(st, durable=False)
    blocks = seq.layers[0]
    before = [(b.hot, b.warm) for b in blocks]
    with m.lock, m.placement.pinned(blocks[3:4]):
        assert not m.compact(seq, 0, range(0, 6))
    assert [(b.hot, b.warm) for b in blocks] == before
    assert not m.compact(seq, 0, range(6, 10))  # the last block is partial (not sealed)

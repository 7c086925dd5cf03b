"""Loader (``tierstore/loader.py``): damaged or missing cold blocks during a promotion name
session, layer and block and give their slots back; the background warm fill after a resume."""

from __future__ import annotations

import threading

import pytest
import torch

import tierstore
from tierstore.errors import CorruptBlockError, MissingBlockError
from tierstore.layout import KVLayout

from support import key_of, same_bits
from support.manager import BB, BT, check_bookkeeping, cold_only_sequence, corrupt, resumable, wait_idle

pytestmark = pytest.mark.store(hot=6 * BB, warm=4 * BB, codec="raw")    # the `store` fixture (conftest)


def test_corrupt_cold_block_during_promotion_names_session_layer_block(store):
    m = store.manager
    b, K, V = cold_only_sequence(store, torch.Generator().manual_seed(8))
    corrupt(store, key_of("w", 2, 1))
    with pytest.raises(CorruptBlockError) as ei:
        with m.acquire(b, 1, [1, 2]):
            pass
    e = ei.value
    assert (e.session, e.layer, e.block) == ("reader", 1, 2)
    assert "session 'reader', layer 1, block 2" in str(e)
    wait_idle(m)
    blk = b.layers[1][2]
    assert blk.hot is None and blk.warm is None and blk.durable and blk.pins == 0   # slots given back
    m.prefetch(b, 1, [2])                                     # a failing prefetch is reported on acquire
    wait_idle(m)
    with pytest.raises(CorruptBlockError, match="layer 1, block 2"):
        with m.acquire(b, 1, [2]):
            pass
    with m.acquire(b, 1, [1, 3]) as (x, y):                   # the rest still reads back
        assert same_bits(m.hot_view(x)[0], K[1][:, 4:8]) and same_bits(m.hot_view(y)[1], V[1][:, 12:16])
    check_bookkeeping(store)


def test_missing_cold_block_during_promotion(store):
    m = store.manager
    b, _, _ = cold_only_sequence(store, torch.Generator().manual_seed(9))
    store.cold.delete_many("blocks", [key_of("w", 0, 0)])
    with pytest.raises(MissingBlockError, match="session 'reader', layer 0, block 0"):
        with m.acquire(b, 0, [0]):
            pass
    check_bookkeeping(store)


def test_cold_blocks_of_one_acquire_are_read_together_bit_exact(store):
    m = store.manager
    b, K, V = cold_only_sequence(store, torch.Generator().manual_seed(10))
    before = m.counters.promotions["cold"]
    with m.acquire(b, 0, [0, 1, 2, 3]) as got:              # four cold blocks: one read, straight into hot
        assert [blk.index for blk in got] == [0, 1, 2, 3] and all(blk.hot is not None for blk in got)
        for i, blk in enumerate(got):
            k, v = m.hot_view(blk)
            assert same_bits(k, K[0][:, i * BT:(i + 1) * BT]) and same_bits(v, V[0][:, i * BT:(i + 1) * BT])
    assert m.counters.promotions["cold"] == before + 4
    check_bookkeeping(store)


def test_layer_ahead_prefetch_reads_the_next_layers_cold_blocks_into_hot(tmp_path):
    """Warm is read in place on a CPU pool, so the layer-ahead prefetch moves only blocks in no
    memory tier: straight into hot, making room there (here warm is full and could take none)."""
    st_, b, K, V = resumable(tmp_path, torch.Generator().manual_seed(23), nblocks=10, warm_blocks=4)
    m = st_.manager
    try:
        m.restore(b)
        m.wait_filled(30)
        cold = [blk.index for blk in b.layers[1] if blk.hot is None and blk.warm is None]
        assert cold, "the fixture leaves some of layer 1 in cold only"
        m.prefetch_next(b, 1)
        wait_idle(m)
        fetched = [i for i in cold if b.layers[1][i].hot is not None]
        assert fetched == cold[:len(fetched)] and fetched                # in block order, as many as hot holds
        timely = m.counters.prefetch_timely
        with m.acquire(b, 1, fetched, in_place=True) as got:
            for blk in got:
                k, v = m.view(blk)
                i = blk.index
                assert same_bits(k, K[1][:, i * BT:(i + 1) * BT]) and same_bits(v, V[1][:, i * BT:(i + 1) * BT])
        assert m.counters.prefetch_timely == timely + len(fetched)       # found where the prefetch put them
        check_bookkeeping(st_)
    finally:
        st_.close()


def test_restore_fills_warm_in_the_background_bit_exact(tmp_path):
    st_, b, K, V = resumable(tmp_path, torch.Generator().manual_seed(21))
    m = st_.manager
    try:
        hot = m.restore(b)
        m.wait_filled(30)
        assert hot == 2  # one block per layer fits hot; the other 18 were filled into warm
        assert m.counters.warm_filled == 18
        cold = m.counters.promotions["cold"]
        for layer in range(2):
            for blk in b.layers[layer]:
                assert blk.hot is not None or blk.warm is not None
            with m.acquire(b, layer, list(range(10)), in_place=True) as got:
                for i, blk in enumerate(got):
                    k, v = m.view(blk)
                    assert same_bits(k, K[layer][:, i * BT:(i + 1) * BT]) and same_bits(v, V[layer][:, i * BT:(i + 1) * BT])
        assert m.counters.promotions["cold"] == cold  # nothing read from cold any more
        check_bookkeeping(st_)
    finally:
        st_.close()


@pytest.mark.parametrize("codec", ["raw", "zstd"])
def test_warm_fill_leaves_a_corrupt_block_in_cold_and_its_read_names_it(tmp_path, codec):
    """zstd: the damaged block splits the layer's run of adjacent warm slots, which are decoded
    together; the blocks on either side of it read back bit for bit."""
    st_, b, K, V = resumable(tmp_path, torch.Generator().manual_seed(22), codec=codec)
    m = st_.manager
    try:
        corrupt(st_, key_of("w", 3, 1))
        m.restore(b)
        m.wait_filled(30)
        blk = b.layers[1][3]
        assert blk.warm is None and blk.hot is None and blk.pins == 0 and blk.loading is None
        assert all(x.warm is not None for i, x in enumerate(b.layers[1]) if i not in (3,) and x.hot is None)
        others = [i for i in range(10) if i != 3]
        with m.acquire(b, 1, others, in_place=True) as got:
            for i, x in zip(others, got):
                k, v = m.view(x)
                assert same_bits(k, K[1][:, i * BT:(i + 1) * BT]) and same_bits(v, V[1][:, i * BT:(i + 1) * BT]), i
        with pytest.raises(CorruptBlockError, match="session 'reader', layer 1, block 3"):
            with m.acquire(b, 1, [3], in_place=True):
                pass
        with m.acquire(b, 0, [3], in_place=True) as (x,):  # the same block of another layer reads back
            assert same_bits(m.view(x)[0], K[0][:, 12:16])
        check_bookkeeping(st_)
    finally:
        st_.close()


def test_closing_a_sequence_while_its_warm_fill_runs(tmp_path):
    st_, b, _, _ = resumable(tmp_path, torch.Generator().manual_seed(23), nblocks=40, warm_blocks=256)
    m = st_.manager
    try:
        m.restore(b)
        m.close_sequence(b, flush=False)
        m.wait_filled(30)
        assert m.usage()["hot_blocks"] == 0 and m.usage()["warm_blocks"] == 0
        check_bookkeeping(st_)
    finally:
        st_.close()


def test_exact_attention_right_after_a_resume_reads_filled_blocks_in_place(tmp_path):
    """Blocks still being filled into warm when exact attention streams them are waited for and
    read where they land: never copied up to hot; the output is dense attention's."""
    from tierstore.attention import attend_exact
    from tierstore.reader import SeqReader
    lay = KVLayout(num_layers=2, kv_heads=2, head_dim=8, block_tokens=4, dtype=torch.float32)
    n = 40 * lay.block_tokens
    torch.manual_seed(5)
    K = [torch.randn(2, n, 8) for _ in range(2)]
    V = [torch.randn(2, n, 8) for _ in range(2)]
    with tierstore.open(tmp_path / "s", hot=6 * lay.block_bytes, warm=128 * lay.block_bytes, codec="raw") as st_:
        m = st_.manager
        a = m.open_sequence("writer", lay, "cpu")
        for layer in range(2):
            m.append(a, layer, K[layer], V[layer])
        m.set_keys(a, {i: [key_of("x", i, layer) for layer in range(2)] for i in range(40)})
        m.flush(a)
        m.close_sequence(a)
        b = m.open_sequence("reader", lay, "cpu")
        for layer in range(2):
            for i in range(40):
                m.adopt(b, layer, i, 4, key_of("x", i, layer), None)
        m.restore(b)
        m.wait_filled(30)
        # a load into warm still in flight when attention starts (as a fill task is while it
        # reads its layer): the block is marked loading until a timer completes it
        from concurrent.futures import Future
        late = [blk for blk in b.layers[0] if blk.warm is not None][:3]
        fut: Future = Future()
        with m.lock:
            for blk in late:
                blk.loading, blk.pins = fut, blk.pins + 1

        def land():
            with m.shared.cv:
                for blk in late:
                    blk.loading, blk.pins = None, blk.pins - 1
                m.shared.cv.notify_all()
            fut.set_result(None)
        timer = threading.Timer(0.3, land)
        timer.start()
        q = torch.randn(4, 1, 8)
        try:
            for layer in range(2):
                out = attend_exact(SeqReader(m, b), layer, q, n, None, 0.3)
                ref = torch.softmax(q.reshape(2, 2, 8) @ K[layer].transpose(1, 2) * 0.3, -1) @ V[layer]
                assert torch.allclose(out.reshape(2, 2, 8), ref, atol=1e-5)
        finally:
            timer.join()
        assert fut.done()
        assert m.counters.promotions.get("warm", 0) == 0 and all(blk.hot is None for blk in late)
        check_bookkeeping(st_)


# -- parallel restore of compressed sessions ------------------------------------------------------

def _zstd_resumable(tmp_path, monkeypatch, dtype, nblocks, threads=3):
    """A zstd session of 2 layers x ``nblocks`` blocks (arbitrary bits: NaN, inf, -0.0) in cold
    only, and a reader sequence adopting it, in a store whose loader decodes on ``threads``
    threads (the caller's and ``threads - 1`` decoders), whatever this machine's core count."""
    import tierstore.loader
    from support.kv import random_layer_kv
    monkeypatch.setattr(tierstore.loader, "_cores", lambda: threads)
    lay = KVLayout(num_layers=2, kv_heads=2, head_dim=8, block_tokens=4, dtype=dtype)
    gen = torch.Generator().manual_seed(40)
    kv = [random_layer_kv(lay, nblocks * lay.block_tokens, gen, kind="bits") for _ in range(2)]
    st_ = tierstore.open(tmp_path / "z", hot=(2 * nblocks + 16) * lay.block_bytes,
                         warm=16 * lay.block_bytes, codec="zstd")
    m = st_.manager
    a = m.open_sequence("writer", lay, "cpu")
    for layer in range(2):
        m.append(a, layer, *kv[layer])
    m.set_keys(a, {i: [key_of("z", i, layer) for layer in range(2)] for i in range(nblocks)})
    m.flush(a)
    m.close_sequence(a)
    b = m.open_sequence("reader", lay, "cpu")
    for layer in range(2):
        for i in range(nblocks):
            m.adopt(b, layer, i, lay.block_tokens, key_of("z", i, layer), None)
    return st_, b, kv


def _decoders() -> set:
    return {t for t in threading.enumerate() if t.name.startswith("tierstore-decode")}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_parallel_zstd_restore_is_bit_exact_vs_serial_decode(tmp_path, monkeypatch, dtype):
    from tierstore.codec import decode_block
    from tierstore.loader import RESTORE_CHUNK
    nblocks = 3 * RESTORE_CHUNK + 5                   # 2 layers: 7 chunks for 3 threads
    before = _decoders()
    st_, b, kv = _zstd_resumable(tmp_path, monkeypatch, dtype, nblocks)
    m = st_.manager
    try:
        assert m.restore(b) == 2 * nblocks
        started = _decoders() - before
        assert 1 <= len(started) <= 2                 # the helpers ran, never more than threads - 1
        for layer in range(2):
            K, V = kv[layer]
            for i, blk in enumerate(b.layers[layer]):
                assert blk.hot is not None and blk.pins == 0
                k, v = m.view(blk)
                sk, sv = decode_block(blk.key, st_.cold.get("blocks", blk.key))   # the serial decode
                t = slice(i * 4, (i + 1) * 4)
                assert same_bits(k, sk) and same_bits(v, sv), (layer, i)
                assert same_bits(k, K[:, t]) and same_bits(v, V[:, t]), (layer, i)
        m.close_sequence(b)
        b2 = m.open_sequence("again", b.layout, "cpu")
        for layer in range(2):
            for i in range(nblocks):
                m.adopt(b2, layer, i, 4, key_of("z", i, layer), None)
        assert m.restore(b2) == 2 * nblocks
        assert len(_decoders() - before) <= 2         # a second restore reuses the same threads
        check_bookkeeping(st_)
    finally:
        st_.close()
    assert not (_decoders() - before)                 # close() ended them


def test_a_damaged_zstd_block_in_a_parallel_restore_names_it_and_gives_the_slots_back(tmp_path, monkeypatch):
    """Two damaged blocks in different chunks: the restore raises the typed error of the first
    in restore order (layer by layer, block by block), as a serial read would, after every
    thread stopped; no slot stays taken and the intact blocks read back afterwards."""
    from tierstore.codec import HEADER_SIZE
    from tierstore.loader import RESTORE_CHUNK
    nblocks = 2 * RESTORE_CHUNK + 8
    st_, b, kv = _zstd_resumable(tmp_path, monkeypatch, torch.float32, nblocks)
    m = st_.manager
    try:
        first, second = nblocks - 5, nblocks - 1      # layer 1: in the last chunks
        corrupt(st_, key_of("z", first, 1), at=HEADER_SIZE + 30)      # a byte of a frame
        corrupt(st_, key_of("z", second, 1), at=7)                    # the level byte
        with pytest.raises(CorruptBlockError) as ei:
            m.restore(b)
        e = ei.value
        assert (e.session, e.layer, e.block) == ("reader", 1, first)
        assert f"session 'reader', layer 1, block {first}" in str(e) and "checksum" in str(e)
        assert all(blk.hot is None and blk.pins == 0 and blk.loading is None for layer in b.layers for blk in layer)
        check_bookkeeping(st_)
        with m.acquire(b, 0, [3], in_place=True) as (x,):
            assert same_bits(m.view(x)[0], kv[0][0][:, 12:16])
        with pytest.raises(CorruptBlockError, match=f"layer 1, block {second}"):
            with m.acquire(b, 1, [second], in_place=True):
                pass
    finally:
        st_.close()


def test_a_restore_on_one_core_decodes_on_the_callers_thread_only(tmp_path, monkeypatch):
    before = _decoders()
    st_, b, kv = _zstd_resumable(tmp_path, monkeypatch, torch.bfloat16, 40, threads=1)
    try:
        assert st_.manager.restore(b) == 80
        assert not (_decoders() - before)
        assert same_bits(st_.manager.view(b.layers[1][39])[1], kv[1][1][:, 156:160])
    finally:
        st_.close()

"""Readers, prefetchers, a writer and the write-back thread at once on tiny budgets (no deadlock,
nothing lost, bit-exact)."""

from __future__ import annotations

import faulthandler
import random
import sys
import threading
import time

import pytest
import torch

import tierstore
from tierstore.codec import decode_block
from tierstore.layout import KVLayout

from support import key_of, same_bits
from support.manager import BB, all_blocks, check_bookkeeping, random_kv, wait_idle

pytestmark = pytest.mark.store(hot=6 * BB, warm=4 * BB, codec="raw")    # the `store` fixture (conftest)


CONC = KVLayout(num_layers=2, kv_heads=2, head_dim=8, block_tokens=4, dtype=torch.float32)


def _run_threads(targets, timeout: float) -> None:
    errors: list[BaseException] = []

    def wrap(fn):
        def run():
            try:
                fn()
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)
        return run

    threads = [threading.Thread(target=wrap(t), daemon=True, name=f"test-{i}") for i, t in enumerate(targets)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    alive = [t.name for t in threads if t.is_alive()]
    if alive:
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        raise AssertionError(f"deadlock: threads {alive} still running after {timeout}s (errors: {errors!r})")
    if errors:
        raise errors[0]


@pytest.mark.parametrize("codec", ["raw", "zstd"])
def test_concurrent_readers_prefetchers_writer_and_write_back(tmp_path, codec):
    bb = CONC.block_bytes
    bt = CONC.block_tokens
    rng = random.Random(11)
    gen = torch.Generator().manual_seed(11)
    with tierstore.open(tmp_path / "s", hot=14 * bb, warm=10 * bb, codec=codec) as st_:
        m = st_.manager
        # B: 24 blocks per layer already in cold (a resumed session); A: written while read
        b_k, b_v = zip(*[random_kv(gen, 24 * bt, CONC) for _ in range(2)])
        w = m.open_sequence("b-writer", CONC, "cpu")
        for t in range(0, 24 * bt, 8):
            for layer in range(2):
                m.append(w, layer, b_k[layer][:, t:t + 8], b_v[layer][:, t:t + 8])
            m.set_keys(w, {i: [key_of("B", i, layer) for layer in range(2)] for i in range((t + 8) // bt)})
        m.flush(w)
        m.close_sequence(w)
        B = m.open_sequence("b", CONC, "cpu")
        for layer in range(2):
            for i in range(24):
                m.adopt(B, layer, i, bt, key_of("B", i, layer), None)
        total_a = 150 * bt
        a_k, a_v = zip(*[random_kv(gen, total_a, CONC) for _ in range(2)])
        A = m.open_sequence("a", CONC, "cpu")
        sealed = [0]                     # blocks of A sealed in every layer (published by the writer)
        done = threading.Event()
        reads = [0]

        def writer():
            t = 0
            while t < total_a:
                n = min(rng.randint(1, 7), total_a - t)
                for layer in range(2):
                    m.append(A, layer, a_k[layer][:, t:t + n], a_v[layer][:, t:t + n])
                t += n
                full = t // bt
                m.set_keys(A, {i: [key_of("A", i, layer) for layer in range(2)] for i in range(sealed[0], full)})
                sealed[0] = full
                time.sleep(0.0005)
            done.set()

        def reader(seed):
            r = random.Random(seed)

            def body():
                while not done.is_set() or reads[0] < 200:
                    use_a = r.random() < 0.5 and sealed[0] > 0
                    seq, ks, vs, nb = (A, a_k, a_v, sealed[0]) if use_a else (B, b_k, b_v, 24)
                    layer = r.randrange(2)
                    ids = sorted(r.sample(range(nb), min(nb, r.randint(1, 2))))
                    if r.random() < 0.3:
                        m.prefetch(seq, layer, [min(i + 1, nb - 1) for i in ids], hot=r.random() < 0.7)
                    with m.acquire(seq, layer, ids, transient=r.random() < 0.5) as blocks:
                        for blk in blocks:
                            k, v = m.hot_view(blk)
                            s = slice(blk.index * bt, blk.index * bt + blk.ntok)
                            assert blk.ntok == bt
                            assert same_bits(k, ks[layer][:, s]) and same_bits(v, vs[layer][:, s]), \
                                f"torn block {blk.where()}"
                    reads[0] += 1
            return body

        def prefetcher():
            r = random.Random(99)
            while not done.is_set():
                seq, nb = (A, sealed[0]) if r.random() < 0.5 and sealed[0] else (B, 24)
                m.prefetch(seq, r.randrange(2), r.sample(range(nb), min(nb, 3)), hot=r.random() < 0.5)
                time.sleep(0.001)

        _run_threads([writer, reader(1), reader(2), reader(3), prefetcher], timeout=45)
        m.flush()
        wait_idle(m)
        check_bookkeeping(st_)
        assert reads[0] >= 200
        assert all(b.pins == 0 for b in all_blocks(m))
        for seq, tag, ks, vs, nb in ((A, "A", a_k, a_v, 150), (B, "B", b_k, b_v, 24)):
            for layer in range(2):
                for i in range(nb):
                    key = key_of(tag, i, layer)
                    assert seq.layers[layer][i].durable
                    k, v = decode_block(key, st_.cold.get("blocks", key))
                    sl = slice(i * bt, (i + 1) * bt)
                    assert same_bits(k, ks[layer][:, sl]) and same_bits(v, vs[layer][:, sl])
        s = st_.stats()
        assert s.hot_used_bytes <= 14 * bb and s.warm_used_bytes <= 10 * bb
        assert s.hits.get("hot", 0) > 0 and s.promotions.get("cold", 0) > 0

"""Counters of the tier manager in a constructed scenario (hits, misses, promotions, demotions,
prefetch timeliness, bytes moved)."""

from __future__ import annotations

import time

import pytest
import torch

import tierstore
from tierstore.layout import KVLayout

from support import key_of
from support.manager import BB, LAYOUT, adopt_all, random_kv, wait_idle

pytestmark = pytest.mark.store(hot=6 * BB, warm=4 * BB, codec="raw")    # the `store` fixture (conftest)


def test_metrics_in_a_constructed_scenario(tmp_path):
    one = KVLayout(num_layers=1, kv_heads=2, head_dim=4, block_tokens=4, dtype=torch.float32)
    bb = one.block_bytes
    with tierstore.open(tmp_path / "s", hot=4 * bb, warm=3 * bb, codec="raw") as st_:
        m = st_.manager
        gen = torch.Generator().manual_seed(7)
        s0 = st_.stats()
        assert (s0.cache_hit_rate, s0.prefetch_timeliness, s0.memory_fragmentation) == (-1.0, -1.0, 0.0)
        assert s0.hot_budget_bytes == 4 * bb and s0.warm_budget_bytes == 3 * bb

        a = m.open_sequence("a", one, "cpu")
        m.append(a, 0, *random_kv(gen, 6, one))                            # 4 + 2 of 8 token slots
        s = st_.stats()
        assert s.memory_fragmentation == pytest.approx(2 / 8)
        assert (s.hot_blocks, s.hot_used_bytes, s.hot_allocated_bytes) == (2, 2 * bb, 4 * bb)
        m.append(a, 0, *random_kv(gen, 10, one))                           # 4 full blocks
        assert st_.stats().memory_fragmentation == 0.0
        m.append(a, 0, *random_kv(gen, 4, one))                            # 5th block: one demotion to warm
        s = st_.stats()
        assert s.demotions == {"hot": 1} and s.bytes_moved == bb           # unkeyed: copied to warm
        assert (s.hot_blocks, s.warm_blocks, s.warm_used_bytes) == (4, 1, bb)
        m.set_keys(a, {i: [key_of("a", i, 0)] for i in range(5)})
        m.flush(a)
        s = st_.stats()
        assert s.cold_blocks == 5 and s.compression_ratio < 1.0            # raw: header overhead only
        rec_len = [len(st_.cold.get("blocks", key_of("a", i, 0))) for i in range(5)]
        m.close_sequence(a)
        assert st_.stats().hot_blocks == st_.stats().warm_blocks == 0

        b = m.open_sequence("b", one, "cpu")                               # resume: everything cold
        adopt_all(m, b, "a", 5, layers=[0])

        def delta(before, after):
            out = {}
            for f in ("hits", "misses", "promotions", "demotions"):
                x, y = getattr(before, f), getattr(after, f)
                out[f] = {k: y.get(k, 0) - x.get(k, 0) for k in set(x) | set(y) if y.get(k, 0) != x.get(k, 0)}
            out["bytes_moved"] = after.bytes_moved - before.bytes_moved
            return out

        s1 = st_.stats()
        with m.acquire(b, 0, [0]):                                         # cold -> hot (CPU: no warm staging)
            pass
        s2 = st_.stats()
        assert delta(s1, s2) == {"hits": {"cold": 1}, "misses": {"hot": 1}, "promotions": {"cold": 1},
                                 "demotions": {}, "bytes_moved": rec_len[0]}
        assert (s2.hot_blocks, s2.warm_blocks) == (1, 0)
        with m.acquire(b, 0, [0]):                                         # hot hit
            pass
        s3 = st_.stats()
        assert delta(s2, s3) == {"hits": {"hot": 1}, "misses": {}, "promotions": {}, "demotions": {}, "bytes_moved": 0}
        assert s3.cache_hit_rate == pytest.approx(1 / 2)

        m.prefetch(b, 0, [1])                                              # prefetched and landed: timely
        wait_idle(m)
        s4 = st_.stats()
        assert delta(s3, s4)["promotions"] == {"cold": 1} and delta(s3, s4)["hits"] == {}
        with m.acquire(b, 0, [1]):
            pass
        s5 = st_.stats()
        assert s5.prefetch_timeliness == 1.0 and s5.cache_hit_rate == pytest.approx(2 / 3)

        slow_key = key_of("a", 2, 0)
        real_get = st_.cold.get

        def slow_get(db, key):
            if key == slow_key:
                time.sleep(0.3)
            return real_get(db, key)

        st_.cold.get = slow_get
        try:
            m.prefetch(b, 0, [2])                                          # still in flight when asked for
            with m.acquire(b, 0, [2]) as (blk,):
                assert blk.hot is not None and blk.loading is None
        finally:
            del st_.cold.get
        s6 = st_.stats()
        assert s6.prefetch_timeliness == pytest.approx(1 / 2)
        assert s6.cache_hit_rate == pytest.approx(2 / 4)

        # block 3 goes straight from cold to the last free hot slot; warm stays empty
        with m.acquire(b, 0, [3]):
            pass
        s7 = st_.stats()
        assert delta(s6, s7)["demotions"] == {} and delta(s6, s7)["misses"] == {"hot": 1}
        assert (s7.hot_blocks, s7.warm_blocks) == (4, 0)
        # hot full: block 4 demotes one durable block, kept in a free warm slot (a copy, cheaper
        # to read back than cold)
        with m.acquire(b, 0, [4]):
            pass
        s8 = st_.stats()
        assert delta(s6, s8)["demotions"] == {"hot": 1}
        assert s8.bytes_moved - s7.bytes_moved == rec_len[4] + LAYOUT.block_bytes
        assert (s8.hot_blocks, s8.warm_blocks) == (4, 1)
        assert sum(s8.hits.values()) - s8.hits.get("hot", 0) == s8.misses["hot"] - 1  # one served by a prefetch
        assert 0 <= s8.lmdb_free_ratio <= 1 and s8.cold_used_bytes > 0 and s8.sessions == 0
        assert set(s8.to_json()) >= {"hot_used_bytes", "hot_budget_bytes", "warm_used_bytes", "warm_budget_bytes",
                                     "cold_used_bytes", "cache_hit_rate", "memory_fragmentation"}

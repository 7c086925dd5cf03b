"""Placement (``tierstore/placement.py``): budgets, all-or-nothing demotion that spares pinned
blocks, warm filled by unkeyed blocks, warm blocks read in place by CPU attention."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

import tierstore
from tierstore.errors import BudgetError
from tierstore.layout import KVLayout

from support import key_of
from support.manager import BB, LAYOUT, all_blocks, check_bookkeeping, fill, random_kv, wait_idle

pytestmark = pytest.mark.store(hot=6 * BB, warm=4 * BB, codec="raw")    # the `store` fixture (conftest)


def test_hot_budget_exhausted_by_pinned_blocks_is_a_budget_error(store):
    m = store.manager
    seq = m.open_sequence("a", LAYOUT, "cpu")
    fill(m, seq, torch.Generator().manual_seed(5), 16, tag="a")          # 4 blocks x 2 layers, 8 > 6 slots
    m.flush(seq)
    with m.acquire(seq, 0, [0, 1, 2]):
        with pytest.raises(BudgetError, match="hot budget exhausted"):
            with m.acquire(seq, 1, [0, 1, 2, 3]):
                pass
    wait_idle(m)
    assert all(b.pins == 0 for b in all_blocks(m))
    with m.acquire(seq, 1, [0, 1, 2, 3]):
        pass


def test_demoting_n_blocks_is_all_or_nothing_and_spares_pinned_blocks(store):
    m = store.manager
    seq = m.open_sequence("a", LAYOUT, "cpu")
    fill(m, seq, torch.Generator().manual_seed(12), 12, tag="a")         # 3 blocks x 2 layers: pool full
    m.flush(seq)

    def where():
        return [(b.layer, b.index, b.hot, b.warm) for b in all_blocks(m)]

    with m.acquire(seq, 0, [0, 1, 2]) as pinned:
        before, demoted = where(), dict(m.counters.demotions)
        with m.lock, pytest.raises(BudgetError, match="need 4 more slots, only 3"):
            m.placement.evict_hot(seq.hot, 4)
        assert where() == before and dict(m.counters.demotions) == demoted      # nothing moved
        with m.lock:
            m.placement.evict_hot(seq.hot, 3)
        assert all(b.hot is not None for b in pinned)
        assert all(b.hot is None and b.durable for b in seq.layers[1])
    check_bookkeeping(store)


def test_unkeyed_blocks_fill_warm_then_budget_error_names_the_cause(tmp_path):
    with tierstore.open(tmp_path / "s", hot=3 * BB, warm=2 * BB) as st_:
        m = st_.manager
        one = KVLayout(num_layers=1, kv_heads=2, head_dim=4, block_tokens=4, dtype=torch.float32)
        seq = m.open_sequence("a", one, "cpu")
        gen = torch.Generator().manual_seed(6)
        for _ in range(5):                           # 3 hot + 2 warm: the 6th sealed block has nowhere to go
            m.append(seq, 0, *random_kv(gen, 4, one))
        with pytest.raises(BudgetError, match="warm budget exhausted.*token ids"):
            m.append(seq, 0, *random_kv(gen, 4, one))
        assert seq.length == 20
        m.set_keys(seq, {i: [key_of("u", i, 0)] for i in range(5)})      # keys known: blocks can leave
        m.append(seq, 0, *random_kv(gen, 4, one))
        assert seq.length == 24



def test_cpu_attention_reads_warm_blocks_in_place(tmp_path):
    """On a CPU hot pool, exact attention reads warm blocks where they are (no warm -> hot copy);
    the output is the same as with copies up, which ``warm_in_place = False`` restores."""
    from tierstore.attention import attend_exact
    from tierstore.reader import SeqReader
    lay = KVLayout(num_layers=1, kv_heads=2, head_dim=4, block_tokens=4, dtype=torch.float32)
    torch.manual_seed(0)
    k, v = torch.randn(2, 40, 4), torch.randn(2, 40, 4)
    q = torch.randn(4, 1, 4)
    outs = {}
    for in_place in (True, False):
        with tierstore.open(tmp_path / f"kv{in_place}", hot=lay.block_bytes * 3, warm=lay.block_bytes * 16,
                            block_tokens=4) as st:
            m = st.manager
            m.warm_in_place = in_place
            seq = m.open_sequence("s", lay, "cpu")
            m.append(seq, 0, k, v)
            assert sum(b.warm is not None and b.hot is None for b in m.blocks(seq, 0)) >= 7
            before = Counter(m.counters.promotions)
            outs[in_place] = attend_exact(SeqReader(m, seq), 0, q, 40, None, 0.5)
            moved = m.counters.promotions["warm"] - before["warm"]
            if in_place:
                assert moved == 0 and m.counters.warm_in_place >= 7
            else:
                assert moved >= 7 and m.counters.warm_in_place == 0
            assert m.counters.hot_peak <= 3
    ref = torch.softmax(q.reshape(2, 2, 4) @ k.transpose(-1, -2) * 0.5, -1) @ v
    for out in outs.values():
        assert torch.allclose(out.reshape(2, 2, 4), ref, atol=1e-5)

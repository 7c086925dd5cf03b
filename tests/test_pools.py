"""Slot pools (tiers/pool.py, hot.py, warm.py): all-or-nothing allocation, run preference,
double free, views that alias the pool storage, and budget -> slots through the manager."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tierstore
from tierstore.errors import BudgetError
from tierstore.layout import KVLayout
from tierstore.tiers.hot import HotPool
from tierstore.tiers.pool import SlotPool
from tierstore.tiers.warm import WarmPool, pinning_available

LAYOUT = KVLayout(num_layers=2, kv_heads=3, head_dim=4, block_tokens=5, dtype=torch.float16)
BB = LAYOUT.block_bytes


def pool(slots: int = 8) -> SlotPool:
    """A pool of known bytes: pools are not zeroed (they take pages as blocks arrive), so the
    tests that check a write stays in its slot start from zeros themselves."""
    p = SlotPool(LAYOUT, slots, "cpu")
    p.fault_in()
    return p


def test_shapes_and_bytes():
    p = pool(6)
    assert p.k.shape == p.v.shape == (3, 6, 5, 4)
    assert p.k.dtype == torch.float16
    assert p.nbytes == 6 * BB == p.k.nbytes + p.v.nbytes
    assert (p.used, p.free_count) == (0, 6)


def test_alloc_is_all_or_nothing():
    p = pool(5)
    a = p.alloc(3)
    assert a == [0, 1, 2] and p.used == 3
    before = p._free.copy()
    assert p.alloc(3) is None                      # only 2 free: nothing taken
    assert (p._free == before).all() and p.used == 3
    b = p.alloc(2)
    assert sorted(a + b) == [0, 1, 2, 3, 4]
    assert p.alloc(1) is None and p.free_count == 0
    assert p.alloc(0) == [] and p.alloc(-1) == []


def test_alloc_prefers_run_after_near_then_any_run_then_scattered():
    p = pool(10)
    assert p.alloc(10) == list(range(10))
    p.release([2, 3, 4, 6, 7, 8, 9])
    assert p.alloc(2, near=5) == [6, 7]            # right after the layer's last block
    p.release([6, 7])
    assert p.alloc(3, near=0) == [2, 3, 4]         # slot 1 is taken: first run of 3
    assert p.alloc(4, near=4) == [6, 7, 8, 9]      # slot 5 is taken: the run 6..9
    p.release([1, 3, 5, 7])
    assert p.alloc(3) == [1, 3, 5]                 # no run of 3 left: scattered slots
    assert p.alloc(1, near=9) == [7]               # near at the end of the pool


def test_double_free_raises_and_changes_nothing():
    p = pool(4)
    p.alloc(2)
    p.release([1])
    with pytest.raises(AssertionError, match="double free"):
        p.release([0, 1])
    assert p.used == 1 and not p._free[0] and p._free[1]
    p.release([])
    assert p.used == 1


def test_block_and_run_views_alias_pool_storage():
    p = pool(6)
    k, v = p.block(3)
    assert k.shape == (3, 5, 4)
    k.fill_(1.5)
    v.fill_(-2.0)
    assert (p.k[:, 3] == 1.5).all() and (p.v[:, 3] == -2.0).all()
    assert (p.k[:, [0, 1, 2, 4, 5]] == 0).all()
    rk, rv = p.view(2, 3)                          # slots 2..4 as one [H, 15, D] view
    assert rk.shape == (3, 15, 4)
    assert rk.untyped_storage().data_ptr() == p.k.untyped_storage().data_ptr()
    assert (rk[:, 5:10] == 1.5).all() and (rk[:, :5] == 0).all()
    rk[:, 10:15] = 7.0                             # writes through to slot 4
    rv[:, 0] = 3.0                                 # slot 2, token 0
    assert (p.k[:, 4] == 7.0).all() and (p.v[:, 2, 0] == 3.0).all()
    tk, tv = p.view(2, 3, ntok=12)
    assert tk.shape == tv.shape == (3, 12, 4)
    assert tk.data_ptr() == rk.data_ptr()


def test_copy_in_copies_one_slot_exactly():
    a, b = pool(4), pool(3)
    a.k.copy_(torch.randn(a.k.shape))
    a.v.copy_(torch.randn(a.v.shape))
    b.copy_in(1, a, 2)
    assert torch.equal(b.k[:, 1], a.k[:, 2]) and torch.equal(b.v[:, 1], a.v[:, 2])
    assert (b.k[:, [0, 2]] == 0).all() and (b.v[:, [0, 2]] == 0).all()
    assert a.k[1, 2].is_contiguous()             # a head of a slot: what cross-device copies move


def test_slot_pool_rejects_zero_slots():
    with pytest.raises(BudgetError, match="smaller than one block"):
        SlotPool(LAYOUT, 0, "cpu", name="warm")


def test_hot_and_warm_pool_capabilities_on_this_machine():
    h = HotPool(LAYOUT, 2, "cpu")
    assert not h.is_cuda and h.copy_stream is None and h.name == "hot"
    w = WarmPool(LAYOUT, 2)
    assert w.device.type == "cpu" and w.name == "warm"
    assert w.pinned == pinning_available() == w.k.is_pinned()
    if not torch.cuda.is_available():
        assert not w.pinned                        # pinning raises on CPU-only torch: pageable


@given(st.lists(st.tuples(st.booleans(), st.integers(0, 6), st.integers(-1, 11)), max_size=40))
@settings(max_examples=60, deadline=None)
def test_random_alloc_release_against_a_set(ops):
    p = pool(12)
    held: set[int] = set()
    for is_alloc, n, near in ops:
        if is_alloc:
            got = p.alloc(n, None if near < 0 else near)
            if n > 12 - len(held):
                assert got is None
                continue
            assert got is not None and len(got) == n == len(set(got))
            assert not held & set(got) and all(0 <= s < 12 for s in got)
            held |= set(got)
        elif held:
            drop = sorted(held)[:n]
            p.release(drop)
            held -= set(drop)
        assert p.used == len(held) == int((~p._free).sum())


# -- budgets through the manager -----------------------------------------------------------

def test_budget_to_slots(tmp_path):
    with tierstore.open(tmp_path / "s", hot=5 * BB + BB - 1, warm=3 * BB + 1) as store:
        m = store.manager
        seq = m.open_sequence("a", LAYOUT, "cpu")
        assert (seq.hot.slots, seq.warm.slots) == (5, 3)
        assert seq.hot.k.nbytes + seq.hot.v.nbytes == 5 * BB <= store.config.hot_bytes
        assert seq.warm.k.nbytes + seq.warm.v.nbytes == 3 * BB <= store.config.warm_bytes
        again = m.open_sequence("b", LAYOUT, "cpu")
        assert again.hot is seq.hot and again.warm is seq.warm       # one pool per layout


def test_layouts_share_one_budget(tmp_path):
    other = KVLayout(num_layers=1, kv_heads=1, head_dim=4, block_tokens=5, dtype=torch.float16)
    with tierstore.open(tmp_path / "s", hot=10 * BB, warm=4 * BB) as store:
        m = store.manager
        a = m.open_sequence("a", LAYOUT, "cpu", hot_bytes=6 * BB, warm_bytes=BB)
        b = m.open_sequence("b", other, "cpu")                           # gets what is left
        assert a.hot.slots == 6 and b.hot.nbytes <= 4 * BB and b.hot.nbytes > 3 * BB
        assert a.hot.nbytes + b.hot.nbytes <= 10 * BB
        assert a.warm.nbytes + b.warm.nbytes <= 4 * BB
        u = m.usage()
        assert u["hot_allocated_bytes"] <= 10 * BB and u["warm_allocated_bytes"] <= 4 * BB


@pytest.mark.parametrize("hot, warm, match", [
    (0, 4 * BB, r"hot budget 0 bytes holds 0 blocks of \d+ bytes"),
    (2 * BB - 1, 4 * BB, "hot budget .* holds 1 blocks .* at least 2"),
    (4 * BB, BB - 1, r"warm budget \d+ bytes is smaller than one block \(\d+ bytes\)"),
    (4 * BB, 0, "warm budget 0 bytes is smaller than one block"),
])
def test_budget_smaller_than_a_block_is_a_clear_error(tmp_path, hot, warm, match):
    with tierstore.open(tmp_path / "s", hot=hot, warm=warm) as store:
        with pytest.raises(BudgetError, match=match):
            store.manager.open_sequence("a", LAYOUT, "cpu")


def test_room_places_new_runs_with_space_on_both_sides():
    p = pool(40)
    a = p.alloc(1, room=4)
    assert a == [4]                                 # 4 free before it (for a run that ends there)
    b = p.alloc(1, room=4)
    assert b == [9]                                 # the free run from 5: 4 slots left for slot 4's owner
    assert p.alloc(1, near=4) == [5]                # the owner of slot 4 grows in place
    assert p.alloc(1, near=9) == [10]               # and so does the owner of slot 9


def test_room_falls_back_to_any_run_then_scattered_slots():
    p = pool(6)
    assert p.alloc(2, room=8) == [0, 1]             # no run of 18: first run of 2
    assert p.alloc(2, room=8) == [2, 3]
    p.release([0, 2])
    assert p.alloc(2, room=8) == [4, 5]             # the one run of 2 left
    assert p.alloc(2, room=8) == [0, 2]             # no run at all: scattered
    assert p.used == 6


def test_sequences_keep_long_runs_while_layers_interleave(tmp_path):
    """Prefill chunks of two layers interleave and decoding appends one block at a time to each:
    every layer's blocks still form one run of consecutive slots (one view for attention)."""
    lay = KVLayout(num_layers=3, kv_heads=2, head_dim=4, block_tokens=4, dtype=torch.float32)
    with tierstore.open(tmp_path / "kv", hot=200 * lay.block_bytes, warm=8 * lay.block_bytes, block_tokens=4) as s:
        m = s.manager
        seq = m.open_sequence("s", lay, "cpu")
        for _chunk in range(2):
            for layer in range(3):
                m.append(seq, layer, torch.randn(2, 16, 4), torch.randn(2, 16, 4))
        for _step in range(12):
            for layer in range(3):
                m.append(seq, layer, torch.randn(2, 1, 4), torch.randn(2, 1, 4))
        for layer in range(3):
            blocks = m.blocks(seq, layer)
            assert len(blocks) == 11
            assert len(m.runs(blocks)) == 1, [b.hot for b in blocks]


def test_pool_written_under_grad_mode_after_creation_under_no_grad():
    with torch.no_grad():
        p = pool(4)
    hk, hv = p.block(1)
    hk.copy_(torch.ones_like(hk))                   # grad mode on: must not raise
    assert p.k[:, 1].eq(1).all() and p.kv[0, :, 1].eq(1).all()

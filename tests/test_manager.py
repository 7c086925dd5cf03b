"""TierManager: a hypothesis state machine drives random appends, key assignments, reads,
prefetches and flushes on tiny hot/warm budgets against a plain dict model of what was written;
and the core unit tests (round trips, runs, partial tails, adopting, summaries, closing)."""

from __future__ import annotations

import tempfile

import pytest
import torch
from hypothesis import HealthCheck, event, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

import tierstore
from tierstore.codec import decode_block
from tierstore.errors import BudgetError, StoreClosedError
from tierstore.manager import Block
from tierstore.policies import POLICIES

from support import key_of, same_bits
from support.manager import (BB, BT, LAYOUT, adopt_all, all_blocks, check_bookkeeping, check_cold, describe, fill, random_kv, wait_idle)

# -- the state machine -----------------------------------------------------------------------

class TierMachine(RuleBasedStateMachine):
    """Random appends / set_keys / acquires / prefetches / flushes on tiny budgets vs a dict model.

    Budget pressure: hot holds 5-9 blocks for up to 4 partial tails, warm 1-5 blocks, and each
    machine starts from a keyed history of up to 12 blocks per layer. A ``BudgetError`` is
    accepted only where the request really cannot fit (more blocks than the hot pool minus the
    partial tails, more warm slots held at once than warm has, or sealed blocks without keys that
    warm may not drop); a refused append keeps exactly the prefix it streamed in, a refused
    acquire pins nothing. Everything else must succeed. Different budgets are different machines
    (pools are fixed at creation).
    """

    @initialize(hot_slots=st.integers(5, 9), warm_slots=st.integers(1, 5), nseq=st.integers(1, 2),
                codec=st.sampled_from(["raw", "zstd"]), policy=st.sampled_from(sorted(POLICIES)),
                seed=st.integers(0, 2**16), slack=st.integers(0, BB - 1), prefill=st.integers(0, 48))
    def setup(self, hot_slots, warm_slots, nseq, codec, policy, seed, slack, prefill):
        self.tmp = tempfile.TemporaryDirectory(prefix="tiermachine-")
        self.store = tierstore.open(self.tmp.name, hot=hot_slots * BB + slack, warm=warm_slots * BB + slack,
                                    codec=codec)
        self.m = self.store.manager
        self.hot_slots, self.warm_slots = hot_slots, warm_slots
        self.gen = torch.Generator().manual_seed(seed)
        self.tags = [f"m{seed}-s{i}" for i in range(nseq)]
        self.seqs = [self.m.open_sequence(f"s{i}", LAYOUT, "cpu", policy=policy) for i in range(nseq)]
        empty = torch.empty(LAYOUT.kv_heads, 0, LAYOUT.head_dim)
        self.K = [[empty] * LAYOUT.num_layers for _ in range(nseq)]
        self.V = [[empty] * LAYOUT.num_layers for _ in range(nseq)]
        self.keys: list[dict[tuple[int, int], bytes]] = [{} for _ in range(nseq)]
        self.mass: dict[tuple[int, int, int], torch.Tensor] = {}
        for s in range(nseq):      # start under pressure: a keyed history, mostly out of hot already
            for t in range(0, prefill, 8):
                for layer in range(LAYOUT.num_layers):
                    self._append(s, layer, min(8, prefill - t))
                self.set_keys_for(s)

    # -- model helpers

    def length(self, s: int, layer: int) -> int:
        return int(self.K[s][layer].shape[1])

    def partial_tails(self) -> list[Block]:
        return [b for seq in self.seqs for layer in seq.layers for b in layer[-1:] if not b.sealed]

    def unkeyed_sealed(self) -> bool:
        return any(b.sealed and b.key is None for seq in self.seqs for layer in seq.layers for b in layer)

    # -- rules

    def _append(self, s: int, layer: int, n: int) -> None:
        seq = self.seqs[s]
        k, v = random_kv(self.gen, n)
        L0 = self.length(s, layer)
        # blocks are filled one at a time: one free hot slot beside the partial tails suffices
        may_fail = len(self.partial_tails()) + 1 > self.hot_slots
        try:
            self.m.append(seq, layer, k, v)
            took = n
        except BudgetError:
            # blocks sealed by this very call have no keys yet (set_keys follows the forward
            # step): demoting one needs a warm slot that unkeyed blocks may all hold
            assert may_fail or self.unkeyed_sealed(), f"append refused although the blocks fit:\n{describe(self.m)}"
            event("append: BudgetError")
            took = sum(b.ntok for b in seq.layers[layer]) - L0     # a streamed prefix stays appended
            assert 0 <= took < n
        self.K[s][layer] = torch.cat([self.K[s][layer], k[:, :took]], 1)
        self.V[s][layer] = torch.cat([self.V[s][layer], v[:, :took]], 1)

    @rule(data=st.data(), n=st.integers(1, 9))
    def append_all_layers(self, data, n):
        """One forward step: every layer gets the same tokens' K/V."""
        s = data.draw(st.integers(0, len(self.seqs) - 1), label="seq")
        for layer in range(LAYOUT.num_layers):
            self._append(s, layer, n)
        if data.draw(st.sampled_from([True, True, True, False]), label="keys now"):
            self.set_keys_for(s)

    @rule(data=st.data(), n=st.integers(1, 6))
    def append_one_layer(self, data, n):
        s = data.draw(st.integers(0, len(self.seqs) - 1), label="seq")
        self._append(s, data.draw(st.integers(0, LAYOUT.num_layers - 1), label="layer"), n)

    def set_keys_for(self, s: int) -> None:
        seq = self.seqs[s]
        full = min(self.length(s, layer) for layer in range(LAYOUT.num_layers)) // BT
        self.m.set_keys(seq, {i: [key_of(self.tags[s], i, layer) for layer in range(LAYOUT.num_layers)]
                              for i in range(full)})
        for i in range(full):
            for layer in range(LAYOUT.num_layers):
                self.keys[s].setdefault((layer, i), key_of(self.tags[s], i, layer))

    @rule(data=st.data())
    def set_keys(self, data):
        self.set_keys_for(data.draw(st.integers(0, len(self.seqs) - 1), label="seq"))

    def _pick(self, data, max_n=3):
        s = data.draw(st.integers(0, len(self.seqs) - 1), label="seq")
        layer = data.draw(st.integers(0, LAYOUT.num_layers - 1), label="layer")
        # drawn independently of the manager's state (thread timing may change block counts)
        raw = data.draw(st.lists(st.integers(0, 10**6), min_size=1, max_size=max_n), label="ids")
        nblocks = len(self.seqs[s].layers[layer])
        return s, layer, [x % nblocks for x in raw] if nblocks else []

    @rule(data=st.data(), transient=st.booleans())
    def acquire_and_read(self, data, transient):
        s, layer, ids = self._pick(data)
        if not ids:
            return
        seq = self.seqs[s]
        blocks = [seq.layers[layer][i] for i in ids]
        tails = self.partial_tails()
        with self.m.lock:
            # warm slots this request holds at once: one per block brought up, plus the warm
            # copies of the requested blocks that are hot already (pinned: kept)
            warm_held = {id(b) for b in blocks if b.hot is None or b.loading is not None or b.warm is not None}
        may_fail = (self.unkeyed_sealed() or len({id(b) for b in tails} | {id(b) for b in blocks}) > self.hot_slots
                    or len(warm_held) > self.warm_slots)
        try:
            with self.m.acquire(seq, layer, ids, transient=transient) as got:
                assert [b.index for b in got] == ids
                for b in got:
                    assert b.hot is not None and b.loading is None and b.pins > 0
                    k, v = self.m.hot_view(b)
                    sl = slice(b.index * BT, b.index * BT + b.ntok)
                    assert same_bits(k, self.K[s][layer][:, sl]), ("K", b.where())
                    assert same_bits(v, self.V[s][layer][:, sl]), ("V", b.where())
                order = sorted(set(ids))
                run_blocks = [seq.layers[layer][i] for i in order]
                for slot, n, tok, ntok in self.m.runs(run_blocks):
                    k, v = seq.hot.view(slot, n, ntok)
                    assert same_bits(k, self.K[s][layer][:, tok:tok + ntok])
                    assert same_bits(v, self.V[s][layer][:, tok:tok + ntok])
        except BudgetError:
            assert may_fail, f"acquire refused although the blocks fit:\n{describe(self.m)}"
            event("acquire: BudgetError")

    @rule(data=st.data(), hot=st.booleans())
    def prefetch(self, data, hot):
        s, layer, ids = self._pick(data, max_n=4)
        self.m.prefetch(self.seqs[s], layer, ids, hot=hot)     # never raises, returns at once

    @rule(data=st.data())
    def note_attention(self, data):
        s, layer, ids = self._pick(data)
        ids = sorted({i for i in ids if self.seqs[s].layers[layer][i].sealed})
        if not ids:
            return
        mass = torch.rand(len(ids), LAYOUT.kv_heads, generator=self.gen)
        self.m.note_attention(self.seqs[s], layer, ids, mass)
        for i, w in zip(ids, mass):
            self.mass[(s, layer, i)] = self.mass.get((s, layer, i), torch.zeros(LAYOUT.kv_heads)) + w
        got = self.m.summaries(self.seqs[s], layer).mass
        for i in ids:
            assert torch.allclose(got[i], self.mass[(s, layer, i)])

    @rule()
    def flush(self):
        self.m.flush()
        for s, seq in enumerate(self.seqs):
            check_cold(self.store, seq, self.K[s], self.V[s], self.keys[s])

    @rule()
    def settle(self):
        wait_idle(self.m)
        self.flush()
        with self.m.lock:
            for b in all_blocks(self.m):
                assert b.pins == 0 and not b.queued and b.loading is None, b.where()

    # -- invariants

    @invariant()
    def budgets_and_bookkeeping(self):
        check_bookkeeping(self.store)

    @invariant()
    def lengths_match_the_model(self):
        for s, seq in enumerate(self.seqs):
            for layer in range(LAYOUT.num_layers):
                blocks = seq.layers[layer]
                assert sum(b.ntok for b in blocks) == self.length(s, layer)
                assert all(b.sealed for b in blocks[:-1]) and [b.index for b in blocks] == list(range(len(blocks)))
                for b in blocks:
                    want = self.keys[s].get((layer, b.index))
                    assert b.key == want, b.where()

    def teardown(self):
        store = getattr(self, "store", None)
        if store is None:
            return
        c = self.m.counters
        event(f"promotions from cold: {'>0' if c.promotions['cold'] else '0'}")
        event(f"hot demotions: {'>3' if c.demotions['hot'] > 3 else c.demotions['hot']}")
        event(f"warm demotions: {'>0' if c.demotions['warm'] else '0'}")
        try:
            self.settle()
            for s, seq in enumerate(self.seqs):
                for layer in range(LAYOUT.num_layers):   # every block still reads back, whatever its tier
                    for i in range(len(seq.layers[layer])):
                        try:
                            with self.m.acquire(seq, layer, [i], transient=True) as (b,):
                                k, v = self.m.hot_view(b)
                                sl = slice(i * BT, i * BT + b.ntok)
                                assert same_bits(k, self.K[s][layer][:, sl])
                                assert same_bits(v, self.V[s][layer][:, sl])
                        except BudgetError:
                            assert self.unkeyed_sealed(), "read-back refused although every block can move"
        finally:
            store.close()
            self.tmp.cleanup()


TierMachine.TestCase.settings = settings(max_examples=120, stateful_step_count=40, deadline=None,
                                         suppress_health_check=list(HealthCheck))
test_tier_machine = TierMachine.TestCase



pytestmark = pytest.mark.store(hot=6 * BB, warm=4 * BB, codec="raw")    # the `store` fixture (conftest)


def test_block_uses_slots():
    assert not hasattr(Block(type("S", (), {})(), 0, 0), "__dict__")


def test_round_trip_through_every_tier(store):
    m = store.manager
    gen = torch.Generator().manual_seed(1)
    seq = m.open_sequence("a", LAYOUT, "cpu")
    K, V = fill(m, seq, gen, 42, tag="a")       # 11 blocks per layer, 6 hot slots: most leave hot
    m.flush(seq)
    u = m.usage()
    assert u["hot_blocks"] <= 6 and u["warm_blocks"] <= 4
    for layer in range(2):
        for i in range(11):
            with m.acquire(seq, layer, [i], transient=True) as (b,):
                k, v = m.hot_view(b)
                sl = slice(i * BT, i * BT + b.ntok)
                assert same_bits(k, K[layer][:, sl]) and same_bits(v, V[layer][:, sl])
    check_cold(store, seq, K, V, {(layer, i): key_of("a", i, layer) for layer in range(2) for i in range(10)})
    check_bookkeeping(store)


def test_runs_are_zero_copy_views_of_consecutive_blocks(store):
    m = store.manager
    seq = m.open_sequence("a", LAYOUT, "cpu")
    K, V = fill(m, seq, torch.Generator().manual_seed(2), 14, chunk=14)    # 4 blocks, the last partial
    with m.acquire(seq, 1, [0, 1, 2, 3]) as blocks:
        runs = m.runs(blocks)
        assert sum(r[1] for r in runs) == 4 and runs[-1][2] + runs[-1][3] == 14
        for slot, n, tok, ntok in runs:
            k, v = seq.hot.view(slot, n, ntok)
            assert k.data_ptr() == seq.hot.block(slot)[0].data_ptr()
            assert same_bits(k, K[1][:, tok:tok + ntok]) and same_bits(v, V[1][:, tok:tok + ntok])
    assert m.runs([]) == []


def test_partial_tail_write_now_then_append_gives_it_a_new_identity(store):
    m = store.manager
    seq = m.open_sequence("a", LAYOUT, "cpu")
    gen = torch.Generator().manual_seed(3)
    K, V = fill(m, seq, gen, 6, tag="a")                                   # block 1 holds 2 tokens
    tail_keys = [key_of("a-partial", 1, layer) for layer in range(2)]
    m.set_keys(seq, {1: tail_keys})
    tails = [seq.layers[layer][1] for layer in range(2)]
    m.write_now(tails)                                                     # the commit of a partial tail
    m.flush(seq)
    assert all(b.durable and not b.sealed for b in tails)
    for layer, b in enumerate(tails):
        k, v = decode_block(b.key, store.cold.get("blocks", b.key))
        assert same_bits(k, K[layer][:, 4:6]) and same_bits(v, V[layer][:, 4:6])
    k, v = random_kv(gen, 1)
    m.append(seq, 0, k, v)
    assert tails[0].key is None and not tails[0].durable and tails[0].ntok == 3   # content changed
    assert tails[1].key == tail_keys[1] and tails[1].durable                       # untouched layer


def test_resume_by_adopting_cold_blocks(store):
    m = store.manager
    gen = torch.Generator().manual_seed(4)
    a = m.open_sequence("a", LAYOUT, "cpu")
    K, V = fill(m, a, gen, 40, tag="a")
    m.close_sequence(a)
    assert m.usage()["hot_blocks"] == m.usage()["warm_blocks"] == 0
    b = m.open_sequence("b", LAYOUT, "cpu")
    adopt_all(m, b, "a", 10)
    with pytest.raises(ValueError, match="out of order"):
        m.adopt(b, 0, 12, BT, key_of("a", 12, 0), None)
    for layer in range(2):
        m.prefetch(b, layer, range(3))
        for i in range(10):
            with m.acquire(b, layer, [i], transient=True) as (blk,):
                k, v = m.hot_view(blk)
                assert same_bits(k, K[layer][:, i * BT:(i + 1) * BT]) and same_bits(v, V[layer][:, i * BT:(i + 1) * BT])
    check_bookkeeping(store)


def test_summaries_and_attention_mass(store):
    m = store.manager
    seq = m.open_sequence("a", LAYOUT, "cpu")
    k = torch.randn(LAYOUT.kv_heads, 10, LAYOUT.head_dim)
    for layer in range(2):
        m.append(seq, layer, k, k)
    s = m.summaries(seq, 0)
    assert s.n == 3 and s.tokens.tolist() == [4, 4, 2]
    assert torch.equal(s.kmin[1], k[:, 4:8].amin(1)) and torch.equal(s.kmax[0], k[:, 0:4].amax(1))
    assert torch.allclose(s.kmean[1], k[:, 4:8].mean(1))
    m.note_attention(seq, 0, [0, 1], torch.tensor([[0.5, 0.25], [1.0, 0.0]]))
    m.note_attention(seq, 0, [1], torch.tensor([[1.0, 2.0]]))
    assert m.summaries(seq, 0).mass[:2].tolist() == [[0.5, 0.25], [2.0, 2.0]]
    assert m.summaries(seq, 1).mass.abs().sum() == 0


def test_closed_manager_refuses_work(tmp_path):
    st_ = tierstore.open(tmp_path / "s", hot=4 * BB, warm=2 * BB)
    m = st_.manager
    seq = m.open_sequence("a", LAYOUT, "cpu")
    m.append(seq, 0, *random_kv(torch.Generator().manual_seed(0), 3))
    st_.close()
    with pytest.raises(StoreClosedError):
        m.open_sequence("b", LAYOUT, "cpu")
    with pytest.raises(StoreClosedError):
        with m.acquire(seq, 0, [0]):
            pass
    m.prefetch(seq, 0, [0])                         # a no-op once closed


def test_acquire_counts_a_block_asked_twice_once(tmp_path):
    """The ids of one request may repeat (the API yields a block per id): a repeated cold block
    takes one hot slot, so a request that fits beside the partial tails is served (found by the
    state machine: three ids, two blocks, refused as three)."""
    st_ = tierstore.open(tmp_path / "s", hot=4 * BB, warm=4 * BB)
    try:
        m = st_.manager
        gen = torch.Generator().manual_seed(5)
        a = m.open_sequence("a", LAYOUT, "cpu")
        K, V = fill(m, a, gen, 40, tag="a")
        m.close_sequence(a)
        b = m.open_sequence("b", LAYOUT, "cpu")
        adopt_all(m, b, "a", 10)                  # cold only
        for layer in range(2):                    # two partial tails take two of the four slots
            m.append(b, layer, *random_kv(gen, 1))
        with m.acquire(b, 0, [3, 3, 5]) as got:
            assert [blk.index for blk in got] == [3, 3, 5] and got[0] is got[1]
            for blk in got:
                k, _ = m.hot_view(blk)
                assert same_bits(k, K[0][:, blk.index * BT:(blk.index + 1) * BT])
        with m.acquire(b, 1, [7, 7, 7], transient=True) as got:
            assert len({id(x) for x in got}) == 1 and got[0].pins == 3
        check_bookkeeping(st_)
    finally:
        st_.close()

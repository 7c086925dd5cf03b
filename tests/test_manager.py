"""TierManager: placement, budgets, demotion, recall, prefetch, write-back, metrics, errors.

The core is a hypothesis state machine that drives random appends, key assignments, reads,
prefetches and flushes on tiny hot/warm budgets against a plain dict model of what was written;
a concurrency test runs readers, prefetchers, a writer and the write-back thread at once.
"""

from __future__ import annotations

import faulthandler
import random
import sys
import tempfile
import threading
import time
from collections import Counter

import pytest
import torch
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

import tierstore
from tierstore.codec import decode_block
from tierstore.errors import BudgetError, CorruptBlockError, MissingBlockError, StoreClosedError
from tierstore.layout import KVLayout
from tierstore.manager import Block, TierManager
from tierstore.policies import POLICIES

from support import key_of, random_layer_kv, same_bits

LAYOUT = KVLayout(num_layers=2, kv_heads=2, head_dim=4, block_tokens=4, dtype=torch.float32)
BT = LAYOUT.block_tokens
BB = LAYOUT.block_bytes


# -- helpers -------------------------------------------------------------------------------

def random_kv(gen: torch.Generator, n: int, layout: KVLayout = LAYOUT) -> tuple[torch.Tensor, torch.Tensor]:
    """K, V [kv_heads, n, head_dim] of arbitrary bit patterns (NaNs, infs, -0.0 included)."""
    return random_layer_kv(layout, n, gen, kind="bits")


def all_blocks(m: TierManager) -> list[Block]:
    return [b for s in m.sequences() for layer in s.layers for b in layer]


def wait_idle(m: TierManager, timeout: float = 20.0) -> None:
    """Wait until no load is in flight and every queued write-back is durable."""
    deadline = time.monotonic() + timeout
    while True:
        with m.lock:
            busy = [b for b in all_blocks(m) if b.loading is not None or b.queued]
        if not busy:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{len(busy)} blocks still loading/queued after {timeout}s: "
                                 f"{[b.where() for b in busy[:5]]}")
        time.sleep(0.005)


def describe(m: TierManager) -> str:
    """One line per block: where it is and why it may or may not move (for failure messages)."""
    with m.lock:
        return "\n".join(
            f"{b.seq.name} L{b.layer} #{b.index} ntok={b.ntok} hot={b.hot} warm={b.warm} durable={b.durable} "
            f"key={b.key is not None} queued={b.queued} pins={b.pins} loading={b.loading is not None} "
            f"transient={b.transient}" for b in all_blocks(m))


def check_bookkeeping(store) -> None:
    """Budgets hold (bookkeeping and real tensor bytes), slots are owned once, nothing is lost."""
    m = store.manager
    cfg = store.config
    with m.lock:
        hot_pools, warm_pools = list(m.budgets.hot.values()), list(m.budgets.warm.values())
        assert sum(p.used * p.layout.block_bytes for p in hot_pools) <= cfg.hot_bytes
        assert sum(p.k.nbytes + p.v.nbytes for p in hot_pools) <= cfg.hot_bytes
        assert sum(p.used * p.layout.block_bytes for p in warm_pools) <= cfg.warm_bytes
        assert sum(p.k.nbytes + p.v.nbytes for p in warm_pools) <= cfg.warm_bytes
        u = m.usage()
        assert u["hot_used_bytes"] <= cfg.hot_bytes and u["warm_used_bytes"] <= cfg.warm_bytes
        blocks = all_blocks(m)
        for attr, pools in (("hot", hot_pools), ("warm", warm_pools)):
            for p in pools:
                owned = [getattr(b, attr) for b in blocks if getattr(b.seq, attr) is p and getattr(b, attr) is not None]
                assert len(owned) == len(set(owned)) == p.used == int((~p._free).sum()), attr
                assert all(not p._free[s] for s in owned)
        for b in blocks:
            assert b.hot is not None or b.warm is not None or b.durable, f"lost block {b.where()}"
            assert b.pins >= 0, b.where()
            if not b.sealed:
                assert b.hot is not None, f"partial tail {b.where()} left the hot tier"


def check_cold(store, seq, model_k, model_v, keys) -> None:
    """Every keyed sealed block is durable and decodes from cold to the bytes written."""
    for (layer, index), key in keys.items():
        b = seq.layers[layer][index]
        if not b.sealed:
            continue
        assert b.key == key and b.durable, b.where()
        rec = store.cold.get("blocks", key)
        assert rec is not None, b.where()
        k, v = decode_block(key, rec, **b.where())
        s = slice(index * BT, (index + 1) * BT)
        assert same_bits(k, model_k[layer][:, s]) and same_bits(v, model_v[layer][:, s]), b.where()


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


# -- unit tests ----------------------------------------------------------------------------------

pytestmark = pytest.mark.store(hot=6 * BB, warm=4 * BB, codec="raw")    # the `store` fixture (conftest)


def fill(m: TierManager, seq, gen, tokens: int, tag: str | None = None, chunk: int = 5):
    """Append ``tokens`` tokens to every layer in chunks; keys for full blocks when ``tag``."""
    K = [torch.empty(LAYOUT.kv_heads, 0, LAYOUT.head_dim) for _ in range(LAYOUT.num_layers)]
    V = list(K)
    for t in range(0, tokens, chunk):
        n = min(chunk, tokens - t)
        for layer in range(LAYOUT.num_layers):
            k, v = random_kv(gen, n)
            m.append(seq, layer, k, v)
            K[layer], V[layer] = torch.cat([K[layer], k], 1), torch.cat([V[layer], v], 1)
        if tag is not None:
            full = (t + n) // BT
            m.set_keys(seq, {i: [key_of(tag, i, layer) for layer in range(LAYOUT.num_layers)] for i in range(full)})
    return K, V


def adopt_all(m: TierManager, seq, tag: str, nblocks: int, layers=range(LAYOUT.num_layers)):
    for layer in layers:
        for i in range(nblocks):
            m.adopt(seq, layer, i, BT, key_of(tag, i, layer), None)


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


# -- metrics -------------------------------------------------------------------------------

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


# -- errors ----------------------------------------------------------------------------------

def _cold_only_sequence(store, gen, nblocks=4):
    m = store.manager
    a = m.open_sequence("writer", LAYOUT, "cpu")
    K, V = fill(m, a, gen, nblocks * BT, tag="w")
    m.flush(a)
    m.close_sequence(a)
    b = m.open_sequence("reader", LAYOUT, "cpu")
    adopt_all(m, b, "w", nblocks)
    return b, K, V


def _corrupt(store, key: bytes, at: int = -1) -> None:
    rec = bytearray(store.cold.get("blocks", key))
    rec[at] ^= 0x40
    store.cold.put_many("blocks", [(key, bytes(rec))])


def test_corrupt_cold_block_during_promotion_names_session_layer_block(store):
    m = store.manager
    b, K, V = _cold_only_sequence(store, torch.Generator().manual_seed(8))
    _corrupt(store, key_of("w", 2, 1))
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
    b, _, _ = _cold_only_sequence(store, torch.Generator().manual_seed(9))
    store.cold.delete_many("blocks", [key_of("w", 0, 0)])
    with pytest.raises(MissingBlockError, match="session 'reader', layer 0, block 0"):
        with m.acquire(b, 0, [0]):
            pass
    check_bookkeeping(store)


# -- concurrency ---------------------------------------------------------------------------

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


# -- background warm fill after a resume -----------------------------------------------------

def _resumable(tmp_path, gen, nblocks=10, warm_blocks=64):
    st_ = tierstore.open(tmp_path / "fill", hot=4 * BB, warm=warm_blocks * BB, codec="raw")
    return (st_, *_cold_only_sequence(st_, gen, nblocks))


def test_restore_fills_warm_in_the_background_bit_exact(tmp_path):
    st_, b, K, V = _resumable(tmp_path, torch.Generator().manual_seed(21))
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


def test_warm_fill_leaves_a_corrupt_block_in_cold_and_its_read_names_it(tmp_path):
    st_, b, K, V = _resumable(tmp_path, torch.Generator().manual_seed(22))
    m = st_.manager
    try:
        _corrupt(st_, key_of("w", 3, 1))
        m.restore(b)
        m.wait_filled(30)
        blk = b.layers[1][3]
        assert blk.warm is None and blk.hot is None and blk.pins == 0 and blk.loading is None
        assert all(x.warm is not None for i, x in enumerate(b.layers[1]) if i not in (3,) and x.hot is None)
        with pytest.raises(CorruptBlockError, match="session 'reader', layer 1, block 3"):
            with m.acquire(b, 1, [3], in_place=True):
                pass
        with m.acquire(b, 0, [3], in_place=True) as (x,):  # the same block of another layer reads back
            assert same_bits(m.view(x)[0], K[0][:, 12:16])
        check_bookkeeping(st_)
    finally:
        st_.close()


def test_closing_a_sequence_while_its_warm_fill_runs(tmp_path):
    st_, b, _, _ = _resumable(tmp_path, torch.Generator().manual_seed(23), nblocks=40, warm_blocks=256)
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

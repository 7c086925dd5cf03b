"""Policies: the one interface (``score(summaries, query=None)``), generic checks over every
registered policy, and placement through the manager for the built-in ``exact`` and ``lru``.

The generic tests are parametrised over ``tierstore.policies.POLICIES``, so a policy that
another module registers is checked the same way without touching this file.
"""

from __future__ import annotations

import hashlib

import pytest
import torch

import tierstore
from tierstore.layout import KVLayout
from tierstore.policies import POLICIES, Policy, Summaries, get_policy
from tierstore.tiers.cold import block_key

H, D = 2, 4


def summaries(n: int, *, seed: int = 0, step: int = 10) -> Summaries:
    g = torch.Generator().manual_seed(seed)
    kmin = torch.randn(n, H, D, generator=g) - 1
    kmax = kmin + torch.rand(n, H, D, generator=g) * 2
    return Summaries(kmin=kmin, kmax=kmax, kmean=(kmin + kmax) / 2, mass=torch.rand(n, H, generator=g),
                     last_used=torch.randint(0, step + 1, (n,), generator=g), tokens=torch.full((n,), 4),
                     step=step)


def clone(s: Summaries) -> Summaries:
    return Summaries(**{f: (getattr(s, f).clone() if isinstance(getattr(s, f), torch.Tensor) else getattr(s, f))
                        for f in ("kmin", "kmax", "kmean", "mass", "last_used", "tokens", "step")})


# -- every registered policy -------------------------------------------------------------------

@pytest.fixture(params=sorted(POLICIES))
def policy(request) -> Policy:
    return get_policy(request.param)


def test_registry_and_lookup():
    assert {"exact", "lru"} <= set(POLICIES)
    for name, cls in POLICIES.items():
        assert cls.name == name and issubclass(cls, Policy)
    p = get_policy("lru")
    assert get_policy(p) is p
    with pytest.raises(ValueError, match="unknown policy 'nope'; known: .*exact"):
        get_policy("nope")


@pytest.mark.parametrize("n", [0, 1, 2, 7, 64])
def test_score_shape_dtype_and_finiteness(policy, n):
    s = summaries(n)
    score = policy.score(s)                                    # placement: no query
    assert isinstance(score, torch.Tensor) and score.dtype.is_floating_point
    assert score.shape in ((n,), (n, H)), score.shape
    assert torch.isfinite(score).all()


def test_score_is_pure_and_deterministic(policy):
    s = summaries(9, seed=3)
    before = clone(s)
    a, b = policy.score(s), policy.score(s)
    assert torch.equal(a, b)
    for f in ("kmin", "kmax", "kmean", "mass", "last_used", "tokens"):
        assert torch.equal(getattr(s, f), getattr(before, f)), f"{policy.name} mutated summaries.{f}"
    assert torch.equal(policy.score(clone(s)), a)


def test_score_does_not_alias_its_inputs(policy):
    s = summaries(5, seed=4)
    score = policy.score(s)
    score.add_(1000.0)                                        # the manager may sort/modify the result
    assert torch.equal(s.mass, summaries(5, seed=4).mass) and torch.equal(s.last_used, summaries(5, seed=4).last_used)


# -- exact ------------------------------------------------------------------------------------

def test_exact_selects_all_and_keeps_the_sink_and_the_newest():
    p = get_policy("exact")
    assert p.selects_all
    score = p.score(summaries(6))
    order = torch.argsort(score).tolist()                      # lowest first = demoted first
    assert order == [1, 2, 3, 4, 5, 0]
    assert p.score(summaries(1)).tolist() == [1.0]


# -- lru --------------------------------------------------------------------------------------

def test_lru_ranks_by_last_use_then_newer_index():
    p = get_policy("lru")
    s = summaries(5)
    s = Summaries(kmin=s.kmin, kmax=s.kmax, kmean=s.kmean, mass=s.mass, tokens=s.tokens, step=9,
                  last_used=torch.tensor([7, 3, 9, 3, 0]))
    assert torch.argsort(p.score(s)).tolist() == [4, 1, 3, 0, 2]


# -- placement through the manager ----------------------------------------------------------------

ONE = KVLayout(num_layers=1, kv_heads=H, head_dim=D, block_tokens=4, dtype=torch.float32)


def key(i: int) -> bytes:
    return block_key(hashlib.blake2b(b"p%d" % i, digest_size=16).digest(), 0)


def _store_with_blocks(tmp_path, policy: str, nblocks: int, hot_slots: int):
    store = tierstore.open(tmp_path / policy, hot=hot_slots * ONE.block_bytes, warm=8 * ONE.block_bytes)
    m = store.manager
    seq = m.open_sequence("p", ONE, "cpu", policy=policy)
    for i in range(nblocks):
        k = torch.full((H, 4, D), float(i))
        m.append(seq, 0, k, k)
        m.set_keys(seq, {i: [key(i)]})
    m.flush(seq)
    return store, m, seq


def hot_ids(seq) -> set[int]:
    return {b.index for b in seq.layers[0] if b.hot is not None}


def _positional():
    from tierstore.policies import POLICIES
    return sorted(n for n, cls in POLICIES.items() if not cls.uses_summaries)


@pytest.mark.parametrize("name", _positional())
def test_a_positional_policys_rank_is_its_score_without_summaries(name):
    """Eviction ranks the blocks of every policy that scores without summaries with ``rank``
    (no summaries stacked): it must give each block the value ``score`` gives it."""
    from tierstore.policies import get_policy
    from tierstore.policies.base import Summaries

    assert _positional() == ["exact", "lru", "streaming"]
    p = get_policy(name)
    for n in (1, 2, 7, 40):
        used = torch.randint(0, 50, (n,), generator=torch.Generator().manual_seed(n))
        empty = torch.zeros(n, 0, 0)
        s = Summaries(kmin=empty, kmax=empty, kmean=empty, mass=torch.zeros(n, 0),
                      tokens=torch.full((n,), 4), step=60, last_used=used)
        score = p.score(s).tolist()
        assert [p.rank(i, n, int(used[i])) for i in range(n)] == pytest.approx(score, rel=1e-6)  # score is float32


def test_exact_placement_demotes_the_oldest_but_the_sink(tmp_path):
    store, m, seq = _store_with_blocks(tmp_path, "exact", 4, 4)
    try:
        k = torch.full((H, 4, D), 9.0)
        m.append(seq, 0, k, k)                                 # 5th block: one must leave hot
        assert hot_ids(seq) == {0, 2, 3, 4}
        m.append(seq, 0, k, k)
        assert hot_ids(seq) == {0, 3, 4, 5}
    finally:
        store.close()


def test_lru_placement_keeps_recently_read_blocks(tmp_path):
    store, m, seq = _store_with_blocks(tmp_path, "lru", 4, 4)
    try:
        for i in (1, 0, 3):                                    # block 2 is now least recently read
            with m.acquire(seq, 0, [i]):
                pass
        k = torch.full((H, 4, D), 9.0)
        m.append(seq, 0, k, k)
        assert hot_ids(seq) == {0, 1, 3, 4}
        with m.acquire(seq, 0, [2]) as (b,):                    # back from cold; evicts block 1 (oldest read)
            assert torch.equal(m.hot_view(b)[0], torch.full((H, 4, D), 2.0))
        assert hot_ids(seq) == {0, 2, 3, 4}
    finally:
        store.close()


def test_transient_blocks_leave_hot_first_whatever_the_policy(tmp_path):
    for name in ("exact", "lru"):
        store, m, seq = _store_with_blocks(tmp_path, name, 6, 4)     # blocks 0..5, 4 hot slots
        try:
            cold = sorted(set(range(6)) - hot_ids(seq))
            with m.acquire(seq, 0, cold[:1], transient=True):
                pass
            streamed = cold[0]
            k = torch.full((H, 4, D), 9.0)
            m.append(seq, 0, k, k)
            assert streamed not in hot_ids(seq), name
        finally:
            store.close()


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_every_policy_places_within_budget_and_reads_back(tmp_path, name):
    store, m, seq = _store_with_blocks(tmp_path, name, 10, 4)
    try:
        m.note_attention(seq, 0, [3, 7], torch.tensor([[5.0, 5.0], [0.1, 0.2]]))
        for i in (9, 3, 0, 7, 5, 1):
            with m.acquire(seq, 0, [i], transient=i % 2 == 1) as (b,):
                assert torch.equal(m.hot_view(b)[1], torch.full((H, 4, D), float(i)))
            assert m.usage()["hot_blocks"] <= 4
    finally:
        store.close()

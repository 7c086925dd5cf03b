"""Sparse attention: selection per policy on constructed inputs, recall from cold, exactness at
full budget, padding, the exact switch."""

from __future__ import annotations

import functools

import pytest
import torch
from transformers import DynamicCache

import tierstore
from tierstore.adapters.hf import TieredCache
from tierstore.chain import chain_hashes
from tierstore.layout import KVLayout
from tierstore.policies import POLICIES, Summaries, get_policy
from tierstore.reader import SeqReader
from tierstore.policies.base import GROUP_BLOCKS
from tierstore.sparse import SparseConfig, attend_selected, select, select_blocks, two_level
from tierstore.tiers.cold import block_key

from support import greedy, tiny

SPARSE = sorted(n for n, c in POLICIES.items() if not c.selects_all)
BT = 8


gen = functools.partial(greedy, max_new_tokens=12)


def summaries(n=10, heads=2, d=4, mass=None, kmin=None, kmax=None) -> Summaries:
    z = torch.zeros(n, heads, d)
    return Summaries(kmin=z if kmin is None else kmin, kmax=z if kmax is None else kmax, kmean=z,
                     mass=torch.zeros(n, heads) if mass is None else mass,
                     last_used=torch.zeros(n, dtype=torch.int64), tokens=torch.full((n,), BT), step=0)


CFG = SparseConfig(budget_tokens=4 * BT, sink_blocks=1, window_blocks=1)


def test_streaming_selects_sinks_and_a_window_filling_the_budget():
    assert select_blocks(summaries(), get_policy("streaming"), None, CFG, BT) == [0, 7, 8, 9]


def test_sparse_decoded_kv_is_never_shared_with_an_exact_session(tmp_path):
    """KV decoded under sparse attention depends on the selection: it gets its own chain."""
    model = tiny()
    ids = torch.randint(1, 128, (1, 40))
    with tierstore.open(tmp_path / "kv", hot="1MiB", warm="1MiB", block_tokens=BT) as st:
        with TieredCache(st, model, session="sparse", policy="h2o", budget_tokens=2 * BT) as cache:
            out = model.generate(ids, cache=cache, max_new_tokens=24, do_sample=False, pad_token_id=0)
        with TieredCache(st, model, session="exact") as cache:
            model(input_ids=out[:, :-1], cache=cache, use_cache=True)
        a, b = st.session("sparse"), st.session("exact")
        assert a.token_ids.tolist() == b.token_ids.tolist()
        ca, cb = a.chains(), b.chains()
        shared = sum(x == y for x, y in zip(ca, cb))
        assert shared == 40 // BT  # the prompt's full blocks only
        _, kv_exact = st.load_session("exact")
        ref = DynamicCache()
        model(input_ids=out[:, :-1], cache=ref, use_cache=True)
        for layer, (k, _) in enumerate(kv_exact):
            assert torch.allclose(k, ref.layers[layer].keys[0], atol=1e-5)


@pytest.mark.parametrize("name", ["h2o", "snapkv", "hybrid"])
def test_mass_policies_pick_the_heavy_blocks(name):
    mass = torch.rand(10, 2) * 0.01
    mass[3] += 5.0
    mass[6] += 3.0
    assert select_blocks(summaries(mass=mass), get_policy(name), torch.zeros(2, 1, 4), CFG, BT) == [0, 3, 6, 9]


@pytest.mark.parametrize("name", ["quest", "hybrid"])
def test_query_aware_policies_follow_the_query(name):
    kmin, kmax = torch.full((10, 2, 4), -0.1), torch.full((10, 2, 4), 0.1)
    kmax[4, :, 2] = 9.0   # block 4 has keys far along channel 2
    kmin[7, :, 1] = -9.0  # block 7 far along -channel 1
    q = torch.zeros(2, 3, 4)
    q[:, :, 2] = 1.0
    q[:, 0, 1] = -1.0
    ids = select_blocks(summaries(kmin=kmin, kmax=kmax), get_policy(name), q, CFG, BT)
    assert ids == [0, 4, 7, 9]


def test_budget_as_fraction_and_full_budget():
    s = summaries(n=32)
    assert len(select_blocks(s, get_policy("h2o"), None, SparseConfig(0.25), BT)) == 8
    assert select_blocks(s, get_policy("quest"), torch.zeros(2, 1, 4), SparseConfig(10_000), BT) == list(range(32))


def test_block_in_cold_is_recalled_when_the_query_points_at_it(tmp_path):
    lay = KVLayout(num_layers=1, kv_heads=2, head_dim=4, block_tokens=BT, dtype=torch.float32)
    with tierstore.open(tmp_path / "kv", hot=lay.block_bytes * 4, warm=lay.block_bytes * 2) as st:
        mgr = st.manager
        seq = mgr.open_sequence("s", lay, "cpu", policy="quest")
        ids = list(range(12 * BT))
        seq.chains = chain_hashes(b"r" * 16, ids, BT)[:12]
        torch.manual_seed(0)
        k = torch.randn(2, 12 * BT, 4) * 0.1
        v = torch.randn(2, 12 * BT, 4)
        k[:, 5 * BT:6 * BT, 3] = 6.0  # block 5: keys the query below points at
        mgr.append(seq, 0, k, v)
        mgr.flush(seq)
        b5 = mgr.blocks(seq, 0)[5]
        assert b5.hot is None and b5.warm is None and b5.durable  # only in cold
        q = torch.zeros(4, 1, 4)
        q[:, :, 3] = 1.0
        before = mgr.counters.promotions.get("cold", 0)
        sel = select_blocks(mgr.summaries(seq, 0), seq.policy, q.reshape(2, 2, 4), CFG, BT)  # (union of heads)
        assert 5 in sel
        out, mass = attend_selected(SeqReader(mgr, seq), 0, q, 12 * BT - 1, None, 0.5, sel)
        assert mgr.counters.promotions.get("cold", 0) > before       # read from cold
        assert int(mass.sum(-1).argmax()) == sel.index(5)            # and attended most
        # the output equals dense attention restricted to the selected tokens
        cols = torch.cat([torch.arange(i * BT, (i + 1) * BT) for i in sel])
        ref = torch.softmax(q.reshape(2, 2, 4) @ k[:, cols].transpose(-1, -2) * 0.5, -1) @ v[:, cols]
        assert torch.allclose(out.reshape(2, 2, 4), ref, atol=1e-5)


@pytest.mark.parametrize("name", SPARSE)
def test_full_budget_reproduces_exact(tmp_path, name):
    model = tiny()
    ids = torch.randint(1, 128, (1, 45))
    ref = gen(model, ids, DynamicCache())
    bb = KVLayout(2, 2, 16, BT, torch.float32).block_bytes
    with tierstore.open(tmp_path / "kv", hot=bb * 8, warm=bb * 8, block_tokens=BT) as st, \
            TieredCache(st, model, policy=name, budget_tokens=10_000) as cache:
        out = gen(model, ids, cache)
    assert torch.equal(out.sequences, ref.sequences)
    assert max((a - b).abs().max().item() for a, b in zip(out.scores, ref.scores)) < 1e-4


def test_padding_bs2_in_sparse_mode(tmp_path):
    model = tiny()
    ids = torch.randint(1, 128, (2, 30))
    mask = torch.ones_like(ids)
    ids[0, :6], mask[0, :6] = 0, 0
    ref = gen(model, ids, DynamicCache(), attention_mask=mask)
    with tierstore.open(tmp_path / "kv", hot="1MiB", warm="1MiB", block_tokens=BT) as st, \
            TieredCache(st, model, policy="hybrid", budget_tokens=10_000) as cache:
        out = gen(model, ids, cache, attention_mask=mask)
    assert torch.equal(out.sequences, ref.sequences)
    assert max((a - b).abs().max().item() for a, b in zip(out.scores, ref.scores)) < 1e-4


def test_small_budget_attends_fewer_tokens_and_exact_switch(tmp_path):
    model = tiny()
    ids = torch.randint(1, 128, (1, 120))
    with tierstore.open(tmp_path / "kv", hot="1MiB", warm="1MiB", block_tokens=BT) as st:
        with TieredCache(st, model, policy="quest", budget_tokens=4 * BT) as cache:
            model(input_ids=ids, cache=cache, use_cache=True)
            step = model(input_ids=ids[:, :1], cache=cache, use_cache=True).logits
            assert all(n <= 4 * BT for n in cache.attended.values())
            cache.crop(-1)
            with cache.exact():
                exact = model(input_ids=ids[:, :1], cache=cache, use_cache=True).logits
        ref = model(input_ids=torch.cat([ids, ids[:, :1]], 1), cache=DynamicCache(), use_cache=True).logits[:, -1:]
        assert (exact - ref).abs().max() < 1e-4
        assert (step - ref).abs().max() > 0  # the sparse step really saw less


def test_attention_mass_is_committed_and_resumed(tmp_path):
    from tierstore.records import BlockSummary
    model = tiny()
    ids = torch.randint(1, 128, (1, 64))
    with tierstore.open(tmp_path / "kv", hot="1MiB", warm="1MiB", block_tokens=BT) as st:
        with TieredCache(st, model, session="m", policy="h2o", budget_tokens=4 * BT) as cache:
            model(input_ids=ids, cache=cache, use_cache=True)           # prefill window mass
            for t in range(3):                                          # decode steps add mass
                model(input_ids=ids[:, t:t + 1], cache=cache, use_cache=True)
            live = cache.mgr.summaries(cache.seqs[0], 1).mass.clone()
        rec = st.session("m")
        chains = rec.chains()
        stored = torch.stack([BlockSummary.unseal(block_key(c, 1), st.cold.get("summaries", block_key(c, 1))).mass
                              for c in chains[:rec.length // BT]])
        assert stored.sum() > 0
        assert torch.allclose(stored, live[:len(stored)])
        with TieredCache.resume(st, model, "m", policy="h2o", budget_tokens=4 * BT) as cache:
            assert torch.allclose(cache.mgr.summaries(cache.seqs[0], 1).mass[:len(stored)], stored)


def test_dense_layers_attend_everything_at_sparse_steps(tmp_path):
    model = tiny()  # 2 layers
    ids = torch.randint(1, 128, (1, 120))
    ref = model(input_ids=torch.cat([ids, ids[:, :1]], 1), cache=DynamicCache(), use_cache=True).logits[:, -1:]
    with tierstore.open(tmp_path / "kv", hot="1MiB", warm="1MiB", block_tokens=BT) as st:
        with TieredCache(st, model, policy="quest", budget_tokens=4 * BT, dense_layers=1) as cache:
            model(input_ids=ids, cache=cache, use_cache=True)
            step = model(input_ids=ids[:, :1], cache=cache, use_cache=True).logits
            assert set(cache.rows[0].selected) == {1} and set(cache.attended) == {1}  # layer 0 was dense
            assert cache.attended[1] <= 4 * BT
            assert (step - ref).abs().max() > 0
        with TieredCache(st, model, policy="quest", budget_tokens=4 * BT, dense_layers=[0, 1]) as cache:
            model(input_ids=ids, cache=cache, use_cache=True)
            every = model(input_ids=ids[:, :1], cache=cache, use_cache=True).logits
            assert cache.rows[0].selected == {}
        assert (every - ref).abs().max() < 1e-4                       # all layers dense: exact
        with pytest.raises(ValueError, match="dense_layers"):
            TieredCache(st, model, policy="quest", budget_tokens=4 * BT, dense_layers=[2])


def test_per_head_selection_takes_each_heads_own_top_blocks():
    """Head 0 points at block 3, head 1 at block 6: shared selection (summed scores) keeps only the
    larger; per-head selection keeps each head's own, and the mask says which head reads which."""
    mass = torch.zeros(10, 2)
    mass[3, 0], mass[6, 1], mass[4, 0], mass[4, 1] = 9.0, 5.0, 6.0, 0.5
    cfg = SparseConfig(budget_tokens=4 * BT, sink_blocks=1, window_blocks=1)   # room for 2 top blocks
    assert select_blocks(summaries(mass=mass), get_policy("h2o"), None, cfg, BT) == [0, 3, 4, 9]
    ph = SparseConfig(budget_tokens=4 * BT, sink_blocks=1, window_blocks=1, per_head=True)
    from tierstore.sparse import select
    ids, heads = select(summaries(mass=mass), get_policy("h2o"), None, ph, BT)
    assert ids == [0, 3, 4, 6, 9]
    assert heads.tolist() == [[True, True, True, False, True],    # head 0: sinks, window, 3, 4
                              [True, False, True, True, True]]    # head 1: sinks, window, 6, 4
    # shared mode for a per-head policy: one selection
    ids, heads = select(summaries(mass=mass), get_policy("h2o"), None, cfg, BT)
    assert heads is None and ids == [0, 3, 4, 9]


@pytest.mark.parametrize("hot", [16, 4])  # all blocks hot / most read in place from warm
def test_head_masked_attention_equals_each_heads_own_dense_attention(tmp_path, hot):
    lay = KVLayout(num_layers=1, kv_heads=2, head_dim=4, block_tokens=BT, dtype=torch.float32)
    with tierstore.open(tmp_path / "kv", hot=lay.block_bytes * hot, warm=lay.block_bytes * 6) as st:
        mgr = st.manager
        seq = mgr.open_sequence("s", lay, "cpu", policy="quest")
        torch.manual_seed(1)
        n = 6 * BT + 3  # a partial tail block
        k, v = torch.randn(2, n, 4), torch.randn(2, n, 4)
        mgr.append(seq, 0, k, v)
        ids = [0, 2, 3, 6]
        q = torch.randn(4, 1, 4)
        qg = q.reshape(2, 2, 4)
        for heads in (torch.tensor([[True, True, False, True], [True, False, True, True]]),
                      torch.tensor([[True, True, False, True], [True, False, False, True]])):  # unequal counts too
            warm_reads = mgr.counters.warm_in_place
            out, mass = attend_selected(SeqReader(mgr, seq), 0, q, n - 1, None, 0.5, ids, heads)
            assert (mgr.counters.warm_in_place > warm_reads) == (hot == 4)
            check_own_heads(out, mass, qg, k, v, ids, heads, n)


def check_own_heads(out, mass, qg, k, v, ids, heads, n):
    """Each KV head's group: dense attention over its own blocks of ``ids``; its mass per block."""
    for h in range(2):
        cols = torch.cat([torch.arange(i * BT, min((i + 1) * BT, n)) for i, on in zip(ids, heads[h]) if on])
        p = torch.softmax(qg[h] @ k[h, cols].T * 0.5, -1)
        assert torch.allclose(out.reshape(2, 2, 4)[h], p @ v[h, cols], atol=1e-5)
        for j, i in enumerate(ids):  # mass per block and head: the probability on its tokens
            want = float(p[:, (cols >= i * BT) & (cols < (i + 1) * BT)].sum())
            assert abs(float(mass[j, h]) - want) < 1e-5


def test_quest_bound_equals_the_elementwise_definition():
    from tierstore.policies.quest import quest_bound
    torch.manual_seed(2)
    lo = torch.randn(7, 3, 5)
    s = summaries(n=7, heads=3, d=5, kmin=lo, kmax=lo + torch.rand(7, 3, 5))
    q = torch.randn(3, 4, 5)
    want = torch.maximum(q.unsqueeze(0) * s.kmin.unsqueeze(2), q.unsqueeze(0) * s.kmax.unsqueeze(2)).sum(-1).amax(-1)
    assert torch.allclose(quest_bound(s, q), want, atol=1e-5)


def test_stacked_summaries_follow_appends_growth_mass_and_truncation(tmp_path):
    """The per-layer stack is updated in place; it must always equal a stack built afresh."""
    lay = KVLayout(num_layers=1, kv_heads=2, head_dim=4, block_tokens=BT, dtype=torch.float32)
    with tierstore.open(tmp_path / "kv", hot=lay.block_bytes * 64, warm=lay.block_bytes * 4) as st:
        mgr = st.manager
        seq = mgr.open_sequence("s", lay, "cpu", policy="h2o")
        torch.manual_seed(3)
        keys = torch.randn(2, 0, 4)

        def check():
            s = mgr.summaries(seq, 0)
            n = keys.shape[1]
            assert s.n == -(-n // BT)
            for i in range(s.n):
                kb = keys[:, i * BT:(i + 1) * BT]
                assert torch.allclose(s.kmin[i], kb.amin(1)) and torch.allclose(s.kmax[i], kb.amax(1))
                assert int(s.tokens[i]) == kb.shape[1]
            G = GROUP_BLOCKS * BT  # the group boxes (two-level selection) follow their blocks
            assert s.gmin.shape[0] == -(-s.n // GROUP_BLOCKS)
            for gi in range(s.gmin.shape[0]):
                kg = keys[:, gi * G:(gi + 1) * G]
                assert torch.equal(s.gmin[gi], kg.amin(1)) and torch.equal(s.gmax[gi], kg.amax(1))
        for step in (13, 1, 1, 7, 30, 1, 2, 200, 1):  # prefill-sized and decode-sized appends
            kk = torch.randn(2, step, 4)
            keys = torch.cat([keys, kk], 1)
            mgr.append(seq, 0, kk, torch.randn(2, step, 4))
            check()
        mgr.note_attention(seq, 0, [1, 3], torch.tensor([[0.5, 0.25], [1.0, 2.0]]))
        s = mgr.summaries(seq, 0)
        assert s.mass[1].tolist() == [0.5, 0.25] and s.mass[3].tolist() == [1.0, 2.0]
        mgr.sync_mass(seq)  # what a commit persists
        assert mgr.blocks(seq, 0)[3].summary.mass.tolist() == [1.0, 2.0]
        mgr.truncate(seq, 2 * BT + 5)
        keys = keys[:, :2 * BT + 5]
        check()
        assert mgr.summaries(seq, 0).mass[1].tolist() == [0.5, 0.25]


def test_bench_sparse_rows_on_a_tiny_model(tmp_path):
    """`tierstore bench sparse` end to end on a tiny model: one row per mode, the sparse row
    attends at most its budget per head, and the resumed blocks that did not fit hot were read
    into warm in the background; with ``store`` the prefilled context is kept and a second run
    resumes it instead of prefilling (its DynamicCache row is filled from the stored KV)."""
    from types import SimpleNamespace

    from tierstore.tools.bench.sparse import measure

    class Tok:
        def __call__(self, text, return_tensors="pt"):
            return SimpleNamespace(input_ids=torch.tensor([[b % 128 for b in text.encode()]]))

    kw = dict(tokens=640, budget=64, new=3, policies=["quest"], hot=None, block_tokens=BT, dense_layers=1,
              warmup=2, per_head=True, store=str(tmp_path / "ctx"))
    model = tiny()
    rows = measure(model, Tok(), **kw)
    with tierstore.open(tmp_path / "ctx") as st:
        rec = st.session("ctx-640")
        assert rec.length == 640 and rec.last_logits is not None
    again = measure(model, None, **kw, rounds=2)           # no tokenizer: it must not prefill again; rows in turn
    with tierstore.open(tmp_path / "ctx") as st:
        assert st.session("ctx-640").created == rec.created
    assert [r["mode"] for r in again] == [r["mode"] for r in rows]
    assert [r["mode"] for r in rows] == ["DynamicCache", "exact", "quest @64"]
    assert all(r["tok_s"] > 0 and r["first_tok_s"] > 0 for r in rows)
    q = rows[2]
    assert q["attended"] <= 64 and q["hot_budget"] < 640 * KVLayout(2, 2, 16, BT, torch.float32).token_bytes
    assert q["warm_filled"] > 0
    short = tiny(max_position_embeddings=512)       # trained on 512 positions: extend engages at 640
    both = measure(short, Tok(), **{**kw, "new": 2}, positions=("model", "extend"))
    assert [r["mode"] for r in both] == ["DynamicCache", "exact", "quest @64", "quest @64 extend"]
    assert [r.get("positions") for r in both[1:]] == ["model", "model", "extend"]
    assert all(r["tok_s"] > 0 for r in both) and both[3]["attended"] <= 64


def test_decode_mass_reaches_the_committed_summaries(tmp_path):
    """Mass fed back at decode steps lands in the stacked summaries first; a commit must persist
    exactly what the live stack holds (and a crop must not lose it)."""
    from tierstore.records import BlockSummary
    model = tiny()
    ids = torch.randint(1, 128, (1, 40))
    bb = KVLayout(2, 2, 16, BT, torch.float32).block_bytes
    with tierstore.open(tmp_path / "kv", hot=bb * 32, warm=bb * 32, block_tokens=BT) as st:
        with TieredCache(st, model, session="m", policy="h2o", budget_tokens=4 * BT) as cache:
            model.generate(ids, cache=cache, max_new_tokens=12, do_sample=False, pad_token_id=0)
            seq = cache.seqs[0]
            assert 0 in st.manager.index.stacked_layers(seq)  # the policy scored: its mass went to the stack
            before = st.manager.summaries(seq, 1).mass[0].clone()
            cache.crop(-3)  # drops the stacks: their mass must be written back first
            live = [st.manager.summaries(seq, layer).mass.clone() for layer in range(2)]
            assert torch.equal(live[1][0], before) and float(before.sum()) > 0
            cache.commit()
        rec = st.session("m")
        chains = rec.chains()
        for layer in range(2):
            keys = [block_key(c, layer) for c in chains]
            for i, (k, r) in enumerate(zip(keys, st.cold.get_many("summaries", keys))):
                assert torch.allclose(BlockSummary.unseal(k, bytes(r)).mass, live[layer][i]), (layer, i)


def test_sparse_settings_as_one_config_equal_the_keyword_forms(tmp_path):
    """``sparse=SparseConfig(...)`` is the same cache as its keywords; an exact policy refuses it."""
    model = tiny()
    ids = torch.randint(1, 128, (1, 100))
    cfg = SparseConfig(4 * BT, sink_blocks=1, window_blocks=1, dense_layers=frozenset({0}), per_head=True)
    outs = []
    with tierstore.open(tmp_path / "kv", hot="1MiB", warm="1MiB", block_tokens=BT) as st:
        for kw in ({"sparse": cfg}, {"budget_tokens": 4 * BT, "window_blocks": 1, "dense_layers": 1, "per_head": True}):
            with TieredCache(st, model, policy="sketch", **kw) as cache:
                assert cache.sparse == cfg
                outs.append(gen(model, ids, cache))
                assert set(cache.rows[0].selected) == {1} and cache.attended[1] <= 4 * BT
        with pytest.raises(ValueError, match="sparse policy"):
            TieredCache(st, model, policy="exact", sparse=cfg)
    assert torch.equal(outs[0].sequences, outs[1].sequences)


def _grouped(s: Summaries) -> Summaries:
    """``s`` with the group boxes a stack keeps."""
    import dataclasses
    g = -(-s.n // GROUP_BLOCKS)
    gmin = torch.stack([s.kmin[i * GROUP_BLOCKS:(i + 1) * GROUP_BLOCKS].amin(0) for i in range(g)])
    gmax = torch.stack([s.kmax[i * GROUP_BLOCKS:(i + 1) * GROUP_BLOCKS].amax(0) for i in range(g)])
    return dataclasses.replace(s, gmin=gmin, gmax=gmax)


@pytest.mark.parametrize("policy", ["quest", "sketch"])
def test_two_level_selection_equals_brute_force_when_every_group_is_a_candidate(policy):
    """With candidates enough for every group, two-level scores are the policy's own, bit for
    bit; with fewer, each head's candidates are whole groups (the newest always), at least the
    number asked, and hold the block whose key matches that head's query."""
    from tierstore.sketch import Basis
    torch.manual_seed(4)
    n, g, d, r = 5 * GROUP_BLOCKS + 3, 2, 8, 4
    k = torch.randn(n, BT, g, d)
    kmean = k.mean(1)
    vecs = torch.linalg.qr(torch.randn(g, d, r))[0]
    sketch = torch.einsum("ntgd,gdr->gntr", k - kmean.unsqueeze(1), vecs)
    base = Summaries(kmin=k.amin(1), kmax=k.amax(1), kmean=kmean, mass=torch.zeros(n, g),
                     tokens=torch.full((n,), BT), step=0, sketch=sketch, basis=Basis.of(vecs).vectors)
    s = _grouped(base)
    pol = get_policy(policy)
    q = torch.randn(g, 3, d)
    assert torch.equal(two_level(s, pol, q, want=n), pol.score(base, q).float())
    for trial in range(20):                       # brute force: the best block per head is a candidate
        q = torch.randn(g, 3, d) * 3
        planted = [int(torch.randint(0, n - GROUP_BLOCKS, ())) for _ in range(g)]
        k2 = k.clone()
        for h, b in enumerate(planted):
            k2[b, 0, h] = q[h, 0] * 4             # a key that matches head h's first query row
        km = k2.mean(1)
        s2 = _grouped(Summaries(kmin=k2.amin(1), kmax=k2.amax(1), kmean=km, mass=torch.zeros(n, g),
                                tokens=torch.full((n,), BT), step=0,
                                sketch=torch.einsum("ntgd,gdr->gntr", k2 - km.unsqueeze(1), vecs),
                                basis=vecs))
        sc = two_level(s2, pol, q, want=2 * GROUP_BLOCKS)
        cand = torch.isfinite(sc)
        for h, b in enumerate(planted):
            assert cand[b, h]
            assert cand[-1, h] and int(cand[:, h].sum()) >= 2 * GROUP_BLOCKS
            groups = cand[:, h][:n // GROUP_BLOCKS * GROUP_BLOCKS].view(-1, GROUP_BLOCKS)
            assert bool((groups.all(1) | ~groups.any(1)).all())   # whole groups
    cfg = SparseConfig(budget_tokens=4 * BT, sink_blocks=1, window_blocks=1, coarse=4)
    ids, mask = select(s2, pol, q, cfg, BT)          # through select: per head its budget, from candidates
    assert mask is not None and mask.sum(1).tolist() == [4, 4] and ids[0] == 0 and ids[-1] == n - 1
    assert all(bool(mask[h, ids.index(b)]) for h, b in enumerate(planted))  # each head finds its key


def test_selected_attention_without_mass_gives_the_same_output_and_masks_keys_after_the_query(tmp_path):
    """``mass=False`` (a policy that does not accumulate it) returns the same output and no mass.
    A decode query skips the causal mask only when it is at or after every key: a query older
    than the newest selected key still does not see it."""
    lay = KVLayout(num_layers=1, kv_heads=2, head_dim=4, block_tokens=BT, dtype=torch.float32)
    with tierstore.open(tmp_path / "kv", hot=lay.block_bytes * 16, warm=lay.block_bytes * 6) as st:
        mgr = st.manager
        seq = mgr.open_sequence("s", lay, "cpu", policy="quest")
        torch.manual_seed(3)
        n = 6 * BT + 3
        k, v = torch.randn(2, n, 4), torch.randn(2, n, 4)
        mgr.append(seq, 0, k, v)
        ids, q = [0, 2, 6], torch.randn(4, 1, 4)
        heads = torch.tensor([[True, True, True], [True, False, True]])
        out, mass = attend_selected(SeqReader(mgr, seq), 0, q, n - 1, None, 0.5, ids, heads)
        bare, none = attend_selected(SeqReader(mgr, seq), 0, q, n - 1, None, 0.5, ids, heads, mass=False)
        assert none is None and torch.equal(out, bare)
        at = 6 * BT  # a query at the first token of block 6: its later tokens are masked
        early, _ = attend_selected(SeqReader(mgr, seq), 0, q, at, None, 0.5, ids, None, mass=False)
        cols = torch.cat([torch.arange(i * BT, min((i + 1) * BT, at + 1)) for i in ids])
        ref = torch.softmax(q.reshape(2, 2, 4) @ k[:, cols].transpose(-1, -2) * 0.5, -1) @ v[:, cols]
        assert torch.allclose(early.reshape(2, 2, 4), ref, atol=1e-5)

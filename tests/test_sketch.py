"""Key sketches (tierstore.sketch): the basis, the byte forms, the score, calibration in the
manager, persistence across a store reopen, and the ranking they buy over the Quest bound."""

from __future__ import annotations

import logging
import time

import pytest
import torch

import tierstore
from tierstore.chain import chain_hashes
from tierstore.errors import CorruptBlockError, CorruptRecordError
from tierstore.layout import KVLayout
from tierstore.policies import Summaries, get_policy
from tierstore.policies.quest import quest_bound
from tierstore.records import BlockSummary
from tierstore.sketch import CALIB_TOKENS, Basis, basis_key, sketch_score
from tierstore.sparse import SparseConfig, select
from tierstore.tiers.schema import block_key

from support import tiny

BT = 8
LAY = KVLayout(num_layers=2, kv_heads=2, head_dim=16, block_tokens=BT, dtype=torch.float32)


def _basis(g=2, d=16, r=4, seed=0) -> Basis:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(g, 256, d, generator=gen) * torch.linspace(3, 0.1, d)
    return Basis.fit(x.transpose(1, 2) @ x, r)


def test_basis_fit_is_orthonormal_and_finds_the_dominant_directions():
    b = _basis(r=4)
    v = b.vectors
    assert v.shape == (2, 16, 4)
    assert torch.allclose(v.transpose(1, 2) @ v, torch.eye(4).expand(2, 4, 4), atol=1e-5)
    # the data's variance falls along the channel index: the top directions are channels 0..3
    assert set(v.abs().argmax(1)[0].tolist()) == {0, 1, 2, 3}
    assert len(b.tag) == 8 and _basis(seed=1).tag != b.tag


def test_basis_bytes_round_trip_and_damage_is_a_located_error():
    b = _basis()
    key = basis_key(LAY, 1)
    back = Basis.unseal(key, b.seal(key))
    assert torch.equal(back.vectors, b.vectors) and back.tag == b.tag
    raw = bytearray(b.seal(key))
    raw[-3] ^= 0x40
    with pytest.raises(CorruptRecordError, match="sketch"):
        Basis.unseal(key, bytes(raw))
    with pytest.raises(CorruptRecordError):  # stored under another layer's key
        Basis.unseal(basis_key(LAY, 0), b.seal(key))


def test_summary_with_sketch_round_trips_and_old_summaries_still_read():
    b = _basis()
    k = torch.randn(2, 5, 16)
    s = BlockSummary.of_keys(k, b)
    assert s.sketch.shape == (2, 5, 4) and s.tag == b.tag
    assert s.sketch.dtype == torch.float16
    assert torch.allclose(s.sketch.float(), (k - k.mean(1, keepdim=True)) @ b.vectors, atol=2e-3, rtol=2e-3)
    back = BlockSummary.from_bytes(s.to_bytes())
    assert torch.equal(back.sketch, s.sketch) and back.tag == b.tag and back.tokens == 5
    old = BlockSummary.of_keys(k)  # a summary written before sketches existed
    assert old.sketch is None and BlockSummary.from_bytes(old.to_bytes()).sketch is None
    with pytest.raises(CorruptBlockError, match="sketch"):
        BlockSummary.from_bytes(s.to_bytes()[:-4], layer=0, block=3)


def test_score_with_a_full_basis_is_the_exact_attention_share_of_each_block():
    """With r = head_dim the sketch is the key itself: the score is the softmax mass per block."""
    g, d, n, rows = 2, 16, 6, 3
    basis = _basis(g=g, d=d, r=d)
    k = torch.randn(g, n * BT, d)
    tokens = torch.full((n,), BT)
    tokens[-1] = 5  # a partial tail: its last 3 slots hold nothing
    blocks = [k[:, i * BT:i * BT + int(tokens[i])] for i in range(n)]
    sums = [BlockSummary.of_keys(b, basis) for b in blocks]
    sketch = torch.zeros(g, n, BT, d, dtype=torch.float16)
    for i, s in enumerate(sums):
        sketch[:, i, :s.tokens] = s.sketch
    kmean = torch.stack([s.kmean for s in sums])
    q = torch.randn(g, rows, d)
    got = sketch_score(kmean, sketch, basis.vectors, tokens, q)
    keys = torch.cat(blocks, 1)
    p = torch.softmax(q @ keys.transpose(1, 2) * d ** -0.5, -1).sum(1)     # [g, T]
    owner = torch.repeat_interleave(torch.arange(n), tokens)
    want = torch.zeros(n, g).index_add_(0, owner, p.T)
    assert torch.allclose(got, want, atol=2e-3)  # (float16 sketches)


def test_sketch_ranks_the_block_holding_the_matching_key_where_the_bound_does_not():
    """Block 3 holds one key along the query; block 6 spreads widely on every channel (a large
    box, so a large Quest bound) but no key of it matches the query."""
    g, d, n = 1, 16, 10
    gen = torch.Generator().manual_seed(0)
    keys = torch.randn(g, n * BT, d, generator=gen) * 0.3
    q = torch.zeros(g, 1, d)
    q[..., :4] = 1.0
    keys[:, 3 * BT + 2, :4] = 2.5                       # the needle
    pattern = torch.tensor([3.0, -3.0, 3.0, -3.0])
    for j in range(BT):                                 # +-3 alternating: each key scores 0, the box 12
        keys[:, 6 * BT + j, :4] = pattern * (1 if j % 2 else -1)
    delta = torch.cat([keys[:, i * BT:(i + 1) * BT] - keys[:, i * BT:(i + 1) * BT].mean(1, keepdim=True)
                       for i in range(n)], 1)
    basis = Basis.fit(delta.transpose(1, 2) @ delta, 8)
    sums = [BlockSummary.of_keys(keys[:, i * BT:(i + 1) * BT], basis) for i in range(n)]
    s = Summaries(kmin=torch.stack([x.kmin for x in sums]), kmax=torch.stack([x.kmax for x in sums]),
                  kmean=torch.stack([x.kmean for x in sums]), mass=torch.zeros(n, g),
                  tokens=torch.full((n,), BT), step=0,
                  sketch=torch.stack([x.sketch for x in sums], 1), basis=basis.vectors)
    exact = torch.zeros(n).index_add_(0, torch.arange(n * BT) // BT,
                                      torch.softmax(q[0] @ keys[0].T / 4, -1)[0])
    assert int(exact.argmax()) == 3
    bound = quest_bound(s, q)[:, 0]
    assert bound[6] > bound[3]                          # the bound prefers the wide block
    cfg = SparseConfig(budget_tokens=4 * BT, sink_blocks=1, window_blocks=2)
    assert select(s, get_policy("quest"), q, cfg, BT)[0] == [0, 6, 8, 9]
    assert select(s, get_policy("sketch"), q, cfg, BT)[0] == [0, 3, 8, 9]


def test_without_a_basis_the_sketch_policy_is_the_quest_bound():
    s = Summaries(kmin=torch.randn(5, 2, 4) - 1, kmax=torch.randn(5, 2, 4) + 1, kmean=torch.zeros(5, 2, 4),
                  mass=torch.zeros(5, 2), tokens=torch.full((5,), BT), step=0)
    q = torch.randn(2, 3, 4)
    assert torch.equal(get_policy("sketch").score(s, q), quest_bound(s, q))


def _fill(mgr, seq, n_tokens, seed=0, chunk=24):
    gen = torch.Generator().manual_seed(seed)
    ks, vs = [], []
    if not seq.chains:  # keys for every block the tests append
        seq.chains = chain_hashes(bytes([65 + seed]) * 16, list(range(4096)), BT)
    for t in range(0, n_tokens, chunk):
        n = min(chunk, n_tokens - t)
        for layer in range(LAY.num_layers):
            k, v = torch.randn(2, n, 16, generator=gen), torch.randn(2, n, 16, generator=gen)
            mgr.append(seq, layer, k, v)
            if layer == 0:
                ks.append(k)
                vs.append(v)
    return torch.cat(ks, 1)


def _wait_background(mgr):
    for _ in range(2):
        mgr.writeback.encoders.submit(lambda: None).result()


def test_calibration_fits_stores_and_sketches_every_block(tmp_path):
    with tierstore.open(tmp_path / "kv", hot=LAY.block_bytes * 400, warm=LAY.block_bytes * 8,
                        block_tokens=BT) as st:
        mgr = st.manager
        seq = mgr.open_sequence("s", LAY, "cpu", policy="sketch")
        assert mgr.calibrator.basis(LAY, 0) is None
        _fill(mgr, seq, CALIB_TOKENS - BT)
        assert mgr.calibrator.basis(LAY, 0) is None  # not enough tokens yet
        _fill(mgr, seq, 11 * BT, seed=1)
        basis = mgr.calibrator.basis(LAY, 0)
        assert basis is not None and basis.dims == 16
        _wait_background(mgr)
        stored = st.cold.get("meta", basis_key(LAY, 0))
        for _ in range(100):  # the store is a background task: bounded wait (a busy machine delays it)
            if stored is not None:
                break
            time.sleep(0.1)
            stored = st.cold.get("meta", basis_key(LAY, 0))
        assert Basis.unseal(basis_key(LAY, 0), stored).tag == basis.tag
        s = mgr.summaries(seq, 0)
        assert s.sketch.shape == (2, s.n, BT, 16) and torch.equal(s.basis, basis.vectors)
        # blocks sealed before the fit (gathered for it) and after it all carry the sketch
        blocks = mgr.blocks(seq, 0)
        assert all(b.summary.tag == basis.tag for b in blocks if b.sealed)
        assert bool((s.sketch[:, :-1].abs().sum((0, 2, 3)) > 0).all())


def test_sketches_survive_a_commit_and_a_reopen_and_rank_the_same(tmp_path):
    from tierstore.adapters.hf import TieredCache
    model = tiny(max_position_embeddings=2048)
    ids = torch.randint(1, 128, (1, CALIB_TOKENS + 200))
    q = torch.randn(2, 2, 16)
    sc = SparseConfig(budget_tokens=8 * BT)
    with tierstore.open(tmp_path / "kv", hot="8MiB", warm="8MiB", block_tokens=BT) as st:
        with TieredCache(st, model, session="s", policy="sketch") as cache, torch.no_grad():
            for s in range(0, ids.shape[1], 256):
                model(input_ids=ids[:, s:s + 256], cache=cache, use_cache=True)
            summ = [st.manager.summaries(cache.seqs[0], layer) for layer in range(2)]
            before = [select(summ[layer], get_policy("sketch"), q, sc, BT) for layer in range(2)]
            tags = [st.manager.calibrator.basis(cache.layout, layer).tag for layer in range(2)]
    with tierstore.open(tmp_path / "kv", hot="8MiB", warm="8MiB", block_tokens=BT) as st:
        cache = TieredCache.resume(st, model, "s", policy="sketch", budget_tokens=8 * BT)
        try:
            mgr = st.manager
            for layer in range(2):
                assert mgr.calibrator.basis(cache.layout, layer).tag == tags[layer]
                blocks = mgr.blocks(cache.seqs[0], layer)
                assert all(b.summary.tag == tags[layer] for b in blocks if b.sealed)
                s = mgr.summaries(cache.seqs[0], layer)
                assert torch.allclose(s.sketch, summ[layer].sketch)
                ids, heads = select(s, get_policy("sketch"), q, sc, BT)
                assert ids == before[layer][0] and torch.equal(heads, before[layer][1])
                assert len(ids) < s.n  # a real selection, not everything
        finally:
            cache.close()


def test_a_basis_stored_first_by_another_process_is_adopted(tmp_path):
    with tierstore.open(tmp_path / "kv", hot=LAY.block_bytes * 400, warm=LAY.block_bytes * 8,
                        block_tokens=BT) as st:
        mgr = st.manager
        seq = mgr.open_sequence("s", LAY, "cpu", policy="sketch")
        assert mgr.calibrator.basis(LAY, 0) is None    # looked up (and cached) before the other stored it
        theirs = _basis(d=16, r=16, seed=5)
        st.cold.put_many("meta", [(basis_key(LAY, 0), theirs.seal(basis_key(LAY, 0)))])
        _fill(mgr, seq, CALIB_TOKENS + 4 * BT)
        _wait_background(mgr)
        assert mgr.calibrator.basis(LAY, 0).tag == theirs.tag
        s = mgr.summaries(seq, 0)                      # resident blocks are sketched again in it
        assert all(b.summary.tag == theirs.tag for b in mgr.blocks(seq, 0) if b.sealed)
        assert torch.equal(s.basis, theirs.vectors)


def test_no_sketches_when_turned_off_and_a_damaged_basis_is_not_used(tmp_path, caplog):
    with tierstore.open(tmp_path / "a", hot=LAY.block_bytes * 400, warm=LAY.block_bytes * 8, block_tokens=BT,
                        sketch_dims=0) as st:
        seq = st.manager.open_sequence("s", LAY, "cpu", policy="sketch")
        _fill(st.manager, seq, CALIB_TOKENS + 4 * BT)
        assert st.manager.summaries(seq, 0).sketch is None
        assert st.cold.get("meta", basis_key(LAY, 0)) is None
    with tierstore.open(tmp_path / "b", hot=LAY.block_bytes * 400, warm=LAY.block_bytes * 8, block_tokens=BT) as st:
        raw = bytearray(_basis(d=16, r=8).seal(basis_key(LAY, 0)))
        raw[-1] ^= 1
        st.cold.put_many("meta", [(basis_key(LAY, 0), bytes(raw))])
        seq = st.manager.open_sequence("s", LAY, "cpu", policy="sketch")
        with caplog.at_level(logging.WARNING, logger="tierstore.calibrator"):
            _fill(st.manager, seq, 4 * BT)
        assert "without key sketches" in caplog.text
        assert st.manager.calibrator.basis(LAY, 0) is None
        from tierstore.maintenance.verify import verify_store
        rep = verify_store(st)
        assert [w.kind for w in rep.warnings] == ["corrupt_sketch_basis"] and "sketch basis" in rep.warnings[0].reason


def test_mass_on_the_stack_survives_the_restack_when_the_basis_appears(tmp_path):
    with tierstore.open(tmp_path / "kv", hot=LAY.block_bytes * 400, warm=LAY.block_bytes * 8,
                        block_tokens=BT) as st:
        mgr = st.manager
        seq = mgr.open_sequence("s", LAY, "cpu", policy="sketch")
        _fill(mgr, seq, 20 * BT)
        assert mgr.summaries(seq, 0).sketch is None                  # stacked, no basis yet
        mass = torch.rand(20, 2)
        mgr.note_attention(seq, 0, list(range(20)), mass)           # sealed rows: on the stack only
        _fill(mgr, seq, CALIB_TOKENS, seed=1)                       # the basis is fitted
        s = mgr.summaries(seq, 0)                                   # restacked with sketches
        assert s.sketch is not None
        assert torch.allclose(s.mass[:20], mass)


def test_a_whole_session_put_at_once_fits_the_basis_and_is_stored_sketched(tmp_path):
    """put_session seals no block through a cache: it fits the layers' bases from the session's
    own first keys (when the store has none) and stores every summary sketched in them; a
    session shorter than the calibration stores plain summaries."""
    torch.manual_seed(3)
    n = CALIB_TOKENS + 5 * BT + 3
    kv = [(torch.randn(2, n, 16), torch.randn(2, n, 16)) for _ in range(LAY.num_layers)]
    with tierstore.open(tmp_path / "kv", block_tokens=BT) as st:
        short = [(k[:, :CALIB_TOKENS - BT], v[:, :CALIB_TOKENS - BT]) for k, v in kv]
        st.put_session("short", layout=LAY, kv=short, token_ids=list(range(CALIB_TOKENS - BT)), fingerprint="f")
        assert all(st.manager.calibrator.basis(LAY, layer) is None for layer in range(2))
        rec = st.put_session("s", layout=LAY, kv=kv, token_ids=list(range(n)), fingerprint="f")
        chains = rec.chains()
        for layer in range(2):
            basis = st.manager.calibrator.basis(LAY, layer)
            assert basis is not None and st.cold.get("meta", basis_key(LAY, layer)) is not None
            for i in (0, rec.num_blocks - 1):
                key = block_key(chains[i], layer)
                sm = BlockSummary.unseal(key, bytes(st.cold.get("summaries", key)))
                assert sm.tag == basis.tag and sm.sketch is not None
    with tierstore.open(tmp_path / "kv") as st:  # the stored basis is the one read back
        assert st.manager.calibrator.basis(LAY, 0) is not None


def test_the_stacked_sketches_are_the_blocks_own_and_score_as_a_contiguous_copy(tmp_path):
    """The stack keeps sketches sketch-dimension-major and hands out a [g, n, bt, r] view: its
    rows are each block's own sketch (zero past a block's tokens), the score over the view
    matches the score over a contiguous copy, and a stack first built for a long layer leaves
    room for the blocks decoding appends (growing copies every row)."""
    with tierstore.open(tmp_path / "kv", hot=LAY.block_bytes * 400, warm=LAY.block_bytes * 8,
                        block_tokens=BT) as st:
        mgr = st.manager
        seq = mgr.open_sequence("s", LAY, "cpu", policy="sketch")
        _fill(mgr, seq, CALIB_TOKENS + 21 * BT + 3)
        s = mgr.summaries(seq, 0)
        assert not s.sketch.is_contiguous() and s.sketch.shape == (2, s.n, BT, 16)
        for i, b in enumerate(mgr.blocks(seq, 0)):
            own = b.summary.sketch
            assert torch.equal(s.sketch[:, i, :own.shape[1]], own.float())
            assert not bool(s.sketch[:, i, own.shape[1]:].any())
        q = torch.randn(2, 3, 16)
        flat = s.sketch.contiguous()
        got = sketch_score(s.kmean, s.sketch, s.basis, s.tokens, q)
        assert torch.allclose(got, sketch_score(s.kmean, flat, s.basis, s.tokens, q), rtol=1e-5, atol=1e-7)
        # many partial rows take the masked path; it agrees with the fill of one partial row
        tokens = s.tokens.clone()
        tokens[:6] = 3
        masked = sketch_score(s.kmean, flat, s.basis, tokens, q)
        one = s.tokens.clone()
        one[0] = 3
        assert torch.equal(sketch_score(s.kmean, flat, s.basis, one, q)[0, 0] > 0, masked[0, 0] > 0)
        st_ = mgr.index._stacks[seq.id][0]
        assert st_.sketch.shape[2] >= s.n + s.n // 8 - 1


def test_a_stack_built_for_a_long_layer_has_room_for_the_next_blocks():
    from tierstore.summaries import _Stack
    st = _Stack(LAY, None)
    st.grow(2048)
    cap = st.tokens.shape[0]
    assert cap >= 2048 + 256
    st.grow(2049)  # the next block: no copy of the rows
    assert st.tokens.shape[0] == cap
    st.grow(cap + 1)
    assert st.tokens.shape[0] == 2 * cap  # then it doubles


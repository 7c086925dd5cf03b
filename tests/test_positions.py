"""Position modes (``tierstore.positions``): ``extend`` keeps attention within the trained length.

The reference for ``extend`` is written independently of the library's tables and rotations:
an attention function over a plain ``DynamicCache`` that un-rotates the stored queries and keys
with the model's own rotary embedding and applies it again at the mapped positions (SelfExtend's
two score matrices, chosen per pair by distance)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from support import tiny
from transformers import AttentionInterface, DynamicCache
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, rotate_half

import tierstore
from tierstore.adapters.hf import TieredCache
from tierstore.chain import chain_marks
from tierstore.positions import Extension, Positions, PositionsError, RoPE

BT = 8
TRAINED = 64  # the tiny models' max_position_embeddings here: prompts of 150+ tokens reach past it


def _model(dtype=torch.float32, **rope):
    kw = {"max_position_embeddings": TRAINED}
    if rope:
        kw["rope_parameters"] = {"rope_theta": 10000.0, **rope}
    return tiny(dtype=dtype, **kw)


ROPES = {
    "default": {"rope_type": "default"},
    "linear": {"rope_type": "linear", "factor": 2.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16},
}


@pytest.mark.parametrize("kind", sorted(ROPES))
def test_rerotation_equals_rope_applied_at_the_target_position(kind):
    """A key stored post-RoPE at position j, re-rotated by delta, is the key RoPE would have
    made at j + delta (fp32), for every supported RoPE type (yarn's attention scaling included)."""
    model = _model(**ROPES[kind])
    emb = model.model.rotary_emb
    assert emb.rope_type == kind
    rope = RoPE.from_model(model)
    x = torch.randn(1, 3, 40, 16, generator=torch.Generator().manual_seed(0))
    pos = torch.arange(40) * 37 + 5
    delta = torch.tensor([(-1) ** i * (i * 101 % 977) for i in range(40)], dtype=torch.float64)
    cos, sin = emb(x, pos[None])
    at_j, _ = apply_rotary_pos_emb(x, x, cos, sin)
    cos_t, sin_t = emb(x, (pos + delta.long())[None])
    want, _ = apply_rotary_pos_emb(x, x, cos_t, sin_t)
    c, s = rope.cos_sin(delta)
    got = RoPE.rotate(at_j, c, s)
    assert torch.allclose(got, want, atol=2e-4, rtol=1e-4), (got - want).abs().max()


def test_models_without_a_static_rope_are_refused():
    with pytest.raises(PositionsError, match="no rotary position embedding"):
        Positions("extend").resolved(tiny("gpt2"))
    with pytest.raises(PositionsError, match="'dynamic' is not supported"):
        Positions("extend").resolved(_model(rope_type="dynamic", factor=2.0))
    with pytest.raises(PositionsError, match="mode 'stretch'"):
        Positions("stretch")
    with pytest.raises(PositionsError, match="window 64 must be below the trained length 64"):
        Positions("extend", window=64).resolved(_model())


def test_the_factor_is_the_smallest_that_keeps_every_distance_trained():
    ext = Extension(Positions("extend", mapping="group").resolved(_model()), RoPE.from_model(_model()))
    L, W = ext.trained, ext.window
    for p in range(L, 40 * L, 7):
        g = ext.factor(p)
        assert p // g + W - W // g <= L - 1               # the furthest key (j = 0) stays trained
        assert g == 2 or (p // (g - 1) + W - W // (g - 1)) > L - 1
    assert ext.step(0, L - 1, 0, "cpu") is None           # nothing mapped inside the trained length
    scale = Extension(Positions("extend", mapping="scale").resolved(_model()), RoPE.from_model(_model()))
    assert abs(float(scale.query_target(torch.tensor([5000.0]), scale.factor(5000))) - (L - 1)) < 1e-9


def _reference(model, pos: Positions):
    """An attention function over full K/V that attends far pairs at the mapped positions."""
    emb = model.model.rotary_emb
    L, W, m = pos.trained, pos.window, emb.attention_scaling

    def rot(x, p):
        cos, sin = emb(x, p[None].to(torch.float32))
        return x * cos + rotate_half(x) * sin

    def unrot(x, p):
        cos, sin = emb(x, p[None].to(torch.float32))
        return (x * cos - rotate_half(x) * sin) / (m * m)

    def fn(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kw):
        b, h, ql, d = query.shape
        rep = h // key.shape[1]
        key, value = key.repeat_interleave(rep, 1).float(), value.repeat_interleave(rep, 1).float()
        query = query.float()
        n = key.shape[2]
        qp, kp = torch.arange(n - ql, n), torch.arange(n)
        s = query @ key.transpose(-1, -2) * scaling
        if int(qp[-1]) >= L:
            g = pos.group or Extension(pos, RoPE.from_model(model)).factor(int(qp[-1]))
            if pos.mapping == "group":
                kt, qt = torch.div(kp, g, rounding_mode="floor"), torch.div(qp, g, rounding_mode="floor") + W - W // g
            elif pos.mapping == "scale":
                kt, qt = kp / g, qp / g + W - W / g
            else:
                kt, qt = torch.zeros(n), torch.full((ql,), float(W))
            far = rot(unrot(query, qp), qt) @ rot(unrot(key, kp), kt).transpose(-1, -2) * scaling
            s = torch.where((qp[:, None] - kp[None]) >= W, far, s)
        s = s.masked_fill(kp[None] > qp[:, None], float("-inf"))
        out = torch.softmax(s, -1) @ value
        return out.transpose(1, 2).to(value.dtype), None

    return fn


def _reference_run(model, pos, ids, new, chunk):
    AttentionInterface.register("ref-extend", _reference(model, pos))
    prev = model.config._attn_implementation
    model.set_attn_implementation("ref-extend")
    try:
        cache, logits, seq = DynamicCache(), [], ids
        with torch.no_grad():
            for s in range(0, ids.shape[1], chunk):
                out = model(input_ids=ids[:, s:s + chunk], cache=cache, use_cache=True)
            for _ in range(new):
                logits.append(out.logits[:, -1].float())
                nxt = out.logits[:, -1].argmax(-1, keepdim=True)
                seq = torch.cat([seq, nxt], 1)
                out = model(input_ids=nxt, cache=cache, use_cache=True)
        return seq, torch.stack(logits)
    finally:
        model.set_attn_implementation(prev)


def _run(cache, model, ids, new, chunk):
    out = model.generate(ids, cache=cache, max_new_tokens=new, do_sample=False, output_scores=True,
                         return_dict_in_generate=True, pad_token_id=0, prefill_chunk_size=chunk)
    return out.sequences, torch.stack(out.scores)


@pytest.mark.parametrize("mapping,policy", [("group", "exact"), ("scale", "exact"), ("far", "exact"),
                                            ("group", "quest"), ("far", "sketch")])
def test_extend_matches_the_dense_reference(tmp_path, mapping, policy):
    """Chunked prefill and decode past the trained length, through the tiers (a small hot
    budget, so far keys come from warm/cold too): the logits of the dense reference. The sparse
    path (quest, a budget that selects every block) maps the same keys the same way."""
    model = _model()
    pos = Positions("extend", mapping=mapping, window=16).resolved(model)
    ids = torch.randint(1, 128, (1, 190), generator=torch.Generator().manual_seed(3))
    ref_seq, ref_logits = _reference_run(model, pos, ids, 12, 24)
    kw = {} if policy == "exact" else {"policy": policy, "budget_tokens": 10**6}
    with tierstore.open(tmp_path / "s", hot=4 * 2 * 2 * BT * 16 * 4 * 2, warm="1MiB", block_tokens=BT) as st, \
            TieredCache(st, model, commit_on_close=False, positions=pos, **kw) as cache:
        seq, logits = _run(cache, model, ids, 12, 24)
    assert torch.allclose(logits, ref_logits, atol=1e-4), (logits - ref_logits).abs().max()
    assert torch.equal(seq, ref_seq)
    # the map changes something past the trained length: model positions differ from it
    with tierstore.open(tmp_path / "m", block_tokens=BT) as st, TieredCache(st, model, commit_on_close=False) as c:
        _, plain = _run(c, model, ids, 12, 24)
    assert (plain - ref_logits).abs().max() > 1e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_extend_is_model_below_the_trained_length(tmp_path, dtype):
    """Inside the trained length nothing is mapped: extend is model bit for bit (and both give
    DynamicCache's tokens)."""
    model = _model(dtype)
    ids = torch.randint(1, 128, (1, 40), generator=torch.Generator().manual_seed(4))
    dyn_seq, _ = _run(DynamicCache(), model, ids, 20, 16)
    runs = {}
    for mode in ("model", "extend"):
        with tierstore.open(tmp_path / mode, block_tokens=BT) as st, \
                TieredCache(st, model, commit_on_close=False, positions=mode) as cache:
            runs[mode] = _run(cache, model, ids, 20, 16)
    assert torch.equal(runs["extend"][0], dyn_seq) and torch.equal(runs["model"][0], dyn_seq)
    assert torch.equal(runs["extend"][1], runs["model"][1])


def test_the_mode_is_recorded_resumed_and_refused_on_mismatch(tmp_path):
    """A committed extend session resumes with its mode (in another process too) and continues
    bit-identically to the uninterrupted run; another mode is refused, unless overridden."""
    model = _model()
    pos = Positions("extend", mapping="group", window=16)
    ids = torch.randint(1, 128, (1, 150), generator=torch.Generator().manual_seed(5))
    with tierstore.open(tmp_path, hot="64KiB", warm="1MiB", block_tokens=BT) as st:
        with TieredCache(st, model, commit_on_close=False, positions=pos) as c:  # uninterrupted
            _run(c, model, ids[:, :-1], 1, 32)
            full_seq, full_logits = _run(c, model, ids, 16, 32)
        with TieredCache(st, model, "doc", positions=pos) as c:
            _run(c, model, ids[:, :-1], 1, 32)
        rec = st.session("doc")
        assert rec.meta["positions"] == {"mode": "extend", "mapping": "group", "window": 16, "group": None,
                                         "trained": TRAINED}
        with TieredCache.resume(st, model, "doc", commit_on_close=False) as c:
            assert c.positions == Positions("extend", mapping="group", window=16, trained=TRAINED)
            seq, logits = _run(c, model, ids, 16, 32)
        assert torch.equal(seq, full_seq) and torch.equal(logits, full_logits)
        with pytest.raises(PositionsError, match="session 'doc' was stored with positions"):
            TieredCache.resume(st, model, "doc", positions="model")
        with TieredCache.resume(st, model, "doc", positions="model", override_positions=True,
                                commit_on_close=False) as c:
            assert c.positions.mode == "model"
    code = textwrap.dedent(f"""
        import torch, sys
        sys.path.insert(0, {str(__import__('pathlib').Path(__file__).parent)!r})
        from support import tiny
        import tierstore
        from tierstore.adapters.hf import TieredCache
        model = tiny(max_position_embeddings={TRAINED})
        with tierstore.open({str(tmp_path)!r}, hot="48KiB", warm="1MiB") as st, \\
                TieredCache.resume(st, model, "doc", commit_on_close=False) as c:
            ids = torch.tensor([{ids[0].tolist()}])
            out = model.generate(ids, cache=c, max_new_tokens=16, do_sample=False, pad_token_id=0)
            print(c.positions.mode, out[0].tolist())
        """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    mode, toks = res.stdout.strip().splitlines()[-1].split(" ", 1)
    assert mode == "extend" and eval(toks) == full_seq[0].tolist()


def test_extend_blocks_share_the_prefix_inside_the_trained_length_only():
    """Content addresses: blocks before the trained length are the same KV in both modes (so
    shared); blocks reaching past it carry the mode and its parameters."""
    from tierstore.chain import chain_hashes
    ids = list(range(1, 200))
    pos = Positions("extend", window=16, trained=TRAINED).to_json()
    model_chain = chain_hashes(b"r" * 16, ids, BT, marks=chain_marks({"positions": Positions().to_json()}))
    ext_chain = chain_hashes(b"r" * 16, ids, BT, marks=chain_marks({"positions": pos}))
    other = chain_hashes(b"r" * 16, ids, BT, marks=chain_marks({"positions": {**pos, "window": 8}}))
    n = TRAINED // BT
    assert model_chain[:n] == ext_chain[:n] == other[:n]
    assert all(a != b != c for a, b, c in zip(model_chain[n:], ext_chain[n:], other[n:]))
    assert model_chain == chain_hashes(b"r" * 16, ids, BT)


@pytest.mark.parametrize("mapping", ["far", "group", "scale"])
def test_a_policy_scores_far_blocks_at_their_mapped_distance(mapping):
    """``StepMap.block_query``: with one-token blocks, the rotated query's product with each
    stored key is the logit extended attention computes (query and key moved), far and near;
    a per-block query as wide as the layer gives the sketch and Quest scorers what the shared
    query gives them."""
    from tierstore.policies.quest import box_bound
    from tierstore.sketch import sketch_score
    model = _model()
    ext = Extension(Positions("extend", mapping=mapping).resolved(model), RoPE.from_model(model))
    gen = torch.Generator().manual_seed(1)
    n, g, rows, d = 300, 2, 3, 16
    first = n  # the decode query after n keys (past the 64-token trained length)
    step = ext.step(first, first, 0, "cpu")
    q, k = torch.randn(g, rows, d, generator=gen), torch.randn(g, n, d, generator=gen)
    qb = step.block_query(q, first, n, 1).per_block()                              # [g, rows, n, d]
    got = torch.einsum("gwnd,gnd->gwn", qb, k)
    mapped = torch.matmul(step.queries(q.reshape(g * rows, 1, d), first).reshape(g, rows, d),
                          step.keys_at(k, torch.arange(n)).transpose(-1, -2))
    plain = torch.matmul(q, k.transpose(-1, -2))
    near = first - torch.arange(n) < step.window
    want = torch.where(near, plain, mapped)
    assert near.any() and (~near).any()
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4), (got - want).abs().max()
    assert not torch.allclose(got[..., ~near], plain[..., ~near], atol=1e-2)         # far blocks did move
    # the scorers: a query per block that is the same for every block scores as the shared query
    bt, r, nb = 4, 3, 7
    kmean, basis = torch.randn(nb, g, d, generator=gen), torch.randn(g, d, r, generator=gen)
    sketch, tokens = torch.randn(g, nb, bt, r, generator=gen), torch.full((nb,), bt)
    tokens[-1] = 2
    wide = q.unsqueeze(2).expand(g, rows, nb, d)
    assert torch.allclose(sketch_score(kmean, sketch, basis, tokens, wide), sketch_score(kmean, sketch, basis, tokens, q),
                          atol=1e-5)
    kmin = torch.randn(nb, g, d, generator=gen)
    kmax = kmin + torch.rand(nb, g, d, generator=gen)
    assert torch.allclose(box_bound(kmin, kmax, wide), box_bound(kmin, kmax, q), atol=1e-5)


@pytest.mark.parametrize("mapping", ["far", "group"])
def test_the_sketch_scorer_reads_a_block_query_as_its_per_block_form(mapping):
    """The sketch scorer's pieces (far blocks' means against the rotated-back means, their
    projections as one product of the blocks' angles with the query's channel pairs) score as
    the explicit query per block does, for every split of the layer into far and near blocks
    and with partial blocks; Hybrid reads it too, Quest gets the explicit form."""
    from tierstore.positions import BlockQuery
    from tierstore.sketch import sketch_score
    model = _model()
    ext = Extension(Positions("extend", mapping=mapping).resolved(model), RoPE.from_model(model))
    gen = torch.Generator().manual_seed(7)
    g, rows, d, r, bt = 2, 3, 16, 5, 4
    for n in (1, 9, 40):
        kmean, basis = torch.randn(n, g, d, generator=gen), torch.randn(g, d, r, generator=gen)
        sketch, tokens = torch.randn(g, n, bt, r, generator=gen), torch.full((n,), bt)
        tokens[-1] = 3
        for first in (n * bt - 1, n * bt + 40, n * bt + 300):
            step = ext.step(first, first, 0, "cpu")
            if step is None:
                continue
            bq = step.block_query(torch.randn(g, rows, d, generator=gen), first, n, bt)
            assert isinstance(bq, BlockQuery) and 0 <= bq.n_far <= n
            got = sketch_score(kmean, sketch, basis, tokens, bq)
            want = sketch_score(kmean, sketch, basis, tokens, bq.per_block())
            assert torch.allclose(got, want, atol=1e-5, rtol=1e-4), (n, first, (got - want).abs().max())
    from tierstore.policies.hybrid import Hybrid
    from tierstore.policies.quest import Quest
    from tierstore.policies.sketch import Sketch
    assert Sketch.reads_block_query and Hybrid.reads_block_query and not Quest.reads_block_query


def test_a_sparse_step_past_the_trained_length_ranks_blocks_with_mapped_queries(tmp_path):
    """Through ``TieredCache``: under ``extend``, once a decode step reaches past the trained
    length, a query-reading policy is handed one query per block (the layer's block count of
    them); below it, and under model positions, the shared query. A policy that reads no query
    is not handed the per-block form."""
    from tierstore.policies.h2o import H2O
    from tierstore.policies.quest import Quest

    class Seen(Quest):
        def __init__(self, **kw):
            super().__init__(**kw)
            self.shapes = []

        def score(self, s, query=None):
            self.shapes.append((s.n, None if query is None else tuple(query.shape)))
            return super().score(s, query)

    class SeenH2O(H2O):
        def __init__(self, **kw):
            super().__init__(**kw)
            self.dims = set()

        def score(self, s, query=None):
            self.dims.add(None if query is None else query.dim())
            return super().score(s, query)

    model = _model()
    pos = Positions("extend", window=16).resolved(model)
    ids = torch.randint(1, 128, (1, 40), generator=torch.Generator().manual_seed(4))
    for positions in (pos, None):
        for policy in (Seen(), SeenH2O()):
            kw = {} if positions is None else {"positions": positions}
            with tierstore.open(tmp_path / f"s{len(list(tmp_path.iterdir()))}", block_tokens=BT) as st, \
                    TieredCache(st, model, commit_on_close=False, policy=policy, budget_tokens=48, **kw) as cache:
                model.generate(ids, cache=cache, max_new_tokens=40, do_sample=False, pad_token_id=0)
            if isinstance(policy, SeenH2O):
                assert policy.dims <= {3, None}
                continue
            wide = [(n, q) for n, q in policy.shapes if len(q) == 4]
            if positions is None:
                assert not wide and policy.shapes
            else:  # steps past 64 tokens; the first decode steps (40..63) are below it
                assert wide and all(q[2] == n for n, q in wide)
                assert any(len(q) == 3 for _, q in policy.shapes)

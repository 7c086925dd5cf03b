"""TieredCache through model.generate: exact vs DynamicCache with blocks over all three tiers."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import textwrap
import weakref

import pytest
import torch
from transformers import DynamicCache

import tierstore
from tierstore.adapters.hf import TieredCache
from tierstore.adapters.fingerprint import kv_layout
from tierstore.errors import (ModelMismatchError, ReadOnlyCacheError, SessionBusyError, SessionExistsError,
                              TokenMismatchError)

from support import greedy as gen, max_dlogit, tiny

BT = 8


def block_bytes(model) -> int:
    c = model.config
    return 2 * c.num_key_value_heads * BT * (c.hidden_size // c.num_attention_heads) * model.dtype.itemsize


@pytest.fixture
def store(store_factory):
    def make(model, hot_blocks=6, warm_blocks=4, **kw):
        bb = block_bytes(model)
        return store_factory(hot=bb * hot_blocks, warm=bb * warm_blocks, block_tokens=BT, **kw)
    return make


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_exact_matches_dynamic_cache_across_tiers(store, kind):
    model = tiny(kind)
    ids = torch.randint(1, 128, (1, 45))
    ref = gen(model, ids, DynamicCache())
    with store(model) as st:
        with TieredCache(st, model) as cache:
            out = gen(model, ids, cache)
            s = st.stats()
        assert torch.equal(out.sequences, ref.sequences)
        assert max_dlogit(out, ref) < 1e-4
        # the blocks really went through every tier
        assert s.demotions.get("hot", 0) > 0 and s.promotions.get("cold", 0) > 0 and s.hits.get("warm", 0) > 0  # read from warm (in place on CPU)
        assert s.hot_used_bytes <= s.hot_budget_bytes and s.warm_used_bytes <= s.warm_budget_bytes


def test_chunked_prefill_and_padding_bs2(store):
    model = tiny()
    ids = torch.randint(1, 128, (2, 37))
    mask = torch.ones_like(ids)
    ids[1, :5] = 0
    mask[1, :5] = 0
    ref = gen(model, ids, DynamicCache(), attention_mask=mask, prefill_chunk_size=16)
    with store(model, hot_blocks=12, warm_blocks=8) as st, TieredCache(st, model) as cache:
        out = gen(model, ids, cache, attention_mask=mask, prefill_chunk_size=16)
    assert torch.equal(out.sequences, ref.sequences)
    assert max_dlogit(out, ref) < 1e-4


def test_beam_search_and_num_return_sequences(store):
    model = tiny()
    ids = torch.randint(1, 128, (1, 21))
    ref = model.generate(ids, cache=DynamicCache(), num_beams=3, max_new_tokens=10, do_sample=False, pad_token_id=0)
    with store(model, hot_blocks=40, warm_blocks=40) as st, TieredCache(st, model) as cache:
        out = model.generate(ids, cache=cache, num_beams=3, max_new_tokens=10, do_sample=False, pad_token_id=0)
    assert torch.equal(out, ref)


def test_crop_then_continue(store):
    model = tiny()
    ids = torch.randint(1, 128, (1, 30))
    with store(model, hot_blocks=20, warm_blocks=20) as st, TieredCache(st, model) as cache:
        model(input_ids=ids, cache=cache, use_cache=True)
        cache.crop(-7)
        assert cache.get_seq_length() == 23
        a = model(input_ids=ids[:, 23:], cache=cache, use_cache=True).logits
    ref = model(input_ids=ids, cache=DynamicCache(), use_cache=True).logits
    assert (a - ref[:, 23:]).abs().max() < 1e-4


def test_bf16_within_tolerance(store):
    model = tiny(dtype=torch.bfloat16)
    ids = torch.randint(1, 128, (1, 40))
    ref = gen(model, ids, DynamicCache(), max_new_tokens=8)
    with store(model) as st, TieredCache(st, model) as cache:
        out = gen(model, ids, cache, max_new_tokens=8)
    # bf16: our attention accumulates in fp32, sdpa in bf16; compare the first step's logits
    assert (out.scores[0] - ref.scores[0]).abs().max().item() < 0.1
    assert out.sequences[0, 40] == ref.sequences[0, 40]


def test_commit_resume_in_memory_and_errors(store):
    model = tiny()
    ids = torch.randint(1, 128, (1, 29))
    ref = gen(model, ids, DynamicCache(), max_new_tokens=12)
    with store(model) as st:
        with TieredCache(st, model, session="chat") as cache:
            first = gen(model, ids, cache, max_new_tokens=6)
            cache.commit()
        rec = st.session("chat")
        assert rec.length == 29 + 6 - 1
        # every stored summary describes its block as committed (the partial tail included)
        from tierstore.records import BlockSummary
        from tierstore.tiers.cold import block_key
        chains = rec.chains()
        for layer in range(rec.layout.num_layers):
            for i, c in enumerate(chains):
                key = block_key(c, layer)
                summ = BlockSummary.unseal(key, st.cold.get("summaries", key))
                k, _ = st.read_block(rec, layer, i, chains=chains)
                assert summ.tokens == rec.block_len(i) == k.shape[1]
                assert torch.equal(summ.kmax, k.float().amax(1))
        assert rec.token_ids.tolist() == first.sequences[0, :-1].tolist()
        assert rec.last_logits is not None
        with pytest.raises(SessionExistsError):
            TieredCache(st, model, session="chat")
        with TieredCache.resume(st, model, "chat") as cache:
            with pytest.raises(TokenMismatchError):
                cache.check_history(torch.zeros(40, dtype=torch.long))
            cache.check_history(first.sequences[0])
            out = gen(model, first.sequences, cache, max_new_tokens=6)
        assert torch.equal(out.sequences, ref.sequences)
        other = tiny(seed=1)
        with pytest.raises(ModelMismatchError):
            TieredCache.resume(st, other, "chat")


RESUME_SCRIPT = textwrap.dedent("""
    import json, sys, torch
    import tierstore
    from transformers import AutoModelForCausalLM, LlamaConfig
    from tierstore.adapters.hf import TieredCache
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    path, hot, warm, full = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), json.loads(sys.argv[4])
    with tierstore.open(path, hot=hot, warm=warm, block_tokens=8) as st:
        with TieredCache.resume(st, model, "s") as cache:
            out = model.generate(torch.tensor([full]), cache=cache, max_new_tokens=10, do_sample=False, pad_token_id=0)
    print(json.dumps(out[0].tolist()))
""")


@pytest.mark.parametrize("codec", ["raw", "zstd"])
def test_save_then_resume_in_new_process(tmp_path, codec):
    model = tiny()
    ids = torch.randint(1, 128, (1, 50))
    ref = model.generate(ids, cache=DynamicCache(), max_new_tokens=20, do_sample=False, pad_token_id=0)
    bb = block_bytes(model)
    with tierstore.open(tmp_path / "kv", hot=bb * 6, warm=bb * 4, block_tokens=BT, codec=codec) as st:
        with TieredCache(st, model, session="s") as cache:
            first = model.generate(ids, cache=cache, max_new_tokens=10, do_sample=False, pad_token_id=0)
    script = tmp_path / "resume.py"
    script.write_text(RESUME_SCRIPT)
    res = subprocess.run([sys.executable, str(script), str(tmp_path / "kv"), str(bb * 6), str(bb * 4),
                          json.dumps(first[0].tolist())], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONHASHSEED": "0"})
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads(res.stdout.strip().splitlines()[-1]) == ref[0].tolist()


def test_hot_budget_holds_during_long_prefill(store):
    model = tiny()
    ids = torch.randint(1, 128, (1, 300))
    ref = model(input_ids=ids, cache=DynamicCache(), use_cache=True).logits[:, -1]
    with store(model, hot_blocks=10, warm_blocks=6) as st, TieredCache(st, model) as cache:
        peak = 0
        for s in range(0, 300, 32):
            logits = model(input_ids=ids[:, s:s + 32], cache=cache, use_cache=True).logits[:, -1]
            peak = max(peak, st.manager.counters.hot_peak)
            u = st.manager.usage()
            assert u["hot_allocated_bytes"] <= st.config.hot_bytes
            assert u["warm_allocated_bytes"] <= st.config.warm_bytes
        assert peak <= 10
        assert (logits - ref).abs().max() < 1e-4


tiny_of = tiny    # the shared builder also makes the gpt2 and mistral ones


@pytest.mark.parametrize("kind", ["gpt2", "mistral"])
def test_other_architectures(tmp_path, kind):
    model = tiny_of(kind)
    ids = torch.randint(1, 128, (1, 40))
    ref = gen(model, ids, DynamicCache(), max_new_tokens=12)
    from tierstore.adapters.fingerprint import kv_layout
    bb = kv_layout(model, BT).block_bytes
    with tierstore.open(tmp_path / "kv", hot=bb * 6, warm=bb * 4, block_tokens=BT) as st, \
            TieredCache(st, model) as cache:
        out = gen(model, ids, cache, max_new_tokens=12)
    assert torch.equal(out.sequences, ref.sequences)
    assert max_dlogit(out, ref) < 1e-4


def test_deprecated_past_key_values_kwarg(store):
    model = tiny()
    ids = torch.randint(1, 128, (1, 20))
    ref = model.generate(ids, cache=DynamicCache(), max_new_tokens=6, do_sample=False, pad_token_id=0)
    with store(model, hot_blocks=20) as st, TieredCache(st, model) as cache:
        out = model.generate(ids, past_key_values=cache, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(out, ref)


def test_batch_persistence_needs_a_name_per_row(store):
    model = tiny()
    ids = torch.randint(1, 128, (2, 19))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    ref = model.generate(ids, attention_mask=mask, cache=DynamicCache(), max_new_tokens=8, do_sample=False,
                         pad_token_id=0)
    with store(model, hot_blocks=20, warm_blocks=20) as st:
        with TieredCache(st, model, session="one", commit_on_close=False) as cache:
            model.generate(ids, attention_mask=mask, cache=cache, max_new_tokens=4, do_sample=False, pad_token_id=0)
            with pytest.raises(tierstore.TierstoreError, match="2 session names"):
                cache.commit()
        with TieredCache(st, model, session=["row0", "row1"]) as cache:
            first = model.generate(ids, attention_mask=mask, cache=cache, max_new_tokens=4, do_sample=False,
                                   pad_token_id=0)
        assert st.session("row0").pad == 3 and st.session("row1").pad == 0
        # each row resumes on its own and continues like the uninterrupted batch
        for r in range(2):
            row = first[r:r + 1]
            m = mask[r:r + 1]
            with TieredCache.resume(st, model, f"row{r}") as cache:
                full_mask = torch.cat([m, torch.ones(1, row.shape[1] - m.shape[1], dtype=m.dtype)], 1)
                out = model.generate(row, attention_mask=full_mask, cache=cache, max_new_tokens=4,
                                     do_sample=False, pad_token_id=0)
            assert out[0].tolist() == ref[r].tolist()


def test_auto_commit_and_fork(store):
    model = tiny()
    ids = torch.randint(1, 128, (1, 64))
    with store(model, hot_blocks=20, warm_blocks=20) as st:
        with TieredCache(st, model, session="auto", auto_commit_blocks=2, commit_on_close=False) as cache:
            for s in range(0, 64, 16):
                model(input_ids=ids[:, s:s + 16], cache=cache, use_cache=True)
                # committed by the forward hook once 2 new blocks (all layers) sealed
                assert st.session("auto").length == s + 16
        rec = st.fork("auto", "auto-fork", tokens=32)
        assert rec.length == 32
        with TieredCache.resume(st, model, "auto-fork") as cache:
            a = model(input_ids=ids[:, 32:40], cache=cache, use_cache=True).logits
        ref = model(input_ids=ids[:, :40], cache=DynamicCache(), use_cache=True).logits[:, 32:]
        assert (a - ref).abs().max() < 1e-4


def test_resume_with_other_dtype_is_refused(store):
    model = tiny()
    ids = torch.randint(1, 128, (1, 20))
    with store(model, hot_blocks=20) as st:
        with TieredCache(st, model, session="d") as cache:
            model(input_ids=ids, cache=cache, use_cache=True)
        with pytest.raises(ModelMismatchError, match="dtype"):
            TieredCache.resume(st, model.to(torch.bfloat16), "d")


@pytest.mark.slow
def test_smollm2_2k_prompt_matches_dynamic_cache(tmp_path):
    from tierstore.adapters.models import load_smollm2, long_text
    model, tok = load_smollm2(torch.float32)
    ids = tok(long_text(20000), return_tensors="pt").input_ids[:, :2100]
    ref = gen(model, ids, DynamicCache(), max_new_tokens=8)
    # hot budget: a quarter of the KV, so most blocks stream from warm and cold
    with tierstore.open(tmp_path / "kv", hot="24MiB", warm="32MiB") as st:
        with TieredCache(st, model, session="smol") as cache:
            out = gen(model, ids, cache, max_new_tokens=8, prefill_chunk_size=512)
            s = st.stats()
        assert torch.equal(out.sequences, ref.sequences)
        assert max_dlogit(out, ref) < 1e-3
        assert s.promotions.get("cold", 0) > 0 and st.manager.counters.hot_peak * \
            st.session("smol").layout.block_bytes <= st.config.hot_bytes


def test_attention_scratch_comes_out_of_the_hot_budget(tmp_path):
    """Pools plus the reservation for attention temporaries never exceed hot=; the score chunks
    are sized to fit that reservation."""
    from tierstore.attention import TEMPORARIES
    model = tiny()
    ids = torch.randint(1, 128, (1, 200))
    ref = model(input_ids=ids, cache=DynamicCache(), use_cache=True).logits[:, -1]
    with tierstore.open(tmp_path / "kv", hot="8MiB", warm="8MiB", block_tokens=BT) as st, \
            TieredCache(st, model) as cache:
        logits = model(input_ids=ids, cache=cache, use_cache=True).logits[:, -1]
        u = st.manager.usage()
        pool = cache.seqs[0].hot
        assert u["hot_scratch_bytes"] == (8 << 20) // 8 == pool.scratch_bytes
        assert u["hot_allocated_bytes"] == pool.nbytes + pool.scratch_bytes <= st.config.hot_bytes
        rows = model.config.num_attention_heads * 200
        piece = max(BT, pool.scratch_bytes // (4 * TEMPORARIES * rows) // BT * BT)
        assert 4 * TEMPORARIES * rows * piece <= pool.scratch_bytes
    assert (logits - ref).abs().max() < 1e-4


# -- lifecycle: caches dropped without close(), idle caches, read-only resume ---------------------


def _request(model, st, name, ids):
    """One request of a server loop: a cache, a prefill, a commit; never closed."""
    cache = TieredCache(st, model, session=name)
    with torch.no_grad():
        model(input_ids=ids, cache=cache, use_cache=True)
    cache.commit()
    return cache


def _kv_equal(a, b) -> bool:
    return all(torch.equal(x, y) for (ka, va), (kb, vb) in zip(a, b) for x, y in ((ka, kb), (va, vb)))


def _continuation(model, ids, extra=(5,)):
    """DynamicCache's continuation of ``ids`` + ``extra`` (while no TieredCache is open on the model)."""
    return gen(model, torch.cat([ids, torch.tensor([extra])], 1), DynamicCache(), max_new_tokens=4)


def _continues_like(model, cache, ref, extra=(5,)) -> bool:
    out = gen(model, cache.full_ids(list(extra)), cache, max_new_tokens=4)
    return torch.equal(out.sequences, ref.sequences) and max_dlogit(out, ref) < 1e-4


def test_dropped_caches_give_their_slots_back(tmp_path):
    """One cache per 200-token request, committed, dropped without close(), on a store whose hot
    pool holds 4 blocks (one request's layer): every request runs, a dropped cache leaves no
    slot, hook, attention switch or lease behind, and every session resumes bit-exact."""
    model = tiny()
    attn_before = model.config._attn_implementation
    reqs = {f"r{i}": torch.randint(1, 128, (1, 200)) for i in range(10)}
    refs = {name: _continuation(model, reqs[name]) for name in ("r0", "r9")}
    snaps = {}
    with tierstore.open(tmp_path / "kv", hot=65536, warm=131072) as st:
        for name, ids in reqs.items():
            cache = _request(model, st, name, ids)
            assert cache.seqs[0].hot.slots == 4
            alive = weakref.ref(cache)
            snaps[name] = st.load_session(name)[1]
            del cache
            gc.collect()
            assert alive() is None                                     # nothing kept the cache alive
            u = st.manager.usage()
            assert u["hot_blocks"] == 0 and u["warm_blocks"] == 0    # its slots are back
            assert not model._forward_pre_hooks and not model._forward_hooks
            assert model.config._attn_implementation == attn_before
            assert st.sessions.live_leases() == []
        for name, ids in reqs.items():
            rec, kv = st.load_session(name)
            assert rec.token_ids.tolist() == ids[0].tolist() and _kv_equal(kv, snaps[name])
        for name in ("r0", "r9"):
            with TieredCache.resume(st, model, name) as cache:       # the writer lease is free
                assert _continues_like(model, cache, refs[name])


def test_idle_caches_make_room_with_their_durable_blocks(tmp_path):
    """Caches kept open but idle (a server's sessions between turns): their committed blocks,
    partial tails included, are demoted to make room for the active cache, and an idle cache
    promotes its tail back when it continues."""
    model = tiny()
    reqs = {f"r{i}": torch.randint(1, 128, (1, 200)) for i in range(10)}
    refs = {name: _continuation(model, reqs[name]) for name in ("r0", "r5")}
    with tierstore.open(tmp_path / "kv", hot=65536, warm=131072) as st:
        idle, snaps = [], {}
        for name, ids in reqs.items():
            idle.append(_request(model, st, name, ids))
            snaps[name] = st.load_session(name)[1]
            assert st.manager.usage()["hot_blocks"] <= 4
        tail = idle[0].seqs[0].layers[0][-1]
        assert not tail.sealed and tail.hot is None                 # r0's committed tail was demoted
        assert _continues_like(model, idle[0], refs["r0"])          # ... and comes back to grow
        for c in idle[1:]:
            c.close()
        idle[0].close()
        for name, ids in reqs.items():
            if name != "r0":
                assert _kv_equal(st.load_session(name)[1], snaps[name])
        with TieredCache.resume(st, model, "r5") as cache:
            assert _continues_like(model, cache, refs["r5"])


def test_resume_of_a_session_this_process_holds(store, tmp_path):
    """The writer lease is held by an open cache of this very process: the error says so and
    names the ways out; a read-only resume attends without the lease and never commits."""
    model = tiny()
    ids = torch.randint(1, 128, (1, 29))
    ref = gen(model, ids, DynamicCache(), max_new_tokens=12)
    with store(model) as st:
        writer = TieredCache(st, model, session="chat")
        first = gen(model, ids, writer, max_new_tokens=6)
        writer.commit()
        with pytest.raises(SessionBusyError, match=rf"this process \(pid {os.getpid()}\) holds it, through a "
                                                   r"TieredCache still open.*close\(\).*readonly=True.*fork"):
            TieredCache.resume(st, model, "chat")
        orphans = st.gc(dry_run=True).orphan_blocks
        with TieredCache.resume(st, model, "chat", readonly=True) as reader:
            out = gen(model, first.sequences, reader, max_new_tokens=6)
            with pytest.raises(ReadOnlyCacheError, match="read-only.*fork"):
                reader.commit()
        assert torch.equal(out.sequences, ref.sequences)
        assert st.gc(dry_run=True).orphan_blocks == orphans        # the reader wrote no block
        assert [x.token for x in st.sessions.live_leases()] == [writer._held.leases[0].token]
        assert writer.commit()[0].length == 34                     # the writer still writes
        writer.close()
        TieredCache.resume(st, model, "chat").close()               # free once it is closed
        with pytest.raises(ValueError, match="resume"):
            TieredCache(st, model, session="new", readonly=True)
    with store(model, readonly=True) as st:                         # a read-only store: readers only
        with TieredCache.resume(st, model, "chat", readonly=True) as reader:
            out = gen(model, first.sequences, reader, max_new_tokens=6)
        assert torch.equal(out.sequences, ref.sequences)


def test_slot_bytes_past_a_blocks_tokens_are_never_read(store):
    """Pools are not zeroed (they take memory as blocks arrive), so a slot's bytes past its
    block's tokens are stale or were never written. Poisoned with NaN, exact and sparse attention
    (one selection per layer, and per head) still give the unpoisoned tokens and logits."""
    model = tiny()
    ids = torch.randint(1, 128, (1, 45))
    for kw in ({}, dict(policy="h2o", budget_tokens=32), dict(policy="quest", budget_tokens=32, per_head=True)):
        outs = []
        for poison in (False, True):
            with store(model) as st:
                pools = st.manager.prepare(kv_layout(model, BT), "cpu")
                if poison:
                    for p in pools:
                        p.kv.fill_(float("nan"))
                with TieredCache(st, model, **kw) as cache:
                    outs.append(gen(model, ids, cache))
        clean, poisoned = outs
        assert all(bool(torch.isfinite(x).all()) for x in poisoned.scores), kw
        assert torch.equal(poisoned.sequences, clean.sequences) and max_dlogit(poisoned, clean) < 1e-5, kw


def test_resume_keeps_the_block_size_the_session_was_stored_with(tmp_path):
    """A store opened again without ``block_tokens`` (the default, 64) resumes a session stored
    in blocks of 8 with its own block size: same continuation as DynamicCache (before, the
    cache took the store's default and read the 8-token blocks as 64-token ones)."""
    model = tiny()
    ids = torch.randint(1, 128, (1, 150), generator=torch.Generator().manual_seed(2))
    ref = model.generate(ids, cache=DynamicCache(), max_new_tokens=8, do_sample=False, pad_token_id=0)
    with tierstore.open(tmp_path, block_tokens=BT) as st, TieredCache(st, model, session="s") as cache:
        model.generate(ids[:, :-1], cache=cache, max_new_tokens=1, do_sample=False, pad_token_id=0)
    with tierstore.open(tmp_path) as st:
        assert st.config.block_tokens != BT
        with TieredCache.resume(st, model, "s", commit_on_close=False) as cache:
            assert cache.layout.block_tokens == BT
            out = model.generate(ids, cache=cache, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(out, ref)


def test_row_chains_grow_incrementally_and_equal_a_full_rehash():
    """A decode step hashes only the blocks its tokens touch; the chains always equal hashing
    every token again, across marks that change (a sparse step starts), truncation and forks."""
    from tierstore.adapters.row import Row
    from tierstore.chain import chain_hashes
    root, bt = b"r" * 32, 4
    row = Row("s")
    marks: tuple = ()
    for step, n in enumerate([7, 1, 1, 3, 5, 1, 1, 1, 9]):
        if step == 4:
            marks = ((len(row.token_ids), b"approx"),)       # sparse from here on
        row.extend(list(range(step * 10, step * 10 + n)), root, bt, marks)
        assert row.chains == chain_hashes(root, row.token_ids, bt, marks=marks)
        if step == 6:
            row.truncate(len(row.token_ids) - 3, bt)
            assert row.chains == chain_hashes(root, row.token_ids, bt, marks=marks)[:len(row.token_ids) // bt]
    twin = row.fork(None)
    twin.extend([1, 2], root, bt, marks)
    assert twin.chains == chain_hashes(root, twin.token_ids, bt, marks=marks)
    assert row.chains == chain_hashes(root, row.token_ids, bt, marks=marks)

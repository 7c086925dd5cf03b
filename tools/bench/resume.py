"""`tierstore bench resume`: time to first token, resuming a stored session vs re-running prefill.

For each context length, dtype and cold codec, in one run on SmolLM2-135M-Instruct:
* prefill: DynamicCache prefill of the history (one call, sdpa) + argmax of the last logits;
* resume: ``TieredCache.resume`` (record, summaries, every block decoded into hot slots) + the
  first token from the stored last logits (no decode step needed);
* resume+step: the same plus one decode step through the restored cache (attention over all);
* restore: the store's share of resume: reading every block into its hot slot (checksums
  verified), as counted by the tier manager;
* turn: what a user's resume really is: resume under a bounded hot budget (``--turn-hot``,
  ``--turn-warm``), then the forward of a short next message (~9 tokens) through it, against
  DynamicCache's own time for that forward on the same context (``turn/dyn``);
* arena: the physical limit measured on the same bytes: one LMDB read transaction copying every
  stored block into a preallocated arena, no checksum, no bookkeeping. ``store/arena`` is
  restore / arena; ``resume/arena`` puts the whole resume (fingerprint, record, bookkeeping) over it.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time

import click
import numpy as np
import torch

from tierstore.layout import dtype_from_name


def _prefill(model, ids: torch.Tensor):
    from transformers import DynamicCache
    cache = DynamicCache()
    t = time.perf_counter()
    with torch.no_grad():
        out = model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
    first = int(out.logits[0, -1].argmax())
    return time.perf_counter() - t, cache, out.logits[0, -1].float().numpy(), first


def _arena_read(store, name: str) -> float:
    """Read every block of the session into a preallocated arena: the physical floor."""
    rec = store.session(name)
    lay = rec.layout
    chains = rec.chains()
    from tierstore.codec import HEADER_SIZE
    from tierstore.tiers.schema import block_key
    keys = [block_key(c, layer) for layer in range(lay.num_layers) for c in chains]
    arena = np.empty(len(keys) * lay.block_bytes + (1 << 20), dtype=np.uint8)
    arena[:] = 0  # fault the pages in first, as a preallocated pool would be
    t = time.perf_counter()
    with store.cold.read(buffers=True) as txn:
        off = 0
        for v in store.cold.get_many("blocks", keys, txn=txn):
            n = len(v) - HEADER_SIZE
            arena[off:off + n] = np.frombuffer(v, dtype=np.uint8, offset=HEADER_SIZE)
            off += n
    return time.perf_counter() - t


TURN = " And what does the text say about that, in one sentence?"


def _dynamic_turn(model, dyn, turn: torch.Tensor, tokens: int, repeat: int) -> float:
    """DynamicCache's own time for the turn's forward over the ``tokens`` it holds (best of
    ``repeat``; the cache is cropped back after each)."""
    best = float("inf")
    with torch.no_grad():
        for _ in range(repeat):
            t = time.perf_counter()
            model(input_ids=turn, cache=dyn, use_cache=True, logits_to_keep=1)
            best = min(best, time.perf_counter() - t)
            dyn.crop(-turn.shape[1])  # back to the context (transformers 5: a negative count)
    return best


def _tiered_turn(st, model, turn: torch.Tensor, repeat: int) -> float:
    """Resume + the turn's forward through the resumed cache, best of ``repeat``."""
    from tierstore.adapters.hf import TieredCache
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        cache = TieredCache.resume(st, model, "bench", commit_on_close=False)
        with torch.no_grad():
            model(input_ids=turn, cache=cache, use_cache=True, logits_to_keep=1)
        best = min(best, time.perf_counter() - t)
        cache.close()
    return best


def measure(model, tok, tokens: int, codec: str, dtype: torch.dtype, hot: str = "2GiB", repeat: int = 3,
            turn_hot: str = "64MiB", turn_warm: str = "256MiB") -> dict:
    import tierstore
    from tierstore.adapters.fingerprint import kv_layout, model_fingerprint
    from tierstore.adapters.hf import TieredCache
    from tierstore.adapters.models import long_text

    ids = tok(long_text(tokens * 6), return_tensors="pt").input_ids[:, :tokens]
    t_prefill, dyn, logits, first = _prefill(model, ids)
    turn = tok(TURN, add_special_tokens=False, return_tensors="pt").input_ids
    t_dyn_turn = _dynamic_turn(model, dyn, turn, tokens, repeat)
    d = tempfile.mkdtemp(prefix="tierstore-bench-")
    try:
        with tierstore.open(d, hot=hot, warm="1GiB", codec=codec) as st:
            fp, fields = model_fingerprint(model)
            lay = kv_layout(model, st.config.block_tokens)
            kv = [(layer.keys[0], layer.values[0]) for layer in dyn.layers]
            st.put_session("bench", layout=lay, kv=kv, token_ids=ids[0].tolist(), fingerprint=fp,
                           fingerprint_fields=fields, last_logits=logits)
            stored = st.cold.used_bytes()
            t_arena = min(_arena_read(st, "bench") for _ in range(3))
        del dyn
        with tierstore.open(d, hot=hot, warm="1GiB") as st:
            t = time.perf_counter()
            st.manager.prepare(lay, "cpu")  # pools exist once per process: not part of a resume
            t_pools = time.perf_counter() - t
            t_resume = t_step = t_store = float("inf")
            for _ in range(repeat):  # best of `repeat`: this machine is shared and noisy
                before = st.manager.counters.restore_seconds
                t = time.perf_counter()
                cache = TieredCache.resume(st, model, "bench", commit_on_close=False)
                tok0 = int(cache.last_logits[0].argmax())
                t_resume = min(t_resume, time.perf_counter() - t)
                t_store = min(t_store, st.manager.counters.restore_seconds - before)
                with torch.no_grad():
                    model(input_ids=torch.tensor([[tok0]]), cache=cache, use_cache=True)
                t_step = min(t_step, time.perf_counter() - t)
                assert tok0 == first, "resumed first token differs from the prefill's"
                cache.close()
            loaded = st.manager.counters.promotions.get("cold", 0) // repeat
        with tierstore.open(d, hot=turn_hot, warm=turn_warm) as st:
            st.manager.prepare(lay, "cpu")
            t_turn = _tiered_turn(st, model, turn, repeat)
    finally:
        shutil.rmtree(d, ignore_errors=True)
    return {"tokens": tokens, "dtype": str(dtype).removeprefix("torch."), "codec": codec,
            "prefill_s": t_prefill, "pool_setup_s": t_pools, "resume_s": t_resume, "resume_step_s": t_step, "arena_s": t_arena,
            "restore_s": t_store, "speedup": t_prefill / t_resume, "store_vs_arena": t_store / t_arena,
            "resume_vs_arena": t_resume / t_arena, "turn_tokens": int(turn.shape[1]), "turn_s": t_turn,
            "dynamic_turn_s": t_dyn_turn, "turn_vs_dynamic": t_turn / t_dyn_turn,
            "turn_speedup": (t_prefill + t_dyn_turn) / t_turn, "turn_hot": turn_hot, "turn_warm": turn_warm,
            "stored_bytes": stored, "blocks_loaded": loaded}


@click.command("resume")
@click.option("--tokens", default="2048,8192,16384", show_default=True, help="context lengths")
@click.option("--dtype", "dtypes", default="float32,bfloat16", show_default=True)
@click.option("--codec", "codecs", default="raw,zstd", show_default=True)
@click.option("--turn-hot", default="64MiB", show_default=True, help="hot budget of the resume + turn rows")
@click.option("--turn-warm", default="256MiB", show_default=True, help="warm budget of the resume + turn rows")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
def resume(tokens: str, dtypes: str, codecs: str, turn_hot: str, turn_warm: str, as_json: bool) -> None:
    """Time to first token: resume from disk vs re-running the prefill (SmolLM2-135M)."""
    from tierstore.adapters.models import load_smollm2
    rows = []
    for dt in dtypes.split(","):
        model, tok = load_smollm2(dtype_from_name(dt.strip()))
        for n in (int(x) for x in tokens.split(",")):
            for codec in codecs.split(","):
                rows.append(measure(model, tok, n, codec.strip(), dtype_from_name(dt.strip()),
                                    turn_hot=turn_hot, turn_warm=turn_warm))
                click.echo(f"  {rows[-1]['tokens']} {rows[-1]['dtype']} {codec}: done", err=True)
    if as_json:
        click.echo(json.dumps({"bench": "resume", "rows": rows}, indent=2))
        return
    from rich.console import Console
    from rich.table import Table
    t = Table(title="time to first token: resume vs re-prefill (SmolLM2-135M, this machine)")
    for c in ("tokens", "dtype", "codec", "prefill s", "pools s", "resume s", "speedup", "resume+step s",
              "restore s", "arena s", "store/arena", "resume/arena", "stored MiB"):
        t.add_column(c, justify="right")
    for r in rows:
        t.add_row(str(r["tokens"]), r["dtype"], r["codec"], f"{r['prefill_s']:.2f}", f"{r['pool_setup_s']:.2f}",
                  f"{r['resume_s']:.3f}",
                  f"{r['speedup']:.0f}x", f"{r['resume_step_s']:.3f}", f"{r['restore_s']:.3f}",
                  f"{r['arena_s']:.3f}", f"{r['store_vs_arena']:.2f}x", f"{r['resume_vs_arena']:.2f}x", f"{r['stored_bytes'] / 2**20:.0f}")
    Console().print(t)
    u = Table(title=f"resume + a {rows[0]['turn_tokens'] if rows else 0}-token turn under hot={turn_hot}, "
                    f"warm={turn_warm} vs DynamicCache's own forward of that turn")
    for c in ("tokens", "dtype", "codec", "DynamicCache turn s", "resume+turn s", "ratio", "vs re-prefill+turn"):
        u.add_column(c, justify="right")
    for r in rows:
        u.add_row(str(r["tokens"]), r["dtype"], r["codec"], f"{r['dynamic_turn_s']:.3f}", f"{r['turn_s']:.3f}",
                  f"{r['turn_vs_dynamic']:.2f}x", f"{r['turn_speedup']:.0f}x")
    Console().print(u)

"""`tierstore bench decode`: greedy decode tokens/s through TieredCache vs DynamicCache.

For each context length, in one run on SmolLM2-135M-Instruct: DynamicCache; TieredCache with
everything hot; TieredCache with a hot budget of 25% of the context's KV (the rest streams from
warm). The three are prefilled first (chunked; its time is a table of its own), then timed side
by side: three rounds of ``--new`` single-token decode steps on each in turn, each keeping its
best round; where the time of the budgeted run goes: blocks recalled (copied up) per step and,
on a CPU hot pool, warm blocks read in place per step. The three must decode the same tokens.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time

import click
import torch

from tierstore.layout import dtype_from_name


def _prefill(model, ids: torch.Tensor, cache, chunk: int = 1024):
    """Chunked prefill; returns (seconds, the first decoded token)."""
    with torch.no_grad():
        t = time.perf_counter()
        for s in range(0, ids.shape[1], chunk):
            out = model(input_ids=ids[:, s:s + chunk], cache=cache, use_cache=True, logits_to_keep=1)
        return time.perf_counter() - t, out.logits[:, -1].argmax(-1, keepdim=True)


def _steps(model, cache, nxt: torch.Tensor, new: int) -> tuple[float, torch.Tensor]:
    """``new`` single-token decode steps: (tokens/s, the next token)."""
    with torch.no_grad():
        t = time.perf_counter()
        for _ in range(new):
            out = model(input_ids=nxt, cache=cache, use_cache=True)
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        return new / (time.perf_counter() - t), nxt


def measure(model, tok, tokens: int, new: int, hot_fraction: float = 0.25, segments: int = 3,
            dyn_model=None) -> dict:
    """The three caches are prefilled first, then timed side by side: ``segments`` rounds, each
    running ``new`` steps on DynamicCache, all-hot and 25%-hot in turn, so a slow spell of this
    shared machine falls on all three; each keeps its best round. ``dyn_model``: a second copy of
    the model for DynamicCache (a model attends through tierstore while a TieredCache of it is
    open); default: load one."""
    import contextlib

    import tierstore
    from transformers import DynamicCache
    from tierstore.adapters.fingerprint import kv_layout
    from tierstore.adapters.hf import TieredCache
    from tierstore.adapters.models import long_text

    if dyn_model is None:
        from tierstore.adapters.models import load_smollm2
        dyn_model, _ = load_smollm2(model.dtype)
    ids = tok(long_text(tokens * 6), return_tensors="pt").input_ids[:, :tokens]
    lay = kv_layout(model, 64)
    kv_bytes = (tokens + (segments + 1) * new) * lay.token_bytes
    row = {"tokens": tokens, "dtype": str(model.dtype).removeprefix("torch."), "kv_bytes": kv_bytes}
    with contextlib.ExitStack() as stack:
        caches = {"dynamic": DynamicCache()}
        stores = {}
        for label, hot in (("all_hot", 2 * kv_bytes + (64 << 20)), ("hot25", int(kv_bytes * hot_fraction))):
            d = tempfile.mkdtemp(prefix="tierstore-bench-")
            stack.callback(shutil.rmtree, d, ignore_errors=True)
            st = stack.enter_context(tierstore.open(d, hot=hot, warm=2 * kv_bytes + (64 << 20)))
            st.manager.prepare(lay, "cpu")
            caches[label] = stack.enter_context(TieredCache(st, model, commit_on_close=False))
            stores[label] = st
        nxt, best, at = {}, {}, {}
        models = {label: dyn_model if label == "dynamic" else model for label in caches}
        for label, cache in caches.items():
            row[f"{label}_prefill_s"], nxt[label] = _prefill(models[label], ids, cache)
            best[label] = 0.0
        for label, st in stores.items():
            c = st.manager.counters
            at[label] = (c.promotions.get("warm", 0) + c.promotions.get("cold", 0), c.warm_in_place)
        for _ in range(segments):
            for label, cache in caches.items():
                tok_s, nxt[label] = _steps(models[label], cache, nxt[label], new)
                best[label] = max(best[label], tok_s)
        assert len({int(t) for t in nxt.values()}) == 1, "the three caches decoded different tokens"
        row["dynamic_tok_s"] = best["dynamic"]
        for label, st in stores.items():
            c, steps = st.manager.counters, segments * new
            row[f"{label}_tok_s"] = best[label]
            row[f"{label}_recalls_per_step"] = (c.promotions.get("warm", 0) + c.promotions.get("cold", 0)
                                                - at[label][0]) / steps
            row[f"{label}_warm_in_place_per_step"] = (c.warm_in_place - at[label][1]) / steps
            row[f"{label}_hot_peak_bytes"] = c.hot_peak * lay.block_bytes
            row[f"{label}_hot_budget_bytes"] = st.config.hot_bytes
            row[f"{label}_ratio"] = row[f"{label}_tok_s"] / row["dynamic_tok_s"]
            row[f"{label}_prefill_ratio"] = row[f"{label}_prefill_s"] / row["dynamic_prefill_s"]
    return row


@click.command("decode")
@click.option("--tokens", default="1024,4096,8192", show_default=True, help="context lengths")
@click.option("--new", default=32, show_default=True, help="decode steps timed per row")
@click.option("--dtype", default="float32", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
def decode(tokens: str, new: int, dtype: str, as_json: bool) -> None:
    """Decode tokens/s: TieredCache (all hot; 25% hot) vs DynamicCache (SmolLM2-135M)."""
    from tierstore.adapters.models import load_smollm2
    model, tok = load_smollm2(dtype_from_name(dtype))
    dyn_model, _ = load_smollm2(dtype_from_name(dtype))  # its own copy: see measure
    rows = [measure(model, tok, int(n), new, dyn_model=dyn_model) for n in tokens.split(",")]
    if as_json:
        click.echo(json.dumps({"bench": "decode", "rows": rows}, indent=2))
        return
    from rich.console import Console
    from rich.table import Table
    t = Table(title=f"greedy decode tokens/s, {new} steps (SmolLM2-135M {dtype}, this machine)")
    for c in ("tokens", "DynamicCache", "all hot", "ratio", "25% hot", "ratio", "recalls/step", "warm reads/step"):
        t.add_column(c, justify="right")
    for r in rows:
        t.add_row(str(r["tokens"]), f"{r['dynamic_tok_s']:.1f}", f"{r['all_hot_tok_s']:.1f}",
                  f"{r['all_hot_ratio']:.2f}x", f"{r['hot25_tok_s']:.1f}", f"{r['hot25_ratio']:.2f}x",
                  f"{r['hot25_recalls_per_step']:.0f}", f"{r['hot25_warm_in_place_per_step']:.0f}")
    Console().print(t)
    p = Table(title="chunked prefill (1024-token chunks), seconds: TieredCache / DynamicCache (same run)")
    for c in ("tokens", "DynamicCache s", "all hot s", "ratio", "25% hot s", "ratio"):
        p.add_column(c, justify="right")
    for r in rows:
        p.add_row(str(r["tokens"]), f"{r['dynamic_prefill_s']:.2f}", f"{r['all_hot_prefill_s']:.2f}",
                  f"{r['all_hot_prefill_ratio']:.2f}x", f"{r['hot25_prefill_s']:.2f}", f"{r['hot25_prefill_ratio']:.2f}x")
    Console().print(p)

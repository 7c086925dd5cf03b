"""Persistence of a ``TieredCache``: commit its rows as sessions, check and adopt a stored one.

Apart from the per-step attention (``adapters.hf``): a commit flushes the rows' sealed blocks,
stores each partial tail, and writes one session record per row; a resume checks the record
against the model, adopts its blocks (durable in cold, with their summaries) and restores what
fits hot.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import torch

from tierstore.errors import ModelMismatchError, TierstoreError, TokenMismatchError
from tierstore.records import BlockSummary, SessionRecord
from tierstore.tiers.schema import block_key

from .fingerprint import kv_layout, model_fingerprint


def check_record(store, model, session: str) -> SessionRecord:
    """The committed record of ``session``, refused (``ModelMismatchError``, naming what differs)
    when another model or KV layout stored it."""
    rec = store.session(session)
    fp, fields = model_fingerprint(model)
    if rec.fingerprint != fp:
        diff = {k: (rec.fingerprint_fields.get(k), fields.get(k)) for k in fields
                if rec.fingerprint_fields.get(k) != fields.get(k)}
        raise ModelMismatchError(f"session {session!r} was stored by another model; differs in {diff}")
    lay = kv_layout(model, rec.layout.block_tokens)
    if lay != rec.layout:
        raise ModelMismatchError(f"session {session!r}: stored layout {rec.layout} != model's {lay}")
    return rec


def _layer_keys(chain: bytes, layers: int) -> list[bytes]:
    return [block_key(chain, layer) for layer in range(layers)]


def commit(cache, token_ids: Sequence[int] | torch.Tensor | None = None) -> list[SessionRecord]:
    """``TieredCache.commit``: see there."""
    lay, mgr = cache.layout, cache.mgr
    rows = cache.rows
    if not cache.names:
        raise TierstoreError("this TieredCache has no session name; nothing to commit")
    if len(rows) > 1 and len(cache.names) != len(rows):
        raise TierstoreError(f"a batch of {len(rows)} rows needs {len(rows)} session names to "
                             f"persist (got {len(cache.names)})")
    if token_ids is not None:
        t = torch.as_tensor(token_ids)
        for r, (row, ids) in enumerate(zip(rows, t.reshape(-1, t.shape[-1]).tolist())):
            row.token_ids = list(ids)
            row.rehash(cache.root(r), lay.block_tokens, cache.chain_marks())
        cache.share_chains()
        full = cache.lengths[0] // lay.block_tokens
        for row in rows:  # blocks sealed while the ids were unknown
            mgr.set_keys(row.seq, {i: _layer_keys(row.chains[i], lay.num_layers) for i in range(full)})
    out = []
    n = cache.lengths[0]
    for r, (name, row) in enumerate(zip(cache.names, rows)):
        if len(row.token_ids) != n or not cache.ids_known and token_ids is None:
            raise TokenMismatchError(f"session {name!r}: the cache holds {n} tokens but "
                                     f"{len(row.token_ids)} token ids are known; pass commit(token_ids)")
        if n % lay.block_tokens:
            tails = [mgr.blocks(row.seq, layer)[-1] for layer in range(lay.num_layers)]
            mgr.set_layer_tail_keys(row.seq, _layer_keys(row.chains[-1], lay.num_layers))
            mgr.write_now(tails)
        mgr.flush(row.seq)
        logits = cache.last_logits[r].numpy() if cache.last_logits is not None else None
        prev = cache.store.sessions.read(name) if cache.store.exists(name) else None
        rec = SessionRecord(
            name=name, layout=lay, fingerprint=cache.fingerprint, fingerprint_fields=cache.fingerprint_fields,
            codec=cache.codec, token_ids=np.asarray(row.token_ids, dtype=np.int64), last_logits=logits,
            pad=row.pad, model_name=cache.model_name, tokenizer_name=cache.tokenizer_name,
            created=prev.created if prev else cache.created, updated=time.time(),
            meta={**cache.meta, "policy": cache.policy, "approx_from": cache.approx_from,
                  "positions": cache.positions.to_json()})
        out.append(cache.store.sessions.commit(rec, summaries=mgr.mass_summaries(row.seq)))
    cache.committed_blocks = n // lay.block_tokens
    return out


def adopt(cache, rec: SessionRecord, row) -> None:
    """Give ``row`` (whose sequence is open and empty) the blocks of ``rec``, durable in cold,
    with their summaries where the policy scores with them; then restore what fits hot."""
    lay, mgr, seq = cache.layout, cache.mgr, row.seq
    chains = rec.chains()
    keys = [block_key(c, layer) for layer in range(lay.num_layers) for c in chains]
    # summaries are read only for policies that score with them (exact/lru/streaming rank by
    # position or recency; a summary missing later is recomputed from the resident block)
    raw = cache.store.cold.get_many("summaries", keys) if seq.policy.uses_summaries else [None] * len(keys)
    ntoks = [rec.block_len(i) for i in range(len(chains))]
    for layer in range(lay.num_layers):
        part = slice(layer * len(chains), (layer + 1) * len(chains))
        summs = [BlockSummary.unseal(key, bytes(data), session=rec.name, layer=layer, block=i)
                 if data is not None else None for i, (key, data) in enumerate(zip(keys[part], raw[part]))]
        mgr.adopt_layer(seq, layer, list(zip(ntoks, keys[part], summs)))
    row.token_ids, row.pad, row.chains = rec.token_ids.tolist(), rec.pad, chains
    mgr.restore(seq)

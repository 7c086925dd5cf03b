"""Tensor-parallel shards of a session: one record per rank, gathered or sliced by heads.

A model split over ``n`` tensor-parallel ranks (transformers ``tp_plan``) gives rank ``r`` the
r-th contiguous slice of every layer's KV heads. Each rank's cache stores its share as its own
session, ``<session>.tp<r>of<n>``, whose record says which share it is (``meta["tp"]``: rank,
size, the head range, the model's KV heads) and whose chain carries that share (``chain.py``),
so ranks never overwrite each other's blocks.

* ``gather(store, session)``: the ``n`` shard records, checked to be one session (same tokens,
  model, layout but for the heads, heads covering every KV head once), concatenated by heads
  into the whole session ``<session>`` (what a TP=1 host resumes);
* ``slice_shard(store, session, rank, size)``: the whole record cut to one rank's heads (what a
  TP=n host resumes when only the whole session is stored).

Both copy bits: a gathered or sliced session holds exactly the KV the other degree computed.
"""

from __future__ import annotations

import re

import numpy as np
import torch

from .errors import ModelMismatchError, SessionNotFoundError, TierstoreError
from .layout import KVLayout
from .records import SessionRecord


def shard_name(session: str, rank: int, size: int) -> str:
    return f"{session}.tp{rank}of{size}"


def shard_names(store, session: str) -> list[str]:
    """The shard sessions of ``session`` this store can read (locally or on its remote tier),
    for the one TP degree that has all its ranks stored; [] when there is none."""
    pat = re.compile(re.escape(session) + r"\.tp(\d+)of(\d+)$")
    names = set(store.sessions.names())
    rep = store.sessions.replica
    if rep is not None:
        try:
            names |= set(rep.remote.names())
        except TierstoreError:
            pass
    by_size: dict[int, set[int]] = {}
    for n in names:
        m = pat.match(n)
        if m:
            by_size.setdefault(int(m.group(2)), set()).add(int(m.group(1)))
    for size, ranks in sorted(by_size.items()):
        if ranks == set(range(size)):
            return [shard_name(session, r, size) for r in range(size)]
    return []


def _check_shards(session: str, recs: list[SessionRecord]) -> int:
    first = recs[0]
    total = int(first.meta["tp"]["kv_heads"])
    heads = []
    for r in recs:
        tp = r.meta.get("tp")
        if not tp:
            raise ModelMismatchError(f"session {r.name!r} is not a tensor-parallel shard of {session!r}")
        same = (r.fingerprint == first.fingerprint and np.array_equal(r.token_ids, first.token_ids)
                and r.layout.num_layers == first.layout.num_layers and r.layout.head_dim == first.layout.head_dim
                and r.layout.dtype == first.layout.dtype and r.layout.block_tokens == first.layout.block_tokens
                and int(tp["kv_heads"]) == total and r.pad == 0)
        if not same:
            raise ModelMismatchError(f"shards of session {session!r} disagree ({r.name!r} vs {first.name!r}: "
                                     "tokens, model, layout or padding); they are not one session")
        heads.append(tuple(tp["heads"]))
    if sorted(heads) != [(i * (total // len(recs)), (i + 1) * (total // len(recs))) for i in range(len(recs))]:
        raise ModelMismatchError(f"shards of session {session!r} cover heads {sorted(heads)}, not 0..{total} once")
    return total


def _base_meta(meta: dict) -> dict:
    return {k: v for k, v in meta.items() if k != "tp"}


def gather(store, session: str, *, overwrite: bool = False) -> SessionRecord:
    """Concatenate the shards of ``session`` by heads into the whole session ``session``."""
    names = shard_names(store, session)
    if not names:
        raise SessionNotFoundError("no such session, and no complete set of tensor-parallel shards of it",
                                   session=session)
    loaded = [store.load_session(n) for n in names]
    recs = [r for r, _ in loaded]
    total = _check_shards(session, recs)
    order = sorted(range(len(recs)), key=lambda i: recs[i].meta["tp"]["heads"][0])
    kv = [(torch.cat([loaded[i][1][layer][0] for i in order]), torch.cat([loaded[i][1][layer][1] for i in order]))
          for layer in range(recs[0].layout.num_layers)]
    first = recs[0]
    lay = KVLayout(num_layers=first.layout.num_layers, kv_heads=total, head_dim=first.layout.head_dim,
                   block_tokens=first.layout.block_tokens, dtype=first.layout.dtype)
    meta = {**_base_meta(first.meta), "gathered_from": names}
    return store.put_session(session, layout=lay, kv=kv, token_ids=first.token_ids, fingerprint=first.fingerprint,
                             fingerprint_fields=first.fingerprint_fields, last_logits=first.last_logits,
                             model_name=first.model_name, tokenizer_name=first.tokenizer_name, meta=meta,
                             codec=first.codec, overwrite=overwrite)


def slice_shard(store, session: str, rank: int, size: int, *, overwrite: bool = False) -> SessionRecord:
    """The whole session ``session`` cut to rank ``rank`` of ``size``'s heads, stored as its shard."""
    rec, kv = store.load_session(session)
    if rec.meta.get("tp"):
        raise ModelMismatchError(f"session {session!r} is itself a tensor-parallel shard")
    total = rec.layout.kv_heads
    if total % size:
        raise ModelMismatchError(f"session {session!r}: {total} KV heads cannot be split over {size} ranks")
    per = total // size
    a, b = rank * per, (rank + 1) * per
    lay = KVLayout(num_layers=rec.layout.num_layers, kv_heads=per, head_dim=rec.layout.head_dim,
                   block_tokens=rec.layout.block_tokens, dtype=rec.layout.dtype)
    meta = {**rec.meta, "tp": {"rank": rank, "size": size, "heads": [a, b], "kv_heads": total},
            "sliced_from": session}
    return store.put_session(shard_name(session, rank, size), layout=lay, kv=[(k[a:b], v[a:b]) for k, v in kv],
                             token_ids=rec.token_ids, fingerprint=rec.fingerprint,
                             fingerprint_fields=rec.fingerprint_fields, last_logits=rec.last_logits,
                             model_name=rec.model_name, tokenizer_name=rec.tokenizer_name, meta=meta,
                             codec=rec.codec, overwrite=overwrite)

"""Content addressing: a block's key is a hash chain over its whole prefix (vLLM's prefix cache).

``chain[i] = blake2b(chain[i-1] || count || token ids of block i)``, seeded with a root that
covers the model fingerprint, the KV layout and whether the KV is quantised, so a lossy block is
never shared with a lossless session and two models never share a block. hashlib only: never
Python's salted ``hash()``.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Sequence

import numpy as np

from .layout import KVLayout

CHAIN_BYTES = 16


def root_hash(fingerprint: str, layout: KVLayout, quant: str = "none", pad: int = 0) -> bytes:
    """Seed of a session's chain. ``pad`` = left-padding tokens (positions shift with it)."""
    blob = json.dumps({"v": 1, "fp": fingerprint, "layout": layout.to_json(), "quant": quant,
                       "pad": int(pad)}, sort_keys=True).encode()
    return hashlib.blake2b(blob, digest_size=CHAIN_BYTES, person=b"tierstore-root").digest()


def token_bytes(ids: Sequence[int] | np.ndarray) -> bytes:
    return np.asarray(ids, dtype="<u4").tobytes()


def chain_marks(meta: dict) -> tuple[tuple[int, bytes], ...]:
    """``(position, tag)`` pairs of a session's record meta (or a cache's): the KV of tokens from
    ``position`` on depends on ``tag`` besides the tokens. ``approx_from``: the first token
    computed under sparse attention (policy and budget); ``positions`` in mode ``extend``: tokens
    past the trained length were attended at mapped distances (the mode and its parameters);
    ``tp``: the KV is one tensor-parallel rank's share of the heads (from position 0: shards of
    one session never share, or collide on, a block)."""
    marks = []
    if meta.get("tp"):
        marks.append((0, b"tp:" + json.dumps(meta["tp"], sort_keys=True).encode()))
    if meta.get("approx_from") is not None:
        marks.append((int(meta["approx_from"]), b"approx"))
    pos = meta.get("positions")
    if pos and pos.get("mode", "model") != "model":
        marks.append((int(pos["trained"]), b"positions:" + json.dumps(pos, sort_keys=True).encode()))
    return tuple(marks)


def chain_hashes(root: bytes, token_ids: Sequence[int] | np.ndarray, block_tokens: int,
                 approx_from: int | None = None, *, marks: Sequence[tuple[int, bytes]] = ()) -> list[bytes]:
    """One hash per block of ``token_ids`` (the last one may cover a partial block).

    ``approx_from``: position of the first token whose KV was computed under sparse attention
    (it depends on the policy and budget, not only on the tokens). Blocks reaching past it get
    a different chain, so approximate KV is never shared with, or served to, an exact session.
    ``marks``: ``chain_marks`` pairs, the general form (``approx_from`` is ``(pos, b"approx")``)."""
    marks = tuple(marks) + (((approx_from, b"approx"),) if approx_from is not None else ())
    ids = np.asarray(token_ids, dtype=np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= 2**32):
        raise ValueError("token ids must be in [0, 2**32)")
    raw = ids.astype("<u4")
    out: list[bytes] = []
    parent = root
    for start in range(0, len(raw), block_tokens):
        chunk = raw[start:start + block_tokens]
        h = hashlib.blake2b(parent, digest_size=CHAIN_BYTES, person=b"tierstore-blk")
        h.update(struct.pack("<I", len(chunk)))
        h.update(chunk.tobytes())
        for at, tag in marks:
            if start + len(chunk) > at:
                h.update(tag)
        parent = h.digest()
        out.append(parent)
    return out

"""The cold tier's schema: the one module that knows how a store lies in LMDB.

Sub-databases (``DB_NAMES``; all keys and values are bytes):

* ``meta``      store-level facts: ``META_STORE`` -> JSON (format version, created,
  block_tokens); ``SKETCH_PREFIX`` + layout digest + ``:`` + layer -> sealed key-sketch basis
* ``sessions``  session name (UTF-8) -> sealed session record (the single point of visibility)
* ``blocks``    chain hash (``CHAIN_BYTES``) || layer (u16 BE) -> block record (see ``codec``)
* ``summaries`` same key as the block -> sealed block summary
* ``refs``      chain hash -> u32 LE count of the session records that name that position
* ``leases``    session name (UTF-8) -> JSON writer lease

With a remote tier (``tierstore.remote``) ``meta`` also holds, per session, ``OUTBOX_PREFIX`` +
name -> JSON of a local change not yet published (written in the commit's own transaction: the
durable outbox) and ``KNOWN_PREFIX`` + name -> JSON of the remote version this host last saw.

A chain position's blocks and summaries share the chain hash as key prefix, so one cursor
``set_range(chain)`` reaches every layer of a position in layer order. Refs carry no checksum:
``decode_refs`` returns None for a value of the wrong length, and the caller decides whether
that stops a write (``sessions``) or is reported (``maintenance``).

Pure encoding, no LMDB: ``ColdStore`` (``cold.py``) opens the databases this module names.
"""

from __future__ import annotations

import struct

from ..chain import CHAIN_BYTES

DB_NAMES = ("meta", "sessions", "blocks", "summaries", "refs", "leases")
KEY_BYTES = CHAIN_BYTES + 2          # block / summary key: chain hash || layer (u16 BE)
REFS_BYTES = 4                       # refs value: u32 LE
META_STORE = b"store"                # meta key of the store's JSON facts
SKETCH_PREFIX = b"sketch:"           # meta keys of key-sketch bases
OUTBOX_PREFIX = b"outbox:"           # meta keys of changes the remote tier has not got yet
KNOWN_PREFIX = b"remote:"            # meta keys of the remote version a session was last synced at

_LAYER = struct.Struct(">H")
_REFS = struct.Struct("<I")

__all__ = ["CHAIN_BYTES", "DB_NAMES", "KEY_BYTES", "KNOWN_PREFIX", "META_STORE", "OUTBOX_PREFIX", "REFS_BYTES",
           "SKETCH_PREFIX",
           "block_key", "chain_of", "decode_refs", "encode_refs", "name_key", "sketch_key", "split_key"]


def block_key(chain: bytes, layer: int) -> bytes:
    """Key of one layer's block (and its summary) at one chain position."""
    return chain + _LAYER.pack(layer)


def split_key(key: bytes) -> tuple[bytes, int]:
    """``block_key`` inverted: ``(chain, layer)``."""
    return bytes(key[:CHAIN_BYTES]), _LAYER.unpack(key[CHAIN_BYTES:KEY_BYTES])[0]


def chain_of(key: bytes) -> bytes:
    """The chain position (refs key) a block or summary key belongs to."""
    return bytes(key[:CHAIN_BYTES])


def name_key(name: str) -> bytes:
    """Key of a session's record in ``sessions`` and of its lease in ``leases``."""
    return name.encode()


def encode_refs(count: int) -> bytes:
    """Value of a ``refs`` entry: how many session records name the position."""
    return _REFS.pack(count)


def decode_refs(raw: bytes | memoryview) -> int | None:
    """A ``refs`` value's count; None when the value is damaged (not ``REFS_BYTES`` long)."""
    if len(raw) != REFS_BYTES:
        return None
    return _REFS.unpack(bytes(raw))[0]


def sketch_key(layout_digest: str, layer: int) -> bytes:
    """Meta key of one layer's key-sketch basis for one KV layout."""
    return SKETCH_PREFIX + layout_digest.encode() + b":" + str(layer).encode()

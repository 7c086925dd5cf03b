"""A checksummed, versioned envelope for records that are not blocks (summaries, sessions).

Layout (little-endian, 36-byte header)::

    magic     4s   b"TSKE"
    kind      4s   what the body is, e.g. b"SUMM", b"SESS"
    version   u16  FORMAT_VERSION (1)
    reserved  u16  0
    body_len  u64  bytes after the header; the envelope is exactly header + body
    checksum  16s  xxh3_128(key || header with checksum zeroed || body)
"""

from __future__ import annotations

import struct

import xxhash

from ..errors import CorruptBlockError, FormatVersionError
from ..layout import FORMAT_VERSION

MAGIC = b"TSKE"
_HEADER = struct.Struct("<4s4sHHQ16s")
HEADER_SIZE = _HEADER.size     # 36
_CHECKSUM_AT = HEADER_SIZE - 16


def _checksum(key: bytes, header, body) -> bytes:
    h = xxhash.xxh3_128()
    h.update(key)
    h.update(header[:_CHECKSUM_AT])
    h.update(bytes(16))
    h.update(body)
    return h.digest()


def _check_kind(kind: bytes) -> None:
    if not isinstance(kind, bytes) or len(kind) != 4:
        raise ValueError(f"envelope kind must be 4 bytes, got {kind!r}")


def seal_envelope(key: bytes, kind: bytes, body: bytes) -> bytes:
    """Wrap ``body`` for storage under ``key``."""
    _check_kind(kind)
    header = bytearray(_HEADER.pack(MAGIC, kind, FORMAT_VERSION, 0, len(body), bytes(16)))
    header[_CHECKSUM_AT:] = _checksum(key, header, body)
    return b"".join([header, body])


def open_envelope(key: bytes, kind: bytes, data, *, error: type = CorruptBlockError, **where) -> bytes:
    """Verify an envelope stored under ``key`` and return its body.

    Any damage raises ``error(reason, **where)`` (``key=key`` is added when ``where`` has none);
    a version above this code's raises :class:`FormatVersionError` with the same context.
    """
    _check_kind(kind)
    where.setdefault("key", key)
    mv = memoryview(data).cast("B") if not isinstance(data, (bytes, bytearray)) else memoryview(data)
    if len(mv) < 10:
        raise error(f"{kind.decode(errors='replace')} record truncated: {len(mv)} bytes", **where)
    if bytes(mv[:4]) != MAGIC:
        raise error(f"bad magic {bytes(mv[:4])!r} (not a tierstore record)", **where)
    if bytes(mv[4:8]) != kind:
        raise error(f"record is of kind {bytes(mv[4:8])!r}, expected {kind!r}", **where)
    version = struct.unpack_from("<H", mv, 8)[0]
    if version != FORMAT_VERSION:
        if version > FORMAT_VERSION and not _version_damaged(mv, key):
            raise FormatVersionError(f"{kind.decode()} record format version {version}; this tierstore "
                                     f"reads version {FORMAT_VERSION} (upgrade tierstore)", **where)
        raise error(f"bad format version field {version}", **where)
    if len(mv) < HEADER_SIZE:
        raise error(f"record truncated: {len(mv)} bytes, the header alone is {HEADER_SIZE}", **where)
    _, _, _, reserved, body_len, checksum = _HEADER.unpack_from(mv)
    if reserved:
        raise error(f"reserved header field is {reserved}, not 0", **where)
    if HEADER_SIZE + body_len != len(mv):
        raise error(f"record is {len(mv)} bytes but its header says {HEADER_SIZE + body_len}", **where)
    body = mv[HEADER_SIZE:]
    if _checksum(key, mv[:HEADER_SIZE], body) != checksum:
        raise error("checksum mismatch (damaged, or stored under another key)", **where)
    return bytes(body)


def _version_damaged(mv: memoryview, key: bytes) -> bool:
    """True if the envelope verifies as v1 once its version reads 1: a damaged field, not a newer format."""
    if len(mv) < HEADER_SIZE:
        return False
    fixed = bytearray(mv[:HEADER_SIZE])
    struct.pack_into("<H", fixed, 8, FORMAT_VERSION)
    body_len = struct.unpack_from("<Q", fixed, 12)[0]
    if HEADER_SIZE + body_len != len(mv):
        return False
    return _checksum(key, fixed, mv[HEADER_SIZE:]) == bytes(fixed[_CHECKSUM_AT:])

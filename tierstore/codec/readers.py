"""Resume fast paths: verify full-block records of one known shape and dtype and decode them
straight into slot arrays, with the per-record work cut to header compares, one checksum and
the decode itself (a resume reads thousands of blocks; ``decode_block`` costs ~25 us of Python
per record, and on a zstd restore that Python, which holds the GIL, kept the decode threads
from running side by side).

A reader's ``read`` returns False for anything it cannot vouch for cheaply (a partial tail
block, another codec, another shape, damage): the caller then decodes the record with
``decode_block``, which verifies it fully and raises the precise error. A record accepted here
has passed the same checks as in ``decode_block``: header fields, exact length, checksum (over
key, header and payload) and, for zstd, every frame's declared and decoded size.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import xxhash

from ..layout import DTYPE_CODES, FORMAT_VERSION, SAME_SIZE_INT
from .config import CODEC_IDS, MAX_LEVEL
from .record import _CHECKSUM_AT, _HEADER, _ITEMSIZE, _ZERO_SUM, HEADER_SIZE, MAGIC
from .shuffle import RecordProblem, decompress_frame, interleave_many, split_frames

_CODEC_AT, _LEVEL_AT, _PAYLOAD_LEN_AT = 6, 7, 32   # byte offsets in the header (record.py)


def _header(codec: str, shape: tuple[int, int, int], dtype: torch.dtype, payload_len: int) -> bytes:
    """The first ``_CHECKSUM_AT`` header bytes ``encode_block`` writes (zstd level 0)."""
    raw_len = 2 * math.prod(shape) * _ITEMSIZE[dtype]
    return _HEADER.pack(MAGIC, FORMAT_VERSION, CODEC_IDS[codec], 0, 0, DTYPE_CODES[dtype], 0,
                        *shape, raw_len, payload_len, _ZERO_SUM)[:_CHECKSUM_AT]


class RawBlockReader:
    """Raw full blocks: one header compare, one checksum and one copy into the slot."""

    def __init__(self, shape: tuple[int, int, int], dtype: torch.dtype) -> None:
        itemsize = _ITEMSIZE[dtype]
        n = math.prod(shape)
        raw_len = 2 * n * itemsize
        self._prefix = _header("raw", shape, dtype, raw_len)
        self._zeroed = self._prefix + _ZERO_SUM
        self._len = HEADER_SIZE + raw_len
        self._ndt = SAME_SIZE_INT[itemsize][1]
        self._shape = (2, *shape)
        self._count = 2 * n

    def read(self, key: bytes, record, dst: np.ndarray) -> bool:
        """``dst``: ``[2 (K, V), kv_heads, ntok, head_dim]`` numpy view (same-size signed ints)
        of the destination slot. It is written before the checksum is compared (the record is
        then verified from cache); on False its content is undefined."""
        mv = memoryview(record)
        if len(mv) != self._len or mv[:_CHECKSUM_AT] != self._prefix:
            return False
        np.copyto(dst, np.frombuffer(record, dtype=self._ndt, count=self._count, offset=HEADER_SIZE).reshape(self._shape))
        h = xxhash.xxh3_128(key + self._zeroed)
        h.update(mv[HEADER_SIZE:])
        return h.digest() == mv[_CHECKSUM_AT:HEADER_SIZE]


class ZstdBlockReader:
    """Byte planes + zstd full blocks (any level): header compares, the checksum, then each
    plane's frame decoded (zstandard releases the GIL) and scattered into the slot's bytes.
    Nothing is decoded before the checksum matches."""

    def __init__(self, shape: tuple[int, int, int], dtype: torch.dtype) -> None:
        head = _header("zstd", shape, dtype, 0)
        self._head, self._fields = head[:_LEVEL_AT], head[_LEVEL_AT + 1:_PAYLOAD_LEN_AT]
        self._planes = _ITEMSIZE[dtype]
        self._count = 2 * math.prod(shape)   # elements of K then V: every plane's size in bytes
        self._min_len = HEADER_SIZE + 4 * self._planes

    def planes(self, key: bytes, record) -> list[bytes] | None:
        """The record's byte planes, decoded once its header, length, checksum and every frame's
        declared and decoded size passed; None for anything else (nothing is decoded before the
        checksum matches)."""
        mv = memoryview(record)
        if len(mv) < self._min_len or mv[:_LEVEL_AT] != self._head or mv[_LEVEL_AT + 1:_PAYLOAD_LEN_AT] != self._fields:
            return None
        if MAX_LEVEL < mv[_LEVEL_AT] < 128:  # the level is an i8: 23..127 are no zstd level
            return None
        if int.from_bytes(mv[_PAYLOAD_LEN_AT:_CHECKSUM_AT], "little") != len(mv) - HEADER_SIZE:
            return None
        h = xxhash.xxh3_128(key)
        h.update(mv[:_CHECKSUM_AT])
        h.update(_ZERO_SUM)
        h.update(mv[HEADER_SIZE:])
        if h.digest() != mv[_CHECKSUM_AT:HEADER_SIZE]:
            return None
        try:
            return [decompress_frame(f, self._count) for f in split_frames(mv[HEADER_SIZE:], self._planes)]
        except RecordProblem:
            return None

    def read(self, key: bytes, record, dst: np.ndarray) -> bool:
        """``dst`` as for :meth:`RawBlockReader.read`; written only once the checksum matched."""
        planes = self.planes(key, record)
        if planes is None:
            return False
        interleave_many([planes], dst[None])
        return True


class SlotReader:
    """The fast path for whichever codec a record names (raw or zstd); False for the others.

    A zstd record can also be taken in two halves, :meth:`planes` (verify and decompress) then
    :func:`~tierstore.codec.shuffle.interleave_many` over a run of adjacent slots: the byte
    scatter of a run costs a handful of array passes instead of a handful per block."""

    def __init__(self, shape: tuple[int, int, int], dtype: torch.dtype) -> None:
        self._zstd = ZstdBlockReader(shape, dtype)
        self._by_codec = {CODEC_IDS["raw"]: RawBlockReader(shape, dtype).read, CODEC_IDS["zstd"]: self._zstd.read}

    def read(self, key: bytes, record, dst: np.ndarray) -> bool:
        """As :meth:`RawBlockReader.read`."""
        read = self._by_codec.get(record[_CODEC_AT]) if len(record) > _CODEC_AT else None
        return read is not None and read(key, record, dst)

    def planes(self, key: bytes, record) -> list[bytes] | None:
        """A full zstd record's verified byte planes (:meth:`ZstdBlockReader.planes`); None for
        every other record, which :meth:`read` or ``decode_block`` then takes."""
        if len(record) <= _CODEC_AT or record[_CODEC_AT] != CODEC_IDS["zstd"]:
            return None
        return self._zstd.planes(key, record)

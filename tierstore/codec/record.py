"""Block record format v1: a fixed header, then the codec's payload.

Header (little-endian, 56 bytes; see ``_HEADER``)::

    magic     4s   b"TSKB"
    version   u16  FORMAT_VERSION (1)
    codec     u8   CODEC_IDS
    level     i8   zstd level (zstd codecs), else 0
    group     u16  int4 group size (int4 codecs), else 0
    dtype     u8   layout.DTYPE_CODES
    reserved  u8   0
    shape     3xu32 (kv_heads, ntok, head_dim), each >= 1
    raw_len   u64  bytes of K and V in the stored dtype = 2 * H * T * D * itemsize
    payload   u64  bytes after the header; the record is exactly header + payload
    checksum  16s  xxh3_128(key || header with checksum zeroed || payload)

The checksum covers the key, so a record copied under another key fails. Every check that
bounds an allocation runs before anything is allocated; the checksum is verified before any
decode. Any problem raises :class:`CorruptBlockError` naming the session/layer/block given (or
the key); a version above 1 raises :class:`FormatVersionError`.
"""

from __future__ import annotations

import functools
import math
import struct
import sys
from dataclasses import dataclass

import numpy as np
import torch
import xxhash

from ..errors import CorruptBlockError, FormatVersionError
from ..layout import CODE_DTYPES, DTYPE_CODES, FORMAT_VERSION, SAME_SIZE_INT
from .config import CODEC_IDS, DEFAULT_GROUP, DEFAULT_LEVEL, ID_CODECS, CodecConfig
from .quant import QuantShape, decode_quant, encode_quant
from .shuffle import RecordProblem, compress_section, decompress_frame, decompress_section, pack_frames, split_frames

if sys.byteorder != "little":  # payloads are the host's raw element bytes
    raise ImportError("tierstore's block format needs a little-endian host")

MAGIC = b"TSKB"
_HEADER = struct.Struct("<4sHBbHBB3IQQ16s")
HEADER_SIZE = _HEADER.size            # 56
_CHECKSUM_AT = HEADER_SIZE - 16
_ZERO_SUM = bytes(16)
# Largest raw block a record may describe: far above any real block (64 tokens x 64 heads x 256
# dims x fp32 x K+V = 8 MiB), far below an allocation that could hurt. A hostile header that
# passes its checksum still cannot make the decoder allocate more than this.
MAX_RAW_LEN = 256 << 20
_ITEMSIZE = {torch.float32: 4, torch.float16: 2, torch.bfloat16: 2}


@dataclass(frozen=True)
class RecordHeader:
    version: int
    codec: CodecConfig
    dtype: torch.dtype
    shape: tuple[int, int, int]   # (kv_heads, ntok, head_dim)
    raw_len: int
    payload_len: int
    checksum: bytes

    @property
    def itemsize(self) -> int:
        return self.raw_len // (2 * math.prod(self.shape))

    @property
    def record_len(self) -> int:
        return HEADER_SIZE + self.payload_len


def _checksum(key: bytes, header: bytes | memoryview, parts) -> bytes:
    h = xxhash.xxh3_128()
    h.update(key)
    h.update(header[:_CHECKSUM_AT])
    h.update(_ZERO_SUM)
    for p in parts:
        h.update(p)
    return h.digest()


@functools.lru_cache(maxsize=256)
def _codec(name: str, level: int, group: int) -> CodecConfig:
    return CodecConfig(name, level, group)


def _where(key, session, layer, block) -> dict:
    return {"session": session, "layer": layer, "block": block, "key": key}


def _fail(reason: str, where: dict) -> CorruptBlockError:
    return CorruptBlockError(reason, **where)


def _expected_payload(codec: CodecConfig, shape, itemsize: int) -> tuple[int, int | None]:
    """Lowest and highest (None: unbounded) payload length consistent with codec and shape."""
    raw_len = 2 * math.prod(shape) * itemsize
    if codec.name == "raw":
        return raw_len, raw_len
    if codec.name == "zstd":
        return 4 * itemsize, None
    if codec.uses_zstd:
        return 4 * (1 + itemsize), None      # frame table; each frame's content size is checked later
    exact = QuantShape.of(shape, codec.quant, codec.group, itemsize).payload_bytes
    return exact, exact


def _version_damaged(mv: memoryview, key: bytes | None) -> bool:
    """True if the record verifies as v1 once its version field reads 1 again: then the field was
    damaged, and this is corruption, not a record from a newer format."""
    if key is None or len(mv) < HEADER_SIZE:
        return False
    fixed = bytearray(mv[:HEADER_SIZE])
    struct.pack_into("<H", fixed, 4, FORMAT_VERSION)
    payload_len = struct.unpack_from("<Q", fixed, _CHECKSUM_AT - 8)[0]
    if HEADER_SIZE + payload_len != len(mv):
        return False
    return _checksum(key, fixed, [mv[HEADER_SIZE:]]) == bytes(fixed[_CHECKSUM_AT:])


def _parse(mv: memoryview, key: bytes | None, where: dict) -> RecordHeader:
    """Structure checks only (no checksum): everything that bounds sizes and allocations."""
    if len(mv) < 6:
        raise _fail(f"record truncated: {len(mv)} bytes", where)
    if bytes(mv[:4]) != MAGIC:
        raise _fail(f"bad magic {bytes(mv[:4])!r} (not a block record)", where)
    version = struct.unpack_from("<H", mv, 4)[0]
    if version != FORMAT_VERSION:
        if version > FORMAT_VERSION and not _version_damaged(mv, key):
            raise FormatVersionError(f"block record format version {version}; this tierstore reads "
                                     f"version {FORMAT_VERSION} (upgrade tierstore)", **where)
        raise _fail(f"bad format version field {version}", where)
    if len(mv) < HEADER_SIZE:
        raise _fail(f"record truncated: {len(mv)} bytes, the header alone is {HEADER_SIZE}", where)
    (_, _, codec_id, level, group, dtype_code, reserved, h, t, d,
     raw_len, payload_len, checksum) = _HEADER.unpack_from(mv)
    name = ID_CODECS.get(codec_id)
    if name is None:
        raise _fail(f"unknown codec id {codec_id}", where)
    dtype = CODE_DTYPES.get(dtype_code)
    if dtype is None:
        raise _fail(f"unknown dtype code {dtype_code}", where)
    if reserved:
        raise _fail(f"reserved header byte is {reserved}, not 0", where)
    uses_zstd, is_int4 = "zstd" in name, name.startswith("int4")
    if (not uses_zstd and level) or (not is_int4 and group) or (is_int4 and not group):
        raise _fail(f"codec parameters level={level} group={group} are impossible for {name}", where)
    try:
        codec = _codec(name, level if uses_zstd else DEFAULT_LEVEL, group if is_int4 else DEFAULT_GROUP)
    except ValueError as e:
        raise _fail(str(e), where) from None
    shape = (h, t, d)
    itemsize = _ITEMSIZE[dtype]
    if min(shape) < 1:
        raise _fail(f"impossible shape {shape}", where)
    expected_raw = 2 * h * t * d * itemsize
    if raw_len != expected_raw:
        raise _fail(f"raw length {raw_len} does not match shape {shape} of {dtype} ({expected_raw})", where)
    if raw_len > MAX_RAW_LEN:
        raise _fail(f"block of {raw_len} bytes exceeds the {MAX_RAW_LEN}-byte limit", where)
    if HEADER_SIZE + payload_len != len(mv):
        raise _fail(f"record is {len(mv)} bytes but its header says {HEADER_SIZE + payload_len} "
                    f"({'truncated' if len(mv) < HEADER_SIZE + payload_len else 'trailing bytes'})", where)
    lo, hi = _expected_payload(codec, shape, itemsize)
    if payload_len < lo or (hi is not None and payload_len != hi):
        raise _fail(f"payload of {payload_len} bytes is impossible for {codec.spec} {shape} {dtype}", where)
    return RecordHeader(version, codec, dtype, shape, raw_len, payload_len, checksum)


def _view(record) -> memoryview:
    mv = memoryview(record)
    if mv.ndim != 1 or mv.itemsize != 1:
        mv = mv.cast("B")
    return mv


def read_header(record, *, key: bytes | None = None, session: str | None = None,
                layer: int | None = None, block: int | None = None) -> RecordHeader:
    """Parse and structure-check the header; no checksum. ``key``, if given, names the record in
    errors and tells a damaged version field from a newer format."""
    return _parse(_view(record), key, _where(key, session, layer, block))


def _verified(mv: memoryview, key: bytes, where: dict) -> RecordHeader:
    hdr = _parse(mv, key, where)
    if _checksum(key, mv[:HEADER_SIZE], [mv[HEADER_SIZE:]]) != hdr.checksum:
        raise _fail("checksum mismatch (damaged, or stored under another key)", where)
    return hdr


def verify_record(key: bytes, record, *, session: str | None = None, layer: int | None = None,
                  block: int | None = None) -> RecordHeader:
    """Checksum and structure; decodes no tensor."""
    return _verified(_view(record), key, _where(key, session, layer, block))


# ---------------------------------------------------------------------------------------- encode

def _check_inputs(k: torch.Tensor, v: torch.Tensor) -> None:
    if not isinstance(k, torch.Tensor) or not isinstance(v, torch.Tensor):
        raise TypeError("encode_block: k and v must be tensors")
    if k.dim() != 3 or k.shape != v.shape:
        raise ValueError(f"encode_block: k and v must both be [kv_heads, ntok, head_dim]; got "
                         f"{tuple(k.shape)} and {tuple(v.shape)}")
    if min(k.shape) < 1:
        raise ValueError(f"encode_block: empty block {tuple(k.shape)}")
    if k.dtype != v.dtype or k.dtype not in DTYPE_CODES:
        raise ValueError(f"encode_block: k and v must share one dtype of {list(DTYPE_CODES)}; "
                         f"got {k.dtype} and {v.dtype}")
    raw_len = 2 * k.numel() * k.element_size()
    if raw_len > MAX_RAW_LEN:
        raise ValueError(f"encode_block: block of {raw_len} bytes exceeds the {MAX_RAW_LEN}-byte limit")


def _element_bytes(x: torch.Tensor) -> np.ndarray:
    """[N, itemsize] uint8 view of a contiguous CPU tensor."""
    return x.reshape(-1).view(torch.uint8).numpy().reshape(-1, x.element_size())


def encode_block(key: bytes, k: torch.Tensor, v: torch.Tensor, codec: CodecConfig | str) -> bytes:
    """k, v: [kv_heads, ntok, head_dim], one dtype of float32/float16/bfloat16, any device."""
    codec = CodecConfig.parse(codec)
    _check_inputs(k, v)
    k = k.detach().to("cpu").contiguous()
    v = v.detach().to("cpu").contiguous()
    shape = tuple(k.shape)
    itemsize = k.element_size()
    if codec.name == "raw":
        parts = [_element_bytes(k), _element_bytes(v)]
    elif codec.name == "zstd":
        parts = pack_frames(compress_section([_element_bytes(k), _element_bytes(v)], codec.level))
    else:
        qs = QuantShape.of(shape, codec.quant, codec.group, itemsize)
        codes, params = encode_quant(k, v, qs)
        if codec.uses_zstd:
            pv = np.frombuffer(params, dtype=np.uint8).reshape(-1, itemsize)
            frames = (compress_section([np.frombuffer(codes, dtype=np.uint8).reshape(-1, 1)], codec.level)
                      + compress_section([pv], codec.level))
            parts = pack_frames(frames)
        else:
            parts = [codes, params]
    payload_len = sum(memoryview(p).nbytes for p in parts)
    header = bytearray(_HEADER.pack(
        MAGIC, FORMAT_VERSION, CODEC_IDS[codec.name], codec.level if codec.uses_zstd else 0,
        codec.group if codec.quant == "int4" else 0, DTYPE_CODES[k.dtype], 0, *shape,
        2 * k.numel() * itemsize, payload_len, _ZERO_SUM))
    header[_CHECKSUM_AT:] = _checksum(key, header, parts)
    return b"".join([header, *parts])


# ---------------------------------------------------------------------------------------- decode

def _outputs(hdr: RecordHeader, out_k, out_v, where: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The [H, T, D] tensors to decode into: views of out_k/out_v, or fresh tensors."""
    if out_k is None and out_v is None:
        return torch.empty(hdr.shape, dtype=hdr.dtype), torch.empty(hdr.shape, dtype=hdr.dtype)
    if out_k is None or out_v is None:
        raise ValueError("decode_block: pass both out_k and out_v, or neither")
    for name, o in (("out_k", out_k), ("out_v", out_v)):
        if o.device.type != "cpu" or o.dim() != 3:
            raise ValueError(f"decode_block: {name} must be a 3-D CPU tensor, got {tuple(o.shape)} on {o.device}")
    h, t, d = hdr.shape
    for name, o in (("out_k", out_k), ("out_v", out_v)):
        if o.dtype != hdr.dtype or o.shape[0] != h or o.shape[2] != d or o.shape[1] < t:
            raise _fail(f"record holds {hdr.dtype} {hdr.shape}, which does not fit {name} "
                        f"{o.dtype} {tuple(o.shape)}", where)
    return out_k[:, :t], out_v[:, :t]


def _decode_raw(payload: memoryview, hdr: RecordHeader, ok: torch.Tensor, ov: torch.Tensor) -> None:
    tdt, ndt = SAME_SIZE_INT[hdr.itemsize]
    n = math.prod(hdr.shape)
    for i, o in enumerate((ok, ov)):
        src = np.frombuffer(payload, dtype=ndt, count=n, offset=i * n * hdr.itemsize).reshape(hdr.shape)
        np.copyto(o.view(tdt).numpy(), src)          # the one copy: record buffer -> destination


def _decode_quant(payload: memoryview, hdr: RecordHeader, ok: torch.Tensor, ov: torch.Tensor) -> None:
    qs = QuantShape.of(hdr.shape, hdr.codec.quant, hdr.codec.group, hdr.itemsize)
    if hdr.codec.uses_zstd:
        frames = split_frames(payload, 1 + hdr.itemsize)
        codes = torch.from_numpy(np.frombuffer(bytearray(decompress_frame(frames[0], 2 * qs.code_bytes)),
                                               dtype=np.uint8))
        params = torch.empty(qs.param_bytes // hdr.itemsize, dtype=hdr.dtype)
        decompress_section(frames[1:], [params])
    else:
        buf = bytearray(payload)                      # small (a quarter of raw); torch wants writable
        codes = torch.frombuffer(buf, dtype=torch.uint8, count=2 * qs.code_bytes)
        params = torch.frombuffer(buf, dtype=hdr.dtype, offset=2 * qs.code_bytes)
    decode_quant(codes, params, qs, ok, ov)


def decode_block(key: bytes, record, *, out_k: torch.Tensor | None = None, out_v: torch.Tensor | None = None,
                 session: str | None = None, layer: int | None = None,
                 block: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Verify and decode a record into K, V [kv_heads, ntok, head_dim] CPU tensors of the stored
    dtype; into the first ntok tokens of ``out_k``/``out_v`` (views returned) when given."""
    where = _where(key, session, layer, block)
    mv = _view(record)
    hdr = _verified(mv, key, where)
    ok, ov = _outputs(hdr, out_k, out_v, where)
    payload = mv[HEADER_SIZE:]
    try:
        if hdr.codec.name == "raw":
            _decode_raw(payload, hdr, ok, ov)
        elif hdr.codec.name == "zstd":
            decompress_section(split_frames(payload, hdr.itemsize), [ok, ov])
        else:
            _decode_quant(payload, hdr, ok, ov)
    except RecordProblem as e:
        raise _fail(str(e), where) from None
    return ok, ov

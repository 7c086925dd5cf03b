"""Byte planes + zstd: the lossless part of every compressed payload.

A *section* is an array of fixed-size elements (e.g. the K and V floats of a block). Plane ``j``
of a section is byte ``j`` of every element, in order; each plane is one zstd frame. Sign and
exponent bytes of KV floats are highly repetitive while mantissa bytes are nearly random, so
coding them apart reaches about the entropy limit (1.45x on bf16 KV, vs 1.28x for plain zstd).

Payload layout: ``u32 frame length`` for every frame (little-endian), then the frames.
zstd contexts are not thread safe: each thread keeps its own (``threading.local``).
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Sequence

import numpy as np
import torch
import zstandard

# [n, itemsize] uint8: the element bytes of one part of a section, n elements.
ElementBytes = np.ndarray


class RecordProblem(Exception):
    """Internal: the payload is malformed. The record layer turns it into a located error."""


_local = threading.local()


def _compressor(level: int) -> zstandard.ZstdCompressor:
    cache = getattr(_local, "compressors", None)
    if cache is None:
        cache = _local.compressors = {}
    c = cache.get(level)
    if c is None:
        # content size in every frame: the decoder checks it before it decompresses anything.
        c = cache[level] = zstandard.ZstdCompressor(level=level, write_content_size=True, threads=0)
    return c


def _decompressor() -> zstandard.ZstdDecompressor:
    d = getattr(_local, "decompressor", None)
    if d is None:
        d = _local.decompressor = zstandard.ZstdDecompressor()
    return d


def compress_section(parts: Sequence[ElementBytes], level: int) -> list[bytes]:
    """One frame per byte plane of the concatenated parts. parts: [n_i, itemsize] uint8 each."""
    itemsize = parts[0].shape[1]
    total = sum(p.shape[0] for p in parts)
    planes = np.empty((itemsize, total), dtype=np.uint8)   # [itemsize, total]
    at = 0
    for p in parts:
        planes[:, at:at + p.shape[0]] = p.T
        at += p.shape[0]
    c = _compressor(level)
    return [c.compress(planes[j]) for j in range(itemsize)]


def pack_frames(frames: Sequence[bytes]) -> list[bytes]:
    """Payload pieces: the length preamble, then the frames (to be joined by the caller)."""
    return [struct.pack(f"<{len(frames)}I", *map(len, frames)), *frames]


def split_frames(payload: memoryview, nframes: int) -> list[memoryview]:
    """Inverse of :func:`pack_frames`; the frames must fill the payload exactly."""
    pre = 4 * nframes
    if len(payload) < pre:
        raise RecordProblem(f"payload of {len(payload)} bytes is shorter than its {pre}-byte frame table")
    lengths = struct.unpack_from(f"<{nframes}I", payload)
    if pre + sum(lengths) != len(payload):
        raise RecordProblem(f"frame lengths {list(lengths)} do not fill the {len(payload)}-byte payload")
    frames, at = [], pre
    for n in lengths:
        frames.append(payload[at:at + n])
        at += n
    return frames


def decompress_frame(frame: memoryview, size: int) -> bytes:
    """Decompress one frame that must hold exactly ``size`` bytes. Nothing larger is allocated:
    the size written in the frame header is checked first (zstandard would trust it)."""
    try:
        declared = zstandard.frame_content_size(frame)
    except zstandard.ZstdError as e:
        raise RecordProblem(f"bad zstd frame header: {e}") from None
    if declared != size:
        raise RecordProblem(f"zstd frame declares {declared} bytes, expected {size}")
    try:
        out = _decompressor().decompress(frame, max_output_size=size, allow_extra_data=False)
    except zstandard.ZstdError as e:
        raise RecordProblem(f"zstd error: {e}") from None
    if len(out) != size:
        raise RecordProblem(f"zstd frame decoded to {len(out)} bytes, expected {size}")
    return out


def decompress_section(frames: Sequence[memoryview], dests: Sequence[torch.Tensor]) -> None:
    """Decode the ``itemsize`` planes of a section into ``dests``: CPU tensors of one dtype (any
    shape and strides) that together hold the section's elements in order."""
    counts = [d.numel() for d in dests]
    total = sum(counts)
    planes = [np.frombuffer(decompress_frame(f, total), dtype=np.uint8) for f in frames]
    at = 0
    for d, n in zip(dests, counts):
        _interleave([p[at:at + n].reshape(d.shape) for p in planes], d)
        at += n


def _interleave(planes: list[np.ndarray], dest: torch.Tensor) -> None:
    """dest's element bytes <- planes (byte j of each element from planes[j])."""
    if dest.dim() and dest.stride(-1) != 1 and len(planes) > 2:  # channels strided: no byte view exists
        tmp = torch.empty(dest.shape, dtype=dest.dtype)
        _interleave(planes, tmp)
        dest.copy_(tmp)
        return
    same = {1: torch.uint8, 2: torch.int16, 4: torch.int32}[len(planes)]
    interleave(planes, dest.view(same).numpy())


def interleave(planes: list[np.ndarray], out: np.ndarray) -> None:
    """out's element bytes <- planes: ``out`` is an integer array of itemsize ``len(planes)`` (any
    strides; its last axis contiguous when itemsize > 2); ``planes[j]`` holds byte ``j`` of every
    element of ``out``, in ``out``'s C order."""
    planes = [p.reshape(out.shape) for p in planes]
    if len(planes) == 1:
        np.copyto(out.view(np.uint8), planes[0])
    elif len(planes) == 2:   # 2.4x faster than two strided byte scatters
        u = out.view(np.uint16)
        np.left_shift(planes[1], 8, out=u, dtype=np.uint16)
        np.bitwise_or(u, planes[0], out=u)
    else:                    # one strided byte scatter per plane, straight into out
        b = np.reshape(out.view(np.uint8), (*out.shape, len(planes)), copy=False)
        for j, p in enumerate(planes):
            b[..., j] = p

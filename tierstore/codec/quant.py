"""KIVI-style asymmetric quantisation of one block: keys per channel, values per token.

Keys ``[H, T, D]`` are quantised along tokens (one range per ``(head, channel)`` and group of
``group`` tokens); values along channels (one range per ``(head, token)`` and group of ``group``
channels). int8 uses one group over the whole axis. Each group stores its ``lo`` and ``hi`` (min
and max) in the block's own dtype: they are values of the block, so they are exact, and codes
``0`` and ``levels`` reproduce the extremes. Both sides compute ``scale = (hi - lo) / levels`` in
fp32 from the *stored* ``lo``/``hi``, so encoder and decoder agree bit for bit.

Payload (no zstd): K codes, V codes, K lo, K hi, V lo, V hi. Codes are uint8 in ``[H, T, D]``
order; int4 packs two per byte (even index in the low nibble), padded with a zero nibble.
Params are ``[H, D, groups]`` for keys and ``[H, T, groups]`` for values.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

BITS = {"int8": 8, "int4": 4}


@dataclass(frozen=True)
class QuantShape:
    """Byte sizes of the sections of a quantised block; all follow from shape, dtype and codec."""

    shape: tuple[int, int, int]   # (H, T, D)
    bits: int
    group_k: int                  # tokens per key group
    group_v: int                  # channels per value group
    itemsize: int                 # of the stored dtype, which also holds lo/hi

    @classmethod
    def of(cls, shape: tuple[int, int, int], quant: str, group: int, itemsize: int) -> "QuantShape":
        _, t, d = shape
        if quant == "int8":
            return cls(shape, 8, t, d, itemsize)
        return cls(shape, 4, min(group, t), min(group, d), itemsize)

    @property
    def code_bytes(self) -> int:
        """Bytes of K codes (V codes are as many)."""
        h, t, d = self.shape
        return h * t * d if self.bits == 8 else (h * t * d + 1) // 2

    @property
    def k_params(self) -> int:
        h, t, d = self.shape
        return h * d * -(-t // self.group_k)

    @property
    def v_params(self) -> int:
        h, t, d = self.shape
        return h * t * -(-d // self.group_v)

    @property
    def param_bytes(self) -> int:
        """Bytes of K lo, K hi, V lo, V hi together."""
        return 2 * (self.k_params + self.v_params) * self.itemsize

    @property
    def payload_bytes(self) -> int:
        return 2 * self.code_bytes + self.param_bytes


def _grouped(x: torch.Tensor, axis: int, group: int) -> torch.Tensor:
    """[H, T, D] -> [A, B, groups, group] with ``axis`` last; the last group is edge-padded."""
    xt = x.movedim(axis, -1)
    n = xt.shape[-1]
    pad = -n % group
    if pad:
        xt = torch.cat([xt, xt[..., -1:].expand(*xt.shape[:-1], pad)], dim=-1)
    return xt.reshape(*xt.shape[:-1], -1, group)


def _scale(lo: torch.Tensor, hi: torch.Tensor, levels: int) -> torch.Tensor:
    return (hi.float() - lo.float()) / levels


def quantize(x: torch.Tensor, axis: int, group: int, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x: [H, T, D] float. Returns codes [H, T, D] uint8, lo and hi [A, B, groups] in x.dtype.
    ValueError if x holds inf/nan (min/max propagate nan, so checking lo/hi suffices)."""
    levels = (1 << bits) - 1
    g = _grouped(x.float(), axis, group)
    lo, hi = torch.aminmax(g, dim=-1)                     # values of x: exact in x.dtype
    if not (torch.isfinite(lo).all() and torch.isfinite(hi).all()):
        raise ValueError(f"int{bits} codec cannot encode non-finite values (inf/nan); use a lossless codec")
    scale = _scale(lo, hi, levels)
    if not torch.isfinite(scale).all():
        raise ValueError(f"int{bits} codec: value range too large for fp32 arithmetic")
    inv = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
    q = (g - lo.unsqueeze(-1)).mul_(inv.unsqueeze(-1)).round_().clamp_(0, levels)   # g may alias x
    n = x.shape[axis]
    codes = q.to(torch.uint8).flatten(-2)[..., :n].movedim(-1, axis).contiguous()
    return codes, lo.to(x.dtype), hi.to(x.dtype)


def dequantize(codes: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, axis: int, group: int, bits: int,
               out: torch.Tensor) -> None:
    """Inverse of :func:`quantize`, written into ``out`` ([H, T, D], any strides, lo's dtype)."""
    levels = (1 << bits) - 1
    n = codes.shape[axis]
    scale = _scale(lo, hi, levels).repeat_interleave(group, dim=-1)[..., :n]
    base = lo.float().repeat_interleave(group, dim=-1)[..., :n]
    x = torch.addcmul(base, codes.movedim(axis, -1).float(), scale)
    out.copy_(x.movedim(-1, axis))


def pack4(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes in 0..15 (any shape) -> flat uint8, two per byte."""
    flat = codes.reshape(-1)
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    return flat[0::2] | (flat[1::2] << 4)


def unpack4(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`pack4`: the first ``n`` codes, flat."""
    return torch.stack([packed & 15, packed >> 4], dim=-1).reshape(-1)[:n]


def encode_quant(k: torch.Tensor, v: torch.Tensor, qs: QuantShape) -> tuple[bytes, bytes]:
    """K, V [H, T, D] on CPU -> (codes section, params section) as bytes."""
    kc, klo, khi = quantize(k, 1, qs.group_k, qs.bits)
    vc, vlo, vhi = quantize(v, 2, qs.group_v, qs.bits)
    if qs.bits == 4:
        kc, vc = pack4(kc), pack4(vc)
    codes = torch.cat([kc.reshape(-1), vc.reshape(-1)])
    params = torch.cat([p.reshape(-1) for p in (klo, khi, vlo, vhi)])
    return codes.numpy().tobytes(), params.view(torch.uint8).numpy().tobytes()


def decode_quant(codes: torch.Tensor, params: torch.Tensor, qs: QuantShape,
                 out_k: torch.Tensor, out_v: torch.Tensor) -> None:
    """codes: flat uint8 of ``2 * code_bytes``; params: flat, stored dtype, ``param_bytes`` long.
    Writes K and V into out_k/out_v ([H, T, D] views)."""
    h, t, d = qs.shape
    n = h * t * d
    kc, vc = codes[:qs.code_bytes], codes[qs.code_bytes:]
    if qs.bits == 4:
        kc, vc = unpack4(kc, n), unpack4(vc, n)
    kk, vv = qs.k_params, qs.v_params
    klo, khi = params[:kk].view(h, d, -1), params[kk:2 * kk].view(h, d, -1)
    vlo, vhi = params[2 * kk:2 * kk + vv].view(h, t, -1), params[2 * kk + vv:].view(h, t, -1)
    dequantize(kc.view(h, t, d), klo, khi, 1, qs.group_k, qs.bits, out_k)
    dequantize(vc.view(h, t, d), vlo, vhi, 2, qs.group_v, qs.bits, out_v)

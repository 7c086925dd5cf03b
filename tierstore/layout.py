"""Shapes, dtypes, byte sizes, session names and model fingerprints."""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import asdict, dataclass
from decimal import Decimal

import numpy as np
import torch

from .errors import InvalidSessionNameError, InvalidSizeError

# same-size integer types by element size: bit-exact copies of any float dtype (NaN payloads, -0.0)
SAME_SIZE_INT = {2: (torch.int16, np.int16), 4: (torch.int32, np.int32)}

FORMAT_VERSION = 1

# dtype <-> one-byte code used in every on-disk header. Never renumber.
DTYPE_CODES: dict[torch.dtype, int] = {torch.float32: 1, torch.float16: 2, torch.bfloat16: 3}
CODE_DTYPES: dict[int, torch.dtype] = {v: k for k, v in DTYPE_CODES.items()}
DTYPE_NAMES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16,
                                       "bfloat16": torch.bfloat16}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    try:
        return DTYPE_NAMES[name]
    except KeyError:
        raise ValueError(f"unsupported KV dtype {name!r}; expected one of {sorted(DTYPE_NAMES)}") from None


_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "K": 1000, "KB": 1000, "KIB": 1024, "KI": 1024,
          "M": 1000**2, "MB": 1000**2, "MIB": 1024**2, "MI": 1024**2,
          "G": 1000**3, "GB": 1000**3, "GIB": 1024**3, "GI": 1024**3,
          "T": 1000**4, "TB": 1000**4, "TIB": 1024**4, "TI": 1024**4}
MAX_SIZE = 1 << 60


def parse_size(value: int | str | None, *, what: str = "size") -> int | None:
    """``"8GiB"`` / ``"512MB"`` / ``1024`` -> bytes. None stays None (no limit)."""
    if value is None:
        return None
    shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:60] + "..."  # hostile input: cut short
    if isinstance(value, bool):
        raise InvalidSizeError(f"{what}: {shown} is not a size")
    if isinstance(value, int):
        n = value
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidSizeError(f"{what}: {shown} is not a finite size")
        n = int(value)
    elif isinstance(value, str):
        m = _SIZE_RE.match(value)
        if not m:
            raise InvalidSizeError(f"{what}: cannot parse {shown}; use e.g. 1048576, '512MiB' or '8GiB'")
        # exact decimal arithmetic: float() turns 400 digits into inf (OverflowError) and
        # rounds integers above 2**53
        n = int(Decimal(m.group(1)) * _UNITS[(m.group(2) or "").upper()])
    else:
        raise InvalidSizeError(f"{what}: {shown} is not a size")
    if n < 0 or n > MAX_SIZE:
        raise InvalidSizeError(f"{what}: {shown} is out of range (0 .. 2**60 bytes)")
    return n


def format_size(n: int | float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def check_session_name(name: object) -> str:
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        shown = repr(name) if not isinstance(name, str) or len(name) <= 60 else repr(name[:60]) + "..."
        raise InvalidSessionNameError(
            f"invalid session name {shown}: use 1-128 characters of [A-Za-z0-9._-], "
            "starting with a letter or digit")
    return name


@dataclass(frozen=True)
class KVLayout:
    """Shape of one model's KV blocks. A block holds K and V, each ``[kv_heads, block_tokens, head_dim]``."""

    num_layers: int
    kv_heads: int
    head_dim: int
    block_tokens: int
    dtype: torch.dtype

    def __post_init__(self) -> None:
        for f in ("num_layers", "kv_heads", "head_dim", "block_tokens"):
            v = getattr(self, f)
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"KVLayout.{f} must be a positive int, got {v!r}")
        if self.dtype not in DTYPE_CODES:
            raise ValueError(f"unsupported KV dtype {self.dtype}")

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def block_bytes(self) -> int:
        """Bytes of one layer's block: K and V."""
        return 2 * self.kv_heads * self.block_tokens * self.head_dim * self.itemsize

    @property
    def token_bytes(self) -> int:
        """Bytes of one token over all layers."""
        return 2 * self.num_layers * self.kv_heads * self.head_dim * self.itemsize

    def to_json(self) -> dict:
        d = asdict(self)
        d["dtype"] = dtype_name(self.dtype)
        return d

    @classmethod
    def from_json(cls, d: dict) -> "KVLayout":
        return cls(num_layers=int(d["num_layers"]), kv_heads=int(d["kv_heads"]),
                   head_dim=int(d["head_dim"]), block_tokens=int(d["block_tokens"]),
                   dtype=dtype_from_name(d["dtype"]))


def fingerprint_digest(fields: dict) -> str:
    """Stable hex digest of a JSON-able dict (sorted keys)."""
    blob = json.dumps(fields, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.blake2b(blob, digest_size=16).hexdigest()

"""Codec configuration: which codec encodes a block, with its parameters, as a frozen value.

A codec spec is ``name[:level][:gGROUP]``: ``"raw"``, ``"zstd"``, ``"zstd:5"``, ``"int8"``,
``"int4+zstd"``, ``"int4:g64"``, ``"int4+zstd:3:g16"``. The level applies to the zstd codecs only,
the group to the int4 codecs only; parameters that do not apply are normalised to their
defaults, so two configs that encode identically compare equal.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# codec name <-> one-byte id in every block header. Never renumber; only append.
CODEC_IDS: dict[str, int] = {"raw": 0, "zstd": 1, "int8": 2, "int8+zstd": 3, "int4": 4, "int4+zstd": 5}
ID_CODECS: dict[int, str] = {v: k for k, v in CODEC_IDS.items()}

# Level 1, measured with tools/bench/codec.py on SmolLM2-135M KV (8,192 tokens, 64-token blocks,
# byte planes, one thread): bf16 1.442x at level 1 vs 1.421x at 3, 1.412x at 5, 1.419x at 9 and
# 1.232x at -1; fp16 1.155x at every level 1-9; fp32 1.182x at 1 vs 1.175x at 3. Encode (bf16)
# 490 MB/s at 1, 311 at 3, 81 at 9; decode ~1.1 GB/s at every level. Only the sign/exponent
# plane compresses, and level 1 already codes it to its entropy: higher levels cost time for nothing.
DEFAULT_LEVEL = 1
DEFAULT_GROUP = 32
MIN_LEVEL, MAX_LEVEL = -128, 22   # stored as i8 in the header; zstd accepts negative (fast) levels
MAX_GROUP = 0xFFFF                 # stored as u16


@dataclass(frozen=True)
class CodecConfig:
    """How a block is encoded. ``name`` is one of :data:`CODEC_IDS`."""

    name: str
    level: int = DEFAULT_LEVEL   # zstd level, zstd codecs only
    group: int = DEFAULT_GROUP   # int4 group size (tokens for keys, channels for values)

    def __post_init__(self) -> None:
        if self.name not in CODEC_IDS:
            raise ValueError(f"unknown codec {self.name!r}; expected one of {list(CODEC_IDS)}")
        for f in ("level", "group"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool):
                raise ValueError(f"codec {self.name!r}: {f} must be an int, got {v!r}")
        if not self.uses_zstd:
            object.__setattr__(self, "level", DEFAULT_LEVEL)
        elif not MIN_LEVEL <= self.level <= MAX_LEVEL:
            raise ValueError(f"codec {self.name!r}: zstd level {self.level} is outside {MIN_LEVEL}..{MAX_LEVEL}")
        if self.quant != "int4":
            object.__setattr__(self, "group", DEFAULT_GROUP)
        elif not 1 <= self.group <= MAX_GROUP:
            raise ValueError(f"codec {self.name!r}: group {self.group} is outside 1..{MAX_GROUP}")

    @classmethod
    def parse(cls, spec: "str | CodecConfig") -> "CodecConfig":
        """``"zstd"``, ``"zstd:5"``, ``"int4+zstd:3:g64"``, ``"raw"`` -> config; ValueError naming the spec."""
        if isinstance(spec, CodecConfig):
            return spec
        if not isinstance(spec, str):
            raise ValueError(f"codec spec must be a string, got {spec!r}")
        name, *opts = spec.strip().lower().split(":")
        if name not in CODEC_IDS:
            raise ValueError(f"bad codec spec {spec!r}: unknown codec {name!r}; expected one of {list(CODEC_IDS)}")
        kw: dict[str, int] = {}
        for opt in opts:
            field, text = ("group", opt[1:]) if opt.startswith("g") else ("level", opt)
            if field in kw or not re.fullmatch(r"-?[0-9]+", text):
                raise ValueError(f"bad codec spec {spec!r}: cannot read option {opt!r}")
            if (field == "level" and "zstd" not in name) or (field == "group" and not name.startswith("int4")):
                raise ValueError(f"bad codec spec {spec!r}: codec {name!r} takes no {field}")
            kw[field] = int(text)
        try:
            return cls(name, **kw)
        except ValueError as e:
            raise ValueError(f"bad codec spec {spec!r}: {e}") from None

    @property
    def uses_zstd(self) -> bool:
        return "zstd" in self.name

    @property
    def identity(self) -> str:
        """What a block's content depends on besides the tokens and model (part of its chain
        root): the quantisation and, for int4, a group other than the default (int4 blocks of
        two group sizes differ; they were shared before 2026-12-02, see docs/decisions.md)."""
        q = self.quant
        return f"{q}:g{self.group}" if q == "int4" and self.group != DEFAULT_GROUP else q

    @property
    def quant(self) -> str:
        """``"none"``, ``"int8"`` or ``"int4"``. Part of a block's content identity: lossy blocks
        must never be shared with lossless sessions."""
        return self.name.split("+")[0] if self.name.startswith("int") else "none"

    @property
    def lossless(self) -> bool:
        return self.quant == "none"

    @property
    def spec(self) -> str:
        """Canonical spec string; ``CodecConfig.parse(c.spec) == c``."""
        s = self.name
        if self.uses_zstd:
            s += f":{self.level}"
        if self.quant == "int4":
            s += f":g{self.group}"
        return s

    def __str__(self) -> str:
        return self.spec

    def to_json(self) -> dict:
        return {"name": self.name, "level": self.level, "group": self.group}

    @classmethod
    def from_json(cls, d: dict) -> "CodecConfig":
        if not isinstance(d, dict) or not isinstance(d.get("name"), str):
            raise ValueError(f"bad codec config {d!r}")
        return cls(d["name"], level=d.get("level", DEFAULT_LEVEL), group=d.get("group", DEFAULT_GROUP))

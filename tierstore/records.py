"""Session records and block summaries: what they hold and their sealed byte form.

Both are stored in the checksummed envelope of ``codec`` (the checksum covers the key), so a
record copied under another name, or a summary under another block, is detected on read.
"""

from __future__ import annotations

import json
import struct
import time
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from .chain import chain_hashes, chain_marks, root_hash
from .codec import CodecConfig, open_envelope, seal_envelope
from .errors import CorruptBlockError, CorruptRecordError, FormatVersionError
from .layout import FORMAT_VERSION, KVLayout

SESSION_KIND = b"SESS"
SUMMARY_KIND = b"SUMM"


@dataclass(frozen=True)
class SessionRecord:
    """A committed session. ``length`` tokens have KV; ``token_ids`` are exactly those tokens."""

    name: str
    layout: KVLayout
    fingerprint: str                       # hex digest of the model fingerprint fields
    fingerprint_fields: dict               # the fields themselves (architecture, RoPE, dtype, ...)
    codec: CodecConfig
    token_ids: np.ndarray                  # int64 [length]
    last_logits: np.ndarray | None = None  # float32 [vocab]: logits after the last token
    pad: int = 0                           # left padding tokens (batch rows)
    model_name: str | None = None
    tokenizer_name: str | None = None
    created: float = field(default_factory=time.time)
    updated: float = field(default_factory=time.time)
    meta: dict = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    @property
    def length(self) -> int:
        return int(len(self.token_ids))

    @property
    def num_blocks(self) -> int:
        bt = self.layout.block_tokens
        return (self.length + bt - 1) // bt

    @property
    def root(self) -> bytes:
        return root_hash(self.fingerprint, self.layout, self.codec.identity, self.pad)

    def chains(self) -> list[bytes]:
        """Chain hash of every block (derived from the token ids)."""
        return chain_hashes(self.root, self.token_ids, self.layout.block_tokens, marks=chain_marks(self.meta))

    def block_len(self, index: int) -> int:
        bt = self.layout.block_tokens
        return min(bt, self.length - index * bt)

    def with_updates(self, **kw) -> "SessionRecord":
        return replace(self, **kw)

    # -- bytes -----------------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        header = {
            "name": self.name, "layout": self.layout.to_json(), "fingerprint": self.fingerprint,
            "fingerprint_fields": self.fingerprint_fields, "codec": self.codec.to_json(),
            "length": self.length, "pad": self.pad, "model_name": self.model_name,
            "tokenizer_name": self.tokenizer_name, "created": self.created, "updated": self.updated,
            "meta": self.meta, "format_version": self.format_version,
            "logits": 0 if self.last_logits is None else int(len(self.last_logits)),
        }
        hj = json.dumps(header, sort_keys=True).encode()
        ids = np.asarray(self.token_ids, dtype="<u4").tobytes()
        logits = b"" if self.last_logits is None else np.asarray(self.last_logits, dtype="<f4").tobytes()
        return struct.pack("<I", len(hj)) + hj + ids + logits

    @classmethod
    def from_bytes(cls, body: bytes, *, name: str) -> "SessionRecord":
        def bad(why: str) -> CorruptRecordError:
            return CorruptRecordError(f"malformed session record: {why}", session=name)
        if len(body) < 4:
            raise bad("truncated header")
        (n,) = struct.unpack_from("<I", body, 0)
        if 4 + n > len(body):
            raise bad("header length past the end")
        try:
            h = json.loads(body[4:4 + n])
            length, n_logits = int(h["length"]), int(h["logits"])
            version = int(h["format_version"])
        except (ValueError, KeyError, TypeError) as e:
            raise bad(f"bad header ({e})") from None
        if version > FORMAT_VERSION:
            raise FormatVersionError(f"written by format version {version}; this tierstore reads <= {FORMAT_VERSION}",
                                     session=name)
        if h.get("name") != name:
            raise bad(f"record names session {h.get('name')!r}")
        off = 4 + n
        if length < 0 or n_logits < 0 or off + 4 * length + 4 * n_logits != len(body):
            raise bad("token/logit arrays do not match the stored length")
        ids = np.frombuffer(body, dtype="<u4", count=length, offset=off).astype(np.int64)
        off += 4 * length
        logits = (np.frombuffer(body, dtype="<f4", count=n_logits, offset=off).copy()
                  if n_logits else None)
        try:
            return cls(name=name, layout=KVLayout.from_json(h["layout"]), fingerprint=h["fingerprint"],
                       fingerprint_fields=h["fingerprint_fields"], codec=CodecConfig.from_json(h["codec"]),
                       token_ids=ids, last_logits=logits, pad=int(h["pad"]),
                       model_name=h["model_name"], tokenizer_name=h["tokenizer_name"],
                       created=float(h["created"]), updated=float(h["updated"]), meta=dict(h["meta"]),
                       format_version=version)
        except (ValueError, KeyError, TypeError) as e:
            raise bad(f"bad field ({e})") from None

    def seal(self) -> bytes:
        return seal_envelope(self.name.encode(), SESSION_KIND, self.to_bytes())

    @classmethod
    def unseal(cls, name: str, data: bytes) -> "SessionRecord":
        body = open_envelope(name.encode(), SESSION_KIND, data, error=CorruptRecordError, session=name)
        return cls.from_bytes(body, name=name)


@dataclass
class BlockSummary:
    """Per-block metadata kept in memory and in LMDB: enough to score a block without reading it.

    kmin, kmax, kmean: float32 [kv_heads, head_dim] over the block's tokens (post-RoPE keys).
    mass: float32 [kv_heads] accumulated attention mass (H2O); ``tokens`` valid tokens.
    sketch: float16 [kv_heads, tokens, r] or None: each token's key minus ``kmean``, in the
    top-r principal directions of the layer's key basis whose tag is ``tag`` (``tierstore.sketch``).

    Byte form: ``<III`` (heads, head_dim, tokens), kmin, kmax, kmean, mass as float32; with a
    sketch, then ``<I`` r, the 8-byte basis tag and the sketch as float16 (older summaries end
    before it).
    """

    kmin: torch.Tensor
    kmax: torch.Tensor
    kmean: torch.Tensor
    mass: torch.Tensor
    tokens: int
    sketch: torch.Tensor | None = None
    tag: bytes | None = None

    @classmethod
    def of_keys(cls, k: torch.Tensor, basis=None) -> "BlockSummary":
        """k: [kv_heads, ntok, head_dim] (any float dtype) -> summary (with the sketch in
        ``basis``, a ``tierstore.sketch.Basis``, when given)."""
        kf = k.float()
        kmean = kf.mean(1)
        sketch = None if basis is None else basis.project(kf - kmean.unsqueeze(1))
        return cls(kmin=kf.amin(1), kmax=kf.amax(1), kmean=kmean, mass=torch.zeros(k.shape[0]),
                   tokens=int(k.shape[1]), sketch=sketch, tag=None if basis is None else basis.tag)

    def to_bytes(self) -> bytes:
        h, d = self.kmin.shape
        parts = [struct.pack("<III", h, d, self.tokens)]
        for t in (self.kmin, self.kmax, self.kmean, self.mass):
            parts.append(f32_bytes(t))
        if self.sketch is not None:
            sk = self.sketch.detach().to("cpu", torch.float16).contiguous().numpy().astype("<f2")
            parts += [struct.pack("<I", self.sketch.shape[-1]), self.tag, sk.tobytes()]
        return b"".join(parts)

    @classmethod
    def from_bytes(cls, body: bytes, **where) -> "BlockSummary":
        if len(body) < 12:
            raise CorruptBlockError("summary truncated", **where)
        h, d, tokens = struct.unpack_from("<III", body, 0)
        base = 12 + 4 * (3 * h * d + h)
        if len(body) < base:
            raise CorruptBlockError("summary length does not match its shape", **where)
        arr = np.frombuffer(body, dtype="<f4", count=3 * h * d + h, offset=12).astype(np.float32)
        t = torch.from_numpy(arr)
        hd = h * d
        sketch = tag = None
        if len(body) > base:
            if len(body) < base + 12:
                raise CorruptBlockError("summary sketch header truncated", **where)
            (r,) = struct.unpack_from("<I", body, base)
            tag = bytes(body[base + 4:base + 12])
            if r == 0 or r > d or len(body) != base + 12 + 2 * h * tokens * r:
                raise CorruptBlockError(f"summary sketch length does not match its shape (r={r})", **where)
            sk = np.frombuffer(body, dtype="<f2", offset=base + 12).astype(np.float16)
            sketch = torch.from_numpy(sk).view(h, tokens, r)
        return cls(kmin=t[:hd].view(h, d), kmax=t[hd:2 * hd].view(h, d), kmean=t[2 * hd:3 * hd].view(h, d),
                   mass=t[3 * hd:].clone(), tokens=tokens, sketch=sketch, tag=tag)

    def seal(self, key: bytes) -> bytes:
        return seal_envelope(key, SUMMARY_KIND, self.to_bytes())

    @classmethod
    def unseal(cls, key: bytes, data: bytes, **where) -> "BlockSummary":
        return cls.from_bytes(open_envelope(key, SUMMARY_KIND, data, error=CorruptBlockError, **where), **where)


def f32_bytes(t: torch.Tensor) -> bytes:
    """float32 little-endian bytes of a tensor (host copy)."""
    return t.detach().to("cpu", torch.float32).contiguous().numpy().astype("<f4").tobytes()

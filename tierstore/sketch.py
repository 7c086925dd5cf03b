"""Key sketches: token-level ranking scores for a small fraction of the KV.

A block summary's Quest bound (per-channel key min/max) ranks 16-token blocks by the most any
key in the box could score, which over-rates blocks whose keys spread. The sketch keeps each
token's key as its block's mean plus the token's deviation from that mean in the top-r
principal directions of the layer's within-block deviations (Loki's low-rank keys, taken
around the block mean so the rest of each key is the mean rather than zero). A query then
scores every token, ``q·kmean_b + (q B)·c_t``, and a block is ranked by its estimated share
of the softmax: the attention mass it would get.

The basis ``B`` ([kv_heads, head_dim, r]) is fitted once per store, KV layout and layer, from
the deviations of the first ``CALIB_TOKENS`` tokens sealed in that layer by any session, and
stored in the meta table in a checksummed envelope. It never changes afterwards, so a prefix
block shared by several sessions has one sketch that is valid for all of them. Every sketch
carries the 8-byte tag of its basis; one whose tag does not match is not used (the block is
then scored by its mean alone until it is resident and sketched again).
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

import numpy as np
import torch

from .codec import open_envelope, seal_envelope
from .errors import CorruptRecordError
from .layout import KVLayout, fingerprint_digest
from .positions import BlockQuery
from .records import f32_bytes
from .tiers.schema import sketch_key

BASIS_KIND = b"SKCH"
CALIB_TOKENS = 512  # sealed tokens of a layer the basis is fitted from
FP16_MAX = 65504.0


def basis_key(layout: KVLayout, layer: int) -> bytes:
    """Meta-table key of a layer's basis: one per KV layout (shape, block size, dtype)."""
    return sketch_key(fingerprint_digest(layout.to_json()), layer)


@dataclass(frozen=True)
class Basis:
    """Orthonormal directions ``vectors`` float32 [kv_heads, head_dim, r] and their ``tag``."""

    vectors: torch.Tensor
    tag: bytes

    @classmethod
    def of(cls, vectors: torch.Tensor) -> "Basis":
        vectors = vectors.detach().to("cpu", torch.float32).contiguous()
        return cls(vectors, hashlib.blake2b(f32_bytes(vectors), digest_size=8).digest())

    @classmethod
    def fit(cls, cov: torch.Tensor, r: int) -> "Basis | None":
        """The top-``r`` eigenvectors of each head's deviation second moment ``cov`` [g, d, d]
        (None where the eigensolver fails: ranking then goes on without sketches)."""
        c = cov.double()
        d = c.shape[-1]
        ridge = c.diagonal(dim1=-2, dim2=-1).sum(-1).clamp_min(1e-30) * 1e-9 / d  # keeps it positive definite
        try:
            vecs = torch.linalg.eigh(c + ridge.view(-1, 1, 1) * torch.eye(d, dtype=c.dtype))[1]
        except RuntimeError:  # torch.linalg.LinAlgError: a degenerate spectrum the solver gave up on
            return None
        return cls.of(vecs.flip(-1)[:, :, :r])

    @property
    def dims(self) -> int:
        return int(self.vectors.shape[-1])

    def project(self, delta: torch.Tensor) -> torch.Tensor:
        """[kv_heads, t, head_dim] deviations -> float16 [kv_heads, t, r] sketch in host memory
        (half the bytes of float32; ranking does not need more precision)."""
        return torch.matmul(delta.float().cpu(), self.vectors).clamp_(-FP16_MAX, FP16_MAX).half()

    def seal(self, key: bytes) -> bytes:
        g, d, r = self.vectors.shape
        return seal_envelope(key, BASIS_KIND, struct.pack("<III", g, d, r) + f32_bytes(self.vectors))

    @classmethod
    def unseal(cls, key: bytes, data: bytes) -> "Basis":
        try:
            body = open_envelope(key, BASIS_KIND, data, error=CorruptRecordError)
        except CorruptRecordError as e:
            raise CorruptRecordError(f"sketch basis {key.decode(errors='replace')}: {e.reason}", key=key) from e
        if len(body) < 12:
            raise CorruptRecordError("sketch basis truncated", key=key)
        g, d, r = struct.unpack_from("<III", body, 0)
        if r == 0 or r > d or len(body) != 12 + 4 * g * d * r:
            raise CorruptRecordError(f"sketch basis length does not match its shape {(g, d, r)}", key=key)
        vecs = torch.from_numpy(np.frombuffer(body, dtype="<f4", offset=12).astype(np.float32)).view(g, d, r)
        return cls.of(vecs)


class Calibration:
    """One layer's deviation second moment, gathered from sealed blocks until it can be fitted;
    ``pending`` are the blocks sealed meanwhile (sketched once the basis exists)."""

    __slots__ = ("cov", "tokens", "pending")

    def __init__(self) -> None:
        self.cov: torch.Tensor | None = None
        self.tokens = 0
        self.pending: list = []

    def add(self, k: torch.Tensor, block) -> None:
        """k: [kv_heads, ntok, head_dim] keys of a sealed block."""
        kf = k.float().cpu()
        if not bool(torch.isfinite(kf).all()):  # a non-finite key would poison the fit
            return
        delta = kf - kf.mean(1, keepdim=True)
        c = torch.matmul(delta.transpose(1, 2), delta)
        self.cov = c if self.cov is None else self.cov + c
        self.tokens += int(k.shape[1])
        self.pending.append(block)


def sketch_score(kmean: torch.Tensor, sketch: torch.Tensor, basis: torch.Tensor, tokens: torch.Tensor,
                 query) -> torch.Tensor:
    """Each block's estimated share of the query's attention, summed over the query rows.

    kmean [n, g, d]; sketch [g, n, bt, r] (float16 or float32); basis [g, d, r]; tokens int64 [n]
    (tokens past a block's count are not scored); query float [g, rows, d] grouped by KV head,
    [g, rows, n, d] (a query per block), or a ``positions.BlockQuery`` (extended positions: the
    far blocks' rotated queries, scored from its pieces) -> [n, g].
    Scaled by ``head_dim ** -0.5`` (the models' attention scaling) so the softmax over tokens
    has the model's temperature."""
    g, n, bt, r = sketch.shape
    d = kmean.shape[-1]
    if isinstance(query, BlockQuery):
        m = query.n_far
        near = _logits(kmean[m:], sketch[:, m:], basis, query.near * d ** -0.5)
        if m:  # far blocks: one matrix product each for the means and the projections
            far = query.to(kmean.device)
            mean = far.far_means(kmean[:m].float()) * d ** -0.5                       # [g, rows, m]
            proj = far.far_projection(basis) * d ** -0.5                               # [g, m, rows, r]
            tok = torch.matmul(proj, sketch[:, :m].float().transpose(-1, -2))         # [g, m, rows, bt]
            near = torch.cat((tok.transpose(1, 2) + mean.unsqueeze(-1), near), 2)
        logits = near
    elif query.dim() == 4:  # a query per block [g, rows, n, d]
        q = query.float() * d ** -0.5
        mean = torch.einsum("gwnd,ngd->gwn", q, kmean.float())
        tok = torch.einsum("gwnr,gnbr->gwnb", torch.einsum("gwnd,gdr->gwnr", q, basis.float()), sketch.float())
        logits = (tok + mean.unsqueeze(-1)).contiguous()
    else:
        logits = _logits(kmean, sketch, basis, query.float() * d ** -0.5)
    rows = logits.shape[1]
    partial = (tokens != bt).nonzero().view(-1)  # slots past a block's tokens get no share
    if len(partial) <= 4:  # usually the growing tail only: fill its slots, no mask over the layer
        for i in partial.tolist():
            logits[:, :, i, int(tokens[i]):] = float("-inf")
    else:
        logits += torch.where(torch.arange(bt) < tokens.unsqueeze(1), 0.0, float("-inf"))
    share = torch.softmax(logits.view(g, rows, n * bt), -1).view(g, rows, n, bt).sum(-1)  # [g, rows, n]
    return share.sum(1).T


def _logits(kmean: torch.Tensor, sketch: torch.Tensor, basis: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Token logits [g, rows, n, bt] of one shared (scaled) query q [g, rows, d]."""
    g, n, bt, r = sketch.shape
    rows = q.shape[1]
    mean = torch.bmm(q, kmean.float().permute(1, 2, 0))                                        # [g, rows, n]
    tok = torch.bmm(torch.bmm(q, basis.float()), sketch.reshape(g, n * bt, r).float().transpose(1, 2))  # [g, rows, n*bt]
    return tok.view(g, rows, n, bt) + mean.unsqueeze(-1)

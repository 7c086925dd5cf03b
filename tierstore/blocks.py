"""Block and sequence bookkeeping of the tier manager (guarded by its lock)."""

from __future__ import annotations

import dataclasses
from concurrent.futures import Future

import torch

from .codec import CodecConfig
from .layout import KVLayout
from .policies import Policy
from .records import BlockSummary
from .sketch import Basis
from .tiers.hot import HotPool
from .tiers.warm import WarmPool

def _summary_of(k: torch.Tensor, basis: Basis | None = None) -> BlockSummary:
    """``BlockSummary.of_keys`` kept in host memory: summaries of a long context must not hold
    device memory outside the hot pool (one transfer for the three statistics; the sketch is
    projected on the host)."""
    s = BlockSummary.of_keys(k, basis)
    if s.kmin.device.type != "cpu":
        kmin, kmax, kmean = torch.stack([s.kmin, s.kmax, s.kmean]).cpu()
        s = dataclasses.replace(s, kmin=kmin, kmax=kmax, kmean=kmean, mass=s.mass.cpu())
    return s


class Block:
    """One layer's block of one sequence. Mutable bookkeeping, guarded by the manager lock."""

    __slots__ = ("seq", "layer", "index", "ntok", "hot", "warm", "key", "durable", "queued", "pins",
                 "last_used", "summary", "transient", "loading", "ready", "prefetched", "restated")

    def __init__(self, seq: "Seq", layer: int, index: int) -> None:
        self.seq, self.layer, self.index = seq, layer, index
        self.ntok = 0
        self.hot: int | None = None       # hot slot
        self.warm: int | None = None      # warm slot
        self.key: bytes | None = None     # cold key (chain || layer) once the tokens are known
        self.durable = False              # stored in cold under ``key``
        self.queued = False               # write-back in flight
        self.pins = 0
        self.last_used = 0
        self.summary: BlockSummary | None = None
        self.transient = False            # promoted only to be streamed: first to leave hot
        self.loading: Future | None = None
        self.ready: torch.cuda.Event | None = None  # CUDA: copy into the hot slot done
        self.prefetched = False
        self.restated = False              # summary recomputed after the block was written

    @property
    def sealed(self) -> bool:
        return self.ntok == self.seq.layout.block_tokens

    def where(self) -> dict:
        return {"session": self.seq.name, "layer": self.layer, "block": self.index}


class Seq:
    """One sequence (a batch row) registered with the manager."""

    __slots__ = ("id", "name", "layout", "device", "codec", "policy", "layers", "hot", "warm", "closed", "chains")

    def __init__(self, sid: int, name: str, layout: KVLayout, device: torch.device, codec: CodecConfig,
                 policy: Policy, hot: HotPool, warm: WarmPool) -> None:
        self.id, self.name, self.layout, self.device = sid, name, layout, device
        self.codec, self.policy, self.hot, self.warm = codec, policy, hot, warm
        self.layers: list[list[Block]] = [[] for _ in range(layout.num_layers)]
        self.closed = False
        self.chains: list[bytes] = []  # chain hash of every *full* block whose token ids are known

    @property
    def length(self) -> int:
        blocks = self.layers[0]
        return sum(b.ntok for b in blocks)

    @property
    def stream_group(self) -> int:
        """Blocks recalled (or restored) in one group: a quarter of the hot pool, 1 to 16, so
        a group never crowds out what attention holds."""
        return max(1, min(16, self.hot.slots // 4))


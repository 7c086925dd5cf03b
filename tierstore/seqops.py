"""Whole-sequence operations of the tier manager, used by the transformers adapter: keys of
the partial tails, crop, clone (beam search) and layer-ahead prefetch."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from .blocks import Block, Seq
from .placement import Placement
from .shared import Shared


class SequenceOps:
    """Surgery on open sequences; moves blocks only through ``Placement``."""

    def __init__(self, shared: Shared, placement: Placement, writeback, index) -> None:
        self.shared, self.placement, self.writeback, self.index = shared, placement, writeback, index

    def set_layer_tail_keys(self, seq: Seq, keys: Sequence[bytes]) -> None:
        """Keys of the partial last block of every layer (written by ``write_now`` at commit)."""
        with self.shared.lock:
            for layer, key in enumerate(keys):
                b = seq.layers[layer][-1]
                if b.key != key:
                    b.key, b.durable = key, False

    def truncate(self, seq: Seq, length: int) -> None:
        """Keep the first ``length`` tokens of every layer (crop)."""
        sh, pl = self.shared, self.placement
        bt = seq.layout.block_tokens
        with sh.lock:
            self.index.drop(seq)  # stacked summaries describe the old blocks (their mass is kept)
            for layer, blocks in enumerate(seq.layers):
                keep = -(-length // bt)
                gone = blocks[keep:]
                sh.wait_until(lambda: not any(b.pins or b.loading is not None for b in gone))
                for b in gone:
                    pl.drop_hot(b)
                    pl.drop_warm(b)
                del blocks[keep:]
                if blocks and blocks[-1].ntok > length - (keep - 1) * bt:
                    b = blocks[-1]
                    if b.hot is None:
                        pl.promote([b])
                    b.ntok = length - (keep - 1) * bt
                    b.key, b.durable, b.summary = None, False, None
                    pl.drop_warm(b)

    def clone(self, src: Seq) -> Seq:
        """A copy of ``src`` (beam search, num_return_sequences). Durable blocks share their cold
        record; resident ones are copied into new slots of the same tier."""
        sh, pl = self.shared, self.placement
        with sh.lock:
            self.index.sync_mass(src)  # the copies below carry the mass stacked so far
            dst = Seq(next(sh.ids), src.name, src.layout, src.device, src.codec, src.policy, src.hot, src.warm)
            dst.chains = list(src.chains)
            sh.seqs[dst.id] = dst
            for layer, blocks in enumerate(src.layers):
                for b in blocks:
                    sh.wait_until(lambda: b.loading is None and not b.queued)
                    c = Block(dst, layer, b.index)
                    c.ntok, c.key, c.durable, c.last_used = b.ntok, b.key, b.durable, b.last_used
                    if b.summary is not None:
                        s = b.summary
                        c.summary = dataclasses.replace(s, mass=s.mass.clone())
                    with pl.pinned([b]):
                        if b.hot is not None:
                            near = dst.layers[layer][-1].hot if dst.layers[layer] else None
                            pl.put_hot(c, pl.alloc_hot(src.hot, 1, near)[0])
                            for a, z in zip(src.hot.block(b.hot), src.hot.block(c.hot)):
                                z.copy_(a)
                        elif b.warm is not None or not b.durable:
                            pl.put_warm(c, pl.alloc_warm(src.warm, 1)[0])
                            for a, z in zip(src.warm.block(b.warm), src.warm.block(c.warm)):
                                z.copy_(a)
                    dst.layers[layer].append(c)
                    if c.sealed and c.key is not None and not c.durable:
                        self.writeback.submit(c)
            self.index.clone(src, dst)
            return dst

    def prefetch_next(self, seq: Seq, layer: int) -> None:
        """Layer-ahead prefetch: start recalling the first non-resident blocks of ``layer``."""
        in_place = self.placement.in_place(seq)
        ids = [b.index for b in seq.layers[layer] if b.loading is None and b.hot is None
               and (b.warm is None or not in_place)]
        if ids and in_place:
            # warm is read where it is: only blocks in no memory tier move, straight into hot
            # (making room there: the next layer is read before anything hot that ranks lower)
            self.placement.prefetch_cold(seq, layer, ids[:max(seq.stream_group, seq.hot.slots // 4)])
        elif ids:
            self.placement.prefetch(seq, layer, ids[:seq.stream_group], hot=not in_place)

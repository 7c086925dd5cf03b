"""Whole-sequence operations of the tier manager: restore on resume, keys, crop, clone (beam
search) and layer-ahead prefetch. Part of ``TierManager``."""

from __future__ import annotations

import time
from collections.abc import Sequence

from .blocks import Block, Seq
from .codec import RawBlockReader, decode_block
from .errors import MissingBlockError
from .records import BlockSummary


class SequenceOps:
    """Mixin of ``TierManager``: uses its lock, pools, loaders and movement primitives."""

    # -- restore (resume) ---------------------------------------------------------------------

    def restore(self, seq: Seq, *, reserve: int | None = None) -> int:
        """Load a resumed sequence's blocks into hot slots now, as many as fit, in block order
        per layer (consecutive slots, so attention reads them as runs), newest blocks first
        when not all fit. Reads in batched read transactions, decodes straight into the slots
        on a CPU hot pool (no warm staging) and through warm on CUDA. Returns blocks loaded."""
        with self._lock:
            reserve = max(1, min(16, seq.hot.slots // 4)) if reserve is None else reserve
            per_layer = max(0, (seq.hot.free_count - reserve) // seq.layout.num_layers)
            plan: list[tuple[Block, int]] = []
            for layer, blocks in enumerate(seq.layers):
                todo = [b for b in blocks if b.hot is None and b.loading is None and b.durable][-per_layer:] \
                    if per_layer else []
                if not todo:
                    continue
                slots = seq.hot.alloc(len(todo), room=8)  # room for the blocks decoding appends
                for b, slot in zip(todo, slots or []):
                    b.hot, b.pins = slot, b.pins + 1
                    plan.append((b, slot))
        t = time.perf_counter()
        try:
            self._restore_into(seq, plan)
        finally:
            with self._cv:
                for b, _ in plan:
                    b.pins -= 1
                self._cv.notify_all()
        with self._lock:
            self.counters.promotions["cold"] += len(plan)
            self.counters.restore_seconds += time.perf_counter() - t
        return len(plan)

    def _restore_into(self, seq: Seq, plan: list[tuple[Block, int]]) -> None:
        if not plan:
            return
        if not seq.hot.is_cuda and seq.codec.name == "raw":
            # memory-bound and GIL-bound (the checksum holds the GIL): a second thread measured
            # slower, so a CPU pool is filled by the caller's thread (zstd releases the GIL)
            parts = [plan]
        else:
            half = (len(plan) + 1) // 2
            parts = [p for p in (plan[:half], plan[half:]) if p]
        try:
            if len(parts) == 1:
                self._restore_part(seq, parts[0])
            else:
                futs = [self._loaders.submit(self._restore_part, seq, part) for part in parts]
                failed = next((e for e in (f.exception() for f in futs) if e is not None), None)
                if failed is not None:
                    raise failed
        except BaseException:
            with self._lock:
                for b, _ in plan:
                    self._drop_hot(b)
            raise

    def _restore_part(self, seq: Seq, part: list[tuple[Block, int]]) -> None:
        cuda = seq.hot.is_cuda
        lay = seq.layout
        if not cuda:  # full raw blocks: header compare + checksum + two copies into the slot arrays
            fast = RawBlockReader((lay.kv_heads, lay.block_tokens, lay.head_dim), lay.dtype)
            slots = seq.hot.slot_major()
        moved = 0
        with self.store.cold.read(buffers=True) as txn:
            db = self.store.cold.dbs["blocks"]
            for b, slot in part:
                data = txn.get(b.key, db=db)
                if data is None:
                    raise MissingBlockError("block missing from cold", **b.where())
                moved += len(data)
                if not cuda and fast.read(b.key, data, slots[slot]):
                    continue
                if cuda:
                    k, v = decode_block(b.key, data, **b.where())
                    hk, hv = seq.hot.block(slot)
                    for h in range(k.shape[0]):  # contiguous per head: no device temporaries
                        hk[h, :b.ntok].copy_(k[h], non_blocking=True)
                        hv[h, :b.ntok].copy_(v[h], non_blocking=True)
                else:
                    hk, hv = seq.hot.block(slot)
                    decode_block(b.key, data, out_k=hk, out_v=hv, **b.where())
        with self._lock:
            self.counters.bytes_moved += moved

    # -- sequence surgery (used by the transformers adapter) ------------------------------------

    def set_layer_tail_keys(self, seq: Seq, keys: Sequence[bytes]) -> None:
        """Keys of the partial last block of every layer (written by ``write_now`` at commit)."""
        with self._lock:
            for layer, key in enumerate(keys):
                b = seq.layers[layer][-1]
                if b.key != key:
                    b.key, b.durable = key, False

    def truncate(self, seq: Seq, length: int) -> None:
        """Keep the first ``length`` tokens of every layer (crop)."""
        bt = seq.layout.block_tokens
        with self._lock:
            for layer, blocks in enumerate(seq.layers):
                keep = -(-length // bt)
                for b in blocks[keep:]:
                    while b.pins or b.loading is not None:
                        self._cv.wait(0.05)
                    self._drop_hot(b)
                    self._drop_warm(b)
                del blocks[keep:]
                if blocks and blocks[-1].ntok > length - (keep - 1) * bt:
                    b = blocks[-1]
                    if b.hot is None:
                        self._promote([b])
                    b.ntok = length - (keep - 1) * bt
                    b.key, b.durable, b.summary = None, False, None
                    self._drop_warm(b)

    def clone_sequence(self, src: Seq) -> Seq:
        """A copy of ``src`` (beam search, num_return_sequences). Durable blocks share their cold
        record; resident ones are copied into new slots of the same tier."""
        with self._lock:
            dst = Seq(next(self._ids), src.name, src.layout, src.device, src.codec, src.policy, src.hot, src.warm)
            dst.chains = list(src.chains)
            self._seqs[dst.id] = dst
            for layer, blocks in enumerate(src.layers):
                for b in blocks:
                    while b.loading is not None or b.queued:
                        self._cv.wait(0.05)
                    c = Block(dst, layer, b.index)
                    c.ntok, c.key, c.durable, c.last_used = b.ntok, b.key, b.durable, b.last_used
                    if b.summary is not None:
                        s = b.summary
                        c.summary = BlockSummary(s.kmin, s.kmax, s.kmean, s.mass.clone(), s.tokens)
                    b.pins += 1
                    try:
                        if b.hot is not None:
                            c.hot = self._alloc_hot(src.hot, 1, dst.layers[layer][-1].hot if dst.layers[layer] else None)[0]
                            for a, z in zip(src.hot.block(b.hot), src.hot.block(c.hot)):
                                z.copy_(a)
                        elif b.warm is not None or not b.durable:
                            c.warm = self._alloc_warm(src.warm, 1)[0]
                            for a, z in zip(src.warm.block(b.warm), src.warm.block(c.warm)):
                                z.copy_(a)
                    finally:
                        b.pins -= 1
                    dst.layers[layer].append(c)
                    if c.sealed and c.key is not None and not c.durable:
                        self._maybe_write_back(c)
            return dst

    def prefetch_next(self, seq: Seq, layer: int) -> None:
        """Layer-ahead prefetch: start recalling the first non-resident blocks of ``layer``."""
        in_place = self.in_place(seq)
        ids = [b.index for b in seq.layers[layer] if b.loading is None and b.hot is None
               and (b.warm is None or not in_place)]
        if ids:
            self.prefetch_to_read(seq, layer, ids[:max(1, min(16, seq.hot.slots // 4))])

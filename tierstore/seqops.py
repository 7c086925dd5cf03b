"""Whole-sequence operations of the tier manager: restore on resume, keys, crop, clone (beam
search) and layer-ahead prefetch. Part of ``TierManager``."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from concurrent.futures import Future

from .blocks import Block, Seq
from .codec import RawBlockReader, decode_block
from .errors import CorruptBlockError, MissingBlockError

log = logging.getLogger(__name__)


class SequenceOps:
    """Mixin of ``TierManager``: uses its lock, pools, loaders and movement primitives."""

    # -- restore (resume) ---------------------------------------------------------------------

    def restore(self, seq: Seq, *, reserve: int | None = None) -> int:
        """Load a resumed sequence's blocks into hot slots now, as many as fit, in block order
        per layer (consecutive slots, so attention reads them as runs), newest blocks first
        when not all fit. Reads in batched read transactions, decodes straight into the slots
        on a CPU hot pool (no warm staging) and through warm on CUDA. Returns blocks loaded.
        The blocks that did not fit are then read into warm in the background."""
        with self._lock:
            reserve = seq.stream_group if reserve is None else reserve
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
            self._schedule_fill(seq)
        return len(plan)

    def _schedule_fill(self, seq: Seq) -> None:
        """Queue the background warm fill of a resumed sequence: per layer, in forward order, the
        blocks that did not fit hot, as many as the warm budget leaves room for (a reserve stays
        free for demotions). A read then finds them in host memory instead of cold."""
        reserve = max(16, seq.warm.slots // 16)
        quota = max(0, (seq.warm.free_count - reserve) // seq.layout.num_layers)
        if quota:
            self._fills = [f for f in self._fills if not f.done()]
            self._fills += [self._fillers.submit(self._fill_layer, seq, layer, quota)
                            for layer in range(seq.layout.num_layers)]

    def wait_filled(self, timeout: float | None = None) -> None:
        """Wait until the background warm fills queued so far are done (failed blocks stay in
        cold: their error is raised by the read that needs them)."""
        for f in list(self._fills):
            f.result(timeout)

    def _fill_layer(self, seq: Seq, layer: int, quota: int) -> None:
        """One layer of the warm fill (a loader thread). The blocks are marked loading (with one
        future) while they are read, so an acquire meanwhile waits for them rather than reading
        them again; a sequence closed before its turn is skipped."""
        with self._lock:
            if self._closed or seq.closed or seq.id not in self._seqs:
                return
            todo = [b for b in seq.layers[layer]
                    if b.durable and b.hot is None and b.warm is None and b.loading is None][-quota:]
            slots = seq.warm.alloc(len(todo)) if todo else None
            if not slots:
                return
            fut: Future = Future()
            for b, slot in zip(todo, slots):
                b.warm, b.loading, b.pins = slot, fut, b.pins + 1
        err, bad = None, {}
        try:
            self._read_into(seq, seq.warm, list(zip(todo, slots)), bad=bad)
        except BaseException as e:  # noqa: BLE001 - handed to any waiter through the future
            err = e
        with self._cv:
            for b in todo:
                b.loading = None
                b.pins -= 1
                if err is not None or id(b) in bad:
                    self._drop_warm(b)  # stays in cold: the read that needs it raises the precise error
            if err is None:
                self.counters.warm_filled += len(todo) - len(bad)
            self._cv.notify_all()
        for e in bad.values():
            log.warning("warm fill of %s: %s", seq.name, e)
        if err is None:
            fut.set_result(None)
        else:
            log.warning("warm fill of %s layer %d failed: %s", seq.name, layer, err)
            fut.set_exception(err)

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
                self._read_into(seq, seq.hot, parts[0])
            else:
                futs = [self._loaders.submit(self._read_into, seq, seq.hot, part) for part in parts]
                failed = next((e for e in (f.exception() for f in futs) if e is not None), None)
                if failed is not None:
                    raise failed
        except BaseException:
            with self._lock:
                for b, _ in plan:
                    self._drop_hot(b)
            raise

    def _read_into(self, seq: Seq, pool, part: list[tuple[Block, int]], bad: dict | None = None) -> None:
        """Read durable blocks from cold into ``pool``'s slots in one read transaction. ``bad``
        (a dict): a damaged or missing block is recorded there (id(block) -> error) and skipped,
        instead of failing the whole read."""
        lay = seq.layout
        fast, slots = None, None
        if pool.kv.device.type != "cuda":  # full raw blocks: header compare + checksum + copies into the slot
            fast = RawBlockReader((lay.kv_heads, lay.block_tokens, lay.head_dim), lay.dtype)
            slots = pool.slot_major()
        moved = 0
        with self.store.cold.read(buffers=True) as txn:
            db = self.store.cold.db("blocks")
            for b, slot in part:
                try:
                    moved += self._read_one(b, txn.get(b.key, db=db), pool, slot, fast,
                                            None if slots is None else slots[slot])
                except (MissingBlockError, CorruptBlockError) as e:
                    if bad is None:
                        raise
                    bad[id(b)] = e
        with self._lock:
            self.counters.bytes_moved += moved

    @staticmethod
    def _read_one(b: Block, data, pool, slot: int, fast: RawBlockReader | None, dst) -> int:
        """Decode one cold record into ``pool``'s slot; returns its stored bytes."""
        if data is None:
            raise MissingBlockError("block missing from cold", **b.where())
        if fast is not None and fast.read(b.key, data, dst):
            return len(data)
        if pool.kv.device.type == "cuda":
            k, v = decode_block(b.key, data, **b.where())
            hk, hv = pool.block(slot)
            for h in range(k.shape[0]):  # contiguous per head: no device temporaries
                hk[h, :b.ntok].copy_(k[h], non_blocking=True)
                hv[h, :b.ntok].copy_(v[h], non_blocking=True)
        else:
            hk, hv = pool.block(slot)
            decode_block(b.key, data, out_k=hk, out_v=hv, **b.where())
        return len(data)

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
            self.index.drop(seq)  # stacked summaries describe the old blocks (their mass is kept)
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
            self.index.sync_mass(src)  # the copies below carry the mass stacked so far
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
                        c.summary = dataclasses.replace(s, mass=s.mass.clone())
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
            self.index.clone(src, dst)
            return dst

    def prefetch_next(self, seq: Seq, layer: int) -> None:
        """Layer-ahead prefetch: start recalling the first non-resident blocks of ``layer``."""
        in_place = self.in_place(seq)
        ids = [b.index for b in seq.layers[layer] if b.loading is None and b.hot is None
               and (b.warm is None or not in_place)]
        if ids:
            self.prefetch_to_read(seq, layer, ids[:seq.stream_group])

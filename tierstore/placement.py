"""Placement: the only code that moves blocks between tiers (all under ``Shared.lock``).

* ``acquire`` pins blocks where attention can read them (recalling the rest) for the duration
  of a ``with``; ``pinned`` pins for any other use. A pinned or loading block is never a victim.
* Making room is all-or-nothing: ``evict_hot`` demotes n unpinned blocks hot -> warm (a warm
  copy first unless the block is durable) or raises ``BudgetError`` having moved nothing;
  ``alloc_warm`` drops warm copies only of blocks that are durable in cold or still hot.
* Pools know which block sits in each slot (``SlotPool.owner``), so victims are chosen from a
  pool's own slots (O(slots)), never by walking every block of every sequence.
* ``put_hot``/``put_warm``/``drop_hot``/``drop_warm`` are the only writes of a block's slots.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
from collections.abc import Iterable, Iterator, Sequence

import torch

from .attention import SEGMENT_TOKENS
from .blocks import Block, Seq
from .errors import BudgetError
from .shared import Shared
from .tiers.hot import HotPool
from .tiers.warm import WarmPool

log = logging.getLogger(__name__)


def piece_place(layer: list[Block], index: int, tier: str) -> tuple[int | None, int, int]:
    """Where block ``index`` of a layer should go in ``tier``: ``(near, extent, offset)`` for
    ``SlotPool.alloc``: right after the block before it when both are in one attention piece
    (``attention.SEGMENT_TOKENS``), else at its offset in a wholly free extent of a piece's
    slots. Pieces whose blocks sit in one run of one pool are read as one view, with no copy."""
    per_piece = max(1, SEGMENT_TOKENS // layer[0].seq.layout.block_tokens) if layer else 1
    within = index % per_piece
    prev = layer[index - 1] if 0 < index <= len(layer) and within else None
    return (getattr(prev, tier) if prev is not None else None), per_piece, within


def _one_run(slots: list[int | None]) -> bool:
    return slots[0] is not None and all(s == slots[0] + i for i, s in enumerate(slots))


class Placement:
    """Residency and pins of blocks. ``loader`` and ``writeback`` are wired in by the manager."""

    def __init__(self, shared: Shared, index) -> None:
        self.shared, self.index = shared, index
        self.counters = shared.counters
        self.loader = None     # Loader: transfers (set by the manager)
        self.writeback = None  # WriteBack: its errors end waits for write-backs
        # A CPU hot pool reads warm blocks where they are: both tiers are host memory, so a
        # warm -> hot copy would only add a copy and evict a hot block (CUDA copies them up).
        self.warm_in_place = True

    # -- what attention may read where ------------------------------------------------------------

    def in_place(self, seq: Seq) -> bool:
        """Does attention read this sequence's warm blocks where they are (CPU hot pool)?"""
        return self.warm_in_place and not seq.hot.is_cuda

    @staticmethod
    def readable(b: Block, in_place: bool) -> bool:
        """Can attention read ``b`` now without moving it?"""
        return b.loading is None and (b.hot is not None or (in_place and b.warm is not None))

    # -- pins -----------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def pinned(self, blocks: Sequence[Block]) -> Iterator[Sequence[Block]]:
        """Pin ``blocks`` for the duration (lock held on entry and exit)."""
        for b in blocks:
            b.pins += 1
        try:
            yield blocks
        finally:
            self.shared.unpin(blocks)

    @contextlib.contextmanager
    def acquire(self, seq: Seq, layer: int, block_ids: Sequence[int], *,
                transient: bool = False, in_place: bool = False) -> Iterator[list[Block]]:
        """Make the blocks readable and pin them for the duration; yields the ``Block`` objects.
        ``transient``: streamed, so they leave hot first afterwards. ``in_place`` (honoured where
        ``in_place(seq)``): warm blocks stay in warm, pinned, and are read there; only blocks in
        no memory tier are loaded."""
        sh = self.shared
        in_place = in_place and self.in_place(seq)
        with sh.lock:
            sh.check_open()
            layer_blocks = seq.layers[layer]
            blocks = layer_blocks[block_ids.start:block_ids.stop] if isinstance(block_ids, range) \
                and block_ids.step == 1 else [layer_blocks[i] for i in block_ids]
            sh.step += 1
            step, c = sh.step, self.counters
            c.requests += len(blocks)
            # one tight pass over the blocks (a decode step reads every block of every layer):
            # readable ones are pinned where they are; the rest are recalled below
            missing, hot_hits, warm_hits = [], 0, 0
            for b in blocks:
                if b.prefetched:
                    b.prefetched = False
                    c.prefetch_needed += 1
                    c.prefetch_timely += self.readable(b, in_place)
                if b.loading is None and b.hot is not None:
                    hot_hits += 1
                elif b.loading is None and in_place and b.warm is not None:
                    warm_hits += 1
                else:
                    if b.hot is not None:  # a prefetch is still copying it in: a miss it serves
                        c.misses["hot"] += 1
                    missing.append(b)
                    continue
                b.pins += 1
                b.last_used = step
            c.hits["hot"] += hot_hits
            if warm_hits:
                c.hits["warm"] += warm_hits
                c.misses["hot"] += warm_hits
                c.warm_in_place += warm_hits
            if in_place and any(b.loading is not None and b.hot is None for b in missing):
                # loads into warm in flight (a warm fill, a prefetch): read them where they land
                self.loader.wait_loads(missing)
                landed = [b for b in missing if self.readable(b, in_place)]
                for b in landed:
                    self._pin_readable(b)
                done = {id(b) for b in landed}
                missing = [b for b in missing if id(b) not in done]
            try:
                self.promote(missing, transient=transient)
            except BaseException:
                recalled = {id(b) for b in missing}
                sh.unpin([b for b in blocks if id(b) not in recalled])
                raise
            for b in missing:
                b.pins += 1
                b.last_used = sh.step
        try:
            if seq.hot.is_cuda:
                stream = torch.cuda.current_stream(seq.device)
                for b in blocks:
                    if b.ready is not None:
                        stream.wait_event(b.ready)
            yield blocks
        finally:
            with sh.lock:
                if seq.hot.is_cuda:
                    # kernels queued on the compute stream may still read these slots: a later
                    # copy into a slot freed by demoting one of them must run after them
                    seq.hot.copy_stream.wait_stream(torch.cuda.current_stream(seq.device))
                sh.unpin(blocks)

    def _pin_readable(self, b: Block) -> None:
        """Count and pin a block ``acquire`` reads where it is (lock held)."""
        tier = "hot" if b.hot is not None else "warm"
        if tier == "warm":
            self.counters.misses["hot"] += 1
            self.counters.warm_in_place += 1
        self.counters.hits[tier] += 1
        b.pins += 1
        b.last_used = self.shared.step

    # -- recall ---------------------------------------------------------------------------------------

    def prefetch(self, seq: Seq, layer: int, block_ids: Iterable[int], *, hot: bool = True) -> None:
        """Start moving blocks up; returns at once. Blocks that cannot get room are skipped."""
        with self.shared.lock:
            if self.shared.closed:
                return
            blocks, ids = seq.layers[layer], list(block_ids)
            self.counters.prefetch_requested += len(ids)
            for i in ids:  # a sparse step asks this of its whole selection, layer ahead
                b = blocks[i]
                if b.loading is not None or b.hot is not None or (not hot and b.warm is not None):
                    continue
                try:
                    self.loader.start(b, to_hot=hot, evict=False)
                    b.prefetched = True
                except BudgetError:  # no free hot slot: at least bring it from cold to warm
                    if hot and b.warm is None:
                        with contextlib.suppress(BudgetError):
                            self.loader.start(b, to_hot=False, evict=False)

    def prefetch_cold(self, seq: Seq, layer: int, block_ids: Sequence[int]) -> None:
        """Start reading the blocks ``block_ids`` that are in cold only into a CPU hot pool,
        together (``Loader.start_many``), making room; returns at once. Nothing starts when
        hot cannot make room now."""
        with self.shared.lock:
            if self.shared.closed:
                return
            blocks = [b for b in (seq.layers[layer][i] for i in block_ids)
                      if b.durable and b.loading is None and b.hot is None and b.warm is None]
            self.counters.prefetch_requested += len(blocks)
            if not blocks:
                return
            with contextlib.suppress(BudgetError):
                self.loader.start_many(seq, blocks)
                for b in blocks:
                    b.prefetched = b.loading is not None

    def promote(self, blocks: list[Block], *, transient: bool = False) -> None:
        """Make blocks hot now (lock held; waits for loads in flight)."""
        with self.pinned(blocks):
            while True:
                # loads in flight (a prefetch may have stopped at warm); a failed one raises here,
                # or the loop would start it again
                self.loader.wait_loads(blocks, raise_errors=True)
                # a block asked twice in one request takes one slot
                todo = list({id(b): b for b in blocks if b.hot is None and b.loading is None}.values())
                if not todo:
                    if all(b.loading is None for b in blocks):
                        return
                    continue  # a load started while the lock was released: wait for it too
                for b in todo:
                    self.counters.misses["hot"] += 1
                    self.counters.hits["warm" if b.warm is not None else "cold"] += 1
                    b.transient = transient
                # cold blocks bound for a CPU hot pool are read together, in one task
                cold = [b for b in todo if b.warm is None and not b.seq.hot.is_cuda]
                if len(cold) > 1 and all(b.seq is cold[0].seq for b in cold):
                    self.loader.start_many(cold[0].seq, cold)
                    todo = [b for b in todo if b.warm is not None or b.seq.hot.is_cuda]
                for b in todo:
                    self.loader.start(b, to_hot=True, evict=True)

    # -- slots ----------------------------------------------------------------------------------------

    @staticmethod
    def put_hot(b: Block, slot: int) -> None:
        b.hot = slot
        b.seq.hot.owner[slot] = b

    @staticmethod
    def put_warm(b: Block, slot: int) -> None:
        b.warm = slot
        b.seq.warm.owner[slot] = b

    @staticmethod
    def drop_hot(b: Block) -> None:
        if b.hot is not None:
            b.seq.hot.release([b.hot])
            b.hot = None
            b.ready = None

    @staticmethod
    def drop_warm(b: Block) -> None:
        if b.warm is not None:
            b.seq.warm.release([b.warm])
            b.warm = None

    def alloc_hot(self, pool: HotPool, n: int, near: int | None, room: int = 0, extent: int = 0,
                  offset: int = 0) -> list[int]:
        """``n`` hot slots, demoting blocks to make room (lock held; may wait)."""
        slots = pool.alloc(n, near, room, extent, offset)
        while slots is None:  # eviction may wait; slots it frees can be taken meanwhile: again
            self.evict_hot(pool, n - pool.free_count, extra=pool.slots // 32)
            slots = pool.alloc(n, near, room, extent, offset)
        self.counters.hot_peak = max(self.counters.hot_peak, pool.used)
        return slots

    # -- demotion -------------------------------------------------------------------------------------

    def victims(self, candidates: list[Block], n: int) -> list[Block]:
        """The n least valuable candidates: transient first, then by each sequence's policy."""
        transient = [b for b in candidates if b.transient]
        if len(transient) >= n:  # streamed blocks: oldest first, no scoring needed
            return heapq.nsmallest(n, transient, key=lambda b: b.last_used)
        by_layer: dict[tuple[int, int], list[Block]] = {}
        for b in candidates:
            by_layer.setdefault((b.seq.id, b.layer), []).append(b)
        ranked: list[tuple[int, float, int, Block]] = []
        for blocks in by_layer.values():
            seq, layer = blocks[0].seq, blocks[0].layer
            size, policy = len(seq.layers[layer]), seq.policy
            if not policy.uses_summaries:  # positional: each block's value without stacking summaries
                ranked.extend((0 if b.transient else 1, policy.rank(b.index, size, b.last_used), id(b), b)
                              for b in blocks)
                continue
            score = policy.score(self.index.summaries(seq, layer, step=self.shared.step))
            if score.dim() > 1:
                score = score.max(-1).values
            sc = score.tolist()
            ranked.extend((0 if b.transient else 1, sc[b.index], id(b), b) for b in blocks)
        return [t[3] for t in heapq.nsmallest(n, ranked, key=lambda t: (t[0], t[1]))]

    def evict_hot(self, pool: HotPool, n: int, extra: int = 0) -> None:
        """Demote n unpinned blocks hot -> warm, all or nothing; and up to ``extra`` more that
        need no warm copy (durable, or already in warm): choosing victims ranks the pool's
        blocks, so it is done for a batch of slots, not for each one. Candidates: sealed
        blocks, and partial tails that need no copy (committed, or with a current warm copy: an
        idle cache's tail; ``append`` promotes a tail back before writing to it)."""
        sh = self.shared
        while True:
            def demotable():
                nonlocal resident, cands
                resident = [b for b in pool.resident() if b.sealed or b.durable or b.warm is not None]
                cands = [b for b in resident if b.pins == 0 and b.loading is None]
                # enough, or nothing in flight that could free more (write-backs, loads)
                return len(cands) >= n or not any(b.queued or b.loading is not None for b in resident)
            resident: list[Block] = []
            cands: list[Block] = []
            sh.wait_until(demotable, self.writeback.raise_error)
            if len(cands) < n:
                log.debug("evict fail: %s", [(b.layer, b.index, b.pins, b.queued, b.ntok, b.loading) for b in resident])
                raise BudgetError(f"hot budget exhausted: need {n} more slots, only {len(cands)} blocks can be "
                                  f"demoted (pool of {pool.slots} blocks); raise hot= or lower the prefill chunk")
            victims = self.victims(cands, min(len(cands), n + extra))
            victims = victims[:n] + [b for b in victims[n:] if b.durable or b.warm is not None]
            need_warm = sorted((b for b in victims if b.warm is None and not b.durable),
                               key=lambda b: (b.seq.id, b.layer, b.index))
            warm = victims[0].seq.warm
            with self.pinned(victims):
                wslots = self.alloc_warm_runs(warm, need_warm)
            # alloc_warm may wait with the lock released: a victim acquired (pinned) or moved
            # meanwhile must not be demoted under its reader; choose again
            if any(b.pins or b.hot is None or b.loading is not None or b.warm is not None
                   for b in need_warm) or any(b.pins or b.hot is None or b.loading is not None for b in victims):
                warm.release(wslots)
                continue
            break
        # durable victims need no warm copy, but one is far cheaper to read back than cold (a
        # record read, a checksum, a decode): keep them in free warm slots (evicting nothing)
        spare = sorted((b for b in victims if b.warm is None and b.durable),
                       key=lambda b: (b.seq.id, b.layer, b.index))[:warm.free_count]
        sslots = self.alloc_warm_runs(warm, spare)  # free slots only: enough are free
        need_warm, wslots = need_warm + spare, list(wslots) + sslots
        for b, ws in zip(need_warm, wslots):
            self.put_warm(b, ws)
            warm.copy_in(ws, b.seq.hot, b.hot, non_blocking=True)
            self.counters.bytes_moved += b.seq.layout.block_bytes
        if need_warm and pool.is_cuda:  # D2H done before the hot slots are reused
            torch.cuda.current_stream(pool.device).synchronize()
        for b in victims:
            self.drop_hot(b)
            b.transient = False
            self.counters.demotions["hot"] += 1

    def compact(self, seq: Seq, layer: int, ids: range) -> bool:
        """Move the sealed blocks ``ids`` of a layer into one run of free slots, where a CPU
        pool's attention reads them as one view instead of copying them at every step: a run
        of hot slots when they are all hot and one is free, else of warm slots (on a CPU pool
        both tiers are host memory; hot blocks that move to warm leave hot). Only where warm
        is read in place, every block is idle (no pin, load or write-back) and a free run
        exists; else nothing moves. Returns whether the blocks now sit in one run."""
        sh = self.shared
        with sh.lock:
            if sh.closed or not self.in_place(seq):
                return False
            blocks = seq.layers[layer][ids.start:ids.stop]
            if not blocks or any(b.pins or b.loading is not None or not b.sealed
                                 or (b.hot is None and b.warm is None) for b in blocks):
                return False
            all_hot = all(b.hot is not None for b in blocks)
            if all_hot and _one_run([b.hot for b in blocks]):
                return True
            if not all_hot and _one_run([b.warm for b in blocks]):  # (a sealed block's warm copy is current)
                for b in blocks:
                    if b.hot is not None:
                        self.drop_hot(b)
                        self.counters.demotions["hot"] += 1
                sh.cv.notify_all()
                return True
            for pool in (seq.hot, seq.warm) if all_hot else (seq.warm,):
                slots = pool.alloc_run(len(blocks))
                if slots is not None:
                    break
            else:
                return False
            for b, slot in zip(blocks, slots):
                src = (seq.hot, b.hot) if b.hot is not None else (seq.warm, b.warm)
                pool.copy_in(slot, *src)
                if pool is seq.hot:
                    seq.hot.release([b.hot])
                    self.put_hot(b, slot)
                else:
                    self.drop_warm(b)
                    self.put_warm(b, slot)
                    if b.hot is not None:
                        self.drop_hot(b)
                        self.counters.demotions["hot"] += 1
                self.counters.bytes_moved += seq.layout.block_bytes
            self.counters.compacted += len(blocks)
            sh.cv.notify_all()  # hot slots may have been freed
            return True

    def alloc_warm_runs(self, pool: WarmPool, blocks: list[Block]) -> list[int]:
        """Warm slots for ``blocks`` (sorted by sequence, layer, index): each layer's blocks go
        right after the warm slot of the block before them where it is free (with room to grow
        otherwise), so a layer's demoted blocks stay in long runs that attention reads as one
        view or a few. Without enough free slots: ``alloc_warm`` (which may drop warm copies)."""
        if pool.free_count < len(blocks):
            return self.alloc_warm(pool, len(blocks))
        out: list[int] = []
        for _, group in itertools.groupby(blocks, key=lambda b: (b.seq.id, b.layer)):
            group = list(group)
            first = group[0]
            layer = first.seq.layers[first.layer]
            near, extent, offset = piece_place(layer, first.index, "warm")
            got = pool.alloc(len(group), near, room=min(256, max(8, len(layer))), extent=extent, offset=offset)
            if got is None:  # cannot happen with enough free slots; keep all-or-nothing anyway
                pool.release(out)
                return self.alloc_warm(pool, len(blocks))
            out += got
        return out

    def alloc_warm(self, pool: WarmPool, n: int) -> list[int]:
        """``n`` warm slots, dropping warm copies that cold or hot also hold (lock held; may wait
        for write-backs and loads in flight to make copies droppable)."""
        if n == 0:
            return []
        while True:
            slots = pool.alloc(n)
            if slots is not None:
                return slots
            short = n - pool.free_count
            resident = pool.resident()
            cands = [b for b in resident if b.pins == 0 and b.loading is None and (b.durable or b.hot is not None)]
            if len(cands) >= short:
                cands.sort(key=lambda b: (b.hot is None, b.last_used))  # hot copies first, then LRU
                for b in cands[:short]:
                    self.drop_warm(b)
                    self.counters.demotions["warm"] += 1
                continue
            in_flight = [b for b in resident if b.loading is not None]
            queued = [b for b in resident if b.queued]
            if queued or in_flight:
                # a write-back or load in flight makes a block droppable: wait for its completion
                def landed():
                    return all(not b.queued for b in queued) and all(b.loading is None for b in in_flight)
                self.shared.wait_until(landed, self.writeback.raise_error)
                continue
            raise BudgetError(f"warm budget exhausted: need {short} more slots and no block is durable yet "
                              f"(pool of {pool.slots} blocks); raise warm= or make the token ids known")

"""Loader: transfers up the tiers (cold -> warm/hot, warm -> hot), restore on resume, and the
background warm fill of a resumed sequence.

Every transfer is prepare -> run -> complete. ``start`` prepares under ``Shared.lock``:
reserves the slots (making room through ``Placement``), pins the block and marks it loading
with a future. A loader thread runs the copy or decode without the lock. Completion takes the
lock, sets the block's state (a failed load gives its slots back), unpins, resolves the future
and notifies, in that order: whoever sees the block no longer loading sees it resident (or
its error in the future). ``wait_loads`` waits on the condition, never by releasing a lock by
hand. On CUDA the warm -> hot copy runs on the hot pool's side stream, fenced by an event the
compute stream waits on (``Placement.acquire``).
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait

import torch

from .blocks import Block, Seq
from .codec import SlotReader, decode_block
from .codec.shuffle import interleave_many
from .errors import BudgetError, CorruptBlockError, MissingBlockError, TierstoreError
from .placement import Placement
from .shared import Shared

log = logging.getLogger(__name__)

RESTORE_CHUNK = 32       # blocks a decode thread takes at a time: ~3 ms of zstd work, few hand-offs
MAX_DECODE_THREADS = 8   # the caller's thread included


def _cores() -> int:
    """Cores this process may run on (its affinity, where the OS tells), 1..MAX_DECODE_THREADS."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(MAX_DECODE_THREADS, n))


class Loader:
    """Transfers up the tiers; one per manager (threads: 2 loaders, 1 warm filler, and for the
    restore of compressed sessions one decoder per core beyond the first, started on first use)."""

    def __init__(self, shared: Shared, placement: Placement) -> None:
        self.shared, self.placement = shared, placement
        self.counters = shared.counters
        self.cold = shared.store.cold
        self.loaders = ThreadPoolExecutor(max_workers=2, thread_name_prefix="tierstore-load")
        # background warm fills of resumed sessions: their own thread, so recalls never queue behind them
        self.fillers = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tierstore-fill")
        self.fills: list[Future] = []
        # restores of compressed sessions decode on the caller's thread and these (one per core)
        self.decode_threads = _cores()
        self.decoders = ThreadPoolExecutor(max_workers=max(1, self.decode_threads - 1),
                                           thread_name_prefix="tierstore-decode")

    # -- one block ------------------------------------------------------------------------------------

    def start(self, b: Block, *, to_hot: bool, evict: bool) -> None:
        """Prepare a load of ``b`` (lock held): reserve its slots (``evict``: making room,
        else ``BudgetError`` when none is free) and hand the copy to a loader thread."""
        seq, pl = b.seq, self.placement
        if b.loading is not None:  # another thread's load serves this request
            return
        from_cold = b.warm is None and b.hot is None
        if from_cold and not b.durable:
            raise MissingBlockError("block is in no tier (not durable, not resident)", **b.where())
        # a CPU hot pool decodes cold records straight into the hot slot: no warm staging
        need_warm = from_cold and not (to_hot and not seq.hot.is_cuda)
        with pl.pinned([b]):
            ws = hs = None
            try:
                if need_warm:
                    if not evict and seq.warm.free_count < 1:
                        raise BudgetError("no free warm slot")
                    ws = pl.alloc_warm(seq.warm, 1)[0]
                if to_hot and b.hot is None:
                    if not evict and seq.hot.free_count < 1:
                        raise BudgetError("no free hot slot")
                    hs = pl.alloc_hot(seq.hot, 1, None)[0]
            except BaseException:
                if ws is not None:
                    seq.warm.release([ws])
                raise
            if b.loading is not None or (from_cold and (b.warm is not None or b.hot is not None)) \
                    or (hs is not None and b.hot is not None):
                # making room released the lock and another thread loaded b meanwhile: its load serves
                for pool, slot in ((seq.warm, ws), (seq.hot, hs)):
                    if slot is not None:
                        pool.release([slot])
                return
            if ws is not None:
                pl.put_warm(b, ws)
            if hs is not None:
                pl.put_hot(b, hs)
            b.pins += 1  # the transfer's own pin, given back at completion
            fut: Future = Future()
            b.loading = fut
        self.loaders.submit(self._run, b, from_cold, hs is not None, fut, not need_warm and from_cold)

    def start_many(self, seq: Seq, blocks: Sequence[Block]) -> None:
        """Prepare the loads of several cold blocks straight into a CPU hot pool (lock held):
        their hot slots reserved at once (one eviction for the lot, not one per block), each
        block pinned and marked loading with its own future, and one loader task that reads
        them all in one read transaction (``_read_into``), so a layer's cold blocks cost one
        hand-off instead of one per block. A block another thread is loading is left to it."""
        pl = self.placement
        with pl.pinned(list(blocks)):
            todo = list({id(b): b for b in blocks if b.loading is None and b.hot is None and b.warm is None}.values())
            for b in todo:
                if not b.durable:
                    raise MissingBlockError("block is in no tier (not durable, not resident)", **b.where())
            if not todo:
                return
            slots = pl.alloc_hot(seq.hot, len(todo), None)
            # making room may have released the lock: a block loaded meanwhile keeps its load
            plan, spare = [], []
            for b, slot in zip(todo, slots):
                if b.loading is not None or b.hot is not None or b.warm is not None:
                    spare.append(slot)
                    continue
                pl.put_hot(b, slot)
                b.pins += 1  # the transfer's own pin, given back at completion
                b.loading = Future()
                plan.append((b, slot))
            if spare:
                seq.hot.release(spare)
        if plan:
            self.loaders.submit(self._run_many, seq, plan)

    def _run_many(self, seq: Seq, plan: list[tuple[Block, int]]) -> None:
        bad: dict[int, BaseException] = {}
        err = None
        try:
            self._read_into(seq, seq.hot, plan, bad=bad)
        except BaseException as e:  # noqa: BLE001 - handed to the waiters through the futures
            err = e if isinstance(e, TierstoreError) else TierstoreError(f"loading {seq.name}: {e}")
        with self.shared.lock:
            self.counters.promotions["cold"] += 0 if err is not None else len(plan) - len(bad)
            self._complete([(b, b.loading, err or bad.get(id(b))) for b, _ in plan], from_cold=True, to_hot=True)

    def _run(self, b: Block, from_cold: bool, to_hot: bool, fut: Future, direct: bool = False) -> None:
        seq = b.seq
        try:
            if from_cold:
                data = self.cold.get("blocks", b.key)
                if data is None:
                    raise MissingBlockError("block missing from cold", **b.where())
                dk, dv = seq.hot.block(b.hot) if direct else seq.warm.block(b.warm)
                decode_block(b.key, data, out_k=dk, out_v=dv, **b.where())
                self.counters.bytes_moved += len(data)
                self.counters.promotions["cold"] += 1
            if to_hot and not direct:
                if seq.hot.is_cuda:
                    with torch.cuda.stream(seq.hot.copy_stream):
                        seq.hot.copy_in(b.hot, seq.warm, b.warm, non_blocking=True)
                        ev = torch.cuda.Event()
                        ev.record(seq.hot.copy_stream)
                    b.ready = ev
                    # this loader thread (not the compute stream) waits: once the transfer
                    # completes, the pinned warm slot may be reused or dropped at once
                    ev.synchronize()
                else:
                    seq.hot.copy_in(b.hot, seq.warm, b.warm)
                self.counters.bytes_moved += seq.layout.block_bytes
                self.counters.promotions["warm"] += 1
            err = None
        except BaseException as e:
            err = e if isinstance(e, (TierstoreError, CorruptBlockError)) else \
                TierstoreError(f"loading {b.where()}: {e}")
        self._complete([(b, fut, err)], from_cold=from_cold, to_hot=to_hot)

    def _complete(self, done: list[tuple[Block, Future, BaseException | None]], *, from_cold: bool,
                  to_hot: bool) -> None:
        """For each ``(block, its future, its error)``: state, slots of a failed load, future,
        then one unpin that wakes the waiters."""
        pl = self.placement
        with self.shared.lock:
            for b, fut, err in done:
                b.loading = None
                if err is not None:
                    if to_hot:
                        pl.drop_hot(b)
                    if from_cold:
                        pl.drop_warm(b)
                elif from_cold and to_hot and b.durable:
                    pl.drop_warm(b)  # warm only staged the transfer; cold still has the block
                if err is None:
                    fut.set_result(None)
                else:
                    fut.set_exception(err)
            self.shared.unpin([b for b, _, _ in done])

    def wait_loads(self, blocks: Sequence[Block], *, raise_errors: bool = False) -> None:
        """Wait (lock held; the condition releases it meanwhile) until none of ``blocks`` is
        loading. A failed load gave its slots back; its error is raised with ``raise_errors``,
        else left to the caller's reload from cold, which raises it where it is needed."""
        futs = {id(f): f for f in (b.loading for b in blocks) if f is not None}
        if not futs:
            return
        self.shared.wait_until(lambda: all(b.loading is None for b in blocks))
        if raise_errors:
            for f in futs.values():
                if f.done() and f.exception() is not None:
                    raise f.exception()

    # -- restore (resume) -----------------------------------------------------------------------------

    def restore(self, seq: Seq, *, reserve: int | None = None) -> int:
        """Load a resumed sequence's blocks into hot slots now, as many as fit, in block order
        per layer (consecutive slots, so attention reads them as runs), newest blocks first
        when not all fit. Reads in batched read transactions, decodes straight into the slots
        on a CPU hot pool (no warm staging) and through warm on CUDA. Returns blocks loaded.
        The blocks that did not fit are then read into warm in the background."""
        sh, pl = self.shared, self.placement
        with sh.lock:
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
                    pl.put_hot(b, slot)
                    b.pins += 1
                    plan.append((b, slot))
        t = time.perf_counter()
        try:
            self._restore_into(seq, plan)
        finally:
            with sh.lock:
                sh.unpin([b for b, _ in plan])
        with sh.lock:
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
            self.fills = [f for f in self.fills if not f.done()]
            self.fills += [self.fillers.submit(self._fill_layer, seq, layer, quota)
                           for layer in range(seq.layout.num_layers)]

    def wait_filled(self, timeout: float | None = None) -> None:
        """Wait until the background warm fills queued so far are done (failed blocks stay in
        cold: their error is raised by the read that needs them)."""
        for f in list(self.fills):
            f.result(timeout)

    def _fill_layer(self, seq: Seq, layer: int, quota: int) -> None:
        """One layer of the warm fill (the filler thread). The blocks are marked loading (with
        one future) while they are read, so an acquire meanwhile waits for them rather than
        reading them again; a sequence closed before its turn is skipped."""
        sh, pl = self.shared, self.placement
        with sh.lock:
            if sh.closed or seq.closed or seq.id not in sh.seqs:
                return
            todo = [b for b in seq.layers[layer]
                    if b.durable and b.hot is None and b.warm is None and b.loading is None][-quota:]
            slots = seq.warm.alloc(len(todo)) if todo else None
            if not slots:
                return
            fut: Future = Future()
            for b, slot in zip(todo, slots):
                pl.put_warm(b, slot)
                b.loading, b.pins = fut, b.pins + 1
        err, bad = None, {}
        try:
            self._read_into(seq, seq.warm, list(zip(todo, slots)), bad=bad)
        except BaseException as e:  # noqa: BLE001 - handed to any waiter through the future
            err = e
        with sh.lock:
            for b in todo:
                b.loading = None
                if err is not None or id(b) in bad:
                    pl.drop_warm(b)  # stays in cold: the read that needs it raises the precise error
            if err is None:
                self.counters.warm_filled += len(todo) - len(bad)
                fut.set_result(None)
            else:
                fut.set_exception(err)
            sh.unpin(todo)
        for e in bad.values():
            log.warning("warm fill of %s: %s", seq.name, e)
        if err is not None:
            log.warning("warm fill of %s layer %d failed: %s", seq.name, layer, err)

    def _restore_into(self, seq: Seq, plan: list[tuple[Block, int]]) -> None:
        if not plan:
            return
        try:
            if not seq.hot.is_cuda and seq.codec.name == "raw":
                # memory-bound and GIL-bound (the checksum holds the GIL): a second thread measured
                # slower, so a CPU pool is filled by the caller's thread
                self._read_into(seq, seq.hot, plan)
            else:
                self._read_parallel(seq, seq.hot, plan)
        except BaseException:
            with self.shared.lock:
                for b, _ in plan:
                    self.placement.drop_hot(b)
            raise

    def _read_parallel(self, seq: Seq, pool, plan: list[tuple[Block, int]]) -> None:
        """``_read_into`` of ``plan`` by the caller's thread and the decode threads side by side
        (zstd and the byte scatter release the GIL), each taking the next chunk of ``RESTORE_CHUNK``
        blocks until none is left, so a thread slowed by a busy core takes fewer. After a failure
        no thread starts another chunk; once all have stopped, the error of the first failed
        chunk in plan order is raised (the one a serial read would raise)."""
        chunks = [plan[i:i + RESTORE_CHUNK] for i in range(0, len(plan), RESTORE_CHUNK)]
        taken, errors = itertools.count(), {}   # next(count) is atomic under the GIL

        def work() -> None:
            while not errors:
                i = next(taken)
                if i >= len(chunks):
                    return
                try:
                    self._read_into(seq, pool, chunks[i])
                except BaseException as e:  # noqa: BLE001 - raised below by the caller's thread
                    errors[i] = e

        helpers = [self.decoders.submit(work) for _ in range(min(self.decode_threads, len(chunks)) - 1)]
        work()
        wait(helpers)
        if errors:
            raise errors[min(errors)]

    def _read_into(self, seq: Seq, pool, part: list[tuple[Block, int]], bad: dict | None = None) -> None:
        """Read durable blocks from cold into ``pool``'s slots in one read transaction. ``bad``
        (a dict): a damaged or missing block is recorded there (id(block) -> error) and skipped,
        instead of failing the whole read."""
        lay = seq.layout
        fast, slots = None, None
        if pool.kv.device.type != "cuda":  # full raw and zstd blocks: header compares + checksum + decode into the slot
            fast = SlotReader((lay.kv_heads, lay.block_tokens, lay.head_dim), lay.dtype)
            slots = pool.slot_major()
        moved = 0
        run: list[list[bytes]] = []  # verified zstd planes of the blocks for slots run_at, run_at + 1, ...
        run_at = -1
        with self.cold.read(buffers=True) as txn:
            db = self.cold.db("blocks")
            for b, slot in part:
                try:
                    data = txn.get(b.key, db=db)
                    if data is None:
                        data = self.cold.staged("blocks", b.key)
                    planes = None if fast is None or data is None else fast.planes(b.key, data)
                    if planes is None:
                        moved += self._read_one(b, data, pool, slot, fast, None if slots is None else slots[slot])
                        continue
                    if run and slot != run_at + len(run):
                        interleave_many(run, slots[run_at:run_at + len(run)])
                        run.clear()
                    if not run:
                        run_at = slot
                    run.append(planes)
                    moved += len(data)
                except (MissingBlockError, CorruptBlockError) as e:
                    if bad is None:
                        raise
                    bad[id(b)] = e
            if run:
                interleave_many(run, slots[run_at:run_at + len(run)])
        with self.shared.lock:
            self.counters.bytes_moved += moved

    @staticmethod
    def _read_one(b: Block, data, pool, slot: int, fast: SlotReader | None, dst) -> int:
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

    def close(self) -> None:
        self.loaders.shutdown(wait=True)
        self.decoders.shutdown(wait=True)
        self.fillers.shutdown(wait=True, cancel_futures=True)

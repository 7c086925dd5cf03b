"""TierManager: placement, budgets, demotion, recall, prefetch and write-back of token blocks.

A block (one layer of one sequence, ``block_tokens`` tokens) lives in the hot pool (the
model's device), the warm pool (host), and/or only in cold (LMDB). Contracts:

* Budgets: pools are allocated from the store's byte budgets and never grow past them (pageable
  host pools take pages only as blocks arrive, ``tiers/pool.py``); everything the manager hands
  to attention is a view of a hot slot, so hot bytes in use are bounded by the hot pool,
  materialised tensors included.
* Nothing is lost: a block is dropped from warm only when it is durable in cold or still hot;
  from hot only after a warm copy exists. Eviction is demotion, never deletion.
* Pins: a block in use (``acquire``d, being written back or loaded) is never chosen as a victim.
  Making room for n blocks is all-or-nothing (``BudgetError`` and nothing moved otherwise).
* Write-back: sealed blocks with a key are encoded in worker threads (zstd releases the GIL)
  and written by one writer thread in batched LMDB transactions; ``flush`` waits for them.
* Recall: ``prefetch`` returns at once (cold -> warm decode in a thread, warm -> hot copy in the
  thread on CPU or on a side CUDA stream fenced by an event); ``acquire`` waits only for what is
  not resident yet.
"""

from __future__ import annotations

import contextlib
import dataclasses
import heapq
import itertools
import logging
import queue
import threading
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from .blocks import Block, Seq, _summary_of
from .calibrator import Calibrator
from .codec import CodecConfig, decode_block
from .config import StoreConfig
from .errors import BudgetError, CorruptBlockError, MissingBlockError, StoreClosedError, TierstoreError
from .layout import KVLayout
from .metrics import Counters
from .policies import Policy, Summaries, get_policy
from .records import BlockSummary
from .seqops import SequenceOps
from .sessions import SessionStore
from .summaries import SummaryIndex
from .tiers.cold import ColdStore, block_key
from .tiers.hot import HotPool
from .tiers.pool import SlotPool
from .tiers.warm import WarmPool, pinning_available
from .writeback import WriteBack

log = logging.getLogger(__name__)

SCRATCH_MAX = 64 << 20  # most hot bytes reserved for attention temporaries
SCRATCH_MIN_BUDGET = 8 << 20  # below this, no reservation: attention pieces shrink to one block



@dataclasses.dataclass(frozen=True)
class StoreParts:
    """What the manager uses of its ``Store``. Never the Store itself: the worker threads
    reference the manager, so a reference back would keep a Store dropped without ``close()``
    (and these threads, and the pools) alive; the Store's finalizer closes the manager."""

    config: StoreConfig
    cold: ColdStore
    sessions: SessionStore

    @property
    def path(self) -> str:
        return self.config.path


class TierManager(WriteBack, SequenceOps):
    """One per store and process; thread-safe. See the module docstring for the contracts."""

    def __init__(self, store) -> None:
        self.store = StoreParts(store.config, store.cold, store.sessions)
        cfg = store.config
        self.hot_budget, self.warm_budget = cfg.hot_bytes, cfg.warm_bytes
        self._hot_left, self._warm_left = cfg.hot_bytes, cfg.warm_bytes
        self._lock = threading.RLock()
        self._cv = threading.Condition(self._lock)
        self._hot: dict[tuple, HotPool] = {}
        self._warm: dict[KVLayout, WarmPool] = {}
        self._seqs: dict[int, Seq] = {}
        self._ids = itertools.count(1)
        self.step = 0
        self.counters = Counters()
        # A CPU hot pool reads warm blocks where they are: both tiers are host memory, so a
        # warm -> hot copy would only add a copy and evict a hot block (CUDA copies them up).
        self.warm_in_place = True
        self._encoders = ThreadPoolExecutor(max_workers=2, thread_name_prefix="tierstore-encode")
        # what policies score (summaries.py; lock order there) and the sketch bases (calibrator.py)
        self.index = SummaryIndex(self._lock)
        self.calibrator = Calibrator(store.cold, cfg.sketch_dims, submit=self._encoders.submit,
                                     resketch=self.index.resketch)
        self.index.basis_of = self.calibrator.basis
        self._loaders = ThreadPoolExecutor(max_workers=2, thread_name_prefix="tierstore-load")
        # background warm fills of resumed sessions: their own thread, so recalls never queue behind them
        self._fillers = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tierstore-fill")
        self._fills: list[Future] = []
        self._wq: queue.Queue = queue.Queue()
        self._write_error: BaseException | None = None
        self._write_error_seqs: set[int] = set()  # whose write-backs failed
        self._closed = False
        self._writer = threading.Thread(target=self._write_loop, name="tierstore-writer", daemon=True)
        self._writer.start()

    # -- pools and sequences ---------------------------------------------------------------

    def _pools(self, layout: KVLayout, device: torch.device, hot_bytes: int | None,
               warm_bytes: int | None) -> tuple[HotPool, WarmPool]:
        hk = (layout, str(device))
        if hk not in self._hot:
            want = self._hot_left if hot_bytes is None else min(hot_bytes, self._hot_left)
            # attention temporaries (score chunks, gathered selections) come out of the same
            # budget: an eighth of it, at most 64 MiB, is reserved for them
            scratch = min(SCRATCH_MAX, want // 8) if want >= SCRATCH_MIN_BUDGET else 0
            slots = (want - scratch) // layout.block_bytes
            if slots < 2:
                raise BudgetError(f"hot budget {want} bytes holds {slots} blocks of {layout.block_bytes} bytes "
                                  f"(after {scratch} bytes of attention scratch); at least 2 are needed")
            pool = HotPool(layout, slots, device)
            pool.scratch_bytes = scratch
            self._hot[hk] = pool
            self._hot_left -= slots * layout.block_bytes + scratch
        if layout not in self._warm:
            want = self._warm_left if warm_bytes is None else min(warm_bytes, self._warm_left)
            slots = want // layout.block_bytes
            if slots < 1:
                raise BudgetError(f"warm budget {want} bytes is smaller than one block ({layout.block_bytes} bytes)")
            # pinned only for a CUDA hot pool: pinned memory is committed at once, while pageable
            # memory takes pages as blocks arrive (a CPU hot pool gains nothing from pinning)
            self._warm[layout] = WarmPool(layout, slots, pin=device.type == "cuda" and pinning_available())
            self._warm_left -= slots * layout.block_bytes
        return self._hot[hk], self._warm[layout]

    def prepare(self, layout: KVLayout, device: torch.device | str, *, hot_bytes: int | None = None,
                warm_bytes: int | None = None) -> tuple[HotPool, WarmPool]:
        """Create (and fault in: every page touched) the pools of a layout ahead of time, e.g. at
        process start, so that a later resume does not pay for allocating them. Without it, host
        pools take memory as blocks arrive."""
        with self._lock:
            self._check_open()
            pools = self._pools(layout, torch.device(device), hot_bytes, warm_bytes)
            for pool in pools:
                pool.fault_in()
            return pools

    def open_sequence(self, name: str, layout: KVLayout, device: torch.device | str, *,
                      codec: CodecConfig | None = None, policy: str | Policy = "exact",
                      hot_bytes: int | None = None, warm_bytes: int | None = None) -> Seq:
        """Register a sequence. Pools for its layout/device are made on first use from the budgets
        (``hot_bytes``/``warm_bytes`` cap this layout's share; default: what is left)."""
        with self._lock:
            self._check_open()
            hot, warm = self._pools(layout, torch.device(device), hot_bytes, warm_bytes)
            seq = Seq(next(self._ids), name, layout, torch.device(device),
                      codec or self.store.config.codec, get_policy(policy), hot, warm)
            self._seqs[seq.id] = seq
            return seq

    def close_sequence(self, seq: Seq, *, flush: bool = True) -> None:
        """Free the sequence's slots. With ``flush``, pending write-backs finish first."""
        if flush:
            with contextlib.suppress(TierstoreError):
                self.flush(seq)
        with self._cv:
            while any(b.pins for layer in seq.layers for b in layer):
                self._cv.wait(0.05)
            for layer in seq.layers:
                for b in layer:
                    self._drop_hot(b)
                    self._drop_warm(b)
            seq.closed = True
            self._seqs.pop(seq.id, None)
            self.calibrator.forget(seq)
            self.index.drop(seq, sync=False)
            if self._write_error is not None and self._write_error_seqs <= {seq.id}:
                self._write_error = None  # only this sequence's write-backs failed: moot once it is closed

    def _check_open(self) -> None:
        if self._closed:
            raise StoreClosedError(f"{self.store.path}: tier manager is closed")

    # -- appending ---------------------------------------------------------------------------

    def append(self, seq: Seq, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Append tokens to a layer. k, v: [kv_heads, n, head_dim] on the sequence's device.

        Blocks are filled one at a time, so a prefill chunk longer than the hot pool streams
        through it: each new block may demote an earlier one (sealed blocks of this very call
        included) to warm. A block that seals gets its cold key from ``seq.chains`` when the
        token ids are known, and its write-back starts at once.
        """
        bt = seq.layout.block_tokens
        n = int(k.shape[1])
        with self._lock:
            blocks = seq.layers[layer]
            pos = 0
            while pos < n:
                b = blocks[-1] if blocks and not blocks[-1].sealed else None
                if b is None:
                    near = blocks[-1].hot if blocks else None
                    b = Block(seq, layer, len(blocks))
                    b.hot = self._alloc_hot(seq.hot, 1, near, room=min(256, max(8, len(blocks))))[0]
                    blocks.append(b)
                elif b.hot is None or b.loading is not None:  # (a prefetch may be filling its slot)
                    self._promote([b])
                take = min(bt - b.ntok, n - pos)
                hk, hv = seq.hot.block(b.hot)
                hk[:, b.ntok:b.ntok + take].copy_(k[:, pos:pos + take])
                hv[:, b.ntok:b.ntok + take].copy_(v[:, pos:pos + take])
                if b.key is not None:  # a stored partial block changed: new content, new key
                    b.key, b.durable = None, False
                mass = b.summary.mass if b.summary is not None else None
                b.summary = None  # stale: recomputed at seal (or by write_now for a partial block)
                self._drop_warm(b)
                b.ntok += take
                b.last_used = self.step
                pos += take
                if b.sealed:
                    basis = self.calibrator.basis(seq.layout, layer)
                    b.summary = _summary_of(hk, basis)
                    if mass is not None:
                        b.summary.mass += mass
                    if basis is None:
                        self.calibrator.observe(seq.layout, layer, b, hk)
                    if b.index < len(seq.chains):
                        b.key = block_key(seq.chains[b.index], layer)
                    self._maybe_write_back(b)

    def set_keys(self, seq: Seq, keys: dict[int, Sequence[bytes]]) -> None:
        """Cold keys per block index (one per layer); sealed blocks then write back."""
        with self._lock:
            for index, per_layer in keys.items():
                for layer, key in enumerate(per_layer):
                    blocks = seq.layers[layer]
                    b = blocks[index] if index < len(blocks) else None
                    if b is not None and b.key is None:
                        b.key = key
                        self._maybe_write_back(b)

    def adopt(self, seq: Seq, layer: int, index: int, ntok: int, key: bytes,
              summary: BlockSummary | None) -> Block:
        """Register a block that is already durable in cold (resume)."""
        with self._lock:
            blocks = seq.layers[layer]
            if index != len(blocks):
                raise ValueError(f"adopt out of order: layer {layer} has {len(blocks)} blocks, got {index}")
            b = Block(seq, layer, index)
            b.ntok, b.key, b.durable, b.summary = ntok, key, True, summary
            blocks.append(b)
            return b

    def adopt_layer(self, seq: Seq, layer: int, entries: Sequence[tuple[int, bytes, BlockSummary | None]]) -> None:
        """``adopt`` the blocks ``(ntok, key, summary)`` of one layer, in order, from its first."""
        with self._lock:
            blocks = seq.layers[layer]
            if blocks:
                raise ValueError(f"adopt_layer: layer {layer} already has {len(blocks)} blocks")
            for index, (ntok, key, summary) in enumerate(entries):
                b = Block(seq, layer, index)
                b.ntok, b.key, b.durable, b.summary = ntok, key, True, summary
                blocks.append(b)

    # -- scoring (delegated to ``self.index``) ------------------------------------------------

    def summaries(self, seq: Seq, layer: int) -> Summaries:
        """Stacked summaries of the layer's blocks, partial tail included (``SummaryIndex.summaries``)."""
        with self._lock:
            return self.index.summaries(seq, layer, step=self.step)

    def note_attention(self, seq: Seq, layer: int, block_ids: Sequence[int], mass: torch.Tensor, *,
                       replace: bool = False) -> None:
        """Feed attention mass back into the blocks' summaries (``SummaryIndex.note_attention``)."""
        self.index.note_attention(seq, layer, block_ids, mass, replace=replace)

    def sync_mass(self, seq: Seq) -> None:
        """Write stacked mass back into the blocks' summaries (``SummaryIndex.sync_mass``)."""
        self.index.sync_mass(seq)

    def mass_summaries(self, seq: Seq) -> list[tuple[bytes, bytes]]:
        """The summaries to rewrite at commit (``SummaryIndex.mass_summaries``)."""
        return self.index.mass_summaries(seq)

    # -- reading -----------------------------------------------------------------------------

    def blocks(self, seq: Seq, layer: int) -> list[Block]:
        return seq.layers[layer]

    def in_place(self, seq: Seq) -> bool:
        """Does attention read this sequence's warm blocks where they are (CPU hot pool)?"""
        return self.warm_in_place and not seq.hot.is_cuda

    def readable(self, b: Block, in_place: bool) -> bool:
        """Can attention read ``b`` now without moving it?"""
        return b.loading is None and (b.hot is not None or (in_place and b.warm is not None))

    @contextlib.contextmanager
    def acquire(self, seq: Seq, layer: int, block_ids: Sequence[int], *,
                transient: bool = False, in_place: bool = False) -> Iterator[list[Block]]:
        """Make the blocks hot and pin them for the duration; yields the ``Block`` objects (read
        them with ``view``). ``transient``: streamed, so they leave hot first afterwards.
        ``in_place`` (honoured where ``self.in_place(seq)``): warm blocks stay in warm, pinned, and
        are read there; only blocks in no memory tier are loaded."""
        in_place = in_place and self.in_place(seq)
        with self._lock:
            self._check_open()
            layer_blocks = seq.layers[layer]
            blocks = layer_blocks[block_ids.start:block_ids.stop] if isinstance(block_ids, range) \
                and block_ids.step == 1 else [layer_blocks[i] for i in block_ids]
            self.step += 1
            step, c = self.step, self.counters
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
                self._wait_loads(missing)
                landed = {id(b) for b in missing if self.readable(b, in_place)}
                for b in missing:
                    if id(b) in landed:
                        self._pin_readable(b)
                missing = [b for b in missing if id(b) not in landed]
            try:
                self._promote(missing, transient=transient)
            except BaseException:
                unpinned = {id(b) for b in missing}
                for b in blocks:
                    if id(b) not in unpinned:
                        b.pins -= 1
                raise
            for b in missing:
                b.pins += 1
                b.last_used = self.step
        try:
            if seq.hot.is_cuda:
                stream = torch.cuda.current_stream(seq.device)
                for b in blocks:
                    if b.ready is not None:
                        stream.wait_event(b.ready)
            yield blocks
        finally:
            with self._cv:
                if seq.hot.is_cuda:
                    # kernels queued on the compute stream may still read these slots: a later
                    # copy into a slot freed by demoting one of them must run after them
                    seq.hot.copy_stream.wait_stream(torch.cuda.current_stream(seq.device))
                for b in blocks:
                    b.pins -= 1
                self._cv.notify_all()

    def _pin_readable(self, b: Block) -> None:
        """Count and pin a block ``acquire`` reads where it is (lock held)."""
        tier = "hot" if b.hot is not None else "warm"
        if tier == "warm":
            self.counters.misses["hot"] += 1
            self.counters.warm_in_place += 1
        self.counters.hits[tier] += 1
        b.pins += 1
        b.last_used = self.step

    def _wait_loads(self, blocks: Sequence[Block], *, raise_errors: bool = False) -> None:
        """Wait (lock held, released meanwhile) until none of ``blocks`` is loading. A failed
        load gave its slots back; its error is raised with ``raise_errors``, else left to the
        caller's reload from cold, which raises it (naming the block) where it is needed."""
        while True:
            fut = next((b.loading for b in blocks if b.loading is not None), None)
            if fut is None:
                return
            self._lock.release()
            try:
                if raise_errors:
                    fut.result()
                else:
                    with contextlib.suppress(Exception):
                        fut.result()
            finally:
                self._lock.acquire()

    def hot_view(self, b: Block) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V of a hot block: ``[kv_heads, ntok, head_dim]`` views of its slot."""
        k, v = b.seq.hot.block(b.hot)
        return k[:, :b.ntok], v[:, :b.ntok]

    def view(self, b: Block) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V of an acquired block, hot or (read in place) warm."""
        if b.hot is not None:
            return self.hot_view(b)
        k, v = b.seq.warm.block(b.warm)
        return k[:, :b.ntok], v[:, :b.ntok]

    def runs(self, blocks: Sequence[Block], slot: str = "hot") -> list[tuple[int, int, int, int]]:
        """Group hot (``slot="warm"``: warm) blocks into runs of consecutive slots and indices:
        ``(first_slot, n_blocks, first_token, ntok)`` for zero-copy views."""
        bt = blocks[0].seq.layout.block_tokens if blocks else 0
        out: list[list[int]] = []
        for b in blocks:
            s = b.hot if slot == "hot" else b.warm
            if out and out[-1][0] + out[-1][1] == s and out[-1][4] + out[-1][1] == b.index \
                    and out[-1][3] == out[-1][1] * bt:
                out[-1][1] += 1
                out[-1][3] += b.ntok
            else:
                out.append([s, 1, b.index * bt, b.ntok, b.index])
        return [(r[0], r[1], r[2], r[3]) for r in out]

    def prefetch(self, seq: Seq, layer: int, block_ids: Iterable[int], *, hot: bool = True) -> None:
        """Start moving blocks up; returns at once. Blocks that cannot get room are skipped."""
        with self._lock:
            if self._closed:
                return
            for i in block_ids:
                b = seq.layers[layer][i]
                self.counters.prefetch_requested += 1
                if b.loading is not None or (b.hot is not None if hot else (b.hot is not None or b.warm is not None)):
                    continue
                try:
                    self._start_load(b, to_hot=hot, evict=False)
                    b.prefetched = True
                except BudgetError:  # no free hot slot: at least bring it from cold to warm
                    if hot and b.warm is None:
                        with contextlib.suppress(BudgetError):
                            self._start_load(b, to_hot=False, evict=False)

    def prefetch_to_read(self, seq: Seq, layer: int, block_ids: Iterable[int]) -> None:
        """``prefetch`` to where attention reads blocks: hot, or warm where warm is read in place."""
        self.prefetch(seq, layer, block_ids, hot=not self.in_place(seq))

    # -- movement (lock held) ------------------------------------------------------------------

    def _alloc_hot(self, pool: HotPool, n: int, near: int | None, room: int = 0) -> list[int]:
        slots = pool.alloc(n, near, room)
        while slots is None:  # eviction may wait; slots it frees can be taken meanwhile: again
            self._evict_hot(pool, n - pool.free_count, extra=pool.slots // 32)
            slots = pool.alloc(n, near, room)
        self.counters.hot_peak = max(self.counters.hot_peak, pool.used)
        return slots

    def _victims(self, candidates: list[Block], n: int) -> list[Block]:
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
            score = seq.policy.score(self.summaries(seq, layer))
            if score.dim() > 1:
                score = score.max(-1).values
            sc = score.tolist()
            ranked.extend((0 if b.transient else 1, sc[b.index], id(b), b) for b in blocks)
        return [t[3] for t in heapq.nsmallest(n, ranked, key=lambda t: (t[0], t[1]))]

    def _evict_hot(self, pool: HotPool, n: int, extra: int = 0) -> None:
        """Demote n unpinned blocks hot -> warm, all or nothing; and up to ``extra`` more
        that need no warm copy (durable, or already in warm): choosing victims scans every
        resident block, so it is done for a batch of slots, not for each one. Candidates: sealed
        blocks, and partial tails that need no copy (committed, or with a current warm copy: an
        idle cache's tail; ``append`` promotes a tail back before writing to it)."""
        while True:
            while True:
                resident = [b for s in self._seqs.values() if s.hot is pool for layer in s.layers for b in layer
                            if b.hot is not None and (b.sealed or b.durable or b.warm is not None)]
                cands = [b for b in resident if b.pins == 0 and b.loading is None]
                if len(cands) >= n or not any(b.queued or b.loading is not None for b in resident):
                    break
                self._cv.wait(0.05)  # blocks being written back or loaded free up shortly
                self._raise_write_error()
            if len(cands) < n:
                log.debug("evict fail: %s", [(b.layer, b.index, b.pins, b.queued, b.ntok, b.loading) for b in resident])
                raise BudgetError(f"hot budget exhausted: need {n} more slots, only {len(cands)} blocks can be "
                                  f"demoted (pool of {pool.slots} blocks); raise hot= or lower the prefill chunk")
            victims = self._victims(cands, min(len(cands), n + extra))
            victims = victims[:n] + [b for b in victims[n:] if b.durable or b.warm is not None]
            need_warm = [b for b in victims if b.warm is None and not b.durable]
            warm = victims[0].seq.warm
            for b in victims:
                b.pins += 1
            need_warm.sort(key=lambda b: (b.seq.id, b.layer, b.index))
            try:
                wslots = self._alloc_warm_runs(warm, need_warm)
            finally:
                for b in victims:
                    b.pins -= 1
            # _alloc_warm may wait with the lock released: a victim acquired (pinned) or moved
            # meanwhile must not be demoted under its reader; choose again
            if any(b.pins or b.hot is None or b.loading is not None or b.warm is not None
                   for b in need_warm) or any(b.pins or b.hot is None or b.loading is not None for b in victims):
                warm.release(wslots)
                continue
            break
        # durable victims need no warm copy, but one is far cheaper to read back than cold (a
        # record read, a checksum, a decode): keep them in free warm slots (evicting nothing)
        spare = [b for b in victims if b.warm is None and b.durable][:warm.free_count]
        sslots = warm.alloc(len(spare)) or []
        need_warm, wslots = need_warm + spare[:len(sslots)], list(wslots) + sslots
        for b, ws in zip(need_warm, wslots):
            b.warm = ws
            warm.copy_in(ws, b.seq.hot, b.hot, non_blocking=True)
            self.counters.bytes_moved += b.seq.layout.block_bytes
        if need_warm and pool.is_cuda:  # D2H done before the hot slots are reused
            torch.cuda.current_stream(pool.device).synchronize()
        for b in victims:
            self._drop_hot(b)
            b.transient = False
            self.counters.demotions["hot"] += 1

    def _alloc_warm_runs(self, pool: WarmPool, blocks: list[Block]) -> list[int]:
        """Warm slots for ``blocks`` (sorted by sequence, layer, index): each layer's blocks go
        right after the warm slot of the block before them where it is free (with room to grow
        otherwise), so a layer's demoted blocks stay in long runs that attention reads as one
        view or a few. Without enough free slots: ``_alloc_warm`` (which may drop warm copies)."""
        if pool.free_count < len(blocks):
            return self._alloc_warm(pool, len(blocks))
        out: list[int] = []
        for _, group in itertools.groupby(blocks, key=lambda b: (b.seq.id, b.layer)):
            group = list(group)
            first = group[0]
            layer = first.seq.layers[first.layer]
            prev = layer[first.index - 1].warm if 0 < first.index <= len(layer) else None
            got = pool.alloc(len(group), prev, room=min(256, max(8, len(layer))))
            if got is None:  # cannot happen with enough free slots; keep all-or-nothing anyway
                pool.release(out)
                return self._alloc_warm(pool, len(blocks))
            out += got
        return out

    def _alloc_warm(self, pool: WarmPool, n: int) -> list[int]:
        if n == 0:
            return []
        while True:
            slots = pool.alloc(n)
            if slots is not None:
                return slots
            short = n - pool.free_count
            cands = [b for s in self._seqs.values() if s.warm is pool for layer in s.layers for b in layer
                     if b.warm is not None and b.pins == 0 and b.loading is None
                     and (b.durable or b.hot is not None)]
            if len(cands) >= short:
                cands.sort(key=lambda b: (b.hot is None, b.last_used))  # hot copies first, then LRU
                for b in cands[:short]:
                    self._drop_warm(b)
                    self.counters.demotions["warm"] += 1
                continue
            if any(b.queued or (b.loading is not None and b.warm is not None and s.warm is pool)
                   for s in self._seqs.values() for layer in s.layers for b in layer):
                self._cv.wait(0.05)  # write-back or load in flight: its block becomes droppable
                self._raise_write_error()
                continue
            raise BudgetError(f"warm budget exhausted: need {short} more slots and no block is durable yet "
                              f"(pool of {pool.slots} blocks); raise warm= or make the token ids known")

    def _drop_hot(self, b: Block) -> None:
        if b.hot is not None:
            b.seq.hot.release([b.hot])
            b.hot = None
            b.ready = None

    def _drop_warm(self, b: Block) -> None:
        if b.warm is not None:
            b.seq.warm.release([b.warm])
            b.warm = None

    def _promote(self, blocks: list[Block], *, transient: bool = False) -> None:
        """Make blocks hot now (lock held; waits for loads in flight)."""
        for b in blocks:
            b.pins += 1
        try:
            while True:
                # loads in flight (a prefetch may have stopped at warm); a failed one raises here,
                # or the loop would start it again
                self._wait_loads(blocks, raise_errors=True)
                todo = [b for b in blocks if b.hot is None and b.loading is None]
                if not todo:
                    if all(b.loading is None for b in blocks):
                        break
                    continue  # a load started while the lock was released: wait for it too
                for b in todo:
                    tier = "warm" if b.warm is not None else "cold"
                    self.counters.misses["hot"] += 1
                    self.counters.hits[tier] += 1
                    self._start_load(b, to_hot=True, evict=True)
                    b.transient = transient
        finally:
            for b in blocks:
                b.pins -= 1

    def _start_load(self, b: Block, *, to_hot: bool, evict: bool) -> None:
        """Reserve slots now (lock held) and run the copies in a loader thread."""
        seq = b.seq
        if b.loading is not None:  # another thread's load serves this request
            return
        from_cold = b.warm is None and b.hot is None
        if from_cold and not b.durable:
            raise MissingBlockError("block is in no tier (not durable, not resident)", **b.where())
        # a CPU hot pool decodes cold records straight into the hot slot: no warm staging
        need_warm = from_cold and not (to_hot and not seq.hot.is_cuda)
        b.pins += 1
        try:
            ws = None
            if need_warm:
                if not evict and seq.warm.free_count < 1:
                    raise BudgetError("no free warm slot")
                ws = self._alloc_warm(seq.warm, 1)[0]
            hs = None
            if to_hot and b.hot is None:
                if not evict and seq.hot.free_count < 1:
                    if ws is not None:
                        seq.warm.release([ws])
                    raise BudgetError("no free hot slot")
                try:
                    hs = self._alloc_hot(seq.hot, 1, None)[0]
                except BaseException:
                    if ws is not None:
                        seq.warm.release([ws])
                    raise
        except BaseException:
            b.pins -= 1
            raise
        if b.loading is not None or (from_cold and (b.warm is not None or b.hot is not None)) \
                or (hs is not None and b.hot is not None):
            # making room released the lock and another thread loaded b meanwhile: its load serves
            for pool, slot in ((seq.warm, ws), (seq.hot, hs)):
                if slot is not None:
                    pool.release([slot])
            b.pins -= 1
            return
        if ws is not None:
            b.warm = ws
        if hs is not None:
            b.hot = hs
        fut: Future = Future()
        b.loading = fut
        self._loaders.submit(self._load, b, from_cold, hs is not None, fut, not need_warm and from_cold)

    def _load(self, b: Block, from_cold: bool, to_hot: bool, fut: Future, direct: bool = False) -> None:
        seq = b.seq
        try:
            if from_cold:
                data = self.store.cold.get("blocks", b.key)
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
        # complete the transfer (state, pins, slots of a failed load) before waking waiters: a
        # waiter that sees the future done must also see the block resident and unpinned
        with self._cv:
            b.loading = None
            b.pins -= 1
            if err is not None:
                if to_hot:
                    self._drop_hot(b)
                if from_cold:
                    self._drop_warm(b)
            elif from_cold and to_hot and b.durable:
                self._drop_warm(b)  # warm only staged the transfer; cold still has the block
            self._cv.notify_all()
        if err is None:
            fut.set_result(None)
        else:
            fut.set_exception(err)


    def usage(self) -> dict:
        """Bytes and blocks in use per tier, and token slots allocated but not filled."""
        with self._lock:
            hot_blocks = [b for s in self._seqs.values() for layer in s.layers for b in layer if b.hot is not None]
            bt = {id(b): b.seq.layout.block_tokens for b in hot_blocks}
            return {
                "hot_used_bytes": sum(p.used * p.layout.block_bytes for p in self._hot.values()),
                "hot_allocated_bytes": sum(p.nbytes + p.scratch_bytes for p in self._hot.values()),
                "hot_scratch_bytes": sum(p.scratch_bytes for p in self._hot.values()),
                "warm_used_bytes": sum(p.used * p.layout.block_bytes for p in self._warm.values()),
                "warm_allocated_bytes": sum(p.nbytes for p in self._warm.values()),
                "hot_blocks": sum(p.used for p in self._hot.values()),
                "warm_blocks": sum(p.used for p in self._warm.values()),
                "allocated_token_slots": sum(bt[id(b)] for b in hot_blocks),
                "unused_token_slots": sum(bt[id(b)] - b.ntok for b in hot_blocks),
            }

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
        for s in list(self._seqs.values()):
            self.close_sequence(s, flush=True)
        with self._lock:
            self._closed = True
        self._wq.put(None)
        self._writer.join()
        self._encoders.shutdown(wait=True)
        self._loaders.shutdown(wait=True)
        self._fillers.shutdown(wait=True, cancel_futures=True)
        with self._lock:  # free the pools now: a cache object may outlive its store (and reference cycles gc)
            self._hot.clear()
            self._warm.clear()

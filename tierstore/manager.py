"""TierManager: the facade over the components that place, move, load, write back and score
token blocks (one per store and process; thread-safe).

A block (one layer of one sequence, ``block_tokens`` tokens) lives in the hot pool (the
model's device), the warm pool (host), and/or only in cold (LMDB). Contracts:

* Budgets: pools are allocated from the store's byte budgets and never grow past them (pageable
  host pools take pages only as blocks arrive, ``tiers/pool.py``); attention reads views of
  slots or gathers pieces within the hot pool's scratch reservation.
* Nothing is lost: a block is dropped from warm only when it is durable in cold or still hot;
  from hot only after a warm copy exists. Eviction is demotion, never deletion.
* Pins: a block in use (``acquire``d, being written back or loaded) is never chosen as a victim.
  Making room for n blocks is all-or-nothing (``BudgetError`` and nothing moved otherwise).
* Write-back: sealed blocks with a key are encoded in worker threads (zstd releases the GIL)
  and written by one writer thread in batched LMDB transactions; ``flush`` waits for them.
* Recall: ``prefetch`` returns at once (cold -> warm decode in a thread, warm -> hot copy in the
  thread on CPU or on a side CUDA stream fenced by an event); ``acquire`` waits only for what is
  not resident yet.

The components and who owns what, the one lock and its order: ``tierstore/shared.py``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence

import torch

from .blocks import Block, Seq, _summary_of
from .budgets import Budgets
from .calibrator import Calibrator
from .codec import CodecConfig
from .errors import TierstoreError
from .layout import KVLayout
from .loader import Loader
from .placement import Placement, piece_place
from .policies import Policy, Summaries, get_policy
from .records import BlockSummary
from .seqops import SequenceOps
from .shared import Shared, StoreParts
from .summaries import SummaryIndex
from .tiers.hot import HotPool
from .tiers.schema import block_key
from .tiers.warm import WarmPool
from .writeback import WriteBack

__all__ = ["Block", "Seq", "StoreParts", "TierManager"]


class TierManager:
    """One per store and process; wires the components (see the module docstring)."""

    def __init__(self, store) -> None:
        self.store = StoreParts(store.config, store.cold, store.sessions)
        cfg = store.config
        self.shared = sh = Shared(self.store)
        self.lock = sh.lock  # the block lock (``shared.py``): hold it for a consistent snapshot
        self.budgets = Budgets(cfg.hot_bytes, cfg.warm_bytes)
        # what policies score (summaries.py; lock order there) and the sketch bases (calibrator.py)
        self.index = SummaryIndex(sh.lock)
        self.placement = Placement(sh, self.index)
        self.writeback = WriteBack(sh, self.index, lambda layout, layer: self.calibrator.basis(layout, layer))
        self.calibrator = Calibrator(store.cold, cfg.sketch_dims, submit=self.writeback.encoders.submit,
                                     resketch=self.index.resketch)
        self.index.basis_of = self.calibrator.basis
        self.loader = Loader(sh, self.placement)
        self.placement.loader, self.placement.writeback = self.loader, self.writeback
        self.seqops = SequenceOps(sh, self.placement, self.writeback, self.index)

    # -- state other code reads ----------------------------------------------------------------

    @property
    def counters(self):
        return self.shared.counters

    @property
    def step(self) -> int:
        return self.shared.step

    @property
    def hot_budget(self) -> int:
        return self.budgets.hot_budget

    @property
    def warm_budget(self) -> int:
        return self.budgets.warm_budget

    @property
    def warm_in_place(self) -> bool:
        """CPU: attention reads warm blocks where they are (False: copies them up, as on CUDA)."""
        return self.placement.warm_in_place

    @warm_in_place.setter
    def warm_in_place(self, on: bool) -> None:
        self.placement.warm_in_place = on

    def sequences(self) -> list[Seq]:
        """The open sequences."""
        with self.lock:
            return list(self.shared.seqs.values())

    def pools(self) -> list:
        """Every pool made so far, hot first."""
        with self.lock:
            return self.budgets.all()

    # -- pools and sequences ---------------------------------------------------------------

    def prepare(self, layout: KVLayout, device: torch.device | str, *, hot_bytes: int | None = None,
                warm_bytes: int | None = None) -> tuple[HotPool, WarmPool]:
        """Create (and fault in: every page touched) the pools of a layout ahead of time, e.g. at
        process start, so that a later resume does not pay for allocating them. Without it, host
        pools take memory as blocks arrive."""
        with self.lock:
            self.shared.check_open()
            pools = self.budgets.pools(layout, torch.device(device), hot_bytes, warm_bytes)
            for pool in pools:
                pool.fault_in()
            return pools

    def open_sequence(self, name: str, layout: KVLayout, device: torch.device | str, *,
                      codec: CodecConfig | None = None, policy: str | Policy = "exact",
                      hot_bytes: int | None = None, warm_bytes: int | None = None) -> Seq:
        """Register a sequence. Pools for its layout/device are made on first use from the budgets
        (``hot_bytes``/``warm_bytes`` cap this layout's share; default: what is left)."""
        sh = self.shared
        with self.lock:
            sh.check_open()
            hot, warm = self.budgets.pools(layout, torch.device(device), hot_bytes, warm_bytes)
            seq = Seq(next(sh.ids), name, layout, torch.device(device),
                      codec or self.store.config.codec, get_policy(policy), hot, warm)
            sh.seqs[seq.id] = seq
            return seq

    def close_sequence(self, seq: Seq, *, flush: bool = True) -> None:
        """Free the sequence's slots. With ``flush``, pending write-backs finish first."""
        if flush:
            with contextlib.suppress(TierstoreError):
                self.writeback.flush(seq)
        sh, pl = self.shared, self.placement
        with self.lock:
            sh.wait_until(lambda: not any(b.pins for layer in seq.layers for b in layer))
            for layer in seq.layers:
                for b in layer:
                    pl.drop_hot(b)
                    pl.drop_warm(b)
            seq.closed = True
            sh.seqs.pop(seq.id, None)
            self.calibrator.forget(seq)
            self.index.drop(seq, sync=False)
            self.writeback.forget(seq)
            sh.cv.notify_all()

    # -- appending ---------------------------------------------------------------------------

    def append(self, seq: Seq, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Append tokens to a layer. k, v: [kv_heads, n, head_dim] on the sequence's device.

        Blocks are filled one at a time, so a prefill chunk longer than the hot pool streams
        through it: each new block may demote an earlier one (sealed blocks of this very call
        included) to warm. A block that seals gets its cold key from ``seq.chains`` when the
        token ids are known, and its write-back starts at once.
        """
        pl = self.placement
        bt = seq.layout.block_tokens
        n = int(k.shape[1])
        with self.lock:
            blocks = seq.layers[layer]
            pos = 0
            while pos < n:
                b = blocks[-1] if blocks and not blocks[-1].sealed else None
                if b is None:
                    near, extent, offset = piece_place(blocks, len(blocks), "hot")
                    b = Block(seq, layer, len(blocks))
                    room = min(256, max(8, len(blocks)))
                    pl.put_hot(b, pl.alloc_hot(seq.hot, 1, near, room, extent, offset)[0])
                    blocks.append(b)
                elif b.hot is None or b.loading is not None:  # (a prefetch may be filling its slot)
                    pl.promote([b])
                take = min(bt - b.ntok, n - pos)
                hk, hv = seq.hot.block(b.hot)
                hk[:, b.ntok:b.ntok + take].copy_(k[:, pos:pos + take])
                hv[:, b.ntok:b.ntok + take].copy_(v[:, pos:pos + take])
                if b.key is not None:  # a stored partial block changed: new content, new key
                    b.key, b.durable = None, False
                mass = b.summary.mass if b.summary is not None else None
                b.summary = None  # stale: recomputed at seal (or by write_now for a partial block)
                pl.drop_warm(b)
                b.ntok += take
                b.last_used = self.shared.step
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
                    self.writeback.submit(b)

    def set_keys(self, seq: Seq, keys: dict[int, Sequence[bytes]]) -> None:
        """Cold keys per block index (one per layer); sealed blocks then write back."""
        with self.lock:
            for index, per_layer in keys.items():
                for layer, key in enumerate(per_layer):
                    blocks = seq.layers[layer]
                    b = blocks[index] if index < len(blocks) else None
                    if b is not None and b.key is None:
                        b.key = key
                        self.writeback.submit(b)

    def adopt(self, seq: Seq, layer: int, index: int, ntok: int, key: bytes,
              summary: BlockSummary | None) -> Block:
        """Register a block that is already durable in cold (resume)."""
        with self.lock:
            blocks = seq.layers[layer]
            if index != len(blocks):
                raise ValueError(f"adopt out of order: layer {layer} has {len(blocks)} blocks, got {index}")
            b = Block(seq, layer, index)
            b.ntok, b.key, b.durable, b.summary = ntok, key, True, summary
            blocks.append(b)
            return b

    def adopt_layer(self, seq: Seq, layer: int, entries: Sequence[tuple[int, bytes, BlockSummary | None]]) -> None:
        """``adopt`` the blocks ``(ntok, key, summary)`` of one layer, in order, from its first."""
        with self.lock:
            blocks = seq.layers[layer]
            if blocks:
                raise ValueError(f"adopt_layer: layer {layer} already has {len(blocks)} blocks")
            for index, (ntok, key, summary) in enumerate(entries):
                b = Block(seq, layer, index)
                b.ntok, b.key, b.durable, b.summary = ntok, key, True, summary
                blocks.append(b)

    # -- scoring (``SummaryIndex``) ----------------------------------------------------------

    def summaries(self, seq: Seq, layer: int) -> Summaries:
        """Stacked summaries of the layer's blocks, partial tail included (``SummaryIndex.summaries``)."""
        with self.lock:
            return self.index.summaries(seq, layer, step=self.shared.step)

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

    # -- reading (``Placement``, ``Loader``) ---------------------------------------------------

    def blocks(self, seq: Seq, layer: int) -> list[Block]:
        return seq.layers[layer]

    def in_place(self, seq: Seq) -> bool:
        """Does attention read this sequence's warm blocks where they are (CPU hot pool)?"""
        return self.placement.in_place(seq)

    def readable(self, b: Block, in_place: bool) -> bool:
        """Can attention read ``b`` now without moving it?"""
        return self.placement.readable(b, in_place)

    def acquire(self, seq: Seq, layer: int, block_ids: Sequence[int], *, transient: bool = False,
                in_place: bool = False) -> contextlib.AbstractContextManager[list[Block]]:
        """Pin blocks where they can be read for a ``with`` (``Placement.acquire``)."""
        return self.placement.acquire(seq, layer, block_ids, transient=transient, in_place=in_place)

    def compact(self, seq: Seq, layer: int, ids: range) -> bool:
        """Move idle sealed blocks into one warm run, read as one view (``Placement.compact``)."""
        return self.placement.compact(seq, layer, ids)

    def prefetch(self, seq: Seq, layer: int, block_ids: Iterable[int], *, hot: bool = True) -> None:
        """Start moving blocks up; returns at once. Blocks that cannot get room are skipped."""
        self.placement.prefetch(seq, layer, block_ids, hot=hot)

    def prefetch_to_read(self, seq: Seq, layer: int, block_ids: Iterable[int]) -> None:
        """``prefetch`` to where attention reads blocks: hot, or warm where warm is read in place."""
        self.placement.prefetch(seq, layer, block_ids, hot=not self.placement.in_place(seq))

    def prefetch_next(self, seq: Seq, layer: int) -> None:
        """Layer-ahead prefetch of the first non-resident blocks of ``layer``."""
        self.seqops.prefetch_next(seq, layer)

    def restore(self, seq: Seq, *, reserve: int | None = None) -> int:
        """Load a resumed sequence's blocks into hot now, as many as fit (``Loader.restore``)."""
        return self.loader.restore(seq, reserve=reserve)

    def wait_filled(self, timeout: float | None = None) -> None:
        """Wait for the background warm fills queued so far (``Loader.wait_filled``)."""
        self.loader.wait_filled(timeout)

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

    # -- durability (``WriteBack``) and sequence surgery (``SequenceOps``) ----------------------

    def flush(self, seq: Seq | None = None) -> None:
        """Wait until every sealed, keyed block (of ``seq``, or all) is durable."""
        self.writeback.flush(seq)

    def write_now(self, blocks: Sequence[Block]) -> None:
        """Encode and store keyed blocks synchronously (the partial tail at commit)."""
        self.writeback.write_now(blocks)

    def set_layer_tail_keys(self, seq: Seq, keys: Sequence[bytes]) -> None:
        self.seqops.set_layer_tail_keys(seq, keys)

    def truncate(self, seq: Seq, length: int) -> None:
        """Keep the first ``length`` tokens of every layer (crop)."""
        self.seqops.truncate(seq, length)

    def clone_sequence(self, src: Seq) -> Seq:
        """A copy of ``src`` (beam search); durable blocks share their cold record."""
        return self.seqops.clone(src)

    # -- metrics and lifecycle ----------------------------------------------------------------

    def usage(self) -> dict:
        """Bytes and blocks in use per tier, and token slots allocated but not filled."""
        with self.lock:
            out = self.budgets.usage()
            hot = [b for p in self.budgets.hot.values() for b in p.resident()]
            out["allocated_token_slots"] = sum(b.seq.layout.block_tokens for b in hot)
            out["unused_token_slots"] = sum(b.seq.layout.block_tokens - b.ntok for b in hot)
            return out

    def close(self) -> None:
        sh = self.shared
        with self.lock:
            if sh.closed:
                return
        for s in self.sequences():
            self.close_sequence(s, flush=True)
        with self.lock:
            sh.closed = True
        self.writeback.close()
        self.loader.close()
        with self.lock:  # free the pools now: a cache object may outlive its store (and reference cycles gc)
            self.budgets.clear()

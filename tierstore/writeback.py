"""Write-back of sealed blocks to cold: encode in worker threads, one writer thread with
batched LMDB transactions, flush and synchronous writes at commit. Part of ``TierManager``."""

from __future__ import annotations

import logging
import queue
from collections.abc import Sequence

import torch

from .blocks import Block, Seq, _summary_of
from .codec import encode_block
from .errors import TierstoreError
from .records import BlockSummary

log = logging.getLogger(__name__)

WRITE_BATCH = 64


class WriteBack:
    """Mixin of ``TierManager``: uses its lock, condition, counters, queue and executors."""

    # -- durability --------------------------------------------------------------------------

    def flush(self, seq: Seq | None = None) -> None:
        """Wait until every sealed, keyed block (of ``seq``, or all) is durable."""
        with self._cv:
            while True:
                self._raise_write_error()
                pending = [b for s in ([seq] if seq else list(self._seqs.values()))
                           for layer in s.layers for b in layer if b.queued]
                if not pending:
                    return
                self._cv.wait(0.05)

    def write_now(self, blocks: Sequence[Block]) -> None:
        """Encode and store keyed blocks synchronously (the partial tail at commit). A block's
        summary is brought up to its tokens here, under the lock; the encoding runs outside it."""
        items, summaries = [], []
        with self._lock:
            for b in blocks:
                if b.durable or b.key is None:
                    continue
                b.pins += 1
                items.append(b)
                summaries.append(self.index.to_write(b))
        try:
            enc = [(b.key, *self._encode(b, sm)) for b, sm in zip(items, summaries)]
            if enc:
                self.store.sessions.put_blocks(enc)
                self._count_written(items, enc)
            with self._cv:
                for b in items:
                    b.durable = True
        finally:
            with self._cv:
                for b in items:
                    b.pins -= 1
                self._cv.notify_all()

    def _maybe_write_back(self, b: Block) -> None:
        if b.sealed and b.key is not None and not b.durable and not b.queued:
            summary = self.index.to_write(b)  # made at seal; copied under the lock for the encoder
            b.queued = True
            b.pins += 1
            self._wq.put((b, self._encoders.submit(self._encode, b, summary)))

    def _encode(self, b: Block, summary: BlockSummary | None) -> tuple[bytes, bytes]:
        """The cold record of pinned block ``b`` and its sealed ``summary`` (an encoder thread,
        outside the lock: it assigns no shared state). A summary that does not cover the block's
        tokens (it was not resident when it was taken) is made from the keys read here, for the
        record only."""
        # the warm copy when there is one: complete whenever it exists, while the hot slot may be
        # mid-copy during a promotion (and reading host memory costs no device sync)
        pool, slot = (b.seq.warm, b.warm) if b.warm is not None else (b.seq.hot, b.hot)
        k, v = pool.block(slot)
        k, v = k[:, :b.ntok], v[:, :b.ntok]
        if k.device.type != "cpu":  # head by head: contiguous D2H copies, no device temporaries
            dk, dv = k, v
            k, v = torch.empty(dk.shape, dtype=dk.dtype), torch.empty(dv.shape, dtype=dv.dtype)
            for h in range(k.shape[0]):
                k[h].copy_(dk[h])
                v[h].copy_(dv[h])
        if summary is None or summary.tokens != b.ntok:
            fresh = _summary_of(k, self.calibrator.basis(b.seq.layout, b.layer))
            if summary is not None:
                fresh.mass += summary.mass
            summary = fresh
        rec = encode_block(b.key, k, v, b.seq.codec)
        return rec, summary.seal(b.key)

    def _write_loop(self) -> None:
        while True:
            first = self._wq.get()
            if first is None:
                return
            batch = [first]
            while len(batch) < WRITE_BATCH:
                try:
                    nxt = self._wq.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._wq.put(None)
                    break
                batch.append(nxt)
            try:
                items = [(b.key, *fut.result()) for b, fut in batch]
                self.store.sessions.put_blocks(items)
                ok = True
                self._count_written([b for b, _ in batch], items)
            except BaseException as e:  # surfaced by flush()/commit()
                log.error("write-back failed: %s", e)
                self._write_error, ok = e, False
                self._write_error_seqs = {b.seq.id for b, _ in batch}
            with self._cv:
                for b, _ in batch:
                    b.queued = False
                    b.pins -= 1
                    b.durable = ok
                self._cv.notify_all()

    def _count_written(self, blocks: Sequence[Block], items: Sequence[tuple]) -> None:
        c = self.counters
        c.cold_writes += len(items)
        c.cold_bytes_written += sum(len(r) for _, r, _ in items)
        c.raw_bytes_written += sum(2 * b.ntok * b.seq.layout.block_bytes // (2 * b.seq.layout.block_tokens)
                                   for b in blocks)

    def _raise_write_error(self) -> None:
        if self._write_error is not None:
            e, self._write_error = self._write_error, None
            if isinstance(e, TierstoreError):
                raise e
            raise TierstoreError(f"write-back failed: {e}") from e

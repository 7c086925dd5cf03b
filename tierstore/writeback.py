"""Write-back of sealed blocks to cold: encode in worker threads, one writer thread with
batched LMDB transactions, flush and synchronous writes at commit.

A store is prepare -> run -> complete: ``submit`` (lock held) marks a keyed sealed block
queued, pins it and takes a copy of its summary; an encoder thread encodes it without the lock
(zstd releases the GIL) and assigns no shared state; the writer thread writes batches in one
LMDB transaction each, then completes them under the lock (``durable`` on success, the error kept
for ``flush``/``commit`` on failure), unpins and notifies. ``flush`` waits on the condition for
a sequence's queued blocks.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

from .blocks import Block, Seq, _summary_of
from .codec import encode_block
from .errors import TierstoreError
from .records import BlockSummary
from .shared import Shared

log = logging.getLogger(__name__)

WRITE_BATCH = 64


class WriteBack:
    """Durability of blocks; one per manager (threads: 2 encoders, 1 writer)."""

    def __init__(self, shared: Shared, index, calibrator_basis) -> None:
        self.shared, self.index = shared, index
        self.basis = calibrator_basis  # (layout, layer) -> sketch basis, for summaries made here
        self.counters = shared.counters
        self.sessions = shared.store.sessions
        self.encoders = ThreadPoolExecutor(max_workers=2, thread_name_prefix="tierstore-encode")
        self._queue: queue.Queue = queue.Queue()
        self._error: BaseException | None = None
        self._error_seqs: set[int] = set()  # whose write-backs failed
        self._writer = threading.Thread(target=self._write_loop, name="tierstore-writer", daemon=True)
        self._writer.start()

    # -- durability --------------------------------------------------------------------------

    def submit(self, b: Block) -> None:
        """Queue ``b``'s write-back if it is sealed, keyed and not durable yet (lock held)."""
        if b.sealed and b.key is not None and not b.durable and not b.queued:
            summary = self.index.to_write(b)  # made at seal; copied under the lock for the encoder
            b.queued = True
            b.pins += 1
            self._queue.put((b, self.encoders.submit(self._encode, b, summary)))

    def flush(self, seq: Seq | None = None) -> None:
        """Wait until every sealed, keyed block (of ``seq``, or all) is durable."""
        sh = self.shared
        def durable() -> bool:
            return not any(b.queued for s in ([seq] if seq else list(sh.seqs.values()))
                           for layer in s.layers for b in layer)
        with sh.lock:
            self.raise_error()
            sh.wait_until(durable, self.raise_error)

    def write_now(self, blocks: Sequence[Block]) -> None:
        """Encode and store keyed blocks synchronously (the partial tail at commit). A block's
        summary is brought up to its tokens here, under the lock; the encoding runs outside it."""
        sh = self.shared
        items, summaries = [], []
        with sh.lock:
            for b in blocks:
                if b.durable or b.key is None:
                    continue
                b.pins += 1
                items.append(b)
                summaries.append(self.index.to_write(b))
        try:
            enc = [(b.key, *self._encode(b, sm)) for b, sm in zip(items, summaries)]
            if enc:
                self.sessions.put_blocks(enc)
                self._count_written(items, enc)
            with sh.lock:
                for b in items:
                    b.durable = True
        finally:
            with sh.lock:
                sh.unpin(items)

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
            fresh = _summary_of(k, self.basis(b.seq.layout, b.layer))
            if summary is not None:
                fresh.mass += summary.mass
            summary = fresh
        rec = encode_block(b.key, k, v, b.seq.codec)
        return rec, summary.seal(b.key)

    def _write_loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            while len(batch) < WRITE_BATCH:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._queue.put(None)
                    break
                batch.append(nxt)
            try:
                items = [(b.key, *fut.result()) for b, fut in batch]
                self.sessions.put_blocks(items)
                ok = True
                self._count_written([b for b, _ in batch], items)
            except BaseException as e:  # surfaced by flush()/commit()
                log.error("write-back failed: %s", e)
                ok = False
                with self.shared.lock:
                    self._error = e
                    self._error_seqs = {b.seq.id for b, _ in batch}
            with self.shared.lock:
                for b, _ in batch:
                    b.queued = False
                    b.durable = ok
                self.shared.unpin([b for b, _ in batch])

    def _count_written(self, blocks: Sequence[Block], items: Sequence[tuple]) -> None:
        c = self.counters
        c.cold_writes += len(items)
        c.cold_bytes_written += sum(len(r) for _, r, _ in items)
        c.raw_bytes_written += sum(2 * b.ntok * b.seq.layout.block_bytes // (2 * b.seq.layout.block_tokens)
                                   for b in blocks)

    def raise_error(self) -> None:
        """Raise (once) the error of a failed write-back, if any."""
        if self._error is not None:
            e, self._error = self._error, None
            if isinstance(e, TierstoreError):
                raise e
            raise TierstoreError(f"write-back failed: {e}") from e

    def forget(self, seq: Seq) -> None:
        """A closed sequence: a write error that only its blocks had is moot (lock held)."""
        if self._error is not None and self._error_seqs <= {seq.id}:
            self._error = None

    def close(self) -> None:
        """End the writer (after what is queued) and the encoders."""
        self._queue.put(None)
        self._writer.join()
        self.encoders.shutdown(wait=True)

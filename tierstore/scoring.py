"""What policies score: block summaries stacked per layer, the attention mass fed back into
them, and the key sketches (``tierstore.sketch``): their basis per layout and layer, fitted
from the first sealed blocks, and each block's sketch. A mixin of ``TierManager`` (uses its
lock, sequences and store)."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import lmdb
import torch

from .blocks import _Stack, Block, Seq, _summary_of
from .records import BlockSummary
from .errors import CorruptRecordError, TierstoreError
from .layout import KVLayout
from .policies import Summaries
from .sketch import CALIB_TOKENS, Basis, Calibration, basis_key

log = logging.getLogger(__name__)


class Scoring:
    """Summaries, attention mass and key sketches of the manager's sequences."""

    def _init_scoring(self, sketch_dims: int) -> None:
        self.sketch_dims = sketch_dims
        self._bases: dict[tuple[KVLayout, int], Basis | None] = {}
        self._calib: dict[tuple[KVLayout, int], Calibration] = {}

    # -- summaries ---------------------------------------------------------------------------

    def summaries(self, seq: Seq, layer: int) -> Summaries:
        """Stacked summaries of the layer's blocks, partial tail included (for policies).

        Kept stacked per layer and updated in place: a step restacks only the rows that can have
        changed (the growing tail, new blocks, blocks whose summary was not known yet), so
        scoring costs O(changed rows), not O(blocks); ``note_attention`` adds to the stacked mass.
        A stack is rebuilt when the layer's sketch basis appears; a resident block whose sketch
        is missing or of another basis is sketched then (``_resummarize``)."""
        with self._lock:
            blocks = seq.layers[layer]
            basis = self._basis(seq.layout, layer)
            st = seq.summ.get(layer)
            same_blocks = st is not None and st.first is (blocks[0] if blocks else None) and st.n <= len(blocks)
            if same_blocks and st.basis is not basis:
                self._sync_stack(blocks, st)  # its mass goes back to the summaries before restacking
            if not same_blocks or st.basis is not basis:
                st = seq.summ[layer] = _Stack(seq.layout, blocks[0] if blocks else None, basis)
            st.grow(len(blocks))
            for i in sorted(set(range(st.final, len(blocks))) | st.missing):
                b = blocks[i]
                sm = b.summary
                if sm is None or sm.tokens != b.ntok or (basis is not None and b.sealed and sm.tag != basis.tag):
                    sm = self._resummarize(b, basis) or sm
                st.put(i, sm, b.ntok)
                if b.sealed and sm is not None:
                    st.missing.discard(i)
                elif b.sealed and i >= st.final:
                    st.missing.add(i)
            st.n = len(blocks)
            st.final = st.n - (1 if blocks and not blocks[-1].sealed else 0)
            n = st.n
            recency = torch.tensor([b.last_used for b in blocks], dtype=torch.int64) \
                if seq.policy.uses_last_used else None  # O(blocks): only for a policy that reads it
            return Summaries(kmin=st.kmin[:n], kmax=st.kmax[:n], kmean=st.kmean[:n], mass=st.mass[:n],
                             tokens=st.tokens[:n], step=self.step, last_used=recency,
                             sketch=None if basis is None else st.sketch[:, :n],
                             basis=None if basis is None else basis.vectors)

    def note_attention(self, seq: Seq, layer: int, block_ids: Sequence[int], mass: torch.Tensor, *,
                       replace: bool = False) -> None:
        """Feed attention mass back: ``mass`` float [len(block_ids), kv_heads] is added to the
        blocks' accumulated mass (``replace``: becomes it, e.g. a prefill observation window).

        Sealed blocks stacked in the layer's summaries take it there only (one ``index_add_``;
        ``sync_mass`` writes it back into their summaries before anything reads those); the
        others (the growing tail, blocks not stacked yet) take it in their own summary."""
        mass = mass.detach().float().cpu()
        with self._lock:
            blocks = seq.layers[layer]
            st = seq.summ.get(layer)
            stacked = (lambda i: i < st.final and i not in st.missing) if st is not None else (lambda i: False)
            for i, m in zip(block_ids, mass):
                if stacked(i):
                    continue
                b = blocks[i]
                if b.summary is None:  # the tail too
                    self._resummarize(b, self._basis(seq.layout, layer))
                if b.summary is not None:
                    if replace:
                        b.summary.mass.copy_(m)
                    else:
                        b.summary.mass += m
            if st is not None and block_ids:
                rows = torch.as_tensor(list(block_ids), dtype=torch.long)
                keep = rows < st.n
                rows, m = rows[keep], mass[keep]
                if replace:
                    st.mass[rows] = m
                else:
                    st.mass.index_add_(0, rows, m)

    def sync_mass(self, seq: Seq) -> None:
        """Write the stacked mass of sealed blocks back into their summaries (before a commit
        persists them, a crop drops the stacks, or a clone copies them)."""
        with self._lock:
            for layer, st in seq.summ.items():
                self._sync_stack(seq.layers[layer], st)

    @staticmethod
    def _sync_stack(blocks: list[Block], st: _Stack) -> None:
        for i in range(min(st.final, len(blocks))):
            sm = blocks[i].summary
            if sm is not None and i not in st.missing:
                sm.mass.copy_(st.mass[i])

    # -- key sketches --------------------------------------------------------------------------

    def _basis(self, layout: KVLayout, layer: int) -> Basis | None:
        """The layer's sketch basis: cached, else read from the meta table (None: not fitted)."""
        key = (layout, layer)
        if key not in self._bases:
            self._bases[key] = self._load_basis(layout, layer) if self.sketch_dims > 0 else None
        return self._bases[key]

    def _load_basis(self, layout: KVLayout, layer: int) -> Basis | None:
        mkey = basis_key(layout, layer)
        raw = self.store.cold.get("meta", mkey)
        if raw is None:
            return None
        try:
            return Basis.unseal(mkey, bytes(raw))
        except CorruptRecordError as e:  # ranking only: blocks are then ranked without sketches
            log.warning("%s; layer %d is ranked without key sketches (`tierstore verify` reports it)", e, layer)
            return None

    def _calibrate(self, seq: Seq, layer: int, b: Block, k: torch.Tensor) -> None:
        """A block of a layer without a basis sealed (keys ``k``; lock held): gather it, and once
        the layer has ``CALIB_TOKENS``, fit the basis, sketch the blocks gathered meanwhile and
        store the basis in the background (not under the manager lock: the writer thread holds
        the LMDB write lock while it takes the manager lock)."""
        key = (seq.layout, layer)
        cal = self._calib.setdefault(key, Calibration())
        cal.add(k, b)
        if cal.tokens < CALIB_TOKENS:
            return
        del self._calib[key]
        fitted = self._bases[key] = Basis.fit(cal.cov, min(self.sketch_dims, seq.layout.head_dim))
        if fitted is None:
            log.warning("sketch basis of layer %d could not be fitted; the layer is ranked without sketches", layer)
            return
        for pb in cal.pending:
            if not pb.seq.closed and pb.sealed and pb.summary is not None and pb.summary.tag != fitted.tag:
                self._resummarize(pb, fitted)
        self._encoders.submit(self._store_basis, seq.layout, layer, fitted)

    def _forget_pending(self, seq: Seq) -> None:
        """A closed sequence's blocks leave the calibrations (they would keep its pools alive)."""
        for cal in self._calib.values():
            cal.pending = [b for b in cal.pending if b.seq is not seq]

    def _store_basis(self, layout: KVLayout, layer: int, fitted: Basis) -> None:
        """Store a fitted basis unless another process stored one first: then that one is used
        (sketches of this one no longer match its tag and are made again where resident)."""
        mkey = basis_key(layout, layer)
        try:
            self.store.cold.put_many("meta", [(mkey, fitted.seal(mkey))], overwrite=False)
            stored = self._load_basis(layout, layer)
        except (TierstoreError, lmdb.Error) as e:  # e.g. the cold quota: sketches stay in this process
            log.warning("sketch basis of layer %d not stored (%s); it is kept in memory only", layer, e)
            return
        if stored is not None and stored.tag != fitted.tag:
            with self._lock:
                self._bases[(layout, layer)] = stored

    def _resummarize(self, b: Block, basis: Basis | None) -> BlockSummary | None:
        """Recompute ``b``'s summary (sketched in ``basis``) from its keys where it is resident,
        keeping the mass it received; None (summary unchanged) when it is only in cold or loading.
        A block written (or being written) is marked to have its summary rewritten at the next
        commit."""
        if b.loading is not None or not b.ntok:
            return None
        if b.warm is not None:  # complete whenever it exists (a hot slot may be mid-promotion)
            k = b.seq.warm.block(b.warm)[0]
        elif b.hot is not None:
            k = b.seq.hot.block(b.hot)[0]
        else:
            return None
        fresh = _summary_of(k[:, :b.ntok], basis)
        if b.summary is not None:
            fresh.mass += b.summary.mass  # a growing tail, or a block sketched late, keeps its mass
        b.summary = fresh
        b.restated = b.restated or b.durable or b.queued
        return fresh

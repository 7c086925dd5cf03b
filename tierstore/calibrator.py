"""The key-sketch bases of one store (``tierstore.sketch``): per KV layout and layer, read from
the meta table, or fitted from the first ``CALIB_TOKENS`` tokens sealed in the layer and then
stored there in the background.

One ``Calibrator`` per store (its tier manager holds it). It owns the bases and the calibrations
in progress under its own lock, a leaf: it is called with the manager lock held (``basis``,
``observe``, ``forget``), never takes that lock, and calls out (``resketch``, ``submit``) only
after releasing its own. What it needs is handed to it: the cold store, the number of sketch
dimensions, a ``submit(fn, *args)`` that runs the background store (an executor's ``submit``)
and ``resketch(blocks, basis)``, which sketches the blocks gathered for a fit in the new basis
(``SummaryIndex.resketch``). Blocks are opaque to it, except for ``block.seq`` (``forget``).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import lmdb
import torch

from .errors import CorruptRecordError, TierstoreError
from .layout import KVLayout
from .sketch import CALIB_TOKENS, Basis, Calibration, basis_key

log = logging.getLogger(__name__)


class Calibrator:
    """Sketch bases per (layout, layer) and the calibrations that will fit the missing ones."""

    def __init__(self, cold, sketch_dims: int, *, submit: Callable, resketch: Callable) -> None:
        self._cold = cold
        self.dims = sketch_dims
        self._submit = submit
        self._resketch = resketch
        self._lock = threading.Lock()
        self._bases: dict[tuple[KVLayout, int], Basis | None] = {}
        self._calib: dict[tuple[KVLayout, int], Calibration] = {}

    def basis(self, layout: KVLayout, layer: int) -> Basis | None:
        """The layer's sketch basis: cached, else read from the meta table (None: not fitted,
        damaged, or sketches are off)."""
        key = (layout, layer)
        with self._lock:
            if key not in self._bases:
                self._bases[key] = self._load(layout, layer) if self.dims > 0 else None
            return self._bases[key]

    def observe(self, layout: KVLayout, layer: int, block, k: torch.Tensor) -> None:
        """``block`` (keys ``k`` [kv_heads, block_tokens, head_dim]) sealed in a layer: while the
        layer has no basis, gather it; once the layer has ``CALIB_TOKENS``, fit the basis, sketch
        the blocks gathered meanwhile (``resketch``) and store the basis in the background (not
        under the manager lock, which the caller holds: the writer thread holds the LMDB write
        lock while it takes the manager lock). Nothing with sketches off, on a read-only store,
        or once the layer has a basis."""
        if self.dims <= 0 or self._cold.readonly or self.basis(layout, layer) is not None:
            return
        key = (layout, layer)
        with self._lock:
            if self._bases.get(key) is not None:
                return
            cal = self._calib.setdefault(key, Calibration())
            cal.add(k, block)
            if cal.tokens < CALIB_TOKENS:
                return
            del self._calib[key]
            fitted = self._bases[key] = Basis.fit(cal.cov, min(self.dims, layout.head_dim))
        if fitted is None:
            log.warning("sketch basis of layer %d could not be fitted; the layer is ranked without sketches", layer)
            return
        self._resketch(cal.pending, fitted)
        self._submit(self._store, layout, layer, fitted)

    def calibrate(self, layout: KVLayout, layer: int, k: torch.Tensor) -> Basis | None:
        """The layer's basis, fitted now from the keys ``k`` [kv_heads, tokens, head_dim] of a
        whole session (its first ``CALIB_TOKENS`` tokens, block by block, as sealing would
        gather them) when it has none yet, and stored; for whole-session writes (``put_session``,
        imports), which seal no blocks through the manager. Call it without the manager lock."""
        basis = self.basis(layout, layer)
        if basis is not None or self.dims <= 0 or self._cold.readonly:
            return basis
        bt = layout.block_tokens
        full = min(k.shape[1], -(-CALIB_TOKENS // bt) * bt) // bt
        if full * bt < CALIB_TOKENS:
            return None  # too short to fit from: sealing will gather the layer's first tokens
        cal = Calibration()
        for i in range(full):
            cal.add(k[:, i * bt:(i + 1) * bt], None)
        fitted = Basis.fit(cal.cov, min(self.dims, layout.head_dim)) if cal.tokens >= CALIB_TOKENS else None
        if fitted is None:
            return None
        with self._lock:
            if self._bases.get((layout, layer)) is not None:  # fitted meanwhile by a sealing session
                return self._bases[(layout, layer)]
            self._bases[(layout, layer)] = fitted
        self._store(layout, layer, fitted)
        return self.basis(layout, layer)

    def pending(self, layout: KVLayout, layer: int) -> int:
        """Tokens gathered so far for the layer's fit (0: none, or fitted)."""
        with self._lock:
            cal = self._calib.get((layout, layer))
            return cal.tokens if cal is not None else 0

    def forget(self, seq) -> None:
        """A closed sequence's blocks leave the calibrations (they would keep its pools alive);
        the statistics they added stay."""
        with self._lock:
            for cal in self._calib.values():
                cal.pending = [b for b in cal.pending if b.seq is not seq]

    def _load(self, layout: KVLayout, layer: int) -> Basis | None:
        mkey = basis_key(layout, layer)
        raw = self._cold.get("meta", mkey)
        if raw is None:
            return None
        try:
            return Basis.unseal(mkey, bytes(raw))
        except CorruptRecordError as e:  # ranking only: blocks are then ranked without sketches
            log.warning("%s; layer %d is ranked without key sketches (`tierstore verify` reports it)", e, layer)
            return None

    def _store(self, layout: KVLayout, layer: int, fitted: Basis) -> None:
        """Store a fitted basis unless another process stored one first: then that one is used
        (sketches of this one no longer match its tag and are made again where resident)."""
        mkey = basis_key(layout, layer)
        try:
            self._cold.put_many("meta", [(mkey, fitted.seal(mkey))], overwrite=False)
            stored = self._load(layout, layer)
        except (TierstoreError, lmdb.Error) as e:  # e.g. the cold quota: sketches stay in this process
            log.warning("sketch basis of layer %d not stored (%s); it is kept in memory only", layer, e)
            return
        if stored is not None and stored.tag != fitted.tag:
            with self._lock:
                self._bases[(layout, layer)] = stored

"""What policies score: block summaries stacked per (sequence, layer), and the attention mass fed
back into them. One ``SummaryIndex`` per tier manager owns the stacks; each block's own summary
(``Block.summary``) stays on the block, which the index reads and recomputes.

Locks, in the order they are taken (never the other way round):

1. the manager lock (``TierManager.lock``, ``Shared.lock``: an ``RLock`` passed in): guards block state
   (``Block.summary``, ``ntok``, ``hot``/``warm``, ``loading``, ``durable``, ``restated``) and the
   index's stacks. Every public method of the index takes it (it is reentrant: the manager calls
   in with it held).
2. the calibrator's own lock (``tierstore.calibrator``): a leaf. ``basis(layout, layer)`` is
   called with the manager lock held; the calibrator never takes the manager lock and calls its
   ``resketch`` callback (``SummaryIndex.resketch``) only after releasing its own.

The LMDB write lock is never waited for under either (the writer thread holds it while it takes
the manager lock): the calibrator stores a basis from a background task.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Iterable, Sequence

import torch

from .blocks import Block, Seq, _summary_of
from .layout import KVLayout
from .policies import Summaries
from .policies.base import GROUP_BLOCKS
from .records import BlockSummary
from .sketch import Basis

BasisOf = Callable[[KVLayout, int], "Basis | None"]


class _Stack:
    """One layer's block summaries stacked for scoring, grown in place.

    Rows ``[0, final)`` are sealed blocks whose summary is stacked (their mass is updated by
    ``note_attention``); rows from ``final`` on (the partial tail, new blocks) and the rows in
    ``missing`` (sealed blocks whose summary was unknown) are restacked at the next read.
    ``first`` is the layer's first block: another first block means the layer was rebuilt.
    ``basis``: the sketch basis the rows were stacked with (another one means restacking);
    ``sketch`` exists with it (zero rows: not sketched), in float32 although blocks keep theirs in
    float16: scoring reads it every step, and converting it each time cost more than the scoring
    (twice the host memory of the stack instead). It is stored ``[kv_heads, r, capacity,
    block_tokens]`` and handed out as the ``[kv_heads, n, block_tokens, r]`` view ``sketches(n)``:
    the scoring's product of the query with every token's sketch then reads rows of the sketch
    dimension contiguously (measured 1.6x faster than the transposed read at 32k tokens)."""

    __slots__ = ("kmin", "kmax", "kmean", "mass", "tokens", "n", "final", "missing", "first", "basis", "sketch",
                 "gmin", "gmax", "gdirty")

    def __init__(self, layout: KVLayout, first: Block | None, basis: Basis | None = None) -> None:
        self.kmin = torch.zeros(0, layout.kv_heads, layout.head_dim)
        self.kmax, self.kmean = torch.zeros_like(self.kmin), torch.zeros_like(self.kmin)
        self.mass = torch.zeros(0, layout.kv_heads)
        self.tokens = torch.zeros(0, dtype=torch.int64)
        self.n = self.final = 0
        self.missing: set[int] = set()
        self.first = first
        self.basis = basis
        self.sketch = None if basis is None else \
            torch.zeros(layout.kv_heads, basis.dims, 0, layout.block_tokens, dtype=torch.float32)
        self.gmin, self.gmax = torch.zeros_like(self.kmin), torch.zeros_like(self.kmin)  # group boxes
        self.gdirty: set[int] = set()  # groups whose rows changed since their box was computed

    def grow(self, n: int) -> None:
        """Room for ``n`` rows (capacity doubles; new rows are zero). A stack first built for a
        long layer (a resumed session) gets an eighth more rows than it holds: growing copies
        every row (about 25 ms per layer at 32k tokens), which the next block would otherwise
        pay at once in every layer."""
        cap = self.tokens.shape[0]
        if n <= cap:
            return
        cap = max(n + n // 8, 2 * cap, 64)
        for name in ("kmin", "kmax", "kmean", "mass", "tokens"):
            old = getattr(self, name)
            new = old.new_zeros((cap, *old.shape[1:]))
            new[:old.shape[0]] = old
            setattr(self, name, new)
        if self.sketch is not None:
            g, r, old, bt = self.sketch.shape
            new = self.sketch.new_zeros((g, r, cap, bt))
            new[:, :, :old] = self.sketch
            self.sketch = new
        groups = -(-cap // GROUP_BLOCKS)
        for name in ("gmin", "gmax"):
            old = getattr(self, name)
            new = old.new_zeros((groups, *old.shape[1:]))
            new[:old.shape[0]] = old
            setattr(self, name, new)

    def boxes(self) -> None:
        """Recompute the key box of every group whose rows changed (``put``)."""
        for gi in self.gdirty:
            a, b = gi * GROUP_BLOCKS, min(self.n, (gi + 1) * GROUP_BLOCKS)
            if a < b:
                self.gmin[gi] = self.kmin[a:b].amin(0)
                self.gmax[gi] = self.kmax[a:b].amax(0)
        self.gdirty.clear()

    def put(self, i: int, sm: BlockSummary | None, ntok: int) -> None:
        if sm is None:
            self.kmin[i] = self.kmax[i] = self.kmean[i] = 0.0
            self.mass[i] = 0.0
        else:
            self.kmin[i], self.kmax[i], self.kmean[i], self.mass[i] = sm.kmin, sm.kmax, sm.kmean, sm.mass
        self.tokens[i] = ntok
        self.gdirty.add(i // GROUP_BLOCKS)
        if self.sketch is not None:
            row = self.sketch[:, :, i]                          # [kv_heads, r, block_tokens]
            row.zero_()
            if sm is not None and sm.sketch is not None and sm.tag == self.basis.tag:
                row[:, :, :sm.sketch.shape[1]] = sm.sketch.transpose(1, 2)

    def sketches(self, n: int) -> torch.Tensor | None:
        """The first ``n`` rows' sketches as ``[kv_heads, n, block_tokens, r]`` (a view)."""
        return None if self.sketch is None else self.sketch[:, :, :n].permute(0, 2, 3, 1)

    def copy(self, first: Block | None) -> "_Stack":
        """A copy of the rows (own tensors) for a layer whose first block is ``first``."""
        out = _Stack.__new__(_Stack)
        for name in ("kmin", "kmax", "kmean", "mass", "tokens", "gmin", "gmax"):
            setattr(out, name, getattr(self, name).clone())
        out.gdirty = set(self.gdirty)
        out.sketch = None if self.sketch is None else self.sketch.clone()
        out.n, out.final, out.missing, out.basis, out.first = self.n, self.final, set(self.missing), self.basis, first
        return out

    def sync(self, blocks: list[Block]) -> None:
        """Write the stacked mass of sealed rows back into the blocks' summaries."""
        for i in range(min(self.final, len(blocks))):
            sm = blocks[i].summary
            if sm is not None and i not in self.missing:
                sm.mass.copy_(self.mass[i])


class SummaryIndex:
    """The stacked summaries of every (sequence, layer) of one tier manager.

    ``lock``: the manager lock (guards block state and the stacks; see the module docstring).
    ``basis_of``: where a layer's sketch basis is looked up, ``(layout, layer) -> Basis | None``
    (the store's ``Calibrator.basis``, wired after both exist; default: no sketches)."""

    def __init__(self, lock: threading.RLock, basis_of: BasisOf | None = None) -> None:
        self._lock = lock
        self.basis_of: BasisOf = basis_of or (lambda layout, layer: None)
        self._stacks: dict[int, dict[int, _Stack]] = {}  # seq id -> layer -> stack

    def summaries(self, seq: Seq, layer: int, *, step: int = 0) -> Summaries:
        """Stacked summaries of the layer's blocks, partial tail included (for policies).

        Kept stacked per layer and updated in place: a step restacks only the rows that can have
        changed (the growing tail, new blocks, blocks whose summary was not known yet), so
        scoring costs O(changed rows), not O(blocks); ``note_attention`` adds to the stacked mass.
        A stack is rebuilt when the layer's sketch basis appears; a resident block whose sketch
        is missing or of another basis is sketched then (``resummarize``). ``step``: the
        manager's step, handed to the policy."""
        with self._lock:
            blocks = seq.layers[layer]
            basis = self.basis_of(seq.layout, layer)
            # a closed sequence's stacks are not kept (they would outlive it)
            stacks = {} if seq.closed else self._stacks.setdefault(seq.id, {})
            st = stacks.get(layer)
            same_blocks = st is not None and st.first is (blocks[0] if blocks else None) and st.n <= len(blocks)
            if same_blocks and st.basis is not basis:
                st.sync(blocks)  # its mass goes back to the summaries before restacking
            if not same_blocks or st.basis is not basis:
                st = stacks[layer] = _Stack(seq.layout, blocks[0] if blocks else None, basis)
            st.grow(len(blocks))
            for i in sorted(set(range(st.final, len(blocks))) | st.missing):
                b = blocks[i]
                sm = b.summary
                if sm is None or sm.tokens != b.ntok or (basis is not None and b.sealed and sm.tag != basis.tag):
                    sm = self.resummarize(b, basis) or sm
                st.put(i, sm, b.ntok)
                if b.sealed and sm is not None:
                    st.missing.discard(i)
                elif b.sealed and i >= st.final:
                    st.missing.add(i)
            st.n = len(blocks)
            st.final = st.n - (1 if blocks and not blocks[-1].sealed else 0)
            n = st.n
            st.boxes()
            groups = -(-n // GROUP_BLOCKS)
            recency = torch.tensor([b.last_used for b in blocks], dtype=torch.int64) \
                if seq.policy.uses_last_used else None  # O(blocks): only for a policy that reads it
            return Summaries(kmin=st.kmin[:n], kmax=st.kmax[:n], kmean=st.kmean[:n], mass=st.mass[:n],
                             tokens=st.tokens[:n], step=step, last_used=recency,
                             sketch=None if basis is None else st.sketches(n),
                             basis=None if basis is None else basis.vectors,
                             gmin=st.gmin[:groups], gmax=st.gmax[:groups])

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
            st = self._stacks.get(seq.id, {}).get(layer)
            stacked = (lambda i: i < st.final and i not in st.missing) if st is not None else (lambda i: False)
            for i, m in zip(block_ids, mass):
                if stacked(i):
                    continue
                b = blocks[i]
                if b.summary is None:  # the tail too
                    self.resummarize(b, self.basis_of(seq.layout, layer))
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
            for layer, st in self._stacks.get(seq.id, {}).items():
                st.sync(seq.layers[layer])

    def mass_summaries(self, seq: Seq) -> list[tuple[bytes, bytes]]:
        """Sealed summaries of the durable blocks that received attention mass or a sketch after
        they were written, to be rewritten at commit (the copy written at seal time has the
        mass of that moment): ``(key, sealed summary)`` pairs."""
        with self._lock:
            self.sync_mass(seq)
            out = [b for layer in seq.layers for b in layer
                   if b.durable and b.key is not None and b.summary is not None
                   and b.summary.tokens == b.ntok and (b.restated or bool(b.summary.mass.any()))]
            for b in out:
                b.restated = False  # rewritten once (mass changes keep a block in the list anyway)
            return [(b.key, b.summary.seal(b.key)) for b in out]

    def stacked_layers(self, seq: Seq) -> list[int]:
        """The layers of ``seq`` that have a stack (scored since they were last dropped)."""
        with self._lock:
            return sorted(self._stacks.get(seq.id, {}))

    def drop(self, seq: Seq, *, sync: bool = True) -> None:
        """Forget ``seq``'s stacks (a crop: they describe the old blocks; a close). With ``sync``
        their mass goes back to the blocks' summaries first."""
        with self._lock:
            if sync:
                self.sync_mass(seq)
            self._stacks.pop(seq.id, None)

    def clone(self, src: Seq, dst: Seq) -> None:
        """``dst`` (a copy of ``src``'s blocks: beam search) gets copies of ``src``'s stacks, and
        ``src``'s stacked mass is written back into its summaries."""
        with self._lock:
            self.sync_mass(src)
            copies = {layer: st.copy(dst.layers[layer][0] if dst.layers[layer] else None)
                      for layer, st in self._stacks.get(src.id, {}).items()}
            if copies and not dst.closed:
                self._stacks[dst.id] = copies

    def to_write(self, b: Block) -> BlockSummary | None:
        """A copy of ``b``'s summary for a writer that works outside the lock (its mass is its
        own: ``note_attention`` may add to the block's meanwhile). Recomputed on the block first,
        from its resident keys, when it is missing or does not cover its tokens (a partial block
        at commit); None when it cannot be (the block is only in cold, or loading)."""
        with self._lock:
            if b.summary is None or b.summary.tokens != b.ntok:
                self.resummarize(b, self.basis_of(b.seq.layout, b.layer))
            sm = b.summary
            if sm is None or sm.tokens != b.ntok:
                return None
            return dataclasses.replace(sm, mass=sm.mass.clone())

    def resketch(self, blocks: Iterable[Block], basis: Basis) -> None:
        """A layer's basis was fitted: sketch in it the blocks gathered for the fit that are
        still open, sealed and sketched in no other (the calibrator's callback)."""
        with self._lock:
            for b in blocks:
                if not b.seq.closed and b.sealed and b.summary is not None and b.summary.tag != basis.tag:
                    self.resummarize(b, basis)

    def resummarize(self, b: Block, basis: Basis | None) -> BlockSummary | None:
        """Recompute ``b``'s summary (sketched in ``basis``) from its keys where it is resident,
        keeping the mass it received; None (summary unchanged) when it is only in cold or loading.
        A block written (or being written) is marked to have its summary rewritten at the next
        commit."""
        with self._lock:
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

"""What attention sees of a sequence: a reader of one sequence's blocks, as tensors.

Exact and sparse attention (``tierstore.attention``, ``tierstore.sparse``) never touch the
manager, pools or ``Block`` objects; they ask a ``SeqReader`` for

* ``span(layer, start, stop)``: K and V of the blocks ``[start, stop)`` as contiguous-in-
  positions tensors ``[kv_heads, tokens, head_dim]`` (a zero-copy view of a run of slots when
  the blocks sit in one run of one pool, else gathered into a temporary in block order, in
  groups that fit the hot pool when blocks have to be recalled);
* ``select(layer, ids)``: the blocks ``ids`` gathered in block order (sparse attention), with
  their token positions; ``select_heads`` for per-head selections;
* ``chunks(layer, start, stop, every)``: the same keys as ``span`` cut into chunks of
  ``every`` blocks, each a view where its blocks sit in one run (one acquire for them all);
  on a CPU pool a complete chunk read as a copy is then compacted into one run;
* ``prefetch(layer, ids)``: start moving blocks to where they are read.

Whatever the residency, the tensors handed out hold the same values in the same order, so the
arithmetic of attention does not depend on tier placement. Contract: tensors yielded inside a
``with`` block are valid only inside it (views of pinned slots).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch

from .blocks import Block, Seq

CAT_RUNS = 64  # up to this many runs in a span are concatenated (one copy); more are gathered by slot index


class SeqReader:
    """Reads one sequence's blocks for attention (see the module docstring)."""

    __slots__ = ("mgr", "seq", "layout", "block_tokens", "kv_heads", "in_place")

    def __init__(self, mgr, seq: Seq) -> None:
        self.mgr, self.seq, self.layout = mgr, seq, seq.layout
        self.block_tokens, self.kv_heads = seq.layout.block_tokens, seq.layout.kv_heads
        self.in_place = mgr.in_place(seq)  # CPU: warm blocks are read where they are

    # -- shape of the layer ---------------------------------------------------------------------

    def n_blocks(self, layer: int) -> int:
        return len(self.seq.layers[layer])

    def length(self, layer: int) -> int:
        """Tokens stored in ``layer`` (only the last block may be partial)."""
        blocks = self.seq.layers[layer]
        return (len(blocks) - 1) * self.block_tokens + blocks[-1].ntok if blocks else 0

    def ntok(self, layer: int, ids: Sequence[int]) -> list[int]:
        blocks = self.seq.layers[layer]
        return [blocks[i].ntok for i in ids]

    # -- reads ------------------------------------------------------------------------------------

    def prefetch(self, layer: int, ids: Sequence[int]) -> None:
        """Start moving the blocks ``ids`` that are not readable where they are; returns at once."""
        blocks = self.seq.layers[layer]
        todo = [i for i in ids if not self.mgr.readable(blocks[i], self.in_place)]
        if todo:
            self.mgr.prefetch(self.seq, layer, todo[:self.seq.stream_group], hot=not self.in_place)

    @contextlib.contextmanager
    def span(self, layer: int, start: int, stop: int, *, streamed: bool = True
             ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """K, V ``[kv_heads, tokens, head_dim]`` of blocks ``[start, stop)`` in position order, the
        tokens from ``start * block_tokens`` on. ``streamed``: blocks recalled for this read leave
        hot first afterwards."""
        mgr, seq = self.mgr, self.seq
        blocks = seq.layers[layer][start:stop]
        if self._readable(blocks):
            with mgr.acquire(seq, layer, range(start, stop), in_place=self.in_place) as got:
                yield self._read(got)[0]
            return
        # some blocks must be recalled: gather in groups the hot pool can hold at once
        kv = None
        group = seq.stream_group
        for g0 in range(start, stop, group):
            ids = range(g0, min(stop, g0 + group))
            if g0 + group < stop:
                self.prefetch(layer, range(g0 + group, min(stop, g0 + 2 * group)))
            with mgr.acquire(seq, layer, ids, transient=streamed, in_place=self.in_place) as got:
                part = self._gather(got)
            if kv is None:
                kv = part.new_empty((2, self.kv_heads, stop - start, self.block_tokens, self.layout.head_dim))
            kv[:, :, g0 - start:g0 - start + len(ids)] = part
        yield _split(kv, _tokens(blocks))

    @contextlib.contextmanager
    def chunks(self, layer: int, start: int, stop: int, every: int
               ) -> Iterator[list[tuple[torch.Tensor, torch.Tensor]]]:
        """K, V of blocks ``[start, stop)`` as chunks of ``every`` blocks (the last may be
        shorter), each ``[kv_heads, tokens, head_dim]`` in position order. The cut depends on
        the arguments only, never on residency: a chunk is a view of a run of slots, or a copy
        holding the same values. Where warm is read in place, a chunk of sealed blocks that had
        to be copied is moved into one run afterwards (``Placement.compact``), so the next step reads it as a
        view (a decode step reads every chunk of every layer)."""
        seq = self.seq
        cuts = range(0, stop - start, every)
        if not self._readable(seq.layers[layer][start:stop]):
            with self.span(layer, start, stop) as (k, v):  # recalls: streamed, then cut
                bt = self.block_tokens
                yield [(k[:, c * bt:(c + every) * bt], v[:, c * bt:(c + every) * bt]) for c in cuts]
            return
        scattered = []
        with self.mgr.acquire(seq, layer, range(start, stop), in_place=self.in_place) as got:
            out = []
            for c in cuts:
                part = got[c:c + every]
                kv, one_run = self._read(part)
                out.append(kv)
                if not one_run and self.in_place and part[-1].sealed:
                    scattered.append(range(start + c, start + c + len(part)))
            yield out
        for ids in scattered:
            self.mgr.compact(seq, layer, ids)

    @contextlib.contextmanager
    def acquire(self, layer: int, ids: Sequence[int]) -> Iterator[list[Block]]:
        """Pin the blocks ``ids`` where they can be read (for ``select``/``select_heads``)."""
        with self.mgr.acquire(self.seq, layer, ids, in_place=True) as got:
            yield got

    def select(self, got: Sequence[Block], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """K, V ``[kv_heads, len(got) * block_tokens, head_dim]`` of acquired blocks in the order
        given (block order), their positions ``[T]`` and the valid-token mask ``[T]`` (None when
        every block is full: a partial block's slot tail is masked, never read)."""
        bt = self.block_tokens
        kv = self._gather(got, device)
        pos, valid = _positions(got, bt, device, (-1,))
        g, d = self.kv_heads, self.layout.head_dim
        return kv[0].reshape(g, -1, d), kv[1].reshape(g, -1, d), pos, valid

    def select_heads(self, got: Sequence[Block], head_mask: torch.Tensor, device
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Per-head selections read per head: K, V ``[kv_heads, m * block_tokens, head_dim]`` where
        row h holds the blocks of ``got`` that head h selects (``head_mask`` bool [kv_heads,
        len(got)]), in block order, padded to the largest count ``m`` with masked slots; their
        positions ``[kv_heads, m * block_tokens]`` and the valid-token mask (None when every
        slot holds a selected token). One indexed read of (head, slot) pairs per tier: a head
        never reads the blocks only the others chose."""
        lay, seq = self.layout, self.seq
        bt, g = lay.block_tokens, lay.kv_heads
        hm = head_mask.cpu()
        counts = hm.sum(1)
        m = int(counts.max())
        if bool((counts == m).all()):  # the usual case (every head takes the budget): no padding
            order = hm.nonzero()[:, 1].view(g, m)                                # [g, m], block order
            real = None
        else:
            order = torch.argsort((~hm).to(torch.int8), dim=1, stable=True)[:, :m]  # [g, m]: own blocks first
            real = torch.arange(m).unsqueeze(0) < counts.unsqueeze(1)
        # one pass over the blocks: (in hot, slot, block index, tokens) of each, per head's order
        meta = torch.tensor([(b.hot is not None, b.hot if b.hot is not None else b.warm, b.index, b.ntok)
                             for b in got], dtype=torch.long)[order]           # [g, m, 4]
        on_hot, slot, index, ntok = meta.unbind(-1)
        on_hot = on_hot.bool()
        heads = torch.arange(g).unsqueeze(1).expand(g, m)

        def read(pool, pairs: torch.Tensor | None) -> torch.Tensor:
            """K/V rows of (head, slot) pairs: one index_select of whole [bt * d] rows of the
            pool seen as [2, heads * slots, bt * d] (advanced indexing copies element-wise)."""
            flat = heads * pool.kv.shape[2] + slot
            flat = flat.reshape(-1) if pairs is None else flat[pairs]
            rows = pool.kv.view(2, -1, bt * lay.head_dim).index_select(1, flat.to(pool.kv.device))
            return rows.to(device)

        if bool(on_hot.all()) or not bool(on_hot.any()):  # one tier: one read, straight into place
            kv = read(seq.hot if bool(on_hot[0, 0]) else seq.warm, None).view(2, g, m, bt, lay.head_dim)
        else:
            kv = torch.empty((2, g * m, bt * lay.head_dim), dtype=lay.dtype, device=device)
            for pool, sel in ((seq.hot, on_hot), (seq.warm, ~on_hot)):
                kv.index_copy_(1, sel.reshape(-1).nonzero().squeeze(1).to(device), read(pool, sel))
            kv = kv.view(2, g, m, bt, lay.head_dim)
        offs = torch.arange(bt)
        pos = (index.unsqueeze(-1) * bt + offs).reshape(g, m * bt).to(device)
        if real is None and all(b.ntok == bt for b in got):
            valid = None
        else:
            valid = offs < ntok.unsqueeze(-1)
            if real is not None:
                valid &= real.unsqueeze(-1)
            valid = None if bool(valid.all()) else valid.reshape(g, m * bt).to(device)
        d = lay.head_dim
        return kv[0].reshape(g, m * bt, d), kv[1].reshape(g, m * bt, d), pos, valid

    def _readable(self, blocks: Sequence[Block]) -> bool:
        """Can every block be read where it is? (``Placement.readable`` inlined: a decode step
        asks it of every block of every layer.)"""
        in_place = self.in_place
        return all(b.loading is None and (b.hot is not None or (in_place and b.warm is not None)) for b in blocks)

    def _read(self, got: Sequence[Block]) -> tuple[tuple[torch.Tensor, torch.Tensor], bool]:
        """K, V ``[kv_heads, tokens, head_dim]`` of acquired consecutive blocks, and whether
        they are one run of one pool (then a view, no copy; else a few runs are concatenated in
        position order, more are gathered by slot index)."""
        runs = _runs(got)
        ntok = _tokens(got)
        if len(runs) == 1:
            pool, first_slot, n = runs[0]
            return pool.view(first_slot, n, ntok), True
        if len(runs) <= CAT_RUNS:
            views = [pool.view(first_slot, n) for pool, first_slot, n in runs]
            return (torch.cat([k for k, _ in views], 1)[:, :ntok], torch.cat([v for _, v in views], 1)[:, :ntok]), False
        return _split(self._gather(got), ntok), False

    def _gather(self, got: Sequence[Block], device=None) -> torch.Tensor:
        """``[2, kv_heads, len(got), block_tokens, head_dim]``: the slots of acquired blocks, in
        the order given, one indexed read per tier (hot, and warm when read in place)."""
        seq = self.seq
        device = seq.hot.device if device is None else device
        hot = [i for i, b in enumerate(got) if b.hot is not None]
        parts = []
        if hot:
            parts.append((seq.hot, hot, [got[i].hot for i in hot]))
        if len(hot) < len(got):
            warm = [i for i, b in enumerate(got) if b.hot is None]
            parts.append((seq.warm, warm, [got[i].warm for i in warm]))
        if len(parts) == 1:
            pool, _, slots = parts[0]
            kv = pool.kv.index_select(2, torch.tensor(slots, dtype=torch.long, device=pool.kv.device))
            return kv if kv.device == torch.device(device) else kv.to(device)
        lay = self.layout
        kv = torch.empty((2, lay.kv_heads, len(got), lay.block_tokens, lay.head_dim), dtype=lay.dtype,
                         device=device)
        for pool, where, slots in parts:
            src = pool.kv.index_select(2, torch.tensor(slots, dtype=torch.long, device=pool.kv.device))
            kv.index_copy_(2, torch.tensor(where, dtype=torch.long, device=device), src.to(device))
        return kv


def _runs(got: Sequence[Block]) -> list[tuple[object, int, int]]:
    """``(pool, first_slot, n_blocks)`` runs of consecutive slots of one pool that hold the
    acquired blocks ``got`` (consecutive block indices, only the last partial) in block order."""
    seq = got[0].seq
    out: list[list] = []
    for b in got:
        pool, slot = (seq.hot, b.hot) if b.hot is not None else (seq.warm, b.warm)
        if out and out[-1][0] is pool and out[-1][1] + out[-1][2] == slot:
            out[-1][2] += 1
        else:
            out.append([pool, slot, 1])
    return [(p, s, n) for p, s, n in out]


def _positions(blocks: Sequence[Block], bt: int, device, shape: tuple) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token positions of every slot of ``blocks`` (in the order given) and the mask of slots
    holding a token (None when every block is full), both reshaped to ``shape``."""
    idx = torch.tensor([b.index for b in blocks], dtype=torch.long, device=device)
    offs = torch.arange(bt, device=device)
    pos = (idx.unsqueeze(1) * bt + offs).reshape(shape)
    ntok = torch.tensor([b.ntok for b in blocks], device=device)
    valid = None if bool((ntok == bt).all()) else (offs < ntok.unsqueeze(1)).reshape(shape)
    return pos, valid


def _tokens(blocks: Sequence[Block]) -> int:
    return sum(b.ntok for b in blocks)


def _split(kv: torch.Tensor, ntok: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[2, g, n, bt, d] -> K, V [g, ntok, d] views."""
    g, n, bt, d = kv.shape[1:]
    return kv[0].reshape(g, n * bt, d)[:, :ntok], kv[1].reshape(g, n * bt, d)[:, :ntok]

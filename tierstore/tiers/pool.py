"""A slot pool: preallocated K and V buffers of fixed-size block slots, and a free list.

Memory: the buffer is one ``torch.empty`` allocation, never written before a block is: host
pools in pageable memory then take physical pages only where blocks have been (the OS maps a
page at its first write), so a pool grows on demand up to its budget. Pinned host memory and
device memory are committed when the pool is made (the first sequence of a layout). Nothing may
read a slot's bytes past its block's tokens (stale or never written: any bits, NaN included).

Layout: ``k``, ``v`` are ``[kv_heads, slots, block_tokens, head_dim]`` (head-major) so that a
run of consecutive slots is one *view* ``[kv_heads, n * block_tokens, head_dim]``: attention
reads a run of resident blocks without a copy. The free list is a boolean mask searched with
numpy (O(slots) per allocation, microseconds at 10^4 slots) because runs matter more than O(1)
pops: a deque of free slots would scatter a layer's blocks and cost a copy per attention.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import BudgetError
from ..layout import SAME_SIZE_INT, KVLayout


class SlotPool:
    """Fixed-size block slots on one device. Not thread-safe: the manager serialises calls."""

    def __init__(self, layout: KVLayout, slots: int, device: torch.device | str, *, pin: bool = False,
                 name: str = "pool") -> None:
        if slots <= 0:
            raise BudgetError(f"{name} budget is smaller than one block ({layout.block_bytes} bytes)")
        self.layout = layout
        self.device = torch.device(device)
        self.name = name
        self.slots = slots
        shape = (2, layout.kv_heads, slots, layout.block_tokens, layout.head_dim)
        # one allocation; k and v are its halves, each [kv_heads, slots, block_tokens, head_dim].
        # Not zeroed: zeroing would fault in the whole budget at once (see the module docstring)
        self.kv = torch.empty(shape, dtype=layout.dtype, device=self.device, pin_memory=pin)
        with torch.enable_grad():  # views made under no_grad could not be written under grad mode
            self.k, self.v = self.kv[0], self.kv[1]
        self.pinned = pin
        self._free = np.ones(slots, dtype=bool)
        self.used = 0
        # which block sits in each slot (set by the manager's placement when it fills a slot,
        # cleared at release): eviction ranks a pool's own blocks without walking every sequence
        self.owner: list = [None] * slots

    def fault_in(self) -> None:
        """Touch every page now (``TierManager.prepare``): no first-write faults later."""
        self.kv.zero_()

    @property
    def nbytes(self) -> int:
        return self.slots * self.layout.block_bytes

    @property
    def free_count(self) -> int:
        return self.slots - self.used

    def alloc(self, n: int, near: int | None = None, room: int = 0, extent: int = 0,
              offset: int = 0) -> list[int] | None:
        """``n`` slots, all or nothing. Prefers the run right after ``near``; else, with
        ``extent``, slot ``offset`` of a wholly free aligned extent of ``extent`` slots (the
        owner's place in an attention piece it grows into: the piece is then one run, read as
        one view); else, with
        ``room``, the middle of a free run with ``room`` free slots on both sides (space for the
        owner of the run before it to grow, and for this owner to grow); else any free run, else
        any free slots."""
        if n <= 0:
            return []
        if n > self.free_count:
            return None
        free = self._free
        start = None
        if near is not None and near + 1 + n <= self.slots and free[near + 1:near + 1 + n].all():
            got = list(range(near + 1, near + 1 + n))
        elif extent > n and offset + n <= extent and (start := self._find_extent(extent)) is not None:
            got = list(range(start + offset, start + offset + n))
        else:
            start = self._find_run(n + 2 * room) if room else None
            if start is not None:
                start += room
            else:
                start = self._find_run(n)
            got = list(range(start, start + n)) if start is not None else np.flatnonzero(free)[:n].tolist()
        free[got] = False
        self.used += n
        return got

    def alloc_run(self, n: int) -> list[int] | None:
        """``n`` consecutive free slots (one run, read as one view), or None: nothing else."""
        start = self._find_run(n) if 0 < n <= self.free_count else None
        if start is None:
            return None
        self._free[start:start + n] = False
        self.used += n
        return list(range(start, start + n))

    def _find_extent(self, n: int) -> int | None:
        """First slot of the first wholly free extent of ``n`` slots aligned at a multiple of
        ``n`` (an owner grows into its extent; others look for whole free extents, so they do
        not take the slots it will grow into)."""
        whole = self.slots // n * n
        if whole == 0:
            return None
        ok = np.flatnonzero(self._free[:whole].reshape(-1, n).all(1))
        return int(ok[0]) * n if ok.size else None

    def _find_run(self, n: int) -> int | None:
        """First slot of the first run of ``n`` free slots."""
        f = self._free.astype(np.int8)
        if n == 1:
            idx = np.flatnonzero(f)
            return int(idx[0]) if idx.size else None
        edges = np.diff(np.concatenate(([0], f, [0])))
        starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
        ok = np.flatnonzero(ends - starts >= n)
        return int(starts[ok[0]]) if ok.size else None

    def release(self, slots: list[int]) -> None:
        if not slots:
            return
        if self._free[slots].any():
            raise AssertionError(f"{self.name}: double free of slots {slots}")
        self._free[slots] = True
        for s in slots:
            self.owner[s] = None
        self.used -= len(slots)

    def resident(self) -> list:
        """The blocks in this pool's slots (O(slots))."""
        return [b for b in self.owner if b is not None]

    def view(self, start: int, n: int, ntok: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V of slots ``start..start+n-1`` as ``[kv_heads, n*block_tokens, head_dim]`` views."""
        lay = self.layout
        kv = self.kv[:, :, start:start + n].reshape(2, lay.kv_heads, n * lay.block_tokens, lay.head_dim)
        if ntok is not None and ntok < n * lay.block_tokens:
            kv = kv[:, :, :ntok]
        return kv[0], kv[1]

    def block(self, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V of one slot: ``[kv_heads, block_tokens, head_dim]`` views."""
        return self.k[:, slot], self.v[:, slot]

    def slot_major(self) -> np.ndarray:
        """CPU pools: the slots as one numpy view ``[slots, 2 (K, V), kv_heads, block_tokens,
        head_dim]`` of same-size unsigned ints (bit-exact copies of any float dtype)."""
        kv = self.kv.view(SAME_SIZE_INT[self.kv.element_size()][0])
        return kv.numpy().transpose(2, 0, 1, 3, 4)

    def copy_in(self, slot: int, src: "SlotPool", src_slot: int, *, non_blocking: bool = False) -> None:
        """K and V of ``src``'s slot into this pool's ``slot``.

        A slot is strided in the head-major layout; across devices torch would stage such a
        copy through contiguous temporaries (device memory outside the hot budget, pageable host
        memory that defeats pinning). Each head's ``[block_tokens, head_dim]`` is contiguous in
        both pools, so cross-device copies go one head at a time, straight to/from pinned memory.
        """
        if self.device == src.device:
            self.k[:, slot].copy_(src.k[:, src_slot])
            self.v[:, slot].copy_(src.v[:, src_slot])
            return
        for h in range(self.layout.kv_heads):
            self.k[h, slot].copy_(src.k[h, src_slot], non_blocking=non_blocking)
            self.v[h, slot].copy_(src.v[h, src_slot], non_blocking=non_blocking)

"""Budgets: the hot and warm pools of each KV layout (and device), cut from the store's budgets.

Pools are made on first use: a layout's hot pool on one device takes what is left of the hot
budget (or the share a cache asks for), minus a reservation for attention temporaries; its warm
pool likewise. Every cache of the store shares them (guarded by ``Shared.lock``).
"""

from __future__ import annotations

import torch

from .errors import BudgetError
from .layout import KVLayout
from .tiers.hot import HotPool
from .tiers.warm import WarmPool, pinning_available

SCRATCH_MAX = 64 << 20  # most hot bytes reserved for attention temporaries
SCRATCH_MIN_BUDGET = 8 << 20  # below this, no reservation: attention pieces shrink to one block


class Budgets:
    """The pools made so far and what is left of the budgets (lock held by callers)."""

    def __init__(self, hot_bytes: int, warm_bytes: int) -> None:
        self.hot_budget, self.warm_budget = hot_bytes, warm_bytes
        self.hot_left, self.warm_left = hot_bytes, warm_bytes
        self.hot: dict[tuple, HotPool] = {}     # (layout, device) -> pool
        self.warm: dict[KVLayout, WarmPool] = {}

    def pools(self, layout: KVLayout, device: torch.device, hot_bytes: int | None,
              warm_bytes: int | None) -> tuple[HotPool, WarmPool]:
        """The layout's pools on ``device``, made now if needed (``hot_bytes``/``warm_bytes`` cap
        a new pool's share; default: what is left)."""
        hk = (layout, str(device))
        if hk not in self.hot:
            want = self.hot_left if hot_bytes is None else min(hot_bytes, self.hot_left)
            # attention temporaries (score chunks, gathered pieces) come out of the same
            # budget: an eighth of it, at most 64 MiB, is reserved for them
            scratch = min(SCRATCH_MAX, want // 8) if want >= SCRATCH_MIN_BUDGET else 0
            slots = (want - scratch) // layout.block_bytes
            if slots < 2:
                raise BudgetError(f"hot budget {want} bytes holds {slots} blocks of {layout.block_bytes} bytes "
                                  f"(after {scratch} bytes of attention scratch); at least 2 are needed")
            pool = HotPool(layout, slots, device)
            pool.scratch_bytes = scratch
            self.hot[hk] = pool
            self.hot_left -= slots * layout.block_bytes + scratch
        if layout not in self.warm:
            want = self.warm_left if warm_bytes is None else min(warm_bytes, self.warm_left)
            slots = want // layout.block_bytes
            if slots < 1:
                raise BudgetError(f"warm budget {want} bytes is smaller than one block ({layout.block_bytes} bytes)")
            # pinned only for a CUDA hot pool: pinned memory is committed at once, while pageable
            # memory takes pages as blocks arrive (a CPU hot pool gains nothing from pinning)
            self.warm[layout] = WarmPool(layout, slots, pin=device.type == "cuda" and pinning_available())
            self.warm_left -= slots * layout.block_bytes
        return self.hot[hk], self.warm[layout]

    def all(self) -> list:
        """Every pool, hot first."""
        return [*self.hot.values(), *self.warm.values()]

    def usage(self) -> dict:
        """Bytes and blocks in use per tier (token slots: ``TierManager.usage``)."""
        hot, warm = self.hot.values(), self.warm.values()
        return {
            "hot_used_bytes": sum(p.used * p.layout.block_bytes for p in hot),
            "hot_allocated_bytes": sum(p.nbytes + p.scratch_bytes for p in hot),
            "hot_scratch_bytes": sum(p.scratch_bytes for p in hot),
            "warm_used_bytes": sum(p.used * p.layout.block_bytes for p in warm),
            "warm_allocated_bytes": sum(p.nbytes for p in warm),
            "hot_blocks": sum(p.used for p in hot),
            "warm_blocks": sum(p.used for p in warm),
        }

    def clear(self) -> None:
        """Free the pools (a cache object may outlive its store, and reference cycles gc)."""
        self.hot.clear()
        self.warm.clear()

"""Counters of the live process and ``store.stats()``."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field


@dataclass
class Counters:
    """Mutable counters owned by the tier manager (updated under its lock or by its writer)."""

    requests: int = 0
    hits: Counter = field(default_factory=Counter)        # tier -> requests served from it
    misses: Counter = field(default_factory=Counter)      # tier -> requests not found there
    promotions: Counter = field(default_factory=Counter)  # from tier -> blocks moved up
    demotions: Counter = field(default_factory=Counter)   # from tier -> blocks moved down / dropped
    bytes_moved: int = 0
    prefetch_requested: int = 0
    prefetch_needed: int = 0                              # acquired blocks that had been prefetched
    prefetch_timely: int = 0                              # ... and were already hot when acquired
    raw_bytes_written: int = 0
    cold_writes: int = 0
    cold_bytes_written: int = 0
    hot_peak: int = 0                                     # most hot slots in use at once
    warm_in_place: int = 0                                # block reads served from warm without a move
    compacted: int = 0                                    # blocks moved into one warm run (CPU reads)
    restore_seconds: float = 0.0                          # reading resumed sessions' blocks into slots
    warm_filled: int = 0                                  # resumed blocks read into warm in the background


@dataclass(frozen=True)
class StoreStats:
    """What this process sees of a store. Sizes in bytes; ratios in [0, 1] (-1: no data)."""

    hot_used_bytes: int
    hot_budget_bytes: int
    hot_allocated_bytes: int
    hot_blocks: int
    warm_used_bytes: int
    warm_budget_bytes: int
    warm_allocated_bytes: int
    warm_blocks: int
    cold_used_bytes: int
    cold_budget_bytes: int | None
    cold_blocks: int
    sessions: int
    cache_hit_rate: float
    hits: dict
    misses: dict
    promotions: dict
    demotions: dict
    bytes_moved: int
    prefetch_timeliness: float
    memory_fragmentation: float
    compression_ratio: float
    lmdb_free_ratio: float
    lmdb_pages: dict

    def to_json(self) -> dict:
        return asdict(self)


def collect_stats(store) -> StoreStats:
    pages = store.cold.page_stats()
    with store.cold.read() as txn:
        cold_blocks = store.cold.entries("blocks", txn)
        sessions = store.cold.entries("sessions", txn)
    mgr = store._manager
    if mgr is not None:
        u = mgr.usage()
        c = mgr.counters
    else:
        u = dict.fromkeys(("hot_used_bytes", "hot_allocated_bytes", "warm_used_bytes", "warm_allocated_bytes",
                           "hot_blocks", "warm_blocks", "unused_token_slots", "allocated_token_slots"), 0)
        c = Counters()
    hit_rate = c.hits["hot"] / c.requests if c.requests else -1.0
    timely = c.prefetch_timely / c.prefetch_needed if c.prefetch_needed else -1.0
    frag = u["unused_token_slots"] / u["allocated_token_slots"] if u["allocated_token_slots"] else 0.0
    ratio = c.raw_bytes_written / c.cold_bytes_written if c.cold_bytes_written else -1.0
    total = pages["total_pages"]
    return StoreStats(
        hot_used_bytes=u["hot_used_bytes"], hot_budget_bytes=store.config.hot_bytes,
        hot_allocated_bytes=u["hot_allocated_bytes"], hot_blocks=u["hot_blocks"],
        warm_used_bytes=u["warm_used_bytes"], warm_budget_bytes=store.config.warm_bytes,
        warm_allocated_bytes=u["warm_allocated_bytes"], warm_blocks=u["warm_blocks"],
        cold_used_bytes=pages["used_pages"] * pages["psize"], cold_budget_bytes=store.config.cold_bytes,
        cold_blocks=cold_blocks, sessions=sessions, cache_hit_rate=hit_rate,
        hits=dict(c.hits), misses=dict(c.misses), promotions=dict(c.promotions), demotions=dict(c.demotions),
        bytes_moved=c.bytes_moved, prefetch_timeliness=timely, memory_fragmentation=frag,
        compression_ratio=ratio, lmdb_free_ratio=pages["free_pages"] / total if total else 0.0,
        lmdb_pages=pages)

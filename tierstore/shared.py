"""What the tier manager's components share: the block lock and its condition, the counters,
the open sequences, the store's parts.

Who owns what (each component holds its own state; ``Block`` fields are grouped by owner):

* ``Budgets`` (budgets.py): the pools of each layout/device and what is left of the budgets.
* ``Placement`` (placement.py): residency and pins (``Block.hot/warm/pins/transient/last_used/
  prefetched``); it is the only code that moves blocks between tiers.
* ``Loader`` (loader.py): transfers in flight (``Block.loading/ready``), restore, warm fills.
* ``WriteBack`` (writeback.py): durability (``Block.key/queued/durable``), its queue, threads
  and write errors.
* ``SummaryIndex`` (summaries.py): summaries and their stacks; ``Calibrator``: sketch bases.

One lock, ``Shared.lock`` (an RLock), guards every ``Block``'s fields: a move changes residency,
pins and durability together (a block leaves warm only if durable, a victim must be unpinned
and not loading), so per-component locks would have to be taken together anyway, and would add
orders to get wrong. Nobody holds it while copying between tiers, decoding, encoding or doing
I/O: a transfer is prepared under it (slots reserved, blocks pinned and marked), run outside it,
and completed under it (``Loader``, ``WriteBack`` and restore follow prepare/complete).

Lock order, the only one: LMDB's write lock (the writer thread inside a write transaction)
-> ``Shared.lock`` -> a ``Calibrator``'s own lock (a leaf). Nothing waits for LMDB's write
lock while holding ``Shared.lock``.

Waits are on ``Shared.cv`` (the lock's condition): every change that can end a wait (a pin
given back, a load or a write-back completed, a sequence closed) notifies it. ``wait_until``
re-checks once a second as a safety net only; nothing polls.
"""

from __future__ import annotations

import dataclasses
import itertools
import threading
from collections.abc import Callable, Iterable

from .config import StoreConfig
from .errors import StoreClosedError
from .metrics import Counters
from .sessions import SessionStore
from .tiers.cold import ColdStore

WAIT_SAFETY = 1.0  # seconds: a wait re-checks its condition this often even without a notify


@dataclasses.dataclass(frozen=True)
class StoreParts:
    """What the manager uses of its ``Store``. Never the Store itself: the worker threads
    reference the manager, so a reference back would keep a Store dropped without ``close()``
    (and these threads, and the pools) alive; the Store's finalizer closes the manager."""

    config: StoreConfig
    cold: ColdStore
    sessions: SessionStore

    @property
    def path(self) -> str:
        return self.config.path


class Shared:
    """The block lock, its condition, counters, the open sequences and the store's parts."""

    def __init__(self, store: StoreParts) -> None:
        self.store = store
        self.lock = threading.RLock()
        self.cv = threading.Condition(self.lock)
        self.counters = Counters()
        self.seqs: dict[int, object] = {}  # id -> open Seq
        self.ids = itertools.count(1)
        self.step = 0                      # one per acquire: blocks' last_used is in these steps
        self.closed = False

    def check_open(self) -> None:
        if self.closed:
            raise StoreClosedError(f"{self.store.path}: tier manager is closed")

    def wait_until(self, done: Callable[[], bool], on_wake: Callable[[], None] | None = None) -> None:
        """Wait (lock held; released while waiting) until ``done()``; ``on_wake`` runs after each
        wake-up (e.g. to raise a write error that will never let ``done`` become true)."""
        while not done():
            self.cv.wait(WAIT_SAFETY)
            if on_wake is not None:
                on_wake()

    def unpin(self, blocks: Iterable) -> None:
        """Give pins back and wake waiters (lock held)."""
        for b in blocks:
            b.pins -= 1
        self.cv.notify_all()

"""What a ``TieredCache`` gives back when it is closed or dropped: its rows' sequences, its
writer leases, the model's hooks and attention implementation. Kept apart from the cache so that
the finalizer of a cache dropped without ``close()`` can release them without referencing it
(``tierstore.lifecycle`` says where such a release runs)."""

from __future__ import annotations

import logging
import threading
import weakref

from tierstore.lifecycle import release

from . import attention as attn
from .row import Row

log = logging.getLogger(__name__)


ATTN: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # model -> [its implementation before, open caches]
ATTN_LOCK = threading.RLock()  # an RLock: ``release`` can tell that this thread holds it


def hold_attention(model) -> None:
    """Switch ``model`` to the tierstore attention while any of its caches is open (counted per
    model: caches closed or dropped in any order restore the implementation only after the last)."""
    with ATTN_LOCK:
        ent = ATTN.get(model)
        prev = ent[0] if ent is not None else model.config._attn_implementation
        model.set_attn_implementation(attn.NAME)
        if ent is None:
            ent = ATTN[model] = [prev, 0]
        ent[1] += 1


def drop_attention(model) -> None:
    with ATTN_LOCK:
        ent = ATTN.get(model)
        if ent is None:
            return
        ent[1] -= 1
        if ent[1] <= 0:
            del ATTN[model]
            model.set_attn_implementation(ent[0])


def weak_hook(cache, method: str):
    """A model hook that calls ``cache.<method>`` without keeping the cache alive."""
    ref = weakref.ref(cache)

    def hook(*args, **kwargs):
        c = ref()
        return None if c is None else getattr(c, method)(*args, **kwargs)
    return hook


class Held:
    """What a TieredCache gives back, apart from the cache so that the finalizer of a cache
    dropped without ``close()`` can give it back (it must not reference the cache): the manager
    sequences of its rows, its writer leases, the model's hooks and attention implementation."""

    __slots__ = ("mgr", "sessions", "model", "rows", "leases", "hooks", "attention")

    def __init__(self, mgr, sessions, model) -> None:
        self.mgr, self.sessions, self.model = mgr, sessions, model
        self.rows: list[Row] = []  # the cache's rows (``TieredCache.rows`` is this list)
        self.leases: list = []
        self.hooks: list = []
        self.attention = False    # holds the model's attention implementation (``hold_attention``)

    def release(self) -> None:
        """Idempotent. Uncommitted KV of the rows is dropped (``close()`` commits first)."""
        hooks, self.hooks = self.hooks, []
        for h in hooks:
            h.remove()
        if self.attention:
            self.attention = False
            drop_attention(self.model)
        rows, self.rows = self.rows, []
        try:
            for row in rows:
                if row.seq is not None:
                    self.mgr.close_sequence(row.seq, flush=False)
        finally:
            leases, self.leases = self.leases, []
            for lease in leases:
                self.sessions.release(lease)


def cache_dropped(held: Held, what: str) -> None:
    """The finalizer of a TieredCache dropped without ``close()`` (see ``tierstore.lifecycle``)."""
    log.debug("%s: TieredCache dropped without close(); giving its slots and leases back", what)
    release(held.release, what=f"cache {what}", locks=[held.mgr.lock, ATTN_LOCK])

"""Giving resources back when their owner is dropped without ``close()``.

A ``Store`` and a ``TieredCache`` register a ``weakref.finalize`` whose state never references
the owner (a finalizer that did would keep it alive). The finalizer runs where the owner's last
reference goes: usually in the user's code (``del cache``), then the release runs right there.
It runs elsewhere in a thread of its own:

* in a tierstore worker thread (it cannot join itself, and a release may wait for its progress);
* during a cycle collection, which may interrupt any code, ours included, holding any lock
  (the cold store's write lock is not reentrant; the manager's is, and a release there would
  change state under the code it interrupted);
* while this thread holds one of the given locks (the manager's).
"""

from __future__ import annotations

import gc
import logging
import threading
from collections.abc import Callable, Iterable

log = logging.getLogger(__name__)

WORKER_PREFIX = "tierstore-"  # the names of the manager's threads (and of release threads)

_GC = threading.local()  # depth of cycle collections running in this thread


def _gc_phase(phase: str, info: dict) -> None:
    _GC.depth = max(0, getattr(_GC, "depth", 0) + (1 if phase == "start" else -1))


gc.callbacks.append(_gc_phase)


def _owned(lock) -> bool:
    is_owned = getattr(lock, "_is_owned", None)  # RLock and Condition
    return bool(is_owned()) if is_owned is not None else False


def release(fn: Callable[[], None], *, what: str, locks: Iterable = ()) -> threading.Thread | None:
    """Run ``fn`` now, or in a thread of its own (returned) where running it now is unsafe (see
    the module docstring). Errors are logged, never raised: a finalizer has no caller."""
    def run() -> None:
        try:
            fn()
        except Exception:  # noqa: BLE001 - see the docstring
            log.exception("releasing %s", what)

    if threading.current_thread().name.startswith(WORKER_PREFIX) or getattr(_GC, "depth", 0) > 0 \
            or any(_owned(lock) for lock in locks if lock is not None):
        t = threading.Thread(target=run, name=f"{WORKER_PREFIX}release", daemon=True)
        t.start()
        return t
    run()
    return None

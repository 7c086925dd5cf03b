"""``tierstore compact``: rewrite a store's LMDB file with LMDB's compacting copy, swapped in
atomically, while the store is idle."""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass

from ..errors import StoreBusyError
from ..sessions import Lease


@dataclass(frozen=True)
class CompactReport:
    before_bytes: int
    after_bytes: int

    @property
    def saved_bytes(self) -> int:
        return self.before_bytes - self.after_bytes


def _other_readers(env) -> list[int]:
    """Pids of other processes inside a read transaction of ``env`` right now."""
    env.reader_check()  # drop slots of dead processes first
    pids = []
    for line in env.readers().splitlines():
        parts = line.split()
        if parts and parts[0].isdigit() and int(parts[0]) != os.getpid():
            pids.append(int(parts[0]))
    return sorted(set(pids))


def _fsync_path(path: str, *, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def compact_store(store) -> CompactReport:
    """Rewrite ``data.mdb`` with LMDB's compacting copy and swap it in atomically.

    The copy is written into a temporary directory inside the store (same filesystem), synced,
    and renamed over ``data.mdb`` while this process holds LMDB's write lock, so no commit of
    another process can fall between the copy and the swap. ``lock.mdb`` is removed with the
    swap: its recorded transaction id belongs to the old file, and the next opener rebuilds it.
    A process that keeps the store open across a compaction still sees the old file; hence the
    store must be idle: refused (``StoreBusyError``) while a writer holds a lease or another
    process is reading. Closes ``store``.
    """
    cold = store.cold
    live = store.sessions.live_leases()
    if live:
        who = ", ".join(f"{lz.session!r} (pid {lz.pid} on {lz.host})" for lz in live)
        raise StoreBusyError(f"live writers hold sessions {who}; compact needs an idle store", path=cold.path)
    others = _other_readers(cold.env)
    if others:
        raise StoreBusyError(f"processes {others} are reading the store; compact needs an idle store",
                             path=cold.path)
    data = os.path.join(cold.path, "data.mdb")
    before = os.path.getsize(data)
    tmp = tempfile.mkdtemp(prefix=".compact-", dir=cold.path)
    try:
        txn = cold.env.begin(write=True)  # LMDB's writer lock: other processes' commits wait
        try:
            if any((lz := Lease.from_bytes(bytes(v))) is not None and lz.alive()
                   for _, v in cold.scan("leases", txn=txn)):
                raise StoreBusyError("a writer took a lease meanwhile; compact needs an idle store", path=cold.path)
            cold.env.copy(tmp, compact=True)
            _fsync_path(os.path.join(tmp, "data.mdb"))
            os.replace(os.path.join(tmp, "data.mdb"), data)
            try:
                os.unlink(os.path.join(cold.path, "lock.mdb"))
            except FileNotFoundError:
                pass
            _fsync_path(cold.path, directory=True)
        finally:
            txn.abort()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        store.close()
    return CompactReport(before_bytes=before, after_bytes=os.path.getsize(data))

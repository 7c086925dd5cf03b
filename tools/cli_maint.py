"""Cleaning a store: plan and run ``rm``/``prune``, and ``compact`` the LMDB file.

Deletion itself is the core's (``Store.delete``: one write transaction, reference counts,
blocks freed with the last record naming them). What is here decides *what* to delete and
how many bytes that frees, read from one snapshot, so ``--dry-run`` prints what ``-y`` does.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import CorruptRecordError, LocatedError, SessionBusyError, SessionNotFoundError, TierstoreError
from ..layout import check_session_name
from ..records import SessionRecord
from ..sessions import Lease
from ..tiers.cold import ColdStore
from .cli_scan import read_refs, scan_store, snapshot


class StoreBusyError(TierstoreError):
    """Another process writes to (or reads from) the store; the operation needs it idle."""


_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str) -> float:
    """``"30d"``, ``"12h"``, ``"1w2d"``, ``"90s"`` -> seconds. ValueError otherwise."""
    s = text.strip().lower()
    if not s or _DURATION_RE.sub("", s):
        raise ValueError(f"cannot parse duration {text!r}; use e.g. 30d, 12h, 90m, 2w (units s/m/h/d/w)")
    return float(sum(float(n) * _UNIT_SECONDS[u] for n, u in _DURATION_RE.findall(s)))


@dataclass(frozen=True)
class RemovalPlan:
    """Sessions to delete and what that frees (record bytes + blocks and summaries that no
    remaining record names: the same count ``Store.delete`` returns)."""

    sessions: list[SessionRecord]
    freed_bytes: int
    freed_blocks: int
    skipped: list[tuple[str, str]]        # (name, why) left out (prune only)

    @property
    def names(self) -> list[str]:
        return [r.name for r in self.sessions]


def _busy(store) -> dict[str, int]:
    return {lease.session: lease.pid for lease in store.sessions.live_leases()}


def _position_bytes(txn, cold: ColdStore, chain: bytes) -> tuple[int, int]:
    blocks = size = 0
    for db in ("blocks", "summaries"):
        cur = txn.cursor(db=cold.dbs[db])
        if not cur.set_range(chain):
            continue
        for k, v in cur:
            if bytes(k[:len(chain)]) != chain:
                break
            size += len(k) + len(v)
            blocks += db == "blocks"
    return blocks, size


def _plan(store, txn, records: list[SessionRecord], skipped: list[tuple[str, str]]) -> RemovalPlan:
    cold = store.cold
    refs = read_refs(txn, cold)
    naming: dict[bytes, int] = {}
    freed = n_blocks = 0
    for rec in records:
        raw = txn.get(rec.name.encode(), db=cold.dbs["sessions"])
        freed += len(raw) if raw is not None else 0
        for c in set(rec.chains()):
            naming[c] = naming.get(c, 0) + 1
    for c, n in naming.items():
        if refs.get(c, 0) <= n:
            b, size = _position_bytes(txn, cold, c)
            n_blocks += b
            freed += size
    return RemovalPlan(sessions=records, freed_bytes=freed, freed_blocks=n_blocks, skipped=skipped)


def plan_rm(store, names: Sequence[str]) -> RemovalPlan:
    """Plan deleting ``names``. Raises for an unknown name, a damaged record (the core cannot
    release a record it cannot read) or a session a live writer holds."""
    names = list(dict.fromkeys(check_session_name(n) for n in names))
    busy = _busy(store)
    with snapshot(store.cold) as txn:
        snap = scan_store(store.cold, txn)
        damaged = {e.session: e for e in snap.damaged if isinstance(e, LocatedError)}
        records = []
        for n in names:
            rec = snap.record(n)
            if rec is None:
                if n in damaged:
                    raise CorruptRecordError(f"{damaged[n].reason}; a damaged record cannot be removed "
                                             "by `rm` (see `tierstore verify`)", session=n)
                raise SessionNotFoundError("no such session", session=n)
            if n in busy:
                raise SessionBusyError(f"a live writer (pid {busy[n]}) holds it; not removed", session=n)
            records.append(rec)
        return _plan(store, txn, records, [])


def plan_prune(store, older_than_s: float, *, now: float | None = None) -> RemovalPlan:
    """Plan deleting every session last updated more than ``older_than_s`` seconds ago.
    Sessions a live writer holds are skipped (listed in ``skipped``)."""
    cutoff = (time.time() if now is None else now) - older_than_s
    busy = _busy(store)
    with snapshot(store.cold) as txn:
        snap = scan_store(store.cold, txn)
        records, skipped = [], []
        for rec in sorted(snap.records, key=lambda r: r.name):
            if rec.updated >= cutoff:
                continue
            if rec.name in busy:
                skipped.append((rec.name, f"a live writer (pid {busy[rec.name]}) holds it"))
            else:
                records.append(rec)
        for e in snap.damaged:
            if isinstance(e, LocatedError):
                skipped.append((e.session, f"damaged record ({e.reason})"))
        return _plan(store, txn, records, skipped)


# -- compact -------------------------------------------------------------------------------


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
        raise StoreBusyError(f"{cold.path}: live writers hold sessions {who}; compact needs an idle store")
    others = _other_readers(cold.env)
    if others:
        raise StoreBusyError(f"{cold.path}: processes {others} are reading the store; compact needs an idle store")
    data = os.path.join(cold.path, "data.mdb")
    before = os.path.getsize(data)
    tmp = tempfile.mkdtemp(prefix=".compact-", dir=cold.path)
    try:
        txn = cold.env.begin(write=True)  # LMDB's writer lock: other processes' commits wait
        try:
            if any((lz := Lease.from_bytes(bytes(v))) is not None and lz.alive()
                   for _, v in txn.cursor(db=cold.dbs["leases"])):
                raise StoreBusyError(f"{cold.path}: a writer took a lease meanwhile; compact needs an idle store")
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

"""Cleaning a store: plan ``rm``/``prune`` (which sessions go, and what that frees).

Deletion itself is the core's (``Store.delete``: one write transaction, reference counts,
blocks freed with the last record naming them). What is here decides *what* to delete and
how many bytes that frees, read from one snapshot, so ``--dry-run`` prints what ``-y`` does.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import CorruptRecordError, LocatedError, SessionBusyError, SessionNotFoundError
from ..layout import check_session_name
from ..records import SessionRecord
from ..tiers.cold import ColdStore
from ..tiers.schema import name_key
from .scan import read_refs, scan_store, snapshot

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
        for k, v in cold.scan(db, chain, txn=txn):
            size += len(k) + len(v)
            blocks += db == "blocks"
    return blocks, size


def _plan(store, txn, records: list[SessionRecord], skipped: list[tuple[str, str]]) -> RemovalPlan:
    cold = store.cold
    refs = read_refs(txn, cold)
    naming: dict[bytes, int] = {}
    freed = n_blocks = 0
    for rec in records:
        raw = cold.get("sessions", name_key(rec.name), txn=txn)
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

"""``tierstore verify``: decode every block of a store's sessions and check what ties them together.

Checks, all inside one read snapshot (a concurrent writer's commit is either wholly in it or not):

* every session record opens (checksum, format version, fields);
* every chain position x layer a record names is stored, decodes with its checksum verified
  (``codec.decode_block``) and has the shape and dtype of the session's layout;
* every block summary opens (``BlockSummary.unseal``) and matches the block's shape;
* the stored reference count of each chain position equals the number of records naming it;
* the store's format version is one this code reads.

Damage is collected, never raised: the report names session, layer and block of each problem.
Orphans (blocks no record names) are reclaimable by ``gc``, not damage.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..codec import decode_block
from ..errors import (CorruptBlockError, CorruptRecordError, FormatVersionError, LocatedError,
                      MissingBlockError, SessionNotFoundError, TierstoreError)
from ..layout import FORMAT_VERSION, check_session_name
from ..records import BlockSummary, SessionRecord
from ..sketch import Basis
from ..tiers.schema import SKETCH_PREFIX, block_key
from .scan import StoreSnapshot, scan_store, snapshot

_KINDS = ((FormatVersionError, "format_version"), (MissingBlockError, "missing_block"),
          (CorruptRecordError, "corrupt_record"), (CorruptBlockError, "corrupt_block"))


@dataclass(frozen=True)
class Problem:
    """One finding: ``kind`` is a stable identifier, ``reason`` a sentence for people."""

    kind: str
    reason: str
    session: str | None = None
    layer: int | None = None
    block: int | None = None

    def where(self) -> str:
        parts = [f"session {self.session!r}" if self.session is not None else "store"]
        if self.layer is not None:
            parts.append(f"layer {self.layer}")
        if self.block is not None:
            parts.append(f"block {self.block}")
        return ", ".join(parts)

    def to_json(self) -> dict:
        return dict(self.__dict__)


@dataclass(frozen=True)
class VerifyReport:
    sessions: int                 # records checked (readable or not)
    blocks: int                   # distinct block records decoded
    damage: list[Problem]
    warnings: list[Problem]
    orphan_records: int           # blocks + summaries reclaimable by gc
    orphan_bytes: int

    @property
    def ok(self) -> bool:
        return not self.damage

    def to_json(self) -> dict:
        return {"ok": self.ok, "sessions": self.sessions, "blocks": self.blocks,
                "damage": [p.to_json() for p in self.damage],
                "warnings": [p.to_json() for p in self.warnings],
                "orphans": {"records": self.orphan_records, "bytes": self.orphan_bytes}}


def _problem(e: Exception, **where) -> Problem:
    if isinstance(e, TierstoreError):
        kind = next((k for t, k in _KINDS if isinstance(e, t)), "error")
        reason = e.reason if isinstance(e, LocatedError) else str(e)
    else:  # a codec that raised something untyped on damaged bytes: still damage, never a crash
        kind, reason = "corrupt_block", f"undecodable ({type(e).__name__}: {e})"
    return Problem(kind, reason, **where)


class _Verifier:
    def __init__(self, store, txn, snap: StoreSnapshot) -> None:
        self.cold, self.txn, self.snap = store.cold, txn, snap
        self.seen: dict[bytes, list[tuple[str, str, str]]] = {}  # key -> [(kind, reason, level)]
        self.damage: list[Problem] = []
        self.warnings: list[Problem] = []

    def check_record(self, rec: SessionRecord) -> None:
        lay = rec.layout
        for i, c in enumerate(self.snap.chains[rec.name]):
            for layer in range(lay.num_layers):
                key = block_key(c, layer)
                if key not in self.seen:
                    self.seen[key] = self._check_block(key, rec, layer, i)
                for kind, reason, level in self.seen[key]:
                    out = self.damage if level == "damage" else self.warnings
                    out.append(Problem(kind, reason, session=rec.name, layer=layer, block=i))

    def _check_block(self, key: bytes, rec: SessionRecord, layer: int, i: int) -> list[tuple[str, str, str]]:
        lay = rec.layout
        want = (lay.kv_heads, rec.block_len(i), lay.head_dim)
        found: list[tuple[str, str, str]] = []
        data = self.cold.get("blocks", key, txn=self.txn)
        if data is None:
            found.append(("missing_block", "block not stored", "damage"))
        else:
            try:
                k, v = decode_block(key, data, session=rec.name, layer=layer, block=i)
                if tuple(k.shape) != want or tuple(v.shape) != want:
                    found.append(("shape_mismatch", f"block holds K {tuple(k.shape)} / V {tuple(v.shape)}, "
                                  f"layout says {want}", "damage"))
                elif k.dtype != lay.dtype or v.dtype != lay.dtype:
                    found.append(("dtype_mismatch", f"block holds {k.dtype}, layout says {lay.dtype}", "damage"))
            except Exception as e:  # noqa: BLE001 - every failure of damaged bytes is a finding
                p = _problem(e)
                found.append((p.kind, p.reason, "damage"))
        summ = self.cold.get("summaries", key, txn=self.txn)
        if summ is None:
            found.append(("missing_summary", "block summary not stored (sparse policies cannot score it)",
                          "warning"))
        else:
            try:
                s = BlockSummary.unseal(key, summ)
                if tuple(s.kmin.shape) != (lay.kv_heads, lay.head_dim) or s.tokens != want[1]:
                    found.append(("corrupt_summary", f"summary of {s.tokens} tokens x {tuple(s.kmin.shape)} does "
                                  f"not match the block ({want[1]} tokens x {(lay.kv_heads, lay.head_dim)})",
                                  "damage"))
            except Exception as e:  # noqa: BLE001
                reason = e.reason if isinstance(e, LocatedError) else f"{type(e).__name__}: {e}"
                found.append(("corrupt_summary", f"summary: {reason}", "damage"))
        return found

    def check_refs(self, targets: list[SessionRecord], whole_store: bool) -> None:
        snap = self.snap
        for rec in targets:
            for i, c in enumerate(snap.chains[rec.name]):
                users = snap.users.get(c, [])
                stored = snap.refs.get(c, 0)
                if stored != len(users) and not (stored > len(users) and snap.damaged):
                    self.damage.append(Problem(
                        "refs_mismatch", f"reference count {stored}, but {len(users)} record(s) name this "
                        f"position ({', '.join(users)})", session=rec.name, block=i))
        if not whole_store:
            return
        for c, n in snap.refs.items():
            if c not in snap.users:
                p = Problem("stale_refs", f"chain position {c.hex()} has reference count {n} but no record "
                            "names it (its blocks can never be reclaimed)")
                (self.warnings if snap.damaged else self.damage).append(p)


def verify_store(store, names: Sequence[str] = (), *,
                 progress: Callable[[int, int], None] | None = None) -> VerifyReport:
    """Verify the named sessions (all when ``names`` is empty). Raises only for a name that is
    invalid (``InvalidSessionNameError``) or not in the store (``SessionNotFoundError``)."""
    names = list(dict.fromkeys(check_session_name(n) for n in names))
    cold = store.cold
    with snapshot(cold) as txn:
        snap = scan_store(cold, txn)
        damaged_names = {e.session for e in snap.damaged if isinstance(e, LocatedError)}
        for n in names:
            if snap.record(n) is None and n not in damaged_names:
                raise SessionNotFoundError("no such session", session=n)
        targets = [r for r in snap.records if not names or r.name in names]
        v = _Verifier(store, txn, snap)
        for e in snap.damaged:
            session = e.session if isinstance(e, LocatedError) else None
            if not names or session in names:
                v.damage.append(_problem(e, session=session))
        meta = snap.meta
        if meta is None:
            v.warnings.append(Problem("missing_meta", "store metadata record is missing"))
        elif meta.get("unreadable"):
            v.damage.append(Problem("corrupt_meta", "store metadata record is not valid JSON"))
        elif int(meta.get("format_version", 0)) > FORMAT_VERSION:
            v.damage.append(Problem("format_version", f"store written by format version "
                                    f"{meta['format_version']}; this tierstore reads <= {FORMAT_VERSION}"))
        _check_bases(txn, cold, v.warnings)
        for n, rec in enumerate(targets):
            if progress is not None:
                progress(n, len(targets))
            v.check_record(rec)
        v.check_refs(targets, whole_store=not names)
        checked = len(targets) + sum(1 for e in snap.damaged
                                     if not names or getattr(e, "session", None) in names)
        n_blocks = sum(1 for f in v.seen.values() if not any(k == "missing_block" for k, _, _ in f))
        return VerifyReport(sessions=checked, blocks=n_blocks, damage=v.damage, warnings=v.warnings,
                            orphan_records=snap.orphan_keys, orphan_bytes=snap.orphan_bytes)


def _check_bases(txn, cold, warnings: list[Problem]) -> None:
    """Key-sketch bases (meta ``sketch:*``): a damaged one only costs ranking quality (its layer
    is ranked without sketches), so it is a warning; the KV is intact."""
    for k, raw in cold.scan("meta", SKETCH_PREFIX, txn=txn):
        key = bytes(k)
        try:
            Basis.unseal(key, bytes(raw))
        except CorruptRecordError as e:
            warnings.append(Problem("corrupt_sketch_basis", f"{e.reason}; sparse attention ranks that layer "
                                    "without key sketches (the KV is intact)"))

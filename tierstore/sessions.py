"""Sessions on the cold tier: records, reference counts, commits, forks, deletes, leases, gc.

The session record is the single point of visibility: blocks are written first (invisible
orphans), then one write transaction checks that every block the record names is stored,
adjusts the reference counts of the chain positions it gained and lost, deletes positions no
record references any more, and writes the record. A crash at any instant leaves each session
as its last commit.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import lmdb

from .errors import (CorruptRecordError, FormatVersionError, MissingBlockError, SessionBusyError,
                     SessionExistsError, SessionNotFoundError, TierstoreError)
from .layout import FORMAT_VERSION, check_session_name
from .records import SessionRecord
from .tiers.cold import ColdStore
from .tiers.schema import META_STORE, block_key, chain_of, decode_refs, encode_refs, name_key

log = logging.getLogger(__name__)


def _process_start(pid: int) -> str | None:
    """Start time of ``pid`` (clock ticks since boot) so a reused pid is not mistaken for the holder.

    None for a process that has exited but is not yet reaped (zombie): it holds nothing.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        fields = stat[stat.rindex(b")") + 2:].split()
        if fields[0] in (b"Z", b"X"):
            return None
        return fields[19].decode()
    except (OSError, IndexError, ValueError):
        return None


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


@dataclass(frozen=True)
class Lease:
    session: str
    pid: int
    host: str
    boot: str
    start: str | None
    token: str
    since: float

    def to_bytes(self) -> bytes:
        return json.dumps(self.__dict__, sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> "Lease | None":
        try:
            return cls(**json.loads(data))
        except (ValueError, TypeError):
            return None  # an unreadable lease protects nothing

    def alive(self) -> bool:
        if self.host != socket.gethostname() or self.boot != _boot_id():
            return self.host != socket.gethostname()  # other host: cannot check, assume alive
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        return _process_start(self.pid) == self.start


@dataclass(frozen=True)
class GcReport:
    orphan_blocks: int
    orphan_bytes: int
    deleted: bool
    skipped_live_writers: int = 0


class SessionStore:
    """Persistent sessions over one ``ColdStore``."""

    def __init__(self, cold: ColdStore, remote=None, host: str | None = None) -> None:
        """remote: a ``tierstore.remote.RemoteTier`` shared by every host (None: this LMDB only);
        host: this host's name on it (default: the hostname)."""
        self.cold = cold
        self._mine: dict[str, Lease] = {}  # leases this object handed out and not released (token -> lease)
        self.replica = None
        if remote is not None:
            from .remote import Replica
            self.replica = Replica(self, remote, host or socket.gethostname())

    def close_remote(self) -> None:
        """Stop the remote heartbeat and close its connection (the store closes)."""
        if self.replica is not None:
            self.replica.close()

    # -- reading ---------------------------------------------------------------------------

    def read(self, name: str, txn: lmdb.Transaction | None = None) -> SessionRecord:
        """The committed record; with a remote tier, a newer remote version is pulled first
        (outside a caller's transaction)."""
        check_session_name(name)
        if self.replica is not None and txn is None:
            self.replica.refresh(name)
        data = self.cold.get("sessions", name_key(name), txn=txn)
        if data is None:
            if self.replica is not None:
                pending = self.replica.puller.pending(name)
                if pending is not None:
                    return pending
                self.replica.puller.raise_failed(name)  # pulled, but damaged: not "not found"
            raise SessionNotFoundError("no such session", session=name)
        return SessionRecord.unseal(name, bytes(data))

    def exists(self, name: str) -> bool:
        """Committed here or (with a remote tier, whose newer state is synced first) on the remote."""
        if self.replica is not None:
            check_session_name(name)
            remote = self.replica.refresh(name)  # one round trip: syncs and says whether the remote has it
            if self.exists_local(name):
                return True
            return remote if remote is not None else self.replica.exists(name)
        return self.exists_local(name)

    def exists_local(self, name: str) -> bool:
        check_session_name(name)
        if self.replica is not None and self.replica.puller.pending(name) is not None:
            return True
        return self.cold.get("sessions", name_key(name)) is not None

    def names(self) -> list[str]:
        return [k.decode() for k, _ in self.cold.scan("sessions", keys_only=True)]

    def committed_prefix(self, chains: Sequence[bytes]) -> int:
        """How many leading positions of ``chains`` (``chain_hashes`` of some token ids) committed
        records name: the longest stored prefix of those ids that a new record may name.

        A position a record names has every layer's block (``commit`` checks it) and keeps them
        while any record names it; blocks that no record names (orphans) do not count: ``gc``
        may delete them at any time. One read transaction."""
        with self.cold.read() as txn:
            for i, c in enumerate(chains):
                if self.cold.get("refs", c, txn=txn) is None:
                    return i
            return len(chains)

    def records(self) -> list[SessionRecord | TierstoreError]:
        """Every record in one snapshot; a damaged one is returned as its error."""
        out: list[SessionRecord | TierstoreError] = []
        for k, v in self.cold.scan("sessions"):
            name = k.decode(errors="replace")
            try:
                out.append(SessionRecord.unseal(name, bytes(v)))
            except TierstoreError as e:
                out.append(e)
        return out

    # -- writing ---------------------------------------------------------------------------

    def put_blocks(self, items: Iterable[tuple[bytes, bytes, bytes | None]]) -> int:
        """Write ``(key, block_record, summary_record)`` items in one transaction.

        Content-addressed: a key already stored holds the same content and is kept. Returns
        the bytes newly written. The blocks are orphans until a commit names them.
        """
        items = list(items)

        def fn(txn: lmdb.Transaction) -> int:
            n = self._put_blocks(txn, items)
            self.cold.check_quota(txn)
            return n

        return self.cold.write(fn)  # type: ignore[return-value]

    def _put_blocks(self, txn: lmdb.Transaction, items) -> int:
        blocks, sums = self.cold.db("blocks"), self.cold.db("summaries")
        n = 0
        for key, rec, summ in items:
            if txn.put(key, rec, db=blocks, overwrite=False):
                n += len(key) + len(rec)
            if summ is not None:
                txn.put(key, summ, db=sums)
        return n

    def commit(self, record: SessionRecord, *, expect_new: bool = False,
               summaries: Iterable[tuple[bytes, bytes]] = (), _synced: tuple[int, str] | None = None,
               _publish: bool = True, blocks: Iterable[tuple[bytes, bytes, bytes | None]] = ()) -> SessionRecord:
        """Make ``record`` the session's visible state, atomically.

        Every block the record names must be stored (for all layers); ``MissingBlockError``
        otherwise, with nothing changed. ``summaries`` (key, sealed summary) are rewritten in
        the same transaction (accumulated attention mass).

        With a remote tier the same transaction writes the outbox entry, and the commit is then
        published (``Replica.published``; ``LeaseLostError`` when another host took the lease).
        ``_synced=(version, digest)``: the record was pulled from the remote at that version.
        ``blocks``: ``put_blocks`` items written in the same transaction (one fsync, not two).
        """
        check_session_name(record.name)
        if self.replica is not None and _synced is None:
            self.replica.puller.wait_pulls()  # a record may name blocks a pull has not written yet
        new_chains = record.chains()
        layers = record.layout.num_layers
        summaries = list(summaries)
        blocks = list(blocks)

        def fn(txn: lmdb.Transaction) -> SessionRecord:
            sessions = self.cold.db("sessions")
            if blocks:
                self._put_blocks(txn, blocks)
            old_raw = txn.get(name_key(record.name), db=sessions)
            if old_raw is not None and expect_new:
                raise SessionExistsError("session already exists", session=record.name)
            old_chains = SessionRecord.unseal(record.name, bytes(old_raw)).chains() if old_raw else []
            cur = self.cold.cursor(txn, "blocks")
            for i, c in enumerate(new_chains):
                for layer in range(layers):
                    if not cur.set_key(block_key(c, layer)):
                        raise MissingBlockError("block not stored; cannot commit", session=record.name,
                                                layer=layer, block=i)
            self._adjust_refs(txn, gained=set(new_chains) - set(old_chains),
                              lost=set(old_chains) - set(new_chains), layers=layers)
            sums = self.cold.db("summaries")
            for key, summ in summaries:
                txn.put(key, summ, db=sums)
            txn.put(name_key(record.name), record.seal(), db=sessions)
            self.cold.check_quota(txn)
            if self.replica is not None:
                if _synced is not None:
                    self.replica.set_known(txn, record.name, *_synced)
                else:
                    self.replica.stage(txn, record.name, "commit")
            return record

        out = self.cold.write(fn)
        if self.replica is not None and _synced is None and _publish:
            self.replica.published(record.name)
        return out  # type: ignore[return-value]

    def _adjust_refs(self, txn: lmdb.Transaction, *, gained: set[bytes], lost: set[bytes],
                     layers: int) -> int:
        """Reference counts; positions that drop to zero lose their blocks and summaries."""
        refs = self.cold.db("refs")
        for c in gained:
            n = self._ref_count(txn, c)
            txn.put(c, encode_refs(n + 1), db=refs)
        freed = 0
        for c in lost:
            n = self._ref_count(txn, c)
            if n > 1:
                txn.put(c, encode_refs(n - 1), db=refs)
                continue
            txn.delete(c, db=refs)
            freed += self._delete_position(txn, c)
        return freed

    def _ref_count(self, txn: lmdb.Transaction, chain: bytes) -> int:
        raw = self.cold.get("refs", chain, txn=txn)
        if raw is None:
            return 0
        n = decode_refs(raw)
        if n is None:  # refs carry no checksum: a damaged count must stop the write, not guess
            raise CorruptRecordError(f"reference count of chain position {chain.hex()} is damaged "
                                     f"({len(raw)} bytes); nothing was changed (see `tierstore verify`)")
        return n

    def _delete_position(self, txn: lmdb.Transaction, chain: bytes) -> int:
        """Delete every layer's block and summary at one chain position; returns bytes freed."""
        freed = 0
        for db in ("blocks", "summaries"):
            cur = self.cold.cursor(txn, db)
            if cur.set_range(chain):
                while chain_of(cur.key()) == chain:
                    freed += len(cur.key()) + len(cur.value())
                    if not cur.delete():
                        break
        return freed

    def fork(self, src: str, dst: str, tokens: int | None = None, *, overwrite: bool = False) -> SessionRecord:
        """A new record over the same blocks: cheap (content-addressed). ``tokens`` cuts the prefix."""
        check_session_name(dst)
        rec = self.read(src)
        n = rec.length if tokens is None else int(tokens)
        if not 0 < n <= rec.length:
            raise ValueError(f"fork of {src!r}: tokens must be in 1..{rec.length}, got {tokens}")
        if n % rec.layout.block_tokens and n != rec.length:
            # the partial last block of the fork is a different chain position: not stored
            raise ValueError(f"fork of {src!r}: tokens must be a multiple of block_tokens "
                             f"({rec.layout.block_tokens}) or the full length {rec.length}")
        now = time.time()
        new = rec.with_updates(name=dst, token_ids=rec.token_ids[:n].copy(), created=now, updated=now,
                               last_logits=rec.last_logits if n == rec.length else None,
                               meta={**rec.meta, "forked_from": src})
        return self.commit(new, expect_new=not overwrite)

    def delete(self, names: Iterable[str], *, _synced: int | None = None) -> int:
        """Delete sessions and every block only they referenced, in one transaction. With a
        remote tier the deletion is published too (``_synced``: the remote deleted them at that
        version; only this host's copy goes)."""
        names = [check_session_name(n) for n in names]
        replica = self.replica if _synced is None else None
        if replica is not None:
            replica.puller.wait_pulls()
        if replica is not None:  # a session only the remote holds: pulled, then deleted as any other
            for n in names:
                if not self.exists_local(n):
                    self.replica.refresh(n)

        def fn(txn: lmdb.Transaction) -> int:
            sessions, leases = self.cold.db("sessions"), self.cold.db("leases")
            freed = 0
            for name in names:
                raw = txn.get(name_key(name), db=sessions)
                if raw is None:
                    raise SessionNotFoundError("no such session", session=name)
                rec = SessionRecord.unseal(name, bytes(raw))
                freed += len(raw)
                txn.delete(name_key(name), db=sessions)
                txn.delete(name_key(name), db=leases)
                freed += self._adjust_refs(txn, gained=set(), lost=set(rec.chains()),
                                           layers=rec.layout.num_layers)
                if replica is not None:
                    replica.stage(txn, name, "delete")
                elif self.replica is not None:
                    self.replica.set_known(txn, name, _synced, None)
            return freed

        out = self.cold.write(fn)
        if replica is not None:
            for name in names:
                self.replica.published(name)
        return out  # type: ignore[return-value]

    # -- leases ----------------------------------------------------------------------------

    def acquire(self, name: str) -> Lease:
        check_session_name(name)
        me = Lease(session=name, pid=os.getpid(), host=socket.gethostname(), boot=_boot_id(),
                   start=_process_start(os.getpid()), token=uuid.uuid4().hex, since=time.time())

        def fn(txn: lmdb.Transaction) -> Lease:
            raw = self.cold.get("leases", name_key(name), txn=txn)
            held = Lease.from_bytes(bytes(raw)) if raw else None
            if held is not None and held.alive():
                since = time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(held.since))
                if (held.pid, held.host, held.boot, held.start) == (me.pid, me.host, me.boot, me.start):
                    raise SessionBusyError(
                        f"this process (pid {held.pid}) holds it, through a TieredCache still open (or a "
                        f"put_session in progress) since {since}: close() that cache first, or resume it "
                        "read-only (TieredCache.resume(..., readonly=True)), or store.fork() it to write a copy",
                        session=name)
                raise SessionBusyError(f"another writer holds it (pid {held.pid} on {held.host} since {since})",
                                       session=name)
            txn.put(name_key(name), me.to_bytes(), db=self.cold.db("leases"))
            return me

        lease = self.cold.write(fn)
        self._mine[lease.token] = lease  # type: ignore[union-attr]
        if self.replica is not None:
            try:
                self.replica.acquire(lease)
            except BaseException:
                self.release(lease)
                raise
        return lease  # type: ignore[return-value]

    def release(self, lease: Lease) -> None:
        self._mine.pop(lease.token, None)
        if self.replica is not None:
            self.replica.release(lease)
        if self.cold.closed or self.cold.readonly:
            return

        def fn(txn: lmdb.Transaction) -> None:
            key = name_key(lease.session)
            raw = self.cold.get("leases", key, txn=txn)
            if raw is not None and (held := Lease.from_bytes(bytes(raw))) and held.token == lease.token:
                txn.delete(key, db=self.cold.db("leases"))

        self.cold.write(fn)

    def release_all(self) -> None:
        """Release every lease this process still holds through this object (the store closes:
        a lease left behind would refuse this process's next writer of the session)."""
        for lease in list(self._mine.values()):
            try:
                self.release(lease)
            except TierstoreError as e:
                log.warning("releasing the lease of session %r: %s", lease.session, e)

    def live_leases(self) -> list[Lease]:
        out = []
        for _, v in self.cold.scan("leases"):
            lease = Lease.from_bytes(bytes(v))
            if lease is not None and lease.alive():
                out.append(lease)
        return out

    # -- garbage ---------------------------------------------------------------------------

    def orphans(self, txn: lmdb.Transaction | None = None) -> tuple[list[bytes], int]:
        """Block and summary keys whose chain position no record references."""
        keys: list[bytes] = []
        size = 0
        with (self.cold.read() if txn is None else contextlib.nullcontext(txn)) as t:
            refs = self.cold.db("refs")
            for db in ("blocks", "summaries"):
                for k, v in self.cold.scan(db, txn=t):
                    if t.get(chain_of(k), db=refs) is None:
                        keys.append(bytes([0 if db == "blocks" else 1]) + k)
                        size += len(k) + len(v)
        return keys, size

    def gc(self, *, dry_run: bool = False, force: bool = False) -> GcReport:
        """Reclaim orphans. Skipped while a live writer holds a lease (its pending blocks are
        orphans until it commits) unless ``force``."""
        live = self.live_leases()
        keys, size = self.orphans()
        if dry_run or not keys or (live and not force):
            return GcReport(len(keys), size, deleted=False, skipped_live_writers=len(live) if not force else 0)

        def fn(txn: lmdb.Transaction) -> int:
            refs = self.cold.db("refs")
            n = 0
            for k in keys:
                db = "blocks" if k[0] == 0 else "summaries"
                if txn.get(chain_of(k[1:]), db=refs) is None:  # still an orphan
                    n += bool(txn.delete(k[1:], db=self.cold.db(db)))
            return n

        self.cold.write(fn)
        return GcReport(len(keys), size, deleted=True)

    # -- store meta ------------------------------------------------------------------------

    def init_meta(self, block_tokens: int) -> dict:
        def fn(txn: lmdb.Transaction) -> dict:
            raw = self.cold.get("meta", META_STORE, txn=txn)
            if raw is None:
                meta = {"format_version": FORMAT_VERSION, "created": time.time(),
                        "block_tokens": block_tokens}
                txn.put(META_STORE, json.dumps(meta).encode(), db=self.cold.db("meta"))
                return meta
            try:
                meta = json.loads(bytes(raw))
                version = int(meta.get("format_version", 0))
            except (ValueError, TypeError, AttributeError):
                raise CorruptRecordError(f"{self.cold.path}: the store's metadata record is unreadable "
                                         "(see `tierstore verify`)") from None
            if version > FORMAT_VERSION:  # never write records of an older format into a newer store
                raise FormatVersionError(f"{self.cold.path}: store written by format version {version}; this "
                                         f"tierstore reads <= {FORMAT_VERSION} (upgrade tierstore)")
            return meta

        return self.cold.write(fn)  # type: ignore[return-value]

    def meta(self) -> dict | None:
        raw = self.cold.get("meta", META_STORE)
        return None if raw is None else json.loads(raw)


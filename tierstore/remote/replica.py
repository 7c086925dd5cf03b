"""``Replica``: one host's ``SessionStore`` kept in step with the remote tier.

* **Read** (``refresh``): a session whose remote version is newer than the one this host last
  saw is *pulled*: its record is read, the blocks this host lacks are fetched (only those:
  positions already committed locally are never fetched again), every block's checksum is
  verified against its key, and the record is committed to local LMDB in one transaction. A
  record whose blocks are not all on the remote is a ``MissingBlockError`` and nothing changes
  locally: never a partial resume.
* **Commit**: the local commit writes, in its own transaction, an outbox entry (the durable
  outbox); then ``publish`` runs the remote protocol (docs/decisions.md, "Remote tier"): the
  publish lock, the intent, blocks not yet referenced remotely (prefix dedup), references, the
  record (fenced, compare-and-set on the version), old references dropped, the intent cleared.
  Redis down, paused or out of memory: the entry stays, the background thread publishes it when
  Redis is back. A commit the remote refuses (a newer fencing token was issued, or another host
  committed the version this one built on) is kept as a fork named
  ``<session>.fork-<host>-<n>`` on both tiers; a writer whose lease was taken gets
  ``LeaseLostError`` naming the fork.
* **Leases**: a local lease (as without a remote) plus the remote lease, whose fencing token the
  commit carries; a thread renews held leases every third of their TTL.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
import time
import weakref
from dataclasses import dataclass, field

from ..errors import (CorruptBlockError, CorruptRecordError, LeaseLostError, MissingBlockError,
                      RemoteUnavailableError, SessionBusyError, TierstoreError)
from ..codec import open_envelope
from ..records import SUMMARY_KIND, SessionRecord
from ..tiers.schema import KNOWN_PREFIX, OUTBOX_PREFIX, block_key, name_key
from .tier import RemoteTier

log = logging.getLogger(__name__)

POSITIONS_PER_BATCH = 16   # chain positions read/uploaded per round trip (x layers blocks)


def digest(sealed: bytes) -> str:
    """Identity of a sealed record's bytes (the remote keeps it next to the record)."""
    return hashlib.blake2b(sealed, digest_size=16, person=b"tierstore-rec").hexdigest()


def fork_name(name: str, host: str, n: int) -> str:
    tail = f".fork-{re.sub(r'[^A-Za-z0-9_-]', '-', host)[:24]}-{n}"
    return name[:128 - len(tail)] + tail


@dataclass
class PublishReport:
    """What ``Replica.drain`` did: sessions published, forks made (session, fork), entries left."""
    published: list[str] = field(default_factory=list)
    forks: list[tuple[str, str]] = field(default_factory=list)
    pending: int = 0
    error: str | None = None


class Replica:
    """Ties ``sessions`` (one host's local LMDB) to ``remote``; ``host`` names this host.
    ``sessions=None``: the remote alone (the janitor, ``tierstore gc --remote``)."""

    def __init__(self, sessions, remote: RemoteTier, host: str, *, retry_s: float = 2.0,
                 background: bool = True, stream_bytes: int = 32 << 20) -> None:
        self.sessions, self.remote, self.host = sessions, remote, host
        self.cold = sessions.cold if sessions is not None else None
        self.retry_s = retry_s
        self._held: dict[str, tuple[str, str, int]] = {}  # lease token -> (session, holder, fence)
        self._unreleased: list[tuple[str, str]] = []      # (session, holder) a release could not reach
        self.stream_bytes = stream_bytes                   # pulls this large land in LMDB in the background
        self._pending: dict[str, tuple[SessionRecord, threading.Thread]] = {}
        self._failed: dict[str, tuple[int, BaseException]] = {}  # session -> (remote version, why it did not land)
        self._landed: list[tuple[float, list[bytes]]] = []
        self._lock = threading.RLock()                     # one publish at a time in this process
        self._down_until = 0.0                             # breaker: skip the remote until then
        self._token: tuple[str, str] | None = None         # (session, publish lock token) while publishing
        self.last_error: str | None = None
        self.forks: list[tuple[str, str]] = []
        self._stop = threading.Event()
        self._thread = None
        if background and self.cold is not None and not self.cold.readonly:
            self._thread = threading.Thread(target=_loop, args=(weakref.ref(self), self._stop),
                                            name="tierstore-remote", daemon=True)
            self._thread.start()

    def close(self) -> None:
        self.wait_pulls()
        self._unstage_landed(older_than=0.0)
        self._stop.set()
        t, self._thread = self._thread, None
        if t is not None and t is not threading.current_thread():
            t.join(timeout=10)
        self.remote.close()

    # -- breaker -------------------------------------------------------------------------------

    def _up(self) -> bool:
        return time.monotonic() >= self._down_until

    def _down(self, e: RemoteUnavailableError) -> None:
        self._down_until = time.monotonic() + self.retry_s
        if self.last_error != str(e):
            log.warning("%s; working on local LMDB, unpublished commits wait in the outbox", e)
        self.last_error = str(e)

    def _ok(self) -> None:
        if self.last_error is not None:
            log.info("remote %s is reachable again", self.remote.url)
        self.last_error = None

    # -- local bookkeeping (meta sub-database) -------------------------------------------------

    def _meta(self, prefix: bytes, name: str, txn=None) -> dict | None:
        raw = self.cold.get("meta", prefix + name_key(name), txn=txn)
        return json.loads(bytes(raw)) if raw is not None else None

    def known(self, name: str, txn=None) -> dict | None:
        """``{"ver", "digest"}``: the remote version this host last synced ``name`` at."""
        return self._meta(KNOWN_PREFIX, name, txn)

    def set_known(self, txn, name: str, ver: int, dig: str | None) -> None:
        txn.put(KNOWN_PREFIX + name_key(name), json.dumps({"ver": ver, "digest": dig}).encode(),
                db=self.cold.db("meta"))

    def outbox(self, txn=None) -> dict[str, dict]:
        """Every unpublished change: session -> entry."""
        return {bytes(k[len(OUTBOX_PREFIX):]).decode(): json.loads(bytes(v))
                for k, v in self.cold.scan("meta", OUTBOX_PREFIX, txn=txn)}

    def stage(self, txn, name: str, op: str) -> None:
        """Inside a local commit's (or delete's) transaction: the outbox entry of the change."""
        known = self.known(name, txn) or {}
        fence, holder = next(((f, h) for s, h, f in self._held.values() if s == name), (0, ""))
        entry = {"op": op, "base": int(known.get("ver", 0)), "fence": fence, "holder": holder, "host": self.host,
                 "at": time.time()}
        txn.put(OUTBOX_PREFIX + name_key(name), json.dumps(entry).encode(), db=self.cold.db("meta"))

    def _finish(self, name: str, entry: dict, ver: int | None, dig: str | None) -> None:
        """Drop the published entry (unless a newer local change replaced it) and note the version."""
        def fn(txn):
            key = OUTBOX_PREFIX + name_key(name)
            raw = txn.get(key, db=self.cold.db("meta"))
            if raw is not None and json.loads(bytes(raw)) == entry:
                txn.delete(key, db=self.cold.db("meta"))
                if ver is not None:
                    self.set_known(txn, name, ver, dig)
        self.cold.write(fn)

    # -- leases --------------------------------------------------------------------------------

    def acquire(self, lease) -> int:
        """The remote lease for a local ``lease`` just taken: its fencing token (0 when the
        remote is unreachable: the writer works locally and its commits are checked on publish)."""
        holder = f"{lease.token} {self.host} {lease.pid}"
        try:
            if not self._up():  # the breaker is open: work locally, publish later
                fence, cur, left = 0, None, 0
            else:
                fence, cur, left = self.remote.acquire(lease.session, holder)
        except RemoteUnavailableError as e:
            self._down(e)
            fence, cur, left = 0, None, 0
        if not fence and cur is None:
            # the request may still reach Redis (a paused node runs it when it wakes): this writer
            # may hold the lease without its fence; commits name the holder, release removes it
            with self._lock:
                self._held[lease.token] = (lease.session, holder, 0)
            return 0
        if not fence:
            who = (cur or "").split(" ")
            raise SessionBusyError(f"host {who[1] if len(who) > 1 else '?'} (pid {who[2] if len(who) > 2 else '?'}) "
                                   f"holds its writer lease on the remote tier {self.remote.url} (expires in "
                                   f"{left / 1000:.1f} s unless renewed)", session=lease.session)
        with self._lock:
            self._held[lease.token] = (lease.session, holder, fence)
        return fence

    def release(self, lease) -> None:
        with self._lock:
            held = self._held.pop(lease.token, None)
        if held is not None:
            self._release(held[0], held[1])

    def _release(self, name: str, holder: str) -> None:
        try:
            if self._up():
                self.remote.release(name, holder)
                return
        except RemoteUnavailableError as e:
            self._down(e)
        with self._lock:
            self._unreleased.append((name, holder))  # tried again by the heartbeat

    def renew(self) -> None:
        with self._lock:
            retry, self._unreleased = self._unreleased, []
        for name, holder in retry:
            self._release(name, holder)
        for token, (name, holder, _) in list(self._held.items()):
            try:
                if not self.remote.renew(name, holder) and token in self._held:
                    log.warning("session %r: the remote lease expired (this writer was paused or cut off); "
                                "its commits publish only if no other host took the lease since", name)
            except RemoteUnavailableError as e:
                self._down(e)
                return

    # -- read side -----------------------------------------------------------------------------

    def refresh(self, name: str) -> None:
        """Pull ``name`` when the remote holds a version this host has not seen. Never raises
        for an unreachable remote (the local state is used); raises for wrong remote data."""
        if self.cold.readonly or not self._up():
            return
        if name in self._pending:
            return  # being pulled right now
        if self.cold.get("meta", OUTBOX_PREFIX + name_key(name)) is not None:
            return  # a local change not yet published is this host's newest state
        try:
            ver, dig = self.remote.head(name)
        except RemoteUnavailableError as e:
            self._down(e)
            return
        self._ok()
        if not ver:
            return
        failed = self._failed.get(name)
        if failed is not None and failed[0] == ver:
            raise failed[1]  # that version's blocks are damaged on the remote: the same typed error
        known = self.known(name) or {}
        if known.get("ver") == ver:
            return
        if dig is None:  # deleted on the remote after the version this host has: so is its copy here
            if self.sessions.exists_local(name) and int(known.get("ver", 0)) < ver:
                log.info("session %r: deleted on the remote tier (version %d); deleting this host's copy", name, ver)
                self.sessions.delete([name], _synced=ver)
            return
        local = self.cold.get("sessions", name_key(name))
        if local is not None and digest(bytes(local)) == dig:
            self.cold.write(lambda txn: self.set_known(txn, name, ver, dig))
            return
        try:
            self.pull(name)
        except RemoteUnavailableError as e:
            self._down(e)

    def pull(self, name: str) -> SessionRecord | None:
        """Fetch the remote record of ``name`` and what this host lacks of it into local LMDB."""
        raw, ver = self.remote.record(name)
        if raw is None:
            return None
        try:
            rec = SessionRecord.unseal(name, raw)
        except CorruptRecordError as e:
            raise CorruptRecordError(f"{e.reason} (the record on the remote tier {self.remote.url}); nothing "
                                     "was resumed", session=name) from None
        chains, layers = rec.chains(), rec.layout.num_layers
        with self.cold.read() as txn:
            need = [i for i, c in enumerate(chains) if self.cold.get("refs", c, txn=txn) is None]
        items = []
        for at in range(0, len(need), POSITIONS_PER_BATCH):
            part = need[at:at + POSITIONS_PER_BATCH]
            items += self._fetched(name, chains, part, layers,
                                   self.remote.fetch_positions([chains[i] for i in part], layers))
        where = {key: (i, layer) for i in need for layer, key in
                 ((la, block_key(chains[i], la)) for la in range(layers))}
        size = sum(len(d) for _, d, _ in items)
        if size < self.stream_bytes:
            self._verify(name, items, where)
            out = self.sessions.commit(rec, _synced=(ver, digest(raw)), blocks=items)
        else:  # readable now from memory; verified and written to LMDB by a thread of its own
            out = rec
            self._land_later(rec, (ver, digest(raw)), items, where)
        log.info("session %r: pulled version %d from %s (%d of %d positions fetched)", name, ver,
                 self.remote.url, len(need), len(chains))
        return out

    def _fetched(self, name: str, chains, part, layers: int, got) -> list:
        """``put_blocks`` items of fetched positions: every block present, every summary sealed
        for its key (a damaged one is dropped: it is recomputed from its block)."""
        items = []
        for i, values in zip(part, got):
            for layer in range(layers):
                data, summ = values[layer], values[layers + layer]
                key = block_key(chains[i], layer)
                where = dict(session=name, layer=layer, block=i)
                if data is None:
                    raise MissingBlockError(f"block not on the remote tier {self.remote.url} (evicted or lost); "
                                            "nothing was resumed", **where)
                if summ is not None:
                    try:  # its checksum (sealed for this key); the tensors are built when it is used
                        open_envelope(key, SUMMARY_KIND, summ, error=CorruptBlockError, **where)
                    except CorruptBlockError:
                        log.warning("session %r layer %d block %d: damaged summary on the remote tier "
                                    "dropped (it is recomputed from the block)", name, layer, i)
                        summ = None
                items.append((key, data, summ))
        return items

    def _verify(self, name: str, items, where: dict) -> None:
        """Every block's checksum and structure against its key (``CorruptBlockError`` naming it)."""
        from ..codec import verify_record
        for key, data, _ in items:
            i, layer = where[key]
            try:
                verify_record(key, data, session=name, layer=layer, block=i)
            except CorruptBlockError as e:
                raise CorruptBlockError(f"{e.reason} (fetched from the remote tier {self.remote.url}); "
                                        "nothing was resumed", session=name, layer=layer, block=i) from None

    # -- pulls that land in the background -----------------------------------------------------

    def pending(self, name: str) -> SessionRecord | None:
        """The record of a pull of ``name`` whose LMDB write has not landed yet."""
        p = self._pending.get(name)
        return p[0] if p is not None else None

    def _land_later(self, rec: SessionRecord, synced: tuple[int, str], items: list, where: dict) -> None:
        """A large pull: its blocks readable from memory at once (``ColdStore.stage``; a resume
        reads them from there, checking each checksum as it does from LMDB), verified again and
        written with the record in one LMDB transaction by a thread; until it lands the record is
        ``pending``, and a local commit waits for it (``wait_pulls``)."""
        self.cold.stage("blocks", [(k, d) for k, d, _ in items])
        self.cold.stage("summaries", [(k, s) for k, _, s in items if s is not None])
        keys = [k for k, _, _ in items]

        def land() -> None:
            try:
                self._verify(rec.name, items, where)
                self.sessions.commit(rec, _synced=synced, blocks=items)
            except BaseException as e:  # noqa: BLE001 - the resume reading these blocks sees it too
                log.error("session %r: the pulled version did not land in local LMDB: %s", rec.name, e)
                self._failed[rec.name] = (synced[0], e)  # read() raises it from now on
            finally:  # staged blocks go a while later, landed or not (a reader may be reading them)
                with self._lock:
                    self._pending.pop(rec.name, None)
                    self._landed.append((time.monotonic(), keys))

        t = threading.Thread(target=land, name="tierstore-pull", daemon=True)
        with self._lock:
            self._pending[rec.name] = (rec, t)
        t.start()

    def wait_pulls(self) -> None:
        """Until every pull of this process has landed in LMDB (or failed)."""
        for _, t in list(self._pending.values()):
            if t is not threading.current_thread():
                t.join()

    def _unstage_landed(self, *, older_than: float = 5.0) -> None:
        """Drop staged blocks that landed ``older_than`` seconds ago (read transactions begun
        before they landed are long over)."""
        now = time.monotonic()
        with self._lock:
            done = [x for x in self._landed if now - x[0] >= older_than]
            self._landed = [x for x in self._landed if now - x[0] < older_than]
        for _, keys in done:
            self.cold.unstage("blocks", keys)
            self.cold.unstage("summaries", keys)

    def exists(self, name: str) -> bool:
        if not self._up():
            return False
        try:
            return self.remote.head(name)[1] is not None
        except RemoteUnavailableError as e:
            self._down(e)
            return False

    # -- publish -------------------------------------------------------------------------------

    def published(self, name: str) -> None:
        """After a local commit or delete: publish it now (``LeaseLostError`` when the remote
        refused it because another writer took the lease); an unreachable remote leaves it in
        the outbox for the background thread."""
        if not self._up():
            return
        try:
            self.publish(name, raise_lost=True)
        except RemoteUnavailableError as e:
            self._down(e)

    def drain(self) -> PublishReport:
        """Publish every outbox entry (stops at the first unreachable-remote error)."""
        rep = PublishReport()
        box = self.outbox()
        for name in sorted(box):
            try:
                res = self.publish(name)
            except RemoteUnavailableError as e:
                self._down(e)
                rep.error = str(e)
                break
            if res is not None and res[0] == "ok":
                rep.published.append(name)
            elif res is not None and res[0] == "fork":
                rep.forks.append((name, res[1]))
        rep.pending = len(self.outbox())
        return rep

    def publish(self, name: str, *, raise_lost: bool = False):
        """Publish the outbox entry of ``name``: ``("ok", version)``, ``("fork", fork name)``,
        ``("pending", reason)`` or None (nothing to publish)."""
        with self._lock:
            entry = self._meta(OUTBOX_PREFIX, name)
            if entry is None:
                return None
            token = self._lock_publish(name)
            if token is None:
                return ("pending", "another publisher holds this session's publish lock")
            self._token = (name, token)
            try:
                self._recover(name)
                raw = self.cold.get("sessions", name_key(name))
                if entry["op"] == "delete" or raw is None:
                    return self._publish_delete(name, entry, token)
                raw = bytes(raw)
                rec = SessionRecord.unseal(name, raw)
                status, ver = self._publish_record(rec, raw, entry, lock=token)
            finally:
                self._token = None
                try:
                    self.remote.unlock(name, token)
                except RemoteUnavailableError:
                    pass  # expires by itself
            self._ok()
            if status == "ok":
                self._finish(name, entry, ver, digest(raw))
                return ("ok", ver)
            if status == "unlocked":
                return ("pending", "the publish lock expired")
            fork = self._fork(rec, entry, status)
            self._finish(name, entry, -1, None)  # the next read pulls the remote's version of name
            if raise_lost and status in ("fenced", "busy"):
                raise LeaseLostError(f"another writer took its lease on {self.remote.url} while this one was "
                                     f"paused or cut off; this commit was kept as session {fork!r}", session=name,
                                     fork=fork)
            log.warning("session %r: the remote refused this host's commit (%s); kept as session %r",
                        name, status, fork)
            return ("fork", fork)

    def _lock_publish(self, name: str) -> str | None:
        from ..sessions import _boot_id, _process_start
        me = os.getpid()
        owner = f"{self.host} {me} {_process_start(me)} {_boot_id()}"
        token, held = self.remote.lock(name, owner)
        if token is None and held:
            f = held.split(" ")
            if len(f) == 5 and f[1] == self.host and f[4] == _boot_id() and _process_start(int(f[2])) != f[3]:
                log.info("session %r: taking over the publish lock of dead process %s of this host", name, f[2])
                token, _ = self.remote.lock(name, owner, steal=held)
        return token

    def _touch(self) -> None:
        """Renew the publish lock between batches (a lost lock makes the commit step refuse)."""
        if self._token is not None:
            self.remote.touch_lock(*self._token)

    def _publish_record(self, rec: SessionRecord, raw: bytes, entry: dict, *, lock: str) -> tuple[str, int]:
        name, layers = rec.name, rec.layout.num_layers
        base, fence, holder = entry["base"], entry["fence"], entry.get("holder", "")
        info = self.remote.info(name)
        if info["has_record"] and info["digest"] == digest(raw):
            return "ok", info["ver"]  # published before (a crash came before the outbox entry went)
        # refused in advance (the commit step checks again, atomically): nothing uploaded in vain
        if fence and info["fence"] != fence:
            return "fenced", info["ver"]
        if info["has_record"] and info["ver"] != base:
            return "conflict", info["ver"]
        if not fence and info["lease"] not in (None, holder):
            return "busy", info["ver"]
        old_raw, _ = self.remote.record(name)
        old = self._chains_of(name, old_raw)
        new = rec.chains()
        self.remote.add_intent(name, set(old) | set(new) | {b"layers:%d" % layers})
        self._upload(rec, new)
        missing = self.remote.ref(name, new, layers)
        if missing:  # evicted or lost between upload and reference: upload those again, once
            again = sorted({i for i, _ in missing})
            self._upload(rec, [new[i] for i in again], force=True)
            missing = self.remote.ref(name, [new[i] for i in again], layers)
            if missing:
                raise RemoteUnavailableError(f"session {name!r}: blocks vanish between upload and reference "
                                             "(remote memory full?)", url=self.remote.url)
        status, ver = self.remote.commit(name, raw, digest(raw), base=base, fence=fence, host=self.host, lock=lock,
                                         holder=holder)
        if status == "ok":
            self.remote.unref(name, sorted(set(old) - set(new)), layers)
            self.remote.index(name)
            self.remote.clear_intent(name)
        else:
            self._recover(name)
        return status, ver

    def _publish_delete(self, name: str, entry: dict, token: str):
        old_raw, ver = self.remote.record(name)
        if old_raw is None:
            self._finish(name, entry, ver, None)
            return ("ok", ver)
        old = self._chains_of(name, old_raw)
        layers = SessionRecord.unseal(name, old_raw).layout.num_layers if old else 1
        status, ver = self.remote.delete(name, base=entry["base"], fence=entry["fence"], lock=token,
                                         holder=entry.get("holder", ""))
        if status == "ok":
            self.remote.unref(name, old, layers)
            self.remote.index(name, present=False)
        else:
            log.warning("session %r: deleted here, but kept on the remote tier (%s: another host wrote or "
                        "holds it since)", name, status)
        self._finish(name, entry, ver if status == "ok" else -1, None)
        return ("ok", ver) if status == "ok" else ("kept", status)

    def _chains_of(self, name: str, raw: bytes | None) -> list[bytes]:
        if raw is None:
            return []
        try:
            return SessionRecord.unseal(name, raw).chains()
        except TierstoreError as e:
            log.warning("session %r: the remote record is unreadable (%s); `tierstore gc --remote` drops "
                        "its stale references", name, e)
            return []

    def _upload(self, rec: SessionRecord, chains: list[bytes], *, force: bool = False) -> None:
        """Send the positions of ``chains`` that no remote record references yet (all with ``force``)."""
        layers = rec.layout.num_layers
        todo = chains if force else [c for c, ref in zip(chains, self.remote.referenced(chains)) if not ref]
        skipped = len(chains) - len(todo)
        self.remote.counters["skipped_positions"] += skipped
        index = {c: i for i, c in enumerate(rec.chains())}
        for at in range(0, len(todo), POSITIONS_PER_BATCH):
            part = todo[at:at + POSITIONS_PER_BATCH]
            keys = [block_key(c, la) for c in part for la in range(layers)]
            with self.cold.read() as txn:
                blocks = self.cold.get_many("blocks", keys, txn=txn)
                sums = self.cold.get_many("summaries", keys, txn=txn)
            items = []
            for j, c in enumerate(part):
                bl = blocks[j * layers:(j + 1) * layers]
                for la, b in enumerate(bl):
                    if b is None:
                        raise MissingBlockError("block not stored locally; cannot publish", session=rec.name,
                                                layer=la, block=index.get(c))
                items.append((c, [bytes(b) for b in bl], [bytes(s) if s is not None else None
                                                         for s in sums[j * layers:(j + 1) * layers]]))
            self.remote.upload(items)
            self._touch()

    def _recover(self, name: str) -> None:
        """Finish or undo a publish of ``name`` that stopped half-way (crash, outage): every
        position its intent lists is referenced for ``name`` iff the current remote record names
        it. Idempotent (reference sets)."""
        intent = self.remote.intent(name)
        if not intent:
            return
        layers = next((int(m[7:]) for m in intent if m.startswith(b"layers:")), None)
        chains = [m for m in intent if not m.startswith(b"layers:")]
        raw, _ = self.remote.record(name)
        named = set(self._chains_of(name, raw))
        if layers is None:
            layers = SessionRecord.unseal(name, raw).layout.num_layers if raw else 1
        keep = [c for c in chains if c in named]
        drop = [c for c in chains if c not in named]
        if keep:
            self.remote.ref(name, keep, layers)
        if drop:
            self.remote.unref(name, drop, layers)
        self.remote.clear_intent(name)
        if raw is not None:
            self.remote.index(name)

    def _fork(self, rec: SessionRecord, entry: dict, status: str) -> str:
        """Keep a refused commit as a new session (local commit + publish)."""
        for n in range(1, 1000):
            fork = fork_name(rec.name, self.host, n)
            if not self.sessions.exists_local(fork) and not self.exists(fork):
                break
        else:  # pragma: no cover - 1000 forks of one session by one host
            raise TierstoreError(f"session {rec.name!r}: no free fork name")
        meta = {**rec.meta, "forked_from": rec.name,
                "conflict": {"host": self.host, "reason": status, "base_version": entry["base"], "at": time.time()}}
        self.sessions.commit(rec.with_updates(name=fork, meta=meta), expect_new=True, _publish=False)
        self.forks.append((rec.name, fork))
        try:
            self.publish(fork)
        except RemoteUnavailableError as e:
            self._down(e)  # published by the background thread
        return fork

    # -- background ----------------------------------------------------------------------------

    def tick(self) -> None:
        """Renew held leases; publish the outbox when the remote is up."""
        if self._landed:
            self._unstage_landed()
        if self._held or self._unreleased:
            self.renew()
        if self._up() and next(self.cold.scan("meta", OUTBOX_PREFIX, keys_only=True), None) is not None:
            self.drain()


def _loop(ref: "weakref.ref[Replica]", stop: threading.Event) -> None:
    """The heartbeat: holds its replica weakly, so a store dropped without close() still goes."""
    while True:
        r = ref()
        if r is None:
            return
        interval = max(0.05, min(r.remote.lease_ttl / 3, r.retry_s))
        del r
        if stop.wait(interval):
            return
        r = ref()
        if r is None:
            return
        try:
            if not r.cold.closed:
                r.tick()
        except Exception as e:  # noqa: BLE001 - the heartbeat must survive anything; logged
            log.warning("remote heartbeat: %s: %s", type(e).__name__, e)
        del r

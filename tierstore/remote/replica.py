"""``Replica``: one host's ``SessionStore`` kept in step with the remote tier.

* **Read** (``refresh``): a session whose remote version is newer than the one this host last
  saw is *pulled* (``pull.Puller``: only the blocks this host lacks, each checked against its
  key, committed with the record in one LMDB transaction; never a partial resume).
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

import json
import logging
import os
import re
import threading
import time
import weakref
from dataclasses import dataclass, field

from ..errors import (LeaseLostError, MissingBlockError,
                      RemoteUnavailableError, SessionBusyError, TierstoreError)
from ..records import SessionRecord
from ..tiers.schema import KNOWN_PREFIX, OUTBOX_PREFIX, block_key, name_key
from .pull import Puller, digest
from .tier import RemoteTier

log = logging.getLogger(__name__)

POSITIONS_PER_BATCH = 16   # chain positions uploaded per round trip (x layers blocks)


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
        self.puller = Puller(sessions, remote, stream_bytes=stream_bytes) if sessions is not None else None
        self._lock = threading.RLock()                     # one publish at a time in this process
        self._down_until = 0.0                             # breaker: skip the remote until then
        self._token: tuple[str, str] | None = None         # (session, publish lock token) while publishing
        self.last_error: str | None = None
        self.forks: list[tuple[str, str]] = []
        self._late: set[str] = set()                       # sessions whose replicas have not confirmed
        self._stop = threading.Event()
        self._thread = None
        if background and self.cold is not None and not self.cold.readonly:
            self._thread = threading.Thread(target=_loop, args=(weakref.ref(self), self._stop),
                                            name="tierstore-remote", daemon=True)
            self._thread.start()

    def close(self) -> None:
        if self.puller is not None:
            self.puller.close()
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

    def refresh(self, name: str) -> bool | None:
        """Pull ``name`` when the remote holds a version this host has not seen. Returns whether
        the remote holds a record of it (None: not asked). Never raises for an unreachable
        remote (the local state is used); raises for wrong remote data."""
        if self.cold.readonly or not self._up():
            return None
        if self.puller.pending(name) is not None:
            return True  # being pulled right now
        if self.cold.get("meta", OUTBOX_PREFIX + name_key(name)) is not None:
            return None  # a local change not yet published is this host's newest state
        try:
            ver, dig = self.remote.head(name)
        except RemoteUnavailableError as e:
            self._down(e)
            return None
        self._ok()
        if not ver:
            return False
        self.puller.raise_failed(name, ver)
        known = self.known(name) or {}
        if known.get("ver") == ver:
            return dig is not None
        if dig is None:  # deleted on the remote after the version this host has: so is its copy here
            if self.sessions.exists_local(name) and int(known.get("ver", 0)) < ver:
                log.info("session %r: deleted on the remote tier (version %d); deleting this host's copy", name, ver)
                self.sessions.delete([name], _synced=ver)
            return False
        local = self.cold.get("sessions", name_key(name))
        if local is not None and digest(bytes(local)) == dig:
            self.cold.write(lambda txn: self.set_known(txn, name, ver, dig))
            return True
        try:
            self.puller.pull(name)
        except RemoteUnavailableError as e:
            self._down(e)
        return True

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
                late = self._unreplicated(name)
                if late:
                    return ("pending", late)
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
            # published before (a crash, or replicas that did not confirm, kept the outbox entry):
            # every position must still be there, as a failover to a replica that missed some
            # of the blocks can leave the record without them
            self._reference(rec, rec.chains())
            return "ok", info["ver"]
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
        self._reference(rec, new)
        status, ver = self.remote.commit(name, raw, digest(raw), base=base, fence=fence, host=self.host, lock=lock,
                                         holder=holder)
        if status == "ok":
            self.remote.unref(name, sorted(set(old) - set(new)), layers)
            self.remote.index(name)
            self.remote.clear_intent(name)
        else:
            self._recover(name)
        return status, ver

    def _reference(self, rec: SessionRecord, chains: list[bytes]) -> None:
        """Reference every position of ``chains`` for ``rec``; one evicted or lost since its
        upload is uploaded again, once."""
        name, layers = rec.name, rec.layout.num_layers
        missing = self.remote.ref(name, chains, layers)
        if missing:
            again = [chains[i] for i in sorted({i for i, _ in missing})]
            self._upload(rec, again, force=True)
            if self.remote.ref(name, again, layers):
                raise RemoteUnavailableError(f"session {name!r}: blocks vanish between upload and reference "
                                             "(remote memory full?)", url=self.remote.url)

    def _unreplicated(self, name: str) -> str | None:
        """Why a publish of ``name`` is not yet safe from losing its primary (replicas that did
        not acknowledge it in time), or None. The outbox entry stays until they do: the next
        drain publishes again (idempotent) and asks again."""
        late = self.remote.wait_replicated()
        if not late:
            self._late.discard(name)
            return None
        why = "not yet acknowledged by the replicas of " + ", ".join(late)
        (log.warning if name not in self._late else log.debug)(
            "session %r: published on %s but %s; it stays in the outbox until they are", name, self.remote.url, why)
        self._late.add(name)
        return why

    def _publish_delete(self, name: str, entry: dict, token: str):
        old_raw, ver = self.remote.record(name)
        if old_raw is None:
            late = self._unreplicated(name)
            if late:
                return ("pending", late)
            self._finish(name, entry, ver, None)
            return ("ok", ver)
        old = self._chains_of(name, old_raw)
        layers = SessionRecord.unseal(name, old_raw).layout.num_layers if old else 1
        status, ver = self.remote.delete(name, base=entry["base"], fence=entry["fence"], lock=token,
                                         holder=entry.get("holder", ""))
        if status == "ok":
            self.remote.unref(name, old, layers)
            self.remote.index(name, present=False)
            late = self._unreplicated(name)
            if late:
                return ("pending", late)
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
        if self.puller is not None:
            self.puller.unstage_landed()
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

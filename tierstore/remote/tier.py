"""``RemoteTier``: every Redis operation of the remote tier, each step atomic in one slot.

The steps (Lua, so each is atomic on a single node and on a cluster, where all its keys share
one hash tag, see ``keys.py``):

* ``upload``  one chain position's blocks and summaries; with a *pending* TTL unless the
  position is already referenced (then only what is absent, without TTL);
* ``ref``     check every layer's block is there, add the session to the position's reference
  set, persist the keys (no TTL: never evicted by ``volatile-*``);
* ``unref``   remove the session from the set; an empty set gives the keys an orphan TTL (or
  deletes them);
* ``commit``  the record, if the writer's fencing token is still the last issued, no other
  writer holds the lease when the writer has no token, the version is the one the writer
  built on, and the writer holds the session's publish lock; else nothing changes;
* ``acquire``/``renew``/``release`` the writer lease (a value with expiry); every acquire
  issues the next fencing token (``HINCRBY``), which ``commit`` checks.

Every method raises ``RemoteUnavailableError`` when Redis cannot serve (down, paused past the
socket timeout, failing over, out of memory) and drops its client, so the next call
reconnects and, on a cluster, re-reads the slot map.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence

from ..errors import RemoteUnavailableError
from .client import Connection, RemoteSpec, describe, is_unavailable, parse_remote
from .keys import Keys

log = logging.getLogger(__name__)

_UPLOAD = """
local referenced = redis.call('SCARD', KEYS[1]) > 0
local wrote = 0
for i = 2, #KEYS do
  local v = ARGV[i]
  if v ~= '' then
    if referenced then
      if redis.call('EXISTS', KEYS[i]) == 0 then redis.call('SET', KEYS[i], v); wrote = wrote + 1 end
    else
      redis.call('SET', KEYS[i], v, 'PX', ARGV[1]); wrote = wrote + 1
    end
  end
end
return wrote
"""

_REF = """
local layers = tonumber(ARGV[2])
for i = 2, layers + 1 do
  if redis.call('EXISTS', KEYS[i]) == 0 then return i - 2 end
end
redis.call('SADD', KEYS[1], ARGV[1])
for i = 2, #KEYS do redis.call('PERSIST', KEYS[i]) end
return -1
"""

_UNREF = """
redis.call('SREM', KEYS[1], ARGV[1])
if redis.call('SCARD', KEYS[1]) > 0 then return 0 end
local ttl = tonumber(ARGV[2])
for i = 2, #KEYS do
  if ttl > 0 then redis.call('PEXPIRE', KEYS[i], ttl) else redis.call('DEL', KEYS[i]) end
end
return 1
"""

# The checks every write of a session's record makes, atomically with the write. KEYS: session
# hash, lease, publish lock. ARGV[1..4]: the version the writer built on, its fencing token (0: it
# has none), its publish-lock token, its lease value (a writer whose acquire timed out may hold the
# lease without knowing its fence). A record that is not there (never written, or deleted) takes any base.
_GUARD = """
local ver = tonumber(redis.call('HGET', KEYS[1], 'ver') or '0')
local fence = tonumber(redis.call('HGET', KEYS[1], 'fence') or '0')
local mine = tonumber(ARGV[2])
if redis.call('GET', KEYS[3]) ~= ARGV[3] then return {'unlocked', ver, fence} end
if mine > 0 and mine ~= fence then return {'fenced', ver, fence} end
if redis.call('HEXISTS', KEYS[1], 'rec') == 1 and ver ~= tonumber(ARGV[1]) then return {'conflict', ver, fence} end
local lease = redis.call('GET', KEYS[2])
if mine == 0 and lease and lease ~= ARGV[4] then return {'busy', ver, fence} end
"""

# ARGV[5..8]: record, digest, host, now
_COMMIT = _GUARD + """
redis.call('HSET', KEYS[1], 'rec', ARGV[5], 'digest', ARGV[6], 'ver', ver + 1, 'host', ARGV[7], 'updated', ARGV[8])
return {'ok', ver + 1, fence}
"""

_DELETE = _GUARD + """
redis.call('HDEL', KEYS[1], 'rec', 'digest', 'host', 'updated')
redis.call('HSET', KEYS[1], 'ver', ver + 1)
return {'ok', ver + 1, fence}
"""

_ACQUIRE = """
local cur = redis.call('GET', KEYS[1])
if cur and cur ~= ARGV[1] then return {0, cur, redis.call('PTTL', KEYS[1])} end
local fence = redis.call('HINCRBY', KEYS[2], 'fence', 1)
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return {fence, '', 0}
"""

_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""

_STEAL = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3]); return 1 end
return 0
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def _s(x) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


class RemoteTier:
    """One remote (Redis single node or cluster) shared by every host of a fleet.

    lease_ttl: seconds a writer lease lives without renewal (a ``Replica`` renews it every
    third of that). pending_ttl: seconds an uploaded, not yet referenced block lives.
    orphan_ttl: seconds a block no record references any more lives (0: deleted at once).
    replicas: how many replicas of every primary must hold a publish before it counts as done
    (``wait_replicated``; fewer when a primary has fewer connected; 0: do not wait; the URL's
    ``?replicas=`` overrides it); replica_timeout: seconds to wait for them.
    lock_ttl: seconds a session's publish lock lives without renewal (a publisher renews it
    after every batch; a crashed one's lock is free after that, or at once to a process of the
    same host that sees the holder is dead)."""

    def __init__(self, spec, *, lease_ttl: float = 30.0, pending_ttl: float = 3600.0,
                 orphan_ttl: float = 3600.0, lock_ttl: float = 30.0, timeout: float = 2.0, batch: int = 64,
                 replicas: int = 1, replica_timeout: float = 1.0) -> None:
        self.spec: RemoteSpec = parse_remote(spec)
        self.replicas = self.spec.replicas if self.spec.replicas is not None else replicas
        self.replica_timeout = replica_timeout
        self.keys = Keys(self.spec.prefix)
        self.lease_ttl, self.pending_ttl, self.orphan_ttl, self.lock_ttl = lease_ttl, pending_ttl, orphan_ttl, lock_ttl
        self.batch = batch
        self.conn = Connection(self.spec, timeout=timeout)
        self.counters = {"uploaded_blocks": 0, "uploaded_bytes": 0, "skipped_positions": 0,
                         "fetched_blocks": 0, "fetched_bytes": 0}

    @property
    def url(self) -> str:
        return self.spec.url

    def close(self) -> None:
        self.conn.close()

    # -- plumbing ----------------------------------------------------------------------------

    def _do(self, fn):
        try:
            return fn(self.conn.client())
        except RemoteUnavailableError:
            self.conn.reset()
            raise
        except Exception as e:  # noqa: BLE001 - classified below
            if is_unavailable(e):
                self.conn.reset()
                raise RemoteUnavailableError(describe(self.spec, e), url=self.url) from e
            raise

    def _eval_many(self, src: str, calls: Sequence[tuple[list[str], list]]) -> list:
        """One script over many key sets, pipelined (split per node on a cluster)."""
        if not calls:
            return []

        def fn(c):
            out = []
            for i in range(0, len(calls), self.batch):
                pipe = c.pipeline(transaction=False)
                for keys, args in calls[i:i + self.batch]:
                    pipe.execute_command("EVAL", src, len(keys), *keys, *args)
                out.extend(pipe.execute())
            return out

        return self._do(fn)

    def _eval(self, src: str, keys: list[str], args: list):
        return self._do(lambda c: c.eval(src, len(keys), *keys, *args))

    def ping(self) -> bool:
        try:
            return bool(self._do(lambda c: c.ping()))
        except RemoteUnavailableError:
            return False

    def _primaries(self, c) -> list[tuple[str, object, str]]:
        """(name, a plain client of it, a key it serves) for every primary (the node itself
        when this is not a cluster)."""
        if not self.conn.cluster:
            return [(self.url, c, self.keys.ack(0))]
        from redis.crc import key_slot
        out = []
        slots = c.nodes_manager.slots_cache
        for node in c.get_primaries():
            for tag in range(4096):  # a key of one of its slots (each tag hits it with p = its share)
                key = self.keys.ack(tag)
                owners = slots.get(key_slot(key.encode()))
                if owners and owners[0].name == node.name:
                    out.append((node.name, node.redis_connection, key))
                    break
        return out

    def wait_replicated(self) -> list[str]:
        """After a publish: block until ``replicas`` replicas of every primary (or all it has
        connected, if fewer) acknowledge every write made so far, at most ``replica_timeout``
        seconds. On each primary one connection writes a short-lived key and then runs
        ``WAIT`` (which waits for that connection's last write, and so for every write the
        primary took before it: its replication stream is in order). Returns the primaries
        whose replicas did not all answer ("host:port: 0 of 1 replicas"); [] when confirmed."""
        if self.replicas <= 0:
            return []
        # within the socket timeout, or a slow replica would read as a remote that is down
        ms = max(1, int(min(self.replica_timeout, 0.75 * self.conn.timeout) * 1000))

        def fn(c):
            late = []
            for name, client, key in self._primaries(c):
                need = min(self.replicas, int(client.info("replication").get("connected_slaves", 0)))
                if not need:
                    continue
                pipe = client.pipeline(transaction=False)  # one connection: the SET, then its WAIT
                pipe.set(key, b"1", px=60_000)
                pipe.execute_command("WAIT", need, ms)
                got = int(pipe.execute()[1])
                if got < need:
                    late.append(f"{name}: {got} of {need} replica{'s' if need > 1 else ''}")
            return late

        return self._do(fn)

    # -- sessions ------------------------------------------------------------------------------

    def head(self, name: str) -> tuple[int, str | None]:
        """(version, digest) of the session's record; version 0 and None when there is none."""
        ver, digest = self._do(lambda c: c.hmget(self.keys.session(name), "ver", "digest"))
        return int(ver or 0), (_s(digest) if digest else None)

    def record(self, name: str) -> tuple[bytes | None, int]:
        """(sealed record or None, version)."""
        rec, ver = self._do(lambda c: c.hmget(self.keys.session(name), "rec", "ver"))
        return (bytes(rec) if rec else None), int(ver or 0)

    def info(self, name: str) -> dict:
        h = self._do(lambda c: c.hgetall(self.keys.session(name)))
        lease = self._do(lambda c: c.get(self.keys.lease(name)))
        return {"ver": int(h.get(b"ver", 0)), "fence": int(h.get(b"fence", 0)),
                "digest": _s(h[b"digest"]) if b"digest" in h else None,
                "host": _s(h[b"host"]) if b"host" in h else None,
                "updated": float(h[b"updated"]) if b"updated" in h else None,
                "has_record": b"rec" in h, "lease": _s(lease) if lease else None}

    def names(self) -> list[str]:
        return sorted(_s(n) for n in self._do(lambda c: c.smembers(self.keys.index)))

    def index(self, name: str, present: bool = True) -> None:
        key = self.keys.index
        self._do(lambda c: c.sadd(key, name) if present else c.srem(key, name))

    def commit(self, name: str, sealed: bytes, digest: str, *, base: int, fence: int, host: str,
               lock: str, holder: str = "") -> tuple[str, int]:
        k = self.keys
        st, ver, _ = self._eval(_COMMIT, [k.session(name), k.lease(name), k.session(name) + ":pub"],
                                [base, fence, lock, holder, sealed, digest, host, repr(time.time())])
        return _s(st), int(ver)

    def delete(self, name: str, *, base: int, fence: int, lock: str, holder: str = "") -> tuple[str, int]:
        k = self.keys
        st, ver, _ = self._eval(_DELETE, [k.session(name), k.lease(name), k.session(name) + ":pub"],
                                [base, fence, lock, holder])
        return _s(st), int(ver)

    # -- the publish lock and the intent -----------------------------------------------------

    def lock(self, name: str, owner: str, *, steal: str | None = None) -> tuple[str | None, str | None]:
        """The session's publish lock (one publisher at a time, fleet-wide; it expires after
        ``lock_ttl`` unless ``touch_lock`` renews it): ``(token, None)``, or ``(None, value of
        the holder)``. ``steal``: take it over if it still holds that value (its holder is dead)."""
        token = f"{uuid.uuid4().hex} {owner}"
        key, px = self.keys.session(name) + ":pub", int(self.lock_ttl * 1000)
        if steal is not None:
            ok = self._eval(_STEAL, [key], [steal, token, px])
        else:
            ok = self._do(lambda c: c.set(key, token, nx=True, px=px))
        if ok:
            return token, None
        cur = self._do(lambda c: c.get(key))
        return None, (_s(cur) if cur else "")

    def touch_lock(self, name: str, token: str) -> bool:
        return bool(self._eval(_RENEW, [self.keys.session(name) + ":pub"], [token, int(self.lock_ttl * 1000)]))

    def unlock(self, name: str, token: str) -> None:
        self._eval(_RELEASE, [self.keys.session(name) + ":pub"], [token])

    def add_intent(self, name: str, chains: Iterable[bytes]) -> None:
        chains = list(set(chains))
        key = self.keys.intent(name)

        def fn(c):
            for i in range(0, len(chains), 1024):
                c.sadd(key, *chains[i:i + 1024])

        if chains:
            self._do(fn)

    def intent(self, name: str) -> list[bytes]:
        return [bytes(m) for m in self._do(lambda c: c.smembers(self.keys.intent(name)))]

    def clear_intent(self, name: str) -> None:
        self._do(lambda c: c.delete(self.keys.intent(name)))

    # -- chain positions -----------------------------------------------------------------------

    def referenced(self, chains: Sequence[bytes]) -> list[bool]:
        """Whether each position is referenced by some record (its blocks are then kept)."""
        def fn(c):
            out = []
            for i in range(0, len(chains), 512):
                pipe = c.pipeline(transaction=False)
                for ch in chains[i:i + 512]:
                    pipe.scard(self.keys.refs(ch))
                out.extend(bool(n) for n in pipe.execute())
            return out

        return self._do(fn)

    def members(self, chain: bytes) -> list[str]:
        return sorted(_s(m) for m in self._do(lambda c: c.smembers(self.keys.refs(chain))))

    def upload(self, positions: Sequence[tuple[bytes, Sequence[bytes], Sequence[bytes | None]]]) -> int:
        """``(chain, blocks per layer, summaries per layer)`` items; returns keys written."""
        pending = int(self.pending_ttl * 1000)
        calls = []
        for chain, blocks, sums in positions:
            keys = self.keys.position_keys(chain, len(blocks))
            calls.append((keys, [pending, *blocks, *[s or b"" for s in sums]]))
        n = sum(int(x) for x in self._eval_many(_UPLOAD, calls))
        self.counters["uploaded_blocks"] += sum(len(b) for _, b, _ in positions)
        self.counters["uploaded_bytes"] += sum(len(x) for _, b, _ in positions for x in b)
        return n

    def ref(self, name: str, chains: Sequence[bytes], layers: int) -> list[tuple[int, int]]:
        """Reference every position for ``name``; returns ``(position index, layer)`` of those
        whose block is absent (nothing changed for them)."""
        res = self._eval_many(_REF, [(self.keys.position_keys(c, layers), [name, layers]) for c in chains])
        return [(i, int(r)) for i, r in enumerate(res) if int(r) >= 0]

    def unref(self, name: str, chains: Sequence[bytes], layers: int) -> int:
        """Drop ``name`` from the positions' sets; returns how many positions became orphans."""
        ttl = int(self.orphan_ttl * 1000)
        res = self._eval_many(_UNREF, [(self.keys.position_keys(c, layers), [name, ttl]) for c in chains])
        return sum(int(r) for r in res)

    def fetch(self, keys: Sequence[str]) -> list[bytes | None]:
        def fn(c):
            out = []
            for i in range(0, len(keys), 8 * self.batch):
                pipe = c.pipeline(transaction=False)
                for k in keys[i:i + 8 * self.batch]:
                    pipe.get(k)
                out.extend(pipe.execute())
            return out

        out = [bytes(v) if v is not None else None for v in self._do(fn)]
        self.counters["fetched_blocks"] += len(out)
        self.counters["fetched_bytes"] += sum(len(v) for v in out if v)
        return out

    def fetch_positions(self, chains: Sequence[bytes], layers: int) -> list[list[bytes | None]]:
        """Every layer's block then every layer's summary of each position: one ``MGET`` per
        position (its keys share a slot), pipelined."""
        def fn(c):
            pipe = c.pipeline(transaction=False)
            for ch in chains:
                pipe.execute_command("MGET", *[self.keys.block(ch, la) for la in range(layers)],
                                     *[self.keys.summary(ch, la) for la in range(layers)])
            return pipe.execute()

        out = [[bytes(v) if v is not None else None for v in row] for row in self._do(fn)] if chains else []
        self.counters["fetched_blocks"] += sum(len(r) for r in out)
        self.counters["fetched_bytes"] += sum(len(v) for r in out for v in r if v)
        return out

    def ttl_ms(self, keys: Sequence[str]) -> list[int]:
        def fn(c):
            pipe = c.pipeline(transaction=False)
            for k in keys:
                pipe.pttl(k)
            return pipe.execute()

        return [int(x) for x in self._do(fn)] if keys else []

    def delete_keys(self, keys: Sequence[str]) -> int:
        def fn(c):
            pipe = c.pipeline(transaction=False)
            for k in keys:
                pipe.delete(k)
            return sum(pipe.execute())

        return self._do(fn) if keys else 0

    def scan(self, match: str) -> Iterator[bytes]:
        return iter(self._do(lambda c: list(c.scan_iter(match=match, count=1000))))

    # -- leases --------------------------------------------------------------------------------

    def acquire(self, name: str, holder: str) -> tuple[int, str | None, int]:
        """(fencing token, None, 0) or, when another holder has it, (0, its holder, ms left)."""
        k = self.keys
        fence, cur, left = self._eval(_ACQUIRE, [k.lease(name), k.session(name)],
                                      [holder, int(self.lease_ttl * 1000)])
        return int(fence), (_s(cur) if cur else None), int(left)

    def renew(self, name: str, holder: str) -> bool:
        return bool(self._eval(_RENEW, [self.keys.lease(name)], [holder, int(self.lease_ttl * 1000)]))

    def release(self, name: str, holder: str) -> None:
        self._eval(_RELEASE, [self.keys.lease(name)], [holder])


"""Connecting to the remote tier: URLs, single node or cluster, and which errors mean "down".

A remote is named by ``redis://[user:pass@]host:port[/db][?prefix=ns&cluster=1]`` (``rediss://``
for TLS), by several such URLs (a list, or joined with commas: the startup nodes of a cluster),
or by ``TIERSTORE_REMOTE``. A single URL is probed once: a node with ``cluster_enabled:1`` is
reached through the cluster client. Connections are lazy: a remote that is down when the store
opens is tried again on the next operation, and the store works on its local LMDB meanwhile.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from urllib.parse import parse_qs, unquote, urlsplit

from ..errors import RemoteUnavailableError, TierstoreError

try:  # the optional extra tierstore[redis]
    import redis
    import redis.cluster
    import redis.exceptions as rex
    from redis.backoff import ExponentialBackoff
    from redis.retry import Retry
except ImportError:  # pragma: no cover - checked by RemoteSpec.connect
    redis = None


@dataclass(frozen=True)
class RemoteSpec:
    nodes: tuple[tuple[str, int], ...]
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: bool = False
    prefix: str = "ts"
    cluster: bool | None = None   # None: probe the first node

    @property
    def url(self) -> str:
        """The remote as shown in messages: no password."""
        scheme = "rediss" if self.tls else "redis"
        hosts = ",".join(f"{h}:{p}" for h, p in self.nodes)
        return f"{scheme}://{hosts}/{self.db}" + (f"?prefix={self.prefix}" if self.prefix != "ts" else "")


def parse_remote(spec) -> RemoteSpec:
    """A ``RemoteSpec`` from a URL, a comma-joined list of URLs, or a list of URLs."""
    if isinstance(spec, RemoteSpec):
        return spec
    urls = [u.strip() for u in (spec.split(",") if isinstance(spec, str) else list(spec)) if u.strip()]
    if not urls:
        raise TierstoreError("remote: no URL given (e.g. redis://127.0.0.1:6379/0)")
    nodes, first = [], None
    for u in urls:
        if "://" not in u:
            u = (first.scheme if first else "redis") + "://" + u  # "host:port" after the first URL
        parts = urlsplit(u)
        if parts.scheme not in ("redis", "rediss"):
            raise TierstoreError(f"remote {u!r}: scheme must be redis:// or rediss://")
        try:
            port = parts.port or 6379
        except ValueError:
            raise TierstoreError(f"remote {u!r}: bad port") from None
        nodes.append((parts.hostname or "127.0.0.1", port))
        first = first or parts
    q = {k: v[-1] for k, v in parse_qs(first.query).items()}
    path = first.path.strip("/")
    try:
        db = int(path or q.get("db", 0))
    except ValueError:
        raise TierstoreError(f"remote {urls[0]!r}: database must be a number, got {path!r}") from None
    prefix = q.get("prefix", "ts")
    if not prefix or any(c in prefix for c in "{}: "):
        raise TierstoreError(f"remote {urls[0]!r}: prefix {prefix!r} must be non-empty, without braces, colons or spaces")
    cluster = {"1": True, "true": True, "0": False, "false": False}.get(q.get("cluster", "").lower())
    if len(nodes) > 1:
        cluster = True
    return RemoteSpec(nodes=tuple(nodes), db=db, username=unquote(first.username) if first.username else None,
                      password=unquote(first.password) if first.password else None,
                      tls=first.scheme == "rediss", prefix=prefix, cluster=cluster)


def unavailable_errors() -> tuple[type[BaseException], ...]:
    """redis-py errors that mean the remote cannot serve now (down, paused, failing over, out of
    memory, read-only replica): the caller falls back to local LMDB and the outbox."""
    return (rex.ConnectionError, rex.TimeoutError, rex.ClusterDownError, rex.TryAgainError,
            rex.BusyLoadingError, rex.ReadOnlyError, rex.MasterDownError, rex.OutOfMemoryError,
            rex.SlotNotCoveredError, rex.ClusterError, rex.MaxConnectionsError)


def is_unavailable(e: BaseException) -> bool:
    if isinstance(e, unavailable_errors()):
        return True
    msg = str(e)
    return isinstance(e, rex.ResponseError) and msg.split(" ", 1)[0] in (
        "OOM", "CLUSTERDOWN", "MASTERDOWN", "LOADING", "READONLY", "TRYAGAIN", "NOREPLICAS")


class Connection:
    """A lazily made redis-py client (``Redis`` or ``RedisCluster``) for one ``RemoteSpec``."""

    def __init__(self, spec: RemoteSpec, *, timeout: float = 2.0) -> None:
        if redis is None:
            raise TierstoreError("the remote tier needs the redis client: pip install 'tierstore[redis]'")
        self.spec, self.timeout = spec, timeout
        self._client = None
        self._lock = threading.Lock()
        self.cluster: bool | None = spec.cluster

    def _common(self) -> dict:
        s = self.spec
        return dict(username=s.username, password=s.password, ssl=s.tls, socket_timeout=self.timeout,
                    socket_connect_timeout=self.timeout, health_check_interval=0,
                    retry=Retry(ExponentialBackoff(cap=0.2, base=0.02), 2))

    def client(self):
        with self._lock:
            if self._client is not None:
                return self._client
            s = self.spec
            try:
                if self.cluster is None:
                    probe = redis.Redis(host=s.nodes[0][0], port=s.nodes[0][1], db=s.db, **self._common())
                    try:
                        self.cluster = str(probe.info("cluster").get("cluster_enabled", 0)) == "1"
                    finally:
                        probe.close()
                if self.cluster:
                    if s.db:
                        raise TierstoreError(f"remote {s.url}: a Redis Cluster has only database 0")
                    self._client = redis.cluster.RedisCluster(
                        startup_nodes=[redis.cluster.ClusterNode(h, p) for h, p in s.nodes],
                        require_full_coverage=True, **self._common())
                else:
                    self._client = redis.Redis(host=s.nodes[0][0], port=s.nodes[0][1], db=s.db, **self._common())
            except Exception as e:
                if is_unavailable(e):
                    raise RemoteUnavailableError(f"cannot connect ({type(e).__name__}: {e})", url=s.url) from e
                raise
            return self._client

    def reset(self) -> None:
        """Drop the client (after an outage a cluster's slot map is stale)."""
        with self._lock:
            c, self._client = self._client, None
            self.cluster = self.spec.cluster if c is None else self.cluster
        if c is not None:
            try:
                c.close()
            except Exception:  # noqa: BLE001 - closing a broken client
                pass

    def close(self) -> None:
        self.reset()

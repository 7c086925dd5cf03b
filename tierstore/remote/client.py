"""Connecting to the remote tier: URLs, single node or cluster, and which errors mean "down".

A remote is named by ``redis://[user:pass@]host:port[/db][?prefix=ns&cluster=1&replicas=1]``, by
``rediss://`` for TLS (with redis-py's own query names: ``ssl_ca_certs=ca.pem`` to trust a private
CA, ``ssl_certfile`` + ``ssl_keyfile`` for a client certificate, ``ssl_cert_reqs=none|optional|
required``, ``ssl_check_hostname=0|1``), by several such URLs (a list, or joined with commas: the startup nodes of a cluster),
or by ``TIERSTORE_REMOTE``. A single URL is probed once: a node with ``cluster_enabled:1`` is
reached through the cluster client. Connections are lazy: a remote that is down when the store
opens is tried again on the next operation, and the store works on its local LMDB meanwhile.
"""

from __future__ import annotations

import os
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
    tls_options: tuple[tuple[str, object], ...] = ()   # redis-py ssl_* keyword arguments
    replicas: int | None = None   # replicas of each primary a publish waits for (None: RemoteTier's default)

    @property
    def url(self) -> str:
        """The remote as shown in messages: no password."""
        scheme = "rediss" if self.tls else "redis"
        hosts = ",".join(f"{h}:{p}" for h, p in self.nodes)
        return f"{scheme}://{hosts}/{self.db}" + (f"?prefix={self.prefix}" if self.prefix != "ts" else "")


TLS_FILES = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile")
TLS_REQS = {"none": "none", "optional": "optional", "required": "required"}
FLAGS = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}


def _tls_options(url: str, q: dict, tls: bool) -> tuple[tuple[str, object], ...]:
    """redis-py's ``ssl_*`` arguments named in the URL's query, each checked."""
    out = []
    for k in TLS_FILES:
        if k in q:
            path = os.path.expanduser(q[k])
            if not os.path.isfile(path):
                raise TierstoreError(f"remote {url!r}: {k} file {path!r} does not exist")
            out.append((k, path))
    if "ssl_cert_reqs" in q:
        if q["ssl_cert_reqs"].lower() not in TLS_REQS:
            raise TierstoreError(f"remote {url!r}: ssl_cert_reqs must be none, optional or required, "
                                 f"got {q['ssl_cert_reqs']!r}")
        out.append(("ssl_cert_reqs", TLS_REQS[q["ssl_cert_reqs"].lower()]))
    if "ssl_check_hostname" in q:
        if q["ssl_check_hostname"].lower() not in FLAGS:
            raise TierstoreError(f"remote {url!r}: ssl_check_hostname must be 0 or 1, got {q['ssl_check_hostname']!r}")
        out.append(("ssl_check_hostname", FLAGS[q["ssl_check_hostname"].lower()]))
    if ("ssl_certfile" in q) != ("ssl_keyfile" in q):
        raise TierstoreError(f"remote {url!r}: a client certificate needs both ssl_certfile and ssl_keyfile")
    if out and not tls:
        raise TierstoreError(f"remote {url!r}: ssl_* options need a rediss:// URL (TLS)")
    return tuple(out)


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
    cluster = FLAGS.get(q.get("cluster", "").lower())
    if len(nodes) > 1:
        cluster = True
    replicas = None
    if "replicas" in q:
        if not q["replicas"].isdigit():
            raise TierstoreError(f"remote {urls[0]!r}: replicas must be a count (0: do not wait), got {q['replicas']!r}")
        replicas = int(q["replicas"])
    tls = first.scheme == "rediss"
    return RemoteSpec(nodes=tuple(nodes), db=db, username=unquote(first.username) if first.username else None,
                      password=unquote(first.password) if first.password else None,
                      tls=tls, prefix=prefix, cluster=cluster, tls_options=_tls_options(urls[0], q, tls),
                      replicas=replicas)


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


def describe(spec: RemoteSpec, e: BaseException) -> str:
    """An unavailable-remote error's text, with what most likely causes it where the error
    itself does not say (TLS set-up)."""
    msg = f"{type(e).__name__}: {e}"
    text = str(e)
    opts = dict(spec.tls_options)
    if spec.tls and "CERTIFICATE_VERIFY_FAILED" in text:
        msg += (" (the server's certificate is not signed by a CA this host trusts: name yours with "
                "?ssl_ca_certs=PATH)" if "ssl_ca_certs" not in opts else
                f" (the server's certificate is not signed by the CA in {opts['ssl_ca_certs']})")
    elif spec.tls and ("EOF occurred" in text or "alert" in text.lower()) and "ssl_certfile" not in opts:
        msg += " (the server may require a client certificate: ?ssl_certfile=PATH&ssl_keyfile=PATH)"
    elif not spec.tls and ("reset by peer" in text or "Connection closed by server" in text):
        msg += " (if the server speaks TLS on this port, use a rediss:// URL)"
    return msg


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
                    retry=Retry(ExponentialBackoff(cap=0.2, base=0.02), 2), **dict(s.tls_options))

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
                    raise RemoteUnavailableError(f"cannot connect ({describe(s, e)})", url=s.url) from e
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

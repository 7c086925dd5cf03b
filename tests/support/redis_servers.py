"""Real ``redis-server`` processes on loopback ports for the remote-tier tests.

``RedisNode`` is one server (its own directory, no persistence unless asked), ``RedisCluster``
six of them joined by ``redis-cli --cluster create`` (3 primaries, 3 replicas). Every wait is
bounded in time; every process is stopped (SIGCONT first, in case a test paused it) by
``stop()``. Nothing listens beyond 127.0.0.1.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

HOST = "127.0.0.1"


def redis_binaries() -> tuple[str, str] | None:
    server, cli = shutil.which("redis-server"), shutil.which("redis-cli")
    return (server, cli) if server and cli else None


SKIP_REASON = ("redis-server is not installed: `make test` installs it (apt-get install -y redis-server, "
               "as root); or install it yourself to run the remote-tier tests")


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((HOST, port))
        except OSError:
            return False
        return True


def free_port(cluster: bool = False) -> int:
    """A free loopback port; for a cluster node also its bus port (+10000), both <= 55535."""
    import random

    for _ in range(200):
        port = random.randint(20000, 45000)
        if _free(port) and (not cluster or _free(port + 10000)):
            return port
    raise RuntimeError("no free loopback port pair found in 200 tries")


def _wait(pred, what: str, timeout: float = 20.0, step: float = 0.05):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        out = pred()
        if out:
            return out
        time.sleep(step)
    raise TimeoutError(f"{what}: not within {timeout} s")


class Certificates:
    """A private CA, a server certificate for 127.0.0.1 and a client certificate it signed,
    plus a second, unrelated CA (a client trusting it must refuse the server): made with the
    ``openssl`` command in ``root``."""

    def __init__(self, root: Path) -> None:
        self.dir = Path(root)
        self.dir.mkdir(parents=True, exist_ok=True)
        for ca in ("ca", "other-ca"):
            self._run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{ca}.key", "-out", f"{ca}.crt",
                      "-days", "2", "-subj", f"/CN=tierstore test {ca}")
        (self.dir / "server.ext").write_text("subjectAltName=IP:127.0.0.1\n")
        for who, ext in (("server", ["-extfile", "server.ext"]), ("client", [])):
            self._run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{who}.key", "-out", f"{who}.csr",
                      "-subj", f"/CN=tierstore test {who}")
            self._run("x509", "-req", "-in", f"{who}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                      "-out", f"{who}.crt", "-days", "2", *ext)

    def _run(self, *args: str) -> None:
        r = subprocess.run([shutil.which("openssl"), *args], cwd=self.dir, capture_output=True, text=True, timeout=60)
        if r.returncode != 0:
            raise RuntimeError(f"openssl {' '.join(args)}: {r.stderr[-2000:]}")

    def __getitem__(self, name: str) -> str:
        return str(self.dir / name)


class RedisNode:
    """One ``redis-server``; with ``tls`` (``Certificates``) it listens only on TLS, and asks
    clients for a certificate of the test CA."""

    def __init__(self, root: Path, *, port: int | None = None, cluster: bool = False, maxmemory: str | None = None,
                 policy: str = "noeviction", extra: tuple[str, ...] = (), tls: Certificates | None = None) -> None:
        self.port = port or free_port(cluster)
        self.dir = Path(root) / f"redis-{self.port}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.cluster, self.maxmemory, self.policy, self.extra, self.tls = cluster, maxmemory, policy, extra, tls
        self.proc: subprocess.Popen | None = None
        self.paused = False

    @property
    def url(self) -> str:
        if self.tls is None:
            return f"redis://{HOST}:{self.port}/0"
        t = self.tls
        return (f"rediss://{HOST}:{self.port}/0?ssl_ca_certs={t['ca.crt']}&ssl_certfile={t['client.crt']}"
                f"&ssl_keyfile={t['client.key']}")

    def start(self) -> "RedisNode":
        server, _ = redis_binaries()
        args = [server, "--bind", HOST, "--port", str(self.port), "--dir", str(self.dir), "--save", "",
                "--appendonly", "no", "--protected-mode", "yes", "--logfile", str(self.dir / "log"),
                "--maxmemory-policy", self.policy]
        if self.tls is not None:
            t = self.tls
            args[args.index("--port") + 1] = "0"
            args += ["--tls-port", str(self.port), "--tls-cert-file", t["server.crt"], "--tls-key-file", t["server.key"],
                     "--tls-ca-cert-file", t["ca.crt"], "--tls-auth-clients", "yes"]
        if self.maxmemory:
            args += ["--maxmemory", self.maxmemory]
        if self.cluster:
            args += ["--cluster-enabled", "yes", "--cluster-config-file", str(self.dir / "nodes.conf"),
                     "--cluster-node-timeout", "1000", "--cluster-replica-validity-factor", "0"]
        args += list(self.extra)
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait(lambda: self.cli("PING", check=False) == "PONG" or self._died(), f"redis-server on {self.port}")
        if self.proc.poll() is not None:
            raise RuntimeError(f"redis-server on port {self.port} exited: {self.log_tail()}")
        return self

    def _died(self) -> bool:
        return self.proc is not None and self.proc.poll() is not None

    def log_tail(self) -> str:
        try:
            return (self.dir / "log").read_text()[-2000:]
        except OSError:
            return ""

    def cli(self, *args: str, check: bool = True, timeout: float = 10.0) -> str:
        _, cli = redis_binaries()
        tls = [] if self.tls is None else ["--tls", "--cacert", self.tls["ca.crt"], "--cert", self.tls["client.crt"],
                                           "--key", self.tls["client.key"]]
        r = subprocess.run([cli, "-h", HOST, "-p", str(self.port), *tls, *args], capture_output=True, text=True,
                           timeout=timeout)
        if check and r.returncode != 0:
            raise RuntimeError(f"redis-cli {' '.join(args)} on {self.port}: {r.stderr or r.stdout}")
        return r.stdout.strip()

    def pause(self) -> None:
        self.proc.send_signal(signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        self.proc.send_signal(signal.SIGCONT)
        self.paused = False

    def kill(self) -> None:
        """kill -9: no shutdown, no save."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGCONT)
                self.proc.terminate()
                self.proc.wait(timeout=10)
            except (subprocess.TimeoutExpired, ProcessLookupError):
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None


class RedisCluster:
    """3 primaries + 3 replicas on loopback, created with ``redis-cli --cluster create``."""

    def __init__(self, root: Path, *, primaries: int = 3) -> None:
        self.nodes = [RedisNode(root, cluster=True) for _ in range(primaries * 2)]
        self.primaries = primaries

    @property
    def url(self) -> str:
        return ",".join(n.url for n in self.nodes[:self.primaries])

    def start(self) -> "RedisCluster":
        try:
            for n in self.nodes:
                n.start()
            _, cli = redis_binaries()
            r = subprocess.run([cli, "--cluster", "create", *[f"{HOST}:{n.port}" for n in self.nodes],
                                "--cluster-replicas", "1", "--cluster-yes"], capture_output=True, text=True,
                               timeout=60)
            if r.returncode != 0:
                raise RuntimeError(f"redis-cli --cluster create: {r.stdout[-2000:]} {r.stderr[-2000:]}")
            self.wait_ok()
            # every replica attached and synced: a primary killed later has a replica to promote
            _wait(lambda: len(self.replicas_in_sync()) == self.primaries, "replicas in sync", timeout=30)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ok(self, timeout: float = 30.0) -> None:
        live = [n for n in self.nodes if n.proc is not None and n.proc.poll() is None]
        _wait(lambda: all("cluster_state:ok" in n.cli("CLUSTER", "INFO", check=False) for n in live),
              "cluster_state:ok", timeout=timeout, step=0.1)

    def wait_failover(self, gone: RedisNode, timeout: float = 30.0) -> None:
        """Until the live nodes flag ``gone`` (killed or paused) as failed, a replica has taken
        its slots and the cluster is ok again."""
        live = [n for n in self.nodes if n is not gone and n.proc is not None and n.proc.poll() is None]

        def flagged() -> bool:
            for line in live[0].cli("CLUSTER", "NODES", check=False).splitlines():
                f = line.split()
                if len(f) > 2 and f[1].startswith(f"{HOST}:{gone.port}@"):
                    return "fail" in f[2].split(",")
            return False

        _wait(flagged, f"failover of {gone.port}", timeout=timeout, step=0.1)
        _wait(lambda: all("cluster_state:ok" in n.cli("CLUSTER", "INFO", check=False) for n in live),
              "cluster_state:ok", timeout=timeout, step=0.1)

    def role(self, node: RedisNode) -> str:
        info = node.cli("INFO", "replication", check=False)
        return "primary" if "role:master" in info else "replica"

    def replicas_in_sync(self) -> list[RedisNode]:
        out = []
        for n in self.nodes:
            info = n.cli("INFO", "replication", check=False)
            if "role:slave" in info and "master_link_status:up" in info:
                out.append(n)
        return out

    def replica_of(self, primary: RedisNode) -> RedisNode:
        info = primary.cli("INFO", "replication")
        ports = {int(f.split("=")[1]) for line in info.splitlines() if line.startswith("slave")
                 for f in line.split(":", 1)[1].split(",") if f.startswith("port=")}
        return next(n for n in self.nodes if n.port in ports)

    def primary_of(self, key: str) -> RedisNode:
        from redis.crc import key_slot  # computed here: any node may be paused or down
        slot = key_slot(key.encode())
        for n in self.nodes:
            if n.paused or n.proc is None or n.proc.poll() is not None or self.role(n) != "primary":
                continue
            for line in n.cli("CLUSTER", "NODES").splitlines():
                f = line.split()
                if "myself" in f[2]:
                    for rng in f[8:]:
                        lo, _, hi = rng.partition("-")
                        if lo.isdigit() and int(lo) <= slot <= int(hi or lo):
                            return n
        raise RuntimeError(f"no live primary serves key {key!r}")

    def stop(self) -> None:
        for n in self.nodes:
            n.stop()


def kill_tree(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.kill(proc.pid, signal.SIGCONT)
        except ProcessLookupError:
            return
        proc.kill()
        proc.wait(timeout=10)

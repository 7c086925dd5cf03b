"""The remote tier on real ``redis-server`` processes (single node and a 3+3 cluster) started by
the fixtures on loopback ports. Hosts are separate processes (``support/remote_host.py``) with
their own LMDB directories and host ids, or, where a test needs no process boundary, separate
``Store`` objects on separate directories in this process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time

import pytest
import torch
from transformers import DynamicCache

pytest.importorskip("redis")

import tierstore  # noqa: E402
from support.kv import assert_kv_equal, random_kv  # noqa: E402
from support.models import tiny  # noqa: E402
from support.redis_servers import (SKIP_REASON, Certificates, RedisCluster, RedisNode,  # noqa: E402
                                   redis_binaries)
from tierstore.adapters.hf import TieredCache  # noqa: E402
from tierstore.errors import CorruptBlockError, MissingBlockError, SessionBusyError  # noqa: E402
from tierstore.layout import KVLayout  # noqa: E402
from tierstore.remote import RemoteTier  # noqa: E402

pytestmark = pytest.mark.skipif(redis_binaries() is None, reason=SKIP_REASON)

HOST_SCRIPT = os.path.join(os.path.dirname(__file__), "support", "remote_host.py")
BT = 8
LAYOUT = KVLayout(num_layers=2, kv_heads=2, head_dim=8, block_tokens=BT, dtype=torch.float32)


# -- servers ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def node_server(tmp_path_factory):
    n = RedisNode(tmp_path_factory.mktemp("redis")).start()
    yield n
    n.stop()


@pytest.fixture
def node(node_server):
    if node_server.proc is None or node_server.proc.poll() is not None:
        node_server.start()  # a test stopped it
    node_server.resume()
    node_server.cli("FLUSHALL")
    node_server.cli("CONFIG", "SET", "maxmemory", "0")
    node_server.cli("CONFIG", "SET", "maxmemory-policy", "noeviction")
    return node_server


@pytest.fixture(scope="module")
def cluster_server(tmp_path_factory):
    c = RedisCluster(tmp_path_factory.mktemp("cluster")).start()
    yield c
    c.stop()


@pytest.fixture
def cluster(cluster_server):
    for n in cluster_server.nodes:
        if cluster_server.role(n) == "primary":
            n.cli("FLUSHALL")
    return cluster_server


@pytest.fixture(params=["node", "cluster"])
def remote_url(request):
    return request.getfixturevalue(request.param).url


def host(tmp_path, name: str, url: str, **kw):
    """A host in this process: its own store directory, host id and remote connection."""
    remote = RemoteTier(url, **{k: kw.pop(k) for k in ("lease_ttl", "orphan_ttl", "timeout", "replica_timeout")
                                if k in kw})
    return tierstore.open(tmp_path / f"host-{name}", remote=remote, host=name, block_tokens=BT, **kw)


def run_host(args: dict, *, timeout: float = 240) -> dict:
    r = subprocess.run([sys.executable, HOST_SCRIPT, json.dumps(args)], capture_output=True, text=True,
                       timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def gen(model, ids, cache, n):
    return model.generate(torch.as_tensor([ids]), cache=cache, max_new_tokens=n, do_sample=False,
                          pad_token_id=0)[0].tolist()


def wait_until(pred, what: str, timeout: float = 30.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return
        time.sleep(0.1)
    raise AssertionError(f"{what}: not within {timeout} s")


# -- host A commits, host B resumes -------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_host_b_resumes_what_host_a_committed_bit_exactly(tmp_path, remote_url, dtype):
    model = tiny(dtype=getattr(torch, dtype))
    prompt = torch.randint(1, 128, (37,), generator=torch.Generator().manual_seed(3)).tolist()
    ref = gen(model, prompt, DynamicCache(), 18)
    a = run_host({"op": "commit", "store": str(tmp_path / "A"), "remote": remote_url, "host": "A",
                  "dtype": dtype, "session": "chat", "prompt": prompt, "new_tokens": 8})
    assert a["ids"] == ref[:len(prompt) + 8]
    with host(tmp_path, "B", remote_url) as b:
        assert not b.sessions.exists_local("chat") and b.exists("chat")
        with TieredCache.resume(b, model, "chat") as cache:
            out = gen(model, a["ids"], cache, 10)
        assert out == ref
        # B's local copy is the remote's, bit for bit, and was pulled once
        assert b.sessions.replica.remote.counters["fetched_blocks"] > 0


def test_stored_bits_survive_the_remote_nan_and_negative_zero(tmp_path, remote_url):
    kv = random_kv(LAYOUT, 45, 7, kind="bits")
    kv[0][0][0, 0, 0] = -0.0
    kv[1][1][1, 3, 2] = float("nan")
    with host(tmp_path, "A", remote_url) as a, host(tmp_path, "B", remote_url) as b:
        a.put_session("s", layout=LAYOUT, kv=kv, token_ids=range(45), fingerprint="fp")
        rec, got = b.load_session("s")
        assert rec.length == 45
        assert_kv_equal(got, kv)


def test_prefix_dedup_uploads_and_fetches_only_what_is_missing(tmp_path, remote_url):
    kv = random_kv(LAYOUT, 64, 1)       # 8 blocks
    with host(tmp_path, "A", remote_url) as a, host(tmp_path, "B", remote_url) as b, \
            host(tmp_path, "C", remote_url) as c:
        a.put_session("doc", layout=LAYOUT, kv=[(k[:, :40], v[:, :40]) for k, v in kv], token_ids=range(40),
                      fingerprint="fp")
        ra = a.sessions.replica.remote.counters
        assert ra["uploaded_blocks"] == 5 * LAYOUT.num_layers
        b.put_session("doc-q", layout=LAYOUT, kv=kv, token_ids=range(64), fingerprint="fp")
        rb = b.sessions.replica.remote.counters
        assert rb["skipped_positions"] == 5            # the shared prefix: referenced already
        assert rb["uploaded_blocks"] == 3 * LAYOUT.num_layers
        # C pulls the short one, then the long one fetches only the 3 positions it lacks
        c.load_session("doc")
        rc = c.sessions.replica.remote.counters
        assert rc["fetched_blocks"] == 2 * 5 * LAYOUT.num_layers  # blocks + summaries
        _, got = c.load_session("doc-q")
        assert rc["fetched_blocks"] == 2 * 8 * LAYOUT.num_layers
        assert_kv_equal(got, kv)
        keys = a.sessions.replica.remote.keys
        chains = c.session("doc-q").chains()
        assert a.sessions.replica.remote.members(chains[0]) == ["doc", "doc-q"]
        assert a.sessions.replica.remote.members(chains[7]) == ["doc-q"]
        assert keys.chain_of(keys.block(chains[7], 1)) == chains[7]


def test_delete_drops_references_and_orphans_expire(tmp_path, node):
    kv = random_kv(LAYOUT, 24, 2)
    with host(tmp_path, "A", node.url, orphan_ttl=60) as a, host(tmp_path, "B", node.url) as b:
        a.put_session("x", layout=LAYOUT, kv=kv, token_ids=range(24), fingerprint="fp")
        chains = a.session("x").chains()
        r = a.sessions.replica.remote
        assert r.ttl_ms([r.keys.block(c, 0) for c in chains]) == [-1] * 3
        a.delete("x")
        assert r.names() == [] and r.members(chains[0]) == []
        ttl = r.ttl_ms([r.keys.block(c, la) for c in chains for la in range(2)])
        assert all(0 < t <= 60_000 for t in ttl)
        assert not b.exists("x")
        a.put_session("y", layout=LAYOUT, kv=kv, token_ids=range(24), fingerprint="fp")
        assert r.names() == ["y"] and not b.sessions.exists_local("y")
        b.delete("y")                                     # a session only the remote held
        assert r.names() == []
        assert a.sessions.exists_local("y") and not a.exists("y")   # A's copy follows the deletion
        assert not a.sessions.exists_local("y")


# -- leases and fencing ----------------------------------------------------------------------


def test_one_writer_per_session_across_hosts(tmp_path, node):
    kv = random_kv(LAYOUT, 16, 3)
    with host(tmp_path, "A", node.url) as a, host(tmp_path, "B", node.url) as b:
        a.put_session("s", layout=LAYOUT, kv=kv, token_ids=range(16), fingerprint="fp")
        lease = a.sessions.acquire("s")
        with pytest.raises(SessionBusyError, match="host A .*remote tier"):
            b.sessions.acquire("s")
        a.sessions.release(lease)
        b.sessions.release(b.sessions.acquire("s"))


def test_a_writer_paused_past_its_lease_cannot_overwrite_a_newer_commit(tmp_path, node):
    model = tiny()
    prompt = torch.randint(1, 128, (21,), generator=torch.Generator().manual_seed(5)).tolist()
    args = {"op": "hold", "store": str(tmp_path / "A"), "remote": node.url, "host": "A", "session": "s",
            "prompt": prompt, "new_tokens": 6, "lease_ttl": 1.0}
    p = subprocess.Popen([sys.executable, HOST_SCRIPT, json.dumps(args)], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        ready = json.loads(p.stdout.readline())["ready"]        # turn 1 committed, turn 2 pending
        p.send_signal(__import__("signal").SIGSTOP)
        time.sleep(1.6)                                          # past A's lease: it cannot renew
        with host(tmp_path, "B", node.url) as b:
            with TieredCache.resume(b, model, "s") as cache:     # B takes the lease (newer fence)
                b_ids = gen(model, ready[:len(prompt) + 6] + [7, 8, 9], cache, 4)
            b_rec = b.session("s")
        p.send_signal(__import__("signal").SIGCONT)
        out, err = p.communicate("go\n", timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0, err[-3000:]
    res = json.loads(out.strip().splitlines()[-1])
    assert res["error"] == "LeaseLostError" and res["fork"].startswith("s.fork-A-")
    with host(tmp_path, "C", node.url) as c:
        assert c.session("s").token_ids.tolist() == b_rec.token_ids.tolist()   # B's commit stands
        fork = c.session(res["fork"])                                          # A's is kept, as a fork
        assert fork.meta["forked_from"] == "s" and fork.meta["conflict"]["reason"] == "fenced"
        with TieredCache.resume(c, model, res["fork"]) as cache:
            more = gen(model, ready, cache, 5)
        assert more == gen(model, ready, DynamicCache(), 5)
    assert b_ids[:len(prompt) + 9] == ready[:len(prompt) + 6] + [7, 8, 9]


def test_partitioned_hosts_both_commit_and_neither_is_lost(tmp_path, node):
    kv = random_kv(LAYOUT, 32, 4)
    with host(tmp_path, "A", node.url, timeout=0.5) as a, host(tmp_path, "B", node.url, timeout=0.5) as b:
        a.put_session("s", layout=LAYOUT, kv=[(k[:, :16], v[:, :16]) for k, v in kv], token_ids=range(16),
                      fingerprint="fp")
        b.load_session("s")                                  # both hosts hold version 1
        node.pause()                                         # the partition
        try:
            a.put_session("s", layout=LAYOUT, kv=[(k[:, :24], v[:, :24]) for k, v in kv], token_ids=range(24),
                          fingerprint="fp", overwrite=True)
            b.put_session("s", layout=LAYOUT, kv=kv, token_ids=range(32), fingerprint="fp", overwrite=True)
            assert list(a.sessions.replica.outbox()) == ["s"] and list(b.sessions.replica.outbox()) == ["s"]
        finally:
            node.resume()
        for st in (a, st_b := b):
            st.sessions.replica._down_until = 0.0   # retry now rather than after the breaker's pause
        ra, rb = a.sessions.replica.drain(), st_b.sessions.replica.drain()
        assert ra.published == ["s"] and rb.forks == [("s", "s.fork-B-1")]
        with host(tmp_path, "C", node.url) as c:
            assert c.session("s").length == 24
            _, got = c.load_session("s.fork-B-1")
            assert_kv_equal(got, kv)
            assert c.session("s.fork-B-1").meta["conflict"]["reason"] == "conflict"
        assert b.session("s").length == 24                   # B's own name now follows the remote


# -- faults ----------------------------------------------------------------------------------


def test_outbox_drains_after_an_outage(tmp_path, node):
    kv = random_kv(LAYOUT, 30, 6)
    with host(tmp_path, "A", node.url) as a:
        node.stop()
        t = time.monotonic()
        a.put_session("s", layout=LAYOUT, kv=kv, token_ids=range(30), fingerprint="fp")  # local: works
        assert time.monotonic() - t < 10
        assert list(a.sessions.replica.outbox()) == ["s"]
        _, local = a.load_session("s")
        assert_kv_equal(local, kv)
        node.start()                                          # back, empty
        wait_until(lambda: not a.sessions.replica.outbox(), "the background thread publishes the outbox")
    with host(tmp_path, "B", node.url) as b:
        _, got = b.load_session("s")
        assert_kv_equal(got, kv)


def test_the_outbox_survives_the_process(tmp_path, node):
    kv = random_kv(LAYOUT, 20, 8)
    node.stop()
    with host(tmp_path, "A", node.url) as a:
        a.put_session("s", layout=LAYOUT, kv=kv, token_ids=range(20), fingerprint="fp")
    node.start()
    res = run_host({"op": "drain", "store": str(tmp_path / "host-A"), "remote": node.url, "host": "A"})
    assert res["published"] == ["s"] and res["pending"] == 0
    with host(tmp_path, "B", node.url) as b:
        assert_kv_equal(b.load_session("s")[1], kv)


def test_memory_full_keeps_working_locally_and_eviction_spares_referenced_blocks(tmp_path, node):
    kv = random_kv(LAYOUT, 64, 9)
    node.cli("CONFIG", "SET", "maxmemory-policy", "volatile-lru")
    with host(tmp_path, "A", node.url) as a:
        a.put_session("keep", layout=LAYOUT, kv=kv, token_ids=range(64), fingerprint="fp")
        r = a.sessions.replica.remote
        used = int(node.cli("INFO", "memory").split("used_memory:")[1].split()[0])
        node.cli("CONFIG", "SET", "maxmemory", str(used + 300_000))
        # unreferenced uploads (pending TTL) until Redis evicts
        big = os.urandom(20_000)
        for i in range(200):
            r.upload([(i.to_bytes(16, "big"), [big, big], [None, None])])
        evicted = int(node.cli("INFO", "stats").split("evicted_keys:")[1].split()[0])
        assert evicted > 0
        chains = a.session("keep").chains()
        assert None not in r.fetch([r.keys.block(c, la) for c in chains for la in range(2)])
        # memory full of referenced data: OOM refuses the write, the commit stays local
        node.cli("CONFIG", "SET", "maxmemory", str(used - 10_000))
        a.put_session("more", layout=LAYOUT, kv=random_kv(LAYOUT, 64, 10), token_ids=range(64), fingerprint="zz")
        assert "more" in a.sessions.replica.outbox()
        node.cli("CONFIG", "SET", "maxmemory", "0")
        a.sessions.replica._down_until = 0.0
        assert a.sessions.replica.drain().published == ["more"]
    with host(tmp_path, "B", node.url) as b:
        assert_kv_equal(b.load_session("keep")[1], kv)


def test_a_damaged_or_missing_remote_block_is_a_typed_error_and_nothing_is_resumed(tmp_path, node):
    kv = random_kv(LAYOUT, 24, 11)
    with host(tmp_path, "A", node.url) as a, host(tmp_path, "B", node.url) as b:
        a.put_session("s", layout=LAYOUT, kv=kv, token_ids=range(24), fingerprint="fp")
        r = a.sessions.replica.remote
        chains = a.session("s").chains()
        key = r.keys.block(chains[1], 1)
        good = r.fetch([key])[0]
        bad = bytearray(good)
        bad[-5] ^= 0x40
        r._do(lambda c: c.set(key, bytes(bad)))
        with pytest.raises(CorruptBlockError, match=r"session 's', layer 1, block 1: .*remote tier"):
            b.session("s")
        assert not b.sessions.exists_local("s")
        r._do(lambda c: c.delete(key))
        with pytest.raises(MissingBlockError, match=r"layer 1, block 1: block not on the remote tier"):
            b.session("s")
        assert not b.sessions.exists_local("s")


def test_a_paused_primary_and_a_killed_primary_lose_nothing(tmp_path, cluster):
    kv = random_kv(LAYOUT, 40, 12)
    kv2 = random_kv(LAYOUT, 40, 13)
    with host(tmp_path, "A", cluster.url, timeout=0.5) as a:
        a.put_session("s", layout=LAYOUT, kv=kv, token_ids=range(40), fingerprint="fp")
        r = a.sessions.replica.remote
        prim = cluster.primary_of(r.keys.session("s"))
        # the write reached the replica before the primary dies (replication is asynchronous)
        wait_until(lambda: _replica_caught_up(cluster, prim), "replica offset")
        prim.kill()                                           # kill -9 of the primary
        a.put_session("t", layout=LAYOUT, kv=kv2, token_ids=range(40), fingerprint="fq")  # during failover
        cluster.wait_failover(prim)
        a.sessions.replica._down_until = 0.0
        wait_until(lambda: not a.sessions.replica.outbox() or (a.sessions.replica.drain() and False),
                   "outbox after failover")
        # SIGSTOP another primary: commits stay local, then publish after its failover
        other = next(n for n in cluster.nodes if n is not prim and n.proc is not None and cluster.role(n) == "primary")
        other.pause()
        try:
            a.put_session("u", layout=LAYOUT, kv=kv, token_ids=range(40), fingerprint="fu")
            cluster.wait_failover(other)                      # its replica takes over (node timeout 1 s)
            a.sessions.replica._down_until = 0.0
            wait_until(lambda: not a.sessions.replica.outbox() or (a.sessions.replica.drain() and False),
                       "outbox after the paused primary's failover")
        finally:
            other.resume()
    with host(tmp_path, "B", cluster.url) as b:
        assert_kv_equal(b.load_session("s")[1], kv)
        assert_kv_equal(b.load_session("t")[1], kv2)
        assert_kv_equal(b.load_session("u")[1], kv)
    prim.start()  # back as a node of the cluster (it rejoins as a replica)


def test_a_publish_stays_in_the_outbox_until_replicas_hold_it_and_survives_losing_their_primary(tmp_path, cluster):
    kv, kv2 = random_kv(LAYOUT, 80, 21), random_kv(LAYOUT, 80, 22)
    # a node that an earlier test stopped may still be catching up as a replica
    wait_until(lambda: len(cluster.replicas_in_sync()) == cluster.primaries, "replicas in sync")
    with host(tmp_path, "A", cluster.url, timeout=2.0, replica_timeout=0.3) as a:
        rep, r = a.sessions.replica, a.sessions.replica.remote
        a.put_session("s", layout=LAYOUT, kv=kv, token_ids=range(80), fingerprint="fp")
        assert not rep.outbox()                                 # its replicas acknowledged it: done
        replicas = [n for n in cluster.nodes if n.proc is not None and cluster.role(n) == "replica"]
        for n in replicas:
            n.pause()                                           # replication stalls everywhere
        try:
            a.put_session("t", layout=LAYOUT, kv=kv2, token_ids=range(80), fingerprint="fq")
            assert r.info("t")["has_record"]                   # visible on the primaries...
            assert list(rep.outbox()) == ["t"]                 # ...but no replica holds it: kept
            status, why = rep.publish("t")
            assert status == "pending" and "0 of 1 replica" in why
            # kill -9 a primary holding some of t's blocks (not its record) before its replica got them
            home = cluster.primary_of(r.keys.session("t"))
            chains = a.session("t").chains()
            prim = next((p for p in (cluster.primary_of(r.keys.block(c, 0)) for c in chains) if p is not home), None)
            assert prim is not None, "every position of t hashed to its record's primary"
            prim.kill()
        finally:
            for n in replicas:
                n.resume()
        cluster.wait_failover(prim)                             # its replica, without those blocks, takes over
        rep._down_until = 0.0
        wait_until(lambda: not rep.outbox() or (rep.drain() and False), "outbox after failover")
    with host(tmp_path, "B", cluster.url) as b:                 # nothing was lost: the lost blocks went again
        assert_kv_equal(b.load_session("s")[1], kv)
        assert_kv_equal(b.load_session("t")[1], kv2)
    prim.start()  # back as a node of the cluster (it rejoins as a replica)


def _replica_caught_up(cluster, prim) -> bool:
    info = prim.cli("INFO", "replication")
    off = int(info.split("master_repl_offset:")[1].split()[0])
    return any(f"offset={off}," in line for line in info.splitlines() if line.startswith("slave"))


# -- crash at every step of the commit protocol ---------------------------------------------------

STEPS = ["add_intent", "upload", "ref", "commit", "unref", "index", "clear_intent"]


@pytest.mark.parametrize("when", ["before", "after"])
@pytest.mark.parametrize("step", STEPS)
def test_crash_at_every_step_then_recovery_leaves_no_torn_session(tmp_path, node, step, when):
    base = {"store": str(tmp_path / "host-A"), "remote": node.url, "host": "A", "session": "s"}
    full = random_kv(LAYOUT, 64, 1, kind="bits")     # as remote_host.put_kv draws it
    v1, v2 = [(k[:, :20], v[:, :20]) for k, v in full], [(k[:, :36], v[:, :36]) for k, v in full]
    with host(tmp_path, "A", node.url) as a:         # version 1: 2.5 blocks, published
        a.put_session("s", layout=LAYOUT, kv=v1, token_ids=range(20), fingerprint="fp")
    r = subprocess.run([sys.executable, HOST_SCRIPT, json.dumps({**base, "op": "put", "tokens": 36, "kv_seed": 1,
                                                                   "crash": f"{step}:1:{when}"})],
                       capture_output=True, text=True, timeout=240)
    assert r.returncode == -9, r.stderr[-2000:]      # version 2 committed locally, killed mid-publish
    # whatever another host reads now is one whole version, never a mix
    with host(tmp_path, "B", node.url) as b:
        rec, got = b.load_session("s")
        assert_kv_equal(got, v1 if rec.length == 20 else v2)
    # A comes back (a new process: this one): its outbox finishes the publish
    with host(tmp_path, "A", node.url) as a:
        res = a.sessions.replica.drain()
        assert res.pending == 0 and res.error is None and res.forks == []
    with host(tmp_path, "C", node.url) as c:
        rec, got = c.load_session("s")
        assert rec.length == 36
        assert_kv_equal(got, v2)
        rt = c.sessions.replica.remote
        named = rec.chains()
        assert rt.intent("s") == []
        for ch in named:                                  # every named position: referenced, kept
            assert rt.members(ch) == ["s"]
        assert rt.ttl_ms([rt.keys.block(ch, la) for ch in named for la in range(2)]) == [-1] * (2 * len(named))
        old_tail = tierstore.chain.chain_hashes(rec.root, list(range(20)), BT)[-1]
        assert old_tail not in named and rt.members(old_tail) == []   # version 1's partial tail: dropped
        assert rt.names() == ["s"]


# -- resources -------------------------------------------------------------------------------


def test_a_store_dropped_without_close_stops_its_heartbeat(tmp_path, node):
    import gc

    def live():
        return [t for t in threading.enumerate() if t.name == "tierstore-remote"]

    before = len(live())
    st = host(tmp_path, "A", node.url)
    assert len(live()) == before + 1
    del st
    gc.collect()
    wait_until(lambda: len(live()) == before, "heartbeat thread ends", timeout=10)


# -- the janitor and the CLI -------------------------------------------------------------------


def _cli(*args, env=None):
    r = subprocess.run([sys.executable, "-m", "tierstore.tools.cli", *args], capture_output=True, text=True,
                       timeout=120, env={**os.environ, **(env or {})})
    return r.returncode, r.stdout, r.stderr


def test_cli_ls_show_verify_gc_against_the_remote(tmp_path, node):
    kv = random_kv(LAYOUT, 40, 14)
    with host(tmp_path, "A", node.url, orphan_ttl=3600) as a:
        a.put_session("doc", layout=LAYOUT, kv=kv, token_ids=range(40), fingerprint="fp")
        a.put_session("old", layout=LAYOUT, kv=random_kv(LAYOUT, 16, 15), token_ids=range(100, 116),
                      fingerprint="fp")
        a.delete("old")                                   # its blocks: orphans with a TTL
        r = a.sessions.replica.remote
        # a publish that died after referencing: a stale reference and an intent
        ghost = tierstore.chain.chain_hashes(a.session("doc").root, list(range(48)), BT)[-1]
        r.upload([(ghost, [b"x", b"y"], [None, None])])
        r.ref("doc", [ghost], 2)
        r.add_intent("doc", [ghost])
    rc, out, err = _cli("--store", str(tmp_path / "host-A"), "ls", "--remote", node.url, "--json")
    assert rc == 0, err
    rows = {s["name"]: s for s in json.loads(out)["sessions"]}
    assert rows["doc"]["where"] == "both" and rows["doc"]["tokens"] == 40 and rows["doc"]["version"] == 1
    assert "old" not in rows
    rc, out, err = _cli("show", "doc", "--remote", node.url, "--json")
    assert rc == 0, err
    assert json.loads(out)["referenced_positions"] == 5
    rc, out, err = _cli("verify", "--remote", node.url)
    assert rc == 0, err
    assert "verified 1 remote session(s), 10 block(s)" in out
    rc, out, err = _cli("gc", "--remote", node.url, "--dry-run", "--json")
    rep = json.loads(out)
    assert rc == 0 and rep["stale_references"] == 1 and rep["intents_resolved"] == 1 and not rep["deleted"]
    rc, out, err = _cli("gc", "--remote", node.url, "--json")
    rep = json.loads(out)
    assert rc == 0 and rep["deleted"] and rep["orphan_keys"] == 2 * 2 + 2 * 2 + 2  # old's blocks+summaries, ghost
    assert r.members(ghost) == [] and r.intent("doc") == []
    with host(tmp_path, "B", node.url) as b:
        assert_kv_equal(b.load_session("doc")[1], kv)
    # a damaged block is reported, exit 1
    chains = tierstore.chain.chain_hashes(_root(tmp_path), list(range(40)), BT)
    key = r.keys.block(chains[2], 0)
    r._do(lambda c: c.setrange(key, 60, b"\x00\x01"))
    rc, out, err = _cli("verify", "--remote", node.url)
    assert rc == 1 and "DAMAGED  session 'doc', layer 0, block 2" in out


def _root(tmp_path):
    with tierstore.open(tmp_path / "host-A", readonly=True, remote=False) as st:
        return st.session("doc").root


# -- tensor parallel ---------------------------------------------------------------------------

TP_SCRIPT = os.path.join(os.path.dirname(__file__), "support", "tp_host.py")


def run_tp(args: dict, ranks: int = 2, timeout: float = 300) -> dict:
    """``ranks`` processes of ``tp_host.py`` (gloo on 127.0.0.1); rank 0's JSON line."""
    from support.redis_servers import free_port
    port = free_port()
    env = {**os.environ, "WORLD_SIZE": str(ranks), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
           "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, TP_SCRIPT, json.dumps(args)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True,
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}) for r in range(ranks)]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=timeout))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    return json.loads(outs[0][0].strip().splitlines()[-1])


@pytest.fixture(scope="module")
def tp_model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tp-model")
    tiny().save_pretrained(d)
    return str(d)


def test_tensor_parallel_shards_resume_at_tp2_on_another_host_and_at_tp1(tmp_path, node, tp_model_dir):
    prompt = torch.randint(1, 128, (29,), generator=torch.Generator().manual_seed(8)).tolist()
    ref = run_tp({"op": "dynamic", "model": tp_model_dir, "ids": prompt, "new_tokens": 16})["ids"]
    a = run_tp({"op": "commit", "model": tp_model_dir, "store": str(tmp_path / "A"), "remote": node.url,
                "host": "A", "session": "tp", "ids": prompt, "new_tokens": 8})
    assert a["ids"] == ref[:len(prompt) + 8]
    # one shard per rank, each saying which heads it holds; blocks never shared between ranks
    with host(tmp_path, "C", node.url) as c:
        r0, r1 = c.session("tp.tp0of2"), c.session("tp.tp1of2")
        assert (r0.meta["tp"]["heads"], r1.meta["tp"]["heads"]) == ([0, 1], [1, 2])
        assert r0.layout.kv_heads == 1 and not set(r0.chains()) & set(r1.chains())
    # TP=2 on host B (its own empty LMDB): continues exactly as the uninterrupted TP=2 run
    b = run_tp({"op": "resume", "model": tp_model_dir, "store": str(tmp_path / "B"), "remote": node.url,
                "host": "B", "session": "tp", "ids": a["ids"], "new_tokens": 8})
    assert b["ids"] == ref
    # TP=1 here: B's shards (it committed on close) gathered by heads, bit for bit
    model = tiny()
    with host(tmp_path, "D", node.url) as d:
        with TieredCache.resume(d, model, "tp", commit_on_close=False) as cache:
            out = gen(model, b["ids"], cache, 4)
        whole, kv = d.load_session("tp")
        _, s0 = d.load_session("tp.tp0of2")
        _, s1 = d.load_session("tp.tp1of2")
    assert whole.length == len(b["ids"]) - 1 and whole.layout.kv_heads == 2
    assert whole.meta["gathered_from"] == ["tp.tp0of2", "tp.tp1of2"] and "tp" not in whole.meta
    assert_kv_equal(kv, [(torch.cat([k0, k1]), torch.cat([v0, v1])) for (k0, v0), (k1, v1) in zip(s0, s1)])
    # the TP=1 continuation equals DynamicCache filled with those same (TP=2-computed) KV
    dyn = DynamicCache()
    for layer, (k, v) in enumerate(kv):
        dyn.update(k.unsqueeze(0), v.unsqueeze(0), layer)
    assert out == gen(model, b["ids"], dyn, 4)


# -- TLS ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_node(tmp_path_factory):
    if shutil.which("openssl") is None:
        pytest.skip("the TLS test makes its certificates with the openssl command: `make test` installs it")
    n = RedisNode(tmp_path_factory.mktemp("redis-tls"), tls=Certificates(tmp_path_factory.mktemp("certs"))).start()
    yield n
    n.stop()


def test_over_tls_with_client_certificates_host_b_resumes_what_host_a_committed(tmp_path, tls_node):
    """A server that speaks only TLS and asks for a client certificate of its CA: host A (its own
    process) commits over ``rediss://``, host B resumes it bit-exactly."""
    model = tiny()
    prompt = torch.randint(1, 128, (29,), generator=torch.Generator().manual_seed(31)).tolist()
    ref = gen(model, prompt, DynamicCache(), 14)
    a = run_host({"op": "commit", "store": str(tmp_path / "A"), "remote": tls_node.url, "host": "A",
                  "dtype": "float32", "session": "chat", "prompt": prompt, "new_tokens": 6})
    assert a["ids"] == ref[:len(prompt) + 6]
    with host(tmp_path, "B", tls_node.url) as b:
        assert not b.sessions.exists_local("chat") and b.exists("chat")
        with TieredCache.resume(b, model, "chat") as cache:
            assert gen(model, a["ids"], cache, 8) == ref
        assert b.sessions.replica.remote.counters["fetched_blocks"] > 0


def test_a_tls_client_the_server_refuses_works_locally_and_says_why(tmp_path, tls_node):
    t, port = tls_node.tls, tls_node.port
    tls_node.cli("FLUSHALL")
    cases = [  # (URL, what the error says)
        (f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={t['other-ca.crt']}&ssl_certfile={t['client.crt']}"
         f"&ssl_keyfile={t['client.key']}", "not signed by the CA in " + t["other-ca.crt"]),
        (f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={t['ca.crt']}", "may require a client certificate"),
        (f"redis://127.0.0.1:{port}/0", "use a rediss:// URL"),
    ]
    for i, (url, why) in enumerate(cases):
        with host(tmp_path, f"C{i}", url, timeout=1.0) as c:
            c.put_session("x", layout=LAYOUT, kv=random_kv(LAYOUT, 16, i), token_ids=range(16), fingerprint="fp")
            assert list(c.sessions.replica.outbox()) == ["x"] and c.exists("x")   # kept locally, to publish later
            assert why in c.sessions.replica.last_error, c.sessions.replica.last_error
    assert tls_node.cli("DBSIZE") == "0"                                            # nothing reached the server


def test_tls_options_are_checked_when_the_url_is_read(tmp_path):
    from tierstore.errors import TierstoreError
    from tierstore.remote import parse_remote

    ca = tmp_path / "ca.pem"
    ca.write_text("not read until a connection is made")
    s = parse_remote(f"rediss://127.0.0.1:7001/0?ssl_ca_certs={ca}&ssl_cert_reqs=required&ssl_check_hostname=0")
    assert s.tls and dict(s.tls_options) == {"ssl_ca_certs": str(ca), "ssl_cert_reqs": "required",
                                             "ssl_check_hostname": False}
    for bad, why in ((f"redis://127.0.0.1:7001/0?ssl_ca_certs={ca}", "need a rediss:// URL"),
                     (f"rediss://127.0.0.1:7001/0?ssl_ca_certs={tmp_path}/none.pem", "none.pem' does not exist"),
                     (f"rediss://127.0.0.1:7001/0?ssl_certfile={ca}", "both ssl_certfile and ssl_keyfile"),
                     ("rediss://127.0.0.1:7001/0?ssl_cert_reqs=maybe", "none, optional or required"),
                     ("redis://127.0.0.1:7001/0?replicas=all", "replicas must be a count")):
        with pytest.raises(TierstoreError, match=why):
            parse_remote(bad)
    assert parse_remote("redis://127.0.0.1:7001/0?replicas=0").replicas == 0
    tier = RemoteTier("redis://127.0.0.1:7001/0?replicas=2")   # no connection is made
    assert tier.replicas == 2
    tier.close()


# -- naming the remote -------------------------------------------------------------------------


def test_remote_urls_parse_and_bad_ones_say_why():
    from tierstore.errors import TierstoreError
    from tierstore.remote import parse_remote

    s = parse_remote("redis://:pw@127.0.0.1:7001/3?prefix=fleet")
    assert s.nodes == (("127.0.0.1", 7001),) and s.db == 3 and s.prefix == "fleet" and s.password == "pw"
    assert "pw" not in s.url and s.cluster is None
    c = parse_remote("redis://127.0.0.1:7001,127.0.0.1:7002")
    assert c.cluster and c.nodes == (("127.0.0.1", 7001), ("127.0.0.1", 7002))
    assert parse_remote(["rediss://127.0.0.1:7001", "127.0.0.1:7002"]).tls
    assert parse_remote("redis://127.0.0.1:7001/0?cluster=1").cluster
    for bad, why in (("http://127.0.0.1", "scheme"), ("redis://127.0.0.1:7001/x", "database must be a number"),
                     ("redis://127.0.0.1/0?prefix=a:b", "prefix"), ("", "no URL")):
        with pytest.raises(TierstoreError, match=why):
            parse_remote(bad)


def test_the_remote_and_host_come_from_the_environment(tmp_path, node, monkeypatch):
    monkeypatch.setenv("TIERSTORE_REMOTE", node.url)
    monkeypatch.setenv("TIERSTORE_HOST_ID", "rack7")
    with tierstore.open(tmp_path / "kv", block_tokens=BT) as st:
        assert st.sessions.replica.host == "rack7" and st.sessions.replica.remote.url == node.url
        st.put_session("e", layout=LAYOUT, kv=random_kv(LAYOUT, 8, 1), token_ids=range(8), fingerprint="fp")
        assert st.sessions.replica.remote.info("e")["host"] == "rack7"
    with tierstore.open(tmp_path / "kv2", remote=False) as st:
        assert st.sessions.replica is None


def test_a_remote_that_is_down_at_open_is_not_an_error(tmp_path):
    from support.redis_servers import free_port
    url = f"redis://127.0.0.1:{free_port()}/0"            # nothing listens there
    with tierstore.open(tmp_path / "kv", remote=url, block_tokens=BT) as st:
        st.put_session("x", layout=LAYOUT, kv=random_kv(LAYOUT, 8, 2), token_ids=range(8), fingerprint="fp")
        assert list(st.sessions.replica.outbox()) == ["x"] and st.exists("x")
        assert "cannot connect" in st.sessions.replica.last_error


# -- large pulls: readable at once, landing in LMDB in the background ----------------------------


def test_a_large_pull_resumes_from_memory_and_lands_in_lmdb(tmp_path, node):
    model = tiny()
    prompt = torch.randint(1, 128, (45,), generator=torch.Generator().manual_seed(9)).tolist()
    ref = gen(model, prompt, DynamicCache(), 14)
    with host(tmp_path, "A", node.url) as a:
        with TieredCache(a, model, session="big") as cache:
            first = gen(model, prompt, cache, 6)
    with host(tmp_path, "B", node.url) as b:
        rep = b.sessions.replica.puller
        rep.stream_bytes = 0                                  # every pull lands in the background
        with TieredCache.resume(b, model, "big") as cache:    # (a commit of the cache waits for it)
            assert gen(model, first, cache, 8) == ref
        rep.wait_pulls()
        assert rep.pending("big") is None and b.cold.get("sessions", b"big") is not None
        assert b.session("big").length == len(ref) - 1
    assert b.cold._staged == {}                               # given back at close


def test_a_damaged_block_of_a_large_pull_is_caught_when_read_and_never_lands(tmp_path, node):
    kv = random_kv(LAYOUT, 24, 16)
    with host(tmp_path, "A", node.url) as a, host(tmp_path, "B", node.url) as b:
        a.put_session("s", layout=LAYOUT, kv=kv, token_ids=range(24), fingerprint="fp")
        r = a.sessions.replica.remote
        key = r.keys.block(a.session("s").chains()[2], 0)
        bad = bytearray(r.fetch([key])[0])
        bad[-3] ^= 0x10
        r._do(lambda c: c.set(key, bytes(bad)))
        b.sessions.replica.puller.stream_bytes = 0
        with pytest.raises(CorruptBlockError, match=r"session 's', layer 0, block 2"):
            b.load_session("s")
        b.sessions.replica.puller.wait_pulls()
        assert b.cold.get("sessions", b"s") is None and b.sessions.replica.puller.pending("s") is None

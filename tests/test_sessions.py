"""Sessions on the cold tier: prefix sharing and reference counts, atomic commits, orphans and gc,
the cold quota, forks, deletes, and writer leases (including a holder killed with SIGKILL)."""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import tierstore
from tierstore.chain import chain_hashes, root_hash
from tierstore.errors import (InvalidSessionNameError, MissingBlockError, QuotaExceededError, SessionBusyError,
                              SessionExistsError, SessionNotFoundError)
from tierstore.layout import KVLayout
from tierstore.records import SessionRecord
from tierstore.sessions import Lease
from tierstore.tiers.schema import DB_NAMES

from support import assert_kv_equal, prefix_kv, random_kv

FP = "fedcba9876543210" * 2
BT = 16
LAY = KVLayout(num_layers=2, kv_heads=2, head_dim=8, block_tokens=BT, dtype=torch.float16)
pytestmark = pytest.mark.store(block_tokens=BT)


def ids_for(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 30_000, n)


def put(store, name, ids, kv=None, **kw):
    kv = random_kv(LAY, len(ids), int(ids[0]) + len(ids)) if kv is None else kv
    store.put_session(name, layout=LAY, kv=kv, token_ids=ids, fingerprint=FP, **kw)
    return kv


def count(store, db: str) -> int:
    return store.cold.entries(db)


def refs(store) -> dict[bytes, int]:
    return {k: struct.unpack("<I", v)[0] for k, v in store.cold.scan("refs")}


def snapshot(store) -> dict:
    """Every key/value of every database: 'nothing changed' means this is equal."""
    return {db: dict(store.cold.scan(db)) for db in DB_NAMES}


def record(store, name, ids, **kw) -> SessionRecord:
    return SessionRecord(name=name, layout=LAY, fingerprint=FP, fingerprint_fields={},
                         codec=store.config.codec, token_ids=np.asarray(ids, dtype=np.int64), **kw)


def write_blocks(store, rec, kv, layers=None) -> None:
    for layer in (range(LAY.num_layers) if layers is None else layers):
        store.sessions.put_blocks(store.encode_blocks(rec, layer, *kv[layer], rec.chains()))


# -- sharing, refs, delete ----------------------------------------------------------------------


def test_prefix_sharing_fork_and_delete(store):
    ids_a = ids_for(5 * BT + 3, 1)                               # 6 blocks, the last partial
    kv_a = put(store, "a", ids_a)
    assert count(store, "blocks") == count(store, "summaries") == 6 * LAY.num_layers
    assert set(refs(store).values()) == {1} and len(refs(store)) == 6

    store.fork("a", "a-fork")                                    # full length: no new block
    assert count(store, "blocks") == 6 * LAY.num_layers
    assert set(refs(store).values()) == {2}

    ids_b = np.concatenate([ids_a[:3 * BT], ids_for(40, 2)])     # 3 shared + 3 own blocks
    kv_b_own = random_kv(LAY, len(ids_b), 9)
    kv_b = [(torch.cat([ka[:, :3 * BT], kb[:, 3 * BT:]], 1), torch.cat([va[:, :3 * BT], vb[:, 3 * BT:]], 1))
            for (ka, va), (kb, vb) in zip(kv_a, kv_b_own)]
    put(store, "b", ids_b, kv_b)
    assert count(store, "blocks") == (6 + 3) * LAY.num_layers
    r = refs(store)
    chains_a, chains_b = store.session("a").chains(), store.session("b").chains()
    assert chains_a[:3] == chains_b[:3] and not set(chains_a[3:]) & set(chains_b[3:])
    assert [r[c] for c in chains_a] == [3, 3, 3, 2, 2, 2] and [r[c] for c in chains_b[3:]] == [1, 1, 1]

    store.delete("a")                                            # a-fork still names everything
    assert count(store, "blocks") == 9 * LAY.num_layers
    assert_kv_equal(store.load_session("a-fork")[1], kv_a)
    store.delete("a-fork")                                       # a's own tail goes
    assert count(store, "blocks") == count(store, "summaries") == 6 * LAY.num_layers
    assert_kv_equal(store.load_session("b")[1], kv_b)
    assert set(refs(store)) == set(chains_b) and set(refs(store).values()) == {1}
    assert store.gc(dry_run=True).orphan_blocks == 0
    store.delete("b")                                            # the last one frees everything
    for db in ("blocks", "summaries", "refs", "sessions", "leases"):
        assert count(store, db) == 0, db


def test_committed_prefix_counts_positions_that_records_name(store):
    ids = ids_for(5 * BT + 3, 11)                                # 6 blocks, the last partial
    put(store, "a", ids)
    root = store.session("a").root

    def committed(token_ids) -> int:
        return store.sessions.committed_prefix(chain_hashes(root, token_ids, BT))

    assert committed(ids) == 6                                   # the partial tail is a position too
    assert committed(np.concatenate([ids, ids_for(40, 12)])) == 5  # its 6th block is full: not stored
    assert committed(np.concatenate([ids[:2 * BT], ids_for(3 * BT, 13)])) == 2
    assert committed(ids_for(3 * BT, 14)) == committed([]) == 0
    other = chain_hashes(root_hash("0" * 32, LAY), ids, BT)      # another model: another chain
    assert store.sessions.committed_prefix(other) == 0
    longer = np.concatenate([ids[:5 * BT], ids_for(2 * BT, 15)])
    write_blocks(store, record(store, "pending", longer), random_kv(LAY, len(longer), 15))
    assert store.cold.lookup(chain_hashes(root, longer, BT), LAY.num_layers) == 7
    assert committed(longer) == 5                                # orphans are not a committed prefix
    store.delete("a")
    assert committed(ids) == 0


def test_same_session_twice_stores_blocks_once(store):
    ids = ids_for(3 * BT, 3)
    kv = put(store, "x", ids)
    put(store, "y", ids, kv)
    assert count(store, "blocks") == 3 * LAY.num_layers
    store.delete("x", "y")
    assert count(store, "blocks") == 0 and count(store, "refs") == 0


def test_overwrite_frees_the_old_tail(store):
    ids = ids_for(4 * BT, 4)
    kv = put(store, "s", ids)
    with pytest.raises(SessionExistsError):
        put(store, "s", ids)
    assert count(store, "leases") == 0                           # the failed writer let go
    # content addressing: a (model, prefix) has one KV, so the shorter session reuses its blocks
    kv = put(store, "s", ids[:2 * BT], prefix_kv(kv, 2 * BT), overwrite=True)
    store.gc()                                                   # the refused put left orphans
    assert count(store, "blocks") == 2 * LAY.num_layers
    assert_kv_equal(store.load_session("s")[1], kv)


def test_delete_is_all_or_nothing(store):
    put(store, "a", ids_for(20, 5))
    before = snapshot(store)
    with pytest.raises(SessionNotFoundError) as e:
        store.delete("a", "missing")
    assert e.value.session == "missing"
    assert snapshot(store) == before
    with pytest.raises(InvalidSessionNameError):
        store.delete("a", "../etc")
    assert snapshot(store) == before


# -- commits and orphans --------------------------------------------------------------------------


def test_uncommitted_blocks_are_invisible_orphans_reclaimed_by_gc(store):
    kv_a = put(store, "a", ids_for(40, 6))
    committed = snapshot(store)
    rec = record(store, "pending", ids_for(50, 7))
    write_blocks(store, rec, random_kv(LAY, 50, 7))
    assert [r.name for r in store.list()] == ["a"]
    assert not store.exists("pending")
    with pytest.raises(SessionNotFoundError):
        store.load_session("pending")
    n_orphans = 4 * LAY.num_layers * 2                           # blocks + summaries
    dry = store.gc(dry_run=True)
    assert (dry.orphan_blocks, dry.deleted) == (n_orphans, False) and dry.orphan_bytes > 0
    assert count(store, "blocks") == (3 + 4) * LAY.num_layers    # dry run deletes nothing
    done = store.gc()
    assert done.deleted and done.orphan_blocks == n_orphans
    assert snapshot(store) == committed
    assert_kv_equal(store.load_session("a")[1], kv_a)
    assert store.gc(dry_run=True).orphan_blocks == 0


def test_commit_names_every_block(store):
    rec = record(store, "p", ids_for(40, 8))
    kv = random_kv(LAY, 40, 8)
    write_blocks(store, rec, kv, layers=[0])                     # layer 1 never written
    before = snapshot(store)
    with pytest.raises(MissingBlockError) as e:
        store.sessions.commit(rec)
    assert (e.value.session, e.value.layer, e.value.block) == ("p", 1, 0)
    assert snapshot(store) == before
    write_blocks(store, rec, kv, layers=[1])
    store.sessions.commit(rec)
    assert_kv_equal(store.load_session("p")[1], kv)


def test_failed_commit_over_an_existing_session_changes_nothing(store):
    kv = put(store, "s", ids_for(40, 9))
    before = snapshot(store)
    longer = record(store, "s", np.concatenate([store.session("s").token_ids, ids_for(30, 10)]))
    with pytest.raises(MissingBlockError) as e:
        store.sessions.commit(longer)
    assert e.value.block == 2                                    # the first block it lacks
    assert snapshot(store) == before
    assert_kv_equal(store.load_session("s")[1], kv)


def test_commit_expect_new(store):
    put(store, "s", ids_for(20, 11))
    rec = store.session("s")
    before = snapshot(store)
    with pytest.raises(SessionExistsError) as e:
        store.sessions.commit(rec, expect_new=True)
    assert e.value.session == "s"
    assert snapshot(store) == before


def test_gc_waits_for_live_writers_unless_forced(store):
    put(store, "a", ids_for(20, 12))
    rec = record(store, "w", ids_for(30, 13))
    lease = store.sessions.acquire("w")
    write_blocks(store, rec, random_kv(LAY, 30, 13))                  # a live writer's pending blocks
    report = store.gc()
    assert not report.deleted and report.skipped_live_writers == 1 and report.orphan_blocks > 0
    assert count(store, "blocks") == (2 + 2) * LAY.num_layers
    store.sessions.commit(rec)                                   # the writer finishes
    store.sessions.release(lease)
    assert store.gc(dry_run=True).orphan_blocks == 0
    # and with force, orphans go even under a lease
    lease = store.sessions.acquire("w2")
    write_blocks(store, record(store, "w2", ids_for(20, 14)), random_kv(LAY, 20, 14))
    forced = store.gc(force=True)
    assert forced.deleted and forced.skipped_live_writers == 0
    assert store.gc(dry_run=True).orphan_blocks == 0
    store.sessions.release(lease)
    assert {r.name for r in store.list()} == {"a", "w"}


def test_gc_on_a_clean_store_does_nothing(store):
    put(store, "a", ids_for(20, 15))
    before = snapshot(store)
    report = store.gc()
    assert report.orphan_blocks == 0 and not report.deleted
    assert snapshot(store) == before


# -- quota -------------------------------------------------------------------------------------------


def test_put_over_quota_fails_and_keeps_the_previous_state(tmp_path):
    path = tmp_path / "kv"
    with tierstore.open(path, block_tokens=BT) as s:
        kv_a = put(s, "a", ids_for(40, 16))
        used = s.cold.used_bytes()
    big = KVLayout(num_layers=2, kv_heads=4, head_dim=64, block_tokens=BT, dtype=torch.float16)
    with tierstore.open(path, cold=used + 64 * 1024) as s:       # room for a little, not for 400 KB
        assert s.config.cold_bytes == used + 64 * 1024
        before = s.sessions.records()
        with pytest.raises(QuotaExceededError, match="quota"):
            s.put_session("b", layout=big, kv=random_kv(big, 400, 17), token_ids=ids_for(400, 17),
                          fingerprint=FP)
        assert not s.exists("b") and [r.name for r in s.list()] == ["a"]
        assert_kv_equal(s.load_session("a")[1], kv_a)
        assert [r.token_ids.tolist() for r in s.sessions.records()] == [r.token_ids.tolist() for r in before]
        assert count(s, "leases") == 0
        s.gc()                                                   # what the failed put left behind
        assert s.gc(dry_run=True).orphan_blocks == 0
        put(s, "c", ids_for(20, 18))                             # small writes still fit
        assert {r.name for r in s.list()} == {"a", "c"}


def test_commit_over_quota_fails_atomically(tmp_path):
    path = tmp_path / "kv"
    with tierstore.open(path, block_tokens=BT) as s:
        put(s, "a", ids_for(40, 19))
        rec = record(s, "b", ids_for(40, 20))
        write_blocks(s, rec, random_kv(LAY, 40, 20))
        used = s.cold.used_bytes()
    with tierstore.open(path, cold=used + 128 * 1024) as s:
        before = snapshot(s)
        heavy = rec.with_updates(last_logits=np.zeros(1 << 18, np.float32))  # a 1 MiB record
        with pytest.raises(QuotaExceededError):
            s.sessions.commit(heavy)
        assert snapshot(s) == before
        s.sessions.commit(rec.with_updates(last_logits=np.zeros(16, np.float32)))
        assert {r.name for r in s.list()} == {"a", "b"}
        assert s.gc(dry_run=True).orphan_blocks == 0


# -- fork ----------------------------------------------------------------------------------------------


def test_fork_at_block_multiples_and_full_length(store):
    ids = ids_for(3 * BT + 7, 21)
    logits = np.arange(10, dtype=np.float32)
    kv = put(store, "src", ids, last_logits=logits)
    blocks = count(store, "blocks")
    for n in (BT, 2 * BT, 3 * BT):
        f = store.fork("src", f"f{n}", n)
        assert f.length == n and f.last_logits is None and f.meta["forked_from"] == "src"
        rec, got = store.load_session(f"f{n}")
        assert np.array_equal(rec.token_ids, ids[:n])
        assert_kv_equal(got, prefix_kv(kv, n))
    full = store.fork("src", "full")
    assert full.length == len(ids) and np.array_equal(full.last_logits, logits)
    assert_kv_equal(store.load_session("full")[1], kv)
    assert count(store, "blocks") == blocks
    store.delete("src")
    assert_kv_equal(store.load_session("f32")[1], prefix_kv(kv, 2 * BT))
    assert_kv_equal(store.load_session("full")[1], kv)


@pytest.mark.parametrize("tokens", [0, -1, BT - 1, BT + 1, 3 * BT + 8, 1000, "x"])
def test_fork_rejects_bad_token_counts(store, tokens):
    put(store, "src", ids_for(3 * BT + 7, 22))
    before = snapshot(store)
    with pytest.raises(ValueError):
        store.fork("src", "dst", tokens)
    assert snapshot(store) == before


def test_fork_names_and_existing_targets(store):
    put(store, "src", ids_for(2 * BT, 23))
    put(store, "other", ids_for(BT, 24))
    with pytest.raises(SessionNotFoundError):
        store.fork("missing", "dst")
    with pytest.raises(InvalidSessionNameError):
        store.fork("src", "a/b")
    with pytest.raises(SessionExistsError):
        store.fork("src", "other")
    store.fork("src", "other", BT, overwrite=True)
    assert store.session("other").length == BT
    assert np.array_equal(store.session("other").token_ids, store.session("src").token_ids[:BT])
    store.gc()
    assert count(store, "blocks") == 2 * LAY.num_layers          # other's old block was freed


# -- leases ---------------------------------------------------------------------------------------------


def test_second_writer_is_refused_and_release_is_ours_only(store):
    lease = store.sessions.acquire("doc")
    assert (lease.pid, lease.session) == (os.getpid(), "doc")
    with pytest.raises(SessionBusyError) as e:
        store.sessions.acquire("doc")
    assert e.value.session == "doc" and f"pid {os.getpid()}" in str(e.value)
    with pytest.raises(SessionBusyError):                        # put_session takes the lease too
        put(store, "doc", ids_for(20, 25))
    assert not store.exists("doc")
    assert [x.token for x in store.sessions.live_leases()] == [lease.token]
    store.sessions.acquire("other")                              # leases are per session
    store.sessions.release(lease)
    newer = store.sessions.acquire("doc")
    store.sessions.release(lease)                                # a stale handle removes nothing
    assert {x.token for x in store.sessions.live_leases()} >= {newer.token}
    with pytest.raises(SessionBusyError):
        store.sessions.acquire("doc")
    store.sessions.release(newer)
    store.sessions.acquire("doc")


def test_unreadable_dead_and_foreign_leases(store):
    import socket

    from tierstore.sessions import _boot_id

    def plant(value: bytes):
        store.cold.write(lambda txn: txn.put(b"doc", value, db=store.cold.db("leases")))

    def lease(**kw) -> Lease:
        base = dict(session="doc", pid=os.getpid(), host=socket.gethostname(), boot=_boot_id(), start="1",
                    token="t", since=time.time())
        return Lease(**{**base, **kw})

    plant(b"{not json")                                          # unreadable: protects nothing
    store.sessions.release(store.sessions.acquire("doc"))
    reused = lease()                                             # our pid, another start time: pid reuse
    assert not reused.alive()
    plant(reused.to_bytes())
    store.sessions.release(store.sessions.acquire("doc"))
    foreign = lease(host="elsewhere.example", pid=1)             # another host cannot be checked: kept
    assert foreign.alive()
    plant(foreign.to_bytes())
    with pytest.raises(SessionBusyError, match="pid 1 on elsewhere.example"):
        store.sessions.acquire("doc")


_HOLDER = """
import sys, time
import tierstore
s = tierstore.open(sys.argv[1])
s.sessions.acquire("doc")
print("held", flush=True)
time.sleep(120)
"""


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
        return data[data.rindex(b")") + 2:].split()[0].decode()
    except OSError:
        return "gone"


def test_lease_of_a_sigkilled_writer_is_taken_over(store):
    child = subprocess.Popen([sys.executable, "-c", _HOLDER, store.path], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline() == "held\n", child.stderr.read()
        with pytest.raises(SessionBusyError) as e:
            store.sessions.acquire("doc")
        assert e.value.session == "doc" and f"pid {child.pid}" in str(e.value)
        assert [x.pid for x in store.sessions.live_leases()] == [child.pid]
        os.kill(child.pid, signal.SIGKILL)
        deadline = time.time() + 10
        while _state(child.pid) not in ("Z", "gone") and time.time() < deadline:
            time.sleep(0.02)
        if os.path.exists("/proc"):
            assert _state(child.pid) == "Z"                      # killed, not yet reaped by us
            assert store.sessions.live_leases() == []
        child.wait(10)
        lease = store.sessions.acquire("doc")                    # taken over
        assert lease.pid == os.getpid()
        store.sessions.release(lease)
        put(store, "doc", ids_for(20, 26))
        assert store.gc(dry_run=True).skipped_live_writers == 0
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()

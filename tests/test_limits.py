"""Resource limits: the LMDB map fills (it grows, also under a reader in another process), the
disk fills (``RLIMIT_FSIZE`` in a writer process: the commit fails with a typed error, the
previous state stays readable and verifiable, the process writes again once space is back), the
cold quota is reached, the store is read-only (``readonly=True``, and a real read-only mount in
a private mount namespace), reader slots run out (typed error; slots of SIGKILLed readers are
reclaimed; threads return their slots), and closed stores give their pools back.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import tierstore
from tierstore import KVLayout
from tierstore.adapters.hf import TieredCache
from tierstore.errors import QuotaExceededError, StoreReadOnlyError, TierstoreError
from tierstore.tiers import cold as cold_mod
from tierstore.tools import crash_writer as cw
from tierstore.tools.bench.crash import check_session
from tierstore.tools.cli import cli
from tierstore.maintenance.verify import verify_store

from support import file_digest as sha


def generate(model, cache, ids, n):
    ids = torch.as_tensor(ids).reshape(1, -1)
    return model.generate(ids, attention_mask=torch.ones_like(ids), cache=cache, max_new_tokens=n,
                          do_sample=False, pad_token_id=0)


def base_store(path, model, tokens=30, new=10):
    """A store with one committed session "base"."""
    ids = torch.randint(1, cw.VOCAB, (tokens,), generator=torch.Generator().manual_seed(11))
    with cw.open_store(path, model) as st:
        with TieredCache(st, model, session="base") as cache:
            generate(model, cache, ids, new)
        return st.session("base")


def exact(path, model, name="base"):
    with cw.open_store(path, model) as st:
        return check_session(st, model, st.session(name), None)[0]


# -- map full -----------------------------------------------------------------------------------

LAY = KVLayout(num_layers=4, kv_heads=8, head_dim=64, block_tokens=64, dtype=torch.float32)

_MAP_READER = textwrap.dedent("""
    import sys
    from tierstore.tiers import cold
    cold.ColdStore.__init__.__kwdefaults__["map_size"] = 1 << 20
    import tierstore
    from tierstore.maintenance.verify import verify_store
    with tierstore.open(sys.argv[1], readonly=True) as st:
        start = st.cold.env.info()["map_size"]
        print(start, [r.name for r in st.list()], flush=True)
        sys.stdin.readline()                  # the writer grows the map meanwhile
        rec, kv = st.load_session("big")
        print(start, st.cold.env.info()["map_size"], rec.length, verify_store(st).ok, flush=True)
""")


def test_map_full_grows_under_a_reader_in_another_process(tmp_path, monkeypatch):
    monkeypatch.setitem(cold_mod.ColdStore.__init__.__kwdefaults__, "map_size", 1 << 20)
    path = str(tmp_path / "kv")
    g = torch.Generator().manual_seed(0)
    kv = [(torch.randn(8, 512, 64, generator=g), torch.randn(8, 512, 64, generator=g)) for _ in range(4)]
    tierstore.open(path).close()
    reader = subprocess.Popen([sys.executable, "-c", _MAP_READER, path], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert reader.stdout.readline().startswith(str(1 << 20)), reader.stderr.read()
        with tierstore.open(path) as st:                     # 8 MiB of KV into a 1 MiB map
            assert st.cold.env.info()["map_size"] == 1 << 20
            st.put_session("big", layout=LAY, kv=kv, token_ids=np.arange(512), fingerprint="fp")
            grown = st.cold.env.info()["map_size"]
            assert grown >= 8 << 20
        reader.stdin.write("\n")
        reader.stdin.flush()
        start, seen, length, ok = reader.stdout.readline().split()
        assert int(seen) >= 8 << 20 and int(length) == 512 and ok == "True", reader.stderr.read()
        assert reader.wait(60) == 0
    finally:
        if reader.poll() is None:
            reader.kill()
            reader.wait()
    with tierstore.open(path, readonly=True) as st:
        _, got = st.load_session("big")
    assert all(torch.equal(a, c) and torch.equal(b, d) for (a, b), (c, d) in zip(got, kv))


def test_map_full_grows_during_write_back(tmp_path, model, monkeypatch):
    """TieredCache's write-back thread and commit hit MapFullError: the map grows, nothing lost."""
    monkeypatch.setitem(cold_mod.ColdStore.__init__.__kwdefaults__, "map_size", 1 << 20)
    path = str(tmp_path / "kv")
    lay = KVLayout(num_layers=1, kv_heads=4, head_dim=64, block_tokens=64, dtype=torch.float32)
    g = torch.Generator().manual_seed(1)
    with tierstore.open(path) as st:                           # most of the 1 MiB map: taken
        st.put_session("filler", layout=lay, kv=[(torch.randn(4, 384, 64, generator=g),) * 2],
                       token_ids=np.arange(384), fingerprint="fp")
        assert st.cold.env.info()["map_size"] == 1 << 20
    rec = base_store(path, model, tokens=200, new=40)
    assert rec.length >= 200
    with tierstore.open(path, readonly=True) as st:
        assert st.cold.env.info()["map_size"] > 1 << 20 and verify_store(st).ok
    assert exact(path, model) == "ok"


# -- disk full ----------------------------------------------------------------------------------

_DISK_FULL = textwrap.dedent("""
    import json, os, resource, signal, sys, torch
    torch.set_num_threads(1)
    import tierstore
    from tierstore.adapters.hf import TieredCache
    from tierstore.errors import TierstoreError
    from tierstore.tools import crash_writer as cw
    from tierstore.maintenance.verify import verify_store
    path, margin = sys.argv[1], int(sys.argv[2])
    model = cw.tiny_model()
    out = {}
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)        # a write past the limit fails with EFBIG
    with cw.open_store(path, model) as st:
        before = st.session("base")
        size = os.path.getsize(os.path.join(path, "data.mdb"))
        resource.setrlimit(resource.RLIMIT_FSIZE, (size + margin, resource.RLIM_INFINITY))
        for what in ("extend", "new"):
            try:
                if what == "extend":
                    cache = TieredCache.resume(st, model, "base", commit_on_close=False)
                    ids = cache.full_ids(list(range(1, 120)))
                else:
                    cache = TieredCache(st, model, session="other", commit_on_close=False)
                    ids = (torch.arange(150) % 120 + 1)[None]
                with cache:
                    model.generate(ids, attention_mask=torch.ones_like(ids), cache=cache, max_new_tokens=20,
                                   do_sample=False, pad_token_id=0)
                    cache.commit()
                out[what] = ["no error"]
            except TierstoreError as e:
                out[what] = ["typed", type(e).__name__, str(e)]
            except Exception as e:
                out[what] = ["UNTYPED", type(e).__name__, str(e)]
        after = st.session("base")                       # the previous state, readable in this process
        out["same_record"] = after.token_ids.tolist() == before.token_ids.tolist()
        st.load_session("base")
        out["verify_ok"] = verify_store(st).ok
        out["other_exists"] = st.exists("other")
        resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        with TieredCache(st, model, session="after") as cache:   # space is back: writes work again
            ids = torch.arange(3, 40)[None]
            model.generate(ids, attention_mask=torch.ones_like(ids), cache=cache, max_new_tokens=3,
                           do_sample=False, pad_token_id=0)
        out["after"] = st.session("after").length
    print(json.dumps(out))
""")


def test_disk_full_fails_the_commit_cleanly(tmp_path, model):
    path = str(tmp_path / "kv")
    base_store(path, model)
    res = subprocess.run([sys.executable, "-c", _DISK_FULL, path, str(3 * 4096)], capture_output=True,
                         text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    for what in ("extend", "new"):
        assert out[what][0] == "typed", out[what]
        assert "I/O error" in out[what][2] or "disk full" in out[what][2], out[what]
    assert out["same_record"] and out["verify_ok"] and not out["other_exists"] and out["after"] > 30
    res = CliRunner().invoke(cli, ["--store", path, "verify"])
    assert res.exit_code == 0, res.output
    assert exact(path, model) == "ok" and exact(path, model, "after") == "ok"


def test_cold_quota_reached_by_a_generating_cache(tmp_path, model):
    path = str(tmp_path / "kv")
    base_store(path, model)
    with tierstore.open(path, readonly=True) as st:
        used = st.cold.used_bytes()
    before = sha(path)
    with cw.open_store(path, model, cold=used + 4096) as st:
        with pytest.raises(QuotaExceededError, match="quota"):
            with TieredCache.resume(st, model, "base", commit_on_close=False) as cache:
                generate(model, cache, cache.full_ids(list(range(1, 100))), 10)
                cache.commit()
        assert st.session("base").length == 39
    assert exact(path, model) == "ok"
    with tierstore.open(path, readonly=True) as st:
        assert verify_store(st).ok
    assert sha(path) != before                                 # (orphans may be written, then gc'd)
    assert CliRunner().invoke(cli, ["--store", path, "gc"]).exit_code == 0


# -- read-only ------------------------------------------------------------------------------------


def test_readonly_store_reads_and_refuses_writes(tmp_path, model):
    path = str(tmp_path / "kv")
    base_store(path, model)
    st0 = tierstore.open(path)
    st0.fork("base", "fork", 16)
    st0.close()
    before = sha(path)
    with cw.open_store(path, model, readonly=True) as st:
        assert sorted(r.name for r in st.list()) == ["base", "fork"]
        st.load_session("base")
        assert verify_store(st).ok
        rec = st.session("base")
        _, kv = st.load_session("base")
        writes = [
            lambda: st.put_session("new", layout=rec.layout, kv=kv, token_ids=rec.token_ids,
                                   fingerprint=rec.fingerprint),
            lambda: st.fork("base", "other"), lambda: st.delete("fork"),
            lambda: st.sessions.acquire("base"), lambda: TieredCache(st, model, session="new"),
            lambda: TieredCache.resume(st, model, "base"),
        ]
        for w in writes:
            with pytest.raises(StoreReadOnlyError, match="read-only"):
                w()
        assert st.gc(dry_run=True).orphan_blocks == 0
        assert not model._forward_pre_hooks
    runner = CliRunner()
    for args in (["ls"], ["show", "base"], ["stat"], ["verify"], ["gc", "--dry-run"],
                 ["export", "base", str(tmp_path / "x.safetensors")]):
        assert runner.invoke(cli, ["--store", path, *args]).exit_code == 0, args
    assert sha(path) == before                                 # read-only never wrote a byte


_RO_MOUNT = textwrap.dedent("""
    set -e
    mount --bind "$1" "$2"
    mount -o remount,bind,ro "$2"
    exec "$3" -c "$4" "$2" "$5"
""")

_RO_CHECK = textwrap.dedent("""
    import json, os, sys
    import tierstore
    from click.testing import CliRunner
    from tierstore.errors import StoreReadOnlyError
    from tierstore.tools.cli import cli
    from tierstore.maintenance.verify import verify_store
    mnt, out_dir = sys.argv[1], sys.argv[2]
    store = os.path.join(mnt, "kv")
    out = {"touch": None}
    try:
        open(os.path.join(mnt, "probe"), "w")
    except OSError as e:
        out["touch"] = e.strerror
    with tierstore.open(store, readonly=True) as st:
        out["sessions"] = [r.name for r in st.list()]
        out["length"] = st.load_session("base")[0].length
        out["verify"] = verify_store(st).ok
    try:
        tierstore.open(store)
        out["writable_open"] = "opened"
    except StoreReadOnlyError as e:
        out["writable_open"] = str(e)
    r = CliRunner()
    out["cli"] = {" ".join(a): r.invoke(cli, ["--store", store, *a]).exit_code for a in (
        ["ls"], ["show", "base"], ["verify"], ["export", "base", os.path.join(out_dir, "x.st")],
        ["gc"], ["rm", "base", "-y"])}
    print(json.dumps(out))
""")


def test_read_only_mount(tmp_path, model):
    """A real read-only file system (a read-only bind mount in a private mount namespace: root
    bypasses chmod): readers work without a lock file, writers get one clear error."""
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-m", "true"]).returncode != 0:
        pytest.skip("no private mount namespace (unshare -m) here: read-only mounts cannot be tested")
    src, mnt = tmp_path / "src", tmp_path / "mnt"
    src.mkdir()
    mnt.mkdir()
    base_store(str(src / "kv"), model)
    os.unlink(src / "kv" / "lock.mdb")                        # as on read-only media: no lock file
    before = sha(src / "kv")
    res = subprocess.run(["unshare", "-m", "sh", "-c", _RO_MOUNT, "sh", str(src), str(mnt), sys.executable,
                          _RO_CHECK, str(tmp_path)], capture_output=True, text=True, timeout=120)
    if res.returncode != 0 and "mount" in res.stderr and "Traceback" not in res.stderr:
        pytest.skip(f"cannot mount here: {res.stderr.strip()[:200]}")
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["touch"] == "Read-only file system"
    assert out["sessions"] == ["base"] and out["length"] == 39 and out["verify"]
    assert "not writable" in out["writable_open"] and "readonly=True" in out["writable_open"]
    assert out["cli"] == {"ls": 0, "show base": 0, "verify": 0, f"export base {tmp_path}/x.st": 0,
                          "gc": 1, "rm base -y": 1}
    assert sha(src / "kv") == before and not (src / "kv" / "lock.mdb").exists()


# -- readers ------------------------------------------------------------------------------------


def active_readers(st) -> list[int]:
    """pids of the reader slots in use in the lock file."""
    return [int(ln.split()[0]) for ln in st.cold.env.readers().splitlines()[1:] if ln.split()]


def test_threads_return_their_reader_slots(tmp_path, model):
    path = str(tmp_path / "kv")
    base_store(path, model)
    with tierstore.open(path, readonly=True) as st:
        base = len(active_readers(st))
        n = 24
        barrier = threading.Barrier(n + 1)
        release = threading.Event()
        errors = []

        def hold():
            try:
                with st.cold.read() as txn:
                    txn.get(b"base", db=st.cold.db("sessions"))
                    barrier.wait(30)
                    release.wait(30)
                st.load_session("base")                       # and once more, after letting go
            except Exception as e:  # noqa: BLE001
                errors.append(e)

        threads = [threading.Thread(target=hold) for _ in range(n)]
        for t in threads:
            t.start()
        barrier.wait(30)
        assert len(active_readers(st)) == base + n
        release.set()
        for t in threads:
            t.join(30)
        assert not errors
        assert len(active_readers(st)) == base
        assert st.cold.page_stats()["readers"] <= 2 * n + 2   # slots are reused, not leaked


_HOG = textwrap.dedent("""
    import sys, time, lmdb
    env = lmdb.open(sys.argv[1], max_dbs=16, readonly=True, max_readers=8)
    txns = [env.begin() for _ in range(int(sys.argv[2]))]   # every slot, then SIGKILL
    print("held", flush=True)
    time.sleep(120)
""")


def test_reader_slots_run_out_and_dead_readers_are_reclaimed(tmp_path, model, monkeypatch):
    monkeypatch.setattr(cold_mod, "MAX_READERS", 8)
    path = str(tmp_path / "kv")
    base_store(path, model)                                    # the lock file now has 8 slots
    with tierstore.open(path, readonly=True) as st:
        assert st.cold.env.max_readers() == 8
        with contextlib.ExitStack() as stack:
            for _ in range(8):
                stack.enter_context(st.cold.read())
            with pytest.raises(TierstoreError, match="all 8 LMDB reader slots are in use"):
                st.session("base")
        assert st.session("base").length == 39                # slots given back: reads work again
        hog = subprocess.Popen([sys.executable, "-c", _HOG, path, "8"], stdout=subprocess.PIPE, text=True)
        try:
            assert hog.stdout.readline() == "held\n"
            os.kill(hog.pid, signal.SIGKILL)
            hog.wait(30)
            assert active_readers(st).count(hog.pid) == 8      # the dead process's slots: all of them
            assert st.session("base").length == 39            # full: reader_check frees them, the read goes on
            assert hog.pid not in active_readers(st)
        finally:
            if hog.poll() is None:
                hog.kill()
                hog.wait()
    # a process keeps the store open (the lock table is not reset), another dies holding slots:
    # the next open clears them at once
    holder = subprocess.Popen([sys.executable, "-c", _HOG, path, "0"], stdout=subprocess.PIPE, text=True)
    hog = subprocess.Popen([sys.executable, "-c", _HOG, path, "3"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n" and hog.stdout.readline() == "held\n"
        os.kill(hog.pid, signal.SIGKILL)
        hog.wait(30)
        with tierstore.open(path) as again:
            assert hog.pid not in active_readers(again)
    finally:
        for p in (holder, hog):
            if p.poll() is None:
                p.kill()
                p.wait()


def test_a_closed_store_gives_its_pools_back(tmp_path, model):
    """Closing the store frees the hot and warm pools, though a cache object lives on (the
    attention function remembers the last active cache). Checked on the pool tensors themselves
    (weak references), not on the process's RSS, which other tests and malloc arenas blur."""
    import weakref

    st = tierstore.open(str(tmp_path / "kv"), hot="96MiB", warm="96MiB", block_tokens=cw.BLOCK_TOKENS)
    cache = TieredCache(st, model, session="big")
    generate(model, cache, torch.arange(1, 30), 3)
    cache.close()
    pools = st.manager.pools()
    tensors = [weakref.ref(t) for p in pools for t in (p.k, p.v)]
    assert sum(p.nbytes for p in pools) > 150 << 20           # the pools exist
    del pools
    st.close()
    gc.collect()
    assert all(r() is None for r in tensors)                  # ... and are gone with the store
    del cache


# -- dropped without close(): finalizers; pools take memory as blocks arrive ---------------------


def _tierstore_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith("tierstore-") and t.is_alive()}


def test_a_dropped_store_gives_back_its_pools_threads_and_path(tmp_path, model):
    """A Store (and a TieredCache on it) dropped without close(): once collected, its pools and
    worker threads are gone and the path opens again (LMDB opens a file once per process), with
    no lease left behind. Checked through weak references and thread objects, not timing."""
    import weakref

    path = str(tmp_path / "kv")
    before = _tierstore_threads()
    for i in range(3):
        store = tierstore.open(path, hot="4MiB", warm="8MiB", block_tokens=cw.BLOCK_TOKENS)
        cache = TieredCache(store, model, session=f"s{i}")
        generate(model, cache, torch.arange(1, 40), 3)
        cache.commit()
        mine = _tierstore_threads() - before
        assert mine                                             # the manager's writer, encoders, ...
        pools = store.manager.pools()
        refs = [weakref.ref(store), weakref.ref(cache)] + [weakref.ref(p.kv) for p in pools]
        del cache, store, pools
        gc.collect()
        assert all(r() is None for r in refs)                   # store, cache and pool buffers are gone
        assert not any(t.is_alive() for t in mine)              # ... and so are its threads
        assert not model._forward_pre_hooks and not model._forward_hooks
    assert _tierstore_threads() <= before
    with tierstore.open(path, block_tokens=cw.BLOCK_TOKENS) as st:  # the path opens again
        assert sorted(r.name for r in st.list()) == ["s0", "s1", "s2"]
        assert st.sessions.live_leases() == []                  # no lease outlived its store
        TieredCache.resume(st, model, "s2").close()


def test_closing_a_store_under_an_open_cache_releases_its_leases(tmp_path, model):
    path = str(tmp_path / "kv")
    st = cw.open_store(path, model)
    cache = TieredCache(st, model, session="open")
    generate(model, cache, torch.arange(1, 20), 2)
    st.close()                                                  # the cache was never closed
    with cw.open_store(path, model) as st2:
        assert st2.sessions.live_leases() == []
        TieredCache(st2, model, session="open").close()         # a writer of this process gets it
    del cache


def _rss_anon_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no RssAnon in /proc/self/status")


def _resident_fraction(t: torch.Tensor) -> float:
    """Share of the pages under ``t``'s storage that are resident (``/proc/self/pagemap``, bit 63
    of each page's entry: present)."""
    page = os.sysconf("SC_PAGE_SIZE")
    start = t.data_ptr()
    first, last = start // page, (start + t.numel() * t.element_size() - 1) // page
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(first * 8)
        entries = np.frombuffer(f.read((last - first + 1) * 8), dtype=np.uint64)
    return float(((entries >> np.uint64(63)) & np.uint64(1)).mean())


@pytest.mark.skipif(not os.path.exists("/proc/self/pagemap"), reason="needs /proc/self/pagemap (Linux)")
def test_pools_take_memory_as_blocks_arrive(tmp_path, model):
    """Default budgets (1 GiB hot + 4 GiB warm) and a small session: the pools are allocated at
    their budgets but take anonymous memory only where blocks were written (pageable host pools;
    a CPU model's warm pool is not pinned). ``prepare`` faults a pool in on purpose."""
    gc.collect()
    start = _rss_anon_mib()
    with tierstore.open(str(tmp_path / "kv"), hot="1GiB", warm="4GiB", block_tokens=cw.BLOCK_TOKENS) as st:
        with TieredCache(st, model, session="small") as cache:
            generate(model, cache, torch.arange(1, 60), 8)
            usage = st.manager.usage()
            grown = _rss_anon_mib() - start
        assert usage["hot_allocated_bytes"] + usage["warm_allocated_bytes"] > 4 << 30   # the budgets exist
        assert not any(p.pinned for p in st.manager.budgets.warm.values())
        assert grown < 256, f"{grown:.0f} MiB of anonymous memory for a {usage['hot_used_bytes']} byte session"
        assert _resident_fraction(next(iter(st.manager.budgets.warm.values())).kv) < 0.05  # 4 GiB, nearly untouched
    with tierstore.open(str(tmp_path / "kv2"), hot="160MiB", warm="64MiB", block_tokens=cw.BLOCK_TOKENS) as st:
        from tierstore.adapters.fingerprint import kv_layout
        hot, warm = st.manager.prepare(kv_layout(model, cw.BLOCK_TOKENS), "cpu")
        # every page of both pools is resident now (the kernel's page map, page by page: a
        # process-wide RSS delta is blurred by what the allocator reuses or returns meanwhile)
        assert _resident_fraction(hot.kv) > 0.99 and _resident_fraction(warm.kv) > 0.99


def test_finalizers_release_outside_workers_collections_and_held_locks(tmp_path, model):
    """``lifecycle.release`` runs a release at once from plain code, and in a thread of its own
    from a tierstore worker thread, during a cycle collection (which may interrupt code holding
    any lock) or while the given lock is held. A cache dropped inside a reference cycle is so
    released by a release thread (joined here, not waited for)."""
    import weakref

    from tierstore import lifecycle

    ran: list[str] = []

    def fn() -> None:
        ran.append(threading.current_thread().name)

    assert lifecycle.release(fn, what="plain") is None and ran == [threading.current_thread().name]
    lock = threading.RLock()
    with lock:
        t = lifecycle.release(fn, what="locked", locks=[lock])
    t.join()
    started: list = []
    w = threading.Thread(target=lambda: started.append(lifecycle.release(fn, what="worker")), name="tierstore-writer")
    w.start()
    w.join()
    started.pop().join()

    class Cycle:
        pass

    c = Cycle()
    c.me = c
    weakref.finalize(c, lambda: started.append(lifecycle.release(fn, what="in gc")))
    del c
    gc.collect()
    started.pop().join()
    assert ran[1:] == ["tierstore-release"] * 3

    with cw.open_store(str(tmp_path / "kv"), model) as st:
        cache = TieredCache(st, model, session="cyc")
        generate(model, cache, torch.arange(1, 30), 2)
        cache.commit()
        holder = Cycle()
        holder.me, holder.cache = holder, cache
        alive = weakref.ref(cache)
        del cache, holder
        gc.collect()
        for t in [t for t in threading.enumerate() if t.name == "tierstore-release"]:
            t.join()
        assert alive() is None and st.manager.usage()["hot_blocks"] == 0
        assert not model._forward_pre_hooks and st.sessions.live_leases() == []

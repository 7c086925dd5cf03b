"""The facade and the cold tier on real LMDB files: round trips, opening rules (read-only, not a
store, closed, fork), map growth (in this process and adopted from another), cross-process
readers, damaged records, and ``stats()``."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import struct
import subprocess
import sys
import textwrap
import threading
import warnings
from pathlib import Path

import lmdb
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tierstore
from tierstore.codec import seal_envelope
from tierstore.codec.envelope import HEADER_SIZE as ENV_HEADER, _checksum as envelope_checksum
from tierstore.errors import (CorruptBlockError, CorruptRecordError, FormatVersionError, MissingBlockError,
                              ModelMismatchError, NotAStoreError, SessionNotFoundError, StoreClosedError,
                              StoreReadOnlyError)
from tierstore.layout import KVLayout
from tierstore.records import SESSION_KIND, SessionRecord
from tierstore.sessions import SessionStore
from tierstore.tiers.cold import ColdStore
from tierstore.tiers.schema import DB_NAMES, block_key

from support import assert_kv_equal, bits, file_digest, random_kv

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
FP = "0123456789abcdef" * 2
REPO = Path(__file__).resolve().parent.parent


# -- helpers ------------------------------------------------------------------------------------


def ids_for(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed + 1000).integers(0, 49_152, n)


def put(store, name, layout, n, seed=0, ids=None, **kw):
    kv = random_kv(layout, n, seed, kind="bits")
    ids = ids_for(n, seed) if ids is None else ids
    rec = store.put_session(name, layout=layout, kv=kv, token_ids=ids, fingerprint=FP, **kw)
    return rec, kv


def entries(store_or_cold, db: str) -> int:
    cold = getattr(store_or_cold, "cold", store_or_cold)
    return cold.entries(db)


def run_py(code: str, *args: str, timeout: int = 120, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True,
                          text=True, timeout=timeout, **kw)


LAY = KVLayout(num_layers=2, kv_heads=2, head_dim=8, block_tokens=16, dtype=torch.bfloat16)
pytestmark = pytest.mark.store(block_tokens=16)


# -- round trips --------------------------------------------------------------------------------


@pytest.mark.parametrize("codec", ["raw", "zstd"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [16 * 3, 16 * 3 + 5, 1])
def test_put_load_bit_exact(tmp_path, dtype, codec, n):
    lay = KVLayout(num_layers=3, kv_heads=2, head_dim=8, block_tokens=16, dtype=dtype)
    logits = np.random.default_rng(1).standard_normal(50).astype(np.float32)
    with tierstore.open(tmp_path / "kv", codec=codec) as s:
        rec, kv = put(s, "doc-1", lay, n, seed=n, last_logits=logits, model_name="m/x", tokenizer_name="t/x",
                      meta={"k": 1})
        assert rec.codec.name == codec
    with tierstore.open(tmp_path / "kv", readonly=True) as s:  # a fresh open reads it
        got_rec, got = s.load_session("doc-1")
        assert_kv_equal(got, kv)
        assert got_rec.length == n and got_rec.num_blocks == -(-n // 16)
        assert np.array_equal(got_rec.token_ids, ids_for(n, n))
        assert np.array_equal(got_rec.last_logits, logits)
        assert (got_rec.layout, got_rec.codec, got_rec.fingerprint) == (lay, rec.codec, FP)
        assert (got_rec.model_name, got_rec.tokenizer_name, got_rec.meta) == ("m/x", "t/x", {"k": 1})
        assert got_rec.format_version == 1
        last = got_rec.num_blocks - 1
        k, v = s.read_block(got_rec, 2, last)
        assert k.shape == (2, got_rec.block_len(last), 8)
        assert torch.equal(bits(k), bits(kv[2][0][:, last * 16:]))


_EXAMPLES: list[str] = []


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(layers=st.integers(1, 3), heads=st.integers(1, 3), head_dim=st.integers(1, 12),
       bt=st.sampled_from([1, 5, 16, 64]), n=st.integers(1, 90), dtype=st.sampled_from(DTYPES),
       codec=st.sampled_from(["raw", "zstd", "zstd:3"]), seed=st.integers(0, 2**16))
def test_roundtrip_property(store, layers, heads, head_dim, bt, n, dtype, codec, seed):
    lay = KVLayout(num_layers=layers, kv_heads=heads, head_dim=head_dim, block_tokens=bt, dtype=dtype)
    name = f"h{seed}-{n}-{bt}"
    # content addressing: token ids must determine the KV, so every example gets ids of its own
    _EXAMPLES.append(name)
    _, kv = put(store, name, lay, n, seed=seed, codec=codec, overwrite=True,
                ids=ids_for(n, 100_000 + len(_EXAMPLES)))
    rec, got = store.load_session(name)
    assert_kv_equal(got, kv)
    assert rec.codec == tierstore.CodecConfig.parse(codec)


def test_put_session_rejects_shapes_that_do_not_match_the_layout(store):
    kv = random_kv(LAY, 20, 0, kind="bits")
    with pytest.raises(ModelMismatchError):
        store.put_session("x", layout=LAY, kv=kv[:1], token_ids=ids_for(20, 0), fingerprint=FP)
    with pytest.raises(ModelMismatchError, match="layer 1"):
        bad = [kv[0], (kv[1][0].float(), kv[1][1].float())]
        store.put_session("x", layout=LAY, kv=bad, token_ids=ids_for(20, 0), fingerprint=FP)
    with pytest.raises(ModelMismatchError):
        store.put_session("x", layout=LAY, kv=kv, token_ids=ids_for(21, 0), fingerprint=FP)
    assert not store.exists("x") and entries(store, "blocks") == 0 and entries(store, "leases") == 0


def test_load_missing_session(store):
    with pytest.raises(SessionNotFoundError) as e:
        store.load_session("nope")
    assert e.value.session == "nope"


def test_concurrent_threads_share_one_store(store):
    errors = []

    def work(t):
        try:
            for i in range(3):
                _, kv = put(store, f"t{t}-{i}", LAY, 20 + t, seed=10 * t + i)
                assert_kv_equal(store.load_session(f"t{t}-{i}")[1], kv)
                store.list()
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)
    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(store.list()) == 12 and entries(store, "leases") == 0


# -- ColdStore contracts --------------------------------------------------------------------------


def test_cold_put_get_delete_scan(tmp_path):
    cs = ColdStore(tmp_path / "c")
    try:
        items = [(b"a" * 16 + struct.pack(">H", i), bytes([i]) * (i + 1)) for i in (3, 1, 2, 0)]
        assert cs.put_many("blocks", items) == sum(len(k) + len(v) for k, v in items)
        assert cs.get_many("blocks", [items[0][0], b"zz", items[1][0]]) == [items[0][1], None, items[1][1]]
        keys = [k for k, _ in cs.scan("blocks", b"a" * 16)]
        assert keys == sorted(k for k, _ in items)
        assert [k for k, v in cs.scan("blocks", b"a" * 16, keys_only=True)] == keys
        assert list(cs.scan("blocks", b"b")) == []
        assert cs.put_many("blocks", [(items[0][0], b"new")], overwrite=False) == 0
        assert cs.get("blocks", items[0][0]) == items[0][1]
        assert cs.delete_many("blocks", [items[0][0], b"zz"]) == 1
        assert cs.get("blocks", items[0][0]) is None
    finally:
        cs.close()
    assert cs.closed


def test_cold_lookup_longest_stored_prefix(tmp_path):
    cs = ColdStore(tmp_path / "c")
    chains = [bytes([i]) * 16 for i in range(5)]
    cs.put_many("blocks", [(block_key(c, layer), b"x") for c in chains[:3] for layer in range(2)])
    cs.put_many("blocks", [(block_key(chains[4], layer), b"x") for layer in range(2)])
    cs.put_many("blocks", [(block_key(chains[3], 0), b"x")])  # only one of two layers
    assert cs.lookup(chains, 2) == 3
    assert cs.lookup(chains, 1) == 5
    assert cs.lookup(chains[1:], 2) == 2
    assert cs.lookup([], 2) == 0
    cs.close()


def test_cold_put_many_is_all_or_nothing(tmp_path):
    cs = ColdStore(tmp_path / "c")
    cs.put_many("meta", [(b"k0", b"v")])
    cs.quota = cs.used_bytes() + 4096
    from tierstore.errors import QuotaExceededError
    with pytest.raises(QuotaExceededError):
        cs.put_many("blocks", [(bytes([i]) * 18, b"y" * 3000) for i in range(20)])
    assert entries(cs, "blocks") == 0
    cs.close()


# -- map growth -----------------------------------------------------------------------------------


def test_map_grows_on_map_full(tmp_path):
    cs = ColdStore(tmp_path / "c", map_size=1 << 20)
    assert cs.env.info()["map_size"] == 1 << 20
    vals = {bytes([i]) * 18: os.urandom(200_000) for i in range(20)}  # ~4 MB in one transaction
    cs.put_many("blocks", vals.items())
    assert cs.env.info()["map_size"] >= 4 << 20
    more = {bytes([i]) * 18: os.urandom(100_000) for i in range(20, 40)}
    for k, v in more.items():  # and in many small ones
        cs.put_many("blocks", [(k, v)])
    vals.update(more)
    assert cs.get_many("blocks", list(vals)) == list(vals.values())
    cs.close()
    cs = ColdStore(tmp_path / "c", readonly=True)
    assert cs.get_many("blocks", list(vals)) == list(vals.values())
    cs.close()


def test_map_growth_under_a_store(tmp_path):
    path = tmp_path / "kv"
    store = tierstore.open(path)
    store.cold.close()
    store.cold = ColdStore(path, map_size=1 << 20)
    store.sessions = SessionStore(store.cold)
    lay = KVLayout(num_layers=2, kv_heads=4, head_dim=64, block_tokens=64, dtype=torch.float32)
    _, kv = put(store, "big", lay, 1500, seed=3)  # 6 MB of raw KV into a 1 MiB map
    assert store.cold.env.info()["map_size"] > 6_000_000
    assert_kv_equal(store.load_session("big")[1], kv)
    store.close()
    with tierstore.open(path, readonly=True) as s:
        assert_kv_equal(s.load_session("big")[1], kv)


_GROWER = """
import sys
from tierstore.tiers.cold import ColdStore
cs = ColdStore(sys.argv[1], map_size=1 << 20)
for phase, line in enumerate(sys.stdin):
    n = int(line)
    cs.put_many("blocks", [(bytes([phase, i]) * 9, bytes([i]) * 100_000) for i in range(n)])
    print(cs.env.info()["map_size"], flush=True)
"""


def test_map_grown_by_another_process_is_adopted(tmp_path):
    path = tmp_path / "c"
    cs = ColdStore(path, map_size=1 << 20)
    cs.put_many("meta", [(b"mine", b"1")])
    child = subprocess.Popen([sys.executable, "-c", _GROWER, str(path)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        child.stdin.write("60\n")  # 6 MB: the file now reaches far past our 1 MiB map
        child.stdin.flush()
        size1 = int(child.stdout.readline())
        assert size1 > 6_000_000
        keys = [bytes([0, i]) * 9 for i in range(60)]
        assert cs.get_many("blocks", keys) == [bytes([i]) * 100_000 for i in range(60)]  # read adopts
        assert cs.env.info()["map_size"] >= size1
        child.stdin.write("120\n")
        child.stdin.flush()
        size2 = int(child.stdout.readline())
        assert size2 > size1
        cs.put_many("meta", [(b"after", b"2")])  # a write adopts too
        assert cs.get("blocks", bytes([1, 119]) * 9) == bytes([119]) * 100_000
        assert cs.get("meta", b"after") == b"2"
        child.stdin.close()
        assert child.wait(60) == 0, child.stderr.read()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        cs.close()


# -- other processes ------------------------------------------------------------------------------

_READER = """
import hashlib, json, sys
import tierstore
from tierstore.errors import SessionNotFoundError
store = tierstore.open(sys.argv[1], readonly=True)
for line in sys.stdin:
    out = {"names": sorted(r.name for r in store.list())}
    for name in line.split():
        try:
            rec, kv = store.load_session(name)
            h = hashlib.sha256()
            for k, v in kv:
                h.update(k.contiguous().view(-1).view(__import__("torch").uint8).numpy().tobytes())
                h.update(v.contiguous().view(-1).view(__import__("torch").uint8).numpy().tobytes())
            out[name] = [rec.length, h.hexdigest()]
        except SessionNotFoundError:
            out[name] = None
    print(json.dumps(out), flush=True)
"""


def kv_digest(kv) -> str:
    h = hashlib.sha256()
    for k, v in kv:
        h.update(k.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        h.update(v.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def test_readers_in_another_process_see_only_committed_data(store):
    _, kv_a = put(store, "a", LAY, 40, seed=1)
    # b: blocks written (orphans), record not yet committed
    kv_b = random_kv(LAY, 50, 2, kind="bits")
    rec_b = SessionRecord(name="b", layout=LAY, fingerprint=FP, fingerprint_fields={},
                          codec=store.config.codec, token_ids=ids_for(50, 2))
    for layer, (k, v) in enumerate(kv_b):
        store.sessions.put_blocks(store.encode_blocks(rec_b, layer, k, v, rec_b.chains()))
    reader = subprocess.Popen([sys.executable, "-c", _READER, store.path], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def ask() -> dict:
        reader.stdin.write("a b\n")
        reader.stdin.flush()
        line = reader.stdout.readline()
        assert line, reader.stderr.read()
        return json.loads(line)
    try:
        want_a = [40, kv_digest(kv_a)]
        assert ask() == {"names": ["a"], "a": want_a, "b": None}

        def half_commit(txn):  # the record is written, the transaction still open
            txn.put(b"b", rec_b.seal(), db=store.cold.db("sessions"))
            seen.append(ask())
        seen: list = []
        store.cold.write(half_commit)
        assert seen == [{"names": ["a"], "a": want_a, "b": None}]
        store.sessions.commit(rec_b, expect_new=False)
        assert ask() == {"names": ["a", "b"], "a": want_a, "b": [50, kv_digest(kv_b)]}
        reader.stdin.close()
        assert reader.wait(60) == 0, reader.stderr.read()
    finally:
        if reader.poll() is None:
            reader.kill()
            reader.wait()


def test_store_used_after_fork_raises_in_the_child(store):
    put(store, "a", LAY, 20)
    r, w = os.pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pid = os.fork()
    if pid == 0:  # child: report and leave without running any teardown
        code = 0
        try:
            for op in (store.list, lambda: store.load_session("a"), lambda: store.cold.get("meta", b"store"),
                       lambda: store.delete("a"), lambda: put(store, "b", LAY, 20)):
                try:
                    op()
                    code |= 1
                except StoreClosedError as e:
                    if "fork" not in str(e):
                        code |= 2
            store.close()  # must not close the parent's environment
        except BaseException:  # noqa: BLE001
            code |= 4
        os.write(w, bytes([code]))
        os._exit(0)
    os.close(w)
    got = os.read(r, 1)
    os.close(r)
    os.waitpid(pid, 0)
    assert got == b"\x00", f"child status bits {got!r}: 1 = op worked, 2 = wrong message, 4 = crash"
    assert [s.name for s in store.list()] == ["a"]
    put(store, "c", LAY, 20)


def test_closed_store_raises(tmp_path):
    s = tierstore.open(tmp_path / "kv")
    s.close()
    s.close()  # idempotent
    for op in (s.list, lambda: s.load_session("a"), lambda: s.gc(), lambda: s.stats()):
        with pytest.raises(StoreClosedError):
            op()
    with pytest.raises(StoreClosedError):
        _ = s.manager


# -- opening rules ----------------------------------------------------------------------------------


def test_readonly_reads_and_refuses_every_write(tmp_path):
    path = tmp_path / "kv"
    with tierstore.open(path, block_tokens=16) as s:
        _, kv = put(s, "a", LAY, 40)
        rec = SessionRecord(name="o", layout=LAY, fingerprint=FP, fingerprint_fields={},
                            codec=s.config.codec, token_ids=ids_for(20, 5))
        kv_o = random_kv(LAY, 20, 5, kind="bits")
        s.sessions.put_blocks(s.encode_blocks(rec, 0, *kv_o[0], rec.chains()))  # an orphan to gc
    before = file_digest(path)
    files = sorted(p.name for p in path.iterdir())
    with tierstore.open(path, readonly=True) as ro:
        assert [r.name for r in ro.list()] == ["a"]
        assert_kv_equal(ro.load_session("a")[1], kv)
        assert ro.gc(dry_run=True).orphan_blocks == 4  # 2 blocks + their 2 summaries
        writes = [lambda: put(ro, "b", LAY, 20), lambda: ro.delete("a"), lambda: ro.fork("a", "a2"),
                  lambda: ro.gc(), lambda: ro.sessions.acquire("a"),
                  lambda: ro.sessions.commit(ro.session("a").with_updates(name="c")),
                  lambda: ro.cold.put_many("meta", [(b"x", b"y")]), lambda: ro.cold.delete_many("meta", [b"store"])]
        for op in writes:
            with pytest.raises(StoreReadOnlyError):
                op()
        st_ = ro.stats()
        assert st_.sessions == 1
    assert file_digest(path) == before
    assert sorted(p.name for p in path.iterdir()) == files


@pytest.mark.parametrize("how", [dict(readonly=True), dict(create=False)])
def test_open_never_creates_a_store_unless_writing(tmp_path, how):
    missing = tmp_path / "nope" / "kv"
    with pytest.raises(NotAStoreError, match="nope"):
        tierstore.open(missing, **how)
    assert not missing.exists() and not missing.parent.exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(NotAStoreError):
        tierstore.open(empty, **how)
    assert list(empty.iterdir()) == []


@pytest.mark.parametrize("readonly", [False, True])
def test_path_that_is_a_file(tmp_path, readonly):
    f = tmp_path / "file"
    f.write_bytes(b"precious")
    with pytest.raises(NotAStoreError, match="file"):
        tierstore.open(f, readonly=readonly)
    assert f.read_bytes() == b"precious"
    with pytest.raises(NotAStoreError):
        tierstore.open(f / "kv", readonly=readonly)  # a path below a file


@pytest.mark.parametrize("readonly", [False, True])
def test_garbage_data_file_is_not_a_store(tmp_path, readonly):
    d = tmp_path / "kv"
    d.mkdir()
    (d / "data.mdb").write_bytes(b"not lmdb at all" * 1000)
    with pytest.raises(NotAStoreError):
        tierstore.open(d, readonly=readonly)
    assert (d / "data.mdb").read_bytes() == b"not lmdb at all" * 1000


def test_plain_lmdb_environment_is_not_a_store_read_only(tmp_path):
    d = tmp_path / "kv"
    env = lmdb.open(str(d), max_dbs=2)
    with env.begin(write=True) as t:
        t.put(b"k", b"v")
    env.close()
    before = file_digest(d)
    with pytest.raises(NotAStoreError, match="not a tierstore store"):
        tierstore.open(d, readonly=True)
    assert file_digest(d) == before


def test_unwritable_directory(tmp_path):
    d = tmp_path / "kv"
    with tierstore.open(d) as s:
        put(s, "a", LAY, 20)
    probe = tmp_path / "probe"
    probe.mkdir()
    probe.chmod(0o555)
    try:
        if os.access(probe, os.W_OK):
            pytest.skip(f"running as uid {os.geteuid()}, which bypasses directory permissions "
                        "(os.access says a 0o555 directory is writable): cannot test an unwritable store here")
        d.chmod(0o555)
        (d / "data.mdb").chmod(0o444)
        (d / "lock.mdb").chmod(0o444)
        with pytest.raises(StoreReadOnlyError, match="readonly=True"):
            tierstore.open(d)
        with tierstore.open(d, readonly=True) as ro:  # read-only media still read
            assert [r.name for r in ro.list()] == ["a"]
        with pytest.raises(NotAStoreError):
            tierstore.open(probe / "new")
    finally:
        for p in (probe, d):
            p.chmod(stat.S_IRWXU)
        for f in ("data.mdb", "lock.mdb"):
            (d / f).chmod(0o644)


# -- damage -----------------------------------------------------------------------------------------


def _raw_put(store, db: str, key: bytes, value: bytes | None) -> None:
    def fn(txn):
        if value is None:
            txn.delete(key, db=store.cold.db(db))
        else:
            txn.put(key, value, db=store.cold.db(db))
    store.cold.write(fn)


@pytest.mark.parametrize("codec", ["raw", "zstd"])
@pytest.mark.parametrize("where", ["header", "middle", "last"])
def test_flipped_byte_in_a_block(tmp_path, codec, where):
    with tierstore.open(tmp_path / "kv", codec=codec) as s:
        rec, kv = put(s, "doc", LAY, 40)
        key = block_key(rec.chains()[1], 1)
        data = bytearray(s.cold.get("blocks", key))
        data[{"header": 10, "middle": len(data) // 2, "last": len(data) - 1}[where]] ^= 0x40
        _raw_put(s, "blocks", key, bytes(data))
        with pytest.raises(CorruptBlockError) as e:
            s.read_block(rec, 1, 1)
        assert (e.value.session, e.value.layer, e.value.block) == ("doc", 1, 1)
        assert "'doc'" in str(e.value) and "layer 1" in str(e.value) and "block 1" in str(e.value)
        with pytest.raises(CorruptBlockError) as e:
            s.load_session("doc")
        assert (e.value.session, e.value.layer, e.value.block) == ("doc", 1, 1)
        # the other blocks are intact
        k, _ = s.read_block(rec, 0, 1)
        assert torch.equal(bits(k), bits(kv[0][0][:, 16:32]))


def test_block_copied_under_another_key_and_missing_block(store):
    rec, _ = put(store, "doc", LAY, 40)
    chains = rec.chains()
    k0, k1 = block_key(chains[0], 0), block_key(chains[1], 0)
    _raw_put(store, "blocks", k1, store.cold.get("blocks", k0))  # same shape, wrong place
    with pytest.raises(CorruptBlockError) as e:
        store.read_block(rec, 0, 1)
    assert (e.value.layer, e.value.block) == (0, 1)
    _raw_put(store, "blocks", k1, None)
    with pytest.raises(MissingBlockError) as e:
        store.load_session("doc")
    assert (e.value.session, e.value.layer, e.value.block) == ("doc", 0, 1)


@pytest.mark.parametrize("cut", [0, 1, 9, 35, 36, 40, -1, -4])
def test_truncated_session_record(store, cut):
    put(store, "doc", LAY, 40)
    put(store, "ok", LAY, 20, seed=1)
    data = store.cold.get("sessions", b"doc")
    _raw_put(store, "sessions", b"doc", data[:cut] if cut >= 0 else data[:len(data) + cut])
    for op in (lambda: store.session("doc"), lambda: store.load_session("doc")):
        with pytest.raises(CorruptRecordError) as e:
            op()
        assert e.value.session == "doc" and "'doc'" in str(e.value)
    assert [r.name for r in store.list()] == ["ok"]  # a damaged record is skipped, not fatal
    errs = [r for r in store.sessions.records() if isinstance(r, CorruptRecordError)]
    assert [e.session for e in errs] == ["doc"]


def test_every_flipped_byte_in_a_session_record_is_caught(store):
    put(store, "doc", LAY, 40, last_logits=np.ones(8, np.float32))
    data = store.cold.get("sessions", b"doc")
    for i in range(len(data)):
        bad = bytearray(data)
        bad[i] ^= 0x01
        with pytest.raises(CorruptRecordError) as e:
            SessionRecord.unseal("doc", bytes(bad))
        assert e.value.session == "doc", i
    bad = bytearray(data)
    bad[len(data) // 2] ^= 0xFF
    _raw_put(store, "sessions", b"doc", bytes(bad))
    with pytest.raises(CorruptRecordError, match="'doc'"):
        store.load_session("doc")


def test_session_record_copied_under_another_name(store):
    put(store, "doc", LAY, 40)
    _raw_put(store, "sessions", b"copy", store.cold.get("sessions", b"doc"))
    with pytest.raises(CorruptRecordError) as e:
        store.session("copy")
    assert e.value.session == "copy"
    # even resealed under the new name, the body still names the old session
    body_named_doc = store.session("doc").to_bytes()
    _raw_put(store, "sessions", b"copy", seal_envelope(b"copy", SESSION_KIND, body_named_doc))
    with pytest.raises(CorruptRecordError, match="names session 'doc'"):
        store.session("copy")
    assert [r.name for r in store.list()] == ["doc"]


def test_session_record_from_a_newer_format(store):
    rec, _ = put(store, "doc", LAY, 40)
    # a v1 envelope whose body says format_version 2
    body = rec.with_updates(format_version=2).to_bytes()
    _raw_put(store, "sessions", b"doc", seal_envelope(b"doc", SESSION_KIND, body))
    with pytest.raises(FormatVersionError) as e:
        store.load_session("doc")
    assert e.value.session == "doc" and "2" in str(e.value)
    # an envelope of version 2 with a valid checksum
    env = bytearray(rec.seal())
    struct.pack_into("<H", env, 8, 2)
    env[ENV_HEADER - 16:ENV_HEADER] = envelope_checksum(b"doc", env[:ENV_HEADER], env[ENV_HEADER:])
    _raw_put(store, "sessions", b"doc", bytes(env))
    with pytest.raises(FormatVersionError) as e:
        store.session("doc")
    assert e.value.session == "doc"
    # version 2 in the header, but the checksum says it is damage, not a newer format
    env = bytearray(rec.seal())
    struct.pack_into("<H", env, 8, 2)
    _raw_put(store, "sessions", b"doc", bytes(env))
    with pytest.raises(CorruptRecordError):
        store.session("doc")


# -- stats ------------------------------------------------------------------------------------------


def test_stats_fields(tmp_path):
    with tierstore.open(tmp_path / "kv", hot="1MiB", warm="4MiB", cold="64MiB", block_tokens=16) as s:
        empty = s.stats()
        assert empty.sessions == 0 and empty.cold_blocks == 0
        put(s, "a", LAY, 40)
        put(s, "b", LAY, 40, seed=0)  # same ids and KV: shares every block with a
        st_ = s.stats()
        assert (st_.hot_budget_bytes, st_.warm_budget_bytes, st_.cold_budget_bytes) == (1 << 20, 4 << 20, 64 << 20)
        assert st_.sessions == 2
        assert st_.cold_blocks == 3 * LAY.num_layers == entries(s, "blocks")
        assert 0 < empty.cold_used_bytes < st_.cold_used_bytes <= st_.lmdb_pages["file_bytes"]
        assert st_.hot_used_bytes == 0 and st_.warm_used_bytes == 0  # no cache in this process
        assert st_.cache_hit_rate == -1.0 and st_.prefetch_timeliness == -1.0
        assert 0.0 <= st_.memory_fragmentation <= 1.0 and 0.0 <= st_.lmdb_free_ratio <= 1.0
        pages = st_.lmdb_pages
        assert pages["used_pages"] + pages["free_pages"] <= pages["total_pages"]
        assert pages["map_size"] >= pages["file_bytes"] > 0 and pages["psize"] >= 4096
        assert json.loads(json.dumps(st_.to_json()))["sessions"] == 2
        s.delete("a", "b")
        after = s.stats()
        assert after.sessions == 0 and after.cold_blocks == 0
        assert after.lmdb_free_ratio > 0


def test_store_databases_exist(store):
    with store.cold.read() as txn:  # the main database names exactly the sub-databases
        assert {bytes(k).decode() for k in txn.cursor().iternext(values=False)} == set(DB_NAMES)
    assert all(store.cold.db(n) is not None for n in DB_NAMES)
    with pytest.raises(KeyError, match="not a sub-database"):
        store.cold.db("nope")
    assert store.sessions.meta()["block_tokens"] == 16

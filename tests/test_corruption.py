"""Corruption: every kind of stored record (block, summary, session record) flipped, truncated,
extended, swapped with another key's value, replaced by another session's or layer's record, or
re-sealed by a future format version. Each case is detected on read (a typed error naming
session, layer and block), by a resume (which then holds nothing: model unhooked, lease
released) and by ``verify`` (exit 1); none yields KV. Then whole files: a damaged, truncated,
foreign or future-format LMDB store.

The stores are real: a tiny random Llama writes them through ``TieredCache``.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import textwrap

import lmdb
import pytest
import torch
from click.testing import CliRunner

import tierstore
from tierstore.adapters.hf import TieredCache
from tierstore.codec import envelope, record
from tierstore.errors import (CorruptBlockError, CorruptRecordError, FormatVersionError, LocatedError,
                              NotAStoreError, TierstoreError)
from tierstore.tiers.cold import block_key
from tierstore.tools import crash_writer as cw
from tierstore.tools.cli import cli
from tierstore.maintenance.verify import verify_store

SUBDBS = ("meta", "sessions", "blocks", "summaries", "refs", "leases")


# -- the pristine store ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def pristine(tmp_path_factory, model):
    """alpha: 29 tokens (3 full blocks + a tail of 5); beta: fork of alpha's first 16 tokens
    (shares blocks 0 and 1); gamma: another prompt, 9+ tokens."""
    path = str(tmp_path_factory.mktemp("pristine") / "kv")
    g = torch.Generator().manual_seed(5)
    with cw.open_store(path, model) as st:
        for name, n, new in (("alpha", 20, 10), ("gamma", 13, 4)):
            ids = torch.randint(1, cw.VOCAB, (1, n), generator=g)
            with TieredCache(st, model, session=name) as cache:
                model.generate(ids, attention_mask=torch.ones_like(ids), cache=cache, max_new_tokens=new,
                               do_sample=False, pad_token_id=0)
        st.fork("alpha", "beta", 16)
        assert [st.session(n).length for n in ("alpha", "beta")] == [29, 16] and st.session("gamma").length > 8
    return path


def copy_store(src: str, dst) -> str:
    os.makedirs(dst)
    shutil.copy(os.path.join(src, "data.mdb"), dst)
    return str(dst)


def dump(path: str) -> dict:
    """Every key/value of every sub-database (raw LMDB, read-only)."""
    env = lmdb.open(path, readonly=True, lock=False, max_dbs=16)
    try:
        out = {}
        for name in SUBDBS:
            with env.begin(db=env.open_db(name.encode(), create=False)) as t:
                out.update({(name, bytes(k)): bytes(v) for k, v in t.cursor()})
        return out
    finally:
        env.close()


def raw_put(path: str, db: str, key: bytes, value: bytes) -> None:
    env = lmdb.open(path, max_dbs=16)
    try:
        with env.begin(write=True, db=env.open_db(db.encode())) as t:
            t.put(key, value)
    finally:
        env.close()


def raw_get(path: str, db: str, key: bytes) -> bytes:
    env = lmdb.open(path, readonly=True, lock=False, max_dbs=16)
    try:
        with env.begin(db=env.open_db(db.encode(), create=False)) as t:
            return bytes(t.get(key))
    finally:
        env.close()


def key_of(path: str, session: str, layer: int, block: int) -> bytes:
    with tierstore.open(path, readonly=True) as st:
        return block_key(st.session(session).chains()[block], layer)


# -- mutations --------------------------------------------------------------------------------


def flip(off: int):
    def f(v: bytes, _key: bytes) -> bytes:
        b = bytearray(v)
        b[off % len(b)] ^= 0x5A
        return bytes(b)
    return f


def truncate(n):
    return lambda v, _key: v[:n if n >= 0 else len(v) + n]


def extend(v: bytes, _key: bytes) -> bytes:
    return v + b"\x00"


def future_block(v: bytes, key: bytes) -> bytes:
    """The record as a (hypothetical) format version 2 writer would seal it: a valid checksum."""
    h = bytearray(v[:record.HEADER_SIZE])
    struct.pack_into("<H", h, 4, 2)
    h[record._CHECKSUM_AT:] = bytes(16)
    h[record._CHECKSUM_AT:] = record._checksum(key, h, [v[record.HEADER_SIZE:]])
    return bytes(h) + v[record.HEADER_SIZE:]


def future_envelope(v: bytes, key: bytes) -> bytes:
    h = bytearray(v[:envelope.HEADER_SIZE])
    struct.pack_into("<H", h, 8, 2)
    h[envelope._CHECKSUM_AT:] = envelope._checksum(key, h, v[envelope.HEADER_SIZE:])
    return bytes(h) + v[envelope.HEADER_SIZE:]


BLOCK_OFFSETS = [0, 3, 4, 5, 6, 7, 8, 10, 12, 16, 20, 24, 32, 40, 55, 56, 200, -1]   # header fields, payload
ENVELOPE_OFFSETS = [0, 4, 7, 8, 9, 10, 12, 20, 35, 36, 60, -1]
TRUNCATIONS = [0, 1, 5, 9, 30, -1]

# (session, layer, block) of the damaged record: alpha's own block, and one alpha shares with beta
TARGET = ("alpha", 1, 2)
SHARED = ("alpha", 0, 0)
OTHER_LAYER = ("alpha", 0, 2)
OTHER_SESSION = ("gamma", 1, 0)


def _cases():
    for kind, db, offsets, future in (("block", "blocks", BLOCK_OFFSETS, future_block),
                                      ("summary", "summaries", ENVELOPE_OFFSETS, future_envelope)):
        for off in offsets:
            yield pytest.param(kind, db, TARGET, "mutate", flip(off), id=f"{kind}-flip{off}")
        for n in TRUNCATIONS:
            yield pytest.param(kind, db, TARGET, "mutate", truncate(n), id=f"{kind}-truncate{n}")
        yield pytest.param(kind, db, TARGET, "mutate", extend, id=f"{kind}-extend")
        yield pytest.param(kind, db, SHARED, "mutate", flip(-2), id=f"{kind}-shared-flip")
        yield pytest.param(kind, db, TARGET, "mutate", future, id=f"{kind}-future-version")
        yield pytest.param(kind, db, TARGET, "swap", OTHER_LAYER, id=f"{kind}-swap-layers")
        yield pytest.param(kind, db, TARGET, "swap", OTHER_SESSION, id=f"{kind}-swap-sessions")
        yield pytest.param(kind, db, TARGET, "replace", OTHER_LAYER, id=f"{kind}-replace-other-layer")
        yield pytest.param(kind, db, TARGET, "replace", OTHER_SESSION, id=f"{kind}-replace-other-session")


CASES = list(_cases())
FIGURES: dict[str, int] = {"tried": 0, "detected": 0}


def _located(e: BaseException, damaged: set[tuple]) -> bool:
    return isinstance(e, (CorruptBlockError, FormatVersionError)) and (e.session, e.layer, e.block) in damaged


def _damaged(target, how, arg) -> set[tuple]:
    """Every (session, layer, block) that names a damaged record."""
    out = {target}
    if target == SHARED:
        out.add(("beta", *SHARED[1:]))
    if how == "swap":
        out.add(arg)
    return out


@pytest.mark.parametrize("kind,db,target,how,arg", CASES)
def test_block_and_summary_damage_is_detected(pristine, model, tmp_path, kind, db, target, how, arg):
    path = copy_store(pristine, tmp_path / "kv")
    key = key_of(path, *target)
    value = raw_get(path, db, key)
    if how == "mutate":
        raw_put(path, db, key, arg(value, key))
    else:
        other = key_of(path, *arg)
        other_value = raw_get(path, db, other)
        raw_put(path, db, key, other_value)
        if how == "swap":
            raw_put(path, db, other, value)
    damaged = _damaged(target, how, arg)
    sessions = {s for s, _, _ in damaged}
    before = dump(path)
    FIGURES["tried"] += 1
    future = arg in (future_block, future_envelope)
    with cw.open_store(path, model) as st:
        for s in sorted(sessions):
            if kind == "block":                           # the read path: never KV
                with pytest.raises(LocatedError) as e:
                    st.load_session(s)
                assert _located(e.value, damaged), repr(e.value)
                assert isinstance(e.value, FormatVersionError) == future
            ids = torch.tensor([st.session(s).token_ids.tolist() + [7]])
            # resume (+ continue): never KV. Summaries are read by policies that score with them
            policy = {"block": {}, "summary": {"policy": "quest", "budget_tokens": 16}}[kind]
            with pytest.raises(TierstoreError) as e:
                with TieredCache.resume(st, model, s, commit_on_close=False, **policy) as cache:
                    model.generate(ids, attention_mask=torch.ones_like(ids), cache=cache, max_new_tokens=2,
                                   do_sample=False, pad_token_id=0)
            assert _located(e.value, damaged), repr(e.value)
            assert f"session {e.value.session!r}" in str(e.value) and f"layer {e.value.layer}" in str(e.value)
            # the failed resume holds nothing: hooks gone, attention restored, lease released
            assert not model._forward_pre_hooks and not model._forward_hooks
            assert model.config._attn_implementation != "tierstore"
            assert st.sessions.live_leases() == []
        rep = verify_store(st)
    assert dump(path) == before                           # reading changed nothing
    found = {(p.session, p.layer, p.block) for p in rep.damage}
    assert damaged <= found, (damaged, rep.damage)
    want_kind = {"block": {"corrupt_block", "format_version"}, "summary": {"corrupt_summary"}}[kind]
    assert {p.kind for p in rep.damage} <= want_kind | {"shape_mismatch"}
    res = CliRunner().invoke(cli, ["--store", path, "verify", "--json"])
    assert res.exit_code == 1, res.output
    assert damaged <= {(d["session"], d["layer"], d["block"]) for d in json.loads(res.stdout)["damage"]}
    res = CliRunner().invoke(cli, ["--store", path, "export", sorted(sessions)[0], str(tmp_path / "out.st")])
    if kind == "block":
        assert res.exit_code == 1 and res.stderr.startswith("error: ") and not (tmp_path / "out.st").exists()
    FIGURES["detected"] += 1


SESSION_CASES = (
    [pytest.param("mutate", flip(off), id=f"session-flip{off}") for off in ENVELOPE_OFFSETS + [100, 400]]
    + [pytest.param("mutate", truncate(n), id=f"session-truncate{n}") for n in TRUNCATIONS]
    + [pytest.param("mutate", extend, id="session-extend"),
       pytest.param("mutate", future_envelope, id="session-future-version"),
       pytest.param("swap", "alpha", id="session-swap"),
       pytest.param("replace", "beta", id="session-replace-other-session")])


@pytest.mark.parametrize("how,arg", SESSION_CASES)
def test_session_record_damage_is_detected(pristine, model, tmp_path, how, arg):
    path = copy_store(pristine, tmp_path / "kv")
    value = raw_get(path, "sessions", b"gamma")
    damaged = {"gamma"}
    if how == "mutate":
        raw_put(path, "sessions", b"gamma", arg(value, b"gamma"))
    else:
        raw_put(path, "sessions", b"gamma", raw_get(path, "sessions", arg.encode()))
        if how == "swap":
            raw_put(path, "sessions", arg.encode(), value)
            damaged.add(arg)
    before = dump(path)
    FIGURES["tried"] += 1
    with cw.open_store(path, model) as st:
        for s in damaged:
            with pytest.raises((CorruptRecordError, FormatVersionError)) as e:
                st.session(s)
            assert e.value.session == s and f"session {s!r}" in str(e.value)
            with pytest.raises((CorruptRecordError, FormatVersionError)):
                TieredCache.resume(st, model, s)
            with pytest.raises((CorruptRecordError, FormatVersionError)):
                st.load_session(s)
            assert not model._forward_pre_hooks
        assert {r.name for r in st.list()} == {"alpha", "beta", "gamma"} - damaged
        rep = verify_store(st)
    assert dump(path) == before
    assert {p.session for p in rep.damage if p.kind in ("corrupt_record", "format_version")} == damaged
    res = CliRunner().invoke(cli, ["--store", path, "verify"])
    assert res.exit_code == 1
    ls = CliRunner().invoke(cli, ["--store", path, "ls", "--json"])
    assert ls.exit_code == 0 and {r["name"] for r in json.loads(ls.stdout)["sessions"]} == \
        {"alpha", "beta", "gamma"} - damaged
    FIGURES["detected"] += 1


def test_undamaged_sessions_still_read_exactly_beside_damage(pristine, model, tmp_path):
    path = copy_store(pristine, tmp_path / "kv")
    with tierstore.open(path, readonly=True) as st:
        _, want = st.load_session("gamma")
    raw_put(path, "blocks", key_of(path, *TARGET), b"junk")
    with tierstore.open(path, readonly=True) as st:
        _, got = st.load_session("gamma")
        with pytest.raises(CorruptBlockError):
            st.load_session("alpha")
        st.load_session("beta")                          # shares only blocks 0-1 with alpha: intact
    assert all(torch.equal(a, b) for (a, b), (c, d) in zip(got, want) for a, b in ((a, c), (b, d)))


def test_damaged_reference_count_stops_writes_and_changes_nothing(pristine, tmp_path):
    path = copy_store(pristine, tmp_path / "kv")
    chain = key_of(path, *SHARED)[:16]
    raw_put(path, "refs", chain, b"\x02\x00")             # truncated u32 (refs carry no checksum)
    before = dump(path)
    with tierstore.open(path) as st:
        with pytest.raises(CorruptRecordError, match="reference count"):
            st.delete("beta")
        with pytest.raises(CorruptRecordError, match="reference count"):
            st.fork("alpha", "delta", 8)
    assert dump(path) == before
    assert CliRunner().invoke(cli, ["--store", path, "verify"]).exit_code == 1


# -- whole files ------------------------------------------------------------------------------


def _open_both(path: str):
    """The error of a read-only and of a writable open."""
    out = []
    for ro in (True, False):
        with pytest.raises(TierstoreError) as e:
            tierstore.open(path, readonly=ro).close()
        out.append(e.value)
    return out


@pytest.mark.parametrize("content", [os.urandom(3 * 4096), b"hello, this is a text file\n" * 50, b"\x00" * 8192],
                         ids=["random", "text", "zeros"])
def test_data_file_that_is_not_lmdb(tmp_path, content):
    d = tmp_path / "kv"
    d.mkdir()
    (d / "data.mdb").write_bytes(content)
    for e in _open_both(str(d)):
        assert isinstance(e, NotAStoreError) and "not an LMDB" in str(e)
    assert (d / "data.mdb").read_bytes() == content
    res = CliRunner().invoke(cli, ["--store", str(d), "verify"])
    assert res.exit_code == 2 and res.stderr.startswith("error: ")


def test_foreign_lmdb_environment_is_not_taken_over(tmp_path):
    d = str(tmp_path / "kv")
    env = lmdb.open(d, max_dbs=4)
    with env.begin(write=True, db=env.open_db(b"theirs")) as t:
        t.put(b"k", b"v")
    env.close()
    data = open(os.path.join(d, "data.mdb"), "rb").read()
    for e in _open_both(d):
        assert isinstance(e, NotAStoreError) and "not a tierstore store" in str(e)
    assert open(os.path.join(d, "data.mdb"), "rb").read() == data    # no sub-database was added
    assert CliRunner().invoke(cli, ["--store", d, "import", __file__]).exit_code in (1, 2)


def test_truncated_data_file_is_an_error_not_a_crash(pristine, tmp_path):
    """A partial copy: LMDB would fault (SIGBUS) reading pages past the end of the file."""
    path = copy_store(pristine, tmp_path / "kv")
    size = os.path.getsize(os.path.join(path, "data.mdb"))
    with open(os.path.join(path, "data.mdb"), "r+b") as f:
        f.truncate(size // 2)
    for e in _open_both(path):
        assert isinstance(e, CorruptRecordError) and "truncated" in str(e)
    res = subprocess.run([sys.executable, "-m", "tierstore.tools.cli", "--store", path, "verify"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 1 and "truncated" in res.stderr, (res.returncode, res.stderr[-500:])


_PAGE_FLIPS = textwrap.dedent("""
    import json, os, shutil, signal, sys, torch
    torch.set_num_threads(1)
    import tierstore
    from tierstore.errors import TierstoreError
    from tierstore.maintenance.verify import verify_store
    src, work = sys.argv[1], sys.argv[2]
    with tierstore.open(src, readonly=True) as st:
        want = {r.name: [t.clone() for kv in st.load_session(r.name)[1] for t in kv] for r in st.list()}
    size = os.path.getsize(os.path.join(src, "data.mdb"))
    CODES = {0: "clean", 10: "damage", 11: "error", 12: "lmdb-error", 20: "DIFFERENT"}

    def check(d):
        try:
            with tierstore.open(d, readonly=True) as st:
                if not verify_store(st).ok:
                    return 10
                for n, kv in want.items():
                    got = [t for pair in st.load_session(n)[1] for t in pair]
                    if not all(torch.equal(a, b) for a, b in zip(got, kv)):
                        return 20
                return 0
        except TierstoreError:
            return 11
        except Exception:  # LMDB's own errors (MDB_CORRUPTED, page not found, ...)
            return 12

    out = []
    for page in range(2, size // 4096):
        for off in (0, 16, 600, 3000):
            d = os.path.join(work, f"p{page}-{off}")
            os.makedirs(d)
            shutil.copy(os.path.join(src, "data.mdb"), d)
            with open(os.path.join(d, "data.mdb"), "r+b") as f:
                f.seek(page * 4096 + off); b = f.read(1); f.seek(page * 4096 + off); f.write(bytes([b[0] ^ 0xA5]))
            pid = os.fork()
            if pid == 0:  # each flip in its own process: LMDB may fault on a damaged page
                os._exit(check(d))
            _, status = os.waitpid(pid, 0)
            sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else 0
            out.append((page, off, f"signal {signal.Signals(sig).name}" if sig else CODES[os.WEXITSTATUS(status)]))
            shutil.rmtree(d)
    print(json.dumps(out))
""")


def test_flipped_bytes_in_lmdb_pages(pristine, tmp_path):
    """Damage below the records, in LMDB's own pages (every page, four offsets each): found by
    ``verify`` or an error, never silently different KV. LMDB keeps no page checksums: a damaged
    node offset can make it read past the end of the file, and the reading process dies of
    SIGBUS -- never with wrong KV. Those flips are counted (each runs in its own process), not
    hidden; see the report of issue 7."""
    res = subprocess.run([sys.executable, "-c", _PAGE_FLIPS, pristine, str(tmp_path)], capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout)
    outcomes = {}
    for _, _, what in out:
        outcomes[what] = outcomes.get(what, 0) + 1
    print(f"\nLMDB page flips: {outcomes}")
    assert out and "DIFFERENT" not in outcomes, [r for r in out if r[2] == "DIFFERENT"]
    assert outcomes.get("damage", 0) + outcomes.get("error", 0) + outcomes.get("lmdb-error", 0) > 0
    assert set(outcomes) <= {"clean", "damage", "error", "lmdb-error", "signal SIGBUS", "signal SIGSEGV"}


def test_store_of_a_future_format_version(pristine, tmp_path):
    path = copy_store(pristine, tmp_path / "kv")
    meta = json.loads(raw_get(path, "meta", b"store"))
    raw_put(path, "meta", b"store", json.dumps({**meta, "format_version": 2}).encode())
    before = dump(path)
    with pytest.raises(FormatVersionError, match="format version 2"):
        tierstore.open(path)                              # never write v1 records into a v2 store
    with tierstore.open(path, readonly=True) as st:       # readers may look; verify says why
        rep = verify_store(st)
    assert [p.kind for p in rep.damage] == ["format_version"]
    assert CliRunner().invoke(cli, ["--store", path, "verify"]).exit_code == 1
    assert dump(path) == before


def test_unreadable_store_metadata(pristine, tmp_path):
    path = copy_store(pristine, tmp_path / "kv")
    raw_put(path, "meta", b"store", b"{not json")
    with pytest.raises(CorruptRecordError, match="metadata"):
        tierstore.open(path)
    with tierstore.open(path, readonly=True) as st:
        assert [p.kind for p in verify_store(st).damage] == ["corrupt_meta"]


def test_figures():
    """Printed with -s: corruption cases tried and detected."""
    print(f"\ncorruption cases: {FIGURES['tried']} tried, {FIGURES['detected']} detected")
    assert FIGURES["tried"] == FIGURES["detected"]

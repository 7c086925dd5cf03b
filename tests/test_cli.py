"""The ``tierstore`` command against real stores built by the library.

Most checks go through click's ``CliRunner`` (the real command code, in process); a few run
``python -m tierstore.tools.cli`` in a subprocess (the real entry point). Damage is made with a
raw LMDB write transaction, the way a bad disk or a stray writer would.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import select
import shutil
import struct
import subprocess
import sys
import textwrap
import time

import lmdb
import numpy as np
import pytest
import torch
from click.testing import CliRunner

import tierstore
from tierstore import KVLayout
from tierstore.tiers.cold import block_key
from tierstore.tools.cli import cli
from tierstore.maintenance.verify import verify_store

from support import random_kv

LAYOUT = KVLayout(num_layers=2, kv_heads=2, head_dim=8, block_tokens=4, dtype=torch.float32)
LAYOUT16 = KVLayout(num_layers=3, kv_heads=2, head_dim=8, block_tokens=4, dtype=torch.float16)
DAY = 86400.0


def build(path, codec: str = "raw") -> str:
    """alpha (10 tokens: blocks 0, 1 full, 2 partial), beta = fork of alpha's first 8 tokens
    (shares blocks 0-1), gamma (fp16, zstd, 6 tokens, its own model)."""
    path = str(path)
    with tierstore.open(path, codec=codec) as s:
        s.put_session("alpha", layout=LAYOUT, kv=random_kv(LAYOUT, 10, 0), token_ids=np.arange(10) + 100,
                      fingerprint="fp-a", model_name="tiny-llama",
                      last_logits=np.linspace(0, 1, 7, dtype=np.float32))
        s.fork("alpha", "beta", 8)
        s.put_session("gamma", layout=LAYOUT16, kv=random_kv(LAYOUT16, 6, 1), token_ids=[5, 6, 7, 8, 9, 10],
                      fingerprint="fp-g", model_name="other", codec="zstd")
    return path


@pytest.fixture
def store(tmp_path):
    return build(tmp_path / "kv")


@pytest.fixture
def empty(tmp_path):
    path = str(tmp_path / "empty")
    tierstore.open(path).close()
    return path


def run(store_path, *args, code: int | None = 0, env: dict | None = None):
    res = CliRunner(env=env).invoke(cli, ["--store", str(store_path), *args])
    if code is not None:
        assert res.exit_code == code, (res.exit_code, res.stdout, res.stderr, res.exception)
    return res


def run_json(store_path, *args, code: int = 0):
    return json.loads(run(store_path, *args, "--json", code=code).stdout)


@contextlib.contextmanager
def raw_db(path, name: str):
    """A raw LMDB write transaction on one sub-database (no tierstore code involved)."""
    env = lmdb.open(str(path), subdir=True, max_dbs=16)
    try:
        with env.begin(write=True, db=env.open_db(name.encode())) as txn:
            yield txn
    finally:
        env.close()


def key_of(path, session: str, block: int, layer: int) -> bytes:
    with tierstore.open(path, readonly=True) as s:
        return block_key(s.session(session).chains()[block], layer)


def flip(path, db: str, key: bytes, offset: int, mask: int = 0xFF) -> None:
    with raw_db(path, db) as txn:
        v = bytearray(txn.get(key))
        v[offset % len(v)] ^= mask
        txn.put(key, bytes(v))


def damage_at(report: dict) -> set[tuple]:
    return {(d["session"], d["layer"], d["block"]) for d in report["damage"]}


# -- usage, help, paths --------------------------------------------------------------------


def test_help_lists_commands_and_bench_group():
    res = CliRunner().invoke(cli, ["--help"])
    assert res.exit_code == 0
    for cmd in ("ls", "show", "stat", "verify", "gc", "rm", "prune", "compact", "export", "import", "bench",
                "chat"):
        assert cmd in res.stdout
    assert CliRunner().invoke(cli, ["bench", "--help"]).exit_code == 0


def test_bench_group_takes_added_commands():
    import click

    from tierstore.tools.cli import bench

    @click.command("noop")
    def noop() -> None:
        click.echo("ran")

    bench.add_command(noop)
    try:
        res = CliRunner().invoke(cli, ["bench", "noop"])
        assert res.exit_code == 0 and res.stdout == "ran\n"
        assert "noop" in CliRunner().invoke(cli, ["bench", "--help"]).stdout
    finally:
        bench.commands.pop("noop")


def test_missing_dir_is_not_a_store_and_is_not_created(tmp_path):
    missing = tmp_path / "nope"
    for cmd in (["ls"], ["stat"], ["verify"], ["show", "x"], ["gc"], ["rm", "x", "-y"], ["compact"],
                ["prune", "--older-than", "1d", "-y"], ["export", "x", str(tmp_path / "f")]):
        res = run(missing, *cmd, code=2)
        assert res.stderr.startswith("error: ") and "not a tierstore store" in res.stderr, res.stderr
        assert "Traceback" not in res.output
    assert not missing.exists()


def test_verify_on_non_store_dirs_exits_2(tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "notes.txt").write_text("hello")
    assert run(plain, "verify", code=2).stderr.startswith("error: ")
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "data.mdb").write_bytes(os.urandom(8192))
    assert run(junk, "verify", code=2).stderr.startswith("error: ")
    assert sorted(os.listdir(plain)) == ["notes.txt"]
    afile = tmp_path / "afile"
    afile.write_text("x")
    run(afile, "verify", code=2)


def test_usage_errors_exit_2(store):
    run(store, "ls", "--sort", "bogus", code=2)
    run(store, "ls", "--limit", "-1", code=2)
    run(store, "--json", "-q", "ls", code=2)
    run(store, "rm", "alpha", "-y", "--json", "-q", code=2)       # refused before deleting anything
    assert run(store, "ls", "-q").stdout.split() == ["alpha", "beta", "gamma"]
    run(store, "prune", "--older-than", "soon", code=2)
    run(store, "prune", code=2)
    run(store, "rm", code=2)
    assert "invalid session name" in run(store, "show", "bad name", code=2).stderr
    assert "invalid session name" in run(store, "verify", "bad/name", code=2).stderr


def test_store_from_environment(store):
    res = CliRunner(env={"TIERSTORE_HOME": store}).invoke(cli, ["ls", "-q"])
    assert res.exit_code == 0 and res.stdout.split() == ["alpha", "beta", "gamma"]


def test_logging_goes_to_stderr_with_env_level(store):
    res = run(store, "ls", "--json", env={"TIERSTORE_LOG_LEVEL": "DEBUG"})
    assert "DEBUG tierstore.cli" in res.stderr
    json.loads(res.stdout)  # stdout stays pure JSON


# -- ls ------------------------------------------------------------------------------------


def test_ls_empty_store(empty):
    assert run_json(empty, "ls") == {"store": empty, "sessions": [], "damaged": []}
    assert run(empty, "ls", "-q").stdout == ""
    res = run(empty, "ls")
    assert res.stdout == "" and "no sessions" in res.stderr


def test_ls_sizes_own_and_shared(store):
    rows = {r["name"]: r for r in run_json(store, "ls")["sessions"]}
    assert list(rows) == ["alpha", "beta", "gamma"]
    a, b, g = rows["alpha"], rows["beta"], rows["gamma"]
    assert (a["tokens"], a["layers"], a["blocks"], a["model"]) == (10, 2, 3, "tiny-llama")
    assert (b["tokens"], b["blocks"]) == (8, 2)
    # beta shares everything it has with alpha; alpha owns only its partial last block
    assert b["own_bytes"] == 0 and b["shared_bytes"] == b["stored_bytes"] > 0
    assert a["shared_bytes"] == b["shared_bytes"] and a["own_bytes"] > 0
    assert a["stored_bytes"] == a["own_bytes"] + a["shared_bytes"]
    assert g["shared_bytes"] == 0 and g["dtype"] == "float16" and g["codec"] == "zstd"
    assert a["raw_bytes"] == 2 * 2 * 10 * 8 * 4 * 2          # K+V x heads x tokens x dim x fp32 x layers
    assert a["compression_ratio"] == pytest.approx(a["raw_bytes"] / a["stored_bytes"], rel=1e-3)
    assert a["missing_blocks"] == 0


def test_ls_sort_filter_limit_quiet(store):
    def names(*args):
        return run(store, "ls", "-q", *args).stdout.split()
    assert names() == ["alpha", "beta", "gamma"]
    assert names("--sort", "tokens") == ["alpha", "beta", "gamma"]
    assert names("--sort", "size")[0] == "alpha"
    assert names("--filter", "?eta") == ["beta"]
    assert names("--filter", "*a", "--sort", "tokens", "--limit", "2") == ["alpha", "beta"]
    assert names("--limit", "0") == []
    assert run(store, "--format", "quiet", "ls").stdout.split() == ["alpha", "beta", "gamma"]
    human = run(store, "ls").stdout
    assert "NAME" in human and "alpha" in human and "tiny-llama" in human


def test_ls_sorts_by_time(tmp_path):
    path = build(tmp_path / "kv")
    with tierstore.open(path) as s:
        rec = s.session("gamma")
        s.sessions.commit(rec.with_updates(updated=rec.updated - 5 * DAY, created=rec.created - 9 * DAY))
    assert run(path, "ls", "-q", "--sort", "updated").stdout.split()[-1] == "gamma"
    assert run(path, "ls", "-q", "--sort", "created").stdout.split()[-1] == "gamma"


# -- show ----------------------------------------------------------------------------------


def test_show_json(store):
    d = run_json(store, "show", "alpha")
    assert d["session"]["name"] == "alpha" and d["fingerprint"] == "fp-a"
    assert d["layout"] == {"num_layers": 2, "kv_heads": 2, "head_dim": 8, "block_tokens": 4, "dtype": "float32"}
    assert d["token_ids"] == list(range(100, 110)) and d["last_logits"] == 7
    assert d["shared_with"] == {"beta": [0, 1]}
    assert [lay["blocks"] for lay in d["layers"]] == [3, 3]
    assert len(d["block_map"]["stored_bytes"]) == 2 and len(d["block_map"]["stored_bytes"][0]) == 3
    assert d["block_map"]["attention_mass"] == [[0.0] * 3] * 2
    assert run_json(store, "show", "gamma")["shared_with"] == {}


def test_show_human_block_maps(store):
    out = run(store, "show", "beta").stdout
    for part in ("fp-a", "per layer", "2 block(s) [0-1] with alpha", "block map: compression",
                 "block map: attention mass", "100 101 102"):
        assert part in out, part
    assert "L0   " in out and "L1   " in out


def test_show_attention_mass_map(tmp_path):
    from tierstore.records import BlockSummary

    path = build(tmp_path / "kv")
    with tierstore.open(path) as s:
        rec = s.session("gamma")
        summ = []
        for i, c in enumerate(rec.chains()):
            for layer in range(3):
                key = block_key(c, layer)
                bs = BlockSummary.unseal(key, s.cold.get("summaries", key))
                bs.mass = torch.full_like(bs.mass, float(i + 1 + layer))
                summ.append((key, bs.seal(key)))
        s.sessions.commit(rec, summaries=summ)
    d = run_json(path, "show", "gamma")
    assert d["block_map"]["attention_mass"][2] == [2 * 3.0, 2 * 4.0]   # summed over 2 kv heads
    out = run(path, "show", "gamma").stdout
    assert "attention mass / max" in out and "█" in out


def test_show_missing_and_text_fallback(store):
    assert "no such session" in run(store, "show", "zeta", code=1).stderr
    res = run(store, "show", "alpha", "--text")
    assert "records no tokenizer" in res.stderr and "100 101 102" in res.stdout


def test_show_text_with_local_tokenizer(tmp_path):
    pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[UNK]", "hello", "tiered", "world", "cache"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    folder = str(tmp_path / "tok")
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(folder)
    path = str(tmp_path / "kv")
    with tierstore.open(path) as s:
        s.put_session("t", layout=LAYOUT, kv=random_kv(LAYOUT, 3, 3), token_ids=[1, 2, 4], fingerprint="f",
                      tokenizer_name=folder)
    assert run_json(path, "show", "t", "--text")["text"] == "hello tiered cache"
    assert "hello tiered cache" in run(path, "show", "t", "--text").stdout


def test_show_png(store, tmp_path, monkeypatch):
    out = tmp_path / "map.png"
    if importlib.util.find_spec("matplotlib") is not None:
        run(store, "show", "alpha", "--png", str(out), "-q")
        assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    res = run(store, "show", "alpha", "--png", str(tmp_path / "no.png"), code=2)
    assert "matplotlib" in res.stderr and not (tmp_path / "no.png").exists()


# -- stat ----------------------------------------------------------------------------------


def test_stat(store, empty):
    st = run_json(store, "stat")
    assert st["sessions"] == 3 and st["format_version"] == 1 and st["damaged_sessions"] == 0
    assert st["blocks"] == 2 * 3 + 3 * 2 and st["orphan_records"] == 0
    assert 0 <= st["lmdb_free_ratio"] <= 1 and st["map_size"] >= st["file_bytes"] > 0
    assert st["used_pages"] + st["free_pages"] <= st["total_pages"]
    for k in ("cold_used_bytes", "overflow_pages", "page_size", "readers", "live_writers"):
        assert isinstance(st[k], int)
    assert run_json(empty, "stat")["sessions"] == 0
    assert "lmdb_free_ratio" in run(store, "stat").stdout


# -- verify --------------------------------------------------------------------------------


def test_verify_clean(store, empty):
    rep = run_json(store, "verify")
    assert rep["ok"] and rep["damage"] == [] and rep["sessions"] == 3
    assert rep["blocks"] == 12       # distinct block records: shared ones once
    assert run_json(empty, "verify")["ok"]
    assert "OK" in run(store, "verify").stdout
    assert run(store, "verify", "-q").stdout == ""
    assert run_json(store, "verify", "beta")["sessions"] == 1
    assert "no such session" in run(store, "verify", "nobody", code=1).stderr


@pytest.mark.parametrize("codec", ["raw", "zstd"])
@pytest.mark.parametrize("session,block,layer,offset", [
    ("alpha", 2, 0, 0),        # magic
    ("alpha", 2, 1, 5),        # version field
    ("alpha", 2, 0, 20),       # shape
    ("alpha", 2, 1, 45),       # checksum
    ("alpha", 2, 0, 60),       # first payload byte
    ("alpha", 2, 1, -1),       # last byte
    ("gamma", 1, 2, "mid"),
])
def test_verify_finds_flipped_byte(tmp_path, codec, session, block, layer, offset):
    path = build(tmp_path / "kv", codec=codec)
    key = key_of(path, session, block, layer)
    with raw_db(path, "blocks") as txn:
        n = len(txn.get(key))
    flip(path, "blocks", key, n // 2 if offset == "mid" else offset)
    rep = run_json(path, "verify", code=1)
    assert not rep["ok"]
    assert damage_at(rep) == {(session, layer, block)}
    assert rep["damage"][0]["kind"] in ("corrupt_block", "format_version")
    human = run(path, "verify", code=1).stdout
    assert f"DAMAGED  session '{session}', layer {layer}, block {block}:" in human


def test_verify_reports_shared_block_for_every_session(store):
    flip(store, "blocks", key_of(store, "alpha", 1, 1), 100, mask=0x01)
    assert damage_at(run_json(store, "verify", code=1)) == {("alpha", 1, 1), ("beta", 1, 1)}
    assert run_json(store, "verify", "gamma")["ok"]                 # naming sessions narrows the check
    assert damage_at(run_json(store, "verify", "beta", code=1)) == {("beta", 1, 1)}


@pytest.mark.parametrize("codec,session,block", [("raw", "alpha", 2), ("zstd", "beta", 1)])
def test_verify_every_single_byte_flip_of_a_block(tmp_path, codec, session, block):
    """Exhaustive: flipping any one byte of a block record is found (library call per flip)."""
    path = build(tmp_path / "kv", codec=codec)
    key = key_of(path, session, block, 1)
    env = lmdb.open(path, subdir=True, max_dbs=16)
    blocks = env.open_db(b"blocks")
    with env.begin() as txn:
        good = bytes(txn.get(key, db=blocks))
    env.close()
    store = tierstore.open(path)
    try:
        for off in range(len(good)):
            bad = bytearray(good)
            bad[off] ^= 0x5A
            # write through the store's own environment handle: one env per process (LMDB rule)
            with store.cold.env.begin(write=True, db=store.cold.env.open_db(b"blocks")) as txn:
                txn.put(key, bytes(bad))
            rep = verify_store(store, [session])
            assert (session, 1, block) in {(p.session, p.layer, p.block) for p in rep.damage}, off
        with store.cold.env.begin(write=True, db=store.cold.env.open_db(b"blocks")) as txn:
            txn.put(key, good)
        assert verify_store(store).ok
    finally:
        store.close()


def test_verify_corrupt_summary(store):
    flip(store, "summaries", key_of(store, "gamma", 0, 2), -3)
    rep = run_json(store, "verify", code=1)
    assert damage_at(rep) == {("gamma", 2, 0)} and rep["damage"][0]["kind"] == "corrupt_summary"


def test_truncated_session_record(store):
    with raw_db(store, "sessions") as txn:
        v = txn.get(b"beta")
        txn.put(b"beta", v[: len(v) // 2])
    rep = run_json(store, "verify", code=1)
    assert [(d["session"], d["kind"]) for d in rep["damage"]] == [("beta", "corrupt_record")]
    assert run_json(store, "verify", "alpha")["ok"]
    ls = run(store, "ls", "--json")
    assert [r["name"] for r in json.loads(ls.stdout)["sessions"]] == ["alpha", "gamma"]
    assert json.loads(ls.stdout)["damaged"][0]["session"] == "beta"
    assert "beta" in run(store, "ls").stderr                    # warned about, on stderr
    assert run(store, "show", "beta", code=1).stderr.startswith("error: session 'beta': ")
    assert run_json(store, "stat")["damaged_sessions"] == 1
    res = run(store, "rm", "beta", "-y", code=1)
    assert "damaged record" in res.stderr


def test_missing_block(store):
    key = key_of(store, "gamma", 1, 0)
    with raw_db(store, "blocks") as txn:
        assert txn.delete(key)
    rep = run_json(store, "verify", code=1)
    assert damage_at(rep) == {("gamma", 0, 1)} and rep["damage"][0]["kind"] == "missing_block"
    g = next(r for r in run_json(store, "ls")["sessions"] if r["name"] == "gamma")
    assert g["missing_blocks"] == 1
    assert "?" in run(store, "show", "gamma").stdout


def test_reference_count_mismatch(store):
    chain0 = key_of(store, "alpha", 0, 0)[:16]
    with raw_db(store, "refs") as txn:
        assert struct.unpack("<I", txn.get(chain0))[0] == 2
        txn.put(chain0, struct.pack("<I", 1))
    rep = run_json(store, "verify", code=1)
    assert {(d["session"], d["block"], d["kind"]) for d in rep["damage"]} == {
        ("alpha", 0, "refs_mismatch"), ("beta", 0, "refs_mismatch")}


def test_format_version_from_the_future(store):
    with raw_db(store, "meta") as txn:
        meta = json.loads(txn.get(b"store"))
        txn.put(b"store", json.dumps({**meta, "format_version": 99}).encode())
    rep = run_json(store, "verify", code=1)
    assert rep["damage"][0]["kind"] == "format_version" and rep["damage"][0]["session"] is None


def test_orphans_are_reclaimable_not_damage(store):
    with tierstore.open(store) as s:
        rec = s.session("alpha").with_updates(name="ghost", token_ids=np.arange(4) + 7)
        s.sessions.put_blocks(s.encode_blocks(rec, 0, *random_kv(LAYOUT, 4, 9)[0], rec.chains()))
    rep = run_json(store, "verify")
    assert rep["ok"] and rep["orphans"] == {"records": 2, "bytes": rep["orphans"]["bytes"]}
    assert rep["orphans"]["bytes"] > 0
    assert "reclaimable" in run(store, "verify").stdout
    dry = run_json(store, "gc", "--dry-run")
    assert dry["orphan_records"] == 2 and not dry["deleted"]
    assert run_json(store, "stat")["orphan_records"] == 2
    done = run_json(store, "gc")
    assert done["deleted"] and done["orphan_records"] == 2
    assert run_json(store, "verify")["orphans"]["records"] == 0
    assert "nothing to reclaim" in run(store, "gc").stdout


# -- rm / prune ----------------------------------------------------------------------------


def names_in(path) -> list[str]:
    with tierstore.open(path, readonly=True) as s:
        return sorted(r.name for r in s.list())


def test_rm_needs_yes(store):
    res = run(store, "rm", "alpha")
    assert "would delete  alpha" in res.stdout and "pass -y" in res.stderr
    plan = run_json(store, "rm", "alpha")
    assert plan["sessions"] == ["alpha"] and not plan["deleted"] and plan["freed_bytes"] > 0
    run(store, "rm", "alpha", "-y", "--dry-run")
    assert names_in(store) == ["alpha", "beta", "gamma"]


def test_rm_deletes_and_keeps_shared_blocks(store):
    planned = run_json(store, "rm", "alpha")["freed_bytes"]
    out = run_json(store, "rm", "alpha", "-y")
    assert out["deleted"] and out["sessions"] == ["alpha"] and out["freed_bytes"] == planned
    assert names_in(store) == ["beta", "gamma"]
    assert run_json(store, "verify")["ok"]                          # beta's (shared) blocks survive
    assert "freed" in run(store, "rm", "beta", "gamma", "-y").stdout
    assert names_in(store) == [] and run_json(store, "stat")["blocks"] == 0


@contextlib.contextmanager
def live_writer(store, session: str):
    """Another live process holding ``session``'s writer lease until the block ends (closing its
    store gives the lease back)."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, tierstore\n"
         f"s = tierstore.open({str(store)!r})\ns.sessions.acquire({session!r})\nprint('ready', flush=True)\n"
         "sys.stdin.read()\ns.close()\n"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ready"
        yield holder
    finally:
        holder.communicate(timeout=60)
    assert holder.returncode == 0


def test_rm_unknown_or_busy_deletes_nothing(store):
    assert "no such session" in run(store, "rm", "alpha", "nobody", "-y", code=1).stderr
    with live_writer(store, "gamma"):                     # another live process writes gamma
        assert "live writer" in run(store, "rm", "gamma", "-y", code=1).stderr
        assert names_in(store) == ["alpha", "beta", "gamma"]
    assert "freed" in run(store, "rm", "gamma", "-y").stdout


def test_prune(tmp_path):
    path = build(tmp_path / "kv")
    with tierstore.open(path) as s:
        for name, age in (("alpha", 40), ("gamma", 3)):
            rec = s.session(name)
            s.sessions.commit(rec.with_updates(updated=time.time() - age * DAY))
    res = run(path, "prune", "--older-than", "30d")
    assert "would delete  alpha" in res.stdout and "gamma" not in res.stdout and "pass -y" in res.stderr
    assert names_in(path) == ["alpha", "beta", "gamma"]
    assert run_json(path, "prune", "--older-than", "2d")["sessions"] == ["alpha", "gamma"]
    assert run_json(path, "prune", "--older-than", "1w", "--dry-run", "-y")["deleted"] is False
    out = run_json(path, "prune", "--older-than", "4w2d", "-y")
    assert out["deleted"] and out["sessions"] == ["alpha"]
    assert names_in(path) == ["beta", "gamma"] and run_json(path, "verify")["ok"]
    assert "nothing to delete" in run(path, "prune", "--older-than", "720h").stdout


# -- compact -------------------------------------------------------------------------------


def test_compact(tmp_path):
    path = str(tmp_path / "kv")
    with tierstore.open(path) as s:
        for i in range(12):
            s.put_session(f"s{i}", layout=LAYOUT, kv=random_kv(LAYOUT, 400, i), token_ids=np.arange(400) + i,
                          fingerprint="f")
        s.delete(*[f"s{i}" for i in range(10)])
        _, before_kv = s.load_session("s11")
    rep = run_json(path, "compact")
    assert rep["after_bytes"] < rep["before_bytes"] and rep["saved_bytes"] > 0
    assert rep["after_bytes"] == os.path.getsize(os.path.join(path, "data.mdb"))
    assert not [f for f in os.listdir(path) if f.startswith(".compact-")]
    assert run_json(path, "verify")["ok"] and names_in(path) == ["s10", "s11"]
    with tierstore.open(path) as s:
        _, kv = s.load_session("s11")
        s.put_session("after", layout=LAYOUT, kv=random_kv(LAYOUT, 4, 0), token_ids=[1, 2, 3, 4], fingerprint="f")
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(kv, before_kv))
    assert "compacted" in run(path, "compact").stdout


def test_compact_refused_while_a_writer_is_live(store):
    with live_writer(store, "alpha"):
        res = run(store, "compact", code=1)
    assert res.stderr.startswith("error: ") and "live writers" in res.stderr
    run(store, "compact")


# -- the real entry point, and a concurrent writer ----------------------------------------


def cli_proc(*args, timeout=60):
    return subprocess.run([sys.executable, "-m", "tierstore.tools.cli", *args], capture_output=True,
                          text=True, timeout=timeout)


def test_entry_point_subprocess(store, tmp_path):
    # the console script of the installed (editable) package when there is one, else `python -m`
    script = shutil.which("tierstore", path=os.path.dirname(sys.executable))
    res = subprocess.run([script, "--store", store, "ls", "--json"] if script else
                         [sys.executable, "-m", "tierstore.tools.cli", "--store", store, "ls", "--json"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert [r["name"] for r in json.loads(res.stdout)["sessions"]] == ["alpha", "beta", "gamma"]
    flip(store, "blocks", key_of(store, "gamma", 0, 1), 70)
    res = cli_proc("--store", store, "verify")
    assert res.returncode == 1 and "DAMAGED  session 'gamma', layer 1, block 0" in res.stdout
    missing = tmp_path / "missing"
    res = cli_proc("--store", str(missing), "verify")
    assert res.returncode == 2 and res.stderr.startswith("error: ") and not missing.exists()
    assert "Traceback" not in res.stderr


WRITER = textwrap.dedent("""
    import sys, time, numpy as np, torch, tierstore
    from tierstore import KVLayout
    lay = KVLayout(num_layers=2, kv_heads=2, head_dim=8, block_tokens=4, dtype=torch.float32)
    with tierstore.open(sys.argv[1]) as s:
        print("ready", flush=True)
        end, i = time.time() + float(sys.argv[2]), 0
        while time.time() < end:
            kv = [(torch.randn(2, 13, 8), torch.randn(2, 13, 8)) for _ in range(2)]
            s.put_session(f"w{i}", layout=lay, kv=kv, token_ids=np.arange(13) + i, fingerprint="fp-a")
            if i % 3 == 2:
                s.delete(f"w{i - 2}")
            i += 1
        print(i, flush=True)
""")


def readline_within(proc: subprocess.Popen, seconds: float) -> str:
    """A line of ``proc``'s stdout, or fail (never hang) if none comes in time."""
    ready, _, _ = select.select([proc.stdout], [], [], seconds)
    assert ready, f"no output from pid {proc.pid} within {seconds} s"
    return proc.stdout.readline()


def test_list_and_verify_while_another_process_writes(store):
    writer = subprocess.Popen([sys.executable, "-c", WRITER, store, "3"], stdout=subprocess.PIPE, text=True)
    try:
        assert readline_within(writer, 60).strip() == "ready"
        rounds, seen, deadline = 0, set(), time.time() + 60
        while writer.poll() is None and time.time() < deadline:
            ls = run_json(store, "ls")
            seen.update(r["name"] for r in ls["sessions"])
            rep = run_json(store, "verify")
            assert rep["ok"], rep["damage"]
            run_json(store, "stat")
            rounds += 1
        commits = int(readline_within(writer, 30))
    finally:
        writer.kill() if writer.poll() is None else None
        writer.wait()
    assert writer.returncode == 0 and commits > 3 and rounds >= 2
    assert any(n.startswith("w") for n in seen)
    final = run_json(store, "verify")
    assert final["ok"] and final["orphans"]["records"] == 0


def test_compact_refused_while_another_process_reads(store):
    reader = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
        import sys, lmdb
        env = lmdb.open(sys.argv[1], subdir=True, max_dbs=16, readonly=True)
        txn = env.begin()
        print("reading", flush=True)
        sys.stdin.readline()
    """), store], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert readline_within(reader, 60).strip() == "reading"
        res = run(store, "compact", code=1)
        assert "reading the store" in res.stderr and str(reader.pid) in res.stderr
    finally:
        reader.communicate("done\n", timeout=10)
    run(store, "compact")
    assert run_json(store, "verify")["ok"]

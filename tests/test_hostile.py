"""Hostile input: session names, import files, sizes, budgets smaller than a block, a resume
with another model or dtype. Each gets a clear, typed error and leaves the store unchanged (every
LMDB key/value compared before and after), creates no file and no store. Plus the fuzz targets
of ``tools/fuzz.py`` (block decoder, import parser): a few dozen examples here, more with
``TIERSTORE_FUZZ_EXAMPLES=N`` or ``python -m tierstore.tools.fuzz --examples N``.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import struct
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import tierstore
from tierstore.adapters.hf import TieredCache
from tierstore.errors import (BudgetError, FormatVersionError, ImportFormatError, InvalidSessionNameError,
                              InvalidSizeError, ModelMismatchError, SessionExistsError)
from tierstore.tools import crash_writer as cw
from tierstore.tools import fuzz
from tierstore.tools.cli import cli
from tierstore.maintenance.exchange import export_session, import_session, read_export, tensors_checksum

from support import tiny

EXAMPLES = int(os.environ.get("TIERSTORE_FUZZ_EXAMPLES", "40"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                suppress_health_check=list(HealthCheck))

NAMES = [
    "", " ", ".", "..", "../evil", "../../etc/passwd", "/abs", "a/b", "a\\b", "C:\\x", "a b", "-rf", "_x",
    ".hidden", "a\x00b", "\x00", "a\nb", "a\rb", "a\tb", "\x1b[31mred", "bell\x07", "del\x7f",
    "x" * 129, "x" * 10_000,
    "ѕession",          # Cyrillic dze: looks like "session"
    "ｓession",         # fullwidth s
    "session\u200b",     # zero-width space
    "se\u0301ssion",     # combining accent
    "é", "名前", "a\u202eb",  # right-to-left override
]
NON_STR = [None, 42, b"bytes", 1.5]
FIGURES: dict[str, int] = {}


def tried(kind: str, n: int = 1) -> None:
    FIGURES[kind] = FIGURES.get(kind, 0) + n


@pytest.fixture(scope="module")
def pristine(tmp_path_factory, model):
    """A store with two sessions written through TieredCache: "alpha" (29 tokens), "beta" (fork)."""
    path = str(tmp_path_factory.mktemp("pristine") / "kv")
    ids = torch.randint(1, cw.VOCAB, (1, 20), generator=torch.Generator().manual_seed(3))
    with cw.open_store(path, model) as st_:
        with TieredCache(st_, model, session="alpha") as cache:
            model.generate(ids, attention_mask=torch.ones_like(ids), cache=cache, max_new_tokens=10,
                           do_sample=False, pad_token_id=0)
        st_.fork("alpha", "beta", 16)
    return path


@pytest.fixture
def store_path(pristine, tmp_path_factory):
    path = tmp_path_factory.mktemp("store") / "kv"
    path.mkdir()
    shutil.copy(os.path.join(pristine, "data.mdb"), path)
    return str(path)


def dump(store) -> dict:
    return store.cold.snapshot()


def dump_path(path: str) -> dict:
    with tierstore.open(path, readonly=True) as s:
        return dump(s)


def files_under(path) -> set[str]:
    return {os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs}


# -- session names ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES + NON_STR, ids=lambda n: repr(n)[:24])
def test_hostile_session_names_through_the_api(store_path, model, tmp_path, name):
    tried("session names (API)")
    before_files = files_under(tmp_path)
    with cw.open_store(store_path, model) as st_:
        before = dump(st_)
        _, kv = st_.load_session("alpha")
        rec = st_.session("alpha")
        calls = [
            lambda: st_.session(name), lambda: st_.exists(name), lambda: st_.fork("alpha", name),
            lambda: st_.fork(name, "gamma"), lambda: st_.delete(name), lambda: st_.sessions.acquire(name),
            lambda: st_.put_session(name, layout=rec.layout, kv=kv, token_ids=rec.token_ids,
                                    fingerprint=rec.fingerprint),
            lambda: TieredCache.resume(st_, model, name),
            lambda: export_session(st_, name, str(tmp_path / "out.safetensors")),
        ]
        if name is not None:                                  # session=None: an in-memory cache
            calls.append(lambda: TieredCache(st_, model, session=name))
        for call in calls:
            with pytest.raises(InvalidSessionNameError) as e:
                call()
            assert "invalid session name" in str(e.value) and len(str(e.value)) < 400
        assert not model._forward_pre_hooks                  # a refused cache left no hook behind
        assert dump(st_) == before
    assert files_under(tmp_path) == before_files


CLI_CALLS = [("show", "{n}"), ("verify", "{n}"), ("rm", "{n}", "-y"), ("export", "{n}", "{f}"),
             ("import", "{good}", "--as", "{n}")]


@pytest.mark.parametrize("name", [n for n in NAMES if n], ids=lambda n: repr(n)[:24])
def test_hostile_session_names_through_the_cli(store_path, tmp_path, name):
    good = str(tmp_path / "good.safetensors")
    with tierstore.open(store_path, readonly=True) as s:
        export_session(s, "alpha", good)
    before = dump_path(store_path)
    before_files = files_under(tmp_path)
    for call in CLI_CALLS:
        tried("session names (CLI)")
        args = [a.format(n=name, f=str(tmp_path / "x.safetensors"), good=good) for a in call]
        res = CliRunner().invoke(cli, ["--store", store_path, *args])
        assert res.exit_code == 2, (call, res.exit_code, res.output)
        assert "Traceback" not in res.output
        if name.startswith("-") and "No such option" in res.stderr:   # click took it for an option
            continue
        assert res.stderr.startswith("error: invalid session name")
        assert res.stderr.count("\n") == 1 and len(res.stderr) < 400   # one line, the name cut short
    assert dump_path(store_path) == before
    assert files_under(tmp_path) == before_files


def test_hostile_names_in_a_real_argv(store_path, tmp_path):
    """Through the installed entry point (a real process, real argv): exit 2, one line."""
    for name in ("../evil", "x" * 10_000, "ѕession"):
        tried("session names (CLI)")
        res = subprocess.run([sys.executable, "-m", "tierstore.tools.cli", "--store", store_path, "show", name],
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == 2 and res.stderr.startswith("error: invalid session name")
        assert res.stderr.count("\n") == 1


def test_import_file_that_names_a_hostile_session_creates_no_store(store_path, tmp_path):
    good = str(tmp_path / "good.safetensors")
    with tierstore.open(store_path, readonly=True) as s:
        export_session(s, "alpha", good)
    meta, tensors = read_export(good)
    for name in ("../../evil", "a/b", "x" * 500, ""):
        tried("import files")
        f = str(tmp_path / "named.safetensors")
        save_file(tensors, f, metadata={"format": "tierstore-session", "format_version": "1",
                                        "session": json.dumps({**meta, "name": name})})
        fresh = tmp_path / "fresh"
        res = CliRunner().invoke(cli, ["--store", str(fresh), "import", f])
        assert res.exit_code == 2 and "invalid session name" in res.stderr, res.output
        assert not fresh.exists()                          # validated before the store is created
        before = dump_path(store_path)
        res = CliRunner().invoke(cli, ["--store", store_path, "import", f])
        assert res.exit_code == 2 and dump_path(store_path) == before


# -- import files -------------------------------------------------------------------------------


def _hostile_files(good: str, tmp_path) -> dict[str, bytes]:
    blob = open(good, "rb").read()
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + n])
    meta = header["__metadata__"]
    s = json.loads(meta["session"])
    files = {}
    for cut in (0, 1, 7, 8, 9, 8 + n // 2, 8 + n, len(blob) // 2, len(blob) - 1):
        files[f"truncated-{cut}"] = blob[:cut]
    for big in (2**63, 2**64 - 1, (100 << 20) + 1, len(blob), len(blob) - 7):
        files[f"header-length-{big}"] = struct.pack("<Q", big) + blob[8:]
    files["header-not-json"] = struct.pack("<Q", 5) + b"{{{{{" + blob[8 + n:]
    files["header-a-list"] = struct.pack("<Q", 2) + b"[]" + blob[8 + n:]
    bad_offsets = dict(header)
    bad_offsets["layer.0.k"] = {**header["layer.0.k"], "data_offsets": [0, 2**62]}
    hj = json.dumps(bad_offsets).encode()
    files["data-offsets-past-the-end"] = struct.pack("<Q", len(hj)) + hj + blob[8 + n:]

    class Exec:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    for proto in range(pickle.HIGHEST_PROTOCOL + 1):
        files[f"pickle-protocol-{proto}"] = pickle.dumps({"layer.0.k": Exec()}, protocol=proto)
    _, tensors = read_export(good)

    def resave(name: str, tens: dict, **fields) -> None:
        sess = {**s, **fields}
        sess["checksum"] = {"algo": "xxh3_128", "hex": tensors_checksum(tens)}
        p = str(tmp_path / f"_{name}")
        save_file(tens, p, metadata={"format": "tierstore-session", "format_version": "1",
                                     "session": json.dumps(sess)})
        files[name] = open(p, "rb").read()
        os.unlink(p)

    lay = s["layout"]
    resave("shape-mismatch", {**tensors, "layer.0.k": tensors["layer.0.k"][:, :-1].contiguous()})
    resave("dtype-mismatch", {k: (v.to(torch.bfloat16) if k.startswith("layer.") else v) for k, v in tensors.items()})
    resave("dtype-claims-fp16", tensors, layout={**lay, "dtype": "float16"})
    resave("dtype-unknown", tensors, layout={**lay, "dtype": "int8"})
    resave("layers-1e12", tensors, layout={**lay, "num_layers": 10**12})
    resave("heads-2^40", tensors, layout={**lay, "kv_heads": 2**40})
    resave("block-tokens-0", tensors, layout={**lay, "block_tokens": 0})
    resave("length-negative", tensors, length=-1)
    resave("length-huge", tensors, length=2**62)
    resave("pad-negative", tensors, pad=-3)
    resave("ids-out-of-range", {**tensors, "token_ids": tensors["token_ids"] - 10**6})
    resave("codec-unknown", tensors, codec={"name": "rot13"})
    resave("future-version", tensors, format_version=2)
    return files


def test_hostile_import_files_are_refused_and_change_nothing(store_path, tmp_path):
    good = str(tmp_path / "good.safetensors")
    with tierstore.open(store_path, readonly=True) as s:
        export_session(s, "alpha", good)
    files = _hostile_files(good, tmp_path)
    before = dump_path(store_path)
    fresh = tmp_path / "fresh"
    for name, data in files.items():
        tried("import files")
        f = tmp_path / "hostile.safetensors"
        f.write_bytes(data)
        with pytest.raises((ImportFormatError, FormatVersionError)) as e:
            read_export(str(f))
        assert str(f) in str(e.value), name
        with tierstore.open(store_path) as s, pytest.raises((ImportFormatError, FormatVersionError)):
            import_session(s, str(f), "intruder")
        res = CliRunner().invoke(cli, ["--store", str(fresh), "import", str(f)])
        assert res.exit_code == 1 and res.stderr.startswith("error: ") and res.stderr.count("\n") == 1, \
            (name, res.output)
        assert not fresh.exists(), name
    assert not (tmp_path / "pwned").exists()               # no pickle was ever loaded
    assert dump_path(store_path) == before


# -- sizes and budgets --------------------------------------------------------------------------

SIZES = ["-1GiB", "1e99", "abc", "", " ", "GiB", "1.5.3GiB", "1 2", "0x10", "NaN", "inf", "-0.5",
         "10 PiB", "1" * 400, "9" * 30 + "TiB", "1e3", "1GiBB", "1_000", "+-1", float("nan"), float("inf"),
         -1, 2**61, True, [1], "1GiB\x00"]


@pytest.mark.parametrize("size", SIZES, ids=lambda s: repr(s)[:20])
@pytest.mark.parametrize("tier", ["hot", "warm", "cold"])
def test_hostile_sizes(tmp_path, tier, size):
    tried("sizes")
    path = tmp_path / "kv"
    with pytest.raises(InvalidSizeError) as e:
        tierstore.open(path, **{tier: size})
    assert str(e.value).startswith(f"{tier}: ") and len(str(e.value)) < 200
    assert not path.exists()                               # refused before anything is created


def test_hostile_cache_shares(store_path, model):
    with cw.open_store(store_path, model) as st_:
        before = dump(st_)
        for size in ("-1GiB", "1e99", "abc"):
            for tier in ("hot", "warm"):
                tried("sizes")
                with pytest.raises(InvalidSizeError):
                    TieredCache(st_, model, session="gamma", **{tier: size})
        assert dump(st_) == before and not model._forward_pre_hooks


def _generate(model, cache, n=20):
    ids = torch.arange(1, n + 1)[None]
    model.generate(ids, attention_mask=torch.ones_like(ids), cache=cache, max_new_tokens=2, do_sample=False,
                   pad_token_id=0)


@pytest.mark.parametrize("budget", [
    {"hot": 100}, {"hot": "1KiB"}, {"warm": 1}, {"hot": 0}, {"warm": 0},
    {"hot": 2048}])                                        # one block of 2 KiB: at least 2 are needed
def test_budgets_smaller_than_a_block(tmp_path, model, budget):
    tried("budgets")
    path = str(tmp_path / "kv")
    tierstore.open(path, block_tokens=cw.BLOCK_TOKENS).close()
    before = dump_path(path)
    bb = 2048                                              # bytes of one block of the tiny model
    with tierstore.open(path, block_tokens=cw.BLOCK_TOKENS, **{"hot": bb * 12, "warm": bb * 8, **budget}) as st_:
        with pytest.raises(BudgetError) as e:
            with TieredCache(st_, model, session="small") as cache:
                _generate(model, cache)
        msg = str(e.value)
        assert "budget" in msg and "block" in msg and "bytes" in msg, msg
        assert not model._forward_pre_hooks and st_.sessions.live_leases() == []
    assert dump_path(path) == before
    with cw.open_store(path, model) as st_:                                # and the store still works
        with TieredCache(st_, model, session="small") as cache:
            _generate(model, cache)
        assert st_.session("small").length == 21


@pytest.mark.parametrize("share", [{"hot": 100}, {"warm": 1}])
def test_cache_share_smaller_than_a_block(store_path, model, share):
    tried("budgets")
    with cw.open_store(store_path, model) as st_:
        before = dump(st_)
        with pytest.raises(BudgetError, match="block"):
            with TieredCache(st_, model, session="small", **share) as cache:
                _generate(model, cache)
        assert dump(st_) == before


@pytest.mark.parametrize("bt", [0, -1, 70000])
def test_block_tokens_out_of_range(tmp_path, bt):
    tried("budgets")
    with pytest.raises(BudgetError, match="block_tokens"):
        tierstore.open(tmp_path / "kv", block_tokens=bt)
    assert not (tmp_path / "kv").exists()


# -- another model on resume --------------------------------------------------------------------


def _other_models(model):
    seed, vocab = cw.MODEL_SEED, cw.VOCAB                  # the trials' model but for one thing
    yield "other weights", tiny(seed=seed + 1, vocab_size=vocab)
    yield "other architecture", tiny("qwen2", seed=seed, vocab_size=vocab)
    yield "rope theta", tiny(seed=seed, vocab_size=vocab, rope_theta=500000.0)
    yield "three layers", tiny(seed=seed, vocab_size=vocab, num_hidden_layers=3)
    yield "bfloat16", cw.tiny_model().to(torch.bfloat16)
    yield "float16", cw.tiny_model().to(torch.float16)
    m = cw.tiny_model()
    with torch.no_grad():
        m.lm_head.weight[0, 0] += 1.0                      # one weight of the last layer differs
    yield "fine-tuned", m


def test_resume_with_another_model_or_dtype(store_path, model):
    with cw.open_store(store_path, model) as st_:
        before = dump(st_)
        for what, other in _other_models(model):
            tried("models on resume")
            with pytest.raises(ModelMismatchError) as e:
                TieredCache.resume(st_, other, "alpha")
            assert "alpha" in str(e.value), what
            assert not other._forward_pre_hooks, what
            with pytest.raises(SessionExistsError):        # nor can it write over the session
                TieredCache(st_, other, session="alpha")
        assert dump(st_) == before
        with TieredCache.resume(st_, model, "alpha", commit_on_close=False):   # the right model still can
            pass


# -- fuzz ---------------------------------------------------------------------------------------

EDITS = st.lists(st.tuples(st.integers(0, 5), st.integers(0, 1 << 20), st.integers(0, 1 << 33)),
                 min_size=1, max_size=4)
RECORDS = fuzz.sample_records()


@FUZZ
@given(st.binary(max_size=512))
def test_fuzz_decode_block_arbitrary_bytes(data):
    tried("fuzz: decoder")
    fuzz.check_decode(fuzz.KEY, data)


@FUZZ
@given(st.sampled_from(RECORDS), EDITS)
def test_fuzz_decode_block_mutated_records(rec, edits):
    tried("fuzz: decoder")
    key, data = rec
    fuzz.check_decode(key, fuzz.mutate(data, edits), data)


@pytest.fixture(scope="module")
def export_sample(tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzz")
    src = str(d / "src.safetensors")
    data = fuzz.sample_export(src)
    _, tensors = read_export(src)
    store = tierstore.open(str(d / "kv"))
    yield d, data, tensors, store
    store.close()


def test_fuzz_import_mutated_files(export_sample):
    d, data, tensors, store = export_sample

    @FUZZ
    @given(EDITS)
    def one(edits):
        tried("fuzz: import")
        p = str(d / "m.safetensors")
        with open(p, "wb") as f:
            f.write(fuzz.mutate(data, edits))
        fuzz.check_import(p, tensors, store)

    one()


def test_fuzz_targets_reject_known_bad_inputs(export_sample):
    d, data, tensors, store = export_sample
    assert fuzz.check_decode(fuzz.KEY, b"") == "refused"
    key, rec = RECORDS[0]
    assert fuzz.check_decode(key, rec, rec) == "decoded"
    assert fuzz.check_decode(key[::-1], rec) == "refused"        # another key: the checksum covers it
    p = str(d / "t.safetensors")
    with open(p, "wb") as f:
        f.write(data[: len(data) // 2])
    assert fuzz.check_import(p, tensors, store) == "refused"
    with open(p, "wb") as f:
        f.write(data)
    assert fuzz.check_import(p, tensors) == "accepted"


def test_figures():
    """Printed with -s: hostile inputs tried, by kind."""
    print("\nhostile inputs tried: " + ", ".join(f"{k} {v}" for k, v in sorted(FIGURES.items())))
    assert FIGURES

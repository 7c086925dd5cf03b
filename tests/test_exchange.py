"""``tierstore export`` / ``import``: one safetensors file per session, validated, never pickle."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import save_file

import tierstore
from tierstore import KVLayout
from tierstore.errors import ImportFormatError
from tierstore.records import SessionRecord
from tierstore.tools.cli import cli
from tierstore.maintenance.exchange import export_session, import_session, read_export, tensors_checksum

from support import file_digest, random_kv, same_bits

LAYOUT = KVLayout(num_layers=2, kv_heads=2, head_dim=8, block_tokens=4, dtype=torch.float32)
BF16 = KVLayout(num_layers=3, kv_heads=1, head_dim=4, block_tokens=4, dtype=torch.bfloat16)


def special_bf16_kv(n: int):
    """bf16 K/V with every awkward bit pattern: NaN payloads, -0.0, infinities, subnormals."""
    kv = random_kv(BF16, n, 7)
    bits = torch.tensor([0x7FC1, 0xFFA3, 0x8000, 0x7F80, 0xFF80, 0x0001, 0x8001], dtype=torch.int32).to(torch.int16)
    for k, v in kv:
        k.view(torch.int16).view(-1)[:len(bits)] = bits
        v.view(torch.int16).view(-1)[-len(bits):] = bits
    return kv


@pytest.fixture
def store(tmp_path):
    path = str(tmp_path / "src")
    with tierstore.open(path) as s:
        s.put_session("chat-1", layout=LAYOUT, kv=random_kv(LAYOUT, 11, 0), token_ids=np.arange(11) * 3,
                      fingerprint="fp-llama", fingerprint_fields={"arch": "llama", "layers": 2},
                      last_logits=np.linspace(-2, 2, 9, dtype=np.float32), model_name="tiny/llama",
                      tokenizer_name="tiny/tok", meta={"turns": 3})
        s.put_session("b16", layout=BF16, kv=special_bf16_kv(9), token_ids=list(range(9)), fingerprint="fp-b",
                      codec="zstd")
        s.fork("chat-1", "fork-1", 8)
    return path


def run(store_path, *args, code: int = 0):
    res = CliRunner().invoke(cli, ["--store", str(store_path), *args])
    assert res.exit_code == code, (res.exit_code, res.stdout, res.stderr, res.exception)
    return res


def assert_same_session(src: str, a: str, dst: str, b: str) -> None:
    with tierstore.open(src, readonly=True) as s1:
        r1, kv1 = s1.load_session(a)
    with tierstore.open(dst, readonly=True) as s2:      # one environment per path and process (LMDB)
        r2, kv2 = s2.load_session(b)
    assert all(same_bits(x, y) for (k1, v1), (k2, v2) in zip(kv1, kv2) for x, y in ((k1, k2), (v1, v2)))
    assert len(kv1) == len(kv2) == r1.layout.num_layers
    assert np.array_equal(r1.token_ids, r2.token_ids) and r1.layout == r2.layout
    assert (r1.fingerprint, r1.fingerprint_fields, r1.model_name, r1.tokenizer_name, r1.codec, r1.pad) == \
        (r2.fingerprint, r2.fingerprint_fields, r2.model_name, r2.tokenizer_name, r2.codec, r2.pad)
    assert {k: v for k, v in r1.meta.items()} == r2.meta
    if r1.last_logits is None:
        assert r2.last_logits is None
    else:
        assert np.array_equal(r1.last_logits.view(np.int32), r2.last_logits.view(np.int32))
    assert r1.chains() == r2.chains()          # same content address: shares blocks with the original


# -- round trips ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["chat-1", "b16", "fork-1"])
def test_export_import_round_trip_bit_exact(store, tmp_path, name):
    f = str(tmp_path / f"{name}.safetensors")
    out = json.loads(run(store, "export", name, f, "--json").stdout)
    assert out["bytes"] == os.path.getsize(f) and out["session"] == name
    dst = str(tmp_path / "new-store")                     # does not exist yet: import creates it
    got = json.loads(run(dst, "import", f, "--json").stdout)
    assert got["session"] == name
    assert_same_session(store, name, dst, name)
    assert json.loads(run(dst, "verify", "--json").stdout)["ok"]


def test_import_as_and_overwrite(store, tmp_path):
    f = str(tmp_path / "c.safetensors")
    run(store, "export", "chat-1", f)
    assert "imported copy-1" in run(store, "import", f, "--as", "copy-1").stdout
    assert_same_session(store, "chat-1", store, "copy-1")
    res = run(store, "import", f, "--as", "copy-1", code=1)
    assert res.stderr.startswith("error: session 'copy-1'") and "--overwrite" in res.stderr
    g = str(tmp_path / "b.safetensors")
    run(store, "export", "b16", g)
    run(store, "import", g, "--as", "copy-1", "--overwrite")
    assert_same_session(store, "b16", store, "copy-1")
    assert "invalid session name" in run(store, "import", f, "--as", "no/slash", code=2).stderr
    assert json.loads(run(store, "verify", "--json").stdout)["ok"]


def test_export_file_layout(store, tmp_path):
    f = str(tmp_path / "x.safetensors")
    with tierstore.open(store, readonly=True) as s:
        meta = export_session(s, "chat-1", f)
    with safe_open(f, framework="pt") as sf:
        assert sf.metadata() == meta and meta["format"] == "tierstore-session"
        names = set(sf.keys())
        assert names == {"layer.0.k", "layer.0.v", "layer.1.k", "layer.1.v", "token_ids", "last_logits"}
        assert sf.get_tensor("layer.1.v").shape == (2, 11, 8) and sf.get_tensor("layer.1.v").dtype == torch.float32
        assert sf.get_tensor("token_ids").dtype == torch.int64
        assert sf.get_tensor("last_logits").dtype == torch.float32
    s = json.loads(meta["session"])
    assert s["checksum"]["algo"] == "xxh3_128" and s["layout"]["num_layers"] == 2 and s["meta"] == {"turns": 3}
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tierstore-export-")]


def test_export_refuses_existing_file_and_missing_session(store, tmp_path):
    f = tmp_path / "x.safetensors"
    f.write_text("keep me")
    assert "exists" in run(store, "export", "chat-1", str(f), code=1).stderr
    assert f.read_text() == "keep me"
    run(store, "export", "chat-1", str(f), "--force")
    assert read_export(str(f))[0]["name"] == "chat-1"
    assert "no such session" in run(store, "export", "nobody", str(tmp_path / "n"), code=1).stderr
    assert not (tmp_path / "n").exists()


def test_padded_session_round_trip(tmp_path):
    """``put_session`` has no ``pad=``; import keeps the left padding anyway."""
    src = str(tmp_path / "src")
    with tierstore.open(src) as s:
        rec = SessionRecord(name="padded", layout=LAYOUT, fingerprint="fp", fingerprint_fields={},
                            codec=s.config.codec, token_ids=np.arange(6, dtype=np.int64), pad=2)
        kv = random_kv(LAYOUT, 6, 4)
        for layer, (k, v) in enumerate(kv):
            s.sessions.put_blocks(s.encode_blocks(rec, layer, k, v, rec.chains()))
        s.sessions.commit(rec)
    f = str(tmp_path / "p.safetensors")
    with tierstore.open(src, readonly=True) as s:
        export_session(s, "padded", f)
    dst = str(tmp_path / "dst")
    with tierstore.open(dst) as d:
        assert import_session(d, f).pad == 2
    assert_same_session(src, "padded", dst, "padded")


# -- bad files leave the store alone --------------------------------------------------------


def bad_files(store: str, tmp_path) -> dict[str, str]:
    good = str(tmp_path / "good.safetensors")
    with tierstore.open(store, readonly=True) as s:
        export_session(s, "chat-1", good)
    blob = open(good, "rb").read()
    meta, tensors = read_export(good)
    files = {}

    def write(name: str, data: bytes) -> None:
        files[name] = str(tmp_path / name)
        with open(files[name], "wb") as fh:
            fh.write(data)

    write("pickle.pkl", pickle.dumps({"layer.0.k": np.zeros(3)}))
    torch.save({"k": torch.zeros(2)}, str(tmp_path / "torch.pt"))
    files["torch.pt"] = str(tmp_path / "torch.pt")
    write("empty", b"")
    write("random", os.urandom(4096))
    write("trunc-4", blob[:4])
    write("trunc-header", blob[:60])
    write("trunc-data", blob[:-10])
    flipped = bytearray(blob)
    flipped[-5] ^= 0x10
    write("tampered", bytes(flipped))

    def resave(name: str, tensors_: dict, session_: dict | None = None, *, fix_sum: bool = True, **outer) -> None:
        s = dict(meta if session_ is None else session_)
        if fix_sum:  # a consistent checksum: only the planted fault is wrong
            s["checksum"] = {"algo": "xxh3_128", "hex": tensors_checksum(tensors_)}
        md = {"format": "tierstore-session", "format_version": "1", "session": json.dumps(s), **outer}
        files[name] = str(tmp_path / name)
        save_file(tensors_, files[name], metadata=md)

    resave("shape", {**tensors, "layer.1.k": torch.zeros(2, 11, 4)})
    resave("dtype", {**tensors, "layer.0.v": tensors["layer.0.v"].half()})
    resave("missing-layer", {k: v for k, v in tensors.items() if not k.startswith("layer.1.")})
    resave("extra-tensor", {**tensors, "evil": torch.zeros(1)})
    resave("renamed", {("layer.9.k" if k == "layer.1.k" else k): v for k, v in tensors.items()})
    resave("length", {**tensors, "token_ids": torch.arange(10)})
    resave("ids-dtype", {**tensors, "token_ids": torch.arange(11, dtype=torch.int32)})
    resave("future", tensors, format_version="9")
    resave("future-record", tensors, {**meta, "format_version": 5})
    resave("fields-type", tensors, {**meta, "fingerprint_fields": [1, 2]})
    resave("bad-checksum", tensors, {**meta, "checksum": "x"}, fix_sum=False)
    resave("no-checksum", tensors, {k: v for k, v in meta.items() if k != "checksum"}, fix_sum=False)
    save_file({"weight": torch.zeros(3)}, str(tmp_path / "model.safetensors"))
    files["model.safetensors"] = str(tmp_path / "model.safetensors")
    return files


EXPECT = {
    "pickle.pkl": "pickle", "torch.pt": "pickle", "empty": "too short", "random": "not",
    "trunc-4": "too short", "trunc-header": "truncated", "trunc-data": "truncated", "tampered": "checksum",
    "shape": "layout says", "dtype": "layout says", "missing-layer": "do not match the layout",
    "extra-tensor": "do not match the layout", "renamed": "unexpected ['layer.9.k']", "length": "token_ids",
    "ids-dtype": "token_ids", "future": "version 9", "fields-type": "'fingerprint_fields' has the wrong type",
    "future-record": "version 5", "bad-checksum": "unsupported checksum", "no-checksum": "lacks checksum",
    "model.safetensors": "not a tierstore session export",
}


def test_bad_files_are_refused_and_change_nothing(store, tmp_path):
    files = bad_files(store, tmp_path)
    assert set(files) == set(EXPECT)
    before = file_digest(store)
    fresh = tmp_path / "fresh"
    for name, path in files.items():
        res = run(store, "import", path, "--as", "intruder", code=1)
        assert res.stderr.startswith("error: ") and res.stderr.count("\n") == 1, (name, res.stderr)
        assert EXPECT[name] in res.stderr, (name, res.stderr)
        assert "Traceback" not in res.output
        run(fresh, "import", path, code=1)
        assert not fresh.exists(), name                  # a bad file creates no store
        with pytest.raises(tierstore.TierstoreError):
            read_export(path)
    assert file_digest(store) == before
    with tierstore.open(store, readonly=True) as s:
        assert sorted(r.name for r in s.list()) == ["b16", "chat-1", "fork-1"]


def test_import_missing_file_is_usage_error(store, tmp_path):
    run(store, "import", str(tmp_path / "nope.safetensors"), code=2)


def test_export_into_missing_folder_is_one_error_line(store, tmp_path):
    res = run(store, "export", "chat-1", str(tmp_path / "no" / "such" / "dir.safetensors"), code=1)
    assert res.stderr.startswith("error: ") and res.stderr.count("\n") == 1


def test_pickle_is_never_loaded(store, tmp_path):
    """A pickle that would run code on load: refused before any parser sees it."""
    marker = tmp_path / "pwned"

    class Boom:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    f = tmp_path / "evil.safetensors"
    f.write_bytes(pickle.dumps(Boom()))
    with tierstore.open(store) as s, pytest.raises(ImportFormatError, match="pickle"):
        import_session(s, str(f))
    assert not marker.exists()


def test_entry_point_export_import(store, tmp_path):
    f = str(tmp_path / "e.safetensors")
    for args in (["--store", store, "export", "b16", f], ["--store", store, "import", f, "--as", "b16-copy"]):
        res = subprocess.run([sys.executable, "-m", "tierstore.tools.cli", *args], capture_output=True, text=True,
                             timeout=60)
        assert res.returncode == 0, res.stderr
    assert_same_session(store, "b16", store, "b16-copy")


RESUME_SCRIPT = """
import sys, torch, tierstore
from click.testing import CliRunner
from transformers import AutoModelForCausalLM, DynamicCache, LlamaConfig
from tierstore.adapters.hf import TieredCache
from tierstore.tools.cli import cli

root = sys.argv[1]
torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
model = AutoModelForCausalLM.from_config(cfg).eval()
ids = torch.randint(1, 128, (1, 30))
greedy = dict(do_sample=False, pad_token_id=0)
ref = model.generate(ids, cache=DynamicCache(), max_new_tokens=16, **greedy)
budget = dict(hot=6 * 2048, warm=4 * 2048, block_tokens=8)   # 2048 B = one K+V block of this model
with tierstore.open(root + "/a", **budget) as st:
    with TieredCache(st, model, session="talk") as cache:
        first = model.generate(ids, cache=cache, max_new_tokens=8, **greedy)
f = root + "/talk.safetensors"
for args in (["--store", root + "/a", "export", "talk", f], ["--store", root + "/b", "import", f, "--as", "moved"]):
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, (args, res.output)
with tierstore.open(root + "/b", **budget) as st:
    with TieredCache.resume(st, model, "moved") as cache:
        out = model.generate(first, cache=cache, max_new_tokens=8, **greedy)
print("same" if torch.equal(out, ref) else f"differs: {out.tolist()} vs {ref.tolist()}")
"""


def test_imported_session_resumes(tmp_path):
    """export -> import into another store -> ``TieredCache.resume`` continues exactly like a
    model that never stopped (tiny random Llama, greedy). In a subprocess with a timeout: the
    tier manager's threads must not be able to hang this file."""
    pytest.importorskip("tierstore.adapters.hf")
    res = subprocess.run([sys.executable, "-c", RESUME_SCRIPT, str(tmp_path)], capture_output=True, text=True,
                         timeout=180)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip().splitlines()[-1] == "same"

"""Sizes, session names, KV layouts, and the content-addressing hash chain (``chain``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from tierstore.chain import chain_hashes, root_hash
from tierstore.errors import InvalidSessionNameError, InvalidSizeError
from tierstore.layout import KVLayout, check_session_name, fingerprint_digest, parse_size

GiB, MiB = 1 << 30, 1 << 20

# -- parse_size ---------------------------------------------------------------------------


@pytest.mark.parametrize("value, expected", [
    ("8GiB", 8 * GiB), ("512MB", 512 * 10**6), ("512MiB", 512 * MiB), ("1gib", GiB), (" 2 KiB ", 2048),
    ("1.5GiB", 3 * GiB // 2), ("100", 100), ("7B", 7), ("0", 0), (0, 0), (1024, 1024), (1 << 60, 1 << 60),
    (1024.0, 1024), ("9007199254740993", 2**53 + 1), (None, None),
])
def test_parse_size_accepts(value, expected):
    assert parse_size(value) == expected


@pytest.mark.parametrize("value", [
    "-1GiB", "-1", -1, "1e99", 1e99, "abc", "", "GiB", "8 GiBs", "8XB", "0x10", "1,024", True, False,
    float("inf"), float("-inf"), float("nan"), -1.0, (1 << 60) + 1, "2EiB", "1" * 400, "1" * 400 + "GiB",
    [1024], b"1024", object(),
])
def test_parse_size_rejects(value):
    with pytest.raises(InvalidSizeError):
        parse_size(value, what="warm")


def test_parse_size_error_names_the_setting_and_is_a_value_error():
    with pytest.raises(ValueError, match="warm") as e:
        parse_size("lots", what="warm")
    assert isinstance(e.value, InvalidSizeError)


# -- session names --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["a", "doc-42", "Z", "0", "9.x_y-z", "a" * 128, "A.B.C", "x--", "x..y"])
def test_valid_session_names(name):
    assert check_session_name(name) == name


@pytest.mark.parametrize("name", [
    "", "a/b", "/abs", "..", ".", ".hidden", "-rf", "_x", "a\x00b", "a\nb", "abc\n", "a\tb", "a\x7fb",
    "a b", "a" * 129, "a" * 10_000, "d\u043ec", "\u0430bc",  # Cyrillic o / a look-alikes
    "caf\u00e9", "a\u200bb", "ａｂｃ", "a:b", "a\\b", "a*b", None, 42, b"abc",
])
def test_invalid_session_names(name):
    with pytest.raises(InvalidSessionNameError) as e:
        check_session_name(name)
    assert isinstance(e.value, ValueError)
    assert len(str(e.value)) < 400  # a 10k-character name is cut in the message


# -- KVLayout ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype, itemsize", [(torch.float32, 4), (torch.float16, 2), (torch.bfloat16, 2)])
def test_kvlayout_sizes(dtype, itemsize):
    lay = KVLayout(num_layers=30, kv_heads=3, head_dim=64, block_tokens=64, dtype=dtype)
    assert lay.itemsize == itemsize
    assert lay.block_bytes == 2 * 3 * 64 * 64 * itemsize
    assert lay.token_bytes == 2 * 30 * 3 * 64 * itemsize
    assert lay.block_bytes * lay.num_layers == lay.token_bytes * lay.block_tokens
    assert KVLayout.from_json(json.loads(json.dumps(lay.to_json()))) == lay


@pytest.mark.parametrize("field, value", [
    ("num_layers", 0), ("kv_heads", -1), ("head_dim", 1.5), ("block_tokens", "64"), ("dtype", torch.int8),
    ("dtype", torch.float64),
])
def test_kvlayout_rejects_bad_fields(field, value):
    kw = dict(num_layers=2, kv_heads=2, head_dim=8, block_tokens=4, dtype=torch.float16)
    kw[field] = value
    with pytest.raises(ValueError):
        KVLayout(**kw)


def test_kvlayout_from_json_rejects_unknown_dtype():
    d = KVLayout(2, 2, 8, 4, torch.float16).to_json()
    d["dtype"] = "float64"
    with pytest.raises(ValueError, match="float64"):
        KVLayout.from_json(d)


def test_fingerprint_digest_is_order_independent():
    assert fingerprint_digest({"a": 1, "b": [1, 2]}) == fingerprint_digest({"b": [1, 2], "a": 1})
    assert fingerprint_digest({"a": 1}) != fingerprint_digest({"a": 2})


# -- chain (content addressing) ---------------------------------------------------------------

LAY = KVLayout(num_layers=2, kv_heads=2, head_dim=8, block_tokens=16, dtype=torch.bfloat16)
FP = "f" * 32


def _ids(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 50_000, n)


_CHILD = """
import json, sys
import numpy as np, torch
from tierstore.chain import chain_hashes, root_hash
from tierstore.layout import KVLayout
lay = KVLayout(num_layers=2, kv_heads=2, head_dim=8, block_tokens=16, dtype=torch.bfloat16)
ids = np.random.default_rng(7).integers(0, 50_000, 100)
root = root_hash("f" * 32, lay, "none", 0)
print(json.dumps([root.hex()] + [c.hex() for c in chain_hashes(root, ids, 16)]))
"""


def test_chain_is_deterministic_across_processes():
    root = root_hash(FP, LAY, "none", 0)
    mine = [root.hex()] + [c.hex() for c in chain_hashes(root, _ids(100, 7), 16)]
    env = {**os.environ, "PYTHONHASHSEED": "12345" if os.environ.get("PYTHONHASHSEED") != "12345" else "999"}
    out = subprocess.run([sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == mine
    assert len(mine) == 1 + 7  # 6 full blocks + 1 partial


@pytest.mark.parametrize("k", [0, 1, 3, 6])
def test_prefix_sharing_shares_exactly_k_hashes(k):
    root = root_hash(FP, LAY)
    a = _ids(16 * 6 + 5, 1)
    b = a.copy()
    b[16 * k:] = (b[16 * k:] + 1) % 50_000  # every block from k on differs
    ca, cb = chain_hashes(root, a, 16), chain_hashes(root, b, 16)
    assert ca[:k] == cb[:k]
    assert len(set(ca) & set(cb)) == k
    assert all(x != y for x, y in zip(ca[k:], cb[k:]))


def test_changing_one_token_changes_every_later_hash():
    root = root_hash(FP, LAY)
    a = _ids(64, 2)
    b = a.copy()
    b[20] += 1  # inside block 1
    ca, cb = chain_hashes(root, a, 16), chain_hashes(root, b, 16)
    assert ca[0] == cb[0] and all(x != y for x, y in zip(ca[1:], cb[1:]))


def test_partial_block_differs_from_full_block_with_same_prefix():
    root = root_hash(FP, LAY)
    ids = _ids(32, 3)
    full, part = chain_hashes(root, ids, 16), chain_hashes(root, ids[:20], 16)
    assert full[0] == part[0] and full[1] != part[1]
    # a partial block is keyed by its own token count, so appending changes it
    assert chain_hashes(root, ids[:20], 16)[1] != chain_hashes(root, ids[:21], 16)[1]


def test_roots_differ_by_fingerprint_quant_pad_and_layout():
    base = root_hash(FP, LAY, "none", 0)
    others = [
        root_hash("e" * 32, LAY, "none", 0),
        root_hash(FP, LAY, "int8", 0),
        root_hash(FP, LAY, "int4", 0),
        root_hash(FP, LAY, "none", 3),
        root_hash(FP, KVLayout(2, 2, 8, 16, torch.float16), "none", 0),
        root_hash(FP, KVLayout(2, 2, 8, 32, torch.bfloat16), "none", 0),
        root_hash(FP, KVLayout(3, 2, 8, 16, torch.bfloat16), "none", 0),
    ]
    assert len({base, *others}) == 1 + len(others)
    assert root_hash(FP, LAY, "none", 0) == base
    ids = _ids(40, 4)
    first = {chain_hashes(r, ids, 16)[0] for r in [base, *others]}
    assert len(first) == 1 + len(others)


def test_chain_rejects_out_of_range_ids_and_handles_empty():
    root = root_hash(FP, LAY)
    assert chain_hashes(root, [], 16) == []
    for bad in ([-1], [2**32]):
        with pytest.raises(ValueError):
            chain_hashes(root, bad, 16)
    assert len(chain_hashes(root, [2**32 - 1], 16)[0]) == 16

"""Block record format v1: round trips, lossy error bounds, decode into pools, every corruption,
envelopes, and the committed golden files."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import struct
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tierstore.codec import (CODEC_IDS, HEADER_SIZE, MAX_RAW_LEN, CodecConfig, RawBlockReader, SlotReader,
                             ZstdBlockReader, decode_block, encode_block, open_envelope, read_header, seal_envelope, verify_record)
from tierstore.errors import CorruptBlockError, CorruptRecordError, FormatVersionError
from tierstore.layout import DTYPE_NAMES

from support import bits, random_bits

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
LOSSLESS = ["raw", "zstd", "zstd:5"]
LOSSY = ["int8", "int8+zstd", "int4", "int4+zstd", "int4:g8", "int4+zstd:1:g16"]
ALL_SPECS = LOSSLESS + LOSSY
KEY = b"\x01" * 16 + b"\x00\x03\x00\x00\x00\x07"
WHERE = {"session": "doc-42", "layer": 3, "block": 7}
GOLDEN = Path(__file__).resolve().parent / "fixtures" / "golden_v1"

hyp = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
shapes = st.tuples(st.integers(1, 4), st.integers(1, 70), st.integers(1, 40))


def smooth(shape, dtype, seed: int, offset: float = 3.0) -> tuple[torch.Tensor, torch.Tensor]:
    """KV-like data: keys with per-channel offsets, values around zero."""
    g = torch.Generator().manual_seed(seed)
    h, _, d = shape
    k = torch.randn(shape, generator=g) + offset * torch.randn(h, 1, d, generator=g)
    v = torch.randn(shape, generator=g)
    return k.to(dtype), v.to(dtype)


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    want = want.float()
    return ((got.float() - want).norm() / want.norm().clamp_min(1e-30)).item()


def reseal(key: bytes, record: bytes | bytearray) -> bytes:
    """Recompute a record's checksum from the spec (independently of the codec module)."""
    rec = bytearray(record)
    rec[40:56] = bytes(16)
    rec[40:56] = xxhash.xxh3_128(key + bytes(rec)).digest()
    return bytes(rec)


def small_record(spec: str, dtype=torch.bfloat16, shape=(2, 5, 4)) -> bytes:
    k, v = smooth(shape, dtype, 0)
    return encode_block(KEY, k, v, spec)


# ------------------------------------------------------------------------------------- config

@pytest.mark.parametrize("spec, name, level, group", [
    ("raw", "raw", 1, 32), ("zstd", "zstd", 1, 32), ("zstd:5", "zstd", 5, 32), ("ZSTD:-3", "zstd", -3, 32),
    ("int8", "int8", 1, 32), ("int4+zstd", "int4+zstd", 1, 32), ("int4:g64", "int4", 1, 64),
    ("int4+zstd:9:g16", "int4+zstd", 9, 16), ("int8+zstd:3", "int8+zstd", 3, 32)])
def test_parse(spec, name, level, group):
    c = CodecConfig.parse(spec)
    assert (c.name, c.level, c.group) == (name, level, group)
    assert CodecConfig.parse(c.spec) == c == CodecConfig.parse(c) == CodecConfig.from_json(c.to_json())
    assert json.loads(json.dumps(c.to_json())) == c.to_json()


@pytest.mark.parametrize("spec", ["", "gzip", "zstd:", "zstd:x", "zstd:99", "raw:3", "int8:g8", "zstd:g8",
                                  "int4:g0", "int4:1", "zstd:1:2", "int4:g8:g8", "int4:g70000"])
def test_parse_junk_names_the_spec(spec):
    with pytest.raises(ValueError, match=repr(spec).replace("+", r"\+")):
        CodecConfig.parse(spec)


def test_config_properties_and_normalisation():
    assert CodecConfig("raw", level=9, group=4) == CodecConfig("raw")   # parameters that do not apply
    assert [CodecConfig(n).quant for n in CODEC_IDS] == ["none", "none", "int8", "int8", "int4", "int4"]
    assert [CodecConfig(n).lossless for n in CODEC_IDS] == [True, True, False, False, False, False]
    with pytest.raises(ValueError):
        CodecConfig.from_json({"name": "lz4"})


# ---------------------------------------------------------------------------------- lossless

@hyp
@given(shape=shapes, dtype=st.sampled_from(DTYPES), spec=st.sampled_from(LOSSLESS), seed=st.integers(0, 2**32))
def test_lossless_round_trip_is_bit_exact(shape, dtype, spec, seed):
    k, v = random_bits(shape, dtype, seed), random_bits(shape, dtype, seed + 1)
    rec = encode_block(KEY, k, v, spec)
    dk, dv = decode_block(KEY, rec)
    assert dk.dtype == dtype and dk.shape == shape and dk.device.type == "cpu"
    assert torch.equal(bits(dk), bits(k)) and torch.equal(bits(dv), bits(v))
    hdr = verify_record(KEY, rec)
    assert (hdr.version, hdr.codec, hdr.dtype, hdr.shape) == (1, CodecConfig.parse(spec), dtype, shape)
    assert hdr.raw_len == 2 * k.numel() * k.element_size() and hdr.record_len == len(rec)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("spec", LOSSLESS)
def test_special_values_survive(spec, dtype):
    special = torch.tensor([float("nan"), float("inf"), float("-inf"), -0.0, 0.0, torch.finfo(dtype).tiny / 2,
                            torch.finfo(dtype).max, -torch.finfo(dtype).min]).to(dtype)
    k = special.repeat(2, 3, 1)
    bits(k).view(-1)[0] = {2: 0x7FC5, 4: 0x7FC0BEEF}[k.element_size()]  # NaN with a payload
    v = -k
    dk, dv = decode_block(KEY, encode_block(KEY, k, v, spec))
    assert torch.equal(bits(dk), bits(k)) and torch.equal(bits(dv), bits(v))


def test_zstd_compresses_smooth_bf16():
    k, v = smooth((3, 64, 64), torch.bfloat16, 1, offset=0.5)
    raw, z = encode_block(KEY, k, v, "raw"), encode_block(KEY, k, v, "zstd")
    assert len(raw) == HEADER_SIZE + 2 * k.numel() * 2
    assert len(raw) / len(z) > 1.25


@pytest.mark.parametrize("dtype", DTYPES)
def test_encode_leaves_inputs_alone(dtype):
    k, v = smooth((2, 32, 8), dtype, 3)
    k0, v0 = k.clone(), v.clone()
    for spec in ALL_SPECS:
        encode_block(KEY, k, v, spec)
    assert torch.equal(bits(k), bits(k0)) and torch.equal(bits(v), bits(v0))


def test_encode_accepts_non_contiguous_and_rejects_bad_input():
    k, v = smooth((2, 8, 6), torch.float32, 2)
    kt = k.transpose(0, 1).contiguous().transpose(0, 1)                  # same values, other strides
    dk, _ = decode_block(KEY, encode_block(KEY, kt, v, "zstd"))
    assert torch.equal(dk, k)
    for bad in [(k, v.half()), (k, v[:, :4]), (k[0], v[0]), (k[:, :0], v[:, :0]), (k.long(), v.long())]:
        with pytest.raises(ValueError):
            encode_block(KEY, *bad, "raw")
    with pytest.raises(ValueError, match="non-finite"):
        encode_block(KEY, k.masked_fill(k > 1, float("inf")), v, "int8")


# ------------------------------------------------------------------------------------- lossy

def group_step(x: torch.Tensor, axis: int, group: int, levels: int) -> torch.Tensor:
    """Per-element quantisation step (range of its group / levels), computed independently."""
    xt = x.float().movedim(axis, -1)
    n = xt.shape[-1]
    step = torch.empty_like(xt)
    for s in range(0, n, group):
        g = xt[..., s:s + group]
        step[..., s:s + group] = (g.amax(-1, keepdim=True) - g.amin(-1, keepdim=True)) / levels
    return step.movedim(-1, axis)


@hyp
@given(shape=shapes, dtype=st.sampled_from(DTYPES), spec=st.sampled_from(LOSSY), seed=st.integers(0, 2**32))
def test_lossy_error_is_bounded(shape, dtype, spec, seed):
    k, v = smooth(shape, dtype, seed)
    codec = CodecConfig.parse(spec)
    dk, dv = decode_block(KEY, encode_block(KEY, k, v, codec))
    assert dk.dtype == dtype and dk.shape == shape
    levels = 255 if codec.quant == "int8" else 15
    gk = shape[1] if codec.quant == "int8" else codec.group
    gv = shape[2] if codec.quant == "int8" else codec.group
    eps = torch.finfo(dtype).eps
    for got, want, axis, group in ((dk, k, 1, gk), (dv, v, 2, gv)):
        step = group_step(want, axis, group, levels)
        bound = step * 0.5 * (1 + 1e-4) + (want.float().abs() + step) * eps + 1e-30   # + rounding to dtype
        assert ((got.float() - want.float()).abs() <= bound).all()       # within half a step
    if shape[1] >= 8 and shape[2] >= 8:
        limit = 0.012 if codec.quant == "int8" else 0.15
        assert rel_err(dk, k) < limit and rel_err(dv, v) < limit


@pytest.mark.parametrize("spec", LOSSY)
def test_lossy_constant_and_extremes_exact(spec):
    k = torch.full((2, 9, 5), 1.5, dtype=torch.bfloat16)
    v = torch.linspace(-3, 3, 90).reshape(2, 9, 5).to(torch.bfloat16)
    dk, dv = decode_block(KEY, encode_block(KEY, k, v, spec))
    assert torch.equal(dk, k)                                           # zero range: exact
    assert dv.amin() == v.amin() and dv.amax() == v.amax()              # extremes are stored exactly


def test_int4_size_and_error_targets_on_kv_like_data():
    """Sizes count scales and header; measured real-KV errors are in tools/bench/codec.py."""
    k, v = smooth((3, 64, 64), torch.float16, 5)
    fp16 = 2 * k.numel() * 2
    assert fp16 / len(encode_block(KEY, k, v, "int4")) > 3.15
    assert fp16 / len(encode_block(KEY, k, v, "int8")) > 1.85


def test_threads_share_nothing():
    """zstd contexts are per thread; concurrent encodes/decodes must not interfere."""
    from concurrent.futures import ThreadPoolExecutor

    blocks = [smooth((2, 48, 16), torch.bfloat16, i) for i in range(16)]

    def work(i: int) -> bool:
        spec = ["zstd", "int4+zstd", "zstd:3", "int8+zstd"][i % 4]
        k, v = blocks[i]
        want = decode_block(KEY, encode_block(KEY, k, v, spec))
        for _ in range(20):
            got = decode_block(KEY, encode_block(KEY, k, v, spec))
            if not (torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])):
                return False
        return True

    with ThreadPoolExecutor(4) as pool:
        assert all(pool.map(work, range(16)))


# -------------------------------------------------------------------------------- decode into

@hyp
@given(shape=shapes, dtype=st.sampled_from(DTYPES), spec=st.sampled_from(ALL_SPECS),
       extra=st.integers(0, 9), at=st.integers(0, 5), strided=st.booleans(), seed=st.integers(0, 2**32))
def test_decode_into_pool_views(shape, dtype, spec, extra, at, strided, seed):
    h, t, d = shape
    k, v = smooth(shape, dtype, seed)
    want_k, want_v = decode_block(KEY, encode_block(KEY, k, v, spec))
    cap = at + t + extra
    if strided:   # channels not contiguous: pool stored [H, D, cap], viewed [H, cap, D]
        pool = torch.full((2, h, d, cap), 7.0, dtype=dtype).transpose(2, 3)
    else:
        pool = torch.full((2, h, cap, d), 7.0, dtype=dtype)
    before = pool.clone()
    ok, ov = decode_block(KEY, encode_block(KEY, k, v, spec), out_k=pool[0, :, at:], out_v=pool[1, :, at:])
    assert ok.shape == shape and ok.data_ptr() == pool[0, :, at:].data_ptr()
    assert torch.equal(bits(ok), bits(want_k)) and torch.equal(bits(ov), bits(want_v))
    mask = torch.ones(pool.shape, dtype=torch.bool)
    mask[:, :, at:at + t] = False
    assert torch.equal(bits(pool)[mask], bits(before)[mask])           # nothing outside the slot written


def test_decode_into_rejects_mismatched_outputs():
    rec = small_record("raw", torch.bfloat16, (2, 5, 4))
    ok = torch.empty(2, 8, 4, dtype=torch.bfloat16)
    with pytest.raises(ValueError):
        decode_block(KEY, rec, out_k=ok)
    for bad in (torch.empty(2, 8, 4), torch.empty(2, 4, 4, dtype=torch.bfloat16),
                torch.empty(3, 8, 4, dtype=torch.bfloat16)):
        with pytest.raises(CorruptBlockError, match="does not fit"):
            decode_block(KEY, rec, out_k=bad, out_v=bad.clone(), **WHERE)


# -------------------------------------------------------------------------------- corruption

def assert_corrupt(fn, *, where=WHERE):
    with pytest.raises(CorruptBlockError) as ei:
        fn()
    msg = str(ei.value)
    for name, value in where.items():
        assert f"{name} {value!r}" in msg if name == "session" else f"{name} {value}" in msg
    return ei.value


@hyp
@given(spec=st.sampled_from(ALL_SPECS), dtype=st.sampled_from(DTYPES), data=st.data())
def test_any_flipped_byte_is_caught(spec, dtype, data):
    rec = bytearray(small_record(spec, dtype))
    at = data.draw(st.integers(0, len(rec) - 1), label="offset")
    rec[at] ^= data.draw(st.integers(1, 255), label="xor")
    assert_corrupt(lambda: decode_block(KEY, bytes(rec), **WHERE))
    assert_corrupt(lambda: verify_record(KEY, rec, **WHERE))


@pytest.mark.parametrize("spec", ALL_SPECS)
def test_every_truncation_and_trailing_bytes(spec):
    rec = small_record(spec)
    for n in range(len(rec)):
        assert_corrupt(lambda: decode_block(KEY, rec[:n], **WHERE))
    for tail in (b"\x00", b"garbage"):
        assert_corrupt(lambda: decode_block(KEY, rec + tail, **WHERE))
    assert_corrupt(lambda: read_header(rec + b"\x00", **WHERE))


def test_record_under_another_key_fails_and_names_the_key():
    rec = small_record("zstd")
    other = b"\x02" * 22
    err = assert_corrupt(lambda: decode_block(other, rec), where={})
    assert other.hex() in str(err) and err.key == other
    assert_corrupt(lambda: decode_block(other, rec, **WHERE))


def test_newer_version_raises_format_version_error():
    rec = bytearray(small_record("raw"))
    struct.pack_into("<H", rec, 4, 2)
    newer = reseal(KEY, rec)                          # written (and checksummed) by a v2 writer
    with pytest.raises(FormatVersionError, match="version 2") as ei:
        decode_block(KEY, newer, **WHERE)
    assert "session 'doc-42'" in str(ei.value)
    with pytest.raises(FormatVersionError):
        read_header(newer)
    # the same bytes with the old checksum: a damaged version field, not a newer format
    assert_corrupt(lambda: decode_block(KEY, bytes(rec), **WHERE))


@pytest.mark.parametrize("field, fmt, at, value", [
    ("codec id", "<B", 6, 77), ("dtype code", "<B", 10, 9), ("reserved", "<B", 11, 1),
    ("level on raw", "<b", 7, 3), ("group on raw", "<H", 8, 8), ("zero tokens", "<I", 16, 0),
    ("raw_len", "<Q", 24, 123)])
def test_impossible_headers_with_valid_checksums(field, fmt, at, value):
    rec = bytearray(small_record("raw"))
    struct.pack_into(fmt, rec, at, value)
    assert_corrupt(lambda: decode_block(KEY, reseal(KEY, rec), **WHERE))


def hostile(shape, spec="zstd") -> bytes:
    """A small record whose checksummed header claims ``shape`` (raw_len consistent with it)."""
    rec = bytearray(small_record(spec, torch.float32, (1, 1, 1)))
    h, t, d = shape
    struct.pack_into("<3IQ", rec, 12, h, t, d, min(2 * h * t * d * 4, 2**64 - 1))
    return reseal(KEY, rec)


@pytest.mark.parametrize("shape", [(2**32 - 1,) * 3, (64, 65536, 256), (1, MAX_RAW_LEN // 8 + 1, 1)])
@pytest.mark.parametrize("spec", ["raw", "zstd", "int4+zstd"])
def test_hostile_huge_shape_allocates_nothing(shape, spec):
    tracemalloc.start()
    try:
        assert_corrupt(lambda: decode_block(KEY, hostile(shape, spec), **WHERE))
        assert tracemalloc.get_traced_memory()[1] < 1 << 20
    finally:
        tracemalloc.stop()


def test_zstd_frame_lying_about_its_size():
    import zstandard
    rec = bytearray(small_record("zstd", torch.bfloat16, (1, 1, 1)))   # two 2-byte planes
    big = zstandard.ZstdCompressor().compress(bytes(1 << 20))           # claims 1 MiB
    payload = struct.pack("<2I", len(big), len(big)) + big + big
    rec = rec[:HEADER_SIZE] + payload
    struct.pack_into("<Q", rec, 32, len(payload))
    err = assert_corrupt(lambda: decode_block(KEY, reseal(KEY, rec), **WHERE))
    assert "declares" in str(err)


# ---------------------------------------------------------------------------------- envelopes

@hyp
@given(body=st.binary(max_size=200), kind=st.sampled_from([b"SUMM", b"SESS"]), data=st.data())
def test_envelope_round_trip_and_damage(body, kind, data):
    env = seal_envelope(KEY, kind, body)
    assert open_envelope(KEY, kind, env) == body
    assert open_envelope(KEY, kind, memoryview(env)) == body
    bad = bytearray(env)
    at = data.draw(st.integers(0, len(bad) - 1))
    bad[at] ^= data.draw(st.integers(1, 255))
    with pytest.raises(CorruptRecordError, match="session 'doc-42'"):
        open_envelope(KEY, kind, bytes(bad), error=CorruptRecordError, session="doc-42")
    n = data.draw(st.integers(0, len(env) - 1))
    assert_corrupt(lambda: open_envelope(KEY, kind, env[:n], **WHERE))


def test_envelope_key_kind_trailing_and_version():
    env = seal_envelope(KEY, b"SUMM", b"body")
    assert_corrupt(lambda: open_envelope(KEY + b"x", b"SUMM", env, **WHERE))
    assert_corrupt(lambda: open_envelope(KEY, b"SESS", env, **WHERE))
    assert_corrupt(lambda: open_envelope(KEY, b"SUMM", env + b"\x00", **WHERE))
    err = assert_corrupt(lambda: open_envelope(b"k2", b"SUMM", env), where={})
    assert err.key == b"k2"
    newer = bytearray(env)
    struct.pack_into("<H", newer, 8, 2)
    newer[20:36] = bytes(16)
    newer[20:36] = xxhash.xxh3_128(KEY + bytes(newer)).digest()
    with pytest.raises(FormatVersionError, match="version 2"):
        open_envelope(KEY, b"SUMM", bytes(newer), error=CorruptRecordError, session="s")
    with pytest.raises(ValueError):
        seal_envelope(KEY, b"TOOLONG", b"")


# ------------------------------------------------------------------------------- golden files

MANIFEST = json.loads((GOLDEN / "manifest.json").read_text())


@pytest.mark.parametrize("entry", MANIFEST["records"], ids=lambda e: e["name"])
def test_golden_v1_records_decode(entry):
    rec = (GOLDEN / f"{entry['name']}.rec").read_bytes()
    key = bytes.fromhex(entry["key"])
    dtype = DTYPE_NAMES[entry["dtype"]]
    hdr = read_header(rec)
    assert (hdr.version, hdr.codec, hdr.dtype, hdr.shape) == (
        1, CodecConfig.parse(entry["codec"]), dtype, tuple(entry["shape"]))
    dk, dv = decode_block(key, rec)
    decoded = bits(dk).numpy().tobytes() + bits(dv).numpy().tobytes()
    if "expected" not in entry:
        assert hashlib.sha256(decoded).hexdigest() == entry["decoded_sha256"]
        return
    # lossy: dequantisation may round differently by an ulp on another CPU
    raw = bytearray((GOLDEN / entry["expected"]).read_bytes())
    want = torch.frombuffer(raw, dtype=dtype).float()
    got = torch.cat([dk.reshape(-1), dv.reshape(-1)]).float()
    assert torch.allclose(got, want, rtol=2 * torch.finfo(dtype).eps, atol=1e-5)
    with pytest.raises(CorruptBlockError):
        decode_block(key[::-1], rec)


def test_golden_v1_envelope_opens():
    (entry,) = MANIFEST["envelopes"]
    body = open_envelope(bytes.fromhex(entry["key"]), entry["kind"].encode(), (GOLDEN / entry["file"]).read_bytes())
    assert hashlib.sha256(body).hexdigest() == entry["body_sha256"]


def test_golden_fixtures_stay_small():
    assert sum(p.stat().st_size for p in GOLDEN.parent.rglob("*") if p.is_file()) < 300_000


# ------------------------------------------------------------------------------- bench helpers

def test_measure_codecs_on_synthetic_kv():
    path = Path(__file__).resolve().parents[1] / "tools" / "bench" / "codec.py"
    spec = importlib.util.spec_from_file_location("bench_codec_under_test", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    kv = [smooth((2, 40, 8), torch.float32, i) for i in range(2)]
    rows = mod.measure_codecs(kv, block_tokens=16, dtypes=[torch.bfloat16], codecs=["raw", "zstd", "int4"],
                              repeat=1)
    by = {r["codec"]: r for r in rows}
    assert set(by) == {"raw", "zstd:1", "int4:g32"}
    assert by["raw"]["k_rel_err"] == by["zstd:1"]["v_rel_err"] == 0
    assert 0 < by["int4:g32"]["k_rel_err"] < 0.2 and by["int4:g32"]["ratio"] > by["zstd:1"]["ratio"] > 1
    assert all(r["encode_mb_s"] > 0 and r["decode_mb_s"] > 0 for r in rows)


# ------------------------------------------------------------------ RawBlockReader (resume fast path)

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_raw_block_reader_matches_decode_block(dtype):
    shape = (3, 16, 8)
    k, v = torch.randn(shape).to(dtype), torch.randn(shape).to(dtype)
    k[0, 0, 0] = float("nan")
    v[1, 2, 3] = -0.0
    key = b"k" * 18
    rec = encode_block(key, k, v, "raw")
    same = {4: np.int32, 2: np.int16}[k.element_size()]
    dst = np.zeros((2, *shape), dtype=same)
    assert RawBlockReader(shape, dtype).read(key, rec, dst)
    got = torch.from_numpy(dst).view(dtype)
    dk, dv = decode_block(key, rec)
    assert torch.equal(bits(got[0]), bits(dk)) and torch.equal(bits(got[1]), bits(dv))  # bit-exact, NaN included


def _reader_case(reader_cls, codec: str):
    """A reader of shape (2, 8, 4) fp32, an intact record of ``codec`` it accepts, and its inputs."""
    shape = (2, 8, 4)
    k, v = torch.randn(shape), torch.randn(shape)
    key = b"a" * 18
    reader = reader_cls(shape, torch.float32)
    dst = np.zeros((2, *shape), dtype=np.int32)
    rec = encode_block(key, k, v, codec)
    assert reader.read(key, rec, dst)
    return shape, k, v, key, reader, dst, rec


def _assert_flips_declined(reader, key: bytes, rec: bytes, dst, offsets) -> None:
    """A bit flipped at any of ``offsets``: declined, and ``decode_block`` names the damage."""
    for i in offsets:
        bad = bytearray(rec)
        bad[i] ^= 0x10
        assert not reader.read(key, bytes(bad), dst), i
        with pytest.raises(CorruptBlockError, match="layer 1, block 2"):
            decode_block(key, bytes(bad), session="s", layer=1, block=2)


def test_raw_block_reader_declines_what_it_cannot_vouch_for():
    """Anything but an intact raw full block of the reader's shape and dtype is declined, so the
    caller's ``decode_block`` names the problem; nothing declined is ever trusted."""
    shape, k, v, key, reader, dst, rec = _reader_case(RawBlockReader, "raw")
    _assert_flips_declined(reader, key, rec, dst, (0, 5, HEADER_SIZE - 1, HEADER_SIZE, len(rec) - 1))
    assert not reader.read(b"b" * 18, rec, dst)                               # stored under another key
    assert not reader.read(key, rec[:-1], dst)                                 # truncated
    assert not reader.read(key, encode_block(key, k, v, "zstd"), dst)         # another codec
    assert not reader.read(key, encode_block(key, k[:, :5], v[:, :5], "raw"), dst)   # partial block
    assert not reader.read(key, encode_block(key, k.half(), v.half(), "raw"), dst)   # another dtype


# ------------------------------------------------------------------ ZstdBlockReader, SlotReader

def _special_kv(shape, dtype, gen):
    """Arbitrary bit patterns, plus a NaN, a -0.0 and an inf at fixed places."""
    k, v = random_bits(shape, dtype, gen), random_bits(shape, dtype, gen)
    k[0, 0, 0], v[1, 2, 3], k[2, 1, 0] = float("nan"), -0.0, float("-inf")
    return k, v


@pytest.mark.parametrize("codec", ["zstd", "zstd:5", "zstd:-3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_zstd_block_reader_matches_decode_block_bit_for_bit(dtype, codec):
    shape = (3, 16, 8)
    k, v = _special_kv(shape, dtype, torch.Generator().manual_seed(31))
    key = b"z" * 18
    rec = encode_block(key, k, v, codec)
    same = {4: np.int32, 2: np.int16}[k.element_size()]
    for reader in (ZstdBlockReader(shape, dtype), SlotReader(shape, dtype)):
        dst = np.zeros((2, *shape), dtype=same)
        assert reader.read(key, rec, dst)
        got = torch.from_numpy(dst).view(dtype)
        dk, dv = decode_block(key, rec)
        assert torch.equal(bits(got[0]), bits(dk)) and torch.equal(bits(got[1]), bits(dv))
        assert torch.equal(bits(got[0]), bits(k)) and torch.equal(bits(got[1]), bits(v))


def test_zstd_block_reader_writes_into_strided_slots():
    """The destination is a slot of a pool ``[2, kv_heads, slots, tokens, dim]``: K and V of one
    slot are not contiguous; nothing outside the slot is touched."""
    shape = (2, 8, 4)
    k, v = _special_kv((3, 8, 4), torch.float32, torch.Generator().manual_seed(32))
    k, v = k[:2], v[:2]
    key = b"s" * 18
    pool = torch.zeros(2, 2, 5, 8, 4)
    slots = pool.view(torch.int32).numpy().transpose(2, 0, 1, 3, 4)
    assert ZstdBlockReader(shape, torch.float32).read(key, encode_block(key, k, v, "zstd"), slots[3])
    assert torch.equal(bits(pool[0, :, 3]), bits(k)) and torch.equal(bits(pool[1, :, 3]), bits(v))
    assert not pool[:, :, [0, 1, 2, 4]].view(torch.int32).any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_a_run_of_blocks_decodes_together_into_adjacent_strided_slots(dtype):
    """``SlotReader.planes`` then ``interleave_many`` over slots 1..4 of a head-major pool: each
    slot holds its block bit for bit (NaN, -0.0, inf included), as a one-block read gives it,
    and the slots outside the run are untouched."""
    from tierstore.codec.shuffle import interleave_many
    shape = (3, 16, 8)
    gen = torch.Generator().manual_seed(33)
    blocks = [_special_kv(shape, dtype, gen) for _ in range(4)]
    reader = SlotReader(shape, dtype)
    recs = [(bytes([65 + i]) * 18, encode_block(bytes([65 + i]) * 18, k, v, "zstd")) for i, (k, v) in enumerate(blocks)]
    planes = [reader.planes(key, rec) for key, rec in recs]
    assert all(p is not None and len(p) == torch.empty(0, dtype=dtype).element_size() for p in planes)
    pool = torch.zeros(2, 3, 6, 16, 8, dtype=dtype)
    same = {4: torch.int32, 2: torch.int16}[pool.element_size()]
    slots = pool.view(same).numpy().transpose(2, 0, 1, 3, 4)
    interleave_many(planes, slots[1:5])
    for i, (k, v) in enumerate(blocks):
        assert torch.equal(bits(pool[0, :, 1 + i]), bits(k)) and torch.equal(bits(pool[1, :, 1 + i]), bits(v)), i
    one = torch.zeros_like(pool)
    assert reader.read(*recs[2], one.view(same).numpy().transpose(2, 0, 1, 3, 4)[3])
    assert torch.equal(bits(one[:, :, 3]), bits(pool[:, :, 3]))
    assert not pool[:, :, [0, 5]].view(same).any()
    assert reader.planes(recs[0][0], encode_block(recs[0][0], *blocks[0], "raw")) is None   # raw: read() takes it
    assert reader.planes(recs[1][0], recs[0][1]) is None                                    # another key's record


def test_zstd_block_reader_declines_what_it_cannot_vouch_for():
    """Damage anywhere (header, frame table, frames), another key, a length off by one, a
    hostile but checksummed header or frame: declined, and ``decode_block`` raises the located
    error for each damaged record. Other codecs, shapes, dtypes and partial blocks: declined."""
    import zstandard
    shape, k, v, key, reader, dst, rec = _reader_case(ZstdBlockReader, "zstd")
    _assert_flips_declined(reader, key, rec, dst, (0, 6, 7, 10, 12, 33, HEADER_SIZE - 1, HEADER_SIZE,
                                                   HEADER_SIZE + 17, HEADER_SIZE + 40, len(rec) - 1))
    hostile = []
    lvl = bytearray(rec)
    lvl[7] = 50                                                                 # no zstd level, checksum valid
    hostile.append(reseal(key, lvl))
    table = bytearray(rec)
    struct.pack_into("<I", table, HEADER_SIZE, struct.unpack_from("<I", table, HEADER_SIZE)[0] + 1)
    hostile.append(reseal(key, table))                                          # frame table does not fill the payload
    frames = bytearray(rec)                                                     # a frame declaring another size
    lens = struct.unpack_from("<4I", frames, HEADER_SIZE)
    other = zstandard.ZstdCompressor(write_content_size=True).compress(bytes(2 * 64 + 1))   # 129 bytes, not 128
    first = HEADER_SIZE + 16
    body = bytes(frames[:first]) + other + bytes(frames[first + lens[0]:])
    frames = bytearray(body)
    struct.pack_into("<QI", frames, 32, len(frames) - HEADER_SIZE, len(other))
    hostile.append(reseal(key, frames))
    for h in hostile:
        assert not reader.read(key, h, dst)
        with pytest.raises(CorruptBlockError, match="layer 1, block 2"):
            decode_block(key, h, session="s", layer=1, block=2)
    assert not reader.read(b"b" * 18, rec, dst)                                 # stored under another key
    assert not reader.read(key, rec[:-1], dst)                                  # truncated
    assert not reader.read(key, rec + b"\0", dst)                               # trailing byte
    assert not reader.read(key, encode_block(key, k, v, "raw"), dst)            # another codec
    assert not reader.read(key, encode_block(key, k, v, "int8+zstd"), dst)
    assert not reader.read(key, encode_block(key, k[:, :5], v[:, :5], "zstd"), dst)   # partial block
    assert not reader.read(key, encode_block(key, k.half(), v.half(), "zstd"), dst)   # another dtype
    assert not reader.read(key, rec[:HEADER_SIZE + 3], dst)                     # shorter than its frame table
    assert not reader.read(key, b"", dst)


def test_slot_reader_takes_raw_and_zstd_full_blocks_and_declines_the_rest():
    shape = (2, 8, 4)
    k, v = torch.randn(shape), torch.randn(shape)
    key = b"c" * 18
    reader = SlotReader(shape, torch.float32)
    for codec in ("raw", "zstd", "zstd:9"):
        dst = np.zeros((2, *shape), dtype=np.int32)
        assert reader.read(key, encode_block(key, k, v, codec), dst), codec
        assert torch.equal(bits(torch.from_numpy(dst).view(torch.float32)), bits(torch.stack([k, v])))
    for codec in ("int8", "int4", "int4+zstd"):
        assert not reader.read(key, encode_block(key, k, v, codec), np.zeros((2, *shape), dtype=np.int32)), codec
    assert not reader.read(key, b"TSK", np.zeros((2, *shape), dtype=np.int32))


def test_int4_blocks_of_two_group_sizes_are_never_shared(store_factory):
    """Content identity covers the int4 group: a g16 session over the same tokens as a g32 one
    gets its own blocks (it used to reuse the g32 blocks and read back their larger error)."""
    import torch

    from support.kv import random_kv
    from tierstore.layout import KVLayout

    st = store_factory(block_tokens=64)
    lay = KVLayout(num_layers=2, kv_heads=2, head_dim=64, block_tokens=64, dtype=torch.float32)
    kv = random_kv(lay, 64, 3)
    errs = {}
    for codec in ("int4", "int4:g16", "int4:g8"):
        st.put_session(codec.replace(":", "-"), layout=lay, kv=kv, token_ids=range(64), fingerprint="fp", codec=codec)
        _, got = st.load_session(codec.replace(":", "-"))
        errs[codec] = float((got[0][1] - kv[0][1]).norm() / kv[0][1].norm())  # V: groups along channels
    chains = [set(st.session(n).chains()) for n in ("int4", "int4-g16", "int4-g8")]
    assert not (chains[0] & chains[1]) and not (chains[1] & chains[2])
    assert errs["int4:g8"] < errs["int4:g16"] < errs["int4"]
    from tierstore.chain import root_hash
    assert st.session("int4").root == root_hash("fp", lay, "int4")   # the default group keeps its old identity

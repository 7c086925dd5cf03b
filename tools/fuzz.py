"""Fuzz targets for the two parsers that read bytes from outside: the block record decoder and
the session import parser. ``tests/test_hostile.py`` runs them briefly (hypothesis, a few dozen
examples each); run them longer on demand::

    python -m tierstore.tools.fuzz --examples 20000            # both targets
    TIERSTORE_FUZZ_EXAMPLES=20000 pytest tests/test_hostile.py -k fuzz

The contract each target checks:

* ``decode_block(key, data)`` raises only ``CorruptBlockError`` or ``FormatVersionError``; when
  it returns K/V, ``data`` is byte for byte a record sealed under ``key`` (the checksum holds,
  so a mutation that decodes is the identity), never KV from damaged bytes.
* ``read_export(path)`` raises only ``ImportFormatError`` or ``FormatVersionError``; when it
  returns, the tensors are exactly the exported ones (their checksum holds). ``import_session``
  of a file ``read_export`` refuses changes nothing in the store.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import torch

from ..codec import decode_block, encode_block, verify_record
from ..errors import CorruptBlockError, FormatVersionError, ImportFormatError, TierstoreError

KEY = bytes(range(16)) + b"\x00\x01"
CODECS = ("raw", "zstd", "int8", "int8+zstd", "int4", "int4+zstd")


def sample_records() -> list[tuple[bytes, bytes]]:
    """(key, valid record) for each codec and dtype, small shapes."""
    g = torch.Generator().manual_seed(0)
    out = []
    for i, codec in enumerate(CODECS):
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            k = torch.randn(2, 3 + i, 8, generator=g).to(dtype)
            v = torch.randn(2, 3 + i, 8, generator=g).to(dtype)
            out.append((KEY, encode_block(KEY, k, v, codec)))
    return out


def mutate(data: bytes, edits: list[tuple[int, int, int]]) -> bytes:
    """Apply edits (op, position, value): 0 xor a byte, 1 set a byte, 2 truncate, 3 insert a byte,
    4 delete a byte, 5 write a little-endian u32 (header fields: lengths, shapes)."""
    b = bytearray(data)
    for op, pos, val in edits:
        if not b and op != 3:
            continue
        p = pos % (len(b) + (op == 3)) if b or op == 3 else 0
        if op == 0:
            b[p] ^= (val % 255) + 1
        elif op == 1:
            b[p] = val % 256
        elif op == 2:
            del b[p:]
        elif op == 3:
            b.insert(p, val % 256)
        elif op == 4:
            del b[p]
        else:
            b[p:p + 4] = (val % (1 << 32)).to_bytes(4, "little")
    return bytes(b)


def check_decode(key: bytes, data: bytes, original: bytes | None = None) -> str:
    """The decoder's contract on one input; returns "refused" or "decoded"."""
    try:
        k, v = decode_block(key, data)
    except (CorruptBlockError, FormatVersionError):
        return "refused"
    verify_record(key, data)  # a record that decodes passes its checksum ...
    if original is not None:
        assert data == original, "a mutated record decoded: checksum collision?"  # ... and is unchanged
    assert k.shape == v.shape and k.dim() == 3
    return "decoded"


def sample_export(path: str) -> bytes:
    """Write a small valid export file at ``path`` (via a temporary store); returns its bytes."""
    import tempfile

    import tierstore
    from tierstore import KVLayout

    from ..maintenance.exchange import export_session

    lay = KVLayout(num_layers=2, kv_heads=2, head_dim=4, block_tokens=4, dtype=torch.float32)
    g = torch.Generator().manual_seed(1)
    kv = [(torch.randn(2, 6, 4, generator=g), torch.randn(2, 6, 4, generator=g)) for _ in range(2)]
    with tempfile.TemporaryDirectory() as d, tierstore.open(os.path.join(d, "kv")) as st:
        st.put_session("src", layout=lay, kv=kv, token_ids=np.arange(6) + 3, fingerprint="fp",
                       last_logits=np.linspace(0, 1, 5, dtype=np.float32))
        export_session(st, "src", path)
    with open(path, "rb") as f:
        return f.read()


def check_import(path: str, original_tensors: dict | None = None, store=None) -> str:
    """The import parser's contract on one file; with ``store``, a refused file changes nothing."""
    from ..maintenance.exchange import import_session, read_export

    try:
        _, tensors = read_export(path)
    except (ImportFormatError, FormatVersionError):
        if store is not None:
            before = store.cold.snapshot()
            try:
                import_session(store, path, "imported", overwrite=True)
                raise AssertionError("import_session took a file read_export refused")
            except (ImportFormatError, FormatVersionError):
                pass
            assert store.cold.snapshot() == before, "a refused import changed the store"
        return "refused"
    if original_tensors is not None:
        assert set(tensors) == set(original_tensors)
        for name, t in tensors.items():
            assert t.dtype == original_tensors[name].dtype and torch.equal(t, original_tensors[name]), name
    if store is not None:
        try:
            import_session(store, path, "imported", overwrite=True)
        except TierstoreError:
            pass  # e.g. metadata that names an impossible session: refused, typed
    return "accepted"



# -- on demand ---------------------------------------------------------------------------------


def run(examples: int, targets: tuple[str, ...] = ("decode", "import"), seed: int | None = None) -> dict:
    """Run the targets under hypothesis with ``examples`` examples each; returns outcome counts."""
    import tempfile

    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    cfg = settings(max_examples=examples, deadline=None, database=None, derandomize=seed is None,
                   suppress_health_check=list(HealthCheck))
    edits = st.lists(st.tuples(st.integers(0, 5), st.integers(0, 1 << 20), st.integers(0, 1 << 33)),
                     min_size=1, max_size=4)
    counts: dict[str, int] = {}

    def note(target: str, outcome: str) -> None:
        counts[f"{target}:{outcome}"] = counts.get(f"{target}:{outcome}", 0) + 1

    if "decode" in targets:
        records = sample_records()

        @cfg
        @given(st.binary(max_size=512))
        def arbitrary(data):
            note("decode-arbitrary", check_decode(KEY, data))

        @cfg
        @given(st.sampled_from(records), edits)
        def mutated(rec, ed):
            key, data = rec
            note("decode-mutated", check_decode(key, mutate(data, ed), data))

        arbitrary()
        mutated()
    if "import" in targets:
        import tierstore

        from ..maintenance.exchange import read_export

        with tempfile.TemporaryDirectory() as d:
            src = os.path.join(d, "src.safetensors")
            data = sample_export(src)
            _, tensors = read_export(src)
            with tierstore.open(os.path.join(d, "kv")) as store:
                @cfg
                @given(edits)
                def imported(ed):
                    p = os.path.join(d, "m.safetensors")
                    with open(p, "wb") as f:
                        f.write(mutate(data, ed))
                    note("import", check_import(p, tensors, store))

                imported()
    return counts


def main(argv: list[str] | None = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description="Fuzz the block decoder and the import parser.")
    ap.add_argument("--examples", type=int, default=int(os.environ.get("TIERSTORE_FUZZ_EXAMPLES", "5000")))
    ap.add_argument("--target", choices=["decode", "import", "all"], default="all")
    a = ap.parse_args(argv)
    targets = ("decode", "import") if a.target == "all" else (a.target,)
    print(run(a.examples, targets))


if __name__ == "__main__":
    main(sys.argv[1:])

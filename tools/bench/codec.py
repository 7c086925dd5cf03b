"""``tierstore bench codec``: compression ratio, speed and error of every block codec on real KV.

Prefills SmolLM2-135M-Instruct on documentation prose, cuts each layer's KV into blocks, and
for each codec x dtype reports the ratio (raw bytes / record bytes, header included), encode
and decode MB/s on one thread (raw-bytes basis; decode = record -> tensor, checksum included)
and the relative L2 error of K and V. A second table shows the lossless zstd ratio against the
block size, a third against the zstd level. The measuring functions take any KV, so tests can
run them on small synthetic data; the click command only loads the model and renders.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence

import click
import torch

from tierstore.codec import CodecConfig, decode_block, encode_block
from tierstore.layout import dtype_from_name, dtype_name

# One layer's KV: (K, V), each [kv_heads, tokens, head_dim].
LayerKV = tuple[torch.Tensor, torch.Tensor]

CODECS = ["raw", "zstd", "int8", "int8+zstd", "int4", "int4+zstd"]


def cut_blocks(kv: Sequence[LayerKV], block_tokens: int, dtype: torch.dtype) -> list[LayerKV]:
    """Every full block of every layer, cast to ``dtype``, contiguous."""
    out = []
    for k, v in kv:
        for s in range(0, k.shape[1] - block_tokens + 1, block_tokens):
            out.append((k[:, s:s + block_tokens].to(dtype).contiguous(),
                        v[:, s:s + block_tokens].to(dtype).contiguous()))
    return out


def _best_time(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def measure_codec(blocks: Sequence[LayerKV], codec: CodecConfig | str, repeat: int = 3) -> dict:
    """Ratio, one-thread encode/decode MB/s (raw basis; best of ``repeat``) and K/V relative L2 error."""
    codec = CodecConfig.parse(codec)
    keys = [b"bench-%08d" % i for i in range(len(blocks))]
    raw = sum(2 * k.numel() * k.element_size() for k, _ in blocks)
    records: list[bytes] = []

    def encode() -> None:
        records[:] = [encode_block(key, k, v, codec) for key, (k, v) in zip(keys, blocks)]

    def decode() -> None:
        for key, rec in zip(keys, records):
            decode_block(key, rec)

    t_enc = _best_time(encode, repeat)
    t_dec = _best_time(decode, repeat)
    err = {"k": [0.0, 0.0], "v": [0.0, 0.0]}          # squared error, squared norm
    if not codec.lossless:
        for key, rec, (k, v) in zip(keys, records, blocks):
            dk, dv = decode_block(key, rec)
            for name, got, want in (("k", dk, k), ("v", dv, v)):
                err[name][0] += (got.float() - want.float()).square().sum().item()
                err[name][1] += want.float().square().sum().item()
    rel = {n: (e / max(s, 1e-30)) ** 0.5 for n, (e, s) in err.items()}
    return {"codec": codec.spec, "dtype": dtype_name(blocks[0][0].dtype), "blocks": len(blocks),
            "raw_bytes": raw, "record_bytes": sum(map(len, records)),
            "ratio": raw / sum(map(len, records)), "encode_mb_s": raw / t_enc / 1e6,
            "decode_mb_s": raw / t_dec / 1e6, "k_rel_err": rel["k"], "v_rel_err": rel["v"]}


def measure_codecs(kv: Sequence[LayerKV], *, block_tokens: int = 64,
                   dtypes: Sequence[torch.dtype] = (torch.bfloat16, torch.float16, torch.float32),
                   codecs: Sequence[str] = CODECS, repeat: int = 3) -> list[dict]:
    """One row per dtype x codec over all full ``block_tokens`` blocks of ``kv``."""
    rows = []
    for dtype in dtypes:
        blocks = cut_blocks(kv, block_tokens, dtype)
        rows.extend(measure_codec(blocks, c, repeat) for c in codecs)
    return rows


def zstd_ratio_by(kv: Sequence[LayerKV], *, block_sizes: Sequence[int], levels: Sequence[int],
                  dtypes: Sequence[torch.dtype], default_block: int = 64) -> list[dict]:
    """Lossless zstd ratio (and encode MB/s) against block size (at the default level) and
    against level (at ``default_block`` tokens)."""
    rows = []
    default_level = CodecConfig("zstd").level
    points = [(b, default_level) for b in block_sizes] + [(default_block, lv) for lv in levels]
    for dtype in dtypes:
        for block_tokens, level in points:
            blocks = cut_blocks(kv, block_tokens, dtype)
            if blocks:
                r = measure_codec(blocks, CodecConfig("zstd", level=level), repeat=1)
                rows.append({"dtype": r["dtype"], "block_tokens": block_tokens, "level": level,
                             "ratio": r["ratio"], "encode_mb_s": r["encode_mb_s"], "decode_mb_s": r["decode_mb_s"]})
    return rows


def prefill_kv(model, tokenizer, tokens: int, chunk: int = 1024) -> list[LayerKV]:
    """KV of ``tokens`` tokens of documentation prose, one (K, V) per layer, batch row 0."""
    from transformers import DynamicCache

    from tierstore.adapters.models import long_text

    ids = tokenizer(long_text(tokens * 8), return_tensors="pt").input_ids[:, :tokens]
    cache = DynamicCache()
    with torch.no_grad():
        for s in range(0, ids.shape[1], chunk):
            model(input_ids=ids[:, s:s + chunk], cache=cache, use_cache=True)
    return [(layer.keys[0], layer.values[0]) for layer in cache.layers]


def _render(rows: list[dict], zrows: list[dict], meta: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    t = Table(title=f"codecs on {meta['model']} KV, {meta['tokens']} tokens, {meta['block_tokens']}-token "
                    f"blocks ({meta['threads']} torch thread)")
    for col in ("dtype", "codec", "ratio", "encode MB/s", "decode MB/s", "K rel err", "V rel err"):
        t.add_column(col, justify="left" if col in ("dtype", "codec") else "right")
    for r in rows:
        t.add_row(r["dtype"], r["codec"], f"{r['ratio']:.3f}", f"{r['encode_mb_s']:.0f}", f"{r['decode_mb_s']:.0f}",
                  f"{r['k_rel_err']:.2%}", f"{r['v_rel_err']:.2%}")
    console.print(t)
    z = Table(title="lossless zstd: ratio against block size and level")
    for col in ("dtype", "block tokens", "level", "ratio", "encode MB/s", "decode MB/s"):
        z.add_column(col, justify="left" if col == "dtype" else "right")
    for r in zrows:
        z.add_row(r["dtype"], str(r["block_tokens"]), str(r["level"]), f"{r['ratio']:.3f}",
                  f"{r['encode_mb_s']:.0f}", f"{r['decode_mb_s']:.0f}")
    console.print(z)


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {text!r}") from None


@click.command("codec")
@click.option("--tokens", default=8192, show_default=True, help="Tokens of prose to prefill.")
@click.option("--blocks", "block_sizes", default="16,32,64,128,256,1024", show_default=True,
              help="Block sizes (tokens) for the zstd ratio table.")
@click.option("--block-tokens", default=64, show_default=True, help="Block size of the main table.")
@click.option("--dtype", "dtypes", default="bfloat16,float16,float32", show_default=True)
@click.option("--codecs", default=",".join(CODECS), show_default=True, help="Codec specs, comma-separated.")
@click.option("--levels", default="-1,1,3,5,9", show_default=True, help="zstd levels for the level table.")
@click.option("--repeat", default=3, show_default=True, help="Timing repetitions (best is kept).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of tables.")
def main(tokens: int, block_sizes: str, block_tokens: int, dtypes: str, codecs: str, levels: str,
         repeat: int, as_json: bool) -> None:
    """Measure every block codec on SmolLM2-135M KV (one thread)."""
    from tierstore.adapters.models import load_smollm2

    try:
        dts = [dtype_from_name(d.strip()) for d in dtypes.split(",") if d.strip()]
        specs = [CodecConfig.parse(c.strip()).spec for c in codecs.split(",") if c.strip()]
    except ValueError as e:
        raise click.BadParameter(str(e)) from None
    torch.set_num_threads(1)
    model, tokenizer = load_smollm2(torch.float32)
    kv = prefill_kv(model, tokenizer, tokens)
    del model
    rows = measure_codecs(kv, block_tokens=block_tokens, dtypes=dts, codecs=specs, repeat=repeat)
    zrows = zstd_ratio_by(kv, block_sizes=_ints(block_sizes), levels=_ints(levels), dtypes=dts,
                          default_block=block_tokens)
    meta = {"model": "SmolLM2-135M-Instruct", "tokens": int(kv[0][0].shape[1]), "block_tokens": block_tokens,
            "threads": torch.get_num_threads(), "prefill_dtype": "float32"}
    if as_json:
        click.echo(json.dumps({"meta": meta, "codecs": rows, "zstd": zrows}, indent=1))
    else:
        _render(rows, zrows, meta)


if __name__ == "__main__":
    main()

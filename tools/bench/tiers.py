"""``tierstore bench tiers``: recall throughput through the TierManager against physical limits.

For each tier pair (warm -> hot, cold -> warm with the raw and the zstd codec, cold -> hot) the
manager recalls ``--mib`` MiB of SmolLM2-shaped KV (30 layers, 3 KV heads, head_dim 64, fp16,
random data) in sequential (key) order and in random order, and the same bytes are then moved by
the cheapest code that does the same physical work, measured in the same run:

* warm -> hot:        one ``copy_`` per block into a preallocated buffer (memcpy; on CUDA, H2D)
* cold -> warm, raw:  LMDB read (one read transaction) + ``np.frombuffer`` copy into a buffer
* cold -> warm, zstd: LMDB read + zstd decode of the record's frames (no unshuffle, no checksum)
* cold -> hot:        LMDB read + one copy straight into the destination (the manager decodes
                      into warm and copies to hot: two copies)

Throughput is raw KV bytes per second (MB = 10^6 B), so every row is comparable. Prefetch
overlap: per layer, a matmul of realistic size (an MLP of SmolLM2 over a 128-token chunk) is
timed against recalling that layer's blocks from cold: "compute then fetch" (acquire, then
compute) vs "compute + prefetch" (prefetch layer l+1, then acquire and compute layer l). The
ratio of the two, and the ideal ``(compute + fetch) / max(compute, fetch)``, are reported.

Nothing registers globally: ``tierstore.tools.cli`` finds ``tiers`` in ``tools/bench/`` for its ``bench`` group.
"""

from __future__ import annotations

import hashlib
import json
import random
import tempfile
import time
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass

import click
import numpy as np
import torch

import tierstore
from tierstore.codec import HEADER_SIZE, read_header
from tierstore.codec.shuffle import decompress_frame, split_frames
from tierstore.layout import KVLayout
from tierstore.tiers.schema import block_key

# SmolLM2-135M: 30 layers, 3 KV heads of 64 channels; hidden 576, MLP 1536.
LAYERS, KV_HEADS, HEAD_DIM = 30, 3, 64
HIDDEN, MLP = 576, 1536
COMPUTE_TOKENS = 128
BATCH = 16          # blocks per acquire (a streamed attention chunk)

Order = list[tuple[int, int]]   # (layer, block index) in the order they are moved


@dataclass
class Data:
    layout: KVLayout
    per_layer: int
    k: list[torch.Tensor]       # per layer [kv_heads, per_layer * block_tokens, head_dim]
    v: list[torch.Tensor]

    @property
    def nblocks(self) -> int:
        return self.per_layer * self.layout.num_layers

    @property
    def nbytes(self) -> int:
        return self.nblocks * self.layout.block_bytes

    def key(self, layer: int, index: int) -> bytes:
        return block_key(hashlib.blake2b(b"bench-tiers/%d" % index, digest_size=16).digest(), layer)


def make_data(mib: int, block_tokens: int, seed: int = 0) -> Data:
    layout = KVLayout(num_layers=LAYERS, kv_heads=KV_HEADS, head_dim=HEAD_DIM, block_tokens=block_tokens,
                      dtype=torch.float16)
    per_layer = max(2, (mib << 20) // layout.block_bytes // LAYERS)
    g = torch.Generator().manual_seed(seed)
    shape = (KV_HEADS, per_layer * block_tokens, HEAD_DIM)
    k = [torch.randn(shape, generator=g).to(torch.float16) for _ in range(LAYERS)]
    v = [torch.randn(shape, generator=g).to(torch.float16) for _ in range(LAYERS)]
    return Data(layout, per_layer, k, v)


def orders(data: Data, seed: int = 1) -> dict[str, Order]:
    seq = [(layer, i) for layer in range(data.layout.num_layers) for i in range(data.per_layer)]
    rnd = list(seq)
    random.Random(seed).shuffle(rnd)
    return {"sequential": seq, "random": rnd}


def batches(order: Order, size: int = BATCH) -> list[tuple[int, list[int]]]:
    """Acquire batches (one layer each) in the order's sense: consecutive runs for the sequential
    order; for the random order, random blocks of one layer per batch, batches shuffled."""
    by_layer: dict[int, list[int]] = {}
    for layer, i in order:
        by_layer.setdefault(layer, []).append(i)
    out = [(layer, ids[s:s + size]) for layer, ids in by_layer.items() for s in range(0, len(ids), size)]
    if order != sorted(order):
        random.Random(2).shuffle(out)
    return out


def _mbs(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e6 if seconds > 0 else float("inf")


# -- the store ------------------------------------------------------------------------------------

def write_store(path: str, codec: str, data: Data):
    """A store holding every block under ``data.key``; budgets fit everything (no pressure: this
    measures moving bytes, not eviction). Returns the store and the write-back MB/s."""
    lay = data.layout
    margin = 4 * BATCH * lay.block_bytes
    store = tierstore.open(path, hot=data.nbytes + margin, warm=data.nbytes + margin, codec=codec)
    m = store.manager
    seq = m.open_sequence("bench-writer", lay, "cpu")
    bt = lay.block_tokens
    t0 = time.perf_counter()
    for s in range(0, data.per_layer, 4):
        e = min(s + 4, data.per_layer)
        for layer in range(lay.num_layers):
            m.append(seq, layer, data.k[layer][:, s * bt:e * bt], data.v[layer][:, s * bt:e * bt])
        m.set_keys(seq, {i: [data.key(layer, i) for layer in range(lay.num_layers)] for i in range(s, e)})
    m.flush(seq)
    write_s = time.perf_counter() - t0
    m.close_sequence(seq)
    return store, _mbs(data.nbytes, write_s)


def reader(store, data: Data, name: str):
    """A fresh sequence that knows every block as durable in cold only (a resume)."""
    m = store.manager
    seq = m.open_sequence(name, data.layout, "cpu")
    for layer in range(data.layout.num_layers):
        for i in range(data.per_layer):
            m.adopt(seq, layer, i, data.layout.block_tokens, data.key(layer, i), None)
    return seq


# -- through the manager ------------------------------------------------------------------------------

def mgr_cold_to_warm(m, seq, order: Order) -> float:
    """prefetch(hot=False) of every block in ``order``, until all have landed in warm."""
    t0 = time.perf_counter()
    for layer, ids in batches(order):
        m.prefetch(seq, layer, ids, hot=False)
    with m.lock:
        futs = [b.loading for layer in seq.layers for b in layer if b.loading is not None]
    wait_futures(futs)
    dt = time.perf_counter() - t0
    with m.lock:
        assert all(b.warm is not None for layer in seq.layers for b in layer), "a prefetch was skipped"
    return dt


def mgr_acquire(m, seq, order: Order) -> float:
    """acquire (transient) every block in ``order``, in batches of one layer."""
    t0 = time.perf_counter()
    for layer, ids in batches(order):
        with m.acquire(seq, layer, ids, transient=True):
            pass
    if seq.hot.is_cuda:
        torch.cuda.synchronize(seq.device)
    return time.perf_counter() - t0


# -- physical limits --------------------------------------------------------------------------------

def limit_memcpy(src_k: torch.Tensor, src_v: torch.Tensor, slots: list[int]) -> float:
    """One copy_ per block (K and V) from pool-shaped ``[H, slots, bt, D]`` tensors into a
    preallocated buffer of the same shape, slots visited in the given order."""
    dk, dv = torch.zeros_like(src_k), torch.zeros_like(src_v)     # touched: no page faults timed
    t0 = time.perf_counter()
    for s in slots:
        dk[:, s].copy_(src_k[:, s])
        dv[:, s].copy_(src_v[:, s])
    return time.perf_counter() - t0


def limit_bulk_memcpy(src_k: torch.Tensor) -> float:
    """One copy_ of a whole buffer: the memory bandwidth ceiling."""
    dst = torch.zeros_like(src_k)
    t0 = time.perf_counter()
    dst.copy_(src_k)
    return (time.perf_counter() - t0) * 2          # K and V


def limit_lmdb_copy(store, data: Data, order: Order) -> float:
    """LMDB read of each raw record + one frombuffer copy into a preallocated slot buffer."""
    lay = data.layout
    n = lay.kv_heads * lay.block_tokens * lay.head_dim
    shape = (lay.kv_heads, data.nblocks, lay.block_tokens, lay.head_dim)
    dk = torch.zeros(shape, dtype=torch.int16).numpy()
    dv = torch.zeros(shape, dtype=torch.int16).numpy()
    keys = [data.key(layer, i) for layer, i in order]
    t0 = time.perf_counter()
    with store.cold.read(buffers=True) as txn:
        for slot, buf in enumerate(store.cold.get_many("blocks", keys, txn=txn)):
            src = np.frombuffer(buf, dtype=np.int16, count=2 * n, offset=HEADER_SIZE)
            np.copyto(dk[:, slot], src[:n].reshape(lay.kv_heads, lay.block_tokens, lay.head_dim))
            np.copyto(dv[:, slot], src[n:].reshape(lay.kv_heads, lay.block_tokens, lay.head_dim))
    return time.perf_counter() - t0


def limit_lmdb_zstd(store, data: Data, order: Order) -> float:
    """LMDB read of each zstd record + zstd decode of its byte-plane frames (bytes out, no
    unshuffle into a tensor, no checksum)."""
    lay = data.layout
    n = 2 * lay.kv_heads * lay.block_tokens * lay.head_dim
    keys = [data.key(layer, i) for layer, i in order]
    t0 = time.perf_counter()
    with store.cold.read(buffers=True) as txn:
        for buf in store.cold.get_many("blocks", keys, txn=txn):
            mv = memoryview(buf)
            hdr = read_header(mv)
            for frame in split_frames(mv[HEADER_SIZE:], hdr.itemsize):
                decompress_frame(frame, n)
    return time.perf_counter() - t0


# -- prefetch overlap --------------------------------------------------------------------------------

def make_compute():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(COMPUTE_TOKENS, HIDDEN, generator=g)
    w1 = torch.randn(HIDDEN, MLP, generator=g) / HIDDEN ** 0.5
    w2 = torch.randn(MLP, HIDDEN, generator=g) / MLP ** 0.5

    def compute() -> torch.Tensor:
        return torch.nn.functional.silu(x @ w1) @ w2     # one layer's MLP over a 128-token chunk
    return compute


def overlap(store, data: Data) -> dict:
    m = store.manager
    compute = make_compute()
    layers = range(data.layout.num_layers)
    ids = list(range(data.per_layer))
    compute()
    t0 = time.perf_counter()
    for _ in layers:
        compute()
    t_compute = time.perf_counter() - t0

    def fresh(name):
        return reader(store, data, name)

    seq = fresh("ov-fetch")
    t0 = time.perf_counter()
    for layer in layers:
        with m.acquire(seq, layer, ids, transient=True):
            pass
    t_fetch = time.perf_counter() - t0
    m.close_sequence(seq, flush=False)

    seq = fresh("ov-serial")
    t0 = time.perf_counter()
    for layer in layers:
        with m.acquire(seq, layer, ids, transient=True):
            compute()
    t_serial = time.perf_counter() - t0
    m.close_sequence(seq, flush=False)

    seq = fresh("ov-prefetch")
    before = m.counters.prefetch_timely, m.counters.prefetch_needed
    t0 = time.perf_counter()
    m.prefetch(seq, 0, ids)
    for layer in layers:
        if layer + 1 < data.layout.num_layers:
            m.prefetch(seq, layer + 1, ids)                # returns at once: moves while we compute
        with m.acquire(seq, layer, ids, transient=True):
            compute()
    t_overlap = time.perf_counter() - t0
    timely = m.counters.prefetch_timely - before[0], m.counters.prefetch_needed - before[1]
    m.close_sequence(seq, flush=False)
    return {"layers": data.layout.num_layers, "blocks_per_layer": data.per_layer,
            "compute_s": t_compute, "fetch_s": t_fetch, "compute_then_fetch_s": t_serial,
            "compute_plus_prefetch_s": t_overlap, "ratio": t_serial / t_overlap,
            "ideal_ratio": (t_compute + t_fetch) / max(t_compute, t_fetch),
            "prefetch_timely": timely[0], "prefetch_needed": timely[1]}


# -- the run -------------------------------------------------------------------------------------------

LIMITS = {"memcpy": "one copy_ per block into a preallocated buffer",
          "LMDB+copy": "LMDB read + np.frombuffer copy into a preallocated buffer",
          "LMDB+zstd": "LMDB read + zstd decode of the record's byte-plane frames"}


def run(mib: int = 256, block_tokens: int = 64, repeat: int = 2, workdir: str | None = None) -> dict:
    """Every measurement is the best of ``repeat`` (a fresh all-cold reader each time)."""
    data = make_data(mib, block_tokens)
    ords = orders(data)
    rows: list[dict] = []
    meta = {"layout": data.layout.to_json() | {"block_bytes": data.layout.block_bytes},
            "blocks": data.nblocks, "mib": data.nbytes / 2**20, "batch_blocks": BATCH, "repeat": repeat,
            "torch_threads": torch.get_num_threads(), "device": "cpu", "limits": LIMITS}

    def row(pair, codec, order, mgr_s, limit, limit_s):
        rows.append({"pair": pair, "codec": codec, "order": order, "manager_mb_s": _mbs(data.nbytes, mgr_s),
                     "limit": limit, "limit_mb_s": _mbs(data.nbytes, limit_s), "share_of_limit": limit_s / mgr_s})

    with tempfile.TemporaryDirectory(prefix="bench-tiers-", dir=workdir) as tmp:
        for codec in ("raw", "zstd"):
            store, write_mbs = write_store(f"{tmp}/{codec}", codec, data)
            meta[f"write_back_{codec}_mb_s"] = write_mbs
            meta[f"stored_mib_{codec}"] = store.stats().cold_used_bytes / 2**20
            m = store.manager
            limit = "LMDB+copy" if codec == "raw" else "LMDB+zstd"
            limit_fn = limit_lmdb_copy if codec == "raw" else limit_lmdb_zstd
            try:
                for oname, order in ords.items():
                    best = {"cw": float("inf"), "wh": float("inf"), "ch": float("inf")}
                    for r in range(repeat):
                        seq = reader(store, data, f"r-{oname}-{r}")
                        best["cw"] = min(best["cw"], mgr_cold_to_warm(m, seq, order))
                        if codec == "raw":
                            best["wh"] = min(best["wh"], mgr_acquire(m, seq, order))
                            slots = [seq.layers[layer][i].warm for layer, i in order]
                            best["wh_lim"] = min(best.get("wh_lim", float("inf")),
                                                 limit_memcpy(seq.warm.k, seq.warm.v, slots))
                            meta["bulk_memcpy_mb_s"] = max(meta.get("bulk_memcpy_mb_s", 0.0),
                                                           _mbs(data.nbytes, limit_bulk_memcpy(seq.warm.k)))
                        m.close_sequence(seq, flush=False)
                        seq = reader(store, data, f"h-{oname}-{r}")
                        best["ch"] = min(best["ch"], mgr_acquire(m, seq, order))
                        m.close_sequence(seq, flush=False)
                        best["lim"] = min(best.get("lim", float("inf")), limit_fn(store, data, order))
                    row("cold->warm", codec, oname, best["cw"], limit, best["lim"])
                    row("cold->hot", codec, oname, best["ch"], limit, best["lim"])
                    if codec == "raw":
                        row("warm->hot", "-", oname, best["wh"], "memcpy", best["wh_lim"])
                if codec == "raw":
                    threads = torch.get_num_threads()
                    torch.set_num_threads(1)   # leave the other core(s) to the loader threads
                    try:
                        ov = min((overlap(store, data) for _ in range(repeat)),
                                 key=lambda o: o["compute_plus_prefetch_s"])
                    finally:
                        torch.set_num_threads(threads)
            finally:
                store.close()
    order_key = {"warm->hot": 0, "cold->warm": 1, "cold->hot": 2}
    rows.sort(key=lambda r: (order_key[r["pair"]], r["codec"], r["order"] != "sequential"))
    return {"meta": meta, "recall": rows, "overlap": ov}


def render(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    meta, ov = result["meta"], result["overlap"]
    lay = meta["layout"]
    console = Console()
    t = Table(title=f"recall through the TierManager: {meta['mib']:.0f} MiB of KV, {meta['blocks']} blocks of "
                    f"{lay['block_tokens']} tok x {lay['kv_heads']} heads x {lay['head_dim']} fp16, "
                    f"{meta['batch_blocks']} blocks per acquire, best of {meta['repeat']}")
    for col in ("tiers", "codec", "order", "manager MB/s", "limit", "limit MB/s", "mgr/limit"):
        t.add_column(col, justify="right" if col in ("manager MB/s", "limit MB/s", "mgr/limit") else "left",
                     no_wrap=True)
    for r in result["recall"]:
        t.add_row(r["pair"], r["codec"], r["order"][:3], f"{r['manager_mb_s']:.0f}", r["limit"],
                  f"{r['limit_mb_s']:.0f}", f"{r['share_of_limit']:.0%}")
    console.print(t)
    for name, what in meta["limits"].items():
        console.print(f"  {name}: {what}")
    console.print(f"  bulk memcpy (one copy_ of the whole pool): {meta['bulk_memcpy_mb_s']:.0f} MB/s; write-back "
                  f"(encode + LMDB commit): raw {meta['write_back_raw_mb_s']:.0f} MB/s, "
                  f"zstd {meta['write_back_zstd_mb_s']:.0f} MB/s")
    o = Table(title=f"layer-ahead prefetch: {ov['layers']} layers x {ov['blocks_per_layer']} blocks from cold; "
                    f"compute = SmolLM2 MLP on {COMPUTE_TOKENS} tokens, 1 torch thread")
    for col in ("compute s", "fetch s", "compute then fetch s", "compute + prefetch s", "ratio", "ideal",
                "timely"):
        o.add_column(col, justify="right", no_wrap=True)
    o.add_row(f"{ov['compute_s']:.3f}", f"{ov['fetch_s']:.3f}", f"{ov['compute_then_fetch_s']:.3f}",
              f"{ov['compute_plus_prefetch_s']:.3f}", f"{ov['ratio']:.2f}x", f"{ov['ideal_ratio']:.2f}x",
              f"{ov['prefetch_timely']}/{ov['prefetch_needed']}")
    console.print(o)


@click.command("tiers")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of tables.")
@click.option("--mib", default=256, show_default=True, type=click.IntRange(1), help="MiB of KV moved per measurement.")
@click.option("--block-tokens", default=64, show_default=True, type=click.IntRange(1, 65536),
              help="Tokens per block.")
@click.option("--repeat", default=2, show_default=True, type=click.IntRange(1), help="Best of N per measurement.")
def tiers(as_json: bool, mib: int, block_tokens: int, repeat: int) -> None:
    """Recall throughput per tier pair (MB/s) against raw memcpy / LMDB / zstd limits, and prefetch overlap."""
    result = run(mib, block_tokens, repeat)
    if as_json:
        click.echo(json.dumps(result, indent=1))
    else:
        render(result)


main = tiers

if __name__ == "__main__":
    tiers()

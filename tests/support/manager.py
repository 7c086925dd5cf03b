"""Helpers of the tier manager's tests: a tiny layout, K/V makers, bookkeeping checks (budgets,
slot ownership, nothing lost), filling and adopting sequences, damaging cold records."""

from __future__ import annotations

import time

import torch

from tierstore.codec import decode_block
from tierstore.layout import KVLayout
from tierstore.manager import Block, TierManager

from support.kv import random_layer_kv, same_bits
from support.stores import key_of

LAYOUT = KVLayout(num_layers=2, kv_heads=2, head_dim=4, block_tokens=4, dtype=torch.float32)
BT = LAYOUT.block_tokens
BB = LAYOUT.block_bytes


def random_kv(gen: torch.Generator, n: int, layout: KVLayout = LAYOUT) -> tuple[torch.Tensor, torch.Tensor]:
    """K, V [kv_heads, n, head_dim] of arbitrary bit patterns (NaNs, infs, -0.0 included)."""
    return random_layer_kv(layout, n, gen, kind="bits")


def all_blocks(m: TierManager) -> list[Block]:
    return [b for s in m.sequences() for layer in s.layers for b in layer]


def wait_idle(m: TierManager, timeout: float = 20.0) -> None:
    """Wait until no load is in flight and every queued write-back is durable."""
    deadline = time.monotonic() + timeout
    while True:
        with m.lock:
            busy = [b for b in all_blocks(m) if b.loading is not None or b.queued]
        if not busy:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{len(busy)} blocks still loading/queued after {timeout}s: "
                                 f"{[b.where() for b in busy[:5]]}")
        time.sleep(0.005)


def describe(m: TierManager) -> str:
    """One line per block: where it is and why it may or may not move (for failure messages)."""
    with m.lock:
        return "\n".join(
            f"{b.seq.name} L{b.layer} #{b.index} ntok={b.ntok} hot={b.hot} warm={b.warm} durable={b.durable} "
            f"key={b.key is not None} queued={b.queued} pins={b.pins} loading={b.loading is not None} "
            f"transient={b.transient}" for b in all_blocks(m))


def check_bookkeeping(store) -> None:
    """Budgets hold (bookkeeping and real tensor bytes), slots are owned once, nothing is lost."""
    m = store.manager
    cfg = store.config
    with m.lock:
        hot_pools, warm_pools = list(m.budgets.hot.values()), list(m.budgets.warm.values())
        assert sum(p.used * p.layout.block_bytes for p in hot_pools) <= cfg.hot_bytes
        assert sum(p.k.nbytes + p.v.nbytes for p in hot_pools) <= cfg.hot_bytes
        assert sum(p.used * p.layout.block_bytes for p in warm_pools) <= cfg.warm_bytes
        assert sum(p.k.nbytes + p.v.nbytes for p in warm_pools) <= cfg.warm_bytes
        u = m.usage()
        assert u["hot_used_bytes"] <= cfg.hot_bytes and u["warm_used_bytes"] <= cfg.warm_bytes
        blocks = all_blocks(m)
        for attr, pools in (("hot", hot_pools), ("warm", warm_pools)):
            for p in pools:
                owned = [getattr(b, attr) for b in blocks if getattr(b.seq, attr) is p and getattr(b, attr) is not None]
                assert len(owned) == len(set(owned)) == p.used, attr
                # the pool knows which block sits in each slot (placement ranks victims from it)
                assert sorted(owned) == [s for s, o in enumerate(p.owner) if o is not None], attr
                assert all(getattr(p.owner[getattr(b, attr)], attr) == getattr(b, attr) for b in blocks
                           if getattr(b.seq, attr) is p and getattr(b, attr) is not None), attr
        for b in blocks:
            assert b.hot is not None or b.warm is not None or b.durable, f"lost block {b.where()}"
            assert b.pins >= 0, b.where()
            if not b.sealed:
                assert b.hot is not None, f"partial tail {b.where()} left the hot tier"


def check_cold(store, seq, model_k, model_v, keys) -> None:
    """Every keyed sealed block is durable and decodes from cold to the bytes written."""
    for (layer, index), key in keys.items():
        b = seq.layers[layer][index]
        if not b.sealed:
            continue
        assert b.key == key and b.durable, b.where()
        rec = store.cold.get("blocks", key)
        assert rec is not None, b.where()
        k, v = decode_block(key, rec, **b.where())
        s = slice(index * BT, (index + 1) * BT)
        assert same_bits(k, model_k[layer][:, s]) and same_bits(v, model_v[layer][:, s]), b.where()


def fill(m: TierManager, seq, gen, tokens: int, tag: str | None = None, chunk: int = 5):
    """Append ``tokens`` tokens to every layer in chunks; keys for full blocks when ``tag``."""
    K = [torch.empty(LAYOUT.kv_heads, 0, LAYOUT.head_dim) for _ in range(LAYOUT.num_layers)]
    V = list(K)
    for t in range(0, tokens, chunk):
        n = min(chunk, tokens - t)
        for layer in range(LAYOUT.num_layers):
            k, v = random_kv(gen, n)
            m.append(seq, layer, k, v)
            K[layer], V[layer] = torch.cat([K[layer], k], 1), torch.cat([V[layer], v], 1)
        if tag is not None:
            full = (t + n) // BT
            m.set_keys(seq, {i: [key_of(tag, i, layer) for layer in range(LAYOUT.num_layers)] for i in range(full)})
    return K, V


def adopt_all(m: TierManager, seq, tag: str, nblocks: int, layers=range(LAYOUT.num_layers)):
    for layer in layers:
        for i in range(nblocks):
            m.adopt(seq, layer, i, BT, key_of(tag, i, layer), None)


def cold_only_sequence(store, gen, nblocks=4):
    m = store.manager
    a = m.open_sequence("writer", LAYOUT, "cpu")
    K, V = fill(m, a, gen, nblocks * BT, tag="w")
    m.flush(a)
    m.close_sequence(a)
    b = m.open_sequence("reader", LAYOUT, "cpu")
    adopt_all(m, b, "w", nblocks)
    return b, K, V


def corrupt(store, key: bytes, at: int = -1) -> None:
    rec = bytearray(store.cold.get("blocks", key))
    rec[at] ^= 0x40
    store.cold.put_many("blocks", [(key, bytes(rec))])


def resumable(tmp_path, gen, nblocks=10, warm_blocks=64, codec="raw"):
    import tierstore
    st_ = tierstore.open(tmp_path / "fill", hot=4 * BB, warm=warm_blocks * BB, codec=codec)
    return (st_, *cold_only_sequence(st_, gen, nblocks))

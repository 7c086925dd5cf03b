"""K/V makers and bit-exact comparisons.

``bits`` views a float tensor as the integers of its width, so equality compares NaN payloads,
-0.0 and infinities exactly; every "bit exact" assert in the tests goes through it.
"""

from __future__ import annotations

import torch

from tierstore.layout import KVLayout

_INT = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def bits(x: torch.Tensor) -> torch.Tensor:
    """The bit pattern of ``x`` as integers of the same width (contiguous)."""
    return x.contiguous().view(_INT[x.element_size()])


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same shape, same dtype, same bits (on any device)."""
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(bits(a.cpu()), bits(b.cpu()))


def assert_kv_equal(got, want) -> None:
    """Two per-layer ``[(K, V)]`` lists are equal bit for bit: as many layers, each tensor of the
    same shape and dtype."""
    assert len(got) == len(want), (len(got), len(want))
    for layer, ((gk, gv), (wk, wv)) in enumerate(zip(got, want)):
        for name, g, w in (("K", gk, wk), ("V", gv, wv)):
            assert g.shape == w.shape and g.dtype == w.dtype, (layer, name, g.shape, w.shape, g.dtype, w.dtype)
            assert torch.equal(bits(g), bits(w)), f"layer {layer} {name} differs"


def generator(seed: int | torch.Generator) -> torch.Generator:
    """A fresh CPU generator for an int seed; a generator is used as it is (and advanced)."""
    return seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(seed)


def random_bits(shape, dtype: torch.dtype, seed: int | torch.Generator) -> torch.Tensor:
    """Uniformly random bit patterns viewed as ``dtype``: NaNs, infs, -0.0, subnormals included."""
    g = generator(seed)
    n = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
    return torch.randint(0, 256, (n,), generator=g, dtype=torch.uint8).view(dtype).reshape(shape)


def random_layer_kv(layout: KVLayout, n: int, seed: int | torch.Generator, *,
                    kind: str = "normal") -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's K, V ``[kv_heads, n, head_dim]`` of ``layout.dtype``.

    ``kind="normal"``: standard normal values cast to the dtype (K drawn before V);
    ``kind="bits"``: arbitrary bit patterns (only a bit-exact path keeps them).
    """
    g = generator(seed)
    shape = (layout.kv_heads, n, layout.head_dim)
    if kind == "normal":
        return torch.randn(shape, generator=g).to(layout.dtype), torch.randn(shape, generator=g).to(layout.dtype)
    if kind == "bits":
        return random_bits(shape, layout.dtype, g), random_bits(shape, layout.dtype, g)
    raise ValueError(f"unknown kind {kind!r}")


def random_kv(layout: KVLayout, n: int, seed: int | torch.Generator, *,
              kind: str = "normal") -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A session's K/V: ``[(K, V)]`` for every layer of ``layout``, ``n`` tokens each, drawn in
    layer order from one generator (see ``random_layer_kv`` for ``kind``)."""
    g = generator(seed)
    return [random_layer_kv(layout, n, g, kind=kind) for _ in range(layout.num_layers)]


def prefix_kv(kv, n: int):
    """The first ``n`` tokens of every layer."""
    return [(k[:, :n], v[:, :n]) for k, v in kv]

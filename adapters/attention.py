"""The attention and mask functions registered with transformers under the name ``tierstore``.

transformers builds the mask once per forward, before any cache update, from
``get_mask_sizes`` (logical lengths). Our mask function does not materialise the
``[batch, 1, q, kv]`` mask: it returns a ``LogicalMask`` (2-D padding mask + offsets), and the
attention function cuts the few columns each chunk needs. The attention function receives the
post-RoPE query and ``module.layer_idx`` and reads K/V from the tiers (never from ``update``'s
return value), streaming every block through an online-softmax merge.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

NAME = "tierstore"
_ACTIVE = threading.local()  # (a weak reference to) the TieredCache whose update() ran last in this thread


@dataclass(frozen=True)
class LogicalMask:
    """What the mask would say, without building it.

    padding: bool [batch, kv_length] (True = real token) or None; q_offset: logical position of
    the first query; kv_length: logical keys after this forward's update.
    """

    padding: torch.Tensor | None
    q_length: int
    q_offset: int
    kv_length: int

    @property
    def shape(self) -> tuple[int, ...]:  # some callers peek at mask.shape
        b = 1 if self.padding is None else self.padding.shape[0]
        return (b, 1, self.q_length, self.kv_length)


def logical_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
                 mask_function=None, attention_mask: torch.Tensor | None = None, **kwargs) -> LogicalMask:
    if kv_offset:
        raise NotImplementedError("tierstore attention: kv_offset != 0 (sliding-window layers) is not supported")
    pad = None
    if attention_mask is not None:
        pad = attention_mask[:, :kv_length].to(torch.bool)
        if bool(pad.all()):
            pad = None
    return LogicalMask(padding=pad, q_length=int(q_length), q_offset=int(q_offset), kv_length=int(kv_length))


def tiered_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask, scaling: float | None = None, dropout: float = 0.0, **kwargs):
    """query: [batch, heads, q, head_dim] -> (out [batch, q, heads, head_dim], None)."""
    ref = getattr(_ACTIVE, "cache", None)
    cache = ref() if ref is not None else None
    if cache is None:
        raise RuntimeError("tierstore attention called without a TieredCache in this forward; "
                           "pass cache=TieredCache(...) or use another attn_implementation")
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    mask = attention_mask if isinstance(attention_mask, LogicalMask) else None
    if attention_mask is not None and mask is None:
        raise RuntimeError("tierstore attention needs its own mask function (got a materialised mask); "
                           "the model's attn_implementation must be 'tierstore'")
    out = cache._attend(module.layer_idx, query, mask, scaling)
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Idempotent: register the attention and mask functions globally under ``NAME``."""
    AttentionInterface.register(NAME, tiered_attention)
    AttentionMaskInterface.register(NAME, logical_mask)


def set_active(cache) -> None:
    """Weakly: the last active cache of a thread must not outlive its user (its slots, leases)."""
    _ACTIVE.cache = weakref.ref(cache)

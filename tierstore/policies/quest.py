"""quest (Quest): query-aware upper bound of q·k per block from the per-channel key min/max."""

from __future__ import annotations

import torch

from . import register
from .base import Policy, Summaries


def quest_bound(s: Summaries, query: torch.Tensor) -> torch.Tensor:
    """query: float [kv_heads, rows, head_dim] (query heads grouped by KV head) ->
    [n, kv_heads]: max over the group's rows of sum_d max(q_d * kmin_d, q_d * kmax_d)."""
    return box_bound(s.kmin, s.kmax, query)


def box_bound(kmin: torch.Tensor, kmax: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """The Quest bound of boxes ``kmin``/``kmax`` [n, kv_heads, head_dim] -> [n, kv_heads]
    (``query`` [kv_heads, rows, head_dim], or [kv_heads, rows, n, head_dim]: one per box).

    As kmax >= kmin, the larger product is q_d * kmax_d where q_d >= 0 and q_d * kmin_d where
    q_d < 0: two batched matmuls, no [n, heads, rows, head_dim] temporary."""
    q = query.float()
    if q.dim() == 4:  # a query per box [g, rows, n, d]
        up = torch.einsum("ngd,gwnd->gnw", kmax.float(), q.clamp_min(0))
        up += torch.einsum("ngd,gwnd->gnw", kmin.float(), q.clamp_max(0))
        return up.amax(-1).transpose(0, 1)
    up = torch.bmm(kmax.transpose(0, 1), q.clamp_min(0).transpose(1, 2))    # [g, n, r]
    up += torch.bmm(kmin.transpose(0, 1), q.clamp_max(0).transpose(1, 2))
    return up.amax(-1).transpose(0, 1)                                       # [n, g]


@register
class Quest(Policy):
    name = "quest"
    per_head = True  # each KV head its own top-k: a retrieval head is not outvoted by the others
    uses_query = True

    def score(self, s: Summaries, query: torch.Tensor | None = None) -> torch.Tensor:
        if query is None:  # placement without a query: keep the newest blocks
            return torch.arange(s.n, dtype=torch.float32)
        return quest_bound(s, query)

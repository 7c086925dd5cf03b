"""quest (Quest): query-aware upper bound of q·k per block from the per-channel key min/max."""

from __future__ import annotations

import torch

from . import register
from .base import Policy, Summaries


def quest_bound(s: Summaries, query: torch.Tensor) -> torch.Tensor:
    """query: float [kv_heads, rows, head_dim] (query heads grouped by KV head) ->
    [n, kv_heads]: max over the group's rows of sum_d max(q_d * kmin_d, q_d * kmax_d)."""
    q = query.float().unsqueeze(0)                           # [1, g, r, d]
    lo = q * s.kmin.unsqueeze(2)                             # [n, g, r, d]
    hi = q * s.kmax.unsqueeze(2)
    return torch.maximum(lo, hi).sum(-1).amax(-1)            # [n, g]


@register
class Quest(Policy):
    name = "quest"

    def score(self, s: Summaries, query: torch.Tensor | None = None) -> torch.Tensor:
        if query is None:  # placement without a query: keep the newest blocks
            return torch.arange(s.n, dtype=torch.float32)
        return quest_bound(s, query)

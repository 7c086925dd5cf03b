"""hybrid: a query-aware score (the key-sketch estimate where the layer has sketches, else the
Quest bound) plus the accumulated attention mass (H2O), each normalised per KV head, so a
block either the current query or past queries needed ranks high."""

from __future__ import annotations

import torch

from . import register
from .base import Policy, Summaries
from .sketch import query_score


def _unit(x: torch.Tensor) -> torch.Tensor:
    """Scale each column (KV head) to [0, 1]."""
    lo, hi = x.amin(0, keepdim=True), x.amax(0, keepdim=True)
    return (x - lo) / (hi - lo).clamp_min(1e-12)


@register
class Hybrid(Policy):
    name = "hybrid"
    per_head = True  # each KV head its own top-k (the bound is per head)
    uses_query = True
    reads_block_query = True
    mass_mode = "accumulate"
    weight = 0.5  # share of the mass term

    def score(self, s: Summaries, query: torch.Tensor | None = None) -> torch.Tensor:
        mass = s.mass / s.tokens.clamp_min(1).unsqueeze(-1).float()   # [n, kv_heads]
        if query is None or s.n == 0:
            return mass
        return (1 - self.weight) * _unit(query_score(s, query)) + self.weight * _unit(mass)

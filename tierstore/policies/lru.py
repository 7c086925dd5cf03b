"""lru: keep the most recently read blocks hot."""

from __future__ import annotations

import torch

from . import register
from .base import Policy, Summaries


@register
class LRU(Policy):
    name = "lru"
    uses_summaries = False
    uses_last_used = True
    selects_all = True

    def score(self, s: Summaries, query: torch.Tensor | None = None) -> torch.Tensor:
        # [n]: last step read; ties broken by block index (newer first)
        return s.last_used.to(torch.float32) + torch.arange(s.n, dtype=torch.float32) / (s.n + 1)

    def rank(self, index: int, n: int, last_used: int) -> float:
        return float(last_used) + index / (n + 1)  # as score

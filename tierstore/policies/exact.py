"""exact: attend to every block; for placement keep the newest blocks (and the first) hot."""

from __future__ import annotations

import torch

from . import register
from .base import Policy, Summaries


@register
class Exact(Policy):
    name = "exact"
    uses_summaries = False
    selects_all = True

    def score(self, s: Summaries, query: torch.Tensor | None = None) -> torch.Tensor:
        # [n]: recency by block index; block 0 (attention sink) ranks with the newest
        idx = torch.arange(s.n, dtype=torch.float32)
        if s.n:
            idx[0] = float(s.n)
        return idx

    def rank(self, index: int, n: int, last_used: int) -> float:
        return float(n if index == 0 else index)  # as score: block 0 ranks with the newest

"""streaming (StreamingLLM): attend to the attention sinks and the recent window only."""

from __future__ import annotations

import torch

from . import register
from .base import Policy, Summaries


@register
class Streaming(Policy):
    name = "streaming"
    uses_summaries = False
    topk = False  # nothing beyond sinks + window is selected

    def score(self, s: Summaries, query: torch.Tensor | None = None) -> torch.Tensor:
        # [n]: placement keeps the newest blocks hot (the window), block 0 (the sink) too
        idx = torch.arange(s.n, dtype=torch.float32)
        if s.n:
            idx[0] = float(s.n)
        return idx

    def rank(self, index: int, n: int, last_used: int) -> float:
        return float(n if index == 0 else index)  # as score: block 0 ranks with the newest

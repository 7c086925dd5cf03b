"""h2o (Heavy-Hitter Oracle): blocks ranked by the attention mass they received so far."""

from __future__ import annotations

import torch

from . import register
from .base import Policy, Summaries


@register
class H2O(Policy):
    name = "h2o"
    mass_mode = "accumulate"  # every step's attention (and the prefill window) adds to the mass

    def score(self, s: Summaries, query: torch.Tensor | None = None) -> torch.Tensor:
        # [n, kv_heads]: mass per token of the block, so partial blocks are not penalised
        return s.mass / s.tokens.clamp_min(1).unsqueeze(-1).float()

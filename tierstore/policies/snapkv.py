"""snapkv (SnapKV): blocks ranked by the attention of an observation window of the last prompt
queries, measured at prefill; the ranking stays fixed while decoding."""

from __future__ import annotations

import torch

from . import register
from .base import Policy, Summaries


@register
class SnapKV(Policy):
    name = "snapkv"
    mass_mode = "observe"  # each prefill chunk's window replaces the mass; decode adds nothing

    def score(self, s: Summaries, query: torch.Tensor | None = None) -> torch.Tensor:
        # [n, kv_heads]
        return s.mass / s.tokens.clamp_min(1).unsqueeze(-1).float()

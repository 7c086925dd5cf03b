"""sketch: each block's estimated share of the query's attention, scored token by token from the
key sketches (``tierstore.sketch``: block mean + low-rank per-token deviation); blocks of a
layer without a sketch basis yet are ranked by the Quest bound."""

from __future__ import annotations

import torch

from ..positions import BlockQuery
from ..sketch import sketch_score
from . import register
from .base import Policy, Summaries
from .quest import quest_bound


def query_score(s: Summaries, query: torch.Tensor) -> torch.Tensor:
    """[n, kv_heads]: the sketch estimate of each block's attention share where the layer has
    sketches, else the Quest bound."""
    if s.sketch is None:
        return quest_bound(s, query.per_block() if isinstance(query, BlockQuery) else query)
    return sketch_score(s.kmean, s.sketch, s.basis, s.tokens, query)


@register
class Sketch(Policy):
    name = "sketch"
    per_head = True  # each KV head its own top-k: the estimate is per head
    uses_query = True
    reads_block_query = True

    def score(self, s: Summaries, query: torch.Tensor | None = None) -> torch.Tensor:
        if query is None:  # placement without a query: keep the newest blocks
            return torch.arange(s.n, dtype=torch.float32)
        return query_score(s, query)

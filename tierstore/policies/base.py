"""The one policy interface: rank blocks from their summaries (and optionally the query).

A policy is pure: no I/O, no locks, no data movement. The manager owns top-k, pinning,
ordering and movement. The same score serves placement (which blocks stay hot: the lowest
scores are demoted first) and selection (which blocks a step attends to: the highest).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

GROUP_BLOCKS = 16  # blocks per group of the coarse level (two-level selection)


@dataclass(frozen=True)
class Summaries:
    """Stacked summaries of one layer of one sequence; ``n`` blocks, in block order.

    kmin, kmax, kmean: float32 [n, kv_heads, head_dim] (post-RoPE keys)
    mass:              float32 [n, kv_heads] accumulated attention mass
    tokens:            int64 [n] valid tokens per block
    step:              the manager's current step
    last_used:         int64 [n] manager step at which each block was last read (only for a
                       policy with ``uses_last_used``: building it walks every block)
    sketch, basis:     the layer's key sketches float [kv_heads, n, block_tokens, r] (zero for
                       tokens of blocks not sketched) and their basis [kv_heads, head_dim, r]
                       (``tierstore.sketch``); None while the layer has no basis
    gmin, gmax:        float32 [ceil(n / GROUP_BLOCKS), kv_heads, head_dim]: the key box of each
                       group of ``GROUP_BLOCKS`` consecutive blocks (two-level selection)
    """

    kmin: torch.Tensor
    kmax: torch.Tensor
    kmean: torch.Tensor
    mass: torch.Tensor
    tokens: torch.Tensor
    step: int
    last_used: torch.Tensor | None = None
    sketch: torch.Tensor | None = None
    basis: torch.Tensor | None = None
    gmin: torch.Tensor | None = None
    gmax: torch.Tensor | None = None

    @property
    def n(self) -> int:
        return int(self.tokens.shape[0])


class Policy:
    """Base class. ``score`` returns float [n] (or [n, kv_heads]); higher means more valuable."""

    name = "base"
    selects_all = False   # True: selection attends to every block (exact)
    topk = True           # False: selection is sinks + recent window only (streaming)
    mass_mode = None      # "accumulate" (every step adds), "observe" (prefill window replaces), None
    uses_summaries = True  # False: scores need no key bounds or mass (resume skips reading them)
    per_head = False       # True: each KV head selects its own top-k blocks (scores [n, kv_heads])
    uses_last_used = False  # True: scores read ``Summaries.last_used``
    uses_query = False      # True: scores read the step's query (extended positions rotate it per block)
    reads_block_query = False  # True: ``score`` takes a ``positions.BlockQuery`` as it is (else: its per_block())

    def score(self, s: Summaries, query: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def rank(self, index: int, n: int, last_used: int) -> float:
        """The placement value of block ``index`` of a layer of ``n`` blocks, equal to what
        ``score`` gives it: eviction calls this per candidate, without stacking summaries, for
        a policy with ``uses_summaries = False`` (which must define it)."""
        raise NotImplementedError(f"policy {self.name!r} ranks by summaries: use score()")

"""Sparse attention: each step attends to the sink blocks, the recent window and the top-k
blocks a policy scores highest; blocks outside the hot tier are recalled when selected.

Selection is shared across the KV heads of a layer (scores summed over heads), so exactly the
chosen blocks are fetched. The output is exact attention over the selected tokens, with
transformers' logical mask applied at their positions; the attention each selected block
received is fed back to the policy's mass.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .attention import NEG_INF, chunk_mask
from .policies import Policy, Summaries


@dataclass(frozen=True)
class SparseConfig:
    """budget_tokens: tokens attended per step (int), or a fraction of the context (float < 1);
    sink_blocks / window_blocks: always attended; sparse_prefill: select at prefill chunks too;
    dense_layers: layer indices attended exactly whatever the step (the early layers spread
    their attention widely: no small selection covers them)."""

    budget_tokens: int | float
    sink_blocks: int = 1
    window_blocks: int = 2
    sparse_prefill: bool = False
    dense_layers: frozenset[int] = frozenset()  # layers that attend every token at every step

    @staticmethod
    def dense(spec: int | Sequence[int]) -> frozenset[int]:
        """``dense_layers`` from a count (the first n layers, as Quest leaves its first two dense)
        or the layer indices."""
        if isinstance(spec, int):
            if spec < 0:
                raise ValueError(f"dense_layers must be >= 0, got {spec}")
            return frozenset(range(spec))
        return frozenset(int(i) for i in spec)

    def budget_blocks(self, n_blocks: int, block_tokens: int) -> int:
        b = self.budget_tokens
        tokens = int(b * n_blocks * block_tokens) if isinstance(b, float) and b < 1 else int(b)
        return max(self.sink_blocks + self.window_blocks, tokens // block_tokens)


def select_blocks(s: Summaries, policy: Policy, query: torch.Tensor | None, cfg: SparseConfig,
                  block_tokens: int) -> list[int]:
    """Block indices to attend, ascending. query: [kv_heads, rows, head_dim] grouped, or None."""
    n = s.n
    k = cfg.budget_blocks(n, block_tokens)
    if policy.selects_all or n <= k:
        return list(range(n))
    sinks = set(range(min(cfg.sink_blocks, n)))
    if not policy.topk:  # streaming: the recent window widens to fill the budget
        return sorted(sinks | set(range(max(0, n - (k - len(sinks))), n)))
    chosen = sinks | set(range(max(0, n - cfg.window_blocks), n))
    room = k - len(chosen)
    if policy.topk and room > 0:
        score = policy.score(s, query)
        if score.dim() > 1:
            score = score.sum(-1)  # one selection per layer, shared by the KV heads
        score = score.float().clone()
        score[list(chosen)] = NEG_INF
        top = torch.topk(score, min(room, n - len(chosen))).indices.tolist()
        chosen.update(top)
    return sorted(chosen)


def attend_selected(mgr, seq, layer: int, q: torch.Tensor, q_offset: int, pad: torch.Tensor | None,
                    scale: float, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``q`` [heads, q_len, head_dim] over the blocks ``ids`` only.

    Returns (out float32 [heads, q_len, head_dim], mass float32 [len(ids), kv_heads]: the share of
    attention each block received, summed over the query rows of each KV head's group)."""
    lay = seq.layout
    heads, q_len, d = q.shape
    n_rep = heads // lay.kv_heads
    qg = q.float().reshape(lay.kv_heads, n_rep * q_len, d) * scale
    with mgr.acquire(seq, layer, ids, in_place=True) as got:
        ks, vs, pos, sizes = [], [], [], []
        for b in got:
            k, v = mgr.view(b)
            ks.append(k)
            vs.append(v)
            start = b.index * lay.block_tokens
            pos.append(torch.arange(start, start + b.ntok, device=q.device))
            sizes.append(b.ntok)
        k = torch.cat(ks, 1).float()  # [kv_heads, T, d]: at most budget_tokens of one layer
        v = torch.cat(vs, 1).float()
    k_pos = torch.cat(pos)
    s = torch.matmul(qg, k.transpose(-1, -2))  # [g, r, T]
    allowed = chunk_mask(torch.arange(q_offset, q_offset + q_len, device=q.device), k_pos,
                         None if pad is None else pad[k_pos], n_rep, lay.kv_heads)
    if allowed is not None:
        s = s.masked_fill(~allowed, NEG_INF)
    p = torch.softmax(s, -1)
    p = torch.nan_to_num(p, nan=0.0)  # rows with no allowed key (padding queries)
    out = torch.matmul(p, v).reshape(heads, q_len, d)
    per_token = p.sum(1)  # [g, T]
    mass = torch.stack([m.sum(-1) for m in per_token.split(sizes, dim=-1)])  # [n, g]
    return out, mass

"""Sparse attention: each step attends to the sink blocks, the recent window and the top-k
blocks a policy scores highest; blocks outside the hot tier are recalled when selected.

Selection is per layer (scores summed over heads) or per KV head; exactly the chosen blocks
are fetched, through a ``SeqReader``, in block order whatever their tiers. The output is exact attention over the selected tokens, with
transformers' logical mask applied at their positions; the attention each selected block
received is fed back to the policy's mass.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .attention import NEG_INF
from .policies import Policy, Summaries
from .policies.base import GROUP_BLOCKS
from .policies.quest import box_bound
from .positions import BlockQuery


@dataclass(frozen=True)
class SparseConfig:
    """budget_tokens: tokens attended per step (int), or a fraction of the context (float < 1);
    sink_blocks / window_blocks: always attended; sparse_prefill: select at prefill chunks too;
    dense_layers: layer indices attended exactly whatever the step (the early layers spread
    their attention widely: no small selection covers them); per_head: every KV head selects
    its own top-k blocks (True), or one selection is shared by the heads of a layer (False);
    None takes the policy's default."""

    budget_tokens: int | float
    sink_blocks: int = 1
    window_blocks: int = 2
    sparse_prefill: bool = False
    dense_layers: frozenset[int] = frozenset()  # layers that attend every token at every step
    per_head: bool | None = None  # each KV head its own top-k (None: the policy's default)
    coarse: int = 0  # two-level selection: candidates per head = coarse x the budget's blocks (0: off)

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


def select_blocks(s: Summaries | Callable[[], Summaries], policy: Policy, query: torch.Tensor | None,
                  cfg: SparseConfig, block_tokens: int, n: int | None = None) -> list[int]:
    """Block indices to attend, ascending (per-head selections: their union). See ``select``."""
    return select(s, policy, query, cfg, block_tokens, n)[0]


def select(s: Summaries | Callable[[], Summaries], policy: Policy, query: torch.Tensor | None,
           cfg: SparseConfig, block_tokens: int, n: int | None = None) -> tuple[list[int], torch.Tensor | None]:
    """The blocks a step attends to: (ids ascending, head_mask).

    query: [kv_heads, rows, head_dim] grouped, a ``positions.BlockQuery`` (extended positions:
    the query each block sees, ``StepMap.block_query``; handed to a policy that reads it as it
    is, else as its per-block tensor [kv_heads, rows, n, head_dim]; one-level selection), or None. ``s``: the layer's summaries, or a
    function returning them, called only when the policy scores (``n``, the layer's block count,
    is then required). head_mask is None when every KV head attends every id (one selection per
    layer, scores summed over heads), else bool [kv_heads, len(ids)]: per-head selection
    (``cfg.per_head``, default the policy's), where each head takes its own top-k and ids is
    their union (fetched once, each head attends only its own).

    Two-level (``cfg.coarse`` > 0, per-head policies, a long enough layer): the groups of
    ``GROUP_BLOCKS`` blocks whose key box has the highest Quest bound for each head give it
    ``coarse`` times the budget's blocks as candidates (the newest group always), and the
    policy scores only the union of the candidates (``two_level``)."""
    n = s.n if n is None else n
    k = cfg.budget_blocks(n, block_tokens)
    if policy.selects_all or n <= k:
        return list(range(n)), None
    sinks = set(range(min(cfg.sink_blocks, n)))
    if not policy.topk:  # streaming: the recent window widens to fill the budget
        return sorted(sinks | set(range(max(0, n - (k - len(sinks))), n))), None
    chosen = sinks | set(range(max(0, n - cfg.window_blocks), n))
    room = min(k - len(chosen), n - len(chosen))
    if room <= 0:
        return sorted(chosen), None
    summ = s() if callable(s) else s
    if isinstance(query, BlockQuery) and not policy.reads_block_query:
        query = query.per_block()
    if query is not None:  # summaries live in host memory (so a long context's do not hold device memory)
        query = query.to(summ.kmin.device)
    per_head = policy.per_head if cfg.per_head is None else cfg.per_head
    if cfg.coarse > 0 and per_head and isinstance(query, torch.Tensor) and query.dim() == 3 and summ.gmin is not None \
            and not policy.uses_last_used and n >= 2 * cfg.coarse * room:
        score = two_level(summ, policy, query, cfg.coarse * room)
    else:
        score = policy.score(summ, query).float()
    if score.dim() == 1 or not per_head:
        if score.dim() > 1:
            score = score.sum(-1)  # one selection per layer, shared by the KV heads
        score = score.clone()
        score[list(chosen)] = NEG_INF
        chosen.update(torch.topk(score, room).indices.tolist())
        return sorted(chosen), None
    score = score.clone()                                   # [n, kv_heads]
    fixed = torch.tensor(sorted(chosen), dtype=torch.long)
    score[fixed] = NEG_INF
    top = torch.topk(score, room, dim=0).indices            # [room, kv_heads]
    picked = torch.zeros(score.shape, dtype=torch.bool)
    picked.scatter_(0, top, True)
    picked[fixed] = True
    ids = picked.any(1).nonzero().squeeze(1)
    return ids.tolist(), picked[ids].T.contiguous()


def two_level(s: Summaries, policy: Policy, query: torch.Tensor, want: int) -> torch.Tensor:
    """Scores [n, kv_heads] of the policy over each head's candidate blocks only (-inf elsewhere).

    Per head the candidates are the blocks of the ``m`` groups whose key box bounds its query
    highest, ``m`` the fewest groups holding ``want`` blocks plus the newest group (the window,
    the growing tail), which is always one of them. Each head's candidates are gathered in group
    order (the newest group last, so the partial tail sits at the same row for every head) and
    the policy scores them as one stack whose row j is a different block for each head: the
    scoring reads ``m`` groups per head, not the layer. With every group a candidate the scores
    are the one-level scores."""
    n, heads = s.n, s.kmin.shape[1]
    groups = s.gmin.shape[0]
    bound = box_bound(s.gmin, s.gmax, query)                          # [groups, heads]
    m = min(groups, -(-want // GROUP_BLOCKS) + 1)
    bound[-1] = float("inf")                                          # the newest group: always
    top = torch.topk(bound, m, dim=0).indices.sort(0).values          # [m, heads], ascending groups
    rows = (top.unsqueeze(1) * GROUP_BLOCKS + torch.arange(GROUP_BLOCKS).view(1, -1, 1)).reshape(-1, heads)
    valid = rows < n                                                  # the newest group may be partial
    idx = rows.clamp(max=n - 1)                                       # [m * G, heads]
    h = torch.arange(heads)
    tokens = torch.where(valid[:, 0], s.tokens[idx[:, 0]], torch.zeros((), dtype=s.tokens.dtype))
    sub = Summaries(kmin=s.kmin[idx, h], kmax=s.kmax[idx, h], kmean=s.kmean[idx, h], mass=s.mass[idx, h],
                    tokens=tokens, step=s.step,
                    sketch=None if s.sketch is None else
                    torch.stack([s.sketch[j].index_select(0, idx[:, j]) for j in range(heads)]),
                    basis=s.basis)
    fine = policy.score(sub, query).float()
    if fine.dim() == 1:
        fine = fine.unsqueeze(1).expand(-1, heads)
    score = torch.full((n, heads), NEG_INF)
    score[idx[valid], h.expand_as(idx)[valid]] = fine[valid]
    return score


def attend_selected(reader, layer: int, q: torch.Tensor, q_offset: int, pad: torch.Tensor | None,
                    scale: float, ids: list[int], head_mask: torch.Tensor | None = None, ext=None,
                    mass: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention of ``q`` [heads, q_len, head_dim] over the blocks ``ids`` (ascending) only,
    read through ``reader`` (a ``SeqReader``) in block order whatever their tiers
    (``head_mask`` bool [kv_heads, len(ids)]: each KV head's group attends only its own blocks
    of ``ids``, read per head; heads with fewer blocks are padded with masked slots). ``ext``: a ``positions.StepMap``: keys at least its
    window away from a query are attended at their mapped positions.

    Returns (out float32 [heads, q_len, head_dim], mass float32 [len(ids), kv_heads]: the share of
    attention each block received, summed over the query rows of each KV head's group; None
    when ``mass`` is False, for a policy that does not accumulate it)."""
    lay = reader.layout
    heads, q_len, d = q.shape
    n_rep = heads // lay.kv_heads
    qg = q.float().reshape(lay.kv_heads, n_rep * q_len, d) * scale
    with reader.acquire(layer, ids) as got:
        newest = got[-1].index * lay.block_tokens + got[-1].ntok - 1 if got else -1  # last key's position
        if head_mask is not None:  # every head its own blocks: [kv_heads, T, d], positions [kv_heads, T]
            k, v, k_pos, valid = reader.select_heads(got, head_mask, q.device)
        else:                      # the blocks every head attends
            k, v, k_pos, valid = reader.select(got, q.device)
            k_pos = k_pos.unsqueeze(0)
            valid = None if valid is None else valid.unsqueeze(0)
    k, v = k.float(), v.float()
    if valid is not None:  # slot tails and padding: masked, and no NaN * 0 from stale bytes
        v = v.masked_fill(~valid.unsqueeze(-1), 0.0)
    s = torch.matmul(qg, k.transpose(-1, -2))  # [g, r, T]
    q_pos = torch.arange(q_offset, q_offset + q_len, device=q.device).repeat(n_rep)  # rows: (rep, token)
    if ext is not None:
        far = (q_pos.view(1, -1, 1) - k_pos.unsqueeze(1)) >= ext.window  # [1|g, r, T]
        if bool(far.any()):
            qf = ext.queries(q, q_offset).reshape(lay.kv_heads, n_rep * q_len, d) * scale
            s = torch.where(far, torch.matmul(qf, ext.keys_at(k, k_pos).transpose(-1, -2)), s)
    causal = q_len > 1 or newest > q_offset  # (a decode step's query is at or after every key)
    allowed = k_pos.unsqueeze(1) <= q_pos.view(1, -1, 1) if causal else None  # [1|g, r, T]
    if valid is not None:
        allowed = valid.unsqueeze(1) if allowed is None else allowed & valid.unsqueeze(1)
    if pad is not None:
        keep = pad[k_pos.clamp(max=pad.shape[0] - 1)].unsqueeze(1)  # (slot tails: invalid anyway)
        allowed = keep if allowed is None else allowed & keep
    if allowed is not None and not bool(allowed.all()):
        s = s.masked_fill(~allowed, NEG_INF)
    p = torch.softmax(s, -1)
    p = torch.nan_to_num(p, nan=0.0)  # rows with no allowed key (padding queries)
    out = torch.matmul(p, v).reshape(heads, q_len, d)
    if not mass:
        return out, None
    per_token = p.sum(1)  # [g, T]
    owner = torch.div(k_pos, lay.block_tokens, rounding_mode="floor").expand_as(per_token)  # block of each key
    flat = owner * lay.kv_heads + torch.arange(lay.kv_heads, device=owner.device).unsqueeze(1)
    acc = per_token.new_zeros((int(owner.max()) + 1) * lay.kv_heads if owner.numel() else 0)
    acc.index_add_(0, flat.reshape(-1).to(acc.device), per_token.reshape(-1))
    return out, acc.view(-1, lay.kv_heads)[torch.as_tensor(ids, dtype=torch.long, device=acc.device)]

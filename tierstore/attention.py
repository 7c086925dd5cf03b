"""Block attention: exact attention over K/V chunks with an online-softmax (log-sum-exp) merge.

The full K/V of a layer is never materialised: each chunk (a run of resident blocks viewed in
place, or a group of recalled blocks) updates a running max ``m``, normaliser ``l`` and output
accumulator ``acc``, as in FlashAttention. Math in float32 whatever the KV dtype.
"""

from __future__ import annotations

import torch

NEG_INF = float("-inf")


_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
FLASH_MIN_ROWS = 16  # below this (decode), plain matmuls beat the fused kernel's setup


class OnlineSoftmax:
    """Accumulates attention of grouped queries over key/value chunks.

    q: [kv_heads, n_rep * q_len, head_dim] (query heads grouped by their KV head, GQA). Keeps the
    normalised output ``o`` and the log-sum-exp ``lse`` of the keys seen so far; each chunk is
    merged with ``lse' = logaddexp(lse, lse_c)``. On CPU, chunks with many query rows (prefill)
    use torch's fused flash kernel, which returns the chunk's log-sum-exp.
    """

    def __init__(self, q: torch.Tensor, scale: float) -> None:
        self.q = q.float()
        self.scale = scale
        g, r, d = q.shape
        self.o = torch.zeros((g, r, d), dtype=torch.float32, device=q.device)
        self.lse = torch.full((g, r, 1), NEG_INF, dtype=torch.float32, device=q.device)
        self.flash = _FLASH_CPU is not None and q.device.type == "cpu" and r >= FLASH_MIN_ROWS
        self._empty = True
        self._qs: torch.Tensor | None = None

    def add(self, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor | None) -> None:
        """k, v: [kv_heads, T, head_dim]; allowed: bool broadcastable to [kv_heads, n_rep*q_len, T]
        (None = all allowed)."""
        k, v = k.float(), v.float()
        if self.flash:
            bias = None
            if allowed is not None:
                bias = torch.zeros(allowed.shape, dtype=torch.float32, device=k.device)
                bias.masked_fill_(~allowed, NEG_INF)
                bias = bias.unsqueeze(0)
            o_c, lse_c = _FLASH_CPU(self.q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), 0.0, False,
                                    attn_mask=bias, scale=self.scale)
            o_c, lse_c = torch.nan_to_num(o_c[0], nan=0.0), lse_c[0].unsqueeze(-1)
            if allowed is not None:  # the kernel reports lse 0 (not -inf) for fully masked rows
                lse_c = torch.where(allowed.any(-1, keepdim=True), lse_c, torch.full_like(lse_c, NEG_INF))
            self._merge(o_c, lse_c)
        else:
            self.add_group([(k, v, allowed)])

    def add_group(self, chunks: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]) -> None:
        """Several chunks under one softmax (plain matmuls: the decode path). Scores of all the
        chunks are concatenated, so the merge runs once instead of once per chunk."""
        if self.flash:
            for c in chunks:
                self.add(*c)
            return
        if self._qs is None:
            self._qs = self.q * self.scale
        scores = []
        for k, _, allowed in chunks:
            s = torch.matmul(self._qs, k.float().transpose(-1, -2))  # [g, r, T]
            scores.append(s if allowed is None else s.masked_fill(~allowed, NEG_INF))
        s = scores[0] if len(scores) == 1 else torch.cat(scores, -1)
        lse_c = torch.logsumexp(s, -1, keepdim=True)
        p = torch.exp(s - torch.where(torch.isfinite(lse_c), lse_c, torch.zeros_like(lse_c)))
        if len(chunks) == 1:
            o_c = torch.matmul(p, chunks[0][1].float())
        else:
            o_c = None
            for pc, (_, v, _) in zip(torch.split(p, [c.shape[-1] for c in scores], -1), chunks):
                part = torch.matmul(pc, v.float())
                o_c = part if o_c is None else o_c.add_(part)
        self._merge(o_c, lse_c)

    def _merge(self, o_c: torch.Tensor, lse_c: torch.Tensor) -> None:
        """Fold a chunk's normalised output and log-sum-exp into the running ones."""
        if self._empty:  # first chunk: nothing to merge with
            self.o, self.lse, self._empty = o_c, lse_c, False
            return
        new = torch.logaddexp(self.lse, lse_c)
        fin = torch.isfinite(new)
        safe = torch.where(fin, new, torch.zeros_like(new))
        w_old = torch.where(torch.isfinite(self.lse), torch.exp(self.lse - safe), torch.zeros_like(new))
        w_new = torch.where(torch.isfinite(lse_c), torch.exp(lse_c - safe), torch.zeros_like(new))
        self.o = self.o * w_old + o_c * w_new
        self.lse = new

    def result(self) -> torch.Tensor:
        """[kv_heads, n_rep * q_len, head_dim] float32; rows with no allowed key are 0."""
        return self.o


def chunk_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, pad_row: torch.Tensor | None, n_rep: int,
               kv_heads: int) -> torch.Tensor | None:
    """allowed[kv_heads|1, n_rep*q_len, T]: causal (key pos <= query pos) and not padding.

    q_pos: int64 [q_len] logical positions of the queries; k_pos: int64 [T] of the keys;
    pad_row: bool [T] True where the key is a real token (None = no padding).
    Returns None when every key is allowed for every query.
    """
    causal = k_pos.unsqueeze(0) <= q_pos.unsqueeze(1)  # [q, T]
    if pad_row is not None:
        causal = causal & pad_row.unsqueeze(0)
    if bool(causal.all()):
        return None
    return causal.repeat(n_rep, 1).unsqueeze(0)  # [1, n_rep*q, T]


TEMPORARIES = 4  # float32 [rows, T] matrices alive at once in one chunk (scores, bias, probabilities, ...)


class WindowMass:
    """Attention mass per block received by an observation window of the last ``w`` queries
    (SnapKV; H2O seeding at prefill), computed in the same pass as exact attention.

    Per block it keeps the log-sum-exp of the window rows' scores over the block's tokens
    [kv_heads, rows]; ``mass()`` normalises them over all blocks."""

    def __init__(self, q: torch.Tensor, q_offset: int, w: int, n_rep: int, kv_heads: int, scale: float) -> None:
        heads, q_len, d = q.shape
        w = min(w, q_len)
        self.q = q[:, q_len - w:].float().reshape(kv_heads, n_rep * w, d) * scale  # [g, n_rep*w, d]
        self.q_pos = torch.arange(q_offset + q_len - w, q_offset + q_len, device=q.device)
        self.n_rep, self.kv_heads = n_rep, kv_heads
        self.lse: dict[int, torch.Tensor] = {}

    def add(self, k: torch.Tensor, k_pos: torch.Tensor, pad: torch.Tensor | None, first_index: int,
            block_tokens: int) -> None:
        s = torch.matmul(self.q, k.float().transpose(-1, -2))  # [g, r, T]
        allowed = chunk_mask(self.q_pos, k_pos, pad, self.n_rep, self.kv_heads)
        if allowed is not None:
            s = s.masked_fill(~allowed, NEG_INF)
        offset = int(k_pos[0]) - first_index * block_tokens  # tokens of the first block before k_pos[0]
        bounds = list(range(block_tokens - offset, s.shape[-1], block_tokens))
        pieces = torch.tensor_split(s, bounds, dim=-1) if bounds else (s,)
        for j, piece in enumerate(pieces):
            lse = torch.logsumexp(piece, -1)  # [g, r]
            i = first_index + j
            self.lse[i] = lse if i not in self.lse else torch.logaddexp(self.lse[i], lse)

    def mass(self) -> tuple[list[int], torch.Tensor]:
        """(block ids, float [n, kv_heads]): each block's share of the window's attention,
        summed over the window rows."""
        ids = sorted(self.lse)
        if not ids:
            return [], torch.zeros(0, self.kv_heads)
        lse = torch.stack([self.lse[i] for i in ids])  # [n, g, r]
        total = torch.logsumexp(lse, 0, keepdim=True)
        share = torch.where(torch.isfinite(total), torch.exp(lse - total), torch.zeros_like(lse))
        return ids, share.sum(-1)


def attend_exact(mgr, seq, layer: int, q: torch.Tensor, q_offset: int, pad: torch.Tensor | None,
                 scale: float, window: WindowMass | None = None) -> torch.Tensor:
    """Exact attention of one sequence's queries over every block of ``layer``.

    q: [heads, q_len, head_dim] post-RoPE; q_offset: logical position of the first query;
    pad: bool [kv_len] (True = real token) or None. Returns float32 [heads, q_len, head_dim].
    Resident blocks are read in place (runs of consecutive slots); the others are recalled in
    groups, each group prefetched while the previous one is computed. ``window`` collects the
    attention mass of an observation window in the same pass.
    """
    lay = seq.layout
    heads, q_len, d = q.shape
    n_rep = heads // lay.kv_heads
    acc = OnlineSoftmax(q.reshape(lay.kv_heads, n_rep * q_len, d), scale)
    q_pos = torch.arange(q_offset, q_offset + q_len, device=q.device)
    blocks = mgr.blocks(seq, layer)
    in_place = mgr.in_place(seq)  # CPU: warm blocks are read where they are
    resident = [b.index for b in blocks if mgr.readable(b, in_place)]
    if resident:
        with mgr.acquire(seq, layer, resident, in_place=in_place) as got:
            _add_runs(mgr, acc, got, q_pos, pad, n_rep, lay.kv_heads, heads * q_len, window)
    # everything not attended above, by the list taken before it (a block may have landed or
    # left meanwhile: each block is attended exactly once)
    done = set(resident)
    rest = [b.index for b in blocks if b.index not in done] if len(resident) < len(blocks) else []
    group = max(1, min(16, seq.hot.slots // 4))
    chunks = [rest[i:i + group] for i in range(0, len(rest), group)]
    for i, ids in enumerate(chunks):
        if i + 1 < len(chunks):
            mgr.prefetch_to_read(seq, layer, chunks[i + 1])
        # in place: a block that lands in warm meanwhile (a prefetch, a resume's warm fill) is
        # read there, not copied up; blocks only in cold are loaded (straight into hot on CPU)
        with mgr.acquire(seq, layer, ids, transient=True, in_place=in_place) as got:
            _add_runs(mgr, acc, got, q_pos, pad, n_rep, lay.kv_heads, heads * q_len, window)
    return acc.result().reshape(heads, q_len, d)


def _add_runs(mgr, acc: OnlineSoftmax, blocks, q_pos, pad, n_rep: int, kv_heads: int, rows: int,
              window: WindowMass | None = None) -> None:
    blocks = sorted(blocks, key=lambda b: b.index)
    bt = blocks[0].seq.layout.block_tokens
    # whole blocks per piece, sized so the chunk's temporaries fit the hot pool's scratch reservation
    max_tokens = max(bt, blocks[0].seq.hot.scratch_bytes // (4 * TEMPORARIES * rows) // bt * bt)
    group, group_tokens = [], 0
    first_q = int(q_pos[0])
    for pool, first_slot, n, first_tok, ntok in mgr.tier_runs(blocks):
        k, v = pool.view(first_slot, n, ntok)
        for s, e in _pieces(first_tok, ntok, first_q, max_tokens, acc.flash and pad is None and window is None):
            pad_c = None if pad is None else pad[first_tok + s:first_tok + e]
            if pad_c is None and window is None and first_tok + e - 1 <= first_q:
                allowed = None  # every key precedes every query: no mask to build
            else:
                k_pos = torch.arange(first_tok + s, first_tok + e, device=q_pos.device)
                allowed = chunk_mask(q_pos, k_pos, pad_c, n_rep, kv_heads)
                if window is not None:
                    window.add(k[:, s:e], k_pos, pad_c, (first_tok + s) // bt, bt)
            if acc.flash:
                acc.add(k[:, s:e], v[:, s:e], allowed)
                continue
            if group and group_tokens + (e - s) > max_tokens:  # the scores of a group fit the scratch
                acc.add_group(group)
                group, group_tokens = [], 0
            group.append((k[:, s:e], v[:, s:e], allowed))
            group_tokens += e - s
    if group:
        acc.add_group(group)


def _pieces(first_tok: int, ntok: int, first_q: int, max_tokens: int, whole_prefix: bool):
    """(start, end) offsets into a run of ``ntok`` keys from token ``first_tok``. Pieces that
    need a mask hold at most ``max_tokens`` keys (their bias and scores are rows x keys floats).
    ``whole_prefix`` (the fused kernel, no padding): keys before every query need no mask and
    the kernel tiles internally, so they go in one piece however long."""
    s = 0
    if whole_prefix:
        prefix = min(ntok, max(0, first_q + 1 - first_tok))  # keys at positions <= first query
        if prefix:
            yield 0, prefix
            s = prefix
    while s < ntok:
        e = min(ntok, s + max_tokens)
        yield s, e
        s = e

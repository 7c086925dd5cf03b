"""Block attention: exact attention over K/V pieces with an online-softmax (log-sum-exp) merge.

The full K/V of a layer is never materialised: the keys are split into canonical ``pieces``
(fixed by the positions alone), each read through a ``SeqReader`` as one tensor and folded into
the normalised output and log-sum-exp of the pieces before it, as in FlashAttention. Pieces
are merged in key order whatever the tier placement, so residency never changes a bit of the
result. Math in float32 whatever the KV dtype. ``OnlineSoftmax``, ``chunk_mask``, ``pieces``
and ``WindowMass`` are pure (tensors in, tensors out) and tested without a store.
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

    def add(self, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor | None,
            q: torch.Tensor | None = None) -> None:
        """k, v: [kv_heads, T, head_dim]; allowed: bool broadcastable to [kv_heads, n_rep*q_len, T]
        (None = all allowed). ``q``: other queries for these keys (same rows; e.g. moved to
        other positions by ``tierstore.positions``), else the accumulator's own."""
        k, v = k.float(), v.float()
        if self.flash:
            bias = None
            if allowed is not None:
                bias = torch.zeros(allowed.shape, dtype=torch.float32, device=k.device)
                bias.masked_fill_(~allowed, NEG_INF)
                bias = bias.unsqueeze(0)
            qq = self.q if q is None else q.float()
            o_c, lse_c = _FLASH_CPU(qq.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), 0.0, False,
                                    attn_mask=bias, scale=self.scale)
            o_c, lse_c = torch.nan_to_num(o_c[0], nan=0.0), lse_c[0].unsqueeze(-1)
            if allowed is not None:  # the kernel reports lse 0 (not -inf) for fully masked rows
                lse_c = torch.where(allowed.any(-1, keepdim=True), lse_c, torch.full_like(lse_c, NEG_INF))
            self._merge(o_c, lse_c)
        else:
            self.add_group([(k, v, allowed)], q)

    def add_causal(self, k: torch.Tensor, v: torch.Tensor, n_rep: int) -> None:
        """Keys of the queries' own positions, in order (key t is the position of query t):
        the fused kernel's square causal mask, with each KV head's keys broadcast to its
        ``n_rep`` query heads (no copy). k, v: [kv_heads, q_len, head_dim]."""
        g, r, d = self.q.shape
        q_len = r // n_rep
        k4 = k.float().unsqueeze(1).expand(g, n_rep, q_len, d)
        v4 = v.float().unsqueeze(1).expand(g, n_rep, q_len, d)
        o_c, lse_c = _FLASH_CPU(self.q.reshape(g, n_rep, q_len, d), k4, v4, 0.0, True, scale=self.scale)
        self._merge(o_c.reshape(g, r, d), lse_c.reshape(g, r, 1))

    def add_group(self, chunks: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]],
                  q: torch.Tensor | None = None) -> None:
        """Several chunks under one softmax (plain matmuls: the decode path). Scores of all the
        chunks are concatenated, so the merge runs once instead of once per chunk."""
        if self.flash:
            for c in chunks:
                self.add(*c, q=q)
            return
        if q is None:
            if self._qs is None:
                self._qs = self.q * self.scale
            qs = self._qs
        else:
            qs = q.float() * self.scale
        scores = []
        for k, _, allowed in chunks:
            sc = torch.bmm(qs, k.float().transpose(-1, -2))  # [g, r, T]
            scores.append(sc if allowed is None else sc.masked_fill(~allowed, NEG_INF))
        self.add_scores(scores, [c[1] for c in chunks])

    def add_scores(self, scores: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        """Chunks given by their scaled, masked scores [g, r, T_i] (-inf = not allowed) and
        values [g, T_i, head_dim], under one softmax."""
        s = scores[0] if len(scores) == 1 else torch.cat(scores, -1)
        m = s.amax(-1, keepdim=True)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # rows with no allowed key
        p = torch.exp(s - m)  # one pass of exp: the sum, its log and the weights from it
        total = p.sum(-1, keepdim=True)
        if len(values) == 1:
            o_c = torch.matmul(p, values[0].float())
        else:
            o_c = None
            for pc, v in zip(torch.split(p, [c.shape[-1] for c in scores], -1), values):
                part = torch.bmm(pc, v.float())
                o_c = part if o_c is None else o_c.add_(part)
        o_c = o_c / torch.where(total > 0, total, torch.ones_like(total))
        self._merge(o_c, m + torch.log(total))

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
SEGMENT_TOKENS = 4096  # unmasked keys per piece: pieces start at multiples of this (canonical order)
# A decode step (one query row per head) cuts its keys into pieces of DECODE_PIECES segments,
# each read in chunks of SEGMENT_TOKENS // READ_CHUNKS keys under one softmax (canonical cuts):
# a chunk is a view where its blocks sit in one run, so only scattered chunks are copied.
DECODE_PIECES = 4
READ_CHUNKS = 4
MASKED_PIECE_BYTES = 8 << 20  # temporaries of one masked piece (rows x keys floats, TEMPORARIES of them)


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


def pieces(n_keys: int, q_first: int, q_len: int, padded: bool, block_tokens: int,
           rows: int, fused: bool = True) -> list[tuple[int, int, str]]:
    """The canonical split of keys ``[0, n_keys)`` for queries at positions ``q_first ..
    q_first + q_len - 1``: ``(start, end, kind)`` in key order.

    It depends on these numbers only, never on where blocks sit, how many are resident or the
    budgets, so the online softmax merges the same pieces in the same order whatever the tier
    placement: resume, prefetch timing and budgets never change a bit of the output (bf16
    rounding follows the order of a sum). Kinds:

    * ``free``: every key precedes every query: no mask. Cut at multiples of ``SEGMENT_TOKENS``
      (``DECODE_PIECES`` times that for one query: a decode step's scores are small).
    * ``causal``: keys ``[q_first, q_first + q_len)`` against their own queries (a square
      causal mask the fused kernel applies itself; without it, ``fused=False``, ``masked``).
    * ``masked``: padding, or keys past the queries: an explicit mask, in pieces whose
      temporaries (``rows`` x keys floats) stay within ``MASKED_PIECE_BYTES``.
    """
    out: list[tuple[int, int, str]] = []
    step = max(block_tokens, MASKED_PIECE_BYTES // (4 * TEMPORARIES * max(1, rows)) // block_tokens * block_tokens)
    if padded:
        return [(s, min(n_keys, s + step), "masked") for s in range(0, n_keys, step)]
    # decode (one query): its own key is allowed too, so every key is free
    free_end = min(n_keys, q_first + 1) if q_len == 1 else min(n_keys, max(0, q_first))
    seg = SEGMENT_TOKENS * (DECODE_PIECES if q_len == 1 else 1)  # decode: scores are small, merge less
    for s in range(0, free_end, seg):
        out.append((s, min(free_end, s + seg), "free"))
    if free_end < n_keys:
        if fused and q_len > 1 and free_end == q_first and n_keys == q_first + q_len:
            out.append((q_first, n_keys, "causal"))
        else:
            out += [(s, min(n_keys, s + step), "masked") for s in range(free_end, n_keys, step)]
    return out


def zones(plan: list[tuple[int, int, str]], far_end: int, near_from: int) -> list[tuple[int, int, str, str]]:
    """``plan`` cut at the boundaries of a position map: ``(start, end, kind, zone)`` with zone
    ``far`` (keys at least a window from every query), ``near`` (within it of every query) or
    ``mixed``. A causal square that is cut keeps an explicit mask (``masked``)."""
    out = []
    for s, e, kind in plan:
        cuts = sorted({s, e} | {c for c in (far_end, near_from) if s < c < e})
        for a, b in zip(cuts, cuts[1:]):
            zone = "far" if b <= far_end else "near" if a >= near_from else "mixed"
            out.append((a, b, kind if (a, b) == (s, e) or kind != "causal" else "masked", zone))
    return out


def attend_exact(reader, layer: int, q: torch.Tensor, q_offset: int, pad: torch.Tensor | None,
                 scale: float, window: WindowMass | None = None, ext=None) -> torch.Tensor:
    """Exact attention of one sequence's queries over every block of ``layer``.

    reader: a ``SeqReader`` (``tierstore.reader``); q: [heads, q_len, head_dim] post-RoPE;
    q_offset: logical position of the first query; pad: bool [kv_len] (True = real token) or
    None. Returns float32 [heads, q_len, head_dim]. Keys are taken in the canonical ``pieces``,
    each read as one tensor (a view of a run of slots, or gathered), merged in key order; the
    next piece's blocks are prefetched while one is computed. ``window`` collects the attention
    mass of an observation window in the same pass. ``ext``: a ``positions.StepMap``: keys at
    least its window away from a query are attended at their mapped positions.
    """
    g, bt = reader.kv_heads, reader.block_tokens
    heads, q_len, d = q.shape
    n_rep = heads // g
    acc = OnlineSoftmax(q.reshape(g, n_rep * q_len, d), scale)
    q_pos = torch.arange(q_offset, q_offset + q_len, device=q.device)
    n = reader.length(layer)
    plan = pieces(n, q_offset, q_len, pad is not None, bt, heads * q_len, fused=acc.flash)
    if ext is None:
        plan4 = [(s, e, kind, "near") for s, e, kind in plan]
        q_far = None
    else:
        far_end = max(0, min(n, q_offset - ext.window + 1))
        plan4 = zones(plan, far_end, max(far_end, min(n, q_offset + q_len - ext.window)))
        q_far = ext.queries(q, q_offset).reshape(g, n_rep * q_len, d)
    step = max(bt, MASKED_PIECE_BYTES // (4 * TEMPORARIES * max(1, heads * q_len)))
    for i, (s, e, kind, zone) in enumerate(plan4):
        if i + 1 < len(plan4):
            ns, ne = plan4[i + 1][:2]
            reader.prefetch(layer, range(ns // bt, -(-ne // bt)))
        b0 = s // bt
        if kind == "free" and zone != "mixed" and not acc.flash:
            # decode: chunks of SEGMENT_TOKENS // READ_CHUNKS keys under one softmax, each a view where its blocks
            # sit in one run, so a piece split over pools or runs copies only its scattered chunks
            with reader.chunks(layer, b0, -(-e // bt), max(1, SEGMENT_TOKENS // READ_CHUNKS // bt)) as got:
                parts, t0 = [], b0 * bt
                for k, v in got:
                    lo, hi = max(s, t0), min(e, t0 + k.shape[1])
                    if hi > lo:
                        parts.append((k[:, lo - t0:hi - t0], v[:, lo - t0:hi - t0], lo))
                    t0 += k.shape[1]
                if window is not None:
                    for k, _, lo in parts:
                        window.add(k, torch.arange(lo, lo + k.shape[1], device=q.device), None, lo // bt, bt)
                if zone == "far":
                    acc.add_group([(ext.keys(k, lo), v, None) for k, v, lo in parts], q=q_far)
                else:
                    acc.add_group([(k, v, None) for k, v, _ in parts])
            continue
        with reader.span(layer, b0, -(-e // bt)) as (k, v):
            k, v = k[:, s - b0 * bt:e - b0 * bt], v[:, s - b0 * bt:e - b0 * bt]
            pad_c = None if pad is None else pad[s:e]
            if window is not None:
                window.add(k, torch.arange(s, e, device=q.device), pad_c, b0, bt)
            if zone == "mixed":  # each (query, key) pair near or far: both scores, chosen per pair
                for a in range(s, e, step):
                    _add_mixed(acc, ext, q_far, q_pos, k[:, a - s:a - s + step], v[:, a - s:a - s + step], a,
                               None if pad_c is None else pad_c[a - s:a - s + step], n_rep, g)
                continue
            allowed = None
            if kind == "masked":
                allowed = chunk_mask(q_pos, torch.arange(s, e, device=q.device), pad_c, n_rep, g)
            if zone == "far":
                acc.add(ext.keys(k, s), v, allowed, q=q_far)
            elif kind == "causal":
                acc.add_causal(k, v, n_rep)
            else:
                acc.add(k, v, allowed)
    return acc.result().reshape(heads, q_len, d)


def _add_mixed(acc: OnlineSoftmax, ext, q_far: torch.Tensor, q_pos: torch.Tensor, k: torch.Tensor,
               v: torch.Tensor, start: int, pad_c: torch.Tensor | None, n_rep: int, g: int) -> None:
    """Keys ``start..`` some of whose (query, key) pairs are within the map's window: true
    scores there, mapped scores elsewhere, one explicit causal/padding mask."""
    k_pos = torch.arange(start, start + k.shape[1], device=k.device)
    near = torch.matmul(acc.q * acc.scale, k.float().transpose(-1, -2))
    far = torch.matmul(q_far * acc.scale, ext.keys(k, start).transpose(-1, -2))
    dist = (q_pos.unsqueeze(1) - k_pos.unsqueeze(0)).repeat(n_rep, 1).unsqueeze(0)  # [1, r, T]
    sc = torch.where(dist >= ext.window, far, near)
    allowed = dist >= 0
    if pad_c is not None:
        allowed = allowed & pad_c.view(1, 1, -1)
    acc.add_scores([sc.masked_fill(~allowed, NEG_INF)], [v])

"""Block attention: the pure parts (pieces, online softmax) without a store, and the first law
for them: tier placement, budgets and resume never change a bit of the output, in fp32, bf16
and fp16 (one canonical order of arithmetic)."""

from __future__ import annotations

import pytest
import torch
from support import tiny

import tierstore
from tierstore import attention
from tierstore.adapters.hf import TieredCache
from tierstore.attention import OnlineSoftmax, chunk_mask, pieces

BT = 8


def test_pieces_cover_every_key_once_in_order():
    for n, q_first, q_len, padded in [(9000, 8999, 1, False), (9000, 8000, 1000, False), (300, 0, 300, False),
                                      (5000, 4990, 10, True), (4096, 4095, 1, False), (70, 64, 6, False)]:
        plan = pieces(n, q_first, q_len, padded, 64, 9 * q_len)
        assert plan[0][0] == 0 and plan[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(plan, plan[1:]))
        assert all(s < e for s, e, _ in plan)


def test_pieces_depend_on_positions_only():
    """Decode: free pieces cut at multiples of DECODE_PIECES * SEGMENT_TOKENS; a prefill chunk:
    free prefix cut at multiples of SEGMENT_TOKENS and its own keys as one causal square
    (fused) or masked pieces (plain matmuls)."""
    S = attention.SEGMENT_TOKENS
    D = S * attention.DECODE_PIECES
    assert pieces(2 * D + 5, 2 * D + 4, 1, False, 64, 9) == [(0, D, "free"), (D, 2 * D, "free"),
                                                             (2 * D, 2 * D + 5, "free")]
    assert pieces(2 * S + 4, 2 * S + 3, 1, False, 64, 9) == [(0, 2 * S + 4, "free")]
    assert pieces(S + 1024, S, 1024, False, 64, 9216) == [(0, S, "free"), (S, S + 1024, "causal")]
    masked = pieces(S + 1024, S, 1024, False, 64, 9216, fused=False)
    assert masked[0] == (0, S, "free") and {k for _, _, k in masked[1:]} == {"masked"}
    assert all(k == "masked" for _, _, k in pieces(500, 490, 10, True, 64, 90))


@pytest.mark.parametrize("rows", [3, 40])  # plain matmuls (decode) and the fused kernel (prefill)
def test_online_softmax_over_pieces_equals_dense_attention(rows):
    torch.manual_seed(0)
    g, d, n = 2, 16, 300
    n_rep, q_len = 2, rows // 2 if rows > 16 else 1
    q_first = n - q_len
    q = torch.randn(g, n_rep * q_len, d)
    k, v = torch.randn(g, n, d), torch.randn(g, n, d)
    acc = OnlineSoftmax(q, 0.25)
    q_pos = torch.arange(q_first, n)
    for s, e, kind in pieces(n, q_first, q_len, False, BT, g * n_rep * q_len, fused=acc.flash):
        if kind == "causal":
            acc.add_causal(k[:, s:e], v[:, s:e], n_rep)
        else:
            allowed = chunk_mask(q_pos, torch.arange(s, e), None, n_rep, g) if kind == "masked" else None
            acc.add_group([(k[:, s:e], v[:, s:e], allowed)]) if not acc.flash else acc.add(k[:, s:e], v[:, s:e], allowed)
    causal = torch.arange(n).unsqueeze(0) <= q_pos.unsqueeze(1)            # [q_len, n]
    sc = (q @ k.transpose(-1, -2) * 0.25).masked_fill(~causal.repeat(n_rep, 1), float("-inf"))
    ref = torch.softmax(sc, -1) @ v
    assert torch.allclose(acc.result(), ref, atol=1e-5)


def _generate(model, ids, cache, new):
    out = model.generate(ids, cache=cache, max_new_tokens=new, do_sample=False, output_scores=True,
                         return_dict_in_generate=True, pad_token_id=0, prefill_chunk_size=48)
    return out.sequences, torch.stack(out.scores)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_residency_budget_and_resume_never_change_a_bit(tmp_path, monkeypatch, dtype):
    """The same prompt under an all-hot budget and a budget of 6 blocks (most blocks attended
    from warm and cold), then committed and resumed under yet another budget: the same tokens
    and the same logits, bit for bit. Pieces of 32 tokens make every step merge many of them."""
    monkeypatch.setattr(attention, "SEGMENT_TOKENS", 32)
    model = tiny(dtype=dtype)
    bb = 2 * 2 * BT * 16 * dtype.itemsize
    ids = torch.randint(1, 128, (1, 230), generator=torch.Generator().manual_seed(1))
    with tierstore.open(tmp_path / "big", hot="16MiB", warm="16MiB", block_tokens=BT) as st, \
            TieredCache(st, model, commit_on_close=False) as cache:
        ref_seq, ref_logits = _generate(model, ids, cache, 16)
        assert st.manager.counters.warm_in_place == 0  # everything stayed hot
    with tierstore.open(tmp_path / "small", hot=6 * bb, warm=12 * bb, block_tokens=BT) as st:
        with TieredCache(st, model, session="s") as cache:
            seq, logits = _generate(model, ids, cache, 8)
            s = st.stats()
            assert s.promotions.get("cold", 0) + st.manager.counters.warm_in_place > 0
        assert torch.equal(seq, ref_seq[:, :seq.shape[1]])
        assert torch.equal(logits, ref_logits[:8])
    with tierstore.open(tmp_path / "small", hot=9 * bb, warm=5 * bb, block_tokens=BT) as st:
        with TieredCache.resume(st, model, session="s", commit_on_close=False) as cache:
            more, more_logits = _generate(model, seq, cache, 8)  # the cache holds all but seq's last token
    assert torch.equal(more, ref_seq)
    assert torch.equal(more_logits, ref_logits[8:])

"""Tensor-parallel shards at the store level: slicing a whole session by heads and gathering
shards back, bit for bit, and the refusals (``tierstore.shards``). The real 2-rank runs (gloo,
a TP model) are in ``test_remote.py``."""

from __future__ import annotations

import pytest
import torch

from support.kv import assert_kv_equal, random_kv
from tierstore.errors import ModelMismatchError, SessionNotFoundError
from tierstore.layout import KVLayout
from tierstore.shards import gather, shard_names, slice_shard

LAYOUT = KVLayout(num_layers=3, kv_heads=4, head_dim=8, block_tokens=8, dtype=torch.bfloat16)


def test_slice_then_gather_is_the_identity_bit_for_bit(store_factory):
    st = store_factory(block_tokens=8)
    kv = random_kv(LAYOUT, 27, 5, kind="bits")
    st.put_session("s", layout=LAYOUT, kv=kv, token_ids=range(27), fingerprint="fp", meta={"note": 1})
    recs = [slice_shard(st, "s", r, 2) for r in range(2)]
    assert [r.name for r in recs] == ["s.tp0of2", "s.tp1of2"]
    assert recs[1].meta["tp"] == {"rank": 1, "size": 2, "heads": [2, 4], "kv_heads": 4}
    assert not set(recs[0].chains()) & set(recs[1].chains()) & set(st.session("s").chains())
    for r, (a, b) in enumerate([(0, 2), (2, 4)]):
        assert_kv_equal(st.load_session(f"s.tp{r}of2")[1], [(k[a:b], v[a:b]) for k, v in kv])
    st.delete("s")
    assert shard_names(st, "s") == ["s.tp0of2", "s.tp1of2"]
    whole = gather(st, "s")
    assert whole.layout == LAYOUT and whole.meta["note"] == 1 and "tp" not in whole.meta
    assert_kv_equal(st.load_session("s")[1], kv)


def test_incomplete_or_disagreeing_shards_are_refused(store_factory):
    st = store_factory(block_tokens=8)
    kv = random_kv(LAYOUT, 16, 6)
    st.put_session("s", layout=LAYOUT, kv=kv, token_ids=range(16), fingerprint="fp")
    slice_shard(st, "s", 0, 2)
    with pytest.raises(SessionNotFoundError, match="no complete set of tensor-parallel shards"):
        gather(st, "t")
    st.fork("s.tp0of2", "t.tp0of2")
    st.put_session("u", layout=LAYOUT, kv=kv, token_ids=range(100, 116), fingerprint="fp")
    slice_shard(st, "u", 1, 2)
    st.fork("u.tp1of2", "t.tp1of2")                   # rank 1 of another session's tokens
    with pytest.raises(ModelMismatchError, match="shards of session 't' disagree"):
        gather(st, "t")
    with pytest.raises(ModelMismatchError, match="cannot be split over 3 ranks"):
        slice_shard(st, "s", 0, 3)
    with pytest.raises(ModelMismatchError, match="itself a tensor-parallel shard"):
        slice_shard(st, "s.tp0of2", 0, 2)

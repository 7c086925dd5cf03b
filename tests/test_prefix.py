"""``adapters.prefix``: a cache that starts from the longest committed prefix of some token ids
(any session's blocks, or the named session's own record), on a tiny model and a real store;
greedy continuations equal a cold ``DynamicCache`` run."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from tierstore.adapters.prefix import TailIndex, resume_prefix

from support import greedy

BT = 8
pytestmark = pytest.mark.store(block_tokens=BT)


def ids(n: int, seed: int) -> list[int]:
    return torch.randint(1, 128, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def turn(store, model, token_ids: list[int], session: str, **kw) -> tuple[int, list[int]]:
    """Resume the prefix, generate 5 greedy tokens, commit: (tokens reused, new tokens)."""
    with resume_prefix(store, model, token_ids, session, commit_on_close=False, **kw) as cache:
        reused = cache.get_seq_length()
        out = greedy(model, torch.tensor([token_ids]), cache, max_new_tokens=5)
        cache.commit()
    return reused, out.sequences[0, len(token_ids):].tolist()


def cold(model, token_ids: list[int]) -> list[int]:
    return greedy(model, torch.tensor([token_ids]), DynamicCache(), max_new_tokens=5).sequences[0, len(token_ids):].tolist()


def test_any_sessions_full_blocks_are_resumed_and_continue_as_a_cold_run(store, model):
    a = ids(30, 1)
    assert turn(store, model, a, "a") == (0, cold(model, a))
    b = a[:20] + ids(9, 2)                                       # shares 2 full blocks with "a"
    reused, new = turn(store, model, b, "b")
    assert reused == 2 * BT and new == cold(model, b)
    rec = store.session("b")
    assert rec.token_ids.tolist() == b + new[:-1]                # committed: the next turn resumes it
    assert store.session("a").length == 30 + 4                   # "a" is untouched


def test_a_named_session_continues_its_own_record_and_the_last_token_is_prefilled(store, model):
    a = ids(30, 3)
    turn(store, model, a, "a")
    held = store.session("a").token_ids.tolist()                 # 34 tokens: 4 blocks + a partial one
    more = held + ids(6, 4)
    assert turn(store, model, more, "a") == (len(held), cold(model, more))  # its partial tail too
    again = store.session("a").token_ids.tolist()
    reused, _ = turn(store, model, again, "copy")                # the very same ids, another name:
    assert reused == (len(again) - 1) // BT * BT                 # whole blocks, the last token left to run


def test_reuse_off_and_a_diverged_named_session(store, model):
    a = ids(30, 5)
    turn(store, model, a, "a")
    assert turn(store, model, a[:24] + ids(4, 6), "b", reuse=False)[0] == 0
    other = ids(25, 7)                                           # "a" again, but another conversation
    assert turn(store, model, other, "a") == (0, cold(model, other))
    assert store.session("a").token_ids.tolist()[:25] == other   # the name now holds the new one
    assert not store.sessions.live_leases()                      # every lease given back


def test_a_tail_index_resumes_another_sessions_conversation_tail_included(store, model):
    tails = TailIndex()
    a = ids(30, 8)
    turn(store, model, a, "turn-1", tails=tails)
    held = store.session("turn-1")                               # 34 tokens: 4 blocks + a partial one
    tails.add(held)
    nxt = held.token_ids.tolist() + ids(7, 9)                    # the next turn, under a new name
    assert turn(store, model, nxt, "turn-2", tails=tails) == (held.length, cold(model, nxt))
    assert store.session("turn-1").length == held.length         # the earlier turn is untouched
    other = held.token_ids.tolist() + ids(7, 11)                 # (nxt's 5th block is stored now)
    assert turn(store, model, other, "plain")[0] == 4 * BT       # without the index: whole blocks only

    assert TailIndex().load(store).continued(store, held.chains()[3], nxt).name == "turn-1"  # rebuilt from disk
    store.fork("turn-1", "moved")
    tails.add(store.session("moved"))
    store.delete("turn-1")                                       # a stale hint is read, checked and passed by
    replaced = ids(34, 10)
    with resume_prefix(store, model, replaced, "moved", commit_on_close=False, reuse=False) as cache:
        greedy(model, torch.tensor([replaced]), cache, max_new_tokens=1)
        cache.commit()                                           # "moved" now holds another conversation
    last = held.token_ids.tolist() + ids(7, 12)
    assert tails.continued(store, held.chains()[3], last) is None
    assert turn(store, model, last, "turn-3", tails=tails) == (4 * BT, cold(model, last))
    assert not store.sessions.live_leases()

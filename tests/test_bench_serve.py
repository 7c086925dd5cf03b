"""`tierstore bench serve` end to end at toy scale: the tiny checkpoint, two chats of two turns;
its three phases run real servers (what they reuse is checked, never how fast)."""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi")

from tierstore.tools.bench.serve import measure  # noqa: E402

from support.models import save_tiny_checkpoint  # noqa: E402


def test_bench_serve_reuses_the_shared_document_and_resumes_after_a_restart(tmp_path):
    ck = save_tiny_checkpoint(tmp_path / "tiny")
    out = measure(ck, clients=2, turns=2, doc_tokens=80, max_tokens=4, timeout=120,
                  server_args=("--block-tokens", "16", "--max-running", "1"))  # turn 1 of chat 2 waits for chat 1's
    rows = {(r["phase"], r["turn"]): r for r in out["rows"]}
    assert set(rows) == {("reuse", 1), ("reuse", 2), ("no reuse", 1), ("no reuse", 2), ("restart", 2)}
    assert all(r["clients"] == 2 and r["ttft_p95_s"] >= r["ttft_p50_s"] > 0 for r in rows.values())
    assert rows["no reuse", 1]["reused_tokens"] == rows["no reuse", 2]["reused_tokens"] == 0
    assert rows["reuse", 1]["reused_tokens"] > 0                    # the second chat finds the first's document
    assert rows["reuse", 2]["reused_tokens"] >= 80                  # each chat's own first turn
    assert rows["restart", 2]["reused_tokens"] >= 80                # the same, from the store a new server opened
    assert rows["reuse", 2]["prompt_tokens"] == rows["no reuse", 2]["prompt_tokens"]   # the same chats

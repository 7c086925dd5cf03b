"""`tierstore chat` through the real entry point on SmolLM2: answers, commits, resumes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def _chat(store, text: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tierstore.tools.cli", "--store", str(store), "chat",
                           "--session", "c1", "--max-new-tokens", "16"], input=text, capture_output=True,
                          text=True, timeout=600)


def test_chat_answers_commits_and_resumes(tmp_path):
    store = tmp_path / "kv"
    first = _chat(store, "What is the capital of France?\n")
    assert first.returncode == 0, first.stderr[-2000:]
    assert "Paris" in first.stdout
    second = _chat(store, "And the capital of Italy?\n")
    assert second.returncode == 0, second.stderr[-2000:]
    assert "resumed 'c1'" in second.stderr and "Rome" in second.stdout
    ls = subprocess.run([sys.executable, "-m", "tierstore.tools.cli", "--store", str(store), "ls", "--json"],
                        capture_output=True, text=True, timeout=120)
    sessions = json.loads(ls.stdout)["sessions"]
    assert [s["name"] for s in sessions] == ["c1"] and sessions[0]["tokens"] > 50
    v = subprocess.run([sys.executable, "-m", "tierstore.tools.cli", "--store", str(store), "verify"],
                       capture_output=True, text=True, timeout=120)
    assert v.returncode == 0, v.stdout + v.stderr

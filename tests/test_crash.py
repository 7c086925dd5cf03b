"""Crash trials: a writer process is SIGKILLed at random instants and at crash points (prefill,
write-back, inside a commit); every session it reported as committed must resume and continue
exactly, nothing uncommitted may be visible, and ``tierstore verify`` must stay clean.

The long variant: ``tierstore bench crash --kills N`` (``tools/bench/crash.py``).
"""

from __future__ import annotations

import json

import pytest

from tierstore.tools import crash_writer as cw
from tierstore.tools.bench.crash import read_reports, run_trials

SCHEDULE = ["outside", "prefill", "writeback", "commit", "txn", "committed"]


def test_crash_trials(tmp_path):
    rep = run_trials(str(tmp_path / "kv"), kills=len(SCHEDULE), seed=7, schedule=SCHEDULE, max_life_s=1.5)
    print(f"\ncrash trials: {rep.to_json()}")
    assert rep.kills == len(SCHEDULE)
    assert rep.lost == [] and rep.damaged == [], (rep.lost, rep.damaged)
    assert rep.stale_readers == 0
    assert rep.commits_reported >= 5 and rep.sessions_checked >= rep.sessions_final >= 3
    assert sum(rep.targeted.values()) >= 3, rep.targeted     # most points were reached before the fallback


def test_report_line_cut_by_the_kill_is_not_a_report(tmp_path):
    path = tmp_path / "r.jsonl"
    whole = json.dumps({"life": 0, "op": "new", "session": "w0-0", "length": 3, "ids": [1, 2, 3]})
    path.write_text(whole + "\n" + whole[:20])
    last, n = read_reports(str(path))
    assert n == 1 and last["w0-0"]["length"] == 3


@pytest.mark.parametrize("bad", ["nowhere:1:0", "commit:x:0", "commit:1"])
def test_crash_point_spec_is_checked(bad):
    with pytest.raises((SystemExit, ValueError)):
        cw.install_crash_point(bad, model=None)

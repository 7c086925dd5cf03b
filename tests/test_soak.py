"""Concurrency soak: one writer process generates and commits sessions (``crash_writer``) while
reader processes run ``tierstore ls/show/stat/verify`` and resume (+ continue exactly) sessions
committed before, for a bounded time (``TIERSTORE_SOAK_SECONDS``, default 10). No reader sees a
torn session, nothing deadlocks (every process has a deadline), no reader slot leaks. Then two
writers on one session: the second gets ``SessionBusyError``, and the lease clears itself when
its holder is SIGKILLed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from tierstore.adapters.hf import TieredCache
from tierstore.errors import SessionBusyError
from tierstore.tools import crash_writer as cw
from tierstore.tools.bench.crash import TrialReport, check_session, check_store, read_reports, stale_readers
from tierstore.maintenance.verify import verify_store

SECONDS = float(os.environ.get("TIERSTORE_SOAK_SECONDS", "10"))
READERS = 3

_READER = textwrap.dedent("""
    import json, math, random, sys, time, torch
    torch.set_num_threads(1)
    from click.testing import CliRunner
    from tierstore.tools import crash_writer as cw
    from tierstore.tools.bench.crash import check_session
    from tierstore.tools.cli import cli
    path, mine, seconds, seed = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
    model = cw.tiny_model()
    runner, rng = CliRunner(), random.Random(seed)
    ops, problems, names, slowest = {}, [], [mine], 0.0

    def cli_json(*args):
        res = runner.invoke(cli, ["--store", path, *args, "--json"])
        if res.exit_code != 0:
            raise RuntimeError(f"{args}: exit {res.exit_code}: {res.output[-300:]}")
        return json.loads(res.stdout)

    print("ready", flush=True)
    sys.stdin.readline()
    deadline = time.time() + seconds
    while time.time() < deadline:
        op = rng.choice(["ls", "show", "verify", "stat", "resume", "resume"])
        t = time.time()
        try:
            if op == "ls":
                d = cli_json("ls")
                names = [s["name"] for s in d["sessions"]]
                torn = [s["name"] for s in d["sessions"] if s["missing_blocks"] or s["blocks"] != math.ceil(
                    s["tokens"] / cw.BLOCK_TOKENS)]
                if d["damaged"] or torn:
                    problems.append(f"ls: damaged {d['damaged']}, torn {torn}")
            elif op == "show":
                name = rng.choice(names)
                d = cli_json("show", name)
                n = d["session"]["tokens"]
                if len(d["token_ids"]) != n or any(l["missing"] or l["blocks"] != math.ceil(n / cw.BLOCK_TOKENS)
                                                   for l in d["layers"]):
                    problems.append(f"show {name}: torn: {n} tokens, layers {d['layers']}")
            elif op == "verify":
                d = cli_json("verify")
                if not d["ok"]:
                    problems.append(f"verify: {d['damage'][:3]}")
            elif op == "stat":
                d = cli_json("stat")
                if d["damaged_sessions"]:
                    problems.append(f"stat: {d['damaged_sessions']} damaged")
            else:
                with cw.open_store(path, model) as st:
                    status, why = check_session(st, model, st.session(mine), None)
                if status not in ("ok", "tie"):
                    problems.append(f"resume {mine}: {why}")
        except Exception as e:
            problems.append(f"{op}: {type(e).__name__}: {e}")
        slowest = max(slowest, time.time() - t)
        ops[op] = ops.get(op, 0) + 1
    print(json.dumps({"ops": ops, "problems": problems, "slowest": slowest}), flush=True)
""")


def _spawn(args: list[str], **kw) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("TIERSTORE_CRASH_AT", None)
    return subprocess.Popen([sys.executable, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, **kw)


def _stop(p: subprocess.Popen) -> None:
    if p.poll() is None:
        p.kill()
    p.wait(30)


@pytest.fixture(scope="module")
def model():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)          # tiny matrices: more threads only contend with the processes
    yield cw.tiny_model()
    torch.set_num_threads(threads)


def test_soak_one_writer_many_readers(tmp_path, model):
    path, report = str(tmp_path / "kv"), str(tmp_path / "reports.jsonl")
    g = torch.Generator().manual_seed(9)
    with cw.open_store(path, model) as st:                    # sessions committed before the soak
        for r in range(READERS):
            ids = torch.randint(1, cw.VOCAB, (1, 20 + 9 * r), generator=g)
            with TieredCache(st, model, session=f"stable-{r}") as cache:
                model.generate(ids, attention_mask=torch.ones_like(ids), cache=cache, max_new_tokens=6,
                               do_sample=False, pad_token_id=0)
    procs = [_spawn(["-c", _READER, path, f"stable-{r}", str(SECONDS), str(r)]) for r in range(READERS)]
    writer = _spawn(["-m", "tierstore.tools.crash_writer", path, report, "--seed", "3", "--pause", "0.15"])
    try:
        for p in procs + [writer]:
            assert p.stdout.readline() == "ready\n", p.stderr.read()[-2000:]
        t0 = time.time()
        for p in procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        results = []
        for p in procs:                                          # a deadline: a deadlock fails here
            out, err = p.communicate(timeout=SECONDS + 120)
            assert p.returncode == 0, err[-3000:]
            results.append(json.loads(out.strip().splitlines()[-1]))
        soak = time.time() - t0
        assert writer.poll() is None, writer.stderr.read()[-3000:]   # the writer never failed
        os.kill(writer.pid, signal.SIGKILL)                      # ... and dies mid-work, holding a lease
        writer.wait(30)
    finally:
        for p in procs + [writer]:
            _stop(p)
    ops: dict[str, int] = {}
    for r in results:
        for k, v in r["ops"].items():
            ops[k] = ops.get(k, 0) + v
    problems = [p for r in results for p in r["problems"]]
    reports, commits = read_reports(report)
    print(f"\nsoak: {soak:.1f} s, {READERS} readers: {sum(ops.values())} operations {ops}; writer: {commits} "
          f"commits, {len(reports)} sessions; slowest reader op {max(r['slowest'] for r in results):.2f} s")
    assert problems == []
    assert commits >= 5 and all(ops.get(k, 0) > 0 for k in ("ls", "verify", "resume"))
    rep = TrialReport()
    t1 = time.time()
    check_store(path, model, reports, {}, rep, full=True, others=("stable-",))  # every commit there, exact
    print(f"checked {rep.sessions_checked} sessions in {time.time() - t1:.1f} s")
    assert rep.lost == [] and rep.damaged == [] and rep.stale_readers == 0
    with cw.open_store(path, model) as st:
        assert stale_readers(st) == 0
        assert st.sessions.live_leases() == []                   # the killed writer's lease is gone
        for r in range(READERS):
            assert check_session(st, model, st.session(f"stable-{r}"), None)[0] in ("ok", "tie")


_HOLDER = textwrap.dedent("""
    import sys, time, torch
    torch.set_num_threads(1)
    from tierstore.adapters.hf import TieredCache
    from tierstore.tools import crash_writer as cw
    model = cw.tiny_model()
    st = cw.open_store(sys.argv[1], model)
    cache = TieredCache.resume(st, model, "contended", commit_on_close=False)
    ids = cache.full_ids(list(range(1, 30)))
    model.generate(ids, attention_mask=torch.ones_like(ids), cache=cache, max_new_tokens=4, do_sample=False,
                   pad_token_id=0)
    print("held", flush=True)       # lease held, blocks written back, nothing committed
    time.sleep(120)
""")


def test_two_writers_on_one_session_and_a_sigkilled_holder(tmp_path, model):
    path = str(tmp_path / "kv")
    ids = torch.arange(1, 25)[None]
    with cw.open_store(path, model) as st:
        with TieredCache(st, model, session="contended") as cache:
            model.generate(ids, attention_mask=torch.ones_like(ids), cache=cache, max_new_tokens=5,
                           do_sample=False, pad_token_id=0)
        before = st.session("contended")
    holder = _spawn(["-c", _HOLDER, path])
    try:
        assert holder.stdout.readline() == "held\n", holder.stderr.read()[-2000:]
        with cw.open_store(path, model) as st:
            for second in (lambda: TieredCache.resume(st, model, "contended"),
                           lambda: TieredCache(st, model, session="contended", overwrite=True),
                           lambda: st.put_session("contended", layout=before.layout, kv=st.load_session(
                               "contended")[1], token_ids=before.token_ids, fingerprint=before.fingerprint,
                               overwrite=True)):
                with pytest.raises(SessionBusyError) as e:
                    second()
                assert e.value.session == "contended" and f"pid {holder.pid}" in str(e.value)
            assert not model._forward_pre_hooks
            assert [x.pid for x in st.sessions.live_leases()] == [holder.pid]
            assert st.session("contended").token_ids.tolist() == before.token_ids.tolist()
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(30)
    finally:
        _stop(holder)
    with cw.open_store(path, model) as st:
        assert st.sessions.live_leases() == []                   # cleared by the holder's death
        assert verify_store(st).ok                               # its blocks: orphans, not damage
        assert st.session("contended").token_ids.tolist() == before.token_ids.tolist()
        with TieredCache.resume(st, model, "contended") as cache:  # taken over
            more = cache.full_ids([5, 6, 7])
            model.generate(more, attention_mask=torch.ones_like(more), cache=cache, max_new_tokens=3,
                           do_sample=False, pad_token_id=0)
        assert check_session(st, model, st.session("contended"), None)[0] in ("ok", "tie")
        assert st.gc().deleted

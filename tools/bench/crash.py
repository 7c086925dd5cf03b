"""`tierstore bench crash`: SIGKILL a writer at random instants; nothing committed may be lost.

Each *life* starts ``crash_writer`` on the trial store and kills it: half the lives from outside
after a random delay, half at a crash point inside the writer (prefill, decode, write-back, the
commit's tail block, entering the commit, inside a write transaction, after the commit returned),
cycling through the points, with a random count and a random microsecond delay so the kill lands
inside the C call that follows. After every kill the store is reopened and checked:

* ``verify`` finds no damage (orphans are allowed: written, never committed);
* no reader slot of a dead process is left in the lock file;
* every session the writer reported is stored, at least as long as reported, and extends the
  reported token ids (a commit may land after its report was lost: then it is longer);
* every new or changed session is exact: its stored K/V and last logits equal a DynamicCache
  prefill of its token ids, and after ``TieredCache.resume`` greedy generation continues exactly
  as DynamicCache does (a divergence counts as damage unless the reference's top-2 logits are
  within 1e-4: a tie that float noise may break either way).

The end: ``tierstore verify`` (the CLI) exits 0, ``tierstore gc`` reclaims the crash debris and
every session is checked once more. Figures: kills, sessions checked, lost, damaged.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field

import click

from .. import crash_writer as cw

KV_TOL = 1e-4         # fp32: K/V and logits of a stored session vs a DynamicCache prefill
TIE = 1e-4            # top-2 logit margin below which greedy may pick either token
CONTINUE_TOKENS = 4


@dataclass
class TrialReport:
    kills: int = 0
    targeted: dict = field(default_factory=dict)   # crash point -> kills that landed there
    outside: int = 0                                # kills from outside after a random delay
    commits_reported: int = 0
    sessions_checked: int = 0                       # session states checked for exactness
    sessions_final: int = 0                         # sessions in the store at the end
    lost: list = field(default_factory=list)
    damaged: list = field(default_factory=list)
    ties: int = 0
    stale_readers: int = 0
    orphans_reclaimed: int = 0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.lost and not self.damaged and not self.stale_readers

    def to_json(self) -> dict:
        return {**asdict(self), "ok": self.ok}


# -- reading the report file -----------------------------------------------------------------


def read_reports(path: str) -> tuple[dict[str, dict], int]:
    """Last report line per session, and the number of lines. A final line cut by the kill
    (not yet whole when the writer died) is skipped: its commit is unreported, not lost."""
    last: dict[str, dict] = {}
    n = 0
    if not os.path.exists(path):
        return last, 0
    with open(path, "rb") as f:
        for raw in f:
            try:
                r = json.loads(raw)
            except ValueError:
                continue
            last[r["session"]] = r
            n += 1
    return last, n


# -- checking ----------------------------------------------------------------------------------


def _dead(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return False
    except ProcessLookupError:
        return True
    except PermissionError:
        return False


def stale_readers(store) -> int:
    """Reader slots in the lock file that belong to processes that no longer exist."""
    lines = store.cold.env.readers().splitlines()[1:]
    return sum(1 for ln in lines if ln.split() and _dead(int(ln.split()[0])))


def _tie_at(scores, step: int) -> bool:
    top = scores[step][0].float().topk(2).values
    return float(top[0] - top[1]) < TIE


def check_session(store, model, rec, reported: dict | None) -> tuple[str, str]:
    """("ok" | "tie" | "lost" | "damaged", why) for one committed session."""
    import torch
    from transformers import DynamicCache

    from tierstore.adapters.hf import TieredCache

    ids = rec.token_ids.tolist()
    if reported is not None and (rec.length < reported["length"] or ids[:reported["length"]] != reported["ids"]):
        return "lost", f"{rec.name}: stored {rec.length} tokens do not extend the {reported['length']} reported"
    with torch.no_grad():
        ref = DynamicCache()
        out = model(input_ids=torch.tensor([ids]), cache=ref, use_cache=True)
    _, kv = store.load_session(rec.name)
    for layer, (k, v) in enumerate(kv):
        dk = (k - ref.layers[layer].keys[0]).abs().max().item()
        dv = (v - ref.layers[layer].values[0]).abs().max().item()
        if max(dk, dv) > KV_TOL:
            return "damaged", f"{rec.name}: layer {layer} K/V differ from a DynamicCache prefill by {max(dk, dv):.2e}"
    if rec.last_logits is not None:
        d = (torch.from_numpy(rec.last_logits) - out.logits[0, -1]).abs().max().item()
        if d > KV_TOL:
            return "damaged", f"{rec.name}: stored last logits differ by {d:.2e}"
    full = torch.tensor([ids + [1 + rec.length % (cw.VOCAB - 1)]])
    kw = dict(attention_mask=torch.ones_like(full), max_new_tokens=CONTINUE_TOKENS, do_sample=False,
              pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    want = model.generate(full, cache=DynamicCache(), **kw)
    with TieredCache.resume(store, model, rec.name, commit_on_close=False) as cache:
        got = model.generate(full, cache=cache, **kw)
    if torch.equal(got.sequences, want.sequences):
        return "ok", ""
    n = full.shape[1]
    step = next(i for i in range(CONTINUE_TOKENS) if got.sequences[0, n + i] != want.sequences[0, n + i])
    close = all((a - b).abs().max().item() < 1e-3 for a, b in zip(got.scores[:step + 1], want.scores[:step + 1]))
    if close and _tie_at(want.scores, step):
        return "tie", ""
    return "damaged", f"{rec.name}: continuation after resume diverges from DynamicCache at step {step}"


def check_store(path: str, model, reports: dict[str, dict], checked: dict[str, tuple], rep: TrialReport,
                *, full: bool = False, others: tuple[str, ...] = ()) -> None:
    """Reopen the store after a kill and check it (see the module docstring). ``checked``
    remembers the session states already proven exact; ``full`` checks every session again;
    ``others``: name prefixes of sessions the writer did not create (checked all the same)."""
    from tierstore.maintenance.verify import verify_store

    with cw.open_store(path, model) as st:
        rep.stale_readers += stale_readers(st)
        v = verify_store(st)
        rep.damaged += [f"verify: {p.where()}: {p.reason}" for p in v.damage]
        records = []
        for r in st.sessions.records():
            if isinstance(r, Exception):
                rep.damaged.append(f"record: {r}")
            else:
                records.append(r)
        names = {r.name for r in records}
        rep.lost += [f"{n}: reported ({reports[n]['length']} tokens) but not stored" for n in reports if n not in names]
        for rec in records:
            if not rec.name.startswith(("w", "f", *others)):
                rep.damaged.append(f"{rec.name}: a session the writer never created")
                continue
            state = (rec.length, rec.updated)
            if not full and checked.get(rec.name) == state:
                continue
            try:
                status, why = check_session(st, model, rec, reports.get(rec.name))
            except Exception as e:  # noqa: BLE001 - any failure to read a committed session is damage
                status, why = "damaged", f"{rec.name}: {type(e).__name__}: {e}"
            rep.sessions_checked += 1
            rep.ties += status == "tie"
            if status == "lost":
                rep.lost.append(why)
            elif status == "damaged":
                rep.damaged.append(why)
            checked[rec.name] = state
        rep.sessions_final = len(records)


# -- the driver --------------------------------------------------------------------------------


def _start(path: str, report: str, seed: int, life: int, crash_at: str | None, errlog) -> subprocess.Popen:
    env = {**os.environ, "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1"}
    env.pop("TIERSTORE_CRASH_AT", None)
    if crash_at:
        env["TIERSTORE_CRASH_AT"] = crash_at
    p = subprocess.Popen([sys.executable, "-m", "tierstore.tools.crash_writer", path, report, "--seed", str(seed),
                          "--life", str(life)], stdout=subprocess.PIPE, stderr=errlog, env=env, text=True)
    line = p.stdout.readline()
    if line.strip() != "ready":
        p.kill()
        p.wait()
        raise RuntimeError(f"crash writer (life {life}) did not start: {line!r}; see {errlog.name}")
    return p


def _kill(p: subprocess.Popen) -> None:
    if p.poll() is None:
        p.send_signal(signal.SIGKILL)
    p.wait(30)
    p.stdout.close()


def default_schedule(kills: int) -> list[str]:
    """Every other life is killed from outside; the others cycle through the crash points."""
    return ["outside" if life % 2 == 0 else cw.POINTS[(life // 2) % len(cw.POINTS)] for life in range(kills)]


def run_trials(path: str, *, kills: int, seed: int = 0, schedule: list[str] | None = None,
               max_life_s: float = 3.0, targeted_wait_s: float = 6.0, progress=None) -> TrialReport:
    """``kills`` writer lives on the store in ``path`` (created), each ended by SIGKILL: from
    outside after a random delay (``"outside"`` in ``schedule``) or at a crash point."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: more threads only contend (with the writer too)
    try:
        return _run_trials(path, kills=kills, seed=seed, schedule=schedule or default_schedule(kills),
                           max_life_s=max_life_s, targeted_wait_s=targeted_wait_s, progress=progress)
    finally:
        torch.set_num_threads(threads)


def _run_trials(path: str, *, kills: int, seed: int, schedule: list[str], max_life_s: float,
                targeted_wait_s: float, progress) -> TrialReport:
    os.makedirs(path, exist_ok=True)
    report = os.path.abspath(os.path.join(path, "..", os.path.basename(path) + ".reports.jsonl"))
    rng = random.Random(seed)
    model = cw.tiny_model()
    rep = TrialReport()
    checked: dict[str, tuple] = {}
    t0 = time.perf_counter()
    with open(report + ".stderr", "a") as errlog:
        for life in range(kills):
            point = schedule[life % len(schedule)]
            targeted = point != "outside"
            crash_at = None
            if targeted:
                crash_at = f"{point}:{rng.randint(1, 8)}:{rng.choice([0, rng.randint(1, 3000)])}"
            p = _start(path, report, seed, life, crash_at, errlog)
            if targeted:
                try:
                    p.wait(targeted_wait_s)
                except subprocess.TimeoutExpired:
                    crash_at = None  # the point was not reached in time: a kill from outside instead
            else:
                time.sleep(rng.uniform(min(0.3, max_life_s), max_life_s))
            code = p.poll()
            if code is not None and code != -signal.SIGKILL:
                raise RuntimeError(f"crash writer (life {life}) exited by itself with code {code}; see {errlog.name}")
            _kill(p)
            rep.kills += 1
            if crash_at:
                point = crash_at.split(":")[0]
                rep.targeted[point] = rep.targeted.get(point, 0) + 1
            else:
                rep.outside += 1
            reports, rep.commits_reported = read_reports(report)
            check_store(path, model, reports, checked, rep)
            if progress:
                progress(life, rep)
    reports, rep.commits_reported = read_reports(report)
    _final(path, model, reports, checked, rep)
    rep.lost, rep.damaged = sorted(set(rep.lost)), sorted(set(rep.damaged))  # each round reports again
    rep.seconds = time.perf_counter() - t0
    return rep


def _final(path: str, model, reports, checked, rep: TrialReport) -> None:
    """The CLI's verify exits 0, gc reclaims the debris, and every session is exact afterwards."""
    from click.testing import CliRunner

    from ..cli import cli

    runner = CliRunner()
    res = runner.invoke(cli, ["--store", path, "verify", "--json"])
    if res.exit_code != 0:
        rep.damaged.append(f"tierstore verify exited {res.exit_code}: {res.output[-500:]}")
    res = runner.invoke(cli, ["--store", path, "gc", "--json"])
    if res.exit_code != 0:
        rep.damaged.append(f"tierstore gc exited {res.exit_code}: {res.output[-500:]}")
    else:
        rep.orphans_reclaimed = json.loads(res.stdout)["orphan_records"]
    check_store(path, model, reports, checked, rep, full=True)
    res = runner.invoke(cli, ["--store", path, "verify", "--json"])
    if res.exit_code != 0:
        rep.damaged.append(f"tierstore verify after gc exited {res.exit_code}: {res.output[-500:]}")


@click.command("crash")
@click.option("--kills", type=click.IntRange(min=1), default=30, show_default=True, help="Writer lives, each SIGKILLed.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds kill timing, points and workloads.")
@click.option("--store", "path", type=click.Path(file_okay=False), default=None,
              help="Trial store directory (default: a temporary one, removed afterwards).")
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
def crash(kills: int, seed: int, path: str | None, as_json: bool) -> None:
    """SIGKILL a writer KILLS times (random instants and crash points); check that every
    committed session survives exactly. Prints kills / sessions checked / lost / damaged."""
    tmp = None
    if path is None:
        tmp = tempfile.mkdtemp(prefix="tierstore-crash-")
        path = os.path.join(tmp, "kv")

    def progress(life: int, r: TrialReport) -> None:
        if not as_json:
            click.echo(f"life {life + 1}/{kills}: {r.commits_reported} commits reported, {r.sessions_checked} "
                       f"checked, {len(r.lost)} lost, {len(r.damaged)} damaged", err=True)

    try:
        rep = run_trials(path, kills=kills, seed=seed, progress=progress)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    if as_json:
        click.echo(json.dumps(rep.to_json(), indent=2))
    else:
        from ..cli import render

        con = render.console()
        con.print(render.kv_table([
            ("kills", f"{rep.kills} ({rep.outside} from outside at random instants; at crash points: "
                      + ", ".join(f"{k} {v}" for k, v in sorted(rep.targeted.items())) + ")"),
            ("commits reported", rep.commits_reported),
            ("sessions checked", f"{rep.sessions_checked} session states ({rep.sessions_final} sessions at the end)"),
            ("lost", len(rep.lost)), ("damaged", len(rep.damaged)),
            ("greedy ties", rep.ties), ("stale reader slots", rep.stale_readers),
            ("orphans reclaimed by gc", rep.orphans_reclaimed), ("seconds", f"{rep.seconds:.1f}"),
        ]))
        for why in rep.lost + rep.damaged:
            con.print(f"  {why}")
    if not rep.ok:
        raise click.exceptions.Exit(1)

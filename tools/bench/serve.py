"""`tierstore bench serve`: time to first token through `tierstore serve`, with prefix resume vs
the same server with reuse off, and after a restart (SmolLM2-135M by default).

``--clients`` concurrent chats (threads, loopback only, every request under a timeout) of
``--turns`` turns each over one shared document of ``--doc-tokens`` tokens: the first user message
is the document and a question, later turns ask short questions, replies are greedy. Every turn
starts for all clients at once (a barrier), so a turn's requests queue behind each other as they
would on a busy server. TTFT is what a client sees: request sent -> first content chunk of the
stream. Each server first answers one short untimed request (its pools and threads start once per
process, not per turn). Three phases, each its own server process:

* reuse: a new store; every request resumes the longest stored prefix (other clients' document
  blocks from turn 1 on, the chat's own history later);
* no reuse: ``--no-reuse`` over a new store, the same chats (every prompt prefilled whole);
* restart: the reuse phase's store under a new server process; each chat's last turn asks a new
  question, so its prefix (the history through the turn before) comes from the store's LMDB file
  (which the OS may still cache), not from the process.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import threading
import time
from pathlib import Path

import click
import numpy as np

QUESTIONS = ("What is this text about?", "Which keyword does it explain first?", "Summarise that in one line.",
             "Give an example.", "What else does it mention?", "Is there a caveat?", "Anything more?", "Thanks!")
AFTER_RESTART = "Remind me: what was the first answer about?"


def _stream(url: str, model: str, messages: list[dict], max_tokens: int, timeout: float) -> dict:
    """One streamed greedy chat turn: ttft_s, the reply text, prompt and reused token counts."""
    import httpx

    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft, parts, usage = None, [], {}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=timeout) as r:
        if r.status_code != 200:
            raise click.ClickException(f"server answered {r.status_code}: {r.read().decode()[:500]}")
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise click.ClickException(f"server error: {chunk['error']['message']}")
            if chunk.get("usage"):
                usage = chunk["usage"]
            for c in chunk.get("choices", ()):
                text = c["delta"].get("content")
                if text:
                    ttft = ttft if ttft is not None else time.perf_counter() - t0
                    parts.append(text)
    return {"ttft_s": ttft if ttft is not None else time.perf_counter() - t0, "reply": "".join(parts),
            "prompt_tokens": usage.get("prompt_tokens", 0),
            "reused_tokens": usage.get("prompt_tokens_details", {}).get("cached_tokens", 0)}


def _warm_up(url: str, model: str, timeout: float) -> None:
    _stream(url, model, [{"role": "user", "content": "Hello!"}], 1, timeout)


def _run_chats(url: str, model: str, chats: list[list[dict]], questions: list[list[str]], max_tokens: int,
               timeout: float) -> list[list[dict]]:
    """Run every chat's turns, one thread per chat, all clients starting each turn together.
    ``chats[i]``: the messages so far (extended in place); returns per turn, per client, the result."""
    turns = len(questions[0])
    results: list[list[dict | None]] = [[None] * len(chats) for _ in range(turns)]
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(chats), timeout=timeout)

    def client(i: int) -> None:
        try:
            for k in range(turns):
                barrier.wait()
                chats[i].append({"role": "user", "content": questions[i][k]})
                res = _stream(url, model, chats[i], max_tokens, timeout)
                chats[i].append({"role": "assistant", "content": res["reply"]})
                results[k][i] = res
        except BaseException as e:  # noqa: BLE001 - reported once the threads are joined
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(len(chats))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout * turns)
    if errors or any(t.is_alive() for t in threads):
        raise errors[0] if errors and not isinstance(errors[0], threading.BrokenBarrierError) else \
            click.ClickException(f"a client failed or hung: {errors[:1]}")
    return results  # type: ignore[return-value]


def _row(phase: str, turn: int, res: list[dict]) -> dict:
    ttft = np.array([r["ttft_s"] for r in res])
    return {"phase": phase, "turn": turn, "clients": len(res), "ttft_p50_s": float(np.percentile(ttft, 50)),
            "ttft_p95_s": float(np.percentile(ttft, 95)),
            "prompt_tokens": float(np.mean([r["prompt_tokens"] for r in res])),
            "reused_tokens": float(np.mean([r["reused_tokens"] for r in res]))}


def document(model: str, tokens: int) -> str:
    """The shared document: ``tokens`` tokens of English prose under the served model's tokenizer."""
    from transformers import AutoTokenizer

    from tierstore.adapters.models import long_text
    if model == "smollm2":
        from tierstore.adapters.models import load_smollm2
        tok = load_smollm2()[1]
    else:
        tok = AutoTokenizer.from_pretrained(model, local_files_only=True)
    ids = tok(long_text(tokens * 6), add_special_tokens=False).input_ids[:tokens]
    return tok.decode(ids)


def measure(model: str, clients: int, turns: int, doc_tokens: int, max_tokens: int, *, timeout: float = 900,
            server_args: tuple[str, ...] = ()) -> dict:
    from tierstore.tools.serve.process import ServerProcess

    doc = document(model, doc_tokens)
    name = model.rstrip("/").rsplit("/", 1)[-1]
    questions = [[(f"{doc}\n\n" if k == 0 else "") + QUESTIONS[(i + k) % len(QUESTIONS)] for k in range(turns)]
                 for i in range(clients)]
    work = Path(tempfile.mkdtemp(prefix="tierstore-bench-serve-"))
    rows, history = [], None
    try:
        for phase, store, extra in (("reuse", "kv", ()), ("no reuse", "kv-noreuse", ("--no-reuse",))):
            with ServerProcess(["--model", model, "--store", str(work / store), *server_args, *extra],
                               work / f"{store}.log") as srv:
                _warm_up(srv.url, name, timeout)
                chats: list[list[dict]] = [[] for _ in range(clients)]
                res = _run_chats(srv.url, name, chats, questions, max_tokens, timeout)
                rows += [_row(phase, k + 1, r) for k, r in enumerate(res)]
                history = history or [c[:-2] for c in chats]  # through turn - 1, from the reuse phase
        with ServerProcess(["--model", model, "--store", str(work / "kv"), *server_args],
                           work / "restart.log") as srv:
            _warm_up(srv.url, name, timeout)
            ask = (f"{doc}\n\n" if turns == 1 else "") + AFTER_RESTART
            res = _run_chats(srv.url, name, history, [[ask]] * clients, max_tokens, timeout)
            rows.append(_row("restart", turns, res[0]))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    base = {r["turn"]: r["ttft_p50_s"] for r in rows if r["phase"] == "no reuse"}
    for r in rows:
        r["speedup_p50"] = base[r["turn"]] / r["ttft_p50_s"]
    return {"bench": "serve", "model": model, "clients": clients, "turns": turns, "doc_tokens": doc_tokens,
            "max_tokens": max_tokens, "rows": rows}


@click.command("serve")
@click.option("--model", default="smollm2", show_default=True, help="`smollm2` or a local checkpoint folder")
@click.option("--clients", default=4, show_default=True, help="concurrent chats")
@click.option("--turns", default=4, show_default=True, type=click.IntRange(1, len(QUESTIONS)))
@click.option("--doc-tokens", default=4096, show_default=True, help="tokens of the shared document")
@click.option("--max-tokens", default=16, show_default=True, help="reply length per turn")
@click.option("--timeout", default=900.0, show_default=True, help="seconds any one request or turn may take")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
def serve(model: str, clients: int, turns: int, doc_tokens: int, max_tokens: int, timeout: float,
          as_json: bool) -> None:
    """TTFT p50/p95 per turn through `tierstore serve`: prefix resume vs reuse off vs after a restart."""
    out = measure(model, clients, turns, doc_tokens, max_tokens, timeout=timeout)
    if as_json:
        click.echo(json.dumps(out, indent=2))
        return
    from rich.console import Console
    from rich.table import Table
    t = Table(title=f"tierstore serve: time to first token, {clients} concurrent chats over a shared "
                    f"{doc_tokens}-token document ({model}, {max_tokens}-token replies, this machine)")
    for c in ("phase", "turn", "prompt tokens", "reused tokens", "TTFT p50 s", "TTFT p95 s", "p50 vs no reuse"):
        t.add_column(c, justify="right")
    for r in out["rows"]:
        t.add_row(r["phase"], str(r["turn"]), f"{r['prompt_tokens']:.0f}", f"{r['reused_tokens']:.0f}",
                  f"{r['ttft_p50_s']:.3f}", f"{r['ttft_p95_s']:.3f}", f"{r['speedup_p50']:.1f}x")
    Console().print(t)

"""`tierstore bench continuation`: does a session resumed in a new process continue exactly as
the uninterrupted run does? (SmolLM2-135M, any dtype, a bounded hot budget.)

Process A prefills the context under ``--hot``/``--warm``, commits, and goes on generating
``--new`` greedy tokens; process B (a fresh interpreter) resumes the session from disk under
its own budget (``--resume-hot``) and generates ``--new`` tokens. The table compares the tokens
and the logits bit for bit: residency differs between the two (what a resume restores, what
the prefill left hot), so only one order of arithmetic makes them equal.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile

import click
import torch

from tierstore.layout import dtype_from_name


def _generate(model, cache, ids: torch.Tensor, new: int) -> tuple[list[int], torch.Tensor]:
    out = model.generate(ids, cache=cache, max_new_tokens=new, do_sample=False, output_scores=True,
                         return_dict_in_generate=True, pad_token_id=0)
    return out.sequences[0, ids.shape[1]:].tolist(), torch.stack(out.scores)[:, 0].float()


def run_a(path: str, tokens: int, new: int, dtype: str, hot: str, warm: str) -> dict:
    import tierstore
    from tierstore.adapters.hf import TieredCache
    from tierstore.adapters.models import load_smollm2, long_text

    model, tok = load_smollm2(dtype_from_name(dtype))
    ids = tok(long_text(tokens * 6), return_tensors="pt").input_ids[:, :tokens]
    with tierstore.open(path, hot=hot, warm=warm) as st, \
            TieredCache(st, model, session="cont", commit_on_close=False) as cache:
        with torch.no_grad():
            for s in range(0, tokens, 1024):
                model(input_ids=ids[:, s:s + 1024], cache=cache, use_cache=True, logits_to_keep=1)
        cache.commit(ids)
        history = cache.full_ids()
        # what the resumed process sees: the stored last logits give the first token
        first = int(cache.last_logits[0].argmax())
        toks, logits = _generate(model, cache, torch.cat([history, torch.tensor([[first]])], 1), new - 1)
        in_place = st.manager.counters.warm_in_place
    return {"tokens": [first] + toks, "logits": logits.tolist(), "warm_reads": in_place}


def run_b(path: str, new: int, dtype: str, hot: str, warm: str) -> dict:
    import tierstore
    from tierstore.adapters.hf import TieredCache
    from tierstore.adapters.models import load_smollm2

    model, _ = load_smollm2(dtype_from_name(dtype))
    with tierstore.open(path, hot=hot, warm=warm) as st, \
            TieredCache.resume(st, model, "cont", commit_on_close=False) as cache:
        first = int(cache.last_logits[0].argmax())
        toks, logits = _generate(model, cache, cache.full_ids([first]), new - 1)
        restored = st.manager.counters.promotions.get("cold", 0)
    return {"tokens": [first] + toks, "logits": logits.tolist(), "restored": restored}


@click.command("continuation")
@click.option("--tokens", default=8192, show_default=True, help="context length")
@click.option("--new", default=12, show_default=True, help="tokens generated after the context")
@click.option("--dtype", "dtypes", default="bfloat16,float32", show_default=True)
@click.option("--hot", default="64MiB", show_default=True, help="hot budget of the uninterrupted run")
@click.option("--resume-hot", default="48MiB", show_default=True, help="hot budget of the resumed run")
@click.option("--warm", default="256MiB", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
@click.option("--part", type=click.Choice(["a", "b"]), hidden=True)
@click.option("--path", hidden=True)
def continuation(tokens: int, new: int, dtypes: str, hot: str, resume_hot: str, warm: str, as_json: bool,
                 part: str | None, path: str | None) -> None:
    """A resumed session (new process) vs the uninterrupted run: same tokens, same logits?"""
    if part is not None:  # one half, in its own process
        dt = dtypes.split(",")[0]
        res = run_a(path, tokens, new, dt, hot, warm) if part == "a" else run_b(path, new, dt, resume_hot, warm)
        click.echo(json.dumps(res))
        return
    rows = []
    for dt in dtypes.split(","):
        with tempfile.TemporaryDirectory(prefix="tierstore-cont-") as d:
            halves = {}
            for p in ("a", "b"):
                cmd = [sys.executable, "-m", "tierstore.tools.cli", "bench", "continuation", "--part", p,
                       "--path", d, "--tokens", str(tokens), "--new", str(new), "--dtype", dt, "--hot", hot,
                       "--resume-hot", resume_hot, "--warm", warm]
                out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
                halves[p] = json.loads(out.strip().splitlines()[-1])
        a, b = halves["a"], halves["b"]
        la, lb = torch.tensor(a["logits"]), torch.tensor(b["logits"])
        rows.append({"dtype": dt, "tokens": tokens, "new": new, "same_tokens": a["tokens"] == b["tokens"],
                     "same_logits": bool(torch.equal(la, lb)), "max_dlogit": float((la - lb).abs().max()),
                     "a_tokens": a["tokens"], "b_tokens": b["tokens"], "a_warm_reads": a["warm_reads"],
                     "b_restored_blocks": b["restored"]})
    if as_json:
        click.echo(json.dumps({"bench": "continuation", "rows": rows}, indent=2))
        return
    from rich.console import Console
    from rich.table import Table
    t = Table(title=f"resumed in a new process (hot={resume_hot}) vs uninterrupted (hot={hot}), SmolLM2-135M, "
                    f"{tokens} tokens + {new}")
    for c in ("dtype", "same tokens", "same logits (bits)", "max |dlogit|", "uninterrupted", "resumed"):
        t.add_column(c)
    for r in rows:
        t.add_row(r["dtype"], str(r["same_tokens"]), str(r["same_logits"]), f"{r['max_dlogit']:.3g}",
                  " ".join(map(str, r["a_tokens"])), " ".join(map(str, r["b_tokens"])))
    Console().print(t)

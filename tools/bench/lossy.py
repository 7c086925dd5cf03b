"""`tierstore bench lossy`: do sessions stored with a lossy cold codec still answer? (SmolLM2-135M)

Each needle case of ``tierstore bench quality`` (same generator, same seed) and each held-out
prose text is prefilled once with DynamicCache; its KV is then stored once per codec
(``put_session``) and resumed (``TieredCache.resume``), exact attention, so the codec is the only
difference:

* needle: the answer after the resume contains the code (greedy, ``--answer-tokens``);
* same answer: the greedy tokens equal the raw codec's, and where they first differ;
* ppl: perplexity of the ``--ppl-tokens`` continuation, teacher-forced through the resumed cache,
  against raw (``ppl x`` = ppl / raw ppl);
* K/V error: relative L2 error of the decoded K and V against the stored ones.

The first codec (raw) must answer exactly as DynamicCache does, or the bench stops.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile

import click
import torch


def _store_and_resume(st, model, name: str, kv, ids: list[int], logits, codec: str):
    from tierstore.adapters.fingerprint import kv_layout, model_fingerprint
    from tierstore.adapters.hf import TieredCache
    fp, fields = model_fingerprint(model)
    lay = kv_layout(model, st.config.block_tokens)
    st.put_session(name, layout=lay, kv=kv, token_ids=ids, fingerprint=fp, fingerprint_fields=fields,
                   last_logits=logits, codec=codec, overwrite=True)
    return TieredCache.resume(st, model, name, commit_on_close=False)


def _kv_error(st, name: str, kv) -> tuple[float, float]:
    _, got = st.load_session(name)
    ek = math.sqrt(sum(float((g[0].float() - w[0].float()).pow(2).sum()) for g, w in zip(got, kv))
                   / sum(float(w[0].float().pow(2).sum()) for w in kv))
    ev = math.sqrt(sum(float((g[1].float() - w[1].float()).pow(2).sum()) for g, w in zip(got, kv))
                   / sum(float(w[1].float().pow(2).sum()) for w in kv))
    return ek, ev


def _prefill(model, ids: list[int]):
    from transformers import DynamicCache
    dyn = DynamicCache()
    with torch.no_grad():
        for s in range(0, len(ids), 1024):
            out = model(input_ids=torch.tensor([ids[s:s + 1024]]), cache=dyn, use_cache=True, logits_to_keep=1)
    return dyn, out.logits[0, -1].float().numpy()


def measure(model, tok, *, tokens: int, cases: int, codecs: list[str], answer_tokens: int, ppl_tokens: int,
            ppl_cases: int, seed: int) -> dict:
    import tierstore
    from pydoc_data.topics import topics

    from .quality.eval import is_correct, make_case, make_ppl_text

    text = "\n\n".join(topics[k] for k in sorted(topics))
    d = tempfile.mkdtemp(prefix="tierstore-bench-lossy-")
    rows = []
    try:
        with tierstore.open(d, hot="2GiB", warm="1GiB") as st:
            for i in range(cases):
                case = make_case(tok, text, seed, tokens, i)
                ctx = case.ids[:-1]          # the cache holds all but the last prompt token
                dyn, logits = _prefill(model, ctx)
                kv = [(layer.keys[0], layer.values[0]) for layer in dyn.layers]
                ref = None
                for codec in codecs:
                    cache = _store_and_resume(st, model, "lossy", kv, ctx, logits, codec)
                    out = model.generate(torch.tensor([case.ids]), cache=cache, max_new_tokens=answer_tokens,
                                         do_sample=False, pad_token_id=0)[0, len(case.ids):].tolist()
                    cache.close()
                    ek, ev = _kv_error(st, "lossy", kv)
                    ref = out if ref is None else ref
                    diverge = next((j for j, (a, b) in enumerate(zip(out, ref)) if a != b), None)
                    rows.append({"kind": "needle", "case": i, "codec": codec, "answer": tok.decode(out),
                                 "correct": is_correct(tok.decode(out), case.code), "same_as_raw": out == ref,
                                 "first_difference": diverge, "k_err": ek, "v_err": ev})
                dyn_out = model.generate(torch.tensor([case.ids]), cache=dyn, max_new_tokens=answer_tokens,
                                         do_sample=False, pad_token_id=0)[0, len(case.ids):].tolist()
                if dyn_out != ref:
                    raise AssertionError(f"case {i}: the {codecs[0]} resume answers {ref}, DynamicCache {dyn_out}")
                del dyn, kv
            for i in range(ppl_cases if ppl_tokens else 0):
                ctx, cont = make_ppl_text(tok, text, seed, tokens, ppl_tokens, i)
                dyn, logits = _prefill(model, ctx[:-1])
                kv = [(layer.keys[0], layer.values[0]) for layer in dyn.layers]
                for codec in codecs:
                    cache = _store_and_resume(st, model, "lossy", kv, ctx[:-1], logits, codec)
                    feed = torch.tensor([[ctx[-1]] + cont[:-1]])
                    with torch.no_grad():
                        lg = model(input_ids=feed, cache=cache, use_cache=True).logits[0].float()
                    cache.close()
                    nll = torch.nn.functional.cross_entropy(lg, torch.tensor(cont), reduction="mean").item()
                    rows.append({"kind": "ppl", "case": i, "codec": codec, "nll": nll})
                del dyn, kv
    finally:
        shutil.rmtree(d, ignore_errors=True)
    summary = []
    for codec in codecs:
        nd = [r for r in rows if r["kind"] == "needle" and r["codec"] == codec]
        pp = [r for r in rows if r["kind"] == "ppl" and r["codec"] == codec]
        raw_pp = [r for r in rows if r["kind"] == "ppl" and r["codec"] == codecs[0]]
        ppl = math.exp(sum(r["nll"] for r in pp) / len(pp)) if pp else None
        raw_ppl = math.exp(sum(r["nll"] for r in raw_pp) / len(raw_pp)) if raw_pp else None
        summary.append({"codec": codec, "cases": len(nd), "needle_acc": sum(r["correct"] for r in nd) / max(1, len(nd)),
                        "same_answer": sum(r["same_as_raw"] for r in nd) / max(1, len(nd)),
                        "k_err": sum(r["k_err"] for r in nd) / max(1, len(nd)),
                        "v_err": sum(r["v_err"] for r in nd) / max(1, len(nd)),
                        "ppl": ppl, "ppl_vs_raw": ppl / raw_ppl if ppl and raw_ppl else None})
    return {"bench": "lossy", "tokens": tokens, "dtype": str(model.dtype).removeprefix("torch."),
            "summary": summary, "rows": rows}


@click.command("lossy")
@click.option("--tokens", default=4096, show_default=True, help="prompt length")
@click.option("--cases", default=6, show_default=True, help="needle cases (the quality bench's generator)")
@click.option("--codecs", default="raw,int8,int4,int4:g16", show_default=True, help="first one is the reference")
@click.option("--answer-tokens", default=8, show_default=True)
@click.option("--ppl-tokens", default=128, show_default=True, help="held-out continuation per ppl text (0: skip)")
@click.option("--ppl-cases", default=2, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--dtype", default="float32", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
def lossy(tokens, cases, codecs, answer_tokens, ppl_tokens, ppl_cases, seed, dtype, as_json) -> None:
    """Needle accuracy, answers and perplexity of sessions resumed from lossy codecs (SmolLM2-135M)."""
    from tierstore.adapters.models import load_smollm2
    from tierstore.layout import dtype_from_name
    model, tok = load_smollm2(dtype_from_name(dtype))
    res = measure(model, tok, tokens=tokens, cases=cases, codecs=[c.strip() for c in codecs.split(",")],
                  answer_tokens=answer_tokens, ppl_tokens=ppl_tokens, ppl_cases=ppl_cases, seed=seed)
    if as_json:
        click.echo(json.dumps(res, indent=1))
        return
    from rich.console import Console
    from rich.table import Table
    t = Table(title=f"sessions resumed from each cold codec, {tokens} tokens {res['dtype']} (SmolLM2-135M)")
    for c in ("codec", "cases", "needle acc", "same answer as raw", "K err", "V err", "ppl", "ppl x raw"):
        t.add_column(c, justify="right")
    for s in res["summary"]:
        t.add_row(s["codec"], str(s["cases"]), f"{s['needle_acc']:.0%}", f"{s['same_answer']:.0%}",
                  f"{s['k_err']:.2%}", f"{s['v_err']:.2%}", "-" if s["ppl"] is None else f"{s['ppl']:.2f}",
                  "-" if s["ppl_vs_raw"] is None else f"{s['ppl_vs_raw']:.3f}")
    Console().print(t)

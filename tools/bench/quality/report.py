"""The quality benchmark's report: per-cell summaries of the case results, the issue's 1/8
target, the table, and the merge of results from processes that split the cases or lengths."""

from __future__ import annotations

import math
import sys
from fractions import Fraction

import click

def perplexity(nlls: list[float]) -> float:
    return math.exp(sum(nlls) / len(nlls)) if nlls else float("nan")


def parse_budgets(spec: str) -> list[tuple[str, int | float]]:
    """"1/4,1/8,512" -> [("1/4", 0.25), ("1/8", 0.125), ("512", 512)] (fractions of the context, or tokens)."""
    out: list[tuple[str, int | float]] = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        if "/" in part or "." in part:
            f = float(Fraction(part))
            if not 0 < f < 1:
                raise click.BadParameter(f"budget fraction {part!r} must be in (0, 1)")
            out.append((part, f))
        else:
            out.append((part, int(part)))
    return out


def _mean(xs) -> float | None:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else None


def _label(policy: str, blabel: str) -> str:
    return "full" if policy == "exact" else f"{policy}@{blabel}"


def _setting(row: dict) -> str:
    return row.get("positions", "model")


def summarize(needle_rows, ppl_rows, policies, budgets, lengths) -> list[dict]:
    """One row per (position setting, length or 'all', budget, policy)."""
    labels = list(dict.fromkeys(_setting(r) for r in needle_rows + ppl_rows)) or ["model"]
    return [{"positions": lab, **c} for lab in labels for c in _summarize(
        [r for r in needle_rows if _setting(r) == lab], [r for r in ppl_rows if _setting(r) == lab],
        policies, budgets, lengths)]


def _summarize(needle_rows, ppl_rows, policies, budgets, lengths) -> list[dict]:
    cells = []
    for length in list(lengths) + ["all"]:
        nr = [r for r in needle_rows if length == "all" or r["length"] == length]
        pr = [r for r in ppl_rows if length == "all" or r["length"] == length]
        full_acc = _mean(r["results"]["full"]["correct"] for r in nr)
        full_nll = [x for r in pr for x in r["results"]["full"]["nll"]]
        full_ppl = perplexity(full_nll) if full_nll else None
        for blab, _ in budgets:
            for p in policies:
                key = _label(p, blab)
                acc = _mean(r["results"][key]["correct"] for r in nr)
                nll = [x for r in pr for x in r["results"][key]["nll"]]
                ppl = perplexity(nll) if nll else None
                cells.append({
                    "length": length, "budget": blab, "policy": p, "n": len(nr),
                    "acc": acc, "full_acc": full_acc,
                    "kept": acc / full_acc if acc is not None and full_acc else None,
                    "ppl": ppl, "full_ppl": full_ppl,
                    "ppl_rel": ppl / full_ppl - 1 if ppl is not None and full_ppl else None,
                    "cover_needle": _mean(r["results"][key]["cover"] for r in nr
                                          if r["results"][key]["cover"] is not None),
                    "needle_selected": _mean(r["results"][key]["needle_selected"] for r in nr
                                             if r["results"][key]["needle_selected"] is not None),
                    "cover_ppl": _mean(r["results"][key]["cover"] for r in pr
                                       if r["results"][key]["cover"] is not None),
                    "attended": _mean(r["results"][key]["attended"] for r in nr + pr
                                      if r["results"][key]["attended"] is not None),
                    "cover_layers": _layer_mean(r["results"][key].get("cover_layers") for r in nr + pr),
                    "context": _mean([len_of(r) for r in nr] + [r["context"] for r in pr]),
                })
    return cells


def summarize_tasks(needle_rows, task_rows, tasks, policies, budgets, lengths) -> list[dict]:
    """One row per (position setting, length or 'all', configuration), the full cache first: per
    task its accuracy (``<task>``: all asked right), ``<task>_frac`` (multi, list: the share of
    the asked items right) and ``<task>_n`` (cases)."""
    rows = [dict(r, task="needle") for r in needle_rows] + list(task_rows)
    labels = list(dict.fromkeys(_setting(r) for r in rows)) or ["model"]
    configs = [("exact", "full")] + [(p, blab) for blab, _ in budgets for p in policies]
    out = []
    for lab in labels:
        for length in list(lengths) + ["all"]:
            sel = [r for r in rows if _setting(r) == lab and (length == "all" or r["length"] == length)]
            for p, blab in configs:
                key, cell = _label(p, blab), {"positions": lab, "length": length, "budget": blab,
                                              "policy": "full" if p == "exact" else p}
                for task in tasks:
                    res = [r["results"][key] for r in sel if r["task"] == task]
                    cell[task] = _mean(x["correct"] for x in res)
                    if task in ("multi", "list"):
                        cell[f"{task}_frac"] = _mean(x["frac"] for x in res)
                    cell[f"{task}_n"] = len(res)
                out.append(cell)
    return out


TASK_COLUMNS = {"needle": [("needle", "needle")], "hop": [("hop", "hop")],
                "multi": [("multi_frac", "multi frac"), ("multi", "multi all")],
                "list": [("list_frac", "list recall"), ("list", "list all")]}


def print_tasks(res: dict, con) -> None:
    """The per-task table: the full cache's row, then each budget's policies."""
    from rich.table import Table
    sizes = res.get("task_sizes", {})
    n = {t: next((c[f"{t}_n"] for c in res["task_cells"] if c["length"] == "all"), 0) for t in res["tasks"]}
    t = Table(title="harder tasks: " + ", ".join(
        f"{task} ({n[task]} cases{'' if task not in sizes else ', size ' + str(sizes[task])})" for task in res["tasks"]))
    for c in ("length", "budget", "policy"):
        t.add_column(c, justify="right")
    cols = [c for task in res["tasks"] for c in TASK_COLUMNS[task]]
    for _, head in cols:
        t.add_column(head, justify="right")
    prev = None
    for c in res["task_cells"]:
        if prev is not None and (c.get("positions"), c["length"], c["budget"]) != prev:
            t.add_section()
        prev = (c.get("positions"), c["length"], c["budget"])
        t.add_row(str(c["length"]), c["budget"], c["policy"], *(_pct(c[k]) for k, _ in cols))
    con.print(t)


def _layer_mean(rows) -> list[float] | None:
    rows = [r for r in rows if r]
    if not rows:
        return None
    return [round(sum(col) / len(col), 4) for col in zip(*rows)]


def len_of(r: dict) -> int:
    return r["tokens"]


def target(needle_rows, ppl_rows, policies, budgets) -> dict | None:
    """The issue's target at 1/8: best policy keeps >= 95% of full accuracy and ppl within 2%."""
    lab = next((lab for lab, b in budgets if isinstance(b, float) and abs(b - 0.125) < 1e-9), None)
    if lab is None:
        return None
    model_rows = [r for r in needle_rows if _setting(r) == "model"], [r for r in ppl_rows if _setting(r) == "model"]
    cells = [c for c in _summarize(*model_rows, policies, budgets, ["all"]) if c["budget"] == lab]
    if not cells or all(c["n"] == 0 for c in cells):
        return None

    def meets(c) -> bool:
        return c["kept"] is not None and c["kept"] >= 0.95 and (c["ppl_rel"] is None or c["ppl_rel"] <= 0.02)

    # a policy that meets both halves, else the one that keeps the most needles (then: lowest ppl)
    best = max(cells, key=lambda c: (meets(c), (c["kept"] or 0), -(c["ppl_rel"] if c["ppl_rel"] is not None else 1e9)))
    return {"budget": lab, "policy": best["policy"], "kept": best["kept"], "ppl_rel": best["ppl_rel"], "met": meets(best)}


# -- CLI -----------------------------------------------------------------------------------------


def _pct(x) -> str:
    return "-" if x is None else f"{x:.0%}"


def _f(x, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def print_table(res: dict) -> None:
    from rich.console import Console
    from rich.table import Table
    con = Console(width=None if sys.stdout.isatty() else 170)
    t = Table(title=f"sparse attention quality: SmolLM2-135M-Instruct fp32, seed {res['seed']}, {res['cases']} needle "
                    f"cases per cell, ppl over {res['ppl_tokens']} tokens x {res['ppl_cases']}, "
                    f"{res['block_tokens']}-token blocks")
    for c in ("length", "budget", "policy", "needle acc", "full acc", "kept", "needle sel", "mass cov (needle)",
              "ppl", "full ppl", "Δppl", "mass cov (ppl)", "attended tok"):
        t.add_column(c, justify="right")
    many = len(res.get("positions", ["model"])) > 1
    if many:
        t.add_column("positions")
    prev = None
    for c in res["cells"]:
        if prev is not None and (c.get("positions"), c["length"], c["budget"]) != prev:
            t.add_section()
        prev = (c.get("positions"), c["length"], c["budget"])
        t.add_row(str(c["length"]), c["budget"], c["policy"], _pct(c["acc"]), _pct(c["full_acc"]), _pct(c["kept"]),
                  _pct(c["needle_selected"]), _pct(c["cover_needle"]), _f(c["ppl"], ".3f"), _f(c["full_ppl"], ".3f"),
                  "-" if c["ppl_rel"] is None else f"{c['ppl_rel']:+.1%}", _pct(c["cover_ppl"]),
                  _f(c["attended"], ".0f"), *([c.get("positions", "model")] if many else []))
    con.print(t)
    if res.get("task_cells"):
        print_tasks(res, con)
    if many:
        print_positions(res, con)
    tg = res.get("target")
    if tg:
        con.print(f"target at {tg['budget']}: best policy {tg['policy']} keeps {_pct(tg['kept'])} of the full cache's "
                  f"needle accuracy (>= 95%), ppl {'-' if tg['ppl_rel'] is None else format(tg['ppl_rel'], '+.1%')} "
                  f"(<= 2%): {'MET' if tg['met'] else 'NOT MET'}")
    m = res.get("stored_mass")
    if m:
        con.print(f"stored summaries after commit: {m['blocks_with_mass']}/{m['blocks']} blocks carry mass; "
                  f"stored {m['stored_mass']:.1f} vs live {m['live_mass']:.1f} (max diff {m['max_abs_diff']:.2g})")
    tm = res["timing"]
    con.print(f"time: {tm['total_s']:.0f} s (prefill {tm['prefill_s']:.0f} s, "
              f"needle decode {tm['needle_decode_s']:.0f} s, "
              f"ppl decode {tm['ppl_decode_s']:.0f} s), {res['threads']} torch thread(s)")
    for n in res["notes"]:
        con.print(f"note: {n}")


def positions_rows(res: dict) -> list[dict]:
    """Per (length, position setting): the full cache's needle accuracy and ppl, the same for the
    first sparse configuration, and the full accuracy as a share of ``model`` at the shortest length."""
    cells = [c for c in res["cells"] if c["length"] != "all"]
    if not cells:
        return []
    shortest = min(c["length"] for c in cells)
    ref = next((c["full_acc"] for c in cells if c["length"] == shortest and c.get("positions") == "model"), None)
    out, seen = [], set()
    for c in cells:
        key = (c["length"], c.get("positions", "model"))
        if key in seen:
            continue
        seen.add(key)
        out.append({"length": key[0], "positions": key[1], "n": c["n"], "full_acc": c["full_acc"],
                    "full_vs_ref": c["full_acc"] / ref if c["full_acc"] is not None and ref else None,
                    "sparse": f"{c['policy']}@{c['budget']}", "sparse_acc": c["acc"],
                    "sparse_vs_ref": c["acc"] / ref if c["acc"] is not None and ref else None,
                    "full_ppl": c["full_ppl"], "sparse_ppl": c["ppl"], "ref_length": shortest})
    return sorted(out, key=lambda r: (r["length"], res["positions"].index(r["positions"])
                                      if r["positions"] in res["positions"] else 99))


def print_positions(res: dict, con) -> None:
    from rich.table import Table
    rows = positions_rows(res)
    if not rows:
        return
    t = Table(title=f"beyond the trained length: accuracy as a share of the full cache's with model positions at "
                    f"{rows[0]['ref_length']} tokens")
    for c in ("length", "positions", "cases", "full acc", "vs ref", "sparse", "sparse acc", "vs ref ",
              "full ppl", "sparse ppl"):
        t.add_column(c, justify="right")
    prev = None
    for r in rows:
        if prev is not None and r["length"] != prev:
            t.add_section()
        prev = r["length"]
        t.add_row(str(r["length"]), r["positions"], str(r["n"]), _pct(r["full_acc"]), _pct(r["full_vs_ref"]),
                  r["sparse"], _pct(r["sparse_acc"]), _pct(r["sparse_vs_ref"]), _f(r["full_ppl"], ".3f"),
                  _f(r["sparse_ppl"], ".3f"))
    con.print(t)


SAME = ("seed", "budgets", "policies", "positions", "ppl_tokens", "block_tokens", "sink_blocks", "window_blocks", "obs_window",
        "dense_layers", "per_head", "streaming_fill", "prefill_chunk", "tasks", "task_sizes")


def merge(results: list[dict]) -> dict:
    """One result from runs of the same settings over other lengths or other cases (one process
    per share of the work on a multi-core machine; ``--checkpoint`` files of unfinished runs)."""
    if not results:
        raise click.UsageError("nothing to merge")
    first = results[0]
    for r in results[1:]:
        # a run without ppl rows (--ppl-tokens 0) merges with runs that scored ppl
        diff = [k for k in SAME if r.get(k) != first.get(k) and not (k == "ppl_tokens" and not (r["ppl"] and first["ppl"]))]
        if diff:
            raise click.UsageError(f"cannot merge runs whose settings differ in {', '.join(diff)}")
    with_ppl = [r for r in results if r["ppl"]]
    first = with_ppl[0] if with_ppl else first
    lengths = sorted({n for r in results for n in r["lengths"]})
    needle = [row for r in results for row in r["needle"]]
    ppl = [row for r in results for row in r["ppl"]]
    budgets = [(lab, b) for lab, b in parse_budgets(",".join(first["budgets"]))]
    out = dict(first)
    timing = {k: sum(r["timing"][k] for r in results) for k in first["timing"]}
    out.update(lengths=lengths, needle=needle, ppl=ppl, timing=timing,
               cases=min(sum(row["length"] == n for row in needle) for n in lengths),
               complete=all(r.get("complete", True) for r in results),
               cells=summarize(needle, ppl, first["policies"], budgets, lengths),
               target=target(needle, ppl, first["policies"], budgets),
               notes=list(dict.fromkeys(n for r in results for n in r["notes"])))
    if first.get("tasks"):
        rows = [row for r in results for row in r["task_rows"]]
        out.update(task_rows=rows, task_cells=summarize_tasks(needle, rows, first["tasks"], first["policies"],
                                                              budgets, lengths))
    return out

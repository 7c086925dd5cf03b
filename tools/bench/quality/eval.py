"""`tierstore bench quality`: what sparse attention costs in answers, on SmolLM2-135M-Instruct (fp32).

Per context length, with the same cases for every policy and budget and the full cache:

(a) needle in a haystack: a fact generated from the seed (a 4-digit number attached to a random
    entity: "The room number for the amber vault is 4817.") planted at a depth of 10%..90% of
    ``pydoc_data.topics`` prose; the question at the end of the chat-template prompt, the assistant
    turn opened with the answer's lead-in ("The room number for the amber vault is"); the greedy
    answer is right when it contains the number (string match; spaces and punctuation ignored).
    Accuracy per policy and budget, next to the full cache's on the same cases. "needle sel": the
    share of layers whose selection at the first answer step held the blocks of the number.
(b) perplexity of a held-out continuation of ``--ppl-tokens`` tokens of prose after a context of
    the same length, scored one token per decode step (so the sparse path is what is measured).
(c) attention mass covered by the selected blocks: on sampled decode steps, exact attention of the
    step's query over every block; the share of it that falls on the blocks the policy selected
    (averaged over query heads, layers and steps).

(d) with ``--tasks``: harder cases (multi-needle, multi-hop, list extraction; ``tasks.py``), each
    run through the same prefill/resume/decode path, scored per task in ``task_cells``.
(e) with ``--needles-per-doc N``: each needle case is a document of N facts (``make_doc``),
    prefilled once and asked one fact at a time: long lengths cost one prefill per N cases.

How it runs (2 CPU cores): each case is prefilled ONCE through a ``TieredCache`` (exact attention,
policy h2o so the prefill observation window's attention mass is accumulated into the block
summaries), in one chunk, without its last token, and committed to a store in a temp dir. Every
policy x budget (and the full cache) then ``TieredCache.resume``-s it (~0.1 s) and feeds the
held-back token: every answer token, the first included, comes from a decode step of the policy.
A single-chunk prefill makes the accumulated (h2o, hybrid) and the observed (snapkv) prefill mass
the same quantity (the last ``obs_window`` prompt queries), so one prefill serves all policies.

``streaming`` selects sinks + recent window only; to compare it at the same budget its recent
window is widened to fill the budget (``--streaming-fill``, default on).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time

import click
import torch

from .cases import Case, depth_of, encode, is_correct, make_case, make_doc, make_ppl_text  # noqa: F401 (the bench's API)
from .report import (_label, _mean, merge, parse_budgets, perplexity, print_table, summarize, summarize_tasks,
                     target)
from .tasks import DEFAULT_SIZE, TASKS, make_task_case

# -- evaluation ----------------------------------------------------------------------------------


class Probe:
    """Wraps ``cache._attend``: on the decode steps it is armed for, measures (c) per layer.

    For each layer: the exact attention of the step's query over all blocks (``attend_exact`` with
    a one-row ``WindowMass``), the share of it that the selected blocks hold; whether the blocks of
    the needle were selected; the tokens attended."""

    def __init__(self, cache, needle_blocks: tuple[int, ...] = ()) -> None:
        self.cache, self.needle_blocks = cache, set(needle_blocks)
        self.orig = cache._attend
        self.armed = False
        self.cover: list[float] = []
        self.by_layer: dict[int, list[float]] = {}
        self.hit: list[float] = []
        self.attended: list[int] = []
        cache._attend = self._attend

    def layers(self) -> list[float] | None:
        return [_mean(self.by_layer[k]) for k in sorted(self.by_layer)] if self.by_layer else None

    def _attend(self, layer, query, mask, scale):
        from tierstore.attention import WindowMass, attend_exact
        from tierstore.reader import SeqReader
        out = self.orig(layer, query, mask, scale)
        c = self.cache
        if not self.armed or c.sparse is None or query.shape[2] != 1:
            return out
        if layer in c.sparse.dense_layers:  # attended exactly: all the mass, every block
            self.cover.append(1.0)
            self.by_layer.setdefault(layer, []).append(1.0)
            if self.needle_blocks:
                self.hit.append(1.0)
            self.attended.append(int(c.lengths[layer]))
            return out
        if layer not in c.rows[0].selected:
            return out
        ids = c.rows[0].selected[layer]
        seq, lay = c.seqs[0], c.layout
        n_rep = query.shape[1] // lay.kv_heads
        q_offset = mask.q_offset if mask is not None else c.lengths[layer] - 1
        w = WindowMass(query[0], q_offset, 1, n_rep, lay.kv_heads, scale)
        attend_exact(SeqReader(c.mgr, seq), layer, query[0], q_offset, None, scale, w)
        bids, share = w.mass()  # [n, kv_heads], each query head's row sums to 1
        pos = {b: i for i, b in enumerate(bids)}
        sel = [pos[i] for i in ids if i in pos]
        heads = c.rows[0].head_masks.get(layer)
        got = share[sel] if heads is None else share[sel] * heads[:, [j for j, i in enumerate(ids) if i in pos]].T
        self.cover.append(float(got.sum() / share.sum().clamp_min(1e-12)))
        self.by_layer.setdefault(layer, []).append(self.cover[-1])
        if self.needle_blocks:
            self.hit.append(float(self.needle_blocks <= set(ids)))
        self.attended.append(int(c.attended.get(layer, 0)))
        return out


def split_policy(spec: str) -> tuple[str, int]:
    """``sketch`` -> ("sketch", 0); ``sketch:coarse4`` -> ("sketch", 4) (two-level selection)."""
    name, _, opt = spec.partition(":")
    if not opt:
        return name, 0
    if not opt.startswith("coarse") or not opt[6:].isdigit() or int(opt[6:]) < 1:
        raise ValueError(f"policy {spec!r}: the only option is coarseN (N >= 1), e.g. sketch:coarse4")
    return name, int(opt[6:])


class Evaluator:
    """Runs cases through one store: prefill once, resume per (policy, budget)."""

    def __init__(self, model, tok, store, *, policies: list[str], budgets: list[tuple[str, int | float]],
                 sink_blocks: int = 1, window_blocks: int = 2, obs_window: int = 32, streaming_fill: bool = True,
                 cov_every: int = 16, max_new: int | None = None, dense_layers: int = 0, prefill_chunk: int = 1024,
                 per_head: bool | None = None, positions=None, tag: str = "", log=None) -> None:
        self.model, self.tok, self.store = model, tok, store
        self.positions, self.tag = positions, tag  # the position mode its prefills run under (resumes keep it)
        self.policies, self.budgets = policies, budgets
        self.sink_blocks, self.window_blocks, self.obs_window = sink_blocks, window_blocks, obs_window
        self.streaming_fill, self.cov_every, self.max_new = streaming_fill, cov_every, max_new
        self.dense_layers, self.prefill_chunk, self.per_head = dense_layers, prefill_chunk, per_head
        self.log = log or (lambda msg: None)
        self.bt = store.config.block_tokens
        self.eos = {i for i in [getattr(tok, "eos_token_id", None)] if i is not None}
        self.mass_check: dict | None = None
        self._n = 0

    def configs(self) -> list[tuple[str, str, int | float | None]]:
        """(policy, budget label, budget) with the full cache first."""
        return [("exact", "full", None)] + [(p, lab, b) for lab, b in self.budgets for p in self.policies]

    # -- the pieces --

    def prefill(self, ids: list[int], upto: int = 0) -> tuple[str, float]:
        """Prefill ``ids[:upto]`` (default: all but the last token) exactly (h2o mass from the
        observation window), commit."""
        from tierstore.adapters.hf import TieredCache
        self._n += 1
        name = f"{self.tag}q{self._n}"
        t = time.perf_counter()
        cache = TieredCache(self.store, self.model, name, policy="h2o", obs_window=self.obs_window,
                            commit_on_close=False, positions=self.positions)
        try:
            with torch.no_grad():
                body = ids[:upto or len(ids) - 1]
                for s in range(0, len(body), self.prefill_chunk):
                    self.model(input_ids=torch.tensor([body[s:s + self.prefill_chunk]]), cache=cache, use_cache=True,
                               logits_to_keep=1)
            live = [self.store.manager.summaries(cache.seqs[0], layer).mass.clone()
                    for layer in range(cache.layout.num_layers)] if self.mass_check is None else None
            cache.commit()
        finally:
            cache.close()
        if live is not None:
            self.mass_check = self._check_stored_mass(name, live)
        return name, time.perf_counter() - t

    def _check_stored_mass(self, name: str, live: list[torch.Tensor]) -> dict:
        """Do the committed summaries carry the attention mass the live ones had?"""
        from tierstore.records import BlockSummary
        from tierstore.tiers.schema import block_key
        rec = self.store.session(name)
        chains = rec.chains()
        stored, nonzero, total, diff = 0.0, 0, 0, 0.0
        for layer, lm in enumerate(live):
            keys = [block_key(c, layer) for c in chains]
            raw = self.store.cold.get_many("summaries", keys)
            for i, (k, r) in enumerate(zip(keys, raw)):
                if r is None:
                    continue
                m = BlockSummary.unseal(k, bytes(r)).mass
                stored += float(m.sum())
                nonzero += int(float(m.sum()) > 0)
                total += 1
                if i < lm.shape[0]:
                    diff = max(diff, float((m - lm[i]).abs().max()))
        out = {"live_mass": float(sum(float(m.sum()) for m in live)), "stored_mass": stored,
               "blocks_with_mass": nonzero, "blocks": total, "max_abs_diff": diff,
               "ok": stored > 0 and diff < 1e-4}
        if stored == 0:
            self.log("WARNING: the committed block summaries carry no attention mass (all zero): "
                     "h2o/snapkv/hybrid run on zero mass after resume")
        elif not out["ok"]:
            self.log(f"WARNING: committed summary mass differs from the live mass (max diff {diff:.3g})")
        return out

    def open(self, name: str, policy: str, budget, n_tokens: int):
        """A resumed cache of ``policy`` (``name[:coarseN]``: with two-level selection, N x the
        budget's blocks as each head's candidates) at ``budget``."""
        from tierstore.adapters.hf import TieredCache
        from tierstore.sparse import SparseConfig
        policy, coarse = split_policy(policy)
        window = self.window_blocks
        if policy == "streaming" and self.streaming_fill and budget is not None:
            n_blocks = -(-n_tokens // self.bt)
            window = SparseConfig(budget, self.sink_blocks, self.window_blocks).budget_blocks(n_blocks, self.bt) \
                - self.sink_blocks
        if coarse and budget is not None:
            sparse = SparseConfig(budget, self.sink_blocks, max(window, self.window_blocks),
                                  dense_layers=SparseConfig.dense(self.dense_layers), per_head=self.per_head,
                                  coarse=coarse)
            return TieredCache.resume(self.store, self.model, name, policy=policy, sparse=sparse,
                                      obs_window=self.obs_window, commit_on_close=False)
        return TieredCache.resume(self.store, self.model, name, policy=policy, budget_tokens=budget,
                                  sink_blocks=self.sink_blocks, window_blocks=max(window, self.window_blocks),
                                  obs_window=self.obs_window, dense_layers=self.dense_layers, per_head=self.per_head,
                                  commit_on_close=False)

    def _step(self, cache, token: int) -> torch.Tensor:
        with torch.no_grad():
            out = self.model(input_ids=torch.tensor([[token]]), cache=cache, use_cache=True)
        return out.logits[0, -1].float()

    def answer(self, name: str, case, policy: str, budget) -> dict:
        """Greedy answer through decode steps only; (c) measured at the first step. ``case``: a
        needle ``Case`` or a ``tasks.TaskCase`` (whose later answer lines follow fed leads)."""
        start = getattr(case, "shared", 0) or len(case.ids) - 1  # what the prefill holds
        cache = self.open(name, policy, budget, start)
        try:
            spans = getattr(case, "spans", None) or [case.needle]
            blocks = tuple(sorted({b for a, e in spans for b in range(a // self.bt, max(a, e - 1) // self.bt + 1)}))
            probe = Probe(cache, blocks)
            if case.ids[start:-1]:  # a document's question: one exact prefill chunk, as a next turn's
                with torch.no_grad():
                    self.model(input_ids=torch.tensor([case.ids[start:-1]]), cache=cache, use_cache=True,
                               logits_to_keep=1)
            probe.armed = True
            logits = self._step(cache, case.ids[-1])
            probe.armed = False
            if isinstance(case, Case):
                max_new = self.max_new or len(encode(self.tok, " " + case.code)) + 4
                text, _ = self._greedy(cache, logits, max_new, lambda t: is_correct(t, case.code) or "\n" in t.strip())
                graded = {"correct": is_correct(text, case.code)}
            else:
                texts, pending = [], []
                for seg in range(len(case.followups) + 1):
                    if seg:  # the next line's lead, fed as decode steps after the last answer token
                        for t in pending + encode(self.tok, case.followups[seg - 1]):
                            logits = self._step(cache, t)
                    max_new = self.max_new or case.max_new(lambda s: encode(self.tok, s), seg)
                    text, pending = self._greedy(cache, logits, max_new, lambda t, seg=seg: case.stop(t, seg))
                    texts.append(text)
                text, graded = " | ".join(texts), case.grade(texts)
            return {"answer": text, **graded, "cover": _mean(probe.cover),
                    "cover_layers": probe.layers(), "needle_selected": _mean(probe.hit),
                    "attended": _mean(probe.attended)}
        finally:
            cache.close()

    def _greedy(self, cache, logits, max_new: int, stop) -> tuple[str, list[int]]:
        """Decode from ``logits`` until EOS, ``stop(text)`` or ``max_new`` tokens: (text, the last
        token when it was not fed yet)."""
        out: list[int] = []
        text = ""
        for _ in range(max_new):
            nxt = int(logits.argmax())
            if nxt in self.eos:
                return text, []
            out.append(nxt)
            text = self.tok.decode(out)
            if stop(text):
                return text, [nxt]
            logits = self._step(cache, nxt)
        return text, []

    def score_ppl(self, name: str, ctx: list[int], cont: list[int], policy: str, budget) -> dict:
        """Feed ctx[-1], cont[0..-2] one per step; sum -log p(cont[j]). (c) every cov_every steps."""
        cache = self.open(name, policy, budget, len(ctx) - 1)
        try:
            probe = Probe(cache)
            nlls = []
            feed = [ctx[-1]] + cont[:-1]
            for j, tok_in in enumerate(feed):
                probe.armed = self.cov_every > 0 and j % self.cov_every == 0
                logits = self._step(cache, tok_in)
                nlls.append(float(torch.logsumexp(logits, -1) - logits[cont[j]]))
            probe.armed = False
            return {"nll": nlls, "ppl": perplexity(nlls), "cover": _mean(probe.cover),
                    "cover_layers": probe.layers(), "attended": _mean(probe.attended)}
        finally:
            cache.close()


# -- the run -------------------------------------------------------------------------------------


def run(model, tok, *, seed: int = 0, cases: int = 40, lengths=(2048, 4096, 7168),
        budgets: list[tuple[str, int | float]] | None = None,
        policies=("streaming", "h2o", "snapkv", "quest", "hybrid", "sketch"),
        ppl_tokens: int = 256, ppl_cases: int = 1, sink_blocks: int = 1, window_blocks: int = 2,
        obs_window: int = 32, block_tokens: int | None = None, cov_every: int = 16, streaming_fill: bool = True,
        dense_layers: int = 0, prefill_chunk: int = 1024, first_case: int = 0, text: str | None = None,
        per_head: bool | None = None, store_dir: str | None = None, checkpoint=None, log=None,
        positions: tuple[str, ...] = ("model",), tasks: tuple[str, ...] = ("needle",),
        task_sizes: dict[str, int] | None = None, needles_per_doc: int = 1) -> dict:
    """Everything of (a), (b), (c); returns the JSON-able result. ``positions``: the position
    settings (``position_settings``) every case runs under, each with its own prefill. ``tasks``:
    ``needle`` and the harder tasks of ``tasks.py`` (``cases`` cases each per length; sizes from
    ``task_sizes``, default ``tasks.DEFAULT_SIZE``); their rows and per-task cells are in the
    result only when a task other than ``needle`` runs. ``needles_per_doc`` > 1: each needle case
    is a document of that many needles (``make_doc``), prefilled once and asked one needle at a
    time (a cell's ``n`` counts the needles asked)."""
    if needles_per_doc < 1:
        raise click.BadParameter(f"needles per document: {needles_per_doc}; expected 1 or more")
    import tierstore
    from tierstore.adapters.fingerprint import kv_layout
    from tierstore.adapters.models import long_text
    log = log or (lambda msg: None)
    budgets = budgets if budgets is not None else parse_budgets("1/4,1/8,1/16")
    text = text if text is not None else long_text(600_000)
    t_start = time.perf_counter()
    from tierstore.config import StoreConfig
    tmp = store_dir or tempfile.mkdtemp(prefix="tierstore-quality-")
    bt = StoreConfig.build(tmp, block_tokens=block_tokens).block_tokens
    lay = kv_layout(model, bt)
    longest = max(max(lengths) + 64, max(lengths) + ppl_tokens + 2 * bt) + 2 * bt
    hot = int(longest * lay.token_bytes * 1.25) + (32 << 20)
    settings = position_settings(model, positions, lengths)
    bad = [t for t in tasks if t not in TASKS]
    if bad:
        raise click.BadParameter(f"unknown tasks {bad}; known: {', '.join(TASKS)}")
    sizes = {t: (task_sizes or {}).get(t, DEFAULT_SIZE[t]) for t in tasks if t != "needle"}
    needle_rows: list[dict] = []
    task_rows: list[dict] = []
    ppl_rows: list[dict] = []
    timing = {"prefill_s": 0.0, "needle_decode_s": 0.0, "ppl_decode_s": 0.0, "total_s": 0.0}
    mass_check = None

    def result(done: bool = False) -> dict:
        timing["total_s"] = time.perf_counter() - t_start
        extra = {} if list(tasks) == ["needle"] else {
            "tasks": list(tasks), "task_sizes": sizes, "task_rows": task_rows,
            "task_cells": summarize_tasks(needle_rows, task_rows, tasks, policies, budgets, lengths)}
        chunk_note = ("one single-chunk exact prefill per case (policy h2o): its observation-window mass is what "
                      "h2o, hybrid and snapkv start from (for one chunk, accumulated == observed)"
                      if prefill_chunk >= max(lengths) else
                      f"one exact prefill per case in {prefill_chunk}-token chunks (policy h2o): the attention mass of "
                      "each chunk's observation window, accumulated, is what h2o, hybrid and snapkv start from")
        return {"bench": "quality", "model": getattr(model.config, "_name_or_path", "") or "model",
                "seed": seed, "cases": cases, "complete": done, "lengths": list(lengths),
                "budgets": [lab for lab, _ in budgets],
                "policies": list(policies), "positions": list(positions), "ppl_tokens": ppl_tokens, "ppl_cases": ppl_cases, "block_tokens": bt,
                "sink_blocks": sink_blocks, "window_blocks": window_blocks, "obs_window": obs_window,
                "dense_layers": dense_layers, "per_head": per_head, "prefill_chunk": prefill_chunk,
                "first_case": first_case, "needles_per_doc": needles_per_doc,
                "streaming_fill": streaming_fill, "threads": torch.get_num_threads(),
                "cells": summarize(needle_rows, ppl_rows, policies, budgets, lengths),
                "target": target(needle_rows, ppl_rows, policies, budgets),
                "stored_mass": mass_check, "timing": dict(timing),
                "notes": [chunk_note,
                          "the held-back last prompt token is fed as a decode step, so every answer token and every "
                          "scored ppl token comes from the policy's sparse step",
                          "streaming's recent window is widened to fill the budget" if streaming_fill else
                          "streaming attends sinks + window only (below the budget)"] + floor_notes(
                              lengths, budgets, bt, sink_blocks, window_blocks) + [n for _, _, _, n in settings if n] + (
                          [f"each needle case is a document of {needles_per_doc} needles (distinct kinds and entities; "
                           "the others are its distractors), prefilled once; each question is fed after a resume as "
                           "one exact prefill chunk, its last token as the first decode step"]
                          if needles_per_doc > 1 else []),
                "needle": needle_rows, "ppl": ppl_rows, **extra}

    try:
        with tierstore.open(tmp, hot=hot, warm="64MiB", block_tokens=bt) as store:
            store.manager.prepare(lay, "cpu")
            evs = {label: Evaluator(m, tok, store, policies=list(policies), budgets=budgets, sink_blocks=sink_blocks,
                                    window_blocks=window_blocks, obs_window=obs_window, streaming_fill=streaming_fill,
                                    cov_every=cov_every, dense_layers=dense_layers, prefill_chunk=prefill_chunk,
                                    per_head=per_head, positions=pos, tag=f"p{j}", log=log)
                   for j, (label, m, pos, _) in enumerate(settings)}
            for length in lengths:
                for task, i in [(t, i) for t in tasks for i in range(first_case, first_case + cases)]:
                    if task != "needle":
                        group = [make_task_case(tok, text, seed, task, length, i, sizes[task])]
                    else:
                        group = make_doc(tok, text, seed, length, i, needles_per_doc) if needles_per_doc > 1 else \
                            [make_case(tok, text, seed, length, i)]
                    for label, ev in evs.items():
                        name, tp = ev.prefill(group[0].ids, getattr(group[0], "shared", 0))
                        mass_check = mass_check or ev.mass_check
                        timing["prefill_s"] += tp
                        for case in group:
                            t = time.perf_counter()
                            res = {_label(p, lab): ev.answer(name, case, p, b) for p, lab, b in ev.configs()}
                            td = time.perf_counter() - t
                            timing["needle_decode_s"] += td
                            (needle_rows if task == "needle" else task_rows).append(
                                {**case.summary(), "positions": label, "results": res})
                            marks = " ".join(f"{k}:{_mark(v)}" for k, v in res.items())
                            if checkpoint is not None:
                                checkpoint(result())
                            tag = "" if len(evs) == 1 else f" {label}"
                            depth = f" depth {case.depth:.0%}" if task == "needle" else ""
                            which = f" needle {case.of_doc + 1}/{len(group)}" if len(group) > 1 else ""
                            pre = f"prefill {tp:.1f}s" if getattr(case, "of_doc", 0) == 0 else "prefill shared"
                            log(f"[{task} {length} {i + 1}/{first_case + cases}{tag}{which}] {len(case.ids)} tok{depth} "
                                f"{pre} decode {td:.1f}s full={res['full']['answer']!r} | {marks}")
                        store.delete(name)
                for j in range(ppl_cases if ppl_tokens > 0 else 0):
                    ctx, cont = make_ppl_text(tok, text, seed, length, ppl_tokens, j)
                    for label, ev in evs.items():
                        name, tp = ev.prefill(ctx)
                        mass_check = mass_check or ev.mass_check
                        timing["prefill_s"] += tp
                        t = time.perf_counter()
                        res = {}
                        for p, lab, b in ev.configs():
                            res[_label(p, lab)] = ev.score_ppl(name, ctx, cont, p, b)
                            log(f"[ppl {length} {j + 1}/{ppl_cases}{'' if len(evs) == 1 else ' ' + label}] {_label(p, lab)}: "
                                f"ppl {res[_label(p, lab)]['ppl']:.3f}")
                        timing["ppl_decode_s"] += time.perf_counter() - t
                        store.delete(name)
                        ppl_rows.append({"length": length, "index": j, "context": len(ctx), "tokens": len(cont),
                                         "positions": label, "results": res})
                        if checkpoint is not None:
                            checkpoint(result())
    finally:
        if store_dir is None:
            shutil.rmtree(tmp, ignore_errors=True)
    return result(done=True)


def _mark(v: dict) -> str:
    return f"{v['frac']:.2f}" if "frac" in v and not v["correct"] else "+" if v["correct"] else "-"


def position_settings(model, labels, lengths) -> list[tuple[str, object, object, str | None]]:
    """``(label, model, Positions | None, note)`` per position setting: ``model`` (the model's
    own positions), ``extend`` / ``extend:scale`` / ``extend:far`` (``positions="extend"`` with
    that mapping; ``:w1024`` sets the window, ``:t4096`` the trained length), ``yarn`` (the baseline: a static YaRN RoPE config
    of the model, scaled to the longest length, with its own positions)."""
    import copy
    import math

    from tierstore.positions import Positions
    trained = int(model.config.max_position_embeddings)
    out = []
    for label in labels:
        head, *opts = label.split(":")
        if head == "model":
            out.append((label, model, None, None))
        elif head == "extend":
            kw = {"mapping": o for o in opts if o[0] not in "wt"}
            kw.update({"window": int(o[1:]) for o in opts if o.startswith("w")})
            kw.update({"trained": int(o[1:]) for o in opts if o.startswith("t")})
            out.append((label, model, Positions("extend", **kw), None))
        elif head == "yarn":
            factor = float(max(2, math.ceil(max(lengths) / trained)))
            m = copy.deepcopy(model)
            rp = dict(m.config.rope_parameters or {})
            rp.update(rope_type="yarn", factor=factor, original_max_position_embeddings=trained)
            m.config.rope_parameters = rp
            m.config.max_position_embeddings = int(trained * factor)
            emb = m.model.rotary_emb
            m.model.rotary_emb = type(emb)(m.config).to(emb.inv_freq.device)
            out.append((label, m, None, f"yarn: a static YaRN RoPE (factor {factor:g}, original "
                                        f"{trained} positions) on the model's weights, model positions"))
        else:
            raise click.BadParameter(f"position setting {label!r}: expected model, extend[:group|scale|far][:wN][:tN] "
                                     "or yarn")
    return out


def floor_notes(lengths, budgets, bt: int, sink_blocks: int, window_blocks: int) -> list[str]:
    """Cells whose budget is under sinks + window: there every policy attends the same blocks."""
    from tierstore.sparse import SparseConfig
    out = []
    for length in lengths:
        n = -(-length // bt)
        for lab, b in budgets:
            cfg = SparseConfig(b, sink_blocks, window_blocks)
            want = int(b * n * bt) if isinstance(b, float) else int(b)
            if want // bt <= sink_blocks + window_blocks:
                out.append(f"{length} tokens at {lab} ({want} tokens): the budget is at or under the floor of "
                           f"{sink_blocks} sink + {window_blocks} window blocks ({cfg.budget_blocks(n, bt) * bt} "
                           f"tokens of {bt}-token blocks), so no policy has a block of its own to choose")
    return out


def _writer(path: str):
    def write(res: dict) -> None:
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            json.dump(res, f, default=float)
        os.replace(tmp, path)
    return write


@click.command("quality")
@click.option("--seed", default=0, show_default=True, help="generates the needle cases and the ppl texts")
@click.option("--cases", default=40, show_default=True, help="cases per (length, budget) cell, of each task")
@click.option("--lengths", default="2048,4096,7168", show_default=True, help="prompt lengths in tokens")
@click.option("--budgets", default="1/4,1/8,1/16", show_default=True,
              help="per-step selection budgets: fractions of the context, or token counts")
@click.option("--policies", default="streaming,h2o,snapkv,quest,hybrid,sketch", show_default=True,
              help="policies to compare; name:coarseN selects in two levels (e.g. sketch:coarse4)")
@click.option("--ppl-tokens", default=256, show_default=True, help="held-out continuation scored per length (0: skip)")
@click.option("--ppl-cases", default=1, show_default=True, help="ppl texts per length")
@click.option("--cov-every", default=16, show_default=True, help="measure mass coverage every N ppl steps")
@click.option("--block-tokens", type=int, default=None, help="store block size (default: the store's, 64)")
@click.option("--sink-blocks", default=1, show_default=True)
@click.option("--window-blocks", default=2, show_default=True)
@click.option("--obs-window", default=32, show_default=True, help="prefill observation window (queries)")
@click.option("--dense-layers", default=0, show_default=True, help="first layers attended exactly at every step")
@click.option("--per-head/--shared", "per_head", default=None,
              help="each KV head selects its own blocks / one selection per layer (default: the policy's)")
@click.option("--streaming-fill/--no-streaming-fill", default=True, show_default=True,
              help="widen streaming's recent window to the budget")
@click.option("--threads", default=1, show_default=True,
              help="torch threads (1 is fastest on a few shared cores: the per-step ops are small)")
@click.option("--first-case", default=0, show_default=True, help="index of the first needle case (share the cases "
              "of a cell among processes, then --merge)")
@click.option("--prefill-chunk", default=1024, show_default=True, help="prefill chunk (tokens)")
@click.option("--checkpoint", type=click.Path(dir_okay=False), default=None,
              help="rewrite this JSON file after every case (a long run that is stopped keeps its cases)")
@click.option("--positions", "positions", default="model", show_default=True,
              help="position settings, each with its own prefill per case: model, extend[:group|scale|far][:wN][:tN], "
                   "yarn (a static YaRN RoPE baseline)")
@click.option("--tasks", "tasks", default="needle", show_default=True,
              help=f"tasks, each with --cases cases per length: {', '.join(TASKS)} (multi-needle, multi-hop, list "
                   "extraction)")
@click.option("--multi-facts", default=DEFAULT_SIZE["multi"], show_default=True, help="facts asked together in multi")
@click.option("--list-items", default=DEFAULT_SIZE["list"], show_default=True, help="items to list in list")
@click.option("--needles-per-doc", default=1, show_default=True,
              help="needles planted in each needle case's document, asked one at a time after one prefill "
                   "(the others are distractors): long lengths cost one prefill per N needles")
@click.option("--quick", is_flag=True, help="smoke run: 2 cases, 1024 tokens, budgets 1/4,1/8, ppl 32 tokens")
@click.option("--merge", "merge_files", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="print the table of these --json results (same settings, other lengths) instead of running")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
def quality(seed, cases, lengths, budgets, policies, ppl_tokens, ppl_cases, cov_every, block_tokens, sink_blocks,
            window_blocks, obs_window, dense_layers, per_head, streaming_fill, threads, first_case, prefill_chunk, checkpoint,
            positions, tasks, multi_facts, list_items, needles_per_doc, quick, merge_files, as_json) -> None:
    """Needle accuracy, perplexity and attention-mass coverage of the sparse policies vs the full cache."""
    if merge_files:
        res = merge([json.loads(open(f).read()) for f in merge_files])
        if as_json:
            click.echo(json.dumps(res, indent=1, default=float))
        else:
            print_table(res)
        return
    from tierstore.adapters.models import load_smollm2
    if quick:
        cases, lengths, budgets, ppl_tokens, cov_every = 2, "1024", "1/4,1/8", 32, 8
    if threads > 0:
        torch.set_num_threads(threads)
    pols = [p.strip() for p in policies.split(",") if p.strip()]
    from tierstore.policies import POLICIES
    try:
        bad = [p for p in pols if split_policy(p)[0] not in POLICIES]
    except ValueError as e:
        raise click.BadParameter(str(e)) from None
    if bad:
        raise click.BadParameter(f"unknown policies {bad}; known: {', '.join(sorted(POLICIES))} "
                                 "(name:coarseN for two-level selection)")

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    t = time.perf_counter()
    model, tok = load_smollm2(torch.float32)
    log(f"model loaded in {time.perf_counter() - t:.1f}s; {torch.get_num_threads()} thread(s)")
    res = run(model, tok, seed=seed, cases=cases, lengths=[int(x) for x in lengths.split(",")],
              budgets=parse_budgets(budgets), policies=pols, ppl_tokens=ppl_tokens, ppl_cases=ppl_cases,
              sink_blocks=sink_blocks, window_blocks=window_blocks, obs_window=obs_window,
              block_tokens=block_tokens, cov_every=cov_every, streaming_fill=streaming_fill,
              dense_layers=dense_layers, prefill_chunk=prefill_chunk, first_case=first_case, per_head=per_head,
              checkpoint=_writer(checkpoint) if checkpoint else None, log=log,
              positions=tuple(p.strip() for p in positions.split(",") if p.strip()),
              tasks=tuple(t.strip() for t in tasks.split(",") if t.strip()),
              task_sizes={"multi": multi_facts, "list": list_items}, needles_per_doc=needles_per_doc)
    if as_json:
        click.echo(json.dumps(res, indent=1, default=float))
        return
    print_table(res)


if __name__ == "__main__":
    quality()

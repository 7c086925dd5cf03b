"""`tierstore bench quality`: its pieces on a tiny random Llama and a character tokenizer."""

from __future__ import annotations

import math
import re

import pytest

from tierstore.adapters.models import long_text
from tierstore.tools.bench.quality import eval as bq
from tierstore.tools.bench.quality.report import positions_rows

from support import tiny


class CharTokenizer:
    """One id per byte, plus the two chat-template specials (what the bench needs of a tokenizer)."""

    SPECIAL = {"<|im_start|>": 256, "<|im_end|>": 257}
    eos_token_id = 257

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        out: list[int] = []
        for part in re.split(r"(<\|im_start\|>|<\|im_end\|>)", text):
            out.extend([self.SPECIAL[part]] if part in self.SPECIAL else part.encode())
        return out

    def decode(self, ids) -> str:
        inv = {v: k for k, v in self.SPECIAL.items()}
        out, buf = [], bytearray()
        for i in ids:
            if i in inv:
                out.append(buf.decode(errors="replace") + inv[i])
                buf = bytearray()
            else:
                buf.append(int(i) % 256)
        return "".join(out) + buf.decode(errors="replace")

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False):
        s = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        return s + ("<|im_start|>assistant\n" if add_generation_prompt else "")


TOK = CharTokenizer()
TEXT = long_text(30_000)


MODEL = dict(vocab_size=260, max_position_embeddings=2048)   # TOK's ids; the bench's long cases


def test_cases_are_determined_by_the_seed():
    a = [bq.make_case(TOK, TEXT, 7, 400, i) for i in range(3)]
    b = [bq.make_case(TOK, TEXT, 7, 400, i) for i in (2, 1, 0)][::-1]  # order and count do not matter
    assert [c.summary() for c in a] == [c.summary() for c in b] and [c.ids for c in a] == [c.ids for c in b]
    other = bq.make_case(TOK, TEXT, 8, 400, 0)
    assert (other.code, other.ids) != (a[0].code, a[0].ids)
    for i, c in enumerate(a):
        assert c.depth == pytest.approx(0.1 + 0.1 * i)
        assert abs(len(c.ids) - 400) <= 8
        assert TOK.decode(c.ids[c.needle[0]:c.needle[1]]) == c.code  # the span holds the code
        assert TOK.decode(c.ids).endswith("<|im_start|>assistant\n" + c.lead)
        assert c.fact in TOK.decode(c.ids) and c.question in TOK.decode(c.ids)
    deep = bq.make_case(TOK, TEXT, 7, 1000, 8)
    assert deep.depth == pytest.approx(0.9) and deep.needle[0] > 0.7 * len(deep.ids)
    ctx, cont = bq.make_ppl_text(TOK, TEXT, 7, 300, 40)
    assert (len(ctx), len(cont)) == (300, 40) and bq.make_ppl_text(TOK, TEXT, 7, 300, 40) == (ctx, cont)


def test_a_policy_spec_names_two_level_selection():
    assert bq.split_policy("sketch") == ("sketch", 0) and bq.split_policy("sketch:coarse4") == ("sketch", 4)
    for bad in ("sketch:coarse0", "sketch:fast", "sketch:coarse"):
        with pytest.raises(ValueError, match="coarseN"):
            bq.split_policy(bad)


def test_scoring():
    assert bq.is_correct(" 4817.", "4817")
    assert bq.is_correct("The code is 48 17", "4817")  # spaces and punctuation are ignored
    assert not bq.is_correct(" 4816", "4817") and not bq.is_correct("", "4817")
    assert bq.perplexity([math.log(2.0)] * 3) == pytest.approx(2.0)
    assert bq.parse_budgets("1/4, 1/8,512") == [("1/4", 0.25), ("1/8", 0.125), ("512", 512)]
    with pytest.raises(Exception):
        bq.parse_budgets("3/2")
    assert [bq.depth_of(i) for i in (0, 8, 9)] == pytest.approx([0.1, 0.9, 0.1])
    notes = bq.floor_notes([2048, 4096], [("1/8", 0.125), ("1/16", 0.0625)], 64, 1, 2)
    assert len(notes) == 1 and notes[0].startswith("2048 tokens at 1/16")


def test_one_case_through_the_pipeline(tmp_path):
    model = tiny(**MODEL)
    logs: list[str] = []
    res = bq.run(model, TOK, seed=1, cases=1, lengths=[300], budgets=[("1/4", 0.25), ("all", 100_000)],
                 policies=["streaming", "h2o", "snapkv", "quest", "hybrid", "sketch:coarse1"], ppl_tokens=12,
                 block_tokens=16,
                 cov_every=4, text=TEXT, store_dir=str(tmp_path / "kv"), log=logs.append)
    assert res["bench"] == "quality" and len(res["needle"]) == 1 and len(res["ppl"]) == 1
    assert any(m.startswith("[needle 300 1/1]") for m in logs)
    needle, ppl = res["needle"][0]["results"], res["ppl"][0]["results"]
    assert set(needle) == {"full"} | {f"{p}@{b}" for p in res["policies"] for b in ("1/4", "all")}
    full = ppl["full"]["nll"]
    assert len(full) == 12 and all(math.isfinite(x) for x in full)
    for p in res["policies"]:
        # a budget covering the whole context reproduces the full cache
        assert ppl[f"{p}@all"]["nll"] == pytest.approx(full, abs=1e-4)
        assert needle[f"{p}@all"]["answer"] == needle["full"]["answer"]
        assert ppl[f"{p}@all"]["cover"] == pytest.approx(1.0)
        # a quarter of the context: fewer tokens attended, part of the exact mass
        q = ppl[f"{p}@1/4"]
        assert 0.0 < q["cover"] <= 1.0 + 1e-6 and q["attended"] < 300
        assert 0.0 <= needle[f"{p}@1/4"]["needle_selected"] <= 1.0
    assert res["stored_mass"]["stored_mass"] > 0 and res["stored_mass"]["ok"]
    cells = [c for c in res["cells"] if c["length"] == 300]
    assert len(cells) == 2 * 6 and all(c["full_acc"] is not None and c["ppl_rel"] is not None for c in cells)
    assert all(abs(c["ppl_rel"]) < 1e-4 for c in cells if c["budget"] == "all")
    bq.print_table(res)  # renders


def test_runs_of_other_lengths_merge_into_one_table(tmp_path):
    import click
    model = tiny(**MODEL)
    kw = dict(seed=2, cases=1, budgets=[("1/4", 0.25)], policies=["quest"], ppl_tokens=8, block_tokens=16,
              cov_every=4, text=TEXT)
    a = bq.run(model, TOK, lengths=[200], store_dir=str(tmp_path / "a"), **kw)
    b = bq.run(model, TOK, lengths=[260], store_dir=str(tmp_path / "b"), **kw)
    m = bq.merge([a, b])
    assert m["lengths"] == [200, 260] and len(m["needle"]) == 2 and len(m["ppl"]) == 2
    assert {c["length"] for c in m["cells"]} == {200, 260, "all"}
    every = next(c for c in m["cells"] if c["length"] == "all")
    assert every["n"] == 2 and m["timing"]["total_s"] == pytest.approx(a["timing"]["total_s"] + b["timing"]["total_s"])
    d = bq.run(model, TOK, lengths=[200], store_dir=str(tmp_path / "d"), first_case=1,
               **{**kw, "ppl_tokens": 0})                     # more cases of a cell, needle only
    m = bq.merge([d, a, b])
    assert m["cases"] == 1 and len(m["needle"]) == 3 and len(m["ppl"]) == 2 and m["ppl_tokens"] == 8
    assert next(c for c in m["cells"] if c["length"] == 200)["n"] == 2
    c = bq.run(model, TOK, lengths=[200], store_dir=str(tmp_path / "c"), dense_layers=1, **kw)
    with pytest.raises(click.UsageError, match="dense_layers"):
        bq.merge([a, c])


def test_position_settings_each_prefill_their_own_case_and_get_their_own_rows(tmp_path):
    """--positions model,extend:t128,yarn: every case runs under each setting (its own prefill,
    resumed with its mode); extend equals model inside the (here 128-token) trained length and
    differs past it; yarn is another model; the positions table has one row per setting."""
    model = tiny(**MODEL)
    kw = dict(seed=3, cases=1, budgets=[("1/4", 0.25)], policies=["sketch"], ppl_tokens=8, block_tokens=16,
              cov_every=0, text=TEXT)
    res = bq.run(model, TOK, lengths=[100, 300], positions=("model", "extend:t128", "yarn"),
                 store_dir=str(tmp_path / "kv"), **kw)
    assert [r["positions"] for r in res["needle"]] == ["model", "extend:t128", "yarn"] * 2
    by = {(r["length"], r["positions"]): r["results"] for r in res["ppl"]}
    assert by[(100, "extend:t128")]["full"]["nll"] == by[(100, "model")]["full"]["nll"]   # bit for bit
    assert by[(300, "extend:t128")]["full"]["nll"] != by[(300, "model")]["full"]["nll"]
    assert by[(100, "yarn")]["full"]["nll"] != by[(100, "model")]["full"]["nll"]
    assert {c["positions"] for c in res["cells"]} == {"model", "extend:t128", "yarn"}
    rows = positions_rows(res)
    assert [(r["length"], r["positions"]) for r in rows] == [(n, p) for n in (100, 300)
                                                             for p in ("model", "extend:t128", "yarn")]
    assert any("yarn: a static YaRN RoPE" in n for n in res["notes"])
    bq.print_table(res)  # renders, with the positions table
    with pytest.raises(Exception, match="position setting 'stretch'"):
        bq.run(model, TOK, lengths=[100], positions=("stretch",), store_dir=str(tmp_path / "x"), **kw)


def test_target_names_a_policy_that_meets_both_halves_over_one_that_keeps_more_needles():
    """hybrid keeps every needle at +4% perplexity, sketch 19 of 20 at +1%: sketch meets it."""
    def res(correct, nll):
        return {"correct": correct, "nll": nll, "cover": None, "needle_selected": None, "attended": None}

    budgets = [("1/8", 0.125)]
    needle = [{"length": 1024, "tokens": 1024, "results": {"full": res(True, []), "hybrid@1/8": res(True, []),
                                            "sketch@1/8": res(i != 0, [])}} for i in range(20)]
    full = [1.0] * 10
    ppl = [{"length": 1024, "context": 1024, "results": {
        "full": res(None, full), "hybrid@1/8": res(None, [1.0 + math.log(1.04)] * 10),
        "sketch@1/8": res(None, [1.0 + math.log(1.01)] * 10)}}]
    got = bq.target(needle, ppl, ["hybrid", "sketch"], budgets)
    assert got["policy"] == "sketch" and got["met"] and abs(got["kept"] - 0.95) < 1e-9
    got = bq.target(needle, ppl, ["hybrid"], budgets)  # nothing meets it: the most needles kept
    assert got["policy"] == "hybrid" and not got["met"]


# -- the harder tasks (--tasks) ------------------------------------------------------------------

from tierstore.tools.bench.quality import tasks as bt  # noqa: E402


@pytest.mark.parametrize("task", ["multi", "hop", "list"])
def test_task_cases_are_determined_by_the_seed_and_hold_what_they_ask(task):
    a = [bt.make_task_case(TOK, TEXT, 7, task, 3000, i) for i in range(3)]
    b = [bt.make_task_case(TOK, TEXT, 7, task, 3000, i) for i in (2, 1, 0)][::-1]
    assert [c.summary() for c in a] == [c.summary() for c in b] and [c.ids for c in a] == [c.ids for c in b]
    assert bt.make_task_case(TOK, TEXT, 8, task, 3000, 0).ids != a[0].ids
    for c in a:
        prompt = TOK.decode(c.ids)
        assert abs(len(c.ids) - 3000) <= 16 and prompt.endswith("<|im_start|>assistant\n" + c.lead)
        assert c.question in prompt and all(f"\n{f}\n" in prompt for f in c.facts)  # each fact on its own line
        doc = prompt[:prompt.index(c.question)]
        places = [doc.index(f) / len(doc) for f in c.facts]
        assert all(abs(p - d) < 0.1 for p, d in zip(places, c.depths))  # at the depth it claims (+ intro, line breaks)
        assert all(TOK.decode(c.ids[s:e]).isalnum() and TOK.decode(c.ids[s:e]) in prompt for s, e in c.spans)
        assert c.needle == c.spans[0]


def test_multi_asks_every_planted_code_once_with_a_lead_per_line():
    c = bt.make_task_case(TOK, TEXT, 3, "multi", 1500, 0, size=6)
    assert len(c.facts) == 6 and len(c.answers) == 6 and len(set(c.answers)) == 6 and len(c.followups) == 5
    facts = {f.rsplit(" ", 1)[1].rstrip("."): f for f in c.facts}
    assert set(c.answers) == set(facts)
    leads = [c.lead] + [x.strip() for x in c.followups]
    for lead, code in zip(leads, c.answers):  # each line's lead is the fact it asks for, up to its code
        assert facts[code] == f"{lead} {code}."
        assert lead.split(" for ", 1)[1][:-3] in c.question
    assert [TOK.decode(c.ids[s:e]) for s, e in c.spans] == c.answers
    assert c.depths == pytest.approx([0.1 + 0.8 * i / 5 for i in range(6)], abs=1e-3)


def test_hop_chain_resolves_to_the_answer_and_only_through_the_pointer():
    for i in range(4):
        c = bt.make_task_case(TOK, TEXT, 5, "hop", 1200, i)
        prompt = TOK.decode(c.ids)
        start = c.lead.split("the key of ", 1)[1][:-len(" is kept is")]
        pointer = next(f for f in c.facts if f.startswith(f"The key of {start} is kept in "))
        place = pointer[len(f"The key of {start} is kept in "):-1]
        number = next(f for f in c.facts if f" for {place} is " in f)
        assert number.rsplit(" ", 1)[1].rstrip(".") == c.answers[0]            # the chain resolves
        assert place not in c.question and place not in c.lead                 # the hop is needed
        assert prompt.index(pointer) < prompt.index(number)
        assert len(c.distractors) == 2 and c.answers[0] not in c.distractors
        assert all(f"is {d}." in prompt for d in c.distractors)
        assert TOK.decode(c.ids[c.spans[1][0]:c.spans[1][1]]) == c.answers[0]


def test_list_plants_each_item_once():
    c = bt.make_task_case(TOK, TEXT, 2, "list", 1500, 1, size=5)
    prompt = TOK.decode(c.ids)
    assert len(c.answers) == len(set(c.answers)) == 5
    assert sorted(c.answers) == sorted(re.findall(r"Delivery note: a crate of (\w+) arrived\.", prompt))
    assert [TOK.decode(c.ids[s:e]) for s, e in c.spans] == c.answers


def test_task_scorers():
    m = bt.TaskCase(task="multi", length=0, index=0, facts=[], depths=[], question="", lead="",
                    answers=["4817", "2231", "9090", "1234"])
    assert m.grade([" 4817.", " 2231", " 9090.", " 12 34"]) == {"correct": True, "frac": 1.0}
    assert m.grade([" 4817.", " 1111", " 9090.", " 1234"]) == {"correct": False, "frac": 0.75}
    assert m.grade([" 2231", " 4817", " 1234", " 9090"])["frac"] == 0.0    # each code in its own line
    assert m.grade([" 4817"])["frac"] == 0.25 and m.grade([])["frac"] == 0.0
    h = bt.TaskCase(task="hop", length=0, index=0, facts=[], depths=[], question="", lead="", answers=["4817"],
                    distractors=["2231", "9090"])
    assert h.grade([" 4817."])["correct"] and h.grade([" 48 17"])["correct"]
    assert not h.grade([" 2231."])["correct"] and not h.grade(["4817, 2231"])["correct"]  # no listing
    assert not h.grade([""])["correct"]
    li = bt.TaskCase(task="list", length=0, index=0, facts=[], depths=[], question="", lead="",
                     answers=["apples", "ropes", "clocks", "mirrors"])
    assert li.grade([" apples, Ropes, clocks and mirrors."]) == {"correct": True, "frac": 1.0}
    assert li.grade([" apples, clocks, kettles"]) == {"correct": False, "frac": 0.5}
    assert li.grade([" pineapples, tightropes"])["frac"] == 0.0           # whole words only
    assert li.grade([" apples, ropes, clocks, mirrors, kettles"]) == {"correct": False, "frac": 1.0}  # and no other
    assert li.grade([":\n- apples\n- ropes", "- clocks\n- mirrors"])["correct"]
    assert not li.stop(":\n\n- apples\n", 0)                             # a bulleted list runs on
    assert m.stop(" 4817", 0) and not m.stop(" 48", 0) and h.stop(" 4817 and\nmore", 0) and not h.stop(" 4817", 0)
    assert bt.spread(1) == [0.5] and bt.spread(3) == pytest.approx([0.1, 0.5, 0.9])


def test_tasks_through_the_pipeline_get_their_own_columns(tmp_path):
    model = tiny(**MODEL)
    kw = dict(seed=1, cases=1, lengths=[300], budgets=[("1/4", 0.25), ("4096", 4096)], policies=["sketch", "snapkv"],
              ppl_tokens=0, block_tokens=16, text=TEXT)
    plain = bq.run(model, TOK, store_dir=str(tmp_path / "a"), **kw)
    assert "task_cells" not in plain and "tasks" not in plain        # the default output is the needle's
    res = bq.run(model, TOK, store_dir=str(tmp_path / "b"), tasks=("needle", "multi", "hop", "list"),
                 task_sizes={"multi": 4, "list": 4}, **kw)
    assert len(res["needle"]) == 1 and res["needle"][0]["results"]["full"] == plain["needle"][0]["results"]["full"]
    assert [r["task"] for r in res["task_rows"]] == ["multi", "hop", "list"]
    for r in res["task_rows"]:
        assert set(r["results"]) == {"full"} | {f"{p}@{b}" for p in kw["policies"] for b in ("1/4", "4096")}
        for p in kw["policies"]:  # a budget covering the whole context answers as the full cache
            assert r["results"][f"{p}@4096"]["answer"] == r["results"]["full"]["answer"]
    multi = next(r for r in res["task_rows"] if r["task"] == "multi")
    assert multi["results"]["full"]["answer"].count(" | ") == 3       # one answer line per asked code
    cells = [c for c in res["task_cells"] if c["length"] == 300]
    assert [(c["budget"], c["policy"]) for c in cells] == [("full", "full"), ("1/4", "sketch"), ("1/4", "snapkv"),
                                                           ("4096", "sketch"), ("4096", "snapkv")]
    for c in cells:
        assert {"needle", "multi", "multi_frac", "hop", "list", "list_frac"} <= set(c)
        assert c["multi_n"] == c["hop_n"] == c["list_n"] == c["needle_n"] == 1
    m = bq.merge([res, res])
    assert len(m["task_rows"]) == 6 and next(c for c in m["task_cells"] if c["length"] == "all")["hop_n"] == 2
    with pytest.raises(Exception, match="unknown tasks"):
        bq.run(model, TOK, store_dir=str(tmp_path / "c"), tasks=("needle", "sum"), **kw)
    bq.print_table(res)  # renders, with the task table


# -- documents of several needles (--needles-per-doc) -------------------------------------------


def test_a_document_holds_its_needles_once_and_each_case_asks_one_of_them():
    cases = bq.make_doc(TOK, TEXT, 7, 900, 2, 4)
    assert cases == bq.make_doc(TOK, TEXT, 7, 900, 2, 4)                      # determined by its inputs
    assert [c.code for c in cases] != [c.code for c in bq.make_doc(TOK, TEXT, 7, 900, 3, 4)]
    assert len({c.code for c in cases}) == len({c.entity for c in cases}) == len({c.kind for c in cases}) == 4
    assert [c.of_doc for c in cases] == [0, 1, 2, 3] and {c.index for c in cases} == {2}
    shared = cases[0].shared
    assert all(c.shared == shared for c in cases)
    assert abs(max(len(c.ids) for c in cases) - 900) <= 16        # the longest question's prompt
    head = TOK.decode(cases[0].ids[:shared])
    for c in cases:
        assert c.ids[:shared] == cases[0].ids[:shared] and len(c.ids) > shared
        text = TOK.decode(c.ids)
        assert all(text.count(o.fact) == 1 for o in cases)                   # every fact, once, in every case
        assert c.fact in head and c.question not in head and c.question in text
        assert text.endswith("<|im_start|>assistant\n" + c.lead)
        assert TOK.decode(c.ids[c.needle[0]:c.needle[1]]) == c.code and c.needle[1] <= shared
    depths = [c.depth for c in cases]
    assert depths == sorted(depths) and 0.1 <= depths[0] and depths[-1] < 0.9
    assert [c.needle[0] for c in cases] == sorted(c.needle[0] for c in cases)  # planted at their depths
    one = bq.make_doc(TOK, TEXT, 7, 900, 2, 1)
    assert len(one) == 1 and one[0].shared == 0                               # one needle: today's protocol


def test_a_document_is_prefilled_once_and_each_question_answers_as_its_own_prompt_would(tmp_path):
    """The shared prefill plus the question fed as decode steps gives the answer a prefill of that
    case's whole prompt gives, under every config (the protocol changes no answer); a run makes
    one row per needle asked and one prefill per document and position setting."""
    import tierstore
    from tierstore.adapters.fingerprint import kv_layout
    model = tiny(**MODEL)
    cases = bq.make_doc(TOK, TEXT, 5, 400, 0, 3)
    with tierstore.open(str(tmp_path / "kv"), hot="64MiB", warm="16MiB", block_tokens=16) as store:
        store.manager.prepare(kv_layout(model, 16), "cpu")
        ev = bq.Evaluator(model, TOK, store, policies=["sketch", "quest"], budgets=[("1/4", 0.25), ("all", 100_000)])
        doc, _ = ev.prefill(cases[0].ids, cases[0].shared)
        assert list(store.session(doc).token_ids) == cases[0].ids[:cases[0].shared]
        for case in cases:
            whole, _ = ev.prefill(case.ids)
            for p, lab, b in ev.configs():
                a, w = ev.answer(doc, case, p, b), ev.answer(whole, case, p, b)
                assert a["answer"] == w["answer"], (case.of_doc, p, lab)
            store.delete(whole)
    logs: list[str] = []
    res = bq.run(model, TOK, seed=5, cases=2, lengths=[400], budgets=[("1/4", 0.25)], policies=["sketch"],
                 ppl_tokens=0, block_tokens=16, text=TEXT, store_dir=str(tmp_path / "run"), needles_per_doc=3,
                 positions=("model", "extend:t128"), log=logs.append)
    assert res["needles_per_doc"] == 3 and len(res["needle"]) == 2 * 2 * 3
    assert any(n.startswith("each needle case is a document of 3 needles") for n in res["notes"])
    assert [(r["index"], r["positions"], r["of_doc"]) for r in res["needle"][:6]] == \
        [(0, "model", j) for j in range(3)] + [(0, "extend:t128", j) for j in range(3)]
    lines = [m for m in logs if m.startswith("[needle")]
    assert len(lines) == 12 and sum("prefill shared" not in m for m in lines) == 2 * 2  # one per doc and setting
    assert next(c for c in res["cells"] if c["length"] == 400 and c["positions"] == "model")["n"] == 6
    with pytest.raises(Exception, match="needles per document"):
        bq.run(model, TOK, lengths=[400], needles_per_doc=0, store_dir=str(tmp_path / "x"), text=TEXT)

"""The quality bench's harder tasks, beside the single needle of ``eval.make_case``.

Each case is generated from (seed, task, length, index) alone, into the same ``pydoc_data.topics``
haystack, as one chat-template prompt whose assistant turn is opened with a lead-in; the answer is
decoded greedily and scored by the task's scorer (string matches: case, spaces and punctuation
ignored, as ``eval.is_correct``). Answers are 4-digit numbers or single words:

``multi``  multi-needle: ``n`` facts of one kind for ``n`` entities ("The room number for the amber
           vault is 4817."), spread over depths 10%..90%; one question asks for all of them, in
           another order. The answer is a list the decoder labels: after each answer line the
           next line's lead ("The room number for the iron tower is") is fed as decode steps,
           so every code is asked for (SmolLM2-135M asked for a free list of four numbers gets
           none of them, even from the full cache). Scored: the share of the codes right, each in
           its own line ("frac"), and all of them ("correct").
``hop``    multi-hop: a pointer fact ("The key of the amber vault is kept in the iron tower.") and,
           later, the number of the place it points to ("The room number for the iron tower is
           4817."), among distractor numbers of other places; the question and the lead name only
           the first entity. Scored: the pointed-to number is in the answer and no distractor is.
``list``   extraction: ``n`` delivery notes, one item each ("Delivery note: a crate of lanterns
           arrived."), spread through the text; the question asks to list every item. Scored:
           recall of the items named ("frac"), and all of them and no other ("correct"). (A count of the same
           notes, "how many crates arrived?", was answered "1" by the full cache on every case.)
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

from .cases import FACTS_INTRO as INTRO
from .cases import KINDS, _codes, _entities, _haystack, _rng, encode, plant, render

TASKS = ("needle", "multi", "hop", "list")

ITEMS = ["apples", "lanterns", "blankets", "candles", "barrels", "ropes", "violins", "mirrors", "clocks", "saddles",
         "kettles", "ladders", "carpets", "anchors", "helmets", "teapots"]


def _norm(s: str) -> str:
    return re.sub(r"[^a-z0-9]", "", s.lower())


@dataclass
class TaskCase:
    """One prompt of a harder task. ``answers``: what the scorer looks for (the codes in the order
    asked, or the items); ``followups``: the leads fed after each answer line but the last
    (``multi``); ``distractors``: codes that make a ``hop`` answer wrong; ``spans``: token spans in
    ``ids`` of the answer-bearing word of each planted fact that the question needs."""
    task: str
    length: int
    index: int
    facts: list[str]
    depths: list[float]
    question: str
    lead: str
    answers: list[str]
    followups: list[str] = field(default_factory=list)
    distractors: list[str] = field(default_factory=list)
    ids: list[int] = field(default_factory=list, repr=False)
    spans: list[tuple[int, int]] = field(default_factory=list)
    needle: tuple[int, int] = (0, 0)  # the first span (the one the needle-selection probe follows)

    def summary(self) -> dict:
        d = asdict(self)
        d.pop("ids")
        d["tokens"] = len(self.ids)
        return d

    def grade(self, texts: list[str]) -> dict:
        """``texts``: the decoded answer line after each lead."""
        return SCORERS[self.task](texts, self)

    def stop(self, text: str, seg: int) -> bool:
        """An answer line ends at a newline, or for ``multi`` once it holds a 4-digit number; a
        ``list`` answer (often a bulleted list) runs to EOS or ``max_new``."""
        if self.task == "list":
            return False
        return "\n" in text.strip() or (self.task == "multi" and re.search(r"\d{4}", _norm(text)) is not None)

    def max_new(self, encode, seg: int) -> int:
        if self.task == "multi":
            return len(encode(" " + self.answers[seg])) + 4
        if self.task == "list":  # room for "- item" lines
            return sum(len(encode("\n- " + a)) for a in self.answers) + 8
        return sum(len(encode(" " + a)) + 1 for a in self.answers) + 6


# -- scorers: (answer lines, case) -> {"correct": bool, ...} -------------------------------------


def score_multi(texts: list[str], case: TaskCase) -> dict:
    """Each asked code in its own answer line: the share right, and all of them."""
    got = [i < len(texts) and _norm(c) in _norm(texts[i]) for i, c in enumerate(case.answers)]
    return {"correct": all(got), "frac": sum(got) / len(got)}


def score_hop(texts: list[str], case: TaskCase) -> dict:
    """The pointed-to code, and none of the distractors' codes (listing every number is wrong)."""
    t = _norm(" ".join(texts))
    return {"correct": _norm(case.answers[0]) in t and not any(_norm(d) in t for d in case.distractors)}


def score_list(texts: list[str], case: TaskCase) -> dict:
    """Recall of the listed items (the share of the planted items named), and all of them with
    no unplanted item of ``ITEMS`` named (naming every item is not all right)."""
    t = " ".join(texts).lower()
    named = {x for x in ITEMS if re.search(rf"\b{re.escape(x)}\b", t)}
    got = [a in named for a in case.answers]
    return {"correct": all(got) and named <= set(case.answers), "frac": sum(got) / len(got)}


SCORERS = {"multi": score_multi, "hop": score_hop, "list": score_list}


# -- generators: rng, size -> (facts, depths, question, lead, answers, followups, distractors, marks)


def spread(n: int) -> list[float]:
    """``n`` depths spread evenly over 10%..90% of the haystack."""
    return [0.1 + 0.8 * i / (n - 1) for i in range(n)] if n > 1 else [0.5]


def _gen_multi(rng, n: int):
    kind = rng.choice(KINDS)
    ents, codes = _entities(rng, n), _codes(rng, n)
    facts = [f"The {kind} for {e} is {c}." for e, c in zip(ents, codes)]
    order = rng.sample(range(n), n)  # asked in another order than they appear
    names = ", ".join(ents[i] for i in order[:-1]) + f" and {ents[order[-1]]}"
    question = f"What are the {kind}s for {names}? Answer with one line per place: its {kind}."
    leads = [f"The {kind} for {ents[i]} is" for i in order]
    return (facts, spread(n), question, leads[0], [codes[i] for i in order], ["\n" + x for x in leads[1:]], [],
            [(facts[i], codes[i]) for i in order])


def _gen_hop(rng, n_distract: int):
    kind = rng.choice(KINDS)
    start, place, *others = _entities(rng, 2 + n_distract)
    codes = _codes(rng, 1 + n_distract)
    pointer = f"The key of {start} is kept in {place}."
    target = f"The {kind} for {place} is {codes[0]}."
    facts = [pointer, target] + [f"The {kind} for {e} is {c}." for e, c in zip(others, codes[1:])]
    # the pointer before the number it points to; the decoys anywhere
    depths = [0.1 + 0.3 * rng.random(), 0.5 + 0.4 * rng.random()] + [rng.uniform(0.1, 0.9) for _ in others]
    question = f"Where is the key of {start} kept, and what is the {kind} for that place? Answer with the number only."
    lead = f"The {kind} for the place where the key of {start} is kept is"
    return facts, depths, question, lead, [codes[0]], [], codes[1:], [(pointer, place.split()[-1]), (target, codes[0])]


def _gen_list(rng, n: int):
    items = rng.sample(ITEMS, n)
    facts = [f"Delivery note: a crate of {x} arrived." for x in items]
    question = "Which items arrived, according to the delivery notes? List all of them, separated by commas."
    lead = "The items that arrived are"
    return facts, spread(n), question, lead, items, [], [], list(zip(facts, items))


GENERATORS = {"multi": _gen_multi, "hop": _gen_hop, "list": _gen_list}
DEFAULT_SIZE = {"multi": 4, "hop": 2, "list": 4}  # facts asked / distractor numbers / items planted


def make_task_case(tok, text: str, seed: int, task: str, length: int, index: int, size: int | None = None) -> TaskCase:
    """Case ``index`` of a ``length``-token cell of ``task``; depends only on (seed, task, length, index, size)."""
    rng = _rng(seed, task, length, index)
    size = DEFAULT_SIZE[task] if size is None else size
    facts, depths, question, lead, answers, followups, distractors, marks = GENERATORS[task](rng, size)
    overhead = len(encode(tok, render(tok, INTRO + "\n".join(facts) + f"\n\n\n{question}", lead))) + 2 * len(facts)
    hay = _haystack(tok, text, rng, max(16, length - overhead))
    prompt = render(tok, f"{INTRO}{plant(hay, facts, depths)}\n\n{question}", lead)
    spans = []
    for fact, word in marks:
        at = prompt.index(fact + "\n") + fact.rindex(word)
        spans.append((len(encode(tok, prompt[:at])), len(encode(tok, prompt[:at + len(word)]))))
    return TaskCase(task=task, length=length, index=index, facts=facts, depths=[round(d, 3) for d in depths],
                    question=question, lead=lead, answers=answers, followups=followups, distractors=distractors,
                    ids=encode(tok, prompt), spans=spans, needle=spans[0])

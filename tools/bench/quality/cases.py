"""The needle cases of ``tierstore bench quality``: a fact generated from the seed, planted in
``pydoc_data.topics`` prose, and the chat-template prompt that asks for it (``make_case``); a
document of several such facts asked one at a time (``make_doc``); held-out prose for perplexity
(``make_ppl_text``); the string-match scorer. Everything depends only on its arguments."""

from __future__ import annotations

import os
import random
import re
from dataclasses import asdict, dataclass, field

# -- needle cases ---------------------------------------------------------------------------------------

ADJECTIVES = ["silver", "crimson", "quiet", "northern", "hidden", "ancient", "golden", "frozen", "western",
              "amber", "sunken", "iron", "velvet", "copper", "misty", "eastern", "emerald", "hollow",
              "scarlet", "marble", "southern", "cobalt", "wooden", "lunar"]
NOUNS = ["harbor", "archive", "lighthouse", "garden", "observatory", "library", "vault", "bridge", "tower",
         "monastery", "laboratory", "greenhouse", "station", "citadel", "museum", "orchard", "workshop",
         "canal", "theater", "fortress", "chapel", "market", "depot", "academy"]
KINDS = ["secret access code", "room number", "registration number", "locker combination", "emergency extension"]

INTRO = "Read this document carefully. It contains one important fact.\n\n"
FACTS_INTRO = "Read this document carefully. It contains important facts.\n\n"


@dataclass
class Case:
    length: int          # requested prompt tokens
    index: int
    depth: float         # where the fact sits in the haystack, 0..1
    entity: str
    kind: str
    code: str
    fact: str
    question: str
    lead: str            # the assistant's opening words; the code follows
    ids: list[int] = field(repr=False)  # the whole prompt, chat template included
    needle: tuple[int, int] = (0, 0)    # token span of the code in ``ids``
    shared: int = 0      # ``make_doc``: the leading ids every question of the document shares (one prefill)
    of_doc: int = 0      # ``make_doc``: which of the document's needles this case asks for

    def summary(self) -> dict:
        d = asdict(self)
        d.pop("ids")
        d["tokens"] = len(self.ids)
        return d


def depth_of(index: int) -> float:
    """Depths 10%, 20%, ... 90%, cycled over the cases of a cell."""
    return 0.1 + 0.1 * (index % 9)


def _rng(seed: int, *parts) -> random.Random:
    return random.Random(":".join(str(p) for p in (seed, *parts)))


def encode(tok, text: str) -> list[int]:
    return list(tok.encode(text, add_special_tokens=False))


def render(tok, user: str, lead: str) -> str:
    chat = tok.apply_chat_template([{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True)
    return chat + lead


def _haystack(tok, text: str, rng: random.Random, n_tokens: int) -> str:
    """About ``n_tokens`` tokens of ``text`` from a random paragraph on."""
    need = n_tokens * 6 + 1000
    if len(text) <= need:
        start = 0
    else:
        start = rng.randrange(0, len(text) - need)
        nl = text.find("\n\n", start)
        start = nl + 2 if 0 <= nl < len(text) - need else start
    ids = encode(tok, text[start:start + need])[:n_tokens]
    return tok.decode(ids)


def _needle(kind: str, entity: str, code: str) -> tuple[str, str, str]:
    """(fact, question, lead) of one needle."""
    return (f"The {kind} for {entity} is {code}.", f"What is the {kind} for {entity}? Answer with the number only.",
            f"The {kind} for {entity} is")


def _code_span(tok, prompt: str, fact: str, code: str) -> tuple[int, int]:
    """Token span in ``encode(prompt)`` of ``code`` at the end of ``fact`` (planted on its own line)."""
    at = prompt.index(fact + "\n") + len(fact) - len(code) - 1
    return len(encode(tok, prompt[:at])), len(encode(tok, prompt[:at + len(code)]))


def make_case(tok, text: str, seed: int, length: int, index: int) -> Case:
    """Case ``index`` of a ``length``-token cell; depends only on (seed, length, index)."""
    rng = _rng(seed, "needle", length, index)
    entity = f"the {rng.choice(ADJECTIVES)} {rng.choice(NOUNS)}"
    kind = rng.choice(KINDS)
    code = str(rng.randrange(1000, 10000))
    fact, question, lead = _needle(kind, entity, code)
    depth = depth_of(index)
    overhead = len(encode(tok, render(tok, f"{INTRO}\n{fact}\n\n\n{question}", lead)))
    doc = plant(_haystack(tok, text, rng, max(16, length - overhead)), [fact], [depth])
    prompt = render(tok, f"{INTRO}{doc}\n\n{question}", lead)
    return Case(length=length, index=index, depth=round(depth, 2), entity=entity, kind=kind, code=code, fact=fact,
                question=question, lead=lead, ids=encode(tok, prompt), needle=_code_span(tok, prompt, fact, code))


def make_doc(tok, text: str, seed: int, length: int, index: int, k: int) -> list[Case]:
    """Document ``index`` of a ``length``-token cell holding ``k`` needles (distinct entities and
    codes, and kinds while there are enough; depths spread over 10%..90%, offset per document),
    as ``k`` cases: the document with one needle's question each. The other ``k - 1`` facts are
    distractors of the same shape. Every case's ids begin with the same ``shared`` tokens (the
    prompt up to the question), so one prefill of them serves all ``k`` questions: each resume
    feeds its question as one exact prefill chunk (as a conversation's next turn) and its last
    token as the first decode step. Depends only on (seed, length, index, k)."""
    rng = _rng(seed, "doc", length, index, k)
    ents, codes = _entities(rng, k), _codes(rng, k)
    # a fact that shares its kind with another is a harder distractor (``--tasks multi`` measures that)
    kinds = rng.sample(KINDS, k) if k <= len(KINDS) else [rng.choice(KINDS) for _ in range(k)]
    offset = (index * 0.6180339887) % 1.0
    depths = [0.1 + 0.8 * (j + offset) / k for j in range(k)]
    needles = [_needle(kd, e, c) for kd, e, c in zip(kinds, ents, codes)]
    facts = [f for f, _, _ in needles]
    longest = max(needles, key=lambda n: len(n[1]) + len(n[2]))
    overhead = len(encode(tok, render(tok, FACTS_INTRO + "\n".join(facts) + f"\n\n\n{longest[1]}", longest[2]))) + 2 * k
    doc = plant(_haystack(tok, text, rng, max(16, length - overhead)), facts, depths)
    prompts = [render(tok, f"{FACTS_INTRO}{doc}\n\n{q}", lead) for _, q, lead in needles]
    all_ids = [encode(tok, p) for p in prompts]
    shared = min(len(os.path.commonprefix(all_ids)), min(map(len, all_ids)) - 1) if k > 1 else 0
    cases = []
    for j, ((fact, question, lead), prompt, ids) in enumerate(zip(needles, prompts, all_ids)):
        span = _code_span(tok, prompt, fact, codes[j])
        assert span[1] <= shared or k == 1, "a planted code lies past the shared prefix"
        cases.append(Case(length=length, index=index, depth=round(depths[j], 2), entity=ents[j], kind=kinds[j],
                          code=codes[j], fact=fact, question=question, lead=lead, ids=ids, needle=span,
                          shared=shared, of_doc=j))
    return cases


def make_ppl_text(tok, text: str, seed: int, length: int, n_cont: int, index: int = 0) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids): ``length`` + ``n_cont`` consecutive tokens of prose."""
    rng = _rng(seed, "ppl", length, index)
    ids = encode(tok, _haystack(tok, text, rng, length + n_cont + 8))
    ids = ids[:length + n_cont]
    return ids[:length], ids[length:]


def normalize(s: str) -> str:
    return re.sub(r"[^a-z0-9]", "", s.lower())


def is_correct(answer: str, code: str) -> bool:
    """String match: the code appears in the answer, ignoring case, spaces and punctuation."""
    return bool(normalize(code)) and normalize(code) in normalize(answer)


def plant(hay: str, facts: list[str], depths: list[float]) -> str:
    """``hay`` with each fact on a line of its own at (about) its depth, at a line break when one is near."""
    cuts = []
    for d in depths:
        cut = int(len(hay) * d)
        nl = hay.find("\n", cut)
        cuts.append(nl + 1 if 0 <= nl < cut + 400 else cut)
    out, prev = [], 0
    for cut, fact in sorted(zip(cuts, facts), key=lambda x: x[0]):
        piece = hay[prev:cut]
        out.append(piece + ("" if not piece or piece.endswith("\n") else "\n") + fact + "\n")
        prev = cut
    return "".join(out) + hay[prev:]


def _entities(rng, n: int) -> list[str]:
    return [f"the {a} {b}" for a, b in zip(rng.sample(ADJECTIVES, n), rng.sample(NOUNS, n))]


def _codes(rng, n: int) -> list[str]:
    return [str(c) for c in rng.sample(range(1000, 10000), n)]

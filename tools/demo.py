"""`make demo`: a 10k-token document on SmolLM2-135M-Instruct under a small hot budget, then a
resume in a second process that answers a follow-up without re-running the prefill.

SmolLM2-135M was trained on 8,192 positions; the document is longer, so the cache runs with
``positions="extend"``: past the trained length, keys further than a window from the query are
attended at the window's edge (the default ``far`` mapping; ``tierstore.positions``), so no
distance leaves the trained range. ``--positions model`` shows what the model's own positions
give there.

python -m tierstore.tools.demo [--store DIR] [--tokens 10000] [--hot 96MiB] [--positions extend]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import torch

SESSION = "demo-doc"
INTRO = "Read this document carefully. It contains one important fact.\n\n"
FACT = "The locker combination for the blue heron garden is 4817."
QUESTION = "What is the locker combination for the blue heron garden? Answer with the number only."
LEAD = "The locker combination for the blue heron garden is"  # the reply's first words, given (say(prefix=))
ANSWER = "4817"
FOLLOW_UP = "Please repeat the locker combination for the blue heron garden."
FOLLOW_LEAD = "The locker combination is"
FOLLOW_ANSWER = "4817"


def _say(msg: str) -> None:
    print(msg, flush=True)


def _progress(model, total: int):
    """A forward pre-hook printing prefill progress on stderr (no dependency on tqdm)."""
    seen = [0]

    def hook(module, args, kwargs):
        ids = kwargs.get("input_ids")
        if ids is not None and ids.shape[1] > 1:
            seen[0] += ids.shape[1]
            if sys.stderr.isatty() or seen[0] >= total:
                print(f"\r  prefill {seen[0]:>6}/{total} tokens", end="\n" if seen[0] >= total else "",
                      file=sys.stderr, flush=True)
    return model.register_forward_pre_hook(hook, with_kwargs=True)


def build_document(tok, tokens: int) -> str:
    from tierstore.adapters.models import long_text
    text = long_text(tokens * 6)
    ids = tok(text, add_special_tokens=False).input_ids[:tokens]
    body = tok.decode(ids)
    cut = int(len(body) * 0.3)
    cut = body.find("\n", cut) + 1 or cut
    return body[:cut] + "\n" + FACT + "\n" + body[cut:]


def describe_positions(positions, model) -> str:
    trained = model.config.max_position_embeddings
    if positions.mode == "model":
        return f"positions: model (the model's own; SmolLM2-135M was trained on {trained:,})"
    return (f"positions: extend (mapping {positions.mapping!r}, window {positions.window:,}): past the "
            f"{positions.trained:,} trained positions, keys further than the window from a query are attended "
            "at mapped distances that stay within them; the stored KV is unchanged")


def first_run(args) -> None:
    import tierstore
    from tierstore.adapters.conversation import Conversation
    from tierstore.adapters.models import load_smollm2

    model, tok = load_smollm2(torch.float32)
    doc = build_document(tok, args.tokens)
    prompt = f"{INTRO}Document:\n{doc}\n\nQuestion: {QUESTION}"
    with tierstore.open(args.store, hot=args.hot, warm=args.warm) as store:
        if store.exists(SESSION):
            store.delete(SESSION)
        conv = Conversation(store, model, tok, SESSION, positions=args.positions)
        n_prompt = len(tok(tok.apply_chat_template(conv.messages + [{"role": "user", "content": prompt}],
                                                   add_generation_prompt=True, tokenize=False),
                           add_special_tokens=False).input_ids)
        kv_bytes = n_prompt * 2 * conv.cache.layout.num_layers * conv.cache.layout.kv_heads \
            * conv.cache.layout.head_dim * 4
        _say(f"document: {n_prompt} tokens; its KV is {kv_bytes / 2**20:.0f} MiB; hot budget "
             f"{store.config.hot_bytes / 2**20:.0f} MiB ({store.config.hot_bytes / kv_bytes:.0%} of the KV)")
        _say(describe_positions(conv.cache.positions, model))
        h = _progress(model, n_prompt)
        t0 = time.perf_counter()
        reply = conv.say(prompt, max_new_tokens=8, prefill_chunk_size=1024, prefix=LEAD)
        dt = time.perf_counter() - t0
        h.remove()
        ok = ANSWER in reply
        _say(f"Q: {QUESTION}\nA: {reply.strip()}\n   -> {'RIGHT' if ok else 'WRONG'} ({dt:.1f} s incl. prefill)")
        trained = model.config.max_position_embeddings
        if not ok and n_prompt > trained and conv.cache.positions.mode == "model":
            _say(f"   note: SmolLM2-135M was trained on {trained:,}-token contexts and this document has {n_prompt:,}; "
                 "with positions='model' attention sees distances the model never saw. positions='extend' "
                 "(the default of this demo) keeps them within its trained length.")
        s = store.stats()
        _say(f"tiers during the run: hot peak {store.manager.counters.hot_peak} blocks "
             f"(<= budget {s.hot_budget_bytes / 2**20:.0f} MiB), warm {s.warm_used_bytes / 2**20:.0f} MiB, "
             f"cold {s.cold_used_bytes / 2**20:.0f} MiB; demotions {s.demotions}, promotions {s.promotions}")
        conv.close()
        rec = store.session(SESSION)
        _say(f"committed session {SESSION!r}: {rec.length} tokens in {os.path.abspath(args.store)} "
             f"(inspect: tierstore --store {args.store} show {SESSION})")


def second_run(args) -> None:
    import tierstore
    from tierstore.adapters.conversation import Conversation
    from tierstore.adapters.models import load_smollm2
    from transformers import DynamicCache

    model, tok = load_smollm2(torch.float32)
    with tierstore.open(args.store, hot=args.hot, warm=args.warm) as store:
        t0 = time.perf_counter()
        conv = Conversation.resume(store, model, tok, SESSION)  # the position mode comes from the record
        first = []
        reply = conv.say(FOLLOW_UP, max_new_tokens=12, prefix=FOLLOW_LEAD,
                         on_text=lambda p: first.append(time.perf_counter()) if not first else None)
        ttft_resume = (first[0] if first else time.perf_counter()) - t0
        history = conv.cache.token_ids[0]
        mode = conv.cache.positions.mode
        conv.close()
    ok = FOLLOW_ANSWER in reply
    _say(f"[new process, positions={mode!r} from the session record] Q: {FOLLOW_UP}\nA: {reply.strip()}\n"
         f"   -> {'RIGHT' if ok else 'WRONG'}")
    t0 = time.perf_counter()
    ids, dyn = torch.tensor([history]), DynamicCache()
    with torch.no_grad():
        for s in range(0, len(history), 1024):
            model(input_ids=ids[:, s:s + 1024], cache=dyn, use_cache=True, logits_to_keep=1)
    ttft_prefill = time.perf_counter() - t0
    _say(f"time to first token: resume from disk {ttft_resume:.2f} s vs re-running the prefill of "
         f"{len(history)} tokens {ttft_prefill:.1f} s ({ttft_prefill / ttft_resume:.0f}x)")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--store", default=os.environ.get("TIERSTORE_DEMO_STORE", ".demo/kv"))
    p.add_argument("--tokens", type=int, default=10000)
    p.add_argument("--hot", default="96MiB")
    p.add_argument("--warm", default="160MiB")
    p.add_argument("--positions", default="extend", choices=["extend", "model"])
    p.add_argument("--resume", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    if args.resume:
        second_run(args)
        return
    first_run(args)
    _say("--- starting a second process that resumes the session ---")
    subprocess.run([sys.executable, "-m", "tierstore.tools.demo", "--resume", "--store", args.store,
                    "--hot", args.hot, "--warm", args.warm], check=True)


if __name__ == "__main__":
    main()

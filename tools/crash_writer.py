"""The writer process of the crash trials (``tierstore bench crash``, ``tests/test_crash.py``).

    python -m tierstore.tools.crash_writer STORE REPORT --seed S --life L

Generates sessions through ``TieredCache`` on a tiny random Llama (fixed seed, so a checker
process rebuilds the identical model), commits them, and after each ``commit()`` returns appends
one line to REPORT, fsync'd: ``{"life", "op", "session", "length", "ids"}``. A session a line
names must survive any crash that comes after the line was written. Prints ``ready`` once the
model is built and the store open, then works until it is killed.

Ops, drawn from a seeded RNG: ``new`` (prompt + greedy generation, chunked prefill, auto-commit
every 1-2 sealed blocks or off), ``extend`` (resume a stored session -- one a killed earlier life
left behind included, taking over its lease -- append user tokens and generate), ``fork``.
Its sessions are named ``w<life>-<step>`` / ``f<life>-<step>``; it never touches other names.

Crash points for targeted kills (``TIERSTORE_CRASH_AT=point:n:delay_us``): the n-th time this
process reaches ``point`` it SIGKILLs itself, at once (delay 0) or from a timer thread after
``delay_us`` microseconds, so that the kill lands inside whatever C call follows (an LMDB commit,
its fsync, a matmul). Points: ``prefill``/``decode`` (the last decoder layer's forward),
``writeback`` (the write-back thread's block transaction), ``tail`` (the partial tail block
written by ``commit``), ``commit`` (entering the session commit), ``txn`` (inside any write
transaction, after its puts, before LMDB commits it), ``committed`` (the commit returned, the
report not yet written). The hooks patch classes in this process only: the core has no test hooks.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import threading
import time

MODEL_SEED = 1234
VOCAB = 128
BLOCK_TOKENS = 8
HOT_BLOCKS, WARM_BLOCKS = 12, 8       # small: blocks move through all three tiers
MAX_LENGTH = 160                      # sessions longer than this are not extended
POINTS = ("prefill", "decode", "writeback", "tail", "commit", "txn", "committed")


def tiny_model():
    """The trials' model: a 2-layer random Llama, identical in every process (fixed seed)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(MODEL_SEED)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    return AutoModelForCausalLM.from_config(cfg).eval()


def open_store(path, model, **kw):
    """The trials' store: 8-token blocks, hot and warm budgets of a few blocks."""
    import tierstore
    from tierstore.adapters.fingerprint import kv_layout

    bb = kv_layout(model, BLOCK_TOKENS).block_bytes
    return tierstore.open(path, hot=bb * HOT_BLOCKS, warm=bb * WARM_BLOCKS, block_tokens=BLOCK_TOKENS, **kw)


# -- crash points ----------------------------------------------------------------------------


def _die(delay: float) -> None:
    if delay <= 0:
        os.kill(os.getpid(), signal.SIGKILL)

    def later() -> None:
        time.sleep(delay)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=later, daemon=True).start()


def install_crash_point(spec: str, model) -> None:
    """``point:n:delay_us``: SIGKILL this process at the n-th arrival at ``point``."""
    from tierstore.sessions import SessionStore
    from tierstore.tiers.cold import ColdStore

    point, n, delay_us = spec.split(":")
    if point not in POINTS:
        raise SystemExit(f"unknown crash point {point!r}; one of {POINTS}")
    n, delay = int(n), int(delay_us) / 1e6
    seen = {"n": 0}
    lock = threading.Lock()

    def hit(name: str) -> None:
        if name == point:
            with lock:
                seen["n"] += 1
                if seen["n"] == n:
                    _die(delay)

    def layer_hook(_module, args, kwargs):
        h = args[0] if args else kwargs.get("hidden_states")
        hit("prefill" if h.shape[1] > 1 else "decode")

    model.model.layers[-1].register_forward_pre_hook(layer_hook, with_kwargs=True)

    put_blocks, commit, write = SessionStore.put_blocks, SessionStore.commit, ColdStore.write

    def put_blocks_hooked(self, items):
        hit("writeback" if threading.current_thread().name.startswith("tierstore-writer") else "tail")
        return put_blocks(self, items)

    def commit_hooked(self, record, **kw):
        hit("commit")
        out = commit(self, record, **kw)
        hit("committed")
        return out

    def write_hooked(self, fn):
        def inside(txn):
            out = fn(txn)
            hit("txn")
            return out
        return write(self, inside)

    SessionStore.put_blocks, SessionStore.commit, ColdStore.write = put_blocks_hooked, commit_hooked, write_hooked


# -- the writer ------------------------------------------------------------------------------


class Reporter:
    """Appends one fsync'd JSON line per commit that returned."""

    def __init__(self, path: str, life: int) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self.life = life

    def __call__(self, op: str, rec) -> None:
        line = json.dumps({"life": self.life, "op": op, "session": rec.name, "length": rec.length,
                           "ids": [int(t) for t in rec.token_ids]}) + "\n"
        os.write(self.fd, line.encode())
        os.fsync(self.fd)


def _generate(model, ids, cache, rng: random.Random) -> None:
    import torch

    # an explicit mask: without one, generate() takes a generated token equal to pad_token_id in
    # the history for padding and shifts the positions after it
    model.generate(ids, attention_mask=torch.ones_like(ids), cache=cache, max_new_tokens=rng.randint(2, 14),
                   do_sample=False, pad_token_id=0, prefill_chunk_size=rng.choice([None, 8, 16]))


def op_new(st, model, rng: random.Random, name: str):
    import torch

    from tierstore.adapters.hf import TieredCache

    ids = torch.tensor([[rng.randrange(1, VOCAB) for _ in range(rng.randint(3, 40))]])
    with TieredCache(st, model, session=name, auto_commit_blocks=rng.choice([None, 1, 2]),
                     commit_on_close=False) as cache:
        _generate(model, ids, cache, rng)
        return cache.commit()[0]


def op_extend(st, model, rng: random.Random, src: str):
    from tierstore.adapters.hf import TieredCache

    with TieredCache.resume(st, model, src, auto_commit_blocks=rng.choice([None, 1, 2]),
                            commit_on_close=False) as cache:
        user = [rng.randrange(1, VOCAB) for _ in range(rng.randint(1, 12))]
        _generate(model, cache.full_ids(user), cache, rng)
        return cache.commit()[0]


def op_fork(st, rng: random.Random, src, name: str):
    n = src.length if src.length < BLOCK_TOKENS or rng.random() < 0.5 else \
        BLOCK_TOKENS * rng.randint(1, src.length // BLOCK_TOKENS)
    return st.fork(src.name, name, n)


def run(path: str, report: str, *, seed: int, life: int, steps: int | None = None, pause: float = 0.0) -> None:
    import torch

    torch.set_num_threads(1)
    model = tiny_model()
    if os.environ.get("TIERSTORE_CRASH_AT"):
        install_crash_point(os.environ["TIERSTORE_CRASH_AT"], model)
    rng = random.Random(f"{seed}/{life}")
    rep = Reporter(report, life)
    with open_store(path, model) as st:
        print("ready", flush=True)
        step = 0
        while steps is None or step < steps:
            op = rng.choices(["new", "extend", "fork"], [5, 4, 1])[0]
            stored = sorted((r for r in st.list() if r.length < MAX_LENGTH and r.name[0] in "wf"),
                            key=lambda r: r.name)  # its own sessions only: others may be in use
            if op != "new" and not stored:
                op = "new"
            if op == "new":
                rec = op_new(st, model, rng, f"w{life}-{step}")
            elif op == "extend":
                rec = op_extend(st, model, rng, rng.choice(stored).name)
            else:
                rec = op_fork(st, rng, rng.choice(stored), f"f{life}-{step}")
            rep(op, rec)
            step += 1
            time.sleep(pause)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("store")
    ap.add_argument("report")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--life", type=int, default=0)
    ap.add_argument("--steps", type=int, default=None, help="stop after this many ops (default: until killed)")
    ap.add_argument("--pause", type=float, default=0.0, help="seconds to sleep between ops")
    a = ap.parse_args(argv)
    run(a.store, a.report, seed=a.seed, life=a.life, steps=a.steps, pause=a.pause)


if __name__ == "__main__":
    main(sys.argv[1:])

"""One simulated host of the remote-tier tests: its own process, its own LMDB, its own host id.

    python remote_host.py '{"op": ..., "store": DIR, "remote": URL, "host": "A", ...}'

Ops (each prints one JSON line last; ``error`` names a typed error, ``fork`` the fork made):

* ``commit``  new session ``session`` from ``prompt``, greedy ``new_tokens``, commit; with
  ``extend`` (the whole input: the last output plus new ids) it resumes the session instead;
* ``hold``    like ``commit`` for turn 1 (committed), then keeps the cache open (its lease held), generates
  ``new_tokens`` more, prints ``{"ready": ...}`` and waits for one line on stdin before it
  commits (the test pauses it with SIGSTOP in between);
* ``put``     ``Store.put_session`` of ``tokens`` random bit patterns (NaN, -0.0 included; the first
  ``tokens`` of 64 drawn from seed ``kv_seed``: versions of one session agree on their prefix) with ids ``range(tokens)`` over a 2-layer fp32 layout: the commit protocol
  without a model;
* ``drain``   open the store and publish its outbox (a host coming back after a crash).

``crash="step:n:when"`` SIGKILLs this process the n-th time it reaches remote step ``step``
(a ``RemoteTier`` method: ``add_intent``, ``upload``, ``ref``, ``commit``, ``unref``, ``index``,
``clear_intent``) ``before`` or ``after`` the call. The patch is in this process only: the core
has no test hooks.
"""

from __future__ import annotations

import json
import os
import signal
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import tierstore  # noqa: E402
from tierstore.adapters.hf import TieredCache  # noqa: E402
from tierstore.errors import TierstoreError  # noqa: E402
from tierstore.remote import RemoteTier  # noqa: E402

BT = 8


def crash_at(spec: str) -> None:
    step, n, when = spec.split(":")
    n = int(n)
    seen = {"n": 0}
    orig = getattr(RemoteTier, step)

    def wrapped(self, *a, **kw):
        seen["n"] += 1
        hit = seen["n"] == n
        if hit and when == "before":
            os.kill(os.getpid(), signal.SIGKILL)
        out = orig(self, *a, **kw)
        if hit and when == "after":
            os.kill(os.getpid(), signal.SIGKILL)
        return out

    setattr(RemoteTier, step, wrapped)


def gen(model, ids, cache, n):
    out = model.generate(torch.tensor([ids]), cache=cache, max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0].tolist()


LAYOUT = dict(num_layers=2, kv_heads=2, head_dim=8, block_tokens=BT, dtype=torch.float32)


def put_kv(tokens: int, seed: int):
    """The ``put`` op's layout and K/V (the test rebuilds them to compare)."""
    from support.kv import random_kv
    from tierstore.layout import KVLayout

    lay = KVLayout(**LAYOUT)
    return lay, [(k[:, :tokens], v[:, :tokens]) for k, v in random_kv(lay, 64, seed, kind="bits")]


def main() -> None:
    a = json.loads(sys.argv[1])
    remote = RemoteTier(a["remote"], lease_ttl=a.get("lease_ttl", 30.0), orphan_ttl=a.get("orphan_ttl", 3600.0))
    st = tierstore.open(a["store"], remote=remote, host=a["host"], block_tokens=BT)
    out: dict = {}
    try:
        if a.get("crash"):
            crash_at(a["crash"])
        if a["op"] == "put":
            lay, kv = put_kv(a["tokens"], a["kv_seed"])
            st.put_session(a["session"], layout=lay, kv=kv, token_ids=list(range(a["tokens"])), fingerprint="fp",
                           overwrite=True)
            out = {"put": a["tokens"]}
        elif a["op"] == "drain":
            rep = st.sessions.replica.drain()
            out = {"published": rep.published, "forks": rep.forks, "pending": rep.pending, "error": rep.error}
        elif a["op"] in ("commit", "hold"):
            from support.models import tiny
            model = tiny(dtype=getattr(torch, a.get("dtype", "float32")), seed=a.get("seed", 0))
            name = a["session"]
            if a.get("extend") is not None:
                cache = TieredCache.resume(st, model, name)
                ids = gen(model, a["extend"], cache, a["new_tokens"])
            else:
                cache = TieredCache(st, model, session=name, overwrite=a.get("overwrite", False))
                ids = gen(model, a["prompt"], cache, a["new_tokens"])
            try:
                if a["op"] == "hold":
                    cache.commit()
                    ids = gen(model, ids, cache, a["new_tokens"])
                    print(json.dumps({"ready": ids}), flush=True)
                    sys.stdin.readline()
                cache.commit()
                out = {"ids": ids}
            except TierstoreError as e:
                out = {"ids": ids, "error": type(e).__name__, "message": str(e), "fork": getattr(e, "fork", None)}
            finally:
                cache.commit_on_close = False
                cache.close()
    finally:
        st.close()
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()

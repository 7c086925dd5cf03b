"""One tensor-parallel rank of the TP tests: ``RANK``/``WORLD_SIZE``/``MASTER_PORT`` from the
environment (gloo on CPU, 127.0.0.1), the tiny Llama saved at ``model`` loaded with
``tp_plan="auto"`` (each rank holds its share of every layer's KV heads).

    python tp_host.py '{"op": "commit"|"resume"|"dynamic", "model": DIR, "store": DIR,
                        "remote": URL, "host": "A", "session": "s", "ids": [...], "new_tokens": n}'

``commit``: a new TieredCache, greedy ``new_tokens`` from ``ids``, committed (one shard per
rank); ``resume``: resume ``session`` and continue from ``ids``; ``dynamic``: the same
generation through DynamicCache (the reference). Rank 0 prints ``{"ids": [...]}``.
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist


def main() -> None:
    a = json.loads(sys.argv[1])
    dist.init_process_group("gloo")
    try:
        from transformers import AutoModelForCausalLM, DynamicCache

        import tierstore
        from tierstore.adapters.hf import TieredCache
        from tierstore.remote import RemoteTier

        model = AutoModelForCausalLM.from_pretrained(a["model"], tp_plan="auto", dtype=torch.float32).eval()
        ids = torch.tensor([a["ids"]])
        kw = dict(max_new_tokens=a["new_tokens"], do_sample=False, pad_token_id=0)
        if a["op"] == "dynamic":
            out = model.generate(ids, cache=DynamicCache(), **kw)
        else:
            st = tierstore.open(a["store"], remote=RemoteTier(a["remote"]), host=a["host"], block_tokens=8)
            try:
                if a["op"] == "commit":
                    cache = TieredCache(st, model, session=a["session"])
                else:
                    cache = TieredCache.resume(st, model, a["session"])
                with cache:
                    out = model.generate(ids, cache=cache, **kw)
            finally:
                st.close()
        if dist.get_rank() == 0:
            print(json.dumps({"ids": out[0].tolist()}), flush=True)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()

"""`tierstore bench remote`: resume from the remote tier vs from local LMDB vs re-prefill.

On SmolLM2-135M-Instruct, per context length and dtype, in one run against one Redis (a
loopback ``redis-server`` the bench starts, or ``--remote URL``):

* prefill: DynamicCache prefill of the history + argmax of the last logits (what a host
  without the session pays);
* publish: host A's ``put_session`` on a store with the remote (local commit + upload of every
  block + references + record) against the same ``put_session`` on a local-only store; upload
  MB/s = bytes uploaded / (publish - local);
* resume remote: host B, an empty LMDB: ``TieredCache.resume`` pulls the record and every
  block (a pull this large is readable from memory at once; its checksums are checked as the
  restore reads them and again by the thread that writes it to B's LMDB afterwards) and
  restores them hot, + the first token (best of ``--repeat``, a fresh B each time);
* resume local: the same host B again, now that the session is in its LMDB;
* pull: ``store.session()`` alone on a fresh B: the fetch (the LMDB write lands later);
* fetch floor: the same bytes read back with pipelined ``MGET`` and nothing else (what Redis and
  the client can deliver on this machine).

Targets (issue 15): remote resume >= 50x faster than re-prefill at 8k; within 3x of local.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time

import click
import torch

from tierstore.layout import dtype_from_name


def _start_redis(root: str):
    import subprocess

    server = shutil.which("redis-server")
    if server is None:
        raise click.ClickException("no redis-server on PATH: pass --remote URL or install redis-server")
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    p = subprocess.Popen([server, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no",
                          "--dir", root], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    from tierstore.remote import RemoteTier
    tier = RemoteTier(f"redis://127.0.0.1:{port}/0")
    for _ in range(200):
        if tier.ping():
            break
        time.sleep(0.05)
    tier.close()
    return p, f"redis://127.0.0.1:{port}/0"


def measure(model, tok, tokens: int, dtype: torch.dtype, url: str, repeat: int = 3, hot: str = "2GiB") -> dict:
    import tierstore
    from tierstore.adapters.fingerprint import kv_layout, model_fingerprint
    from tierstore.adapters.hf import TieredCache
    from tierstore.adapters.models import long_text
    from tierstore.remote import RemoteTier

    from .resume import _prefill

    ids = tok(long_text(tokens * 6), return_tensors="pt").input_ids[:, :tokens]
    t_prefill, dyn, logits, first = _prefill(model, ids)
    fp, fields = model_fingerprint(model)
    kv = [(layer.keys[0], layer.values[0]) for layer in dyn.layers]
    name = f"bench-{tokens}-{str(dtype).removeprefix('torch.')}"
    root = tempfile.mkdtemp(prefix="tierstore-bench-remote-")
    tier = RemoteTier(url)
    try:
        with tierstore.open(os.path.join(root, "local"), hot=hot) as st:
            lay = kv_layout(model, st.config.block_tokens)
            t = time.perf_counter()
            st.put_session(name, layout=lay, kv=kv, token_ids=ids[0].tolist(), fingerprint=fp,
                           fingerprint_fields=fields, last_logits=logits)
            t_local_put = time.perf_counter() - t
            stored = st.cold.used_bytes()
        with tierstore.open(os.path.join(root, "A"), hot=hot, remote=url, host="A") as st:
            t = time.perf_counter()
            st.put_session(name, layout=lay, kv=kv, token_ids=ids[0].tolist(), fingerprint=fp,
                           fingerprint_fields=fields, last_logits=logits, overwrite=True)
            t_publish = time.perf_counter() - t
            up = st.sessions.replica.remote.counters["uploaded_bytes"]
            assert not st.sessions.replica.outbox(), "the publish did not complete"
        del dyn, kv
        t_remote = t_pull = t_local = float("inf")
        for i in range(repeat):
            d = os.path.join(root, f"B{i}")
            with tierstore.open(d, hot=hot, remote=url, host="B") as st:
                st.manager.prepare(lay, "cpu")  # pools exist once per process: not part of a resume
                t = time.perf_counter()
                st.session(name)                 # the pull alone
                t_pull = min(t_pull, time.perf_counter() - t)
            shutil.rmtree(d)
            with tierstore.open(d, hot=hot, remote=url, host="B") as st:
                st.manager.prepare(lay, "cpu")
                t = time.perf_counter()
                cache = TieredCache.resume(st, model, name, commit_on_close=False)
                tok0 = int(cache.last_logits[0].argmax())
                t_remote = min(t_remote, time.perf_counter() - t)
                assert tok0 == first, "the remotely resumed first token differs from the prefill's"
                cache.close()
                st.sessions.replica.puller.wait_pulls()  # its LMDB write (in the background) has landed
                t = time.perf_counter()
                cache = TieredCache.resume(st, model, name, commit_on_close=False)
                tok0 = int(cache.last_logits[0].argmax())
                t_local = min(t_local, time.perf_counter() - t)
                assert tok0 == first
                cache.close()
            shutil.rmtree(d, ignore_errors=True)
        from tierstore.records import SessionRecord
        rec = SessionRecord.unseal(name, tier.record(name)[0])
        t_floor = float("inf")
        for _ in range(repeat):
            t = time.perf_counter()
            for i in range(0, rec.num_blocks, 16):
                tier.fetch_positions(rec.chains()[i:i + 16], lay.num_layers)
            t_floor = min(t_floor, time.perf_counter() - t)
    finally:
        try:
            tier._do(lambda c: c.flushdb())
        finally:
            tier.close()
            shutil.rmtree(root, ignore_errors=True)
    upload_s = max(t_publish - t_local_put, 1e-9)
    return {"tokens": tokens, "dtype": str(dtype).removeprefix("torch."), "prefill_s": t_prefill,
            "local_put_s": t_local_put, "publish_s": t_publish, "uploaded_bytes": up,
            "upload_mb_s": up / upload_s / 1e6, "pull_s": t_pull, "resume_remote_s": t_remote,
            "resume_local_s": t_local, "fetch_floor_s": t_floor, "remote_vs_prefill": t_prefill / t_remote,
            "remote_vs_local": t_remote / t_local, "stored_bytes": stored}


@click.command("remote")
@click.option("--tokens", default="8192", show_default=True, help="context lengths")
@click.option("--dtype", "dtypes", default="float32,bfloat16", show_default=True)
@click.option("--remote", "url", default=None, metavar="URL",
              help="a Redis to use (default: a loopback redis-server started for the run)")
@click.option("--repeat", default=3, show_default=True, help="best of N resumes")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
def remote(tokens: str, dtypes: str, url: str | None, repeat: int, as_json: bool) -> None:
    """Resume from the remote tier vs local LMDB vs re-prefill, and upload throughput (SmolLM2-135M)."""
    from tierstore.adapters.models import load_smollm2
    proc, tmp = None, None
    if url is None:
        tmp = tempfile.mkdtemp(prefix="tierstore-bench-redis-")
        proc, url = _start_redis(tmp)
    rows = []
    try:
        for dt in dtypes.split(","):
            model, tok = load_smollm2(dtype_from_name(dt.strip()))
            for n in (int(x) for x in tokens.split(",")):
                rows.append(measure(model, tok, n, dtype_from_name(dt.strip()), url, repeat=repeat))
                click.echo(f"  {n} {dt}: done", err=True)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=10)
            shutil.rmtree(tmp, ignore_errors=True)
    if as_json:
        click.echo(json.dumps({"bench": "remote", "rows": rows}, indent=2))
        return
    from rich.console import Console
    from rich.table import Table
    t = Table(title="resume from the remote tier (loopback Redis) vs local LMDB vs re-prefill (SmolLM2-135M)")
    for c in ("tokens", "dtype", "prefill s", "resume remote s", "x prefill", "resume local s", "remote/local",
              "pull s", "fetch floor s", "publish s", "local put s", "upload MB/s", "stored MiB"):
        t.add_column(c, justify="right")
    for r in rows:
        t.add_row(str(r["tokens"]), r["dtype"], f"{r['prefill_s']:.2f}", f"{r['resume_remote_s']:.3f}",
                  f"{r['remote_vs_prefill']:.0f}x", f"{r['resume_local_s']:.3f}", f"{r['remote_vs_local']:.2f}x",
                  f"{r['pull_s']:.3f}", f"{r['fetch_floor_s']:.3f}", f"{r['publish_s']:.2f}", f"{r['local_put_s']:.2f}", f"{r['upload_mb_s']:.0f}",
                  f"{r['stored_bytes'] / 2**20:.0f}")
    Console().print(t)

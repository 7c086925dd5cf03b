"""``python -m tierstore.tools.gpu_check``: the one-command GPU check of the tiers.

1. runs ``pytest -m cuda tests/`` (the CUDA path: hot pool on the GPU, side copy stream and
   events, pinned warm memory);
2. prints host<->device copy rates, pinned vs pageable, on a 256 MiB buffer;
3. measures the compute/copy overlap the manager's side stream achieves: a loop of big matmuls
   alone, the manager's warm -> hot recall of 256 MiB of SmolLM2-shaped KV alone (prefetch on
   the side stream), and both at once. ``overlap`` is the share of the shorter of the two that
   is hidden: 1.0 means perfect overlap, 0.0 none.

Exits 0 with a message when there is no CUDA device; exits 1 when the CUDA tests fail.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tempfile
import time
from concurrent.futures import wait as wait_futures
from pathlib import Path

import click
import torch

MIB = 1 << 20


def run_cuda_tests() -> int:
    root = Path(__file__).resolve().parents[1]
    tests = root / "tests"
    if not tests.is_dir():
        click.echo(f"no tests/ folder next to {Path(__file__).parent}; skipping the CUDA tests", err=True)
        return 0
    cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider", str(tests)]
    click.echo("$ " + " ".join(cmd))
    rc = subprocess.call(cmd, cwd=root)
    return 0 if rc in (0, 5) else rc          # 5: no tests collected


def _time_cuda(fn, repeat: int = 5) -> float:
    """Best wall time of ``fn`` in seconds, timed with CUDA events on the current stream."""
    best = float("inf")
    for _ in range(repeat):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        s.record()
        fn()
        e.record()
        e.synchronize()
        best = min(best, s.elapsed_time(e) / 1e3)
    return best


def transfer_rates(mib: int = 256) -> dict:
    """H2D and D2H GB/s (10^9 B/s), pinned and pageable host memory."""
    n = mib * MIB
    dev = torch.empty(n, dtype=torch.uint8, device="cuda")
    out = {}
    for kind, pin in (("pinned", True), ("pageable", False)):
        host = torch.empty(n, dtype=torch.uint8, pin_memory=pin)
        host.fill_(1)
        h2d = _time_cuda(lambda: dev.copy_(host, non_blocking=pin))
        d2h = _time_cuda(lambda: host.copy_(dev, non_blocking=pin))
        out[kind] = {"h2d_gb_s": n / h2d / 1e9, "d2h_gb_s": n / d2h / 1e9}
    return out


def manager_overlap(mib: int = 256, block_tokens: int = 64) -> dict:
    """Compute alone, the manager's warm -> hot recall alone, and both together."""
    import tierstore
    from tierstore.layout import KVLayout
    from tierstore.tiers.schema import block_key

    lay = KVLayout(num_layers=30, kv_heads=3, head_dim=64, block_tokens=block_tokens, dtype=torch.float16)
    per_layer = max(1, mib * MIB // lay.block_bytes // lay.num_layers)
    nbytes = per_layer * lay.num_layers * lay.block_bytes
    bt = lay.block_tokens

    def key(layer: int, i: int) -> bytes:
        return block_key(hashlib.blake2b(b"gpu-check/%d" % i, digest_size=16).digest(), layer)

    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        margin = 64 * lay.block_bytes
        store = tierstore.open(tmp, hot=nbytes + margin, warm=nbytes + margin, codec="raw")
        try:
            m = store.manager
            w = m.open_sequence("w", lay, "cuda")
            g = torch.Generator(device="cuda").manual_seed(0)
            for s in range(0, per_layer, 8):
                e = min(s + 8, per_layer)
                for layer in range(lay.num_layers):
                    k = torch.randn(lay.kv_heads, (e - s) * bt, lay.head_dim, device="cuda", generator=g,
                                    dtype=lay.dtype)
                    m.append(w, layer, k, k)
                m.set_keys(w, {i: [key(layer, i) for layer in range(lay.num_layers)] for i in range(s, e)})
            m.flush(w)
            m.close_sequence(w)

            def in_warm():
                """A fresh sequence with every block in warm (pinned) and none hot."""
                seq = m.open_sequence("r", lay, "cuda")
                for layer in range(lay.num_layers):
                    for i in range(per_layer):
                        m.adopt(seq, layer, i, bt, key(layer, i), None)
                for layer in range(lay.num_layers):
                    m.prefetch(seq, layer, range(per_layer), hot=False)
                _wait(m, seq)
                return seq

            def recall(seq):
                for layer in range(lay.num_layers):
                    m.prefetch(seq, layer, range(per_layer), hot=True)    # side stream, loader threads
                _wait(m, seq)

            a = torch.randn(8192, 8192, device="cuda", dtype=torch.float16)
            b = torch.randn(8192, 8192, device="cuda", dtype=torch.float16)

            def matmuls(k: int):
                for _ in range(k):
                    torch.mm(a, b)

            seq = in_warm()
            t0 = time.perf_counter()
            recall(seq)
            torch.cuda.synchronize()
            t_copy = time.perf_counter() - t0
            m.close_sequence(seq, flush=False)

            t1 = _time_cuda(lambda: matmuls(1), repeat=3)
            iters = max(1, round(t_copy / t1))                          # compute about as long as the copies
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            matmuls(iters)
            torch.cuda.synchronize()
            t_compute = time.perf_counter() - t0

            seq = in_warm()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            matmuls(iters)                                               # queued on the compute stream
            recall(seq)                                                  # meanwhile: copies on the side stream
            torch.cuda.synchronize()
            t_both = time.perf_counter() - t0
            m.close_sequence(seq, flush=False)
        finally:
            store.close()
    hidden = (t_compute + t_copy - t_both) / min(t_compute, t_copy)
    return {"kv_mib": nbytes / MIB, "blocks": per_layer * lay.num_layers, "matmuls": iters,
            "compute_s": t_compute, "copies_s": t_copy, "both_s": t_both,
            "copy_gb_s": nbytes / t_copy / 1e9, "overlap": max(0.0, min(1.0, hidden))}


def _wait(m, seq) -> None:
    while True:
        with m.lock:
            futs = [b.loading for layer in seq.layers for b in layer if b.loading is not None]
        if not futs:
            return
        wait_futures(futs)


@click.command("gpu-check")
@click.option("--skip-tests", is_flag=True, help="Only measure; do not run the CUDA tests.")
@click.option("--mib", default=256, show_default=True, type=click.IntRange(1))
@click.option("--json", "as_json", is_flag=True, help="Print the measurements as one JSON object.")
def main(skip_tests: bool, mib: int, as_json: bool) -> None:
    """Run the CUDA tests, then print H2D/D2H GB/s and the manager's compute/copy overlap."""
    if not torch.cuda.is_available():
        click.echo(f"no CUDA device (torch {torch.__version__}, cuda build: {torch.version.cuda}); "
                   "nothing to check here: the CUDA tests are skipped on this machine")
        sys.exit(0)
    rc = 0 if skip_tests else run_cuda_tests()
    name = torch.cuda.get_device_name()
    rates = transfer_rates(mib)
    ov = manager_overlap(mib)
    if as_json:
        click.echo(json.dumps({"device": name, "cuda_tests_rc": rc, "transfer": rates, "overlap": ov}, indent=1))
    else:
        from rich.console import Console
        from rich.table import Table

        console = Console()
        t = Table(title=f"{name}: host <-> device, {mib} MiB, best of 5")
        for col in ("host memory", "H2D GB/s", "D2H GB/s"):
            t.add_column(col, justify="right" if "GB" in col else "left")
        for kind, r in rates.items():
            t.add_row(kind, f"{r['h2d_gb_s']:.1f}", f"{r['d2h_gb_s']:.1f}")
        console.print(t)
        o = Table(title=f"compute/copy overlap of the manager's side stream: {ov['kv_mib']:.0f} MiB warm -> hot "
                        f"({ov['blocks']} blocks) vs {ov['matmuls']} fp16 8192^3 matmuls")
        for col in ("compute alone s", "copies alone s", "both s", "copy GB/s", "overlap"):
            o.add_column(col, justify="right")
        o.add_row(f"{ov['compute_s']:.3f}", f"{ov['copies_s']:.3f}", f"{ov['both_s']:.3f}",
                  f"{ov['copy_gb_s']:.2f}", f"{ov['overlap']:.0%}")
        console.print(o)
        console.print("CUDA tests: " + ("passed" if rc == 0 else f"FAILED (pytest exit {rc})"))
    sys.exit(1 if rc else 0)


if __name__ == "__main__":
    main()

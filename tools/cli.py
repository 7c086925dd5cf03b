"""``tierstore``: list, inspect, verify, export and clean the sessions of a store.

    tierstore [--store DIR] [--format human|json|quiet] [--json] [-q] COMMAND ...

Human tables go to stdout, logs and progress to stderr; ``--json`` prints one JSON document
(sizes in bytes, times in Unix seconds); ``-q`` prints only names (``ls``) or nothing. Exit
codes: 0 ok, 1 a tierstore error or (``verify``) damage, 2 usage errors and paths that are
not a store. No command creates a store, except ``import``, which writes into one. Read-only
commands open the store with ``readonly=True``; every write is one short transaction.

Each command is a small function that asks ``cli_scan`` / ``cli_verify`` / ``cli_maint`` /
``exchange`` for facts and hands them to ``render``. Benchmarks register under the ``bench``
group: ``from tierstore.tools.cli import bench; bench.add_command(cmd)``.
"""

from __future__ import annotations

import fnmatch
import importlib
import json
import logging
import os

import click

from .. import __version__
from ..errors import SessionNotFoundError
from ..layout import check_session_name
from . import cli_chat, cli_commands, render
from .cli_base import Opts, TierstoreGroup, configure_logging, emit_json, fail, fmt, opened, output_options
from .cli_scan import scan_store, session_detail, session_info, snapshot, store_stat

log = logging.getLogger("tierstore.cli")


# -- the group -----------------------------------------------------------------------------


@click.group(cls=TierstoreGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--store", "store", metavar="DIR", help="Store directory (default: $TIERSTORE_HOME, "
              "else the user cache dir).")
@output_options
@click.version_option(__version__, prog_name="tierstore")
@click.pass_context
def cli(ctx: click.Context, store: str | None) -> None:
    """See, verify, export and clean the KV-cache sessions of a tierstore store."""
    configure_logging()
    ctx.ensure_object(Opts).store = store


@cli.command("ls")
@click.option("--sort", type=click.Choice(["name", "tokens", "size", "created", "updated"]), default="name",
              show_default=True, help="Order (tokens, size, times: largest / newest first).")
@click.option("--filter", "pattern", metavar="GLOB", help="Only sessions whose name matches GLOB.")
@click.option("--limit", type=click.IntRange(min=0), help="At most N sessions.")
@output_options
def ls_cmd(sort: str, pattern: str | None, limit: int | None) -> None:
    """One row per session: model, tokens, layers, blocks, stored size (own / shared with
    other sessions), compression ratio, created, last updated."""
    with opened() as store, snapshot(store.cold) as txn:
        snap = scan_store(store.cold, txn)
        infos = [session_info(snap, r) for r in snap.records
                 if pattern is None or fnmatch.fnmatchcase(r.name, pattern)]
    key = {"name": lambda i: i.name, "tokens": lambda i: -i.tokens, "size": lambda i: -i.stored_bytes,
           "created": lambda i: -i.created, "updated": lambda i: -i.updated}[sort]
    infos.sort(key=lambda i: (key(i), i.name))
    infos = infos[:limit] if limit is not None else infos
    damaged = [e for e in snap.damaged if pattern is None or fnmatch.fnmatchcase(getattr(e, "session", "") or "",
                                                                                     pattern)]
    out = fmt()
    if out == "json":
        emit_json({"store": store.path, "sessions": [i.to_json() for i in infos],
                   "damaged": [{"session": getattr(e, "session", None), "error": str(e)} for e in damaged]})
        return
    if out == "quiet":
        for i in infos:
            click.echo(i.name)
        return
    for e in damaged:
        click.echo(f"warning: {e} (not listed; see `tierstore verify`)", err=True)
    if not infos:
        click.echo("no sessions" if not pattern else f"no sessions match {pattern!r}", err=True)
        return
    render.console().print(render.ls_table(infos))


@cli.command("show")
@click.argument("session")
@click.option("--text", is_flag=True, help="Decode the token ids with the session's tokenizer (offline).")
@click.option("--png", type=click.Path(dir_okay=False), metavar="FILE",
              help="Also write the block maps as an image (needs matplotlib).")
@output_options
def show_cmd(session: str, text: bool, png: str | None) -> None:
    """Record, layout, fingerprint, tokens, per-layer sizes, sharing and block maps of SESSION."""
    if png and not render.matplotlib_available():
        fail("--png needs matplotlib, which is not installed (pip install 'tierstore[plot]')", 2)
    check_session_name(session)
    with opened() as store, snapshot(store.cold) as txn:
        snap = scan_store(store.cold, txn)
        rec = snap.record(session)
        if rec is None:
            bad = next((e for e in snap.damaged if getattr(e, "session", None) == session), None)
            if bad is not None:
                raise bad
            raise SessionNotFoundError("no such session", session=session)
        d = session_detail(store.cold, txn, snap, rec)
    decoded, why = _decode_text(rec.tokenizer_name, rec.token_ids) if text else (None, None)
    if why:
        click.echo(f"warning: {why}; showing token ids", err=True)
    if png:
        render.write_png(d, png)
        log.info("wrote %s", png)
    out = fmt()
    if out == "json":
        emit_json(_show_json(d, decoded))
    elif out == "human":
        _show_human(d, decoded)


def _show_json(d, decoded: str | None) -> dict:
    rec = d.record
    return {"session": d.info.to_json(), "layout": rec.layout.to_json(), "fingerprint": rec.fingerprint,
            "fingerprint_fields": rec.fingerprint_fields, "codec": rec.codec.to_json(), "pad": rec.pad,
            "format_version": rec.format_version, "meta": rec.meta,
            "last_logits": None if rec.last_logits is None else len(rec.last_logits),
            "token_ids": [int(t) for t in rec.token_ids], "text": decoded,
            "layers": [{"layer": i, "blocks": sum(s is not None for s in row),
                        "missing": sum(s is None for s in row),
                        "stored_bytes": sum(s for s in row if s is not None), "raw_bytes": sum(raw)}
                       for i, (row, raw) in enumerate(zip(d.stored, d.raw))],
            "shared_with": {k: v for k, v in sorted(d.shared_with.items())},
            "block_map": {"stored_bytes": d.stored, "raw_bytes": d.raw, "attention_mass": d.mass}}


def _show_human(d, decoded: str | None) -> None:
    rec, info = d.record, d.info
    con = render.console()
    lay = rec.layout
    con.print(render.kv_table([
        ("session", rec.name), ("model", rec.model_name), ("tokenizer", rec.tokenizer_name),
        ("tokens", f"{rec.length:,}" + (f" (left pad {rec.pad})" if rec.pad else "")),
        ("layout", f"{lay.num_layers} layers x {lay.kv_heads} kv heads x {lay.head_dim} head_dim, "
                   f"{lay.block_tokens} tokens/block, {info.dtype}"),
        ("blocks", f"{info.blocks:,} per layer, {info.blocks * info.layers:,} in all"
                   + (f", {info.missing_blocks} MISSING" if info.missing_blocks else "")),
        ("stored", f"{render.size(info.stored_bytes)} (own {render.size(info.own_bytes)}, shared "
                   f"{render.size(info.shared_bytes)}), raw {render.size(info.raw_bytes)}, "
                   f"ratio {render.ratio(info.ratio)}"),
        ("codec", json.dumps(rec.codec.to_json())), ("format version", rec.format_version),
        ("created", render.stamp(rec.created)), ("updated", render.stamp(rec.updated)),
        ("last logits", "-" if rec.last_logits is None else f"{len(rec.last_logits)} values"),
        ("fingerprint", rec.fingerprint),
        ("fingerprint fields", json.dumps(rec.fingerprint_fields, sort_keys=True)),
        ("meta", json.dumps(rec.meta, sort_keys=True) if rec.meta else None),
    ]))
    con.print()
    _section(con, "tokens")
    render.print_lines(con, [decoded if decoded is not None else render.tokens_preview(rec.token_ids)])
    con.print()
    _section(con, "per layer")
    con.print(render.layer_table(d))
    con.print()
    _section(con, "shared with other sessions")
    render.print_lines(con, render.shared_lines(d))
    con.print()
    _section(con, "block map: compression")
    render.print_lines(con, render.ratio_map(d))
    con.print()
    _section(con, "block map: attention mass")
    render.print_lines(con, render.mass_map(d) or ["(no attention mass recorded for this session)"])


def _section(con, title: str) -> None:
    con.print(f"[bold]{title}[/bold]")


def _decode_text(tokenizer: str | None, ids) -> tuple[str | None, str | None]:
    """Token text with the recorded tokenizer loaded offline, else (None, why not)."""
    if not tokenizer:
        return None, "the session records no tokenizer"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    kwargs: dict = {"local_files_only": True}
    if os.path.isdir(tokenizer):
        files = os.listdir(tokenizer)
        ggufs = [f for f in files if f.endswith(".gguf")]
        if len(ggufs) == 1 and not any(f.startswith("tokenizer") for f in files):
            kwargs["gguf_file"] = ggufs[0]
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(tokenizer, **kwargs)
        return tok.decode([int(i) for i in ids]), None
    except Exception as e:  # noqa: BLE001 - any failure means "no text", never a crash
        return None, f"cannot load tokenizer {tokenizer!r} offline ({type(e).__name__}: {str(e)[:200]})"


@cli.command("stat")
@output_options
def stat_cmd() -> None:
    """Store-level facts: sessions, cold bytes, LMDB map size, pages, free ratio, format version."""
    with opened() as store:
        live = len(store.sessions.live_leases())
        with snapshot(store.cold) as txn:
            snap = scan_store(store.cold, txn)
        facts = store_stat(store.cold, snap, store.cold.page_stats(), live)
    out = fmt()
    if out == "json":
        emit_json(facts)
    elif out == "human":
        s = render.size
        render.console().print(render.kv_table([
            ("store", facts["path"]), ("format version", facts["format_version"]),
            ("sessions", f"{facts['sessions']}" + (f" ({facts['damaged_sessions']} damaged)"
                                                  if facts["damaged_sessions"] else "")),
            ("blocks", f"{facts['blocks']:,} ({s(facts['block_bytes'])}), {facts['summaries']:,} summaries"),
            ("orphans", f"{facts['orphan_records']:,} records, {s(facts['orphan_bytes'])} (tierstore gc)"),
            ("cold used", s(facts["cold_used_bytes"])), ("file", s(facts["file_bytes"])),
            ("map size", s(facts["map_size"])),
            ("pages", f"{facts['total_pages']:,} x {facts['page_size']} B: {facts['used_pages']:,} used, "
                      f"{facts['free_pages']:,} free, {facts['overflow_pages']:,} overflow"),
            ("lmdb_free_ratio", f"{facts['lmdb_free_ratio']:.3f}"),
            ("readers", f"{facts['readers']} / {facts['max_readers']}"), ("live writers", facts["live_writers"]),
            ("hot / warm", "live inside a running process only (store.stats())"),
        ]))


class BenchGroup(click.Group):
    """Commands added with ``bench.add_command(cmd)``, plus every ``tools/bench_<name>.py`` that
    defines a click command called ``<name>`` (imported only when listed or run)."""

    _folder = os.path.dirname(os.path.abspath(__file__))

    def list_commands(self, ctx: click.Context) -> list[str]:
        found = {f[len("bench_"):-len(".py")] for f in os.listdir(self._folder)
                 if f.startswith("bench_") and f.endswith(".py")}
        return sorted(set(super().list_commands(ctx)) | found)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        cmd = super().get_command(ctx, name)
        if cmd is not None or not name.isidentifier() or \
                not os.path.isfile(os.path.join(self._folder, f"bench_{name}.py")):
            return cmd
        try:
            mod = importlib.import_module(f"{__package__}.bench_{name}")
        except Exception as e:  # noqa: BLE001 - one broken benchmark must not break `bench --help`
            log.warning("benchmark %r cannot be loaded: %s: %s", name, type(e).__name__, e)
            return None
        cmd = next((c for c in vars(mod).values() if isinstance(c, click.Command) and c.name == name), None)
        if cmd is not None:
            self.add_command(cmd)
        return cmd


@cli.group("bench", cls=BenchGroup)
def bench() -> None:
    """Benchmarks (print tables; --json where offered)."""


for _cmd in cli_commands.COMMANDS:
    cli.add_command(_cmd)
cli.add_command(cli_chat.chat_cmd)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point (``tierstore = tierstore.tools.cli:main``)."""
    cli.main(args=argv, prog_name="tierstore")  # click turns EPIPE (`tierstore ls | head`) into exit 1


if __name__ == "__main__":
    # Run the imported module, not this __main__ copy, so commands that other modules add to
    # ``tierstore.tools.cli.bench`` are the ones this run sees.
    from tierstore.tools.cli import main as _main

    _main()

"""The ``tierstore`` commands about sessions: ``ls``, ``show``, ``export``, ``import``.

Each asks ``tierstore.maintenance`` for facts and hands them to ``render``; ``app`` adds them to
the group (``COMMANDS``).
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os

import click

from ...errors import SessionNotFoundError
from ...layout import check_session_name, format_size
from ...maintenance.exchange import export_session, put_export, read_export
from ...maintenance.scan import scan_store, session_detail, session_info, snapshot
from . import render
from .options import emit_json, fail, fmt, opened, output_options
from .remote import ls_remote, remote_option, show_remote

log = logging.getLogger("tierstore.cli")


# -- ls / show -----------------------------------------------------------------------------


@click.command("ls")
@click.option("--sort", type=click.Choice(["name", "tokens", "size", "created", "updated"]), default="name",
              show_default=True, help="Order (tokens, size, times: largest / newest first).")
@click.option("--filter", "pattern", metavar="GLOB", help="Only sessions whose name matches GLOB.")
@click.option("--limit", type=click.IntRange(min=0), help="At most N sessions.")
@remote_option
@output_options
def ls_cmd(sort: str, pattern: str | None, limit: int | None, remote: str | None) -> None:
    """One row per session: model, tokens, layers, blocks, stored size (own / shared with
    other sessions), compression ratio, created, last updated. With --remote: the remote
    tier's sessions, where each lives (local, remote, both), version, host, forks."""
    if remote:
        return ls_remote(remote, pattern, limit)
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


@click.command("show")
@click.argument("session")
@click.option("--text", is_flag=True, help="Decode the token ids with the session's tokenizer (offline).")
@click.option("--png", type=click.Path(dir_okay=False), metavar="FILE",
              help="Also write the block maps as an image (needs matplotlib).")
@remote_option
@output_options
def show_cmd(session: str, text: bool, png: str | None, remote: str | None) -> None:
    """Record, layout, fingerprint, tokens, per-layer sizes, sharing and block maps of SESSION.
    With --remote: its remote record (version, host, lease, fence, referenced positions)."""
    if remote:
        return show_remote(remote, session)
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


# -- export / import -----------------------------------------------------------------------


@click.command("export")
@click.argument("session")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--force", is_flag=True, help="Replace FILE if it exists.")
@output_options
def export_cmd(session: str, file: str, force: bool) -> None:
    """Write SESSION to FILE: safetensors (K/V per layer, token ids, last logits) + JSON metadata."""
    with opened() as store:
        export_session(store, session, file, overwrite=force)
        rec = store.session(session)
    data = {"session": session, "path": os.path.abspath(file), "bytes": os.path.getsize(file),
            "tokens": rec.length, "layers": rec.layout.num_layers}
    out = fmt()
    if out == "json":
        emit_json(data)
    elif out == "human":
        click.echo(f"exported {session} ({rec.length:,} tokens, {rec.layout.num_layers} layers) to {file} "
                   f"({format_size(data['bytes'])})")


@click.command("import")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.option("--as", "as_name", metavar="NAME", help="Store under NAME instead of the exported name.")
@click.option("--overwrite", is_flag=True, help="Replace an existing session of that name.")
@output_options
def import_cmd(file: str, as_name: str | None, overwrite: bool) -> None:
    """Validate an exported FILE and store it as a session (creates the store if needed)."""
    meta, tensors = read_export(file)  # all checks before the store is opened (or created)
    check_session_name(as_name if as_name is not None else meta["name"])
    with opened(write=True, create=True) as store:
        rec = put_export(store, meta, tensors, as_name, overwrite=overwrite)
    out = fmt()
    if out == "json":
        emit_json({"session": rec.name, "tokens": rec.length, "layers": rec.layout.num_layers,
                   "blocks": rec.num_blocks})
    elif out == "human":
        click.echo(f"imported {rec.name} ({rec.length:,} tokens, {rec.layout.num_layers} layers)")


COMMANDS = [ls_cmd, show_cmd, export_cmd, import_cmd]

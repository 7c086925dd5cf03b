"""``--remote URL`` of ``tierstore ls/show/verify/gc``: the same commands against the shared tier.

The facts come from ``tierstore.maintenance.remote``; a local store (``--store``) is read, when
it exists, only to say where each session lives (local, remote, both).
"""

from __future__ import annotations

import fnmatch
import os
import socket

import click

from ...errors import SessionNotFoundError
from ...layout import check_session_name
from ...maintenance.remote import gc_remote, remote_sessions, verify_remote
from . import render
from .options import Opts, emit_json, fmt


def remote_option(f):
    return click.option("--remote", "remote", metavar="URL", envvar="TIERSTORE_REMOTE", default=None,
                        help="A remote tier (redis://host:port/db, rediss://, or cluster nodes joined by commas; "
                             "default TIERSTORE_REMOTE): run the command against it.")(f)


def _tier(url: str):
    from ...remote import RemoteTier
    return RemoteTier(url)


def _local_names() -> list[str]:
    path = click.get_current_context().find_object(Opts).path
    if not os.path.exists(os.path.join(path, "data.mdb")):
        return []
    from ...api import open as open_store
    with open_store(path, readonly=True, remote=False) as st:
        return st.sessions.names()


def ls_remote(url: str, pattern: str | None, limit: int | None) -> None:
    tier = _tier(url)
    try:
        infos = [i for i in remote_sessions(tier, _local_names())
                 if pattern is None or fnmatch.fnmatchcase(i.name, pattern)]
    finally:
        tier.close()
    infos = infos[:limit] if limit is not None else infos
    out = fmt()
    if out == "json":
        emit_json({"remote": tier.url, "sessions": [i.to_json() for i in infos]})
        return
    if out == "quiet":
        for i in infos:
            click.echo(i.name)
        return
    if not infos:
        click.echo("no sessions", err=True)
        return
    from rich.table import Table
    t = Table(box=None, header_style="bold", pad_edge=False)
    for col in ("NAME", "WHERE", "MODEL", "TOKENS", "BLOCKS", "VERSION", "HOST", "UPDATED", "NOTE"):
        t.add_column(col, no_wrap=True, justify="right" if col in ("TOKENS", "BLOCKS", "VERSION") else "left")
    for i in infos:
        note = (f"fork of {i.forked_from} ({i.conflict})" if i.conflict else
                f"fork of {i.forked_from}" if i.forked_from else i.error or "")
        t.add_row(i.name, i.where, render._short_model(i.model), f"{i.tokens:,}", f"{i.blocks:,}",
                  str(i.version or "-"), i.host or "-", render.ago(i.updated) if i.updated else "-", note)
    render.console().print(t)


def show_remote(url: str, session: str) -> None:
    check_session_name(session)
    tier = _tier(url)
    try:
        info = tier.info(session)
        row = next((i for i in remote_sessions(tier, _local_names()) if i.name == session), None)
        if row is None or row.where == "local":
            raise SessionNotFoundError(f"no such session on the remote tier {tier.url}", session=session)
        raw, _ = tier.record(session)
        from ...records import SessionRecord
        rec = SessionRecord.unseal(session, raw)
        refs = tier.referenced(rec.chains())
    finally:
        tier.close()
    data = {**row.to_json(), "fence": info["fence"], "lease": info["lease"], "referenced_positions": sum(refs),
            "layout": rec.layout.to_json(), "codec": rec.codec.name, "fingerprint": rec.fingerprint}
    if fmt() == "json":
        emit_json(data)
    elif fmt() == "human":
        render.console().print(render.kv_table([(k, v) for k, v in data.items() if k != "layout"]))


def verify_remote_cmd(url: str, sessions) -> None:
    tier = _tier(url)
    try:
        rep = verify_remote(tier, sessions)
    finally:
        tier.close()
    if fmt() == "json":
        emit_json(rep.to_json())
    elif fmt() == "human":
        con = render.console()
        for p in rep.problems:
            render.print_lines(con, [f"DAMAGED  {p.where()}: {p.reason} [{p.kind}]"])
        state = "OK" if rep.ok else f"{len(rep.problems)} problem(s) found"
        render.print_lines(con, [f"verified {rep.sessions} remote session(s), {rep.blocks} block(s) on "
                                 f"{rep.url}: {state}"])
    if not rep.ok:
        raise click.exceptions.Exit(1)


def gc_remote_cmd(url: str, dry_run: bool, force: bool) -> None:
    from ...remote import Replica
    tier = _tier(url)
    replica = Replica(None, tier, os.environ.get("TIERSTORE_HOST_ID") or socket.gethostname(), background=False)
    try:
        rep = gc_remote(replica, dry_run=dry_run, force=force)
    finally:
        replica.close()
    if fmt() == "json":
        emit_json({**rep.to_json(), "dry_run": dry_run})
        return
    if fmt() == "quiet":
        return
    from ...layout import format_size
    lines = [f"checked {rep.sessions_checked} session(s) on {rep.url}: {rep.stale_references} stale reference(s), "
             f"{rep.intents_resolved} unfinished publish(es), {rep.index_fixed} index entr(ies) "
             + ("found (dry run)" if dry_run else "repaired")]
    what = f"{rep.orphan_keys} unreferenced key(s), {format_size(rep.orphan_bytes)}"
    if rep.deleted:
        lines.append(f"reclaimed {what}")
    elif rep.orphan_keys and dry_run:
        lines.append(f"would reclaim {what} (dry run)")
    elif rep.orphan_keys:
        lines.append(f"skipped: {rep.live_leases} live lease(s) or publish(es); {what} left (they expire by "
                     "their TTL; --force reclaims now)")
    if rep.skipped_busy:
        lines.append(f"busy (publishing now, skipped): {', '.join(rep.skipped_busy)}")
    for line in lines:
        click.echo(line)

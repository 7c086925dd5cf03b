"""The ``tierstore`` commands that check or clean a store: ``verify``, ``gc``, ``rm``, ``prune``,
``compact``, ``stat``. The plans and checks are ``tierstore.maintenance``'s; ``app`` adds these
to the group (``COMMANDS``)."""

from __future__ import annotations

import sys

import click

from ...layout import format_size
from ...maintenance.compact import compact_store
from ...maintenance.plan import parse_duration, plan_prune, plan_rm
from ...maintenance.scan import scan_store, snapshot, store_stat
from ...maintenance.verify import verify_store
from . import render
from .options import emit_json, fmt, opened, output_options
from .remote import gc_remote_cmd, remote_option, verify_remote_cmd


# -- verify --------------------------------------------------------------------------------


@click.command("verify")
@click.argument("sessions", nargs=-1, metavar="[SESSION]...")
@remote_option
@output_options
def verify_cmd(sessions: tuple[str, ...], remote: str | None) -> None:
    """Decode every block of SESSIONs (default: all) and check checksums, summaries,
    record/block consistency, reference counts and format versions.

    Exit 0 when clean, 1 when damage is found, 2 when the path is not a store. Orphans are
    reported as reclaimable (``tierstore gc``), not as damage. With --remote: fetch and check
    every block the remote records name.
    """
    if remote:
        return verify_remote_cmd(remote, sessions)
    out = fmt()
    with opened() as store:
        report = verify_store(store, sessions, progress=_progress() if out == "human" else None)
    if out == "json":
        emit_json(report.to_json())
    elif out == "human":
        con = render.console()
        for p in report.damage:
            render.print_lines(con, [f"DAMAGED  {p.where()}: {p.reason} [{p.kind}]"])
        groups: dict[tuple, list] = {}
        for p in report.warnings:  # one line per (session, kind): a store can miss thousands of summaries
            groups.setdefault((p.session, p.kind, p.reason), []).append(p)
        for (session, _, reason), ps in groups.items():
            where = ps[0].where() if len(ps) == 1 else f"session {session!r}" if session is not None else "store"
            render.print_lines(con, [f"warning  {where}: {reason}" + (f" ({len(ps)} blocks)" if len(ps) > 1 else "")])
        state = "OK" if report.ok else f"{len(report.damage)} problem(s) found"
        render.print_lines(con, [f"verified {report.sessions} session(s), {report.blocks} block record(s): {state}"])
        if report.orphan_records:
            render.print_lines(con, [f"reclaimable: {report.orphan_records} orphan record(s), "
                                     f"{format_size(report.orphan_bytes)} (tierstore gc)"])
    if not report.ok:
        raise click.exceptions.Exit(1)


def _progress():
    """Per-session progress on stderr when it is a terminal; None otherwise."""
    if not sys.stderr.isatty():
        return None
    state: dict = {}

    def cb(done: int, total: int) -> None:
        from rich.progress import Progress

        if "p" not in state:
            state["p"] = Progress(console=render.console(stderr=True), transient=True)
            state["p"].start()
            state["t"] = state["p"].add_task("verifying", total=total)
        state["p"].update(state["t"], completed=done + 1)
        if done + 1 >= total:
            state["p"].stop()

    return cb


# -- gc ------------------------------------------------------------------------------------


@click.command("gc")
@click.option("--dry-run", is_flag=True, help="Only report what would be reclaimed.")
@click.option("--force", is_flag=True, help="Reclaim even while live writers hold leases (their "
              "uncommitted blocks are orphans too).")
@remote_option
@output_options
def gc_cmd(dry_run: bool, force: bool, remote: str | None) -> None:
    """Reclaim orphan blocks and summaries (written but never committed, or left behind).
    With --remote: the remote tier's janitor (unfinished publishes, stale references, the
    index, unreferenced blocks)."""
    if remote:
        return gc_remote_cmd(remote, dry_run, force)
    with (opened() if dry_run else opened(write=True)) as store:
        report = store.gc(dry_run=dry_run, force=force)
    out = fmt()
    data = {"orphan_records": report.orphan_blocks, "orphan_bytes": report.orphan_bytes,
            "deleted": report.deleted, "dry_run": dry_run,
            "skipped_live_writers": report.skipped_live_writers}
    if out == "json":
        emit_json(data)
    elif out == "human":
        what = f"{report.orphan_blocks} orphan record(s), {format_size(report.orphan_bytes)}"
        if report.deleted:
            click.echo(f"reclaimed {what}")
        elif dry_run:
            click.echo(f"would reclaim {what} (dry run)")
        elif report.skipped_live_writers:
            click.echo(f"skipped: {report.skipped_live_writers} live writer(s) hold leases; {what} left "
                       "(--force reclaims anyway)")
        else:
            click.echo("nothing to reclaim")


# -- rm / prune ----------------------------------------------------------------------------


def _apply(store_plan, yes: bool, dry_run: bool) -> None:
    """Print a removal plan and delete it when ``-y`` (and not ``--dry-run``)."""
    plan = store_plan
    out = fmt()
    deleting = yes and not dry_run and bool(plan.sessions)
    freed = None
    if deleting:
        with opened(write=True) as store:
            freed = store.delete(*plan.names)
    data = {"sessions": plan.names, "deleted": deleting, "freed_bytes": freed if deleting else plan.freed_bytes,
            "freed_blocks": plan.freed_blocks, "skipped": [{"session": n, "reason": r} for n, r in plan.skipped]}
    if out == "json":
        emit_json(data)
        return
    for n, why in plan.skipped:
        click.echo(f"skipped {n}: {why}", err=True)
    if out == "quiet":
        return
    if not plan.sessions:
        click.echo("nothing to delete")
        return
    for r in plan.sessions:
        click.echo(f"{'deleted' if deleting else 'would delete'}  {r.name}  ({r.length:,} tokens, "
                   f"updated {render.ago(r.updated)})")
    if deleting:
        click.echo(f"deleted {len(plan.sessions)} session(s), freed {format_size(freed)}")
    else:
        click.echo(f"would free {format_size(plan.freed_bytes)} ({plan.freed_blocks} block record(s))")
        click.echo("nothing deleted: pass -y to delete" if not dry_run else "dry run: nothing deleted",
                   err=True)


@click.command("rm")
@click.argument("sessions", nargs=-1, required=True, metavar="SESSION...")
@click.option("--dry-run", is_flag=True, help="Print what would be deleted; delete nothing.")
@click.option("-y", "--yes", is_flag=True, help="Delete (without it, only print what would go).")
@output_options
def rm_cmd(sessions: tuple[str, ...], dry_run: bool, yes: bool) -> None:
    """Delete SESSIONs and every block only they reference. Needs -y."""
    with opened() as store:
        plan = plan_rm(store, sessions)
    _apply(plan, yes, dry_run)


def _duration(_ctx, _param, value: str) -> float:
    try:
        return parse_duration(value)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


@click.command("prune")
@click.option("--older-than", "older_than", required=True, callback=_duration, metavar="AGE",
              help="Delete sessions last updated more than AGE ago (e.g. 30d, 12h, 2w).")
@click.option("--dry-run", is_flag=True, help="Print what would be deleted; delete nothing.")
@click.option("-y", "--yes", is_flag=True, help="Delete (without it, only print what would go).")
@output_options
def prune_cmd(older_than: float, dry_run: bool, yes: bool) -> None:
    """Delete sessions not updated for a while. Needs -y."""
    with opened() as store:
        plan = plan_prune(store, older_than)
    _apply(plan, yes, dry_run)


# -- compact -------------------------------------------------------------------------------


@click.command("compact")
@output_options
def compact_cmd() -> None:
    """Rewrite the LMDB file compacted (atomic swap). Refused while writers are live."""
    store = opened(write=True)
    try:
        report = compact_store(store)
    finally:
        store.close()
    out = fmt()
    if out == "json":
        emit_json({"before_bytes": report.before_bytes, "after_bytes": report.after_bytes,
                   "saved_bytes": report.saved_bytes})
    elif out == "human":
        click.echo(f"compacted: {format_size(report.before_bytes)} -> {format_size(report.after_bytes)} "
                   f"(saved {format_size(report.saved_bytes)})")


# -- stat ----------------------------------------------------------------------------------


@click.command("stat")
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


COMMANDS = [stat_cmd, verify_cmd, gc_cmd, rm_cmd, prune_cmd, compact_cmd]

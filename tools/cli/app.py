"""``tierstore``: list, inspect, verify, export and clean the sessions of a store.

    tierstore [--store DIR] [--format human|json|quiet] [--json] [-q] COMMAND ...

Human tables go to stdout, logs and progress to stderr; ``--json`` prints one JSON document
(sizes in bytes, times in Unix seconds); ``-q`` prints only names (``ls``) or nothing. Exit
codes: 0 ok, 1 a tierstore error or (``verify``) damage, 2 usage errors and paths that are
not a store. No command creates a store, except ``import``, ``chat`` and ``serve``, which write
into one. Read-only commands open the store with ``readonly=True``; every write is one short
transaction.

The group and its entry point are here; the commands live by kind in ``sessions`` (ls, show,
export, import), ``maintenance`` (stat, verify, gc, rm, prune, compact), ``chat`` and ``serve``
(the server itself is ``tierstore.tools.serve``). Each is a small function that asks
``tierstore.maintenance`` for facts and hands them to ``render``.
Benchmarks register under the ``bench`` group: every module (or package) ``tools/bench/<name>``
that defines a click command called ``<name>``, plus ``bench.add_command(cmd)``.
"""

from __future__ import annotations

import importlib
import logging
import os

import click

from ... import __version__
from .. import bench as bench_pkg
from . import chat, maintenance, serve, sessions
from .options import Opts, TierstoreGroup, configure_logging, output_options

log = logging.getLogger("tierstore.cli")


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


class BenchGroup(click.Group):
    """Commands added with ``bench.add_command(cmd)``, plus every ``tools/bench/<name>.py`` (or
    ``tools/bench/<name>/`` package) that defines a click command called ``<name>`` (imported
    only when listed or run)."""

    _folder = os.path.dirname(os.path.abspath(bench_pkg.__file__))

    def _found(self) -> set[str]:
        out = set()
        for f in os.listdir(self._folder):
            path = os.path.join(self._folder, f)
            if f.endswith(".py") and not f.startswith("_"):
                out.add(f[:-len(".py")])
            elif os.path.isfile(os.path.join(path, "__init__.py")) and not f.startswith("_"):
                out.add(f)
        return {n for n in out if n.isidentifier()}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | self._found())

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        cmd = super().get_command(ctx, name)
        if cmd is not None or name not in self._found():
            return cmd
        try:
            mod = importlib.import_module(f"{bench_pkg.__name__}.{name}")
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


for _cmd in (*sessions.COMMANDS, *maintenance.COMMANDS, chat.chat_cmd, serve.serve_cmd):
    cli.add_command(_cmd)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point (``tierstore = tierstore.tools.cli:main``)."""
    cli.main(args=argv, prog_name="tierstore")  # click turns EPIPE (`tierstore ls | head`) into exit 1

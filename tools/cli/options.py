"""Plumbing shared by the ``tierstore`` commands: options, output format, errors, logging.

The rules every command follows live here: ``--json``/``-q``/``--format`` before or after the
command; typed errors become one ``error: ...`` line on stderr (exit 2 for a path that is not
a store or a bad name/size on the command line, 1 otherwise); the store is opened read-only
unless the command writes, and never created unless it imports.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass

import click

from ...api import open as open_store
from ...config import default_store_path, log_level
from ...errors import InvalidSessionNameError, InvalidSizeError, NotAStoreError, TierstoreError

log = logging.getLogger("tierstore.cli")
FORMATS = ("human", "json", "quiet")


# -- plumbing ------------------------------------------------------------------------------


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time (test runners swap it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def configure_logging() -> None:
    """The CLI, never the library, configures logging: stderr, level ``TIERSTORE_LOG_LEVEL``."""
    logger = logging.getLogger("tierstore")
    level = logging.getLevelName(log_level())
    logger.setLevel(level if isinstance(level, int) else logging.WARNING)
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        h = _StderrHandler()
        h.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        logger.addHandler(h)


@dataclass
class Opts:
    store: str | None = None
    fmt: str = "human"
    json: bool = False
    quiet: bool = False

    @property
    def path(self) -> str:
        return self.store or default_store_path()


def fail(message: str, code: int) -> None:
    click.echo(f"error: {message}", err=True)
    raise click.exceptions.Exit(code)


class TierstoreGroup(click.Group):
    """Turns typed errors into one ``error: ...`` line: exit 2 for a path that is not a store
    or an invalid name/size given on the command line, 1 for everything else."""

    def invoke(self, ctx: click.Context):
        import lmdb

        try:
            return super().invoke(ctx)
        except (NotAStoreError, InvalidSessionNameError, InvalidSizeError) as e:
            fail(str(e), 2)
        except TierstoreError as e:
            fail(str(e), 1)
        except lmdb.Error as e:
            fail(f"LMDB: {type(e).__name__}: {e}", 1)
        except BrokenPipeError:
            raise  # click's own EPIPE handling
        except OSError as e:  # the export file, a temp dir, a full disk
            fail(f"{e.filename + ': ' if e.filename else ''}{e.strerror or e}", 1)


def _set_flag(attr: str):
    def cb(ctx: click.Context, _param, value):
        if value is not None and value is not False:
            o = ctx.ensure_object(Opts)
            setattr(o, attr, value)
            if o.json and o.quiet:  # refused while parsing, before the command does anything
                raise click.UsageError("--json and -q/--quiet exclude each other", ctx=ctx)
        return value
    return cb


def output_options(f):
    """``--format``/``--json``/``-q`` accepted after the command as well as before it."""
    f = click.option("-q", "--quiet", is_flag=True, expose_value=False, callback=_set_flag("quiet"),
                     help="Print only names (ls) or nothing.")(f)
    f = click.option("--json", "as_json", is_flag=True, expose_value=False, callback=_set_flag("json"),
                     help="Machine-readable JSON (sizes in bytes).")(f)
    f = click.option("--format", "fmt", type=click.Choice(FORMATS), default=None, expose_value=False,
                     callback=_set_flag("fmt"), help="Output format.")(f)
    return f


def fmt() -> str:
    o = click.get_current_context().find_object(Opts)
    return "json" if o.json else "quiet" if o.quiet else o.fmt


def emit_json(obj) -> None:
    click.echo(json.dumps(obj, indent=2, default=_json_default))


def _json_default(o):
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, (set, tuple)):
        return list(o)
    return str(o)


def opened(*, write: bool = False, create: bool = False):
    """The store of ``--store``: read-only unless ``write``; never created unless ``create``."""
    path = click.get_current_context().find_object(Opts).path
    log.debug("opening %s (%s)", path, "write" if write else "read-only")
    return open_store(path, readonly=not write, create=create)

"""Typed errors. Each names the thing that is wrong: store path, session, layer, block."""

from __future__ import annotations


class TierstoreError(Exception):
    """Base class of every error tierstore raises on purpose."""


def _where(session: str | None, layer: int | None, block: int | None, key: bytes | None) -> str:
    parts = []
    if session is not None:
        parts.append(f"session {session!r}")
    if layer is not None:
        parts.append(f"layer {layer}")
    if block is not None:
        parts.append(f"block {block}")
    if key is not None and not parts:
        parts.append(f"key {key.hex()}")
    return ", ".join(parts)


class LocatedError(TierstoreError):
    """An error about one stored thing; ``session``/``layer``/``block``/``key`` say which."""

    def __init__(self, reason: str, *, session: str | None = None, layer: int | None = None,
                 block: int | None = None, key: bytes | None = None) -> None:
        self.reason = reason
        self.session, self.layer, self.block, self.key = session, layer, block, key
        where = _where(session, layer, block, key)
        super().__init__(f"{where}: {reason}" if where else reason)


class CorruptBlockError(LocatedError):
    """A stored block or summary failed its checksum or could not be decoded."""


class CorruptRecordError(LocatedError):
    """A session record (or other store metadata) failed its checksum or is malformed."""


class MissingBlockError(LocatedError):
    """A committed session names a block that is not in the store."""


class FormatVersionError(LocatedError):
    """A record was written by a format version this code does not read."""


class SessionNotFoundError(LocatedError):
    """No committed session of that name."""


class SessionExistsError(LocatedError):
    """A session of that name exists; resume it or pass ``overwrite=True``."""


class SessionBusyError(LocatedError):
    """Another live writer holds the session's lease."""


class InvalidSessionNameError(TierstoreError, ValueError):
    """Session names are 1-128 characters of ``[A-Za-z0-9._-]``, starting with a letter or digit."""


class InvalidSizeError(TierstoreError, ValueError):
    """A byte size such as ``"8GiB"`` could not be parsed or is out of range."""


class ModelMismatchError(TierstoreError):
    """The model (fingerprint, layout or dtype) differs from the one a session was stored with."""


class TokenMismatchError(TierstoreError):
    """Token ids given for a session do not extend the ids it holds."""


class NotAStoreError(TierstoreError):
    """The path is not a tierstore directory (or cannot become one)."""


class StoreReadOnlyError(TierstoreError):
    """A write was attempted on a store opened read-only (or whose files are not writable)."""


class ReadOnlyCacheError(TierstoreError):
    """A read-only cache (``TieredCache.resume(..., readonly=True)``) holds no writer lease and
    never commits; ``store.fork()`` the session and resume the copy to write."""


class StoreClosedError(TierstoreError):
    """The store was closed, or is used in a process forked after it was opened."""


class StoreBusyError(TierstoreError):
    """Another process writes to (or reads from) the store at ``path``; the operation
    (``tierstore compact``) needs it idle. ``reason`` says who holds it."""

    def __init__(self, reason: str, *, path: str) -> None:
        self.reason, self.path = reason, path
        super().__init__(f"{path}: {reason}")


class QuotaExceededError(TierstoreError):
    """A commit would exceed the cold tier's quota; the previous state is intact."""


class BudgetError(TierstoreError, ValueError):
    """A tier budget is too small for what was asked (e.g. smaller than one block)."""


class ImportFormatError(TierstoreError, ValueError):
    """An export file is malformed, truncated, or does not match its own metadata."""


class RemoteUnavailableError(TierstoreError):
    """The remote (shared) tier could not be reached or refused writes (down, paused, failing
    over, out of memory). Local LMDB keeps working; what was not published waits in the outbox.
    ``url`` names the remote."""

    def __init__(self, reason: str, *, url: str) -> None:
        self.reason, self.url = reason, url
        super().__init__(f"remote {url}: {reason}")


class LeaseLostError(LocatedError):
    """This writer's lease on the session was taken over by another host (it expired while this
    writer was paused, or the remote was partitioned away): the commit was not made the session's
    state. ``fork`` names the session under which this writer's state was kept instead."""

    def __init__(self, reason: str, *, session: str, fork: str | None = None) -> None:
        self.fork = fork
        super().__init__(reason, session=session)

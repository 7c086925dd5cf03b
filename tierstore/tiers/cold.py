"""Cold tier: a thin raw-bytes store on one LMDB environment. No policy, no decoding.

The sub-databases, their keys and values are ``schema``'s (the one owner of the on-disk
layout). Code outside the storage layer names a sub-database and never holds an LMDB handle:
``get``/``get_many``/``scan``/``entries`` take an open transaction (``txn=``) or open their own;
``cursor(txn, name)`` and ``db(name)`` are for storage code (sessions, seqops) and for tests that
write hostile bytes.

Contracts:

* ``put_many`` writes all items in one write transaction or none (all-or-nothing).
* ``get_many`` reads in one read transaction (a consistent snapshot: its own, or the caller's
  ``txn=``) and returns copies (views in a ``buffers=True`` transaction).
* ``lookup(chains)`` returns how many leading chain positions are stored for *every* layer:
  the longest stored prefix.
* Map full grows the map (x2) and retries; a map grown by another process is adopted.
* The environment is never used across ``fork()``: a child gets ``StoreClosedError``.

LMDB rules that bite (py-lmdb docs): write transactions are bound to their thread; a
``buffers=True`` view dies at the next write in the same transaction; ``set_mapsize`` needs
no active transaction in this process, hence the read/write gate below.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import threading
import weakref
from collections.abc import Iterable, Iterator
from typing import Callable

import lmdb

from ..errors import (CorruptRecordError, NotAStoreError, QuotaExceededError, StoreClosedError,
                      StoreReadOnlyError, TierstoreError)
from .schema import DB_NAMES, block_key  # block_key: manager and adapters import it from here still

log = logging.getLogger(__name__)

DEFAULT_MAP_SIZE = 1 << 30
MAX_READERS = 512

_LIVE_ENVS: "weakref.WeakSet[ColdStore]" = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for cs in list(_LIVE_ENVS):
        cs._forked = True


os.register_at_fork(after_in_child=_after_fork_in_child)


class _Gate:
    """Many transactions at once, or one map resize alone."""

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._active = 0
        self._resizing = False

    @contextlib.contextmanager
    def txn(self) -> Iterator[None]:
        with self._cv:
            while self._resizing:
                self._cv.wait()
            self._active += 1
        try:
            yield
        finally:
            with self._cv:
                self._active -= 1
                self._cv.notify_all()

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cv:
            while self._resizing:
                self._cv.wait()
            self._resizing = True
            while self._active:
                self._cv.wait()
        try:
            yield
        finally:
            with self._cv:
                self._resizing = False
                self._cv.notify_all()


class ColdStore:
    """One LMDB environment under ``path`` (a directory)."""

    def __init__(self, path: str | os.PathLike, *, readonly: bool = False, create: bool = True,
                 quota: int | None = None, map_size: int = DEFAULT_MAP_SIZE) -> None:
        self.path = os.fspath(path)
        self.readonly = readonly
        self.quota = quota
        self._forked = False
        self._pid = os.getpid()
        self._gate = _Gate()
        self._wlock = threading.Lock()
        # blocks and summaries pulled from the remote tier, readable before their LMDB write lands
        # (``stage``): consulted only for keys LMDB lacks; dropped a while after they land
        self._staged: dict[tuple[str, bytes], bytes] = {}
        data = os.path.join(self.path, "data.mdb")
        if os.path.exists(self.path) and not os.path.isdir(self.path):
            raise NotAStoreError(f"{self.path}: is a file, not a store directory")
        if not os.path.exists(data):
            if readonly or not create:
                raise NotAStoreError(f"{self.path}: not a tierstore store (no data.mdb)")
            try:
                os.makedirs(self.path, exist_ok=True)
            except OSError as e:
                raise NotAStoreError(f"{self.path}: cannot create store directory: {e.strerror}") from e
        if not readonly and not os.access(self.path, os.W_OK):
            raise StoreReadOnlyError(f"{self.path}: store directory is not writable; open it with readonly=True")
        lock = True
        if readonly and not os.access(self.path, os.W_OK) and not os.access(
                os.path.join(self.path, "lock.mdb"), os.W_OK):
            lock = False  # read-only media: no lock file can be written; readers only
        try:
            self.env = lmdb.open(self.path, subdir=True, readonly=readonly, lock=lock,
                                 max_dbs=len(DB_NAMES) + 2, map_size=max(map_size, 1 << 20),
                                 max_readers=MAX_READERS, readahead=False, metasync=True,
                                 sync=True, create=not readonly)
        except lmdb.InvalidError as e:
            raise NotAStoreError(f"{self.path}: not an LMDB environment ({e})") from e
        except lmdb.Error as e:
            if "already open in this process" in str(e):  # a store, but LMDB allows one env per process
                raise TierstoreError(f"{self.path}: this store is already open in this process; use that "
                                     "Store (LMDB opens a file once per process)") from e
            raise NotAStoreError(f"{self.path}: cannot open LMDB environment: {e}") from e
        try:
            self._check_file()
            if lock:  # reader slots of processes killed mid-read (SIGKILL) pin old pages and slots
                self.env.reader_check()
            if not readonly:
                self._refuse_foreign()
            self._dbs: dict[str, object] = {}
            for name in DB_NAMES:
                if readonly:
                    with self.env.begin() as t:
                        if t.get(name.encode()) is None:
                            raise NotAStoreError(f"{self.path}: not a tierstore store (no {name!r} database)")
                self._dbs[name] = self.env.open_db(name.encode(), create=not readonly)
        except lmdb.Error as e:
            self.env.close()
            raise NotAStoreError(f"{self.path}: not a tierstore store ({e})") from e
        except BaseException:
            self.env.close()
            raise
        _LIVE_ENVS.add(self)

    def _check_file(self) -> None:
        """A data.mdb shorter than its own pages (a partial copy) would fault (SIGBUS) on read."""
        need = (self.env.info()["last_pgno"] + 1) * self.env.stat()["psize"]
        have = _file_size(os.path.join(self.path, "data.mdb"))
        if have < need:
            raise CorruptRecordError(f"{self.path}: data.mdb is truncated ({have} bytes; its pages need {need}); "
                                     "restore the store from a copy")

    def _refuse_foreign(self) -> None:
        """Opening for write creates our sub-databases: never inside another application's LMDB file."""
        with self.env.begin() as t:
            names = [bytes(k) for k in t.cursor().iternext(values=False)]
        foreign = [k for k in names if k.decode(errors="replace") not in DB_NAMES]
        if foreign:
            raise NotAStoreError(f"{self.path}: an LMDB environment of another application (main database "
                                 f"holds {foreign[:3]!r}), not a tierstore store")

    # -- lifecycle -------------------------------------------------------------------------

    def _check(self) -> None:
        if self._forked or os.getpid() != self._pid:
            raise StoreClosedError(f"{self.path}: LMDB environment used after fork(); open the store again in the child")
        if self.env is None:
            raise StoreClosedError(f"{self.path}: store is closed")

    def close(self) -> None:
        if getattr(self, "env", None) is not None:
            if not self._forked:
                self.env.close()
            self.env = None
            _LIVE_ENVS.discard(self)

    @property
    def closed(self) -> bool:
        return self.env is None

    # -- transactions ----------------------------------------------------------------------

    @contextlib.contextmanager
    def read(self, *, buffers: bool = False) -> Iterator[lmdb.Transaction]:
        """A read transaction: a consistent snapshot of the store. ``buffers=True``: values are
        memoryviews into the map, valid only inside the transaction (zero-copy reads)."""
        self._check()
        cleared = False
        while True:
            resized = False
            with self._gate.txn():
                try:
                    txn = self.env.begin(buffers=buffers)
                except lmdb.MapResizedError:
                    txn, resized = None, True
                except lmdb.ReadersFullError:
                    # slots of killed processes are freed by reader_check; else really too many readers
                    if cleared or self.env.flags().get("lock") is False or not self.env.reader_check():
                        raise TierstoreError(f"{self.path}: all {self.env.max_readers()} LMDB reader slots are "
                                             "in use (too many concurrent read transactions)") from None
                    txn, cleared = None, True
                if txn is not None:
                    with txn:
                        yield txn
                    return
            if resized:
                self._adopt()

    def write(self, fn: Callable[[lmdb.Transaction], object]) -> object:
        """Run ``fn(txn)`` in one write transaction; commit, or abort on any exception.

        Map full: the transaction is aborted, the map doubled and ``fn`` run again.
        """
        self._check()
        if self.readonly:
            raise StoreReadOnlyError(f"{self.path}: store is open read-only")
        with self._wlock:
            while True:
                try:
                    with self._gate.txn():
                        txn = self.env.begin(write=True)
                        try:
                            out = fn(txn)
                            txn.commit()
                            return out
                        except BaseException:
                            txn.abort()
                            raise
                except lmdb.MapResizedError:
                    self._adopt()
                except lmdb.MapFullError:
                    self._grow()
                except lmdb.DiskError as e:
                    raise TierstoreError(f"{self.path}: disk error while writing: {e}") from e
                except lmdb.Error as e:
                    if _is_enospc(e):
                        raise QuotaExceededError(f"{self.path}: disk full while writing: {e}") from e
                    if "Input/output error" in str(e):  # a short write: disk full, RLIMIT_FSIZE, failing device
                        raise TierstoreError(f"{self.path}: write failed with an I/O error (disk full, file size "
                                             f"limit or failing device); the commit failed: {e}") from e
                    raise

    def _adopt(self) -> None:
        """Adopt a map grown by another process. ``set_mapsize`` remaps: no transaction of this
        process may be open (another thread's read would be left on an unmapped region)."""
        with self._gate.exclusive():
            self.env.set_mapsize(0)

    def _grow(self) -> None:
        with self._gate.exclusive():
            new = self.env.info()["map_size"] * 2
            log.info("%s: LMDB map full, growing map to %d bytes", self.path, new)
            self.env.set_mapsize(new)

    # -- sub-databases ---------------------------------------------------------------------

    def db(self, name: str):
        """LMDB handle of sub-database ``name`` (``schema.DB_NAMES``): for storage code that
        reads and writes inside its own transaction, and for tests that plant hostile bytes.
        Everything else names the sub-database in the methods below."""
        try:
            return self._dbs[name]
        except KeyError:
            raise KeyError(f"{name!r} is not a sub-database of a tierstore store "
                           f"({', '.join(DB_NAMES)})") from None

    def cursor(self, txn: lmdb.Transaction, name: str) -> lmdb.Cursor:
        """A cursor over sub-database ``name`` inside ``txn``."""
        return txn.cursor(db=self.db(name))

    def entries(self, name: str, txn: lmdb.Transaction | None = None) -> int:
        """Number of records in sub-database ``name``."""
        with self._in(txn) as t:
            return t.stat(self.db(name))["entries"]

    def _in(self, txn: lmdb.Transaction | None):
        """``txn`` when given, else a new read transaction."""
        return contextlib.nullcontext(txn) if txn is not None else self.read()

    # -- raw-bytes API (DESIGN §7) ---------------------------------------------------------

    def get_many(self, db: str, keys: Iterable[bytes], *,
                 txn: lmdb.Transaction | None = None) -> list[bytes | None]:
        """Values of ``keys`` (None: absent), read in ``txn`` or one new read transaction.
        Copies, except in a ``buffers=True`` transaction (views valid inside it only)."""
        with self._in(txn) as t:
            d = self.db(db)
            out = [t.get(k, db=d) for k in keys]
        if self._staged:
            out = [self._staged.get((db, bytes(k))) if v is None else v for k, v in zip(keys, out)]
        return out

    def get(self, db: str, key: bytes, *, txn: lmdb.Transaction | None = None) -> bytes | None:
        return self.get_many(db, [key], txn=txn)[0]

    def put_many(self, db: str, items: Iterable[tuple[bytes, bytes]], *, overwrite: bool = True) -> int:
        """All items in one transaction; returns bytes written. Quota is checked first."""
        items = list(items)

        def fn(txn: lmdb.Transaction) -> int:
            d = self.db(db)
            n = 0
            for k, v in items:
                if overwrite or txn.get(k, db=d) is None:
                    txn.put(k, v, db=d)
                    n += len(k) + len(v)
            self.check_quota(txn)
            return n

        return self.write(fn)  # type: ignore[return-value]

    def delete_many(self, db: str, keys: Iterable[bytes]) -> int:
        keys = list(keys)

        def fn(txn: lmdb.Transaction) -> int:
            d = self.db(db)
            return sum(1 for k in keys if txn.delete(k, db=d))

        return self.write(fn)  # type: ignore[return-value]

    def scan(self, db: str, prefix: bytes = b"", *, keys_only: bool = False,
             txn: lmdb.Transaction | None = None) -> Iterator[tuple[bytes, bytes | None]]:
        """Items of ``db`` whose key starts with ``prefix``, in key order (one snapshot). In a
        ``buffers=True`` transaction keys and values are views, valid inside it only."""
        with self._in(txn) as t:
            cur = self.cursor(t, db)
            if not cur.set_range(prefix):
                return
            items = cur.iternext(keys=True, values=False) if keys_only else cur.iternext(keys=True, values=True)
            n = len(prefix)
            for item in items:
                k, v = (item, None) if keys_only else item
                if n and k[:n] != prefix:
                    break
                yield k, v

    def snapshot(self) -> dict[tuple[str, bytes], bytes]:
        """Every record of every sub-database, ``{(db, key): value}``, read in one transaction
        (tests and the fuzzer compare stores before and after a refused operation)."""
        out = {}
        with self.read() as txn:
            for name, db in self._dbs.items():
                out.update({(name, bytes(k)): bytes(v) for k, v in txn.cursor(db=db)})
        return out

    def stage(self, db: str, items) -> None:
        """Make ``(key, value)`` items of ``db`` readable before they are written (a pull whose
        LMDB transaction runs in the background); ``unstage`` drops them once they landed."""
        for k, v in items:
            self._staged[(db, bytes(k))] = v

    def unstage(self, db: str, keys) -> None:
        for k in keys:
            self._staged.pop((db, bytes(k)), None)

    def staged(self, db: str, key: bytes) -> bytes | None:
        return self._staged.get((db, bytes(key))) if self._staged else None

    def lookup(self, chains: list[bytes], num_layers: int) -> int:
        """Longest prefix of ``chains`` whose blocks are stored for all ``num_layers`` layers."""
        with self.read() as txn:
            d = self.db("blocks")
            for i, c in enumerate(chains):
                cur = txn.cursor(db=d)
                for layer in range(num_layers):
                    if not cur.set_key(block_key(c, layer)):
                        return i
            return len(chains)

    # -- accounting ------------------------------------------------------------------------

    def used_bytes(self, txn: lmdb.Transaction | None = None) -> int:
        """Bytes in pages that hold data (branch + leaf + overflow) over all databases."""
        with self._in(txn) as t:
            total = 0
            for name in DB_NAMES:
                s = t.stat(self.db(name))
                total += (s["branch_pages"] + s["leaf_pages"] + s["overflow_pages"]) * s["psize"]
            return total

    def check_quota(self, txn: lmdb.Transaction) -> None:
        if self.quota is not None:
            used = self.used_bytes(txn)
            if used > self.quota:
                raise QuotaExceededError(
                    f"{self.path}: cold quota exceeded ({used} bytes needed, quota {self.quota}); "
                    "run `tierstore prune`/`gc` or raise cold=")

    def page_stats(self) -> dict:
        """LMDB page facts: page size, map size, pages in the file, used, free (reusable)."""
        self._check()
        info = self.env.info()
        st = self.env.stat()
        with self.read() as txn:
            used = self.used_bytes(txn) // st["psize"]
            overflow = sum(txn.stat(self.db(n))["overflow_pages"] for n in DB_NAMES)
        total = info["last_pgno"] + 1
        # py-lmdb does not expose the free list; pages in the file that no database reaches
        # (less the two meta pages and the main DB's own pages) are free for reuse.
        main = st["branch_pages"] + st["leaf_pages"] + st["overflow_pages"]
        free = max(0, total - used - main - 2)
        return {"psize": st["psize"], "map_size": info["map_size"], "total_pages": total,
                "used_pages": used, "free_pages": free, "overflow_pages": overflow,
                "file_bytes": _file_size(os.path.join(self.path, "data.mdb")),
                "readers": info["num_readers"], "max_readers": info["max_readers"]}

    def copy_compacted(self, dest_dir: str) -> None:
        self._check()
        self.env.copy(dest_dir, compact=True)


def _file_size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def _is_enospc(e: lmdb.Error) -> bool:
    return getattr(e, "errno", None) in (errno.ENOSPC, errno.EFBIG) or "No space left" in str(e) \
        or "File too large" in str(e)

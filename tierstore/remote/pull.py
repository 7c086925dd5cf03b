"""Pulls: a remote session's record and the blocks this host lacks, into local LMDB.

``Puller.pull`` reads the record, fetches only the chain positions this host has not committed
(one ``MGET`` per position: its keys share a slot), checks every block is there and every
summary's seal, and then either verifies every block against its key and commits them with the
record in one LMDB transaction, or (a pull of ``stream_bytes`` or more) makes them readable from
memory at once (``ColdStore.stage``: a resume reads and checks them from there) while a thread
verifies and commits them; until that lands the record is ``pending`` and a local commit waits
(``wait_pulls``). A record whose blocks are not all on the remote is a ``MissingBlockError``,
a damaged block a ``CorruptBlockError``: nothing lands locally, and that version keeps raising
the same error (``raise_failed``).
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time

from ..codec import open_envelope, verify_record
from ..errors import CorruptBlockError, CorruptRecordError, MissingBlockError
from ..records import SUMMARY_KIND, SessionRecord
from ..tiers.schema import block_key
from .tier import RemoteTier

log = logging.getLogger(__name__)

POSITIONS_PER_BATCH = 16   # chain positions fetched per round trip (x layers blocks and summaries)


def digest(sealed: bytes) -> str:
    """Identity of a sealed record's bytes (the remote keeps it next to the record)."""
    return hashlib.blake2b(sealed, digest_size=16, person=b"tierstore-rec").hexdigest()


class Puller:
    """The pulls of one host's ``SessionStore`` from ``remote``."""

    def __init__(self, sessions, remote: RemoteTier, *, stream_bytes: int = 32 << 20) -> None:
        self.sessions, self.cold, self.remote = sessions, sessions.cold, remote
        self.stream_bytes = stream_bytes                   # pulls this large land in LMDB in the background
        self._lock = threading.Lock()
        self._pending: dict[str, tuple[SessionRecord, threading.Thread]] = {}
        self._failed: dict[str, tuple[int, BaseException]] = {}  # session -> (remote version, why it did not land)
        self._landed: list[tuple[float, list[bytes]]] = []

    def close(self) -> None:
        self.wait_pulls()
        self.unstage_landed(older_than=0.0)

    def raise_failed(self, name: str, ver: int | None = None) -> None:
        """Raise the error of a pull of ``name`` that did not land (of version ``ver``, if given)."""
        failed = self._failed.get(name)
        if failed is not None and (ver is None or failed[0] == ver):
            raise failed[1]

    def pull(self, name: str) -> SessionRecord | None:
        """Fetch the remote record of ``name`` and what this host lacks of it into local LMDB."""
        raw, ver = self.remote.record(name)
        if raw is None:
            return None
        try:
            rec = SessionRecord.unseal(name, raw)
        except CorruptRecordError as e:
            raise CorruptRecordError(f"{e.reason} (the record on the remote tier {self.remote.url}); nothing "
                                     "was resumed", session=name) from None
        chains, layers = rec.chains(), rec.layout.num_layers
        with self.cold.read() as txn:
            need = [i for i, c in enumerate(chains) if self.cold.get("refs", c, txn=txn) is None]
        items = []
        for at in range(0, len(need), POSITIONS_PER_BATCH):
            part = need[at:at + POSITIONS_PER_BATCH]
            items += self._fetched(name, chains, part, layers,
                                   self.remote.fetch_positions([chains[i] for i in part], layers))
        where = {key: (i, layer) for i in need for layer, key in
                 ((la, block_key(chains[i], la)) for la in range(layers))}
        size = sum(len(d) for _, d, _ in items)
        if size < self.stream_bytes:
            self._verify(name, items, where)
            out = self.sessions.commit(rec, _synced=(ver, digest(raw)), blocks=items)
        else:  # readable now from memory; verified and written to LMDB by a thread of its own
            out = rec
            self._land_later(rec, (ver, digest(raw)), items, where)
        log.info("session %r: pulled version %d from %s (%d of %d positions fetched)", name, ver,
                 self.remote.url, len(need), len(chains))
        return out

    def _fetched(self, name: str, chains, part, layers: int, got) -> list:
        """``put_blocks`` items of fetched positions: every block present, every summary sealed
        for its key (a damaged one is dropped: it is recomputed from its block)."""
        items = []
        for i, values in zip(part, got):
            for layer in range(layers):
                data, summ = values[layer], values[layers + layer]
                key = block_key(chains[i], layer)
                where = dict(session=name, layer=layer, block=i)
                if data is None:
                    raise MissingBlockError(f"block not on the remote tier {self.remote.url} (evicted or lost); "
                                            "nothing was resumed", **where)
                if summ is not None:
                    try:  # its checksum (sealed for this key); the tensors are built when it is used
                        open_envelope(key, SUMMARY_KIND, summ, error=CorruptBlockError, **where)
                    except CorruptBlockError:
                        log.warning("session %r layer %d block %d: damaged summary on the remote tier "
                                    "dropped (it is recomputed from the block)", name, layer, i)
                        summ = None
                items.append((key, data, summ))
        return items

    def _verify(self, name: str, items, where: dict) -> None:
        """Every block's checksum and structure against its key (``CorruptBlockError`` naming it)."""
        for key, data, _ in items:
            i, layer = where[key]
            try:
                verify_record(key, data, session=name, layer=layer, block=i)
            except CorruptBlockError as e:
                raise CorruptBlockError(f"{e.reason} (fetched from the remote tier {self.remote.url}); "
                                        "nothing was resumed", session=name, layer=layer, block=i) from None

    # -- pulls that land in the background -----------------------------------------------------

    def pending(self, name: str) -> SessionRecord | None:
        """The record of a pull of ``name`` whose LMDB write has not landed yet."""
        p = self._pending.get(name)
        return p[0] if p is not None else None

    def _land_later(self, rec: SessionRecord, synced: tuple[int, str], items: list, where: dict) -> None:
        """A large pull: its blocks readable from memory at once (``ColdStore.stage``; a resume
        reads them from there, checking each checksum as it does from LMDB), verified again and
        written with the record in one LMDB transaction by a thread; until it lands the record is
        ``pending``, and a local commit waits for it (``wait_pulls``)."""
        self.cold.stage("blocks", [(k, d) for k, d, _ in items])
        self.cold.stage("summaries", [(k, s) for k, _, s in items if s is not None])
        keys = [k for k, _, _ in items]

        def land() -> None:
            try:
                self._verify(rec.name, items, where)
                self.sessions.commit(rec, _synced=synced, blocks=items)
            except BaseException as e:  # noqa: BLE001 - the resume reading these blocks sees it too
                log.error("session %r: the pulled version did not land in local LMDB: %s", rec.name, e)
                self._failed[rec.name] = (synced[0], e)  # read() raises it from now on
            finally:  # staged blocks go a while later, landed or not (a reader may be reading them)
                with self._lock:
                    self._pending.pop(rec.name, None)
                    self._landed.append((time.monotonic(), keys))

        t = threading.Thread(target=land, name="tierstore-pull", daemon=True)
        with self._lock:
            self._pending[rec.name] = (rec, t)
        t.start()

    def wait_pulls(self) -> None:
        """Until every pull of this process has landed in LMDB (or failed)."""
        for _, t in list(self._pending.values()):
            if t is not threading.current_thread():
                t.join()

    def unstage_landed(self, *, older_than: float = 5.0) -> None:
        """Drop staged blocks that landed ``older_than`` seconds ago (read transactions begun
        before they landed are long over)."""
        now = time.monotonic()
        with self._lock:
            done = [x for x in self._landed if now - x[0] >= older_than]
            self._landed = [x for x in self._landed if now - x[0] < older_than]
        for _, keys in done:
            self.cold.unstage("blocks", keys)
            self.cold.unstage("summaries", keys)

"""What is on disk: one consistent snapshot of a store, scanned into frozen facts.

The CLI (``tierstore ls/show/stat``) only renders what this module returns (huggingface_hub's ``hf cache`` habit). Every
function reads inside one LMDB read transaction, so a store being written by another process
is seen as one committed state: a commit either is or is not in the snapshot.

Sizes: a block's *stored* bytes are the length of its record in ``blocks``; its *raw* bytes
are what its K and V occupy uncompressed in the session's dtype (``2 * kv_heads * tokens *
head_dim * itemsize``), so ``compression ratio = raw / stored``. A chain position that more
than one session record names is *shared*: its bytes count as shared for each of them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import lmdb

from ..errors import CorruptRecordError, TierstoreError
from ..records import BlockSummary, SessionRecord
from ..tiers.cold import ColdStore
from ..tiers.schema import META_STORE, block_key, chain_of, decode_refs


def snapshot(cold: ColdStore, *, buffers: bool = True):
    """A read transaction over ``cold``; ``buffers=True`` returns zero-copy views.

    Zero-copy matters for sizes: ``len()`` of a view of an overflow value does not read its
    pages, so ``ls`` never pulls a store's blocks from disk. Views die with the transaction.
    """
    return cold.read(buffers=buffers)


def raw_block_bytes(rec: SessionRecord, index: int) -> int:
    """Uncompressed bytes of one layer's block ``index`` (K and V) of ``rec``."""
    lay = rec.layout
    return 2 * lay.kv_heads * rec.block_len(index) * lay.head_dim * lay.itemsize


@dataclass(frozen=True)
class StoreSnapshot:
    """Every record and the per-position block facts of one snapshot.

    pos_bytes[chain]: stored bytes of the position's blocks over all layers;
    pos_layers[chain]: how many layers of that position are stored;
    refs[chain]: the stored reference count; users[chain]: names of the records that name it.
    """

    records: list[SessionRecord]
    damaged: list[TierstoreError]
    chains: dict[str, list[bytes]]
    pos_bytes: dict[bytes, int]
    pos_layers: dict[bytes, int]
    refs: dict[bytes, int]
    users: dict[bytes, list[str]]
    meta: dict | None
    block_count: int
    block_bytes: int
    summary_count: int
    orphan_keys: int
    orphan_bytes: int

    def record(self, name: str) -> SessionRecord | None:
        return next((r for r in self.records if r.name == name), None)


def read_records(txn: lmdb.Transaction, cold: ColdStore) -> tuple[list[SessionRecord], list[TierstoreError]]:
    good: list[SessionRecord] = []
    bad: list[TierstoreError] = []
    for k, v in cold.scan("sessions", txn=txn):
        name = bytes(k).decode(errors="replace")
        try:
            good.append(SessionRecord.unseal(name, bytes(v)))
        except TierstoreError as e:
            bad.append(e)
        except Exception as e:  # noqa: BLE001 - an unreadable record is a finding, never a crash
            bad.append(CorruptRecordError(f"unreadable record ({type(e).__name__}: {e})", session=name))
    return good, bad


def read_refs(txn: lmdb.Transaction, cold: ColdStore) -> dict[bytes, int]:
    """Chain position -> stored reference count (-1: a damaged count)."""
    out = {}
    for k, v in cold.scan("refs", txn=txn):
        n = decode_refs(v)
        out[bytes(k)] = -1 if n is None else n
    return out


def read_meta(txn: lmdb.Transaction, cold: ColdStore) -> dict | None:
    raw = cold.get("meta", META_STORE, txn=txn)
    if raw is None:
        return None
    try:
        return json.loads(bytes(raw))
    except ValueError:
        return {"unreadable": True}


def scan_store(cold: ColdStore, txn: lmdb.Transaction) -> StoreSnapshot:
    """All records, refs and per-position sizes of the snapshot ``txn`` (a buffers txn is fastest)."""
    records, damaged = read_records(txn, cold)
    refs = read_refs(txn, cold)
    chains = {r.name: r.chains() for r in records}
    users: dict[bytes, list[str]] = {}
    for name, cs in chains.items():
        for c in cs:
            users.setdefault(c, []).append(name)
    pos_bytes: dict[bytes, int] = {}
    pos_layers: dict[bytes, int] = {}
    n_blocks = n_bytes = orphans = orphan_bytes = 0
    for k, v in cold.scan("blocks", txn=txn):
        c = chain_of(k)
        size = len(v)
        n_blocks += 1
        n_bytes += size
        pos_bytes[c] = pos_bytes.get(c, 0) + size
        pos_layers[c] = pos_layers.get(c, 0) + 1
        if c not in refs:
            orphans += 1
            orphan_bytes += len(k) + size
    n_summ = 0
    for k, v in cold.scan("summaries", txn=txn):
        n_summ += 1
        if chain_of(k) not in refs:
            orphans += 1
            orphan_bytes += len(k) + len(v)
    return StoreSnapshot(records=records, damaged=damaged, chains=chains, pos_bytes=pos_bytes,
                         pos_layers=pos_layers, refs=refs, users=users, meta=read_meta(txn, cold),
                         block_count=n_blocks, block_bytes=n_bytes, summary_count=n_summ,
                         orphan_keys=orphans, orphan_bytes=orphan_bytes)


# -- ls ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SessionInfo:
    """One row of ``tierstore ls``."""

    name: str
    model: str | None
    tokenizer: str | None
    tokens: int
    layers: int
    blocks: int                 # chain positions (blocks per layer)
    stored_bytes: int           # own + shared
    own_bytes: int              # positions no other session names
    shared_bytes: int           # positions other sessions name too
    raw_bytes: int
    missing_blocks: int         # position x layer pairs the record names but the store lacks
    codec: str
    dtype: str
    created: float
    updated: float
    last_used: float

    @property
    def ratio(self) -> float | None:
        return self.raw_bytes / self.stored_bytes if self.stored_bytes else None

    def to_json(self) -> dict:
        d = dict(self.__dict__)
        d["compression_ratio"] = None if self.ratio is None else round(self.ratio, 4)
        return d


def session_info(snap: StoreSnapshot, rec: SessionRecord) -> SessionInfo:
    layers = rec.layout.num_layers
    last_used = rec.meta.get("last_used")  # written by adapters that track use, if any
    own = shared = raw = missing = 0
    for i, c in enumerate(snap.chains[rec.name]):
        size = snap.pos_bytes.get(c, 0)
        missing += layers - min(layers, snap.pos_layers.get(c, 0))
        raw += raw_block_bytes(rec, i) * layers
        if len(snap.users.get(c, ())) > 1:
            shared += size
        else:
            own += size
    return SessionInfo(
        name=rec.name, model=rec.model_name, tokenizer=rec.tokenizer_name, tokens=rec.length,
        layers=layers, blocks=rec.num_blocks, stored_bytes=own + shared, own_bytes=own,
        shared_bytes=shared, raw_bytes=raw, missing_blocks=missing, codec=codec_name(rec),
        dtype=str(rec.layout.dtype).removeprefix("torch."), created=rec.created, updated=rec.updated,
        last_used=float(last_used) if _is_number(last_used) else rec.updated)


def codec_name(rec: SessionRecord) -> str:
    j = rec.codec.to_json()
    if isinstance(j, dict):
        return str(j.get("name") or j.get("id") or j)
    return str(j)


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


# -- show ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class SessionDetail:
    """Everything ``tierstore show`` prints about one session.

    stored[layer][block] / raw[layer][block]: bytes (stored is None for a missing block);
    mass[layer][block]: accumulated attention mass summed over kv heads (None: no summary).
    shared_with: other session -> block indices it shares with this one.
    """

    record: SessionRecord
    info: SessionInfo
    stored: list[list[int | None]]
    raw: list[list[int]]
    mass: list[list[float | None]]
    shared_with: dict[str, list[int]] = field(default_factory=dict)


def session_detail(cold: ColdStore, txn: lmdb.Transaction, snap: StoreSnapshot, rec: SessionRecord) -> SessionDetail:
    chains = snap.chains[rec.name]
    stored: list[list[int | None]] = []
    raw: list[list[int]] = []
    mass: list[list[float | None]] = []
    for layer in range(rec.layout.num_layers):
        s_row, r_row, m_row = [], [], []
        for i, c in enumerate(chains):
            key = block_key(c, layer)
            v = cold.get("blocks", key, txn=txn)
            s_row.append(None if v is None else len(v))
            r_row.append(raw_block_bytes(rec, i))
            sv = cold.get("summaries", key, txn=txn)
            m = None
            if sv is not None:
                try:
                    m = float(BlockSummary.unseal(key, bytes(sv)).mass.sum())
                except TierstoreError:
                    m = None
            m_row.append(m)
        stored.append(s_row)
        raw.append(r_row)
        mass.append(m_row)
    shared: dict[str, list[int]] = {}
    for i, c in enumerate(chains):
        for other in snap.users.get(c, ()):
            if other != rec.name:
                shared.setdefault(other, []).append(i)
    return SessionDetail(record=rec, info=session_info(snap, rec), stored=stored, raw=raw, mass=mass,
                         shared_with=shared)


def ranges(indices: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2, 5, 7-8'."""
    out: list[str] = []
    start = prev = None
    for i in indices:
        if prev is not None and i == prev + 1:
            prev = i
            continue
        if start is not None:
            out.append(f"{start}-{prev}" if prev != start else f"{start}")
        start = prev = i
    if start is not None:
        out.append(f"{start}-{prev}" if prev != start else f"{start}")
    return ", ".join(out)


# -- stat ----------------------------------------------------------------------------------


def store_stat(cold: ColdStore, snap: StoreSnapshot, pages: dict, live_writers: int) -> dict:
    """Store-level facts, sizes in bytes. Hot/warm tiers live only inside a running process."""
    total = pages["total_pages"]
    meta = snap.meta or {}
    return {
        "path": cold.path,
        "sessions": len(snap.records),
        "damaged_sessions": len(snap.damaged),
        "format_version": meta.get("format_version"),
        "block_tokens": meta.get("block_tokens"),
        "created": meta.get("created"),
        "blocks": snap.block_count,
        "block_bytes": snap.block_bytes,
        "summaries": snap.summary_count,
        "chain_positions": len(snap.refs),
        "orphan_records": snap.orphan_keys,
        "orphan_bytes": snap.orphan_bytes,
        "cold_used_bytes": pages["used_pages"] * pages["psize"],
        "map_size": pages["map_size"],
        "file_bytes": pages["file_bytes"],
        "page_size": pages["psize"],
        "total_pages": total,
        "used_pages": pages["used_pages"],
        "free_pages": pages["free_pages"],
        "overflow_pages": pages["overflow_pages"],
        "lmdb_free_ratio": round(pages["free_pages"] / total, 6) if total else 0.0,
        "readers": pages["readers"],
        "max_readers": pages["max_readers"],
        "live_writers": live_writers,
    }

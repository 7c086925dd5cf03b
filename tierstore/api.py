"""The facade users import: ``tierstore.open()`` -> ``Store``."""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections.abc import Sequence

import numpy as np
import torch

from .codec import CodecConfig, decode_block, encode_block
from .config import StoreConfig
from .errors import ModelMismatchError, StoreClosedError
from .layout import KVLayout, check_session_name
from .lifecycle import release
from .records import BlockSummary, SessionRecord
from .sessions import GcReport, SessionStore
from .tiers.cold import ColdStore
from .tiers.schema import block_key

log = logging.getLogger(__name__)


def open(path: str | os.PathLike, *, hot: int | str | None = None, warm: int | str | None = None,
         cold: int | str | None = None, codec: str | CodecConfig | None = None,
         block_tokens: int | None = None, readonly: bool = False, create: bool = True,
         sketch_dims: int | None = None, remote=None, host: str | None = None) -> "Store":
    """Open (or create) the store in directory ``path``.

    hot/warm: byte budgets of the device and host tiers, shared by every cache of this store
    in this process ("1GiB", 1 << 30, ...). cold: optional quota of the LMDB tier.
    codec: cold codec ("raw", "zstd", "int8+zstd", ...). readonly=True never writes.
    sketch_dims: key sketch dimensions per token and KV head that rank blocks for sparse
    attention (``tierstore.sketch``; default 16, 0 turns sketches off).
    remote: the shared tier below LMDB, for every host (``"redis://127.0.0.1:6379/0"``,
    ``rediss://``, a list of cluster nodes, or a ``tierstore.remote.RemoteTier``; default
    ``TIERSTORE_REMOTE``; needs ``tierstore[redis]``). host: this host's name on it (default
    ``TIERSTORE_HOST_ID``, else the hostname).
    """
    cfg = StoreConfig.build(path, hot=hot, warm=warm, cold=cold, codec=codec,
                            block_tokens=block_tokens, readonly=readonly, sketch_dims=sketch_dims,
                            remote=remote, host=host)
    return Store(cfg, create=create)


class _Held:
    """What a ``Store`` gives back: the state of its finalizer, which must never reference the
    Store (the manager's threads reference the manager; were the Store reachable from here, a
    Store dropped without ``close()`` would live, with its pools and threads, until exit)."""

    __slots__ = ("cold", "sessions", "manager")

    def __init__(self, cold: ColdStore, sessions: SessionStore) -> None:
        self.cold, self.sessions, self.manager = cold, sessions, None

    def close(self) -> None:
        """Idempotent: the manager (its sequences flushed, its threads ended, its pools freed),
        then this process's leases, then the LMDB environment (so the path opens again)."""
        mgr, self.manager = self.manager, None
        try:
            if mgr is not None:
                mgr.close()
        finally:
            try:
                if not self.cold.closed:
                    self.sessions.release_all()
            finally:
                try:
                    self.sessions.close_remote()
                finally:
                    self.cold.close()


def _dropped(held: _Held, path: str) -> None:
    """The finalizer of a Store dropped without ``close()`` (see ``tierstore.lifecycle``)."""
    log.debug("%s: store dropped without close(); releasing its tiers", path)
    mgr = held.manager
    release(held.close, what=f"store {path}", locks=[mgr.lock if mgr is not None else None])


class Store:
    """One store directory: the cold tier, its sessions and (lazily) the tier manager.

    ``close()`` (or ``with``) gives back the pools, the worker threads and the LMDB environment;
    a Store dropped without it gives them back when it is collected (a ``weakref.finalize``)."""

    def __init__(self, config: StoreConfig, *, create: bool = True) -> None:
        self.config = config
        cold = ColdStore(config.path, readonly=config.readonly, create=create, quota=config.cold_bytes)
        try:
            remote = None
            if config.remote:  # False: no remote, whatever TIERSTORE_REMOTE says
                from .remote import RemoteTier
                remote = config.remote if isinstance(config.remote, RemoteTier) else RemoteTier(config.remote)
            sessions = SessionStore(cold, remote=remote, host=config.host)
        except BaseException:
            cold.close()
            raise
        self._held = _Held(cold, sessions)
        if not config.readonly:
            try:
                self.sessions.init_meta(config.block_tokens)
            except BaseException:
                self._held.close()
                raise
        self._finalizer = weakref.finalize(self, _dropped, self._held, config.path)
        self._finalizer.atexit = False  # at exit the process gives everything back anyway
        self._lock = threading.RLock()

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def path(self) -> str:
        return self.config.path

    # cold and sessions live in ``_held`` (what the finalizer closes), also when replaced
    @property
    def cold(self) -> ColdStore:
        return self._held.cold

    @cold.setter
    def cold(self, cold: ColdStore) -> None:
        self._held.cold = cold

    @property
    def sessions(self) -> SessionStore:
        return self._held.sessions

    @sessions.setter
    def sessions(self, sessions: SessionStore) -> None:
        self._held.sessions = sessions

    @property
    def _manager(self):
        """The tier manager if it was made (None before first use and after ``close()``)."""
        return self._held.manager

    @property
    def manager(self):
        """The process's tier manager for this store (created on first use)."""
        with self._lock:
            if self.cold.closed:
                raise StoreClosedError(f"{self.path}: store is closed")
            if self._held.manager is None:
                from .manager import TierManager
                self._held.manager = TierManager(self)
            return self._held.manager

    def close(self) -> None:
        with self._lock:
            self._finalizer.detach()
            self._held.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- sessions --------------------------------------------------------------------------

    def list(self) -> list[SessionRecord]:
        """Readable committed sessions (damaged records are skipped; ``verify`` reports them)."""
        return [r for r in self.sessions.records() if isinstance(r, SessionRecord)]

    def session(self, name: str) -> SessionRecord:
        return self.sessions.read(name)

    def exists(self, name: str) -> bool:
        return self.sessions.exists(name)

    def fork(self, src: str, dst: str, tokens: int | None = None, *, overwrite: bool = False) -> SessionRecord:
        return self.sessions.fork(src, dst, tokens, overwrite=overwrite)

    def delete(self, *names: str) -> int:
        return self.sessions.delete(names)

    def gc(self, *, dry_run: bool = False, force: bool = False) -> GcReport:
        return self.sessions.gc(dry_run=dry_run, force=force)

    # -- whole-session I/O (import/export, tests, tools) ------------------------------------

    def encode_blocks(self, record: SessionRecord, layer: int, k: torch.Tensor, v: torch.Tensor,
                      chains: Sequence[bytes], codec: CodecConfig | None = None):
        """Sealed (key, block, summary) items for one layer's full K/V ``[kv_heads, length, head_dim]``.
        Summaries carry key sketches in the layer's basis, which is fitted from these keys when
        the store has none yet for the layout (as sealing the first blocks through a cache would)."""
        bt = record.layout.block_tokens
        codec = codec or record.codec
        basis = None if self.config.readonly else self.manager.calibrator.calibrate(record.layout, layer, k)
        for i, c in enumerate(chains):
            key = block_key(c, layer)
            kb, vb = k[:, i * bt:(i + 1) * bt], v[:, i * bt:(i + 1) * bt]
            yield key, encode_block(key, kb, vb, codec), BlockSummary.of_keys(kb, basis).seal(key)

    def put_session(self, name: str, *, layout: KVLayout, kv: Sequence[tuple[torch.Tensor, torch.Tensor]],
                    token_ids: Sequence[int] | np.ndarray, fingerprint: str, fingerprint_fields: dict | None = None,
                    last_logits: np.ndarray | None = None, model_name: str | None = None,
                    tokenizer_name: str | None = None, meta: dict | None = None,
                    codec: str | CodecConfig | None = None, overwrite: bool = False) -> SessionRecord:
        """Store a whole session at once: ``kv[layer] = (K, V)``, each ``[kv_heads, length, head_dim]``."""
        check_session_name(name)
        ids = np.asarray(token_ids, dtype=np.int64)
        if len(kv) != layout.num_layers:
            raise ModelMismatchError(f"session {name!r}: {len(kv)} layers given, layout has {layout.num_layers}")
        for layer, (k, v) in enumerate(kv):
            want = (layout.kv_heads, len(ids), layout.head_dim)
            if tuple(k.shape) != want or tuple(v.shape) != want or k.dtype != layout.dtype or v.dtype != layout.dtype:
                raise ModelMismatchError(f"session {name!r}, layer {layer}: K/V {tuple(k.shape)} {k.dtype} "
                                         f"do not match layout {want} {layout.dtype}")
        cfg = CodecConfig.parse(codec) if codec is not None else self.config.codec
        now = time.time()
        rec = SessionRecord(name=name, layout=layout, fingerprint=fingerprint,
                            fingerprint_fields=fingerprint_fields or {}, codec=cfg, token_ids=ids,
                            last_logits=last_logits, model_name=model_name, tokenizer_name=tokenizer_name,
                            created=now, updated=now, meta=meta or {})
        lease = self.sessions.acquire(name)
        try:
            chains = rec.chains()
            for layer, (k, v) in enumerate(kv):
                self.sessions.put_blocks(self.encode_blocks(rec, layer, k.cpu(), v.cpu(), chains, cfg))
            return self.sessions.commit(rec, expect_new=not overwrite)
        finally:
            self.sessions.release(lease)

    def read_block(self, record: SessionRecord, layer: int, index: int, *, chains: Sequence[bytes] | None = None,
                   out_k: torch.Tensor | None = None, out_v: torch.Tensor | None = None):
        """Decode one block (checksum verified); MissingBlockError if it is not stored."""
        from .errors import MissingBlockError
        chains = chains if chains is not None else record.chains()
        key = block_key(chains[index], layer)
        data = self.cold.get("blocks", key)
        if data is None:
            raise MissingBlockError("block not stored", session=record.name, layer=layer, block=index)
        return decode_block(key, data, out_k=out_k, out_v=out_v, session=record.name, layer=layer, block=index)

    def load_session(self, name: str) -> tuple[SessionRecord, list[tuple[torch.Tensor, torch.Tensor]]]:
        """The whole KV of a session, per layer ``(K, V)`` each ``[kv_heads, length, head_dim]``."""
        rec = self.session(name)
        lay = rec.layout
        chains = rec.chains()
        out = []
        for layer in range(lay.num_layers):
            k = torch.empty(lay.kv_heads, rec.length, lay.head_dim, dtype=lay.dtype)
            v = torch.empty_like(k)
            for i in range(rec.num_blocks):
                s = slice(i * lay.block_tokens, i * lay.block_tokens + rec.block_len(i))
                self.read_block(rec, layer, i, chains=chains, out_k=k[:, s], out_v=v[:, s])
            out.append((k, v))
        return rec, out

    # -- metrics ---------------------------------------------------------------------------

    def stats(self):
        from .metrics import collect_stats
        return collect_stats(self)

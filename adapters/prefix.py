"""Resume the longest committed prefix of a token sequence: a chat needs no session id.

A block's key is the hash chain of its whole prefix (``tierstore.chain``), so the leading full
blocks of ``token_ids`` that any committed record names (``SessionStore.committed_prefix``)
are the KV of exactly those tokens under this model, whoever stored them. ``resume_prefix``
names them in a record of ``session`` (a fork without a source: one commit, which checks again
that every block is stored and takes their references, so no ``gc`` or delete can take them
while the cache reads them), resumes it, and leaves the rest of the ids to the caller's prefill.

Whole blocks are what the chain keys find; a conversation's partial last block (its tail: the end
of the last reply) is stored under its session. ``TailIndex`` finds those too: the committed
records by the chain key of their last full block, so that a prompt continuing a stored
conversation resumes a copy (``fork``) of that conversation, tail included, and prefills only
the new turn's tokens.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence

import numpy as np

from tierstore.chain import chain_hashes, root_hash
from tierstore.errors import MissingBlockError, TierstoreError
from tierstore.records import SessionRecord

from .fingerprint import kv_layout, model_fingerprint
from .hf import TieredCache

log = logging.getLogger(__name__)


def _extends(rec: SessionRecord, ids: list[int]) -> bool:
    """Does ``ids`` continue ``rec`` by at least one token (whose logits start the reply)?"""
    return rec.length < len(ids) and rec.token_ids.tolist() == ids[:rec.length]


class _Lookup:
    """What every prefix lookup of ``ids`` needs, computed once per request: the layout, the
    model fingerprint, the chain root and keys of the full blocks (at most ``len(ids) - 1``
    tokens: the last one is prefilled for its logits) and how many of them this host stores."""

    def __init__(self, store, model, ids: list[int]) -> None:
        self.ids = ids
        self.lay = kv_layout(model, store.config.block_tokens)
        self.fp, self.fields = model_fingerprint(model)
        self.codec = store.config.codec  # what a new TieredCache of this store writes
        self.root = root_hash(self.fp, self.lay, self.codec.identity)
        bt = self.lay.block_tokens
        full = (len(ids) - 1) // bt
        self.chains = chain_hashes(self.root, ids[:full * bt], bt)
        self.local = store.sessions.committed_prefix(self.chains)


def _fork_as(store, src: str, session: str, tokens: int | None = None) -> None:
    """``session`` becomes a fork of ``src`` (its first ``tokens``), under a writer lease."""
    lease = store.sessions.acquire(session)
    try:
        store.fork(src, session, tokens, overwrite=True)
    finally:
        store.sessions.release(lease)


def commit_prefix(store, model, session: str, token_ids: Sequence[int], *,
                  tokenizer_name: str | None = None, lookup: _Lookup | None = None) -> SessionRecord | None:
    """Commit ``session`` as the longest committed prefix of ``token_ids`` (whole blocks, and
    at most ``len(token_ids) - 1`` tokens: the last one is prefilled for its logits); an older
    record of that name is replaced. None when no block of the prefix is stored."""
    look = lookup or _Lookup(store, model, [int(t) for t in token_ids])
    ids, lay = look.ids, look.lay
    if _fork_remote(store, session, look):
        return store.session(session)
    n = look.local * lay.block_tokens
    if n == 0:
        return None
    now = time.time()
    rec = SessionRecord(name=session, layout=lay, fingerprint=look.fp, fingerprint_fields=look.fields,
                        codec=look.codec, token_ids=np.asarray(ids[:n], dtype=np.int64),
                        model_name=getattr(model.config, "_name_or_path", None) or None,
                        tokenizer_name=tokenizer_name, created=now, updated=now, meta={"prefix_resume": True})
    lease = store.sessions.acquire(session)
    try:
        return store.sessions.commit(rec)
    except MissingBlockError:  # a delete took a position between the lookup and the commit
        log.info("session %r: the stored prefix went away before it was named; prefilling all", session)
        return None
    finally:
        store.sessions.release(lease)


class TailIndex:
    """Committed records that end in a partial block, by the chain key of their last full block
    (the root for one shorter than a block): ``{key: {session: length}}``, within ``limit``
    entries (the oldest go first). In memory, built from the store's records (``load``) and kept
    up to date by ``add`` after each commit; an entry is only a hint: ``continued`` reads the
    record and checks its token ids before anything resumes it. Thread-safe."""

    def __init__(self, limit: int = 100_000) -> None:
        self.limit = limit
        self._lock = threading.Lock()
        self._by_key: dict[bytes, dict[str, int]] = {}
        self._order: dict[tuple[bytes, str], None] = {}  # insertion order, for the limit

    @staticmethod
    def _key(rec: SessionRecord) -> bytes:
        full = rec.length // rec.layout.block_tokens
        return rec.chains()[full - 1] if full else rec.root

    def load(self, store) -> "TailIndex":
        for rec in store.list():
            self.add(rec)
        return self

    def add(self, rec: SessionRecord) -> None:
        if rec.length % rec.layout.block_tokens == 0:
            return  # no tail: whole blocks are found by their keys
        key = self._key(rec)
        with self._lock:
            self._by_key.setdefault(key, {})[rec.name] = rec.length
            self._order.pop((key, rec.name), None)
            self._order[(key, rec.name)] = None
            while len(self._order) > self.limit:
                old_key, old_name = next(iter(self._order))
                del self._order[(old_key, old_name)]
                names = self._by_key.get(old_key, {})
                names.pop(old_name, None)
                if not names:
                    self._by_key.pop(old_key, None)

    def continued(self, store, key: bytes, ids: list[int]) -> SessionRecord | None:
        """The longest indexed record under ``key`` that ``ids`` continue (read and checked now)."""
        with self._lock:
            names = sorted(self._by_key.get(key, {}).items(), key=lambda kv: -kv[1])
        for name, length in names:
            if length >= len(ids):
                continue
            try:
                rec = store.session(name)
            except TierstoreError:  # deleted (or replaced by something unreadable) since
                continue
            if _extends(rec, ids) and rec.length % rec.layout.block_tokens:
                return rec
        return None


def resume_prefix(store, model, token_ids: Sequence[int], session: str, *, reuse: bool = True,
                  tokenizer_name: str | None = None, tails: TailIndex | None = None,
                  **cache_kw) -> TieredCache:
    """A cache for ``session`` that already holds the longest stored prefix of ``token_ids``.

    ``session``'s own record when ``token_ids`` continue it (its partial last block too), else
    the longest committed prefix of any session (``commit_prefix``), else an empty cache
    (``reuse=False``: always). Generate from the full ``token_ids``: transformers prefills only
    from ``cache.get_seq_length()`` on. ``cache_kw`` go to ``TieredCache`` (the store's codec
    is the one written); a resumed record keeps its own model and tokenizer names."""
    ids = [int(t) for t in token_ids]
    if reuse and store.exists(session) and _extends(store.session(session), ids):
        return TieredCache.resume(store, model, session, **cache_kw)
    look = _Lookup(store, model, ids) if reuse else None
    if reuse and tails is not None and _fork_tail(store, tails, session, look):
        return TieredCache.resume(store, model, session, **cache_kw)
    if reuse and commit_prefix(store, model, session, ids, tokenizer_name=tokenizer_name, lookup=look) is not None:
        return TieredCache.resume(store, model, session, **cache_kw)
    return TieredCache(store, model, session, overwrite=True, tokenizer_name=tokenizer_name, **cache_kw)


def _fork_tail(store, tails: TailIndex, session: str, look: _Lookup) -> bool:
    """Name in ``session`` a copy of the longest indexed conversation that the ids continue, its
    partial last block included (``TailIndex``); False when there is none."""
    n = look.local  # the conversation's full blocks are among these
    rec = tails.continued(store, look.chains[n - 1] if n else look.root, look.ids)
    if rec is None or rec.fingerprint != look.fp or rec.layout != look.lay:
        return False
    try:
        _fork_as(store, rec.name, session)
    except TierstoreError:  # the conversation went away between the read and the fork
        log.info("session %r: the conversation it continues went away; resuming whole blocks", session)
        return False
    return True


def _fork_remote(store, session: str, look: _Lookup) -> bool:
    """With a remote tier: when the fleet references a longer prefix of the lookup's chains than
    this host stores, name it in ``session`` as a fork of a session that holds it (reading that
    session pulls the positions this host lacks). False when the remote has nothing longer, is
    down, or the sessions it names went away meanwhile."""
    replica, chains, bt = store.sessions.replica, look.chains, look.lay.block_tokens
    if replica is None or len(chains) <= look.local:
        return False
    try:
        held = replica.remote.referenced(chains)
        n = next((i for i, h in enumerate(held) if not h), len(held))
        if n <= look.local:
            return False
        for src in replica.remote.members(chains[n - 1]):
            if src == session or not store.exists(src):
                continue
            rec = store.session(src)
            if rec.length < n * bt or rec.token_ids[:n * bt].tolist() != look.ids[:n * bt]:
                continue
            _fork_as(store, src, session, n * bt)
            return True
    except TierstoreError as e:  # down, or a source deleted under us: the local prefix serves
        log.info("session %r: no prefix from the remote tier (%s)", session, e)
    return False

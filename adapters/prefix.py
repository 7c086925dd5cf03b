"""Resume the longest committed prefix of a token sequence: a chat needs no session id.

A block's key is the hash chain of its whole prefix (``tierstore.chain``), so the leading full
blocks of ``token_ids`` that any committed record names (``SessionStore.committed_prefix``)
are the KV of exactly those tokens under this model, whoever stored them. ``resume_prefix``
names them in a record of ``session`` (a fork without a source: one commit, which checks again
that every block is stored and takes their references, so no ``gc`` or delete can take them
while the cache reads them), resumes it, and leaves the rest of the ids to the caller's prefill.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import numpy as np

from tierstore.chain import chain_hashes, root_hash
from tierstore.errors import MissingBlockError
from tierstore.records import SessionRecord

from .fingerprint import kv_layout, model_fingerprint
from .hf import TieredCache

log = logging.getLogger(__name__)


def _extends(rec: SessionRecord, ids: list[int]) -> bool:
    """Does ``ids`` continue ``rec`` by at least one token (whose logits start the reply)?"""
    return rec.length < len(ids) and rec.token_ids.tolist() == ids[:rec.length]


def commit_prefix(store, model, session: str, token_ids: Sequence[int], *,
                  tokenizer_name: str | None = None) -> SessionRecord | None:
    """Commit ``session`` as the longest committed prefix of ``token_ids`` (whole blocks, and
    at most ``len(token_ids) - 1`` tokens: the last one is prefilled for its logits); an older
    record of that name is replaced. None when no block of the prefix is stored."""
    ids = list(token_ids)
    lay = kv_layout(model, store.config.block_tokens)
    fp, fields = model_fingerprint(model)
    cfg = store.config.codec  # what a new TieredCache of this store writes
    full = (len(ids) - 1) // lay.block_tokens
    chains = chain_hashes(root_hash(fp, lay, cfg.identity), ids[:full * lay.block_tokens], lay.block_tokens)
    n = store.sessions.committed_prefix(chains) * lay.block_tokens
    if n == 0:
        return None
    now = time.time()
    rec = SessionRecord(name=session, layout=lay, fingerprint=fp, fingerprint_fields=fields, codec=cfg,
                        token_ids=np.asarray(ids[:n], dtype=np.int64),
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


def resume_prefix(store, model, token_ids: Sequence[int], session: str, *, reuse: bool = True,
                  tokenizer_name: str | None = None, **cache_kw) -> TieredCache:
    """A cache for ``session`` that already holds the longest stored prefix of ``token_ids``.

    ``session``'s own record when ``token_ids`` continue it (its partial last block too), else
    the longest committed prefix of any session (``commit_prefix``), else an empty cache
    (``reuse=False``: always). Generate from the full ``token_ids``: transformers prefills only
    from ``cache.get_seq_length()`` on. ``cache_kw`` go to ``TieredCache`` (the store's codec
    is the one written); a resumed record keeps its own model and tokenizer names."""
    ids = [int(t) for t in token_ids]
    if reuse and store.exists(session) and _extends(store.session(session), ids):
        return TieredCache.resume(store, model, session, **cache_kw)
    if reuse and commit_prefix(store, model, session, ids, tokenizer_name=tokenizer_name) is not None:
        return TieredCache.resume(store, model, session, **cache_kw)
    return TieredCache(store, model, session, overwrite=True, tokenizer_name=tokenizer_name, **cache_kw)

"""TieredCache: a transformers ``Cache`` whose KV lives in tierstore's tiers.

``model.generate(ids, cache=TieredCache(store, model, session="doc"), ...)``. Every layer's
K/V goes into token blocks of the store's tier manager; attention runs in the ``tierstore``
attention function (see ``adapters.attention``), which streams every block (exact mode), so
no full K/V is ever materialised and hot memory is bounded by the hot pool. The cache learns
the token ids it holds from a forward pre-hook on the model; ``commit()`` persists.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
import weakref
from collections.abc import Sequence

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from tierstore.chain import chain_marks, root_hash
from tierstore.codec import CodecConfig
from tierstore.errors import ModelMismatchError, ReadOnlyCacheError, SessionExistsError, TokenMismatchError
from tierstore.layout import check_session_name, parse_size
from tierstore.records import SessionRecord

from . import attention as attn
from . import persist
from .held import Held, cache_dropped, hold_attention, weak_hook
from .row import Row
from .fingerprint import kv_layout, model_fingerprint, shard_meta
from tierstore.attention import WindowMass, attend_exact
from tierstore.policies import get_policy
from tierstore.shards import gather, shard_name, shard_names, slice_shard
from tierstore.positions import Extension, Positions
from tierstore.sparse import SparseConfig, attend_selected, select

log = logging.getLogger(__name__)


class TieredLayer(CacheLayerMixin):
    """Per-layer facade that transformers inspects; the state lives in the TieredCache."""

    is_compileable = False
    is_sliding = False

    def __init__(self, cache: "TieredCache", idx: int) -> None:
        super().__init__()
        # a proxy: the cache -> layers -> cache cycle would leave a dropped cache to the cycle
        # collector (whenever, wherever it runs); without it the cache goes when its last user drops it
        self.cache, self.idx = weakref.proxy(cache), idx

    def lazy_initialization(self, key_states, value_states) -> None:  # pragma: no cover - via cache
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        return self.cache.update(key_states, value_states, self.idx)

    def get_seq_length(self) -> int:
        return self.cache.lengths[self.idx]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.cache.lengths[self.idx] + query_length, 0

    def get_max_length(self) -> int:
        return -1

    @property
    def batch_size(self) -> int:
        return len(self.cache.rows) if self.cache.is_initialized else -1


class TieredCache(Cache):
    """A transformers Cache over a tierstore ``Store``.

    store: ``tierstore.open(...)``; model: the transformers model (its attention implementation
    is switched to ``tierstore`` until ``close()``); session: name (or one name per batch row)
    under which ``commit()`` persists, None for an in-memory cache. policy: placement policy
    (``exact``, ``lru``) or sparse policy (``streaming``, ``h2o``, ``snapkv``, ``quest``,
    ``hybrid``, ``sketch``); its settings as one ``sparse=SparseConfig(...)``, or as the keywords
    ``budget_tokens`` per step, ``sink_blocks``, ``window_blocks``, ``sparse_prefill``,
    ``dense_layers`` (a count of first layers, or indices, attended exactly at every step) and
    ``per_head`` (every KV head selects its own blocks; None: the policy's default).
    hot/warm: this cache's share of the store's budgets (default: all that is left).
    auto_commit_blocks: commit after this many newly sealed blocks (None: off).
    readonly (``resume`` only): attend to a committed session without its writer lease (another
    cache may hold it); new tokens stay in memory and ``commit()`` raises ``ReadOnlyCacheError``.
    positions: ``"model"`` (default: the model's positions, bit-exact with ``DynamicCache``) or
    ``"extend"`` / a ``Positions``: past the model's trained length, far keys are attended at
    mapped distances that stay within it (``tierstore.positions``). Kept in the session record; a
    resume takes it from there (another mode is refused unless ``override_positions``).

    Per-row state (sequence, token ids, padding, chains, sparse selections) lives in ``Row``
    objects (``self.rows``), as transformers keeps per-layer state in ``Cache.layers``.
    ``close()`` (or ``with``) commits (``commit_on_close``) and gives the slots, the leases and the
    model back; a cache dropped without it gives them back when it is collected, uncommitted.
    """

    def __init__(self, store, model, session: str | Sequence[str] | None = None, *, policy: str = "exact",
                 sparse: SparseConfig | None = None, budget_tokens: int | float | None = None,
                 sink_blocks: int = 1, window_blocks: int = 2, sparse_prefill: bool = False,
                 dense_layers: int | Sequence[int] = 0, per_head: bool | None = None, obs_window: int = 32,
                 hot: int | str | None = None, warm: int | str | None = None,
                 codec: str | CodecConfig | None = None, overwrite: bool = False,
                 auto_commit_blocks: int | None = None, commit_on_close: bool = True,
                 model_name: str | None = None, tokenizer_name: str | None = None,
                 readonly: bool = False, positions: "str | Positions | None" = None,
                 override_positions: bool = False, _resume: SessionRecord | None = None) -> None:
        if readonly and _resume is None:
            raise ValueError("readonly=True is for TieredCache.resume(...): a new cache has nothing to read")
        if readonly and auto_commit_blocks:
            raise ValueError("a read-only cache never commits: auto_commit_blocks needs readonly=False")
        self.store, self.model = store, model
        self.readonly = readonly
        # a resumed session keeps the block size it was stored with (the store may be opened with another)
        self.layout = kv_layout(model, _resume.layout.block_tokens if _resume is not None else store.config.block_tokens)
        super().__init__(layers=[TieredLayer(self, i) for i in range(self.layout.num_layers)])
        self.names = list(session) if isinstance(session, (list, tuple)) else [] if session is None else [session]
        for n in self.names:
            check_session_name(n)
        # a tensor-parallel rank keeps its share of the heads as its own session (tierstore.shards)
        self.shard = shard_meta(model)
        if self.shard is not None and _resume is None:
            self.names = [shard_name(n, self.shard["rank"], self.shard["size"]) for n in self.names]
        self.fingerprint, self.fingerprint_fields = model_fingerprint(model)
        self.codec = CodecConfig.parse(codec) if codec is not None else store.config.codec
        self.policy = policy
        self.sparse = self._sparse_config(policy, sparse, budget_tokens, sink_blocks, window_blocks,
                                          sparse_prefill, dense_layers, per_head)
        self.budget_tokens = None if self.sparse is None else self.sparse.budget_tokens
        self.obs_window = obs_window
        self.force_exact = False
        self.approx_from: int | None = _resume.meta.get("approx_from") if _resume is not None else None
        self.positions = Positions.for_session(model, positions, override_positions, _resume)
        self.extension = Extension.of(self.positions, model)
        self.hot_bytes, self.warm_bytes = parse_size(hot, what="hot"), parse_size(warm, what="warm")
        self.auto_commit_blocks, self.commit_on_close = auto_commit_blocks, commit_on_close
        self.model_name = model_name or getattr(model.config, "_name_or_path", None) or None
        self.tokenizer_name = tokenizer_name or self.model_name
        self.mgr = store.manager
        self._held = Held(self.mgr, store.sessions, model)
        self._finalizer = weakref.finalize(self, cache_dropped, self._held, ",".join(self.names) or "<memory>")
        self._finalizer.atexit = False
        if readonly:
            self.commit_on_close = False
        self.lengths = [0] * self.layout.num_layers
        self.last_logits: torch.Tensor | None = None
        self.ids_known = True
        self.committed_blocks = 0      # full blocks covered by the last commit (or the resumed record)
        self._closed = False
        self.created = time.time()
        self.meta: dict = dict(_resume.meta) if _resume is not None else {}  # kept in the record
        self.meta["positions"] = self.positions.to_json()
        self.meta.pop("tp", None)
        if self.shard is not None:
            self.meta["tp"] = self.shard
        if _resume is None and self.names and not overwrite:
            for n in self.names:
                if store.exists(n):
                    raise SessionExistsError("session exists; use TieredCache.resume(...) or overwrite=True",
                                             session=n)
        try:
            for n in ([] if readonly else self.names):
                self._held.leases.append(store.sessions.acquire(n))
            attn.register()
            hold_attention(model)
            self._held.attention = True
            self._held.hooks = [
                model.register_forward_pre_hook(weak_hook(self, "_pre_forward"), with_kwargs=True),
                model.register_forward_hook(weak_hook(self, "_post_forward"), with_kwargs=True)]
            if _resume is not None:
                self._adopt(_resume)
        except BaseException:  # e.g. a damaged block on resume: unhook the model, release the leases
            self.commit_on_close = False
            self.close()
            raise

    def chain_marks(self) -> tuple:
        """What KV past a position depends on besides the tokens (see ``chain.chain_marks``)."""
        return chain_marks({"approx_from": self.approx_from, "positions": self.positions.to_json(),
                            "tp": self.shard})

    def _sparse_config(self, policy, sparse, budget_tokens, sink_blocks, window_blocks, sparse_prefill,
                       dense_layers, per_head) -> SparseConfig | None:
        """The sparse settings: ``sparse`` as given, else built from the keyword forms; None when
        the policy attends to everything or no budget is set."""
        if get_policy(policy).selects_all:
            if sparse is not None:
                raise ValueError(f"policy {policy!r} attends to every block: sparse= needs a sparse policy")
            return None
        if sparse is None:
            if budget_tokens is None:
                return None
            sparse = SparseConfig(budget_tokens, sink_blocks, window_blocks, sparse_prefill,
                                  SparseConfig.dense(dense_layers), per_head)
        if not sparse.dense_layers <= set(range(self.layout.num_layers)):
            raise ValueError(f"dense_layers {sorted(sparse.dense_layers)} name layers the model "
                             f"({self.layout.num_layers} layers) does not have")
        return sparse

    # -- rows ---------------------------------------------------------------------------------

    @property
    def rows(self) -> list[Row]:
        """One ``Row`` per batch row (the list lives in ``_held``, which closes the rows'
        sequences if the cache is dropped without ``close()``)."""
        return self._held.rows

    @rows.setter
    def rows(self, rows: list[Row]) -> None:
        self._held.rows = rows

    @property
    def seqs(self) -> list:
        """The rows' manager sequences."""
        return [r.seq for r in self.rows if r.seq is not None]

    @property
    def token_ids(self) -> list[list[int]]:
        """Per row: the ids whose KV is (being) stored."""
        return [r.token_ids for r in self.rows]

    @property
    def attended(self) -> dict[int, int]:
        """Layer -> the most tokens a KV head of any row attended at the last sparse step."""
        out: dict[int, int] = {}
        for r in self.rows:
            for layer, n in r.attended.items():
                out[layer] = max(n, out.get(layer, 0))
        return out

    def _row_name(self, r: int) -> str:
        if len(self.names) > 1:
            return self.names[r]
        return (self.names[0] if self.names else "<memory>") + (f"[{r}]" if r else "")

    def _grow_rows(self, b: int) -> None:
        while len(self.rows) < b:
            self.rows.append(Row(self._row_name(len(self.rows))))

    def _open_rows(self, key_states: torch.Tensor) -> None:
        b = key_states.shape[0]
        if self.names and len(self.names) not in (1, b):
            raise ValueError(f"{len(self.names)} session names for a batch of {b}")
        if key_states.shape[1] != self.layout.kv_heads or key_states.shape[3] != self.layout.head_dim:
            raise ModelMismatchError(f"KV shape {tuple(key_states.shape)} does not match {self.layout}")
        self._grow_rows(b)
        for row in self.rows:
            row.seq = self._open_seq(row.name, key_states.device)
        self.share_chains()

    def _open_seq(self, name: str, device):
        return self.mgr.open_sequence(name, self.layout, device, codec=self.codec, policy=self.policy,
                                      hot_bytes=self.hot_bytes, warm_bytes=self.warm_bytes)

    def _select_rows(self, picks: list[int]) -> None:
        """New row i = old row picks[i]; the first use of a row keeps it, repeats fork it."""
        old, used, new = self.rows, set(), []
        for r in picks:
            new.append(old[r] if r not in used else old[r].fork(self.mgr.clone_sequence(old[r].seq)))
            used.add(r)
        self.rows = new
        for r, row in enumerate(old):
            if r not in used:
                self.mgr.close_sequence(row.seq, flush=False)
        if self.last_logits is not None:
            self.last_logits = self.last_logits[picks]

    def _drop_rows(self) -> None:
        rows, self.rows = self.rows, []
        for row in rows:
            if row.seq is not None:
                self.mgr.close_sequence(row.seq, flush=False)

    # -- transformers Cache API ------------------------------------------------------------

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """key/value_states: [batch, kv_heads, q, head_dim] post-RoPE. Returns them unchanged:
        attention reads the tiers through the ``tierstore`` attention function."""
        if not self.is_initialized:
            self._open_rows(key_states)
        if key_states.dtype != self.layout.dtype:
            raise ModelMismatchError(f"KV dtype {key_states.dtype} != cache dtype {self.layout.dtype}")
        for r, row in enumerate(self.rows):
            self.mgr.append(row.seq, layer_idx, key_states[r], value_states[r])
        self.lengths[layer_idx] += key_states.shape[2]
        attn.set_active(self)
        return key_states, value_states

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.lengths[layer_idx]

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.lengths[layer_idx] + query_length, 0

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_initialized(self) -> bool:
        return bool(self.rows) and self.rows[0].seq is not None

    def reset(self) -> None:
        self._drop_rows()
        self.lengths = [0] * self.layout.num_layers

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select_rows([int(i) for i in beam_idx.tolist()])

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._select_rows([r for r in range(len(self.rows)) for _ in range(repeats)])

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._select_rows([int(i) for i in indices.tolist()])

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last ``-tokens_to_remove`` tokens (transformers' v5 convention: a count <= 0)."""
        if tokens_to_remove > 0:
            raise ValueError("crop takes a negative count of tokens to remove (transformers v5)")
        new_len = self.lengths[0] + tokens_to_remove
        for row in self.rows:
            self.mgr.truncate(row.seq, new_len)
            row.truncate(new_len, self.layout.block_tokens)
        self.lengths = [new_len] * self.layout.num_layers
        self.last_logits = None
        if self.approx_from is not None and new_len <= self.approx_from:
            self.approx_from = None

    # -- attention ------------------------------------------------------------------------------

    def _attend(self, layer: int, query: torch.Tensor, mask, scale: float) -> torch.Tensor:
        """query [batch, heads, q, d] -> out [batch, heads, q, d] in the query's dtype.

        Exact (every block, streamed) unless a sparse budget is set and this is a decode step
        (or ``sparse_prefill``): then the sinks, the recent window and the policy's top-k."""
        q_len = query.shape[2]
        sparse = self._sparse_step(q_len) and layer not in self.sparse.dense_layers
        outs = []
        for r, row in enumerate(self.rows):
            pad = None if mask is None or mask.padding is None else mask.padding[r]
            q_offset = mask.q_offset if mask is not None else self.lengths[layer] - q_len
            step = self._attend_sparse if sparse else self._attend_exact
            ext = None if self.extension is None else self.extension.step(
                q_offset - row.pad, q_offset + q_len - 1 - row.pad, row.pad, query.device)
            outs.append(step(row, layer, query[r], q_offset, pad, scale, ext))
        if layer + 1 < self.layout.num_layers:  # layer-ahead: start moving the next layer's blocks up
            nxt_sparse = self._sparse_step(q_len) and layer + 1 not in self.sparse.dense_layers
            for row in self.rows:
                nxt = row.selected.get(layer + 1) if nxt_sparse else None
                if nxt:
                    self.mgr.prefetch_to_read(row.seq, layer + 1, nxt)  # the previous step's choice
                elif not nxt_sparse:
                    self.mgr.prefetch_next(row.seq, layer + 1)
        return torch.stack(outs).to(query.dtype)

    def _attend_sparse(self, row: Row, layer: int, q: torch.Tensor, q_offset: int, pad, scale: float, ext=None):
        """q [heads, q_len, d]: the sinks, the window and the policy's top-k blocks of ``layer``."""
        lay, seq = self.layout, row.seq
        heads, q_len, d = q.shape
        qg = q.reshape(lay.kv_heads, heads // lay.kv_heads * q_len, d)
        n = len(self.mgr.blocks(seq, layer))
        if ext is not None and q_len == 1 and seq.policy.uses_query:  # rank far blocks at their mapped distance
            qg = ext.block_query(qg, q_offset, n, lay.block_tokens)
        ids, head_mask = select(functools.partial(self.mgr.summaries, seq, layer), seq.policy, qg, self.sparse,
                                lay.block_tokens, n=n)
        reader = row.reader(self.mgr)
        accumulate = seq.policy.mass_mode == "accumulate"
        out, mass = attend_selected(reader, layer, q, q_offset, pad, scale, ids, head_mask, ext, mass=accumulate)
        if accumulate:
            self.mgr.note_attention(seq, layer, ids, mass)
        row.selected[layer], row.head_masks[layer] = ids, head_mask
        ntok = torch.tensor(reader.ntok(layer, ids))
        row.attended[layer] = int(ntok.sum()) if head_mask is None else int((head_mask * ntok).sum(1).max())
        return out

    def _attend_exact(self, row: Row, layer: int, q: torch.Tensor, q_offset: int, pad, scale: float, ext=None):
        """q [heads, q_len, d]: every block of ``layer``; an observation window's mass feeds the
        policy (prefill of h2o/snapkv)."""
        lay, seq = self.layout, row.seq
        heads, q_len, _ = q.shape
        window = WindowMass(q, q_offset, self.obs_window, heads // lay.kv_heads, lay.kv_heads, scale) \
            if seq.policy.mass_mode is not None and q_len > 1 else None
        out = attend_exact(row.reader(self.mgr), layer, q, q_offset, pad, scale, window, ext)
        if window is not None:
            ids, mass = window.mass()
            self.mgr.note_attention(seq, layer, ids, mass, replace=seq.policy.mass_mode == "observe")
        return out

    def _sparse_step(self, q_len: int) -> bool:
        """Does a forward of ``q_len`` new tokens attend sparsely?"""
        return self.sparse is not None and not self.force_exact and (
            q_len < self.layout.block_tokens or self.sparse.sparse_prefill)

    @contextlib.contextmanager
    def exact(self):
        """Attend to every token inside this block, whatever the sparse settings."""
        prev, self.force_exact = self.force_exact, True
        try:
            yield self
        finally:
            self.force_exact = prev

    # -- token ids and keys -----------------------------------------------------------------------

    def _pre_forward(self, module, args, kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is not self:
            return None
        ids = kwargs.get("input_ids", args[0] if args else None)
        attn.set_active(self)
        if ids is None:
            self.ids_known = False
            return None
        ids = ids.tolist()
        self._grow_rows(len(ids))
        mask = kwargs.get("attention_mask")
        if self.lengths[0] == 0 and mask is not None and mask.dim() == 2:
            for row, m in zip(self.rows, mask.cpu()):
                row.pad = int((m == 0).long().cumprod(0).sum())
        if self._sparse_step(len(ids[0])) and self.approx_from is None:
            self.approx_from = self.lengths[0]  # KV from here on depends on the sparse selection
        for r, (row, new) in enumerate(zip(self.rows, ids)):
            row.extend(new, self.root(r), self.layout.block_tokens, self.chain_marks())
        self.share_chains()
        return None

    def share_chains(self) -> None:
        """Hand each row's full-block chains to its manager sequence (keys at seal time). A
        read-only cache keys no new block: never written, so never left to gc as orphans."""
        bt = self.layout.block_tokens
        for row in self.rows:
            if row.seq is not None:
                full = len(row.token_ids) // bt
                if self.readonly:
                    full = min(full, self.committed_blocks)
                row.seq.chains = row.chains[:full]

    def _post_forward(self, module, args, kwargs, output):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is not self:
            return None
        logits = getattr(output, "logits", None)
        if logits is not None:
            self.last_logits = logits[:, -1].detach().float().cpu()
        sealed = self.lengths[-1] // self.layout.block_tokens - self.committed_blocks
        if self.auto_commit_blocks and sealed >= self.auto_commit_blocks and self.names:
            self.commit()
        return None

    def root(self, r: int) -> bytes:
        """Row ``r``'s chain root: model fingerprint, layout, quantisation, left padding."""
        return root_hash(self.fingerprint, self.layout, self.codec.identity, self.rows[r].pad)

    # -- persistence (adapters.persist) --------------------------------------------------------

    def commit(self, token_ids: Sequence[int] | torch.Tensor | None = None) -> list[SessionRecord]:
        """Make the session(s) durable: flush sealed blocks, store the partial tail, write the record.

        ``token_ids`` (manual loops without the pre-hook): the ids whose KV the cache holds.
        """
        if self.readonly:
            raise ReadOnlyCacheError(f"session {self.names[0]!r} was resumed read-only (no writer lease): it "
                                     "cannot be committed; store.fork() it and resume the copy to write")
        return persist.commit(self, token_ids)

    @classmethod
    def resume(cls, store, model, session: str, *, policy: str = "exact", budget_tokens: int | None = None,
               hot: int | str | None = None, warm: int | str | None = None, readonly: bool = False,
               **kw) -> "TieredCache":
        """Restore a committed session without re-running its prefill.

        readonly: attend without taking the session's writer lease (e.g. while an open cache of
        this process writes it); such a cache never commits (``ReadOnlyCacheError``).
        positions (keyword): None takes the session's stored mode; another one is refused
        (``PositionsError``) unless ``override_positions=True``."""
        session = _stored_as(store, model, session)
        rec = persist.check_record(store, model, session)
        return cls(store, model, session, policy=policy, budget_tokens=budget_tokens, hot=hot, warm=warm,
                   codec=rec.codec, model_name=rec.model_name, tokenizer_name=rec.tokenizer_name, readonly=readonly,
                   _resume=rec, **kw)

    def _adopt(self, rec: SessionRecord) -> None:
        row = Row(rec.name)
        self.rows = [row]  # its sequence is closed with the cache if adopting fails
        row.seq = self._open_seq(rec.name, next(self.model.parameters()).device)
        self.lengths = [rec.length] * self.layout.num_layers
        self.committed_blocks = rec.length // self.layout.block_tokens
        self.created = rec.created
        if rec.last_logits is not None:
            self.last_logits = torch.from_numpy(rec.last_logits).unsqueeze(0)
        persist.adopt(self, rec, row)
        self.share_chains()

    def check_history(self, ids: Sequence[int] | torch.Tensor) -> None:
        """Raise TokenMismatchError unless ``ids`` (one row) extend the ids the cache holds."""
        row = torch.as_tensor(ids).reshape(-1).tolist()
        have = self.rows[0].token_ids if self.rows else []
        if row[:len(have)] != have:
            at = next(i for i, (a, b) in enumerate(zip(row, have)) if a != b) if len(row) >= len(have) else len(row)
            raise TokenMismatchError(f"the given token history does not extend the {len(have)} cached tokens "
                                     f"(first difference at position {at})")

    def full_ids(self, new_ids: Sequence[int] | torch.Tensor | None = None) -> torch.Tensor:
        """[1, n] the cached history (+ ``new_ids``): what ``generate`` must be given after a resume."""
        have = self.rows[0].token_ids if self.rows else []
        extra = torch.as_tensor(new_ids).reshape(-1).tolist() if new_ids is not None else []
        return torch.tensor([have + extra], dtype=torch.long)

    # -- lifecycle ------------------------------------------------------------------------------

    def close(self) -> None:
        """Commit (if configured and named), free the tiers, unhook the model, release leases."""
        if self._closed:
            return
        self._closed = True
        try:
            if self.commit_on_close and self.names and self.is_initialized and self.lengths[0] and self.ids_known:
                self.commit()
        finally:
            self._finalizer.detach()
            self._held.release()  # hooks, attention implementation, rows, leases

    def __enter__(self) -> "TieredCache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _stored_as(store, model, session: str) -> str:
    """The stored session a ``resume`` of ``session`` reads: a tensor-parallel rank its shard
    (sliced from the whole session when only that is stored); a whole model the session itself
    (gathered from its shards when only those are stored)."""
    shard = shard_meta(model)
    if shard is not None:
        name = shard_name(session, shard["rank"], shard["size"])
        if not store.exists(name) and store.exists(session):
            slice_shard(store, session, shard["rank"], shard["size"])
        return name
    if not store.exists(session) and shard_names(store, session):
        gather(store, session)
    return session

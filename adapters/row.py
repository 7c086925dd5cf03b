"""One batch row of a ``TieredCache``: its manager sequence and what it knows of its tokens.

transformers keeps per-layer state in per-layer objects under ``Cache.layers``; a TieredCache
keeps per-*row* state in ``Row`` objects the same way (name, sequence, token ids, left padding,
chain hashes, last sparse selections), so that reordering, forking or dropping rows (beam
search, ``num_return_sequences``) moves one object instead of syncing parallel lists.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tierstore.chain import chain_hashes
from tierstore.reader import SeqReader


class Row:
    """A batch row. ``seq`` is None until the first forward creates the row's sequence."""

    __slots__ = ("name", "seq", "token_ids", "pad", "chains", "selected", "head_masks", "attended", "_hashed")

    def __init__(self, name: str, seq=None, token_ids: Sequence[int] = (), pad: int = 0,
                 chains: Sequence[bytes] = ()) -> None:
        self.name = name
        self.seq = seq
        self.token_ids: list[int] = list(token_ids)    # ids whose KV is (being) stored
        self.pad = pad                                  # left padding tokens
        self.chains: list[bytes] = list(chains)         # chain hash of every full block of token_ids
        self.selected: dict[int, list[int]] = {}        # layer -> blocks the last sparse step attended
        self.head_masks: dict[int, torch.Tensor | None] = {}  # layer -> per-head mask of those
        self.attended: dict[int, int] = {}              # layer -> tokens a head attended at the last step
        self._hashed: tuple | None = None               # (root, block_tokens, marks) ``chains`` were made with

    def reader(self, mgr) -> SeqReader:
        return SeqReader(mgr, self.seq)

    def extend(self, ids: Sequence[int], root: bytes, block_tokens: int, marks: tuple = ()) -> None:
        """The ids of tokens whose KV this forward appends; the chains follow (the cache then
        hands them to the sequence: ``TieredCache.share_chains``)."""
        old = len(self.token_ids)
        self.token_ids.extend(ids)
        if self._hashed != (root, block_tokens, tuple(marks)) or len(self.chains) < old // block_tokens:
            self.rehash(root, block_tokens, marks)
            return
        # the same root and marks: the full blocks before the new tokens keep their chains (a decode
        # step hashes one block, not the whole context again)
        keep = old // block_tokens
        off = keep * block_tokens
        parent = self.chains[keep - 1] if keep else root
        self.chains[keep:] = chain_hashes(parent, self.token_ids[off:], block_tokens,
                                          marks=tuple((at - off, tag) for at, tag in marks))

    def rehash(self, root: bytes, block_tokens: int, marks: tuple = ()) -> None:
        """``marks``: ``chain.chain_marks`` of the cache (approximate or mapped KV past a position)."""
        self.chains = chain_hashes(root, self.token_ids, block_tokens, marks=marks)
        self._hashed = (root, block_tokens, tuple(marks))

    def truncate(self, length: int, block_tokens: int) -> None:
        self.token_ids = self.token_ids[:length]
        self.chains = self.chains[:length // block_tokens]

    def fork(self, seq) -> "Row":
        """A copy of this row over ``seq`` (a clone of its sequence)."""
        r = Row(self.name, seq, self.token_ids, self.pad, self.chains)
        r._hashed = self._hashed
        r.selected, r.head_masks, r.attended = dict(self.selected), dict(self.head_masks), dict(self.attended)
        return r

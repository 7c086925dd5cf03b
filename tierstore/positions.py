"""Position modes: which relative distances attention sees.

Keys are stored post-RoPE at their positions in the text. ``positions="model"`` attends with
those (bit-exact with ``DynamicCache``). ``positions="extend"`` keeps every distance a query
sees within the length the model was trained on, once the context grows past it: keys within a
``window`` of the query keep their true distance; keys further away are attended at a mapped
distance (``mapping``):

* ``far`` (InfLLM; the default, best on needles in ``tierstore bench quality``): every far key
  at the one distance ``W``;
* ``group`` (SelfExtend): distances past the window grouped by floor division, key at
  ``j // G``, query at ``p // G + W - W // G``;
* ``scale``: the same with a real factor (no floor), so the furthest key lands exactly at the
  trained length (position interpolation of the far keys only).

``G`` is the smallest factor that keeps every distance below the trained length (or a fixed
``group``). Each mapping moves a far key to a position that depends on the key alone and the
query to one that depends on the query alone, so a step re-rotates its far keys from the stored
ones (one complex multiply per pair of channels, in float32, from tables shared by the layers)
and its query once; the stored KV and the record format do not change. Below the trained length
nothing is mapped: ``extend`` is ``model``, bit for bit.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import torch

from .errors import TierstoreError

MODES = ("model", "extend")
MAPPINGS = ("group", "scale", "far")
# RoPE types whose frequencies do not depend on the sequence length (dynamic/longrope rescale
# them as the context grows: the stored keys were rotated with frequencies a later step no longer has)
STATIC_ROPE = ("default", "linear", "yarn", "llama3")
WINDOW_FRACTION = 4  # default neighbour window: trained length / this


class PositionsError(TierstoreError, ValueError):
    """A position mode that cannot apply: unknown mode or mapping, a model without RoPE or with a
    length-dependent RoPE, or a resume whose mode differs from the session's."""


@dataclass(frozen=True)
class Positions:
    """mode: ``model`` or ``extend``; mapping: ``far`` (default), ``group`` or ``scale``; window: distances
    below it are true (None: trained // 4); group: a fixed factor (None: the smallest that keeps
    distances below ``trained``); trained: the trained length (None: the model's
    ``max_position_embeddings``)."""

    mode: str = "model"
    mapping: str = "far"
    window: int | None = None
    group: int | float | None = None
    trained: int | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise PositionsError(f"positions mode {self.mode!r}: expected one of {MODES}")
        if self.mapping not in MAPPINGS:
            raise PositionsError(f"positions mapping {self.mapping!r}: expected one of {MAPPINGS}")
        if self.window is not None and self.window < 1:
            raise PositionsError(f"positions window must be >= 1, got {self.window}")
        if self.group is not None and self.group < 1:
            raise PositionsError(f"positions group must be >= 1, got {self.group}")

    @classmethod
    def parse(cls, spec: "str | Positions | dict | None") -> "Positions":
        if spec is None:
            return cls()
        if isinstance(spec, Positions):
            return spec
        if isinstance(spec, dict):
            return cls(**spec)
        if isinstance(spec, str):
            return cls(mode=spec)
        raise PositionsError(f"positions must be 'model', 'extend' or a Positions, got {spec!r}")

    @classmethod
    def for_session(cls, model, positions, override: bool, rec) -> "Positions":
        """The mode of a cache: ``positions`` as given (resolved against the model), else the
        resumed record's (``rec``, a ``SessionRecord`` or None); a resume asking for another mode
        than its record's is refused unless ``override``."""
        stored = cls.parse(rec.meta["positions"]) if rec is not None and "positions" in rec.meta else None
        if positions is None:
            return stored or cls()
        want = cls.parse(positions).resolved(model)
        if stored is not None and want != stored and not override:
            raise PositionsError(f"session {rec.name!r} was stored with positions {stored.to_json()}; resuming with "
                                 f"{want.to_json()} would attend its KV differently: resume without positions= "
                                 "(takes the stored mode) or pass override_positions=True")
        return want

    def resolved(self, model) -> "Positions":
        """This mode with ``trained`` and ``window`` filled in from ``model`` (checked: RoPE)."""
        if self.mode == "model":
            return Positions()
        cfg = model.config
        RoPE.from_model(model)  # refuses models without a static RoPE
        trained = self.trained or int(getattr(cfg, "max_position_embeddings", 0) or 0)
        if trained < 2:
            raise PositionsError(f"model {type(model).__name__}: no max_position_embeddings in its config; "
                                 "pass Positions(mode='extend', trained=N)")
        window = self.window or max(1, trained // WINDOW_FRACTION)
        if window >= trained:
            raise PositionsError(f"positions window {window} must be below the trained length {trained}")
        return replace(self, trained=trained, window=window)

    def to_json(self) -> dict:
        return asdict(self)


class RoPE:
    """A model's rotary embedding as tierstore needs it: the inverse frequencies of its channel
    pairs (channel ``i`` pairs with ``i + head_dim / 2``, transformers' ``rotate_half``)."""

    def __init__(self, inv_freq: torch.Tensor, rope_type: str) -> None:
        self.inv_freq = inv_freq.detach().to("cpu", torch.float64)
        self.rope_type = rope_type

    @classmethod
    def from_model(cls, model) -> "RoPE":
        emb = next((m for m in model.modules() if hasattr(m, "inv_freq") and hasattr(m, "rope_type")), None)
        name = type(model).__name__
        if emb is None:
            raise PositionsError(f"model {name} has no rotary position embedding (RoPE): "
                                 "positions='extend' re-rotates RoPE keys and cannot apply")
        rope_type = emb.rope_type if isinstance(emb.rope_type, str) else None
        if rope_type not in STATIC_ROPE:
            raise PositionsError(f"model {name}: RoPE type {emb.rope_type!r} is not supported by "
                                 f"positions='extend' (supported: {STATIC_ROPE})")
        # the frequencies the model was built with (a dynamic update would have changed inv_freq)
        inv = getattr(emb, "original_inv_freq", None)
        return cls(inv if inv is not None else emb.inv_freq, rope_type)

    def cos_sin(self, delta: torch.Tensor, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 [T, d/2] of the rotation by ``delta`` (float64 [T]) positions, angles in float64."""
        ang = delta.to(torch.float64).unsqueeze(-1) * self.inv_freq
        return ang.cos().to(device=device, dtype=torch.float32), ang.sin().to(device=device, dtype=torch.float32)

    @staticmethod
    def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [..., T, d] (any float dtype) rotated by per-row angles (cos/sin [T, d/2], or
        broadcastable to [..., T, d/2]); float32."""
        x = x.float()
        h = x.shape[-1] // 2
        x1, x2 = x[..., :h], x[..., h:]
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), -1)


class Extension:
    """``Positions(mode='extend')`` resolved against a model: builds each step's ``StepMap`` and
    keeps the far keys' rotation tables, shared by the layers and steps of one factor."""

    def __init__(self, positions: Positions, rope: RoPE) -> None:
        if positions.trained is None or positions.window is None:
            raise PositionsError("Extension needs resolved positions (Positions.resolved(model))")
        self.positions, self.rope = positions, rope
        self.trained, self.window, self.mapping = positions.trained, positions.window, positions.mapping
        self._table: tuple[object, torch.Tensor, torch.Tensor] | None = None  # (factor, cos, sin) by key position
        self._blocks: tuple[tuple, torch.Tensor, torch.Tensor] | None = None  # ((factor, offset, bt), cos, sin) by block
        self._query: tuple[tuple, torch.Tensor, torch.Tensor] | None = None  # the last query_table

    @classmethod
    def of(cls, positions: Positions, model) -> "Extension | None":
        return None if positions.mode == "model" else cls(positions.resolved(model), RoPE.from_model(model))

    def factor(self, p_last: int) -> int | float:
        """The grouping factor for queries up to rope position ``p_last`` (>= trained)."""
        L, W = self.trained, self.window
        if self.positions.group is not None:
            return self.positions.group
        if self.mapping == "scale":
            return max(1.0, (p_last - W) / (L - 1 - W))
        g = max(2, math.ceil((p_last - W) / (L - 1 - W)))
        while p_last // g + W - W // g > L - 1:  # floor division leaves slack: the smallest that fits
            g += 1
        while g > 2 and p_last // (g - 1) + W - W // (g - 1) <= L - 1:
            g -= 1
        return g

    def step(self, p_first: int, p_last: int, offset: int, device) -> "StepMap | None":
        """The map for queries at rope positions ``p_first..p_last`` (index = rope position +
        ``offset``, the row's left padding); None when no distance reaches the trained length."""
        if p_last < self.trained:
            return None
        return StepMap(self, self.factor(p_last), offset, device)

    def key_target(self, pos: torch.Tensor, g) -> torch.Tensor:
        """float64 positions the far keys at rope ``pos`` are attended at."""
        pos = pos.to(torch.float64)
        if self.mapping == "group":
            return torch.div(pos, g, rounding_mode="floor")
        if self.mapping == "scale":
            return pos / g
        return torch.zeros_like(pos)

    def query_target(self, pos: torch.Tensor, g) -> torch.Tensor:
        pos, W = pos.to(torch.float64), self.window
        if self.mapping == "group":
            return torch.div(pos, g, rounding_mode="floor") + (W - W // g)
        if self.mapping == "scale":
            return pos / g + (W - W / g)
        return torch.full_like(pos, float(W))

    def block_table(self, g, offset: int, bt: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin [>= n, d/2] undoing the far move of each ``bt``-token block's middle key (rows:
        blocks), for ``StepMap.block_query``; kept for every layer and later step of one factor."""
        t = self._blocks
        if t is None or t[0] != (g, offset, bt) or t[1].shape[0] < n:
            size = max(n, 2 * (t[1].shape[0] if t is not None and t[0] == (g, offset, bt) else 0), 64)
            pos = (torch.arange(size, dtype=torch.float64) * bt + bt // 2 - offset).clamp(min=0)
            cos, sin = self.rope.cos_sin(pos - self.key_target(pos, g))
            self._blocks = t = ((g, offset, bt), cos, sin)
        return t[1], t[2]

    def query_table(self, g, p0: int, q_len: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin [q_len, d/2] moving queries at rope positions ``p0..`` to their far positions;
        the last one is kept (a decode step's layers all ask for the same)."""
        key = (g, p0, q_len, str(device))
        t = self._query
        if t is None or t[0] != key:
            pos = torch.arange(p0, p0 + q_len, dtype=torch.float64)
            self._query = t = (key, *self.rope.cos_sin(self.query_target(pos, g) - pos, device))
        return t[1], t[2]

    def key_table(self, g, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin [>= n, d/2] rotating a key at rope position i to its far position."""
        t = self._table
        if t is None or t[0] != g or t[1].shape[0] < n:
            size = max(n, 2 * (t[1].shape[0] if t is not None and t[0] == g else 0), 1024)
            pos = torch.arange(size, dtype=torch.float64)
            cos, sin = self.rope.cos_sin(self.key_target(pos, g) - pos)
            self._table = t = (g, cos, sin)
        return t[1], t[2]


class StepMap:
    """One step's mapping (one factor for all its queries). Index space: a key or query at
    sequence index ``i`` sits at rope position ``i - offset``."""

    def __init__(self, ext: Extension, g, offset: int, device) -> None:
        self.ext, self.g, self.offset, self.device = ext, g, offset, device
        self.window = ext.window

    def keys(self, k: torch.Tensor, start: int) -> torch.Tensor:
        """k [..., T, d] of the keys at indices ``start .. start+T-1``, moved to their far
        positions (float32)."""
        T = k.shape[-2]
        lo = start - self.offset
        cos, sin = self.ext.key_table(self.g, max(1, lo + T))
        c, s = cos[max(lo, 0):lo + T], sin[max(lo, 0):lo + T]
        if lo < 0:  # left padding (negative rope positions): masked anyway, left unrotated
            c = torch.cat((torch.ones(min(T, -lo), c.shape[1]), c))
            s = torch.cat((torch.zeros(min(T, -lo), s.shape[1]), s))
        return RoPE.rotate(k, c.to(k.device), s.to(k.device))

    def keys_at(self, k: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """k [..., T, d] of keys at sequence indices ``idx`` ([T] or [..., T]) moved far."""
        pos = (idx - self.offset).clamp(min=0)
        cos, sin = self.ext.key_table(self.g, int(pos.max()) + 1 if pos.numel() else 1)
        c, s = cos.to(k.device)[pos], sin.to(k.device)[pos]
        return RoPE.rotate(k, c, s)

    def block_query(self, q: torch.Tensor, first: int, n: int, bt: int) -> "BlockQuery":
        """What a policy scores a decode step's ``n`` blocks of ``bt`` keys with: q [g, rows, d]
        (the grouped rows of the query at index ``first``) as each block sees it. For a block
        whose middle key is at least the window away (a far block) the query is moved to its far
        position and rotated back by the block's middle key's move, so that its product with a
        stored key of the block is the mapped one: exact for the block's middle key, off by a
        key's offset from it elsewhere (a phase the low frequencies, which carry long-range
        attention, barely see). The newest blocks (within the window) see the query as it is.
        Without this a policy would rank far blocks at their true distances, past the trained
        length."""
        n_far = max(0, min(n, (first - self.window - bt // 2) // bt + 1))  # middle key >= window away
        g, rows, d = q.shape
        qm = self.queries(q.reshape(g * rows, 1, d), first).reshape(g, rows, d)
        cos, sin = self.ext.block_table(self.g, self.offset, bt, n_far)
        return BlockQuery(q.float(), qm, cos[:n_far].to(q.device), sin[:n_far].to(q.device), n)

    def queries(self, q: torch.Tensor, first: int) -> torch.Tensor:
        """q [heads, q_len, d] at indices ``first..`` moved to the query's far position (float32)."""
        cos, sin = self.ext.query_table(self.g, first - self.offset, q.shape[-2], q.device)
        return RoPE.rotate(q, cos, sin)


class BlockQuery:
    """A decode step's query as each block of a layer sees it under extended positions
    (``StepMap.block_query``): blocks ``[0, n_far)`` see ``far`` (the query moved to its far
    position) rotated by their own ``cos``/``sin`` [n_far, d/2]; blocks ``[n_far, n)`` see
    ``near`` (the query as it is). Both [g, rows, d] float32.

    ``per_block()`` is the explicit form, one query per block [g, rows, n, d], for any policy;
    the sketch scorer instead works from the pieces (``far_means``, ``far_projection``), which
    costs about what scoring with one shared query costs and never builds that tensor."""

    __slots__ = ("near", "far", "cos", "sin", "n")

    def __init__(self, near: torch.Tensor, far: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n: int) -> None:
        self.near, self.far, self.cos, self.sin, self.n = near, far, cos, sin, n

    @property
    def n_far(self) -> int:
        return int(self.cos.shape[0])

    def to(self, device) -> "BlockQuery":
        return BlockQuery(*(t.to(device) for t in (self.near, self.far, self.cos, self.sin)), self.n)

    def per_block(self) -> torch.Tensor:
        """float32 [g, rows, n, d]: each block's query."""
        g, rows, d = self.near.shape
        far = RoPE.rotate(self.far.unsqueeze(2), self.cos, self.sin)                       # [g, rows, n_far, d]
        return torch.cat((far, self.near.unsqueeze(2).expand(g, rows, self.n - self.n_far, d)), 2)

    def far_means(self, kmean: torch.Tensor) -> torch.Tensor:
        """The far blocks' query products with their key means ``kmean`` [n_far, g, d] -> [g, rows,
        n_far]: the query rotated by a block's angle against its mean equals the query against the
        mean rotated back, one shared query for all blocks."""
        back = RoPE.rotate(kmean, self.cos.unsqueeze(1), -self.sin.unsqueeze(1))            # [n_far, g, d]
        return torch.bmm(self.far, back.permute(1, 2, 0))

    def far_projection(self, basis: torch.Tensor) -> torch.Tensor:
        """Each far block's rotated query projected on ``basis`` [g, d, r] -> [g, n_far, rows, r].
        With q' = q cos + rot(q) sin per pair of channels, q'·b = cos·(q1 b1 + q2 b2) + sin·(q1 b2 -
        q2 b1): one matrix product of the blocks' [cos | sin] with the query's pair products."""
        g, rows, d = self.far.shape
        h, r = d // 2, basis.shape[-1]
        q1, q2 = self.far[..., :h, None], self.far[..., h:, None]                           # [g, rows, h, 1]
        b1, b2 = basis[:, None, :h].float(), basis[:, None, h:].float()                     # [g, 1, h, r]
        pairs = torch.cat((q1 * b1 + q2 * b2, q1 * b2 - q2 * b1), 2)                        # [g, rows, 2h, r]
        out = torch.cat((self.cos, self.sin), 1) @ pairs.permute(2, 0, 1, 3).reshape(d, g * rows * r)
        return out.view(-1, g, rows, r).permute(1, 0, 2, 3)

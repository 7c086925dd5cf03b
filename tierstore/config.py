"""Store configuration. The one place that reads ``TIERSTORE_*`` environment variables."""

from __future__ import annotations

import os
from dataclasses import dataclass

from .codec import CodecConfig
from .errors import BudgetError
from .layout import parse_size

DEFAULT_BLOCK_TOKENS = 64
DEFAULT_HOT = 1 << 30
DEFAULT_WARM = 4 << 30
# raw is the default cold codec: on a local SSD resume is bound by memory traffic, and raw
# decodes straight into preallocated slots (notes/baseline.md: ~0.04 s vs ~0.1-0.4 s for zstd
# at 8k tokens). Pick "zstd" when storage is slower than ~0.5 GB/s or space matters.
DEFAULT_CODEC = "raw"
DEFAULT_SKETCH_DIMS = 16  # tierstore.sketch: 16 dims per token and KV head rank blocks token by token


@dataclass(frozen=True)
class StoreConfig:
    path: str
    hot_bytes: int
    warm_bytes: int
    cold_bytes: int | None
    codec: CodecConfig
    block_tokens: int
    readonly: bool
    sketch_dims: int = DEFAULT_SKETCH_DIMS  # key sketch dimensions per token (0: no sketches)
    remote: object = None                  # remote tier URL(s) or a RemoteTier (None: LMDB only)
    host: str | None = None                # this host's name on the remote tier

    @classmethod
    def build(cls, path: str | os.PathLike, *, hot: int | str | None = None, warm: int | str | None = None,
              cold: int | str | None = None, codec: str | CodecConfig | None = None,
              block_tokens: int | None = None, readonly: bool = False,
              sketch_dims: int | None = None, remote=None, host: str | None = None) -> "StoreConfig":
        env = os.environ
        hot_b = parse_size(hot if hot is not None else env.get("TIERSTORE_HOT", DEFAULT_HOT), what="hot")
        warm_b = parse_size(warm if warm is not None else env.get("TIERSTORE_WARM", DEFAULT_WARM), what="warm")
        cold_b = parse_size(cold if cold is not None else env.get("TIERSTORE_COLD"), what="cold")
        bt = int(block_tokens if block_tokens is not None else env.get("TIERSTORE_BLOCK_TOKENS", DEFAULT_BLOCK_TOKENS))
        if bt <= 0 or bt > 65536:
            raise BudgetError(f"block_tokens must be in 1..65536, got {bt}")
        cfg = CodecConfig.parse(codec if codec is not None else env.get("TIERSTORE_CODEC", DEFAULT_CODEC))
        dims = int(sketch_dims if sketch_dims is not None else env.get("TIERSTORE_SKETCH_DIMS", DEFAULT_SKETCH_DIMS))
        if dims < 0:
            raise ValueError(f"sketch_dims must be >= 0, got {dims}")
        return cls(path=os.fspath(path), hot_bytes=hot_b or 0, warm_bytes=warm_b or 0, cold_bytes=cold_b,
                   codec=cfg, block_tokens=bt, readonly=readonly, sketch_dims=dims,
                   remote=remote if remote is not None else (env.get("TIERSTORE_REMOTE") or None),
                   host=host or env.get("TIERSTORE_HOST_ID") or None)


def default_store_path() -> str:
    """``TIERSTORE_HOME``, else the user cache dir."""
    home = os.environ.get("TIERSTORE_HOME")
    if home:
        return home
    import platformdirs
    return os.path.join(platformdirs.user_cache_dir("tierstore"), "store")


def log_level() -> str:
    return os.environ.get("TIERSTORE_LOG_LEVEL", "WARNING").upper()

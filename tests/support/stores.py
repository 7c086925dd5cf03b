"""Small helpers over a store's cold tier and its files."""

from __future__ import annotations

import hashlib
import os


def file_digest(path) -> str:
    """sha256 of a store's ``data.mdb`` (``path`` is the store folder)."""
    with open(os.path.join(path, "data.mdb"), "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()




def key_of(tag: str, index: int, layer: int) -> bytes:
    """The cold key of block ``index`` of ``layer`` in a made-up chain named ``tag``."""
    from tierstore.tiers.cold import block_key

    return block_key(hashlib.blake2b(f"{tag}/{index}".encode(), digest_size=16).digest(), layer)

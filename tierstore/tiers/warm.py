"""Warm tier: host memory. Pinned when CUDA is present (async H2D/D2H), pageable otherwise."""

from __future__ import annotations

import torch

from ..layout import KVLayout
from .pool import SlotPool

_PIN_OK: bool | None = None


def pinning_available() -> bool:
    """Probed once per process: pinning raises on a CPU-only torch build."""
    global _PIN_OK
    if _PIN_OK is None:
        try:
            _PIN_OK = torch.cuda.is_available() and torch.empty(1, pin_memory=True).is_pinned()
        except RuntimeError:
            _PIN_OK = False
    return _PIN_OK


class WarmPool(SlotPool):
    """pin: page-locked (committed at once; async copies to and from a CUDA hot pool); default:
    wherever pinning is available."""

    def __init__(self, layout: KVLayout, slots: int, *, pin: bool | None = None) -> None:
        super().__init__(layout, slots, "cpu", pin=pinning_available() if pin is None else pin, name="warm")

"""Hot tier: the model's device. A slot pool plus, on CUDA, the side stream for copies in."""

from __future__ import annotations

import torch

from ..layout import KVLayout
from .pool import SlotPool


class HotPool(SlotPool):
    """Block slots on the model's device (RAM on a CPU-only machine).

    On CUDA, copies into the pool run on ``copy_stream`` and are fenced with events that the
    compute stream waits on; capability is probed once here, never on the hot path.
    """

    def __init__(self, layout: KVLayout, slots: int, device: torch.device | str) -> None:
        super().__init__(layout, slots, device, pin=False, name="hot")
        self.scratch_bytes = 0  # hot budget reserved for attention temporaries (set by the manager)
        self.is_cuda = self.device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(device=self.device) if self.is_cuda else None

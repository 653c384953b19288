"""Mixed precision: which autocast dtype to use and whether to scale the loss.

Parameters and optimizer state always stay fp32; only the forward/backward math runs in the
low-precision dtype. fp16's narrow exponent range needs dynamic loss scaling; bf16 does not.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Precision:
    """``name`` is fp32, bf16 or fp16; the scaler settings apply to fp16 only."""

    name: str = "fp32"
    init_scale: float = 2.0**16
    growth_interval: int = 2000
    dtype: torch.dtype = field(init=False)  # the autocast dtype the name stands for

    def __post_init__(self) -> None:
        if self.name not in _DTYPES:
            raise ValueError(f"precision.name={self.name!r} is not one of {sorted(_DTYPES)}")
        self.dtype = _DTYPES[self.name]

    def autocast(self, device: torch.device):
        """Context manager running the forward pass in the low-precision dtype (no-op for fp32)."""
        if self.name == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.dtype)

    def make_scaler(self, device: torch.device) -> torch.amp.GradScaler:
        """A GradScaler that is enabled only for fp16 (disabled, it passes calls through)."""
        return torch.amp.GradScaler(
            device.type,
            init_scale=self.init_scale,
            growth_interval=self.growth_interval,
            enabled=self.name == "fp16",
        )

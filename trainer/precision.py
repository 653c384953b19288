"""Mixed precision: which autocast dtype to use and whether to scale the loss.

Parameters and optimizer state always stay fp32; only the forward/backward math runs in the
low-precision dtype. fp16's narrow exponent range needs dynamic loss scaling; bf16 does not.

``configure_math`` sets the process-wide numerics a run chose explicitly (``tf32``,
``deterministic`` in configs/train.yaml), before any CUDA work.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Precision:
    """``name`` is fp32, bf16 or fp16; the scaler settings apply to fp16 only."""

    name: str = "fp32"
    init_scale: float = 2.0**16
    growth_interval: int = 2000

    def __post_init__(self) -> None:
        if self.name not in _DTYPES:
            raise ValueError(f"precision.name={self.name!r} is not one of {sorted(_DTYPES)}")

    @property
    def dtype(self) -> torch.dtype:
        return _DTYPES[self.name]

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


def configure_math(tf32: bool, deterministic: bool) -> None:
    """Set fp32 matmul precision and determinism for this process, both ways (never left as found).

    ``tf32``: on CUDA, fp32 matmuls and convolutions (cuBLAS, cuDNN, and the flash kernel's fp32
    path) may round their inputs to TF32 (10-bit mantissa) on tensor cores; off, they are full
    IEEE fp32. No effect on CPU or on bf16/fp16 matmuls.
    ``deterministic``: ``torch.use_deterministic_algorithms(True)`` (an op with no deterministic
    implementation raises, naming itself), cuBLAS's fixed workspace, cuDNN without benchmark
    mode, and flash kernels launched with pinned configs instead of autotuned ones.
    """
    mode = "tf32" if tf32 else "ieee"
    torch.backends.cuda.matmul.fp32_precision = mode
    torch.backends.cudnn.conv.fp32_precision = mode
    if deterministic:
        # cuBLAS reads this when it creates its handle, i.e. at the first CUDA matmul
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(deterministic)

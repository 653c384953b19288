"""Attention implementations sharing one interface: ``fn(q, k, v, causal=True, scale=None) -> out``.

Tensors are ``(B, H, T, D)``. Importing this package never imports Triton: the flash kernel's
Triton code is loaded on its first call.
"""
from kernels.naive import naive_attention
from kernels.sdpa import sdpa_attention

__all__ = ["naive_attention", "sdpa_attention", "online_attention", "online_softmax", "flash_attention"]

_LAZY = {
    "online_attention": "kernels.online",
    "online_softmax": "kernels.online",
    "flash_attention": "kernels.flash",
}


def __getattr__(name: str):
    # Lazy so that a half-installed environment can still use naive/sdpa, and so that the flash
    # wrapper module (which itself defers Triton) is only loaded when asked for.
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'kernels' has no attribute {name!r}")

"""Attention implementations sharing one interface: ``fn(q, k, v, causal=True, scale=None) -> out``.

Tensors are ``(B, H, T, D)``; with ``causal=True`` the mask is aligned to the end of the keys, so a
query block after a KV cache sees the whole cache. ``ATTENTION`` maps each implementation's name
(the same as its ``configs/attn/<name>.yaml``) to its function: CLIs, benchmarks and tests take
their option lists from it. Importing this package never imports Triton: the flash kernel's
Triton code is loaded on its first call.
"""
from kernels.flash import flash_attention
from kernels.naive import naive_attention
from kernels.online import online_attention, online_softmax
from kernels.sdpa import sdpa_attention

ATTENTION = {
    "naive": naive_attention,
    "online": online_attention,
    "sdpa": sdpa_attention,
    "flash": flash_attention,
}

__all__ = ["ATTENTION", "naive_attention", "online_attention", "online_softmax", "flash_attention", "sdpa_attention"]

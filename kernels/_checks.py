"""Input validation shared by every attention implementation.

All implementations take ``(B, H, T, D)`` tensors; a user who passes something else gets a
``ValueError`` that says what is wrong, never an ``AssertionError`` from deep inside a kernel.
"""
from __future__ import annotations

import math

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_qkv(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True, name: str = "attention"
) -> None:
    """Raise ValueError unless q, k, v are same-device, same-dtype (B, H, T, D) floating tensors.

    Keys and values may have a different length than queries. With ``causal=True`` the mask is
    aligned to the end of the keys (FlashAttention's convention): query ``i`` sees keys
    ``j <= i + (Tk - Tq)``, so a query block appended after a KV cache sees the whole cache.
    """
    for label, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name}: {label} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(
                f"{name}: {label} must have shape (B, H, T, D), got {t.dim()} dims {tuple(t.shape)}"
            )
        if t.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{name}: {label} has dtype {t.dtype}; use float32, float16, bfloat16 or float64")
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise ValueError(f"{name}: q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype}); cast them to one dtype")
    if q.device != k.device or q.device != v.device:
        raise ValueError(f"{name}: q, k, v are on different devices ({q.device}, {k.device}, {v.device})")
    if k.shape != v.shape:
        raise ValueError(f"{name}: k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape")
    if q.shape[0] != k.shape[0] or q.shape[1] != k.shape[1] or q.shape[3] != k.shape[3]:
        raise ValueError(
            f"{name}: q {tuple(q.shape)} and k {tuple(k.shape)} must agree on B, H and D"
        )


def causal_mask(tq: int, tk: int, device=None) -> torch.Tensor:
    """(Tq, Tk) boolean mask, True where query i may attend key j: ``j <= i + (Tk - Tq)``.

    End-aligned, as in FlashAttention: with a KV cache the new queries see every cached key. A
    query row with no visible key (only when Tq > Tk) outputs zeros.
    """
    i = torch.arange(tq, device=device)[:, None]
    return torch.arange(tk, device=device)[None, :] <= i + (tk - tq)


def resolve_scale(scale: float | None, head_dim: int) -> float:
    """Default softmax scale 1/sqrt(D), as in 'Attention is all you need'."""
    return 1.0 / math.sqrt(head_dim) if scale is None else float(scale)

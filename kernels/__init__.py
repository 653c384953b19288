"""Attention implementations sharing one interface:
``fn(q, k, v, causal=True, scale=None, window=None) -> out``.

Tensors are ``(B, H, T, D)``; keys and values may be longer than queries (a KV cache), and with
``causal=True`` the mask is aligned to the end of the keys: query ``i`` of ``Tq`` sees keys
``j <= i + (Tk - Tq)``. A sliding ``window`` (causal only) keeps the last ``window`` of those:
``i + (Tk - Tq) - window < j``. This module holds what every implementation shares (input checks, the
mask, the default scale, the errors they raise); each implementation is one file
(``naive.py``, ``online.py``, ``sdpa.py``, ``flash.py``), named by a ``configs/attn/<name>.yaml``.
Implementations are imported on first use, so importing this package never imports Triton.
"""
from __future__ import annotations

import importlib
import math

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

# the built-in implementations (and online softmax on its own), each imported when first asked for;
# ``ATTENTION`` maps each implementation's name (its file, its ``configs/attn/<name>.yaml``) to it
_LAZY = {
    "naive_attention": "kernels.naive",
    "online_attention": "kernels.online",
    "online_softmax": "kernels.online",
    "sdpa_attention": "kernels.sdpa",
    "flash_attention": "kernels.flash",
}


class UnavailableError(RuntimeError):
    """An implementation that cannot run here (the Triton kernel on a CPU without the interpreter,
    a GPU too old); the message says what to use instead. Never answered by a silent fallback."""


class UnsupportedError(ValueError):
    """An input or option an implementation does not support (a head dim, a dtype); the message
    names it and the remedy."""


def __getattr__(name: str):
    if name == "ATTENTION":  # name -> function, for the kernels' own tests and benchmarks
        return {fn.removesuffix("_attention"): getattr(importlib.import_module(m), fn)
                for fn, m in _LAZY.items() if fn.endswith("_attention")}
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'kernels' has no attribute {name!r}")


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, name: str = "attention",
              causal: bool = True, window: int | None = None) -> None:
    """Raise ValueError unless q, k, v are same-device, same-dtype (B, H, T, D) floating tensors,
    k and v of one shape, and q agreeing with them on B, H and D (keys may outnumber queries);
    and unless the ``window``, if one is given, is one :func:`check_window` accepts."""
    for label, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name}: {label} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name}: {label} must have shape (B, H, T, D), got {t.dim()} dims {tuple(t.shape)}")
        if t.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{name}: {label} has dtype {t.dtype}; use float32, float16, bfloat16 or float64")
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise ValueError(f"{name}: q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype}); cast them to one dtype")
    if q.device != k.device or q.device != v.device:
        raise ValueError(f"{name}: q, k, v are on different devices ({q.device}, {k.device}, {v.device})")
    if k.shape != v.shape:
        raise ValueError(f"{name}: k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape")
    if q.shape[0] != k.shape[0] or q.shape[1] != k.shape[1] or q.shape[3] != k.shape[3]:
        raise ValueError(f"{name}: q {tuple(q.shape)} and k {tuple(k.shape)} must agree on B, H and D")
    if window is not None:
        check_window(window, causal, name)


def check_window(window: int | None, causal: bool, name: str = "attention") -> None:
    """Raise ValueError unless ``window`` is None or a positive int (the keys a query sees: its
    own and the ``window - 1`` before it) used with ``causal=True``."""
    if window is None:
        return
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"{name}: window must be a positive integer (keys a query sees) or None, got {window!r}")
    if not causal:
        raise ValueError(f"{name}: window={window} is a causal sliding window; it needs causal=True")


def causal_mask(tq: int, tk: int, device=None, window: int | None = None) -> torch.Tensor:
    """(Tq, Tk) boolean mask, True where query i may attend key j: ``j <= i + (Tk - Tq)``, and with a
    ``window`` also ``j > i + (Tk - Tq) - window`` (the query's own key and the ``window - 1`` before it).

    End-aligned, as in FlashAttention: with a KV cache the new queries see every cached key (within
    the window). A query row with no visible key (only when Tq > Tk) outputs zeros.
    """
    pos = torch.arange(tq, device=device)[:, None] + (tk - tq)  # each query's position among the keys
    j = torch.arange(tk, device=device)[None, :]
    mask = j <= pos
    return mask if window is None else mask & (j > pos - window)


def resolve_scale(scale: float | None, head_dim: int) -> float:
    """Default softmax scale 1/sqrt(D), as in 'Attention is all you need'."""
    return 1.0 / math.sqrt(head_dim) if scale is None else float(scale)


def tf32_enabled() -> bool:
    """Whether fp32 matmuls may use TF32 (torch's setting, new or legacy API): flash's fp32 path
    and the MFU peak both follow it."""
    mode = torch.backends.cuda.matmul.fp32_precision
    if mode == "none":
        mode = torch.backends.fp32_precision
    return mode == "tf32"

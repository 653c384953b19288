"""Textbook attention: materialize the (T, T) score matrix, softmax it, multiply by V.

This is the baseline every other implementation is compared against; its memory grows as T^2.
"""
from __future__ import annotations

import torch

from kernels import causal_mask, check_qkv, resolve_scale


def naive_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True, scale: float | None = None,
    window: int | None = None,
) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v on (B, H, T, D) tensors, computed in the input dtype.

    ``window``: sliding-window causal attention by the mask alone (the full T x T scores are still
    computed; the blockwise kernels skip the tiles outside the window instead)."""
    check_qkv(q, k, v, "naive_attention", causal, window)
    scale = resolve_scale(scale, q.shape[-1])
    att = (q @ k.transpose(-2, -1)) * scale  # (B, H, Tq, Tk)
    if causal:  # end-aligned: query i sees keys j <= i + (Tk - Tq) (and > i + (Tk - Tq) - window)
        mask = causal_mask(q.shape[-2], k.shape[-2], q.device, window)
        att = att.masked_fill(~mask, float("-inf"))
        if q.shape[-2] > k.shape[-2]:  # rows that see no key output 0 (softmax of all -inf is nan)
            empty = ~mask.any(-1, keepdim=True)  # (Tq, 1)
            return (torch.softmax(att.masked_fill(empty, 0.0), dim=-1) @ v).masked_fill(empty, 0.0)
    att = torch.softmax(att, dim=-1)
    return att @ v  # (B, H, Tq, D)

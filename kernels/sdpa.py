"""PyTorch's fused scaled_dot_product_attention: the reference implementation."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels import causal_mask, check_qkv


def sdpa_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True, scale: float | None = None,
    window: int | None = None,
) -> torch.Tensor:
    """torch.nn.functional.scaled_dot_product_attention with our interface (a ``window`` is a mask)."""
    check_qkv(q, k, v, "sdpa_attention", causal, window)
    tq, tk = q.shape[-2], k.shape[-2]
    if causal and (tq != tk or window is not None):  # SDPA's is_causal aligns to the top-left; ours to the end
        return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_mask(tq, tk, q.device, window), scale=scale)
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)

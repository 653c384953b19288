"""The one float64 attention reference every attention test compares against.

``softmax(q k^T * scale + mask) v`` computed in float64. The causal mask is aligned to the END of
the keys, as in FlashAttention's interface: query ``i`` of ``Tq`` sees keys ``j <= i + (Tk - Tq)``.
With ``Tq == Tk`` that is the usual lower-triangular mask; with a KV cache (``Tq < Tk``) the new
queries see the whole cache. A query row that sees no key at all (only possible when ``Tq > Tk``)
outputs zeros and has ``lse = -inf``, as FlashAttention does. A sliding ``window`` keeps, of the
keys a query sees, the last ``window``: ``i + (Tk - Tq) - window < j``.
"""
from __future__ import annotations

import torch


def causal_mask(tq: int, tk: int, device=None, window: int | None = None) -> torch.Tensor:
    """(Tq, Tk) boolean mask, True where query i may attend key j (end-aligned, within the window)."""
    mask = torch.zeros(tq, tk, dtype=torch.bool, device=device)
    for i in range(tq):  # one row at a time, as the definition reads
        pos = i + (tk - tq)  # the query's position among the keys
        lo = 0 if window is None else max(0, pos - window + 1)
        if pos >= 0:
            mask[i, lo:pos + 1] = True
    return mask


def attention_f64(q, k, v, causal: bool = True, scale: float | None = None, return_lse: bool = False,
                  window: int | None = None):
    """Reference attention on (B, H, T, D) tensors, in float64 (differentiable)."""
    q, k, v = q.double(), k.double(), v.double()
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = (q @ k.transpose(-2, -1)) * scale  # (B, H, Tq, Tk)
    if causal:
        s = s.masked_fill(~causal_mask(q.shape[-2], k.shape[-2], q.device, window), float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # (B, H, Tq); -inf on rows with no key
    p = torch.exp(s - lse.unsqueeze(-1).clamp_min(torch.finfo(torch.float64).min))
    p = torch.nan_to_num(p, nan=0.0)  # rows with no key: exp(-inf - (-inf)) -> 0
    out = p @ v
    return (out, lse) if return_lse else out

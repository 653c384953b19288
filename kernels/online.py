"""Online softmax, and FlashAttention's blockwise attention built on it, in plain PyTorch.

Online softmax (Milakov & Gimelshein, 2018) computes a row's maximum ``m`` and normalizer
``l = sum_j exp(x_j - m)`` in one sweep over blocks: when a block raises the maximum, the sum so
far is rescaled by ``exp(m_old - m_new)``. Every ``exp`` sees a non-positive argument, so nothing
overflows even in fp16/bf16. ``online_softmax`` on its own still reads the input twice (a sweep
for ``m`` and ``l``, then a second one to normalize); fused into attention the normalization
moves to the end, because ``softmax(S) V = (exp(S - m) V) / l``: the running output ``acc`` is
rescaled together with ``l``, and each key/value block is read once. The names follow
FlashAttention-2 (Dao, 2023, Algorithms 1 and 2): ``m``, ``l``, ``acc`` (its O~), ``lse`` (its L).
``docs/online_softmax.md`` walks the recurrence on a real example.

The forward never builds the T x T score matrix, only ``block x block`` tiles, and in causal mode
skips key blocks that lie entirely above the diagonal (half the work); with a sliding ``window`` it
also skips the key blocks entirely before every query's window, so its cost grows with the window,
not with T. The backward saves only
q, k, v, out and the per-row ``lse``, and recomputes each tile's probabilities from them, so the
memory kept for backward is O(T * D). Loops are in Python over blocks; every tile op is batched
over (B, H).
"""
from __future__ import annotations

from collections.abc import Iterator

import torch

from kernels import check_qkv, resolve_scale

__all__ = ["online_attention", "online_softmax", "DEFAULT_BLOCK_SIZE"]

DEFAULT_SOFTMAX_BLOCK = 1024

# Measured on a 2-core CPU (B=1, H=8, D=64, fp32, causal, fwd+bwd time relative to naive at T=1024):
# block 64: 0.52x, 128: 0.39x, 256: 0.42x, 512: 0.55x. Smaller blocks pay Python and dispatch
# overhead per tile; larger ones skip less of the causal triangle and spill out of cache.
DEFAULT_BLOCK_SIZE = 128

NEG_INF = float("-inf")


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    # fp16/bf16/fp32 accumulate in fp32; fp64 stays fp64 so gradcheck can test the backward.
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------------
# Online softmax on its own


def online_softmax(x: torch.Tensor, dim: int = -1, block_size: int = DEFAULT_SOFTMAX_BLOCK) -> torch.Tensor:
    """Softmax of ``x`` along ``dim`` with the online (running max, running sum) recurrence.

    Two reads of ``x``: one sweep over blocks of ``block_size`` (the last may be partial) finds
    the maximum ``m`` and the normalizer ``l`` together, then ``exp(x - m) / l`` normalizes. (A
    plain stable softmax needs three: max, sum, normalize.) All other dims are processed at once;
    statistics are kept in float32 and the result has the input dtype.

    ``-inf`` entries get probability 0. A row whose entries are all ``-inf`` (fully masked) returns
    **zeros**, whereas ``torch.softmax`` returns NaN for such a row: a fully masked query attends
    to nothing instead of poisoning the rest of the computation.
    """
    if not x.is_floating_point():
        raise ValueError(f"online_softmax: x must be a floating tensor, got {x.dtype}")
    if block_size < 1:
        raise ValueError(f"online_softmax: block_size must be >= 1, got {block_size}")
    xt = x.movedim(dim, -1).to(_acc_dtype(x.dtype))  # (..., N)
    m = torch.full(xt.shape[:-1], NEG_INF, dtype=xt.dtype, device=x.device)  # running max
    l = torch.zeros_like(m)  # running normalizer: sum of exp(x - m) over the blocks seen so far
    for start in range(0, xt.shape[-1], block_size):  # read 1: m and l
        x_j = xt[..., start : start + block_size]
        m_new = torch.maximum(m, x_j.amax(dim=-1))  # m' = max(m, max(x_j))
        m_ref = _finite(m_new)  # a row with only -inf so far: subtract 0, not -inf (no -inf - -inf)
        alpha = torch.exp(m - m_ref)  # <= 1: moves the sum so far from the old max to the new one
        l = alpha * l + torch.exp(x_j - m_ref[..., None]).sum(dim=-1)  # l' = alpha l + sum exp(x - m')
        m = m_new
    inv_l = torch.where(l > 0, 1.0 / l, 0.0)  # l == 0 only for fully masked rows: zeros, not 0/0
    p = torch.exp(xt - _finite(m)[..., None]) * inv_l[..., None]  # read 2: normalize
    return p.to(x.dtype).movedim(-1, dim)


def _finite(m: torch.Tensor) -> torch.Tensor:
    """``m`` with -inf (nothing but -inf seen yet) replaced by 0."""
    return torch.where(m == NEG_INF, 0.0, m)


# ---------------------------------------------------------------------------------------------
# Which tiles a query block visits. Causal masks are end-aligned (FlashAttention's convention):
# query i of Tq sees keys j <= i + (Tk - Tq), so with a KV cache (Tq < Tk) new queries see the whole
# cache, and when Tq > Tk the first Tq - Tk queries see no key at all.


def _query_blocks(tq: int, tk: int, causal: bool, block: int) -> Iterator[tuple[int, int]]:
    """(start, end) of the query blocks, from the first query row that sees any key.

    Rows before it are never visited: they keep out = 0 and lse = -inf (their softmax is empty).
    """
    first = max(0, tq - tk) if causal else (0 if tk else tq)
    for qs in range(first, tq, block):
        yield qs, min(qs + block, tq)


def _key_blocks(qs: int, qe: int, tq: int, tk: int, causal: bool, block: int,
                window: int | None = None) -> Iterator[tuple[int, int, bool]]:
    """(start, end, needs_mask) of the key blocks that query rows [qs, qe) attend to."""
    offset = tk - tq  # query i sees keys j <= i + offset (causal), and j > i + offset - window
    k_end = min(tk, qe + offset) if causal else tk  # keys past the last row's diagonal: skipped
    # keys before the first row's window: skipped (whole blocks, so tiles stay block-aligned)
    k_start = 0 if window is None else max(0, qs + offset - window + 1) // block * block
    for ks in range(k_start, k_end, block):
        ke = min(ks + block, k_end)
        above = causal and ke - 1 > qs + offset  # some key of the tile is above the diagonal
        before = window is not None and ks <= qe - 1 + offset - window  # ... or before some row's window
        yield ks, ke, above or before


def _mask_tile(s: torch.Tensor, qs: int, ks: int, offset: int, window: int | None = None) -> torch.Tensor:
    """In place: -inf in the tile at query rows qs.., key cols ks.. where key j > query i + offset
    (or, with a window, j <= i + offset - window)."""
    i = torch.arange(qs, qs + s.shape[-2], device=s.device)[:, None]
    j = torch.arange(ks, ks + s.shape[-1], device=s.device)
    hidden = j > i + offset
    if window is not None:
        hidden |= j <= i + offset - window
    return s.masked_fill_(hidden, NEG_INF)


# ---------------------------------------------------------------------------------------------
# Forward and backward: FlashAttention-2's Algorithms 1 and 2, one (B, H)-batched tile at a time.
# Comments give the paper's equations; S, P and dS are (bq, bk) tiles, the rest per query row.
# The running state (m, l, acc) is updated out of place, as the equations read. The tile steps
# S -> P and dP -> dS run in place in the tile's buffer: on a CPU a fresh bq x bk temporary per
# step costs about 5% of the whole forward (measured).


def _forward(q, k, v, causal: bool, scale: float, block: int, window: int | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """out (B, H, Tq, D) and lse (B, H, Tq), both in the accumulation dtype."""
    ad = _acc_dtype(q.dtype)
    q, k, v = q.to(ad), k.to(ad), v.to(ad)
    B, H, tq, D = q.shape
    tk = k.shape[2]
    out = torch.zeros(B, H, tq, D, dtype=ad, device=q.device)  # rows that see no key stay 0 ...
    lse = torch.full((B, H, tq), NEG_INF, dtype=ad, device=q.device)  # ... with lse = -inf
    for qs, qe in _query_blocks(tq, tk, causal, block):
        q_i = q[:, :, qs:qe] * scale  # (B, H, bq, D)
        m = torch.full((B, H, qe - qs), NEG_INF, dtype=ad, device=q.device)  # running row max
        l = torch.zeros_like(m)  # running row sum of exp(S - m)
        acc = torch.zeros(B, H, qe - qs, D, dtype=ad, device=q.device)  # running exp(S - m) @ V
        for ks, ke, needs_mask in _key_blocks(qs, qe, tq, tk, causal, block, window):
            s = q_i @ k[:, :, ks:ke].mT  # S = Q_i K_j^T * scale
            if needs_mask:
                s = _mask_tile(s, qs, ks, tk - tq, window)
            # without a window every visited row sees key 0 in the first tile, so m_new is finite from
            # there on; with one, a row whose window starts in a later tile has seen only -inf so far
            m_new = torch.maximum(m, s.amax(dim=-1))  # m' = max(m, rowmax(S))
            m_ref = m_new if window is None else _finite(m_new)  # such rows: subtract 0, not -inf
            alpha = torch.exp(m - m_ref)  # <= 1: moves l and acc from the old max to the new one
            p = s.sub_(m_ref[..., None]).exp_()  # P~ = exp(S - m'), in S's buffer
            l = alpha * l + p.sum(dim=-1)  # l' = alpha l + rowsum(P~)
            acc = alpha[..., None] * acc + p @ v[:, :, ks:ke]  # acc' = alpha acc + P~ V_j
            m = m_new
        out[:, :, qs:qe] = acc / l[..., None]  # O_i = acc / l: the only division, once per row
        lse[:, :, qs:qe] = m + torch.log(l)  # L_i = m + log(l), all the backward needs of softmax
    return out, lse


def _backward(do, q, k, v, out, lse, dlse, causal: bool, scale: float, block: int, window: int | None = None):
    """dq, dk, dv in the accumulation dtype, recomputing each tile's probabilities from lse.

    One loop nest computes all three, query blocks outside: each tile's P is recomputed once and
    used for dV, dK and dQ. The Triton kernel (kernels/flash_triton.py) instead runs a dK/dV kernel
    over key blocks and a separate dQ kernel over query blocks, recomputing P twice: its programs
    run in parallel, and a program that added into rows of dK/dV (or dQ) that another program owns
    would need atomics. A Python loop runs one tile at a time, so the ``+=`` below cannot race.
    """
    ad = _acc_dtype(q.dtype)
    q, k, v, do, out = (t.to(ad) for t in (q, k, v, do, out))
    tq, tk = q.shape[2], k.shape[2]
    # D = rowsum(dO * O) = rowsum(P * dP); a gradient on lse adds dlse * P to dS, i.e. D -= dlse
    delta = (do * out).sum(dim=-1)  # (B, H, Tq)
    if dlse is not None:
        delta = delta - dlse.to(ad)
    dq = torch.zeros_like(q, memory_format=torch.contiguous_format)  # rows that see no key: 0
    dk = torch.zeros_like(k, memory_format=torch.contiguous_format)
    dv = torch.zeros_like(v, memory_format=torch.contiguous_format)
    for qs, qe in _query_blocks(tq, tk, causal, block):
        q_i = q[:, :, qs:qe] * scale  # pre-scaled, so dK = dS^T (Q * scale) carries the scale
        do_i = do[:, :, qs:qe]
        lse_i, delta_i = lse[:, :, qs:qe, None], delta[:, :, qs:qe, None]
        dq_i = torch.zeros_like(q_i)
        for ks, ke, needs_mask in _key_blocks(qs, qe, tq, tk, causal, block, window):
            k_j, v_j = k[:, :, ks:ke], v[:, :, ks:ke]
            s = q_i @ k_j.mT  # S = Q_i K_j^T * scale, as in the forward
            if needs_mask:
                s = _mask_tile(s, qs, ks, tk - tq, window)
            p = s.sub_(lse_i).exp_()  # P = exp(S - L): the softmax, recomputed; masked -> 0
            dv[:, :, ks:ke] += p.mT @ do_i  # dV_j += P^T dO_i
            dp = do_i @ v_j.mT  # dP = dO_i V_j^T
            ds = dp.sub_(delta_i).mul_(p)  # dS = P * (dP - D), in dP's buffer
            dq_i += ds @ k_j  # dQ_i += dS K_j (times scale, below)
            dk[:, :, ks:ke] += ds.mT @ q_i  # dK_j += dS^T Q_i
        dq[:, :, qs:qe] = dq_i * scale
    return dq, dk, dv


class OnlineAttentionFunction(torch.autograd.Function):
    """Autograd wrapper: saves q, k, v, out, lse (O(T * D)); the backward recomputes tiles."""

    @staticmethod
    def forward(ctx, q, k, v, causal: bool, scale: float, block: int, window: int | None = None):
        # autocast would run the tile matmuls in bf16/fp16 again; the fp32 accumulation is the point
        with torch.autocast(q.device.type, enabled=False):
            out, lse = _forward(q, k, v, causal, scale, block, window)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.causal, ctx.scale, ctx.block, ctx.window = causal, scale, block, window
        ctx.set_materialize_grads(False)  # dlse stays None unless the caller uses lse
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(out)
        with torch.autocast(q.device.type, enabled=False):
            dq, dk, dv = _backward(dout, q, k, v, out, lse, dlse, ctx.causal, ctx.scale, ctx.block, ctx.window)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None


def online_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    scale: float | None = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
    return_lse: bool = False,
    window: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """softmax(q k^T * scale + mask) v on (B, H, T, D) tensors, blockwise with online softmax.

    Keys and values may be longer or shorter than the queries. With ``causal=True`` the mask is
    aligned to the end of the keys: query ``i`` sees keys ``j <= i + (Tk - Tq)`` (a KV cache), and
    a query row that sees no key (only when Tq > Tk) outputs zeros with ``lse = -inf``.

    Accumulates in float32 (float64 for float64 inputs) and returns ``out`` in the input dtype.
    With ``return_lse=True`` also returns the per-row log-sum-exp of the scaled, masked scores,
    shape (B, H, Tq), in float32; it is differentiable too.

    ``window``: sliding-window causal attention, query ``i`` seeing keys
    ``i + (Tk - Tq) - window < j <= i + (Tk - Tq)``; key blocks wholly outside it are never visited.
    """
    check_qkv(q, k, v, "online_attention", causal, window)
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"online_attention: block_size must be a positive int, got {block_size!r}")
    scale = resolve_scale(scale, q.shape[-1])
    out, lse = OnlineAttentionFunction.apply(q, k, v, causal, scale, block_size, window)
    return (out, lse) if return_lse else out

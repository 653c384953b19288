"""Online softmax and blockwise attention built on it (FlashAttention's algorithm, in PyTorch).

Online softmax (Milakov & Gimelshein, 2018) reads the reduction dim once, keeping a running
maximum ``m`` and a running normalizer ``l``; when a block raises the maximum, ``l`` is rescaled by
``exp(m_old - m_new)``. Every ``exp`` sees a non-positive argument, so nothing overflows even in
fp16/bf16. (Both functions live in this one module: a submodule named ``kernels.online_softmax``
would shadow the lazily exported function of the same name on the package.)

Attention forward: for each block of queries, walk over key/value blocks keeping a per-row running max
``m``, running sum ``l`` and an output accumulator, all in float32; a T x T score matrix is never
built, only ``block x block`` tiles. In causal mode key blocks entirely above the diagonal are
skipped, which halves the work. Backward saves only q, k, v, out and the per-row log-sum-exp,
and recomputes each tile's probabilities from them, so memory kept for backward is O(T * D).

Loops are in Python over blocks only; every tile op is vectorized over (B, H).
"""
from __future__ import annotations

import torch

from kernels._checks import check_qkv, resolve_scale

__all__ = ["online_attention", "online_softmax", "DEFAULT_BLOCK_SIZE"]

DEFAULT_SOFTMAX_BLOCK = 1024


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    # fp16/bf16/fp32 accumulate in fp32; fp64 stays fp64 so gradcheck can test the backward.
    return torch.float64 if dtype == torch.float64 else torch.float32


def _safe_max(m: torch.Tensor) -> torch.Tensor:
    """Replace -inf maxima (rows with nothing unmasked yet) by 0 so ``x - m`` never gives NaN."""
    return torch.where(m == float("-inf"), torch.zeros_like(m), m)


def online_softmax(x: torch.Tensor, dim: int = -1, block_size: int = DEFAULT_SOFTMAX_BLOCK) -> torch.Tensor:
    """Softmax of ``x`` along ``dim``, computed with the online (running max, running sum) recurrence.

    The reduction dim is read in blocks of ``block_size`` (the last block may be partial); all other
    dims are processed at once. Statistics are accumulated in float32 and the result is returned in
    the input dtype (float32, float16 or bfloat16).

    ``-inf`` entries get probability 0. A row whose entries are all ``-inf`` (fully masked) returns
    **zeros**, whereas ``torch.softmax`` returns NaN for such a row: here a fully masked query
    attends to nothing instead of poisoning the rest of the computation.
    """
    if not x.is_floating_point():
        raise ValueError(f"online_softmax: x must be a floating tensor, got {x.dtype}")
    if block_size < 1:
        raise ValueError(f"online_softmax: block_size must be >= 1, got {block_size}")
    xt = x.movedim(dim, -1)  # (..., N)
    n = xt.shape[-1]
    acc_dtype = _acc_dtype(x.dtype)
    m = torch.full(xt.shape[:-1], float("-inf"), dtype=acc_dtype, device=x.device)
    l = torch.zeros_like(m)
    for start in range(0, n, block_size):
        xb = xt[..., start : start + block_size].to(acc_dtype)
        # update m and l: rescale the old sum to the new maximum, then add this block
        m_new = torch.maximum(m, xb.amax(dim=-1))
        m_safe = _safe_max(m_new)
        l = l * torch.exp(m - m_safe) + torch.exp(xb - m_safe.unsqueeze(-1)).sum(dim=-1)
        m = m_new
    # normalize; l == 0 only for fully masked rows, which become zeros rather than 0/0 = NaN
    inv_l = torch.where(l > 0, 1.0 / l, torch.zeros_like(l))
    out = torch.exp(xt.to(acc_dtype) - _safe_max(m).unsqueeze(-1)) * inv_l.unsqueeze(-1)
    return out.to(x.dtype).movedim(-1, dim)


# Measured on a 2-core CPU (B=1, H=8, D=64, fp32, causal, fwd+bwd time relative to naive at T=1024):
# block 64: 0.52x, 128: 0.39x, 256: 0.42x, 512: 0.55x. Smaller blocks pay Python and dispatch
# overhead per tile; larger ones skip less of the causal triangle and spill out of cache.
DEFAULT_BLOCK_SIZE = 128


def _mask_tile(s: torch.Tensor, qs: int, ks: int) -> None:
    """In place: -inf where key index > query index for the tile at rows qs.., cols ks.."""
    rows = torch.arange(qs, qs + s.shape[-2], device=s.device).unsqueeze(-1)
    cols = torch.arange(ks, ks + s.shape[-1], device=s.device)
    s.masked_fill_(cols > rows, float("-inf"))


def _key_blocks(qs: int, qe: int, tk: int, causal: bool, block: int):
    """(start, end, needs_mask) of the key blocks query rows [qs, qe) attend to."""
    k_end = qe if causal else tk  # causal: keys past the last query row are all masked, skip them
    for ks in range(0, k_end, block):
        ke = min(ks + block, k_end)
        yield ks, ke, causal and ke - 1 > qs  # some key in the tile lies above the diagonal


def _forward(q, k, v, causal: bool, scale: float, block: int):
    """out (B, H, Tq, D) and lse (B, H, Tq), both in the accumulation dtype."""
    acc_dtype = _acc_dtype(q.dtype)
    qf, kf, vf = q.to(acc_dtype), k.to(acc_dtype), v.to(acc_dtype)
    B, H, tq, D = q.shape
    out = torch.empty(B, H, tq, D, dtype=acc_dtype, device=q.device)
    lse = torch.empty(B, H, tq, dtype=acc_dtype, device=q.device)
    for qs in range(0, tq, block):
        qe = min(qs + block, tq)
        qb = qf[:, :, qs:qe] * scale  # (B, H, bq, D)
        m = torch.full((B, H, qe - qs), float("-inf"), dtype=acc_dtype, device=q.device)
        l = torch.zeros_like(m)
        acc = torch.zeros(B, H, qe - qs, D, dtype=acc_dtype, device=q.device)
        for ks, ke, needs_mask in _key_blocks(qs, qe, kf.shape[2], causal, block):
            s = qb @ kf[:, :, ks:ke].transpose(-2, -1)  # (B, H, bq, bk)
            if needs_mask:
                _mask_tile(s, qs, ks)
            # update m and l; rows always see their own (diagonal) key, so m_new is finite
            m_new = torch.maximum(m, s.amax(dim=-1))
            alpha = (m - m_new).exp_()  # rescales everything accumulated so far
            p = s.sub_(m_new.unsqueeze(-1)).exp_()
            l = l.mul_(alpha).add_(p.sum(dim=-1))
            acc = acc.mul_(alpha.unsqueeze(-1)).add_(p @ vf[:, :, ks:ke])
            m = m_new
        out[:, :, qs:qe] = acc / l.unsqueeze(-1)
        lse[:, :, qs:qe] = m + torch.log(l)
    return out, lse


def _backward(do, q, k, v, out, lse, dlse, causal: bool, scale: float, block: int):
    """dq, dk, dv in the accumulation dtype, recomputing each tile's probabilities from lse."""
    acc_dtype = _acc_dtype(q.dtype)
    qf, kf, vf, dof = (t.to(acc_dtype) for t in (q, k, v, do))
    # delta_i = sum_j P_ij dP_ij = rowsum(dO * O); a gradient on lse adds dlse_i * P_ij to dS_ij
    delta = (dof * out.to(acc_dtype)).sum(dim=-1)  # (B, H, Tq)
    if dlse is not None:
        delta = delta - dlse.to(acc_dtype)
    dq = torch.empty_like(qf, memory_format=torch.contiguous_format)
    dk = torch.zeros(kf.shape, dtype=acc_dtype, device=k.device)
    dv = torch.zeros(vf.shape, dtype=acc_dtype, device=v.device)
    tq = q.shape[2]
    for qs in range(0, tq, block):
        qe = min(qs + block, tq)
        qb = qf[:, :, qs:qe] * scale  # (B, H, bq, D), pre-scaled: dK picks up the scale from it
        dob = dof[:, :, qs:qe]
        lse_b, delta_b = lse[:, :, qs:qe].unsqueeze(-1), delta[:, :, qs:qe].unsqueeze(-1)
        dq_b = torch.zeros_like(qb)
        for ks, ke, needs_mask in _key_blocks(qs, qe, kf.shape[2], causal, block):
            kb, vb = kf[:, :, ks:ke], vf[:, :, ks:ke]
            s = qb @ kb.transpose(-2, -1)  # (B, H, bq, bk)
            if needs_mask:
                _mask_tile(s, qs, ks)
            p = s.sub_(lse_b).exp_()  # recomputed probabilities; masked entries -> 0
            dv[:, :, ks:ke] += p.transpose(-2, -1) @ dob
            dp = dob @ vb.transpose(-2, -1)
            ds = dp.sub_(delta_b).mul_(p)  # dS = P * (dP - delta)
            dq_b += ds @ kb
            dk[:, :, ks:ke] += ds.transpose(-2, -1) @ qb
        dq[:, :, qs:qe] = dq_b * scale
    return dq, dk, dv


class OnlineAttentionFunction(torch.autograd.Function):
    """Autograd wrapper: saves q, k, v, out, lse (O(T * D)); the backward recomputes tiles."""

    @staticmethod
    def forward(ctx, q, k, v, causal: bool, scale: float, block: int):
        # autocast would run the tile matmuls in bf16/fp16 again; the fp32 accumulation is the point
        with torch.autocast(q.device.type, enabled=False):
            out, lse = _forward(q, k, v, causal, scale, block)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.causal, ctx.scale, ctx.block = causal, scale, block
        ctx.set_materialize_grads(False)  # dlse stays None unless the caller uses lse
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(out)
        with torch.autocast(q.device.type, enabled=False):
            dq, dk, dv = _backward(dout, q, k, v, out, lse, dlse, ctx.causal, ctx.scale, ctx.block)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None


def online_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    scale: float | None = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """softmax(q k^T * scale + mask) v on (B, H, T, D) tensors, blockwise with online softmax.

    Accumulates in float32 (float64 for float64 inputs) and returns ``out`` in the input dtype.
    With ``return_lse=True`` also returns the per-row log-sum-exp of the scaled, masked scores,
    shape (B, H, Tq), in float32; it is differentiable too.
    """
    check_qkv(q, k, v, causal, "online_attention")
    if causal and q.shape[-2] != k.shape[-2]:  # TODO(kv-cache): end-aligned causal mask not implemented here yet
        raise ValueError(f"online_attention: causal=True with Tq={q.shape[-2]} != Tk={k.shape[-2]} is not supported yet")
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"online_attention: block_size must be a positive int, got {block_size!r}")
    scale = resolve_scale(scale, q.shape[-1])
    out, lse = OnlineAttentionFunction.apply(q, k, v, causal, scale, block_size)
    return (out, lse) if return_lse else out

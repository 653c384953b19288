"""Triton kernels for FlashAttention-2 (Dao, 2023): forward, and a three-kernel backward.

Imported only by the launcher in ``kernels/flash.py`` on first call, never at package import.
Launch configurations (block sizes, warps, stages) and their shared-memory fit live in
``kernels/flash_configs.py``; this file holds only the algorithm.

Layout and conventions shared by every kernel:
- one program per (block of rows, batch*head); grid axis 1 is ``B * H``;
- inputs are read through (batch, head, time) strides with a unit stride along the head dim;
  per-(batch, head) base offsets are int64 so tensors past 2**31 elements address correctly;
- outputs (O, dQ, dK, dV, LSE, Delta) are contiguous buffers the launcher allocates;
- the causal mask is aligned to the END of the keys: query i sees key j iff
  ``j <= i + (T_K - T_Q)``, so queries appended after a KV cache see the whole cache; a query
  row that sees no key (only possible when T_Q > T_K) outputs zeros with LSE = -inf;
- ``WINDOW`` (a constexpr; 0 = none) narrows the causal mask to a sliding window: query i sees
  key j iff ``i + (T_K - T_Q) - WINDOW < j <= i + (T_K - T_Q)``. Key loops then start at the
  first block the window reaches, so the work per block of rows grows with WINDOW, not with T;
  with WINDOW = 0 every window branch is compiled out, leaving the plain causal kernels;
- scores are kept in log2 units (``qk_scale = scale * log2(e)``) so ``exp2`` replaces ``exp``;
  LSE is stored in natural-log units so it can be compared with ``torch.logsumexp``;
- all elementwise math is fp32; 16-bit tiles only feed ``tl.dot``. ``UPCAST`` (interpreter and
  bf16 only) widens tiles to fp32 before ``tl.dot`` because the interpreter's bf16 dot is wrong.
"""
from __future__ import annotations

import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

# globals read inside @triton.jit functions must be constexpr
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _dot(a, b, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _program(H, BLOCK: tl.constexpr):
    """The prologue every kernel shares: this program's batch and head (int64, for base offsets),
    its flat batch*head index (int64, for the contiguous outputs), and the rows of its block."""
    pid_bh = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    return (pid_bh // H).to(tl.int64), (pid_bh % H).to(tl.int64), pid_bh.to(tl.int64), rows


@triton.jit
def _load_tile(ptr, off_b, off_h, stride_b, stride_h, stride_t, rows, T, HEAD_D: tl.constexpr):
    """The (len(rows), HEAD_D) tile of a strided (B, H, T, HEAD_D) tensor; rows past T read 0."""
    offs_d = tl.arange(0, HEAD_D)
    ptrs = ptr + off_b * stride_b + off_h * stride_h + rows[:, None] * stride_t + offs_d[None, :]
    return tl.load(ptrs, mask=(rows < T)[:, None], other=0.0)


@triton.jit
def _key_ranges(m0, T_Q, T_K, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """For the query block starting at row m0: keys [0, mid) need no mask; keys [mid, hi) do.

    Causal: keys before the block's first visible diagonal entry are seen by every row; keys past
    its last row's diagonal are never visited. Otherwise: whole key blocks, then the ragged tail.
    """
    if CAUSAL:
        shift = T_K - T_Q  # end alignment: row i's last visible key is i + shift
        mid = tl.maximum(m0 + shift, 0) // BLOCK_N * BLOCK_N
        hi = tl.minimum(m0 + BLOCK_M + shift, T_K)
    else:
        mid = T_K // BLOCK_N * BLOCK_N
        hi = T_K
    return mid, hi


@triton.jit
def _window_ranges(m0, T_Q, T_K, mid, WINDOW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Sliding window, for the query block starting at row m0: keys [lo, full) need the window's
    mask (some row's window starts after them), keys [full, mid) none; keys before lo are skipped.

    Row i's first visible key is i + shift - WINDOW + 1: lo is the key block holding the first
    row's, full the first block at or after the last row's, clamped to [lo, mid].
    """
    shift = T_K - T_Q
    lo = tl.maximum(m0 + shift - WINDOW + 1, 0) // BLOCK_N * BLOCK_N
    full = tl.cdiv(tl.maximum(m0 + BLOCK_M + shift - WINDOW, 0), BLOCK_N) * BLOCK_N
    return lo, tl.minimum(tl.maximum(full, lo), mid)


# ----------------------------------------------------------------------------- forward


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, offs_m, lo, hi, T_K, shift, qk_scale,
               HEAD_D: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL_MASK: tl.constexpr, BOUND_MASK: tl.constexpr,
               WINDOW_MASK: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    # WINDOW_MASK: 0, or the window size when these tiles hold keys before some row's window
    offs_d = tl.arange(0, HEAD_D)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        col_ok = offs_n < T_K
        kt = tl.load(k_base + offs_n[None, :] * stride_kt + offs_d[:, None], mask=col_ok[None, :], other=0.0)
        v = tl.load(v_base + offs_n[:, None] * stride_vt + offs_d[None, :], mask=col_ok[:, None], other=0.0)
        s = _dot(q, kt, UPCAST, PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N), log2 units
        if BOUND_MASK:
            s = tl.where(col_ok[None, :], s, float("-inf"))
        if CAUSAL_MASK:
            s = tl.where(offs_m[:, None] + shift >= offs_n[None, :], s, float("-inf"))
        if WINDOW_MASK > 0:
            s = tl.where(offs_m[:, None] + shift - WINDOW_MASK < offs_n[None, :], s, float("-inf"))
        # online softmax: new running max, rescale the old sum and accumulator to it
        m_new = tl.maximum(m_i, tl.max(s, 1))
        if CAUSAL_MASK or WINDOW_MASK > 0:  # a row that has seen no key yet keeps m = -inf: exponentiate against 0
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_ref = m_new
        p = tl.exp2(s - m_ref[:, None])
        alpha = tl.exp2(m_i - m_ref)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, UPCAST, PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _fwd_kernel(Q, K, V, O, LSE,
                stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                stride_vb, stride_vh, stride_vt,
                H, T_Q, T_K, qk_scale,
                HEAD_D: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr, UPCAST: tl.constexpr,
                PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    tl.static_assert(CAUSAL or WINDOW == 0, "a sliding window is causal")
    # one program owns a block of queries and streams every key block it may see
    off_b, off_h, bh, offs_m = _program(H, BLOCK=BLOCK_M)
    q = _load_tile(Q, off_b, off_h, stride_qb, stride_qh, stride_qt, offs_m, T_Q, HEAD_D=HEAD_D)
    k_base = K + off_b * stride_kb + off_h * stride_kh
    v_base = V + off_b * stride_vb + off_h * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_D], tl.float32)
    shift = T_K - T_Q
    m0 = tl.program_id(0) * BLOCK_M
    mid, hi = _key_ranges(m0, T_Q, T_K, CAUSAL=CAUSAL, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N)
    if WINDOW > 0:  # sliding window: skip the key blocks before it, mask the tiles at its lower edge
        lo, full = _window_ranges(m0, T_Q, T_K, mid, WINDOW=WINDOW, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N)
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, offs_m, lo, full, T_K,
                                   shift, qk_scale, HEAD_D=HEAD_D, BLOCK_N=BLOCK_N, CAUSAL_MASK=False,
                                   BOUND_MASK=False, WINDOW_MASK=WINDOW, UPCAST=UPCAST, PRECISION=PRECISION)
    else:
        full = 0
    # every row sees every key in [full, mid)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, offs_m, full, mid, T_K, shift,
                               qk_scale, HEAD_D=HEAD_D, BLOCK_N=BLOCK_N, CAUSAL_MASK=False, BOUND_MASK=False,
                               WINDOW_MASK=0, UPCAST=UPCAST, PRECISION=PRECISION)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, offs_m, mid, hi, T_K, shift,
                               qk_scale, HEAD_D=HEAD_D, BLOCK_N=BLOCK_N, CAUSAL_MASK=CAUSAL, BOUND_MASK=True,
                               WINDOW_MASK=WINDOW, UPCAST=UPCAST, PRECISION=PRECISION)

    # a row with no visible key (T_Q > T_K, causal) has l = 0: output 0 and lse = -inf
    seen = l_i > 0.0
    l_safe = tl.where(seen, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse = tl.where(seen, (m_i + tl.log2(l_safe)) * LN2, float("-inf"))  # log2 units -> natural log
    offs_d = tl.arange(0, HEAD_D)
    row_ok = offs_m < T_Q
    tl.store(O + bh * T_Q * HEAD_D + offs_m[:, None] * HEAD_D + offs_d[None, :], out.to(O.dtype.element_ty),
             mask=row_ok[:, None])
    tl.store(LSE + bh * T_Q + offs_m, lse, mask=row_ok)


# ----------------------------------------------------------------------------- backward
#
# The backward needs dQ = dS K, dK = dS^T Q and dV = P^T dO, where P and dS = P * (dP - delta) are
# (T_Q, T_K) matrices that are recomputed block by block and never stored. Each output is summed
# over the other sequence axis, so each gets its own kernel with its own loop order:
# - _bwd_dkdv_kernel: a program owns one block of KEYS and loops over query blocks;
# - _bwd_dq_kernel: a program owns one block of QUERIES and loops over key blocks.
# Every output block is then written by exactly one program, which holds its whole sum in
# registers: no atomics, no zero-initialised fp32 scratch, and the result does not depend on the
# order in which programs run (the backward is deterministic). The price is computing P and dP
# twice (once in each kernel), which costs less than atomic adds into dQ from every key block.


@triton.jit
def _bwd_preprocess(O, DO, Delta, stride_dob, stride_doh, stride_dot, H, T_Q,
                    HEAD_D: tl.constexpr, BLOCK_M: tl.constexpr):
    # delta_i = sum_d dO_id * O_id = sum_j P_ij dP_ij, the softmax-backward row term
    off_b, off_h, bh, offs_m = _program(H, BLOCK=BLOCK_M)
    o = _load_tile(O + bh * T_Q * HEAD_D, 0, 0, 0, 0, HEAD_D, offs_m, T_Q, HEAD_D=HEAD_D).to(tl.float32)
    do = _load_tile(DO, off_b, off_h, stride_dob, stride_doh, stride_dot, offs_m, T_Q, HEAD_D=HEAD_D).to(tl.float32)
    tl.store(Delta + bh * T_Q + offs_m, tl.sum(o * do, 1), mask=offs_m < T_Q)


@triton.jit
def _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot,
                    offs_n, lo, hi, T_Q, shift, qk_scale,
                    HEAD_D: tl.constexpr, BLOCK_M: tl.constexpr, CAUSAL_MASK: tl.constexpr, WINDOW_MASK: tl.constexpr,
                    UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    offs_d = tl.arange(0, HEAD_D)
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_ok = offs_m < T_Q
        qt = tl.load(q_base + offs_m[None, :] * stride_qt + offs_d[:, None], mask=row_ok[None, :], other=0.0)
        do = tl.load(do_base + offs_m[:, None] * stride_dot + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        lse2 = tl.load(lse_base + offs_m, mask=row_ok, other=0.0) * LOG2E  # -> log2 units
        delta = tl.load(delta_base + offs_m, mask=row_ok, other=0.0)
        # work on transposed scores (keys x queries) so dK and dV accumulate as (BLOCK_N, D)
        pt = tl.exp2(_dot(k, qt, UPCAST, PRECISION) * qk_scale - lse2[None, :])
        keep = row_ok[None, :]
        if CAUSAL_MASK:
            keep = keep & (offs_m[None, :] + shift >= offs_n[:, None])
        if WINDOW_MASK > 0:
            keep = keep & (offs_m[None, :] + shift - WINDOW_MASK < offs_n[:, None])
        pt = tl.where(keep, pt, 0.0)
        dv += _dot(pt.to(do.dtype), do, UPCAST, PRECISION)
        dpt = _dot(v, tl.trans(do), UPCAST, PRECISION)
        dst = pt * (dpt - delta[None, :])
        dk += _dot(dst.to(qt.dtype), tl.trans(qt), UPCAST, PRECISION)
    return dk, dv


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, LSE, Delta, DK, DV,
                     stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                     stride_vb, stride_vh, stride_vt, stride_dob, stride_doh, stride_dot,
                     H, T_Q, T_K, qk_scale, sm_scale,
                     HEAD_D: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr, UPCAST: tl.constexpr,
                     PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    tl.static_assert(CAUSAL or WINDOW == 0, "a sliding window is causal")
    # one program owns a block of keys (K, V and the dK, dV sums stay resident) and loops over
    # query blocks; see the note above the backward kernels for why there are no atomics
    off_b, off_h, bh, offs_n = _program(H, BLOCK=BLOCK_N)
    k = _load_tile(K, off_b, off_h, stride_kb, stride_kh, stride_kt, offs_n, T_K, HEAD_D=HEAD_D)
    v = _load_tile(V, off_b, off_h, stride_vb, stride_vh, stride_vt, offs_n, T_K, HEAD_D=HEAD_D)
    q_base = Q + off_b * stride_qb + off_h * stride_qh
    do_base = DO + off_b * stride_dob + off_h * stride_doh
    dk = tl.zeros([BLOCK_N, HEAD_D], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_D], tl.float32)
    shift = T_K - T_Q
    n0 = tl.program_id(0) * BLOCK_N
    mid = 0
    if CAUSAL:
        # query i sees key j iff i >= j - shift: query blocks before lo see none of these keys,
        # those from mid on see all of them, those between need the mask
        lo = tl.maximum(n0 - shift, 0) // BLOCK_M * BLOCK_M
        mid = lo + tl.cdiv(tl.maximum(n0 + BLOCK_N - shift - lo, 0), BLOCK_M) * BLOCK_M
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, LSE + bh * T_Q, Delta + bh * T_Q,
                                 stride_qt, stride_dot, offs_n, lo, tl.minimum(mid, T_Q), T_Q, shift, qk_scale,
                                 HEAD_D=HEAD_D, BLOCK_M=BLOCK_M, CAUSAL_MASK=True, WINDOW_MASK=WINDOW,
                                 UPCAST=UPCAST, PRECISION=PRECISION)
    if WINDOW > 0:
        # sliding window: query i sees key j iff j > i + shift - WINDOW, so queries before wlo (a
        # block boundary) see all of these keys, those from wlo on need the mask, and none from
        # hi on (past the window of the block's last key) sees any: those blocks are skipped
        wlo = tl.maximum(tl.maximum(n0 - shift + WINDOW, 0) // BLOCK_M * BLOCK_M, mid)
        hi = tl.minimum(n0 + BLOCK_N - 1 - shift + WINDOW, T_Q)
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, LSE + bh * T_Q, Delta + bh * T_Q,
                                 stride_qt, stride_dot, offs_n, mid, tl.minimum(wlo, T_Q), T_Q, shift, qk_scale,
                                 HEAD_D=HEAD_D, BLOCK_M=BLOCK_M, CAUSAL_MASK=False, WINDOW_MASK=0,
                                 UPCAST=UPCAST, PRECISION=PRECISION)
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, LSE + bh * T_Q, Delta + bh * T_Q,
                                 stride_qt, stride_dot, offs_n, wlo, hi, T_Q, shift, qk_scale,
                                 HEAD_D=HEAD_D, BLOCK_M=BLOCK_M, CAUSAL_MASK=False, WINDOW_MASK=WINDOW,
                                 UPCAST=UPCAST, PRECISION=PRECISION)
    else:
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, LSE + bh * T_Q, Delta + bh * T_Q,
                                 stride_qt, stride_dot, offs_n, mid, T_Q, T_Q, shift, qk_scale,
                                 HEAD_D=HEAD_D, BLOCK_M=BLOCK_M, CAUSAL_MASK=False, WINDOW_MASK=0,
                                 UPCAST=UPCAST, PRECISION=PRECISION)
    dk *= sm_scale
    offs_d = tl.arange(0, HEAD_D)
    out_offs = bh * T_K * HEAD_D + offs_n[:, None] * HEAD_D + offs_d[None, :]
    col_ok = (offs_n < T_K)[:, None]
    tl.store(DK + out_offs, dk.to(DK.dtype.element_ty), mask=col_ok)
    tl.store(DV + out_offs, dv.to(DV.dtype.element_ty), mask=col_ok)


@triton.jit
def _bwd_dq_inner(dq, q, do, lse2, delta, k_base, v_base, stride_kt, stride_vt, offs_m, lo, hi, T_K, shift,
                  qk_scale, HEAD_D: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL_MASK: tl.constexpr,
                  BOUND_MASK: tl.constexpr, WINDOW_MASK: tl.constexpr, UPCAST: tl.constexpr,
                  PRECISION: tl.constexpr):
    offs_d = tl.arange(0, HEAD_D)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        col_ok = offs_n < T_K
        kt = tl.load(k_base + offs_n[None, :] * stride_kt + offs_d[:, None], mask=col_ok[None, :], other=0.0)
        vt = tl.load(v_base + offs_n[None, :] * stride_vt + offs_d[:, None], mask=col_ok[None, :], other=0.0)
        p = tl.exp2(_dot(q, kt, UPCAST, PRECISION) * qk_scale - lse2[:, None])
        if BOUND_MASK:
            p = tl.where(col_ok[None, :], p, 0.0)
        if CAUSAL_MASK:
            p = tl.where(offs_m[:, None] + shift >= offs_n[None, :], p, 0.0)
        if WINDOW_MASK > 0:
            p = tl.where(offs_m[:, None] + shift - WINDOW_MASK < offs_n[None, :], p, 0.0)
        dp = _dot(do, vt, UPCAST, PRECISION)
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(kt.dtype), tl.trans(kt), UPCAST, PRECISION)
    return dq


@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, LSE, Delta, DQ,
                   stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                   stride_vb, stride_vh, stride_vt, stride_dob, stride_doh, stride_dot,
                   H, T_Q, T_K, qk_scale, sm_scale,
                   HEAD_D: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr, UPCAST: tl.constexpr,
                   PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    tl.static_assert(CAUSAL or WINDOW == 0, "a sliding window is causal")
    # one program owns a block of queries (Q, dO and the dQ sum stay resident) and loops over key
    # blocks, in the forward's order
    off_b, off_h, bh, offs_m = _program(H, BLOCK=BLOCK_M)
    q = _load_tile(Q, off_b, off_h, stride_qb, stride_qh, stride_qt, offs_m, T_Q, HEAD_D=HEAD_D)
    do = _load_tile(DO, off_b, off_h, stride_dob, stride_doh, stride_dot, offs_m, T_Q, HEAD_D=HEAD_D)
    row_ok = offs_m < T_Q
    lse2 = tl.load(LSE + bh * T_Q + offs_m, mask=row_ok, other=0.0) * LOG2E
    delta = tl.load(Delta + bh * T_Q + offs_m, mask=row_ok, other=0.0)
    k_base = K + off_b * stride_kb + off_h * stride_kh
    v_base = V + off_b * stride_vb + off_h * stride_vh
    dq = tl.zeros([BLOCK_M, HEAD_D], tl.float32)
    shift = T_K - T_Q
    m0 = tl.program_id(0) * BLOCK_M
    mid, hi = _key_ranges(m0, T_Q, T_K, CAUSAL=CAUSAL, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N)
    if WINDOW > 0:  # the forward's key ranges
        lo, full = _window_ranges(m0, T_Q, T_K, mid, WINDOW=WINDOW, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N)
        dq = _bwd_dq_inner(dq, q, do, lse2, delta, k_base, v_base, stride_kt, stride_vt, offs_m, lo, full, T_K,
                           shift, qk_scale, HEAD_D=HEAD_D, BLOCK_N=BLOCK_N, CAUSAL_MASK=False, BOUND_MASK=False,
                           WINDOW_MASK=WINDOW, UPCAST=UPCAST, PRECISION=PRECISION)
    else:
        full = 0
    dq = _bwd_dq_inner(dq, q, do, lse2, delta, k_base, v_base, stride_kt, stride_vt, offs_m, full, mid, T_K, shift,
                       qk_scale, HEAD_D=HEAD_D, BLOCK_N=BLOCK_N, CAUSAL_MASK=False, BOUND_MASK=False,
                       WINDOW_MASK=0, UPCAST=UPCAST, PRECISION=PRECISION)
    dq = _bwd_dq_inner(dq, q, do, lse2, delta, k_base, v_base, stride_kt, stride_vt, offs_m, mid, hi, T_K, shift,
                       qk_scale, HEAD_D=HEAD_D, BLOCK_N=BLOCK_N, CAUSAL_MASK=CAUSAL, BOUND_MASK=True,
                       WINDOW_MASK=WINDOW, UPCAST=UPCAST, PRECISION=PRECISION)
    dq *= sm_scale
    offs_d = tl.arange(0, HEAD_D)
    tl.store(DQ + bh * T_Q * HEAD_D + offs_m[:, None] * HEAD_D + offs_d[None, :], dq.to(DQ.dtype.element_ty),
             mask=row_ok[:, None])


KERNELS = {"fwd": _fwd_kernel, "dkdv": _bwd_dkdv_kernel, "dq": _bwd_dq_kernel, "preprocess": _bwd_preprocess}

INTERPRETED = isinstance(_fwd_kernel, InterpretedFunction)
"""True when this process imported Triton with TRITON_INTERPRET=1 (kernels run on CPU tensors)."""

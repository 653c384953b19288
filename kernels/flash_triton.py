"""Triton kernels for FlashAttention-2 (Dao, 2023): forward, and a three-kernel backward.

Imported only by the launcher in ``kernels/flash.py`` on first call, never at package import.

Layout and conventions shared by every kernel:
- one program per (block of rows, batch*head); grid axis 1 is ``B * H``;
- inputs are read through (batch, head, time) strides with a unit stride along the head dim;
  per-(batch, head) base offsets are int64 so tensors past 2**31 elements address correctly;
- outputs (O, dQ, dK, dV, LSE, Delta) are contiguous buffers the launcher allocates;
- scores are kept in log2 units (``qk_scale = scale * log2(e)``) so ``exp2`` replaces ``exp``;
  LSE is stored in natural-log units so it can be compared with ``torch.logsumexp``;
- all elementwise math is fp32; 16-bit tiles only feed ``tl.dot``. ``UPCAST`` (interpreter and
  bf16 only) widens tiles to fp32 before ``tl.dot`` because the interpreter's bf16 dot is wrong.
"""
from __future__ import annotations

import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction


@triton.jit
def _dot(a, b, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision=PRECISION)


# ----------------------------------------------------------------------------- forward


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, offs_m, offs_d, lo, hi, T_K, qk_scale,
               BLOCK_N: tl.constexpr, CAUSAL_MASK: tl.constexpr, BOUND_MASK: tl.constexpr,
               UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        col_ok = offs_n < T_K
        kt = tl.load(k_base + offs_n[None, :] * stride_kt + offs_d[:, None], mask=col_ok[None, :], other=0.0)
        v = tl.load(v_base + offs_n[:, None] * stride_vt + offs_d[None, :], mask=col_ok[:, None], other=0.0)
        s = _dot(q, kt, UPCAST, PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N), log2 units
        if BOUND_MASK:
            s = tl.where(col_ok[None, :], s, float("-inf"))
        if CAUSAL_MASK:
            s = tl.where(offs_m[:, None] >= offs_n[None, :], s, float("-inf"))
        # online softmax: new running max, rescale the old sum and accumulator to it
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, UPCAST, PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _fwd_kernel(Q, K, V, O, LSE,
                stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                stride_vb, stride_vh, stride_vt,
                H, T_Q, T_K, qk_scale,
                HEAD_D: tl.constexpr, CAUSAL: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    q_base = Q + off_b * stride_qb + off_h * stride_qh
    k_base = K + off_b * stride_kb + off_h * stride_kh
    v_base = V + off_b * stride_vb + off_h * stride_vh
    o_base = O + pid_bh.to(tl.int64) * T_Q * HEAD_D
    lse_base = LSE + pid_bh.to(tl.int64) * T_Q

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_D)
    row_ok = offs_m < T_Q
    q = tl.load(q_base + offs_m[:, None] * stride_qt + offs_d[None, :], mask=row_ok[:, None], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_D], tl.float32)
    # The first block processed always holds key 0, which every row may see, so m_i is finite
    # after it and no row ever computes exp2(-inf - -inf).
    if CAUSAL:
        # blocks strictly below the diagonal need no mask; blocks above it are never visited
        diag_lo = (pid_m * BLOCK_M) // BLOCK_N * BLOCK_N
        diag_hi = tl.minimum((pid_m + 1) * BLOCK_M, T_K)
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, offs_m, offs_d,
                                   0, diag_lo, T_K, qk_scale, BLOCK_N, False, False, UPCAST, PRECISION)
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, offs_m, offs_d,
                                   diag_lo, diag_hi, T_K, qk_scale, BLOCK_N, True, True, UPCAST, PRECISION)
    else:
        full_hi = T_K // BLOCK_N * BLOCK_N
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, offs_m, offs_d,
                                   0, full_hi, T_K, qk_scale, BLOCK_N, False, False, UPCAST, PRECISION)
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, offs_m, offs_d,
                                   full_hi, T_K, T_K, qk_scale, BLOCK_N, False, True, UPCAST, PRECISION)

    out = acc / l_i[:, None]
    lse = (m_i + tl.log2(l_i)) * 0.6931471805599453  # log2 units -> natural log
    tl.store(o_base + offs_m[:, None] * HEAD_D + offs_d[None, :], out.to(O.dtype.element_ty), mask=row_ok[:, None])
    tl.store(lse_base + offs_m, lse, mask=row_ok)


# ----------------------------------------------------------------------------- backward


@triton.jit
def _bwd_preprocess(O, DO, Delta, stride_dob, stride_doh, stride_dot, H, T_Q,
                    HEAD_D: tl.constexpr, BLOCK_M: tl.constexpr):
    # delta_i = sum_d dO_id * O_id = sum_j P_ij dP_ij, the softmax-backward row term
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_D)
    row_ok = offs_m < T_Q
    o = tl.load(O + pid_bh.to(tl.int64) * T_Q * HEAD_D + offs_m[:, None] * HEAD_D + offs_d[None, :],
                mask=row_ok[:, None], other=0.0).to(tl.float32)
    do = tl.load(DO + off_b * stride_dob + off_h * stride_doh + offs_m[:, None] * stride_dot + offs_d[None, :],
                 mask=row_ok[:, None], other=0.0).to(tl.float32)
    tl.store(Delta + pid_bh.to(tl.int64) * T_Q + offs_m, tl.sum(o * do, 1), mask=row_ok)


@triton.jit
def _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot,
                    offs_n, offs_d, lo, hi, T_Q, qk_scale,
                    BLOCK_M: tl.constexpr, CAUSAL_MASK: tl.constexpr, UPCAST: tl.constexpr,
                    PRECISION: tl.constexpr):
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_ok = offs_m < T_Q
        qt = tl.load(q_base + offs_m[None, :] * stride_qt + offs_d[:, None], mask=row_ok[None, :], other=0.0)
        do = tl.load(do_base + offs_m[:, None] * stride_dot + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        lse2 = tl.load(lse_base + offs_m, mask=row_ok, other=0.0) * 1.4426950408889634  # -> log2 units
        delta = tl.load(delta_base + offs_m, mask=row_ok, other=0.0)
        # work on transposed scores (keys x queries) so dK and dV accumulate as (BLOCK_N, D)
        pt = tl.exp2(_dot(k, qt, UPCAST, PRECISION) * qk_scale - lse2[None, :])
        keep = row_ok[None, :]
        if CAUSAL_MASK:
            keep = keep & (offs_m[None, :] >= offs_n[:, None])
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
                     HEAD_D: tl.constexpr, CAUSAL: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # one program owns a block of keys and walks over query blocks (no atomics needed)
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    q_base = Q + off_b * stride_qb + off_h * stride_qh
    do_base = DO + off_b * stride_dob + off_h * stride_doh
    lse_base = LSE + pid_bh.to(tl.int64) * T_Q
    delta_base = Delta + pid_bh.to(tl.int64) * T_Q

    n0 = pid_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_D)
    col_ok = offs_n < T_K
    k = tl.load(K + off_b * stride_kb + off_h * stride_kh + offs_n[:, None] * stride_kt + offs_d[None, :],
                mask=col_ok[:, None], other=0.0)
    v = tl.load(V + off_b * stride_vb + off_h * stride_vh + offs_n[:, None] * stride_vt + offs_d[None, :],
                mask=col_ok[:, None], other=0.0)
    dk = tl.zeros([BLOCK_N, HEAD_D], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_D], tl.float32)
    if CAUSAL:
        # query blocks before diag_lo see none of these keys; those from diag_hi on see all of them
        diag_lo = n0 // BLOCK_M * BLOCK_M
        diag_hi = diag_lo + tl.cdiv(n0 + BLOCK_N - diag_lo, BLOCK_M) * BLOCK_M
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot,
                                 offs_n, offs_d, diag_lo, tl.minimum(diag_hi, T_Q), T_Q, qk_scale,
                                 BLOCK_M, True, UPCAST, PRECISION)
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot,
                                 offs_n, offs_d, diag_hi, T_Q, T_Q, qk_scale,
                                 BLOCK_M, False, UPCAST, PRECISION)
    else:
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot,
                                 offs_n, offs_d, 0, T_Q, T_Q, qk_scale,
                                 BLOCK_M, False, UPCAST, PRECISION)
    dk *= sm_scale
    out_offs = pid_bh.to(tl.int64) * T_K * HEAD_D + offs_n[:, None] * HEAD_D + offs_d[None, :]
    tl.store(DK + out_offs, dk.to(DK.dtype.element_ty), mask=col_ok[:, None])
    tl.store(DV + out_offs, dv.to(DV.dtype.element_ty), mask=col_ok[:, None])


@triton.jit
def _bwd_dq_inner(dq, q, do, lse2, delta, k_base, v_base, stride_kt, stride_vt, offs_m, offs_d, lo, hi, T_K,
                  qk_scale, BLOCK_N: tl.constexpr, CAUSAL_MASK: tl.constexpr, BOUND_MASK: tl.constexpr,
                  UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        col_ok = offs_n < T_K
        kt = tl.load(k_base + offs_n[None, :] * stride_kt + offs_d[:, None], mask=col_ok[None, :], other=0.0)
        vt = tl.load(v_base + offs_n[None, :] * stride_vt + offs_d[:, None], mask=col_ok[None, :], other=0.0)
        p = tl.exp2(_dot(q, kt, UPCAST, PRECISION) * qk_scale - lse2[:, None])
        if BOUND_MASK:
            p = tl.where(col_ok[None, :], p, 0.0)
        if CAUSAL_MASK:
            p = tl.where(offs_m[:, None] >= offs_n[None, :], p, 0.0)
        dp = _dot(do, vt, UPCAST, PRECISION)
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(kt.dtype), tl.trans(kt), UPCAST, PRECISION)
    return dq


@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, LSE, Delta, DQ,
                   stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                   stride_vb, stride_vh, stride_vt, stride_dob, stride_doh, stride_dot,
                   H, T_Q, T_K, qk_scale, sm_scale,
                   HEAD_D: tl.constexpr, CAUSAL: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # one program owns a block of queries and walks over key blocks (mirror of the forward)
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    k_base = K + off_b * stride_kb + off_h * stride_kh
    v_base = V + off_b * stride_vb + off_h * stride_vh

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_D)
    row_ok = offs_m < T_Q
    q = tl.load(Q + off_b * stride_qb + off_h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + off_b * stride_dob + off_h * stride_doh + offs_m[:, None] * stride_dot + offs_d[None, :],
                 mask=row_ok[:, None], other=0.0)
    lse2 = tl.load(LSE + pid_bh.to(tl.int64) * T_Q + offs_m, mask=row_ok, other=0.0) * 1.4426950408889634
    delta = tl.load(Delta + pid_bh.to(tl.int64) * T_Q + offs_m, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, HEAD_D], tl.float32)
    if CAUSAL:
        diag_lo = (pid_m * BLOCK_M) // BLOCK_N * BLOCK_N
        diag_hi = tl.minimum((pid_m + 1) * BLOCK_M, T_K)
        dq = _bwd_dq_inner(dq, q, do, lse2, delta, k_base, v_base, stride_kt, stride_vt, offs_m, offs_d,
                           0, diag_lo, T_K, qk_scale, BLOCK_N, False, False, UPCAST, PRECISION)
        dq = _bwd_dq_inner(dq, q, do, lse2, delta, k_base, v_base, stride_kt, stride_vt, offs_m, offs_d,
                           diag_lo, diag_hi, T_K, qk_scale, BLOCK_N, True, True, UPCAST, PRECISION)
    else:
        full_hi = T_K // BLOCK_N * BLOCK_N
        dq = _bwd_dq_inner(dq, q, do, lse2, delta, k_base, v_base, stride_kt, stride_vt, offs_m, offs_d,
                           0, full_hi, T_K, qk_scale, BLOCK_N, False, False, UPCAST, PRECISION)
        dq = _bwd_dq_inner(dq, q, do, lse2, delta, k_base, v_base, stride_kt, stride_vt, offs_m, offs_d,
                           full_hi, T_K, T_K, qk_scale, BLOCK_N, False, True, UPCAST, PRECISION)
    dq *= sm_scale
    tl.store(DQ + pid_bh.to(tl.int64) * T_Q * HEAD_D + offs_m[:, None] * HEAD_D + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=row_ok[:, None])


INTERPRETED = isinstance(_fwd_kernel, InterpretedFunction)
"""True when this process imported Triton with TRITON_INTERPRET=1 (kernels run on CPU tensors)."""


# ----------------------------------------------------------------------------- launch configs

# (BLOCK_M, BLOCK_N, num_warps, num_stages), keyed by the largest head dim they serve. BLOCK_M
# tiles queries and BLOCK_N keys in every kernel: the forward and dQ kernels keep a query block
# resident and stream keys; the dK/dV kernel keeps a key block (and two fp32 accumulators) resident
# and streams queries, so it wants a small BLOCK_M. Every config here compiles for sm_80 and sm_90
# with no register spills per ptxas (python -m kernels.flash_aot --full --ptxas-info); the 4-warp
# D=128 variants of the D<=64 lists spill 0.1-3.5 KB, hence the separate lists. (64, 32, 4, 3)
# is there for fp32 inputs at D=128, whose 4-byte tiles leave it the only fwd/dq fit on an A100.
CONFIGS = {
    "fwd": {
        64: [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 4)],
        128: [(128, 64, 8, 3), (128, 32, 8, 4), (64, 64, 4, 4), (64, 64, 4, 3), (64, 32, 4, 3)],
    },
    "dkdv": {
        64: [(32, 128, 8, 3), (64, 128, 8, 2), (32, 64, 4, 4)],
        128: [(32, 64, 8, 3), (64, 64, 8, 3), (16, 128, 8, 3), (16, 64, 4, 4)],
    },
    "dq": {
        64: [(128, 32, 8, 3), (64, 32, 4, 4), (64, 64, 4, 3), (128, 64, 8, 3)],
        128: [(64, 32, 4, 4), (64, 64, 4, 3), (64, 64, 8, 3), (64, 32, 4, 3)],
    },
}
PREPROCESS_BLOCK_M, PREPROCESS_WARPS = 64, 4

# The interpreter ignores warps, stages and shared memory, and its cost is per program and per
# loop trip, so one large block shape is fastest there.
INTERPRETER_BLOCKS = {"fwd": (64, 64), "dkdv": (64, 64), "dq": (64, 64), "preprocess": 128}

KERNELS = {"fwd": _fwd_kernel, "dkdv": _bwd_dkdv_kernel, "dq": _bwd_dq_kernel, "preprocess": _bwd_preprocess}


def shared_bytes_estimate(kernel: str, config: tuple, head_dim: int, elem_bytes: int) -> int:
    """Upper estimate of the shared memory one program of ``kernel`` needs on sm_80/sm_90."""
    # Tile buffers: with triton 3.9 these match sm_90's allocation to within 1 KB (sm_80 needs
    # less); 2 KB covers the rest. tests/test_flash_aot.py checks it stays an upper bound.
    block_m, block_n, _, stages = config
    if kernel == "fwd":  # K and V tiles per pipeline stage, plus Q
        tiles = 2 * block_n * head_dim * stages + block_m * head_dim
    elif kernel == "dkdv":  # Q and dO tiles per stage, plus resident K and V
        tiles = 2 * block_m * head_dim * stages + 2 * block_n * head_dim
    elif kernel == "dq":  # K and V tiles per stage, plus resident Q and dO
        tiles = 2 * block_n * head_dim * stages + 2 * block_m * head_dim
    else:
        raise ValueError(f"unknown kernel {kernel!r}")
    return tiles * elem_bytes + 2048


def configs_for(kernel: str, head_dim: int) -> list[tuple]:
    """The shipped autotune configs of ``kernel`` for this head dim."""
    table = CONFIGS[kernel]
    return table[min(d for d in table if d >= head_dim)]


def prune_configs(kernel: str, head_dim: int, elem_bytes: int, shared_limit: int) -> list[tuple]:
    """Configs of ``kernel`` for ``head_dim`` whose estimated shared memory fits (never empty)."""
    configs = configs_for(kernel, head_dim)
    fits = [c for c in configs if shared_bytes_estimate(kernel, c, head_dim, elem_bytes) <= shared_limit]
    return fits or [min(configs, key=lambda c: shared_bytes_estimate(kernel, c, head_dim, elem_bytes))]


_AUTOTUNED: dict = {}


def autotuned(kernel: str):
    """``kernel`` wrapped in triton.autotune over its pruned configs, keyed on lengths, D and causal."""
    if kernel not in _AUTOTUNED:

        def early_prune(configs, named_args, **kwargs):
            args = {**named_args, **kwargs}
            q = args["Q"]
            props = triton.runtime.driver.active.utils.get_device_properties(q.device.index)
            keep = set(prune_configs(kernel, args["HEAD_D"], q.element_size(), props["max_shared_mem"]))
            return [c for c in configs if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) in keep]

        every = {cfg for table in CONFIGS[kernel].values() for cfg in table}
        configs = [
            triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s) for bm, bn, w, s in sorted(every)
        ]
        _AUTOTUNED[kernel] = triton.autotune(
            configs=configs, key=["T_Q", "T_K", "HEAD_D", "CAUSAL"], prune_configs_by={"early_config_prune": early_prune}
        )(KERNELS[kernel])
    return _AUTOTUNED[kernel]

"""FlashAttention-2 in Triton: ``flash_attention(q, k, v, causal=True, scale=None)``.

The kernels live in ``kernels/flash_triton.py`` and are imported on the first call, so importing
this module never imports Triton. On CUDA the kernels are compiled and autotuned; on a CPU they
run only under Triton's interpreter (``TRITON_INTERPRET=1`` set before Python starts), slowly but
with the same code. There is no silent fallback to another implementation.

Supported: head dims 16, 32, 64, 128 (others raise ConfigError, a ValueError, rather than being padded, so the
cost of a padded head never hides in a benchmark); fp16, bf16 and fp32 inputs, accumulated in
fp32. fp32 inputs use ``input_precision="ieee"`` in ``tl.dot``, so fp32 means fp32 and not tf32.
Any (batch, head, time) strides are read directly; a non-unit stride along D is copied first.
"""
from __future__ import annotations

import os

import torch

from kernels._checks import check_qkv, resolve_scale
from trainer.errors import ConfigError, UnavailableError

SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

_NO_INTERPRETER = (
    "flash_attention got CPU tensors, but without a GPU its Triton kernel runs only under Triton's "
    "interpreter: set TRITON_INTERPRET=1 before starting Python to run the real kernel (slowly) on "
    "the CPU, or use attn=online"
)


def _kernels():
    """Import the Triton kernels module on first use, with errors that say what to do."""
    try:
        from kernels import flash_triton
    except ModuleNotFoundError as err:
        if err.name and err.name.split(".")[0] == "triton":
            raise UnavailableError(
                "flash_attention needs Triton, which is not installed: pip install triton, or use attn=online"
            ) from err
        raise
    return flash_triton


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> None:
    check_qkv(q, k, v, causal, "flash_attention")
    if causal and q.shape[-2] != k.shape[-2]:  # TODO(kv-cache): end-aligned causal mask not implemented here yet
        raise ValueError(f"flash_attention: causal=True with Tq={q.shape[-2]} != Tk={k.shape[-2]} is not supported yet")
    if q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"flash_attention: dtype {q.dtype} is not supported; use float16, bfloat16 or float32")
    if q.shape[-1] not in SUPPORTED_HEAD_DIMS:
        raise ConfigError(
            f"flash_attention: head dim D={q.shape[-1]} is not supported; use one of {SUPPORTED_HEAD_DIMS} "
            "(choose n_embd / n_head accordingly) or another attention implementation"
        )
    if q.shape[2] == 0 or k.shape[2] == 0:
        raise ValueError(f"flash_attention: empty sequence (Tq={q.shape[2]}, Tk={k.shape[2]})")
    if q.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise UnavailableError(_NO_INTERPRETER)
    if q.device.type not in ("cpu", "cuda"):
        raise UnavailableError(f"flash_attention runs on CUDA devices (or the CPU interpreter), not {q.device.type}")


def _unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    # kernels assume unit stride along D (vectorized loads); B, H, T strides may be anything
    return t if t.stride(-1) == 1 else t.contiguous()


def _launch_opts(fk, q: torch.Tensor) -> tuple[bool, dict]:
    """Whether kernels are interpreted, and the dtype-dependent constexprs every kernel takes."""
    if q.device.type == "cpu" and not fk.INTERPRETED:
        raise UnavailableError(
            "flash_attention: TRITON_INTERPRET=1 was set after Triton was imported; set it before "
            "starting Python, or use attn=online"
        )
    upcast = fk.INTERPRETED and q.dtype == torch.bfloat16  # the interpreter's bf16 tl.dot is wrong
    precision = "ieee" if q.dtype == torch.float32 else "tf32"  # tf32 only matters for fp32 operands
    return fk.INTERPRETED, dict(UPCAST=upcast, PRECISION=precision)


def _kernel_and_blocks(fk, name: str, interpreted: bool):
    if interpreted:
        bm, bn = fk.INTERPRETER_BLOCKS[name]
        return fk.KERNELS[name], dict(BLOCK_M=bm, BLOCK_N=bn)
    return fk.autotuned(name), {}


def _forward(q, k, v, causal: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    fk = _kernels()
    interpreted, opts = _launch_opts(fk, q)
    B, H, T_Q, D = q.shape
    T_K = k.shape[2]
    o = torch.empty((B, H, T_Q, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, T_Q), dtype=torch.float32, device=q.device)
    kernel, blocks = _kernel_and_blocks(fk, "fwd", interpreted)
    grid = lambda meta: (-(-T_Q // meta["BLOCK_M"]), B * H)  # noqa: E731
    kernel[grid](
        q, k, v, o, lse, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
        H, T_Q, T_K, scale * _LOG2E, HEAD_D=D, CAUSAL=causal, **opts, **blocks,
    )
    return o, lse


def _backward(q, k, v, o, lse, do, causal: bool, scale: float) -> tuple[torch.Tensor, ...]:
    fk = _kernels()
    interpreted, opts = _launch_opts(fk, q)
    B, H, T_Q, D = q.shape
    T_K = k.shape[2]
    delta = torch.empty_like(lse)
    block = fk.INTERPRETER_BLOCKS["preprocess"] if interpreted else fk.PREPROCESS_BLOCK_M
    fk._bwd_preprocess[(-(-T_Q // block), B * H)](
        o, do, delta, *do.stride()[:3], H, T_Q, HEAD_D=D, BLOCK_M=block,
        **({} if interpreted else dict(num_warps=fk.PREPROCESS_WARPS)),
    )
    dq = torch.empty((B, H, T_Q, D), dtype=q.dtype, device=q.device)
    dk = torch.empty((B, H, T_K, D), dtype=k.dtype, device=k.device)
    dv = torch.empty_like(dk)
    strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3])
    scalars = (H, T_Q, T_K, scale * _LOG2E, scale)
    kernel, blocks = _kernel_and_blocks(fk, "dkdv", interpreted)
    grid = lambda meta: (-(-T_K // meta["BLOCK_N"]), B * H)  # noqa: E731
    kernel[grid](q, k, v, do, lse, delta, dk, dv, *strides, *scalars, HEAD_D=D, CAUSAL=causal, **opts, **blocks)
    kernel, blocks = _kernel_and_blocks(fk, "dq", interpreted)
    grid = lambda meta: (-(-T_Q // meta["BLOCK_M"]), B * H)  # noqa: E731
    kernel[grid](q, k, v, do, lse, delta, dq, *strides, *scalars, HEAD_D=D, CAUSAL=causal, **opts, **blocks)
    return dq, dk, dv


_LOG2E = 1.4426950408889634


class FlashAttentionFunction(torch.autograd.Function):
    """Autograd wrapper: saves Q, K, V, O and the per-row log-sum-exp; recomputes P in backward."""

    @staticmethod
    def forward(ctx, q, k, v, causal: bool, scale: float):
        q, k, v = (_unit_last_stride(t) for t in (q, k, v))
        o, lse = _forward(q, k, v, causal, scale)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.causal, ctx.scale = causal, scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = _backward(q, k, v, o, lse, _unit_last_stride(do), ctx.causal, ctx.scale)
        return dq, dk, dv, None, None


def flash_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True, scale: float | None = None
) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v on (B, H, T, D) tensors with the Triton FlashAttention-2 kernels."""
    _check(q, k, v, causal)
    return FlashAttentionFunction.apply(q, k, v, bool(causal), resolve_scale(scale, q.shape[-1]))

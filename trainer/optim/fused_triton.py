"""Fused AdamW and Lion steps in Triton: one kernel reads p, g and the state once and writes them once.

The foreach path runs ~8 elementwise ops per AdamW step, each streaming all buffers through
memory; on a GPU this kernel does one pass. Optional: importing ``trainer.optim`` never imports
this module (or Triton). ``adamw_fused`` / ``lion_fused`` take the parameter, gradient and state
lists the foreach paths take (adam.py's and lion.py's ``*_fused`` call them) and launch one kernel
per parameter. They need CUDA tensors, or CPU tensors
under Triton's interpreter (``TRITON_INTERPRET=1`` set before Triton is imported), which is how
tests/test_optim.py checks them against the foreach path without a GPU.
"""
from __future__ import annotations

import contextlib
import math
import os

import triton
import triton.language as tl
import torch
from torch import Tensor

BLOCK = 1024


@triton.jit
def adamw_kernel(
    p_ptr, g_ptr, m_ptr, v_ptr, n_elements,
    decay, beta1, beta2, step_size, eps_hat,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_elements
    # all math in fp32, whatever the storage dtype; cast only on store
    p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    m = beta1 * m + (1.0 - beta1) * g
    v = beta2 * v + (1.0 - beta2) * g * g
    # p = p*(1 - lr*wd) - lr/bc1 * m / (sqrt(v)/sqrt(bc2) + eps), with sqrt(bc2) folded in
    p = p * decay + step_size * tl.div_rn(m, tl.sqrt_rn(v) + eps_hat)
    tl.store(p_ptr + offs, p.to(p_ptr.dtype.element_ty), mask=mask)
    tl.store(m_ptr + offs, m.to(m_ptr.dtype.element_ty), mask=mask)
    tl.store(v_ptr + offs, v.to(v_ptr.dtype.element_ty), mask=mask)


@triton.jit
def lion_kernel(
    p_ptr, g_ptr, m_ptr, n_elements,
    decay, lr, beta1, beta2,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_elements
    p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    c = beta1 * m + (1.0 - beta1) * g
    sign = tl.where(c > 0, 1.0, tl.where(c < 0, -1.0, 0.0))
    p = p * decay - lr * sign
    m = beta2 * m + (1.0 - beta2) * g
    tl.store(p_ptr + offs, p.to(p_ptr.dtype.element_ty), mask=mask)
    tl.store(m_ptr + offs, m.to(m_ptr.dtype.element_ty), mask=mask)


def _on_device(t: Tensor):
    """Triton launches on the current CUDA device, which need not be the tensor's: make it so."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def _check(tensors: list[Tensor]) -> None:
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    for t in tensors:
        if t.device.type != "cuda" and not interpreted:
            raise RuntimeError(
                f"fused=True needs a CUDA device (Triton kernel), got a tensor on {t.device}; use "
                "foreach=True on CPU, or TRITON_INTERPRET=1 to debug the kernel"
            )
        if not t.is_contiguous():
            raise RuntimeError("the fused Triton optimizer step needs contiguous tensors")


def adamw_fused(
    params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
    steps: list[Tensor], *, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
) -> None:
    """AdamW (decoupled decay, no amsgrad/maximize) in one kernel per parameter."""
    for p, g, m, v, step in zip(params, grads, exp_avgs, exp_avg_sqs, steps):
        _check([p, g, m, v])
        step += 1
        t = step.item()
        bc2_sqrt = math.sqrt(1 - beta2**t)
        n = p.numel()
        if n == 0:  # a grid of 0 programs is not a valid launch
            continue
        with _on_device(p):
            adamw_kernel[(triton.cdiv(n, BLOCK),)](
                p, g, m, v, n, 1 - lr * weight_decay, beta1, beta2,
                -lr * bc2_sqrt / (1 - beta1**t), eps * bc2_sqrt, BLOCK=BLOCK,
            )


def lion_fused(
    params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
    *, lr: float, beta1: float, beta2: float, weight_decay: float,
) -> None:
    """Lion (no maximize) in one kernel per parameter."""
    for p, g, m in zip(params, grads, exp_avgs):
        _check([p, g, m])
        n = p.numel()
        if n == 0:
            continue
        with _on_device(p):
            lion_kernel[(triton.cdiv(n, BLOCK),)](
                p, g, m, n, 1 - lr * weight_decay, lr, beta1, beta2, BLOCK=BLOCK,
            )


def aot_compile(cc: int = 90, dtypes: tuple[str, ...] = ("fp32", "bf16")) -> list[dict]:
    """Compile both kernels for an NVIDIA target without a GPU (run without TRITON_INTERPRET)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    rows = []
    for kernel, n_ptr in ((adamw_kernel, 4), (lion_kernel, 3)):
        for dtype in dtypes:
            sig, attrs = {}, {}
            for i, name in enumerate(kernel.arg_names):
                if i < n_ptr:
                    sig[name] = f"*{dtype}"
                    attrs[(i,)] = [["tt.divisibility", 16]]  # what the JIT infers for aligned tensors
                elif name == "n_elements":
                    sig[name] = "i32"
                elif name == "BLOCK":
                    sig[name] = "constexpr"
                else:
                    sig[name] = "fp32"
            src = ASTSource(fn=kernel, signature=sig, constexprs={"BLOCK": BLOCK}, attrs=attrs)
            compiled = triton.compile(src, target=GPUTarget("cuda", cc, 32), options={"num_warps": 4})
            rows.append({"kernel": kernel.fn.__name__, "dtype": dtype, "cc": cc,
                         "ptx_bytes": len(compiled.asm["ptx"]), "shared": compiled.metadata.shared})
    return rows


if __name__ == "__main__":
    import json

    for row in aot_compile():
        print(json.dumps(row))

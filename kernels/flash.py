"""FlashAttention-2 in Triton: ``flash_attention(q, k, v, causal=True, scale=None, window=None)``.

The kernels live in ``kernels/flash_triton.py`` and are imported on the first call, so importing
this module never imports Triton. On CUDA the kernels are compiled, and each is launched with a
config from ``kernels/flash_configs.py`` that fits the GPU's shared memory, tuned once per bucket
of sequence lengths (pinned under ``torch.use_deterministic_algorithms(True)``). On a CPU they run
only under Triton's interpreter (``TRITON_INTERPRET=1`` set before Python starts), slowly but with
the same code. There is no silent fallback to another implementation.

Two paths run the same kernels:

- eager calls go through ``_FlashFunction`` (a plain ``torch.autograd.Function``) and a launch
  plan (``kernels/flash_launch.py``) made once per (shapes, strides, dtype, device, causal,
  window, settings): the inputs are checked, the configs chosen, the grids and argument tuples worked out
  and, on a GPU, each kernel's compiled binary kept, so a later call with the same key only
  allocates its outputs and launches those binaries through Triton's low-level launcher (skipping
  ``JITFunction.run``'s per-call argument binding and cache lookup, the largest host cost measured
  on an H200);
- ``torch.compile``, ``torch.export``, fake tensors and dispatch modes see the ops
  ``gptlab::flash_attn_fwd`` / ``gptlab::flash_attn_bwd`` of ``kernels/flash_ops.py``
  (``torch.library.triton_op``), whose Triton kernels Inductor sees and launches itself. Their
  configs are looked up, never measured, while tracing (``flash_launch.traced_config``).

``TRITON_PRINT_AUTOTUNING=1`` (Triton's own switch) prints one line to stderr per tuning: the
kernel, head dim, dtype, length bucket, the config picked and every candidate's time; and one
line when a trace had to use the pinned config of a bucket this process has not tuned.

Supported: head dims 16, 32, 64, 128 (others raise rather than being padded, so the cost of a
padded head never hides in a benchmark); fp16, bf16 and fp32 inputs, accumulated in fp32. fp32
inputs multiply in full fp32 (``input_precision="ieee"``) unless TF32 is enabled for matmuls
(``torch.backends.cuda.matmul.fp32_precision = "tf32"``, the trainer's ``tf32=true``), in which
case they use TF32 like every other fp32 matmul of the run. Causal attention with Tq != Tk uses
the end-aligned mask (a KV cache's new queries see the whole cache). Any (batch, head, time)
strides are read directly; a non-unit stride along D is copied first.

``window=W`` (causal only) is a sliding window on that mask: query i, at key position
``p = i + (Tk - Tq)``, sees keys ``p - W < j <= p`` (its own and the W - 1 before). The kernels
skip the key (or query) blocks outside every row's window and mask only the tiles on its edges,
so the cost grows with W, not with T; ``window=None`` runs the unchanged causal kernels.
"""
from __future__ import annotations

import torch

from kernels import check_window, resolve_scale, tf32_enabled  # noqa: F401 (tf32_enabled: flash's fp32 switch)
from kernels import flash_launch as launch
from kernels.flash_launch import SUPPORTED_DTYPES, SUPPORTED_HEAD_DIMS, Plan, check, unit_last_stride

__all__ = ["flash_attention", "SUPPORTED_DTYPES", "SUPPORTED_HEAD_DIMS", "tf32_enabled"]


class _FlashFunction(torch.autograd.Function):
    """The eager path: the kernels behind autograd's cheapest Python wrapper.

    On an H200 a forward+backward through the registered ``torch.library`` op took 0.73-0.88 ms
    of host time at T=512-1024, where its kernels ran in 0.06-0.16 ms; this Function with
    Triton's own launcher took 0.55-0.59 ms. Plans take the per-call Python out of it."""

    @staticmethod
    def forward(ctx, q, k, v, plan: Plan, scale: float):
        o, lse = plan.forward(q, k, v, scale)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.plan, ctx.scale = plan, scale
        return o

    @staticmethod
    @torch.autograd.function.once_differentiable  # no double backward: say so instead of a silent zero
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = ctx.plan.backward(q, k, v, o, lse, do, ctx.scale)
        return dq, dk, dv, None, None


def ops():
    """``kernels/flash_ops.py``, imported (the ops registered, Triton imported) on first use."""
    from kernels import flash_ops

    return flash_ops


def _needs_op(q: torch.Tensor) -> bool:
    """Whether this call must go through the registered op: under torch.compile / export, with
    tensor subclasses (fake tensors), or inside a dispatch mode (they see ops, not launches)."""
    return (torch.compiler.is_compiling() or type(q) is not torch.Tensor
            or torch.utils._python_dispatch._get_current_dispatch_mode() is not None)


def flash_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True, scale: float | None = None,
    window: int | None = None,
) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v on (B, H, T, D) tensors with the Triton FlashAttention-2 kernels;
    ``window``: each query sees only its ``window`` latest keys (causal sliding window)."""
    if window is not None:  # before the plan lookup: True would find window=1's plan
        check_window(window, causal, "flash_attention")
    if _needs_op(q):
        check(q, k, v)
        q, k, v = (unit_last_stride(t) for t in (q, k, v))
        return ops().flash_attn_fwd(q, k, v, bool(causal), resolve_scale(scale, q.shape[-1]),
                                    -1 if window is None else window)[0]
    try:
        plan = launch.PLANS[launch.key(q, k, v, causal, window)]
    except (KeyError, AttributeError, TypeError):  # first sight, or not tensors (check says what is wrong)
        check(q, k, v)
        if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
            q, k, v = (unit_last_stride(t) for t in (q, k, v))
        plan = launch.plan_for(q, k, v, causal, window)
    scale = plan.scale if scale is None else float(scale)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return _FlashFunction.apply(q, k, v, plan, scale)
    return plan.forward(q, k, v, scale)[0]

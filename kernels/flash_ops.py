"""The flash kernels as ``torch.library`` ops: what torch.compile, torch.export, fake tensors and
dispatch modes see of ``flash_attention``. Imported by ``kernels.flash.ops()`` on first use (it
imports Triton); eager calls never come here (``kernels/flash.py``'s plans launch the same kernels).

- ``gptlab::flash_attn_fwd(q, k, v, causal, scale, window=-1) -> (out, lse)`` and
  ``gptlab::flash_attn_bwd(do, q, k, v, o, lse, causal, scale, window=-1) -> (dq, dk, dv)``, with
  the backward registered as the forward's autograd formula. ``window`` is a plain int, -1 for
  none: torch 2.13 would infer ``SymInt?`` from ``int | None``, but a plain int with a default
  keeps the schema the same shape in older torch versions and the 5-argument calls working.
- On a GPU both are ``torch.library.triton_op``: their bodies are ordinary PyTorch (allocations)
  plus ``wrap_triton`` launches, so AOTAutograd traces through them and Inductor sees each Triton
  kernel (a ``triton_kernel_wrapper_functional`` node with its grid and constexprs) and launches
  it from its own generated code: no opaque op, no graph break, and CUDA graphs capture the
  launches like any Inductor kernel. Each launch's config comes from ``flash.traced_config``:
  the tuning cache's pick for this device, dtype, head dim, mask and length bucket, or the pinned
  candidate while the bucket is untuned. Tracing never measures anything.
- Under Triton's CPU interpreter the kernels are plain Python functions that torch cannot trace
  (``wrap_triton`` returns them unwrapped and they would run on fake tensors), so there the ops
  are opaque ``torch.library.custom_op``s with shape-only fake implementations: torch.compile
  on a CPU traces the model around them and runs the real interpreted kernels at run time.
"""
from __future__ import annotations

import contextlib

import torch
from torch.library import wrap_triton

from kernels import check_window
from kernels import flash_launch as flash
from kernels.flash_triton import INTERPRETED, _bwd_dkdv_kernel, _bwd_dq_kernel, _bwd_preprocess, _fwd_kernel

FWD, BWD = "gptlab::flash_attn_fwd", "gptlab::flash_attn_bwd"


def _guard(q: torch.Tensor):
    # a real tensor on a non-current GPU (a dispatch mode's eager call); traced code needs none
    return flash.on_device(q) if type(q) is torch.Tensor else contextlib.nullcontext()


def _window(window: int, causal: bool, op: str) -> int | None:
    """The op's window argument (-1: none) as flash_attention's, checked the same way."""
    window = None if window == -1 else int(window)  # a symbolic int is specialized: it is a constexpr
    check_window(window, causal, op)
    return window


def _fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float, window: int = -1
         ) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse): the attention output and each row's natural-log log-sum-exp (float32)."""
    fk = flash.kernels_for(q)
    B, H, T_Q, D = q.shape
    T_K = k.shape[2]
    o = torch.empty((B, H, T_Q, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, T_Q), dtype=torch.float32, device=q.device)
    consts = flash.constexprs(fk, q, causal, _window(window, causal, FWD))
    cfg = flash.traced_config(fk, "fwd", q, T_Q, T_K, consts)
    with _guard(q):
        wrap_triton(_fwd_kernel)[flash.grid("fwd", cfg, T_Q, T_K, B * H)](
            q, k, v, o, lse, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], H, T_Q, T_K, scale * flash.LOG2E,
            **flash.meta("fwd", cfg, consts, fk.INTERPRETED))
    return o, lse


def _bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
         causal: bool, scale: float, window: int = -1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) from the forward's saved tensors; P is recomputed from lse, never stored."""
    fk = flash.kernels_for(q)
    do = flash.unit_last_stride(do)
    B, H, T_Q, D = q.shape
    T_K = k.shape[2]
    consts = flash.constexprs(fk, q, causal, _window(window, causal, BWD))
    dq = torch.empty((B, H, T_Q, D), dtype=q.dtype, device=q.device)
    dk = torch.empty((B, H, T_K, D), dtype=k.dtype, device=k.device)
    dv = torch.empty((B, H, T_K, D), dtype=v.dtype, device=v.device)
    delta = torch.empty((B, H, T_Q), dtype=torch.float32, device=q.device)
    strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3])
    scalars = (H, T_Q, T_K, scale * flash.LOG2E, scale)
    pre, dkdv, dq_cfg = (flash.traced_config(fk, n, q, T_Q, T_K, consts) for n in ("preprocess", "dkdv", "dq"))
    with _guard(q):
        wrap_triton(_bwd_preprocess)[flash.grid("preprocess", pre, T_Q, T_K, B * H)](
            o, do, delta, *do.stride()[:3], H, T_Q, **flash.meta("preprocess", pre, consts, fk.INTERPRETED))
        wrap_triton(_bwd_dkdv_kernel)[flash.grid("dkdv", dkdv, T_Q, T_K, B * H)](
            q, k, v, do, lse, delta, dk, dv, *strides, *scalars, **flash.meta("dkdv", dkdv, consts, fk.INTERPRETED))
        wrap_triton(_bwd_dq_kernel)[flash.grid("dq", dq_cfg, T_Q, T_K, B * H)](
            q, k, v, do, lse, delta, dq, *strides, *scalars, **flash.meta("dq", dq_cfg, consts, fk.INTERPRETED))
    return dq, dk, dv


def _fwd_shapes(q, k, v, causal, scale, window=-1):
    B, H, T_Q, D = q.shape
    return q.new_empty((B, H, T_Q, D)), q.new_empty((B, H, T_Q), dtype=torch.float32)


def _bwd_shapes(do, q, k, v, o, lse, causal, scale, window=-1):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


if INTERPRETED:  # opaque ops around kernels torch cannot trace (see the module docstring)
    flash_attn_fwd = torch.library.custom_op(FWD, _fwd, mutates_args=())
    flash_attn_fwd.register_fake(_fwd_shapes)
    flash_attn_bwd = torch.library.custom_op(BWD, _bwd, mutates_args=())
    flash_attn_bwd.register_fake(_bwd_shapes)
else:
    flash_attn_fwd = torch.library.triton_op(FWD, _fwd, mutates_args=())
    flash_attn_bwd = torch.library.triton_op(BWD, _bwd, mutates_args=())


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, causal, scale, window = inputs
    ctx.save_for_backward(q, k, v, *output)
    ctx.causal, ctx.scale, ctx.window = causal, scale, window
    ctx.mark_non_differentiable(output[1])  # lse


def _backward_rule(ctx, do, _dlse):
    q, k, v, o, lse = ctx.saved_tensors
    dq, dk, dv = flash_attn_bwd(do, q, k, v, o, lse, ctx.causal, ctx.scale, ctx.window)
    return dq, dk, dv, None, None, None


flash_attn_fwd.register_autograd(_backward_rule, setup_context=_setup_context)

"""Fast paths: the same updates as the readable rules, as multi-tensor ``torch._foreach_*`` ops.

Kept apart from the rules on purpose: read adam.py, sgd.py or lion.py to learn an optimizer; read
this file to see how it is made fast. Each function here takes the lists the base class gathers
(params, grads, per-parameter state dicts) and the group's hyperparameters, and is tested equal to
its rule (tests/test_optim.py). They earn their place on CPU (scripts/bench_optim.py, one thread):
the foreach ops loop in C++, and ``cpu_pieces`` keeps the buffers in cache between ops.

``fused=True`` runs the Triton kernels in fused_triton.py (imported only then).
"""
from __future__ import annotations

import importlib.util
import math
from collections import defaultdict
from typing import Any

import torch
from torch import Tensor

from trainer.optim.base import triton_interpreted

# --- AdamW / Adam ----------------------------------------------------------------------------


def adam_foreach(params: list[Tensor], grads: list[Tensor], states: list[dict], *, lr: float,
                 betas: tuple[float, float], eps: float, weight_decay: float, amsgrad: bool,
                 maximize: bool, decoupled_weight_decay: bool) -> None:
    """adam.adam_update over lists, per (device, dtype) bucket and CPU piece."""
    beta1, beta2 = betas
    keys = ["exp_avg", "exp_avg_sq", "max_exp_avg_sq" if amsgrad else "exp_avg_sq", "step"]
    lists = [params, grads] + [[s[k] for s in states] for k in keys]
    for *tensors, steps in group_by_device_dtype(*lists).values():
        torch._foreach_add_(steps, 1.0)
        ts = [s.item() for s in steps]  # CPU tensors: no device sync
        bc1 = [1.0 - beta1**t for t in ts]
        bc2_sqrt = [math.sqrt(1.0 - beta2**t) for t in ts]
        # Fold sqrt(1 - beta2^t) into eps and the step size instead of dividing sqrt(v) by it:
        #   lr/bc1 * m / (sqrt(v)/bc2_sqrt + eps) == (lr*bc2_sqrt/bc1) * m / (sqrt(v) + eps*bc2_sqrt)
        # which saves a full pass over the buffers each step.
        step_sizes = [-lr * b / c for b, c in zip(bc2_sqrt, bc1)]
        eps_hats = [eps * b for b in bc2_sqrt]
        uniform = len(set(ts)) == 1  # the usual case: every parameter took the same number of steps
        for (p, g, m, v, v_max), owners in cpu_pieces(tensors):
            if uniform:
                step_size, eps_hat = step_sizes[0], eps_hats[0]
            else:
                step_size, eps_hat = [step_sizes[i] for i in owners], [eps_hats[i] for i in owners]
            if maximize:
                g = torch._foreach_neg(g)  # a copy: we may now update it in place
            if weight_decay != 0:
                if decoupled_weight_decay:
                    torch._foreach_mul_(p, 1 - lr * weight_decay)
                elif maximize:
                    torch._foreach_add_(g, p, alpha=weight_decay)
                else:
                    g = torch._foreach_add(g, p, alpha=weight_decay)  # never write into .grad
            torch._foreach_lerp_(m, g, 1 - beta1)
            torch._foreach_mul_(v, beta2)
            torch._foreach_addcmul_(v, g, g, 1 - beta2)
            if amsgrad:
                torch._foreach_maximum_(v_max, v)
                v = v_max
            denom = torch._foreach_sqrt(v)
            torch._foreach_add_(denom, eps_hat)
            torch._foreach_addcdiv_(p, m, denom, step_size)


# --- Lion ------------------------------------------------------------------------------------


def lion_foreach(params: list[Tensor], grads: list[Tensor], states: list[dict], *, lr: float,
                 betas: tuple[float, float], weight_decay: float, maximize: bool) -> None:
    """lion.lion_update over lists, per (device, dtype) bucket and CPU piece."""
    beta1, beta2 = betas
    exp_avgs = [s["exp_avg"] for s in states]
    for tensors in group_by_device_dtype(params, grads, exp_avgs).values():
        for (p, g, m), _ in cpu_pieces(tensors):
            if maximize:
                g = torch._foreach_neg(g)
            update = torch._foreach_lerp(m, g, 1 - beta1)
            torch._foreach_sign_(update)
            if weight_decay != 0:
                torch._foreach_mul_(p, 1 - lr * weight_decay)
            torch._foreach_add_(p, update, alpha=-lr)
            torch._foreach_lerp_(m, g, 1 - beta2)


# --- SGD -------------------------------------------------------------------------------------


def sgd_foreach(params: list[Tensor], grads: list[Tensor], states: list[dict], *, lr: float,
                momentum: float, dampening: float, weight_decay: float, nesterov: bool,
                maximize: bool) -> None:
    """sgd.sgd_update over lists, per (device, dtype) bucket and CPU piece."""
    from trainer.optim.sgd import sgd_update

    hp = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
              nesterov=nesterov, maximize=maximize)
    if momentum != 0:
        # a first step starts a buffer at the gradient: rare, so the rule itself does it
        fresh = [i for i, s in enumerate(states) if "momentum_buffer" not in s]
        for i in fresh:
            sgd_update(params[i], grads[i], states[i], **hp)
        if fresh:
            rest = sorted(set(range(len(params))) - set(fresh))
            params, grads, states = ([xs[i] for i in rest] for xs in (params, grads, states))
    lists = [params, grads] + ([[s["momentum_buffer"] for s in states]] if momentum != 0 else [])
    for tensors in group_by_device_dtype(*lists).values():
        for pieces, _ in cpu_pieces(tensors):
            _sgd_piece(*pieces, **hp)


def _sgd_piece(p, g, bufs=None, *, lr, momentum, dampening, weight_decay, nesterov, maximize):
    if maximize:
        g = torch._foreach_neg(g)  # a copy: we may now update it in place
    if weight_decay != 0:
        if maximize:
            torch._foreach_add_(g, p, alpha=weight_decay)
        else:
            g = torch._foreach_add(g, p, alpha=weight_decay)  # never write into .grad
    if bufs is not None:
        torch._foreach_mul_(bufs, momentum)
        torch._foreach_add_(bufs, g, alpha=1 - dampening)
        if nesterov:
            # p -= lr * (g + momentum * buf), as two in-place adds: no temporary list
            torch._foreach_add_(p, g, alpha=-lr)
            torch._foreach_add_(p, bufs, alpha=-lr * momentum)
            return
        g = bufs
    torch._foreach_add_(p, g, alpha=-lr)


# --- fused Triton steps ----------------------------------------------------------------------


def adamw_fused(params: list[Tensor], grads: list[Tensor], states: list[dict], *, lr: float,
                betas: tuple[float, float], eps: float, weight_decay: float, **_: Any) -> None:
    """AdamW in one Triton kernel per parameter (check_fused_group has ruled out what it can't do;
    L2 decay only when weight_decay is 0, where it equals decoupled decay)."""
    from trainer.optim import fused_triton

    fused_triton.adamw_fused(params, grads, [s["exp_avg"] for s in states],
                             [s["exp_avg_sq"] for s in states], [s["step"] for s in states],
                             lr=lr, beta1=betas[0], beta2=betas[1], eps=eps, weight_decay=weight_decay)


def lion_fused(params: list[Tensor], grads: list[Tensor], states: list[dict], *, lr: float,
               betas: tuple[float, float], weight_decay: float, **_: Any) -> None:
    """Lion in one Triton kernel per parameter."""
    from trainer.optim import fused_triton

    fused_triton.lion_fused(params, grads, [s["exp_avg"] for s in states], lr=lr, beta1=betas[0],
                            beta2=betas[1], weight_decay=weight_decay)


# Storage dtypes the fused Triton kernels handle (their math is fp32; float64 would lose precision).
FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_fused_group(optimizer: str, group: dict[str, Any], unsupported: tuple[str, ...]) -> None:
    """Reject what the fused Triton step cannot do, naming the argument: never fall back silently."""
    if group["foreach"]:
        raise ValueError(f"{optimizer}: fused=True and foreach=True cannot be used together; pick one")
    for key in unsupported:
        if group.get(key):
            raise ValueError(f"{optimizer}(fused=True) does not support {key}=True; use foreach=True")
    for p in group["params"]:
        if torch.is_complex(p):
            raise ValueError(f"{optimizer}(fused=True) does not support complex parameters; use foreach=True")
        if p.dtype not in FUSED_DTYPES:
            raise ValueError(
                f"{optimizer}(fused=True) supports float32, float16 and bfloat16 parameters, "
                f"got {p.dtype}; use foreach=True"
            )
        if p.device.type != "cuda" and not (triton_interpreted() and p.device.type == "cpu"):
            raise ValueError(
                f"{optimizer}(fused=True) needs a CUDA device (Triton kernel), got a parameter on "
                f"{p.device}; use foreach=True (or TRITON_INTERPRET=1 to run the kernel interpreted on CPU)"
            )
    if importlib.util.find_spec("triton") is None:
        raise ValueError(f"{optimizer}(fused=True) needs Triton installed (pip install triton); use foreach=True")


# --- grouping and cache-sized pieces -----------------------------------------------------------


def group_by_device_dtype(*tensor_lists: list) -> dict[tuple, list[list]]:
    """Split parallel lists by the first list's (device, dtype): foreach ops need one of each."""
    grouped: dict[tuple, list[list]] = defaultdict(lambda: [[] for _ in tensor_lists])
    for i, p in enumerate(tensor_lists[0]):
        lists = grouped[(p.device, p.dtype)]
        for out, src in zip(lists, tensor_lists):
            out.append(src[i])
    return dict(grouped)


# Elements per piece when a CPU foreach update is run piece by piece (see ``cpu_pieces``).
CPU_PIECE_NUMEL = 1 << 18


def cpu_pieces(tensor_lists: list[list[Tensor]], piece_numel: int | None = None):
    """Yield ``(lists of views, owner index per view)`` covering ``tensor_lists`` in small pieces.

    Why: on CPU a foreach op is a C++ loop of ordinary kernels, so an update of k ops streams every
    buffer through DRAM k times and allocates its temporaries for the whole model at once. Running
    all k ops on a piece of ~256K elements keeps the piece's buffers in cache between ops and its
    temporaries small enough to be reused by the allocator. Large contiguous tensors are split
    into flat views; small ones are packed together. Elementwise math is unchanged, so results are
    bit-identical. One piece when the buffers fit in cache anyway (a few pieces' worth: more
    foreach calls would only add overhead), and on CUDA, where foreach kernels already fuse.
    """
    piece_numel = piece_numel or CPU_PIECE_NUMEL
    first = tensor_lists[0]
    if not first or first[0].device.type != "cpu" or sum(t.numel() for t in first) <= 4 * piece_numel:
        yield tensor_lists, list(range(len(first)))
        return
    lists: list[list[Tensor]] = [[] for _ in tensor_lists]
    owners: list[int] = []
    filled = 0
    for i in range(len(first)):
        tensors = [tl[i] for tl in tensor_lists]
        numel = tensors[0].numel()
        if numel > piece_numel and all(t.is_contiguous() for t in tensors):
            flats = [t.view(-1) for t in tensors]
            for start in range(0, numel, piece_numel):
                yield [[f[start : start + piece_numel]] for f in flats], [i]
            continue
        if filled + numel > piece_numel and owners:
            yield lists, owners
            lists, owners, filled = [[] for _ in tensor_lists], [], 0
        for out, t in zip(lists, tensors):
            out.append(t)
        owners.append(i)
        filled += numel
    if owners:
        yield lists, owners

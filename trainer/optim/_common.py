"""Pieces every optimizer here shares: argument checks, gradient checks, foreach grouping."""
from __future__ import annotations

import importlib.util
import math
import os
from collections import defaultdict
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer


def as_float(value: float | Tensor) -> float:
    """Hyperparameters may arrive as 0-dim tensors (torch allows a tensor lr); the math wants floats."""
    return value.item() if isinstance(value, Tensor) else float(value)


def check_lr(lr: float | Tensor) -> None:
    if not as_float(lr) >= 0.0:  # also rejects NaN
        raise ValueError(f"Invalid learning rate: lr={lr} (must be >= 0)")


def check_betas(betas: Any) -> None:
    if len(betas) != 2:
        raise ValueError(f"Invalid betas: betas={tuple(betas)} (must be a pair (beta1, beta2))")
    for i, beta in enumerate(betas):
        if not 0.0 <= as_float(beta) < 1.0:
            raise ValueError(
                f"Invalid beta parameter at index {i}: betas={tuple(betas)} (each must be in [0, 1))"
            )


def check_eps(eps: float) -> None:
    if not eps > 0.0:
        raise ValueError(f"Invalid epsilon value: eps={eps} (must be > 0)")


def check_weight_decay(weight_decay: float | Tensor) -> None:
    if not as_float(weight_decay) >= 0.0:
        raise ValueError(f"Invalid weight_decay value: weight_decay={weight_decay} (must be >= 0)")


def check_foreach(foreach: bool | None) -> None:
    if foreach is not None and not isinstance(foreach, bool):
        raise ValueError(f"Invalid foreach value: foreach={foreach!r} (must be None, True or False)")


def check_fused(fused: bool | None) -> None:
    if fused is not None and not isinstance(fused, bool):
        raise ValueError(f"Invalid fused value: fused={fused!r} (must be None, True or False)")


def check_not_supported(group: dict[str, Any], *keys: str) -> None:
    """torch.optim flags we accept (at their defaults) so call sites swap in unchanged."""
    for key in keys:
        if group.get(key):
            raise ValueError(
                f"{key}={group[key]!r} is not supported by gptlab's optimizers (trainer.optim); "
                f"leave {key}=False or use torch.optim"
            )


# Storage dtypes the fused Triton kernels handle (their math is fp32; float64 would lose precision).
FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_fused_group(optimizer: str, group: dict[str, Any], unsupported: tuple[str, ...] = ()) -> None:
    """Reject what the fused Triton step cannot do, naming the argument: never fall back silently.

    Reads ``TRITON_INTERPRET`` now (construction and every fused step), not at import.
    """
    if not group["fused"]:
        return
    if group["foreach"]:
        raise ValueError(f"{optimizer}: fused=True and foreach=True cannot be used together; pick one")
    for key in unsupported:
        if group.get(key):
            raise ValueError(f"{optimizer}(fused=True) does not support {key}=True; use foreach=True")
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    for p in group["params"]:
        if torch.is_complex(p):
            raise ValueError(f"{optimizer}(fused=True) does not support complex parameters; use foreach=True")
        if p.dtype not in FUSED_DTYPES:
            raise ValueError(
                f"{optimizer}(fused=True) supports float32, float16 and bfloat16 parameters, "
                f"got {p.dtype}; use foreach=True"
            )
        if p.device.type != "cuda" and not (interpreted and p.device.type == "cpu"):
            raise ValueError(
                f"{optimizer}(fused=True) needs a CUDA device (Triton kernel), got a parameter on "
                f"{p.device}; use foreach=True (or TRITON_INTERPRET=1 to run the kernel interpreted on CPU)"
            )
    if importlib.util.find_spec("triton") is None:
        raise ValueError(f"{optimizer}(fused=True) needs Triton installed (pip install triton); use foreach=True")


def fused_kernels():
    """The Triton kernels, imported on first use only: ``import trainer.optim`` never imports Triton."""
    from trainer.optim import fused_triton

    return fused_triton


class PathKeepingOptimizer(Optimizer):
    """Base of our optimizers: a loaded state dict keeps this optimizer's execution path.

    torch.optim.Optimizer.load_state_dict takes every group key from the saved dict, ``foreach``
    and ``fused`` included, so a checkpoint written by a fused (GPU) run would switch a foreach
    (CPU) run to the Triton kernels. These keys choose how a step runs, not what it computes, and
    all paths keep the same state layout, so we keep the receiving optimizer's values. Groups
    saved before a key existed get its default.
    """

    PATH_DEFAULTS: dict[str, Any] = {
        "foreach": None, "fused": None, "capturable": False, "differentiable": False,
    }

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            for key, default in self.PATH_DEFAULTS.items():
                if key in self.defaults:
                    group.setdefault(key, default)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        kept = [{k: g[k] for k in self.PATH_DEFAULTS if k in g} for g in self.param_groups]
        super().load_state_dict(state_dict)
        for group, flags in zip(self.param_groups, kept):
            group.update(flags)


def float_betas(betas: Any) -> tuple[float, float]:
    """Plain floats, so a Hydra ListConfig never reaches the state dict (weights_only loads reject it)."""
    check_betas(betas)
    return as_float(betas[0]), as_float(betas[1])


def check_grad(optimizer: str, param: Tensor, allow_complex: bool = False) -> None:
    """Reject gradients the update rules here do not implement, naming the optimizer."""
    grad = param.grad
    if grad.is_sparse:
        raise RuntimeError(
            f"{optimizer} does not support sparse gradients; use torch.optim.SparseAdam, or "
            "dense gradients (e.g. nn.Embedding(..., sparse=False))"
        )
    if torch.is_complex(param) and not allow_complex:
        raise RuntimeError(f"{optimizer} does not support complex parameters")


def new_step() -> Tensor:
    """The per-parameter step counter, a CPU scalar tensor as torch.optim keeps it.

    A tensor (not an int) so the state dict matches torch's layout and loads with weights_only=True.
    Float32 unless the default dtype is float64, again as torch does.
    """
    dtype = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
    return torch.tensor(0.0, dtype=dtype)


def use_foreach(foreach: bool | None, params: list[Tensor]) -> bool:
    """Resolve ``foreach=None``.

    torch.optim only defaults to foreach on CUDA. We default to it on CPU as well: the foreach ops
    loop in C++, so they save the per-tensor Python dispatch of the single-tensor path, and with
    ``cpu_pieces`` they also keep the buffers in cache. scripts/bench_optim.py (1 thread) measured
    our foreach AdamW at ~0.5x the single-tensor step time on the nano model and ~0.35x on gpt2
    (124M). Plain tensors only (subclasses such as DTensor may not implement foreach kernels).
    """
    if foreach is not None:
        return foreach
    return all(type(p) in (Tensor, torch.nn.Parameter) for p in params)


def group_by_device_dtype(*tensor_lists: list) -> dict[tuple, list[list]]:
    """Split parallel lists by the first list's (device, dtype): foreach ops need one of each."""
    grouped: dict[tuple, list[list]] = defaultdict(lambda: [[] for _ in tensor_lists])
    for i, p in enumerate(tensor_lists[0]):
        lists = grouped[(p.device, p.dtype)]
        for out, src in zip(lists, tensor_lists):
            out.append(src[i])
    return dict(grouped)


def bias_corrections(steps: list[Tensor], beta1: float, beta2: float) -> tuple[list[float], list[float]]:
    """Adam's ``1 - beta1**t`` and ``sqrt(1 - beta2**t)`` for each parameter's own step count t."""
    ts = [s.item() for s in steps]
    return [1.0 - beta1**t for t in ts], [math.sqrt(1.0 - beta2**t) for t in ts]


def run_closure(closure) -> Any:
    """Evaluate ``closure`` (which re-computes the loss and calls backward) with grad enabled."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


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
    if (
        not first
        or first[0].device.type != "cpu"
        or sum(t.numel() for t in first) <= 4 * piece_numel
    ):
        yield tensor_lists, list(range(len(first)))
        return
    lists: list[list[Tensor]] = [[] for _ in tensor_lists]
    owners: list[int] = []
    filled = 0
    for i in range(len(tensor_lists[0])):
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

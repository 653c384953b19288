"""Lion (Chen et al., 2023, "Symbolic Discovery of Optimization Algorithms").

    c = beta1 * m + (1 - beta1) * g          # interpolate momentum and gradient
    p = p * (1 - lr * wd) - lr * sign(c)      # every coordinate moves by exactly lr
    m = beta2 * m + (1 - beta2) * g           # then update the momentum with beta2
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import Tensor

from trainer.optim._common import (
    PathKeepingOptimizer,
    as_float,
    check_foreach,
    check_fused,
    check_fused_group,
    check_grad,
    check_lr,
    check_weight_decay,
    cpu_pieces,
    float_betas,
    fused_kernels,
    group_by_device_dtype,
    run_closure,
    use_foreach,
)


def lion_single_tensor(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    weight_decay: float,
    maximize: bool,
) -> None:
    """The reference: one parameter at a time."""
    for param, grad, exp_avg in zip(params, grads, exp_avgs):
        if maximize:
            grad = -grad
        update = exp_avg.lerp(grad, 1 - beta1).sign_()
        if weight_decay != 0:
            param.mul_(1 - lr * weight_decay)
        param.add_(update, alpha=-lr)
        exp_avg.lerp_(grad, 1 - beta2)


def lion_multi_tensor(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    weight_decay: float,
    maximize: bool,
) -> None:
    """The same update with ``torch._foreach_*`` ops, per (device, dtype) bucket and CPU piece."""
    for tensors in group_by_device_dtype(params, grads, exp_avgs).values():
        for (p, g, m), _ in cpu_pieces(tensors):
            _lion_piece(p, g, m, lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay,
                        maximize=maximize)


def _lion_piece(p, g, m, *, lr, beta1, beta2, weight_decay, maximize) -> None:
    if maximize:
        g = torch._foreach_neg(g)
    update = torch._foreach_lerp(m, g, 1 - beta1)
    torch._foreach_sign_(update)
    if weight_decay != 0:
        torch._foreach_mul_(p, 1 - lr * weight_decay)
    torch._foreach_add_(p, update, alpha=-lr)
    torch._foreach_lerp_(m, g, 1 - beta2)


def lion(*args: Any, foreach: bool, **kwargs: Any) -> None:
    """Functional Lion: dispatch to the multi-tensor or the single-tensor path."""
    (lion_multi_tensor if foreach else lion_single_tensor)(*args, **kwargs)


class Lion(PathKeepingOptimizer):
    """Lion: sign of an interpolated momentum, decoupled weight decay, one state buffer.

    Use a learning rate 3-10x smaller and a weight decay 3-10x larger than for AdamW (the paper's
    advice: each step moves every coordinate by lr, a larger step than Adam's typical one).
    State per parameter: ``exp_avg``. ``fused=True`` runs one Triton kernel per parameter (CUDA,
    or CPU under ``TRITON_INTERPRET=1``; float32/16/bf16; no maximize), same state layout.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float | Tensor = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
    ) -> None:
        defaults = dict(
            lr=lr, betas=float_betas(betas), weight_decay=weight_decay, maximize=maximize,
            foreach=foreach, fused=fused,
        )
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group and check its hyperparameters (groups may override the defaults)."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        check_lr(group["lr"])
        group["betas"] = float_betas(group["betas"])
        check_weight_decay(group["weight_decay"])
        check_foreach(group["foreach"])
        check_fused(group["fused"])
        check_fused_group(type(self).__name__, group, unsupported=("maximize",))

    @torch.no_grad()
    def step(self, closure=None):
        """Take one optimization step; ``closure`` re-evaluates the model and returns the loss."""
        loss = run_closure(closure)
        name = type(self).__name__
        for group in self.param_groups:
            if group["fused"]:  # again: a loaded state dict brings its own maximize
                check_fused_group(name, group, unsupported=("maximize",))
            params, grads, exp_avgs = [], [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                check_grad(name, p)
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                params.append(p)
                grads.append(p.grad)
                exp_avgs.append(state["exp_avg"])
            if not params:
                continue
            beta1, beta2 = group["betas"]
            if group["fused"]:
                fused_kernels().lion_fused(
                    params, grads, exp_avgs, lr=as_float(group["lr"]), beta1=beta1, beta2=beta2,
                    weight_decay=as_float(group["weight_decay"]),
                )
                continue
            lion(
                params, grads, exp_avgs,
                foreach=use_foreach(group["foreach"], params),
                lr=as_float(group["lr"]), beta1=beta1, beta2=beta2,
                weight_decay=as_float(group["weight_decay"]), maximize=group["maximize"],
            )
        return loss

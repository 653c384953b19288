"""Stochastic gradient descent with optional (Nesterov) momentum, dampening and L2 weight decay."""
from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import Tensor

from trainer.optim._common import (
    PathKeepingOptimizer,
    as_float,
    check_foreach,
    check_fused,
    check_grad,
    check_lr,
    check_not_supported,
    check_weight_decay,
    cpu_pieces,
    group_by_device_dtype,
    run_closure,
    use_foreach,
)


def sgd_single_tensor(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor | None],
    *,
    lr: float,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    maximize: bool,
) -> None:
    """The reference. New momentum buffers are written back into ``momentum_buffers``."""
    for i, param in enumerate(params):
        grad = -grads[i] if maximize else grads[i]
        if weight_decay != 0:
            grad = grad.add(param, alpha=weight_decay)
        if momentum != 0:
            buf = momentum_buffers[i]
            if buf is None:  # the first step starts the buffer at the gradient, undamped
                buf = momentum_buffers[i] = grad.detach().clone()
            else:
                buf.mul_(momentum).add_(grad, alpha=1 - dampening)
            grad = grad.add(buf, alpha=momentum) if nesterov else buf
        param.add_(grad, alpha=-lr)


def sgd_multi_tensor(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor | None],
    *,
    lr: float,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    maximize: bool,
) -> None:
    """The same update with ``torch._foreach_*`` ops, per (device, dtype) bucket and CPU piece."""
    hp = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
              nesterov=nesterov, maximize=maximize)
    if momentum != 0:
        fresh = [i for i, buf in enumerate(momentum_buffers) if buf is None]
        if fresh:  # a first step starts the buffers: rare, so the reference path does it
            bufs = [None] * len(fresh)
            sgd_single_tensor([params[i] for i in fresh], [grads[i] for i in fresh], bufs, **hp)
            for i, buf in zip(fresh, bufs):
                momentum_buffers[i] = buf
            seen = set(fresh)
            rest = [i for i in range(len(params)) if i not in seen]
            params, grads = [params[i] for i in rest], [grads[i] for i in rest]
            momentum_buffers = [momentum_buffers[i] for i in rest]  # updated in place below
    lists = [params, grads, momentum_buffers] if momentum != 0 else [params, grads]
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


def sgd(*args: Any, foreach: bool, **kwargs: Any) -> None:
    """Functional SGD: dispatch to the multi-tensor or the single-tensor path."""
    (sgd_multi_tensor if foreach else sgd_single_tensor)(*args, **kwargs)


class SGD(PathKeepingOptimizer):
    """SGD with momentum, dampening, Nesterov momentum and L2 weight decay.

    Arguments and defaults mirror ``torch.optim.SGD`` (lr defaults to 1e-3 as in torch 2.13).
    With ``momentum != 0`` the state per parameter is ``momentum_buffer``, as in torch.
    Sparse gradients are rejected (torch.optim.SGD accepts them; our update rules are dense).
    ``differentiable`` and ``fused`` are accepted at their defaults; there is no fused SGD kernel.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float | Tensor = 1e-3,
        momentum: float = 0,
        dampening: float = 0,
        weight_decay: float = 0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        differentiable: bool = False,
        fused: bool | None = None,
    ) -> None:
        defaults = dict(
            lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
            nesterov=nesterov, maximize=maximize, foreach=foreach,
            differentiable=differentiable, fused=fused,
        )
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group and check its hyperparameters (groups may override the defaults)."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        check_lr(group["lr"])
        if not group["momentum"] >= 0.0:
            raise ValueError(f"Invalid momentum value: momentum={group['momentum']} (must be >= 0)")
        check_weight_decay(group["weight_decay"])
        if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
            raise ValueError(
                f"Invalid nesterov=True with momentum={group['momentum']}, "
                f"dampening={group['dampening']} (Nesterov needs momentum > 0 and dampening = 0)"
            )
        check_foreach(group["foreach"])
        check_not_supported(group, "differentiable")
        check_fused(group["fused"])
        if group["fused"]:
            raise ValueError("SGD(fused=True) is not implemented in gptlab's optimizers; use foreach=True")

    @torch.no_grad()
    def step(self, closure=None):
        """Take one optimization step; ``closure`` re-evaluates the model and returns the loss."""
        loss = run_closure(closure)
        name = type(self).__name__
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            for p in params:
                check_grad(name, p, allow_complex=True)
            bufs = [self.state[p].get("momentum_buffer") for p in params]
            sgd(
                params,
                [p.grad for p in params],
                bufs,
                foreach=use_foreach(group["foreach"], params),
                lr=as_float(group["lr"]),
                momentum=group["momentum"],
                dampening=group["dampening"],
                weight_decay=as_float(group["weight_decay"]),
                nesterov=group["nesterov"],
                maximize=group["maximize"],
            )
            if group["momentum"] != 0:
                for p, buf in zip(params, bufs):
                    self.state[p]["momentum_buffer"] = buf
        return loss

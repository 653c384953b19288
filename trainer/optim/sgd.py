"""Stochastic gradient descent with (Nesterov) momentum, dampening and L2 weight decay.

    g = g + wd * p                            # L2 decay, in the gradient
    b = momentum * b + (1 - dampening) * g    # b starts at the first gradient
    p = p - lr * (g + momentum * b if nesterov else b)
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import Tensor

from trainer.optim.base import NON_NEGATIVE, RuleOptimizer, cpu_pieces


def sgd_update(p: Tensor, grad: Tensor, state: dict[str, Tensor], *, lr: float, momentum: float,
               dampening: float, weight_decay: float, nesterov: bool, maximize: bool) -> None:
    """One parameter's SGD step."""
    grad = -grad if maximize else grad
    if weight_decay != 0:
        grad = grad.add(p, alpha=weight_decay)
    if momentum != 0:
        buf = state.get("momentum_buffer")
        if buf is None:  # the first step starts the buffer at the gradient, undamped
            buf = state["momentum_buffer"] = grad.detach().clone()
        else:
            buf.mul_(momentum).add_(grad, alpha=1 - dampening)
        grad = grad.add(buf, alpha=momentum) if nesterov else buf
    p.add_(grad, alpha=-lr)


# --- the multi-tensor (foreach) step, tested equal to sgd_update -------------------------------

def sgd_foreach(params: list[Tensor], grads: list[Tensor], states: list[dict], *, lr: float,
                momentum: float, dampening: float, weight_decay: float, nesterov: bool,
                maximize: bool) -> None:
    """sgd.sgd_update over lists of one device and dtype, in CPU pieces."""
    hp = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
              nesterov=nesterov, maximize=maximize)
    if momentum != 0:
        # a first step starts a buffer at the gradient: rare, so the rule itself does it
        fresh = [i for i, s in enumerate(states) if "momentum_buffer" not in s]
        for i in fresh:
            sgd_update(params[i], grads[i], states[i], **hp)
        if fresh:
            rest = sorted(set(range(len(params))) - set(fresh))
            if not rest:
                return
            params, grads, states = ([xs[i] for i in rest] for xs in (params, grads, states))
    lists = [params, grads] + ([[s["momentum_buffer"] for s in states]] if momentum != 0 else [])
    for pieces, _ in cpu_pieces(lists):
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


class SGD(RuleOptimizer):
    """SGD; arguments, defaults (lr 1e-3 as in torch 2.13) and state (``momentum_buffer``, with
    momentum) as ``torch.optim.SGD``. Sparse gradients are rejected (our rules are dense);
    ``differentiable`` and ``fused`` are accepted at their defaults (there is no fused SGD kernel).
    """

    RANGES = dict(lr=NON_NEGATIVE, momentum=NON_NEGATIVE, weight_decay=NON_NEGATIVE)
    allow_complex = True
    update = staticmethod(sgd_update)
    update_foreach = staticmethod(sgd_foreach)

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
        super().__init__(params, dict(
            lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
            maximize=maximize, foreach=foreach, differentiable=differentiable, fused=fused,
        ))

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
            raise ValueError(
                f"Invalid nesterov=True with momentum={group['momentum']}, "
                f"dampening={group['dampening']} (Nesterov needs momentum > 0 and dampening = 0)"
            )

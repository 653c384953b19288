"""Stochastic gradient descent with (Nesterov) momentum, dampening and L2 weight decay.

    g = g + wd * p                            # L2 decay, in the gradient
    b = momentum * b + (1 - dampening) * g    # b starts at the first gradient
    p = p - lr * (g + momentum * b if nesterov else b)
"""
from __future__ import annotations

from typing import Any, Iterable

from torch import Tensor

from trainer.optim import fast_paths
from trainer.optim.base import RuleOptimizer, at_least


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


class SGD(RuleOptimizer):
    """SGD; arguments, defaults (lr 1e-3 as in torch 2.13) and state (``momentum_buffer``, with
    momentum) as ``torch.optim.SGD``. Sparse gradients are rejected (our rules are dense);
    ``differentiable`` and ``fused`` are accepted at their defaults (there is no fused SGD kernel).
    """

    RANGES = dict(lr=at_least(0), momentum=at_least(0), weight_decay=at_least(0))
    allow_complex = True
    update = staticmethod(sgd_update)
    update_foreach = staticmethod(fast_paths.sgd_foreach)

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

    def check_group(self, group: dict[str, Any]) -> None:
        super().check_group(group)
        if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
            raise ValueError(
                f"Invalid nesterov=True with momentum={group['momentum']}, "
                f"dampening={group['dampening']} (Nesterov needs momentum > 0 and dampening = 0)"
            )

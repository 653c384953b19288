"""Adam (Kingma & Ba, 2015) and AdamW (Loshchilov & Hutter, 2019).

    m = beta1 * m + (1 - beta1) * g                 # first moment
    v = beta2 * v + (1 - beta2) * g^2               # second moment
    p = p - lr * m_hat / (sqrt(v_hat) + eps)        # m_hat = m / (1 - beta1^t), v_hat likewise

Adam adds ``weight_decay * p`` to the gradient (L2); AdamW shrinks ``p`` by ``lr * weight_decay``
outside the adaptive step (``decoupled_weight_decay=True``).
"""
from __future__ import annotations

import math
from typing import Any, Iterable

import torch
from torch import Tensor

from trainer.optim import fast_paths
from trainer.optim.base import RuleOptimizer, at_least, new_step, unit_interval


def adam_update(p: Tensor, grad: Tensor, state: dict[str, Tensor], *, lr: float,
                betas: tuple[float, float], eps: float, weight_decay: float, amsgrad: bool,
                maximize: bool, decoupled_weight_decay: bool) -> None:
    """One parameter's Adam/AdamW step."""
    beta1, beta2 = betas
    grad = -grad if maximize else grad
    state["step"] += 1
    t = state["step"].item()  # a CPU tensor: no device sync
    if weight_decay != 0:
        if decoupled_weight_decay:
            p.mul_(1 - lr * weight_decay)
        else:
            grad = grad.add(p, alpha=weight_decay)
    m, v = state["exp_avg"], state["exp_avg_sq"]
    m.lerp_(grad, 1 - beta1)
    v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    if amsgrad:  # use the largest v seen so far
        v = torch.maximum(state["max_exp_avg_sq"], v, out=state["max_exp_avg_sq"])
    denom = (v.sqrt() / math.sqrt(1 - beta2**t)).add_(eps)
    p.addcdiv_(m, denom, value=-lr / (1 - beta1**t))


class Adam(RuleOptimizer):
    """Adam with L2 weight decay, bias correction and optional AMSGrad; arguments, defaults and
    state names (``step``, ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``) as ``torch.optim.Adam``.

    ``decoupled_weight_decay=True`` gives AdamW. ``fused=True`` runs one Triton kernel per parameter
    (CUDA, or CPU under ``TRITON_INTERPRET=1``; float32/16/bf16; no amsgrad, maximize or L2 decay).
    ``capturable`` and ``differentiable`` are accepted at their default (False) only.
    """

    RANGES = dict(lr=at_least(0), betas=unit_interval(), eps=at_least(0), weight_decay=at_least(0))
    update = staticmethod(adam_update)
    update_foreach = staticmethod(fast_paths.adam_foreach)
    update_fused = staticmethod(fast_paths.adamw_fused)
    fused_unsupported = ("amsgrad", "maximize")

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        amsgrad: bool = False,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        decoupled_weight_decay: bool = False,
    ) -> None:
        super().__init__(params, dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize,
            foreach=foreach, capturable=capturable, differentiable=differentiable, fused=fused,
            decoupled_weight_decay=decoupled_weight_decay,
        ))

    @staticmethod
    def init_state(p: Tensor, group: dict[str, Any]) -> dict[str, Tensor]:
        state = {"step": new_step(), "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
        if group["amsgrad"]:
            state["max_exp_avg_sq"] = torch.zeros_like(p)
        return state

    def check_fused(self, group: dict[str, Any]) -> None:
        super().check_fused(group)
        if not group["decoupled_weight_decay"] and group["weight_decay"] != 0:
            raise ValueError(
                f"{type(self).__name__}(fused=True) does not support L2 weight_decay={group['weight_decay']} "
                "(the kernel decays decoupled): set decoupled_weight_decay=True (AdamW), "
                "weight_decay=0, or use foreach=True"
            )


class AdamW(Adam):
    """Adam with decoupled weight decay; arguments and defaults as ``torch.optim.AdamW``
    (note ``weight_decay=1e-2``)."""

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
    ) -> None:
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, foreach=foreach, maximize=maximize,
                         capturable=capturable, differentiable=differentiable, fused=fused,
                         decoupled_weight_decay=True)

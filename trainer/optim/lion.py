"""Lion (Chen et al., 2023, "Symbolic Discovery of Optimization Algorithms").

    c = beta1 * m + (1 - beta1) * g          # interpolate momentum and gradient
    p = p * (1 - lr * wd) - lr * sign(c)      # every coordinate moves by exactly lr
    m = beta2 * m + (1 - beta2) * g           # then update the momentum with beta2
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import Tensor

from trainer.optim.base import NON_NEGATIVE, RuleOptimizer, UNIT_INTERVAL, cpu_pieces


def lion_update(p: Tensor, grad: Tensor, state: dict[str, Tensor], *, lr: float,
                betas: tuple[float, float], weight_decay: float, maximize: bool) -> None:
    """One parameter's Lion step."""
    beta1, beta2 = betas
    grad = -grad if maximize else grad
    m = state["exp_avg"]
    update = m.lerp(grad, 1 - beta1).sign_()
    p.mul_(1 - lr * weight_decay)
    p.add_(update, alpha=-lr)
    m.lerp_(grad, 1 - beta2)


# --- the multi-tensor (foreach) and fused steps, tested equal to lion_update -------------------

def lion_foreach(params: list[Tensor], grads: list[Tensor], states: list[dict], *, lr: float,
                 betas: tuple[float, float], weight_decay: float, maximize: bool) -> None:
    """lion.lion_update over lists of one device and dtype, in CPU pieces."""
    beta1, beta2 = betas
    exp_avgs = [s["exp_avg"] for s in states]
    for (p, g, m), _ in cpu_pieces([params, grads, exp_avgs]):
        if maximize:
            g = torch._foreach_neg(g)
        update = torch._foreach_lerp(m, g, 1 - beta1)
        torch._foreach_sign_(update)
        if weight_decay != 0:
            torch._foreach_mul_(p, 1 - lr * weight_decay)
        torch._foreach_add_(p, update, alpha=-lr)
        torch._foreach_lerp_(m, g, 1 - beta2)


def lion_fused(params: list[Tensor], grads: list[Tensor], states: list[dict], *, lr: float,
               betas: tuple[float, float], weight_decay: float, **_: Any) -> None:
    """Lion in one Triton kernel per parameter."""
    from trainer.optim import fused_triton

    fused_triton.lion_fused(params, grads, [s["exp_avg"] for s in states], lr=lr, beta1=betas[0],
                            beta2=betas[1], weight_decay=weight_decay)


class Lion(RuleOptimizer):
    """Lion: the sign of an interpolated momentum, decoupled weight decay, one state buffer
    (``exp_avg``).

    Use an lr 3-10x smaller and a weight decay 3-10x larger than for AdamW (the paper's advice:
    each step moves every coordinate by lr, more than Adam's typical step). ``fused=True`` runs one
    Triton kernel per parameter (CUDA, or CPU under ``TRITON_INTERPRET=1``; no maximize).
    """

    RANGES = dict(lr=NON_NEGATIVE, betas=UNIT_INTERVAL, weight_decay=NON_NEGATIVE)
    update = staticmethod(lion_update)
    update_foreach = staticmethod(lion_foreach)
    update_fused = staticmethod(lion_fused)
    fused_unsupported = ("maximize",)

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
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay, maximize=maximize,
                                      foreach=foreach, fused=fused))

    @staticmethod
    def init_state(p: Tensor, group: dict[str, Any]) -> dict[str, Tensor]:
        return {"exp_avg": torch.zeros_like(p)}

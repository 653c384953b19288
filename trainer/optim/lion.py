"""Lion (Chen et al., 2023, "Symbolic Discovery of Optimization Algorithms").

    c = beta1 * m + (1 - beta1) * g          # interpolate momentum and gradient
    p = p * (1 - lr * wd) - lr * sign(c)      # every coordinate moves by exactly lr
    m = beta2 * m + (1 - beta2) * g           # then update the momentum with beta2
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import Tensor

from trainer.optim import fast_paths
from trainer.optim.base import RuleOptimizer, at_least, unit_interval


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


class Lion(RuleOptimizer):
    """Lion: the sign of an interpolated momentum, decoupled weight decay, one state buffer
    (``exp_avg``).

    Use an lr 3-10x smaller and a weight decay 3-10x larger than for AdamW (the paper's advice:
    each step moves every coordinate by lr, more than Adam's typical step). ``fused=True`` runs one
    Triton kernel per parameter (CUDA, or CPU under ``TRITON_INTERPRET=1``; no maximize).
    """

    RANGES = dict(lr=at_least(0), betas=unit_interval(), weight_decay=at_least(0))
    update = staticmethod(lion_update)
    update_foreach = staticmethod(fast_paths.lion_foreach)
    update_fused = staticmethod(fast_paths.lion_fused)
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

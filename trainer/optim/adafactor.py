"""Adafactor (Shazeer & Stern, 2018), as torch.optim.Adafactor defines it.

Adam's second moment, factored: for a matrix only the row means R and column means C of g^2 are
kept (n + m numbers instead of n * m), and v is rebuilt as their outer product R C / mean(R).
There is no first moment. The step is relative to the parameter's own scale:

    beta2_t = 1 - t^beta2_decay                        # averages over longer windows as t grows
    rho     = min(lr, 1 / sqrt(t));  alpha = max(eps2, RMS(p)) * rho
    u       = g / sqrt(max(v_hat, eps1^2));  u = u / max(1, RMS(u) / d)    # update clipping
    p       = p * (1 - lr * wd) - alpha * u
"""
from __future__ import annotations

import math
from typing import Any, Iterable

import torch
from torch import Tensor

from trainer.optim.base import NON_NEGATIVE, RuleOptimizer, new_step


def adafactor_update(p: Tensor, grad: Tensor, state: dict[str, Tensor], *, lr: float, beta2_decay: float,
                     eps: tuple[float | None, float], d: float, weight_decay: float, maximize: bool) -> None:
    """One parameter's Adafactor step (matrices, and stacks of them, factor their last two dims)."""
    eps1, eps2 = eps
    eps1 = torch.finfo(p.dtype).eps if eps1 is None else eps1
    grad = -grad if maximize else grad
    state["step"] += 1
    t = state["step"].item()  # a CPU tensor: no device sync
    one_minus_beta2 = t**beta2_decay
    # alpha and clip stay tensors on p's device: reading them (.item()) would sync a GPU per parameter
    alpha = (p.norm(2) / p.numel() ** 0.5).clamp_(min=eps2) * min(lr, 1 / t**0.5)
    p.mul_(1 - lr * weight_decay)
    if grad.dim() > 1:
        row_var, col_var = state["row_var"], state["col_var"]
        row_var.lerp_(torch.norm(grad, dim=-1, keepdim=True).square_().div_(grad.size(-1)), one_minus_beta2)
        col_var.lerp_(torch.norm(grad, dim=-2, keepdim=True).square_().div_(grad.size(-2)), one_minus_beta2)
        v_hat = (row_var @ col_var).div_(row_var.mean(dim=-2, keepdim=True).clamp(min=eps1))
    else:
        v_hat = state["variance"].lerp_(grad * grad, one_minus_beta2)
    update = v_hat.clamp(min=eps1 * eps1).rsqrt_().mul_(grad)
    clip = (update.norm(2) / (update.numel() ** 0.5 * d)).clamp_(min=1.0)
    p.sub_(update.mul_(alpha / clip))


class Adafactor(RuleOptimizer):
    """Adafactor; arguments, defaults and state (``step``, ``row_var``/``col_var`` for tensors with
    two or more dims, ``variance`` otherwise) as ``torch.optim.Adafactor``.

    Every step reads two norms per parameter on the host (``RMS(p)``, ``RMS(u)``), so there is no
    multi-tensor path: ``foreach`` is accepted and runs this same rule.
    """

    # (low, high, high is open, None allowed), as base.py reads them
    RANGES = dict(lr=NON_NEGATIVE, beta2_decay=(-math.inf, 0.0, False, False), eps=(0.0, math.inf, False, True),
                  d=(1.0, math.inf, False, False), weight_decay=NON_NEGATIVE)

    update = staticmethod(adafactor_update)

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float | Tensor = 1e-2,
        beta2_decay: float = -0.8,
        eps: tuple[float | None, float] = (None, 1e-3),
        d: float = 1.0,
        weight_decay: float = 0.0,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
    ) -> None:
        super().__init__(params, dict(lr=lr, beta2_decay=beta2_decay, eps=eps, d=d,
                                      weight_decay=weight_decay, foreach=foreach, maximize=maximize))

    @staticmethod
    def init_state(p: Tensor, group: dict[str, Any]) -> dict[str, Tensor]:
        if p.dim() < 2:
            return {"step": new_step(), "variance": torch.zeros_like(p)}
        return {"step": new_step(), "row_var": p.new_zeros(p.shape[:-1] + (1,)),
                "col_var": p.new_zeros(p.shape[:-2] + (1, p.shape[-1]))}

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

from trainer.optim.base import NON_NEGATIVE, RuleOptimizer, UNIT_INTERVAL, cpu_pieces, new_step


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


# --- the multi-tensor (foreach) and fused steps, tested equal to adam_update -------------------

def adam_foreach(params: list[Tensor], grads: list[Tensor], states: list[dict], *, lr: float,
                 betas: tuple[float, float], eps: float, weight_decay: float, amsgrad: bool,
                 maximize: bool, decoupled_weight_decay: bool) -> None:
    """adam_update over lists of one device and dtype, in CPU pieces."""
    beta1, beta2 = betas
    exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps = [], [], [], []
    # Fold sqrt(1 - beta2^t) into eps and the step size instead of dividing sqrt(v) by it:
    #   lr/bc1 * m / (sqrt(v)/bc2_sqrt + eps) == (lr*bc2_sqrt/bc1) * m / (sqrt(v) + eps*bc2_sqrt)
    # which saves a full pass over the buffers each step.
    step_sizes, eps_hats = [], []
    for state in states:
        exp_avgs.append(state["exp_avg"])
        exp_avg_sqs.append(state["exp_avg_sq"])
        max_exp_avg_sqs.append(state["max_exp_avg_sq" if amsgrad else "exp_avg_sq"])
        steps.append(state["step"])
        t = state["step"].item() + 1  # this step's t (a CPU tensor: no device sync); advanced below
        bc2_sqrt = math.sqrt(1 - beta2**t)
        step_sizes.append(-lr * bc2_sqrt / (1 - beta1**t))
        eps_hats.append(eps * bc2_sqrt)
    torch._foreach_add_(steps, 1.0)
    # the usual case: every parameter took as many steps, so one step size and eps for all
    uniform = len(set(step_sizes)) == 1 and len(set(eps_hats)) == 1
    for (p, g, m, v, v_max), owners in cpu_pieces([params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs]):
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


def adamw_fused(params: list[Tensor], grads: list[Tensor], states: list[dict], *, lr: float,
                betas: tuple[float, float], eps: float, weight_decay: float, **_: Any) -> None:
    """AdamW in one Triton kernel per parameter (check_fused has ruled out what it can't do;
    L2 decay only when weight_decay is 0, where it equals decoupled decay)."""
    from trainer.optim import fused_triton

    fused_triton.adamw_fused(params, grads, [s["exp_avg"] for s in states],
                             [s["exp_avg_sq"] for s in states], [s["step"] for s in states],
                             lr=lr, beta1=betas[0], beta2=betas[1], eps=eps, weight_decay=weight_decay)


class Adam(RuleOptimizer):
    """Adam with L2 weight decay, bias correction and optional AMSGrad; arguments, defaults and
    state names (``step``, ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``) as ``torch.optim.Adam``.

    ``decoupled_weight_decay=True`` gives AdamW. ``fused=True`` runs one Triton kernel per parameter
    (CUDA, or CPU under ``TRITON_INTERPRET=1``; float32/16/bf16; no amsgrad, maximize or L2 decay).
    ``capturable`` and ``differentiable`` are accepted at their default (False) only.
    """

    RANGES = dict(lr=NON_NEGATIVE, betas=UNIT_INTERVAL, eps=NON_NEGATIVE, weight_decay=NON_NEGATIVE)
    update = staticmethod(adam_update)
    update_foreach = staticmethod(adam_foreach)
    update_fused = staticmethod(adamw_fused)
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
        # torch's AdamW forwards these to Adam.__init__, which validates them; ours has nothing to
        # add to the defaults (add_param_group checks every group), so AdamW states them itself
        RuleOptimizer.__init__(self, params, dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize,
            foreach=foreach, capturable=capturable, differentiable=differentiable, fused=fused,
            decoupled_weight_decay=True,
        ))

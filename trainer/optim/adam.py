"""Adam (Kingma & Ba, 2015) and AdamW (Loshchilov & Hutter, 2019).

One update rule with a ``decoupled`` flag: Adam adds ``weight_decay * p`` to the gradient (L2),
AdamW shrinks the parameter by ``lr * weight_decay`` outside the adaptive step.
"""
from __future__ import annotations

import math
from typing import Any, Iterable

import torch
from torch import Tensor

from trainer.optim._common import (
    PathKeepingOptimizer,
    as_float,
    bias_corrections,
    check_eps,
    check_foreach,
    check_fused,
    check_fused_group,
    check_grad,
    check_lr,
    check_weight_decay,
    check_not_supported,
    cpu_pieces,
    float_betas,
    fused_kernels,
    group_by_device_dtype,
    new_step,
    run_closure,
    use_foreach,
)


def adam_single_tensor(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    amsgrad: bool,
    maximize: bool,
    decoupled: bool,
) -> None:
    """The reference: one parameter at a time, written as the paper's algorithm reads."""
    for i, param in enumerate(params):
        grad = -grads[i] if maximize else grads[i]
        exp_avg, exp_avg_sq, step = exp_avgs[i], exp_avg_sqs[i], steps[i]
        step += 1
        if weight_decay != 0:
            if decoupled:
                param.mul_(1 - lr * weight_decay)
            else:
                grad = grad.add(param, alpha=weight_decay)
        exp_avg.lerp_(grad, 1 - beta1)  # m = beta1*m + (1-beta1)*g
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)  # v = beta2*v + (1-beta2)*g^2
        if amsgrad:
            torch.maximum(max_exp_avg_sqs[i], exp_avg_sq, out=max_exp_avg_sqs[i])
            exp_avg_sq = max_exp_avg_sqs[i]
        t = step.item()
        bias_correction1 = 1 - beta1**t
        bias_correction2 = 1 - beta2**t
        # p -= lr * m_hat / (sqrt(v_hat) + eps)
        denom = (exp_avg_sq.sqrt() / math.sqrt(bias_correction2)).add_(eps)
        param.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)


def adam_multi_tensor(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    amsgrad: bool,
    maximize: bool,
    decoupled: bool,
) -> None:
    """The same update with ``torch._foreach_*`` ops, per (device, dtype) bucket and CPU piece."""
    if not amsgrad:  # keep the lists parallel for grouping
        max_exp_avg_sqs = exp_avg_sqs
    buckets = group_by_device_dtype(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps)
    for *tensors, t in buckets.values():
        torch._foreach_add_(t, 1.0)
        bc1, bc2_sqrt = bias_corrections(t, beta1, beta2)
        # Fold sqrt(1 - beta2^t) into eps and the step size instead of dividing sqrt(v) by it:
        #   lr/bc1 * m / (sqrt(v)/bc2_sqrt + eps) == (lr*bc2_sqrt/bc1) * m / (sqrt(v) + eps*bc2_sqrt)
        # which saves a full pass over the buffers each step.
        step_sizes = [-lr * b / c for b, c in zip(bc2_sqrt, bc1)]
        eps_hats = [eps * b for b in bc2_sqrt]
        uniform = len(set(bc1)) == 1  # the usual case: every parameter took the same number of steps
        for (p, g, m, v, v_max), owners in cpu_pieces(tensors):
            if uniform:
                step_size, eps_hat = step_sizes[0], eps_hats[0]
            else:
                step_size, eps_hat = [step_sizes[i] for i in owners], [eps_hats[i] for i in owners]
            _adam_piece(p, g, m, v, v_max if amsgrad else None, step_size, eps_hat, lr=lr,
                        beta1=beta1, beta2=beta2, weight_decay=weight_decay, maximize=maximize,
                        decoupled=decoupled)


def _adam_piece(p, g, m, v, v_max, step_size, eps_hat, *, lr, beta1, beta2, weight_decay,
                maximize, decoupled) -> None:
    if maximize:
        g = torch._foreach_neg(g)  # a copy: we may now update it in place
    if weight_decay != 0:
        if decoupled:
            torch._foreach_mul_(p, 1 - lr * weight_decay)
        elif maximize:
            torch._foreach_add_(g, p, alpha=weight_decay)
        else:
            g = torch._foreach_add(g, p, alpha=weight_decay)  # never write into .grad
    torch._foreach_lerp_(m, g, 1 - beta1)
    torch._foreach_mul_(v, beta2)
    torch._foreach_addcmul_(v, g, g, 1 - beta2)
    if v_max is not None:  # amsgrad
        torch._foreach_maximum_(v_max, v)
        v = v_max
    denom = torch._foreach_sqrt(v)
    torch._foreach_add_(denom, eps_hat)
    torch._foreach_addcdiv_(p, m, denom, step_size)


def adam(*args: Any, foreach: bool, **kwargs: Any) -> None:
    """Functional Adam/AdamW: dispatch to the multi-tensor or the single-tensor path."""
    (adam_multi_tensor if foreach else adam_single_tensor)(*args, **kwargs)


class Adam(PathKeepingOptimizer):
    """Adam with L2 weight decay (added to the gradient), bias correction and optional AMSGrad.

    Arguments and defaults mirror ``torch.optim.Adam``; ``decoupled_weight_decay=True`` gives AdamW.
    State per parameter: ``step`` (CPU scalar tensor), ``exp_avg``, ``exp_avg_sq`` and, with
    amsgrad, ``max_exp_avg_sq``, under the same names as torch so state dicts are interchangeable.

    ``fused=True`` runs the step as one Triton kernel per parameter (trainer/optim/fused_triton.py):
    CUDA tensors (or CPU ones under ``TRITON_INTERPRET=1``), float32/16/bf16, no amsgrad, maximize
    or complex parameters, and decoupled weight decay (or none). The state layout is the same as
    the other paths', so state dicts move between them. ``capturable`` and ``differentiable`` are
    accepted at their default (False) only.
    """

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
        defaults = dict(
            lr=lr, betas=float_betas(betas), eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
            maximize=maximize, foreach=foreach, capturable=capturable,
            differentiable=differentiable, fused=fused,
            decoupled_weight_decay=decoupled_weight_decay,
        )
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group and check its hyperparameters (groups may override the defaults)."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        check_lr(group["lr"])
        group["betas"] = float_betas(group["betas"])
        check_eps(group["eps"])
        check_weight_decay(group["weight_decay"])
        check_foreach(group["foreach"])
        check_not_supported(group, "capturable", "differentiable")
        check_fused(group["fused"])
        self._check_fused(group)

    def _check_fused(self, group: dict[str, Any]) -> None:
        """What the fused kernel cannot do raises; checked again each fused step (a loaded state
        dict brings its own amsgrad/maximize/weight_decay)."""
        name = type(self).__name__
        check_fused_group(name, group, unsupported=("amsgrad", "maximize"))
        if group["fused"] and not group["decoupled_weight_decay"] and as_float(group["weight_decay"]) != 0:
            raise ValueError(
                f"{name}(fused=True) does not support L2 weight_decay={group['weight_decay']} "
                "(the kernel decays decoupled): set decoupled_weight_decay=True (AdamW), "
                "weight_decay=0, or use foreach=True"
            )

    def _gather(self, group: dict[str, Any]) -> tuple[list[Tensor], ...]:
        """Collect the parameters that have gradients and their state, creating it on first use."""
        name = type(self).__name__
        lists: tuple[list[Tensor], ...] = ([], [], [], [], [], [])
        params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps = lists
        for p in group["params"]:
            if p.grad is None:
                continue
            check_grad(name, p)
            state = self.state[p]
            if not state:
                state["step"] = new_step()
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if group["amsgrad"]:
                    state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            params.append(p)
            grads.append(p.grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            if group["amsgrad"]:
                max_exp_avg_sqs.append(state["max_exp_avg_sq"])
            steps.append(state["step"])
        return lists

    @torch.no_grad()
    def step(self, closure=None):
        """Take one optimization step; ``closure`` re-evaluates the model and returns the loss."""
        loss = run_closure(closure)
        for group in self.param_groups:
            if group["fused"]:
                self._check_fused(group)
            lists = self._gather(group)
            if not lists[0]:
                continue
            beta1, beta2 = group["betas"]
            if group["fused"]:
                params, grads, exp_avgs, exp_avg_sqs, _, steps = lists
                # L2 decay was rejected unless it is 0, where it equals decoupled decay
                fused_kernels().adamw_fused(
                    params, grads, exp_avgs, exp_avg_sqs, steps, lr=as_float(group["lr"]),
                    beta1=beta1, beta2=beta2, eps=group["eps"],
                    weight_decay=as_float(group["weight_decay"]),
                )
                continue
            adam(
                *lists,
                foreach=use_foreach(group["foreach"], lists[0]),
                lr=as_float(group["lr"]),
                beta1=beta1,
                beta2=beta2,
                eps=group["eps"],
                weight_decay=as_float(group["weight_decay"]),
                amsgrad=group["amsgrad"],
                maximize=group["maximize"],
                decoupled=group["decoupled_weight_decay"],
            )
        return loss


class AdamW(Adam):
    """Adam with decoupled weight decay: ``p *= 1 - lr * weight_decay`` before the Adam step.

    Arguments and defaults mirror ``torch.optim.AdamW`` (note ``weight_decay=1e-2``).
    """

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
        super().__init__(
            params, lr, betas, eps, weight_decay, amsgrad,
            foreach=foreach, maximize=maximize, capturable=capturable,
            differentiable=differentiable, fused=fused, decoupled_weight_decay=True,
        )

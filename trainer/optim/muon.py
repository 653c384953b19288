"""Muon (Jordan et al., 2024): momentum, then orthogonalize the update of each hidden weight matrix.

    b = momentum * b + (1 - momentum) * g              # momentum, as an average (like torch)
    u = lerp(g, b, momentum) if nesterov else b         # Nesterov: look ahead along b
    O = NewtonSchulz(u)                                 # ~ U V^T for u = U S V^T
    p = p * (1 - lr * wd) - lr * sqrt(max(1, rows / cols)) * O

Orthogonalizing sets every singular value of the step to about 1, so the update moves all
directions of the matrix alike instead of following the few largest ones. Muon is for 2-D hidden
weights only: embeddings, the LM head, norms and biases go in groups with ``use_muon=False``, which
this optimizer updates with AdamW (``adamw_betas``, ``adamw_eps``, the group's lr and weight
decay); trainer/optim/groups.py makes that split.

``foreach=True`` orthogonalizes matrices of the same shape together: one batched Newton-Schulz
(``bmm``) per shape instead of one chain of small matmuls per matrix, which on a CPU are mostly
call overhead (the nano model's 16 matrices: 2-3x less optimizer time, scripts/bench/bench_optim.py).
The default (``None``/``False``) keeps torch's one-matrix-at-a-time path, bit for bit.
"""
from __future__ import annotations

import math
from typing import Any, Iterable

import torch
from torch import Tensor

from trainer.optim.adam import Adam, adam_foreach, adam_update
from trainer.optim.base import NON_NEGATIVE, RuleOptimizer, UNIT_INTERVAL

# Keller Jordan's quintic coefficients: a steep slope at 0 pushes small singular values up fast;
# the result's singular values land in roughly [0.7, 1.2] rather than exactly 1, which trains as well.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def zeropower_via_newton_schulz(G: Tensor, coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
                                steps: int = 5, eps: float = 1e-7) -> Tensor:
    """Approximately ``U @ V.T`` for ``G = U S V^T``, by iterating ``X <- a X + (b A + c A^2) X``
    with ``A = X X^T``. In bfloat16, as torch and modded-nanogpt do: the iteration is robust to
    low precision, and bf16 matmuls are what make it cheap on a GPU."""
    a, b, c = coefficients
    X = G.bfloat16()
    tall = G.size(-2) > G.size(-1)
    if tall:  # iterate on the wide orientation: X X^T is then the smaller Gram matrix
        X = X.mT
    # Frobenius norm >= spectral norm: singular values now <= 1 (a stack (N, rows, cols): per matrix)
    X = X / (X.norm() if X.dim() == 2 else X.norm(dim=(-2, -1), keepdim=True)).clamp(min=eps)
    mul_add = torch.addmm if X.dim() == 2 else torch.baddbmm
    for _ in range(steps):
        A = X @ X.mT
        B = mul_add(A, A, A, beta=b, alpha=c)  # b A + c A^2
        X = mul_add(X, B, X, beta=a)  # a X + B X
    return X.mT if tall else X


def adjusted_lr(lr: float, adjust_lr_fn: str | None, shape: torch.Size) -> float:
    """Scale lr by the matrix shape so updates have a similar RMS across shapes."""
    rows, cols = shape[:2]
    if adjust_lr_fn in (None, "original"):  # Keller Jordan's
        return lr * math.sqrt(max(1, rows / cols))
    return lr * 0.2 * math.sqrt(max(rows, cols))  # "match_rms_adamw" (Moonshot): AdamW's RMS, ~0.2


def muon_update(p: Tensor, grad: Tensor, state: dict[str, Tensor], *, lr: float, weight_decay: float,
                momentum: float, nesterov: bool, ns_coefficients: tuple[float, float, float], eps: float,
                ns_steps: int, adjust_lr_fn: str | None) -> None:
    """One 2-D parameter's Muon step."""
    buf = state["momentum_buffer"]
    buf.lerp_(grad, 1 - momentum)
    update = grad.lerp(buf, momentum) if nesterov else buf
    O = zeropower_via_newton_schulz(update, ns_coefficients, ns_steps, eps)
    p.mul_(1 - lr * weight_decay)
    p.add_(O, alpha=-adjusted_lr(lr, adjust_lr_fn, p.shape))


def muon_foreach(params: list[Tensor], grads: list[Tensor], states: list[dict], *, lr: float,
                 weight_decay: float, momentum: float, nesterov: bool, ns_coefficients: tuple[float, float, float],
                 eps: float, ns_steps: int, adjust_lr_fn: str | None) -> None:
    """``muon_update`` for a list of matrices: the same rule, with the matrices of each shape
    stacked into one batched Newton-Schulz."""
    by_shape: dict[tuple, list[int]] = {}
    for i, p in enumerate(params):
        by_shape.setdefault(tuple(p.shape), []).append(i)
    for shape, idx in by_shape.items():
        ps, gs = [params[i] for i in idx], [grads[i] for i in idx]
        bufs = [states[i]["momentum_buffer"] for i in idx]
        torch._foreach_lerp_(bufs, gs, 1 - momentum)
        updates = [g.lerp(b, momentum) for g, b in zip(gs, bufs)] if nesterov else bufs
        O = zeropower_via_newton_schulz(torch.stack(updates), ns_coefficients, ns_steps, eps)  # (N, rows, cols)
        torch._foreach_mul_(ps, 1 - lr * weight_decay)
        torch._foreach_add_(ps, list(O.unbind(0)), alpha=-adjusted_lr(lr, adjust_lr_fn, torch.Size(shape)))


class Muon(RuleOptimizer):
    """Muon for 2-D hidden weights; arguments, defaults and state (``momentum_buffer``) as
    ``torch.optim.Muon``.

    A group with ``use_muon=False`` holds parameters of any shape and is updated by AdamW with the
    group's ``lr`` and ``weight_decay`` and ``adamw_betas``/``adamw_eps`` (state as torch's AdamW),
    so one optimizer (one state dict, one lr schedule) trains the whole model.
    """

    RANGES = dict(lr=NON_NEGATIVE, weight_decay=NON_NEGATIVE, momentum=NON_NEGATIVE, eps=NON_NEGATIVE,
                  ns_steps=(0, 99, False, False), adamw_betas=UNIT_INTERVAL, adamw_eps=NON_NEGATIVE)
    MUON_KEYS = ("lr", "weight_decay", "momentum", "nesterov", "ns_coefficients", "eps", "ns_steps",
                 "adjust_lr_fn")
    update = staticmethod(muon_update)

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
        eps: float = 1e-7,
        ns_steps: int = 5,
        adjust_lr_fn: str | None = None,
        *,
        use_muon: bool = True,
        adamw_betas: tuple[float, float] = (0.9, 0.95),
        adamw_eps: float = 1e-8,
        foreach: bool | None = None,
    ) -> None:
        super().__init__(params, dict(
            lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
            ns_coefficients=ns_coefficients, eps=eps, ns_steps=ns_steps, adjust_lr_fn=adjust_lr_fn,
            use_muon=use_muon, adamw_betas=adamw_betas, adamw_eps=adamw_eps, foreach=foreach,
        ))

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if group["adjust_lr_fn"] not in (None, "original", "match_rms_adamw"):
            raise ValueError(f"Invalid adjust_lr_fn={group['adjust_lr_fn']!r} "
                             "(must be None, 'original' or 'match_rms_adamw')")
        if len(group["ns_coefficients"]) != 3:
            raise ValueError(f"Invalid ns_coefficients={group['ns_coefficients']!r} (must be (a, b, c))")
        if group["use_muon"]:
            for p in group["params"]:
                if p.dim() != 2:
                    raise ValueError(
                        f"Muon updates 2-D parameters only, got one of shape {tuple(p.shape)}; put "
                        "it in a group with use_muon=False (AdamW), e.g. with trainer.optim.param_groups(model, wd, muon=['matmul'])"
                    )

    @staticmethod
    def init_state(p: Tensor, group: dict[str, Any]) -> dict[str, Tensor]:
        if group["use_muon"]:
            return {"momentum_buffer": torch.zeros_like(p)}
        return Adam.init_state(p, {"amsgrad": False})

    def update_group(self, group: dict[str, Any], hp: dict[str, Any], params: list[Tensor],
                     grads: list[Tensor], states: list[dict], plain: bool) -> None:
        foreach = group.get("foreach")
        if group["use_muon"] and foreach:
            muon_foreach(params, grads, states, **{k: hp[k] for k in self.MUON_KEYS})
            return
        if group["use_muon"]:
            for p, g, state in zip(params, grads, states):
                muon_update(p, g, state, **{k: hp[k] for k in self.MUON_KEYS})
            return
        adamw = dict(lr=hp["lr"], betas=hp["adamw_betas"], eps=hp["adamw_eps"], weight_decay=hp["weight_decay"],
                     amsgrad=False, maximize=False, decoupled_weight_decay=True)
        if plain if foreach is None else foreach:
            adam_foreach(params, grads, states, **adamw)
        else:
            for p, g, state in zip(params, grads, states):
                adam_update(p, g, state, **adamw)

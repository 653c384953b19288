"""Learning-rate schedules: ``lr = schedule(it)`` for iteration ``it`` (0-based).

Each schedule is a plain function of the iteration and its settings; ``configs/schedule/*.yaml``
bind the settings (``_partial_: true``), so ``schedule=cosine|wsd|constant`` picks one and a new
schedule is one function plus one YAML file. The trainer sets each parameter group's lr to
``schedule(it) * group.get("lr_scale", 1)`` every step.
"""
from __future__ import annotations

import math


def warmup(it: int, lr: float, warmup_iters: int) -> float:
    """Linear warmup from lr/(warmup_iters+1) to lr (never 0: step 0 must move the weights)."""
    return lr * (it + 1) / (warmup_iters + 1)


def cosine(it: int, *, lr: float, warmup_iters: int, decay_iters: int, min_lr: float | None = None) -> float:
    """nanoGPT's schedule: linear warmup, cosine decay to ``min_lr`` (default ``lr / 10``) at
    ``decay_iters``, then flat."""
    min_lr = lr / 10 if min_lr is None else min_lr
    if it < warmup_iters:
        return warmup(it, lr, warmup_iters)
    if it >= decay_iters:
        return min_lr
    progress = (it - warmup_iters) / max(1, decay_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)


def wsd(it: int, *, lr: float, warmup_iters: int, decay_iters: int, decay_frac: float = 0.2,
        min_lr: float | None = None) -> float:
    """Warmup, a long constant phase, then a linear warmdown to ``min_lr`` (default ``lr / 10``) over
    the last ``decay_frac`` of ``decay_iters`` (modded-nanogpt's schedule; Hägele et al. 2024)."""
    if not 0.0 <= decay_frac <= 1.0:
        raise ValueError(f"schedule.decay_frac={decay_frac} must be in [0, 1]")
    min_lr = lr / 10 if min_lr is None else min_lr
    decay_start = decay_iters - round(decay_frac * decay_iters)
    if it < warmup_iters:
        return warmup(it, lr, warmup_iters)
    if it < decay_start:
        return lr
    if it >= decay_iters:
        return min_lr
    return lr + (it - decay_start) / (decay_iters - decay_start) * (min_lr - lr)


def constant(it: int, *, lr: float, warmup_iters: int = 0) -> float:
    """Linear warmup (none with ``warmup_iters=0``), then ``lr``."""
    return warmup(it, lr, warmup_iters) if it < warmup_iters else lr

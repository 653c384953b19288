"""Learning-rate schedules: ``schedule(it) -> lr`` for iteration ``it`` (0-based).

Chosen with ``schedule=cosine|wsd|constant`` (configs/schedule/). The trainer sets each parameter
group's lr to ``schedule(it) * group.get("lr_scale", 1)`` every step.
"""
from __future__ import annotations

import math


def warmup(it: int, lr: float, warmup_iters: int) -> float:
    """Linear warmup from lr/(warmup_iters+1) to lr (never 0: step 0 must move the weights)."""
    return lr * (it + 1) / (warmup_iters + 1)


def lr_at(it: int, learning_rate: float, warmup_iters: int, lr_decay_iters: int, min_lr: float) -> float:
    """nanoGPT's schedule: linear warmup, cosine decay to ``min_lr`` at ``lr_decay_iters``, then flat."""
    if it < warmup_iters:
        return warmup(it, learning_rate, warmup_iters)
    if it >= lr_decay_iters:
        return min_lr
    progress = (it - warmup_iters) / max(1, lr_decay_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (learning_rate - min_lr)


class WarmupCosine:
    """Linear warmup, then cosine decay to ``min_lr`` (default ``lr / 10``) at ``decay_iters``."""

    def __init__(self, lr: float, warmup_iters: int, decay_iters: int, min_lr: float | None = None) -> None:
        self.lr, self.warmup_iters, self.decay_iters = float(lr), int(warmup_iters), int(decay_iters)
        self.min_lr = self.lr / 10 if min_lr is None else float(min_lr)

    def __call__(self, it: int) -> float:
        return lr_at(it, self.lr, self.warmup_iters, self.decay_iters, self.min_lr)


class WarmupStableDecay:
    """Warmup, a long constant phase, then a linear warmdown to ``min_lr`` over the last
    ``decay_frac`` of ``decay_iters`` (modded-nanogpt's schedule; Hägele et al. 2024)."""

    def __init__(self, lr: float, warmup_iters: int, decay_iters: int, decay_frac: float = 0.2,
                 min_lr: float | None = None) -> None:
        if not 0.0 <= decay_frac <= 1.0:
            raise ValueError(f"schedule.decay_frac={decay_frac} must be in [0, 1]")
        self.lr, self.warmup_iters, self.decay_iters = float(lr), int(warmup_iters), int(decay_iters)
        self.decay_start = self.decay_iters - round(decay_frac * self.decay_iters)
        self.min_lr = self.lr / 10 if min_lr is None else float(min_lr)

    def __call__(self, it: int) -> float:
        if it < self.warmup_iters:
            return warmup(it, self.lr, self.warmup_iters)
        if it < self.decay_start:
            return self.lr
        if it >= self.decay_iters:
            return self.min_lr
        progress = (it - self.decay_start) / (self.decay_iters - self.decay_start)
        return self.lr + progress * (self.min_lr - self.lr)


class Constant:
    """Linear warmup (none with ``warmup_iters=0``), then ``lr``."""

    def __init__(self, lr: float, warmup_iters: int = 0) -> None:
        self.lr, self.warmup_iters = float(lr), int(warmup_iters)

    def __call__(self, it: int) -> float:
        return warmup(it, self.lr, self.warmup_iters) if it < self.warmup_iters else self.lr

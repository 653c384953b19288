"""Optimizers written from scratch, drop-in for torch.optim: SGD, Adam, AdamW, Lion.

Each class keeps state like torch.optim and calls a small functional update rule with two paths:
a readable single-tensor reference and a multi-tensor ``torch._foreach_*`` path (``foreach=``).
AdamW (and Adam with decoupled or no decay) and Lion also take ``fused=True``: one Triton kernel
per parameter (fused_triton.py, imported only then). torch 2.13's other keywords (``capturable``,
``differentiable``) are accepted at their defaults, so call sites swap in unchanged.
"""
from trainer.optim.adam import Adam, AdamW, adam, adam_multi_tensor, adam_single_tensor
from trainer.optim.lion import Lion, lion, lion_multi_tensor, lion_single_tensor
from trainer.optim.sgd import SGD, sgd, sgd_multi_tensor, sgd_single_tensor

__all__ = [
    "SGD", "Adam", "AdamW", "Lion",
    "sgd", "adam", "lion",
    "sgd_single_tensor", "sgd_multi_tensor",
    "adam_single_tensor", "adam_multi_tensor",
    "lion_single_tensor", "lion_multi_tensor",
]

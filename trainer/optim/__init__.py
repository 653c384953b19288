"""Optimizers written from scratch, drop-in for torch.optim: SGD, Adam, AdamW, Lion, Muon, Adafactor.

Each file is one optimizer: its update rule as a short function per parameter (``adam_update``,
``lion_update``, ...) that reads like the paper, the class holding its state, and, where
scripts/bench/bench_optim.py shows it pays, its multi-tensor (``foreach``) and fused Triton
(``fused=True``, fused_triton.py, imported only then) versions, tested equal to the rule.
base.py does the torch.optim plumbing once; groups.py decides which parameters decay, get
which lr, and which Muon orthogonalizes. What every run uses (the plumbing, the group policy and
Adam/AdamW, the default and Muon's inner optimizer) is imported here; the others on first use.
"""
import importlib

from trainer.optim.adam import Adam, AdamW, adam_update
from trainer.optim.base import RuleOptimizer
from trainer.optim.groups import param_groups

_LAZY = {
    "SGD": "sgd", "sgd_update": "sgd", "Lion": "lion", "lion_update": "lion", "Muon": "muon",
    "muon_update": "muon", "zeropower_via_newton_schulz": "muon", "Adafactor": "adafactor",
    "adafactor_update": "adafactor",
}
__all__ = sorted([*_LAZY, "Adam", "AdamW", "adam_update", "RuleOptimizer", "param_groups"])


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"trainer.optim.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'trainer.optim' has no attribute {name!r}")

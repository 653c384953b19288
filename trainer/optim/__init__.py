"""Optimizers written from scratch, drop-in for torch.optim: SGD, Adam, AdamW, Lion, Muon, Adafactor.

Each file is one optimizer: its update rule as a short function per parameter (``adam_update``,
``lion_update``, ...) that reads like the paper, the class holding its state, and, where
scripts/bench/bench_optim.py shows it pays, its multi-tensor (``foreach``) and fused Triton
(``fused=True``, fused_triton.py, imported only then) versions, tested equal to the rule.
base.py does the torch.optim plumbing once; groups.py decides which parameters decay, get
which lr, and which Muon orthogonalizes. Optimizers are imported on first use.
"""
import importlib

_WHERE = {
    "SGD": "sgd", "sgd_update": "sgd", "Adam": "adam", "AdamW": "adam", "adam_update": "adam",
    "Lion": "lion", "lion_update": "lion", "Muon": "muon", "muon_update": "muon",
    "zeropower_via_newton_schulz": "muon", "Adafactor": "adafactor", "adafactor_update": "adafactor",
    "RuleOptimizer": "base", "param_groups": "groups",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(f"trainer.optim.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'trainer.optim' has no attribute {name!r}")

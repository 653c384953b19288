"""Optimizers written from scratch, drop-in for torch.optim: SGD, Adam, AdamW, Lion, Muon, Adafactor.

Each optimizer is its update rule: a short function per parameter (``adam_update``, ``lion_update``,
...) that reads like the paper, plus its state. trainer/optim/base.py does the torch.optim
plumbing once; trainer/optim/fast_paths.py holds the multi-tensor (``foreach``) versions and
the ``fused=True`` Triton steps (fused_triton.py, imported only then). param_groups.py decides
which parameters decay, get which lr, and which Muon orthogonalizes.
"""
from trainer.optim.adafactor import Adafactor, adafactor_update
from trainer.optim.adam import Adam, AdamW, adam_update
from trainer.optim.base import RuleOptimizer
from trainer.optim.lion import Lion, lion_update
from trainer.optim.muon import Muon, muon_update, zeropower_via_newton_schulz
from trainer.optim.param_groups import ParamGroups
from trainer.optim.sgd import SGD, sgd_update

__all__ = [
    "SGD", "Adam", "AdamW", "Lion", "Muon", "Adafactor", "RuleOptimizer",
    "sgd_update", "adam_update", "lion_update", "muon_update", "adafactor_update",
    "zeropower_via_newton_schulz", "ParamGroups",
]

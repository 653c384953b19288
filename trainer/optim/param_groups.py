"""Which parameters decay, at what lr multiple, and which ones Muon orthogonalizes.

The policy is its own small component so that an optimizer that needs a different split (Muon:
hidden matrices vs everything else) is chosen in its config, not by editing the training loop:

    optim.param_groups._target_=trainer.optim.ParamGroups  optim.param_groups.lr_scale.embedding=0.5

Each trainable parameter (a tied tensor once) has a kind:

* ``matmul``: weights of ``nn.Linear`` layers, except the output head;
* ``head``: the output layer's weight (``head_names``) when it is not tied to the embedding;
* ``embedding``: weights of ``nn.Embedding`` (so a tied LM head too);
* ``other``: biases and normalization weights.

Kinds with the same settings share a group; groups come in the order of KINDS and keep the
model's parameter order inside, so the default (decay matmul and head; not embeddings, biases or
norms) gives the same two groups as before and old checkpoints still load.
"""
from __future__ import annotations

from typing import Iterable

import torch

KINDS = ("matmul", "head", "embedding", "other")


def parameter_kinds(model: torch.nn.Module, head_names: Iterable[str] = ("lm_head",)) -> list[tuple[torch.nn.Parameter, str]]:
    """Each trainable parameter once, in model order, with its kind."""
    heads = tuple(head_names)
    kind_of: dict[int, str] = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.split(".")[-1] not in heads:
            kind_of.setdefault(id(module.weight), "matmul")
        elif isinstance(module, torch.nn.Linear):
            kind_of.setdefault(id(module.weight), "head")
    for module in model.modules():  # an embedding wins over a Linear sharing its weight (tying)
        if isinstance(module, torch.nn.Embedding):
            kind_of[id(module.weight)] = "embedding"
    return [(p, kind_of.get(id(p), "other")) for p in model.parameters() if p.requires_grad]


class ParamGroups:
    """Split a model's parameters into optimizer groups.

    Args:
        decay: kinds that get the optimizer's ``weight_decay`` (the others get 0).
        lr_scale: lr multiple per kind (default 1); the trainer sets each group's lr to the
            schedule's lr times its ``lr_scale`` every step.
        muon: kinds Muon orthogonalizes (``use_muon=True``); the rest get ``use_muon=False`` (AdamW
            inside trainer.optim.Muon). Empty: no ``use_muon`` key (any other optimizer).
        head_names: module names of the output layer.
    """

    def __init__(self, decay: Iterable[str] = ("matmul", "head"), lr_scale: dict[str, float] | None = None,
                 muon: Iterable[str] = (), head_names: Iterable[str] = ("lm_head",)) -> None:
        self.decay, self.muon, self.head_names = tuple(decay), tuple(muon), tuple(head_names)
        self.lr_scale = dict(lr_scale or {})
        for key in (*self.decay, *self.muon, *self.lr_scale):
            if key not in KINDS:
                raise ValueError(f"unknown parameter kind {key!r} in param_groups; kinds are {', '.join(KINDS)}")

    def settings(self, kind: str, weight_decay: float) -> dict:
        """The group keys (other than params) for parameters of ``kind``."""
        out: dict = {"weight_decay": weight_decay if kind in self.decay else 0.0}
        scale = float(self.lr_scale.get(kind, 1.0))
        if scale != 1.0:
            out["lr_scale"] = scale
        if self.muon:
            out["use_muon"] = kind in self.muon
        return out

    def __call__(self, model: torch.nn.Module, weight_decay: float) -> list[dict]:
        groups: dict[tuple, dict] = {}
        for kind in KINDS:  # group order: by kind, merging kinds with equal settings
            settings = self.settings(kind, weight_decay)
            groups.setdefault(tuple(sorted(settings.items())), {"params": [], **settings})
        for p, kind in parameter_kinds(model, self.head_names):
            groups[tuple(sorted(self.settings(kind, weight_decay).items()))]["params"].append(p)
        return [g for g in groups.values() if g["params"]]


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """The default policy: decay the weights of matmuls only; biases, norms and embeddings are not
    decayed (decay would pull rare tokens' rows towards zero between their rare updates)."""
    return ParamGroups()(model, weight_decay)

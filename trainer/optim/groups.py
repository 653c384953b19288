"""Which parameters decay, at what lr multiple, and which ones Muon orthogonalizes.

The policy is its own small component so that an optimizer that needs a different split (Muon:
hidden matrices vs everything else) is chosen in its config, not by editing the training loop:

    optim.param_groups.lr_scale.embedding=0.5  optim.param_groups.decay=[matmul,head,embedding]

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


def param_groups(model: torch.nn.Module, weight_decay: float, decay: Iterable[str] = ("matmul", "head"),
                 lr_scale: dict[str, float] | None = None, muon: Iterable[str] = (),
                 head_names: Iterable[str] = ("lm_head",)) -> list[dict]:
    """Split a model's parameters into optimizer groups by kind.

    Args:
        decay: kinds that get ``weight_decay`` (the others get 0). The default decays the weights
            of matmuls only: decay would pull rare tokens' embedding rows towards zero between
            their rare updates, and biases and norms have no scale to regularize.
        lr_scale: lr multiple per kind (default 1); the trainer sets each group's lr to the
            schedule's lr times its ``lr_scale`` every step.
        muon: kinds Muon orthogonalizes (``use_muon=True``); the rest get ``use_muon=False`` (AdamW
            inside trainer.optim.Muon). Empty: no ``use_muon`` key (any other optimizer).
        head_names: module names of the output layer.
    """
    decay, muon, lr_scale, heads = tuple(decay), tuple(muon), dict(lr_scale or {}), tuple(head_names)
    for key in (*decay, *muon, *lr_scale):
        if key not in KINDS:
            raise ValueError(f"unknown parameter kind {key!r} in param_groups; kinds are {', '.join(KINDS)}")
    kind_of: dict[int, str] = {}  # id(weight) -> kind; parameters not named here are "other"
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Embedding):  # wins over a Linear sharing its weight (tying)
            kind_of[id(module.weight)] = "embedding"
        elif isinstance(module, torch.nn.Linear):
            kind_of.setdefault(id(module.weight), "head" if name.split(".")[-1] in heads else "matmul")
    groups: dict[tuple, dict] = {}
    group_of: dict[str, dict] = {}
    for kind in KINDS:  # group order: by kind, merging kinds with equal settings
        settings: dict = {"weight_decay": weight_decay if kind in decay else 0.0}
        if float(lr_scale.get(kind, 1.0)) != 1.0:
            settings["lr_scale"] = float(lr_scale[kind])
        if muon:
            settings["use_muon"] = kind in muon
        group_of[kind] = groups.setdefault(tuple(sorted(settings.items())), {"params": [], **settings})
    for p in model.parameters():  # each trainable tensor once (a tied one too), in model order
        if p.requires_grad:
            group_of[kind_of.get(id(p), "other")]["params"].append(p)
    return [g for g in groups.values() if g["params"]]

"""Hydra/OmegaConf glue used by the entry points (models, kernels and optimizers never import it)."""
from __future__ import annotations

import re

from omegaconf import OmegaConf


def run_name(override_dirname: str) -> str:
    """A directory name from Hydra's override string: 'default' when empty, no path separators."""
    name = re.sub(r"[/\\]+", "_", override_dirname or "default").strip("_") or "default"
    return name[:180]


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("run_name"):
        OmegaConf.register_new_resolver("run_name", run_name)

"""Hydra/OmegaConf glue used by the entry points (models, kernels and optimizers never import it)."""
from __future__ import annotations

import hashlib
import re

from omegaconf import OmegaConf


def run_name(override_dirname: str) -> str:
    """A directory name from Hydra's override string (``attn=flash,optim=adamw``), group choices first.

    'default' when there are no overrides; a path value is shortened to its last component
    (``data.path=/a/b/corpus.txt`` -> ``data.path=corpus.txt``); over-long names are cut and
    made unique with a short hash of the full string.
    """
    if not override_dirname:
        return "default"
    parts = []
    for item in override_dirname.split(","):
        key, sep, value = item.partition("=")
        if sep and re.search(r"[/\\]", value):
            value = re.split(r"[/\\]+", value.rstrip("/\\"))[-1] or "root"
        parts.append(f"{key}{sep}{value}")
    # group choices (attn=flash) first: they are what tells runs apart at a glance
    parts.sort(key=lambda p: "." in p.partition("=")[0])
    name = ",".join(parts)
    if len(name) > 200:
        name = name[:190] + "-" + hashlib.sha1(override_dirname.encode()).hexdigest()[:8]
    return name


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("run_name"):
        OmegaConf.register_new_resolver("run_name", run_name)


def build(node, **kwargs):
    """``hydra.utils.instantiate``, with the underlying error surfaced as one line.

    Hydra wraps a constructor's exception in a multi-line InstantiationException; a user who
    typed ``model.n_embd=33`` should instead read the constructor's own message.
    """
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    try:
        return instantiate(node, **kwargs)
    except InstantiationException as e:
        cause = e.__cause__
        if isinstance(cause, ValueError):
            raise cause from None
        target = node.get("_target_", "?") if hasattr(node, "get") else "?"
        detail = f"{type(cause).__name__}: {cause}" if cause is not None else str(e).splitlines()[0]
        raise ValueError(f"cannot build {target}: {detail}") from e

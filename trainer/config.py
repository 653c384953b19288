"""Hydra/OmegaConf glue used by the entry points (models, kernels and optimizers never import it):
run names, building components from ``_target_`` nodes, and checking the top-level settings."""
from __future__ import annotations

import contextlib
import hashlib
import re

from omegaconf import OmegaConf

from trainer.errors import ConfigError, UserError


def run_name(override_dirname: str) -> str:
    """A directory name from Hydra's override string (``attn=flash,optim=adamw``), group choices first.

    'default' when there are no overrides; a path value is shortened to its last component
    (``data.path=/a/b/corpus.txt`` -> ``data.path=corpus.txt``); quotes Hydra keeps around values
    (``sample_prompt='a b'``) are dropped; over-long names are cut and made unique with a short
    hash of the full string.
    """
    if not override_dirname:
        return "default"
    parts = []
    for item in _split_overrides(override_dirname):
        key, sep, value = item.partition("=")
        value = value.replace("'", "").replace('"', "")
        if sep and re.search(r"[/\\]", value):
            value = re.split(r"[/\\]+", value.rstrip("/\\"))[-1] or "root"
        parts.append(f"{key}{sep}{value}")
    # group choices (attn=flash) first: they are what tells runs apart at a glance
    parts.sort(key=lambda p: "." in p.partition("=")[0])
    name = ",".join(parts)
    if len(name) > 200:
        name = name[:190] + "-" + hashlib.sha1(override_dirname.encode()).hexdigest()[:8]
    return name


def _split_overrides(joined: str) -> list[str]:
    """Split Hydra's ``a=1,b='x,y',c=[1,2]`` at the commas that separate overrides (not those
    inside quotes or brackets)."""
    items, current, quote, depth = [], "", None, 0
    for ch in joined:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            items.append(current)
            current = ""
            continue
        current += ch
    return items + [current]


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("run_name"):
        OmegaConf.register_new_resolver("run_name", run_name)


# ---------------------------------------------------------------------------------------------
# building components


# a constructor called with a key the config added or left out
_BAD_KEYWORD = re.compile(r"__init__\(\) (got an unexpected keyword argument|missing \d+ required)")


@contextlib.contextmanager
def config_errors():
    """A ValueError raised by a component's constructor from config values (``GPTConfig`` with
    ``n_embd % n_head != 0``, an optimizer with ``eps < 0``), or a constructor given a keyword it
    does not take, is the user's to fix: re-raise it as a ConfigError with the same message.
    User errors pass through; anything else is a bug and keeps its type."""
    try:
        yield
    except UserError:
        raise
    except ValueError as e:
        raise ConfigError(str(e)) from e
    except TypeError as e:
        if _BAD_KEYWORD.search(str(e)):
            raise ConfigError(f"{e}; remove or rename that key in the config") from e
        raise


def build(node, **kwargs):
    """``hydra.utils.instantiate``, with a constructor's own error instead of Hydra's wrapper.

    Hydra wraps a constructor's exception in a multi-line InstantiationException; a user who
    typed ``model.n_embd=33`` should read the constructor's message in one line. Recognized
    user errors become a ``UserError``: the constructor's ValueError, an unknown or missing
    keyword, a ``_target_`` that cannot be imported. Anything else is re-raised unchanged, so a
    bug in a component keeps its traceback.
    """
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    try:
        with config_errors():
            return instantiate(node, **kwargs)
    except InstantiationException as e:
        cause = e.__cause__
        target = node.get("_target_", "?") if hasattr(node, "get") else "?"
        if isinstance(cause, UserError):
            raise cause from None
        if isinstance(cause, ValueError):
            raise ConfigError(str(cause)) from None
        if isinstance(cause, ImportError) or (cause is None and "Error locating target" in str(e)):
            raise ConfigError(f"cannot build {target}: _target_ cannot be imported ({cause}); check its spelling") from e
        if isinstance(cause, TypeError) and _BAD_KEYWORD.search(str(cause)):
            raise ConfigError(f"cannot build {target}: {cause}; remove or rename that key in the config") from e
        raise


# ---------------------------------------------------------------------------------------------
# top-level settings

# key: (type, smallest allowed value, may be null)
SETTINGS = {
    "max_iters": (int, 0, False), "batch_size": (int, 1, False), "block_size": (int, 1, False),
    "gradient_accumulation_steps": (int, 1, False), "eval_interval": (int, 0, False),
    "eval_iters": (int, 1, False), "log_interval": (int, 1, False), "warmup_iters": (int, 0, False),
    "lr_decay_iters": (int, 0, False), "sample_tokens": (int, 0, False), "seed": (int, 0, False),
    "learning_rate": (float, 0.0, False), "min_lr": (float, 0.0, True), "grad_clip": (float, 0.0, False),
}
_MAX_INT = 2**63 - 1  # torch seeds and step counters are int64


def check_settings(cfg) -> None:
    """Every numeric top-level key has the right type and range, or a one-line error names it."""
    for key, (kind, lowest, nullable) in SETTINGS.items():
        value = cfg.get(key)
        if value is None and nullable:
            continue
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value == value  # not NaN
        if ok and kind is int:
            ok = abs(value) <= _MAX_INT and float(value).is_integer()
        elif ok:
            ok = abs(value) != float("inf")
        if not (ok and value >= lowest):
            what = "an integer" if kind is int else "a finite number"
            limit = f" and <= {_MAX_INT}" if kind is int else ""
            raise ConfigError(f"{key}={value!r} must be {what} >= {lowest}{limit}" + (" or null" if nullable else ""))


def check_batch_config(cfg, world_size: int) -> tuple[int, int]:
    """Check the batch settings; returns (accumulation micro-steps per rank, tokens per step)."""
    check_settings(cfg)
    if cfg.block_size > cfg.model.block_size:
        raise ConfigError(
            f"block_size={cfg.block_size} exceeds the model's context model.block_size={cfg.model.block_size}; "
            f"set model.block_size={cfg.block_size} or a smaller block_size"
        )
    accum = int(cfg.gradient_accumulation_steps)
    if accum % world_size:
        raise ConfigError(
            f"gradient_accumulation_steps={accum} is not divisible by the world size {world_size}; "
            "the global batch must split evenly over ranks (use a multiple of the number of processes)"
        )
    return accum // world_size, accum * int(cfg.batch_size) * int(cfg.block_size)


def check_vocab(cfg, tokenizer_vocab: int) -> int:
    """The model's vocabulary size: ``model.vocab_size`` if set (at least the tokenizer's), else the tokenizer's."""
    vocab = cfg.model.get("vocab_size") or tokenizer_vocab
    if vocab < tokenizer_vocab:
        raise ConfigError(f"model.vocab_size={vocab} is smaller than the tokenizer's {tokenizer_vocab} tokens")
    return int(vocab)


# ---------------------------------------------------------------------------------------------
# resume: the run's saved config, plus what this command changes

# settings of this process, not of the run: always taken from the command that resumes (the
# process group and device are set up from them before the checkpoint is read)
RUNTIME_KEYS = ("resume", "overwrite", "device", "compile")


def override_key(override: str) -> str:
    """``+optim.foo=1`` -> ``optim.foo``; ``~seed`` -> ``seed``."""
    return override.partition("=")[0].lstrip("+~")


def merge_overrides(saved: list[str], new: list[str]) -> list[str]:
    """The run's override list after a resume: ``new`` replaces entries of ``saved`` with the same key."""
    new = [o for o in new if override_key(o) not in ("resume", "overwrite")]
    replaced = {override_key(o) for o in new}
    return [o for o in saved if override_key(o) not in replaced] + new


def resume_config(saved: dict, composed, overrides: list[str]) -> tuple:
    """The config a resumed run continues with, and the settings that differ from the saved run.

    ``saved`` is the run's resolved config (from its checkpoint); ``composed`` is what Hydra built
    for this command (defaults plus ``overrides``). Only the keys this command names are taken from
    ``composed`` (a group choice such as ``optim=lion`` replaces the whole group), plus settings that
    follow a changed key by interpolation (``lr_decay_iters: ${max_iters}``) when the saved run had
    them following too. Returns ``(config, ["key: old -> new", ...])``.
    """
    base = OmegaConf.create(saved)
    changed = set()
    for override in overrides:
        key = override_key(override)
        if key in RUNTIME_KEYS:
            continue
        if key == "experiment" or key.startswith("experiment."):
            raise ConfigError(
                f"{override} cannot be applied on resume (a preset changes many settings at once); "
                "give the settings to change one by one"
            )
        if override.startswith("~"):
            parent, _, leaf = key.rpartition(".")
            node = OmegaConf.select(base, parent) if parent else base
            if node is not None and leaf in node:
                del node[leaf]
        else:
            OmegaConf.update(base, key, _resolved(composed, key), merge=False)
        changed.add(key)
    _follow_interpolations(base, saved, composed, changed)
    for key in composed:  # this process's settings, and settings added to train.yaml since the run
        if key in RUNTIME_KEYS or key not in base:
            base[key] = _resolved(composed, key)
    return base, _differences(_flat(saved), _flat(OmegaConf.to_container(base)))


def _resolved(cfg, key: str):
    node = OmegaConf.select(cfg, key, default=None)
    if OmegaConf.is_config(node):
        return OmegaConf.to_container(node, resolve=True)
    return node


def _follow_interpolations(base, saved: dict, composed, changed: set[str]) -> None:
    """``learning_rate: ${optim.lr}`` keeps following ``optim.lr`` when the latter changed."""
    def under(key: str) -> bool:
        return any(key == c or key.startswith(c + ".") for c in changed)

    raw, saved_cfg = OmegaConf.to_container(composed, resolve=False), OmegaConf.create(saved)
    for key, value in raw.items():
        m = re.fullmatch(r"\$\{([\w.]+)\}", value) if isinstance(value, str) else None
        if key in changed or key in RUNTIME_KEYS or not m or not under(m.group(1)):
            continue
        if saved.get(key) == OmegaConf.select(saved_cfg, m.group(1), default=None):  # it followed in the saved run
            base[key] = _resolved(composed, key)


def _flat(tree, prefix: str = "") -> dict:
    if not isinstance(tree, dict):
        return {prefix: tree}
    out = {}
    for k, v in tree.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _differences(old: dict, new: dict) -> list[str]:
    keys = [k for k in new if k not in RUNTIME_KEYS and old.get(k, "<unset>") != new[k]]
    keys += [k for k in old if k not in new]
    return [f"{k}: {old.get(k, '<unset>')!r} -> {new.get(k, '<unset>')!r}" for k in keys]

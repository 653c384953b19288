"""Hydra/OmegaConf glue used by the entry points (models, kernels and optimizers never import it):
run names, building components from ``_target_`` nodes, and checking the top-level settings."""
from __future__ import annotations

import hashlib
import re
from pathlib import Path

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
    # split at the commas between overrides, not those inside quotes or brackets (b='x,y',c=[1,2])
    items, current, quote, depth = [], "", None, 0
    for ch in override_dirname:
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
    items.append(current)
    choices, settings = [], []  # group choices (attn=flash) first: they tell runs apart at a glance
    for item in items:
        key, sep, value = item.partition("=")
        value = value.replace("'", "").replace('"', "")
        if sep and re.search(r"[/\\]", value):
            value = re.split(r"[/\\]+", value.rstrip("/\\"))[-1] or "root"
        (settings if "." in key else choices).append(f"{key}{sep}{value}")
    name = ",".join(choices + settings)
    if len(name) > 200:
        name = name[:190] + "-" + hashlib.sha1(override_dirname.encode()).hexdigest()[:8]
    return name


CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def components(group: str) -> list[str]:
    """The options of a config group (``configs/<group>/*.yaml``): the one list of components that
    CLIs, presets, benchmarks and tests read, so a new component joins them all by its YAML file."""
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


def load_component(group: str, name: str, **overrides):
    """``configs/<group>/<name>.yaml`` as a config node (with ``overrides`` merged), for ``build``.
    Interpolations into the training config (``${learning_rate}``) are not resolved here."""
    if name not in components(group):
        raise ConfigError(f"{group}={name!r} is not one of configs/{group}/: {', '.join(components(group))}")
    node = OmegaConf.load(CONFIGS / group / f"{name}.yaml")
    return OmegaConf.merge(node, overrides) if overrides else node


# ``${run_name:...}`` (configs/train.yaml's hydra.run.dir), registered on import: every entry
# point that composes the configs imports this module first
if not OmegaConf.has_resolver("run_name"):
    OmegaConf.register_new_resolver("run_name", run_name)


# ---------------------------------------------------------------------------------------------
# building components


# a constructor called with a key the config added or left out
_BAD_KEYWORD = re.compile(r"__init__\(\) (got an unexpected keyword argument|missing \d+ required)|"
                          r"\(\) (got an unexpected keyword argument|missing \d+ required)")


def build(node, *args, **kwargs):
    """``hydra.utils.instantiate(node, **kwargs)``, called with ``args`` when the node is partial
    (``_partial_: true``: an optimizer given its parameter groups), with the constructor's own
    error instead of Hydra's multi-line wrapper.

    What the user can fix becomes a one-line ``ConfigError``: the constructor's ValueError (``GPTConfig``
    with ``n_embd % n_head != 0``, an optimizer with ``eps < 0``), an unknown or missing keyword,
    a ``_target_`` that cannot be imported. Anything else is re-raised unchanged, so a bug in a
    component keeps its traceback.
    """
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    target = node.get("_target_", "?") if hasattr(node, "get") else "?"
    try:
        try:
            made = instantiate(node, **kwargs)
            return made(*args) if args else made
        except InstantiationException as e:
            cause = e.__cause__
            if cause is None and "Error locating target" in str(e):
                cause = ImportError(str(e).splitlines()[0])
            if cause is None:
                raise
            raise cause from e
    except UserError:
        raise
    except ImportError as e:
        raise ConfigError(f"cannot build {target}: _target_ cannot be imported ({e}); check its spelling") from e
    except ValueError as e:
        raise ConfigError(str(e)) from e
    except TypeError as e:
        if _BAD_KEYWORD.search(str(e)):
            raise ConfigError(f"cannot build {target}: {e}; remove or rename that key in the config") from e
        raise


def build_attention(node):
    """The attention function of an ``attn`` config node and its sliding ``window`` (None: full causal).

    The window is taken out of the node: the model passes it to the attention call only when it is
    set (``GPTConfig.window``, saved with the checkpoint), so an attention function written without
    the keyword keeps working, and a run samples with the window it trained with."""
    spec = OmegaConf.to_container(node, resolve=True)
    window = spec.pop("window", None)
    return build(OmegaConf.create(spec)), window


# ---------------------------------------------------------------------------------------------
# top-level settings

# key: (type, smallest allowed value, may be null)
SETTINGS = {
    "max_iters": (int, 0, False), "batch_size": (int, 1, False), "block_size": (int, 1, False),
    "gradient_accumulation_steps": (int, 1, False), "eval_interval": (int, 0, False),
    "eval_iters": (int, 1, False), "log_interval": (int, 1, False), "warmup_iters": (int, 0, False),
    "lr_decay_iters": (int, 0, False), "sample_tokens": (int, 0, False), "seed": (int, 0, False),
    "learning_rate": (float, 0.0, False), "min_lr": (float, 0.0, True), "grad_clip": (float, 0.0, False),
    "target_val_loss": (float, 0.0, True),
}
_MAX_INT = 2**63 - 1  # torch seeds and step counters are int64


# The torch.compile modes every implementation is tested under (reduce-overhead: CUDA graphs, which
# flash's triton_op launches are captured by like any Inductor kernel); torch's own spellings.
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs", "max-autotune")


def compile_mode(mode: str | None) -> str:
    """``mode`` for ``torch.compile(..., mode=mode)`` (None: "default"), or an ConfigError naming
    the modes: one line where torch.compile would give a traceback."""
    mode = "default" if mode is None else mode
    if mode not in COMPILE_MODES:
        raise ConfigError(f"compile_mode={mode!r} is not one of the torch.compile modes tested here: "
                               f"{', '.join(COMPILE_MODES)}")
    return mode



def check_settings(cfg, world_size: int = 1) -> tuple[int, int]:
    """Every numeric top-level key has the right type and range, or a one-line error names it; the
    batch fits the model and splits over ``world_size`` ranks. Returns (accumulation micro-steps per
    rank, tokens per step)."""
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


# ``_target_``s that an earlier version of this trainer saved in its checkpoints' configs, and what
# builds the same component now (partial: the new target is a function bound with ``_partial_``)
RETIRED_TARGETS = {
    "trainer.schedule.WarmupCosine": ("trainer.schedule.cosine", True),
    "trainer.schedule.WarmupStableDecay": ("trainer.schedule.wsd", True),
    "trainer.schedule.Constant": ("trainer.schedule.constant", True),
    "trainer.data.ShakespeareCorpus": ("trainer.data.load_shakespeare", False),
    "trainer.data.TextCorpus": ("trainer.data.load_text", False),
    "trainer.data.TokenCorpus": ("trainer.data.load_tokens", False),
    "trainer.optim.ParamGroups": ("trainer.optim.param_groups", True),
}


def upgrade_saved_config(tree):
    """A saved config with every retired ``_target_`` replaced by today's (in place; returned)."""
    if isinstance(tree, dict):
        if tree.get("_target_") in RETIRED_TARGETS:
            tree["_target_"], partial = RETIRED_TARGETS[tree["_target_"]]
            if partial:
                tree["_partial_"] = True
        for value in tree.values():
            upgrade_saved_config(value)
    return tree


def resume_config(saved: dict, composed, overrides: list[str]) -> tuple:
    """The config a resumed run continues with, and the settings that differ from the saved run.

    ``saved`` is the run's resolved config (from its checkpoint); ``composed`` is what Hydra built
    for this command (defaults plus ``overrides``). Only the keys this command names are taken from
    ``composed`` (a group choice such as ``optim=lion`` replaces the whole group), plus settings that
    follow a changed key by interpolation (``lr_decay_iters: ${max_iters}``) when the saved run had
    them following too. Returns ``(config, ["key: old -> new", ...])``.
    """
    saved = upgrade_saved_config(saved)
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
    return base, _differences(flatten(saved), flatten(OmegaConf.to_container(base)))


def _resolved(cfg, key: str):
    node = OmegaConf.select(cfg, key, default=None)
    if OmegaConf.is_config(node):
        return OmegaConf.to_container(node, resolve=True)
    return node


def _follow_interpolations(base, saved: dict, composed, changed: set[str]) -> None:
    """A setting that is an interpolation of a changed one (``lr_decay_iters: ${max_iters}``,
    ``schedule.decay_iters: ${lr_decay_iters}``) follows it, as in a fresh run, when it followed it
    in the saved run too; chains are followed to the end."""
    def under(key: str) -> bool:
        return any(key == c or key.startswith(c + ".") for c in changed)

    links = {path: m.group(1) for path, value in flatten(OmegaConf.to_container(composed, resolve=False)).items()
             if isinstance(value, str) and (m := re.fullmatch(r"\$\{([\w.]+)\}", value))}
    flat_saved = flatten(saved)
    followed = True
    while followed:
        followed = False
        for path, source in links.items():
            if under(path) or path.split(".")[0] in RUNTIME_KEYS or not under(source):
                continue
            if flat_saved.get(path) == flat_saved.get(source):  # it followed in the saved run
                OmegaConf.update(base, path, _resolved(composed, path), merge=False)
                changed.add(path)
                followed = True


def flatten(tree, prefix: str = "") -> dict:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (a run's config as dotted keys)."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    out = {}
    for k, v in tree.items():
        out.update(flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _differences(old: dict, new: dict) -> list[str]:
    keys = [k for k in new if k not in RUNTIME_KEYS and old.get(k, "<unset>") != new[k]]
    keys += [k for k in old if k not in new]
    return [f"{k}: {old.get(k, '<unset>')!r} -> {new.get(k, '<unset>')!r}" for k in keys]

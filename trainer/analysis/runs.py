"""Compare training runs: read run directories, group seeds, summarize.

A run directory (``scripts/train.py``) holds ``config.yaml`` (the resolved config), ``summary.json``
(status, end-of-run numbers, the command-line overrides), ``.hydra/`` and TensorBoard events. The
columns are the overridden keys whose value is not the same in every run: what the user varied,
named as they named it (``optim``, ``optim.lr``). Completed runs whose configs differ only by
``seed`` share a row (mean ± sample std); any other run keeps its own, so a crash never hides in
a mean. Rendering: :mod:`trainer.analysis.table`; best lr, p-values, time to target:
:mod:`trainer.analysis.report`; plots: :mod:`trainer.analysis.plots`.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from functools import cached_property
from operator import itemgetter
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from omegaconf import OmegaConf
from tensorboard.backend.event_processing import event_accumulator

from trainer.config import flatten as flatten_config
from trainer.errors import UserError

MISSING = "-"
# Not part of a run's setup: the replicate axis, and the keys train.yaml keeps out of run names.
NOT_SETUP = ("seed", "resume", "device", "experiment", "data.cache_dir")
_SEED_IN_NAME = re.compile(r"(?<![^,_/])seed=[^,/]*")


class CompareError(UserError):
    """A problem with the input (no runs, missing directory, unknown key, missing matplotlib)."""


@dataclass
class Curve:
    steps: list[int] = field(default_factory=list)
    wall: list[float] = field(default_factory=list)
    values: list[float] = field(default_factory=list)


@dataclass
class Run:
    """One run directory, read once: flattened config, summary, overrides and scalar curves."""

    path: Path
    rel: str
    config: dict[str, Any]
    summary: dict[str, Any]
    scalars: dict[str, Curve]
    start_time: float | None
    choices: dict[str, str]  # Hydra group choices, defaults included: {"attn": "sdpa"}
    overrides: dict[str, str]  # from the command line: {"optim": "lion", "optim.lr": "3e-4"}

    def value(self, key: str) -> Any:
        """The run's setting for a column: resolved config, else group choice, else override."""
        return next((s[key] for s in (self.config, self.choices, self.overrides) if key in s), MISSING)

    @property
    def status(self) -> str:
        # A summary still saying "running" (or none at all) means the process never finished it:
        # killed hard, or still going. Either way the numbers are not final.
        status = self.summary.get("status")
        return "incomplete" if status in (None, "running") else str(status)

    @property
    def step(self) -> int | None:
        seen = [c.steps[-1] for c in self.scalars.values() if c.steps] + [self.summary.get("step")]
        return max((s for s in seen if isinstance(s, int)), default=None)

    @property
    def status_label(self) -> str:
        if self.status == "completed":
            return "completed"
        step, total = self.step, self.summary.get("max_iters", self.config.get("max_iters"))
        return f"{self.status} (step {_cell(step, MISSING)}/{_cell(total, MISSING)})"

    @property
    def val(self) -> Curve:
        return self.scalars.get("val/loss", Curve())

    def _pick(self, key: str, tag: str, reduce: Callable[[list[float]], Any], curve_first: bool) -> Any:
        # Numbers in an unfinished summary are placeholders from the start of the run: not used.
        # "a|b": the summary key a, else b.
        keys = key.split("|")
        from_summary = next((self.summary[k] for k in keys if self.summary.get(k) is not None), None)
        from_summary = from_summary if self.status != "incomplete" else None
        from_curve = reduce(self.scalars[tag].values) if tag in self.scalars else None
        first, second = (from_curve, from_summary) if curve_first else (from_summary, from_curve)
        return first if first is not None else second

    @cached_property
    def numbers(self) -> dict[str, float | None]:
        """Every number a row averages over seeds; bpb and MFU are None where a run did not log them."""
        peak = self._pick("peak_mem_bytes", "memory/peak_bytes", max, curve_first=False)
        ends = [c.wall[-1] for c in self.scalars.values()]
        elapsed = max(ends) - self.start_time if ends and self.start_time is not None else None
        wall = self.summary.get("wall_time_s") if self.status != "incomplete" else None
        return {
            "final_val_loss": self._pick("final_val_loss", "val/loss", itemgetter(-1), True),
            "best_val_loss": self._pick("best_val_loss", "val/loss", _best, True),
            "final_val_bpb": self._pick("final_val_bpb|val_bpb", "val/bpb", itemgetter(-1), True),
            "best_val_bpb": self._pick("best_val_bpb", "val/bpb", _best, True),
            "tokens_per_sec": self._pick("tokens_per_sec", "tokens_per_sec", np.mean, False),
            "mfu": self._pick("mfu", "mfu", np.mean, False),
            "peak_mem_mb": None if peak is None else peak / 2**20,  # MiB (the key keeps its old name)
            "wall_time_s": elapsed if wall is None else wall,
        }


def _best(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return min(finite) if finite else values[-1]


# --------------------------------------------------------------------------------------- reading


def discover_runs(root: Path) -> list[Path]:
    """Every directory under ``root`` (itself included) holding summary.json or config.yaml."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))  # skips .hydra/
        if "summary.json" in filenames or "config.yaml" in filenames:
            found.append(Path(dirpath))
    return found


def flatten(tree: Any) -> dict[str, Any]:
    """``{"optim": {"lr": 1e-3}}`` -> ``{"optim.lr": 1e-3}``; lists become tuples so values hash."""
    return {k: _hashable(v) for k, v in flatten_config(tree).items()}


def _hashable(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_hashable(v) for v in value)
    return json.dumps(value, sort_keys=True) if isinstance(value, dict) else value


def _yaml(file: Path, select: str = "") -> Any:
    node = OmegaConf.select(OmegaConf.load(file), select) if file.is_file() else None
    # resolve=False: the trainer writes a resolved config; Hydra-only resolvers would fail here
    return None if node is None else OmegaConf.to_container(node, resolve=False)


def _read_scalars(path: Path) -> tuple[dict[str, Curve], float | None]:
    acc = event_accumulator.EventAccumulator(str(path), size_guidance={event_accumulator.SCALARS: 0})
    acc.Reload()  # size_guidance 0: keep every event, not a sample
    curves = {}
    for tag in acc.Tags()["scalars"]:
        events = sorted(acc.Scalars(tag), key=lambda e: (e.step, e.wall_time))
        curves[tag] = Curve([e.step for e in events], [e.wall_time for e in events], [e.value for e in events])
    starts = [c.wall[0] for c in curves.values()]
    try:
        starts.append(acc.FirstEventTimestamp())  # written when the run opened its log
    except ValueError:  # no events at all
        pass
    return curves, min(starts, default=None)


def read_run(path: Path, root: Path) -> Run:
    try:
        summary = json.loads((path / "summary.json").read_text())
    except (OSError, ValueError):  # missing, or cut off mid-write by a crash
        summary = {}
    summary = summary if isinstance(summary, dict) else {}
    overrides = summary.get("overrides")
    if not isinstance(overrides, list):  # no usable summary: Hydra's own record of the overrides
        overrides = _yaml(path / ".hydra" / "overrides.yaml") or []
    choices = _yaml(path / ".hydra" / "hydra.yaml", "hydra.runtime.choices") or {}
    config = _yaml(path / "config.yaml")
    rel = path.relative_to(root).as_posix()
    return Run(
        path, path.name if rel == "." else rel, flatten(config) if isinstance(config, dict) else {},
        summary, *_read_scalars(path),
        # Hydra's own groups (hydra/launcher, ...) say nothing about the experiment
        {k: str(v) for k, v in choices.items() if "/" not in k and not k.startswith("hydra")},
        {k.lstrip("+~"): v for k, eq, v in (str(o).partition("=") for o in overrides) if eq},
    )


def load_runs(root: str | os.PathLike) -> list[Run]:
    """Read every run under ``root``; raises :class:`CompareError` if there is none."""
    root = Path(root)
    if not root.is_dir():
        raise CompareError(f"runs directory '{root}' does not exist or is not a directory")
    runs = [read_run(path, root) for path in discover_runs(root)]
    if not runs:
        raise CompareError(f"no runs found under '{root}' (a run directory holds summary.json "
                           "and config.yaml, as scripts/train.py writes them)")
    return runs


# ------------------------------------------------------------------------------------ comparing


def table_keys(runs: Sequence[Run], all_keys: bool = False) -> list[str]:
    """The keys some run overrode whose value is not the same in every run (absent counts);
    ``all_keys`` adds every differing key of the resolved configs."""
    keys = dict.fromkeys(k for r in runs for k in r.overrides)  # ordered set, command-line order
    if all_keys:
        keys.update(dict.fromkeys(k for r in runs for k in r.config))
    configured = [r for r in runs if r.config]
    return [k for k in keys if k not in NOT_SETUP and len({_hashable(r.value(k)) for r in configured}) > 1]


def setting(run: Run, key: str) -> str:
    """A run's value for ``key`` as a table shows it (``AdamW`` for ``trainer.optim.AdamW``)."""
    return _cell(_display(run.value(key)))


@dataclass
class Group:
    """Runs that differ only by seed (or a single run)."""

    runs: list[Run]
    values: dict[str, Any]

    def setting(self, key: str) -> str:
        return setting(self.runs[0], key)

    def short_label(self, keys: Sequence[str]) -> str:
        """``attn=naive, optim=adamw`` from the table's columns; the run path(s) when there are none."""
        return ", ".join(f"{k}={self.setting(k)}" for k in keys) if keys else self.label

    @property
    def label(self) -> str:
        names = [r.rel for r in self.runs]
        if len(names) > 1:
            names = list(dict.fromkeys(_SEED_IN_NAME.sub("seed=*", n) for n in names))
        return "; ".join(names)

    def numbers(self, name: str) -> list[float]:
        return [n for r in self.runs if (n := r.numbers[name]) is not None]


def group_runs(runs: Sequence[Run], keys: Sequence[str]) -> list[Group]:
    """Completed runs with the same resolved config but seed share a group; any other run is alone."""
    groups: dict[Any, Group] = {}
    for i, run in enumerate(runs):
        setup = tuple(sorted((k, v) for k, v in run.config.items() if k not in NOT_SETUP))
        ident = setup if run.status == "completed" and run.config else i  # never average a crash
        groups.setdefault(ident, Group([], {k: run.value(k) for k in keys})).runs.append(run)
    return list(groups.values())


def mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample std (ddof=1) of the values present; std is None below two values."""
    present = [v for v in values if v is not None]
    return (float(np.mean(present)) if present else None,
            float(np.std(present, ddof=1)) if len(present) > 1 else None)


def summarize(group: Group, keys: Sequence[str]) -> dict[str, Any]:
    """One table row: the group's settings for ``keys`` and every number as mean (± std) over seeds."""
    runs = group.runs
    steps = sorted({r.step for r in runs if r.step is not None})
    row: dict[str, Any] = {
        "run": group.label, "runs": [r.rel for r in runs],
        "config": {k: _display(group.values[k]) for k in keys},
        "n": len(runs), "seeds": [r.config["seed"] for r in runs if "seed" in r.config],
    }
    for name in runs[0].numbers:
        row[name], std = mean_std([r.numbers[name] for r in runs])
        if name in WITH_STD:
            row[f"{name}_std"] = std
    row["steps"] = steps[0] if len(steps) == 1 else (f"{steps[0]}-{steps[-1]}" if steps else None)
    row["status"] = runs[0].status_label if len(runs) == 1 else "completed"
    return row


WITH_STD = ("final_val_loss", "best_val_loss", "final_val_bpb", "best_val_bpb")


def _display(value: Any) -> Any:
    if isinstance(value, str) and "." in value and re.fullmatch(r"[\w.]+", value):
        return value.rsplit(".", 1)[-1]  # `_target_` paths: keep the class or function name
    return list(value) if isinstance(value, tuple) else value


def _cell(value: Any, none: str = "None") -> str:
    return none if value is None else f"{value:g}" if isinstance(value, float) else str(value)

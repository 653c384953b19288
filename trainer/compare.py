"""Compare training runs: discover run directories, read their logs, group seeds, tabulate and plot.

A run directory (see ``scripts/train.py``) holds ``config.yaml`` (the resolved config),
``summary.json`` (status and end-of-run numbers) and TensorBoard event files. Runs whose configs
differ only by ``seed`` are replicates: they are grouped into one row with mean ± sample std (ddof=1).
Only completed runs are grouped; an incomplete, failed or diverged run always keeps its own row so
that a crash can never hide inside a mean. Plots live in :mod:`trainer.compare_plots`.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
from omegaconf import OmegaConf
from tensorboard.backend.event_processing import event_accumulator

MISSING = "-"
_EVENTS = "tfevents"
_RUN_MARKERS = ("config.yaml", "summary.json")
# Keys that vary between runs for reasons other than the experiment: where things live on disk,
# whether a run was resumed, and Hydra's own settings. `seed` is the replicate axis, not a column.
_IGNORED_LEAF = re.compile(r"(^|_)(path|dir|file|root)$|^resume$")
_SEED_IN_NAME = re.compile(r"(?<![^,_/])seed=[^,/]*")


class CompareError(Exception):
    """A user-facing problem with the input (no runs, missing directory, missing matplotlib)."""


@dataclass
class Curve:
    steps: list[int] = field(default_factory=list)
    wall: list[float] = field(default_factory=list)
    values: list[float] = field(default_factory=list)


@dataclass
class Run:
    """One run directory, read once: flattened config, summary and the scalars this report uses."""

    path: Path
    rel: str
    config: dict[str, Any]
    summary: dict[str, Any]
    scalars: dict[str, Curve]
    start_time: float | None
    choices: dict[str, str] = field(default_factory=dict)  # Hydra group choices: {"attn": "naive"}
    overrides: list[str] = field(default_factory=list)

    @property
    def fields(self) -> dict[str, Any]:
        """What identifies the run's setup: group choices, then the flattened resolved config."""
        # choices in the config's order (model, attn, optim, ...), not Hydra's
        position = {k.partition(".")[0]: i for i, k in reversed(list(enumerate(self.config)))}
        ordered = sorted(self.choices, key=lambda g: position.get(g, len(position)))
        return {**{g: self.choices[g] for g in ordered}, **self.config}

    @property
    def seed(self) -> Any:
        return self.config.get("seed")

    @property
    def status(self) -> str:
        # A summary still saying "running" (or none at all) means the process never finished it:
        # killed hard, or still going. Either way the numbers are not final.
        status = self.summary.get("status")
        return "incomplete" if status in (None, "running") else str(status)

    @property
    def finished(self) -> bool:
        return self.status != "incomplete"

    @property
    def step(self) -> int | None:
        seen = [c.steps[-1] for c in self.scalars.values() if c.steps]
        if isinstance(self.summary.get("step"), int):
            seen.append(self.summary["step"])
        return max(seen) if seen else None

    @property
    def max_iters(self) -> Any:
        return self.summary.get("max_iters", self.config.get("max_iters"))

    @property
    def status_label(self) -> str:
        if self.status == "completed":
            return "completed"
        step = MISSING if self.step is None else self.step
        total = MISSING if self.max_iters is None else self.max_iters
        return f"{self.status} (step {step}/{total})"

    @property
    def val(self) -> Curve:
        return self.scalars.get("val/loss", Curve())

    def _final(self, key: str) -> Any:
        # Numbers in a "running" summary are placeholders from the start of the run.
        return self.summary.get(key) if self.finished else None

    @property
    def final_val_loss(self) -> float | None:
        return self.val.values[-1] if self.val.values else self._final("final_val_loss")

    @property
    def best_val_loss(self) -> float | None:
        finite = [v for v in self.val.values if math.isfinite(v)]
        if finite:
            return min(finite)
        return self.val.values[-1] if self.val.values else self._final("best_val_loss")

    @property
    def tokens_per_sec(self) -> float | None:
        value = self._final("tokens_per_sec")
        curve = self.scalars.get("tokens_per_sec")
        return value if value is not None else _mean(curve.values if curve else [])

    @property
    def peak_mem_mb(self) -> float | None:
        value = self._final("peak_mem_bytes")
        curve = self.scalars.get("memory/peak_bytes")
        if value is None and curve and curve.values:
            value = max(curve.values)
        return None if value is None else value / 2**20

    @property
    def wall_time_s(self) -> float | None:
        value = self._final("wall_time_s")
        if value is None and self.start_time is not None:
            last = [c.wall[-1] for c in self.scalars.values() if c.wall]
            value = max(last) - self.start_time if last else None
        return value


# --------------------------------------------------------------------------------------- reading


def discover_runs(root: Path) -> list[Path]:
    """Every directory under ``root`` (itself included) holding event files, config.yaml or summary.json."""
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))  # skips .hydra/
        has_marker = any(name in filenames for name in _RUN_MARKERS)
        has_events = any(_EVENTS in name for name in filenames)
        here = Path(dirpath)
        # SummaryWriter.add_scalars writes events into sub-directories of the run: not runs.
        if has_events and not has_marker and found and found[-1] in here.parents:
            continue
        if has_marker or has_events:
            found.append(here)
    return found


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"optim": {"lr": 1e-3}}`` -> ``{"optim.lr": 1e-3}``; lists become tuples so values hash."""
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    if isinstance(tree, list):
        return {prefix[:-1]: tuple(_hashable(v) for v in tree)}
    return {prefix[:-1]: tree}


def _hashable(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_hashable(v) for v in value)
    return json.dumps(value, sort_keys=True) if isinstance(value, dict) else value


def _read_config(path: Path) -> dict[str, Any]:
    file = path / "config.yaml"
    if not file.is_file():
        return {}
    # resolve=False: the trainer writes a resolved config; Hydra-only resolvers would fail here.
    tree = OmegaConf.to_container(OmegaConf.load(file), resolve=False)
    return flatten(tree) if isinstance(tree, dict) else {}


def _read_hydra(path: Path) -> tuple[dict[str, str], list[str] | None]:
    """Group choices (``hydra.runtime.choices``) and override strings from the run's .hydra/."""
    choices: dict[str, str] = {}
    overrides = None
    hydra_yaml, overrides_yaml = path / ".hydra" / "hydra.yaml", path / ".hydra" / "overrides.yaml"
    if hydra_yaml.is_file():
        node = OmegaConf.select(OmegaConf.load(hydra_yaml), "hydra.runtime.choices")
        tree = OmegaConf.to_container(node, resolve=False) if node is not None else {}
        # Hydra's own groups (hydra/launcher, hydra/sweeper, ...) say nothing about the experiment
        choices = {k: str(v) for k, v in tree.items() if "/" not in k and not k.startswith("hydra")}
    if overrides_yaml.is_file():
        listed = OmegaConf.to_container(OmegaConf.load(overrides_yaml))
        overrides = [str(o) for o in listed] if isinstance(listed, list) else None
    return choices, overrides


def _read_summary(path: Path) -> dict[str, Any]:
    file = path / "summary.json"
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError):  # missing, or cut off mid-write by a crash
        return {}
    return data if isinstance(data, dict) else {}


def _read_scalars(path: Path) -> tuple[dict[str, Curve], float | None]:
    guidance = {event_accumulator.SCALARS: 0, event_accumulator.TENSORS: 0}  # 0 = keep every event
    acc = event_accumulator.EventAccumulator(str(path), size_guidance=guidance)
    acc.Reload()
    tags = acc.Tags()
    curves: dict[str, Curve] = {}
    for tag in tags.get("scalars", []):
        curves[tag] = _curve((e.step, e.wall_time, e.value) for e in acc.Scalars(tag))
    for tag in tags.get("tensors", []):  # add_scalar(..., new_style=True) logs tensors
        if tag not in curves:
            events = [(e.step, e.wall_time, _tensor_scalar(e.tensor_proto)) for e in acc.Tensors(tag)]
            if all(v is not None for _, _, v in events):
                curves[tag] = _curve(events)
    try:
        start: float | None = acc.FirstEventTimestamp()
    except ValueError:  # no events at all
        start = None
    walls = [c.wall[0] for c in curves.values() if c.wall]
    if walls:
        start = min(walls + ([start] if start is not None else []))
    return curves, start


def _tensor_scalar(proto: Any) -> float | None:
    from tensorboard.util import tensor_util

    try:
        array = tensor_util.make_ndarray(proto)
    except Exception:  # text, hparams and other plugins' payloads are no concern here
        return None
    return float(array) if array.size == 1 and np.issubdtype(array.dtype, np.number) else None


def _curve(events: Iterable[tuple[int, float, float]]) -> Curve:
    curve = Curve()
    for step, wall, value in sorted(events, key=lambda e: (e[0], e[1])):
        curve.steps.append(int(step))
        curve.wall.append(float(wall))
        curve.values.append(float(value))
    return curve


def load_runs(root: str | os.PathLike) -> list[Run]:
    """Read every run under ``root``; raises :class:`CompareError` if there is none."""
    root = Path(root)
    if not root.is_dir():
        raise CompareError(f"runs directory '{root}' does not exist or is not a directory")
    runs = []
    for path in discover_runs(root):
        curves, start = _read_scalars(path)
        rel = path.relative_to(root).as_posix()
        summary = _read_summary(path)
        choices, overrides = _read_hydra(path)
        if overrides is None:
            overrides = [str(o) for o in summary.get("overrides") or []]
        runs.append(Run(path, path.name if rel == "." else rel, _read_config(path), summary,
                        curves, start, choices, overrides))
    if not runs:
        raise CompareError(
            f"no runs found under '{root}' (a run directory holds config.yaml, summary.json "
            "or events.out.tfevents.* files)")
    return runs


# ------------------------------------------------------------------------------------ comparing


def _ignored(key: str) -> bool:
    return key == "seed" or key.startswith("hydra.") or bool(_IGNORED_LEAF.search(key.split(".")[-1]))


def differing_keys(runs: Sequence[Run]) -> list[str]:
    """Choices and config keys whose value is not the same in every run with a config (absent counts)."""
    configs = [r.fields for r in runs if r.config]
    keys: dict[str, None] = {}  # ordered set: first-seen order keeps groups (attn.*, optim.*) together
    for config in configs:
        keys.update((k, None) for k in config if not _ignored(k))
    return [k for k in keys if len({_hashable(c.get(k, MISSING)) for c in configs}) > 1]


def _override_keys(runs: Sequence[Run]) -> set[str]:
    """Keys the user set on the command line (``+optim.lr=3e-4`` -> ``optim.lr``)."""
    return {o.partition("=")[0].lstrip("+~") for r in runs for o in r.overrides if "=" in o}


def table_keys(runs: Sequence[Run], keys: Sequence[str]) -> list[str]:
    """The differing keys worth a column: group choices (``optim``), keys set by an override, and
    keys that neither a choice nor an earlier column explains.

    A sweep over ``optim=sgd,adamw`` changes ``optim.lr``, ``optim.betas``, ``learning_rate`` ...
    as a consequence of the choice; those are folded into the ``optim`` column. A key is folded
    only when it lies under a differing group and takes one value per choice, or repeats an
    earlier key, or a key of a chosen group, in every run (``learning_rate: ${optim.lr}``).
    """
    fields = [r.fields for r in runs if r.config]
    chosen = [k for k in keys if any(k in r.choices for r in runs)]
    explicit = _override_keys(runs)

    def column(key: str) -> list[Any]:
        return [_hashable(f.get(key, MISSING)) for f in fields]

    def one_value_per_choice(key: str) -> bool:
        seen: dict[tuple, Any] = {}
        for f in fields:
            choice = tuple(f.get(c, MISSING) for c in chosen)
            if seen.setdefault(choice, _hashable(f.get(key, MISSING))) != _hashable(f.get(key, MISSING)):
                return False
        return True

    shown = list(chosen)
    for i, key in enumerate(keys):
        if key in chosen:
            continue
        in_group = any(key.startswith(g + ".") for g in chosen)
        # an alias of an earlier key, or of a key inside a chosen group (learning_rate: ${optim.lr})
        aliases = [k for j, k in enumerate(keys) if j < i or any(k.startswith(g + ".") for g in chosen)]
        repeats = any(column(key) == column(other) for other in aliases if other != key)
        if key in explicit or not (repeats or (in_group and one_value_per_choice(key))):
            shown.append(key)
    return shown


@dataclass
class Group:
    """Runs that differ only by seed (or a single run)."""

    runs: list[Run]
    values: dict[str, Any]

    def short_label(self, keys: Sequence[str]) -> str:
        """``attn=naive, optim=adamw`` from the table's columns; the run path(s) when there are none."""
        if not keys:
            return self.label
        return ", ".join(f"{column_name(k, keys)}={_cell(_display(self.values[k]))}" for k in keys)

    @property
    def label(self) -> str:
        names = [r.rel for r in self.runs]
        if len(names) > 1:
            names = list(dict.fromkeys(_SEED_IN_NAME.sub("seed=*", n) for n in names))
        return "; ".join(names)


def group_runs(runs: Sequence[Run], keys: Sequence[str]) -> list[Group]:
    groups: dict[Any, Group] = {}
    for i, run in enumerate(runs):
        values = {k: run.fields.get(k, MISSING) for k in keys}
        ident: Any = tuple(_hashable(v) for v in values.values())
        if run.status != "completed" or not run.config:
            ident = ("single", i)  # never average an unfinished or unidentifiable run
        groups.setdefault(ident, Group([], values)).runs.append(run)
    return list(groups.values())


def _mean(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return float(np.mean(present)) if present else None


def _std(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return float(np.std(present, ddof=1)) if len(present) > 1 else None


def summarize(groups: Sequence[Group], keys: Sequence[str]) -> list[dict[str, Any]]:
    """One row per group, sorted by best val loss (mean over seeds); runs without one come last."""
    rows = []
    for group in groups:
        runs = group.runs
        steps = sorted({r.step for r in runs if r.step is not None})
        row: dict[str, Any] = {
            "run": group.label,
            "runs": [r.rel for r in runs],
            "config": {k: _display(group.values[k]) for k in keys},
            "n": len(runs),
            "seeds": [r.seed for r in runs if r.seed is not None],
        }
        for metric in ("final_val_loss", "best_val_loss"):
            values = [getattr(r, metric) for r in runs]
            row[metric], row[f"{metric}_std"] = _mean(values), _std(values)
        row["steps"] = steps[0] if len(steps) == 1 else (f"{steps[0]}-{steps[-1]}" if steps else None)
        for metric in ("tokens_per_sec", "peak_mem_mb", "wall_time_s"):
            row[metric] = _mean([getattr(r, metric) for r in runs])
        row["status"] = runs[0].status_label if len(runs) == 1 else "completed"
        rows.append(row)

    def order(row: dict[str, Any]) -> tuple[bool, float, str]:
        best = row["best_val_loss"]
        known = best is not None and math.isfinite(best)
        return (not known, best if known else 0.0, row["run"])

    return sorted(rows, key=order)


def _display(value: Any) -> Any:
    if isinstance(value, str) and "." in value and re.fullmatch(r"[\w.]+", value):
        return value.rsplit(".", 1)[-1]  # `_target_` paths: keep the class or function name
    if isinstance(value, tuple):
        return list(value)
    return value


def column_name(key: str, keys: Sequence[str] = ()) -> str:
    """``attn._target_`` -> ``attn``, unless ``attn`` (the group choice) is a column as well."""
    short = key[: -len("._target_")] if key.endswith("._target_") else key
    return key if short != key and short in keys else short


def _cell(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


# ------------------------------------------------------------------------------------- formatting


def _fmt(value: Any, digits: int) -> str:
    if value is None:
        return MISSING
    if isinstance(value, float):
        return f"{value:.{digits}f}" if math.isfinite(value) else str(value)
    return str(value)


def _pm(mean: float | None, std: float | None) -> str:
    return _fmt(mean, 4) if std is None else f"{_fmt(mean, 4)} ± {_fmt(std, 4)}"


def _elide_shared(names: Sequence[str]) -> list[str]:
    """Drop the ``k=v`` items every run name shares (``attn=naive,batch_size=2,...`` ->
    ``attn=naive,…``): the table's columns already say what differs; CSV/JSON keep full paths."""
    if len(names) < 2:
        return list(names)
    split = [n.rsplit("/", 1) if "/" in n else ["", n] for n in names]
    shared = set.intersection(*(set(last.split(",")) for _, last in split))
    out = []
    for head, last in split:
        items: list[str] = []
        for item in last.split(","):
            if item not in shared:
                items.append(item)
            elif not items or items[-1] != "…":
                items.append("…")
        short = ",".join(items)
        out.append(f"{head}/{short}" if head else short)
    return out


def to_markdown(rows: Sequence[dict[str, Any]], keys: Sequence[str]) -> str:
    header = ["run", *(column_name(k, keys) for k in keys), "seeds", "final val loss", "best val loss", "steps",
              "tokens/s", "peak mem (MB)", "wall time (s)", "status"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row, name in zip(rows, _elide_shared([row["run"] for row in rows])):
        cells = [name, *(_cell(row["config"][k]) for k in keys),
                 ",".join(map(str, row["seeds"])) or MISSING,
                 _pm(row["final_val_loss"], row["final_val_loss_std"]),
                 _pm(row["best_val_loss"], row["best_val_loss_std"]), _fmt(row["steps"], 0),
                 _fmt(row["tokens_per_sec"], 0), _fmt(row["peak_mem_mb"], 1),
                 _fmt(row["wall_time_s"], 1), row["status"]]
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


_CSV_METRICS = ["n", "seeds", "final_val_loss", "final_val_loss_std", "best_val_loss",
                "best_val_loss_std", "steps", "tokens_per_sec", "peak_mem_mb", "wall_time_s", "status"]


def to_csv(rows: Sequence[dict[str, Any]], keys: Sequence[str]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["run", *(column_name(k, keys) for k in keys), *_CSV_METRICS])
    for row in rows:
        metrics = [" ".join(map(str, row[m])) if m == "seeds" else row[m] for m in _CSV_METRICS]
        writer.writerow([row["run"], *(row["config"][k] for k in keys),
                         *("" if v is None else v for v in metrics)])
    return out.getvalue()


def to_json(rows: Sequence[dict[str, Any]], keys: Sequence[str]) -> str:
    def plain(value: Any) -> Any:  # JSON has no NaN/inf: a diverged loss becomes its string
        return str(value) if isinstance(value, float) and not math.isfinite(value) else value

    clean = [{k: plain(v) for k, v in row.items()} for row in rows]
    return json.dumps({"keys": [column_name(k, keys) for k in keys], "rows": clean}, indent=2, default=str)


def compare(root: str | os.PathLike, all_keys: bool = False
            ) -> tuple[list[Group], list[dict[str, Any]], list[str]]:
    """Load, group and summarize every run under ``root``: (groups, sorted rows, column keys).

    Runs are grouped on every differing key; ``all_keys`` also makes each of them a column
    instead of folding the ones a group choice explains (see :func:`table_keys`)."""
    runs = load_runs(root)
    keys = differing_keys(runs)
    groups = group_runs(runs, keys)
    columns = keys if all_keys else table_keys(runs, keys)
    return groups, summarize(groups, columns), columns

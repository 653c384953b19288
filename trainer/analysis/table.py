"""Render :mod:`trainer.analysis.runs` rows as a markdown table, CSV or JSON.

A metric column appears when some row has a value for it: val bpb and MFU for runs that logged
them; n (seeds), lr, the difference and p-value against a baseline and time to target when :mod:`trainer.analysis.report` added them.
"""
from __future__ import annotations

import csv
import io
import json
import math
from typing import Any, Sequence

from trainer.analysis.runs import MISSING, WITH_STD, _cell

# (markdown header, row key, digits). Headers with {target} / {baseline} are filled in per table.
METRICS = [
    ("n", "n", 0), ("lr", "lr", None), ("final val loss", "final_val_loss", 4),
    ("best val loss", "best_val_loss", 4), ("Δ val vs {baseline}", "delta_val_loss", 4),
    ("p vs {baseline}", "p_value", None),
    ("final val bpb", "final_val_bpb", 4), ("best val bpb", "best_val_bpb", 4),
    ("reached {target}", "target_reached", 0),
    ("steps to {target}", "steps_to_target", 0), ("tokens to {target}", "tokens_to_target", 0),
    ("time to {target} (s)", "time_to_target_s", 1), ("steps", "steps", 0),
    ("tokens/s", "tokens_per_sec", 0), ("MFU (%)", "mfu", 1), ("peak mem (MiB)", "peak_mem_mb", 1),
    ("wall time (s)", "wall_time_s", 1),
]
NOTED = ("p_value", "delta_val_loss")  # columns whose empty cells say why ("baseline", "1 seed")
ALWAYS = ("final_val_loss", "best_val_loss", "steps", "tokens_per_sec", "peak_mem_mb", "wall_time_s")


def _fmt(value: Any, digits: int | None) -> str:
    if value is None:
        return MISSING
    if isinstance(value, float) and math.isfinite(value) and digits is not None:
        return f"{value:.{digits}f}"
    return _cell(value)


def _p(value: float) -> str:
    return f"{value:.3f}" if value >= 0.001 else f"{value:.1e}"


def metric_columns(rows: Sequence[dict[str, Any]]) -> list[tuple[str, str, int | None]]:
    def shown(key: str) -> bool:
        if key == "n":  # the seed count, next to each component's best lr
            return any("lr" in r for r in rows)
        return key in ALWAYS or any(r.get(key) is not None or r.get(f"{key}_note") for r in rows)

    return [m for m in METRICS if shown(m[1])]


def metric_cell(row: dict[str, Any], key: str, digits: int | None) -> str:
    value, std = row.get(key), row.get(f"{key}_std")
    if value is None and row.get(f"{key}_note"):
        return row[f"{key}_note"]  # why there is no number: "baseline", "1 seed", ...
    if key == "p_value":
        return _p(value)
    if key == "delta_val_loss" and value is not None:  # signed: + is worse than the baseline
        return f"{value:+.{digits}f}"
    if key == "mfu" and value is not None:
        value = 100 * value
    return _fmt(value, digits) if std is None else f"{_fmt(value, digits)} ± {_fmt(std, digits)}"


def _elide_shared(names: Sequence[str]) -> list[str]:
    """Drop the ``k=v`` items every run name shares (``attn=naive,batch_size=2,...`` ->
    ``attn=naive,…``): the table's columns already say what differs; CSV/JSON keep full paths."""
    if len(names) < 2:
        return list(names)
    split = [n.rsplit("/", 1) if "/" in n else ["", n] for n in names]
    shared = set.intersection(*(set(last.split(",")) for _, last in split))
    out = []
    for head, last in split:
        items = ["…" if i in shared else i for i in last.split(",")]
        short = ",".join(i for j, i in enumerate(items) if i != "…" or j == 0 or items[j - 1] != "…")
        out.append(f"{head}/{short}" if head else short)
    return out


def to_markdown(rows: Sequence[dict[str, Any]], keys: Sequence[str], notes: Sequence[str] = (),
                **header_fields: Any) -> str:
    """A markdown table; ``notes`` follow it as a list; ``header_fields`` fill ``{target}`` etc."""
    metrics = metric_columns(rows)
    header = ["run", *keys, "seeds", *(m[0].format(**header_fields) for m in metrics), "status"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row, name in zip(rows, _elide_shared([row["run"] for row in rows])):
        cells = [name, *(_cell(row["config"][k]) for k in keys), ",".join(map(str, row["seeds"])) or MISSING,
                 *(metric_cell(row, key, digits) for _, key, digits in metrics), row["status"]]
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines + ([""] + [f"- {note}" for note in notes] if notes else []))


def to_csv(rows: Sequence[dict[str, Any]], keys: Sequence[str]) -> str:
    names = ["n", "seeds"]
    for _, key, _ in metric_columns(rows):
        if key != "n":  # already first
            names += [key] + ([f"{key}_std"] if key in WITH_STD else [f"{key}_note"] if key in NOTED else [])
    names.append("status")
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["run", *keys, *names])
    for row in rows:
        metrics = [" ".join(map(str, row[m])) if m == "seeds" else row.get(m) for m in names]
        writer.writerow([row["run"], *(row["config"][k] for k in keys),
                         *("" if v is None else v for v in metrics)])
    return out.getvalue()


def to_json(rows: Sequence[dict[str, Any]], keys: Sequence[str], **extra: Any) -> str:
    """``{"keys": [...], "rows": [...]}`` plus ``extra`` (notes, target, baseline, ...)."""
    def plain(value: Any) -> Any:  # JSON has no NaN/inf: a diverged loss becomes its string
        return str(value) if isinstance(value, float) and not math.isfinite(value) else value

    clean = [{k: plain(v) for k, v in row.items()} for row in rows]
    return json.dumps({"keys": list(keys), "rows": clean, **extra}, indent=2, default=str)

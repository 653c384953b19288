"""Comparisons that can be trusted: each component at its own best setting, p-values against a
baseline, and the time each run took to reach a target val loss.

- ``best_by="optim"``: for each optimizer, the seed group (one lr, one setup) with the lowest mean
  final val loss, so every optimizer is shown at its own best lr rather than at a shared one.
- ``baseline="optim=adamw"``: each row's mean final val loss minus the baseline row's (``Δ``), and
  Welch's two-sided t-test of each row's per-seed final val losses against the baseline row's
  (a leave-one-out ablation: ``--baseline ablate=none``, one row per component taken out). A row with fewer than two seeds (or two rows with no spread at all)
  gets no p-value, and its cell says why.
- ``target=1.9``: steps, tokens and wall-clock seconds until val loss first reached 1.9, as the
  mean over the seeds that reached it; the runs that never did are listed by name.
"""
from __future__ import annotations

import math
import os
from typing import Any, Sequence

from trainer.analysis.runs import CompareError, Group, Run, group_runs, load_runs, mean_std, setting, summarize, table_keys
from trainer.analysis.table import _fmt
from trainer.analysis.stats import welch_t_test


def run_name(run: Run, keys: Sequence[str]) -> str:
    """``optim=lion, optim.lr=0.003, seed=1``: the table's columns and the seed; else the path."""
    seed = [f"seed={run.config['seed']}"] if "seed" in run.config else []
    return ", ".join([f"{k}={setting(run, k)}" for k in keys] + seed) if keys else run.rel


def run_lr(run: Run) -> float | None:
    """The peak learning rate a run used (``learning_rate`` resolves to the optimizer's lr)."""
    lr = run.config.get("learning_rate", run.config.get("optim.lr"))
    return float(lr) if isinstance(lr, (int, float)) and not isinstance(lr, bool) else None


def group_lr(group: Group) -> float | None:
    lrs = {run_lr(r) for r in group.runs}
    return lrs.pop() if len(lrs) == 1 else None


def final_loss(group: Group) -> float | None:
    """Mean final val loss over seeds; None for an unfinished group or a non-finite loss."""
    loss = mean_std(group.numbers("final_val_loss"))[0]
    finished = group.runs[0].status == "completed"
    return loss if finished and loss is not None and math.isfinite(loss) else None


def pick_best(groups: Sequence[Group], key: str, keys: Sequence[str] = ()) -> tuple[list[Group], list[str]]:
    """For each value of ``key``, the group with the lowest mean final val loss; and notes on what
    was left out (runs that did not complete, values with no completed run)."""
    if all(g.setting(key) == "-" for g in groups):
        raise CompareError(f"--best-by {key}: no run has a setting '{key}' (try a group such as "
                           "optim or attn, or a config key such as optim.lr)")
    best: dict[str, list[Group]] = {}
    for group in groups:
        if final_loss(group) is not None:
            best.setdefault(group.setting(key), []).append(group)
    chosen = [min(candidates, key=final_loss) for candidates in best.values()]
    notes = [f"best by {key}: each row is the setting with the lowest mean final val loss among the "
             "completed ones tried for it (" + ", ".join(f"{name}: {len(c)}" for name, c in best.items()) + ")"]
    left_out = [r for g in groups if final_loss(g) is None for r in g.runs]
    if left_out:
        notes.append("not considered (no finite final val loss): "
                     + "; ".join(f"{run_name(r, keys)} ({r.status_label})" for r in left_out))
    missing = sorted({g.setting(key) for g in groups} - set(best))
    if missing:
        notes.append(f"no completed run for {key} = " + ", ".join(missing))
    return chosen, notes


def reach(run: Run, target: float) -> tuple[int, float | None] | None:
    """(step, seconds since the run started) of the first val loss at or below ``target``."""
    for step, wall, value in zip(run.val.steps, run.val.wall, run.val.values):
        if value <= target:
            return step, None if run.start_time is None else wall - run.start_time
    return None


def target_numbers(group: Group, target: float) -> tuple[dict[str, Any], list[Run]]:
    """Row entries for ``target`` (means over the seeds that reached it) and the runs that did not."""
    hits = [(run, reach(run, target)) for run in group.runs]
    reached = [(run, hit) for run, hit in hits if hit is not None]
    tokens = [hit[0] * t for run, hit in reached if (t := tokens_per_step(run)) is not None]
    return {
        "target_reached": f"{len(reached)}/{len(hits)}",
        "steps_to_target": mean_std([hit[0] for _, hit in reached])[0],
        "tokens_to_target": mean_std(tokens)[0] if len(tokens) == len(reached) else None,
        "time_to_target_s": mean_std([hit[1] for _, hit in reached])[0],
    }, [run for run, hit in hits if hit is None]


def tokens_per_step(run: Run) -> int | None:
    """Tokens per optimizer step, the global batch: gradient_accumulation_steps * batch_size * block_size."""
    sizes = [run.config.get(k) for k in ("gradient_accumulation_steps", "batch_size", "block_size")]
    return math.prod(sizes) if all(isinstance(s, int) for s in sizes) else None


def find_baseline(groups: Sequence[Group], baseline: str) -> Group:
    key, eq, wanted = baseline.partition("=")
    if not eq or not key:
        raise CompareError(f"--baseline takes key=value (e.g. optim=adamw), got '{baseline}'")

    def matches(group: Group) -> bool:
        have = group.runs[0].value(key)
        if wanted in (str(have), group.setting(key)):
            return True
        try:
            return float(wanted) == float(have)
        except (TypeError, ValueError):
            return False

    found = [g for g in groups if matches(g)]
    if len(found) != 1:
        values = ", ".join(sorted({g.setting(key) for g in groups}))
        problem = "matches no row" if not found else f"matches {len(found)} rows (use --best-by {key})"
        raise CompareError(f"--baseline {baseline} {problem}; the rows' values of {key}: {values}")
    return found[0]


def p_value(group: Group, baseline: Group) -> tuple[float | None, str | None]:
    """Welch's two-sided p for the per-seed final val losses; or None and the reason why not."""
    if group is baseline:
        return None, "baseline"
    a, b = group.numbers("final_val_loss"), baseline.numbers("final_val_loss")
    if len(a) < 2 or len(b) < 2:
        return None, f"{len(a)} seed" if len(a) < 2 else f"baseline: {len(b)} seed"
    if not all(math.isfinite(v) for v in a + b):
        return None, "non-finite loss"
    try:
        return welch_t_test(a, b)[2], None
    except ValueError:  # both rows have exactly equal losses across seeds
        return None, "no spread"


def delta(group: Group, baseline: Group) -> tuple[float | None, str | None]:
    """Mean final val loss minus the baseline's (negative: better); or None and the reason."""
    if group is baseline:
        return None, "baseline"
    mine, theirs = final_loss(group), final_loss(baseline)
    if mine is None or theirs is None:
        return None, "not completed" if mine is None else "baseline not completed"
    return mine - theirs, None


def report(groups: Sequence[Group], keys: Sequence[str], best_by: str | None = None,
           baseline: str | None = None, target: float | None = None
           ) -> tuple[list[Group], list[dict[str, Any]], list[str]]:
    """The table's groups and rows (sorted) with the extra columns asked for, and notes under it."""
    notes: list[str] = []
    if best_by:
        groups, notes = pick_best(groups, best_by, keys)
    rows = [summarize(g, keys) for g in groups]
    base = find_baseline(groups, baseline) if baseline else None
    for group, row in zip(groups, rows):
        if best_by:
            row["lr"] = group_lr(group)
        if target is not None:
            numbers, never = target_numbers(group, target)
            row.update(numbers)
            notes += [f"never reached val loss {target}: {run_name(r, keys)} "
                      f"(best {_fmt(r.numbers['best_val_loss'], 4)})" for r in never]
        if base is not None:
            row["p_value"], row["p_value_note"] = p_value(group, base)
            row["delta_val_loss"], row["delta_val_loss_note"] = delta(group, base)
    if base is not None:
        notes.insert(0, f"Δ: mean final val loss minus {baseline}'s (+: worse); p: Welch's two-sided t-test of "
                        f"per-seed final val loss against {baseline}; it needs at least 2 seeds in both rows")
    by_row = {id(row): group for group, row in zip(groups, rows)}
    rows = sort_rows(rows, "final_val_loss" if best_by else "best_val_loss")
    return [by_row[id(row)] for row in rows], rows, notes


def sort_rows(rows: Sequence[dict[str, Any]], by: str = "best_val_loss") -> list[dict[str, Any]]:
    """Sorted by ``by`` (mean over seeds), lowest first; rows without a finite value come last."""
    def order(row: dict[str, Any]) -> tuple[bool, float, str]:
        value = row[by]
        known = value is not None and math.isfinite(value)
        return (not known, value if known else 0.0, row["run"])

    return sorted(rows, key=order)


def compare(root: str | os.PathLike, all_keys: bool = False
            ) -> tuple[list[Group], list[dict[str, Any]], list[str]]:
    """Load, group and summarize every run under ``root``: (groups, rows sorted by best val loss, keys)."""
    runs = load_runs(root)
    keys = table_keys(runs, all_keys)
    groups = group_runs(runs, keys)
    return groups, sort_rows([summarize(g, keys) for g in groups]), keys

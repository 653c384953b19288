"""Plots for :mod:`trainer.analysis.runs`: val loss against step and wall time, throughput and memory,
and (with ``best_by``) final val loss against lr, one line per component.

Matplotlib is an optional extra (``pip install -e '.[plot]'``), imported only by :func:`write_plots`.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from trainer.analysis.runs import CompareError, Group, mean_std
from trainer.analysis.report import delta, find_baseline, final_loss, group_lr, p_value
from trainer.analysis.table import _fmt

MATPLOTLIB_HINT = "matplotlib is not installed: pip install -e '.[plot]'"


def _aligned(group: Group) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Val loss at the eval steps every run of the group logged: (steps, elapsed s, loss) per run."""
    common = set.intersection(*(set(r.val.steps) for r in group.runs))
    steps = np.array(sorted(common), dtype=float)
    times, losses = [], []
    for run in group.runs:
        at = {s: (w, v) for s, w, v in zip(run.val.steps, run.val.wall, run.val.values)}
        start = run.start_time or 0.0
        times.append([at[s][0] - start for s in sorted(common)])
        losses.append([at[s][1] for s in sorted(common)])
    return steps, np.array(times).reshape(len(group.runs), -1), np.array(losses).reshape(len(group.runs), -1)


def _plot_label(group: Group, keys: Sequence[str]) -> str:
    run = group.runs[0]
    if len(group.runs) > 1:
        return f"{group.short_label(keys)} (n={len(group.runs)})"
    return group.short_label(keys) + ("" if run.status == "completed" else f" ({run.status})")


def _loss_plot(plt: Any, groups: Sequence[Group], keys: Sequence[str], by_time: bool, file: Path) -> None:
    fig, ax = plt.subplots(figsize=(8, 5))
    if len(groups) > 10:  # the default cycle has 10 colors: no two lines may share one
        ax.set_prop_cycle(color=[plt.get_cmap("tab20")(i % 20) for i in range(len(groups))])
    for group in groups:
        steps, times, losses = _aligned(group)
        if steps.size == 0:
            continue
        x = times.mean(axis=0) if by_time else steps
        (line,) = ax.plot(x, losses.mean(axis=0), marker=".", label=_plot_label(group, keys))
        if len(group.runs) > 1:  # min–max over seeds
            ax.fill_between(x, losses.min(axis=0), losses.max(axis=0), color=line.get_color(), alpha=0.2)
    if any(len(g.runs) > 1 for g in groups):
        ax.set_title("mean over seeds; shaded: min–max", fontsize="small")
    ax.set_xlabel("wall-clock time since run start (s)" if by_time else "step")
    ax.set_ylabel("val loss")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize="small")
    else:
        ax.text(0.5, 0.5, "no val/loss logged yet", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(file, dpi=100)
    plt.close(fig)


def _resource_plot(plt: Any, groups: Sequence[Group], keys: Sequence[str], file: Path) -> None:
    labels = [_plot_label(g, keys) for g in groups]
    fig, axes = plt.subplots(1, 2, figsize=(12, 1.5 + 0.5 * len(groups)), sharey=True)
    for ax, metric, title in ((axes[0], "tokens_per_sec", "tokens/s"),
                              (axes[1], "peak_mem_mb", "peak memory (MiB)")):
        stats = [mean_std(g.numbers(metric)) for g in groups]
        means, errs = [m for m, _ in stats], [s or 0.0 for _, s in stats]
        ax.barh(labels, [m or 0.0 for m in means], xerr=errs, color="tab:blue", alpha=0.8)
        for y, m in enumerate(means):
            ax.text(m or 0.0, y, f" {_fmt(m, 0 if metric == 'tokens_per_sec' else 1)}", va="center",
                    fontsize="small")
        ax.set_title(title)
        ax.grid(axis="x", alpha=0.3)
    axes[0].invert_yaxis()
    fig.tight_layout()
    fig.savefig(file, dpi=100)
    plt.close(fig)


def _lr_plot(plt: Any, groups: Sequence[Group], key: str, chosen: Sequence[Group], file: Path) -> None:
    """Final val loss (mean ± std over seeds) against lr, one line per value of ``key``; the chosen
    (best) setting of each is starred, lrs whose runs did not finish are marked on the top edge."""
    fig, ax = plt.subplots(figsize=(8, 5))
    failed: list[tuple[float, str]] = []  # (lr, color)
    for name in dict.fromkeys(g.setting(key) for g in groups):
        points = sorted(((group_lr(g), final_loss(g), g) for g in groups
                         if g.setting(key) == name and group_lr(g) is not None), key=lambda p: p[0])
        done = [(lr, loss, g) for lr, loss, g in points if loss is not None]
        errs = [mean_std(g.numbers("final_val_loss"))[1] or 0.0 for _, _, g in done]
        bars = ax.errorbar([p[0] for p in done], [p[1] for p in done], yerr=errs, marker="o",
                           capsize=3, label=f"{key}={name}")
        color = bars.lines[0].get_color()
        best = [(lr, loss) for lr, loss, g in done if any(g is c for c in chosen)]
        ax.plot([b[0] for b in best], [b[1] for b in best], "*", markersize=16, color=color)
        failed += [(lr, color) for lr, loss, _ in points if loss is None]
    top = ax.get_ylim()[1]
    for lr, color in failed:
        ax.plot(lr, top, "x", markersize=9, color=color, clip_on=False)
    ax.set_ylim(top=top)
    ax.set_xscale("log")
    ax.set_xlabel("peak learning rate")
    ax.set_ylabel("final val loss")
    ax.set_title("mean ± std over seeds; ★ best per line; × on the top edge: did not finish", fontsize="small")
    ax.grid(alpha=0.3, which="both")
    if ax.lines:
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(file, dpi=100)
    plt.close(fig)


def delta_rows(groups: Sequence[Group], keys: Sequence[str], baseline: Group) -> list[tuple]:
    """(Δ mean final val loss vs ``baseline``, its standard error sqrt(s_a²/n_a + s_b²/n_b), Welch p,
    label) for every finished row but the baseline, lowest Δ first."""
    rows = []
    for g in groups:
        d, _ = delta(g, baseline)
        if d is None:
            continue
        sa, sb = (mean_std(x.numbers("final_val_loss"))[1] for x in (g, baseline))
        se = math.sqrt(sa**2 / len(g.runs) + sb**2 / len(baseline.runs)) if sa is not None and sb is not None else 0.0
        rows.append((d, se, p_value(g, baseline)[0], _plot_label(g, keys)))
    return sorted(rows, key=lambda r: r[0])


def _delta_plot(plt: Any, groups: Sequence[Group], keys: Sequence[str], baseline: Group, file: Path) -> None:
    """Each row's Δ final val loss against the baseline's as a bar, ± its standard error, the
    Welch p-value beside it: a leave-one-out ablation at a glance."""
    rows = delta_rows(groups, keys, baseline)
    fig, ax = plt.subplots(figsize=(8, 1.5 + 0.4 * max(len(rows), 1)))
    colors = ["tab:green" if d < 0 else "tab:red" for d, *_ in rows]
    ax.barh([r[3] for r in rows], [r[0] for r in rows], xerr=[r[1] for r in rows], color=colors, alpha=0.8, capsize=3)
    for y, (d, se, p, _) in enumerate(rows):
        ax.text(max(d + se, 0.0), y, f"  p={p:.2g}" if p is not None else "", va="center", fontsize="small")
    ax.axvline(0.0, color="black", linewidth=0.8)
    ax.invert_yaxis()
    ax.set_xlabel(f"Δ final val loss vs {_plot_label(baseline, keys)} (+: worse; bar: ± standard error)")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(file, dpi=100)
    plt.close(fig)


def write_plots(groups: Sequence[Group], out_dir: str | os.PathLike, keys: Sequence[str] = (),
                best_by: str | None = None, candidates: Sequence[Group] = (), baseline: str | None = None
                ) -> list[Path]:
    """Val loss vs step, val loss vs wall-clock time, and tokens/s + peak memory bars, as PNGs;
    with ``best_by``, also final val loss vs lr over every group in ``candidates``; with
    ``baseline`` (key=value), each row's Δ final val loss against that row's, with p-values.

    Lines and bars are labelled by the table's columns ``keys`` (run paths when empty)."""
    try:
        import matplotlib
    except ImportError as err:
        raise CompareError(MATPLOTLIB_HINT) from err
    matplotlib.use("Agg")  # files only: works without a display
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = [out / "val_loss_vs_step.png", out / "val_loss_vs_time.png", out / "throughput_memory.png"]
    _loss_plot(plt, groups, keys, by_time=False, file=files[0])
    _loss_plot(plt, groups, keys, by_time=True, file=files[1])
    _resource_plot(plt, groups, keys, files[2])
    if best_by:
        files.append(out / "lr_sensitivity.png")
        _lr_plot(plt, candidates or groups, best_by, groups, files[-1])
    if baseline:
        files.append(out / "delta_vs_baseline.png")
        _delta_plot(plt, groups, keys, find_baseline(groups, baseline), files[-1])
    return files

"""Compare the runs under a directory: a table sorted by best val loss, optionally with plots.

    python scripts/compare.py runs/multirun/2025-01-01_12-00-00            # markdown table
    python scripts/compare.py runs/ --csv > results.csv
    python scripts/compare.py runs/multirun/<sweep> --plot-dir plots/    # + PNG plots
    python scripts/compare.py runs/lr_sweep --best-by optim --baseline optim=adamw --target 1.9

Columns are the settings the runs' overrides varied. Runs that differ only by `seed` are grouped
(mean ± std); unfinished runs are listed as incomplete. `--best-by optim` keeps, for each optimizer,
the setting (lr) with the lowest mean final val loss; `--baseline` adds Welch t-test p-values
against one row; `--target` adds steps, tokens and time to reach a val loss.
"""
from __future__ import annotations

import argparse
import os
import sys

from trainer.analysis.runs import CompareError, group_runs, load_runs, table_keys
from trainer.analysis.report import report
from trainer.analysis.plots import write_plots
from trainer.analysis.table import to_csv, to_json, to_markdown


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="compare.py", description=__doc__.split("\n")[0])
    parser.add_argument("runs_dir", metavar="RUNS_DIR", help="directory searched recursively for runs")
    fmt = parser.add_mutually_exclusive_group()
    fmt.add_argument("--csv", action="store_true", help="print CSV instead of markdown")
    fmt.add_argument("--json", action="store_true", help="print JSON instead of markdown")
    parser.add_argument("--all-keys", action="store_true",
                        help="a column for every config key that differs, not only the overridden ones")
    parser.add_argument("--best-by", metavar="KEY",
                        help="one row per value of KEY (e.g. optim): its setting with the lowest mean "
                             "final val loss, i.e. each optimizer at its own best lr")
    parser.add_argument("--baseline", metavar="KEY=VALUE",
                        help="Welch t-test p-value of each row's final val loss against this row's")
    parser.add_argument("--target", metavar="LOSS", type=float,
                        help="steps, tokens and wall time until val loss first reached LOSS")
    parser.add_argument("--plot-dir", metavar="DIR", help="also write PNG plots into DIR (needs matplotlib)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        runs = load_runs(args.runs_dir)
        keys = table_keys(runs, args.all_keys)
        candidates = group_runs(runs, keys)
        groups, rows, notes = report(candidates, keys, args.best_by, args.baseline, args.target)
        if args.plot_dir:
            files = write_plots(groups, args.plot_dir, keys, args.best_by, candidates, args.baseline)
    except CompareError as err:
        print(f"compare.py: error: {err}", file=sys.stderr)
        return 2

    try:
        if args.csv:
            print(to_csv(rows, keys).rstrip("\n"), flush=True)
        elif args.json:
            print(to_json(rows, keys, notes=notes, best_by=args.best_by, baseline=args.baseline,
                          target=args.target), flush=True)
        else:
            print(to_markdown(rows, keys, notes, baseline=args.baseline, target=args.target), flush=True)
    except BrokenPipeError:  # `compare.py runs/ | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    if args.csv and notes:  # CSV stays machine-readable: notes go to stderr
        print("\n".join(notes), file=sys.stderr)
    if args.plot_dir:
        print(f"wrote {len(files)} plots to {args.plot_dir}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

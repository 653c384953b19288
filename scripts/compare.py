"""Compare the runs under a directory: a table sorted by best val loss, optionally with plots.

    python scripts/compare.py runs/multirun/2025-01-01_12-00-00            # markdown table
    python scripts/compare.py runs/ --csv > results.csv
    python scripts/compare.py runs/multirun/<sweep> --plot-dir plots/    # + PNG plots

Runs that differ only by `seed` are grouped (mean ± std); unfinished runs are listed as incomplete.
"""
from __future__ import annotations

import argparse
import os
import sys

from trainer.compare import CompareError, compare, to_csv, to_json, to_markdown
from trainer.compare_plots import write_plots


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="compare.py", description=__doc__.split("\n")[0])
    parser.add_argument("runs_dir", metavar="RUNS_DIR", help="directory searched recursively for runs")
    fmt = parser.add_mutually_exclusive_group()
    fmt.add_argument("--csv", action="store_true", help="print CSV instead of markdown")
    fmt.add_argument("--json", action="store_true", help="print JSON instead of markdown")
    parser.add_argument("--all-keys", action="store_true",
                        help="a column for every differing config key, not only the ones a group choice "
                             "(optim=lion) does not already explain")
    parser.add_argument("--plot-dir", metavar="DIR", help="also write PNG plots into DIR (needs matplotlib)")
    args = parser.parse_args(argv)

    try:
        groups, rows, keys = compare(args.runs_dir, all_keys=args.all_keys)
        if args.plot_dir:
            files = write_plots(groups, args.plot_dir, keys)
    except CompareError as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 2

    render = to_csv if args.csv else to_json if args.json else to_markdown
    try:
        print(render(rows, keys).rstrip("\n"), flush=True)
    except BrokenPipeError:  # `compare.py runs/ | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    if args.plot_dir:
        print(f"wrote {len(files)} plots to {args.plot_dir}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What every benchmark here shares: measurements side by side in alternated rounds, and ratios.

These machines drift by +-15% between minutes, so a benchmark never compares two numbers taken
minutes apart: each round measures every contender once, in an order rotated from round to round
(so none always runs first, warm or cold), and a ratio is reported as the median over rounds with
the per-round ratios beside it.

    from common import alternated, ratio
    times = alternated({"ours": run_ours, "theirs": run_theirs}, rounds=3)   # name -> [s per round]
    print(ratio(times["ours"], times["theirs"]))                            # "0.97x (0.95, 0.97, 1.01)"

Scripts in this folder import it as ``common`` (they run as ``python scripts/bench/<name>.py``,
which puts this folder first on ``sys.path``).
"""
from __future__ import annotations

import os
import re
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable, Sequence

REPO = Path(__file__).resolve().parents[2]
PROGRESS_LINE = re.compile(r"^\s*step\s+(\d+)/\d+")  # scripts/train.py's progress lines


def alternated(measure: dict[str, Callable[[], float]], rounds: int, log: Callable[[str], None] | None = None
               ) -> dict[str, list[float]]:
    """``measure[name]()`` (returning one figure, e.g. seconds) for every name, once per round, in an
    order rotated by one each round. Returns ``name -> [figure of round 0, round 1, ...]``."""
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds}")
    names = list(measure)
    out: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            out[name].append(float(measure[name]()))
            if log is not None:
                log(f"round {r}: {name} {out[name][-1]:.6g}")
    return out


def seconds(fn: Callable[[], object], repeat: int = 1, sync: Callable[[], None] | None = None) -> float:
    """Wall seconds per call of ``fn`` over ``repeat`` calls (``sync`` waits for a device first and last)."""
    if sync is not None:
        sync()
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    if sync is not None:
        sync()
    return (time.perf_counter() - t0) / repeat


def ratios(a: Sequence[float], b: Sequence[float]) -> list[float]:
    """Per-round ratios a / b (the two lists come from the same rounds)."""
    if len(a) != len(b) or not a:
        raise ValueError(f"ratios need two equally long, non-empty lists of rounds, got {len(a)} and {len(b)}")
    return [x / y for x, y in zip(a, b)]


def ratio(a: Sequence[float], b: Sequence[float], digits: int = 2) -> str:
    """The median per-round ratio a / b, then every round's: ``"0.97x (0.95, 0.97, 1.01)"``."""
    return ratio_cell(ratios(a, b), digits)


def ratio_cell(per_round: Sequence[float], digits: int = 2) -> str:
    """A table cell for ratios measured in alternated rounds: the median, then every round's."""
    shown = ", ".join(f"{x:.{digits}f}" for x in per_round)
    return f"{statistics.median(per_round):.{digits}f}x ({shown})"


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


# ---------------------------------------------------------------------------------------------
# training runs in subprocesses, timed at their progress lines


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` (all its threads) so far (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def timed_steps(cmd: list[str], cwd: Path, pattern: re.Pattern, log: Path, threads: int) -> list[tuple]:
    """Run ``cmd``; return (step, wall time, CPU time) for each output line matching ``pattern``
    (its first group is the step). ``threads``: OMP_NUM_THREADS for the run (0: leave it)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), OMP_WAIT_POLICY="PASSIVE")
    marks = []
    with open(log, "w") as f, subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE,
                                                 stderr=subprocess.STDOUT, text=True) as proc:
        for line in proc.stdout:
            now = time.perf_counter()
            f.write(line)
            m = pattern.match(line)
            if m:
                marks.append((int(m.group(1)), now, cpu_seconds(proc.pid)))
    if proc.returncode != 0:
        raise SystemExit(f"error: {' '.join(map(str, cmd[:3]))} ... failed (exit {proc.returncode}); see {log}")
    return marks

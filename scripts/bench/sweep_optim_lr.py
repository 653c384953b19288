#!/usr/bin/env python
"""Tune every optimizer's lr, then replicate: the optimizer comparison in one command.

    python scripts/bench/sweep_optim_lr.py --out runs/optimizers_lr [--jobs 2] [--optims adamw,muon]

Stage 1 runs each optimizer (configs/optim/*.yaml) over a log-spaced grid of lrs, its config's lr
times ``--grid`` (default 10^-0.5, 1, 10^0.5: half a decade apart), at the first seed. If the best lr is at an end
of the grid, the grid grows by one point on that side (up to ``--extend`` times). Stage 2 runs the
other seeds at each optimizer's best lr (and, with ``--neighbours``, at the lrs beside it). Every run is an ordinary
``scripts/train.py +experiment=optimizers_lr optim=<o> optim.lr=<lr> seed=<s>`` run under
``--out``, so ``scripts/compare.py --best-by optim`` reads the directory. Finished runs are
skipped, so an interrupted sweep resumes where it stopped; a run directory that exists without a
summary is taken to be another driver's run and waited for (delete it to rerun a crashed run). Extra arguments after ``--`` are passed
to every run (e.g. ``-- max_iters=1000``).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def config_lr(optim: str) -> float:
    from omegaconf import OmegaConf

    return float(OmegaConf.load(REPO / "configs" / "optim" / f"{optim}.yaml").lr)


def run_dir(out: Path, optim: str, lr: float, seed: int) -> Path:
    return out / f"optim={optim},optim.lr={lr:.3g},seed={seed}"


def final_loss(path: Path) -> float | None:
    """None while the run has not ended (the trainer rewrites summary.json at every eval);
    inf for a run that ended without a finite final loss."""
    summary = path / "summary.json"
    if not summary.exists():
        return None
    summary = json.loads(summary.read_text())
    if summary.get("status") in (None, "running"):
        return None
    value = summary.get("final_val_loss")
    return float(value) if value is not None and math.isfinite(value) else math.inf


def claim(path: Path) -> bool:
    """Make the run's directory; False if it exists already (another driver has the run)."""
    try:
        path.mkdir(parents=True)
        return True
    except FileExistsError:
        return False


def wait_for(path: Path, timeout_s: float = 3600) -> None:
    deadline = time.monotonic() + timeout_s
    while final_loss(path) is None and time.monotonic() < deadline:
        time.sleep(10)


def train(out: Path, optim: str, lr: float, seed: int, extra: list[str], log: Path) -> float | None:
    path = run_dir(out, optim, lr, seed)
    if final_loss(path) is None and not claim(path):
        wait_for(path)  # another driver started it (two drivers may share --out)
    elif final_loss(path) is None:
        cmd = [sys.executable, str(REPO / "scripts" / "train.py"), "+experiment=optimizers_lr", f"optim={optim}",
               f"optim.lr={lr:.3g}", f"seed={seed}", f"hydra.run.dir='{path}'", *extra]
        with open(log, "a") as f:
            f.write(" ".join(cmd) + "\n")
            f.flush()
            subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env=os.environ.copy())
    loss = final_loss(path)
    print(f"{optim:10s} lr={lr:<9.3g} seed={seed}: final val loss {loss}", flush=True)
    return loss


def run_all(jobs: list[tuple[str, float, int]], args, extra) -> None:
    log = args.out / "sweep.log"
    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(lambda j: train(args.out, *j, extra, log), jobs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "optimizers_lr")
    parser.add_argument("--optims", default=",".join(sorted(p.stem for p in (REPO / "configs" / "optim").glob("*.yaml"))))
    parser.add_argument("--grid", default="0.316,1,3.16", help="multiples of each config's lr, ascending")
    parser.add_argument("--seeds", default="1337,1338,1339", help="stage 1 uses the first")
    parser.add_argument("--extend", type=int, default=1, help="grid points to add where the best lr is at an end")
    parser.add_argument("--neighbours", action=argparse.BooleanOptionalAction, default=False,
                        help="stage 2 also replicates the lrs next to the best")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (each uses OMP_NUM_THREADS threads)")
    args, extra = parser.parse_known_args()
    extra = [e for e in extra if e != "--"]
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    optims = args.optims.split(",")
    mults = [float(m) for m in args.grid.split(",")]
    step = mults[1] / mults[0] if len(mults) > 1 else 2.0
    seeds = [int(s) for s in args.seeds.split(",")]
    grids = {o: [config_lr(o) * m for m in mults] for o in optims}

    # stage 1: the grid at one seed, grown where the best lr is at an end
    run_all([(o, lr, seeds[0]) for o in optims for lr in grids[o]], args, extra)
    for _ in range(args.extend):
        grow = []
        for o in optims:
            losses = [final_loss(run_dir(args.out, o, lr, seeds[0])) or math.inf for lr in grids[o]]
            best = losses.index(min(losses))
            if best == 0:
                grids[o].insert(0, grids[o][0] / step)
                grow.append((o, grids[o][0], seeds[0]))
            elif best == len(losses) - 1:
                grids[o].append(grids[o][-1] * step)
                grow.append((o, grids[o][-1], seeds[0]))
        if not grow:
            break
        run_all(grow, args, extra)

    # stage 2: the other seeds at the best lr, then at its neighbours
    best_i = {}
    for o in optims:
        losses = [final_loss(run_dir(args.out, o, lr, seeds[0])) or math.inf for lr in grids[o]]
        best_i[o] = losses.index(min(losses))
        print(f"best lr for {o}: {grids[o][best_i[o]]:.3g} (stage 1 loss {min(losses):.4f})", flush=True)
    run_all([(o, grids[o][best_i[o]], s) for o in optims for s in seeds[1:]], args, extra)
    if args.neighbours:
        near = [(o, grids[o][i], s) for o in optims for i in (best_i[o] - 1, best_i[o] + 1)
                if 0 <= i < len(grids[o]) for s in seeds[1:]]
        run_all(near, args, extra)


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""What each speedrun component costs per training step: the full recipe and the recipe minus each
component (configs/ablate/), side by side in alternated rounds, in one process.

    python scripts/bench/bench_speedrun_components.py --rounds 5 --steps 10 --threads 1
    python scripts/bench/bench_speedrun_components.py --preset speedrun_cpu --only none,rmsnorm

Each variant is a real ``Trainer`` built from ``+experiment=<preset> ablate=<name>`` and timed over
``--steps`` calls of its ``train_step`` (batch sampling, forward, backward, clip, optimizer); the
table gives each variant's ms per step and its time relative to the full recipe (``ablate=none``),
median over rounds with every round's ratio. The leave-one-out table (scripts/compare.py
--baseline ablate=none) says what each component does to the loss at a fixed number of steps; this
says what it costs in time, and the two together say whether it shortens the time to a target.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from common import alternated, ratio

REPO = Path(__file__).resolve().parents[2]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="speedrun", help="experiment preset whose ablations are timed")
    p.add_argument("--only", default="", help="comma-separated ablations (default: every configs/ablate/*.yaml)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=10, help="train_step calls per timed burst")
    p.add_argument("--threads", type=int, default=1, help="torch threads (0: leave the default)")
    return p.parse_args(argv)


def timer(preset: str, ablation: str, steps: int, work: Path):
    """A function timing ``steps`` train steps of the preset minus ``ablation`` (ms per step)."""
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import compose_cfg

    from trainer.loop import Trainer

    overrides = [f"+experiment={preset}", f"ablate={ablation}", "device=cpu", "eval_interval=0",
                 "max_iters=1000000", "target_val_loss=null"]
    trainer = Trainer(compose_cfg(overrides), work / ablation, overrides)
    it = [0]

    def measure() -> float:
        t0 = time.perf_counter()
        for _ in range(steps):
            trainer.train_step(it[0])
            it[0] += 1
        trainer.check_state(weights=False)  # reads the device (a no-op wait on a CPU)
        return (time.perf_counter() - t0) / steps * 1e3

    measure()  # warm-up: first-call allocations, the optimizer's state
    return measure, trainer


def main(argv=None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(REPO))
    from trainer.config import components

    if args.threads:
        torch.set_num_threads(args.threads)
    names = args.only.split(",") if args.only else ["none"] + [n for n in components("ablate") if n != "none"]
    work = Path(tempfile.mkdtemp(prefix="bench_components_"))
    timers, trainers = {}, []
    for name in names:
        timers[name], trainer = timer(args.preset, name, args.steps, work)
        trainers.append(trainer)
    tokens = trainers[0].tokens_per_step
    ms = alternated(timers, rounds=args.rounds)
    print(f"+experiment={args.preset}, {torch.get_num_threads()} thread(s), {args.steps} steps per burst, "
          f"{args.rounds} alternated rounds; {tokens:,} tokens per step\n")
    print("| ablate | ms/step (median) | tokens/s | time vs full recipe (median, per round) |\n|---|---:|---:|---|")
    for name in names:
        cell = "1 (the full recipe)" if name == "none" else ratio(ms[name], ms["none"])
        print(f"| {name} | {statistics.median(ms[name]):.1f} | {tokens / statistics.median(ms[name]) * 1e3:,.0f} | {cell} |")
    for trainer in trainers:
        trainer.release()
    return 0


if __name__ == "__main__":
    sys.exit(main())

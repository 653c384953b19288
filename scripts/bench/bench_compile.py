#!/usr/bin/env python
"""Eager vs ``compile=true`` training tokens/s for each attention, side by side in alternated rounds.

    OMP_WAIT_POLICY=PASSIVE python scripts/bench/bench_compile.py --iters 300 --rounds 2
    OMP_NUM_THREADS=1 python scripts/bench/bench_compile.py --in-process --rounds 5   # quicker, one process

Each run is ``scripts/train.py`` (default nano recipe, periodic eval off) in a subprocess, timed
like ``bench_vs_nanogpt.py``: from the progress line of step ``--start`` to the last one, by wall
clock and by the process's CPU time. ``first step s`` is the time from launch to step 0's line:
start-up plus, for compiled runs, compilation (Inductor's on-disk cache makes later runs faster,
so the first compiled run of a machine pays the most). ``break-even`` is the number of steps
after which the compiled run has made up its extra start-up time.

``--in-process`` instead builds the nano model and AdamW once per attention, eager and compiled
side by side in one process, and alternates timed bursts of training steps (forward, backward,
clip, AdamW) between them, by wall clock and by this process's CPU time. That is the measure to
use on a machine shared with other jobs: both variants see the same neighbours.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from common import PROGRESS_LINE, REPO, alternated, median, ratio, timed_steps

from trainer.config import build, components, load_component

CPU_ATTENTION = [a for a in components("attn") if a != "flash"]  # flash needs CUDA (or the slow interpreter)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--attn", nargs="*", default=CPU_ATTENTION, choices=components("attn"))
    p.add_argument("--iters", type=int, default=300)
    p.add_argument("--start", type=int, default=50)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS (0: leave the environment)")
    p.add_argument("--work-dir", type=Path, default=None)
    p.add_argument("--in-process", action="store_true", help="alternate eager/compiled steps in this process")
    p.add_argument("--steps", type=int, default=20, help="--in-process: steps per timed burst")
    p.add_argument("overrides", nargs="*", help="extra overrides for scripts/train.py")
    return p.parse_args(argv)


def run(args, attn: str, compiled: bool, run_dir: Path) -> dict:
    cmd = [sys.executable, str(REPO / "scripts" / "train.py"), f"attn={attn}", f"compile={str(compiled).lower()}",
           f"max_iters={args.iters}", "eval_interval=0", "log_interval=10", "sample_tokens=0", "device=cpu",
           f"hydra.run.dir={run_dir}", *args.overrides]
    t_launch = time.perf_counter()
    marks = timed_steps(cmd, REPO, PROGRESS_LINE, run_dir.with_suffix(".log"), args.threads)
    window = [m for m in marks if m[0] >= args.start]
    (s0, w0, c0), (s1, w1, c1) = window[0], window[-1]
    tokens = (s1 - s0) * 768
    return {"wall": tokens / (w1 - w0), "cpu": tokens / (c1 - c0), "first": marks[0][1] - t_launch,
            "step_s": (w1 - w0) / (s1 - s0)}


def in_process(args) -> None:
    import torch

    from models import GPT, GPTConfig
    from trainer.optim import param_groups
    from trainer.optim import AdamW

    print(f"in one process, {torch.get_num_threads()} thread(s); {args.rounds} alternated bursts of {args.steps} "
          "steps each (nano, batch 12, block 64, AdamW, clip 1)\n")
    print("| attn | eager tok/s | compiled tok/s | compiled / eager (wall, per burst) | compiled / eager (CPU time) "
          "| compile s (first step) |\n|---|---:|---:|---|---:|---:|")
    x = torch.randint(0, 65, (12, 64))
    for attn in args.attn:
        steps, first = {}, {}
        for compiled in (False, True):
            torch.manual_seed(0)
            model = GPT(GPTConfig(vocab_size=65, gelu="exact"), build(load_component("attn", attn)))  # the nano recipe
            opt = AdamW(param_groups(model, 0.1), lr=1e-3, betas=(0.9, 0.99))
            fwd = torch.compile(model) if compiled else model

            def step(fwd=fwd, model=model, opt=opt):
                _, loss = fwd(x, x)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)

            t0 = time.perf_counter()
            step()
            steps[compiled], first[compiled] = step, time.perf_counter() - t0
        cpu: dict = {False: [], True: []}

        def burst(compiled: bool):
            def measure() -> float:  # tokens per wall second; CPU time on the side
                w0, c0 = time.perf_counter(), time.process_time()
                for _ in range(args.steps):
                    steps[compiled]()
                cpu[compiled].append(args.steps * 768 / (time.process_time() - c0))
                return args.steps * 768 / (time.perf_counter() - w0)
            return measure

        wall = alternated({False: burst(False), True: burst(True)}, args.rounds)
        print(f"| {attn} | {median(wall[False]):,.0f} | {median(wall[True]):,.0f} | {ratio(wall[True], wall[False])} | "
              f"{median([c / e for e, c in zip(cpu[False], cpu[True])]):.2f}x | {first[True]:.0f} |", flush=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.in_process:
        in_process(args)
        return 0
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="bench_compile_"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"{args.iters} steps per run, timed from step {args.start}; runs in {work}\n")
    print("| attn | eager tok/s | compiled tok/s | compiled / eager (wall, per round) | compiled / eager (CPU time) "
          "| first step s (eager / compiled) | break-even steps |")
    print("|---|---:|---:|---|---:|---|---:|")
    for attn in args.attn:
        res = {False: [], True: []}

        def one(compiled: bool):
            def measure() -> float:
                res[compiled].append(run(args, attn, compiled, work / f"{attn}_c{int(compiled)}_r{len(res[compiled])}"))
                return res[compiled][-1]["wall"]
            return measure

        wall = alternated({False: one(False), True: one(True)}, args.rounds)
        med = {c: {k: median([x[k] for x in res[c]]) for k in res[c][0]} for c in res}
        cpu = median([c["cpu"] / e["cpu"] for e, c in zip(res[False], res[True])])
        extra = med[True]["first"] - med[False]["first"]
        saved = med[False]["step_s"] - med[True]["step_s"]
        even = f"{extra / saved:,.0f}" if saved > 0 else "never"
        print(f"| {attn} | {med[False]['wall']:,.0f} | {med[True]['wall']:,.0f} | {ratio(wall[True], wall[False])} | "
              f"{cpu:.2f}x | {med[False]['first']:.0f} / {med[True]['first']:.0f} | {even} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

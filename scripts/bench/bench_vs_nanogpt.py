#!/usr/bin/env python
"""Training tokens/s of this trainer and of nanoGPT, side by side, in alternated rounds.

    git clone https://github.com/karpathy/nanoGPT /tmp/nanoGPT          # any nanoGPT checkout
    OMP_WAIT_POLICY=PASSIVE python scripts/bench/bench_vs_nanogpt.py /tmp/nanoGPT --rounds 3 --iters 300
    OMP_WAIT_POLICY=PASSIVE python scripts/bench/bench_vs_nanogpt.py /tmp/nanoGPT --in-process --rounds 6
    python scripts/bench/bench_vs_nanogpt.py /tmp/nanoGPT --record --rounds 3 --budget-iters 1200   # the speedrun record

Both run the same nano recipe on the same text: our Shakespeare corpus (char-level) is written
as nanoGPT's ``train.bin`` / ``val.bin`` / ``meta.pkl`` into a scratch directory, and nanoGPT's
``train.py`` runs there (it reads ``configurator.py`` and ``data/`` from its working directory;
nothing of nanoGPT is copied into this repository). Recipe: 4 layers, 4 heads, 128 wide, block
64, batch 12, bias, dropout 0, AdamW lr 1e-3 (betas 0.9/0.99, decay 0.1), warmup 100, cosine,
grad clip 1, fp32, no compile, periodic evaluation off (nanoGPT still evaluates once at step 0,
outside the timed window).

``--record``: time to a target loss instead of tokens/s. Each round runs nanoGPT's recipe for its
2000 iterations (timed from its iteration-0 line to its last one, so start-up and its step-0
evaluation are outside, as below; its own val loss estimate at step 2000 is printed too) and our
``+experiment=speedrun_cpu`` preset, which stops at the first eval with val loss <= 1.8857 and
records in summary.json the training time to it with evaluations excluded (``time_to_target_s``,
as the speedrun counts it; ``eval_time_s`` beside it). With ``--budget-iters N`` the round also
runs the preset for N steps without the target and reports the best val loss among its evals whose
training time (TensorBoard ``time/train_s``) is within that round's nanoGPT time. Rounds alternate
which program goes first; ratios are per round, then the median.

Throughput is timed by this script, the same way for both: between the progress lines of two
steps (``--start`` and the last logged step), as the lines arrive on the child's stdout.
Start-up, data loading, step 0's evaluation and the final evaluation are outside that window.
Two clocks: wall time, and the child's CPU time (user + system, all threads, from /proc). On a
machine shared with other jobs the wall clock mostly measures the neighbours; CPU time measures
the work each program does, provided both run with the same thread count (``--threads``, 1 by
default, with ``OMP_WAIT_POLICY=PASSIVE`` so idle OpenMP threads do not spin). Rounds alternate
which program goes first; the table gives each round's ratios and the median.
"""
from __future__ import annotations

import argparse
import json
import pickle
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import PROGRESS_LINE, REPO, alternated, ratio, ratio_cell, timed_steps

RECIPE = dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12)
NANOGPT_LINE = re.compile(r"^iter (\d+): loss")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("nanogpt", type=Path, help="path to a nanoGPT checkout (holding train.py and model.py)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--iters", type=int, default=300, help="training steps per run")
    p.add_argument("--start", type=int, default=50, help="first step of the timed window (after warm-up)")
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS for both (0: leave the environment)")
    p.add_argument("--work-dir", type=Path, default=None, help="scratch directory (default: a temporary one)")
    p.add_argument("--ours", nargs="*", default=[], help="extra overrides for scripts/train.py (e.g. compile=true)")
    p.add_argument("--nanogpt-args", nargs="*", default=[], help="extra --key=value for nanoGPT (e.g. --compile=True)")
    p.add_argument("--in-process", action="store_true",
                   help="instead: time one training step of both models, and our Trainer.train_step, in this process")
    p.add_argument("--steps", type=int, default=20, help="--in-process: steps per timed burst")
    p.add_argument("--record", action="store_true",
                   help="instead: our speedrun preset's time to the target val loss against nanoGPT's time for --iters")
    p.add_argument("--preset", default="speedrun_cpu", help="--record: the experiment preset that trains to the target")
    p.add_argument("--budget-iters", type=int, default=0,
                   help="--record: also run the preset for this many steps (no target) and report its best val "
                        "loss within nanoGPT's time (0: skip)")
    return p.parse_args(argv)


def in_process(args) -> None:
    """The two models' cost without either program's loop: forward, backward, clip and AdamW on one
    fixed batch, ours (GPT from models/) against nanoGPT's ``model.py``, with the same config and
    initial weights, in alternated bursts; plus our ``Trainer.train_step`` (data, lr schedule,
    divergence watch) against the bare step of its own model, to show what the loop adds."""
    import torch

    sys.path.insert(0, str(args.nanogpt.resolve()))
    import model as nanogpt  # nanoGPT's model.py, from the checkout

    sys.path.insert(0, str(REPO / "tests"))
    from conftest import compose_cfg

    from trainer.loop import Trainer

    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = ["sample_tokens=0", "eval_interval=0", "device=cpu", "overwrite=true", "max_iters=1000000"]
    trainer = Trainer(compose_cfg(overrides), Path(tempfile.mkdtemp(prefix="bench_nanogpt_")) / "run", overrides)
    cfg = trainer.model_config
    ours = trainer.raw_model
    theirs = nanogpt.GPT(nanogpt.GPTConfig(**{k: getattr(cfg, k) for k in RECIPE if k != "batch_size"},
                                           vocab_size=cfg.vocab_size, dropout=0.0, bias=True))
    missing, unexpected = theirs.load_state_dict(ours.state_dict(), strict=False)
    if unexpected or any(not k.endswith(".attn.bias") for k in missing):  # nanoGPT's causal-mask buffers aside
        raise SystemExit(f"the two models' parameters differ: missing {missing}, unexpected {unexpected}")
    from trainer.data import get_batch, sample_offsets

    bs, block = int(trainer.cfg.batch_size), int(trainer.cfg.block_size)
    offsets = sample_offsets(trainer.data.train, block, bs, torch.Generator().manual_seed(0))
    x, y = get_batch(trainer.data.train, offsets, block, trainer.device)
    theirs_opt = torch.optim.AdamW(theirs.parameters(), **{k: trainer.optimizer.defaults[k]
                                                            for k in ("lr", "betas", "weight_decay")})

    def bare(model, opt):
        def step(_it):
            _, loss = model(x, y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step

    variants = {"ours (model step)": bare(ours, trainer.optimizer), "nanoGPT (model step)": bare(theirs, theirs_opt),
                "ours (Trainer.train_step)": trainer.train_step}
    ms = {name: [] for name in variants}
    it = 0
    for r in range(args.rounds + 1):  # round 0 warms up and is not counted
        for name in (list(variants) if r % 2 == 0 else list(reversed(variants))):
            t0 = time.perf_counter()
            for _ in range(args.steps):
                variants[name](it)
                it += 1
            if r:
                ms[name].append((time.perf_counter() - t0) / args.steps * 1e3)
    trainer.release()
    print(f"ms per step, {torch.get_num_threads()} thread(s), bursts of {args.steps} steps in {args.rounds} "
          f"alternated rounds (median, then each round)\n")
    for name, values in ms.items():
        print(f"{name:28s} {statistics.median(values):6.2f} ms  ({', '.join(f'{v:.1f}' for v in values)})")
    base = ms["nanoGPT (model step)"]
    print(f"\nours / nanoGPT, model step: {ratio_cell([b / a for a, b in zip(ms['ours (model step)'], base)])} "
          "(speed ratio, >1: ours faster)")
    loop = [a - b for a, b in zip(ms["ours (Trainer.train_step)"], ms["ours (model step)"])]
    print(f"Trainer.train_step minus its model step: {statistics.median(loop):+.2f} ms "
          f"({', '.join(f'{v:+.2f}' for v in loop)})")


def write_nanogpt_data(work: Path) -> Path:
    """Our corpus as nanoGPT's data/<name>/{train,val}.bin (uint16) + meta.pkl."""
    from trainer.data import load_shakespeare

    data = load_shakespeare()
    out = work / "data" / "gptlab_shakespeare"
    out.mkdir(parents=True, exist_ok=True)
    for split in ("train", "val"):
        np.asarray(getattr(data, split), dtype=np.uint16).tofile(out / f"{split}.bin")
    with open(out / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": data.vocab_size}, f)
    return out


def tokens_per_sec(marks: list[tuple], start: int) -> tuple[float, float]:
    """Tokens per wall second and per CPU second over the timed window."""
    window = [m for m in marks if m[0] >= start]
    if len(window) < 2:
        raise SystemExit(f"error: fewer than two progress lines after step {start}; raise --iters")
    (s0, w0, c0), (s1, w1, c1) = window[0], window[-1]
    tokens = (s1 - s0) * RECIPE["batch_size"] * RECIPE["block_size"]
    return tokens / (w1 - w0), tokens / max(c1 - c0, 1e-9)


def ours_cmd(args, run_dir: Path) -> list[str]:
    return [sys.executable, str(REPO / "scripts" / "train.py"), f"max_iters={args.iters}", "eval_interval=0",
            "log_interval=10", "sample_tokens=0", "device=cpu", f"hydra.run.dir={run_dir}", *args.ours]


def nanogpt_cmd(args, out_dir: Path) -> list[str]:
    n = args.iters
    opts = dict(dataset="gptlab_shakespeare", device="cpu", compile=False, dtype="float32", bias=True,
                dropout=0.0, learning_rate=1e-3, min_lr=1e-4, beta2=0.99, weight_decay=0.1, grad_clip=1.0,
                warmup_iters=100, lr_decay_iters=n, max_iters=n, eval_interval=n + 1000, eval_iters=1,
                log_interval=10, always_save_checkpoint=False, out_dir=str(out_dir), gradient_accumulation_steps=1,
                **RECIPE)  # nanoGPT defaults to 40 accumulation steps (its GPT-2 recipe)
    return [sys.executable, str(args.nanogpt.resolve() / "train.py"),
            *(f"--{k}={v}" for k, v in opts.items()), *args.nanogpt_args]


def nanogpt_seconds(marks: list[tuple], iters: int) -> float:
    """nanoGPT's wall seconds for its ``iters`` iterations: from the iteration-0 line to the line of
    iteration ``iters - 1`` (log_interval 1), plus one median step for the step-0 work left outside."""
    times = {step: wall for step, wall, _ in marks}
    if 0 not in times or iters - 1 not in times:
        raise SystemExit(f"error: nanoGPT logged no iteration 0 or {iters - 1}; see its log")
    steps = [b - a for a, b in zip(list(times.values()), list(times.values())[1:])]
    return times[iters - 1] - times[0] + statistics.median(steps)


def read_curve(run_dir: Path) -> list[tuple[float, float]]:
    """(training seconds, val loss) at each eval of one of our runs, from its TensorBoard events."""
    from trainer.analysis.runs import read_run

    run = read_run(run_dir, run_dir)
    train_s = dict(zip(run.scalars["time/train_s"].steps, run.scalars["time/train_s"].values))
    return [(train_s[step], loss) for step, loss in zip(run.val.steps, run.val.values) if step in train_s]


def record(args, work: Path) -> int:
    """The speedrun record: our preset's time to its target against nanoGPT's time for --iters."""
    args.nanogpt_args = ["--log_interval=1", f"--eval_interval={args.iters}", "--eval_iters=200", *args.nanogpt_args]
    done: dict[str, list[dict]] = {"nanoGPT": [], "ours": [], "ours, budget": []}  # per round, in order

    def nanogpt() -> float:
        log = work / f"nanogpt_record_r{len(done['nanoGPT'])}.log"
        marks = timed_steps(nanogpt_cmd(args, log.with_suffix("")), work, NANOGPT_LINE, log, args.threads)
        val = re.findall(rf"step {args.iters}: train loss [\d.]+, val loss ([\d.]+)", log.read_text())
        done["nanoGPT"].append({"s": nanogpt_seconds(marks, args.iters), "val": float(val[-1]) if val else None})
        return done["nanoGPT"][-1]["s"]

    def ours(budget: int = 0) -> float:
        key = "ours, budget" if budget else "ours"
        run = work / f"{'ours_budget' if budget else 'ours_record'}_r{len(done[key])}"
        extra = ["target_val_loss=null", f"max_iters={budget}"] if budget else []
        cmd = [sys.executable, str(REPO / "scripts" / "train.py"), f"+experiment={args.preset}", "device=cpu",
               f"hydra.run.dir={run}", *args.ours, *extra]
        timed_steps(cmd, REPO, PROGRESS_LINE, run.with_suffix(".log"), args.threads)
        summary = json.loads((run / "summary.json").read_text())
        done[key].append({**summary, "curve": read_curve(run)})
        if not budget and not summary.get("reached_target"):
            raise SystemExit(f"error: {args.preset} did not reach its target; see {run}")
        return summary["wall_time_s"] if budget else summary["time_to_target_s"]

    measure = {"nanoGPT": nanogpt, "ours": ours}
    if args.budget_iters:
        measure["ours, budget"] = lambda: ours(args.budget_iters)
    alternated(measure, rounds=args.rounds, log=lambda line: print(line, flush=True))
    print()
    for r in range(args.rounds):
        print_round(r, done, args.iters)
    ng = [x["s"] for x in done["nanoGPT"]]
    ours_s = [x["time_to_target_s"] for x in done["ours"]]
    with_evals = [x["time_to_target_s"] + x["eval_time_s"] for x in done["ours"]]
    print(f"\nmedian over {args.rounds} rounds: nanoGPT {statistics.median(ng):.1f} s for {args.iters} iterations; "
          f"ours {statistics.median(ours_s):.1f} s of training to val <= {done['ours'][0]['target_val_loss']} "
          f"(evals excluded), {statistics.median(with_evals):.1f} s with them")
    print(f"ours / nanoGPT (median, then per round): {ratio(ours_s, ng, digits=3)}; "
          f"with evals {ratio(with_evals, ng, digits=3)}")
    if args.budget_iters:
        best = [x["best_in_time"] for x in done["ours, budget"]]
        print(f"best val loss within nanoGPT's time, {args.budget_iters}-step budget: median {statistics.median(best):.4f} "
              f"({', '.join(f'{b:.4f}' for b in best)})")
    return 0


def print_round(r: int, done: dict, iters: int) -> None:
    ng, s = done["nanoGPT"][r], done["ours"][r]
    line = (f"round {r + 1}: nanoGPT {ng['s']:.1f} s for {iters} iterations (its val {ng['val']}); ours "
            f"{s['final_val_loss']:.4f} at step {s['steps_to_target']} ({s['tokens_to_target']:,} tokens) after "
            f"{s['time_to_target_s']:.1f} s of training + {s['eval_time_s']:.1f} s of evals; ratio "
            f"{s['time_to_target_s'] / ng['s']:.3f} (with evals {(s['time_to_target_s'] + s['eval_time_s']) / ng['s']:.3f})")
    if done["ours, budget"]:
        b = done["ours, budget"][r]
        within = [loss for t, loss in b["curve"] if t <= ng["s"]]
        b["best_in_time"] = min(within) if within else float("nan")
        line += (f"; budget run: best val {b['best_in_time']:.4f} within {ng['s']:.1f} s of training "
                 f"(its last eval at {b['curve'][-1][0]:.1f} s: {b['curve'][-1][1]:.4f})")
    print(line, flush=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.in_process:
        in_process(args)
        return 0
    if args.record and args.iters == 300:  # the default --iters is for tokens/s; the record is against 2000
        args.iters = 2000
    if args.iters <= 100:  # nanoGPT's cosine schedule divides by (lr_decay_iters - warmup_iters)
        print("error: --iters must exceed the recipe's 100 warmup steps", file=sys.stderr)
        return 2
    if not (args.nanogpt / "train.py").is_file():
        print(f"error: {args.nanogpt} has no train.py; give the path of a nanoGPT checkout", file=sys.stderr)
        return 2
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="bench_nanogpt_"))
    work.mkdir(parents=True, exist_ok=True)
    write_nanogpt_data(work)
    configurator = work / "configurator.py"  # nanoGPT's train.py exec()s it from the working directory
    if not configurator.exists():
        configurator.symlink_to((args.nanogpt / "configurator.py").resolve())
    if args.record:
        print(f"scratch dir {work}; nanoGPT {args.iters} iterations against {args.preset}, "
              f"{args.threads or 'default'} thread(s) each")
        return record(args, work)
    print(f"scratch dir {work}; {args.iters} steps per run, timed from step {args.start}")
    print("| round | first | ours tok/s | nanoGPT tok/s | ratio (wall) | ours tok/CPU-s | nanoGPT tok/CPU-s "
          "| ratio (CPU time) |\n|---:|---|---:|---:|---:|---:|---:|---:|")
    wall, cpu = [], []
    for r in range(args.rounds):
        runs = {
            "ours": lambda: timed_steps(ours_cmd(args, work / f"ours_r{r}"), REPO, PROGRESS_LINE,
                                        work / f"ours_r{r}.log", args.threads),
            "nanoGPT": lambda: timed_steps(nanogpt_cmd(args, work / f"nanogpt_r{r}"), work, NANOGPT_LINE,
                                           work / f"nanogpt_r{r}.log", args.threads),
        }
        order = ["ours", "nanoGPT"] if r % 2 == 0 else ["nanoGPT", "ours"]
        rate = {name: tokens_per_sec(runs[name](), args.start) for name in order}
        (ow, oc), (nw, nc) = rate["ours"], rate["nanoGPT"]
        wall.append(ow / nw)
        cpu.append(oc / nc)
        print(f"| {r + 1} | {order[0]} | {ow:,.0f} | {nw:,.0f} | {wall[-1]:.2f}x | {oc:,.0f} | {nc:,.0f} "
              f"| {cpu[-1]:.2f}x |", flush=True)
    print(f"\nmedian ours / nanoGPT over {len(wall)} rounds: {statistics.median(wall):.2f}x (wall), "
          f"{statistics.median(cpu):.2f}x (CPU time)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""GPT-2 small training tokens/s and MFU per attention, eager and compiled, side by side.

    python scripts/bench/bench_gpt2.py                                   # CUDA: T=1024, batch 16, bf16
    python scripts/bench/bench_gpt2.py --seq-len 4096 --batch 4 --attn flash sdpa
    python scripts/bench/bench_gpt2.py --compile-mode reduce-overhead --json rows.json
    python scripts/bench/bench_gpt2.py --tiny --device cpu --backend aot_eager   # a CPU dry run of the code path

Every (attention, eager|compiled) variant is built once in this process: GPT-2 small (12 layers,
12 heads, 768 wide: 124M parameters with the padded 50,304-token vocabulary), AdamW, bf16
autocast, random token ids (speed does not depend on the data). Each variant is warmed up (and
compiled) first, then the timing alternates: every round runs ``--steps`` training steps
(forward, backward, clip, AdamW) of each variant in an order rotated from round to round
(``common.alternated``), synchronized before and after. tokens/s is the median over rounds; a
ratio is the median of the per-round ratios, each round's shown beside it. MFU follows
trainer/monitor.py (6N + 12LTd FLOPs per token against the GPU's dense bf16 peak).

Warm-up runs the eager variants first, so flash's eager variant tunes its launch configs before
the compiled one is traced: a trace only looks configs up (kernels/flash_launch.py), and the
line after the table says whether any compiled bucket had to use the pinned config instead.
``--json`` appends one object per variant (attn, compile, T, tokens_per_s, mfu, ...) to a file.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch

import common
from kernels import ATTENTION
from trainer.config import compile_mode

VOCAB = 50304  # GPT-2's 50257 padded to a multiple of 64, as nanoGPT does


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--attn", nargs="+", default=["flash", "sdpa", "online", "naive"], choices=sorted(ATTENTION))
    p.add_argument("--compile", choices=["both", "eager", "compiled"], default="both")
    p.add_argument("--compile-mode", default="default", help="torch.compile mode (kernels.COMPILE_MODES)")
    p.add_argument("--backend", default="inductor", help="torch.compile backend (aot_eager for a CPU dry run)")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=10, help="training steps per variant per round")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per variant (the first compiles)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--device", default=None, help="default cuda")
    p.add_argument("--tiny", action="store_true", help="a 2-layer, 64-wide model: checks the code path, times nothing")
    p.add_argument("--json", metavar="FILE", default=None, help="append the rows (one JSON object per line)")
    args = p.parse_args(argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    compile_mode(args.compile_mode)  # an unknown mode stops here, in one line
    return args


def build(attn: str, compiled: bool, args):
    """(step function, model, label): one training step of a fresh model with this attention."""
    from models import GPT, GPTConfig
    from trainer.optim import AdamW, param_groups

    dims = dict(n_layer=2, n_head=2, n_embd=64) if args.tiny else dict(n_layer=12, n_head=12, n_embd=768)
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=VOCAB if not args.tiny else 256, block_size=args.seq_len, gelu="tanh", **dims)
    model = GPT(config, ATTENTION[attn]).to(args.device)
    opt = AdamW(param_groups(model, 0.1), lr=6e-4, betas=(0.9, 0.95))
    kw = {"backend": args.backend} if args.backend != "inductor" else {"mode": args.compile_mode}
    fwd = torch.compile(model, **kw) if compiled else model
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, config.vocab_size, (args.batch, args.seq_len + 1), generator=g).to(args.device)
    x, y = idx[:, :-1], idx[:, 1:]
    autocast = torch.autocast(device_type=torch.device(args.device).type, dtype=torch.bfloat16)

    def step() -> None:
        with autocast:
            _, loss = fwd(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, model


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bf16_peak(device: str) -> float | None:
    if not device.startswith("cuda"):
        return None
    from trainer.monitor import peak_flops

    return peak_flops(torch.device(device), "bf16")[0]


def main(argv=None) -> int:
    args = parse_args(argv)
    from trainer.monitor import flops_per_token

    modes = {"both": (False, True), "eager": (False,), "compiled": (True,)}[args.compile]
    variants, notes, first_s = {}, [], {}
    for compiled in modes:  # eager first: flash's eager warm-up tunes what its trace then looks up
        for attn in args.attn:
            name = f"{attn} {'compiled' if compiled else 'eager'}"
            try:
                step, model = build(attn, compiled, args)
                t0 = time.perf_counter()
                for _ in range(args.warmup):
                    step()
                sync(args.device)
                first_s[name] = time.perf_counter() - t0
                variants[name] = (attn, compiled, step, model)
            except Exception as e:  # a variant that cannot run here (OOM, a backend limit) is reported, not fatal
                notes.append(f"{name}: {type(e).__name__}: {str(e).splitlines()[0][:160]}")
                if args.device.startswith("cuda"):
                    torch.cuda.empty_cache()
            print(f"  warmed up {name}", file=sys.stderr, flush=True)
    if not variants:
        print("no variant ran:\n" + "\n".join(notes))
        return 1
    tokens = args.steps * args.batch * args.seq_len
    times = common.alternated({n: (lambda s=v[2]: common.seconds(s, args.steps, lambda: sync(args.device)) * args.steps)
                               for n, v in variants.items()}, args.rounds)
    rows = table(args, variants, times, tokens, first_s, flops_per_token, bf16_peak(args.device))
    from kernels import flash_launch

    if any(a == "flash" and c for a, c, *_ in variants.values()):
        pinned = sorted(flash_launch.TRACE_PINNED)
        notes.append("compiled flash: every traced launch had a tuned config" if not pinned else
                     f"compiled flash traced {len(pinned)} untuned bucket(s) with the pinned config: {pinned}")
    for note in notes:
        print(f"- {note}")
    if args.json:
        with open(args.json, "a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    return 0


def table(args, variants: dict, times: dict, tokens: int, first_s: dict, flops_fn, peak) -> list[dict]:
    """Print the table (and the flash / sdpa ratios) and return the rows."""
    print(f"\nGPT-2 small{' (tiny)' if args.tiny else ''}, bf16 autocast, batch {args.batch} x T={args.seq_len}, "
          f"{args.steps} steps per round, median of {args.rounds} alternated rounds; compile mode "
          f"{args.compile_mode} ({args.backend}); {args.device}\n")
    print("| attn | compiled | tokens/s | MFU | vs sdpa (same compile), per round | warm-up s |")
    print("|---|---|---:|---:|---|---:|")
    rows = []
    for name, (attn, compiled, _, model) in variants.items():
        per_round = [tokens / s for s in times[name]]
        tps = common.median(per_round)
        mfu = flops_fn(model, args.seq_len) * tps / peak if peak else None
        base = f"sdpa {'compiled' if compiled else 'eager'}"
        paired = base in times and base != name
        vs = common.ratio(times[base], times[name]) if paired else "-"
        print(f"| {attn} | {compiled} | {tps:,.0f} | {'n/a' if mfu is None else f'{mfu:.1%}'} | {vs} | "
              f"{first_s[name]:.1f} |", flush=True)
        rows.append({"attn": attn, "compile": compiled, "T": args.seq_len, "batch": args.batch,
                     "tokens_per_s": tps, "mfu": mfu, "rounds_tokens_per_s": per_round,
                     "vs_sdpa": common.median(common.ratios(times[base], times[name])) if paired else None, "compile_mode": args.compile_mode,
                     "warmup_s": first_s[name], "tiny": args.tiny})
    return rows


if __name__ == "__main__":
    sys.exit(main())

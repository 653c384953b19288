#!/usr/bin/env python
"""Sampling tokens/s with and without the KV cache, side by side in alternated rounds.

    OMP_WAIT_POLICY=PASSIVE python scripts/bench/bench_generate.py --tokens 500 --rounds 3

Models (random weights: speed does not depend on them): the nano model (4 layers, 128 wide,
context 64) and a 6-layer 384-wide model (nanoGPT's shakespeare-char shape) at context 256 and
1024. Greedy decoding of ``--tokens`` tokens after a one-token prompt, batch 1, fp32. Past the
context window the default window slides every token, which shifts all positions, so the cache
is rebuilt from the cropped window each step (see ``GPT.generate``): there the cache gains
nothing. The last columns move the window half a context at a time (``window_stride``), which
lets the cache serve the tokens in between; its tokens are checked against uncached decoding
with the same windows (one untimed run).
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from common import alternated, median, ratio
from models import GPT, GPTConfig
from trainer.config import build, components, load_component

MODELS = {
    "nano 4x128, ctx 64": dict(n_layer=4, n_head=4, n_embd=128, block_size=64),
    "6x384, ctx 256": dict(n_layer=6, n_head=6, n_embd=384, block_size=256),
    "6x384, ctx 1024": dict(n_layer=6, n_head=6, n_embd=384, block_size=1024),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=500)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--attn", default="sdpa", choices=components("attn"))
    p.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS), help="rows to run")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    return p.parse_args(argv)


def tokens_per_sec(model: GPT, tokens: int, use_cache: bool, stride: int = 1) -> tuple[float, torch.Tensor]:
    idx = torch.zeros(1, 1, dtype=torch.long)
    t0 = time.perf_counter()
    out = model.generate(idx, tokens, temperature=0, use_cache=use_cache, window_stride=stride)
    return tokens / (time.perf_counter() - t0), out


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"{args.tokens} new tokens, greedy, batch 1, fp32, attn={args.attn}, {torch.get_num_threads()} threads; "
          f"median of {args.rounds} alternated rounds\n")
    print("| model | params | no cache tok/s | KV cache tok/s | speed-up (per round) | same tokens "
          "| KV cache, stride ctx/2, tok/s | speed-up over no cache (per round) | same tokens |")
    print("|---|---:|---:|---:|---|---|---:|---|---|")
    for name in args.models:
        shape = MODELS[name]
        torch.manual_seed(0)
        model = GPT(GPTConfig(vocab_size=65, **shape), build(load_component("attn", args.attn))).eval()
        stride = shape["block_size"] // 2
        tokens_per_sec(model, 8, True)  # warm-up
        out: dict = {}

        def mode(use_cache: bool, window_stride: int):
            def measure() -> float:
                tps, out[use_cache, window_stride] = tokens_per_sec(model, args.tokens, use_cache, window_stride)
                return tps
            return measure

        speed = alternated({"plain": mode(False, 1), "cached": mode(True, 1), "strided": mode(True, stride)},
                           args.rounds)
        same = torch.equal(out[False, 1], out[True, 1])
        same_strided = torch.equal(out[True, stride], tokens_per_sec(model, args.tokens, False, stride)[1])
        print(f"| {name} | {model.num_params() / 1e6:.2f}M | {median(speed['plain']):,.0f} | "
              f"{median(speed['cached']):,.0f} | {ratio(speed['cached'], speed['plain'], 1)} | "
              f"{'yes' if same else 'NO'} | {median(speed['strided']):,.0f} | "
              f"{ratio(speed['strided'], speed['plain'], 1)} | {'yes' if same_strided else 'NO'} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Generate text from a checkpoint.

    python scripts/sample.py runs/<run>                       # the run's latest checkpoint
    python scripts/sample.py runs/<run>/ckpt_best.pt --prompt "ROMEO:" --num-tokens 300 \\
        --temperature 0.8 --top-k 50 --seed 0 --num-samples 2
"""
from __future__ import annotations

import argparse
import sys

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from models import GPT, GPTConfig
from trainer.checkpoint import CheckpointError, load_checkpoint
from trainer.distributed import resolve_device
from trainer.tokenizer import tokenizer_from_dict


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="checkpoint file, or a run directory (uses its ckpt_last.pt)")
    p.add_argument("--prompt", default="\n", help="text to continue (default: a newline)")
    p.add_argument("--num-tokens", type=int, default=500, help="tokens to generate per sample")
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--temperature", type=float, default=0.8, help="0 for greedy decoding")
    p.add_argument("--top-k", type=int, default=200, help="sample among the k likeliest tokens (0: all)")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--attn", default=None,
                   help="attention to sample with: naive, online, sdpa, flash (default: the run's own)")
    return p.parse_args(argv)


def build_attention(name: str | None, config: dict):
    if name is None:
        return instantiate(OmegaConf.create(config["attn"]))
    import kernels

    fn = getattr(kernels, f"{name}_attention", None)
    if fn is None:
        raise ValueError(f"--attn={name} is not one of naive, online, sdpa, flash")
    return fn


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.num_tokens < 1 or args.num_samples < 1:
            raise ValueError("--num-tokens and --num-samples must be at least 1")
        device = resolve_device(args.device)
        state = load_checkpoint(args.checkpoint, map_location=device)
        tok = tokenizer_from_dict(state["tokenizer"])
        model = GPT(GPTConfig(**state["model_args"]), build_attention(args.attn, state["config"]))
        model.load_state_dict(state["model"])
        model.to(device).eval()
        prompt = tok.encode(args.prompt)
        if not prompt:
            raise ValueError("--prompt encodes to no tokens; give some text")
    except (ValueError, CheckpointError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    gen = torch.Generator(device=device).manual_seed(args.seed)
    idx = torch.tensor([prompt], dtype=torch.long, device=device)
    for i in range(args.num_samples):
        out = model.generate(idx, args.num_tokens, temperature=args.temperature, top_k=args.top_k or None, generator=gen)
        if i:
            print("-" * 40)
        print(tok.decode(out[0].tolist()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

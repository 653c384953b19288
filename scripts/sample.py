#!/usr/bin/env python
"""Generate text from a checkpoint (KV-cached decoding, in the run's precision).

    python scripts/sample.py runs/<run>                       # the run's latest checkpoint
    python scripts/sample.py runs/<run>/ckpt_best.pt --prompt "ROMEO:" --num-tokens 300 \\
        --temperature 0.8 --top-k 50 --seed 0 --num-samples 2
    python scripts/sample.py runs/<run> --device cuda:1 --attn sdpa --precision bf16
    python scripts/sample.py runs/<run> --num-tokens 2000 --window-stride 32   # context 64: half of it

Past the model's context (block_size) the default window slides one token at a time, as nanoGPT's
sampling does; since positions are absolute, that rebuilds the KV cache at every token.
``--window-stride`` moves it in bigger steps so the cache serves the tokens in between.
"""
from __future__ import annotations

import argparse
import math
import sys
import time

import torch
from omegaconf import OmegaConf

from kernels import UnavailableError
from models import GPT, GPTConfig
from trainer.config import build_attention as attention_and_window
from trainer.config import components, load_component
from trainer.data.bpe import BPETokenizer
from trainer.data.tokenizer import tokenizer_from_dict
from trainer.errors import CheckpointError, ConfigError, user_errors
from trainer.precision import Precision
from trainer.rundir import load_checkpoint
from trainer.runtime import resolve_device

PRECISIONS = components("precision")
NANOGPT_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}  # nanoGPT's --dtype


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="nanoGPT's spellings work too: --out_dir=RUN --start=TEXT (or --start=FILE:prompt.txt) "
                                       "--num_samples --max_new_tokens --top_k --dtype=float32|bfloat16|float16")
    p.add_argument("checkpoint", nargs="?", help="checkpoint file, or a run directory (uses its ckpt_last.pt)")
    p.add_argument("--out_dir", "--out-dir", dest="out_dir", help="the run directory (nanoGPT's name for it)")
    p.add_argument("--prompt", "--start", default="\n",
                   help="text to continue (default: a newline); FILE:path reads it from a file, as nanoGPT's --start does")
    p.add_argument("--num-tokens", "--max_new_tokens", "--max-new-tokens", dest="num_tokens", type=int, default=500,
                   help="tokens to generate per sample")
    p.add_argument("--num-samples", "--num_samples", dest="num_samples", type=int, default=1)
    p.add_argument("--temperature", type=float, default=0.8, help="0 for greedy decoding")
    p.add_argument("--top-k", "--top_k", dest="top_k", type=int, default=200,
                   help="sample among the k likeliest tokens (0: all)")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--attn", default=None, choices=components("attn"),
                   help="attention to sample with, one of configs/attn/ (default: the run's own)")
    p.add_argument("--precision", default=None, choices=PRECISIONS,
                   help="autocast precision (default: the run's own)")
    p.add_argument("--dtype", choices=sorted(NANOGPT_DTYPES), help="nanoGPT's spelling of --precision")
    p.add_argument("--tokenizer-path", help="a Hugging Face tokenizer.json (needed for runs trained on bare token shards)")
    p.add_argument("--no-cache", action="store_true", help="recompute the whole context for every token")
    p.add_argument("--window-stride", type=int, default=1,
                   help="past the model's context, move the context window this many tokens at a time: 1 slides "
                        "it every token (exact, but the KV cache is rebuilt every token); half the context keeps "
                        "the cache useful, each token then seeing half to all of the context")
    p.add_argument("--stats", action="store_true", help="print tokens/s to stderr")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    return make_parser().parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    if (args.checkpoint is None) == (args.out_dir is None):
        raise ConfigError("give the checkpoint or run directory once: as the argument, or as --out_dir")
    args.checkpoint = args.checkpoint or args.out_dir
    args.precision = args.precision or NANOGPT_DTYPES.get(args.dtype)
    if args.prompt.startswith("FILE:"):
        try:
            with open(args.prompt[5:], encoding="utf-8") as f:
                args.prompt = f.read()
        except OSError as e:
            raise ConfigError(f"--start={args.prompt}: cannot read {args.prompt[5:]} ({e.strerror or e})") from None
    if args.num_tokens < 1 or args.num_samples < 1:
        raise ConfigError("--num-tokens and --num-samples must be at least 1")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise ConfigError(f"--temperature must be a finite number >= 0 (0: greedy), got {args.temperature}")
    if args.top_k < 0:
        raise ConfigError(f"--top-k must be >= 0 (0: no limit), got {args.top_k}")


def build_attention(name: str | None, config: dict):
    """The run's own attention (its config entry), or configs/attn/<--attn>.yaml. Its window, if
    any, is the model's (``GPTConfig.window``, from the checkpoint), whichever attention samples."""
    return attention_and_window(OmegaConf.create(config["attn"]) if name is None else load_component("attn", name))[0]


def check_weights(model_state: dict, path: str) -> None:
    for name, t in model_state.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise CheckpointError(
                f"checkpoint {path} has non-finite weights (nan/inf) in {name}; the run diverged before it was "
                "saved: sample from ckpt_best.pt or an earlier checkpoint"
            )


def check_attention_runs(attn_fn, model: GPT, device: torch.device, label: str) -> None:
    """Run the attention once on a tiny decoding-shaped input (one query, two cached keys), so an
    implementation that cannot run here is one line before sampling starts, not a traceback after."""
    head_dim = model.config.n_embd // model.config.n_head
    q, kv = torch.zeros(1, 1, 1, head_dim, device=device), torch.zeros(1, 1, 2, head_dim, device=device)
    window = {} if model.config.window is None else {"window": model.config.window}
    try:
        with torch.no_grad():
            attn_fn(q, kv, kv, causal=True, **window)
    except (*user_errors(), RuntimeError, ValueError) as e:  # e.g. the Triton flash kernel on a CPU
        raise UnavailableError(f"{label} cannot run on {device}: {str(e).splitlines()[0]}") from e


def load_model(args: argparse.Namespace, device: torch.device):
    """Model (on ``device``, eval mode), tokenizer and precision; only the weights reach the device."""
    state = load_checkpoint(args.checkpoint, map_location="cpu")  # never the optimizer state on a GPU
    state.pop("optimizer", None)
    for key in ("model", "model_args", "tokenizer", "config"):
        if key not in state:
            raise CheckpointError(f"{args.checkpoint} has no '{key}' entry: not a checkpoint of scripts/train.py")
    check_weights(state["model"], args.checkpoint)
    run_precision = (state["config"].get("precision") or {}).get("name", "fp32")
    precision = Precision(args.precision or run_precision)
    attn_fn = build_attention(args.attn, state["config"])
    model = GPT(GPTConfig(**state["model_args"]), attn_fn)
    model.load_state_dict(state["model"])
    model.to(device).eval()
    label = f"--attn {args.attn}" if args.attn else f"the run's attention ({state['config']['attn'].get('_target_')})"
    check_attention_runs(attn_fn, model, device, label)
    if args.tokenizer_path:
        tok = BPETokenizer.from_file(args.tokenizer_path)
    elif state["tokenizer"] is None:
        raise CheckpointError(f"{args.checkpoint} was trained on token ids without a tokenizer, so its tokens cannot be "
                              "read as text; give one with --tokenizer-path tokenizer.json")
    else:
        tok = tokenizer_from_dict(state["tokenizer"])
    return model, tok, precision


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        check_args(args)
        device = resolve_device(args.device)
        if device.type == "cuda":
            torch.cuda.set_device(device)  # Triton launches on the current device
        model, tok, precision = load_model(args, device)
        block = model.config.block_size
        if not 1 <= args.window_stride <= block:
            raise ConfigError(f"--window-stride must be from 1 to the model's context ({block}), got {args.window_stride}")
        prompt = tok.encode(args.prompt)
        if not prompt:
            raise ConfigError("--prompt encodes to no tokens; give some text")
    except (*user_errors(), ValueError) as e:
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    gen = torch.Generator(device=device).manual_seed(args.seed)
    idx = torch.tensor([prompt], dtype=torch.long, device=device)
    for i in range(args.num_samples):
        t0 = time.perf_counter()
        with precision.autocast(device):
            out = model.generate(idx, args.num_tokens, temperature=args.temperature, top_k=args.top_k or None,
                                 generator=gen, use_cache=not args.no_cache, window_stride=args.window_stride)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dt = time.perf_counter() - t0
        if i:
            print("-" * 40)
        print(tok.decode(out[0].tolist()), flush=True)
        if args.stats:
            stride = f", window stride {args.window_stride}" if args.window_stride > 1 else ""
            print(f"{args.num_tokens / dt:,.1f} tokens/s ({args.num_tokens} tokens in {dt:.2f} s, "
                  f"{'no cache' if args.no_cache else 'KV cache'}{stride}, {precision.name})", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

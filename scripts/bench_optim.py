"""Time optimizer.step() for our optimizers against torch.optim on a real model's parameter set.

    python scripts/bench_optim.py --model nano,gpt2 --steps 10 --warmup 3 --rounds 3 [--threads 1]

Each optimizer kind builds every implementation on the same parameters and gradients, then
interleaves single steps (A B C A B C ...) so machine noise hits all of them alike; the table reports the
median step time over all rounds and the ratio to torch.optim's foreach implementation (Lion, which
torch lacks, is compared with our foreach AdamW).
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch

import trainer.optim as ours
from models.gpt import GPT, GPTConfig

MODELS = {
    "nano": GPTConfig(vocab_size=65, block_size=64, n_layer=4, n_head=4, n_embd=128),
    "gpt2": GPTConfig(vocab_size=50304, block_size=1024, n_layer=12, n_head=12, n_embd=768),
}

# kind -> (constructor kwargs, torch.optim class or None)
KINDS = {
    "AdamW": (dict(lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1), torch.optim.AdamW),
    "Adam": (dict(lr=1e-3, betas=(0.9, 0.99)), torch.optim.Adam),
    "SGD": (dict(lr=1e-2, momentum=0.9, nesterov=True), torch.optim.SGD),
    "Lion": (dict(lr=3e-4, betas=(0.9, 0.99), weight_decay=0.3), None),
}


def make_params(cfg: GPTConfig, device: torch.device) -> list[torch.Tensor]:
    """The model's (deduplicated, tied) parameter shapes as fresh tensors with random gradients."""
    with torch.device("meta"):
        shapes = [p.shape for p in GPT(cfg).parameters()]
    gen = torch.Generator(device="cpu").manual_seed(0)
    params = []
    for shape in shapes:
        p = (0.02 * torch.randn(shape, generator=gen)).to(device).requires_grad_()
        p.grad = torch.randn(shape, generator=gen).to(device)
        params.append(p)
    return params


def implementations(kind: str, params: list[torch.Tensor], device: torch.device) -> dict:
    """name -> optimizer, all on the same params (the values drift, which does not change timing)."""
    kwargs, torch_cls = KINDS[kind]
    ours_cls = getattr(ours, kind)
    impls = {
        "ours foreach": ours_cls(params, foreach=True, **kwargs),
        "ours single": ours_cls(params, foreach=False, **kwargs),
    }
    if torch_cls is not None:
        impls["torch foreach"] = torch_cls(params, foreach=True, **kwargs)
        try:  # fused kernels exist for some (optimizer, device) pairs only
            fused = torch_cls(params, fused=True, **kwargs)
            fused.step()
            impls["torch fused"] = fused
        except (RuntimeError, ValueError, TypeError):
            pass
    else:
        impls["ours AdamW foreach"] = ours.AdamW(params, foreach=True, **KINDS["AdamW"][0])
    return impls


def time_steps(opt: torch.optim.Optimizer, n: int, sync: Callable[[], None]) -> list[float]:
    times = []
    for _ in range(n):
        sync()
        t0 = time.perf_counter()
        opt.step()
        sync()
        times.append(1e3 * (time.perf_counter() - t0))
    return times


def bench_kind(kind: str, params, device, steps: int, warmup: int, rounds: int) -> dict[str, float]:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    impls = implementations(kind, params, device)
    for opt in impls.values():
        time_steps(opt, warmup, sync)
    samples: dict[str, list[float]] = {name: [] for name in impls}
    for _ in range(rounds):
        for _ in range(steps):  # interleave single steps: load spikes then hit every impl alike
            for name, opt in impls.items():
                samples[name] += time_steps(opt, 1, sync)
    return {name: statistics.median(ts) for name, ts in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="nano,gpt2", help="comma-separated: " + ",".join(MODELS))
    parser.add_argument("--optim", default=",".join(KINDS), help="comma-separated optimizers")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per implementation per round")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--threads", type=int, default=0,
        help="CPU intra-op threads (0: torch's default). On a shared machine 1 avoids OpenMP "
        "oversubscription, which otherwise dominates the timings",
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)

    print(f"device={device} threads={torch.get_num_threads()} torch={torch.__version__}\n")
    print("| model | optimizer | impl | median step ms | ours / torch foreach |")
    print("|---|---|---|---:|---:|")
    for model in args.model.split(","):
        params = make_params(MODELS[model], device)
        for kind in args.optim.split(","):
            medians = bench_kind(kind, params, device, args.steps, args.warmup, args.rounds)
            base_name = "torch foreach" if "torch foreach" in medians else "ours AdamW foreach"
            base = medians[base_name]
            for name, ms in medians.items():
                ratio = f"{ms / base:.2f}" if name.startswith("ours") and name != base_name else ""
                if name.startswith("ours") and base_name != "torch foreach":
                    ratio = f"{ms / base:.2f} (vs our AdamW)" if name != base_name else ""
                print(f"| {model} | {kind} | {name} | {ms:.2f} | {ratio} |", flush=True)
        del params


if __name__ == "__main__":
    main()

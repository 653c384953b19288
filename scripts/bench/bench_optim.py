"""Time optimizer.step() for our optimizers against torch.optim on a real model's parameter set.

    python scripts/bench/bench_optim.py --model nano,gpt2 --steps 10 --warmup 3 --rounds 3 [--threads 1]
    python scripts/bench/bench_optim.py --baseline /tmp/old   # also an older trainer/optim, side by side

``--baseline DIR`` takes a checkout (e.g. ``git archive <commit> trainer/optim | tar -x -C DIR``)
and adds its ``old foreach`` / ``old single`` rows to the same interleaved rounds, with the ratio
of ours to it: how a change to the optimizers moved their speed, measured under the same load.

Each optimizer kind builds every implementation on the same parameters and gradients, then
interleaves single steps (A B C A B C ...) so machine noise hits all of them alike; the table reports the
median step time over all rounds and the ratio to torch.optim's foreach implementation (its only
one for Muon; Lion, which torch lacks, is compared with our foreach AdamW), with the per-round
ratios in brackets.
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

import trainer.optim as ours
from models.gpt import GPT, GPTConfig
from omegaconf import OmegaConf
from trainer.config import components, load_component

BASELINE = None  # trainer.optim from --baseline's checkout

MODELS = {
    "nano": GPTConfig(vocab_size=65, block_size=64, n_layer=4, n_head=4, n_embd=128, gelu="exact"),
    "gpt2": GPTConfig(vocab_size=50304, block_size=1024, n_layer=12, n_head=12, n_embd=768),
}

def kinds() -> dict[str, tuple[dict, type | None]]:
    """Every configs/optim/*.yaml: class name -> (its hyperparameters, torch.optim's class of that name
    or None). A new optimizer config joins the table by its YAML alone."""
    out = {}
    for name in components("optim"):
        cfg = OmegaConf.to_container(load_component("optim", name), resolve=True)
        kind = cfg["_target_"].rsplit(".", 1)[-1]
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()
                  if not k.startswith("_") and k not in ("param_groups", "foreach", "fused")}
        out[kind] = (kwargs, getattr(torch.optim, kind, None))
    return out


KINDS = kinds()


def torch_kwargs(torch_cls: type, kwargs: dict) -> dict:
    """The hyperparameters torch's class takes (ours may have more, e.g. Muon's AdamW settings)."""
    accepted = inspect.signature(torch_cls).parameters
    return {k: v for k, v in kwargs.items() if k in accepted}


def import_baseline(src: Path):
    """``trainer.optim`` as it is in another checkout, imported beside ours: the ``trainer``
    package's path points at ``src`` while it imports, and our modules are put back after."""
    import trainer

    ours_modules = {k: sys.modules.pop(k) for k in list(sys.modules) if k.startswith("trainer.optim")}
    saved_path = list(trainer.__path__)
    trainer.__path__[:] = [str(src / "trainer")]
    try:
        module = importlib.import_module("trainer.optim")
    finally:
        trainer.__path__[:] = saved_path
        for k in [k for k in sys.modules if k.startswith("trainer.optim")]:
            sys.modules.pop(k)
        sys.modules.update(ours_modules)
    return module


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
    if kind == "Muon":
        params = [p for p in params if p.dim() == 2]
    ours_cls = getattr(ours, kind)
    if kind == "Muon":  # no foreach argument (torch's has none): one path
        impls = {"ours single": ours_cls(params, **kwargs)}
    else:
        impls = {
            "ours foreach": ours_cls(params, foreach=True, **kwargs),
            "ours single": ours_cls(params, foreach=False, **kwargs),
        }
    if BASELINE is not None and hasattr(BASELINE, kind):
        impls["old foreach"] = getattr(BASELINE, kind)(params, foreach=True, **kwargs)
        impls["old single"] = getattr(BASELINE, kind)(params, foreach=False, **kwargs)
    if torch_cls is not None:
        kwargs = torch_kwargs(torch_cls, kwargs)
        if kind == "Muon":  # torch's Muon has one path
            impls["torch single"] = torch_cls(params, **kwargs)
        else:
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


def bench_kind(kind: str, params, device, steps: int, warmup: int, rounds: int) -> dict[str, list[list[float]]]:
    """name -> per-round lists of step times (ms)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    impls = implementations(kind, params, device)
    for opt in impls.values():
        time_steps(opt, warmup, sync)
    samples: dict[str, list[list[float]]] = {name: [] for name in impls}
    for _ in range(rounds):
        for ts in samples.values():
            ts.append([])
        for _ in range(steps):  # interleave single steps: load spikes then hit every impl alike
            for name, opt in impls.items():
                samples[name][-1] += time_steps(opt, 1, sync)
    return samples


def ratio_cell(ours: list[list[float]], base: list[list[float]]) -> str:
    """Median ratio, then the per-round ratios of medians."""
    med = statistics.median
    overall = med(sum(ours, [])) / med(sum(base, []))
    rounds = ", ".join(f"{med(o) / med(b):.2f}" for o, b in zip(ours, base))
    return f"{overall:.2f} ({rounds})"


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
    parser.add_argument("--baseline", type=Path, help="a checkout whose trainer/optim to time beside ours")
    args = parser.parse_args()
    global BASELINE
    if args.baseline:
        BASELINE = import_baseline(args.baseline)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)

    print(f"device={device} threads={torch.get_num_threads()} torch={torch.__version__}\n")
    print("| model | optimizer | impl | median step ms | / torch (foreach) | ours / old, per round |")
    print("|---|---|---|---:|---:|---:|")
    for model in args.model.split(","):
        params = make_params(MODELS[model], device)
        for kind in args.optim.split(","):
            samples = bench_kind(kind, params, device, args.steps, args.warmup, args.rounds)
            base_name = next((n for n in ("torch foreach", "torch single", "ours AdamW foreach") if n in samples))
            for name, ts in samples.items():
                vs_torch = ratio_cell(ts, samples[base_name]) if name.startswith(("ours", "old")) and name != base_name else ""
                if vs_torch and base_name == "ours AdamW foreach":
                    vs_torch += " vs our AdamW"
                old = name.replace("ours", "old")
                vs_old = ratio_cell(ts, samples[old]) if name.startswith("ours") and old in samples else ""
                print(f"| {model} | {kind} | {name} | {statistics.median(sum(ts, [])):.2f} | {vs_torch} | {vs_old} |",
                      flush=True)
        del params


if __name__ == "__main__":
    main()

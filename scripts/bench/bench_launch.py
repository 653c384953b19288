"""Host time vs GPU time per attention call on CUDA: is a short-T call bound by its launch?

    python scripts/bench/bench_launch.py                       # bf16, B=4, H=16, D=64, T = 512 1024 2048
    python scripts/bench/bench_launch.py --seq-lens 1024 --heads 12 --batch 16

For each implementation and T, one table row per forward (no grad) and forward+backward: the
host's milliseconds to launch one call and the GPU's milliseconds to run it, both measured with
the stream held by a GPU spin while the calls queue (``held_ms`` in bench_attention.py). Where
host > GPU, back-to-back calls (a microbenchmark, or a model too small to keep the GPU busy) run
at the host's rate; in training the CPU runs ahead, so the GPU column is what a large step pays.

- ``flash``: ``flash_attention`` as the model calls it in eager mode (a torch.autograd.Function);
- ``flash-op``: the same kernels through the registered ``torch.library`` op (what
  torch.compile traces), called eagerly, to show what the op's dispatch costs;
- ``sdpa-flash``: PyTorch's FlashAttention backend;
- ``empty-fn``: an autograd.Function that only clones its input: the floor any Python attention
  pays for autograd.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_attention import DTYPES, held_ms, load_impl, make_inputs  # noqa: E402
from flash_host import CloneFn  # noqa: E402  (the floor: an autograd.Function that only clones)


def implementations() -> dict:
    from kernels.flash_ops import flash_attn_fwd

    return {
        "flash": load_impl("flash", None),
        "flash-op": lambda q, k, v, causal=True: flash_attn_fwd(q, k, v, causal, q.shape[-1] ** -0.5)[0],
        "sdpa-flash": load_impl("sdpa-flash", None),
        "empty-fn": lambda q, k, v, causal=True: CloneFn.apply(q, k, v),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seq-lens", type=int, nargs="+", default=[512, 1024, 2048])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_launch.py needs a CUDA device: host vs GPU time per launch means nothing on CPU")
    impls = implementations()
    print(f"\n{args.dtype}, causal, B={args.batch}, H={args.heads}, D={args.head_dim}; ms per call\n")
    print("| T | implementation | fwd host | fwd GPU | fwd+bwd host | fwd+bwd GPU |")
    print("|---:|---|---:|---:|---:|---:|")
    for T in args.seq_lens:
        q, k, v, do = make_inputs(args.batch, args.heads, T, args.head_dim, DTYPES[args.dtype], "cuda")
        for name, fn in impls.items():
            def fwd():
                with torch.no_grad():
                    fn(q, k, v, causal=True)

            def fwd_bwd():
                fn(q, k, v, causal=True).backward(do)

            cells = []
            for step in (fwd, fwd_bwd):
                host, gpu = held_ms(step, [q, k, v])
                cells += [f"{host:.3f}", "n/a" if gpu is None else f"{gpu:.3f}"]
            print(f"| {T} | {name} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()

"""flash's host-side Python per eager forward+backward, with every Triton launch a no-op.

``bench_attention.py --host-python`` (and its CPU default run) prints this; it needs no GPU, so
the host cost of the wrapper (its launch plan, allocations and autograd) can be followed in
sessions without one. ``noop_launches()`` swaps the Triton kernels module that
``kernels/flash_launch.py`` launches for a stub: the launch plan is made as on an sm_90 GPU (the
configs are chosen from the same tables, every candidate "timing" the same, so the first wins),
the first launch of each kernel goes through the stub "JIT" and the later ones through the stub
binary's launcher, as ``_Launch`` does on a GPU; the stub's launches do nothing. What is timed is
therefore everything flash runs in Python per call except Triton's C launcher itself.
"""
from __future__ import annotations

import contextlib
import types
from typing import Callable

import torch

from common import alternated, median, seconds
from kernels import flash_configs as fc
from kernels import flash_launch


class _Binary:
    function, packed_metadata = 1, ()

    def run(self, *args) -> None:  # the launcher of a compiled kernel: here, nothing
        pass


class _Kernel:
    """Triton's JITFunction as the launch plans see it: ``kernel[grid](*args, **meta)`` returns the
    compiled binary after handing its launcher the kernel's arguments (constexprs included, in
    signature order, as Triton 3.9 does)."""

    def __init__(self, arg_names: list[str]):
        self.arg_names, self.binary = arg_names, _Binary()

    def __getitem__(self, grid):
        def jit(*args, **meta):
            b = self.binary
            b.run(grid[0], grid[1], 1, 0, b.function, b.packed_metadata, None, None, None,
                  *args, *(meta[n] for n in self.arg_names[len(args):]))
            return b
        return jit


@contextlib.contextmanager
def noop_launches():
    """flash_attention on CPU tensors with no-op launches (and no interpreter needed)."""
    from kernels import flash_triton  # only for the kernels' signatures

    stub = types.SimpleNamespace(INTERPRETED=False,
                                 KERNELS={n: _Kernel(list(k.arg_names)) for n, k in flash_triton.KERNELS.items()})
    saved = (flash_launch.kernels_for, flash_launch._gpu, flash_launch._time_ms, flash_launch.PLANS,
             flash_launch.TUNED)
    flash_launch.kernels_for = lambda q: stub
    flash_launch._gpu = lambda fk, device: (fc.TARGETS[90][0], 90)
    flash_launch._time_ms = lambda run, cfg, reps=10: 1.0
    flash_launch.PLANS, flash_launch.TUNED = {}, {}
    try:
        yield
    finally:
        (flash_launch.kernels_for, flash_launch._gpu, flash_launch._time_ms, flash_launch.PLANS,
         flash_launch.TUNED) = saved


class CloneFn(torch.autograd.Function):
    """The floor: an autograd.Function that only clones q (its backward passes the gradient on)."""

    @staticmethod
    def forward(ctx, q, k, v):
        return q.clone()

    @staticmethod
    def backward(ctx, g):
        return g, g, g


def fwd_bwd(fn: Callable, q, k, v, do) -> Callable[[], None]:
    def step() -> None:
        q.grad = k.grad = v.grad = None
        fn(q, k, v).backward(do)
    return step


def host_python_us(shape=(1, 2, 128, 64), calls: int = 200, rounds: int = 5) -> dict[str, float]:
    """Median microseconds per eager forward+backward: flash with no-op launches, the floor, and
    their difference; rounds alternate the two (``common.alternated``)."""
    from kernels.flash import flash_attention

    q, k, v, do = (torch.randn(shape) for _ in range(4))
    for t in (q, k, v):
        t.requires_grad_()
    with noop_launches():
        steps = {"flash": fwd_bwd(flash_attention, q, k, v, do),
                 "floor": fwd_bwd(lambda q, k, v: CloneFn.apply(q, k, v), q, k, v, do)}
        for step in steps.values():
            step()  # makes flash's plan; warms both
            step()  # flash's launches learn their binaries' argument layout
        times = alternated({name: (lambda s=step: seconds(s, repeat=calls)) for name, step in steps.items()}, rounds)
    flash, floor = median(times["flash"]) * 1e6, median(times["floor"]) * 1e6
    per_round = [(a - b) * 1e6 for a, b in zip(times["flash"], times["floor"])]
    return {"flash_us": flash, "floor_us": floor, "above_floor_us": median(per_round), "shape": list(shape),
            "calls": calls, "rounds": rounds}


def describe(r: dict) -> str:
    B, H, T, D = r["shape"]
    return (f"flash host Python per eager fwd+bwd, Triton launches no-op'd (B={B} H={H} T={T} D={D} fp32 CPU "
            f"tensors, median of {r['rounds']} alternated rounds x {r['calls']} calls, {torch.get_num_threads()} "
            f"thread(s)): {r['flash_us']:.1f} us; an autograd.Function that only clones: {r['floor_us']:.1f} us; "
            f"flash above that floor: {r['above_floor_us']:.1f} us")

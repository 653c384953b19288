"""kernels/flash_launch.py's eager launch plans, on CPU.

A plan is made once per key (shapes, strides, dtypes, devices, pointer alignment, mask, settings)
and then reused, and on a GPU its ``_Launch``es call each compiled binary's launcher directly
with the arguments in the kernel's own parameter order. The direct launch cannot run here, so
it is checked against a stub compiled kernel that records what it is handed, with the real
kernels' signatures (interpreted kernels keep them). The kernels themselves run in test_flash.py.
"""
from __future__ import annotations

import inspect
import types

import pytest
import torch

from kernels import flash_configs as fc
from kernels import flash_launch
from kernels.flash import flash_attention


class StubCompiled:
    """What Triton's JITFunction.run returns on a GPU; ``run`` is the binary's launcher."""

    function, packed_metadata = 12345678, ("packed",)

    def __init__(self):
        self.launches = []

    def run(self, *args):
        self.launches.append(args)


class StubKernel:
    """A kernel with a real kernel's signature whose "JIT" hands the binary's launcher what Triton
    3.9's does: the nine launch arguments, then every kernel argument, constexprs included."""

    def __init__(self, real, hook=None):
        self.real, self.arg_names = real, list(real.arg_names)
        self.jit_calls, self.compiled, self.hook = [], StubCompiled(), hook

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.jit_calls.append((grid, args, kwargs))
            c = self.compiled
            c.run(grid[0], grid[1], 1, "jit-stream", c.function, c.packed_metadata, self.hook, self.hook, self.hook,
                  *args, *(kwargs[n] for n in self.arg_names[len(args):]))
            return c
        return launch


@pytest.mark.parametrize("name", ["fwd", "dkdv", "dq", "preprocess"])
def test_direct_launch_passes_every_argument_in_the_kernels_parameter_order(name):
    from kernels import flash_triton

    stub = StubKernel(flash_triton.KERNELS[name])
    fk = types.SimpleNamespace(INTERPRETED=False, KERNELS={name: stub})
    consts = dict(HEAD_D=64, CAUSAL=True, WINDOW=0, UPCAST=False, PRECISION="ieee")
    cfg = fc.Config(64, 32, 4, 3)
    launch = flash_launch._Launch(fk, name, cfg, (5, 6), consts)
    n_runtime = len([p for p in inspect.signature(stub.real.fn).parameters.values()
                     if "constexpr" not in str(p.annotation)])
    args = tuple(f"arg{i}" for i in range(n_runtime))
    launch("stream-1", *args)  # first call: through Triton's JIT (compiles), with the launch options
    assert stub.jit_calls == [((5, 6), args, flash_launch.meta(name, cfg, consts, False))]
    launch("stream-2", *args)  # second: through the JIT again, its launcher's arguments recorded
    launch("stream-3", *args)  # then direct
    launch("stream-4", *args)
    assert len(stub.jit_calls) == 2 and len(stub.compiled.launches) == 4
    assert list(stub.compiled.launches[-1][:9]) == [5, 6, 1, "stream-4", 12345678, ("packed",), None, None, None]
    assert stub.compiled.launches[-1][9:] == stub.compiled.launches[1][9:]  # what the JIT passed
    kw = {k: v for k, v in flash_launch.meta(name, cfg, consts, False).items() if k not in ("num_warps", "num_stages")}
    bound = inspect.signature(stub.real.fn).bind(*args, **kw)
    assert list(stub.compiled.launches[-1][9:]) == list(bound.arguments.values())


def test_a_launch_hook_keeps_every_launch_going_through_triton():
    from kernels import flash_triton

    stub = StubKernel(flash_triton.KERNELS["dq"], hook="a profiler's hook")
    fk = types.SimpleNamespace(INTERPRETED=False, KERNELS={"dq": stub})
    launch = flash_launch._Launch(fk, "dq", fc.Config(64, 32, 4, 3), (1, 1),
                                  dict(HEAD_D=64, CAUSAL=True, WINDOW=0, UPCAST=False, PRECISION="ieee"))
    for _ in range(4):
        launch(0, *range(24))  # dq: 24 runtime arguments
    assert len(stub.jit_calls) == 4


def test_interpreted_launches_always_go_through_triton():
    from kernels import flash_triton

    stub = StubKernel(flash_triton.KERNELS["fwd"])
    fk = types.SimpleNamespace(INTERPRETED=True, KERNELS={"fwd": stub})
    launch = flash_launch._Launch(fk, "fwd", fc.INTERPRETER["fwd"], (1, 1),
                                  dict(HEAD_D=16, CAUSAL=True, WINDOW=0, UPCAST=False, PRECISION="ieee"))
    for _ in range(3):
        launch(0, *range(18))
    assert len(stub.jit_calls) == 3


def _qkv(T=40, D=16, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(1, 2, T, D, generator=g, dtype=dtype) for _ in range(3)]


def test_one_plan_per_key_reused_by_later_calls(monkeypatch):
    monkeypatch.setattr(flash_launch, "PLANS", {})
    q, k, v = _qkv()
    first = flash_attention(q, k, v)
    assert len(flash_launch.PLANS) == 1
    assert torch.equal(flash_attention(q.clone(), k.clone(), v.clone()), first)  # same key: same plan
    assert len(flash_launch.PLANS) == 1
    flash_attention(q, k, v, causal=False)  # another mask
    flash_attention(*_qkv(T=41))  # another length
    flash_attention(*(t.to(torch.float16) for t in (q, k, v)))  # another dtype
    big = torch.randn(1, 2, 40, 17)
    flash_attention(big[..., 1:], k, v)  # another stride and a pointer off the 16-byte grid
    assert len(flash_launch.PLANS) == 5


def test_a_plan_remembers_the_deterministic_setting(monkeypatch):
    monkeypatch.setattr(flash_launch, "PLANS", {})
    q, k, v = _qkv()
    flash_attention(q, k, v)
    torch.use_deterministic_algorithms(True)
    try:
        flash_attention(q, k, v)
    finally:
        torch.use_deterministic_algorithms(False)
    assert len(flash_launch.PLANS) == 2


def test_bad_input_is_checked_even_when_a_similar_plan_exists(monkeypatch):
    monkeypatch.setattr(flash_launch, "PLANS", {})
    q, k, v = _qkv()
    flash_attention(q, k, v)
    with pytest.raises(ValueError, match="must have the same shape"):
        flash_attention(q, k, v[:, :, :20])
    with pytest.raises(ValueError, match="must be a torch.Tensor"):
        flash_attention(q, k, None)


def test_a_known_key_skips_the_checks_and_the_plan_making(monkeypatch):
    monkeypatch.setattr(flash_launch, "PLANS", {})
    q, k, v = _qkv()
    flash_attention(q, k, v)
    calls = []
    monkeypatch.setattr(flash_launch, "plan_for", lambda *a: calls.append(a))
    monkeypatch.setattr(flash_launch, "check", lambda *a: calls.append(a))
    flash_attention(q, k, v)
    assert calls == []

"""scripts/bench/bench_attention.py's host-overhead column and flash_host.py's no-op launch harness.

The overhead is arithmetic on measured times: the wall time per call of back-to-back calls minus
the kernels' GPU time with the host taken out. It is checked here on fabricated timings (the
measurement itself needs a GPU). The no-op harness runs for real: it must time flash's own code
path (its launch plan made and reused) and restore the module it patches.
"""
from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "scripts" / "bench"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCH))
    try:
        yield importlib.import_module("bench_attention"), importlib.import_module("flash_host")
    finally:
        sys.path.remove(str(BENCH))


def test_overhead_is_wall_time_per_call_minus_kernel_time(bench):
    ba, _ = bench
    assert ba.host_overhead_ms(wall_s=0.05, calls=100, kernel_ms=0.3) == pytest.approx(0.2)
    assert ba.host_overhead_ms(wall_s=0.03, calls=100, kernel_ms=0.3) == pytest.approx(0.0)  # GPU-bound
    with pytest.raises(ValueError, match="calls"):
        ba.host_overhead_ms(0.1, 0, 0.3)


def test_overhead_row_takes_medians_over_rounds_and_the_overhead_per_round(bench):
    ba, _ = bench
    rounds = [  # wall per call 0.50, 0.45, 0.90 ms; kernels 0.30, 0.20, 0.31 ms
        {"wall_s": 0.025, "calls": 50, "kernel_ms": 0.30, "host_ms": 0.40},
        {"wall_s": 0.0225, "calls": 50, "kernel_ms": 0.20, "host_ms": 0.38},
        {"wall_s": 0.045, "calls": 50, "kernel_ms": 0.31, "host_ms": 0.80},
    ]
    row = ba.overhead_row("flash", 1024, rounds)
    assert row["overhead_rounds_ms"] == pytest.approx([0.20, 0.25, 0.59])
    assert row["overhead_ms"] == pytest.approx(0.25)  # median of the per-round differences
    assert row["wall_ms"] == pytest.approx(0.50) and row["kernel_ms"] == pytest.approx(0.30)
    assert row["host_ms"] == pytest.approx(0.40) and (row["impl"], row["T"]) == ("flash", 1024)


def test_overhead_mode_refuses_to_run_without_cuda(bench, monkeypatch):
    ba, _ = bench
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="--overhead needs a CUDA device"):
        ba.main(["--overhead", "--device", "cpu"])


def test_noop_harness_times_flashs_plan_path_and_restores_the_module(bench):
    from kernels import flash_launch

    _, fh = bench
    before = (flash_launch.kernels_for, flash_launch.PLANS, flash_launch.TUNED)
    with fh.noop_launches():
        from kernels.flash import flash_attention

        q = torch.randn(1, 2, 128, 64, requires_grad=True)
        for _ in range(2):  # the second call learns each binary's argument layout
            flash_attention(q, q, q).backward(torch.ones(1, 2, 128, 64))
        (plan,) = flash_launch.PLANS.values()
        assert plan.fwd.compiled is not None and len(plan.bwd) == 1  # later calls launch the stub binary
        assert all(launch.compiled is not None for launch in next(iter(plan.bwd.values())))
    after = (flash_launch.kernels_for, flash_launch.PLANS, flash_launch.TUNED)
    assert all(a is b for a, b in zip(after, before))
    r = fh.host_python_us(calls=5, rounds=2)
    assert r["flash_us"] > 0 and r["floor_us"] > 0 and "above that floor" in fh.describe(r)

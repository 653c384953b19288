"""Ahead-of-time compilation of the flash kernels for every supported NVIDIA target, no GPU needed.

Runs ``scripts/bench/flash_aot.py`` (CI's representative subset) in a subprocess without
TRITON_INTERPRET (interpreted kernels cannot be compiled) and checks every compiled variant's
shared memory against its target's per-block limit, which ``triton.compile`` itself does not
check: sm_75 (T4, 64 KB), sm_80 (A100, 163 KB), sm_86/sm_89 (A10, L4, RTX 30xx/40xx, 99 KB) and
sm_90 (H100, 227 KB), at head dims 16, 32, 64 and 128, in 16-bit and fp32.

The subset compiles, per target and kernel, the config with the largest shared-memory estimate
among those the launcher may pick there (the one that decides whether the kernel fits), every
candidate at gpt2's D=64 on sm_90, sm_75's whole table, and the sliding-window kernels (the
WINDOW constexpr) at D=128 on sm_80 and sm_90. Its ~85 compiles take ~2.5 min of
CPU cold (~1.7 s each); they are cached under TRITON_CACHE_DIR (default .triton_cache/aot here),
so reruns take seconds. The full table (~700 compiles) is
``python scripts/bench/flash_aot.py --full --table``.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

from kernels import flash_configs as fc

REPO = Path(__file__).resolve().parents[1]
TOOL = REPO / "scripts" / "bench" / "flash_aot.py"


def _tool():
    spec = importlib.util.spec_from_file_location("flash_aot", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def compiled() -> list[dict]:
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_CACHE_DIR", str(REPO / ".triton_cache" / "aot"))
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    proc = subprocess.run([sys.executable, str(TOOL), "--jobs", "2"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    assert rows and proc.returncode in (0, 1), proc.stderr[-3000:]  # 1: some variant failed (reported below)
    return rows


def test_every_variant_compiles(compiled):
    errors = [r for r in compiled if "error" in r]
    assert not errors, errors[:3]


def test_shared_memory_fits_each_target(compiled):
    too_big = [r for r in compiled if r["shared_bytes"] > fc.TARGETS[int(r["target"][3:])][0]]
    assert not too_big, too_big


def test_the_largest_candidate_is_compiled_for_every_target_head_dim_and_dtype(compiled):
    tool = _tool()
    seen = defaultdict(set)
    for r in compiled:
        seen[(r["kernel"], r["target"], r["dtype"], r["D"])].add(tuple(r["config"]))
    for cc, (limit, _) in fc.TARGETS.items():
        assert seen[("preprocess", f"sm_{cc}", "bf16", 128)]
    for cc, dtypes in tool.CI_LARGEST.items():
        for dtype, dims in dtypes.items():
            nbytes = tool.DTYPES[dtype][1]
            for d in dims:
                for kernel in fc.TUNED_KERNELS:
                    configs = fc.candidates(kernel, d, nbytes, fc.TARGETS[cc][0], cc)
                    largest = max(configs, key=lambda c: fc.shared_bytes_estimate(kernel, c, d, nbytes))
                    assert tuple(largest) in seen[(kernel, f"sm_{cc}", dtype, d)], (kernel, cc, dtype, d)
    for kernel in fc.TUNED_KERNELS:
        for d in (32, 64, 128):  # sm_75: its whole table (D=16 uses D=32's configs, with smaller tiles)
            for dtype in ("bf16", "fp32"):
                want = {tuple(c) for c in fc.shipped(kernel, d, fc.TURING)}
                assert seen[(kernel, "sm_75", dtype, d)] == want, (kernel, dtype, d)
        # every config an H100 may pick at gpt2's head dim
        want = {tuple(c) for c in fc.candidates(kernel, 64, 2, fc.TARGETS[90][0], 90)}
        assert seen[(kernel, "sm_90", "bf16", 64)] == want


def test_windowed_kernels_compile_and_need_no_more_shared_memory_than_plain_causal(compiled):
    # the window adds masks and loop bounds, no tiles: each windowed variant's shared memory is
    # that of the same kernel, target, dtype, head dim and config without a window
    tool = _tool()
    plain = {(r["kernel"], r["target"], r["dtype"], r["D"], tuple(r["config"])): r["shared_bytes"]
             for r in compiled if r.get("window") is None and r["causal"] and "error" not in r}
    windowed = {(r["kernel"], r["target"], r["dtype"], r["D"], tuple(r["config"])): r["shared_bytes"]
                for r in compiled if r.get("window")}
    want = {(kernel, f"sm_{cc}", dtype, d) for cc, dtypes in tool.CI_WINDOWED.items()
            for dtype, dims in dtypes.items() for d in dims for kernel in fc.TUNED_KERNELS}
    assert {key[:4] for key in windowed} == want
    for key, shared in windowed.items():
        assert shared == plain[key], (key, shared, plain[key])


def test_shared_memory_estimate_used_for_pruning_is_an_upper_bound(compiled):
    # The launcher prunes with this estimate on the device; if it undercounted, a GPU with less
    # shared memory could be handed a config that fails to launch.
    tool = _tool()
    for r in compiled:
        if r["kernel"] == "preprocess" or r["target"] == "sm_75":  # sm_75: its table is compiled whole
            continue
        nbytes = tool.DTYPES[r["dtype"]][1]
        est = fc.shared_bytes_estimate(r["kernel"], fc.Config(*r["config"]), r["D"], nbytes)
        assert r["shared_bytes"] <= est, r


def test_full_table_covers_every_config_each_target_may_run():
    # no compiling here: the --full variant list must hold every (target, kernel, D, dtype) candidate
    tool = _tool()
    listed = {(v["cc"], v["kernel"], v["D"], v["dtype"], tuple(v["config"]))
              for v in tool.variants(full=True) if v["causal"]}
    for cc, (limit, _) in fc.TARGETS.items():
        for dtype, (_, nbytes, _) in tool.DTYPES.items():
            for d in tool.HEAD_DIMS:
                for kernel in fc.TUNED_KERNELS:
                    for c in fc.candidates(kernel, d, nbytes, limit, cc):
                        assert (cc, kernel, d, dtype, tuple(c)) in listed

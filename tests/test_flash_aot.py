"""Ahead-of-time compilation of the flash kernels for A100 (sm_80) and H100 (sm_90), no GPU needed.

Runs ``python -m kernels.flash_aot`` in a subprocess without TRITON_INTERPRET (interpreted
kernels cannot be compiled) and checks every compiled variant's shared memory against the
target's per-block limit, which ``triton.compile`` itself does not check.

The compiled set is kernels/flash_aot.py's representative one: every shipped autotune config
(after pruning for the target) for both head dims in bf16, causal; fp16 and non-causal only for
each kernel's largest-shared-memory config (dtype and causality change no tile or pipeline shape,
so they cannot change whether a config fits). 76 compiles take ~45 s of CPU on 2 cores cold;
the full 140-variant matrix (``--full``) would double that. Compiles are cached under
.triton_cache/aot (gitignored), so reruns take seconds.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

from kernels.flash_aot import DTYPES, HEAD_DIMS, TARGETS

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def compiled() -> list[dict]:
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_DEFAULT_FP_FUSION="1", TRITON_CACHE_DIR=str(REPO / ".triton_cache" / "aot"))
    proc = subprocess.run(
        [sys.executable, "-m", "kernels.flash_aot", "--jobs", "2"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]


def test_every_variant_compiles(compiled):
    errors = [r for r in compiled if "error" in r]
    assert not errors, errors[:3]


def test_shared_memory_fits_each_target(compiled):
    too_big = [r for r in compiled if r["shared_bytes"] > TARGETS[int(r["target"][3:])]]
    assert not too_big, too_big


def test_every_shipped_config_compiled_for_both_dtypes_and_targets(compiled):
    from kernels import flash_triton as fk

    seen = defaultdict(set)
    for r in compiled:
        seen[(r["kernel"], r["target"], r["dtype"], r["D"])].add(tuple(r["config"]))
    for cc, limit in TARGETS.items():
        for d in HEAD_DIMS:
            for dtype, nbytes in DTYPES.items():
                assert seen[("preprocess", f"sm_{cc}", dtype, d)]
                for kernel in ("fwd", "dkdv", "dq"):
                    fitting = {c for c in fk.configs_for(kernel, d)
                               if fk.shared_bytes_estimate(kernel, c, d, nbytes) <= limit}
                    assert fitting, f"no {kernel} config fits sm_{cc} at D={d}"
                    got = seen[(kernel, f"sm_{cc}", dtype, d)]
                    where = (kernel, f"sm_{cc}", dtype, d)
                    assert got <= fitting, where  # nothing the autotuner would prune away
                    assert got == fitting if dtype == "bf16" else got, where


def test_shared_memory_estimate_used_for_pruning_is_an_upper_bound(compiled):
    # The autotuner prunes with this estimate on the device; if it undercounted, a GPU with less
    # shared memory than sm_90 could be handed a config that fails to launch.
    from kernels import flash_triton as fk

    for r in compiled:
        if r["kernel"] == "preprocess":
            continue
        est = fk.shared_bytes_estimate(r["kernel"], tuple(r["config"]), r["D"], DTYPES[r["dtype"]])
        assert r["shared_bytes"] <= est, r

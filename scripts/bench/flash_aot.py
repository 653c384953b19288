"""Compile the flash-attention kernels for NVIDIA targets ahead of time, with no GPU present.

    python scripts/bench/flash_aot.py                 # CI's representative subset (tests/test_flash_aot.py)
    python scripts/bench/flash_aot.py --full --jobs 2 # every config each target may run x dtype x head dim
    python scripts/bench/flash_aot.py --full --table  # the same as a markdown table, worst case per cell
    python scripts/bench/flash_aot.py --ptxas-info    # also registers and spills (ptxas -v)

Prints one JSON object per variant: {kernel, target, dtype, precision, D, causal, window, config,
shared_bytes, shared_limit, fits[, n_regs, spill_bytes]}, or with ``--table`` one row per
(kernel, target, D, dtype) with the largest shared memory among its compiled configs.

For each target (kernels/flash_configs.TARGETS) it compiles the configs that
``flash_configs.candidates`` lets that target run, so a config the launcher could pick on a
GPU is one that has been compiled here. ``triton.compile`` does not check shared memory itself,
hence ``fits``. A CI/dev tool, not part of the kernels package. Must run WITHOUT
``TRITON_INTERPRET`` (interpreted kernels cannot be compiled).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor

# (dtype label, pointer type, bytes per element, tl.dot input_precision) as kernels/flash_launch.py launches
DTYPES = {
    "fp16": ("fp16", 2, "ieee"),
    "bf16": ("bf16", 2, "ieee"),
    "fp32": ("fp32", 4, "ieee"),
    "fp32-tf32": ("fp32", 4, "tf32"),
}
HEAD_DIMS = (16, 32, 64, 128)
KERNELS = ("fwd", "dkdv", "dq")
_POINTER_DTYPE_ARGS = {"Q", "K", "V", "O", "DO", "DQ", "DK", "DV"}
_FP32_POINTER_ARGS = {"LSE", "Delta"}
_FLOAT_ARGS = {"qk_scale", "sm_scale"}
_LENGTH_ARGS = {"H", "T_Q", "T_K"}  # any value: no divisibility hint
# the sliding window compiled (a constexpr: its value only changes folded constants, not tiles)
AOT_WINDOW = 256
# windowed variants in CI: (target -> {dtype: head dims}), the largest candidate per kernel
CI_WINDOWED = {80: {"bf16": (128,), "fp32": (128,)}, 90: {"bf16": (128,), "fp32": (128,)}}


def variants(full: bool = False) -> list[dict]:
    """The (kernel, target, dtype, D, causal, config) variants to compile.

    ``full``: every config each target may run, for every dtype and head dim, causal; plus
    non-causal for bf16 at D=128; windowed (``AOT_WINDOW``) at each one's largest candidate.
    Default, CI's subset (``CI_LARGEST``): per target and kernel,
    the candidate with the largest shared-memory estimate, the one that decides whether the
    kernel fits, in bf16 and fp32 at nano's D=32 and at D=128 (16 and 64 too on sm_80/sm_90);
    every candidate at gpt2's D=64 in bf16 on sm_90; sm_75's whole table (the estimate does not
    bound its shared memory) at D 32, 64, 128. fp16 vs bf16 and the causal flag change no tile
    or pipeline shape, so they cannot change whether a config fits; fp16, fp32 with TF32 and
    non-causal are compiled on sm_90 to show they build. The sliding window adds masks and loop
    bounds, no tiles: ``CI_WINDOWED`` compiles it at D=128 (bf16, fp32) on sm_80 and sm_90.
    """
    from kernels import flash_configs as fc

    out = []
    for cc, (limit, _) in fc.TARGETS.items():
        out.append(dict(kernel="preprocess", cc=cc, dtype="bf16", D=128, causal=None, config=fc.PREPROCESS))
        for dtype, (_, nbytes, _) in DTYPES.items():
            for d in HEAD_DIMS:
                for name in KERNELS:
                    configs = fc.candidates(name, d, nbytes, limit, cc)
                    largest = max(configs, key=lambda c: fc.shared_bytes_estimate(name, c, d, nbytes))
                    for cfg in configs:
                        for causal in (True, False):
                            if _wanted(full, cc, dtype, d, causal, cfg == largest):
                                out.append(dict(kernel=name, cc=cc, dtype=dtype, D=d, causal=causal, config=cfg))
                    if full or d in CI_WINDOWED.get(cc, {}).get(dtype, ()):
                        out.append(dict(kernel=name, cc=cc, dtype=dtype, D=d, causal=True, config=largest,
                                        window=AOT_WINDOW))
    return out


# CI's subset: (target -> {dtype: head dims}) whose largest candidate per kernel is compiled
CI_LARGEST = {
    80: {"bf16": (16, 32, 64, 128), "fp32": (32, 128)},
    86: {"bf16": (32, 128), "fp32": (32, 128)},
    89: {"bf16": (128,), "fp32": (128,)},
    90: {"bf16": (16, 32, 64, 128), "fp32": (32, 128), "fp16": (128,), "fp32-tf32": (128,)},
}


def _wanted(full: bool, cc: int, dtype: str, d: int, causal: bool, largest: bool) -> bool:
    if not causal:  # non-causal adds no tiles: bf16 D=128 in the full table, sm_90 in CI
        return d == 128 and dtype == "bf16" and largest and (full or cc == 90)
    if full:
        return True
    if cc < 80:  # the estimate does not bound sm_75: its table, at the largest head dim of each list
        return dtype in ("bf16", "fp32") and d in (32, 64, 128)
    if cc == 90 and dtype == "bf16" and d == 64:  # every config an H100 may pick at gpt2's head dim
        return True
    return largest and d in CI_LARGEST[cc].get(dtype, ())


def _signature(fn, pointer: str, constexprs: dict) -> tuple[dict, dict]:
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in _POINTER_DTYPE_ARGS:
            sig[name] = f"*{pointer}"
        elif name in _FP32_POINTER_ARGS:
            sig[name] = "*fp32"
        elif name in _FLOAT_ARGS:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
        # what Triton's JIT infers for 16-byte-aligned tensors and strides that are multiples of 16
        if sig[name].startswith("*") or name.startswith("stride_"):
            attrs[(i,)] = [["tt.divisibility", 16]]
        if sig[name] == "i32" and name not in _LENGTH_ARGS and not name.startswith("stride_"):
            raise ValueError(f"flash_aot: no type rule for kernel argument {name!r}")
    return sig, attrs


def compile_variant(v: dict, ptxas_info: bool = False) -> dict:
    """Compile one variant and report its shared memory (and, optionally, ptxas register use)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from kernels import flash_triton as fk

    fn = fk.KERNELS[v["kernel"]]
    bm, bn, warps, stages = v["config"]
    pointer, _, precision = DTYPES[v["dtype"]]
    constexprs = {"HEAD_D": v["D"], "BLOCK_M": bm}
    if v["kernel"] != "preprocess":
        constexprs.update(BLOCK_N=bn, CAUSAL=v["causal"], WINDOW=v.get("window") or 0, UPCAST=False,
                          PRECISION=precision)
    sig, attrs = _signature(fn, pointer, constexprs)
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)
    try:
        compiled = triton.compile(src, target=GPUTarget("cuda", v["cc"], 32),
                                  options={"num_warps": warps, "num_stages": stages})
    except Exception as err:  # the useful message is at the bottom of the __cause__ chain
        while err.__cause__ is not None:
            err = err.__cause__
        return {**_row(v), "error": f"{type(err).__name__}: {err}"}
    row = {**_row(v), "shared_bytes": compiled.metadata.shared}
    row["fits"] = row["shared_bytes"] <= row["shared_limit"]
    if ptxas_info:
        row.update(_ptxas_info(compiled.asm["ptx"], v["cc"]))
    return row


def _row(v: dict) -> dict:
    from kernels import flash_configs as fc

    return {"kernel": v["kernel"], "target": f"sm_{v['cc']}", "dtype": v["dtype"], "D": v["D"],
            "causal": v["causal"], "window": v.get("window"), "config": list(v["config"]),
            "shared_limit": fc.TARGETS[v["cc"]][0]}


def _ptxas_info(ptx: str, cc: int) -> dict:
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        arch = f"sm_{cc}a" if cc == 90 else f"sm_{cc}"
        res = subprocess.run([get_ptxas(cc).path, "-v", f"--gpu-name={arch}", path, "-o", os.devnull],
                             capture_output=True, text=True)
    log = res.stdout + res.stderr
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores", log)
    return {"n_regs": int(regs.group(1)) if regs else None, "spill_bytes": int(spills.group(1)) if spills else None}


def print_table(rows: list[dict]) -> None:
    """One markdown row per (kernel, target, D, dtype): the largest shared memory compiled."""
    worst: dict = {}
    for r in rows:
        key = (r["kernel"], r["target"], r["D"], r["dtype"])
        if "error" in r or key not in worst or r["shared_bytes"] > worst[key]["shared_bytes"]:
            worst[key] = r
    print("| kernel | target | D | dtype | configs | max shared KB | limit KB | fits |")
    print("|---|---|---:|---|---:|---:|---:|---|")
    counts: dict = {}
    for r in rows:
        key = (r["kernel"], r["target"], r["D"], r["dtype"])
        counts[key] = counts.get(key, 0) + 1
    for key in sorted(worst):
        r = worst[key]
        shared = "error" if "error" in r else f"{r['shared_bytes'] / 1024:.1f}"
        print(f"| {key[0]} | {key[1]} | {key[2]} | {key[3]} | {counts[key]} | {shared} "
              f"| {r['shared_limit'] / 1024:.0f} | {'yes' if r.get('fits') else 'NO'} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2, help="compile processes")
    parser.add_argument("--ptxas-info", action="store_true", help="also report registers and spills")
    parser.add_argument("--full", action="store_true", help="every config x dtype x head dim (default: CI subset)")
    parser.add_argument("--table", action="store_true", help="print a markdown table instead of JSON lines")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("flash_aot: unset TRITON_INTERPRET; interpreted kernels cannot be compiled", file=sys.stderr)
        return 2
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    todo = variants(full=args.full)
    rows = []
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        for row in pool.map(compile_variant, todo, [args.ptxas_info] * len(todo)):
            rows.append(row)
            if not args.table:
                print(json.dumps(row), flush=True)
    if args.table:
        print_table(rows)
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())

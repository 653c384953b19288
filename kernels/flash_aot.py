"""Compile every shipped flash-attention kernel variant for NVIDIA targets, with no GPU present.

``python -m kernels.flash_aot [--jobs 2] [--ptxas-info]`` prints one JSON object per line:
{kernel, target, dtype, D, causal, config, shared_bytes, shared_limit, fits[, n_regs, spill_bytes]}.

For each target it compiles exactly the autotune configs that survive ``prune_configs`` for that
target's shared-memory limit, so a config the autotuner could pick on an A100 or H100 is one
that has been compiled here. ``triton.compile`` does not check shared memory itself, hence the
``fits`` field. Must run WITHOUT ``TRITON_INTERPRET`` (interpreted kernels cannot be compiled).
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

# opt-in shared memory per block, bytes: A100 (sm_80) 163 KB, H100 (sm_90) 227 KB
TARGETS = {80: 163 * 1024, 90: 227 * 1024}
DTYPES = {"fp16": 2, "bf16": 2, "fp32": 4}
HEAD_DIMS = (64, 128)
_POINTER_DTYPE_ARGS = {"Q", "K", "V", "O", "DO", "DQ", "DK", "DV"}
_FP32_POINTER_ARGS = {"LSE", "Delta"}
_FLOAT_ARGS = {"qk_scale", "sm_scale"}
_LENGTH_ARGS = {"H", "T_Q", "T_K"}  # any value: no divisibility hint


def variants(full: bool = False) -> list[dict]:
    """The (kernel, target, dtype, D, causal, config) variants to compile.

    ``full``: every shipped config (after pruning for the target) x {fp16, bf16, fp32} x
    D {64, 128}, causal, plus non-causal at D=128 for 16-bit inputs.
    Default, a representative set for CI: every config in bf16, causal; fp16, fp32 and
    non-causal only for each kernel's largest-shared-memory config that survives pruning. fp16 vs
    bf16 and the causal flag change neither tile shapes nor pipelining, so they cannot change
    whether a config fits; fp32 doubles tile bytes, which pruning accounts for and the largest
    surviving config tests. Those extra compiles check that the variant compiles at all.
    """
    from kernels import flash_triton as fk

    out = []
    for cc, limit in TARGETS.items():
        for dtype, nbytes in DTYPES.items():
            for d in HEAD_DIMS:
                out.append(dict(kernel="preprocess", cc=cc, dtype=dtype, D=d, causal=None,
                                config=(fk.PREPROCESS_BLOCK_M, 0, fk.PREPROCESS_WARPS, 1)))
                for name in ("fwd", "dkdv", "dq"):
                    configs = fk.prune_configs(name, d, nbytes, limit)
                    largest = max(configs, key=lambda c: fk.shared_bytes_estimate(name, c, d, nbytes))
                    for cfg in configs:
                        for causal in (True, False):
                            if _wanted(full, dtype, d, causal, cfg == largest):
                                out.append(dict(kernel=name, cc=cc, dtype=dtype, D=d, causal=causal, config=cfg))
    return out


def _wanted(full: bool, dtype: str, d: int, causal: bool, largest: bool) -> bool:
    if not causal and (d != 128 or dtype == "fp32"):
        return False
    if full or (causal and dtype == "bf16"):
        return True
    return largest


def _signature(fn, dtype: str, constexprs: dict) -> tuple[dict, dict]:
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in _POINTER_DTYPE_ARGS:
            sig[name] = f"*{dtype}"
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
    constexprs = {"HEAD_D": v["D"], "BLOCK_M": bm}
    if v["kernel"] != "preprocess":
        precision = "ieee" if v["dtype"] == "fp32" else "tf32"  # as kernels/flash.py launches them
        constexprs.update(BLOCK_N=bn, CAUSAL=v["causal"], UPCAST=False, PRECISION=precision)
    sig, attrs = _signature(fn, v["dtype"], constexprs)
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)
    target = GPUTarget("cuda", v["cc"], 32)
    try:
        compiled = triton.compile(src, target=target, options={"num_warps": warps, "num_stages": stages})
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
    return {"kernel": v["kernel"], "target": f"sm_{v['cc']}", "dtype": v["dtype"], "D": v["D"],
            "causal": v["causal"], "config": list(v["config"]), "shared_limit": TARGETS[v["cc"]]}


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2, help="compile processes")
    parser.add_argument("--ptxas-info", action="store_true", help="also report registers and spills")
    parser.add_argument("--full", action="store_true", help="every config x dtype (default: CI subset)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("flash_aot: unset TRITON_INTERPRET; interpreted kernels cannot be compiled", file=sys.stderr)
        return 2
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    todo = variants(full=args.full)
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        for row in pool.map(compile_variant, todo, [args.ptxas_info] * len(todo)):
            print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

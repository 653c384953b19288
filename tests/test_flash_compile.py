"""flash under torch.compile as a GPU sees it, traced on a CPU: the triton_op path, no GPU needed.

On a GPU, ``kernels/flash_ops.py`` registers the kernels with ``torch.library.triton_op`` so that
AOTAutograd traces into them and Inductor sees every Triton kernel. Under the interpreter (this
test session) the ops are opaque custom ops instead, because torch cannot trace interpreted
kernels. So this file runs one subprocess WITHOUT ``TRITON_INTERPRET``: the kernels are real
``triton.jit`` functions, Triton's driver is replaced by a stub that names sm_90 as the target
(what ``triton.compile`` needs to lower the kernels to TTIR, which is how torch finds out which
arguments a kernel writes), and the model runs on fake tensors (shapes only, nothing executes),
CPU-placed because autograd on fake CUDA tensors needs a CUDA build. ``torch.compile`` with an
AOTAutograd backend that records its graphs then traces GPT's forward and backward with
``fullgraph=True`` (a graph break raises).

What only a GPU can show (tests/test_flash_gpu.py, scripts/bench/gpu_check.sh): that Inductor
compiles and launches these kernel nodes, that CUDA graphs (``mode="reduce-overhead"``) replay
them, their numerics, and their speed.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kernels import flash_configs as fc

REPO = Path(__file__).resolve().parents[1]

SCRIPT = r'''
import functools, json, os, sys
import torch, triton
from triton.backends.compiler import GPUTarget

class StubDriver:  # what torch's kernel analysis asks of Triton's driver: the target
    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)
    def get_current_device(self):
        return 0

triton.runtime.driver.set_active(StubDriver())
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd
from torch._subclasses.fake_tensor import FakeTensorMode
from kernels import flash_configs as fc, flash_launch as flash, flash_triton
from kernels.flash import flash_attention
from models import GPT, GPTConfig

assert not flash_triton.INTERPRETED
flash.kernels_for = lambda q: flash_triton            # fake CPU tensors stand in for CUDA ones
flash._gpu = lambda fk, device: (fc.TARGETS[90][0], 90)
measured = []
flash._time_ms = lambda run, cfg, reps=10: measured.append(cfg) or 1.0  # any measurement is recorded

def trace(seed_tuning, window=None):
    graphs = []
    def capture(gm, example_inputs):
        graphs.append(gm)
        return make_boxed_func(gm)
    torch._dynamo.reset()
    flash.TUNED.clear()
    flash.PLANS.clear()
    flash.TRACE_PINNED.clear()
    if seed_tuning:  # what an eager call before compiling leaves in the cache: the last candidate wins
        for name in fc.TUNED_KERNELS:
            last = fc.candidates(name, 64, 2, fc.TARGETS[90][0])[-1]
            flash.TUNED[fc.tuning_key(name, 64, 2, (None, "torch.bfloat16", True, "ieee", 0), 256, 256)] = last
    torch.manual_seed(0)
    attn = flash_attention if window is None else functools.partial(flash_attention, window=window)
    model = GPT(GPTConfig(vocab_size=64, block_size=256, n_layer=2, n_head=2, n_embd=128), attn)
    with FakeTensorMode(allow_non_fake_inputs=True):
        for mod in model.modules():  # fake copies of the weights
            for name, p in list(mod._parameters.items()):
                if p is not None:
                    mod._parameters[name] = torch.nn.Parameter(torch.empty(p.shape, dtype=p.dtype))
        idx = torch.zeros(2, 256, dtype=torch.long)
        compiled = torch.compile(model, backend=aot_autograd(fw_compiler=capture, bw_compiler=capture), fullgraph=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, loss = compiled(idx, idx)
        loss.backward()
    nodes = []
    for graph, part in zip(graphs, ("forward", "backward")):
        for n in graph.graph.nodes:
            target = str(n.target)
            if "triton_kernel_wrapper" in target:
                from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
                kernel = kernel_side_table.get_kernel(n.kwargs["kernel_idx"])
                while not hasattr(kernel, "arg_names") or hasattr(kernel, "configs"):  # autotune wrapper
                    kernel = kernel.fn
                kw = n.kwargs["kwargs"]
                nodes.append(dict(part=part, op=target, kernel=kernel.fn.__name__,
                                  clone=sorted(n.kwargs.get("tensors_to_clone", [])),
                                  blocks=[kw.get("BLOCK_M"), kw.get("BLOCK_N")], window=kw.get("WINDOW"),
                                  grid=[list(g) for g in n.kwargs["grid"]]))
            elif "gptlab" in target:
                nodes.append(dict(part=part, op=target))
    return dict(nodes=nodes, pinned=sorted(map(list, flash.TRACE_PINNED)), measured=len(measured), graphs=len(graphs))

print(json.dumps({"untuned": trace(False), "tuned": trace(True), "windowed": trace(False, window=96)}))
'''


@pytest.fixture(scope="module")
def traced() -> dict:
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


KERNELS = {"forward": ["_fwd_kernel"] * 2, "backward": ["_bwd_preprocess", "_bwd_dkdv_kernel", "_bwd_dq_kernel"] * 2}
OUTPUTS = {"_fwd_kernel": ["LSE", "O"], "_bwd_preprocess": ["Delta"], "_bwd_dkdv_kernel": ["DK", "DV"],
           "_bwd_dq_kernel": ["DQ"]}


def test_whole_model_traces_in_one_graph_with_every_kernel_visible(traced):
    run = traced["untuned"]
    assert run["graphs"] == 2  # one forward, one backward: fullgraph=True would have raised on a break
    assert not [n for n in run["nodes"] if "gptlab" in n["op"]], "an opaque flash op reached AOTAutograd's graph"
    for part, kernels in KERNELS.items():
        assert [n["kernel"] for n in run["nodes"] if n["part"] == part] == kernels  # 2 layers


def test_a_windowed_model_traces_in_one_graph_with_the_window_in_every_attention_kernel(traced):
    # flash_attention(..., window=96) goes through the same ops (the window is an int argument of
    # the schema) and reaches each kernel as its WINDOW constexpr; the no-window trace passes 0
    run = traced["windowed"]
    assert run["graphs"] == 2 and run["measured"] == 0
    assert not [n for n in run["nodes"] if "gptlab" in n["op"]]
    for part, kernels in KERNELS.items():
        assert [n["kernel"] for n in run["nodes"] if n["part"] == part] == kernels
    for node in run["nodes"]:
        assert node["window"] == (None if node["kernel"] == "_bwd_preprocess" else 96), node
        assert node["clone"] == OUTPUTS[node["kernel"]], node
    assert {n["window"] for n in traced["untuned"]["nodes"]} == {None, 0}
    assert sorted(p[-1] for p in run["pinned"]) == [128, 128, 128]  # the window's bucket is in the tuning key


def test_torch_finds_that_each_kernel_writes_only_its_outputs(traced):
    # inputs a kernel is thought to write would be cloned before every launch
    for node in traced["untuned"]["nodes"]:
        assert node["clone"] == OUTPUTS[node["kernel"]], node


def test_tracing_never_tunes_and_uses_the_pinned_config_of_an_untuned_bucket(traced):
    run = traced["untuned"]
    assert run["measured"] == 0
    assert sorted(k for k, *_ in run["pinned"]) == ["dkdv", "dq", "fwd"]
    firsts = {name: fc.candidates(name, 64, 2, fc.TARGETS[90][0])[0] for name in fc.TUNED_KERNELS}
    by_kernel = {"_fwd_kernel": "fwd", "_bwd_dkdv_kernel": "dkdv", "_bwd_dq_kernel": "dq"}
    for node in run["nodes"]:
        if node["kernel"] in by_kernel:
            cfg = firsts[by_kernel[node["kernel"]]]
            assert node["blocks"] == [cfg.block_m, cfg.block_n], node


def test_a_tuned_bucket_puts_the_cached_config_in_the_graph(traced):
    run = traced["tuned"]
    assert run["measured"] == 0 and run["pinned"] == []
    lasts = {name: fc.candidates(name, 64, 2, fc.TARGETS[90][0])[-1] for name in fc.TUNED_KERNELS}
    by_kernel = {"_fwd_kernel": "fwd", "_bwd_dkdv_kernel": "dkdv", "_bwd_dq_kernel": "dq"}
    for node in run["nodes"]:
        if node["kernel"] in by_kernel:
            cfg = lasts[by_kernel[node["kernel"]]]
            assert node["blocks"] == [cfg.block_m, cfg.block_n], node
            block = cfg.block_n if node["kernel"] == "_bwd_dkdv_kernel" else cfg.block_m
            assert node["grid"] == [[256 // block, 2 * 2, 1]], node  # (row blocks, B*H)

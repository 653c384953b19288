"""flash_attention (Triton FlashAttention-2) against a float64 reference, forward and backward.

Without CUDA, conftest.py sets TRITON_INTERPRET=1, so these run the real Triton kernels in the
CPU interpreter (~0.1-0.7 s per forward+backward here); shapes are kept small for that reason.
With CUDA they run natively. Larger shapes live in test_flash_gpu.py; launch-config choice is
tested in test_flash_configs.py. The reference is tests/reference.py's float64 attention.

Tolerances, from measurements on this machine (max abs error vs float64, forward and dq/dk/dv):
- fp32: the kernel's error is ~1e-6, like naive attention's in fp32; bound 2e-5.
- fp16: at most 2x naive fp16's error + 1e-3 (errors are ~1e-3; the slack covers cases where
  naive happens to land near 0, e.g. T=1).
- bf16: the interpreter's fp32->bf16 casts truncate instead of rounding (TRITON_NOTES.md), so
  under it the kernel lands ~2x further from the reference than torch's bf16 does; bound 4x
  naive bf16's error + 5e-3 (measured worst ratio 3.2 over 3 seeds of these cases, fp16 1.9).
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from kernels import flash_attention, naive_attention
from reference import attention_f64 as reference
from kernels import UnavailableError, UnsupportedError
from trainer.errors import user_errors

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
LOW_PRECISION_RULE = {torch.float16: (2.0, 1e-3), torch.bfloat16: (4.0, 5e-3)}  # (x naive error, slack)


def _inputs(shape_q, shape_k, dtype, seed=0):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    make = lambda shape: torch.randn(shape, generator=g, device=DEVICE, dtype=dtype)  # noqa: E731
    q, k, v = make(shape_q), make(shape_k), make(shape_k)
    do = make(shape_q)
    return q, k, v, do


def errors(fn, q, k, v, do, causal, scale=None) -> list[float]:
    """Max abs error of fn's output and dq, dk, dv against the float64 reference."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = fn(*leaves, causal=causal, scale=scale)
    out.backward(do)
    ref_leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = reference(*ref_leaves, causal=causal, scale=scale)
    ref.backward(do.double())
    assert out.dtype == q.dtype and out.shape == q.shape
    pairs = [(out, ref)] + [(a.grad, b.grad) for a, b in zip(leaves, ref_leaves)]
    return [(a.double() - b).abs().max().item() for a, b in pairs]


# (causal, T, D): covers T=1, partial blocks (17, 100, 130 with 64-wide interpreter blocks), an
# exact block multiple (64), several key blocks per query block (130), and every tested D.
FP32_CASES = [
    (True, 1, 16), (True, 17, 32), (True, 64, 64), (True, 100, 16), (True, 130, 32),
    (False, 1, 32), (False, 17, 64), (False, 64, 16), (False, 100, 32), (False, 130, 64),
]
LOW_CASES = [(True, 1, 32), (True, 17, 16), (True, 100, 64), (True, 130, 32), (False, 64, 32), (False, 130, 16)]


@pytest.mark.parametrize("causal,T,D", FP32_CASES)
def test_fp32_matches_float64_reference(causal, T, D):
    q, k, v, do = _inputs((2, 2, T, D), (2, 2, T, D), torch.float32)
    errs = errors(flash_attention, q, k, v, do, causal)
    assert max(errs) < 2e-5, f"out/dq/dk/dv errors {errs}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("causal,T,D", LOW_CASES)
def test_low_precision_error_within_naive_baseline(dtype, causal, T, D):
    q, k, v, do = _inputs((1, 2, T, D), (1, 2, T, D), dtype)
    flash = errors(flash_attention, q, k, v, do, causal)
    naive = errors(naive_attention, q, k, v, do, causal)
    factor, slack = LOW_PRECISION_RULE[dtype]
    for name, f, n in zip(("out", "dq", "dk", "dv"), flash, naive):
        assert f <= factor * n + slack, f"{name}: flash {f:.2e} vs naive {n:.2e}"


def test_cross_attention_shorter_queries_than_keys():
    # non-causal with Tq != Tk: query and key bound masks differ; backward must not assume causal
    q, k, v, do = _inputs((1, 2, 17, 32), (1, 2, 100, 32), torch.float32)
    assert max(errors(flash_attention, q, k, v, do, causal=False)) < 2e-5


# (Tq, Tk, D) for causal attention with the end-aligned mask: a decode step (Tq=1), a chunk after a
# KV cache that crosses key blocks (Tq < Tk, both partial), and Tq > Tk, whose first Tq - Tk query
# rows see no key and must output zeros (with zero gradients), as the reference does.
KV_CASES = [(1, 77, 32), (17, 100, 16), (70, 130, 64), (40, 5, 16), (100, 30, 32)]


@pytest.mark.parametrize("Tq,Tk,D", KV_CASES)
def test_causal_end_aligned_mask_with_unequal_lengths(Tq, Tk, D):
    q, k, v, do = _inputs((1, 2, Tq, D), (1, 2, Tk, D), torch.float32)
    assert max(errors(flash_attention, q, k, v, do, causal=True)) < 2e-5


def test_queries_with_no_visible_key_output_zeros_and_lse_minus_inf():
    from kernels.flash_ops import flash_attn_fwd
    from reference import attention_f64

    q, k, v, _ = _inputs((1, 2, 20, 16), (1, 2, 6, 16), torch.float32)
    out, lse = flash_attn_fwd(q, k, v, True, 0.25)
    ref_out, ref_lse = attention_f64(q, k, v, causal=True, scale=0.25, return_lse=True)
    assert torch.equal(out[:, :, :14], torch.zeros_like(out[:, :, :14]))  # rows 0..13 see no key
    assert torch.isneginf(lse[:, :, :14]).all() and torch.isfinite(lse[:, :, 14:]).all()
    torch.testing.assert_close(lse[:, :, 14:].double(), ref_lse[:, :, 14:], atol=2e-5, rtol=0)
    torch.testing.assert_close(out.double(), ref_out, atol=2e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_kv_cache_chunk_low_precision_within_naive_baseline(dtype):
    q, k, v, do = _inputs((1, 2, 24, 32), (1, 2, 90, 32), dtype)
    flash = errors(flash_attention, q, k, v, do, True)
    naive = errors(naive_attention, q, k, v, do, True)
    factor, slack = LOW_PRECISION_RULE[dtype]
    for name, f, n in zip(("out", "dq", "dk", "dv"), flash, naive):
        assert f <= factor * n + slack, f"{name}: flash {f:.2e} vs naive {n:.2e}"


def test_given_scale():
    q, k, v, do = _inputs((1, 2, 40, 32), (1, 2, 40, 32), torch.float32)
    assert max(errors(flash_attention, q, k, v, do, causal=True, scale=0.3)) < 2e-5


def test_non_contiguous_inputs_and_grad():
    # the model's layout: q, k, v are transposed views of one (B, T, 3, H, D) projection
    B, T, H, D = 2, 33, 2, 32
    g = torch.Generator(device=DEVICE).manual_seed(1)
    qkv = torch.randn(B, T, 3, H, D, generator=g, device=DEVICE)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # (B, H, T, D), strided
    assert not q.is_contiguous()
    do = torch.randn(B, T, H, D, generator=g, device=DEVICE).transpose(1, 2)  # strided dO too
    assert max(errors(flash_attention, q, k, v, do, causal=True)) < 2e-5


def test_non_unit_stride_along_head_dim():
    g = torch.Generator(device=DEVICE).manual_seed(2)
    q, k, v = (torch.randn(1, 2, 20, 64, generator=g, device=DEVICE)[..., ::2] for _ in range(3))  # D=32, stride 2
    do = torch.randn(1, 2, 20, 32, generator=g, device=DEVICE)
    assert max(errors(flash_attention, q, k, v, do, causal=False)) < 2e-5


def test_broadcast_output_gradient():
    # out.sum().backward() hands the kernel a dO whose strides are all 0
    q, k, v, _ = _inputs((1, 2, 24, 16), (1, 2, 24, 16), torch.float32)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    flash_attention(*leaves, causal=True).sum().backward()
    ref_leaves = [t.double().requires_grad_() for t in (q, k, v)]
    reference(*ref_leaves, causal=True).sum().backward()
    for a, b in zip(leaves, ref_leaves):
        torch.testing.assert_close(a.grad.double(), b.grad, atol=2e-5, rtol=0)


def _qkv(shape, dtype=torch.float32):
    return [torch.randn(shape, device=DEVICE, dtype=dtype) for _ in range(3)]


@pytest.mark.parametrize(
    "args,kwargs,match",
    [
        (_qkv((1, 2, 8, 48)), {}, "head dim D=48"),
        (_qkv((1, 2, 8, 8)), {}, "head dim D=8"),
        (_qkv((1, 2, 8, 16), torch.float64), {}, "float64"),
        (_qkv((2, 8, 16)), {}, "shape \\(B, H, T, D\\)"),
        (_qkv((1, 2, 0, 16)), {"causal": False}, "empty sequence"),
    ],
    ids=["D48", "D8", "float64", "rank3", "empty"],
)
def test_bad_inputs_raise_value_error(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        flash_attention(*args, **kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU path")
def test_cpu_without_interpreter_raises_one_line_user_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(UnavailableError, match="TRITON_INTERPRET=1") as info:
        flash_attention(*_qkv((1, 1, 4, 16)))
    assert isinstance(info.value, user_errors()) and isinstance(info.value, RuntimeError)  # the CLI prints one line
    assert "attn=online" in str(info.value) and "\n" not in str(info.value)


def test_unsupported_head_dim_is_a_user_error():
    with pytest.raises(UnsupportedError, match="n_embd / n_head") as info:
        flash_attention(*_qkv((1, 2, 8, 48)))
    assert isinstance(info.value, user_errors()) and isinstance(info.value, ValueError)


def test_importing_kernels_and_flash_does_not_import_triton():
    code = "import sys, kernels, kernels.flash; print('triton' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_attn_config_builds_flash_attention():
    import hydra
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(os.path.join(os.path.dirname(__file__), "..", "configs", "attn", "flash.yaml"))
    fn = hydra.utils.instantiate(cfg)
    assert fn.func is flash_attention


def test_two_training_steps_match_naive_attention():
    from models.gpt import GPT, GPTConfig

    config = GPTConfig(vocab_size=65, block_size=32, n_layer=1, n_head=2, n_embd=32)  # D=16
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 65, (2, 3, 32), generator=g).to(DEVICE)
    targets = torch.randint(0, 65, (2, 3, 32), generator=g).to(DEVICE)

    def run(attn_fn):
        torch.manual_seed(0)
        model = GPT(config, attn_fn).to(DEVICE)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        before = [p.detach().clone() for p in model.parameters()]
        losses = []
        for step in range(2):
            _, loss = model(idx[step], targets[step])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        moved = max((p - b).abs().max().item() for p, b in zip(model.parameters(), before))
        return losses, moved, [p.detach().clone() for p in model.parameters()]

    flash_losses, moved, flash_params = run(flash_attention)
    naive_losses, _, naive_params = run(naive_attention)
    assert moved > 1e-3  # the steps changed the weights, so equal weights below mean equal updates
    assert flash_losses == pytest.approx(naive_losses, abs=1e-4)
    for a, b in zip(flash_params, naive_params):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------- torch.compile


def test_custom_op_passes_torch_library_opcheck():
    # schema, fake (meta) implementation vs real outputs, autograd registration
    from kernels.flash_ops import flash_attn_fwd

    q, k, v, _ = _inputs((1, 2, 16, 16), (1, 2, 24, 16), torch.float32)
    torch.library.opcheck(flash_attn_fwd, (q, k, v, True, 0.25))


def test_eager_path_equals_the_registered_op_bitwise():
    # eager calls skip the custom op's dispatch (host overhead) but must run the same kernels:
    # same output and gradients, bit for bit, with grad, and without grad
    from kernels.flash_ops import flash_attn_fwd

    q, k, v, do = _inputs((2, 2, 50, 32), (2, 2, 70, 32), torch.float32)
    results = []
    for use_op in (False, True):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = flash_attn_fwd(*leaves, True, 0.2)[0] if use_op else flash_attention(*leaves, causal=True, scale=0.2)
        out.backward(do)
        results.append([out.detach()] + [t.grad for t in leaves])
        if not use_op:
            assert type(out.grad_fn).__name__ == "_FlashFunctionBackward"
    for eager, op in zip(*results):
        assert torch.equal(eager, op)
    with torch.no_grad():
        assert torch.equal(flash_attention(q, k, v, causal=True, scale=0.2), results[0][0])


def test_double_backward_raises_instead_of_a_silent_zero():
    # the kernels give first derivatives only; a gradient penalty through flash must fail loudly
    q, k, v, _ = _inputs((1, 2, 20, 16), (1, 2, 20, 16), torch.float32)
    q.requires_grad_()
    (g,) = torch.autograd.grad(flash_attention(q, k, v).square().sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        g.sum().backward()


def test_fake_tensors_trace_without_running_the_kernel():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q = torch.empty(2, 3, 5, 32, device=DEVICE)
        k = v = torch.empty(2, 3, 9, 32, device=DEVICE)
        out = flash_attention(q, k, v, causal=True)
    assert out.shape == (2, 3, 5, 32) and out.dtype == torch.float32


def test_compiled_fullgraph_matches_eager():
    # fullgraph=True fails on any graph break; aot_eager traces forward and backward through the
    # custom ops' fake implementations, then runs the real kernels
    q, k, v, do = _inputs((1, 2, 40, 16), (1, 2, 40, 16), torch.float32)

    def step(q, k, v):
        return (flash_attention(q, k, v, causal=True) * do).sum()

    grads = []
    for fn in (step, torch.compile(step, fullgraph=True, backend="aot_eager")):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        loss = fn(*leaves)
        loss.backward()
        grads.append([loss.detach()] + [t.grad for t in leaves])
    for eager, compiled in zip(*grads):
        torch.testing.assert_close(compiled, eager, atol=0, rtol=0)

"""Causal attention with Tq != Tk: the mask is aligned to the end of the keys (KV-cache decoding).

Every implementation in ``kernels.ATTENTION`` is checked against the float64 reference, except
flash, which tests/test_flash.py checks against the same reference under Triton's (slow) interpreter.
"""
import pytest
import torch
from reference import attention_f64

from kernels import ATTENTION

IMPLS = [name for name in ATTENTION if name != "flash"]


@pytest.mark.parametrize("name", IMPLS)
@pytest.mark.parametrize("tq,tk", [(1, 1), (1, 9), (3, 9), (9, 9), (11, 9), (4, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_end_aligned_causal_matches_float64_reference(name, tq, tk, dtype):
    fn = ATTENTION[name]
    g = torch.Generator().manual_seed(tq * 100 + tk)
    q = torch.randn(2, 3, tq, 16, generator=g, dtype=dtype, requires_grad=True)
    k, v = (torch.randn(2, 3, tk, 16, generator=g, dtype=dtype, requires_grad=True) for _ in range(2))
    do = torch.randn(2, 3, tq, 16, generator=g, dtype=dtype)
    out = fn(q, k, v, causal=True)
    grads = torch.autograd.grad(out, (q, k, v), do)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = attention_f64(*leaves, causal=True)
    ref_grads = torch.autograd.grad(ref, leaves, do.double())
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    for a, b in zip([out, *grads], [ref, *ref_grads]):
        assert a.dtype == dtype
        torch.testing.assert_close(a.double(), b, rtol=0, atol=tol)
    if tq > tk:  # query rows that see no key give zeros, not NaN (as FlashAttention)
        assert torch.equal(out[:, :, : tq - tk], torch.zeros_like(out[:, :, : tq - tk]))


@pytest.mark.parametrize("name", IMPLS)
def test_decoding_one_query_equals_last_row_of_full_attention(name):
    fn = ATTENTION[name]
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 7, 8, generator=g) for _ in range(3))
    full = fn(q, k, v, causal=True)
    last = fn(q[:, :, -1:], k, v, causal=True)
    torch.testing.assert_close(last, full[:, :, -1:], rtol=0, atol=1e-6)

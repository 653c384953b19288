"""Causal attention with Tq != Tk: the mask is aligned to the end of the keys (KV-cache decoding)."""
import pytest
import torch
from reference import attention_f64

from kernels import naive_attention, sdpa_attention


@pytest.mark.parametrize("fn", [naive_attention, sdpa_attention], ids=["naive", "sdpa"])
@pytest.mark.parametrize("tq,tk", [(1, 1), (1, 9), (3, 9), (9, 9), (11, 9)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_end_aligned_causal_matches_float64_reference(fn, tq, tk, dtype):
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
        torch.testing.assert_close(a.double(), b, rtol=0, atol=tol)
    if tq > tk:  # query rows that see no key give zeros, not NaN (as FlashAttention)
        assert torch.equal(out[:, :, : tq - tk], torch.zeros_like(out[:, :, : tq - tk]))


def test_decoding_one_query_equals_last_row_of_full_attention():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 7, 8, generator=g) for _ in range(3))
    for fn in (naive_attention, sdpa_attention):
        full = fn(q, k, v, causal=True)
        last = fn(q[:, :, -1:], k, v, causal=True)
        torch.testing.assert_close(last, full[:, :, -1:], rtol=0, atol=1e-6)

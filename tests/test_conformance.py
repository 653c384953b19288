"""Every component in configs/attn/ and configs/optim/, discovered from its YAML, passes the same checks.

A new ``configs/attn/<name>.yaml`` or ``configs/optim/<name>.yaml`` is tested here without editing
a list. Attention: the interface ``fn(q, k, v, causal=True, scale=None, window=None)`` on
(B, H, T, D) tensors, against the float64 reference (outputs and gradients), with the causal mask
and the sliding window aligned to the end of the keys (Tq != Tk: KV-cache decoding); an input an implementation does not support must be refused
with ``kernels.UnsupportedError`` naming it, never answered wrongly. Optimizers: built the way the
trainer builds them (the YAML with its param_groups policy), they are ``torch.optim.Optimizer``s
that minimize a convex problem, refuse a negative lr, and resume bitwise from a state dict.
"""
import copy

import pytest
import torch
from conftest import CONFIGS
from omegaconf import OmegaConf
from reference import attention_f64

from kernels import UnsupportedError
from trainer.config import build, components, load_component

ATTN = components("attn")
OPTIM = components("optim")


def attention(name):
    return build(load_component("attn", name))


def test_components_are_read_from_the_config_groups():
    assert set(ATTN) >= {"naive", "online", "sdpa", "flash"} and ATTN == sorted(p.stem for p in (CONFIGS / "attn").glob("*.yaml"))
    assert set(OPTIM) >= {"sgd", "adam", "adamw", "lion", "muon", "adafactor"}


def run_or_refused(fn, *args, **kwargs):
    """The output, or None when the implementation refuses the input with a clear error."""
    try:
        return fn(*args, **kwargs)
    except UnsupportedError as e:
        assert str(e) and "\n" not in str(e)
        return None


@pytest.mark.parametrize("name", ATTN)
@pytest.mark.parametrize("tq,tk", [(1, 1), (1, 9), (3, 9), (9, 9), (11, 9), (4, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_end_aligned_causal_matches_float64_reference(name, tq, tk, dtype):
    fn = attention(name)
    g = torch.Generator().manual_seed(tq * 100 + tk)
    q = torch.randn(2, 3, tq, 16, generator=g, dtype=dtype, requires_grad=True)
    k, v = (torch.randn(2, 3, tk, 16, generator=g, dtype=dtype, requires_grad=True) for _ in range(2))
    do = torch.randn(2, 3, tq, 16, generator=g, dtype=dtype)
    out = run_or_refused(fn, q, k, v, causal=True)
    if out is None:
        assert dtype == torch.float64, f"{name} refused float32"  # every implementation runs float32
        return
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


@pytest.mark.parametrize("name", ATTN)
@pytest.mark.parametrize("causal", [True, False])
def test_scale_and_non_causal_match_the_reference(name, causal):
    fn = attention(name)
    g = torch.Generator().manual_seed(int(causal))
    q, k, v = (torch.randn(1, 2, 13, 32, generator=g) for _ in range(3))
    out = fn(q, k, v, causal=causal, scale=0.3)
    torch.testing.assert_close(out.double(), attention_f64(q, k, v, causal=causal, scale=0.3), rtol=0, atol=2e-5)


@pytest.mark.parametrize("name", ATTN)
@pytest.mark.parametrize("tq,tk", [(9, 9), (1, 9), (3, 9), (11, 9), (40, 40), (5, 40)])
@pytest.mark.parametrize("window", [1, 3, 8, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sliding_window_matches_float64_reference(name, tq, tk, window, dtype):
    """``window``: query i (at key position i + Tk - Tq) sees keys j with pos - window < j <= pos,
    end-aligned as the causal mask (Tq < Tk: a KV cache). A dtype an implementation cannot do
    (flash: float64) is refused with UnsupportedError, never a wrong answer."""
    fn = attention(name)
    g = torch.Generator().manual_seed(tq * 1000 + tk * 10 + window)
    q = torch.randn(2, 3, tq, 16, generator=g, dtype=dtype, requires_grad=True)
    k, v = (torch.randn(2, 3, tk, 16, generator=g, dtype=dtype, requires_grad=True) for _ in range(2))
    do = torch.randn(2, 3, tq, 16, generator=g, dtype=dtype)
    out = run_or_refused(fn, q, k, v, causal=True, window=window)
    if out is None:
        assert name == "flash" and dtype == torch.float64  # flash's kernels: fp32, fp16, bf16
        return
    grads = torch.autograd.grad(out, (q, k, v), do)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = attention_f64(*leaves, causal=True, window=window)
    ref_grads = torch.autograd.grad(ref, leaves, do.double())
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    for a, b in zip([out, *grads], [ref, *ref_grads]):
        assert a.dtype == dtype
        torch.testing.assert_close(a.double(), b, rtol=0, atol=tol)


@pytest.mark.parametrize("name", ATTN)
@pytest.mark.parametrize("window, causal", [(0, True), (-2, True), (2.5, True), (True, True), (4, False)])
def test_a_bad_window_is_refused_with_a_value_error(name, window, causal):
    fn = attention(name)
    q = torch.randn(1, 2, 4, 16)
    with pytest.raises(ValueError, match="window"):
        fn(q, q, q, causal=causal, window=window)


@pytest.mark.parametrize("name", ATTN)
def test_decoding_one_query_equals_last_row_of_full_attention(name):
    fn = attention(name)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 7, 16, generator=g) for _ in range(3))
    full = fn(q, k, v, causal=True)
    last = fn(q[:, :, -1:], k, v, causal=True)
    torch.testing.assert_close(last, full[:, :, -1:], rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ATTN)
def test_malformed_inputs_are_refused_with_a_value_error(name):
    fn = attention(name)
    q = torch.randn(1, 2, 4, 16)
    with pytest.raises(ValueError, match="shape"):
        fn(q[0], q[0], q[0])  # 3-D
    with pytest.raises(ValueError, match="dtype"):
        fn(q, q.double(), q)


# ---------------------------------------------------------------------------------------------
# optimizers


def build_optimizer(name, model, **overrides):
    """The way the trainer builds it: the YAML, its param_groups policy, then the optimizer."""
    cfg = OmegaConf.to_container(load_component("optim", name, **overrides))
    policy = cfg.pop("param_groups", None) or {"_target_": "trainer.optim.param_groups", "_partial_": True}
    groups = build(OmegaConf.create(policy), model, float(cfg.get("weight_decay") or 0.0))
    return build(OmegaConf.create(cfg), groups)


class Quadratic(torch.nn.Module):
    """A convex problem with matrix, vector and embedding parameters (Muon needs 2-D hidden weights)."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.emb = torch.nn.Embedding(8, 8)
        self.lin = torch.nn.Linear(8, 8)
        self.target = torch.randn(8, 8, generator=g)

    def forward(self):
        return ((self.lin(self.emb.weight) - self.target) ** 2).mean()


def steps(model, opt, n):
    losses = []
    for _ in range(n):
        loss = model()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("name", OPTIM)
def test_optimizer_minimizes_a_convex_problem(name):
    torch.manual_seed(0)
    model = Quadratic()
    opt = build_optimizer(name, model)
    assert isinstance(opt, torch.optim.Optimizer)
    losses = steps(model, opt, 100)  # at the config's own lr: Lion's is small, so allow a slow descent
    assert losses[-1] < 0.9 * losses[0] and losses[-1] < min(losses[:10]), losses[::10]


@pytest.mark.parametrize("name", OPTIM)
def test_optimizer_refuses_a_negative_lr(name):
    with pytest.raises(ValueError, match="lr"):
        build_optimizer(name, Quadratic(), lr=-1.0)


@pytest.mark.parametrize("name", OPTIM)
def test_optimizer_resumes_bitwise_from_its_state_dict(name):
    torch.manual_seed(0)
    model = Quadratic()
    opt = build_optimizer(name, model)
    steps(model, opt, 3)
    twin = copy.deepcopy(model)
    twin_opt = build_optimizer(name, twin)
    twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert steps(model, opt, 3) == steps(twin, twin_opt, 3)
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)

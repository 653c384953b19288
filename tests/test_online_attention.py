"""online_attention against float64 attention math: outputs, lse, gradients, memory, training."""
from pathlib import Path

import hydra
import pytest
import torch
from omegaconf import OmegaConf
from reference import attention_f64

from kernels import naive_attention, online_attention
from models.gpt import GPT, GPTConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "attn"
# Extra error allowed on top of 2x naive attention's error in the same dtype.
SLACK = {torch.float16: 1e-4, torch.bfloat16: 1e-3}


def make_qkv(B, H, tq, D, dtype=torch.float32, tk=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    tk = tq if tk is None else tk
    shapes = [(B, H, tq, D), (B, H, tk, D), (B, H, tk, D)]
    return [torch.randn(s, generator=g).to(dtype).requires_grad_() for s in shapes]


def out_and_grads(fn, q, k, v, do, **kw):
    out = fn(q, k, v, **kw)
    grads = torch.autograd.grad(out, (q, k, v), do.to(out.dtype))
    return [out, *grads]


# (B, H, Tq, Tk, D, causal, block_size, scale): representative, not cartesian.
CASES = [
    pytest.param(2, 3, 1, 1, 16, True, 64, None, id="T=1-causal"),
    pytest.param(2, 2, 1, 1, 32, False, 64, None, id="T=1-full"),
    pytest.param(1, 2, 100, 100, 32, True, 32, None, id="T%block!=0-causal"),
    pytest.param(2, 2, 50, 50, 64, False, 128, None, id="T<block-full"),
    pytest.param(2, 4, 129, 129, 64, True, 64, 0.3, id="scale-causal"),
    pytest.param(1, 2, 70, 70, 128, True, 32, None, id="D=128-causal"),
    pytest.param(2, 2, 96, 96, 16, False, 32, 2.0, id="scale-full"),
    pytest.param(2, 2, 40, 75, 32, False, 16, None, id="cross-Tq<Tk"),
    pytest.param(2, 2, 75, 40, 32, False, 16, None, id="cross-Tq>Tk"),
    # causal with a KV cache: the diagonal shifts by Tk - Tq, across tile boundaries
    pytest.param(2, 2, 1, 100, 16, True, 16, None, id="causal-decode-1-of-100"),
    pytest.param(1, 3, 37, 100, 32, True, 16, 0.3, id="causal-Tq<Tk"),
    pytest.param(1, 2, 70, 200, 64, True, 32, None, id="causal-Tq<Tk-diag-mid-tile"),
    # Tq > Tk: the first Tq - Tk query rows see no key (zeros, lse = -inf)
    pytest.param(2, 2, 40, 23, 16, True, 8, None, id="causal-Tq>Tk"),
    pytest.param(1, 2, 100, 1, 16, True, 32, None, id="causal-Tk=1"),
]


@pytest.mark.parametrize("B,H,tq,tk,D,causal,block,scale", CASES)
def test_fp32_matches_float64(B, H, tq, tk, D, causal, block, scale):
    q, k, v = make_qkv(B, H, tq, D, tk=tk)
    do = torch.randn(B, H, tq, D)
    got = out_and_grads(online_attention, q, k, v, do, causal=causal, scale=scale, block_size=block)
    ref = out_and_grads(attention_f64, q, k, v, do, causal=causal, scale=scale)
    for name, g, r in zip(("out", "dq", "dk", "dv"), got, ref):
        assert g.dtype == torch.float32, name
        torch.testing.assert_close(g.double(), r.double(), atol=2e-5, rtol=1e-5, msg=name)


LOW_PRECISION_CASES = [
    pytest.param(2, 2, 100, 32, True, 32, None, id="causal-partial"),
    pytest.param(1, 3, 64, 64, False, 128, 0.2, id="full-scale"),
    pytest.param(2, 2, 130, 128, True, 64, None, id="causal-D128"),
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B,H,T,D,causal,block,scale", LOW_PRECISION_CASES)
def test_low_precision_error_at_most_twice_naive(dtype, B, H, T, D, causal, block, scale):
    # flash-attention tests' rule: judged against float64, the kernel may be at most ~2x as wrong
    # as plain PyTorch attention run in the same dtype.
    q, k, v = make_qkv(B, H, T, D, dtype=dtype, seed=1)
    do = torch.randn(B, H, T, D).to(dtype)
    got = out_and_grads(online_attention, q, k, v, do, causal=causal, scale=scale, block_size=block)
    low = out_and_grads(naive_attention, q, k, v, do, causal=causal, scale=scale)
    ref = out_and_grads(attention_f64, q, k, v, do, causal=causal, scale=scale)
    for name, g, n, r in zip(("out", "dq", "dk", "dv"), got, low, ref):
        assert g.dtype == dtype, name
        err = (g.double() - r).abs().max().item()
        err_naive = (n.double() - r).abs().max().item()
        assert err <= 2 * err_naive + SLACK[dtype], (name, err, err_naive)


def test_autocast_does_not_lower_internal_precision():
    # The trainer runs the model under bf16 autocast; the inputs arrive in bf16 and the kernel must
    # still accumulate in fp32, i.e. give the same result as without autocast.
    q, k, v = make_qkv(1, 2, 80, 32, dtype=torch.bfloat16, seed=4)
    do = torch.randn(1, 2, 80, 32).to(torch.bfloat16)
    plain = out_and_grads(online_attention, q, k, v, do, block_size=32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = out_and_grads(online_attention, q, k, v, do, block_size=32)
    for a, b in zip(auto, plain):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.parametrize("causal", [True, False])
def test_non_contiguous_views_like_the_model(causal):
    # GPT splits one (B, T, 3C) projection and transposes to (B, H, T, D): strided views.
    B, T, H, D = 2, 45, 4, 16
    qkv = torch.randn(B, T, 3 * H * D, requires_grad=True)
    q, k, v = (t.view(B, T, H, D).transpose(1, 2) for t in qkv.split(H * D, dim=2))
    assert not q.is_contiguous()
    do = torch.randn(B, H, T, D)
    (g_online,) = torch.autograd.grad(online_attention(q, k, v, causal=causal, block_size=16), qkv, do)
    (g_ref,) = torch.autograd.grad(attention_f64(q, k, v, causal=causal), qkv, do.double())
    torch.testing.assert_close(g_online.double(), g_ref.double(), atol=2e-5, rtol=1e-5)


def test_transposed_head_dim_view():
    # column-major (B, H, T, D) leaves: stride 1 along T, as after a transpose of (B, H, D, T)
    base = [t.detach().transpose(-2, -1).contiguous() for t in make_qkv(1, 2, 33, 16)]
    q, k, v = (t.transpose(-2, -1).requires_grad_() for t in base)
    assert not q.is_contiguous()
    do = torch.randn(1, 2, 33, 16)
    got = out_and_grads(online_attention, q, k, v, do, block_size=8)
    ref = out_and_grads(attention_f64, q, k, v, do)
    for g, r in zip(got, ref):
        torch.testing.assert_close(g.double(), r.double(), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("causal,tq,tk", [(True, 37, 37), (False, 37, 37), (True, 13, 37), (False, 29, 13)])
def test_lse_matches_and_is_differentiable(causal, tq, tk):
    q, k, v = make_qkv(2, 2, tq, 16, tk=tk, seed=2)
    out, lse = online_attention(q, k, v, causal=causal, block_size=8, return_lse=True)
    ref_out, ref_lse = attention_f64(q, k, v, causal=causal, return_lse=True)
    assert lse.shape == (2, 2, tq) and lse.dtype == torch.float32
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-5, rtol=1e-6)
    dlse = torch.randn(2, 2, tq)
    got = torch.autograd.grad((out.sum() + (lse * dlse).sum()), (q, k, v))
    want = torch.autograd.grad((ref_out.sum() + (ref_lse * dlse.double()).sum()), (q, k, v))
    for g, r in zip(got, want):
        torch.testing.assert_close(g.double(), r.double(), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("block", [4, 8, 64])
def test_rows_that_see_no_key_give_zeros_and_neg_inf_lse(block):
    # causal with Tq > Tk: query i sees keys j <= i - 6, so rows 0..5 see none (FlashAttention's
    # convention: output 0, lse -inf, and no gradient flows through them)
    q, k, v = make_qkv(1, 2, 20, 16, tk=14, seed=5)
    out, lse = online_attention(q, k, v, causal=True, block_size=block, return_lse=True)
    assert torch.equal(out[:, :, :6], torch.zeros_like(out[:, :, :6]))
    assert torch.equal(lse[:, :, :6], torch.full_like(lse[:, :, :6], float("-inf")))
    assert torch.isfinite(lse[:, :, 6:]).all()
    ref_out, ref_lse = attention_f64(q, k, v, causal=True, return_lse=True)
    torch.testing.assert_close(out.double(), ref_out, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(lse[:, :, 6:].double(), ref_lse[:, :, 6:], atol=1e-5, rtol=1e-6)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    assert torch.equal(dq[:, :, :6], torch.zeros_like(dq[:, :, :6]))
    assert all(torch.isfinite(g).all() for g in (dq, dk, dv))


def test_decoding_step_by_step_equals_full_causal_attention():
    # a KV cache: each new query attends to every key so far; stacking the steps gives causal attention
    q, k, v = make_qkv(1, 2, 45, 16, seed=6)
    full = online_attention(q, k, v, causal=True, block_size=16)
    steps = [online_attention(q[:, :, t : t + 1], k[:, :, : t + 1], v[:, :, : t + 1], block_size=16) for t in range(45)]
    torch.testing.assert_close(torch.cat(steps, dim=2), full, atol=1e-6, rtol=1e-6)
    # and a chunk of 10 queries after a 35-token cache
    chunk = online_attention(q[:, :, 35:], k, v, causal=True, block_size=16)
    torch.testing.assert_close(chunk, full[:, :, 35:], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("tq,tk", [(11, 11), (5, 11), (11, 7)])
def test_gradcheck_float64(tq, tk):
    q, k, v = make_qkv(1, 2, tq, 4, dtype=torch.float64, tk=tk, seed=3)
    fn = lambda q, k, v: online_attention(q, k, v, causal=True, block_size=4)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v))
    if tq <= tk:  # lse is finite on every row: check its gradient too
        fn_lse = lambda q, k, v: online_attention(q, k, v, causal=True, block_size=4, return_lse=True)  # noqa: E731
        assert torch.autograd.gradcheck(fn_lse, (q, k, v))


def saved_bytes(fn, T: int) -> int:
    """Bytes of the unique storages autograd keeps for backward of fn on (1, 4, T, 64) inputs."""
    q, k, v = make_qkv(1, 4, T, 64)
    storages = {}

    def pack(t):
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(q, k, v, causal=True)
    return sum(storages.values())


def test_saved_memory_linear_for_online_quadratic_for_naive():
    online = [saved_bytes(online_attention, t) for t in (256, 512, 1024)]
    naive = [saved_bytes(naive_attention, t) for t in (256, 512, 1024)]
    # Exactly q, k, v, out (fp32, 4 * T * D each) and lse (fp32, T per head): nothing T x T.
    assert online[-1] == 4 * (4 * 1024 * 64 * 4) + 4 * 1024 * 4
    for small, big in zip(online, online[1:]):
        assert 1.9 < big / small < 2.1
    # naive also saves q, k, v (linear), so its ratio approaches 4 from below as T grows
    assert naive[2] / naive[1] > 3.3 and naive[2] / naive[1] > naive[1] / naive[0] > 2.5
    assert online[-1] < naive[-1] / 4


def test_bad_input_raises_value_error():
    q, k, v = make_qkv(1, 2, 8, 16)
    with pytest.raises(ValueError, match="online_attention"):
        online_attention(q[0], k[0], v[0])  # wrong rank
    with pytest.raises(ValueError, match="online_attention"):
        online_attention(q, k[..., :8], v)  # mismatched shapes
    with pytest.raises(ValueError, match="block_size"):
        online_attention(q, k, v, block_size=0)
    # the message lists every accepted dtype, float64 included (gradcheck runs in float64)
    with pytest.raises(ValueError, match="use float32, float16, bfloat16 or float64"):
        online_attention(*(t.detach().long() for t in (q, k, v)))


def test_hydra_config_builds_online_attention():
    cfg = OmegaConf.load(CONFIGS / "online.yaml")
    attn_fn = hydra.utils.instantiate(cfg)
    q, k, v = make_qkv(1, 2, 20, 16)
    torch.testing.assert_close(attn_fn(q, k, v, causal=True), online_attention(q, k, v, block_size=cfg.block_size))
    for name, fn in (("naive", naive_attention), ("online", online_attention)):
        assert hydra.utils.get_method(OmegaConf.load(CONFIGS / f"{name}.yaml")._target_) is fn


def train_losses(attn_fn, steps: int = 20) -> list[float]:
    torch.manual_seed(1234)
    model = GPT(GPTConfig(vocab_size=65, block_size=64, n_layer=2, n_head=4, n_embd=64), attn_fn)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    data = torch.Generator().manual_seed(99)
    losses = []
    for _ in range(steps):
        # arithmetic progressions mod 65: learnable only by reading the context, i.e. via attention
        start = torch.randint(0, 65, (4, 1), generator=data)
        step = torch.randint(1, 4, (4, 1), generator=data)
        idx = (start + step * torch.arange(65)) % 65
        _, loss = model(idx[:, :-1], idx[:, 1:].contiguous())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_tiny_gpt_trains_identically_with_online_and_naive():
    # one thread: on a loaded 2-core machine, spinning OpenMP workers made these many tiny ops
    # 20x slower (61 s against 3 s, measured); the comparison itself does not depend on it
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        online = train_losses(lambda q, k, v, causal=True: online_attention(q, k, v, causal=causal, block_size=32))
        naive = train_losses(naive_attention)
    finally:
        torch.set_num_threads(threads)
    assert online[-1] < online[0] - 0.1  # it actually learned something, so the comparison means something
    for step, (a, b) in enumerate(zip(online, naive)):
        assert abs(a - b) <= 1e-4, (step, a, b)


@pytest.mark.parametrize("T", [256, 1024])
def test_window_visits_tiles_in_proportion_to_the_window_not_to_t(T):
    """With a sliding window, each query block visits only the key blocks that overlap some row's
    window (at most window / block + 2 of them), so the work is O(T * window), not O(T^2)."""
    from kernels.online import _key_blocks, _query_blocks

    block, window = 32, 48
    per_qblock = [len(list(_key_blocks(qs, qe, T, T, True, block, window)))
                  for qs, qe in _query_blocks(T, T, True, block)]
    assert max(per_qblock) <= window // block + 2
    full = sum(len(list(_key_blocks(qs, qe, T, T, True, block))) for qs, qe in _query_blocks(T, T, True, block))
    assert sum(per_qblock) <= (T // block) * (window // block + 2) < full
    # and the kept tiles give the exact windowed attention, with gradients, across tile edges
    g = torch.Generator().manual_seed(T)
    q, k, v = (torch.randn(1, 2, T, 16, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    out = online_attention(q, k, v, causal=True, window=window, block_size=block)
    ref = attention_f64(q, k, v, causal=True, window=window)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    do = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), do), torch.autograd.grad(ref, (q, k, v), do)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_window_gradcheck_float64():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 1, 7, 4, generator=g, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(1, 1, 9, 4, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    assert torch.autograd.gradcheck(lambda q, k, v: online_attention(q, k, v, window=3, block_size=2), (q, k, v))

"""KV-cached generation: the same tokens as uncached decoding, past the context window too."""
import pytest
import torch

from kernels import ATTENTION
from models import GPT, GPTConfig

SMALL = dict(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=32)  # head dim 16: flash can run it


def make(attn="naive", **kw):
    torch.manual_seed(0)
    return GPT(GPTConfig(**{**SMALL, **kw}), ATTENTION[attn]).eval()


def reference_greedy(model, idx, n, stride=1):
    """Greedy decoding written out: full forward over the window, argmax, repeat. The window is the
    whole sequence until it holds block_size tokens, then moves ``stride`` tokens at a time
    (stride 1: the last block_size tokens), worked out by counting, independently of
    GPT.generate's closed form."""
    block = model.config.block_size
    start = 0
    for _ in range(n):
        while idx.shape[1] - start > block:
            start += stride
        logits, _ = model(idx[:, start:])
        idx = torch.cat((idx, logits[:, -1].argmax(-1, keepdim=True)), dim=1)
    return idx


def skip_if_no_short_queries(attn):
    """online and flash gain Tq < Tk support from their owners; until then they say so."""
    q = torch.zeros(1, 1, 1, 16)
    k = torch.zeros(1, 1, 3, 16)
    try:
        ATTENTION[attn](q, k, k, causal=True)
    except ValueError as e:
        if "not supported yet" in str(e):
            pytest.skip(f"{attn}: causal Tq < Tk not implemented yet")
        raise


@pytest.mark.parametrize("attn", [name for name in ATTENTION if name != "flash"])
def test_greedy_with_cache_equals_without_token_for_token(attn):
    skip_if_no_short_queries(attn)
    model = make(attn)
    idx = torch.randint(0, 50, (2, 5))
    n = 40  # 45 tokens: past the 16-token window, so the window slides (and the cache is rebuilt)
    cached = model.generate(idx, n, temperature=0)
    uncached = model.generate(idx, n, temperature=0, use_cache=False)
    assert cached.shape == (2, 45)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached, reference_greedy(model, idx, n))


def test_flash_greedy_with_cache_under_the_interpreter():
    skip_if_no_short_queries("flash")
    model = make("flash", block_size=8)
    idx = torch.randint(0, 50, (1, 3))
    assert torch.equal(model.generate(idx, 7, temperature=0), reference_greedy(model, idx, 7))
    # past the window, moving 4 tokens at a time (the cache refilled at lengths 9 and 13)
    assert torch.equal(model.generate(idx, 12, temperature=0, window_stride=4),
                       reference_greedy(model, idx, 12, 4))


def test_prompt_longer_than_the_context_is_cropped():
    model = make()
    idx = torch.randint(0, 50, (1, 30))  # block_size 16
    out = model.generate(idx, 5, temperature=0)
    assert torch.equal(out[:, :30], idx)
    assert torch.equal(out, reference_greedy(model, idx, 5))


def test_cached_forward_matches_full_forward_logits():
    """Prefill 5 tokens, then 1, then a chunk of 3, then 1: every position's logits equal the
    full-sequence forward's (the end-aligned causal mask with Tq < Tk at work)."""
    model = make()
    idx = torch.randint(0, 50, (3, 10))
    full, _ = model(idx)
    cache = []  # each layer's (k, v), (B, H, T_cached, D)
    pieces = []
    for start, end in ((0, 5), (5, 6), (6, 9), (9, 10)):
        logits, _ = model(idx[:, start:end], cache=cache)
        pieces.append(logits)
        assert len(cache) == model.config.n_layer
        assert all(k.shape == v.shape == (3, 2, end, 16) for k, v in cache)
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-5, atol=1e-5)


def test_cache_overflowing_the_context_is_refused():
    model = make()
    cache = []
    model(torch.zeros(1, 16, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="block_size=16"):
        model(torch.zeros(1, 1, dtype=torch.long), cache=cache)


def test_sampling_with_cache_draws_the_same_tokens():
    model = make()
    idx = torch.randint(0, 50, (2, 3))
    a = model.generate(idx, 30, temperature=0.9, top_k=10, generator=torch.Generator().manual_seed(3))
    b = model.generate(idx, 30, temperature=0.9, top_k=10, generator=torch.Generator().manual_seed(3),
                       use_cache=False)
    assert torch.equal(a, b)


def test_cached_generation_under_bf16_autocast():
    model = make()
    idx = torch.randint(0, 50, (1, 4))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.generate(idx, 20, temperature=0)
    assert out.shape == (1, 24) and out.dtype == torch.long


@pytest.mark.parametrize("temperature", [float("nan"), -0.5, float("inf")])
def test_bad_temperature_is_refused(temperature):
    with pytest.raises(ValueError, match="temperature"):
        make().generate(torch.zeros(1, 1, dtype=torch.long), 3, temperature=temperature)


def spy_on_forward(model, monkeypatch):
    """The (tokens, last position's logits) of every forward call, recorded as generate makes them."""
    calls = []
    real = model.forward

    def forward(idx, targets=None, cache=None, last_only=False):
        logits, loss = real(idx, targets, cache, last_only)
        calls.append((idx.shape[1], logits[:, -1]))
        return logits, loss

    monkeypatch.setattr(model, "forward", forward)
    return calls


def test_window_start_closed_form(monkeypatch):
    # block 16: the window covers the whole sequence up to 16 tokens, then moves; read off the
    # windows uncached generation runs through the model, from a 1-token prompt to 99 tokens
    model = make()
    calls = spy_on_forward(model, monkeypatch)
    starts = {}
    for stride in (1, 3, 8, 16):
        calls.clear()
        model.generate(torch.zeros(1, 1, dtype=torch.long), 99, temperature=0, use_cache=False, window_stride=stride)
        starts[stride] = {n: n - t for n, (t, _) in enumerate(calls, start=1)}  # n tokens so far: window of t
    assert [starts[1][n] for n in (1, 16, 17, 40)] == [0, 0, 1, 24]
    assert [starts[8][n] for n in (16, 17, 24, 25, 32, 33)] == [0, 8, 8, 16, 16, 24]
    assert [starts[16][n] for n in (16, 17, 32, 33)] == [0, 16, 16, 32]
    for n in range(1, 100):  # every window holds between block - stride + 1 and block tokens
        for stride in (1, 3, 8, 16):
            s = starts[stride][n]
            assert n - s <= 16 and (n <= 16 or n - s > 16 - stride) and s % stride == 0


@pytest.mark.parametrize("attn", [name for name in ATTENTION if name != "flash"])
@pytest.mark.parametrize("stride", [1, 5, 8, 16])
def test_window_stride_with_cache_equals_without_and_the_written_out_rule(attn, stride):
    skip_if_no_short_queries(attn)
    model = make(attn)
    idx = torch.randint(0, 50, (2, 3))
    n = 50  # 53 tokens, block 16: the window moves several times, by a stride that divides 16 or not
    cached = model.generate(idx, n, temperature=0, window_stride=stride)
    uncached = model.generate(idx, n, temperature=0, use_cache=False, window_stride=stride)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached, reference_greedy(model, idx, n, stride))


def test_window_stride_rebuilds_the_cache_only_when_the_window_moves(monkeypatch):
    # count the tokens that run through the model: stride 8 with block 16 from a 1-token prompt,
    # 40 new tokens (41 in all): steps 1..15 one token each after a 1-token prefill, then at
    # lengths 17, 25, 33 the window moves and 9 tokens (the window) are refilled, else 1 token
    model = make()
    calls = spy_on_forward(model, monkeypatch)
    model.generate(torch.zeros(1, 1, dtype=torch.long), 40, temperature=0, window_stride=8)
    seen = [t for t, _ in calls]
    assert len(seen) == 40
    assert [i for i, t in enumerate(seen) if t > 1] == [16, 24, 32]  # the steps at lengths 17, 25, 33
    assert all(seen[i] == 9 for i in (16, 24, 32))  # 17 - 8 = 25 - 16 = 33 - 24 = 9 tokens
    assert sum(seen) == 40 - 3 + 27


@pytest.mark.parametrize("stride", [0, -1, 17, 2.0, True])
def test_bad_window_stride_is_refused(stride):
    with pytest.raises(ValueError, match="window_stride must be an integer from 1 to block_size=16"):
        make().generate(torch.zeros(1, 1, dtype=torch.long), 3, temperature=0, window_stride=stride)

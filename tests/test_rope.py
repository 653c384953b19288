"""Rotary position embeddings (model.pos=rope): the rotation against a float64 closed form, the
relative-position property, the model with every attention, cached decoding past the context, and
training runs that resume exactly and refuse a mismatched checkpoint."""
import math

import pytest
import torch

import test_generate
from kernels import ATTENTION
from models import GPTConfig
from models.gpt import apply_rope, rope_angles

SMALL = {**test_generate.SMALL, "pos": "rope"}  # head dim 16


def make(attn="naive", **kw):
    return test_generate.make(attn, **{"pos": "rope", **kw})


def rotate_reference(x: torch.Tensor, positions, base: float) -> torch.Tensor:
    """The rotation written out in float64, one pair (i, i + D/2) and one position at a time."""
    x = x.double()
    out = torch.empty_like(x)
    D = x.shape[-1]
    for t, p in enumerate(positions):
        for i in range(D // 2):
            theta = p * base ** (-2 * i / D)
            a, b = x[..., t, i], x[..., t, i + D // 2]
            out[..., t, i] = a * math.cos(theta) - b * math.sin(theta)
            out[..., t, i + D // 2] = a * math.sin(theta) + b * math.cos(theta)
    return out


@pytest.mark.parametrize("D, base", [(8, 10000.0), (16, 500.0), (64, 10000.0)])
def test_rotation_matches_the_float64_closed_form(D, base):
    torch.manual_seed(1)
    x = torch.randn(2, 3, 5, D)
    positions = [0, 1, 7, 300, 4099]
    cos, sin = rope_angles(torch.tensor(positions), D, base)
    got = apply_rope(x, cos, sin)
    torch.testing.assert_close(got.double(), rotate_reference(x, positions, base), rtol=0, atol=2e-6)
    # a rotation keeps every pair's length
    torch.testing.assert_close(got.norm(dim=-1), x.norm(dim=-1), rtol=1e-5, atol=0)


def test_scores_depend_only_on_the_offset():
    torch.manual_seed(2)
    q, k = torch.randn(1, 2, 6, 32), torch.randn(1, 2, 6, 32)

    def scores(first):
        cos, sin = rope_angles(torch.arange(first, first + 6), 32)
        return apply_rope(q, cos, sin) @ apply_rope(k, cos, sin).transpose(-1, -2)

    base = scores(0)
    for first in (1, 57, 10_000):  # far past any block_size: the float64 angles keep this exact
        torch.testing.assert_close(scores(first), base, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(base, q @ k.transpose(-1, -2), atol=1e-3)  # it does rotate


def test_rope_model_has_no_position_table_and_trains():
    model = make()
    names = {n for n, _ in model.named_parameters()}
    assert not any("wpe" in n for n in names)
    learned = make(pos="learned")
    assert learned.num_params() == model.num_params()  # non-embedding counts agree
    assert learned.num_params(non_embedding=False) - model.num_params(non_embedding=False) == 16 * 32
    model.train()
    x, y = torch.randint(0, 50, (4, 16)), torch.randint(0, 50, (4, 16))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_a_permutation_of_positions_changes_the_output():
    # without any position signal a causal model still sees order through the mask; with rope the
    # same tokens at shifted absolute positions give the same logits (relative), reordered ones not
    model = make()
    idx = torch.randint(0, 50, (1, 8))
    a, _ = model(idx)
    b, _ = model(idx.flip(1))
    assert not torch.allclose(a[:, -1], b[:, -1], atol=1e-4)


@pytest.mark.parametrize("attn", [name for name in ATTENTION if name != "flash"])
def test_every_attention_gives_the_same_logits(attn):
    idx = torch.randint(0, 50, (2, 16))
    ref, _ = make("naive")(idx)
    got, _ = make(attn)(idx)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_cached_chunks_match_the_full_forward():
    model = make()
    idx = torch.randint(0, 50, (3, 12))
    full, _ = model(idx)
    cache = []
    pieces = [model(idx[:, a:b], cache=cache)[0] for a, b in ((0, 5), (5, 6), (6, 11), (11, 12))]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("attn", [name for name in ATTENTION if name != "flash"])
@pytest.mark.parametrize("stride", [1, 5, 16])
def test_cached_generation_past_the_context_equals_uncached(attn, stride):
    model = make(attn)
    idx = torch.randint(0, 50, (2, 3))
    cached = model.generate(idx, 45, temperature=0, window_stride=stride)  # 48 tokens, context 16
    uncached = model.generate(idx, 45, temperature=0, use_cache=False, window_stride=stride)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("pos", ["rope", "learned"])
def test_cached_logits_past_the_context_match_the_window_forward(pos, monkeypatch):
    """Each cached step past the context gives the logits of a full forward over its window, at
    stride 1 (rebuilt every token) and at stride 8 (rebuilt once per 8 tokens)."""
    model = make(pos=pos)
    calls = test_generate.spy_on_forward(model, monkeypatch)
    idx = torch.randint(0, 50, (1, 10))
    for stride in (1, 8):
        calls.clear()
        out = model.generate(idx, 31, temperature=0, window_stride=stride)  # steps at 10 to 40 tokens
        steps = list(calls)
        assert [t for t, _ in steps[:7]] == [10, 1, 1, 1, 1, 1, 1]  # then the cache serves one token a step
        start = 0
        for n, (_, logits) in enumerate(steps, start=10):
            while n - start > 16:  # the window, worked out by counting
                start += stride
            full, _ = model(out[:, start:n])
            torch.testing.assert_close(logits, full[:, -1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kw, match", [
    (dict(pos="alibi"), "model.pos must be 'learned'"),
    (dict(n_embd=30, n_head=2), "head dim n_embd / n_head = 15 must be even"),
    (dict(rope_base=1.0), "model.rope_base must be a number > 1"),
])
def test_bad_rope_settings_are_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        GPTConfig(**{**SMALL, **kw})


def test_training_run_with_rope_resumes_and_refuses_a_learned_config(tmp_path, tiny_overrides):
    from test_trainer import make as make_trainer

    from trainer import rundir as ckpt

    common = tiny_overrides + ["model.pos=rope", "max_iters=6", "eval_interval=3", "sample_tokens=8"]
    straight = make_trainer(tmp_path, common, "straight")
    assert straight.fit()["status"] == "completed"
    first = make_trainer(tmp_path, common, "split")
    first.stop_after = 3
    first.fit()
    second = make_trainer(tmp_path, common + ["resume=true"], "split")
    second.fit()
    assert first.losses + second.losses == straight.losses
    last = tmp_path / "split" / ckpt.LAST
    with pytest.raises(ckpt.CheckpointError, match="pos: checkpoint 'rope' vs config 'learned'"):
        make_trainer(tmp_path, tiny_overrides + ["model.pos=learned", f"resume={last}"], "other")


def test_learned_positions_keep_their_registration_order():
    """The weight init draws in registration order, so wpe must stay second (after wte): placing
    it elsewhere silently changed every learned-position run's initial weights (the default run's
    val loss moved from 1.8754 to 1.8777 before this was caught)."""
    names = [n for n, _ in make(pos="learned").named_parameters()]
    assert names[:3] == ["transformer.wte.weight", "transformer.wpe.weight", "transformer.h.0.ln_1.weight"]

"""The GPT model: shapes, causality, weight tying, initialization, generation, config errors."""
import math

import pytest
import torch

from kernels import naive_attention, online_attention, sdpa_attention
from models import GPT, GPTConfig

SMALL = dict(vocab_size=50, block_size=16, n_layer=2, n_head=4, n_embd=32)


def make(attn=naive_attention, **kw):
    torch.manual_seed(0)
    return GPT(GPTConfig(**{**SMALL, **kw}), attn).eval()


def test_shapes_and_loss_against_cross_entropy():
    model = make()
    idx, targets = torch.randint(0, 50, (2, 3, 16))
    logits, loss = model(idx, targets)
    assert logits.shape == (3, 16, 50)
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, 50).double(), targets.reshape(-1))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    # at initialization the model is close to uniform over the vocabulary
    assert abs(loss.item() - math.log(50)) < 0.3
    assert model(idx)[1] is None


@pytest.mark.parametrize("attn", [naive_attention, sdpa_attention, online_attention])
def test_future_tokens_cannot_change_past_outputs(attn):
    model = make(attn)
    idx = torch.randint(0, 50, (2, 16))
    changed = idx.clone()
    changed[:, 10:] = (changed[:, 10:] + 7) % 50
    a, _ = model(idx)
    b, _ = model(changed)
    torch.testing.assert_close(a[:, :10], b[:, :10], rtol=0, atol=1e-6)
    assert (a[:, 10:] - b[:, 10:]).abs().max() > 1e-3  # the changed positions do change


def test_implementations_agree_inside_the_model():
    idx = torch.randint(0, 50, (2, 16))
    ref, _ = make(naive_attention)(idx)
    for attn in (sdpa_attention, online_attention):
        out, _ = make(attn)(idx)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_weight_tying_and_residual_init():
    model = make(n_layer=4)
    assert model.lm_head.weight is model.transformer.wte.weight
    std = model.transformer.h[0].attn.c_proj.weight.std().item()
    assert std == pytest.approx(0.02 / math.sqrt(2 * 4), rel=0.15)
    assert model.transformer.h[0].mlp.c_fc.weight.std().item() == pytest.approx(0.02, rel=0.1)


def test_nano_parameter_count_matches_closed_form():
    cfg = GPTConfig(vocab_size=65, block_size=64, n_layer=4, n_head=4, n_embd=128)
    c, v, L = 128, 65, 4
    per_block = (2 * c) + (c * 3 * c + 3 * c) + (c * c + c) + (2 * c) + (c * 4 * c + 4 * c) + (4 * c * c + c)
    expected = v * c + L * per_block + 2 * c  # wte (tied head), blocks, ln_f; wpe excluded
    assert GPT(cfg).num_params() == expected


def test_gpt2_config_is_124m():
    cfg = GPTConfig(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768)
    with torch.device("meta"):
        model = GPT(cfg)
    assert 123e6 < model.num_params(non_embedding=False) < 125e6


def test_sequence_longer_than_context_is_rejected():
    with pytest.raises(ValueError, match="block_size=16"):
        make()(torch.zeros(1, 17, dtype=torch.long))


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(n_embd=30, n_head=4), "not divisible by model.n_head"),
        (dict(n_layer=0), "n_layer"),
        (dict(dropout=1.0), "dropout"),
        (dict(gelu="relu"), "model.gelu must be 'tanh'"),
    ],
)
def test_bad_config_raises_clear_error(kw, match):
    with pytest.raises(ValueError, match=match):
        GPTConfig(**{**SMALL, **kw})


def test_generate_greedy_is_deterministic_and_extends_past_context():
    model = make()
    idx = torch.randint(0, 50, (2, 5))
    a = model.generate(idx, 20, temperature=0)
    b = model.generate(idx, 20, temperature=0)
    assert a.shape == (2, 25) and torch.equal(a, b) and torch.equal(a[:, :5], idx)
    # greedy: each new token is the argmax of the logits given the (cropped) prefix
    logits, _ = model(a[:, :5])
    assert torch.equal(a[:, 5], logits[:, -1].argmax(-1))


def test_generate_top_k_restricts_choices():
    model = make()
    idx = torch.zeros(1, 1, dtype=torch.long)
    logits, _ = model(idx)
    top3 = set(torch.topk(logits[0, -1], 3).indices.tolist())
    gen = torch.Generator().manual_seed(0)
    firsts = {model.generate(idx, 1, temperature=5.0, top_k=3, generator=gen)[0, 1].item() for _ in range(50)}
    assert firsts <= top3 and len(firsts) > 1


def test_dropout_changes_training_outputs_only():
    model = make(dropout=0.5)
    idx = torch.randint(0, 50, (2, 16))
    torch.testing.assert_close(model(idx)[0], model(idx)[0])  # eval: deterministic
    model.train()
    assert not torch.allclose(model(idx)[0], model(idx)[0])


@pytest.mark.parametrize("gelu", ["tanh", "exact"])
def test_mlp_gelu_matches_its_closed_form_in_float64(gelu):
    """model.gelu picks GPT-2's tanh approximation or the erf form (nanoGPT's nn.GELU): the model's
    logits are those of the float64 reference (tests/reference.py, each form written out in closed
    form), and not those of the other form."""
    from reference import gpt_logits_f64

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50, block_size=8, n_layer=1, n_head=2, n_embd=16, gelu=gelu)).double().eval()
    with torch.no_grad():
        for p in model.parameters():  # large pre-activations, where the two forms differ most
            p.add_(torch.randn_like(p))
    idx = torch.randint(0, 50, (3, 5))
    logits, _ = model(idx)
    torch.testing.assert_close(logits, gpt_logits_f64(model, idx), rtol=1e-12, atol=1e-12)
    model.config.gelu = "exact" if gelu == "tanh" else "tanh"
    assert (gpt_logits_f64(model, idx) - logits).abs().max() > 1e-6


def test_nano_recipe_uses_exact_gelu_and_gpt2_keeps_tanh():
    from conftest import compose_cfg

    assert compose_cfg([]).model.gelu == "exact"
    assert compose_cfg(["model=gpt2"]).model.gelu == "tanh"
    assert GPTConfig().gelu == "tanh"  # a checkpoint saved before model.gelu existed keeps its math

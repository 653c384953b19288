"""The speedrun components of models/gpt.py, each against the float64 reference forward
(tests/reference.py ``gpt_logits_f64``, every component written out from its definition), plus
what each one promises on its own: the default model unchanged, zero-init blocks as the identity,
an untied head in its own parameter group, soft-capped logits bounded, a window's reach."""
import math

import pytest
import torch
from reference import gpt_logits_f64

from kernels import UnsupportedError, naive_attention, online_attention, sdpa_attention
from models import GPT, GPTConfig
from trainer.optim import param_groups

SMALL = dict(vocab_size=50, block_size=16, n_layer=4, n_head=4, n_embd=32)
ALL_ON = dict(pos="rope", norm="rmsnorm", bias=False, qk_norm=True, mlp="relu2", zero_init_proj=True,
              tie_embeddings=False, logit_softcap=3.0, unet_skips=True, value_embeddings=True, window=5)
COMPONENTS = [
    dict(), dict(norm="rmsnorm"), dict(bias=False), dict(qk_norm=True), dict(qk_norm=True, pos="rope"),
    dict(qk_norm=True, norm="rmsnorm"),
    dict(mlp="relu2"), dict(zero_init_proj=True), dict(tie_embeddings=False),
    dict(zero_init_proj=True, tie_embeddings=False), dict(logit_softcap=3.0), dict(unet_skips=True),
    dict(unet_skips=True, n_layer=5), dict(value_embeddings=True), dict(window=1), dict(window=5),
    dict(window=5, pos="rope"), dict(gelu="exact"), ALL_ON,
]


def make(attn=naive_attention, perturb=True, **kw):
    """A float64 model; ``perturb`` moves every weight off its init (zeros, ones) so no term of the
    forward is trivially zero or one in the comparison."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(**{**SMALL, **kw}), attn).double().eval()
    if perturb:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.3 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("attn", [naive_attention, sdpa_attention, online_attention])
@pytest.mark.parametrize("kw", COMPONENTS, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()) or "default")
def test_component_matches_the_float64_reference(kw, attn):
    model = make(attn, **kw)
    idx = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(1))
    logits, _ = model(idx)
    tol = 1e-6 if kw.get("pos") == "rope" else 1e-10  # the model's rotary table is stored in float32
    torch.testing.assert_close(logits, gpt_logits_f64(model, idx), rtol=0, atol=tol)


def test_default_config_registers_gpt2s_parameters_in_gpt2s_order():
    """Every component off: the same parameters, in the same order (the init's random draws follow
    it), as before the components existed; today's nano checkpoints load unchanged."""
    names = [n for n, _ in GPT(GPTConfig(n_layer=1)).named_parameters()]
    assert names == [
        "transformer.wte.weight", "transformer.wpe.weight", "transformer.h.0.ln_1.weight", "transformer.h.0.ln_1.bias",
        "transformer.h.0.attn.c_attn.weight", "transformer.h.0.attn.c_attn.bias", "transformer.h.0.attn.c_proj.weight",
        "transformer.h.0.attn.c_proj.bias", "transformer.h.0.ln_2.weight", "transformer.h.0.ln_2.bias",
        "transformer.h.0.mlp.c_fc.weight", "transformer.h.0.mlp.c_fc.bias", "transformer.h.0.mlp.c_proj.weight",
        "transformer.h.0.mlp.c_proj.bias", "transformer.ln_f.weight", "transformer.ln_f.bias",
    ]


def test_rmsnorm_and_no_bias_leave_no_bias_anywhere():
    model = make(norm="rmsnorm", bias=False)
    assert not [n for n, _ in model.named_parameters() if n.endswith(".bias")]
    assert isinstance(model.transformer.ln_f, torch.nn.RMSNorm)


def test_zero_init_projections_make_every_block_the_identity_at_init():
    model = make(perturb=False, zero_init_proj=True, tie_embeddings=False)
    for name, p in model.named_parameters():
        if name.endswith("c_proj.weight") or name == "lm_head.weight":
            assert torch.count_nonzero(p) == 0, name
    x = torch.randn(2, 16, 32, dtype=torch.float64)
    for block in model.transformer.h:  # both residual branches add exactly zero
        y, _ = block.attn(block.ln_1(x))
        assert torch.count_nonzero(y) == 0 and torch.count_nonzero(block.mlp.c_proj(torch.randn(2, 16, 128, dtype=torch.float64))) == 0
    idx = torch.randint(0, 50, (2, 16))
    logits, loss = model(idx, idx)
    assert torch.count_nonzero(logits) == 0 and loss.item() == pytest.approx(math.log(50), abs=1e-6)  # the loss is in float32
    # tied, the head is the (nonzero) embedding: the logits are those of the embeddings alone, no block
    tied = make(perturb=False, zero_init_proj=True)
    t = tied.transformer
    emb = t.wte(idx) + t.wpe(torch.arange(16))
    torch.testing.assert_close(tied(idx)[0], t.ln_f(emb) @ t.wte.weight.T, rtol=0, atol=0)


def test_untied_head_is_its_own_parameter_with_its_own_lr():
    model = make(tie_embeddings=False)
    assert model.lm_head.weight is not model.transformer.wte.weight
    groups = param_groups(model, 0.0, lr_scale={"head": 0.1, "embedding": 0.5}, muon=["matmul"])
    head = [g for g in groups if any(p is model.lm_head.weight for p in g["params"])]
    assert len(head) == 1 and head[0]["lr_scale"] == 0.1 and not head[0]["use_muon"] and len(head[0]["params"]) == 1
    embedding = [g for g in groups if any(p is model.transformer.wte.weight for p in g["params"])]
    assert len(embedding) == 1 and embedding[0]["lr_scale"] == 0.5
    tied = make()  # tied: one tensor, an embedding, so no head group
    tied_groups = param_groups(tied, 0.0, lr_scale={"head": 0.1, "embedding": 0.5})
    assert [g.get("lr_scale") for g in tied_groups].count(0.1) == 0
    assert sum(any(p is tied.lm_head.weight for p in g["params"]) for g in tied_groups) == 1


def test_soft_capped_logits_stay_within_the_cap():
    model = make(logit_softcap=2.0)
    with torch.no_grad():
        model.lm_head.weight.mul_(100.0)  # raw logits in the hundreds
    logits, _ = model(torch.randint(0, 50, (2, 16)))
    assert logits.abs().max() <= 2.0 and logits.abs().max() > 1.9  # tanh(100) is 1.0 in float64


@pytest.mark.parametrize("attn", [naive_attention, sdpa_attention, online_attention])
def test_window_limits_what_a_one_layer_model_sees(attn):
    """With one layer, the logits at position t depend on tokens t - window + 1 .. t only."""
    model = make(attn, n_layer=1, window=4)
    idx = torch.randint(0, 50, (1, 16))
    changed = idx.clone()
    changed[:, :6] = (changed[:, :6] + 1) % 50  # tokens 0..5: outside the windows of positions 9..15
    a, b = model(idx)[0], model(changed)[0]
    torch.testing.assert_close(a[:, 9:], b[:, 9:], rtol=0, atol=1e-12)
    assert (a[:, 6:9] - b[:, 6:9]).abs().max() > 1e-6  # positions whose window reaches a changed token


@pytest.mark.parametrize("attn", [naive_attention, sdpa_attention, online_attention])
@pytest.mark.parametrize("stride", [1, 5])
def test_cached_generation_respects_the_window_exactly(attn, stride):
    """KV-cached decoding (one query against the cached keys, Tq < Tk) applies the same window as
    uncached decoding, token for token, past block_size too; with every component on."""
    model = make(attn, **ALL_ON)
    idx = torch.randint(0, 50, (2, 3), generator=torch.Generator().manual_seed(2))
    cached = model.generate(idx, 30, temperature=0, window_stride=stride)
    uncached = model.generate(idx, 30, temperature=0, use_cache=False, window_stride=stride)
    assert torch.equal(cached, uncached)


def test_value_embeddings_and_unet_skips_add_their_parameters_only_when_on():
    model = make(value_embeddings=True, unet_skips=True)
    names = {n for n, _ in model.named_parameters()}
    assert {"skip_weights", "transformer.ve.0.weight", "transformer.h.3.attn.ve_lambda"} <= names
    assert model.skip_weights.shape == (2,)
    added = {"skip_weights"} | {f"transformer.ve.{i}.weight" for i in range(4)} | {
        f"transformer.h.{i}.attn.ve_lambda" for i in range(4)}
    assert names == {n for n, _ in make().named_parameters()} | added


@pytest.mark.parametrize("kw, match", [
    (dict(window=0), "attn.window must be an integer from 1 to model.block_size=16"),
    (dict(window=17), "attn.window must be an integer from 1 to model.block_size=16"),
    (dict(window=2.5), "attn.window"),
    (dict(logit_softcap=0.0), "model.logit_softcap must be a number > 0"),
    (dict(logit_softcap=-1.0), "model.logit_softcap must be a number > 0"),
    (dict(norm="batchnorm"), "model.norm must be 'layernorm' or 'rmsnorm'"),
    (dict(mlp="swiglu"), "model.mlp must be 'gelu'"),
    (dict(unet_skips=True, n_layer=1), "needs n_layer >= 2"),
])
def test_bad_component_settings_raise_one_clear_error(kw, match):
    with pytest.raises(ValueError, match=match):
        GPTConfig(**{**SMALL, **kw})


def test_an_attention_without_the_window_keyword_is_refused_when_a_window_is_asked_for():
    def my_attention(q, k, v, causal=True, scale=None):
        return sdpa_attention(q, k, v, causal=causal, scale=scale)

    GPT(GPTConfig(**SMALL), my_attention)  # no window: it keeps working
    with pytest.raises(UnsupportedError, match="takes no `window` keyword"):
        GPT(GPTConfig(**SMALL, window=4), my_attention)

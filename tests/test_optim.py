"""trainer.optim against torch.optim (SGD, Adam, AdamW, Muon, Adafactor) and the paper's closed form (Lion)."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import hydra
import pytest
import torch
from omegaconf import OmegaConf

import trainer.optim as ours
from models.gpt import GPT, GPTConfig

SHAPES = [(), (7,), (5, 3), (4, 3, 2)]
MATRIX_SHAPES = [(5, 3), (3, 5), (4, 4)]  # Muon: 2-D only, tall, wide and square
CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "optim"
OPTIM_CONFIGS = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
TOL = {torch.float64: dict(rtol=1e-12, atol=1e-14), torch.float32: dict(rtol=1e-5, atol=1e-6)}
# torch.optim classes whose arguments ours mirror (Lion has no torch counterpart)
TORCH_NAMES = ["SGD", "Adam", "AdamW", "Muon", "Adafactor"]

# (optimizer, constructor kwargs, overrides for the second parameter group)
TORCH_CASES = [
    ("SGD", dict(lr=0.1), dict(lr=0.05)),
    ("SGD", dict(lr=0.05, momentum=0.9), dict(momentum=0.5)),
    ("SGD", dict(lr=0.05, momentum=0.9, dampening=0.3), dict(dampening=0.0)),
    ("SGD", dict(lr=0.05, momentum=0.9, nesterov=True), dict(lr=0.02)),
    ("SGD", dict(lr=0.05, momentum=0.9, weight_decay=0.1), dict(weight_decay=0.0)),
    ("SGD", dict(lr=0.05, momentum=0.8, weight_decay=0.1, nesterov=True, maximize=True), {}),
    ("Adam", dict(lr=1e-2), dict(lr=3e-3, betas=(0.8, 0.99))),
    ("Adam", dict(lr=1e-2, weight_decay=0.1), dict(weight_decay=0.0)),
    ("Adam", dict(lr=1e-2, amsgrad=True), dict(eps=1e-6)),
    ("Adam", dict(lr=1e-2, weight_decay=0.1, amsgrad=True, maximize=True), dict(lr=1e-3)),
    ("Adam", dict(lr=1e-2, eps=0.0), {}),  # torch accepts eps=0
    ("AdamW", dict(lr=1e-2), dict(weight_decay=0.0)),
    ("AdamW", dict(lr=1e-2, weight_decay=0.1, amsgrad=True), dict(lr=3e-3)),
    ("AdamW", dict(lr=1e-2, betas=(0.9, 0.99), weight_decay=0.3, maximize=True), dict(eps=1e-3)),
    ("Adafactor", dict(), dict(lr=3e-3)),
    ("Adafactor", dict(lr=3e-2, weight_decay=0.1, d=2.0), dict(beta2_decay=-0.5)),
    ("Adafactor", dict(eps=(1e-30, 1e-2), maximize=True), dict(weight_decay=0.2)),
]
# every option torch.optim.Muon has; 2-D parameters only
MUON_CASES = [  # the second group overrides options, so each case covers two settings
    (dict(lr=0.02), dict(lr=0.01, ns_steps=3)),  # torch's defaults: nesterov, weight_decay 0.1
    (dict(lr=0.02, nesterov=False, momentum=0.9, weight_decay=0.0), dict(adjust_lr_fn="match_rms_adamw")),
    (dict(lr=0.02, ns_coefficients=(1.875, -1.25, 0.375), adjust_lr_fn="original"),  # the classic quintic
     dict(weight_decay=0.3, eps=1e-3, momentum=0.5, ns_steps=7)),
]


def make_params(dtype: torch.dtype, seed: int = 0, shapes=tuple(SHAPES)) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, dtype=dtype, generator=gen).requires_grad_() for s in shapes]


def param_groups(params, overrides: dict) -> list[dict]:
    """Two groups, the second with its own hyperparameters."""
    return [{"params": params[:2]}, {"params": params[2:], **overrides}]


def run(opt, params, steps: int, seed: int = 1, start: int = 0, grads=None, skip: int | None = 1) -> None:
    """Random gradients (or ``grads()``'s); parameter ``skip`` has no gradient on every 7th step
    (it must be skipped)."""
    gen = torch.Generator().manual_seed(seed)
    for i in range(start + steps):
        grads_i = grads() if grads else [torch.randn(p.shape, dtype=p.dtype, generator=gen).to(p.device) for p in params]
        if i < start:
            continue
        for j, (p, g) in enumerate(zip(params, grads_i)):
            p.grad = None if (j == skip and i % 7 == 3) else g
        opt.step()


def assert_close_lists(actual, expected, **tol) -> None:
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e, **tol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "single"])
@pytest.mark.parametrize("name,kwargs,overrides", TORCH_CASES)
def test_matches_torch(name, kwargs, overrides, foreach, dtype):
    ref_params, our_params = make_params(dtype), make_params(dtype)
    ref = getattr(torch.optim, name)(param_groups(ref_params, overrides), foreach=False, **kwargs)
    opt = getattr(ours, name)(param_groups(our_params, overrides), foreach=foreach, **kwargs)
    run(ref, ref_params, 100)
    run(opt, our_params, 100)
    assert_close_lists(our_params, ref_params, **TOL[dtype])
    for p_ours, p_ref in zip(our_params, ref_params):  # same state, under the same names
        ours_state, ref_state = opt.state[p_ours], ref.state[p_ref]
        assert ours_state.keys() == ref_state.keys()
        for key in ref_state:
            torch.testing.assert_close(ours_state[key], ref_state[key], **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("kwargs,overrides", MUON_CASES)
def test_muon_matches_torch(kwargs, overrides, dtype):
    """2-D parameters, two groups, 8 steps (parameter 1 skips step 3): the same bf16 Newton-Schulz.
    (bf16 matmuls of transposed operands are slow on CPU, hence fewer steps than the others.)"""
    ref_params, our_params = make_params(dtype, shapes=MATRIX_SHAPES), make_params(dtype, shapes=MATRIX_SHAPES)
    ref = torch.optim.Muon(param_groups(ref_params, overrides), **kwargs)
    opt = ours.Muon(param_groups(our_params, overrides), **kwargs)
    run(ref, ref_params, 8)
    run(opt, our_params, 8)
    assert_close_lists(our_params, ref_params, **TOL[dtype])
    for p_ours, p_ref in zip(our_params, ref_params):
        assert opt.state[p_ours].keys() == ref.state[p_ref].keys() == {"momentum_buffer"}
        torch.testing.assert_close(opt.state[p_ours]["momentum_buffer"], ref.state[p_ref]["momentum_buffer"], **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_muon_adamw_groups_match_torch_adamw(dtype):
    """Groups with use_muon=False are AdamW (any shape) with adamw_betas/adamw_eps; the Muon
    groups beside them are unaffected."""
    shapes = SHAPES + MATRIX_SHAPES
    ours_p, adamw_p, muon_p = (make_params(dtype, shapes=shapes) for _ in range(3))
    opt = ours.Muon([{"params": ours_p[:4], "use_muon": False, "lr": 3e-3, "weight_decay": 0.1},
                     {"params": ours_p[4:]}], lr=0.02, adamw_betas=(0.8, 0.98), adamw_eps=1e-6)
    adamw = torch.optim.AdamW(adamw_p[:4], lr=3e-3, betas=(0.8, 0.98), eps=1e-6, weight_decay=0.1, foreach=False)
    muon = torch.optim.Muon(muon_p[4:], lr=0.02)
    run(opt, ours_p, 10)
    for ref, part in ((adamw, slice(0, 4)), (muon, slice(4, None))):
        gen = torch.Generator().manual_seed(1)  # the gradients run() gave these parameters above
        run(ref, (adamw_p if part.start == 0 else muon_p)[part], 10, skip=1 if part.start == 0 else None,
            grads=lambda: [torch.randn(s, dtype=dtype, generator=gen) for s in shapes][part])
    assert_close_lists(ours_p, adamw_p[:4] + muon_p[4:], **TOL[dtype])
    assert opt.state[ours_p[2]].keys() == adamw.state[adamw_p[2]].keys()


def test_newton_schulz_pushes_singular_values_towards_one():
    """Matrices with singular values spread over 1e-2..1 come out with all of them in Keller
    Jordan's band (~0.7..1.2) and their singular vectors kept: the output is close to U V^T."""
    gen = torch.Generator().manual_seed(0)
    for rows, cols in [(64, 32), (32, 64), (48, 48)]:
        k = min(rows, cols)
        U, _ = torch.linalg.qr(torch.randn(rows, k, generator=gen, dtype=torch.float64))
        V, _ = torch.linalg.qr(torch.randn(cols, k, generator=gen, dtype=torch.float64))
        S = torch.logspace(-2, 0, k, dtype=torch.float64)
        G = U @ torch.diag(S) @ V.T
        O = ours.zeropower_via_newton_schulz(G).double()
        s_out = torch.linalg.svdvals(O)
        assert O.shape == G.shape and O.dtype == torch.float64
        assert s_out.min() > 0.6 and s_out.max() < 1.25, (s_out.min(), s_out.max())
        assert torch.linalg.svdvals(G).min() < 0.011  # the input was far from it
        # same singular vectors: O ~ U V^T (the band allows an RMS error of the singular values only)
        assert (O - U @ V.T).norm() / (U @ V.T).norm() < 0.25
    # the classic quintic (15, -10, 3)/8 converges to orthogonal (up to bf16 rounding)
    G = torch.randn(40, 20, generator=gen, dtype=torch.float64)
    O = ours.zeropower_via_newton_schulz(G, (1.875, -1.25, 0.375), steps=20).double()
    torch.testing.assert_close(torch.linalg.svdvals(O), torch.ones(20, dtype=torch.float64), rtol=0, atol=0.02)


ALL_CASES = [
    ("SGD", dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.1)),
    ("SGD", dict(lr=0.05, momentum=0.9, dampening=0.2, maximize=True)),
    ("Adam", dict(lr=1e-2, weight_decay=0.1, amsgrad=True)),
    ("AdamW", dict(lr=1e-2, weight_decay=0.1, maximize=True)),
    ("Lion", dict(lr=1e-3, weight_decay=0.5)),
    ("Lion", dict(lr=1e-3, betas=(0.95, 0.98), maximize=True)),
]


@pytest.mark.parametrize("name,kwargs", ALL_CASES)
def test_foreach_matches_single_tensor(name, kwargs):
    single_params, multi_params = make_params(torch.float64), make_params(torch.float64)
    run(getattr(ours, name)(single_params, foreach=False, **kwargs), single_params, 100)
    run(getattr(ours, name)(multi_params, foreach=True, **kwargs), multi_params, 100)
    assert_close_lists(multi_params, single_params, rtol=1e-13, atol=1e-15)


def lion_closed_form(params, exp_avgs, grads, lr, beta1, beta2, weight_decay):
    """Chen et al. 2023, Algorithm 2, written out independently of trainer.optim."""
    for i, (p, m, g) in enumerate(zip(params, exp_avgs, grads)):
        c = beta1 * m + (1 - beta1) * g
        params[i] = p * (1 - lr * weight_decay) - lr * torch.sign(c)
        exp_avgs[i] = beta2 * m + (1 - beta2) * g


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "single"])
def test_lion_matches_closed_form(foreach):
    hp = [dict(lr=1e-3, beta1=0.9, beta2=0.99, weight_decay=0.5),
          dict(lr=3e-4, beta1=0.95, beta2=0.98, weight_decay=0.0)]
    params = make_params(torch.float64)
    opt = ours.Lion(
        [{"params": params[:2]}, {"params": params[2:], "lr": 3e-4, "betas": (0.95, 0.98),
                                  "weight_decay": 0.0}],
        lr=1e-3, betas=(0.9, 0.99), weight_decay=0.5, foreach=foreach,
    )
    expected = [p.detach().clone() for p in params]
    exp_avgs = [torch.zeros_like(p) for p in expected]
    gen = torch.Generator().manual_seed(1)
    for _ in range(100):
        grads = [torch.randn(p.shape, dtype=p.dtype, generator=gen) for p in params]
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
        for sl, h in ((slice(0, 2), hp[0]), (slice(2, 4), hp[1])):
            p_, m_ = expected[sl], exp_avgs[sl]
            lion_closed_form(p_, m_, grads[sl], **h)
            expected[sl], exp_avgs[sl] = p_, m_
    assert_close_lists([p.detach() for p in params], expected, rtol=1e-12, atol=1e-14)
    assert_close_lists([opt.state[p]["exp_avg"] for p in params], exp_avgs, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "single"])
def test_lion_update_magnitude_is_lr(foreach):
    lr = 2.0**-10
    gen = torch.Generator().manual_seed(0)
    # dyadic values so that p - lr*sign(c) is exact; some zero gradients give sign 0 on step one
    p = (torch.randint(-1000, 1000, (64, 8), generator=gen).double() / 1024).requires_grad_()
    grad = torch.randn(64, 8, generator=gen, dtype=torch.float64)
    grad[::3] = 0.0
    opt = ours.Lion([p], lr=lr, foreach=foreach)
    before = p.detach().clone()
    p.grad = grad
    opt.step()
    delta = p.detach() - before
    assert torch.equal(delta.abs(), torch.where(grad == 0, 0.0, lr).double())
    assert torch.equal(torch.sign(delta), -torch.sign(grad))
    # with decay, the step is exactly the decay shrink plus +-lr
    opt = ours.Lion([p], lr=1e-3, weight_decay=0.5, foreach=foreach)
    before = p.detach().clone()
    p.grad = torch.randn(64, 8, generator=gen, dtype=torch.float64)
    opt.step()
    delta = p.detach() - before * (1 - 1e-3 * 0.5)
    torch.testing.assert_close(delta.abs(), torch.full_like(delta, 1e-3), rtol=1e-12, atol=0)


def tiny_gpt() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=32, block_size=16, n_layer=1, n_head=2, n_embd=32))


def optim_from_config(name: str, model: torch.nn.Module, **overrides):
    """Build an optimizer the way the trainer does: configs/optim/<name>.yaml and its param_groups policy."""
    cfg = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / f"{name}.yaml"))
    cfg.update(overrides)
    policy = hydra.utils.instantiate(cfg.pop("param_groups"))
    return hydra.utils.instantiate(cfg)(policy(model, float(cfg.get("weight_decay") or 0.0)))


def train_steps(model, opt, steps: int, start: int = 0) -> list[float]:
    """Steps ``start .. start+steps-1`` on the synthetic pattern (batches depend on the step only)."""
    losses = []
    for it in range(start, start + steps):
        _, loss = model(*synthetic_batch(torch.Generator().manual_seed(it)))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # as the trainer does
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("name", OPTIM_CONFIGS)
def test_state_dict_round_trip_resumes_exactly(name, tmp_path, one_thread):
    """Every config, through its param_groups policy: 3 + save/load + 3 steps == 6 steps, bitwise."""
    straight = tiny_gpt()
    train_steps(straight, optim_from_config(name, straight), 6)
    first = tiny_gpt()
    opt = optim_from_config(name, first)
    train_steps(first, opt, 3)
    torch.save({"model": first.state_dict(), "optim": opt.state_dict()}, tmp_path / "ckpt.pt")
    resumed = tiny_gpt()  # fresh tensors
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    resumed.load_state_dict(ckpt["model"])
    opt = optim_from_config(name, resumed)
    opt.load_state_dict(ckpt["optim"])
    train_steps(resumed, opt, 3, start=3)
    for a, b in zip(resumed.parameters(), straight.parameters(), strict=True):
        assert torch.equal(a, b)


# the state each optimizer keeps per parameter, under torch's names
STATE_KEYS = {
    "SGD": {"momentum_buffer"}, "Adam": {"step", "exp_avg", "exp_avg_sq"}, "AdamW": {"step", "exp_avg", "exp_avg_sq"},
    "Lion": {"exp_avg"}, "Adafactor": {"step", "variance"}, "Muon": {"momentum_buffer"},
}
KWARGS = {"SGD": {"momentum": 0.9}}


class ElsewhereTensor(torch.Tensor):
    """A CPU tensor that says it lives on a GPU: what ``torch.load(map_location="cuda")`` gives a
    step counter, on a machine without one."""

    @property
    def device(self):
        return torch.device("cuda", 0)


@pytest.mark.parametrize("name", sorted(STATE_KEYS))
def test_step_counters_stay_on_the_host(name):
    """State dicts round-trip with torch's keys; ``step`` is a CPU tensor after a save/load even if
    the checkpoint was mapped to a GPU, so the update's per-parameter ``.item()`` never syncs."""
    params = make_params(torch.float32, shapes=MATRIX_SHAPES)  # 2-D: every optimizer takes them
    opt = getattr(ours, name)(params, **KWARGS.get(name, {}))
    run(opt, params, 2, skip=None)
    for p in params:
        keys = {"step", "row_var", "col_var"} if name == "Adafactor" else STATE_KEYS[name]
        assert opt.state[p].keys() == keys
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    has_step = "step" in STATE_KEYS[name]
    for entry in loaded["state"].values():
        assert ("step" in entry) == has_step
        if has_step:
            assert type(entry["step"]) is torch.Tensor and entry["step"].item() == 2
            entry["step"] = entry["step"].as_subclass(ElsewhereTensor)
            assert entry["step"].device.type == "cuda"
    opt = getattr(ours, name)(params, **KWARGS.get(name, {}))
    opt.load_state_dict(loaded)
    run(opt, params, 1, skip=None)
    for p in params:
        if has_step:
            step = opt.state[p]["step"]
            assert type(step) is torch.Tensor and step.device.type == "cpu" and step.item() == 3


def scaled_step(opt, scaler, params, grads):
    loss = sum((p * g).sum() for p, g in zip(params, grads))  # d loss / d p = g
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()


@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW", "Lion"])
def test_grad_scaler_skips_inf_and_matches_unscaled(name):
    kwargs = {"lr": 1e-2, "momentum": 0.9} if name == "SGD" else {"lr": 1e-2}
    params, plain = make_params(torch.float32), make_params(torch.float32)
    opt = getattr(ours, name)(params, **kwargs)
    plain_opt = getattr(ours, name)(plain, **kwargs)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)  # a power of two: unscaling is exact
    gen = torch.Generator().manual_seed(3)
    for _ in range(3):
        grads = [torch.randn(p.shape, generator=gen) for p in params]
        scaled_step(opt, scaler, params, grads)
        for p, g in zip(plain, grads):
            p.grad = g.clone()
        plain_opt.step()
    assert_close_lists(params, plain, rtol=0, atol=0)

    before = [p.detach().clone() for p in params]
    state_before = {k: v.clone() for k, v in opt.state[params[2]].items()}
    grads = [torch.randn(p.shape, generator=gen) for p in params]
    grads[2][1, 1] = float("inf")
    scaled_step(opt, scaler, params, grads)
    assert_close_lists(params, before, rtol=0, atol=0)  # the step was skipped...
    for k, v in state_before.items():  # ...state untouched...
        assert torch.equal(opt.state[params[2]][k], v)
    assert scaler.get_scale() == 2.0**9  # ...and the scale backed off


def test_closure_is_called_and_its_loss_returned():
    params, ref_params = make_params(torch.float64), make_params(torch.float64)
    opt = ours.AdamW(params, lr=1e-2)
    ref = torch.optim.AdamW(ref_params, lr=1e-2)

    def closure_for(ps, o):
        def closure():
            o.zero_grad()
            loss = sum((p**2).sum() for p in ps)
            loss.backward()
            return loss
        return closure

    for _ in range(5):
        loss = opt.step(closure_for(params, opt))
        ref_loss = ref.step(closure_for(ref_params, ref))
        assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-12)
    assert_close_lists(params, ref_params, **TOL[torch.float64])


@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW", "Lion"])
def test_param_without_grad_is_skipped(name):
    params = make_params(torch.float32)
    opt = getattr(ours, name)(params, lr=0.1, weight_decay=0.1)
    frozen = params[2].detach().clone()
    for p in params:
        p.grad = torch.ones_like(p)
    params[2].grad = None
    before = params[3].detach().clone()
    opt.step()
    assert torch.equal(params[2], frozen)
    assert len(opt.state[params[2]]) == 0
    assert not torch.equal(params[3], before)  # the others did step


BAD_ARGS = [
    ("SGD", dict(lr=-1.0), "lr=-1.0"),
    ("SGD", dict(lr=0.1, momentum=-0.5), "momentum"),
    ("SGD", dict(lr=0.1, weight_decay=-1e-2), "weight_decay"),
    ("SGD", dict(lr=0.1, nesterov=True), "nesterov"),
    ("SGD", dict(lr=0.1, momentum=0.9, dampening=0.1, nesterov=True), "dampening"),
    ("Adam", dict(lr=-1e-3), "lr"),
    ("Adam", dict(betas=(1.0, 0.999)), "betas"),
    ("Adam", dict(betas=(0.9, -0.1)), "betas"),
    ("Adam", dict(eps=-1e-8), "eps"),
    ("Muon", dict(momentum=-0.1), "momentum"),
    ("Muon", dict(adjust_lr_fn="rms"), "adjust_lr_fn"),
    ("Muon", dict(ns_coefficients=(1.0, 2.0)), "ns_coefficients"),
    ("Adafactor", dict(beta2_decay=0.5), "beta2_decay"),
    ("Adafactor", dict(d=0.5), "d="),
    ("Adafactor", dict(eps=(None, -1.0)), "eps"),
    ("AdamW", dict(weight_decay=-0.1), "weight_decay"),
    ("AdamW", dict(foreach="yes"), "foreach"),
    ("Lion", dict(lr=float("nan")), "lr"),
    ("Lion", dict(betas=(0.9, 1.5)), "betas"),
    ("Lion", dict(weight_decay=-1.0), "weight_decay"),
]


@pytest.mark.parametrize("name,kwargs,arg", BAD_ARGS)
def test_bad_hyperparameters_raise_naming_the_argument(name, kwargs, arg):
    with pytest.raises(ValueError, match=arg.replace(".", r"\.")):
        getattr(ours, name)(make_params(torch.float32), **kwargs)


@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW", "Lion", "Adafactor"])
def test_bad_group_hyperparameters_raise(name):
    params = make_params(torch.float32)
    with pytest.raises(ValueError, match="lr"):
        getattr(ours, name)([{"params": params[:2]}, {"params": params[2:], "lr": -0.5}], lr=0.1)


@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW", "Lion", "Adafactor"])
def test_sparse_gradients_rejected_naming_the_optimizer(name):
    emb = torch.nn.Embedding(10, 4, sparse=True)
    emb(torch.tensor([1, 2])).sum().backward()
    opt = getattr(ours, name)(emb.parameters(), lr=0.1)
    with pytest.raises(RuntimeError, match=f"{name} does not support sparse gradients"):
        opt.step()


def test_configs_have_trainer_keys():
    for name in OPTIM_CONFIGS:
        cfg = OmegaConf.load(CONFIG_DIR / f"{name}.yaml")
        assert cfg._target_.rsplit(".", 1)[-1].lower() == name
        assert cfg._partial_ is True
        assert cfg.lr > 0 and cfg.weight_decay >= 0
        assert cfg.param_groups._target_ == "trainer.optim.param_groups" and cfg.param_groups._partial_ is True


def synthetic_batch(gen: torch.Generator, batch: int = 16, block: int = 16):
    """A learnable corpus: a fixed random sequence of 24 tokens (of 32), repeated."""
    pattern = torch.randperm(32, generator=torch.Generator().manual_seed(7))[:24]
    corpus = pattern.repeat(40)
    starts = torch.randint(0, len(corpus) - block - 1, (batch,), generator=gen)
    x = torch.stack([corpus[s : s + block] for s in starts])
    y = torch.stack([corpus[s + 1 : s + block + 1] for s in starts])
    return x, y


@pytest.fixture
def one_thread():
    """Tiny matmuls gain nothing from threads, and lose a lot when other jobs share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("name", OPTIM_CONFIGS)
def test_config_trains_a_tiny_gpt(name, one_thread):
    """The yaml hyperparameters (at their peak lr, no schedule) learn a repeated pattern."""
    model = tiny_gpt()
    losses = train_steps(model, optim_from_config(name, model), 40)
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    # ln(32) = 3.47 at the start; Lion, whose small lr moves each weight by at most 40 * 3e-4,
    # is the slowest here; the others get well below 2.5.
    assert last < first - 0.5, f"{name}: loss {first:.3f} -> {last:.3f}"


@pytest.mark.parametrize("name", ["AdamW", "Lion"])
def test_step_traces_under_torch_compile(name):
    """Dynamo traces our step (it special-cases torch.optim.Optimizer subclasses, so this can break).

    The eager backend keeps the test fast: inductor's C++ compile of one step takes ~12 s on a
    2-core CPU, too slow for this file; the traced graph is the same.
    """
    torch._dynamo.reset()
    kwargs = {"lr": 1e-2}
    params, ref_params = make_params(torch.float64), make_params(torch.float64)
    opt, ref = getattr(ours, name)(params, **kwargs), getattr(ours, name)(ref_params, **kwargs)
    compiled_step = torch.compile(opt.step, backend="eager")
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        for p, q in zip(params, ref_params):
            p.grad = torch.randn(p.shape, dtype=p.dtype, generator=gen)
            q.grad = p.grad.clone()
        compiled_step()
        ref.step()
    assert_close_lists(params, ref_params, rtol=0, atol=0)


@pytest.mark.parametrize("name,kwargs", ALL_CASES)
def test_cpu_pieces_are_bit_identical(name, kwargs, monkeypatch):
    """Running the CPU foreach update piece by piece (large tensors split) changes no bit."""
    from trainer.optim import base

    results = []
    for piece_numel in (1 << 40, 4):  # one piece; pieces of 4 elements, splitting (7,) and up
        monkeypatch.setattr(base, "CPU_PIECE_NUMEL", piece_numel)
        params = make_params(torch.float32)
        run(getattr(ours, name)(params, foreach=True, **kwargs), params, 20)
        results.append(params)
    assert_close_lists(results[1], results[0], rtol=0, atol=0)


REPO = Path(__file__).resolve().parents[1]


def test_importing_trainer_optim_does_not_import_triton():
    code = "import sys, trainer.optim; assert 'triton' not in sys.modules, 'triton imported'"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


def test_fused_triton_compiles_for_h100():
    """Ahead-of-time compile for sm_90 with no GPU, in a process without TRITON_INTERPRET."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_DEFAULT_FP_FUSION="1", TRITON_CACHE_DIR=str(REPO / ".triton_cache" / "aot"))
    proc = subprocess.run(
        [sys.executable, "-m", "trainer.optim.fused_triton"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    assert {(r["kernel"], r["dtype"]) for r in rows} == {
        (k, d) for k in ("adamw_kernel", "lion_kernel") for d in ("fp32", "bf16")
    }
    assert all(r["cc"] == 90 and r["ptx_bytes"] > 0 and r["shared"] == 0 for r in rows)


# --- torch 2.13 keyword arguments and the fused=True (Triton) path --------------------------

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: the kernels run interpreted


def fused_params(seed: int = 0) -> list[torch.Tensor]:
    """fp32 params of several shapes; (1500,) spans two kernel blocks, the second masked."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen).to(DEVICE).requires_grad_() for s in SHAPES + [(1500,)]]


@pytest.mark.parametrize("name", TORCH_NAMES)
def test_signature_and_defaults_match_torch(name):
    """Every torch 2.13 argument exists here, of the same kind and default; same group keys."""
    import inspect

    ours_sig = inspect.signature(getattr(ours, name)).parameters
    for arg, param in inspect.signature(getattr(torch.optim, name)).parameters.items():
        assert arg in ours_sig, f"{name} lacks {arg}"
        assert ours_sig[arg].kind == param.kind, arg
        assert ours_sig[arg].default == param.default, arg
    params = make_params(torch.float32, shapes=MATRIX_SHAPES)
    extra = {"use_muon", "adamw_betas", "adamw_eps", "foreach"} if name == "Muon" else set()  # its AdamW groups, batched NS
    assert getattr(ours, name)(params).defaults.keys() == getattr(torch.optim, name)(params).defaults.keys() | extra


@pytest.mark.parametrize("name,kwargs", [
    ("SGD", dict(differentiable=False, fused=None)),
    ("SGD", dict(fused=False, momentum=0.9)),
    ("Adam", dict(capturable=False, differentiable=False, fused=None)),
    ("AdamW", dict(capturable=False, differentiable=False, fused=False)),
    ("Lion", dict(fused=None)),
    ("Lion", dict(fused=False)),
])
def test_torch_default_kwargs_keep_todays_path(name, kwargs):
    plain, flagged = make_params(torch.float32), make_params(torch.float32)
    base = {"momentum": 0.9} if "momentum" in kwargs else {}
    run(getattr(ours, name)(plain, **base), plain, 5)
    run(getattr(ours, name)(flagged, **kwargs), flagged, 5)
    assert_close_lists(flagged, plain, rtol=0, atol=0)


FUSED_BAD_ARGS = [
    ("Adam", dict(capturable=True), "capturable=True is not supported by gptlab"),
    ("AdamW", dict(differentiable=True), "differentiable=True is not supported by gptlab"),
    ("SGD", dict(differentiable=True), "differentiable=True is not supported by gptlab"),
    ("SGD", dict(fused=True), "SGD\\(fused=True\\) is not implemented.*use foreach=True"),
    ("AdamW", dict(fused="yes"), "fused='yes'"),
    ("AdamW", dict(fused=True, foreach=True), "fused=True and foreach=True"),
    ("AdamW", dict(fused=True, amsgrad=True), "amsgrad"),
    ("AdamW", dict(fused=True, maximize=True), "maximize"),
    ("Adam", dict(fused=True, weight_decay=0.1), "weight_decay.*decoupled_weight_decay=True"),
    ("Lion", dict(fused=True, maximize=True), "maximize"),
    ("Lion", dict(fused=True, foreach=True), "fused=True and foreach=True"),
]


@pytest.mark.parametrize("name,kwargs,match", FUSED_BAD_ARGS)
def test_unsupported_flags_raise_naming_the_argument(name, kwargs, match):
    with pytest.raises(ValueError, match=match):
        getattr(ours, name)(make_params(torch.float32), **kwargs)
    # a param group may set them too
    params = make_params(torch.float32)
    with pytest.raises(ValueError, match=match):
        getattr(ours, name)([{"params": params[:2]}, {"params": params[2:], **kwargs}])


@pytest.mark.parametrize("name", ["AdamW", "Lion"])
def test_fused_rejects_complex_and_float64_params(name):
    with pytest.raises(ValueError, match="complex"):
        getattr(ours, name)([torch.zeros(3, dtype=torch.complex64, device=DEVICE)], fused=True)
    with pytest.raises(ValueError, match="float64"):
        getattr(ours, name)([torch.zeros(3, dtype=torch.float64, device=DEVICE)], fused=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU error")
@pytest.mark.parametrize("name", ["AdamW", "Lion"])
def test_fused_on_cpu_without_interpreter_raises(name, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match=r"fused=True\) needs a CUDA device \(Triton kernel\).*foreach=True"):
        getattr(ours, name)(make_params(torch.float32), fused=True)
    # built under the interpreter, stepped without it: the step checks again, nothing falls back
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    params = make_params(torch.float32)
    opt = getattr(ours, name)(params, fused=True)
    monkeypatch.delenv("TRITON_INTERPRET")
    before = [p.detach().clone() for p in params]
    with pytest.raises(ValueError, match="needs a CUDA device"):
        run(opt, params, 1)
    assert_close_lists(params, before, rtol=0, atol=0)


FUSED_CASES = [
    ("AdamW", dict(lr=1e-2, weight_decay=0.1), dict(lr=3e-3, betas=(0.8, 0.99), weight_decay=0.0)),
    ("Adam", dict(lr=1e-2, weight_decay=0.2, decoupled_weight_decay=True), dict(eps=1e-6)),
    ("Adam", dict(lr=1e-2), dict(lr=3e-3)),  # no decay: L2 and decoupled agree
    ("Lion", dict(lr=1e-3, weight_decay=0.5), dict(lr=3e-4, betas=(0.95, 0.98))),
]


@pytest.mark.parametrize("name,kwargs,overrides", FUSED_CASES)
def test_fused_step_matches_foreach(name, kwargs, overrides, monkeypatch):
    """fused=True (the Triton kernels; interpreted on CPU) vs foreach=True, fp32, 10 steps."""
    pytest.importorskip("triton")
    from trainer.optim import fused_triton

    calls = []  # the fused path must really launch the kernels (no silent fallback)
    for fn in ("adamw_fused", "lion_fused"):
        real = getattr(fused_triton, fn)
        monkeypatch.setattr(fused_triton, fn, lambda *a, _real=real, **k: calls.append(1) or _real(*a, **k))
    fused, ref = fused_params(), fused_params()
    fused_opt = getattr(ours, name)(param_groups(fused, overrides), fused=True, **kwargs)
    ref_opt = getattr(ours, name)(param_groups(ref, overrides), foreach=True, **kwargs)
    run(fused_opt, fused, 10)  # parameter 1 has no gradient on step 3: it must be skipped
    run(ref_opt, ref, 10)
    assert len(calls) == 20  # 10 steps x 2 groups
    # fp32 in both: only rounding order differs (lerp vs b*m + (1-b)*g, folded sqrt)
    assert_close_lists(fused, ref, rtol=1e-5, atol=1e-6)
    for p_fused, p_ref in zip(fused, ref):
        assert fused_opt.state[p_fused].keys() == ref_opt.state[p_ref].keys()
        for key, value in ref_opt.state[p_ref].items():
            torch.testing.assert_close(fused_opt.state[p_fused][key], value, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("direction", ["fused->foreach", "foreach->fused"])
@pytest.mark.parametrize("name", ["AdamW", "Lion"])
def test_state_dict_moves_between_fused_and_foreach(name, direction):
    """10 steps on one path, save/load into the other, 10 more == 20 foreach steps."""
    pytest.importorskip("triton")
    first_path, second_path = ({"fused": True}, {"foreach": True})
    if direction == "foreach->fused":
        first_path, second_path = second_path, first_path
    kwargs = dict(lr=1e-2, weight_decay=0.1)
    straight = fused_params()
    run(getattr(ours, name)(straight, foreach=True, **kwargs), straight, 20)

    first = fused_params()
    opt = getattr(ours, name)(first, **first_path, **kwargs)
    run(opt, first, 10)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    resumed = [p.detach().clone().requires_grad_() for p in first]
    opt = getattr(ours, name)(resumed, **second_path, **kwargs)
    opt.load_state_dict(torch.load(buf, weights_only=True))
    # the receiving optimizer keeps its own path (torch would take the saved fused/foreach)
    assert {k: opt.param_groups[0][k] for k in ("foreach", "fused")} == {
        "foreach": second_path.get("foreach"), "fused": second_path.get("fused")}
    run(opt, resumed, 10, start=10)
    assert_close_lists(resumed, straight, rtol=1e-5, atol=1e-6)


def test_fused_step_rechecks_a_loaded_state_dict():
    """A saved amsgrad=True group loaded into a fused optimizer raises at the step, not silently."""
    pytest.importorskip("triton")
    src = ours.AdamW(fused_params(), amsgrad=True, foreach=True)
    params = fused_params()
    opt = ours.AdamW(params, fused=True)
    opt.load_state_dict(src.state_dict())
    with pytest.raises(ValueError, match="amsgrad"):
        run(opt, params, 1)


@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW", "Lion"])
def test_state_dict_saved_before_the_new_keys_loads(name):
    """Checkpoints written before fused/capturable/differentiable existed still load and step."""
    params = make_params(torch.float32)
    opt = getattr(ours, name)(params)
    run(opt, params, 2)
    state = opt.state_dict()
    for group in state["param_groups"]:
        for key in ("fused", "capturable", "differentiable"):
            group.pop(key, None)
    opt = getattr(ours, name)(params)
    opt.load_state_dict(state)
    assert opt.param_groups[0]["fused"] is None
    run(opt, params, 2, start=2)


@pytest.mark.parametrize("nesterov", [True, False])
def test_muon_foreach_batches_same_shape_matrices_as_the_one_matrix_path(nesterov):
    """foreach=True stacks same-shape matrices into one batched Newton-Schulz: the same rule as
    torch's one-at-a-time path, up to bfloat16 rounding of the batched matmuls."""
    shapes = [(5, 3), (3, 5), (4, 4), (5, 3), (4, 4), (4, 4)]  # repeated shapes share a batch
    torch.manual_seed(0)
    one = [torch.nn.Parameter(torch.randn(*s)) for s in shapes]
    many = [torch.nn.Parameter(p.detach().clone()) for p in one]
    start = [p.detach().clone() for p in one]
    opts = [ours.Muon(ps, lr=0.02, weight_decay=0.1, nesterov=nesterov, foreach=f)
            for ps, f in ((one, None), (many, True))]
    for _ in range(3):
        grads = [torch.randn(*s) for s in shapes]
        for ps, opt in zip((one, many), opts):
            for p, g in zip(ps, grads):
                p.grad = g.clone()
            opt.step()
    for a, b, a0 in zip(one, many, start):
        torch.testing.assert_close(b, a, rtol=0, atol=2e-3)  # bf16 iterations: ~1e-3 per entry of O, times lr
        assert (a - a0).abs().max() > 0.02  # three steps moved every matrix by more than that tolerance
    for a, b in zip(opts[0].state.values(), opts[1].state.values()):
        torch.testing.assert_close(b["momentum_buffer"], a["momentum_buffer"], rtol=0, atol=0)


def test_batched_newton_schulz_orthogonalizes_each_matrix_of_the_stack():
    from trainer.optim.muon import zeropower_via_newton_schulz

    g = torch.Generator().manual_seed(0)
    G = torch.randn(4, 16, 8, generator=g)
    stacked = zeropower_via_newton_schulz(G)
    for i in range(4):
        torch.testing.assert_close(stacked[i].float(), zeropower_via_newton_schulz(G[i]).float(), rtol=0, atol=2e-2)
        sv = torch.linalg.svdvals(stacked[i].float())
        assert 0.6 < sv.min() and sv.max() < 1.3  # the quintic's singular values land in about [0.7, 1.2]

"""trainer.optim on a CUDA GPU (skipped without one): the same updates as torch.optim on the GPU,
and no host synchronization inside ``step()``, also after a checkpoint mapped onto the GPU.

The CPU suite (test_optim.py) checks the update rules against torch.optim in float64 and float32;
this file checks that the CUDA path computes the same thing (torch.optim run on the same GPU is
the reference) and that a step never waits for the GPU: with ``torch.cuda.set_sync_debug_mode
("error")`` any synchronizing call (``.item()`` on a CUDA tensor, a device-to-host copy) raises.
"""
from __future__ import annotations

import io

import pytest
import torch

import trainer.optim as ours
from test_optim import MUON_CASES, TORCH_CASES, param_groups, run  # run: parameter 1 skips every 7th step

pytestmark = pytest.mark.gpu

SHAPES = [(), (7,), (5, 3), (4, 3, 2), (300, 129)]  # the last spans many blocks of any kernel
MATRIX_SHAPES = [(5, 3), (3, 5), (64, 96)]
TOL = dict(rtol=1e-5, atol=1e-6)


def cuda_params(shapes, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen).cuda().requires_grad_() for s in shapes]


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "single"])
@pytest.mark.parametrize("name,kwargs,overrides", TORCH_CASES)
def test_matches_torch_on_cuda(name, kwargs, overrides, foreach):
    ref_params, our_params = cuda_params(SHAPES), cuda_params(SHAPES)
    ref = getattr(torch.optim, name)(param_groups(ref_params, overrides), foreach=False, **kwargs)
    opt = getattr(ours, name)(param_groups(our_params, overrides), foreach=foreach, **kwargs)
    run(ref, ref_params, 20)
    run(opt, our_params, 20)
    for a, b in zip(our_params, ref_params):
        torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("kwargs,overrides", MUON_CASES)
def test_muon_matches_torch_on_cuda(kwargs, overrides):
    ref_params, our_params = cuda_params(MATRIX_SHAPES), cuda_params(MATRIX_SHAPES)
    ref = torch.optim.Muon(param_groups(ref_params, overrides), **kwargs)
    opt = ours.Muon(param_groups(our_params, overrides), **kwargs)
    run(ref, ref_params, 10)
    run(opt, our_params, 10)
    for a, b in zip(our_params, ref_params):
        torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("name", ["AdamW", "Lion"])
def test_fused_matches_foreach_on_cuda(name):
    kwargs = dict(lr=1e-2, weight_decay=0.1)
    fused, ref = cuda_params(SHAPES), cuda_params(SHAPES)
    fused_opt = getattr(ours, name)(fused, fused=True, **kwargs)
    ref_opt = getattr(ours, name)(ref, foreach=True, **kwargs)
    run(fused_opt, fused, 20)
    run(ref_opt, ref, 20)
    for a, b in zip(fused, ref):
        torch.testing.assert_close(a, b, **TOL)


STEP_CASES = [
    ("SGD", dict(momentum=0.9, foreach=True)), ("Adam", dict(foreach=True)), ("AdamW", dict(foreach=True)),
    ("AdamW", dict(foreach=False)), ("AdamW", dict(fused=True)), ("Lion", dict(foreach=True)),
    ("Lion", dict(fused=True)), ("Adafactor", dict(foreach=False)), ("Muon", dict()),
]


@pytest.mark.parametrize("name,kwargs", STEP_CASES)
def test_step_never_syncs_even_after_loading_a_cuda_mapped_checkpoint(name, kwargs):
    """torch.load(map_location="cuda") puts step counters on the GPU; loading must bring them back
    to the host, or every step's per-parameter ``.item()`` would wait for the GPU."""
    shapes = MATRIX_SHAPES if name == "Muon" else SHAPES
    params = cuda_params(shapes)
    opt = getattr(ours, name)(params, **kwargs)
    run(opt, params, 2)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    opt = getattr(ours, name)(params, **kwargs)
    opt.load_state_dict(torch.load(buf, map_location="cuda", weights_only=True))
    for p in params:
        p.grad = torch.randn_like(p)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.step()
        opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for state in opt.state.values():
        if "step" in state:
            assert state["step"].device.type == "cpu"

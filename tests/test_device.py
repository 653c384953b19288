"""Device selection (trainer/distributed.py) and run numerics (trainer/precision.py), on CPU.

CUDA is mocked (is_available, device_count, set_device, and torch.distributed's group set-up),
so the choices a GPU run makes are checked here: which GPU each process takes, that it becomes
the current device (Triton launches on the current device), and the one-line errors.
"""
from __future__ import annotations

import os

import pytest
import torch

from trainer import runtime as distributed
from trainer.runtime import init_process, resolve_device
from trainer.errors import ConfigError, UserError


@pytest.fixture
def fake_cuda(monkeypatch):
    """Pretend this machine has two GPUs; record set_device and process-group calls."""
    calls = {"set_device": [], "init_process_group": []}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls["set_device"].append(torch.device(d)))
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.dist, "init_process_group",
                        lambda backend: calls["init_process_group"].append(backend))
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    return calls


def _torchrun(monkeypatch, rank: int, world: int, local: int) -> None:
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("LOCAL_RANK", str(local))


@pytest.mark.parametrize("name,expected", [("auto", "cuda:0"), ("cuda", "cuda:0"), ("cuda:1", "cuda:1"),
                                           ("cpu", "cpu")])
def test_single_process_device_is_set_current(fake_cuda, name, expected):
    info, device = init_process(name)
    assert device == torch.device(expected) and not info.enabled
    # every CUDA run makes its GPU the current device, so Triton kernels launch there
    assert fake_cuda["set_device"] == ([torch.device(expected)] if device.type == "cuda" else [])
    assert fake_cuda["init_process_group"] == []


@pytest.mark.parametrize("name", ["auto", "cuda"])
def test_torchrun_ranks_take_their_local_gpu(fake_cuda, monkeypatch, name):
    _torchrun(monkeypatch, rank=3, world=4, local=1)
    info, device = init_process(name)
    assert device == torch.device("cuda:1") and info.rank == 3 and info.enabled
    assert fake_cuda["set_device"] == [torch.device("cuda:1")]
    assert fake_cuda["init_process_group"] == ["nccl"]


def test_torchrun_refuses_one_gpu_for_every_rank(fake_cuda, monkeypatch):
    _torchrun(monkeypatch, rank=0, world=2, local=0)
    with pytest.raises(ConfigError, match="CUDA_VISIBLE_DEVICES") as info:
        init_process("cuda:1")
    assert "device=cuda " in str(info.value) and fake_cuda["init_process_group"] == []


def test_more_ranks_than_gpus_is_a_clear_error(fake_cuda, monkeypatch):
    _torchrun(monkeypatch, rank=2, world=3, local=2)
    with pytest.raises(ConfigError, match="nproc_per_node"):
        init_process("auto")


def test_torchrun_on_cpu_uses_gloo(fake_cuda, monkeypatch):
    _torchrun(monkeypatch, rank=1, world=2, local=1)
    _, device = init_process("cpu")
    assert device == torch.device("cpu") and fake_cuda["init_process_group"] == ["gloo"]


@pytest.mark.parametrize("name,match", [("cuda:2", "only 2 CUDA device"), ("cuda:x", "not understood"),
                                        ("tpu", "not understood"), ("gpu", "not understood")])
def test_bad_device_names_are_one_line_user_errors(fake_cuda, name, match):
    with pytest.raises(ConfigError, match=match) as info:
        resolve_device(name)
    assert isinstance(info.value, UserError) and "\n" not in str(info.value)


def test_cuda_requested_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ConfigError, match="CUDA is not available"):
        resolve_device("cuda:0")


# ----------------------------------------------------------------------------- tf32, determinism


@pytest.fixture
def restore_math(monkeypatch):
    matmul, conv = torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision
    deterministic = torch.are_deterministic_algorithms_enabled()
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    yield
    torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = matmul, conv
    torch.use_deterministic_algorithms(deterministic)


def test_init_process_math_sets_tf32_both_ways_and_flash_follows(restore_math):
    from kernels.flash import tf32_enabled
    from trainer.runtime import init_process

    init_process("cpu", tf32=True, deterministic=False)
    assert torch.backends.cuda.matmul.fp32_precision == "tf32" and tf32_enabled()
    assert torch.backends.cudnn.conv.fp32_precision == "tf32"
    init_process("cpu", tf32=False, deterministic=False)
    assert torch.backends.cuda.matmul.fp32_precision == "ieee" and not tf32_enabled()


def test_init_process_math_deterministic(restore_math):
    from trainer.runtime import init_process

    init_process("cpu", tf32=False, deterministic=True)
    assert torch.are_deterministic_algorithms_enabled()
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    init_process("cpu", tf32=False, deterministic=False)  # chosen explicitly: a later run turns it off
    assert not torch.are_deterministic_algorithms_enabled()


def test_train_config_has_explicit_tf32_and_deterministic_keys():
    from conftest import compose_cfg

    cfg = compose_cfg()
    assert cfg.tf32 is False and cfg.deterministic is False
    cfg = compose_cfg(["tf32=true", "deterministic=true"])
    assert cfg.tf32 is True and cfg.deterministic is True

"""torchrun support: process-group set-up, the per-rank device, and collective helpers.

A run launched by ``torchrun`` has RANK, WORLD_SIZE and LOCAL_RANK in its environment; a plain
``python scripts/train.py`` run is a world of one and never touches torch.distributed.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from trainer.errors import ConfigError


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(name: str, local_rank: int = 0, world_size: int = 1) -> torch.device:
    """The device a process runs on.

    ``auto`` is ``cuda`` when CUDA is available, else ``cpu``. ``cuda`` is this process's GPU: GPU 0
    for a single process, GPU ``LOCAL_RANK`` under torchrun. ``cuda:N`` picks GPU N for a single
    process; under torchrun it is refused, since every rank would then share GPU N (choose a
    node's GPUs with CUDA_VISIBLE_DEVICES instead). Bad names raise a one-line ConfigError.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name in ("cpu", "mps"):
        return torch.device(name)
    if name != "cuda" and not name.startswith("cuda:"):
        raise ConfigError(f"device={name!r} is not understood; use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise ConfigError(f"device={name} but CUDA is not available here; use device=cpu or device=auto")
    count = torch.cuda.device_count()
    if name == "cuda":
        if local_rank >= count:
            raise ConfigError(
                f"LOCAL_RANK={local_rank} but this node has {count} visible GPU(s): run at most {count} "
                "processes per node (torchrun --nproc_per_node)"
            )
        return torch.device("cuda", local_rank)
    index = name.split(":", 1)[1]
    if not index.isdigit():
        raise ConfigError(f"device={name!r} is not understood; use auto, cpu, cuda or cuda:N")
    if world_size > 1:
        raise ConfigError(
            f"device={name} under torchrun would put all {world_size} ranks on one GPU; use device=cuda "
            "(each rank takes GPU LOCAL_RANK) and choose GPUs with CUDA_VISIBLE_DEVICES"
        )
    if int(index) >= count:
        raise ConfigError(f"device={name} but only {count} CUDA device(s) are visible (cuda:0..cuda:{count - 1})")
    return torch.device("cuda", int(index))


def init_distributed(device_name: str) -> tuple[DistInfo, torch.device]:
    """Join the process group if launched by torchrun (NCCL on CUDA, Gloo on CPU), and make the
    run's GPU the current CUDA device: Triton kernels (flash, fused optimizers) and any code that
    says just "cuda" launch on the current device, so it must be the model's."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        info = DistInfo()
    else:
        info = DistInfo(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))
    device = resolve_device(device_name, info.local_rank, info.world_size)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if info.enabled and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return info, device


def shutdown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_mean(value: float, info: DistInfo, device: torch.device) -> float:
    """The mean of a Python float over all ranks (itself on a single process)."""
    if not info.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.item() / info.world_size


def broadcast_object(obj, info: DistInfo):
    """Rank 0's ``obj`` on every rank."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]

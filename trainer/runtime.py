"""The process a run executes in: its device, its place in a torchrun world, its numerics, and
the signals that stop it.

A run launched by ``torchrun`` has RANK, WORLD_SIZE and LOCAL_RANK in its environment and joins
the process group (NCCL on CUDA, Gloo on CPU); a plain ``python scripts/train.py`` run is a world
of one and never touches torch.distributed.

Stopping: Ctrl-C (SIGINT) or a scheduler's SIGTERM (Slurm, Kubernetes) only sets a flag; the loop
checks it between steps, saves a checkpoint and exits 130 or 143 (the shell's 128 + signal).
Under torchrun the flag is all-reduced (MAX) over a CPU (Gloo) group, so every rank leaves at the
same step even when one rank got the signal, and checking it never waits for the GPU.
"""
from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from trainer.errors import ConfigError


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the world: ``enabled`` under a torchrun of 2+ processes."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    enabled: bool = field(init=False)
    is_main: bool = field(init=False)

    def __post_init__(self):
        object.__setattr__(self, "enabled", self.world_size > 1)  # frozen: set once, here
        object.__setattr__(self, "is_main", self.rank == 0)


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
    index = name[5:] if name.startswith("cuda:") else ("" if name == "cuda" else None)
    if index is None or (index and not index.isdigit()):
        raise ConfigError(f"device={name!r} is not understood; use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise ConfigError(f"device={name} but CUDA is not available here; use device=cpu or device=auto")
    count = torch.cuda.device_count()
    if not index:
        if local_rank >= count:
            raise ConfigError(
                f"LOCAL_RANK={local_rank} but this node has {count} visible GPU(s): run at most {count} "
                "processes per node (torchrun --nproc_per_node)"
            )
        return torch.device("cuda", local_rank)
    if world_size > 1:
        raise ConfigError(
            f"device={name} under torchrun would put all {world_size} ranks on one GPU; use device=cuda "
            "(each rank takes GPU LOCAL_RANK) and choose GPUs with CUDA_VISIBLE_DEVICES"
        )
    if int(index) >= count:
        raise ConfigError(f"device={name} but only {count} CUDA device(s) are visible (cuda:0..cuda:{count - 1})")
    return torch.device("cuda", int(index))


def init_process(device_name: str, tf32: bool = False, deterministic: bool = False) -> tuple[DistInfo, torch.device]:
    """Set up the process a run executes in: join the process group if launched by torchrun, make
    the run's GPU the current CUDA device (Triton kernels, flash's and the fused optimizers', launch
    on the current device), and set fp32 matmul precision and determinism, both ways (never left as
    found).

    ``tf32``: on CUDA, fp32 matmuls and convolutions (cuBLAS, cuDNN, and the flash kernel's fp32
    path) may round their inputs to TF32 (10-bit mantissa) on tensor cores; off, they are full
    IEEE fp32. No effect on CPU or on bf16/fp16 matmuls.
    ``deterministic``: ``torch.use_deterministic_algorithms(True)`` (an op with no deterministic
    implementation raises, naming itself), cuBLAS's fixed workspace, cuDNN without benchmark
    mode, and flash kernels launched with pinned configs instead of autotuned ones.
    """
    world = int(os.environ.get("WORLD_SIZE", "1")) if "RANK" in os.environ else 1
    info = DistInfo(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", 0))) if world > 1 else DistInfo()
    device = resolve_device(device_name, info.local_rank, info.world_size)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if info.enabled and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    mode = "tf32" if tf32 else "ieee"
    torch.backends.cuda.matmul.fp32_precision = mode
    torch.backends.cudnn.conv.fp32_precision = mode
    if deterministic:
        # cuBLAS reads this when it creates its handle, i.e. at the first CUDA matmul
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(deterministic)
    return info, device


def broadcast_object(obj, info: DistInfo):
    """Rank 0's ``obj`` on every rank."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# ---------------------------------------------------------------------------------------------
# stop signals

HANDLED = (signal.SIGINT, signal.SIGTERM)
# torchrun forwards the Ctrl-C it receives to workers that got it from the terminal too: a copy
# that close behind the first is the same request, not a second Ctrl-C
REPEAT_WINDOW_S = 1.0


class StopSignals:
    """Install with ``with StopSignals(info) as stop:``; ``stop.requested()`` is the all-rank answer."""

    def __init__(self, info: DistInfo):
        self.info, self.signum, self._first = info, None, 0.0
        self._previous: dict[int, object] = {}
        self._group = None

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():  # signals reach the main thread only
            for s in HANDLED:
                self._previous[s] = signal.signal(s, self._handle)
        if self.info.enabled and dist.get_backend() != "gloo":
            self._group = dist.new_group(backend="gloo")
        return self

    def __exit__(self, *_exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        now = time.monotonic()
        if self.signum is None:
            self.signum, self._first = signum, now
        elif signum == signal.SIGINT and now - self._first > REPEAT_WINDOW_S:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once; a repeated SIGTERM changes nothing

    def request(self, signum: int = signal.SIGINT) -> None:
        """What a signal does, callable from code (tests, a time limit)."""
        if self.signum is None:
            self.signum, self._first = signum, time.monotonic()

    def requested(self) -> bool:
        """Whether any rank was asked to stop; a collective under torchrun (call it on every rank)."""
        if not self.info.enabled:
            return self.signum is not None
        t = torch.tensor([self.signum or 0], dtype=torch.int64)  # CPU tensor: no GPU sync
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self._group)
        if self.signum is None and int(t.item()):
            self.signum = int(t.item())  # another rank's signal: exit with the same code
        return bool(t.item())

    @property
    def exit_code(self) -> int:
        return 128 + int(self.signum or signal.SIGINT)

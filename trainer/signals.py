"""Stopping a run cleanly on Ctrl-C (SIGINT) or a scheduler's SIGTERM (Slurm, Kubernetes).

The handler only sets a flag; the loop checks it between steps, saves a checkpoint and exits
(130 for SIGINT, 143 for SIGTERM, the shell's 128 + signal number). Under torchrun the flag is
all-reduced (MAX) so every rank leaves at the same step even when only one rank got the signal;
that collective runs over a CPU (Gloo) group, so checking it never waits for the GPU.
"""
from __future__ import annotations

import signal
import threading
import time

import torch
import torch.distributed as dist

from trainer.distributed import DistInfo

HANDLED = (signal.SIGINT, signal.SIGTERM)
# torchrun forwards the Ctrl-C it receives to workers that got it from the terminal too: a copy
# that close behind the first is the same request, not a second Ctrl-C
REPEAT_WINDOW_S = 1.0


class StopSignals:
    """Install with ``with StopSignals(info) as stop:``; ``stop.requested()`` is the all-rank answer."""

    def __init__(self, info: DistInfo):
        self.info = info
        self.signum: int | None = None
        self._first = 0.0
        self._previous: dict[int, object] = {}
        self._group = None

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():  # signals reach the main thread only
            for s in HANDLED:
                self._previous[s] = signal.signal(s, self._handle)
        if self.info.enabled:
            backend = dist.get_backend()
            self._group = None if backend == "gloo" else dist.new_group(backend="gloo")
        return self

    def __exit__(self, *exc) -> None:
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
        flag = self.signum is not None
        if not self.info.enabled:
            return flag
        t = torch.tensor([self.signum or 0], dtype=torch.int64)  # CPU tensor: no GPU sync
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self._group)
        if self.signum is None and int(t.item()):
            self.signum = int(t.item())  # another rank's signal: exit with the same code
        return bool(t.item())

    @property
    def exit_code(self) -> int:
        return 128 + int(self.signum or signal.SIGINT)

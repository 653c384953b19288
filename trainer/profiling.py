"""``profile=true``: a torch.profiler trace of a few training steps, written into the run directory.

The trace (``profile/*.pt.trace.json``) opens in Perfetto (ui.perfetto.dev) or chrome://tracing,
and in TensorBoard where its profiler plugin is installed. ``profile/top_ops.txt`` holds the
operators sorted by their own time. On CUDA a memory snapshot of the same steps
(``profile/memory_snapshot.pickle``) opens at pytorch.org/memory_viz.
"""
from __future__ import annotations

from pathlib import Path

import torch

WAIT, WARMUP, ACTIVE = 2, 2, 5  # steps skipped (start-up, compile), warmed up, then recorded


class StepProfiler:
    """Call :meth:`step` after every training step; it records steps WAIT+WARMUP .. +ACTIVE, then stops."""

    def __init__(self, out_dir: str | Path, device: torch.device):
        from torch.profiler import ProfilerActivity, profile, schedule, tensorboard_trace_handler

        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.device = device
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        self._trace_handler = tensorboard_trace_handler(str(self.out_dir))
        self.prof = profile(
            activities=activities,
            schedule=schedule(wait=WAIT, warmup=WARMUP, active=ACTIVE, repeat=1),
            on_trace_ready=self._on_ready,
            record_shapes=True,
            profile_memory=True,
        )
        self.steps = 0
        self.done = False
        if device.type == "cuda":
            torch.cuda.memory._record_memory_history(max_entries=100_000)
        self.prof.start()

    def _on_ready(self, prof) -> None:
        self._trace_handler(prof)
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30)
        (self.out_dir / "top_ops.txt").write_text(table + "\n")
        if self.device.type == "cuda":
            torch.cuda.memory._dump_snapshot(str(self.out_dir / "memory_snapshot.pickle"))
            torch.cuda.memory._record_memory_history(enabled=None)

    def step(self) -> None:
        if self.done:
            return
        self.prof.step()
        self.steps += 1
        if self.steps >= WAIT + WARMUP + ACTIVE:
            self.stop()

    def stop(self) -> None:
        if not self.done:
            self.done = True
            self.prof.stop()

"""What a run reports, and the watch that stops it when it diverges.

Outputs, all in the run directory (rank 0 writes them; other ranks' monitors write nothing):
TensorBoard scalars, text and hparams; ``summary.json`` (rewritten atomically at every eval and at
the end); console progress (a tqdm bar on a terminal, plain lines otherwise) and the same lines in
``train.log``.

Divergence: every step hands its loss and gradient norm to :meth:`Monitor.watch` as device
tensors; the first non-finite one is remembered on the device (a few tiny kernels, no sync) and
read only at log points, evals and checkpoints (:meth:`Monitor.first_bad_step`), so the host keeps
queueing steps while the GPU works.
"""
from __future__ import annotations

import json
import math
import resource
import sys
import time
from pathlib import Path

import torch

from trainer.rundir import atomic_write, os_reason

SUMMARY = "summary.json"
LOG = "train.log"  # the console's lines, appended (a resumed run continues its log)
_NEVER = 2**62  # "no bad step yet" in the device record of watch()


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak-memory window, so each run of a sweep (one process) reports its own peak."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # Linux: writing 5 resets the VmHWM (peak RSS) mark
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_memory_bytes(device: torch.device) -> int:
    """CUDA: the allocator's peak; elsewhere: the process's peak resident set size since the last
    ``reset_peak_memory`` (Linux), or over the process's life where that cannot be reset."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # Linux reports KiB


class Monitor:
    """Logs, summary and divergence watch of one run; ``write=False`` on ranks other than 0."""

    def __init__(self, run_dir: Path, max_iters: int, overrides: list[str], device: torch.device,
                 start: int = 0, write: bool = True):
        self.run_dir, self.max_iters, self.device = Path(run_dir), max_iters, device
        self.started = time.perf_counter()
        self.summary = {
            "status": "running", "step": start, "max_iters": max_iters, "best_val_loss": None,
            "final_val_loss": None, "tokens_per_sec": None, "mfu": None, "tflops": None, "peak_mem_bytes": None,
            "wall_time_s": None, "overrides": list(overrides), "error": None,
        }
        self._first_bad = None  # (loss, grad norm): the first iteration each was non-finite, on the device
        self.writer = self._bar = None
        self._log_warned = False
        if not write:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(self.run_dir), purge_step=start or None)
        if sys.stdout.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=max_iters, initial=start, dynamic_ncols=True, unit="it")
        self.write_summary()

    # -- divergence --------------------------------------------------------------------------
    def watch(self, it: int, loss: torch.Tensor, grad_norm: torch.Tensor, norm_counts: bool = True) -> None:
        """Remember, on the device, the first iteration whose loss (and, with ``norm_counts``,
        whose gradient norm) was not finite. fp16's scaler skips steps with such norms itself."""
        bad = torch.stack([~torch.isfinite(loss), ~torch.isfinite(grad_norm) & norm_counts])
        first = torch.where(bad, it, _NEVER)
        self._first_bad = first if self._first_bad is None else torch.minimum(self._first_bad, first)

    def first_bad_step(self) -> str | None:
        """What went non-finite first, and when (one read of the device), or None."""
        if self._first_bad is None:
            return None
        loss_it, norm_it = self._first_bad.tolist()
        if loss_it < _NEVER and loss_it <= norm_it:
            return f"loss became non-finite (nan or inf) at step {loss_it}"
        if norm_it < _NEVER:
            return f"gradient norm became non-finite (nan or inf) at step {norm_it}"
        return None

    # -- TensorBoard and console -------------------------------------------------------------
    def scalars(self, it: int, values: dict[str, float | None]) -> None:
        for tag, value in values.items():
            if value is not None and self.writer is not None:
                self.writer.add_scalar(tag, value, it)

    def text(self, tag: str, text: str, it: int) -> None:
        if self.writer is not None:  # TensorBoard renders Markdown: indent so line breaks survive
            self.writer.add_text(tag, "    " + text.replace("\n", "\n    "), it)

    def hparams(self, hparams: dict, metric_tag: str = "val/loss") -> None:
        """Register the run's hyperparameters; TensorBoard reads the metric from ``metric_tag``."""
        if self.writer is None:
            return
        from torch.utils.tensorboard.summary import hparams as hp_summary

        clean = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in hparams.items()}
        for s in hp_summary(clean, {metric_tag: math.nan}):
            self.writer.file_writer.add_summary(s)

    def log_step(self, it: int, loss: float, lr: float, grad_norm: float, rates: dict, extra: dict) -> None:
        """A logged training step: TensorBoard scalars and one progress line."""
        self.scalars(it, {"train/loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens_per_sec": rates["tokens_per_sec"],
                          "step_ms": rates["step_ms"], "tflops": rates["tflops"], "mfu": rates["mfu"],
                          "memory/peak_bytes": peak_memory_bytes(self.device), **extra})
        mfu = "unknown" if rates["mfu"] is None else f"{rates['mfu']:.1%}"  # unknown: no peak known here
        flops = "" if rates["tflops"] is None else f", {rates['tflops']:.3g} TFLOP/s"
        line = (f"step {it:>6}/{self.max_iters}: loss {loss:.4f}, lr {lr:.2e}, "
                f"{rates['tokens_per_sec']:,.0f} tok/s, {rates['step_ms']:.1f} ms/step{flops}, mfu {mfu}")
        self.message(line, console=self._bar is None)
        if self._bar is not None:
            self._bar.n = it + 1
            self._bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{rates['tokens_per_sec']:,.0f}", mfu=mfu,
                                  refresh=False)
            self._bar.refresh()

    def message(self, text: str, console: bool = True) -> None:
        """A line for ``train.log`` and (unless ``console`` is False) the console."""
        if self.writer is None:
            return
        try:  # opened per line: a log of a few hundred lines costs nothing, and a crash loses none of it
            with open(self.run_dir / LOG, "a", encoding="utf-8") as f:
                f.write(text + "\n")
        except OSError as e:  # the log is a convenience: checkpoints and summary.json report their own errors
            if not self._log_warned:
                self._log_warned = True
                print(f"warning: cannot write {self.run_dir / LOG}: {os_reason(e)}", file=sys.stderr, flush=True)
        if console and self._bar is not None:
            self._bar.write(text)
        elif console:
            print(text, flush=True)

    # -- summary.json ------------------------------------------------------------------------
    def write_summary(self, **updates) -> None:
        self.summary.update(updates)
        if self.writer is not None:
            atomic_write(self.run_dir / SUMMARY, json.dumps(self.summary, indent=2))

    def close(self, status: str, **updates) -> dict:
        """The final summary (wall time, peak memory), written; the outputs closed."""
        self.write_summary(status=status, wall_time_s=time.perf_counter() - self.started,
                           peak_mem_bytes=peak_memory_bytes(self.device), **updates)
        if self._bar is not None:
            self._bar.close()
            self._bar = None  # later messages (the final sample) print plainly
        if self.writer is not None:
            self.writer.close()
        return dict(self.summary)

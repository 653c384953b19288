"""Run outputs: TensorBoard scalars/text/hparams, ``summary.json``, console progress, and the same
progress lines in ``train.log``.

Only rank 0 constructs a ``RunLogger``; other ranks get a ``NullLogger`` with the same methods.
"""
from __future__ import annotations

import json
import math
import os
import resource
import sys
import time
from pathlib import Path

import torch

SUMMARY = "summary.json"
LOG = "train.log"  # the console's lines, appended (a resumed run continues its log)


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


def step_scalars(metrics: dict, dt: float, tokens_per_step: int, device: torch.device, scaler=None,
                 skipped_steps: int = 0) -> dict[str, float]:
    """The TensorBoard scalars of one logged training step."""
    values = {"train/loss": metrics["loss"], "lr": metrics["lr"], "grad_norm": metrics["grad_norm"],
              "tokens_per_sec": tokens_per_step / dt, "step_ms": dt * 1000,
              "memory/peak_bytes": peak_memory_bytes(device)}
    if scaler is not None and scaler.is_enabled():
        values.update({"loss_scale": scaler.get_scale(), "skipped_steps": skipped_steps})
    return values


def run_hparams(cfg, num_params: int) -> dict:
    """The hyperparameters TensorBoard's HPARAMS tab shows for a run."""
    return {
        "attn": cfg.attn._target_.rsplit(".", 1)[-1], "optim": cfg.optim._target_.rsplit(".", 1)[-1],
        "precision": cfg.precision.name, "lr": float(cfg.learning_rate), "n_layer": cfg.model.n_layer,
        "n_embd": cfg.model.n_embd, "n_head": cfg.model.n_head, "block_size": int(cfg.block_size),
        "batch_size": int(cfg.batch_size) * int(cfg.gradient_accumulation_steps), "seed": int(cfg.seed),
        "params": num_params,
        "tf32": bool(cfg.get("tf32", False)), "deterministic": bool(cfg.get("deterministic", False)),
    }


class RunLogger:
    """Writes everything a run reports into its run directory."""

    def __init__(self, run_dir: Path, max_iters: int, overrides: list[str], purge_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter

        self.run_dir = Path(run_dir)
        self.writer = SummaryWriter(log_dir=str(self.run_dir), purge_step=purge_step)
        self.max_iters = max_iters
        self.summary = {
            "status": "running", "step": 0, "max_iters": max_iters, "best_val_loss": None,
            "final_val_loss": None, "tokens_per_sec": None, "mfu": None, "tflops": None, "peak_mem_bytes": None,
            "wall_time_s": None, "overrides": list(overrides), "error": None,
        }
        self._bar = None
        self._log_warned = False
        if sys.stdout.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=max_iters, dynamic_ncols=True, unit="it")
        self.write_summary()

    # -- TensorBoard -------------------------------------------------------------------------
    def scalars(self, step: int, values: dict[str, float]) -> None:
        for tag, value in values.items():
            if value is not None:
                self.writer.add_scalar(tag, value, step)

    def text(self, tag: str, text: str, step: int) -> None:
        # TensorBoard renders text as Markdown: indent it so line breaks survive
        self.writer.add_text(tag, "    " + text.replace("\n", "\n    "), step)

    def hparams(self, hparams: dict, metric_tag: str = "val/loss") -> None:
        """Register the run's hyperparameters; TensorBoard reads the metric from ``metric_tag``."""
        from torch.utils.tensorboard.summary import hparams as hp_summary

        clean = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in hparams.items()}
        for s in hp_summary(clean, {metric_tag: math.nan}):
            self.writer.file_writer.add_summary(s)

    # -- console -----------------------------------------------------------------------------
    def progress(self, step: int, loss: float, lr: float, tokens_per_sec: float, step_ms: float,
                 mfu: float | None = None, tflops: float | None = None) -> None:
        mfu_text = "unknown" if mfu is None else f"{mfu:.1%}"  # unknown: no peak known for this device
        flops = "" if tflops is None else f", {tflops:.3g} TFLOP/s"
        line = (f"step {step:>6}/{self.max_iters}: loss {loss:.4f}, lr {lr:.2e}, "
                f"{tokens_per_sec:,.0f} tok/s, {step_ms:.1f} ms/step{flops}, mfu {mfu_text}")
        self._to_file(line)
        if self._bar is not None:
            self._bar.n = step + 1
            self._bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_sec:,.0f}", mfu=mfu_text,
                                  refresh=False)
            self._bar.refresh()
        else:
            print(line, flush=True)

    def message(self, text: str, console: bool = True) -> None:
        """A line for the console (unless ``console`` is False) and ``train.log``."""
        self._to_file(text)
        if not console:
            return
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text, flush=True)

    def _to_file(self, text: str) -> None:
        # opened per line: a log of a few hundred lines costs nothing, and a crash loses none of it
        try:
            with open(self.run_dir / LOG, "a", encoding="utf-8") as f:
                f.write(text + "\n")
        except OSError as e:  # the log is a convenience: checkpoints and summary.json report their own errors
            if not self._log_warned:
                self._log_warned = True
                print(f"warning: cannot write {self.run_dir / LOG}: {e.strerror or e}", file=sys.stderr, flush=True)

    # -- summary.json ------------------------------------------------------------------------
    def write_summary(self, **updates) -> None:
        self.summary.update(updates)
        path = self.run_dir / SUMMARY
        tmp = path.with_name(SUMMARY + ".tmp")
        tmp.write_text(json.dumps(self.summary, indent=2))
        os.replace(tmp, path)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None  # later messages (the final sample) print plainly
        self.writer.flush()
        self.writer.close()


class NullLogger:
    """Stand-in for ranks other than 0: accepts every call, writes nothing."""

    summary: dict = {}

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


class Timer:
    """Wall-clock seconds since construction."""

    def __init__(self):
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

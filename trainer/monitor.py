"""What a run reports: its logs, its speed and MFU, and the watch that stops it when it diverges.

Outputs, all in the run directory (rank 0 writes them; other ranks' monitors write nothing):
TensorBoard scalars, text and hparams; ``summary.json`` (rewritten atomically at every eval and at
the end); console progress (a tqdm bar on a terminal, plain lines otherwise) and the same lines in
``train.log``.

Divergence: every step hands its loss and gradient norm to :meth:`Monitor.watch` as device
tensors; the first non-finite one is remembered on the device (a few tiny kernels, no sync) and
read only at log points, evals and checkpoints (:meth:`Monitor.first_bad_step`), so the host keeps
queueing steps while the GPU works.

Speed (:class:`Speed`): tokens/s, achieved TFLOP/s and model FLOPs utilization (MFU), the share
of the hardware's matmul peak a step achieves. FLOPs per token follow the PaLM appendix B /
nanoGPT convention, for forward plus backward:

    6 * N  +  12 * n_layer * T * n_embd

``N`` counts the parameters that take part in a matmul per token: every weight except the position
table (the tied token embedding is counted once, as the LM head's matmul). The attention term is
the QK^T and PV products over the full ``T x T`` score matrix. It is NOT halved for causal
masking, although a causal kernel skips about half of those blocks. That keeps our MFU comparable
with nanoGPT's and PaLM's; pass ``causal_half=True`` to count only the visible half.

Peak FLOP/s: on a GPU, the vendor's dense tensor-core peak for the device and the precision the
matmuls really run in (:data:`GPU_PEAK_TFLOPS`). An unlisted GPU gets no peak, and MFU is reported
as unknown rather than guessed (achieved TFLOP/s is still logged). On a CPU there is no datasheet
number that means anything, so the peak is *measured*: a short calibration times matmuls at the
model's own shapes and dtype, with this process's thread count, and caches the result per machine.
CPU MFU is therefore "share of what this CPU's matmul reaches at these shapes".
"""
from __future__ import annotations

import functools
import json
import math
import os
import platform
import re
import resource
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from kernels import tf32_enabled
from trainer.precision import Precision
from trainer.rundir import atomic_write, os_reason

SUMMARY = "summary.json"
LOG = "train.log"  # the console's lines, appended (a resumed run continues its log)
_NEVER = 2**62  # "no bad step yet" in the device record of watch()


# ------------------------------------------------------------------------------------------------
# FLOPs, peaks and speed (MFU)

# Dense (no sparsity) peak TFLOP/s from NVIDIA's datasheets, per precision of the matmul inputs.
# fp16 and bf16 use fp32 accumulation (what PyTorch asks for), which matters on GeForce cards.
# Matched as whole words against torch.cuda.get_device_name(), in order: specific names come first.
GPU_PEAK_TFLOPS: list[tuple[str, dict[str, float]]] = [
    ("H200 NVL", dict(bf16=835.0, fp16=835.0, tf32=417.5, fp32=60.0)),
    ("H200", dict(bf16=989.4, fp16=989.4, tf32=494.7, fp32=66.9)),
    ("H100 NVL", dict(bf16=835.0, fp16=835.0, tf32=417.5, fp32=60.0)),
    ("H100 PCIe", dict(bf16=756.0, fp16=756.0, tf32=378.0, fp32=51.2)),
    ("H100", dict(bf16=989.4, fp16=989.4, tf32=494.7, fp32=66.9)),  # SXM (e.g. "H100 80GB HBM3")
    ("GH200", dict(bf16=989.4, fp16=989.4, tf32=494.7, fp32=66.9)),
    ("A100", dict(bf16=312.0, fp16=312.0, tf32=156.0, fp32=19.5)),
    ("L40S", dict(bf16=362.1, fp16=362.1, tf32=183.0, fp32=91.6)),
    ("L40", dict(bf16=181.0, fp16=181.0, tf32=90.5, fp32=90.5)),
    ("L4", dict(bf16=121.0, fp16=121.0, tf32=60.0, fp32=30.3)),
    ("RTX 4090", dict(bf16=165.2, fp16=165.2, tf32=82.6, fp32=82.6)),
    ("RTX 3090", dict(bf16=71.0, fp16=71.0, tf32=35.6, fp32=35.6)),
    ("V100", dict(fp16=125.0, fp32=15.7)),  # no bf16 or tf32 tensor cores
    ("T4", dict(fp16=65.0, fp32=8.1)),
]

CALIBRATION_FILE = "mfu_cpu_calibration.json"


def flops_per_token(n_params: int, n_layer: int, n_embd: int, seq_len: int, causal_half: bool = False) -> float:
    """Training FLOPs (forward + backward) per token: ``6 N + 12 L T d`` (see the module docstring)."""
    attention = 12 * n_layer * seq_len * n_embd
    return 6.0 * n_params + (attention / 2 if causal_half else attention)


def model_flops_per_token(model: torch.nn.Module, seq_len: int, causal_half: bool = False) -> float:
    """:func:`flops_per_token` for a ``models.GPT`` trained at sequence length ``seq_len``."""
    cfg = model.config
    return flops_per_token(model.num_params(non_embedding=True), cfg.n_layer, cfg.n_embd, seq_len, causal_half)


def matmul_precision(device: torch.device, precision: str) -> str:
    """The input precision the model's matmuls really run in: fp32 becomes tf32 where torch allows it."""
    if precision == "fp32" and device.type == "cuda" and tf32_enabled():
        return "tf32"
    return precision


def gpu_peak_flops(device_name: str, precision: str) -> float | None:
    """Dense peak FLOP/s of one GPU at ``precision`` (fp32/tf32/bf16/fp16), or None if not listed."""
    for pattern, peaks in GPU_PEAK_TFLOPS:
        if re.search(rf"\b{re.escape(pattern)}\b", device_name, re.IGNORECASE):
            tflops = peaks.get(precision)
            return None if tflops is None else tflops * 1e12
    return None


# ------------------------------------------------------------------------------------------------
# CPU calibration


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _timed_matmuls(mats: list[tuple[torch.Tensor, torch.Tensor]], min_seconds: float) -> float:
    """Seconds per pass over ``mats``: the best of a few timed bursts (the least disturbed by other
    processes on a shared machine)."""
    for a, b in mats:  # warm-up: thread pool, oneDNN kernel selection
        a @ b
    best = float("inf")
    for _ in range(5):
        n, t0 = 0, time.perf_counter()
        while True:
            for a, b in mats:
                a @ b
            n += 1
            dt = time.perf_counter() - t0
            if dt >= min_seconds / 5:
                break
        best = min(best, dt / n)
    return best


def measure_cpu_flops(tokens: int, n_embd: int, vocab_size: int, dtype: torch.dtype = torch.float32,
                      seconds: float = 0.25) -> float:
    """FLOP/s of this CPU on the matmuls of one transformer layer plus the LM head at the model's
    shapes: ``(tokens, d) @ (d, 3d | 4d | d)``, ``(tokens, 4d) @ (4d, d)`` and ``(tokens, d) @ (d, V)``."""
    gen = torch.Generator().manual_seed(0)
    d = n_embd
    shapes = [(d, 3 * d), (d, d), (d, 4 * d), (4 * d, d), (d, vocab_size)]
    mats = [(torch.randn(tokens, k, generator=gen).to(dtype), torch.randn(k, n, generator=gen).to(dtype))
            for k, n in shapes]
    flops = sum(2.0 * tokens * k * n for k, n in shapes)
    return flops / _timed_matmuls(mats, seconds)


def cpu_peak_flops(tokens: int, n_embd: int, vocab_size: int, dtype: torch.dtype, cache_dir: str | os.PathLike,
                   seconds: float = 0.25, remeasure: bool = False) -> float:
    """:func:`measure_cpu_flops`, measured once per machine, thread count, torch version, dtype and
    shape, and cached in ``cache_dir`` (``remeasure``: measure again and replace the cached value)."""
    key = (f"{platform.node()}|{_cpu_name()}|threads={torch.get_num_threads()}|torch={torch.__version__}|"
           f"{dtype}|tokens={tokens},d={n_embd},V={vocab_size}")
    path = Path(cache_dir) / CALIBRATION_FILE
    try:
        table = json.loads(path.read_text())
    except (OSError, ValueError):
        table = {}
    if key in table and not remeasure:
        return float(table[key])
    flops = measure_cpu_flops(tokens, n_embd, vocab_size, dtype, seconds)
    table[key] = flops
    try:  # a read-only cache only costs a re-measurement next time
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(table, indent=1))
        os.replace(tmp, path)
    except OSError:
        pass
    return flops


def peak_flops_for(device: torch.device, precision: str, *, tokens: int, n_embd: int, vocab_size: int,
                   cache_dir: str | os.PathLike, peak_tflops: float | None = None) -> tuple[float | None, str]:
    """The peak FLOP/s of ``device`` for a run at ``precision`` and where the number came from.

    ``peak_tflops`` (the user's own number) wins; a GPU uses the datasheet table; a CPU is
    calibrated at the model's shapes. An unlisted GPU returns ``(None, reason)``.
    """
    if peak_tflops:
        return float(peak_tflops) * 1e12, "set by peak_tflops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        mp = matmul_precision(device, precision)
        peak = gpu_peak_flops(name, mp)
        if peak is None:
            return None, f"{name} at {mp} is not in trainer/monitor.py's table; set peak_tflops=<dense TFLOP/s> for MFU"
        return peak, f"{name}, {mp} dense datasheet peak"
    if device.type == "cpu":
        peak = cpu_peak_flops(tokens, n_embd, vocab_size, Precision(precision).dtype, cache_dir)
        return peak, f"measured {precision} matmul at the model's shapes, {torch.get_num_threads()} threads"
    return None, f"no peak known for device type {device.type}; set peak_tflops=<dense TFLOP/s> for MFU"


# ------------------------------------------------------------------------------------------------
# what the trainer uses


class Speed:
    """Training speed between log points: ms per step, tokens/s, achieved TFLOP/s per device, MFU.

    ``tokens_per_step`` is the global batch (all ranks, all accumulation steps); the work is shared
    by ``world_size`` devices, each with peak ``peak_flops`` (None: unknown, MFU not reported).
    The clock is read (and CUDA synchronized, so a step's kernels are charged to it) only at log
    points, never per step: the host keeps running ahead of the GPU in between. Evaluation and
    checkpoints are left out by calling :meth:`restart` after them. The run's average excludes the
    window holding the process's first step (warm-up, autotuning, compilation) unless there is no
    other. A measured (CPU) peak that a run beats was calibrated on a loaded machine: ``remeasure``
    measures it again, once; ``note`` then says what happened, for the log (read and cleared by it).
    """

    def __init__(self, flops_per_token: float, tokens_per_step: int, device: torch.device, world_size: int = 1,
                 peak_flops: float | None = None, peak_source: str = "", remeasure: Callable[[], float] | None = None,
                 clock: Callable[[], float] = time.perf_counter, start: int = 0):
        self.flops_per_token, self.tokens_per_step, self.world_size = flops_per_token, tokens_per_step, world_size
        self.peak_flops, self.peak_source, self.remeasure = peak_flops, peak_source, remeasure
        self.device, self.clock, self.note, self.unreported = device, clock, None, False
        self.first: tuple[int, float] | None = None  # (steps, seconds) of the first window
        self.total_steps, self.total_seconds = 0, 0.0  # of the later windows
        self.restart(start)

    def restart(self, iteration: int) -> None:
        """Start a new window at ``iteration`` (after an evaluation or a checkpoint)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.start, self.t0 = iteration, self.clock()

    def lap(self, iteration: int) -> dict[str, float | None] | None:
        """Rates over the steps since the window began, up to ``iteration`` (None if none); a new window starts."""
        steps, t0 = iteration - self.start, self.t0
        self.restart(iteration)
        if steps == 0:
            return None
        seconds = self.t0 - t0
        if self.first is None:
            self.first = (steps, seconds)
        else:
            self.total_steps += steps
            self.total_seconds += seconds
        return self.rates(seconds / steps)

    def rates(self, step_seconds: float) -> dict[str, float | None]:
        tflops = self.flops_per_token * self.tokens_per_step / self.world_size / step_seconds / 1e12
        mfu = tflops * 1e12 / self.peak_flops if self.peak_flops else None
        if mfu is not None and mfu > 1 and self.remeasure is not None:
            # the run beats the matmul rate its peak came from: that calibration was measured on a
            # loaded machine (and cached). Measure again now, once; if that is still below, say so.
            old, self.peak_flops, self.remeasure = self.peak_flops, self.remeasure(), None
            mfu = tflops * 1e12 / self.peak_flops
            self.note = (f"MFU: the cached CPU calibration ({old / 1e12:.3g} TFLOP/s) was below this run's "
                         f"{tflops:.3g} TFLOP/s (measured on a loaded machine?); re-measured: "
                         f"{self.peak_flops / 1e12:.3g} TFLOP/s")
            self.peak_source += "; re-measured during the run"
        if mfu is not None and mfu > 1:
            mfu = None  # a peak below the achieved rate cannot be the peak: unknown, not a false figure
            if not self.unreported:  # said once
                self.unreported = True
                self.note = (f"{self.note}; still below it: MFU is not reported" if self.note else
                             f"MFU: this run's {tflops:.3g} TFLOP/s exceed the peak {self.peak_flops / 1e12:.3g} "
                             f"TFLOP/s ({self.peak_source}): MFU is not reported")
        return {"step_ms": step_seconds * 1e3, "tokens_per_sec": self.tokens_per_step / step_seconds,
                "tflops": tflops, "mfu": mfu}

    def summary(self) -> dict[str, float | None]:
        """Averages over the run's steady windows (or the first one, if it is all there is)."""
        steps, seconds = (self.total_steps, self.total_seconds) if self.total_steps else (self.first or (0, 0.0))
        if not steps:
            return {"tokens_per_sec": None, "tflops": None, "mfu": None}
        rates = self.rates(seconds / steps)
        return {"tokens_per_sec": rates["tokens_per_sec"], "tflops": rates["tflops"], "mfu": rates["mfu"]}

    def describe(self) -> str:
        peak = "unknown" if not self.peak_flops else f"{self.peak_flops / 1e12:.3g} TFLOP/s per device"
        return (f"MFU: {self.flops_per_token / 1e6:.3g} MFLOP per token (6N + 12LTd, full T x T attention); "
                f"peak {peak} ({self.peak_source})")


def speed_for_run(model: torch.nn.Module, device: torch.device, precision: str, *, seq_len: int, micro_batch: int,
                  tokens_per_step: int, world_size: int, cache_dir: str | os.PathLike,
                  peak_tflops: float | None = None, start: int = 0) -> Speed:
    """The :class:`Speed` of a training run (the CPU calibration uses the run's micro-batch shapes)."""
    shape = dict(tokens=micro_batch * seq_len, n_embd=model.config.n_embd, vocab_size=model.config.vocab_size)
    peak, source = peak_flops_for(device, precision, **shape, cache_dir=cache_dir, peak_tflops=peak_tflops)
    remeasure = None
    if device.type == "cpu" and not peak_tflops:
        remeasure = functools.partial(cpu_peak_flops, **shape, dtype=Precision(precision).dtype, cache_dir=cache_dir,
                                      remeasure=True)
    return Speed(model_flops_per_token(model, seq_len), tokens_per_step, device, world_size, peak, source, remeasure,
                 start=start)


# ------------------------------------------------------------------------------------------------
# the run's outputs


class TrainClock:
    """Training time with the evals taken out (as the speedrun counts it), and ``target_val_loss``:
    the first eval at or below it records the time, tokens and steps to it (``reached``).
    Times count from this process's :meth:`start`; a resumed run starts a new clock."""

    def __init__(self, target: float | None, tokens_per_step: int):
        self.target, self.tokens_per_step = target, tokens_per_step
        self.started = self.eval_started = time.perf_counter()
        self.eval_s, self.reached = 0.0, None

    def start(self) -> None:
        self.started = time.perf_counter()

    def start_eval(self) -> None:
        self.eval_started = time.perf_counter()

    def end_eval(self, it: int, val: float, monitor: "Monitor") -> dict:
        """Books the eval that began at :meth:`start_eval`; returns the summary's timing entries."""
        train_s = self.eval_started - self.started - self.eval_s
        self.eval_s += time.perf_counter() - self.eval_started  # evaluation, sample and checkpoint writing
        monitor.scalars(it, {"time/train_s": train_s, "time/eval_s": self.eval_s})
        if self.target is not None and self.reached is None and val <= self.target:
            tokens = it * self.tokens_per_step
            self.reached = {"reached_target": True, "steps_to_target": it, "tokens_to_target": tokens,
                            "time_to_target_s": train_s}
            monitor.scalars(it, {f"target/{k}": v for k, v in self.reached.items() if k != "reached_target"})
            monitor.message(f"reached target_val_loss={self.target:g} at step {it} (val loss {val:.4f}): "
                            f"{train_s:.2f} s of training, {tokens:,} tokens; evaluation so far "
                            f"{self.eval_s:.2f} s, not counted")
        extra = {} if self.target is None else {"target_val_loss": float(self.target), "reached_target": False,
                                                **(self.reached or {})}
        return {"eval_time_s": self.eval_s, **extra}


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


def run_hparams(cfg, num_params: int) -> dict:
    """The hyperparameters TensorBoard's HPARAMS tab shows for a run."""
    return {
        "attn": cfg.attn._target_.rsplit(".", 1)[-1], "optim": cfg.optim._target_.rsplit(".", 1)[-1],
        "precision": cfg.precision.name, "lr": float(cfg.learning_rate), "n_layer": cfg.model.n_layer,
        "n_embd": cfg.model.n_embd, "n_head": cfg.model.n_head, "block_size": int(cfg.block_size),
        "batch_size": int(cfg.batch_size) * int(cfg.gradient_accumulation_steps), "seed": int(cfg.seed),
        "params": num_params, "tf32": bool(cfg.get("tf32", False)), "deterministic": bool(cfg.get("deterministic", False)),
    }


def all_finite(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> bool:
    """Whether every weight and floating optimizer state is finite: one device read per device
    (step counters live on the CPU, weights maybe not)."""
    flags: dict[torch.device, list[torch.Tensor]] = {}
    for t in [*model.parameters(), *[v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]]:
        if t.is_floating_point():
            flags.setdefault(t.device, []).append(torch.isfinite(t).all())
    return all([bool(torch.stack(f).all()) for f in flags.values()])


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

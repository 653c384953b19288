"""What a run reports: its logs, its speed and MFU, its training clock, and the watch that stops it
when it diverges. One :class:`Monitor` per run holds all of it; the loop hands it what happened.

Outputs, all in the run directory (rank 0 writes them; other ranks' monitors measure the same and
write nothing): TensorBoard scalars, text and hparams; ``summary.json`` (rewritten atomically at
every eval and at the end); console progress (a tqdm bar on a terminal, plain lines otherwise) and
the same lines in ``train.log``.

Divergence: every step hands its loss and gradient norm to :meth:`Monitor.watch` as device
tensors; the first non-finite one is remembered on the device (a few tiny kernels, no sync) and
read only at log points, evals and checkpoints (:meth:`Monitor.diverged`, which before a
checkpoint also checks every weight and optimizer state), so the host keeps queueing steps while
the GPU works.

Speed: tokens/s, achieved TFLOP/s and model FLOPs utilization (MFU), the share of the hardware's
matmul peak a step achieves, over the steps between two log points (a window; evaluation and
checkpoints restart it). The clock is read (and CUDA synchronized) only at log points. The run's
average excludes the window holding the process's first step (warm-up, autotuning, compilation)
unless there is no other. FLOPs per token follow the PaLM appendix B / nanoGPT convention, for
forward plus backward (:func:`flops_per_token`):

    6 * N  +  12 * n_layer * T * n_embd

``N`` counts the parameters that take part in a matmul per token: every weight except the position
table (the tied token embedding is counted once, as the LM head's matmul). The attention term is
the QK^T and PV products over the full ``T x T`` score matrix. It is NOT halved for causal
masking, although a causal kernel skips about half of those blocks. That keeps our MFU comparable
with nanoGPT's and PaLM's; pass ``causal_half=True`` to count only the visible half.

Peak FLOP/s (:func:`peak_flops`): on a GPU, the vendor's dense tensor-core peak for the device and
the precision the matmuls really run in (:data:`GPU_PEAK_TFLOPS`). An unlisted GPU gets no peak,
and MFU is reported as unknown rather than guessed (achieved TFLOP/s is still logged). On a CPU
there is no datasheet number that means anything, so the peak is *measured*: a short calibration
times matmuls at the model's own shapes and dtype, with this process's thread count, and caches the
result per machine. CPU MFU is therefore "share of what this CPU's matmul reaches at these shapes".
A run that beats its measured peak was calibrated on a loaded machine: the peak is measured again,
once, and if the run still beats it MFU is not reported (the log says which).

Training clock (``target_val_loss``, as the speedrun counts it): training time with the evals,
samples and checkpoints taken out, from the monitor's start (the run is built; its steps follow),
logged at every eval as ``time/train_s`` and ``time/eval_s``. The first eval at or below the
target records ``time_to_target_s``, ``tokens_to_target`` and ``steps_to_target`` in the summary
(and ``target/*`` scalars), says so in the log, and ends the run (:attr:`Monitor.reached`).
"""
from __future__ import annotations

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
CALIBRATION_FILE = "mfu_cpu_calibration.json"  # in the data cache directory: measured CPU peaks
_NEVER = 2**62  # "no bad step yet" in the device record of watch()


# ------------------------------------------------------------------------------------------------
# FLOPs, peaks, memory

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


def flops_per_token(model: torch.nn.Module, seq_len: int, causal_half: bool = False) -> float:
    """Training FLOPs (forward + backward) per token of a ``models.GPT`` trained at sequence length
    ``seq_len``: ``6 N + 12 L T d`` (see the module docstring)."""
    cfg = model.config
    attention = 12 * cfg.n_layer * seq_len * cfg.n_embd
    return 6.0 * model.num_params(non_embedding=True) + (attention / 2 if causal_half else attention)


def peak_flops(device: torch.device, precision: str, *, tokens: int = 0, n_embd: int = 0, vocab_size: int = 0,
               cache_dir: str | os.PathLike | None = None, peak_tflops: float | None = None,
               remeasure: bool = False) -> tuple[float | None, str]:
    """The peak FLOP/s of one ``device`` for matmuls at ``precision`` and where the number came from.

    ``peak_tflops`` (the user's own number) wins. A GPU is looked up in :data:`GPU_PEAK_TFLOPS` at
    the precision its matmuls really run in (fp32 is tf32 where torch allows it); an unlisted one
    gives ``(None, why)``. A CPU is measured (:func:`measure_cpu_flops`) at the model's shapes
    (``tokens x n_embd``, ``vocab_size``), once per machine, thread count, torch version, dtype and
    shape, and cached in ``cache_dir``; ``remeasure``: measure again and replace the cached value.
    """
    if peak_tflops:
        return float(peak_tflops) * 1e12, "set by peak_tflops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        mp = "tf32" if precision == "fp32" and tf32_enabled() else precision
        for pattern, peaks in GPU_PEAK_TFLOPS:
            if re.search(rf"\b{re.escape(pattern)}\b", name, re.IGNORECASE):
                if mp in peaks:
                    return peaks[mp] * 1e12, f"{name}, {mp} dense datasheet peak"
                break
        return None, f"{name} at {mp} is not in trainer/monitor.py's table; set peak_tflops=<dense TFLOP/s> for MFU"
    if device.type != "cpu":
        return None, f"no peak known for device type {device.type}; set peak_tflops=<dense TFLOP/s> for MFU"
    cpu, dtype = platform.processor() or platform.machine(), Precision(precision).dtype
    try:  # Linux names the model
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    key = (f"{platform.node()}|{cpu}|threads={torch.get_num_threads()}|torch={torch.__version__}|"
           f"{dtype}|tokens={tokens},d={n_embd},V={vocab_size}")
    source = f"measured {precision} matmul at the model's shapes, {torch.get_num_threads()} threads"
    path = Path(cache_dir) / CALIBRATION_FILE
    try:
        table = json.loads(path.read_text())
    except (OSError, ValueError):
        table = {}
    if key in table and not remeasure:
        return float(table[key]), source
    table[key] = measure_cpu_flops(tokens, n_embd, vocab_size, dtype)
    try:  # a read-only cache only costs a re-measurement next time
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(table, indent=1))
        os.replace(tmp, path)
    except OSError:
        pass
    return table[key], source


def measure_cpu_flops(tokens: int, n_embd: int, vocab_size: int, dtype: torch.dtype = torch.float32,
                      seconds: float = 0.25) -> float:
    """FLOP/s of this CPU on the matmuls of one transformer layer plus the LM head at the model's
    shapes: ``(tokens, d) @ (d, 3d | d | 4d)``, ``(tokens, 4d) @ (4d, d)`` and ``(tokens, d) @ (d, V)``.
    The best of five timed bursts: the one least disturbed by other processes on a shared machine."""
    gen, d, mats = torch.Generator().manual_seed(0), n_embd, []
    for k, n in [(d, 3 * d), (d, d), (d, 4 * d), (4 * d, d), (d, vocab_size)]:
        a, b = torch.randn(tokens, k, generator=gen).to(dtype), torch.randn(k, n, generator=gen).to(dtype)
        a @ b  # warm-up: thread pool, oneDNN kernel selection
        mats.append((a, b))
    best = math.inf
    for _ in range(5):
        passes, t0 = 0, time.perf_counter()
        while True:
            for a, b in mats:
                a @ b
            passes += 1
            dt = time.perf_counter() - t0
            if dt >= seconds / 5:
                break
        best = min(best, dt / passes)
    return 2.0 * tokens * d * (12 * d + vocab_size) / best  # a multiply-add per weight: 12 d^2 per layer, d V head


def peak_memory(device: torch.device, reset: bool = False) -> int:
    """Peak memory of this process in bytes since the last reset. CUDA: the allocator's peak;
    elsewhere the peak resident set size (Linux; over the process's life where it cannot be reset).
    ``reset``: start a new window first, so each run of a sweep (one process) reports its own peak;
    the peak returned is then the usage now."""
    if device.type == "cuda":
        if reset:
            torch.cuda.reset_peak_memory_stats(device)
        return int(torch.cuda.max_memory_allocated(device))
    try:
        if reset:  # Linux: writing 5 resets the VmHWM (peak RSS) mark
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
    except OSError:
        pass
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # Linux reports KiB


# ------------------------------------------------------------------------------------------------
# the monitor of a run


class Monitor:
    """Logs, speed, training clock, summary and divergence watch of one run, from the moment the
    run is built (``model`` on ``device``, ``cfg`` its config). ``tokens_per_step`` is the global
    batch (all ranks, all accumulation steps), its work shared by ``world_size`` devices; the CPU
    calibration is cached in ``cache_dir``. ``write=False`` on ranks other than 0. ``clock``: the
    time source of the speed windows and the training clock (tests pass their own)."""

    def __init__(self, run_dir: str | Path, cfg, model: torch.nn.Module, device: torch.device, *,
                 tokens_per_step: int, world_size: int = 1, overrides: list[str] = (), start: int = 0,
                 cache_dir: str | os.PathLike | None = None, write: bool = True,
                 clock: Callable[[], float] = time.perf_counter):
        self.run_dir, self.device, self.clock, self.started = Path(run_dir), device, clock, clock()
        self.max_iters, self.target = int(cfg.max_iters), cfg.get("target_val_loss")
        self.tokens_per_step, self.world_size = tokens_per_step, world_size
        self.summary = {
            "status": "running", "step": start, "max_iters": self.max_iters, "best_val_loss": None,
            "final_val_loss": None, "tokens_per_sec": None, "mfu": None, "tflops": None, "peak_mem_bytes": None,
            "wall_time_s": None, "overrides": list(overrides), "error": None,
        }
        self._first_bad = None  # (loss, grad norm): the first iteration each was non-finite, on the device
        self.writer = self._bar = self.note = None
        self._log_warned = self._unreported = False
        # MFU: the model's FLOPs per token against the device's peak (a CPU's measured at a micro-batch)
        self.precision, n_params, peak_tflops = str(cfg.precision.name), model.num_params(), cfg.get("peak_tflops")
        self.flops_per_token = flops_per_token(model, int(cfg.block_size))
        shape = dict(tokens=int(cfg.batch_size) * int(cfg.block_size), n_embd=model.config.n_embd,
                     vocab_size=model.config.vocab_size, cache_dir=cache_dir)
        self.peak_flops, self.peak_source = peak_flops(device, self.precision, **shape, peak_tflops=peak_tflops)
        self._remeasure = shape if device.type == "cpu" and not peak_tflops else None  # once, if the run beats it
        if write:
            from torch.utils.tensorboard import SummaryWriter
            from torch.utils.tensorboard.summary import hparams

            self.writer = SummaryWriter(log_dir=str(self.run_dir), purge_step=start or None)
            if sys.stdout.isatty():
                from tqdm import tqdm

                self._bar = tqdm(total=self.max_iters, initial=start, dynamic_ncols=True, unit="it")
            run = {  # TensorBoard's HPARAMS tab, against the val/loss curve
                "attn": cfg.attn._target_.rsplit(".", 1)[-1], "optim": cfg.optim._target_.rsplit(".", 1)[-1],
                "precision": self.precision, "lr": float(cfg.learning_rate), "n_layer": int(cfg.model.n_layer),
                "n_embd": int(cfg.model.n_embd), "n_head": int(cfg.model.n_head), "block_size": int(cfg.block_size),
                "batch_size": int(cfg.batch_size) * int(cfg.gradient_accumulation_steps), "seed": int(cfg.seed),
                "params": n_params, "tf32": bool(cfg.get("tf32", False)),
                "deterministic": bool(cfg.get("deterministic", False)),
            }
            for s in hparams(run, {"val/loss": math.nan}):
                self.writer.file_writer.add_summary(s)
            self.write_summary()
        peak = "unknown" if not self.peak_flops else f"{self.peak_flops / 1e12:.3g} TFLOP/s per device"
        self.message(f"model: {n_params / 1e6:.2f}M parameters, vocab {model.config.vocab_size}; "
                     f"{tokens_per_step:,} tokens per step on {world_size} process(es), device {device}")
        self.message(f"MFU: {self.flops_per_token / 1e6:.3g} MFLOP per token (6N + 12LTd, full T x T attention); "
                     f"peak {peak} ({self.peak_source})")
        peak_memory(device, reset=True)
        # the first speed window and the training clock start here: the run's steps follow
        self._window = (start, self._synced_now())  # (iteration, time) the current speed window began at
        self._first: tuple[int, float] | None = None  # (steps, seconds) of the first window
        self._steps, self._seconds = 0, 0.0  # of the later windows
        self._train_started, self.eval_s = self._window[1], 0.0
        self.reached: dict | None = None  # the summary's *_to_target entries, once target_val_loss is reached

    # -- divergence --------------------------------------------------------------------------
    def watch(self, it: int, loss: torch.Tensor, grad_norm: torch.Tensor, norm_counts: bool = True) -> None:
        """Remember, on the device, the first iteration whose loss (and, with ``norm_counts``,
        whose gradient norm) was not finite. fp16's scaler skips steps with such norms itself."""
        bad = torch.stack([~torch.isfinite(loss), ~torch.isfinite(grad_norm) & norm_counts])
        first = torch.where(bad, it, _NEVER)
        self._first_bad = first if self._first_bad is None else torch.minimum(self._first_bad, first)

    def diverged(self, model: torch.nn.Module | None = None, optimizer: torch.optim.Optimizer | None = None,
                 step: int | None = None) -> str | None:
        """What went non-finite first, or None: a step's loss or gradient norm (one read of the device)
        and, given ``model`` and ``optimizer`` (by iteration ``step``), a weight or floating optimizer
        state (one read per device: step counters live on the CPU, weights maybe not)."""
        if self._first_bad is not None:
            loss_it, norm_it = self._first_bad.tolist()
            if loss_it < _NEVER and loss_it <= norm_it:
                return f"loss became non-finite (nan or inf) at step {loss_it}"
            if norm_it < _NEVER:
                return f"gradient norm became non-finite (nan or inf) at step {norm_it}"
        if model is None:
            return None
        tensors, finite = list(model.parameters()), {}
        for state in optimizer.state.values():
            tensors += state.values()
        for t in tensors:
            if torch.is_tensor(t) and t.is_floating_point():
                finite.setdefault(t.device, []).append(torch.isfinite(t).all())
        for flags in finite.values():
            if not bool(torch.stack(flags).all()):
                return f"weights or optimizer state became non-finite by step {step}"
        return None

    # -- speed -------------------------------------------------------------------------------
    def _synced_now(self) -> float:
        """The clock, once the device has run what was queued (so a window is charged its kernels)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return self.clock()

    def _rates(self, steps: int, seconds: float) -> dict[str, float | None]:
        """ms per step, tokens/s, achieved TFLOP/s per device and MFU of ``steps`` in ``seconds``."""
        step_s = seconds / steps
        tflops = self.flops_per_token * self.tokens_per_step / self.world_size / step_s / 1e12
        if self.peak_flops and tflops * 1e12 > self.peak_flops and self._remeasure is not None:
            # the run beats the matmul rate its peak came from: that calibration was measured on a
            # loaded machine (and cached). Measure again now, once; if that is still below, say so.
            old = self.peak_flops
            self.peak_flops = peak_flops(self.device, self.precision, **self._remeasure, remeasure=True)[0]
            self._remeasure = None
            self.peak_source += "; re-measured during the run"
            self.note = (f"MFU: the cached CPU calibration ({old / 1e12:.3g} TFLOP/s) was below this run's "
                         f"{tflops:.3g} TFLOP/s (measured on a loaded machine?); re-measured: "
                         f"{self.peak_flops / 1e12:.3g} TFLOP/s")
        mfu = tflops * 1e12 / self.peak_flops if self.peak_flops else None
        if mfu is not None and mfu > 1:
            mfu = None  # a peak below the achieved rate cannot be the peak: unknown, not a false figure
            if not self._unreported:  # said once
                self._unreported = True
                self.note = (f"{self.note}; still below it: MFU is not reported" if self.note else
                             f"MFU: this run's {tflops:.3g} TFLOP/s exceed the peak {self.peak_flops / 1e12:.3g} "
                             f"TFLOP/s ({self.peak_source}): MFU is not reported")
        return {"step_ms": step_s * 1e3, "tokens_per_sec": self.tokens_per_step / step_s, "tflops": tflops, "mfu": mfu}

    # -- TensorBoard and console -------------------------------------------------------------
    def record(self, it: int, values: dict[str, float | str | None]) -> None:
        """TensorBoard entries at step ``it``: numbers as scalars, strings as text; None is not written."""
        if self.writer is None:
            return
        for tag, value in values.items():
            if isinstance(value, str):  # TensorBoard renders Markdown: indent so line breaks survive
                self.writer.add_text(tag, "    " + value.replace("\n", "\n    "), it)
            elif value is not None:
                self.writer.add_scalar(tag, value, it)

    def log_step(self, it: int, loss: float, lr: float, grad_norm: float, extra: dict) -> None:
        """A logged training step ``it``: the speed of the window that ends with it (the next starts),
        TensorBoard scalars and one progress line; a note on the peak, once, when there is one."""
        (start, t0), now = self._window, self._synced_now()
        steps, seconds, self._window = it + 1 - start, now - t0, (it + 1, now)
        if self._first is None:
            self._first = (steps, seconds)
        else:
            self._steps, self._seconds = self._steps + steps, self._seconds + seconds
        rates = self._rates(steps, seconds)
        self.record(it, {"train/loss": loss, "lr": lr, "grad_norm": grad_norm, **rates,
                         "memory/peak_bytes": peak_memory(self.device), **extra})
        mfu = "unknown" if rates["mfu"] is None else f"{rates['mfu']:.1%}"  # unknown: no peak known here
        line = (f"step {it:>6}/{self.max_iters}: loss {loss:.4f}, lr {lr:.2e}, {rates['tokens_per_sec']:,.0f} tok/s, "
                f"{rates['step_ms']:.1f} ms/step, {rates['tflops']:.3g} TFLOP/s, mfu {mfu}")
        self.message(line, console=self._bar is None)
        if self._bar is not None:
            self._bar.n = it + 1
            self._bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{rates['tokens_per_sec']:,.0f}", mfu=mfu,
                                  refresh=False)
            self._bar.refresh()
        if self.note:  # the peak was re-measured or found wrong: said once
            self.message(self.note)
            self.note = None

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

    # -- evals and summary.json --------------------------------------------------------------
    def end_eval(self, it: int, val: float, started: float, final: bool = False, **updates) -> None:
        """Book the evaluation of step ``it`` (val loss ``val``) that began at ``started`` (a reading of
        :attr:`clock`): it, its sample and checkpoint are not training time. Checks ``target_val_loss``,
        writes the summary with ``updates`` (``final_val_loss`` from the ``final`` eval or the one that
        reached the target) and starts a new speed window."""
        train_s = started - self._train_started - self.eval_s
        self.eval_s += self.clock() - started
        self.record(it, {"time/train_s": train_s, "time/eval_s": self.eval_s})
        if self.target is not None and self.reached is None and val <= self.target:
            tokens = it * self.tokens_per_step
            self.reached = {"reached_target": True, "steps_to_target": it, "tokens_to_target": tokens,
                            "time_to_target_s": train_s}
            self.record(it, {"target/steps_to_target": it, "target/tokens_to_target": tokens,
                             "target/time_to_target_s": train_s})
            self.message(f"reached target_val_loss={self.target:g} at step {it} (val loss {val:.4f}): "
                         f"{train_s:.2f} s of training, {tokens:,} tokens; evaluation so far "
                         f"{self.eval_s:.2f} s, not counted")
        target = {} if self.target is None else {"target_val_loss": float(self.target), "reached_target": False,
                                                 **(self.reached or {})}
        self.write_summary(step=it, final_val_loss=val if final or self.reached else None, **updates,
                           eval_time_s=self.eval_s, **target)
        self._window = (it, self._synced_now())

    def write_summary(self, **updates) -> None:
        self.summary.update(updates)
        if self.writer is not None:
            atomic_write(self.run_dir / SUMMARY, json.dumps(self.summary, indent=2))

    def close(self, status: str, **updates) -> dict:
        """The final summary (speed averaged over the steady windows, wall time, peak memory), written;
        the outputs closed."""
        steps, seconds = (self._steps, self._seconds) if self._steps else (self._first or (0, 0.0))
        rates = self._rates(steps, seconds) if steps else {}
        self.write_summary(status=status, wall_time_s=self.clock() - self.started,
                           peak_mem_bytes=peak_memory(self.device), tokens_per_sec=rates.get("tokens_per_sec"),
                           tflops=rates.get("tflops"), mfu=rates.get("mfu"), **updates)
        if self._bar is not None:
            self._bar.close()
            self._bar = None  # later messages (the final sample) print plainly
        if self.writer is not None:
            self.writer.close()
        return dict(self.summary)

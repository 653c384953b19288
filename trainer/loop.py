"""The training loop: ``Trainer(cfg, run_dir).fit()``, read top to bottom like nanoGPT's train.py.

``__init__`` builds the run from a resolved config (Hydra composes it in ``scripts/train.py``):
the process, the run directory, then every component from its ``_target_`` (precision, data,
model with its attention, optimizer, schedule), so this file never branches on which one was
chosen; then the checkpoint it resumes from, if any. ``fit`` runs the steps. Three collaborators
hold the rest: ``RunDir`` (directory, lock, checkpoints), ``Monitor`` (logs, summary, divergence)
and ``StopSignals`` (Ctrl-C and SIGTERM).
"""
from __future__ import annotations

import contextlib
import functools
import math
import signal
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from models import GPT
from trainer import data as data_lib
from trainer.config import build, build_attention, check_settings, merge_overrides, resume_config
from trainer.errors import CheckpointError, OutputError, TrainingError, UserError
from trainer.mfu import speed_for_run
from trainer.monitor import Monitor, reset_peak_memory
from trainer.rundir import (LAST, RunDir, check_compatible, load_checkpoint, os_reason, restore_optimizer,
                            restore_scaler)
from trainer.runtime import StopSignals, broadcast_object, configure_math, init_distributed
from trainer.schedule import constant


def step_seed(seed: int, it: int, stream: int) -> int:
    """A seed for (run seed, iteration, stream): batches and dropout depend on nothing else, so a
    resumed run and every run of a sweep with the same seed see exactly the same data order."""
    return (seed * 1_000_003 + it * 9_176 + stream) % (2**63 - 1)


class Trainer:
    """Builds a run from ``cfg`` in ``run_dir`` and trains it to ``cfg.max_iters`` with :meth:`fit`.

    ``overrides`` are the command line's (Hydra's ``overrides.task``): on resume the run's saved
    config is the base and only these change it (``trainer.config.resume_config``).
    """

    def __init__(self, cfg, run_dir: str | Path, overrides: list[str] | None = None):
        self.overrides, self.run = list(overrides or []), None
        # the process: device, place in a torchrun world, numerics
        self.dist, self.device = init_distributed(cfg.device)
        configure_math(bool(cfg.get("tf32", False)), bool(cfg.get("deterministic", False)))
        # the run directory, created and locked by rank 0 (rank 0's path everywhere)
        self.run_dir = Path(broadcast_object(str(run_dir), self.dist))
        error = None
        try:
            if self.dist.is_main:
                self.run = RunDir(self.run_dir, cfg.get("resume"), bool(cfg.get("overwrite")))
        except UserError as e:  # raised on every rank, so none is left waiting
            error = e
        error = broadcast_object(error, self.dist)
        if error is not None:
            raise error
        resume_from = broadcast_object(self.run and self.run.resume_from, self.dist)
        try:
            self._build(cfg, resume_from)
        except BaseException:
            self.release()
            raise

    def _build(self, cfg, resume_from: Path | None) -> None:
        state = load_checkpoint(resume_from) if resume_from is not None else None  # on the CPU
        changes = []
        if state is not None:
            cfg, changes = resume_config(state["config"], cfg, self.overrides)
            self.overrides = merge_overrides(state.get("overrides", []), self.overrides)
        self.cfg = cfg
        # the components, each from its config group
        self.precision = build(cfg.precision)
        self.accum, self.tokens_per_step = check_settings(cfg, self.dist.world_size)  # accum: per rank
        self.data = build(cfg.data)  # under torchrun the first rank to take the data's lock prepares it
        data_lib.check_block_size(self.data, int(cfg.block_size))
        attn_fn, window = build_attention(cfg.attn)  # attn.window goes to the model, which passes it on
        self.model_config = build(cfg.model, vocab_size=data_lib.model_vocab_size(self.data, cfg.model.get("vocab_size")),
                                  window=window)
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank and every run
        self.raw_model = GPT(self.model_config, attn_fn).to(self.device)
        self.fwd_model = torch.compile(self.raw_model) if cfg.compile else self.raw_model
        self.model = self.fwd_model
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.model = DDP(self.fwd_model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.optimizer = self._build_optimizer()
        if cfg.decay_lr:
            self.schedule = build(cfg.schedule)
            build(cfg.schedule, 0)  # a bad setting (wsd's decay_frac) is a config error now, not at step 0
        else:
            self.schedule = functools.partial(constant, lr=float(cfg.learning_rate))
        self.scaler = self.precision.make_scaler(self.device)
        self.iteration, self.best_val_loss, self.best_val_bpb = 0, math.inf, math.inf
        self._skipped = torch.zeros((), dtype=torch.int64, device=self.device)  # fp16 steps the scaler skipped
        self.last_eval: dict | None = None  # the latest eval's losses, saved with the checkpoint
        self.eval_time_s, self.reached = 0.0, None  # target_val_loss: eval seconds so far; the first eval at target
        self.good_checkpoint: Path | None = None  # what a divergence falls back to
        notes = self._restore(state, resume_from) if state is not None else []
        try:  # the outputs: config.yaml, then the monitor's TensorBoard writer, summary.json and log
            if self.dist.is_main:
                OmegaConf.save(self.cfg, self.run_dir / "config.yaml", resolve=True)
            self.monitor = Monitor(self.run_dir, int(cfg.max_iters), self.overrides, self.device, self.iteration,
                                   write=self.dist.is_main)
        except OSError as e:
            raise OutputError(f"cannot write the run's records in {self.run_dir}: {os_reason(e)}") from e
        if state is not None:
            self.monitor.message(f"resumed from {resume_from} at step {self.iteration} with the run's saved config; "
                                 + ("changed: " + ", ".join(changes) if changes else "no settings changed"))
            for note in notes:
                self.monitor.message(f"resume: {note}")

    def _build_optimizer(self) -> torch.optim.Optimizer:
        """The optimizer over the groups its ``param_groups`` policy makes (default: decay matmuls)."""
        optim_cfg = OmegaConf.to_container(self.cfg.optim, resolve=True)
        policy = optim_cfg.pop("param_groups", None) or {"_target_": "trainer.optim.param_groups", "_partial_": True}
        groups = build(policy, self.raw_model, float(optim_cfg.get("weight_decay") or 0.0))
        return build(optim_cfg, groups)  # the optimizer checks its hyperparameters when given the groups

    def _restore(self, state: dict, path: Path) -> list[str]:
        """Restore a checkpoint's state; returns notes on what could not be carried over and why."""
        check_compatible(state.get("model_args", {}), asdict(self.model_config), str(path))
        if state.get("tokenizer") != (None if self.data.tokenizer is None else self.data.tokenizer.to_dict()):
            raise CheckpointError(
                f"checkpoint {path} was trained with a different tokenizer/vocabulary than data={self.cfg.data._target_}; "
                "resume with the same data config"
            )
        self.raw_model.load_state_dict(state["model"])  # copies the CPU tensors onto the device
        saved_optim = (state["config"].get("optim") or {}).get("_target_")
        if saved_optim == self.cfg.optim._target_:
            self.optimizer, notes = restore_optimizer(self.optimizer, state["optimizer"], self._build_optimizer)
        else:  # another optimizer: its state would not mean the same thing
            notes = [f"optimizer changed from {saved_optim} to {self.cfg.optim._target_}: it starts with fresh state"]
        notes += restore_scaler(self.scaler, state.get("scaler") or {}, self.precision.name)
        self.iteration = int(state["step"])
        self.best_val_loss = float(state.get("best_val_loss", math.inf))
        self.best_val_bpb = float(state.get("best_val_bpb", math.inf))
        self._skipped.fill_(int(state.get("skipped_steps", 0)))
        self.last_eval = state.get("eval")
        self.good_checkpoint = Path(path)  # never written by this run until it saves its own
        return notes

    # ------------------------------------------------------------------------------------------
    # the loop

    def fit(self) -> dict:
        """Train from ``self.iteration`` to ``max_iters``; returns the summary (also in summary.json)."""
        cfg, monitor = self.cfg, self.monitor
        max_iters, eval_interval, log_interval = int(cfg.max_iters), int(cfg.eval_interval), int(cfg.log_interval)
        n_params = self.raw_model.num_params()
        monitor.hparams({
            "attn": cfg.attn._target_.rsplit(".", 1)[-1], "optim": cfg.optim._target_.rsplit(".", 1)[-1],
            "precision": cfg.precision.name, "lr": float(cfg.learning_rate), "n_layer": cfg.model.n_layer,
            "n_embd": cfg.model.n_embd, "n_head": cfg.model.n_head, "block_size": int(cfg.block_size),
            "batch_size": int(cfg.batch_size) * int(cfg.gradient_accumulation_steps), "seed": int(cfg.seed),
            "params": n_params, "tf32": bool(cfg.get("tf32", False)), "deterministic": bool(cfg.get("deterministic", False)),
        })
        monitor.message(f"model: {n_params / 1e6:.2f}M parameters, vocab {self.model_config.vocab_size}; "
                        f"{self.tokens_per_step:,} tokens per step on {self.dist.world_size} process(es), "
                        f"device {self.device}")
        speed = speed_for_run(self.raw_model, self.device, self.precision.name, seq_len=int(cfg.block_size),
                              micro_batch=int(cfg.batch_size), tokens_per_step=self.tokens_per_step,
                              world_size=self.dist.world_size, peak_tflops=cfg.get("peak_tflops"),
                              cache_dir=data_lib.default_cache_dir(), start=self.iteration)
        monitor.message(speed.describe())
        if self.data.tokenizer is None:
            monitor.message("data: no tokenizer, so text samples are skipped"
                            + ("" if self.data.bytes_per_token else " and val/bpb is not reported (set data.bytes_per_token "
                               "or data.tokenizer_path for it)"))
        profiler = None
        if cfg.get("profile") and self.dist.is_main:
            from trainer.profiling import StepProfiler

            profiler = StepProfiler(self.run_dir / "profile", self.device)
        if self.last_eval and self.last_eval["step"] == self.iteration:  # resumed: TensorBoard purged this point
            self._log_eval(self.last_eval)
        reset_peak_memory(self.device)
        losses, first = {}, self.iteration
        self.fit_started = time.perf_counter()  # training time = since here, less the evals (target mode)
        with StopSignals(self.dist) as self.stop:
            try:
                while self.iteration < max_iters:
                    # stop: Ctrl-C or SIGTERM saves a checkpoint and leaves between two steps
                    if self.stop.requested():
                        return self._interrupted(speed)
                    # one step: lr, accumulate, clip, update (device values, no wait for the device)
                    it = self.iteration
                    metrics = self.train_step(it)
                    self.iteration = it + 1
                    if profiler is not None:
                        profiler.step()
                    if it == first:  # warm-up, compilation and autotuning buffers are not the run's peak
                        reset_peak_memory(self.device)
                    # log: the one place a step's device values are read
                    if it % log_interval == 0 or self.iteration == max_iters:
                        self._log_step(it, metrics, speed)
                    # eval and checkpoint (not counted as training time)
                    if eval_interval > 0 and self.iteration % eval_interval == 0 and self.iteration < max_iters:
                        losses = self._eval_and_checkpoint(final=False)
                        if self.reached is not None:  # target_val_loss reached: the run ends at this eval
                            break
                        speed.restart(self.iteration)
                if self.reached is None:
                    losses = self._eval_and_checkpoint(final=True)
            finally:
                if profiler is not None:
                    profiler.stop()
        return self._finish("completed", speed, final_val_loss=losses.get("val"))

    def train_step(self, it: int) -> dict:
        """One optimizer step, without waiting for the device: the loss and gradient norm are returned
        as device tensors, and a non-finite one is recorded on the device (``Monitor.watch``) and acted
        on at the next log point, eval or checkpoint, before anything is saved. So the CPU can queue
        the next steps while the GPU works, as in nanoGPT and torchtitan."""
        lr = self.schedule(it)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)  # per-group multiples from the param_groups policy
        torch.manual_seed(step_seed(self.cfg.seed, it, 1 + self.dist.rank))  # dropout
        loss_sum = torch.zeros((), device=self.device)
        for micro, (x, y) in self._micro_batches(it):
            last = micro == self.accum - 1
            with contextlib.nullcontext() if (last or not self.dist.enabled) else self.model.no_sync():
                with self.precision.autocast(self.device):
                    _, loss = self.model(x, y)
                self.scaler.scale(loss / self.accum).backward()
            loss_sum += loss.detach()
        self.scaler.unscale_(self.optimizer)
        clip = float(self.cfg.grad_clip) if self.cfg.grad_clip else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(), clip).detach()
        loss = loss_sum / self.accum
        fp16 = self.scaler.is_enabled()
        # fp16: the scaler skips a step whose gradients hold inf/nan, i.e. whose norm is not finite
        self.monitor.watch(it, loss, grad_norm, norm_counts=not fp16)
        if fp16:
            self._skipped += ~torch.isfinite(grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return {"loss": loss, "lr": lr, "grad_norm": grad_norm}

    def _micro_batches(self, it: int):
        """This rank's micro-batches of iteration ``it``: slices of one global draw, so the data a
        step sees does not depend on how it is split over ranks and accumulation steps."""
        bs, block = int(self.cfg.batch_size), int(self.cfg.block_size)
        gen = torch.Generator().manual_seed(step_seed(self.cfg.seed, it, 0))
        offsets = data_lib.sample_offsets(self.data.train, block, self.accum * self.dist.world_size * bs, gen)
        for micro in range(self.accum):
            j = self.dist.rank * self.accum + micro
            yield micro, data_lib.get_batch(self.data.train, offsets[j * bs:(j + 1) * bs], block, self.device)

    @property
    def skipped_steps(self) -> int:
        """fp16 steps the scaler skipped (inf/nan gradients). Reading it waits for the device."""
        return int(self._skipped)

    def _log_step(self, it: int, metrics: dict, speed) -> None:
        """Log a step: the one place the loop reads the step's device values (and so waits for them)."""
        self.check_diverged()
        extra = {}
        if self.scaler.is_enabled():
            extra = {"loss_scale": self.scaler.get_scale(), "skipped_steps": self.skipped_steps}
        self.monitor.log_step(it, float(metrics["loss"]), metrics["lr"], float(metrics["grad_norm"]),
                              speed.lap(self.iteration), extra)
        if speed.note:  # the peak was re-measured or found wrong: said once
            self.monitor.message(speed.note)
            speed.note = None

    # ------------------------------------------------------------------------------------------
    # evaluation and sampling

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Loss and bits per byte of each split on its fixed eval windows (trainer/data/): the same
        windows at every eval of every run on this data, whatever the seed or the number of ranks."""
        cfg = self.cfg
        bs, block = int(cfg.batch_size), int(cfg.block_size)
        count = data_lib.eval_window_count(cfg.get("eval_tokens"), cfg.eval_iters, bs, block)
        self.fwd_model.eval()
        out = {}
        for split, ids in (("train", self.data.train), ("val", self.data.val)):
            n = count if (split == "val" or count is not None) else int(cfg.eval_iters) * bs  # all: val only
            mine = data_lib.eval_window_starts(ids, block, n)[self.dist.rank::self.dist.world_size]
            sums = torch.zeros(3, dtype=torch.float64, device=self.device)  # nats, tokens, bytes
            for i in range(0, len(mine), bs):
                x, y = data_lib.get_batch(ids, mine[i:i + bs], block, self.device)
                with self.precision.autocast(self.device):
                    _, loss = self.fwd_model(x, y)
                nbytes = self.data.target_bytes(y)  # None: unknown (token shards without a tokenizer)
                sums += torch.tensor([loss.item() * y.numel(), y.numel(), math.nan if nbytes is None else nbytes],
                                     dtype=torch.float64, device=self.device)
            if self.dist.enabled:
                dist.all_reduce(sums)
            nats, tokens, nbytes = sums.tolist()
            out[split] = nats / tokens
            out[f"{split}_bpb"] = None if math.isnan(nbytes) else nats / max(nbytes, 1.0) / math.log(2)
        self.fwd_model.train()
        return out

    @torch.no_grad()
    def sample(self, num_tokens: int | None = None) -> str:
        """A text sample from the current model (seeded, so samples are comparable across evals)."""
        num_tokens = int(self.cfg.sample_tokens if num_tokens is None else num_tokens)
        tok = self.data.tokenizer
        idx = torch.tensor([tok.encode(self.cfg.sample_prompt) or [0]], dtype=torch.long, device=self.device)
        gen = torch.Generator(device=self.device).manual_seed(int(self.cfg.seed))
        self.raw_model.eval()
        with self.precision.autocast(self.device):
            out = self.raw_model.generate(idx, num_tokens, temperature=0.8, top_k=200, generator=gen)
        self.raw_model.train()
        return tok.decode(out[0].tolist())

    def _eval_and_checkpoint(self, final: bool) -> dict[str, float]:
        it = self.iteration
        self.check_state()  # before evaluating; evaluation does not change what is then saved
        started = time.perf_counter()  # after check_state, which waits for the queued steps
        losses = self.evaluate()
        if not math.isfinite(losses["val"] + losses["train"]):  # finite but blown-up weights: not worth keeping
            raise self._diverged(f"eval loss became {losses['val']:g} (val), {losses['train']:g} (train) at step {it}")
        improved = losses["val"] < self.best_val_loss
        self.best_val_loss = min(self.best_val_loss, losses["val"])
        self.best_val_bpb = min(self.best_val_bpb, losses["val_bpb"] or math.inf)
        self.last_eval = {"step": it, **losses}
        self._log_eval(self.last_eval)
        bpb = "" if losses["val_bpb"] is None else f", val bpb {losses['val_bpb']:.4f}"
        self.monitor.message(f"step {it}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}{bpb}")
        if self.dist.is_main and int(self.cfg.sample_tokens) > 0 and self.data.tokenizer is not None:
            self.monitor.text("sample", self.sample(), it)
        self._write_checkpoints(best=improved)
        timing = self._time_evals(it, losses["val"], started)
        self.monitor.write_summary(step=it, best_val_loss=self.best_val_loss, val_bpb=losses["val_bpb"],
                                   final_val_loss=losses["val"] if final or self.reached else None,
                                   best_val_bpb=self.best_val_bpb if math.isfinite(self.best_val_bpb) else None,
                                   **timing)
        return losses

    def _time_evals(self, it: int, val: float, started: float) -> dict:
        """Training time (evals excluded, as the speedrun counts it) and eval time so far; with
        ``target_val_loss``, the first eval at or below it records the time, tokens and steps to it.
        Returns the summary's entries for them. Times count from this process's start of ``fit``."""
        train_s = started - self.fit_started - self.eval_time_s
        self.eval_time_s += time.perf_counter() - started  # evaluation, sample and checkpoint writing
        self.monitor.scalars(it, {"time/train_s": train_s, "time/eval_s": self.eval_time_s})
        target = self.cfg.get("target_val_loss")
        if target is not None and self.reached is None and val <= target:
            self.reached = {"reached_target": True, "steps_to_target": it, "tokens_to_target": it * self.tokens_per_step,
                            "time_to_target_s": train_s}
            self.monitor.scalars(it, {f"target/{k}": v for k, v in self.reached.items() if k != "reached_target"})
            self.monitor.message(f"reached target_val_loss={target:g} at step {it} (val loss {val:.4f}): "
                                 f"{train_s:.2f} s of training, {it * self.tokens_per_step:,} tokens; "
                                 f"evaluation so far {self.eval_time_s:.2f} s, not counted")
        extra = {} if target is None else {"target_val_loss": float(target), "reached_target": False, **(self.reached or {})}
        return {"eval_time_s": self.eval_time_s, **extra}

    def _log_eval(self, ev: dict) -> None:
        self.monitor.scalars(ev["step"], {"val/loss": ev["val"], "val/bpb": ev.get("val_bpb"),
                                          "eval/train_loss": ev["train"]})

    # ------------------------------------------------------------------------------------------
    # checkpoints and divergence

    def state_dict(self) -> dict:
        return {
            "model": self.raw_model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": self.iteration,
            "best_val_loss": self.best_val_loss,
            "best_val_bpb": self.best_val_bpb,
            "skipped_steps": self.skipped_steps,
            "eval": self.last_eval if self.last_eval and self.last_eval["step"] == self.iteration else None,
            "config": OmegaConf.to_container(self.cfg, resolve=True),
            "overrides": list(self.overrides),
            "model_args": asdict(self.model_config),
            "tokenizer": None if self.data.tokenizer is None else self.data.tokenizer.to_dict(),
        }

    def save(self, best: bool = False) -> None:
        self.check_state()
        self._write_checkpoints(best)

    def _write_checkpoints(self, best: bool) -> None:
        """Write ckpt_last.pt (and ckpt_best.pt) on rank 0; the caller has run ``check_state``."""
        if self.dist.is_main:
            self.good_checkpoint = self.run.save(self.state_dict(), best)

    def check_diverged(self) -> None:
        """Raise if a step so far had a non-finite loss or gradient norm (one read of the device)."""
        what = self.monitor.first_bad_step()
        if what is not None:
            raise self._diverged(what)

    def check_state(self) -> None:
        """Raise if a step diverged or a weight or optimizer moment is not finite, before it could be
        saved or evaluated. On every rank: the losses, norms and weights are the same everywhere."""
        self.check_diverged()
        tensors = list(self.raw_model.parameters()) + [
            v for s in self.optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.is_floating_point()
        ]
        flags: dict[torch.device, list[torch.Tensor]] = {}  # step counters live on the CPU, weights maybe not
        for t in tensors:
            flags.setdefault(t.device, []).append(torch.isfinite(t).all())
        if not all([bool(torch.stack(f).all()) for f in flags.values()]):  # one read per device
            raise self._diverged(f"weights or optimizer state became non-finite by step {self.iteration}")

    def _diverged(self, what: str) -> TrainingError:
        if self.good_checkpoint is not None:
            kept = f"the last good checkpoint {self.good_checkpoint} is kept"
        else:
            kept = "no checkpoint of this run had been saved yet, so there is nothing to resume from"
        return TrainingError(f"{what}; stopped, {kept}. Try a lower learning rate, grad_clip, or precision=bf16")

    # ------------------------------------------------------------------------------------------
    # the end of a run

    def _interrupted(self, speed) -> dict:
        self.save()
        name = signal.Signals(self.stop.signum).name
        self.exit_code = self.stop.exit_code
        if self.dist.enabled:
            print(f"rank {self.dist.rank}: stopped by {name} at step {self.iteration}", file=sys.stderr, flush=True)
        self.monitor.message(
            f"interrupted at step {self.iteration} ({name}); checkpoint saved to {self.run_dir / LAST}. "
            f"Resume with: python scripts/train.py resume=true hydra.run.dir={self.run_dir}"
            + (" (under torchrun, the same arguments)" if self.dist.enabled else "")
        )
        return self._finish("interrupted", speed, stopped_by=name)

    def _finish(self, status: str, speed, **extra) -> dict:
        best = self.best_val_loss if math.isfinite(self.best_val_loss) else None
        summary = self.monitor.close(status, step=self.iteration, best_val_loss=best, **speed.summary(), **extra)
        self.release()
        return summary

    def fail(self, error: BaseException, status: str = "failed") -> None:
        """Record a run that stopped on an error (the checkpoints already written stay valid)."""
        try:
            first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
            self.monitor.message(f"{status} at step {self.iteration}: {first_line}", console=False)  # the caller prints it
            self.monitor.close(status, step=self.iteration, error=str(error))
        except OSError as e:  # e.g. the disk that stopped the run is still full
            print(f"warning: could not update {self.run_dir / 'summary.json'}: {os_reason(e)}", file=sys.stderr)
        finally:
            self.release()

    def release(self) -> None:
        """Let another process use the run directory (also happens when this process exits)."""
        if self.run is not None:
            self.run.release()

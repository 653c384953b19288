"""The training loop: ``Trainer(cfg, run_dir).fit()``, read top to bottom like nanoGPT's train.py.

A Trainer is a :class:`trainer.run.Run` (the process, the run directory, every component built
from its config group, the restored state) that trains: ``fit`` runs the steps, each one lr,
accumulate, clip, update; then log, eval, checkpoint, stop. Its collaborators each hold one job:
``RunDir`` (directory, lock, checkpoints), ``Monitor`` (logs, summary, MFU, divergence) and
``StopSignals`` (Ctrl-C and SIGTERM).
"""
from __future__ import annotations

import contextlib
import math
import signal
import sys

import torch

from trainer import data as data_lib
from trainer.errors import TrainingError
from trainer.monitor import peak_memory
from trainer.rundir import LAST
from trainer.run import Run
from trainer.runtime import StopSignals


def step_seed(seed: int, it: int, stream: int) -> int:
    """A seed for (run seed, iteration, stream): batches and dropout depend on nothing else, so a
    resumed run and every run of a sweep with the same seed see exactly the same data order."""
    return (seed * 1_000_003 + it * 9_176 + stream) % (2**63 - 1)


class Trainer(Run):
    """Trains a :class:`~trainer.run.Run` from its iteration to ``cfg.max_iters``: :meth:`fit`."""

    # ------------------------------------------------------------------------------------------
    # the loop

    def fit(self) -> dict:
        """Train from ``self.iteration`` to ``max_iters``; returns the summary (also in summary.json)."""
        cfg, monitor = self.cfg, self.monitor  # the monitor's clocks run from when the run was built
        max_iters, eval_interval, log_interval = int(cfg.max_iters), int(cfg.eval_interval), int(cfg.log_interval)
        profiler = None
        if cfg.get("profile") and self.dist.is_main:
            from trainer.profiling import StepProfiler

            profiler = StepProfiler(self.run_dir / "profile", self.device)
        if self.last_eval and self.last_eval["step"] == self.iteration:  # resumed: TensorBoard purged this point
            self._log_eval(self.last_eval)
        losses, first = {}, self.iteration
        with StopSignals(self.dist) as self.stop:
            try:
                while self.iteration < max_iters:
                    # stop: Ctrl-C or SIGTERM saves a checkpoint and leaves between two steps
                    if self.stop.requested():
                        return self._interrupted()
                    # one step: lr, accumulate, clip, update (device values, no wait for the device)
                    it = self.iteration
                    metrics = self.train_step(it)
                    self.iteration = it + 1
                    if profiler is not None:
                        profiler.step()
                    if it == first:  # warm-up, compilation and autotuning buffers are not the run's peak
                        peak_memory(self.device, reset=True)
                    # log: the one place a step's device values are read (so the loop waits for them)
                    if it % log_interval == 0 or self.iteration == max_iters:
                        self.check_state(weights=False)
                        extra = {}
                        if self.scaler.is_enabled():
                            extra = {"loss_scale": self.scaler.get_scale(), "skipped_steps": int(self.skipped)}
                        monitor.log_step(it, float(metrics["loss"]), metrics["lr"], float(metrics["grad_norm"]), extra)
                    # eval and checkpoint (not counted as training time)
                    if eval_interval > 0 and self.iteration % eval_interval == 0 and self.iteration < max_iters:
                        losses = self._eval_and_checkpoint(final=False)
                        if monitor.reached is not None:  # target_val_loss reached: the run ends here
                            break
                if monitor.reached is None:
                    losses = self._eval_and_checkpoint(final=True)
            finally:
                if profiler is not None:
                    profiler.stop()
        return self._finish("completed", final_val_loss=losses.get("val"))

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
            self.skipped += ~torch.isfinite(grad_norm)
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

    # ------------------------------------------------------------------------------------------
    # evaluation and sampling

    def evaluate(self) -> dict[str, float | None]:
        """Loss and bits per byte of each split on its fixed eval windows (``trainer.data.evaluate``)."""
        return data_lib.evaluate(self.fwd_model, self.data, self.eval_windows, int(self.cfg.batch_size),
                                 int(self.cfg.block_size), self.precision, self.dist, self.device)

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
        started = self.monitor.clock()  # eval time (not training time): after check_state waited for the steps
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
            self.monitor.record(it, {"sample": self.sample()})
        self.save(best=improved, checked=True)
        self.monitor.end_eval(it, losses["val"], started, final, best_val_loss=self.best_val_loss,
                              val_bpb=losses["val_bpb"],
                              best_val_bpb=self.best_val_bpb if math.isfinite(self.best_val_bpb) else None)
        return losses

    def _log_eval(self, ev: dict) -> None:
        self.monitor.record(ev["step"], {"val/loss": ev["val"], "val/bpb": ev.get("val_bpb"),
                                         "eval/train_loss": ev["train"]})

    # ------------------------------------------------------------------------------------------
    # divergence

    def check_state(self, weights: bool = True) -> None:
        """Raise if a step so far had a non-finite loss or gradient norm (one read of the device) or,
        with ``weights``, if a weight or optimizer moment is not finite: before the state could be
        saved or evaluated. On every rank: the losses, norms and weights are the same everywhere."""
        what = self.monitor.diverged(self.raw_model, self.optimizer, self.iteration) if weights else self.monitor.diverged()
        if what is not None:
            raise self._diverged(what)

    def _diverged(self, what: str) -> TrainingError:
        kept = (f"the last good checkpoint {self.good_checkpoint} is kept" if self.good_checkpoint is not None
                else "no checkpoint of this run had been saved yet, so there is nothing to resume from")
        return TrainingError(f"{what}; stopped, {kept}. Try a lower learning rate, grad_clip, or precision=bf16")

    # ------------------------------------------------------------------------------------------
    # the end of a run

    def _interrupted(self) -> dict:
        self.save()
        name = signal.Signals(self.stop.signum).name
        self.exit_code = self.stop.exit_code
        if self.dist.enabled:
            sys.stderr.write(f"rank {self.dist.rank}: stopped by {name} at step {self.iteration}\n")  # one write:
            sys.stderr.flush()  # the ranks share the terminal, and print's two writes can interleave
        self.monitor.message(
            f"interrupted at step {self.iteration} ({name}); checkpoint saved to {self.run_dir / LAST}. "
            f"Resume with: python scripts/train.py resume=true hydra.run.dir={self.run_dir}"
            + (" (under torchrun, the same arguments)" if self.dist.enabled else "")
        )
        return self._finish("interrupted", stopped_by=name)

    def _finish(self, status: str, **extra) -> dict:
        best = self.best_val_loss if math.isfinite(self.best_val_loss) else None
        summary = self.monitor.close(status, step=self.iteration, best_val_loss=best, **extra)
        self.release()
        return summary

"""The training loop: one object that owns a run from set-up to the last checkpoint.

Everything arrives through a resolved config (Hydra composes it in ``scripts/train.py``); the
attention implementation, optimizer, data and precision are built from their ``_target_`` entries
here, so this file never branches on which implementation was chosen.
"""
from __future__ import annotations

import contextlib
import math
import signal
import sys
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from models import GPT, GPTConfig
from trainer import checkpoint as ckpt
from trainer import rundir
from trainer.config import build, check_batch_config, check_vocab, config_errors, merge_overrides, resume_config
from trainer.errors import OutputError, TrainingError, UserError
from trainer.data import TokenData, check_block_size, eval_window_count, eval_window_starts, get_batch, sample_offsets
from trainer.distributed import broadcast_object, init_distributed
from trainer.mfu import Throughput, meter_for_run
from trainer.precision import Precision, configure_math
from trainer.profiling import StepProfiler
from trainer.runlog import (NullLogger, RunLogger, Timer, peak_memory_bytes, reset_peak_memory, run_hparams,
                            step_scalars)
from trainer.optim.param_groups import param_groups  # noqa: F401  (the default policy; tests import it here)
from trainer.schedule import Constant
from trainer.signals import StopSignals


def step_seed(seed: int, it: int, stream: int) -> int:
    """A seed for (run seed, iteration, stream): batches and dropout depend on nothing else, so a
    resumed run and every run of a sweep with the same seed see exactly the same data order."""
    return (seed * 1_000_003 + it * 9_176 + stream) % (2**63 - 1)


class Trainer:
    """Builds model, data, optimizer and logger from ``cfg`` and runs ``cfg.max_iters`` steps.

    ``overrides`` are the command line's overrides (Hydra's ``overrides.task``). On resume the run's
    saved config is the base and only these overrides change it (``trainer.config.resume_config``).
    """

    def __init__(self, cfg: DictConfig, run_dir: str | Path, overrides: list[str] | None = None):
        self.overrides = list(overrides or [])
        self.dist, self.device = init_distributed(cfg.device)
        configure_math(bool(cfg.get("tf32", False)), bool(cfg.get("deterministic", False)))
        self.run_dir = Path(broadcast_object(str(run_dir), self.dist))  # rank 0's directory everywhere
        claimed = self._on_main_rank(lambda: rundir.claim(self.run_dir, cfg.get("resume"), bool(cfg.get("overwrite"))))
        self.lock, resume_from = claimed or (None, None)
        resume_from = broadcast_object(resume_from, self.dist)
        try:
            self._set_up(cfg, resume_from)
        except BaseException:
            self.release()
            raise

    # ------------------------------------------------------------------------------------------
    # set-up

    def _set_up(self, cfg: DictConfig, resume_from: Path | None) -> None:
        state = ckpt.load_checkpoint(resume_from) if resume_from is not None else None  # on the CPU
        changes = []
        if state is not None:
            cfg, changes = resume_config(state["config"], cfg, self.overrides)
            self.overrides = merge_overrides(state.get("overrides", []), self.overrides)
        self.cfg = cfg
        self.precision: Precision = build(cfg.precision)
        self.accum, self.tokens_per_step = check_batch_config(cfg, self.dist.world_size)  # accum: per rank
        self.data = self._load_data()
        self.model_config, self.raw_model = self._build_model()
        self.model, self.fwd_model = self._wrap_model()
        self.optimizer = self._build_optimizer()
        self.schedule = build(cfg.schedule) if cfg.decay_lr else Constant(float(cfg.learning_rate))
        self.scaler = self.precision.make_scaler(self.device)
        self._skipped_on_device = None  # fp16: steps the scaler skipped since the last read (a device tensor)
        self._first_bad = None  # (loss, grad norm): the first step each was non-finite (a device tensor)
        self.meter = None  # fit()'s MFU meter: _log_step relays what it has to say about its peak
        self.step, self.best_val_loss, self.skipped_steps = 0, math.inf, 0
        self.best_val_bpb = math.inf
        self.last_eval: dict | None = None  # the latest eval's losses, saved with the checkpoint
        self.good_checkpoint: Path | None = None  # what a divergence falls back to
        notes = self._load(state, resume_from) if state is not None else []
        self.log = self._open_outputs()
        if state is not None:
            self.log.message(f"resumed from {resume_from} at step {self.step} with the run's saved config; "
                             + ("changed: " + ", ".join(changes) if changes else "no settings changed"))
            for note in notes:
                self.log.message(f"resume: {note}")

    def _on_main_rank(self, fn):
        """``fn()`` on rank 0 only; a user error it raises is raised on every rank (none is left waiting)."""
        result, error = None, None
        if self.dist.is_main:
            try:
                result = fn()
            except UserError as e:
                error = e
        error = broadcast_object(error, self.dist)
        if error is not None:
            raise error
        return result

    def _open_outputs(self):
        if not self.dist.is_main:
            return NullLogger()
        try:
            OmegaConf.save(self.cfg, self.run_dir / "config.yaml", resolve=True)
            return RunLogger(self.run_dir, self.cfg.max_iters, self.overrides, purge_step=self.step or None)
        except OSError as e:
            raise OutputError(f"cannot write the run's records in {self.run_dir}: {rundir.os_reason(e)}") from e

    def _load_data(self) -> TokenData:
        # Under torchrun the first rank to take the data's file lock prepares it (with a progress bar)
        # while the others wait on the lock, which never times out (a barrier would), then read it.
        data = build(self.cfg.data)
        check_block_size(data, int(self.cfg.block_size))
        return data

    def _build_model(self) -> tuple[GPTConfig, GPT]:
        vocab = check_vocab(self.cfg, self.data.vocab_size)
        if not self.cfg.model.get("vocab_size"):
            vocab = self.data.model_vocab_size  # a large vocabulary padded to a multiple of 64 (data.py)
        model_config: GPTConfig = build(self.cfg.model, vocab_size=vocab)
        torch.manual_seed(self.cfg.seed)  # identical initial weights on every rank and every run
        attn_fn = build(self.cfg.attn)
        return model_config, GPT(model_config, attn_fn).to(self.device)

    def _wrap_model(self):
        fwd = torch.compile(self.raw_model) if self.cfg.compile else self.raw_model
        if not self.dist.enabled:
            return fwd, fwd
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DDP(fwd, device_ids=ids), fwd

    def _build_optimizer(self) -> torch.optim.Optimizer:
        """The optimizer over the groups its ``param_groups`` policy makes (default: decay matmuls)."""
        optim_cfg = OmegaConf.to_container(self.cfg.optim, resolve=True)
        policy = optim_cfg.pop("param_groups", None) or {"_target_": "trainer.optim.ParamGroups"}
        groups = build(policy)(self.raw_model, float(optim_cfg.get("weight_decay") or 0.0))
        with config_errors():  # the optimizer checks its hyperparameters when given the parameters
            return build(optim_cfg)(groups)

    def _load(self, state: dict, path: Path) -> list[str]:
        """Restore a checkpoint's state; returns notes on what could not be carried over and why."""
        ckpt.check_compatible(state.get("model_args", {}), asdict(self.model_config), str(path))
        if state.get("tokenizer") != self.data.tokenizer.to_dict():
            raise ckpt.CheckpointError(
                f"checkpoint {path} was trained with a different tokenizer/vocabulary than data={self.cfg.data._target_}; "
                "resume with the same data config"
            )
        self.raw_model.load_state_dict(state["model"])  # copies the CPU tensors onto the device
        saved_optim = (state["config"].get("optim") or {}).get("_target_")
        if saved_optim == self.cfg.optim._target_:
            self.optimizer, notes = ckpt.restore_optimizer(self.optimizer, state["optimizer"], self._build_optimizer)
        else:  # another optimizer: its state would not mean the same thing
            notes = [f"optimizer changed from {saved_optim} to {self.cfg.optim._target_}: it starts with fresh state"]
        notes += ckpt.restore_scaler(self.scaler, state.get("scaler") or {}, self.precision.name)
        self.step = int(state["step"])
        self.best_val_loss = float(state.get("best_val_loss", math.inf))
        self.best_val_bpb = float(state.get("best_val_bpb", math.inf))
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.last_eval = state.get("eval")
        self.good_checkpoint = Path(path)  # never written by this run until it saves its own
        return notes

    # ------------------------------------------------------------------------------------------
    # checkpoints

    def state_dict(self) -> dict:
        return {
            "model": self.raw_model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": self.step,
            "best_val_loss": self.best_val_loss,
            "best_val_bpb": self.best_val_bpb,
            "skipped_steps": self.skipped_steps,
            "eval": self.last_eval if self.last_eval and self.last_eval["step"] == self.step else None,
            "config": OmegaConf.to_container(self.cfg, resolve=True),
            "overrides": list(self.overrides),
            "model_args": asdict(self.model_config),
            "tokenizer": self.data.tokenizer.to_dict(),
        }

    def save(self, best: bool = False) -> None:
        self.check_state()
        self._write_checkpoints(best)

    def check_state(self) -> None:
        """Raise if a step diverged or the state to be saved is not finite. On every rank: the losses,
        norms and weights are the same everywhere."""
        self.check_diverged()
        self.check_finite_state()

    def _write_checkpoints(self, best: bool) -> None:
        """Write ckpt_last.pt (and ckpt_best.pt) on rank 0; the caller has run ``check_state``."""
        if not self.dist.is_main:
            return
        state = self.state_dict()
        ckpt.save_checkpoint(state, self.run_dir / ckpt.LAST)
        self.good_checkpoint = self.run_dir / ckpt.LAST
        if best:
            ckpt.save_checkpoint(state, self.run_dir / ckpt.BEST)

    def check_finite_state(self) -> None:
        """Raise before a non-finite weight or optimizer moment could be written or evaluated."""
        tensors = list(self.raw_model.parameters()) + [
            v for s in self.optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.is_floating_point()
        ]
        flags: dict[torch.device, list[torch.Tensor]] = {}  # step counters live on the CPU, weights maybe not
        for t in tensors:
            flags.setdefault(t.device, []).append(torch.isfinite(t).all())
        if not all(bool(torch.stack(f).all()) for f in flags.values()):  # one read per device
            raise self._diverged(f"weights or optimizer state became non-finite by step {self.step}")

    def _diverged(self, what: str) -> TrainingError:
        if self.good_checkpoint is not None:
            kept = f"the last good checkpoint {self.good_checkpoint} is kept"
        else:
            kept = "no checkpoint of this run had been saved yet, so there is nothing to resume from"
        return TrainingError(f"{what}; stopped, {kept}. Try a lower learning rate, grad_clip, or precision=bf16")

    # ------------------------------------------------------------------------------------------
    # one optimizer step

    def lr(self, it: int) -> float:
        return self.schedule(it)

    def _micro_batches(self, it: int):
        """This rank's micro-batches of iteration ``it``: slices of one global draw, so the data a
        step sees does not depend on how it is split over ranks and accumulation steps."""
        cfg = self.cfg
        bs, block = int(cfg.batch_size), int(cfg.block_size)
        gen = torch.Generator().manual_seed(step_seed(cfg.seed, it, 0))
        offsets = sample_offsets(self.data.train, block, self.accum * self.dist.world_size * bs, gen)
        for micro in range(self.accum):
            j = self.dist.rank * self.accum + micro
            yield micro, get_batch(self.data.train, offsets[j * bs : (j + 1) * bs], block, self.device)

    @property
    def skipped_steps(self) -> int:
        """fp16 steps the scaler skipped (inf/nan gradients). Reading it waits for the device."""
        if self._skipped_on_device is not None:
            self._skipped_steps += int(self._skipped_on_device.item())
            self._skipped_on_device = None
        return self._skipped_steps

    @skipped_steps.setter
    def skipped_steps(self, value: int) -> None:
        self._skipped_steps, self._skipped_on_device = int(value), None

    def train_step(self, it: int) -> dict:
        """One optimizer step, without waiting for the device: the loss and gradient norm are returned
        as device tensors, and a non-finite one is recorded on the device (``_watch``) and acted on
        at the next log point, eval or checkpoint (``check_diverged``), before anything is saved.
        So the CPU can queue the next steps while the GPU works, as in nanoGPT and torchtitan."""
        lr = self.lr(it)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)  # per-group multiples from the param_groups policy
        torch.manual_seed(step_seed(self.cfg.seed, it, 1 + self.dist.rank))  # dropout
        loss_sum = torch.zeros((), device=self.device)
        for micro, (x, y) in self._micro_batches(it):
            last = micro == self.accum - 1
            sync = contextlib.nullcontext() if (last or not self.dist.enabled) else self.model.no_sync()
            with sync:
                with self.precision.autocast(self.device):
                    _, loss = self.model(x, y)
                self.scaler.scale(loss / self.accum).backward()
            loss_sum += loss.detach()
        loss = loss_sum / self.accum
        self.scaler.unscale_(self.optimizer)
        clip = float(self.cfg.grad_clip) if self.cfg.grad_clip else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(), clip).detach()
        self._watch(it, loss, grad_norm)
        # the scale as a device tensor (GradScaler.get_scale() would wait for the device)
        scale_before = self.scaler._scale.clone() if self.scaler.is_enabled() else None
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if scale_before is not None:  # a lowered scale means inf/nan gradients: the update was skipped
            skipped = (self.scaler._scale < scale_before).int()
            pending = self._skipped_on_device
            self._skipped_on_device = skipped if pending is None else pending + skipped
        return {"loss": loss, "lr": lr, "grad_norm": grad_norm}

    _NEVER = 2**62  # "no bad step yet" in the device record of _watch

    def _watch(self, it: int, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        """Remember, on the device, the first step whose loss (and, without fp16's scaler, which skips
        such steps itself, whose gradient norm) was not finite: a few tiny kernels, no sync."""
        bad = torch.stack([~torch.isfinite(loss), ~torch.isfinite(grad_norm) & (not self.scaler.is_enabled())])
        first = torch.where(bad, it, self._NEVER)
        self._first_bad = first if self._first_bad is None else torch.minimum(self._first_bad, first)

    def check_diverged(self) -> None:
        """Raise if a step so far had a non-finite loss or gradient norm (one read of the device)."""
        if self._first_bad is None:
            return
        loss_step, norm_step = self._first_bad.tolist()
        if loss_step < self._NEVER and loss_step <= norm_step:
            raise self._diverged(f"loss became non-finite (nan or inf) at step {loss_step}")
        if norm_step < self._NEVER:
            raise self._diverged(f"gradient norm became non-finite (nan or inf) at step {norm_step}")

    # ------------------------------------------------------------------------------------------
    # evaluation and sampling

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Loss and bits per byte of each split on its fixed eval windows (trainer/data.py): the same
        windows at every eval of every run on this data, whatever the seed or the number of ranks."""
        cfg = self.cfg
        bs, block = int(cfg.batch_size), int(cfg.block_size)
        count = eval_window_count(cfg.get("eval_tokens"), cfg.eval_iters, bs, block)
        self.fwd_model.eval()
        out = {}
        for split, ids in (("train", self.data.train), ("val", self.data.val)):
            n = count if (split == "val" or count is not None) else int(cfg.eval_iters) * bs  # all: val only
            starts = eval_window_starts(ids, block, n)
            mine = starts[self.dist.rank :: self.dist.world_size]
            sums = torch.zeros(3, dtype=torch.float64, device=self.device)  # nats, tokens, bytes
            for i in range(0, len(mine), bs):
                x, y = get_batch(ids, mine[i : i + bs], block, self.device)
                with self.precision.autocast(self.device):
                    _, loss = self.fwd_model(x, y)
                sums += torch.tensor([loss.item() * y.numel(), y.numel(), self.data.target_bytes(y)],
                                     dtype=torch.float64, device=self.device)
            if self.dist.enabled:
                dist.all_reduce(sums)
            nats, tokens, nbytes = sums.tolist()
            out[split] = nats / tokens
            out[f"{split}_bpb"] = nats / max(nbytes, 1.0) / math.log(2)
        self.fwd_model.train()
        return out

    @torch.no_grad()
    def sample(self, num_tokens: int | None = None) -> str:
        """A text sample from the current model (seeded, so samples are comparable across evals)."""
        cfg = self.cfg
        num_tokens = int(cfg.sample_tokens if num_tokens is None else num_tokens)
        tok = self.data.tokenizer
        prompt_ids = tok.encode(cfg.sample_prompt) or [0]
        idx = torch.tensor([prompt_ids], dtype=torch.long, device=self.device)
        gen = torch.Generator(device=self.device).manual_seed(int(cfg.seed))
        self.raw_model.eval()
        with self.precision.autocast(self.device):
            out = self.raw_model.generate(idx, num_tokens, temperature=0.8, top_k=200, generator=gen)
        self.raw_model.train()
        return tok.decode(out[0].tolist())

    # ------------------------------------------------------------------------------------------
    # the loop

    def _eval_and_checkpoint(self, it: int, final: bool) -> dict[str, float]:
        self.check_state()  # before evaluating; evaluation does not change what is then saved
        losses = self.evaluate()
        if not all(map(math.isfinite, losses.values())):  # finite but blown-up weights: not worth keeping
            raise self._diverged(f"eval loss became {losses['val']:g} (val), {losses['train']:g} (train) at step {it}")
        improved = losses["val"] < self.best_val_loss
        if improved:
            self.best_val_loss = losses["val"]
        self.best_val_bpb = min(self.best_val_bpb, losses["val_bpb"])
        self.last_eval = {"step": it, **losses}
        self._log_eval(self.last_eval)
        self.log.message(f"step {it}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}, "
                         f"val bpb {losses['val_bpb']:.4f}")
        if self.dist.is_main and int(self.cfg.sample_tokens) > 0:
            self.log.text("sample", self.sample(), it)
        self._write_checkpoints(best=improved)
        self.log.write_summary(step=it, best_val_loss=self.best_val_loss, final_val_loss=losses["val"] if final else None,
                               val_bpb=losses["val_bpb"], best_val_bpb=self.best_val_bpb)
        return losses

    def _log_eval(self, ev: dict) -> None:
        self.log.scalars(ev["step"], {"val/loss": ev["val"], "val/bpb": ev.get("val_bpb"), "eval/train_loss": ev["train"]})

    def fit(self) -> dict:
        """Train from ``self.step`` to ``max_iters``; returns the summary (also in summary.json)."""
        cfg, timer = self.cfg, Timer()
        reset_peak_memory(self.device)
        max_iters, eval_interval = int(cfg.max_iters), int(cfg.eval_interval)
        self.log.hparams(run_hparams(cfg, self.raw_model.num_params()))
        self.log.message(
            f"model: {self.raw_model.num_params() / 1e6:.2f}M parameters, vocab {self.model_config.vocab_size}; "
            f"{self.tokens_per_step:,} tokens per step on {self.dist.world_size} process(es), device {self.device}"
        )
        meter = meter_for_run(self.raw_model, self.device, self.precision.name, seq_len=int(cfg.block_size),
                              micro_batch=int(cfg.batch_size), tokens_per_step=self.tokens_per_step,
                              world_size=self.dist.world_size, peak_tflops=cfg.get("peak_tflops"))
        self.log.message(meter.describe())
        self.meter = meter
        speed = Throughput(self.device, meter)
        profiler = StepProfiler(self.run_dir / "profile", self.device) if cfg.get("profile") and self.dist.is_main else None
        if self.last_eval and self.last_eval["step"] == self.step:
            self._log_eval(self.last_eval)  # resumed: the writer purged this step's points with the old run's tail
        losses, first_step = {}, self.step
        try:
            with StopSignals(self.dist) as self.stop:
                while self.step < max_iters:
                    if self.stop.requested():
                        return self._interrupted(timer, speed)
                    it = self.step
                    metrics = self.train_step(it)
                    self.step = it + 1
                    speed.step_done()
                    if profiler is not None:
                        profiler.step()
                    if it == first_step:  # warm-up, compilation and autotuning buffers are not the run's peak
                        reset_peak_memory(self.device)
                    if it % int(cfg.log_interval) == 0 or self.step == max_iters:
                        self._log_step(it, metrics, speed.lap())
                    if eval_interval > 0 and self.step % eval_interval == 0 and self.step < max_iters:
                        losses = self._eval_and_checkpoint(self.step, final=False)
                        speed.restart()  # evaluation and checkpointing are not training speed
                losses = self._eval_and_checkpoint(self.step, final=True)
        finally:
            if profiler is not None:
                profiler.stop()
        return self._finish("completed", timer, speed, final_val_loss=losses.get("val"))

    def _log_step(self, it: int, metrics: dict, rates: dict) -> None:
        """Log a step: the one place the loop reads the step's device values (and so waits for them)."""
        self.check_diverged()
        metrics = {**metrics, "loss": float(metrics["loss"]), "grad_norm": float(metrics["grad_norm"])}
        dt = rates["step_ms"] / 1000
        scalars = step_scalars(metrics, dt, self.tokens_per_step, self.device, self.scaler, self.skipped_steps)
        scalars.update(tflops=rates["tflops"], mfu=rates["mfu"])
        self.log.scalars(it, scalars)
        self.log.progress(it, metrics["loss"], metrics["lr"], rates["tokens_per_sec"], rates["step_ms"],
                          mfu=rates["mfu"], tflops=rates["tflops"])
        if self.meter is not None and self.meter.note:  # the peak was re-measured or found wrong: said once
            self.log.message(self.meter.note)
            self.meter.note = None

    def _interrupted(self, timer: Timer, speed: Throughput) -> dict:
        self.save()
        name = signal.Signals(self.stop.signum).name
        self.exit_code = self.stop.exit_code
        if self.dist.enabled:
            print(f"rank {self.dist.rank}: stopped by {name} at step {self.step}", file=sys.stderr, flush=True)
        self.log.message(
            f"interrupted at step {self.step} ({name}); checkpoint saved to {self.run_dir / ckpt.LAST}. "
            f"Resume with: python scripts/train.py resume=true hydra.run.dir={self.run_dir}"
            + (" (under torchrun, the same arguments)" if self.dist.enabled else "")
        )
        return self._finish("interrupted", timer, speed, stopped_by=name)

    def _finish(self, status: str, timer: Timer, speed: Throughput, **extra) -> dict:
        self.log.write_summary(
            status=status, step=self.step, best_val_loss=self.best_val_loss if math.isfinite(self.best_val_loss) else None,
            **speed.summary(), peak_mem_bytes=peak_memory_bytes(self.device), wall_time_s=timer.elapsed(), **extra,
        )
        self.log.close()
        self.release()
        return dict(self.log.summary) if self.dist.is_main else {"status": status, "step": self.step}

    def fail(self, error: BaseException, status: str = "failed") -> None:
        """Record a run that stopped on an error (the checkpoints already written stay valid)."""
        try:
            first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
            self.log.message(f"{status} at step {self.step}: {first_line}", console=False)  # the caller prints it
            self.log.write_summary(status=status, step=self.step, error=str(error))
            self.log.close()
        except OSError as e:  # e.g. the disk that stopped the run is still full
            print(f"warning: could not update {self.run_dir / 'summary.json'}: {rundir.os_reason(e)}", file=sys.stderr)
        finally:
            self.release()

    def release(self) -> None:
        """Let another process use the run directory (also happens when this process exits)."""
        if getattr(self, "lock", None) is not None:
            self.lock.release()

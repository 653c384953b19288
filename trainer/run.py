"""A run built from its config: the process, the run directory, every component, and its state.

``Run(cfg, run_dir, overrides)`` sets up the process (device, place in a torchrun world,
numerics), creates and locks the run directory (rank 0), builds every component from its config
group's ``_target_`` (precision, data, model with its attention, optimizer with its parameter
groups, schedule), so nothing here branches on which one was chosen, restores the checkpoint it
resumes from, if any, and opens the outputs; ``fail`` records a run that stopped on an error.
``trainer.loop.Trainer`` is a Run that trains.
"""
from __future__ import annotations

import functools
import math
import sys
from dataclasses import asdict
from pathlib import Path

import torch
from omegaconf import OmegaConf

from models import GPT
from trainer import data as data_lib
from trainer.config import build, build_attention, check_settings, compile_mode, merge_overrides, resume_config
from trainer.errors import OutputError, UserError
from trainer.monitor import Monitor
from trainer.rundir import RunDir, load_checkpoint, os_reason, restore
from trainer.runtime import broadcast_object, init_process
from trainer.schedule import constant


class Run:
    """A run of ``cfg`` in ``run_dir``, built and (on resume) restored, ready to train.

    ``overrides`` are the command line's (Hydra's ``overrides.task``): on resume the run's saved
    config is the base and only these change it (``trainer.config.resume_config``).
    """

    def __init__(self, cfg, run_dir: str | Path, overrides: list[str] | None = None):
        self.overrides, self.run = list(overrides or []), None
        # the process: device, place in a torchrun world, numerics
        self.dist, self.device = init_process(cfg.device, bool(cfg.get("tf32", False)), bool(cfg.get("deterministic", False)))
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
        pretrained = None  # init_from: model.* from its config.json; on resume, checked against the run's
        if str(cfg.get("init_from") or "scratch") != "scratch" or state is not None:
            from trainer import pretrained as pretrained_lib  # with models/hf.py: only when it is used

            pretrained = pretrained_lib.configure(cfg, self.overrides, state)
        # the components, each from its config group
        self.precision = build(cfg.precision)
        self.accum, self.tokens_per_step = check_settings(cfg, self.dist.world_size)  # accum: per rank
        self.data = build(cfg.data)  # under torchrun the first rank to take the data's lock prepares it
        self.eval_windows = data_lib.eval_windows(self.data, int(cfg.block_size), cfg.get("eval_tokens"),  # checks
                                                  int(cfg.eval_iters), int(cfg.batch_size))  # block_size fits the data
        if pretrained is not None:
            pretrained.check_vocab(self.data)
        attn_fn, window = build_attention(cfg.attn)  # attn.window goes to the model, which passes it on
        self.model_config = build(cfg.model, vocab_size=data_lib.model_vocab_size(self.data, cfg.model.get("vocab_size")),
                                  window=window)
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank and every run
        self.raw_model = GPT(self.model_config, attn_fn).to(self.device)
        if pretrained is not None:  # fine-tuning: the checkpoint's weights replace the random ones
            pretrained.load_into(self.raw_model)
        self.fwd_model = torch.compile(self.raw_model, mode=compile_mode(cfg.get("compile_mode"))) if cfg.compile \
            else self.raw_model
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
        self.skipped = torch.zeros((), dtype=torch.int64, device=self.device)  # fp16 steps the scaler skipped
        # (inf/nan gradients), counted on the device: reading it waits for the queued steps
        self.last_eval: dict | None = None  # the latest eval's losses, saved with the checkpoint
        self.good_checkpoint: Path | None = None  # what a divergence falls back to
        notes = []
        if state is not None:  # the run continues: weights, optimizer and scaler state, counters
            tokenizer = None if self.data.tokenizer is None else self.data.tokenizer.to_dict()
            self.optimizer, notes = restore(state, resume_from, self.raw_model, self.optimizer, self._build_optimizer,
                                            self.scaler, cfg, asdict(self.model_config), tokenizer)
            self.iteration, self.last_eval = int(state["step"]), state.get("eval")
            self.best_val_loss = float(state.get("best_val_loss", math.inf))
            self.best_val_bpb = float(state.get("best_val_bpb", math.inf))
            self.skipped.fill_(int(state.get("skipped_steps", 0)))
            self.good_checkpoint = Path(resume_from)  # never written by this run until it saves its own
        try:  # the outputs: config.yaml, then the monitor's TensorBoard writer, summary.json and log
            if self.dist.is_main:
                OmegaConf.save(self.cfg, self.run_dir / "config.yaml", resolve=True)
            self.monitor = Monitor(self.run_dir, cfg, self.raw_model, self.device, tokens_per_step=self.tokens_per_step,
                                   world_size=self.dist.world_size, overrides=self.overrides, start=self.iteration,
                                   cache_dir=data_lib.default_cache_dir(), write=self.dist.is_main)
        except OSError as e:
            raise OutputError(f"cannot write the run's records in {self.run_dir}: {os_reason(e)}") from e
        if pretrained is not None:
            self.monitor.message(pretrained.describe())
        if self.data.tokenizer is None:
            self.monitor.message("data: no tokenizer, so text samples are skipped" + (
                "" if self.data.bytes_per_token else
                " and val/bpb is not reported (set data.bytes_per_token or data.tokenizer_path for it)"))
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

    def state_dict(self) -> dict:
        return {
            "model": self.raw_model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": self.iteration,
            "best_val_loss": self.best_val_loss,
            "best_val_bpb": self.best_val_bpb,
            "skipped_steps": int(self.skipped),
            "eval": self.last_eval if self.last_eval and self.last_eval["step"] == self.iteration else None,
            "config": OmegaConf.to_container(self.cfg, resolve=True),
            "overrides": list(self.overrides),
            "model_args": asdict(self.model_config),
            "tokenizer": None if self.data.tokenizer is None else self.data.tokenizer.to_dict(),
        }

    def save(self, best: bool = False, checked: bool = False) -> None:
        """Write ckpt_last.pt (and ckpt_best.pt) on rank 0, after ``check_state`` (``checked``: the
        caller has just run it), so a diverged state is never saved."""
        if not checked:
            self.check_state()
        if self.dist.is_main:
            self.good_checkpoint = self.run.save(self.state_dict(), best)

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

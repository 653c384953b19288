#!/usr/bin/env python
"""Train a GPT: ``python scripts/train.py [group=option ...] [key=value ...]``.

Examples::

    python scripts/train.py                                  # nano model on Shakespeare, CPU-sized
    python scripts/train.py attn=online optim=lion precision=bf16
    python scripts/train.py -m attn=naive,online,sdpa        # a sweep, one run directory each
    python scripts/train.py resume=true hydra.run.dir=runs/<run>
    torchrun --standalone --nproc_per_node=2 scripts/train.py gradient_accumulation_steps=2   # data-parallel

Under torchrun, ``gradient_accumulation_steps`` is the global number of micro-batches per step and
must be a multiple of the number of processes (each rank runs its share).

A mistake the user can fix (a setting, a file, a checkpoint, an attention that cannot run here;
``trainer.errors.user_errors()``) is printed as one ``error:`` line and exits 1; anything else is
a bug and keeps its traceback.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

import trainer.config  # noqa: F401  (registers the ${run_name:} resolver of hydra.run.dir)
from trainer.errors import OutputError, TrainingError, UserError, user_errors

RANK = int(os.environ.get("RANK", "0"))
MULTIRUN = "-m" in sys.argv or "--multirun" in sys.argv
CONFIGS = Path(__file__).resolve().parent.parent / "configs"
WRITE_RECORDS = False  # set by _prepare_argv when this file runs as the entry point


def _prepare_argv() -> bool:
    """Settle what Hydra writes before the trainer runs; returns whether rank 0 writes ``.hydra/`` itself.

    Under torchrun only rank 0 writes the run directory: the other ranks get a throw-away one (the
    trainer takes rank 0's by broadcast). Hydra would write ``.hydra/`` (config, overrides) before
    the trainer runs, so a refused or failed resume would overwrite the run's records: rank 0
    writes them once set-up succeeded (``_write_hydra_records``), unless the user chose
    ``hydra.output_subdir``. And Hydra creates the run directory with a traceback when it cannot:
    the directory the command line names (or ``runs/``) is checked first, in one line.
    """
    if RANK > 0:
        if not MULTIRUN:
            import tempfile

            sys.argv += ["hydra.output_subdir=null", "hydra/job_logging=disabled", "hydra/hydra_logging=disabled",
                         f"hydra.run.dir={tempfile.gettempdir()}/gptlab-rank{RANK}-{os.getpid()}"]
        return False
    from trainer.rundir import check_creatable

    key = "hydra.sweep.dir=" if MULTIRUN else "hydra.run.dir="
    run_dir, own_subdir = "runs", False  # the last hydra.*.dir= wins, as in Hydra
    for arg in sys.argv:
        if arg.startswith(key):
            run_dir = arg[len(key):].split("${")[0]
        own_subdir = own_subdir or arg.startswith("hydra.output_subdir=")
    try:
        check_creatable(run_dir or ".")
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    if own_subdir:
        return False
    sys.argv.append("hydra.output_subdir=null")
    return True


@hydra.main(version_base="1.3", config_path="../configs", config_name="train")
def main(cfg: DictConfig) -> float | None:
    import torch.distributed

    from trainer.loop import Trainer

    hc = HydraConfig.get()
    run_dir = hc.runtime.output_dir
    trainer = None
    try:
        trainer = Trainer(cfg, run_dir, list(hc.overrides.task))
        if WRITE_RECORDS and trainer.dist.is_main:
            _write_hydra_records(trainer, hc)
        summary = trainer.fit()
        if summary.get("status") == "interrupted":
            raise SystemExit(trainer.exit_code)  # 130 after Ctrl-C, 143 after SIGTERM
        if trainer.dist.is_main:
            trainer.monitor.message(f"done: val loss {summary.get('final_val_loss'):.4f}, outputs in {trainer.run_dir}")
            if int(trainer.cfg.sample_tokens) > 0 and trainer.data.tokenizer is not None:
                trainer.monitor.message("sample:\n" + trainer.sample())
        return summary.get("best_val_loss")
    except user_errors() as e:
        if trainer is not None:
            trainer.fail(e, "diverged" if isinstance(e, TrainingError) else "failed")
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        # OmegaConf appends "full_key: ... object_type=..." lines; the first line says it all
        message = str(e) if isinstance(e, UserError) else str(e).splitlines()[0]
        print(f"error: {message}", file=sys.stderr, flush=True)
        if hc.mode != RunMode.MULTIRUN:  # a sweep goes on with its other runs; this one is marked failed
            raise SystemExit(1)
        return None
    except SystemExit:
        raise
    except BaseException as e:  # a bug, or a second Ctrl-C: recorded, then shown with its traceback
        if trainer is not None:
            trainer.fail(e, "interrupted" if isinstance(e, KeyboardInterrupt) else "failed")
        raise
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        if trainer is not None and not trainer.dist.is_main and str(trainer.run_dir) != run_dir:
            try:
                os.rmdir(run_dir)  # the throw-away directory Hydra made for this rank
            except OSError:
                pass


def _write_hydra_records(trainer, hc) -> None:
    """What Hydra would have written to ``.hydra/``, for the run as it now is: after a resume the
    overrides are the run's own plus this command's, and the group choices are updated likewise."""
    out = Path(trainer.run_dir) / ".hydra"
    hydra_cfg = OmegaConf.create({"hydra": OmegaConf.to_container(hc, resolve=False)})
    previous = out / "hydra.yaml"
    if trainer.cfg.get("resume") not in (False, None) and previous.is_file():
        choices = OmegaConf.select(OmegaConf.load(previous), "hydra.runtime.choices") or {}
        named = {o.partition("=")[0].lstrip("+~") for o in hc.overrides.task}
        for group, option in OmegaConf.to_container(hc.runtime.choices).items():
            if group in named or group not in choices:
                choices[group] = option
        hydra_cfg.hydra.runtime.choices = choices
    hydra_cfg.hydra.overrides.task = list(trainer.overrides)
    hydra_cfg.hydra.output_subdir = ".hydra"
    try:
        out.mkdir(exist_ok=True)
        OmegaConf.save(trainer.cfg, out / "config.yaml")
        OmegaConf.save(hydra_cfg, out / "hydra.yaml")
        OmegaConf.save(OmegaConf.create(list(trainer.overrides)), out / "overrides.yaml")
    except OSError as e:
        raise OutputError(f"cannot write {out}: {e.strerror or e}") from e


# nanoGPT's (and common) names that are spelled differently here, for the hint below
NANOGPT_NAMES = {
    "lr": "learning_rate (or optim.lr)", "n_layer": "model.n_layer", "n_head": "model.n_head",
    "n_embd": "model.n_embd", "dropout": "model.dropout", "bias": "model.bias",
    "weight_decay": "optim.weight_decay", "beta1": "optim.betas=[0.9,0.95]", "beta2": "optim.betas=[0.9,0.95]",
    "dtype": "precision=fp32|bf16|fp16", "dataset": "data=shakespeare|text|tokens (data.path=...)",
    "out_dir": "hydra.run.dir",
    "attention": "attn", "optimizer": "optim", "iters": "max_iters", "steps": "max_iters",
    "batch": "batch_size", "context": "block_size",
}


def _unknown_key_hint(argv: list[str]) -> str | None:
    """After Hydra refused an override: a line naming this trainer's spelling of each unknown key
    (nanoGPT's names first, else the closest key), or None when every key is known."""
    import difflib

    known = set(OmegaConf.load(CONFIGS / "train.yaml")) | {p.name for p in CONFIGS.iterdir() if p.is_dir()} | {"hydra"}
    hints = []
    for arg in argv:
        root = arg.partition("=")[0].split(".")[0]
        if arg.startswith(("-", "+", "~")) or "=" not in arg or root in known:
            continue
        close = difflib.get_close_matches(root, sorted(known), n=1)
        better = NANOGPT_NAMES.get(root) or (close[0] if close else None)
        if better:
            hints.append(f"'{root}' is not a setting here: use {better}")
    return "hint: " + "; ".join(hints) + " (see configs/train.yaml)" if hints else None


if __name__ == "__main__":
    WRITE_RECORDS = _prepare_argv()
    try:
        main()
    except SystemExit as exit_:
        hint = _unknown_key_hint(sys.argv[1:]) if exit_.code == 1 and RANK == 0 else None  # Hydra refused an override?
        if hint:
            print(hint, file=sys.stderr, flush=True)
        raise

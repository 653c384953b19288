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

A mistake the user can fix (a setting, a file, a checkpoint; a ``trainer.errors.UserError``) is
printed as one ``error:`` line and exits 1; anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError, MissingMandatoryValue, ValidationError

from trainer.config import register_resolvers
from trainer.errors import OutputError, TrainingError, UserError
from trainer.rundir import check_creatable

register_resolvers()


def _quiet_hydra_on_other_ranks() -> None:
    """Under torchrun only rank 0 writes the run directory: Hydra on the other ranks gets a
    throw-away output dir (the trainer takes rank 0's directory by broadcast)."""
    rank = int(os.environ.get("RANK", "0"))
    if rank > 0 and "-m" not in sys.argv and "--multirun" not in sys.argv:
        import tempfile

        sys.argv += ["hydra.output_subdir=null", "hydra/job_logging=disabled", "hydra/hydra_logging=disabled",
                     f"hydra.run.dir={tempfile.gettempdir()}/gptlab-rank{rank}-{os.getpid()}"]


def _defer_hydra_records() -> bool:
    """Hydra writes ``.hydra/`` (config, overrides) before the trainer runs; a refused or failed
    resume would then have overwritten the run's records. Rank 0 writes them itself once set-up
    succeeded (``_write_hydra_records``), unless the user chose ``hydra.output_subdir``."""
    if int(os.environ.get("RANK", "0")) > 0 or any(a.startswith("hydra.output_subdir=") for a in sys.argv):
        return False
    sys.argv.append("hydra.output_subdir=null")
    return True


def _check_output_dir() -> None:
    """Hydra creates the run directory before ``main`` runs, with a traceback when it cannot: check
    the directory the command line names (or ``runs/``) first, and say what is wrong in one line."""
    if int(os.environ.get("RANK", "0")) > 0:
        return
    key = "hydra.sweep.dir=" if ("-m" in sys.argv or "--multirun" in sys.argv) else "hydra.run.dir="
    given = [a[len(key):] for a in sys.argv if a.startswith(key)]
    target = given[-1].split("${")[0] if given else "runs"
    try:
        check_creatable(target or ".")
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None


_quiet_hydra_on_other_ranks()
_DEFERRED_RECORDS = _defer_hydra_records()

# Errors that are the user's to fix: reported in one line, without a traceback. OmegaConf's are a
# mandatory value left at ??? or an interpolation/value the user's config cannot resolve.
OMEGACONF_USER_ERRORS = (MissingMandatoryValue, InterpolationResolutionError, ValidationError)
USER_ERRORS = (UserError, *OMEGACONF_USER_ERRORS)


@hydra.main(version_base="1.3", config_path="../configs", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from trainer.distributed import shutdown_distributed
    from trainer.loop import Trainer

    hc = HydraConfig.get()
    run_dir, overrides = hc.runtime.output_dir, list(hc.overrides.task)
    multirun = hc.mode == RunMode.MULTIRUN
    trainer = None
    try:
        trainer = Trainer(cfg, run_dir, overrides)
        if _DEFERRED_RECORDS and trainer.dist.is_main:
            try:
                _write_hydra_records(trainer, hc)
            except OSError as e:
                raise OutputError(f"cannot write {trainer.run_dir / '.hydra'}: {e.strerror or e}") from e
        summary = trainer.fit()
        if summary.get("status") == "interrupted":
            raise SystemExit(trainer.exit_code)  # 130 after Ctrl-C, 143 after SIGTERM
        if trainer.dist.is_main:
            trainer.log.message(f"done: val loss {summary.get('final_val_loss'):.4f}, outputs in {trainer.run_dir}")
            if int(cfg.sample_tokens) > 0:
                trainer.log.message("sample:\n" + trainer.sample())
        return summary.get("best_val_loss")
    except USER_ERRORS as e:
        if trainer is not None:
            trainer.fail(e, "diverged" if isinstance(e, TrainingError) else "failed")
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        # OmegaConf appends "full_key: ... object_type=..." lines; the first line says it all
        message = str(e).splitlines()[0] if isinstance(e, OMEGACONF_USER_ERRORS) else str(e)
        print(f"error: {message}", file=sys.stderr, flush=True)
        if not multirun:  # a sweep goes on with its other runs; this one is marked failed
            raise SystemExit(1)
        return None
    except SystemExit:
        raise
    except BaseException as e:  # a bug, or a second Ctrl-C: recorded, then shown with its traceback
        if trainer is not None:
            trainer.fail(e, "interrupted" if isinstance(e, KeyboardInterrupt) else "failed")
        raise
    finally:
        shutdown_distributed()
        if trainer is not None and not trainer.dist.is_main and str(trainer.run_dir) != run_dir:
            _remove_if_empty(run_dir)


def _write_hydra_records(trainer, hc) -> None:
    """What Hydra would have written to ``.hydra/``, for the run as it now is: after a resume the
    overrides are the run's own plus this command's, and the group choices are updated likewise."""
    out = Path(trainer.run_dir) / ".hydra"
    out.mkdir(exist_ok=True)
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
    OmegaConf.save(trainer.cfg, out / "config.yaml")
    OmegaConf.save(hydra_cfg, out / "hydra.yaml")
    OmegaConf.save(OmegaConf.create(list(trainer.overrides)), out / "overrides.yaml")


# nanoGPT's (and common) names that are spelled differently here, for the hint below
NANOGPT_NAMES = {
    "lr": "learning_rate (or optim.lr)", "n_layer": "model.n_layer", "n_head": "model.n_head",
    "n_embd": "model.n_embd", "dropout": "model.dropout", "bias": "model.bias",
    "weight_decay": "optim.weight_decay", "beta1": "optim.betas=[0.9,0.95]", "beta2": "optim.betas=[0.9,0.95]",
    "dtype": "precision=fp32|bf16|fp16", "dataset": "data=shakespeare|text|tokens (data.path=...)",
    "out_dir": "hydra.run.dir", "init_from": "resume=true (or resume=<checkpoint>)",
    "attention": "attn", "optimizer": "optim", "iters": "max_iters", "steps": "max_iters",
    "batch": "batch_size", "context": "block_size",
}


def _unknown_key_hint(argv: list[str]) -> str | None:
    """After Hydra refused an override: a line naming this trainer's spelling of each unknown key
    (nanoGPT's names first, else the closest key), or None when every key is known."""
    import difflib

    configs = Path(__file__).resolve().parent.parent / "configs"
    known = set(OmegaConf.load(configs / "train.yaml")) | {p.name for p in configs.iterdir() if p.is_dir()} | {"hydra"}
    hints = []
    for arg in argv:
        if arg.startswith(("-", "+", "~")) or "=" not in arg:
            continue
        root = arg.partition("=")[0].split(".")[0]
        if root in known:
            continue
        close = difflib.get_close_matches(root, sorted(known), n=1)
        better = NANOGPT_NAMES.get(root) or (close[0] if close else None)
        if better:
            hints.append(f"'{root}' is not a setting here: use {better}")
    return "hint: " + "; ".join(hints) + " (see configs/train.yaml)" if hints else None


def _remove_if_empty(path: str) -> None:
    try:
        os.rmdir(path)
    except OSError:
        pass


if __name__ == "__main__":
    _check_output_dir()
    try:
        main()
    except SystemExit as exit_:
        if exit_.code == 1 and int(os.environ.get("RANK", "0")) == 0:  # Hydra refused an override?
            hint = _unknown_key_hint(sys.argv[1:])
            if hint:
                print(hint, file=sys.stderr, flush=True)
        raise

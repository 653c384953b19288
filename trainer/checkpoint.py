"""Checkpoints: written atomically, loadable with ``torch.load(..., weights_only=True)``.

A checkpoint holds plain tensors, numbers, strings, lists and dicts only (no pickled code):
model and optimizer state, the GradScaler's state, the step, the resolved config and the
tokenizer, so a run can be resumed or sampled from without its data. No RNG state is saved:
resume is exact because every random draw of a step (its batch, its dropout masks) is seeded
from ``(seed, step, rank)`` alone (``trainer.loop.step_seed``), so the model, optimizer and
scaler state plus the step number are all a resumed run needs.
"""
from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path

import torch

from trainer.errors import CheckpointError, OutputError

LAST = "ckpt_last.pt"
BEST = "ckpt_best.pt"


# what every checkpoint of this project holds (``trainer.loop.Trainer.state_dict``)
REQUIRED = ("model", "optimizer", "scaler", "step", "config", "model_args", "tokenizer")


def save_checkpoint(state: dict, path: str | os.PathLike) -> None:
    """Write ``state`` to ``path`` via a temp file and ``os.replace``: a crash never leaves half a
    file, and a failed write (full disk, no permission) leaves the previous checkpoint and no temp file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        if isinstance(e, RuntimeError) and "write" not in str(e):  # torch's zip writer reports I/O as RuntimeError
            raise
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise OutputError(f"cannot write checkpoint {path}: {_reason(e)}; the previous checkpoint is unchanged") from e


def _reason(e: Exception) -> str:
    if (isinstance(e, OSError) and e.errno == errno.ENOSPC) or "No space" in str(e):
        return "no space left on device (free some disk space, then resume)"
    if isinstance(e, IsADirectoryError):
        return "a directory is in the way (remove or rename it)"
    if isinstance(e, OSError):
        return e.strerror or str(e)
    return str(e).splitlines()[0]


def resolve_checkpoint_path(path: str | os.PathLike) -> Path:
    """A checkpoint file, or a run directory (its latest checkpoint)."""
    p = Path(os.path.expanduser(str(path)))
    if p.is_dir():
        p = p / LAST
    if not p.is_file():
        raise CheckpointError(f"no checkpoint at {p}; pass a checkpoint file or a run directory holding {LAST}")
    return p


def resume_path(resume, run_dir: Path) -> Path | None:
    """The checkpoint the ``resume`` setting names: None (fresh run), ``true`` (this run
    directory's latest checkpoint), or a checkpoint file / run directory."""
    if resume in (False, None, "false", ""):
        return None
    if resume is True or resume == "true":
        path = Path(run_dir) / LAST
        if not path.exists():
            raise CheckpointError(
                f"resume=true but {run_dir} has no {LAST}; give the run's directory with "
                "hydra.run.dir=<run dir>, or resume=<checkpoint or run dir>"
            )
        return path
    return resolve_checkpoint_path(resume)


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """Load and validate a checkpoint (to the CPU by default: ``load_state_dict`` copies it onto
    the device, so loading never needs room for two copies on the GPU)."""
    p = resolve_checkpoint_path(path)
    if p.stat().st_size == 0:
        raise CheckpointError(f"{p} is empty (0 bytes): its write never finished.{_other_checkpoint_hint(p)}")
    try:
        state = torch.load(p, map_location=map_location, weights_only=True)
    except Exception as e:  # corrupt file, or not a torch file at all
        detail = str(e).splitlines()[0] if str(e) else ""
        raise CheckpointError(
            f"{p} is not a readable checkpoint ({type(e).__name__}: {detail[:200]}).{_other_checkpoint_hint(p)}"
        ) from e
    missing = [k for k in REQUIRED if k not in state] if isinstance(state, dict) else list(REQUIRED)
    if missing:
        raise CheckpointError(
            f"{p} is a torch file but not a checkpoint written by scripts/train.py (missing {', '.join(missing)}); "
            f"pass a ckpt_last.pt / ckpt_best.pt from a run directory.{_other_checkpoint_hint(p)}"
        )
    return state


def _other_checkpoint_hint(p: Path) -> str:
    """Point at the run's other checkpoint when one exists."""
    other = p.with_name(BEST if p.name == LAST else LAST)
    if p.name in (LAST, BEST) and other.is_file() and other.stat().st_size > 0:
        return f" The run's {other.name} may still be good: continue from it with resume={other} hydra.run.dir={p.parent}"
    return ""


def restore_optimizer(optimizer, saved: dict, rebuild) -> tuple:
    """Load an optimizer of the same type: its state (moments, step counts) carries over, while its
    hyperparameters stay the ones the config gave it (a resumed ``optim.weight_decay=0.5`` applies).
    A state that does not fit (another parameter-group layout) is dropped for ``rebuild()``'s fresh
    optimizer. Returns the optimizer and notes for the log."""
    configured = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    try:
        optimizer.load_state_dict(saved)
    except (ValueError, KeyError) as e:
        return rebuild(), [f"the saved optimizer state does not fit this optimizer ({e}): it starts with fresh state"]
    changed = set()
    for group, hyper in zip(optimizer.param_groups, configured):
        changed |= {k for k, v in hyper.items() if k != "lr" and group.get(k) != v}  # lr: set every step
        group.update(hyper)
    notes = [f"optimizer state carried over with new hyperparameters: {', '.join(sorted(changed))}"] if changed else []
    return optimizer, notes


def restore_scaler(scaler: torch.amp.GradScaler, saved: dict, precision: str) -> list[str]:
    """fp16's loss scale carries over; switching to fp16 starts it fresh, switching away drops it."""
    if scaler.is_enabled() and saved:
        scaler.load_state_dict(saved)
    elif scaler.is_enabled():
        return [f"loss scaling starts fresh (scale {scaler.get_scale():g}): the saved run had none"]
    elif saved:
        return [f"precision={precision} needs no loss scaling: the saved loss scale is dropped"]
    return []


def check_compatible(ckpt_model_args: dict, model_args: dict, source: str) -> None:
    """Raise CheckpointError naming every shape field that differs between checkpoint and config."""
    keys = ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "bias", "pos")
    older = {"pos": "learned"}  # checkpoints from before a field existed had its default
    saved, now = ({k: args.get(k, older.get(k)) for k in keys} for args in (ckpt_model_args, model_args))
    diffs = [f"{k}: checkpoint {saved[k]!r} vs config {now[k]!r}" for k in keys if saved[k] != now[k]]
    if diffs:
        raise CheckpointError(
            f"checkpoint {source} was trained with a different model shape ({'; '.join(diffs)}); "
            "resume with the same model config, or start a new run"
        )

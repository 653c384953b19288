"""The run directory: created with clear errors, held by one process, its checkpoints, and resume.

A run directory belongs to one run. A fresh run refuses a directory that already holds a run's
checkpoints or event files (``resume=true`` continues it, ``overwrite=true`` replaces it), and an
exclusive ``flock`` on ``.lock`` keeps a second process out for as long as the first one lives;
the lock dies with its process, so a crash leaves no stale lock behind.

Checkpoints are written atomically and hold plain tensors, numbers, strings, lists and dicts only,
so ``torch.load(..., weights_only=True)`` reads them: model, optimizer and GradScaler state, the
iteration, the resolved config and the tokenizer. No RNG state is saved: every random draw of a
step (its batch, its dropout masks) is seeded from ``(seed, iteration, rank)`` alone
(``trainer.loop.step_seed``), so that state plus the iteration is all a resumed run needs.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import os
import pickle
from pathlib import Path
from typing import Callable

import torch

from trainer.errors import CheckpointError, OutputError

LAST, BEST, LOCK = "ckpt_last.pt", "ckpt_best.pt", ".lock"
RECORDS = ("summary.json", "config.yaml")
# what every checkpoint of this project holds (``trainer.loop.Trainer.state_dict``)
REQUIRED = ("model", "optimizer", "scaler", "step", "config", "model_args", "tokenizer")


def os_reason(e: BaseException) -> str:
    """``[Errno 28] No space left on device: 'x'`` -> ``no space left on device (free some disk space)``."""
    if (isinstance(e, OSError) and e.errno == errno.ENOSPC) or "No space" in str(e):
        return "no space left on device (free some disk space, then resume)"
    if isinstance(e, IsADirectoryError):
        return "a directory is in the way (remove or rename it)"
    if isinstance(e, OSError):
        return e.strerror or str(e) or type(e).__name__
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def atomic_write(path: str | os.PathLike, content: str | bytes | Callable[[Path], None]) -> None:
    """Write ``content`` (text, bytes, or a function writing the given temp path) to ``path`` via a
    temp file and ``os.replace``: a reader never sees half a file, and a failed write leaves the
    previous file and no temp file behind. OSError (and torch's write errors) propagate."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        if callable(content):
            content(tmp)
        elif isinstance(content, bytes):
            tmp.write_bytes(content)
        else:
            tmp.write_text(content, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise


def check_creatable(path: str | os.PathLike, what: str = "run directory") -> None:
    """Raise OutputError if ``path`` cannot be created or written (a file in the way, no permission)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"cannot use {what} {path}: it is a file, not a directory; choose another directory")
    base = Path(os.path.abspath(path))
    while not base.exists() and base != base.parent:
        base = base.parent
    if not base.is_dir():
        raise OutputError(f"cannot create {what} {path}: {base} is a file, not a directory; choose another directory")
    if not os.access(base, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write {what} {path}: no permission to write in {base}; choose another directory")


class RunDir:
    """Create and lock ``path`` for a run. ``resume`` (false, true, or a checkpoint / run directory)
    names the checkpoint to continue from (``self.resume_from``). A fresh run refuses a directory
    that already holds a run unless ``overwrite``, which removes the old run's files."""

    def __init__(self, path: str | os.PathLike, resume=False, overwrite: bool = False):
        self.path, self._fd = Path(path), None
        check_creatable(self.path)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OutputError(f"cannot create run directory {path}: {os_reason(e)}; choose another directory") from e
        # the lock: an flock on .lock holding this process's PID, dropped when the process dies
        try:
            self._fd = os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise OutputError(f"cannot write in run directory {self.path}: {os_reason(e)}; choose another directory") from e
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(self._fd, 32, 0).decode(errors="replace").strip() or "unknown"
            self.release()
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise OutputError(f"cannot lock run directory {self.path}: {os_reason(e)}") from e
            if holder == str(os.getpid()):
                holder += ", this process: another Trainer on this directory is still alive"
            raise OutputError(f"run directory {self.path} is in use by another training process (PID {holder}); "
                              "wait for it to finish or stop it, or use another directory") from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)
        try:
            self.resume_from = resume_path(resume, self.path) if resume not in (False, None, "false", "") else None
            for name in (LAST, BEST):  # a directory where a checkpoint goes would fail only at the first save
                if (self.path / name).is_dir():
                    raise OutputError(f"{self.path / name} is a directory, but a checkpoint is written there; "
                                      "remove or rename it")
            found = sorted(p.name for p in self.path.iterdir()  # what makes it hold a run
                           if p.name in (LAST, BEST) or p.name.startswith("events.out.tfevents."))
            continuing = self.resume_from is not None and self.resume_from.resolve().parent == self.path.resolve()
            if found and not continuing:
                self._refuse_or_clear(found, overwrite)
        except BaseException:
            self.release()
            raise

    def _refuse_or_clear(self, found: list[str], overwrite: bool) -> None:
        if not overwrite:
            shown = ", ".join(found[:3]) + (f" and {len(found) - 3} more" if len(found) > 3 else "")
            raise OutputError(
                f"run directory {self.path} already holds a run ({shown}); continue it with resume=true, "
                "start this run in a new directory (another hydra.run.dir), or replace it with overwrite=true"
            )
        for name in found + list(RECORDS):
            try:
                (self.path / name).unlink(missing_ok=True)
            except OSError as e:
                raise OutputError(f"overwrite=true cannot remove {self.path / name}: {os_reason(e)}") from e

    def save(self, state: dict, best: bool = False) -> Path:
        """Write ``ckpt_last.pt`` (and ``ckpt_best.pt``) through :func:`atomic_write`; returns the path
        of the last one. A failed write raises OutputError and leaves the previous checkpoint unchanged."""
        for path in (self.path / LAST, self.path / BEST) if best else (self.path / LAST,):
            try:
                atomic_write(path, functools.partial(torch.save, state))
            except (OSError, RuntimeError) as e:
                if isinstance(e, RuntimeError) and "write" not in str(e):  # torch's zip writer reports I/O as RuntimeError
                    raise
                raise OutputError(f"cannot write checkpoint {path}: {os_reason(e)}; the previous checkpoint is "
                                  "unchanged") from e
        return self.path / LAST

    def release(self) -> None:
        """Let another process use the directory (also happens when this process exits)."""
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    __del__ = release  # a Trainer dropped without finishing (in-process use) frees its directory


# ---------------------------------------------------------------------------------------------
# checkpoint files


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
    other = p.with_name(BEST if p.name == LAST else LAST)
    hint = (f" The run's {other.name} may still be good: continue from it with resume={other} hydra.run.dir={p.parent}"
            if p.name in (LAST, BEST) and other.is_file() and other.stat().st_size > 0 else "")
    if p.stat().st_size == 0:
        raise CheckpointError(f"{p} is empty (0 bytes): its write never finished.{hint}")
    try:
        state = torch.load(p, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:  # weights_only refused a global: code, not a gptlab checkpoint
        if "weights_only" not in str(e) and "Weights only" not in str(e):
            raise CheckpointError(f"{p} is not a readable checkpoint (UnpicklingError).{hint}") from e
        raise CheckpointError(f"refusing to unpickle code from {p}: not a gptlab checkpoint (those hold tensors and "
                              f"plain values only, loaded with weights_only=True).{hint}") from None
    except Exception as e:  # corrupt file, or not a torch file at all
        detail = str(e).splitlines()[0] if str(e) else ""
        raise CheckpointError(f"{p} is not a readable checkpoint ({type(e).__name__}: {detail[:200]}).{hint}") from e
    missing = [k for k in REQUIRED if k not in state] if isinstance(state, dict) else list(REQUIRED)
    if missing:
        raise CheckpointError(
            f"{p} is a torch file but not a checkpoint written by scripts/train.py (missing {', '.join(missing)}); "
            f"pass a ckpt_last.pt / ckpt_best.pt from a run directory.{hint}"
        )
    return state


# ---------------------------------------------------------------------------------------------
# resume: what carries over from a checkpoint into the rebuilt run


def restore(state: dict, path, model, optimizer, rebuild, scaler, cfg, model_args: dict, tokenizer: dict | None):
    """Put a checkpoint's weights, optimizer and scaler state into a freshly built run. Refuses a
    checkpoint of another model shape or tokenizer; an optimizer of another type, or a state that
    does not fit, starts fresh (``rebuild()``). Returns the optimizer and notes for the log."""
    check_compatible(state.get("model_args", {}), model_args, str(path))
    if state.get("tokenizer") != tokenizer:
        raise CheckpointError(f"checkpoint {path} was trained with a different tokenizer/vocabulary than "
                              f"data={cfg.data._target_}; resume with the same data config")
    model.load_state_dict(state["model"])  # copies the CPU tensors onto the device
    saved_optim = (state["config"].get("optim") or {}).get("_target_")
    if saved_optim == cfg.optim._target_:
        optimizer, notes = restore_optimizer(optimizer, state["optimizer"], rebuild)
    else:  # another optimizer: its state would not mean the same thing
        optimizer, notes = optimizer, [f"optimizer changed from {saved_optim} to {cfg.optim._target_}: "
                                       "it starts with fresh state"]
    return optimizer, notes + restore_scaler(scaler, state.get("scaler") or {}, cfg.precision.name)


def check_compatible(ckpt_model_args: dict, model_args: dict, source: str) -> None:
    """Raise CheckpointError naming every shape field that differs between checkpoint and config."""
    keys = ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "bias", "pos", "norm", "qk_norm",
            "tie_embeddings", "unet_skips", "value_embeddings")  # the fields that change the weights' names or shapes
    older = {"pos": "learned", "norm": "layernorm", "qk_norm": False, "tie_embeddings": True, "unet_skips": False,
             "value_embeddings": False}  # checkpoints from before a field existed had its default
    saved, now = ({k: args.get(k, older.get(k)) for k in keys} for args in (ckpt_model_args, model_args))
    diffs = [f"{k}: checkpoint {saved[k]!r} vs config {now[k]!r}" for k in keys if saved[k] != now[k]]
    if diffs:
        raise CheckpointError(
            f"checkpoint {source} was trained with a different model shape ({'; '.join(diffs)}); "
            "resume with the same model config, or start a new run"
        )


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

"""The run directory: created with clear errors, held by one process at a time, never silently reused.

A run directory belongs to one run. A fresh run refuses a directory that already holds a run's
checkpoints or event files (``resume=true`` continues it, ``overwrite=true`` replaces it), and an
exclusive ``flock`` on ``.lock`` keeps a second process (a repeated command, a second resume)
out for as long as the first one lives; the lock dies with its process, so a crash leaves no
stale lock behind.
"""
from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

from trainer.errors import OutputError

LOCK = ".lock"
CHECKPOINTS = ("ckpt_last.pt", "ckpt_best.pt")
RECORDS = ("summary.json", "config.yaml")


def os_reason(e: OSError) -> str:
    """``[Errno 28] No space left on device: 'x'`` -> ``No space left on device``."""
    return e.strerror or str(e) or type(e).__name__


def first_existing_ancestor(path: Path) -> Path:
    p = Path(os.path.abspath(path))
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_creatable(path: str | os.PathLike, what: str = "run directory") -> None:
    """Raise OutputError if ``path`` cannot be created or written (a file in the way, no permission)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"cannot use {what} {path}: it is a file, not a directory; choose another directory")
    base = first_existing_ancestor(path)
    if not base.is_dir():
        raise OutputError(f"cannot create {what} {path}: {base} is a file, not a directory; choose another directory")
    if not os.access(base, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write {what} {path}: no permission to write in {base}; choose another directory")


def make_run_dir(path: Path) -> None:
    check_creatable(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create run directory {path}: {os_reason(e)}; choose another directory") from e


class RunLock:
    """An exclusive lock on a run directory for the life of this process (or until ``release``)."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK
        try:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise OutputError(f"cannot write in run directory {run_dir}: {os_reason(e)}; choose another directory") from e
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(self._fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(self._fd)
            self._fd = None
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise OutputError(f"cannot lock run directory {run_dir}: {os_reason(e)}") from e
            if holder == str(os.getpid()):
                holder += ", this process: another Trainer on this directory is still alive"
            raise OutputError(
                f"run directory {run_dir} is in use by another training process (PID {holder}); wait for it to "
                "finish or stop it, or use another directory"
            ) from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    __del__ = release  # a Trainer dropped without finishing (in-process use) frees its directory


def run_files(run_dir: Path) -> list[str]:
    """The files that make ``run_dir`` hold a run: checkpoints and TensorBoard event files."""
    found = [name for name in CHECKPOINTS if (run_dir / name).exists()]
    return found + sorted(p.name for p in run_dir.glob("events.out.tfevents.*"))


def check_checkpoint_paths(run_dir: Path) -> None:
    """A directory where a checkpoint will be written would fail only at the first save: refuse now."""
    for name in CHECKPOINTS:
        if (run_dir / name).is_dir():
            raise OutputError(f"{run_dir / name} is a directory, but a checkpoint is written there; remove or rename it")


def clear_run(run_dir: Path) -> None:
    """``overwrite=true``: remove the previous run's checkpoints, event files and records."""
    for name in run_files(run_dir) + list(RECORDS):
        try:
            (run_dir / name).unlink(missing_ok=True)
        except OSError as e:
            raise OutputError(f"overwrite=true cannot remove {run_dir / name}: {os_reason(e)}") from e


def claim(run_dir: Path, resume, overwrite: bool) -> tuple[RunLock, Path | None]:
    """Create and lock ``run_dir`` for this run; returns the lock and the checkpoint that the
    ``resume`` setting names. A fresh run (or one started from another run's checkpoint) refuses a
    directory that already holds a run unless ``overwrite`` is set, which removes the old run's files."""
    from trainer.checkpoint import resume_path

    make_run_dir(run_dir)
    lock = RunLock(run_dir)
    try:
        check_checkpoint_paths(run_dir)
        resume_from = resume_path(resume, run_dir)
        found = run_files(run_dir)
        continuing = resume_from is not None and Path(resume_from).resolve().parent == Path(run_dir).resolve()
        if found and not continuing:
            if not overwrite:
                shown = ", ".join(found[:3]) + (f" and {len(found) - 3} more" if len(found) > 3 else "")
                raise OutputError(
                    f"run directory {run_dir} already holds a run ({shown}); continue it with resume=true, "
                    "start this run in a new directory (another hydra.run.dir), or replace it with overwrite=true"
                )
            clear_run(run_dir)
    except BaseException:
        lock.release()
        raise
    return lock, resume_from

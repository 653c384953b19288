"""Checkpoints: written atomically, loadable with ``torch.load(..., weights_only=True)``.

A checkpoint holds plain tensors, numbers, strings, lists and dicts only (no pickled code):
model and optimizer state, the GradScaler's state, the step, the resolved config and the
tokenizer, so a run can be resumed or sampled from without its data. No RNG state is saved:
resume is exact because every random draw of a step (its batch, its dropout masks) is seeded
from ``(seed, step, rank)`` alone (``trainer.loop.step_seed``), so the model, optimizer and
scaler state plus the step number are all a resumed run needs.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from trainer.errors import CheckpointError  # noqa: F401  (re-exported: ckpt.CheckpointError)

LAST = "ckpt_last.pt"
BEST = "ckpt_best.pt"


def save_checkpoint(state: dict, path: str | os.PathLike) -> None:
    """Write ``state`` to ``path`` via a temp file and ``os.replace``: a crash never leaves half a file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


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
    p = resolve_checkpoint_path(path)
    try:
        return torch.load(p, map_location=map_location, weights_only=True)
    except Exception as e:  # corrupt file, or not a checkpoint at all
        raise CheckpointError(f"{p} is not a readable checkpoint ({type(e).__name__}: {str(e).splitlines()[0]})") from e


def check_compatible(ckpt_model_args: dict, model_args: dict, source: str) -> None:
    """Raise CheckpointError naming every shape field that differs between checkpoint and config."""
    keys = ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "bias")
    diffs = [f"{k}: checkpoint {ckpt_model_args.get(k)!r} vs config {model_args.get(k)!r}"
             for k in keys if ckpt_model_args.get(k) != model_args.get(k)]
    if diffs:
        raise CheckpointError(
            f"checkpoint {source} was trained with a different model shape ({'; '.join(diffs)}); "
            "resume with the same model config, or start a new run"
        )

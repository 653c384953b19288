"""Corpus sources read as a stream of pieces: text files, JSONL/Parquet records, Hugging Face datasets.

A source never holds the corpus in memory: it yields ``Piece``s of at most about ``chunk_bytes``
of text, each tagged with its split and whether it starts a document. The split is decided while
streaming, so it needs no second pass:

- text files (one document each): the validation split is the last ``val_fraction`` of the bytes,
  as in nanoGPT's shakespeare_char (a single file is usually one long document);
- records (JSONL, Parquet, Hugging Face): an evenly spread ``val_fraction`` of the documents
  (document i goes to val when floor((i + 1) f) > floor(i f)); at least one.
"""
from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from trainer.errors import DataError

CHUNK_BYTES = 1 << 20
RECORD_SUFFIXES = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}


@dataclass
class Piece:
    split: str          # "train" or "val"
    text: str
    doc_start: bool     # the first piece of a document (gets the end-of-text separator before it)
    nbytes: int         # input bytes this piece accounts for (progress)


def expand_paths(path: str | os.PathLike) -> list[Path]:
    """A file, a directory (every non-hidden file under it, sorted) or a glob pattern."""
    text = os.path.expanduser(str(path))
    p = Path(text)
    if p.is_file():
        return [p]
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and not any(s.startswith(".") for s in f.relative_to(p).parts))
        if not files:
            raise DataError(f"data.path={path} is a directory with no files in it")
        return files
    matches = sorted(Path(m) for m in glob.glob(text, recursive=True) if Path(m).is_file())
    if matches:
        return matches
    raise DataError(f"data.path={path} does not exist; point it (or prepare.py's SOURCE) at a text/JSONL/Parquet file, a directory or a glob")


def source_kind(files: list[Path]) -> str:
    """'text', 'jsonl' or 'parquet' from the suffixes (one kind per source)."""
    kinds = {RECORD_SUFFIXES.get(f.suffix.lower(), "text") for f in files}
    if len(kinds) > 1:
        raise DataError(f"the source mixes {' and '.join(sorted(kinds))} files; give one kind of file per source")
    return kinds.pop()


# ---------------------------------------------------------------------------------------------
# Text files


def text_pieces(files: list[Path], val_fraction: float, chunk_bytes: int = CHUNK_BYTES) -> Iterator[Piece]:
    """Pieces of the files in order; the last ``val_fraction`` of all bytes is the val split."""
    total = sum(f.stat().st_size for f in files)
    val_start = total - max(1, int(total * val_fraction))
    offset, seen_text = 0, False
    for f in files:
        doc_start = True
        with open(f, "rb") as fh:
            while True:
                raw = fh.read(chunk_bytes)
                if not raw:
                    break
                raw += fh.readline()  # end pieces at a line end: no character is cut in two
                for split, part in _split_at(raw, val_start - offset):
                    text = _decode(part, f, offset)
                    seen_text = seen_text or bool(text.strip())
                    yield Piece(split, text, doc_start, len(part))
                    doc_start = False
                offset += len(raw)
    if not seen_text:
        raise DataError(f"the source ({files[0]}{' ...' if len(files) > 1 else ''}) is empty; it needs some text to train on")


def _split_at(raw: bytes, cut: int) -> list[tuple[str, bytes]]:
    """Split a chunk at byte ``cut`` (moved forward to a UTF-8 character start) into train/val."""
    if cut <= 0:
        return [("val", raw)]
    if cut >= len(raw):
        return [("train", raw)]
    while cut < len(raw) and (raw[cut] & 0xC0) == 0x80:  # a continuation byte: not a character start
        cut += 1
    return [(s, p) for s, p in (("train", raw[:cut]), ("val", raw[cut:])) if p]


def _decode(raw: bytes, path: Path, offset: int) -> str:
    if b"\x00" in raw:
        raise DataError(f"{path} is not text (it contains NUL bytes); data.path must name UTF-8 text")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not valid UTF-8 text ({e.reason} at byte {offset + e.start}); convert it to UTF-8") from None


# ---------------------------------------------------------------------------------------------
# Records: JSONL, Parquet, Hugging Face datasets


def jsonl_records(files: list[Path], text_field: str) -> Iterator[tuple[str, int, str]]:
    """(text, input bytes, where) for each line of JSONL files."""
    for f in files:
        with open(f, "rb") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                where = f"{f}:{lineno}"
                try:
                    record = json.loads(line)
                except ValueError as e:
                    raise DataError(f"{where} is not valid JSON ({e}); each line must be one JSON object") from None
                yield _field(record, text_field, where), len(line), where


def parquet_records(files: list[Path], text_field: str, batch_rows: int = 1024) -> Iterator[tuple[str, int, str]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError("reading Parquet needs pyarrow: pip install 'gptlab[parquet]' (or pip install pyarrow)") from None
    for f in files:
        pf = pq.ParquetFile(f)
        names = pf.schema_arrow.names
        if text_field not in names:
            raise DataError(f"{f} has no {text_field!r} column (columns: {', '.join(names)}); "
                            "name the text column with --text-field / data.text_field")
        for batch in pf.iter_batches(batch_size=batch_rows, columns=[text_field]):
            for i, text in enumerate(batch.column(0).to_pylist()):
                yield _field({text_field: text}, text_field, f"{f} row {i}"), len(text or "") + 1, str(f)


def hf_records(name: str, config: str | None, split: str, text_field: str, data_files=None) -> Iterator[tuple[str, int, str]]:
    """A Hugging Face dataset, streamed (never downloaded whole) with the ``datasets`` library."""
    try:
        import datasets
    except ImportError:
        raise DataError("--hf needs the datasets library: pip install 'gptlab[hf]' (or pip install datasets)") from None
    try:
        stream = datasets.load_dataset(name, config, split=split, streaming=True, data_files=data_files)
    except Exception as e:
        raise DataError(f"cannot open the Hugging Face dataset {name!r} (config {config}, split {split}): "
                        f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    for i, record in enumerate(stream):
        text = _field(record, text_field, f"{name} record {i}")
        yield text, len(text.encode("utf-8")), name


def _field(record, text_field: str, where: str) -> str:
    if not isinstance(record, dict) or text_field not in record:
        fields = ", ".join(map(str, record)) if isinstance(record, dict) else type(record).__name__
        raise DataError(f"{where} has no {text_field!r} field (fields: {fields}); "
                        "name the text field with --text-field / data.text_field")
    text = record[text_field]
    if not isinstance(text, str):
        raise DataError(f"{where}: field {text_field!r} is {type(text).__name__}, not text")
    return text


def record_pieces(records: Iterable[tuple[str, int, str]], val_fraction: float,
                  chunk_bytes: int = CHUNK_BYTES) -> Iterator[Piece]:
    """Documents from records, an evenly spread ``val_fraction`` of them in val (at least one)."""
    held, n_val, i = None, 0, -1
    for i, (text, nbytes, _) in enumerate(records):
        if held is not None:
            yield from _document(*held, chunk_bytes)
        to_val = int((i + 1) * val_fraction) > int(i * val_fraction)
        n_val += to_val
        held = ("val" if to_val else "train", text, nbytes)
    if held is None:
        raise DataError("the source holds no documents")
    if n_val == 0:  # too few documents for the fraction: the last one is the validation split
        held = ("val",) + held[1:]
    if held[0] == "val" and i == 0:
        raise DataError("the source holds a single document; a train and a val split need at least two")
    yield from _document(*held, chunk_bytes)


def _document(split: str, text: str, nbytes: int, chunk_bytes: int) -> Iterator[Piece]:
    # a long document is cut into pieces (at line ends where possible) so work stays spread
    if len(text) <= chunk_bytes:
        yield Piece(split, text, True, nbytes)
        return
    start, first = 0, True
    while start < len(text):
        end = text.find("\n", start + chunk_bytes)
        end = len(text) if end < 0 else end + 1
        yield Piece(split, text[start:end], first, nbytes * (end - start) // len(text))
        start, first = end, False

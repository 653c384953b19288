"""Token shards on disk: the llm.c / modded-nanogpt format, nanoGPT's layout, and random windows.

A shard is a 256 x int32 header followed by the token ids (the format llm.c and modded-nanogpt use
for FineWeb)::

    header[0] = magic     20240520 for uint16 tokens (GPT-2 sized vocabularies),
                          20240801 for uint32 tokens (llm.c's convention for larger vocabularies)
    header[1] = version   1 with uint16 tokens, 7 with uint32 tokens (llm.c's numbers)
    header[2] = number of tokens that follow the 1024-byte header

A prepared directory holds ``train_NNNNNN.bin`` and ``val_NNNNNN.bin`` shards (FineWeb's
``fineweb_train_000001.bin`` names are read as they are). nanoGPT's layout, headerless uint16
``train.bin``/``val.bin`` (+ ``meta.pkl`` for its character-level corpora), is read too.

``Tokens`` presents a split's shards as one sequence whose windows never straddle two shards.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from trainer.errors import DataError

HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
# (magic, version) -> token dtype, as llm.c's dev/data/data_common.py defines them
FORMATS = {(20240520, 1): np.dtype(np.uint16), (20240801, 7): np.dtype(np.uint32)}
_BY_DTYPE = {np.dtype(np.uint16): (20240520, 1), np.dtype(np.uint32): (20240801, 7)}


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocabularies up to 65,536 tokens), else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def header_for(dtype: np.dtype, n_tokens: int) -> np.ndarray:
    magic, version = _BY_DTYPE[np.dtype(dtype)]
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = (magic, version, n_tokens)
    return header


def write_shard(path: Path, ids: np.ndarray, dtype=np.uint16) -> None:
    """One complete shard (tests and small tools; the pipeline streams through ``ShardWriter``)."""
    from trainer.rundir import atomic_write

    atomic_write(path, header_for(np.dtype(dtype), len(ids)).tobytes() + np.asarray(ids).astype(dtype).tobytes())


def read_shard(path: Path) -> np.ndarray:
    """A shard's tokens as a read-only memmap, after checking its header against its size."""
    path = Path(path)
    size = path.stat().st_size
    if size < HEADER_BYTES:
        raise DataError(f"{path} is too short to be a token shard ({size} bytes, the header alone is {HEADER_BYTES})")
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    key = (int(header[0]), int(header[1]))
    if key not in FORMATS:
        raise DataError(
            f"{path} is not a token shard (magic {key[0]}, version {key[1]}; expected magic 20240520 version 1 "
            "or 20240801 version 7); prepare the data with scripts/prepare.py"
        )
    dtype, n = FORMATS[key], int(header[2])
    if n == 0:
        raise DataError(f"{path} is an empty shard (0 tokens); delete it or prepare the data again")
    if size != HEADER_BYTES + n * dtype.itemsize:
        raise DataError(
            f"{path} is truncated or corrupt: its header says {n} tokens ({HEADER_BYTES + n * dtype.itemsize} bytes) "
            f"but the file has {size} bytes; prepare the data again"
        )
    return np.memmap(path, dtype=dtype, mode="r", offset=HEADER_BYTES, shape=(n,))


def read_headerless(path: Path, dtype=np.uint16) -> np.ndarray:
    """nanoGPT's ``train.bin``/``val.bin``: raw token ids, no header."""
    path = Path(path)
    dtype = np.dtype(dtype)
    size = path.stat().st_size
    if size == 0:
        raise DataError(f"{path} is empty (0 tokens); prepare the data again")
    if size % dtype.itemsize:
        raise DataError(f"{path} has {size} bytes, not a whole number of {dtype.name} tokens; it is truncated")
    with open(path, "rb") as f:
        head = np.frombuffer(f.read(8), dtype="<i4")
    if len(head) == 2 and (int(head[0]), int(head[1])) in FORMATS:
        raise DataError(f"{path} starts with a shard header; name it train_000000.bin / val_000000.bin")
    return np.memmap(path, dtype=dtype, mode="r")


# ---------------------------------------------------------------------------------------------
# A split as one sequence of windows


@dataclass
class Tokens:
    """A split's shards seen as one sequence, for windows of ``block_size + 1`` tokens.

    A window start is a global position (shard start + offset in the shard); windows are drawn
    only where they fit inside one shard, since the tokens of two shards are unrelated text.
    ``split`` ("train", "val") names the split in errors.
    """

    shards: list[np.ndarray]
    split: str | None = None

    def __post_init__(self):
        self.starts = np.cumsum([0] + [len(s) for s in self.shards])  # (n_shards + 1,)
        self.dtype = self.shards[0].dtype

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __array__(self, dtype=None, copy=None):  # np.asarray(tokens): the whole split (small splits, tests)
        out = np.concatenate([np.asarray(s) for s in self.shards])
        return out if dtype is None else out.astype(dtype)

    def __getitem__(self, key: slice) -> np.ndarray:
        """Tokens ``key.start:key.stop`` of the concatenated split (reads only those shards)."""
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError("Tokens supports contiguous slices only")
        lo, hi, _ = key.indices(len(self))
        parts = []
        for s, shard in enumerate(self.shards):
            a, b = max(lo - self.starts[s], 0), min(hi - self.starts[s], len(shard))
            if a < b:
                parts.append(np.asarray(shard[a:b]))
        return np.concatenate(parts) if parts else np.zeros(0, dtype=self.dtype)

    def tolist(self) -> list[int]:
        return np.asarray(self).tolist()

    def window_counts(self, block_size: int) -> np.ndarray:
        """Number of windows of block_size + 1 tokens that fit inside each shard."""
        return np.maximum(np.diff(self.starts) - block_size, 0)

    def num_windows(self, block_size: int) -> int:
        """How many windows of block_size + 1 tokens fit inside one shard: at least one, else the
        split is too short for ``block_size`` (a DataError, raised at the start of a run)."""
        n = int(self.window_counts(block_size).sum())
        if n < 1:
            longest = max(len(s) for s in self.shards)
            raise DataError(
                f"block_size={block_size} is too large for the {self.split or 'token'} split (its longest shard has "
                f"{longest} tokens); use a smaller block_size or more text"
            )
        return n

    def window_starts(self, index: np.ndarray, block_size: int) -> np.ndarray:
        """Global starts (int64) of windows number ``index`` (0 <= index < num_windows), in shard order."""
        cum = np.cumsum(self.window_counts(block_size))  # windows up to each shard's end
        shard = np.searchsorted(cum, index, side="right")
        before = np.concatenate([[0], cum])[shard]
        return (self.starts[shard] + (np.asarray(index) - before)).astype(np.int64)

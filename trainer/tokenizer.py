"""Tokenizers: character-level (the default) and byte-level BPE trained locally.

Both serialize to a small JSON-able dict so a checkpoint carries its tokenizer and can be loaded
with ``torch.load(..., weights_only=True)``.
"""
from __future__ import annotations

import json
from typing import Iterable

import numpy as np


class CharTokenizer:
    """One token per Unicode character seen in the corpus."""

    kind = "char"

    def __init__(self, chars: str):
        self.chars = chars
        self._stoi = {c: i for i, c in enumerate(chars)}
        # sorted code points let encode() vectorize with searchsorted
        self._codes = np.array([ord(c) for c in chars], dtype=np.uint32)

    @classmethod
    def train(cls, text: str) -> "CharTokenizer":
        return cls("".join(sorted(set(text))))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> list[int]:
        return self.encode_array(text).tolist()

    def encode_array(self, text: str) -> np.ndarray:
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        ids = np.searchsorted(self._codes, codes)
        ids = np.minimum(ids, len(self._codes) - 1)
        unknown = self._codes[ids] != codes
        if unknown.any():
            bad = sorted({chr(c) for c in codes[unknown]})[:10]
            raise ValueError(f"text has characters outside the tokenizer's vocabulary: {bad!r}")
        return ids.astype(np.int64)

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(self.chars[i] for i in ids)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "chars": self.chars}


class BPETokenizer:
    """Byte-level BPE (GPT-2 style) trained with the ``tokenizers`` library."""

    kind = "bpe"

    def __init__(self, tokenizer_json: str):
        from tokenizers import Tokenizer

        self._json = tokenizer_json
        self._tok = Tokenizer.from_str(tokenizer_json)

    @classmethod
    def train(cls, text: str, vocab_size: int) -> "BPETokenizer":
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        if vocab_size < 257:
            raise ValueError(f"data.vocab_size={vocab_size} is too small for byte-level BPE (need >= 257)")
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        # train on chunks of lines so the library can parallelize
        lines = text.splitlines(keepends=True)
        chunks = ("".join(lines[i : i + 1000]) for i in range(0, len(lines), 1000))
        tok.train_from_iterator(chunks, trainer=trainer)
        return cls(tok.to_str())

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def encode_array(self, text: str) -> np.ndarray:
        lines = text.splitlines(keepends=True)
        chunks = ["".join(lines[i : i + 1000]) for i in range(0, len(lines), 1000)]
        ids = [e.ids for e in self._tok.encode_batch(chunks)]
        return np.fromiter((i for row in ids for i in row), dtype=np.int64)

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode(list(ids))

    def to_dict(self) -> dict:
        return {"kind": self.kind, "json": self._json}


Tokenizer = CharTokenizer | BPETokenizer


def tokenizer_from_dict(d: dict) -> Tokenizer:
    """Inverse of ``to_dict`` (used when loading checkpoints and cached datasets)."""
    if d.get("kind") == "char":
        return CharTokenizer(d["chars"])
    if d.get("kind") == "bpe":
        return BPETokenizer(d["json"])
    raise ValueError(f"unknown tokenizer kind {d.get('kind')!r} (expected 'char' or 'bpe')")


def save_tokenizer(tok: Tokenizer, path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(tok.to_dict(), f)


def load_tokenizer(path) -> Tokenizer:
    with open(path, encoding="utf-8") as f:
        return tokenizer_from_dict(json.load(f))

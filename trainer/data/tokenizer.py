"""Tokenizers: character-level (the default, here) and byte-level BPE (``trainer/data/bpe.py``:
trained locally or read from a Hugging Face ``tokenizer.json``, and tiktoken encodings such as
GPT-2's, ``data.tokenizer=gpt2``), which is imported only when one is asked for.

All serialize to a small JSON-able dict so a checkpoint carries its tokenizer and can be loaded
with ``torch.load(..., weights_only=True)``. Each also reports:

- ``eot_id``: the end-of-text token that separates documents (None for ``char``, whose documents
  are separated by a newline instead, since its vocabulary is exactly the corpus's characters);
- ``token_bytes()``: how many UTF-8 bytes of text each token id stands for (0 for special tokens),
  which turns a loss in nats per token into bits per byte, comparable across tokenizers.
"""
from __future__ import annotations

import base64
import json
from typing import TYPE_CHECKING, Iterable, Union

import numpy as np

if TYPE_CHECKING:
    from trainer.data.bpe import BPETokenizer, TiktokenTokenizer


class CharTokenizer:
    """One token per Unicode character seen in the corpus."""

    kind = name = "char"
    eot_id = None

    def __init__(self, chars: str):
        self.chars, self.vocab_size = chars, len(chars)
        # sorted code points let encode() vectorize with searchsorted (ids need not be in code order:
        # nanoGPT's meta.pkl may number characters in any order)
        codes = np.frombuffer(chars.encode("utf-32-le"), dtype=np.uint32)
        self._order = np.argsort(codes, kind="stable")
        self._codes = codes[self._order]

    @classmethod
    def train(cls, text: str) -> "CharTokenizer":
        return cls("".join(sorted(set(text))))

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
        return self._order[ids].astype(np.int64)

    def decode(self, ids: Iterable[int]) -> str:
        return "".join([self.chars[i] for i in ids])

    def token_bytes(self) -> np.ndarray:
        return np.array([len(c.encode("utf-8")) for c in self.chars], dtype=np.int64)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "chars": self.chars}


Tokenizer = Union[CharTokenizer, "BPETokenizer", "TiktokenTokenizer"]


def tokenizer_from_dict(d: dict) -> Tokenizer:
    """Inverse of ``to_dict`` (used when loading checkpoints and cached datasets)."""
    kind = d.get("kind")
    if kind == "char":
        return CharTokenizer(d["chars"])
    if kind not in ("bpe", "tiktoken"):
        raise ValueError(f"unknown tokenizer kind {kind!r} (expected 'char', 'bpe' or 'tiktoken')")
    from trainer.data.bpe import BPETokenizer, TiktokenTokenizer

    if kind == "bpe":
        return BPETokenizer(d["json"])
    if "ranks" not in d:
        return TiktokenTokenizer.named(d["name"])
    ranks = {base64.b64decode(b): r for b, r in d["ranks"].items()}
    return TiktokenTokenizer.from_ranks(d["name"], ranks, d["special"], d["pattern"])


def save_tokenizer(tok: Tokenizer, path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(tok.to_dict(), f)


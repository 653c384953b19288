"""Byte-level BPE tokenizers (imported when one is asked for: the default ``char`` needs none of
this): BPE trained locally with the ``tokenizers`` library or read from a Hugging Face
``tokenizer.json``, and tiktoken encodings (GPT-2's, ``data.tokenizer=gpt2``). Their interface is
``CharTokenizer``'s (trainer/data/tokenizer.py).
"""
from __future__ import annotations

import base64
import json
from functools import lru_cache
from typing import Iterable, Iterator

import numpy as np

from trainer.errors import DataError

EOT = "<|endoftext|>"  # the end-of-text token between documents

# GPT-2's pre-tokenization pattern (as in tiktoken's gpt2 encoding): contractions, letters, digits,
# punctuation runs, whitespace
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


@lru_cache(maxsize=1)
def byte_alphabet() -> dict[str, int]:
    """GPT-2's byte-level alphabet, reversed: printable character -> the byte it stands for.

    Byte-level BPE shows each byte as a printable character (printable Latin-1 bytes as themselves,
    the others shifted to code points from 256 on) so that tokens are strings.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shown = {b: b for b in printable}
    extra = 0
    for b in range(256):
        if b not in shown:
            shown[b] = 256 + extra
            extra += 1
    return {chr(c): b for b, c in shown.items()}


class BPETokenizer:
    """Byte-level BPE (GPT-2 style) trained with the ``tokenizers`` library, or any Hugging Face
    ``tokenizer.json`` (``data.tokenizer_path=...``)."""

    kind = "bpe"

    def __init__(self, tokenizer_json: str):
        from tokenizers import Tokenizer

        self._json = tokenizer_json
        self._tok = Tokenizer.from_str(tokenizer_json)

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> "BPETokenizer":
        """Train on ``texts`` (an iterable of strings: a bounded sample of the corpus)."""
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        if vocab_size < 258:
            raise DataError(f"data.vocab_size={vocab_size} is too small for byte-level BPE (need >= 258: 256 bytes + {EOT})")
        if isinstance(texts, str):
            texts = [texts]
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=[EOT],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
        )
        tok.train_from_iterator(_line_chunks(texts), trainer=trainer)
        return cls(tok.to_str())

    @classmethod
    def from_file(cls, path) -> "BPETokenizer":
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
            return cls(text)
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"cannot read tokenizer file {path} ({e}); give a Hugging Face tokenizer.json") from None
        except Exception as e:  # the tokenizers library's own parse error
            raise DataError(f"{path} is not a Hugging Face tokenizer.json ({str(e).splitlines()[0]})") from None

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    @property
    def name(self) -> str:
        return f"bpe{self.vocab_size}"

    @property
    def eot_id(self) -> int | None:
        return self._tok.token_to_id(EOT)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_array(self, text: str) -> np.ndarray:
        chunks = list(_line_chunks([text]))
        ids = [e.ids for e in self._tok.encode_batch(chunks, add_special_tokens=False)]
        return np.fromiter((i for row in ids for i in row), dtype=np.int64)

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode(list(ids))

    def token_bytes(self) -> np.ndarray:
        alphabet = byte_alphabet()
        byte_level = (json.loads(self._json).get("decoder") or {}).get("type") == "ByteLevel"
        special = {t.content for t in self._tok.get_added_tokens_decoder().values() if t.special}
        out = np.zeros(self.vocab_size, dtype=np.int64)
        for i in range(self.vocab_size):
            token = self._tok.id_to_token(i)
            if token is None or token in special:
                continue
            if byte_level and all(c in alphabet for c in token):
                out[i] = len(token)  # one shown character per byte
            else:
                out[i] = len(self._tok.decode([i]).encode("utf-8"))
        return out

    def to_dict(self) -> dict:
        return {"kind": self.kind, "json": self._json}


class TiktokenTokenizer:
    """A tiktoken encoding: ``gpt2`` (50,257 tokens) by name, or one built from mergeable ranks."""

    kind = "tiktoken"

    def __init__(self, encoding, registered: bool = False):
        self.enc = encoding
        self.registered = registered  # loadable by name with tiktoken.get_encoding

    @classmethod
    def named(cls, name: str = "gpt2") -> "TiktokenTokenizer":
        try:
            import tiktoken
        except ImportError:
            raise DataError("data.tokenizer=gpt2 needs tiktoken: pip install tiktoken") from None
        try:
            return cls(tiktoken.get_encoding(name), registered=True)
        except Exception as e:
            reason = f"{type(e).__name__}: {str(e).splitlines()[0][:80]}" if str(e) else type(e).__name__
            raise DataError(
                f"cannot load tiktoken's {name!r} encoding ({reason}); tiktoken downloads it once into "
                "$TIKTOKEN_CACHE_DIR. Offline: set TIKTOKEN_CACHE_DIR to a copy of that cache from a machine that "
                "has it, or give GPT-2's Hugging Face tokenizer.json (data.tokenizer_path=... / --tokenizer-path)"
            ) from None

    @classmethod
    def from_ranks(cls, name: str, ranks: dict[bytes, int], special: dict[str, int], pattern: str = GPT2_PATTERN):
        import tiktoken

        return cls(tiktoken.Encoding(name, pat_str=pattern, mergeable_ranks=ranks, special_tokens=special))

    @property
    def vocab_size(self) -> int:
        return self.enc.n_vocab

    @property
    def name(self) -> str:
        return self.enc.name

    @property
    def eot_id(self) -> int | None:
        return self.enc._special_tokens.get(EOT)

    def encode(self, text: str) -> list[int]:
        return self.enc.encode_ordinary(text)

    def encode_array(self, text: str) -> np.ndarray:
        return np.asarray(self.enc.encode_ordinary(text), dtype=np.int64)

    def decode(self, ids: Iterable[int]) -> str:
        return self.enc.decode(list(ids))

    def token_bytes(self) -> np.ndarray:
        special = set(self.enc._special_tokens.values())
        out = np.zeros(self.vocab_size, dtype=np.int64)
        for i in range(self.vocab_size):
            if i not in special:
                try:
                    out[i] = len(self.enc.decode_single_token_bytes(i))
                except KeyError:  # an unused id in a sparse vocabulary
                    pass
        return out

    def to_dict(self) -> dict:
        if self.registered:
            return {"kind": self.kind, "name": self.enc.name}
        ranks = {base64.b64encode(b).decode(): r for b, r in self.enc._mergeable_ranks.items()}
        return {"kind": self.kind, "name": self.enc.name, "pattern": self.enc._pat_str,
                "ranks": ranks, "special": dict(self.enc._special_tokens)}


def _line_chunks(texts: Iterable[str], lines_per_chunk: int = 1000) -> Iterator[str]:
    # tokenizers parallelizes over the items of a batch: hand it groups of lines
    for text in texts:
        lines = text.splitlines(keepends=True)
        for i in range(0, len(lines), lines_per_chunk):
            yield "".join(lines[i : i + lines_per_chunk])


def tiktoken_from_bpe(bpe: BPETokenizer, name: str = "bpe-as-tiktoken") -> TiktokenTokenizer:
    """The same byte-level BPE as a tiktoken encoding with GPT-2's pattern (ranks = merge order).

    Used to measure the tiktoken path at GPT-2's vocabulary size where GPT-2's own file cannot be
    downloaded, and by tests that need a tiktoken encoding without the network.
    """
    alphabet = byte_alphabet()
    ranks, special = {}, {}
    for token, i in bpe._tok.get_vocab().items():
        if token == EOT:
            special[token] = i
        else:
            ranks[bytes(alphabet[c] for c in token)] = i
    return TiktokenTokenizer.from_ranks(name, ranks, special)


def hf_tokenizer_json(tok) -> str | None:
    """The tokenizer as a Hugging Face ``tokenizer.json`` (for ``transformers``' ``AutoTokenizer``), or
    None for the character tokenizer, which has no byte-level form. A BPE tokenizer already is one;
    a tiktoken encoding (GPT-2's) becomes byte-level BPE: its pattern as the pre-tokenizer, its ranks
    as the vocabulary, and as merges every split of a token into two tokens, in the order of the
    merged token's rank, which is the order tiktoken merges in (``transformers``' own conversion)."""
    if isinstance(tok, BPETokenizer):
        return tok._json
    if not isinstance(tok, TiktokenTokenizer):
        return None
    from tokenizers import Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    shown = {b: c for c, b in byte_alphabet().items()}  # byte -> the printable character standing for it
    ranks = tok.enc._mergeable_ranks

    def text(b: bytes) -> str:
        return "".join(shown[x] for x in b)

    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        splits = [(token[:i], token[i:]) for i in range(1, len(token)) if token[:i] in ranks and token[i:] in ranks]
        merges += sorted(splits, key=lambda lr: (ranks[lr[0]], ranks[lr[1]]))
    special = tok.enc._special_tokens  # e.g. <|endoftext|>: kept at its own id
    out = HFTokenizer(models.BPE(vocab={text(t): r for t, r in ranks.items()} | special,
                                 merges=[(text(a), text(b)) for a, b in merges]))
    out.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(tok.enc._pat_str), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    out.decoder = decoders.ByteLevel()
    out.add_special_tokens(sorted(special, key=special.get))
    return out.to_str()

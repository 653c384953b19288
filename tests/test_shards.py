"""Token shards: llm.c's format against an independent reader, bad shards, windows within shards."""
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from trainer.errors import DataError
from trainer.data import TokenData, eval_windows, get_batch, sample_offsets
from trainer.data.prepare import ShardWriter
from trainer.data.shards import Tokens, read_shard, write_shard


def llmc_read(path):
    """An independent reader written from llm.c's description: 256 little-endian int32, then tokens."""
    raw = path.read_bytes()
    magic, version, n = struct.unpack("<3i", raw[:12])
    itemsize = {(20240520, 1): 2, (20240801, 7): 4}[(magic, version)]
    fmt = "<%d%s" % (n, "H" if itemsize == 2 else "I")
    assert len(raw) == 1024 + n * itemsize
    return magic, version, list(struct.unpack(fmt, raw[1024:]))


@pytest.mark.parametrize("vocab, dtype, magic, version", [(50257, np.uint16, 20240520, 1), (100_000, np.uint32, 20240801, 7)])
def test_shard_writer_round_trips_through_an_independent_reader(tmp_path, vocab, dtype, magic, version):
    rng = np.random.default_rng(0)
    chunks = [rng.integers(0, vocab, n) for n in (5, 17, 1, 30)]  # 53 tokens, shards of 20
    w = ShardWriter(tmp_path, "train", np.dtype(dtype), vocab, shard_tokens=20)
    for c in chunks:
        w.write(c)
    paths = w.close()
    assert [p.name for p in paths] == ["train_000000.bin", "train_000001.bin", "train_000002.bin"]
    assert not list(tmp_path.glob("*.tmp"))
    flat = np.concatenate(chunks).tolist()
    read = [llmc_read(p) for p in paths]
    assert all(m == magic and v == version for m, v, _ in read)
    assert [len(t) for _, _, t in read] == [20, 20, 13]
    assert sum((t for _, _, t in read), []) == flat
    assert np.concatenate([read_shard(p) for p in paths]).tolist() == flat  # our reader agrees


def test_a_shard_in_progress_is_never_a_finished_shard(tmp_path):
    w = ShardWriter(tmp_path, "val", np.dtype(np.uint16), 100, shard_tokens=10)
    w.write(np.arange(15) % 100)
    # one finished shard; the second is still open under a .tmp name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["val_000000.bin", "val_000001.bin.tmp"]


@pytest.mark.parametrize("make, match", [
    (lambda p: p.write_bytes(b""), "too short"),
    (lambda p: p.write_bytes(np.array([1234, 1, 3] + [0] * 253, "<i4").tobytes() + b"\0" * 6), "not a token shard"),
    (lambda p: write_shard(p, np.zeros(0)), "empty shard"),
    (lambda p: p.write_bytes(np.array([20240520, 1, 10] + [0] * 253, "<i4").tobytes() + b"\0" * 6), "truncated"),
])
def test_bad_shards_get_one_clear_line(tmp_path, make, match):
    path = tmp_path / "train_000000.bin"
    make(path)
    with pytest.raises(DataError, match=match) as e:
        read_shard(path)
    assert "\n" not in str(e.value)


def test_vocabulary_larger_than_the_dtype_is_refused(tmp_path):
    with pytest.raises(DataError, match="does not fit in uint16"):
        ShardWriter(tmp_path, "train", np.dtype(np.uint16), 70_000, 100)
    w = ShardWriter(tmp_path, "train", np.dtype(np.uint16), 300, 100)
    with pytest.raises(DataError, match="outside the vocabulary of 300"):
        w.write(np.array([1, 2, 300]))


def three_shards():
    # shard s holds s*1000, s*1000+1, ...: a window's values tell which shard and where it came from
    return Tokens([np.arange(s * 1000, s * 1000 + n, dtype=np.uint16) for s, n in enumerate((10, 4, 7))])


def test_windows_stay_inside_one_shard_and_every_valid_window_is_drawn():
    tokens, block = three_shards(), 3
    # valid starts: shard 0: 0..6 (7), shard 1: 0 (1), shard 2: 0..3 (4)
    assert tokens.num_windows(block) == 12
    starts = sample_offsets(tokens, block, 2000, torch.Generator().manual_seed(0))
    x, y = get_batch(tokens, starts, block, torch.device("cpu"))
    window = torch.cat([x, y[:, -1:]], dim=1)
    assert torch.all(window[:, 1:] - window[:, :-1] == 1)  # contiguous: never spans two shards
    values = {int(v) for v in window[:, 0]}
    assert values == set(range(0, 7)) | {1000} | set(range(2000, 2004))
    assert torch.equal(x[:, 0], torch.from_numpy(np.asarray(tokens)[starts.numpy()].astype(np.int64)))


def test_a_too_short_split_says_so():
    with pytest.raises(DataError, match="block_size=20 is too large"):
        sample_offsets(three_shards(), 20, 4, torch.Generator().manual_seed(0))


def test_eval_windows_are_fixed_and_all_covers_each_token_once():
    tokens, block = three_shards(), 3
    data = TokenData(train=tokens, val=tokens, tokenizer=None, directory=Path("."), vocab_size=2007)
    every = eval_windows(data, block, "all", eval_iters=5, batch_size=1)["val"]
    x, y = get_batch(tokens, every, block, torch.device("cpu"))
    # non-overlapping windows per shard: targets are each predicted once
    assert len(set(y.flatten().tolist())) == y.numel()
    # shard 0 (10 tokens): 0, 3, 6 (a window at 9 would need 4 tokens); shard 1: 10; shard 2 (7): 14, 17
    assert every.tolist() == [0, 3, 6, 10, 14, 17]
    some = eval_windows(data, block, None, eval_iters=5, batch_size=1)["val"]
    assert len(some) == 5 and np.array_equal(some, eval_windows(data, block, None, 5, 1)["val"])
    assert np.array_equal(eval_windows(data, block, "all", 5, 1)["train"], some)  # train: eval_iters * batch_size
    assert len(eval_windows(data, block, 9, 5, 1)["val"]) == 3  # 9 tokens: 3 windows of 3
    assert some[0] == 0 and some[-1] == 17  # evenly spread from the first to the last valid window


def test_tokens_slices_across_shards():
    tokens = three_shards()
    assert tokens[8:12].tolist() == [8, 9, 1000, 1001]
    assert len(tokens) == 21 and tokens[:].tolist() == np.asarray(tokens).tolist()

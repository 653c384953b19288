"""Training on prepared data: every layout trains, windows are exact under resume and DDP, fixed
eval windows and bits per byte, the GPT-2 preset."""
import json
import math
import pickle

import numpy as np
import pytest
import torch
from conftest import TINY_OVERRIDES, TINY_TEXT, compose_cfg

import trainer.data as data_mod
from trainer.data import eval_windows, get_batch
from trainer.data.prepare import prepare_files
from trainer.runtime import DistInfo
from trainer.loop import Trainer
from trainer.data.shards import write_shard
from trainer.data.bpe import BPETokenizer

RUN = TINY_OVERRIDES + ["device=cpu", "eval_interval=0", "sample_tokens=0"]


def make(tmp_path, overrides, name="run"):
    return Trainer(compose_cfg(overrides), tmp_path / name, overrides)


@pytest.fixture(scope="module")
def bpe_json(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    path.write_text(BPETokenizer.train(TINY_TEXT, 300)._json)
    return path


def nanogpt_dir(d):
    chars = sorted(set(TINY_TEXT))
    ids = np.array([chars.index(c) for c in TINY_TEXT], dtype=np.uint16)
    cut = len(ids) * 9 // 10
    ids[:cut].tofile(d / "train.bin")
    ids[cut:].tofile(d / "val.bin")
    (d / "meta.pkl").write_bytes(pickle.dumps({"vocab_size": len(chars), "itos": dict(enumerate(chars)),
                                               "stoi": {c: i for i, c in enumerate(chars)}}))
    return d


def fineweb_dir(d, tokenizer_json):
    tok = BPETokenizer.from_file(tokenizer_json)
    ids = np.array(tok.encode(TINY_TEXT))
    write_shard(d / "fineweb_val_000000.bin", ids[:300])
    write_shard(d / "fineweb_train_000001.bin", ids[300:900])
    write_shard(d / "fineweb_train_000002.bin", ids[900:])
    return d


@pytest.mark.parametrize("layout", ["nanogpt", "fineweb"])
def test_foreign_layouts_train(tmp_path, layout, bpe_json):
    d = tmp_path / layout
    d.mkdir()
    extra = [f"data.path={d}"]
    if layout == "nanogpt":
        nanogpt_dir(d)
    else:
        fineweb_dir(d, bpe_json)
        extra.append(f"data.tokenizer_path={bpe_json}")
    t = make(tmp_path, RUN + ["data=tokens", "max_iters=3", "eval_iters=1"] + extra)
    summary = t.fit()
    assert summary["status"] == "completed" and math.isfinite(summary["final_val_loss"])
    assert len(t.data.train.shards) == (1 if layout == "nanogpt" else 2)


def test_resume_is_bitwise_exact_on_many_shards(tmp_path, tiny_corpus):
    common = RUN + ["data=text", f"data.path={tiny_corpus}", f"data.cache_dir={tmp_path / 'cache'}",
                    "data.shard_tokens=700", "max_iters=6", "gradient_accumulation_steps=2", "model.dropout=0.1"]
    straight = make(tmp_path, common, "straight")
    assert len(straight.data.train.shards) >= 5
    straight.fit()
    first = make(tmp_path, common, "split")
    train_step = first.train_step

    def stop_after_three(it):  # what Ctrl-C does after step 3: the same run (and lr schedule) continues
        metrics = train_step(it)
        if it + 1 == 3:
            first.stop.request()
        return metrics

    first.train_step = stop_after_three
    assert first.fit()["status"] == "interrupted"
    second = make(tmp_path, common + ["resume=true"], "split")
    assert second.iteration == 3
    second.fit()
    for a, b in zip(straight.raw_model.parameters(), second.raw_model.parameters()):
        assert torch.equal(a, b)


def test_ranks_take_disjoint_slices_of_one_global_draw(tmp_path, tiny_corpus, monkeypatch):
    import trainer.data as data_mod

    monkeypatch.setattr(data_mod, "get_batch", lambda ids, starts, block, device: (starts, None))  # window starts
    t = make(tmp_path, RUN + ["data=text", f"data.path={tiny_corpus}", f"data.cache_dir={tmp_path / 'c'}",
                              "data.shard_tokens=700", "max_iters=0", "gradient_accumulation_steps=4"])

    def batches(rank, world):
        t.dist, t.accum = DistInfo(rank=rank, world_size=world), 4 // world
        return [x for _, (x, _) in t._micro_batches(it=5)]

    single = torch.cat(batches(0, 1))
    rank0, rank1 = torch.cat(batches(0, 2)), torch.cat(batches(1, 2))
    assert torch.equal(torch.cat([rank0, rank1]), single)  # the same global batch, split between ranks
    assert not set(rank0.tolist()) & set(rank1.tolist())  # no window on both ranks
    assert len(t.data.train.shards) >= 5 and len(set(single.tolist())) == 16
    t.dist = DistInfo()
    assert not torch.equal(torch.cat([x for _, (x, _) in t._micro_batches(it=6)]), single)  # steps differ


def test_eval_is_seed_independent_and_bpb_matches_a_float64_reference(tmp_path, tiny_corpus):
    base = RUN + ["data=text", f"data.path={tiny_corpus}", f"data.cache_dir={tmp_path / 'c'}", "max_iters=0",
                  "eval_iters=3"]
    a, b = make(tmp_path, base + ["seed=1"], "a"), make(tmp_path, base + ["seed=2"], "b")
    b.raw_model.load_state_dict(a.raw_model.state_dict())
    ea, eb = a.evaluate(), b.evaluate()
    assert ea["val"] == eb["val"] and ea["val_bpb"] == eb["val_bpb"]

    # reference: per-token cross-entropy in float64 over the same fixed windows; bytes from decoding
    block, data = int(a.cfg.block_size), a.data
    starts = eval_windows(data, block, None, 3, int(a.cfg.batch_size))["val"]
    x, y = get_batch(data.val, starts, block, torch.device("cpu"))
    with torch.no_grad():
        logits, _ = a.raw_model(x, y)
    nats = torch.nn.functional.cross_entropy(logits.double().flatten(0, 1), y.flatten(), reduction="sum").item()
    nbytes = sum(len(data.tokenizer.decode(row).encode("utf-8")) for row in y.tolist())
    assert ea["val"] == pytest.approx(nats / y.numel(), rel=1e-5)
    assert ea["val_bpb"] == pytest.approx(nats / nbytes / math.log(2), rel=1e-5)


def test_bpb_is_logged_and_summarized(tmp_path, tiny_corpus):
    t = make(tmp_path, RUN + ["data=text", f"data.path={tiny_corpus}", f"data.cache_dir={tmp_path / 'c'}",
                              "max_iters=4", "eval_interval=2", "eval_iters=1"])
    t.fit()
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert 0 < summary["best_val_bpb"] <= summary["val_bpb"] < 8
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(tmp_path / "run"))
    ea.Reload()
    assert [e.step for e in ea.Scalars("val/bpb")] == [2, 4]


def test_eval_tokens_all_covers_the_whole_val_split(tmp_path, tiny_corpus, monkeypatch):
    t = make(tmp_path, RUN + ["data=text", f"data.path={tiny_corpus}", f"data.cache_dir={tmp_path / 'c'}",
                              "max_iters=0", "eval_tokens=all"])
    calls = []
    original = data_mod.get_batch

    def counting(ids, offsets, block, device):
        calls.append((ids is t.data.val, len(offsets)))
        return original(ids, offsets, block, device)

    monkeypatch.setattr(data_mod, "get_batch", counting)
    t.evaluate()
    block = int(t.cfg.block_size)
    val_targets = block * sum(n for is_val, n in calls if is_val)
    assert val_targets == (len(t.data.val) - 1) // block * block
    with pytest.raises(ValueError, match="eval_tokens="):
        make(tmp_path, RUN + ["data=text", f"data.path={tiny_corpus}", f"data.cache_dir={tmp_path / 'c'}",
                              "max_iters=0", "eval_tokens=-3"], "bad").evaluate()


def test_model_vocab_smaller_than_the_tokenizer_is_refused(tmp_path, tiny_corpus):
    with pytest.raises(ValueError, match="model.vocab_size=10 is smaller than the data's") as e:
        make(tmp_path, RUN + ["data=text", f"data.path={tiny_corpus}", f"data.cache_dir={tmp_path / 'c'}",
                              "model.vocab_size=10"])
    assert "\n" not in str(e.value)


def test_gpt2_owt_preset_composes_and_starts_on_a_tiny_prepared_corpus(tmp_path, tiny_corpus, bpe_json):
    cfg = compose_cfg(["+experiment=gpt2_owt", "data.path=x"])
    assert cfg.model.n_layer == 12 and cfg.model.n_embd == 768 and cfg.data._target_.endswith("load_tokens")
    assert cfg.batch_size * cfg.block_size * cfg.gradient_accumulation_steps == 491_520
    assert cfg.optim.lr == 6e-4 and list(cfg.optim.betas) == [0.9, 0.95] and cfg.precision.name == "bf16"

    out = prepare_files(tiny_corpus, tmp_path / "prepared", tokenizer_path=str(bpe_json), progress=False)
    tiny = ["model.n_layer=1", "model.n_head=2", "model.n_embd=32", "model.block_size=32", "batch_size=2",
            "gradient_accumulation_steps=2", "max_iters=2", "eval_iters=1", "eval_interval=0", "warmup_iters=1",
            "compile=false", "precision=fp32", "device=cpu", "sample_tokens=0"]
    t = make(tmp_path, ["+experiment=gpt2_owt", f"data.path={out}"] + tiny)
    assert t.fit()["status"] == "completed" and t.iteration == 2

"""GPT-2 weights in and out against transformers' own models, offline: tiny random GPT-2s built and
saved with transformers are imported (init_from), fine-tuned, resumed and exported (scripts/export.py),
and every logit is compared with GPT2LMHeadModel / AutoModelForCausalLM on the same ids."""
import importlib.util
import json

import numpy as np
import pytest
import torch
from conftest import REPO, TINY_TEXT, compose_cfg
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel
from transformers.utils import logging as hf_logging

from models import GPT, GPTConfig, hf
from trainer.config import build, components, load_component
from trainer.data.shards import write_shard
from trainer.data.bpe import BPETokenizer, hf_tokenizer_json, tiktoken_from_bpe
from trainer.errors import ConfigError
from trainer.loop import Trainer

hf_logging.set_verbosity_error()
spec = importlib.util.spec_from_file_location("export_script", REPO / "scripts" / "export.py")
export = importlib.util.module_from_spec(spec)
spec.loader.exec_module(export)

VOCAB, CONTEXT = 96, 64
RUN = ["device=cpu", "batch_size=2", "eval_iters=1", "log_interval=1", "sample_tokens=0", "eval_interval=0"]


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest logit difference relative to the largest reference logit."""
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def tiny_gpt2(path, seed=0, activation="gelu_new", vocab=VOCAB, **config) -> GPT2LMHeadModel:
    """A random 2-layer GPT-2 saved with transformers' save_pretrained. Every weight is drawn at
    scale 0.1 (LayerNorm gains around 1), so a swapped, untransposed or misplaced tensor shows in
    the logits; the init's zero biases and unit gains would hide it."""
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab, n_positions=CONTEXT, n_embd=64, n_layer=2, n_head=4,
                     activation_function=activation, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                     bos_token_id=0, eos_token_id=0, **config)
    model = GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            gain = name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight"))
            p.copy_(torch.randn_like(p) * 0.1 + float(gain))
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-gpt2")
    return path, tiny_gpt2(path)


def token_dir(path, vocab=VOCAB, seed=0):
    """FineWeb-layout shards (llm.c header) of random ids below ``vocab``, no tokenizer."""
    path.mkdir(exist_ok=True)
    rng = np.random.default_rng(seed)
    write_shard(path / "fineweb_val_000000.bin", rng.integers(0, vocab, 1000))
    write_shard(path / "fineweb_train_000001.bin", rng.integers(0, vocab, 4000))
    return path


def ids(batch=2, length=CONTEXT, vocab=VOCAB, seed=1):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def make(tmp_path, overrides, name="run"):
    return Trainer(compose_cfg(overrides), tmp_path / name, overrides)


# ---------------------------------------------------------------------------------------------
# weights in


@pytest.mark.parametrize("attn", components("attn"))
def test_imported_logits_equal_transformers_for_every_attention(gpt2_dir, attn):
    path, reference = gpt2_dir
    hf_config, tensors = hf.read_pretrained(path)
    config = GPTConfig(**hf.gpt_config_from_hf(hf_config))
    model = GPT(config, build(load_component("attn", attn))).eval()
    model.load_state_dict(hf.state_dict_from_hf(tensors, config))
    x = ids()
    with torch.no_grad():
        ours, ref = model(x)[0], reference(x).logits
    assert rel_err(ours, ref) < 1e-5
    assert rel_err(ours, torch.zeros_like(ref) + ref.mean()) > 0.1  # the logits are not near-constant


def test_exact_gelu_checkpoint_maps_to_gelu_exact(tmp_path):
    reference = tiny_gpt2(tmp_path, seed=3, activation="gelu")
    hf_config, tensors = hf.read_pretrained(tmp_path)
    shape = hf.gpt_config_from_hf(hf_config)
    assert shape["gelu"] == "exact"
    model = GPT(GPTConfig(**shape)).eval()
    model.load_state_dict(hf.state_dict_from_hf(tensors, model.config))
    x = ids()
    with torch.no_grad():
        assert rel_err(model(x)[0], reference(x).logits) < 1e-5


def test_legacy_file_layout_without_prefix_and_with_mask_buffers(tmp_path, gpt2_dir):
    """OpenAI's released model.safetensors: keys without "transformer.", causal-mask buffers, no lm_head."""
    path, reference = gpt2_dir
    tensors = load_file(str(path / hf.WEIGHTS))
    legacy = {k.removeprefix("transformer."): v for k, v in tensors.items() if k != "lm_head.weight"}
    legacy |= {f"h.{i}.attn.bias": torch.ones(1, 1, CONTEXT, CONTEXT) for i in range(2)}
    save_file(legacy, str(tmp_path / hf.WEIGHTS), metadata={"format": "pt"})
    (tmp_path / hf.CONFIG).write_text((path / hf.CONFIG).read_text())
    hf_config, read = hf.read_pretrained(tmp_path)
    model = GPT(GPTConfig(**hf.gpt_config_from_hf(hf_config))).eval()
    model.load_state_dict(hf.state_dict_from_hf(read, model.config))
    x = ids()
    with torch.no_grad():
        assert rel_err(model(x)[0], reference(x).logits) < 1e-5


def test_init_from_fine_tunes_and_resumes_from_its_own_checkpoint(tmp_path, gpt2_dir, offline):
    path, reference = gpt2_dir
    data = token_dir(tmp_path / "tokens")
    base = RUN + [f"init_from={path}", "data=tokens", f"data.path={data}"]
    t = make(tmp_path, base + ["max_iters=4"])
    assert t.model_config.n_embd == 64 and t.model_config.vocab_size == VOCAB and t.model_config.gelu == "tanh"
    x = ids()
    with torch.no_grad():
        assert rel_err(t.raw_model(x)[0], reference(x).logits) < 1e-5
        # the first eval is transformers' own loss on the same windows
        from trainer.data import eval_windows, get_batch

        starts = eval_windows(t.data, CONTEXT, None, 2, 1)["val"]  # 2 windows, as the run's eval
        xv, yv = get_batch(t.data.val, starts, CONTEXT, torch.device("cpu"))
        ref_loss = torch.nn.functional.cross_entropy(reference(xv).logits.flatten(0, 1), yv.flatten()).item()
    assert t.evaluate()["val"] == pytest.approx(ref_loss, rel=1e-5)
    first = t.train_step
    t.train_step = lambda it: (first(it), it + 1 == 2 and t.stop.request())[0]  # stop after step 2
    assert t.fit()["status"] == "interrupted"
    saved = torch.load(tmp_path / "run" / "ckpt_last.pt", weights_only=True)
    assert saved["config"]["init_from"] == str(path) and saved["config"]["model"]["n_embd"] == 64

    # resume reads the run's checkpoint, not the Hugging Face directory (which may be gone by then)
    moved = path.rename(path.with_name(path.name + "-moved"))
    try:
        resumed = make(tmp_path, base + ["max_iters=4", "resume=true"])
        assert resumed.iteration == 2
        assert resumed.fit()["status"] == "completed"
        straight = make(tmp_path, [o.replace(str(path), str(moved)) for o in base] + ["max_iters=4"], "straight")
        straight.fit()
    finally:
        moved.rename(path)
    for a, b in zip(resumed.raw_model.parameters(), straight.raw_model.parameters()):
        assert torch.equal(a, b)  # resumed fine-tuning == uninterrupted fine-tuning
    assert not torch.equal(resumed.raw_model.transformer.wte.weight, reference.transformer.wte.weight)
    with pytest.raises(ConfigError, match="cannot change on resume"):
        make(tmp_path, base + ["max_iters=5", "resume=true", "init_from=scratch"])


def test_a_shorter_context_crops_the_position_table(tmp_path, gpt2_dir, offline):
    path, reference = gpt2_dir
    data = token_dir(tmp_path / "tokens")
    t = make(tmp_path, RUN + [f"init_from={path}", "data=tokens", f"data.path={data}", "model.block_size=16",
                              "max_iters=0"])
    assert t.model_config.block_size == 16 and t.raw_model.transformer.wpe.weight.shape == (16, 64)
    x = ids(length=16)
    with torch.no_grad():
        assert rel_err(t.raw_model(x)[0], reference(x).logits) < 1e-5


@pytest.mark.parametrize("override, match", [
    ("model.pos=rope", r"model.pos=rope: it has GPT-2's learned position table"),
    ("model.vocab_size=50", r"model.vocab_size=50 is smaller than its 96-token vocabulary"),
    ("model.vocab_size=128", r"model.vocab_size=128 would add embedding rows"),
    ("model.n_head=8", r"model.n_head=8: its attention is split into 4 heads"),
    ("model.n_layer=3", r"model.n_layer=3 but it has n_layer=2"),
    ("model.block_size=128", r"model.block_size=128 exceeds its 64 learned positions"),
    ("model.gelu=exact", r"model.gelu=exact but it has gelu=tanh"),
])
def test_overrides_that_do_not_fit_the_checkpoint_are_one_line(tmp_path, gpt2_dir, override, match):
    path, _ = gpt2_dir
    data = token_dir(tmp_path / "tokens")
    with pytest.raises(ConfigError, match=match) as e:
        make(tmp_path, RUN + [f"init_from={path}", "data=tokens", f"data.path={data}", override])
    assert "\n" not in str(e.value) and f"init_from={path}" in str(e.value)


def test_overrides_equal_to_the_checkpoint_and_non_shape_settings_are_accepted(tmp_path, gpt2_dir):
    path, _ = gpt2_dir
    data = token_dir(tmp_path / "tokens")
    t = make(tmp_path, RUN + [f"init_from={path}", "data=tokens", f"data.path={data}", "model.n_layer=2",
                              "model.dropout=0.1", "model=nano", "max_iters=0"])
    assert t.model_config.n_layer == 2 and t.model_config.n_embd == 64 and t.model_config.dropout == 0.1


def edit_config(src, dst, **changes):
    dst.mkdir()
    (dst / hf.WEIGHTS).write_bytes((src / hf.WEIGHTS).read_bytes())
    cfg = json.loads((src / hf.CONFIG).read_text()) | changes
    (dst / hf.CONFIG).write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize("changes, match", [
    ({"n_head": 5}, r"n_embd=64 and n_head=5: the head count does not divide"),
    ({"model_type": "llama"}, r"is a 'llama' model; only GPT-2 checkpoints"),
    ({"activation_function": "relu"}, r"activation_function='relu'"),
    ({"layer_norm_epsilon": 1e-6}, r"layer_norm_epsilon=1e-06"),
    ({"tie_word_embeddings": False}, r"tie_word_embeddings=false"),
])
def test_checkpoints_this_model_cannot_hold_are_refused(tmp_path, gpt2_dir, changes, match):
    path, _ = gpt2_dir
    bad = edit_config(path, tmp_path / "bad", **changes)
    with pytest.raises(ConfigError, match=match) as e:
        make(tmp_path, RUN + [f"init_from={bad}", "data=tokens", f"data.path={token_dir(tmp_path / 't')}"])
    assert "\n" not in str(e.value)


def test_data_with_more_tokens_than_the_checkpoint_is_refused(tmp_path, gpt2_dir):
    path, _ = gpt2_dir
    data = tmp_path / "nanogpt"
    data.mkdir()
    for split in ("train", "val"):
        (np.arange(2000) % 200).astype(np.uint16).tofile(data / f"{split}.bin")
    import pickle

    (data / "meta.pkl").write_bytes(pickle.dumps({"vocab_size": 200}))
    with pytest.raises(ConfigError, match=r"96-token vocabulary but the data has 200 tokens"):
        make(tmp_path, RUN + [f"init_from={path}", "data=tokens", f"data.path={data}"])


def test_untied_head_is_refused(tmp_path, gpt2_dir):
    path, _ = gpt2_dir
    tensors = load_file(str(path / hf.WEIGHTS))
    tensors["lm_head.weight"] = tensors["transformer.wte.weight"] + 1.0
    with pytest.raises(hf.InteropError, match="untied head"):
        hf.state_dict_from_hf(tensors, GPTConfig(**hf.gpt_config_from_hf(json.loads((path / hf.CONFIG).read_text()))))


# ---------------------------------------------------------------------------------------------
# named models: the local Hugging Face cache, the hub only when reachable


def test_named_gpt2_comes_from_the_local_cache_without_the_network(tmp_path, gpt2_dir, monkeypatch, offline):
    path, reference = gpt2_dir
    snapshot = tmp_path / "hub" / "models--openai-community--gpt2" / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    for name in (hf.CONFIG, hf.WEIGHTS):
        (snapshot / name).write_bytes((path / name).read_bytes())
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0123abcd")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    t = make(tmp_path, RUN + ["init_from=gpt2", "data=tokens", f"data.path={token_dir(tmp_path / 't')}", "max_iters=0"])
    x = ids()
    with torch.no_grad():
        assert rel_err(t.raw_model(x)[0], reference(x).logits) < 1e-5


def test_named_gpt2_neither_cached_nor_reachable_says_where_to_put_the_files(tmp_path, monkeypatch, offline):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(ConfigError) as e:
        make(tmp_path, RUN + ["init_from=gpt2-medium", "data=tokens", f"data.path={token_dir(tmp_path / 't')}"])
    message = str(e.value)
    assert "\n" not in message and "init_from=/path/to/dir" in message and str(tmp_path / "empty-hub") in message
    assert "config.json and model.safetensors of openai-community/gpt2-medium" in message
    assert offline, "the hub was not tried"  # it was asked (and could not be reached) ...
    offline.clear()  # ... which is the one network use this test expects


def test_unknown_init_from_lists_the_choices(tmp_path):
    with pytest.raises(ConfigError, match=r"init_from='gpt3' is neither a directory nor one of scratch, gpt2, gpt2-medium"):
        make(tmp_path, RUN + ["init_from=gpt3", "data=tokens", f"data.path={token_dir(tmp_path / 't')}"])


# ---------------------------------------------------------------------------------------------
# weights out, and the round trip


def randomized_run(tmp_path, overrides, name="run"):
    """A saved run whose every weight is random at scale 0.1 (LayerNorm gains around 1)."""
    shape = ["model.n_layer=2", "model.n_head=4", "model.n_embd=64", "model.block_size=32"]
    t = make(tmp_path, RUN + shape + overrides + ["max_iters=0"], name)
    with torch.no_grad():
        for pname, p in t.raw_model.named_parameters():
            p.copy_(torch.randn_like(p) * 0.1 + float(pname.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight"))))
    t.save()
    t.release()
    return t


@pytest.mark.parametrize("model, arch", [
    (["model.pos=learned", "model.gelu=tanh"], "GPT2LMHeadModel"),
    (["model.pos=learned", "model.gelu=exact", "model.bias=false"], "GPT2LMHeadModel"),
    (["model.pos=rope", "model.gelu=tanh"], "GPTNeoXForCausalLM"),
    (["model.pos=rope", "model.gelu=exact", "model.bias=false", "model.rope_base=500"], "GPTNeoXForCausalLM"),
])
def test_export_loads_in_transformers_with_equal_logits(tmp_path, tiny_corpus, model, arch, capsys):
    data = ["data=text", f"data.path={tiny_corpus}", f"data.cache_dir={tmp_path / 'cache'}",
            ]
    t = randomized_run(tmp_path, data + model)
    assert export.main([str(tmp_path / "run"), "--format", "hf", str(tmp_path / "out")]) == 0
    assert "wrote config.json, model.safetensors" in capsys.readouterr().out
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(loaded).__name__ == arch
    x = ids(length=32, vocab=t.model_config.vocab_size)
    with torch.no_grad():
        ours, theirs = t.raw_model.eval()(x)[0], loaded(x).logits
    assert rel_err(theirs, ours) < 1e-5


def test_round_trip_returns_the_same_tensors_and_config(tmp_path, gpt2_dir, offline):
    path, reference = gpt2_dir
    t = make(tmp_path, RUN + [f"init_from={path}", "data=tokens", f"data.path={token_dir(tmp_path / 't')}", "max_iters=0"])
    t.save()
    t.release()
    export.export_hf(str(tmp_path / "run"), tmp_path / "out")
    original, exported = load_file(str(path / hf.WEIGHTS)), load_file(str(tmp_path / "out" / hf.WEIGHTS))
    original.pop("lm_head.weight", None)  # tied: transformers stores it or not, depending on the version
    assert sorted(exported) == sorted(original)
    assert all(torch.equal(exported[k], original[k]) for k in original)
    before, after = GPT2Config.from_pretrained(path), GPT2Config.from_pretrained(tmp_path / "out")
    for key in ("model_type", "vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner",
                "activation_function", "layer_norm_epsilon", "tie_word_embeddings", "scale_attn_weights"):
        assert getattr(after, key) == getattr(before, key), key
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    x = ids()
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, reference(x).logits)  # the same weights, the same model class


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    path.write_text(BPETokenizer.train(TINY_TEXT, 300)._json)
    return path


TEXTS = [TINY_TEXT[:400], "Hello  world!! 123 caf\u00e9\n\n  \u00fcn\u00efc\u00f6d\u00e9 \U0001f642 it'll we're", " " * 7 + "x" * 40]


def test_export_writes_the_runs_bpe_tokenizer(tmp_path, tiny_corpus, bpe):
    t = randomized_run(tmp_path, ["data=text", f"data.path={tiny_corpus}", f"data.cache_dir={tmp_path / 'c'}",
                                  f"data.tokenizer_path={bpe}"])
    written = export.export_hf(str(tmp_path / "run"), tmp_path / "out")
    assert written[2:] == ["tokenizer.json", "tokenizer_config.json"]
    theirs = AutoTokenizer.from_pretrained(tmp_path / "out")
    for text in TEXTS:
        assert theirs.encode(text, add_special_tokens=False) == t.data.tokenizer.encode(text)
    assert theirs.eos_token_id == t.data.tokenizer.eot_id is not None


def test_a_tiktoken_encoding_becomes_an_equal_hf_tokenizer(tmp_path, bpe):
    """GPT-2's tiktoken path (here an encoding built from ranks, since GPT-2's own file is not offline)."""
    enc = tiktoken_from_bpe(BPETokenizer.from_file(bpe))
    (tmp_path / "tokenizer.json").write_text(hf_tokenizer_json(enc))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    theirs = AutoTokenizer.from_pretrained(tmp_path)
    for text in TEXTS:
        assert theirs.encode(text, add_special_tokens=False) == enc.encode(text)
        assert theirs.decode(enc.encode(text)) == text
    assert theirs.convert_tokens_to_ids("<|endoftext|>") == enc.eot_id


def test_char_runs_export_without_tokenizer_files_and_say_so(tmp_path, tiny_corpus, capsys):
    randomized_run(tmp_path, ["data=text", f"data.path={tiny_corpus}", f"data.cache_dir={tmp_path / 'c'}"])
    assert export.main([str(tmp_path / "run"), "--format", "hf", str(tmp_path / "out")]) == 0
    assert "no tokenizer files" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.json", "model.safetensors"]


def test_export_of_a_bad_checkpoint_is_one_line(tmp_path, capsys):
    assert export.main([str(tmp_path / "nothing"), "--format", "hf", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no checkpoint at") and err.count("\n") == 1


# ---------------------------------------------------------------------------------------------
# the fine-tuning preset


def test_finetune_preset_is_nanogpts_and_runs_on_a_tiny_model_offline(tmp_path, gpt2_dir, offline):
    cfg = compose_cfg(["+experiment=finetune_gpt2"])
    assert cfg.init_from == "gpt2-xl" and cfg.data.tokenizer == "gpt2" and cfg.data._target_.endswith("load_shakespeare")
    assert (cfg.batch_size, cfg.gradient_accumulation_steps, cfg.max_iters, cfg.decay_lr) == (1, 32, 20, False)
    assert cfg.optim.lr == 3e-5 and cfg.eval_interval == 5 and cfg.eval_iters == 40

    path, _ = gpt2_dir
    data = token_dir(tmp_path / "tokens")
    small = [f"init_from={path}", "data=tokens", f"data.path={data}", "data.tokenizer=null", "precision=fp32",
             "device=cpu", "batch_size=2", "gradient_accumulation_steps=2", "max_iters=2", "eval_interval=1",
             "eval_iters=1", "block_size=32"]
    t = make(tmp_path, ["+experiment=finetune_gpt2"] + small)
    start = t.raw_model.transformer.h[0].attn.c_attn.weight.clone()
    summary = t.fit()
    assert summary["status"] == "completed" and t.iteration == 2 and np.isfinite(summary["final_val_loss"])
    assert not torch.equal(start, t.raw_model.transformer.h[0].attn.c_attn.weight)
    assert t.schedule(0) == t.schedule(1) == pytest.approx(3e-5)  # constant lr


def test_a_tokenizer_that_cannot_load_here_still_exports_the_model(tmp_path, tiny_corpus, monkeypatch, capsys, offline):
    """A GPT-2 (tiktoken by name) run exported offline: its encoding file is not here, the model is."""
    randomized_run(tmp_path, ["data=text", f"data.path={tiny_corpus}", f"data.cache_dir={tmp_path / 'c'}"])
    state = torch.load(tmp_path / "run" / "ckpt_last.pt", weights_only=True)
    state["tokenizer"] = {"kind": "tiktoken", "name": "gpt2"}
    torch.save(state, tmp_path / "run" / "ckpt_last.pt")
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "empty-tiktoken-cache"))
    assert export.main([str(tmp_path / "run"), "--format", "hf", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    assert "note: the run's tokenizer cannot be loaded here" in err and "no tokenizer files" in err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.json", "model.safetensors"]
    offline.clear()  # tiktoken tried to fetch GPT-2's file: expected, and refused

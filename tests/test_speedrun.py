"""The speedrun machinery: training to a target val loss, the leave-one-out presets and their
table, the window and components through the trainer (bad input, checkpoints, sampling)."""
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import CONFIGS, REPO, compose_cfg

from trainer import rundir as ckpt
from trainer.errors import ConfigError
from trainer.loop import Trainer

ABLATIONS = sorted(p.stem for p in (CONFIGS / "ablate").glob("*.yaml"))


def make(tmp_path, overrides, name="run"):
    return Trainer(compose_cfg(overrides), tmp_path / name, overrides)


def scalars(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    ea.Reload()
    return {tag: [(e.step, e.value) for e in ea.Scalars(tag)] for tag in ea.Tags()["scalars"]}


def test_target_val_loss_stops_at_the_first_eval_that_reaches_it(tmp_path, tiny_overrides):
    first = make(tmp_path, tiny_overrides + ["max_iters=40", "eval_interval=5", "optim.lr=1e-2", "sample_tokens=0"], "a")
    first.fit()
    curve = scalars(tmp_path / "a")["val/loss"]
    target = curve[3][1] + 1e-6  # reached at the 4th eval (step 20) at the latest
    step = next(s for s, v in curve if v <= target)
    t = make(tmp_path, tiny_overrides + ["max_iters=40", "eval_interval=5", "optim.lr=1e-2", "sample_tokens=0",
                                         f"target_val_loss={target}"], "b")
    summary = t.fit()
    assert summary["status"] == "completed" and summary["reached_target"] is True
    assert summary["step"] == summary["steps_to_target"] == step < 40
    assert summary["tokens_to_target"] == step * t.tokens_per_step
    assert summary["final_val_loss"] == pytest.approx(dict(curve)[step], abs=1e-6) and summary["final_val_loss"] <= target
    assert 0 < summary["time_to_target_s"] < summary["wall_time_s"] and summary["eval_time_s"] > 0
    assert summary["time_to_target_s"] + summary["eval_time_s"] <= summary["wall_time_s"]
    tags = scalars(tmp_path / "b")
    for key in ("time_to_target_s", "tokens_to_target", "steps_to_target"):
        assert [s for s, _ in tags[f"target/{key}"]] == [step]
    assert tags["target/tokens_to_target"][0][1] == step * t.tokens_per_step
    assert [s for s, _ in tags["time/train_s"]] == [s for s, _ in tags["val/loss"]]  # per eval
    on_disk = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert on_disk["reached_target"] is True and on_disk["time_to_target_s"] == summary["time_to_target_s"]


def test_a_target_never_reached_trains_to_max_iters_and_says_so(tmp_path, tiny_overrides):
    summary = make(tmp_path, tiny_overrides + ["max_iters=6", "eval_interval=3", "sample_tokens=0",
                                               "target_val_loss=0.001"]).fit()
    assert summary["step"] == 6 and summary["reached_target"] is False and summary["target_val_loss"] == 0.001
    assert "time_to_target_s" not in summary and summary["eval_time_s"] > 0


def test_without_a_target_the_summary_keeps_its_keys(tmp_path, tiny_overrides):
    summary = make(tmp_path, tiny_overrides + ["max_iters=4", "eval_interval=2", "sample_tokens=0"]).fit()
    assert "reached_target" not in summary and summary["step"] == 4 and "eval_time_s" in summary


@pytest.mark.parametrize("extra, error, match", [
    (["target_val_loss=-1"], ConfigError, r"target_val_loss=-1 must be a finite number >= 0.0 or null"),
    (["attn.window=0"], ConfigError, "attn.window must be an integer from 1 to model.block_size=32"),
    (["attn.window=33"], ConfigError, "attn.window must be an integer from 1 to model.block_size=32"),
    (["model.logit_softcap=0"], ConfigError, "model.logit_softcap must be a number > 0"),
    (["model.norm=batchnorm"], ConfigError, "model.norm must be 'layernorm' or 'rmsnorm'"),
])
def test_bad_speedrun_settings_fail_with_one_clear_line(tmp_path, tiny_overrides, extra, error, match):
    with pytest.raises(error, match=match):
        t = make(tmp_path, tiny_overrides + ["max_iters=1", "eval_interval=0", "sample_tokens=0"] + extra)
        t.fit()


def test_a_windowed_flash_run_trains_like_the_windowed_online_run(tmp_path, tiny_overrides):
    """attn=flash attn.window through the whole model and trainer (the Triton kernels under the
    interpreter) gives the losses of the blockwise PyTorch implementation with the same window."""
    over = tiny_overrides + ["max_iters=3", "eval_interval=0", "sample_tokens=0", "log_interval=1", "attn.window=5"]
    flash = make(tmp_path, over + ["attn=flash"], "flash").fit()
    online = make(tmp_path, over + ["attn=online"], "online").fit()
    curves = [scalars(tmp_path / name)["train/loss"] for name in ("flash", "online")]
    assert [s for s, _ in curves[0]] == [0, 1, 2]
    for (_, a), (_, b) in zip(*curves):
        assert a == pytest.approx(b, rel=1e-4)
    assert flash["final_val_loss"] == pytest.approx(online["final_val_loss"], rel=1e-4)


def test_an_attention_without_the_window_keyword_is_one_error_line_from_the_cli(tmp_path, tiny_corpus):
    (tmp_path / "my_attn.py").write_text(
        "from kernels.sdpa import sdpa_attention\n\n"
        "def old_attention(q, k, v, causal=True, scale=None):\n"
        "    return sdpa_attention(q, k, v, causal=causal, scale=scale)\n")
    cmd = [sys.executable, str(REPO / "scripts" / "train.py"), "attn._target_=my_attn.old_attention", "attn.window=8",
           "max_iters=1", "data=text", f"data.path={tiny_corpus}", f"data.cache_dir={tmp_path / 'cache'}",
           "device=cpu", "model.n_layer=1", "model.n_head=2", "model.n_embd=32", "model.block_size=32",
           "batch_size=2", "sample_tokens=0", "eval_interval=0", f"hydra.run.dir={tmp_path / 'run'}"]
    env = {**_env(), "PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO}"}
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "old_attention takes no `window` keyword" in errors[0], out.stderr


def _env():
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


def test_a_windowed_run_checkpoints_its_window_and_samples_with_it(tmp_path, tiny_overrides):
    over = tiny_overrides + ["max_iters=2", "eval_interval=0", "sample_tokens=0", "attn=online", "attn.window=4",
                             "model.norm=rmsnorm", "model.tie_embeddings=false", "model.value_embeddings=true"]
    t = make(tmp_path, over)
    assert t.raw_model.config.window == 4 and t.raw_model.transformer.h[0].attn.attn_kwargs == {"window": 4}
    t.fit()
    state = torch.load(tmp_path / "run" / ckpt.LAST, weights_only=True)
    assert state["model_args"]["window"] == 4 and state["model_args"]["norm"] == "rmsnorm"
    sys.path.insert(0, str(REPO / "scripts"))
    import sample

    args = sample.parse_args([str(tmp_path / "run"), "--attn", "sdpa", "--device", "cpu"])
    model, *_ = sample.load_model(args, torch.device("cpu"))
    assert model.config.window == 4 and model.transformer.h[0].attn.attn_kwargs == {"window": 4}
    # a different component is a different set of weights: refused by name on resume
    with pytest.raises(ckpt.CheckpointError, match="norm: checkpoint 'rmsnorm' vs config 'layernorm'"):
        make(tmp_path, over + ["model.norm=layernorm", f"resume={tmp_path / 'run'}"], "b")


def test_checkpoints_from_before_the_components_still_load():
    old = {"vocab_size": 65, "block_size": 64, "n_layer": 4, "n_head": 4, "n_embd": 128, "bias": True}
    from dataclasses import asdict

    from models import GPTConfig

    ckpt.check_compatible(old, asdict(GPTConfig()), "old.pt")  # nothing raised
    with pytest.raises(ckpt.CheckpointError, match="tie_embeddings: checkpoint True vs config False"):
        ckpt.check_compatible(old, asdict(GPTConfig(tie_embeddings=False)), "old.pt")


def test_every_component_is_off_by_default_and_the_default_run_is_unchanged():
    cfg = compose_cfg([])
    assert cfg.target_val_loss is None and cfg.attn.window is None
    m = cfg.model
    assert (m.norm, m.bias, m.qk_norm, m.mlp, m.zero_init_proj, m.tie_embeddings, m.logit_softcap, m.unet_skips,
            m.value_embeddings, m.pos) == ("layernorm", True, False, "gelu", False, True, None, False, False, "learned")
    for name in ("naive", "online", "sdpa", "flash"):
        assert compose_cfg([f"attn={name}"]).attn.window is None


def test_the_leave_one_out_preset_sweeps_every_ablation_and_three_seeds():
    cfg = compose_cfg(["+experiment=speedrun"])
    assert cfg.target_val_loss is None  # a fixed budget: the rows compare final val loss
    assert "none" in ABLATIONS and len(ABLATIONS) >= 12
    from omegaconf import OmegaConf

    sweep = OmegaConf.load(CONFIGS / "experiment" / "speedrun.yaml").hydra.sweeper.params
    assert sweep.ablate == "glob(*)" and len(str(sweep.seed).split(",")) >= 3
    full = compose_cfg(["+experiment=speedrun", "ablate=none"])
    for name in ABLATIONS:
        if name == "none":
            continue
        cut = compose_cfg(["+experiment=speedrun", f"ablate={name}"])
        changed = {k for k in ("model", "optim", "attn") if OmegaConf.to_container(cut[k]) != OmegaConf.to_container(full[k])}
        assert changed, f"ablate={name} changes nothing"


def test_the_record_preset_trains_to_the_target():
    cfg = compose_cfg(["+experiment=speedrun_cpu"])
    assert cfg.target_val_loss == pytest.approx(1.8857)
    assert cfg.eval_tokens == 240 * cfg.block_size  # nanoGPT recipe's eval windows: 20 x 12 of 64 tokens

"""The training loop end to end, in-process on tiny configs: learning, precision, resume, outputs."""
import json
import math

import pytest
import torch
from conftest import CONFIGS, compose_cfg
from hydra.utils import instantiate

from trainer import rundir as ckpt
from trainer.config import build
from trainer.errors import ConfigError, DataError, UserError
from trainer.errors import TrainingError
from trainer.loop import Trainer
from trainer.optim import param_groups
from trainer.schedule import cosine


class RecordingTrainer(Trainer):
    """A Trainer that remembers each step's loss, and can be told to stop after a step."""

    stop_after: int | None = None

    def train_step(self, it):
        metrics = super().train_step(it)
        self.losses = getattr(self, "losses", []) + [float(metrics["loss"])]
        if self.stop_after is not None and it + 1 == self.stop_after:
            self.stop.request()  # what Ctrl-C does
        return metrics


def make(tmp_path, overrides, name="run", cls=RecordingTrainer):
    cfg = compose_cfg(overrides)
    return cls(cfg, tmp_path / name, overrides)


def test_loss_falls_and_outputs_are_written(tmp_path, tiny_overrides):
    t = make(tmp_path, tiny_overrides + ["max_iters=60", "eval_interval=30", "optim.lr=1e-2"])
    summary = t.fit()
    assert summary["status"] == "completed" and summary["step"] == 60
    assert summary["final_val_loss"] < 0.6 * math.log(t.data.vocab_size)
    assert sum(t.losses[-5:]) / 5 < 0.6 * sum(t.losses[:5]) / 5
    run = tmp_path / "run"
    for name in ("config.yaml", "summary.json", ckpt.LAST, ckpt.BEST):
        assert (run / name).exists(), name
    assert json.loads((run / "summary.json").read_text())["status"] == "completed"
    state = torch.load(run / ckpt.LAST, weights_only=True)  # no pickled code
    assert state["step"] == 60 and state["model_args"]["n_layer"] == 1
    assert state["tokenizer"] == t.data.tokenizer.to_dict()
    assert "rng" not in state  # exact resume comes from (seed, step, rank) seeding, not saved RNG state

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(run), size_guidance={"scalars": 0, "tensors": 0})
    ea.Reload()
    tags = set(ea.Tags()["scalars"])
    assert {"train/loss", "val/loss", "eval/train_loss", "lr", "grad_norm", "tokens_per_sec", "step_ms",
            "memory/peak_bytes"} <= tags
    assert [e.step for e in ea.Scalars("val/loss")] == [30, 60]
    assert len(ea.Scalars("train/loss")) == 60
    assert "sample/text_summary" in ea.Tags()["tensors"]


def test_param_groups_decay_matmul_weights_only(tmp_path, tiny_overrides):
    t = make(tmp_path, tiny_overrides + ["max_iters=0"])
    decay, no_decay = param_groups(t.raw_model, 0.1)
    names = {id(p): n for n, p in t.raw_model.named_parameters()}
    assert all(names[id(p)].endswith("weight") and p.dim() == 2 for p in decay["params"])
    assert "transformer.wte.weight" in {names[id(p)] for p in no_decay["params"]}
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(t.raw_model.parameters()))
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    # the trainer hands these groups to our own optimizer, never torch.optim
    assert type(t.optimizer).__module__.startswith("trainer.optim")


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_runs_on_cpu(tmp_path, tiny_overrides, precision):
    t = make(tmp_path, tiny_overrides + [f"precision={precision}", "max_iters=6", "eval_interval=0"])
    summary = t.fit()
    assert summary["status"] == "completed" and math.isfinite(summary["final_val_loss"])
    assert all(p.dtype == torch.float32 for p in t.raw_model.parameters())  # master weights stay fp32
    assert t.scaler.is_enabled() == (precision == "fp16")
    if precision == "fp16":
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        ea = EventAccumulator(str(tmp_path / "run"))
        ea.Reload()
        assert {"loss_scale", "skipped_steps"} <= set(ea.Tags()["scalars"])


def test_fp16_skips_steps_with_overflowing_gradients(tmp_path, tiny_overrides):
    # an absurd initial scale overflows fp16 gradients: the scaler must skip and back off, not corrupt
    t = make(tmp_path, tiny_overrides + ["precision=fp16", "precision.init_scale=1e30", "max_iters=3",
                                         "eval_interval=0", "sample_tokens=0"])
    before = [p.detach().clone() for p in t.raw_model.parameters()]
    t.train_step(0)
    assert int(t.skipped) == 1 and t.scaler.get_scale() < 1e30
    assert all(torch.equal(a, p) for a, p in zip(before, t.raw_model.parameters()))


def test_resume_continues_the_same_trajectory(tmp_path, tiny_overrides):
    common = tiny_overrides + ["max_iters=8", "eval_interval=0", "sample_tokens=0", "model.dropout=0.1",
                               "gradient_accumulation_steps=2"]
    straight = make(tmp_path, common, "straight")
    straight.fit()

    first = make(tmp_path, common, "split")
    first.stop_after = 4
    assert first.fit()["status"] == "interrupted"
    assert json.loads((tmp_path / "split" / "summary.json").read_text())["status"] == "interrupted"
    second = make(tmp_path, common + ["resume=true"], "split")
    assert second.iteration == 4
    second.fit()
    assert first.losses + second.losses == straight.losses  # bitwise: same data, dropout, state
    for a, b in zip(straight.raw_model.parameters(), second.raw_model.parameters()):
        assert torch.equal(a, b)


def test_resume_from_another_checkpoint_path(tmp_path, tiny_overrides):
    base = tiny_overrides + ["max_iters=4", "eval_interval=0", "sample_tokens=0"]
    make(tmp_path, base, "a").fit()
    t = make(tmp_path, base + ["max_iters=6", f"resume={tmp_path / 'a'}"], "b")
    assert t.iteration == 4
    assert t.fit()["step"] == 6


def test_resume_with_a_different_model_shape_is_refused(tmp_path, tiny_overrides):
    make(tmp_path, tiny_overrides + ["max_iters=2", "eval_interval=0", "sample_tokens=0"], "a").fit()
    last = tmp_path / "a" / ckpt.LAST
    saved = last.read_bytes()
    with pytest.raises(ckpt.CheckpointError, match="n_embd: checkpoint 32 vs config 64"):
        make(tmp_path, tiny_overrides + ["model.n_embd=64", f"resume={last}"], "b")
    assert last.read_bytes() == saved  # nothing lost


def test_resume_true_without_checkpoint_says_how(tmp_path, tiny_overrides):
    with pytest.raises(ckpt.CheckpointError, match="hydra.run.dir"):
        make(tmp_path, tiny_overrides + ["resume=true"], "fresh")


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, tiny_overrides):
    t = make(tmp_path, tiny_overrides + ["max_iters=10", "eval_interval=2", "sample_tokens=0"])
    real_forward = t.raw_model.forward

    def exploding(idx, targets=None):
        logits, loss = real_forward(idx, targets)
        return logits, loss * float("nan") if t.iteration >= 3 else loss

    t.raw_model.forward = exploding
    with pytest.raises(TrainingError, match=r"loss became non-finite \(nan or inf\) at step 3"):
        t.fit()
    state = torch.load(tmp_path / "run" / ckpt.LAST, weights_only=True)
    assert state["step"] == 2
    assert all(torch.isfinite(v).all() for v in state["model"].values())


@pytest.mark.parametrize(
    "extra, error, match",
    [
        (["block_size=64"], ConfigError, "exceeds the model's context model.block_size=32"),
        (["gradient_accumulation_steps=0"], ConfigError, "gradient_accumulation_steps=0"),
        (["model.block_size=4096", "block_size=4096"], DataError, "too large for the val split"),
        (["model.n_embd=33"], ConfigError, "not divisible by model.n_head"),
        (["max_iters=abc"], ConfigError, r"max_iters='abc' must be an integer >= 0"),
        (["log_interval=0"], ConfigError, "log_interval=0 must be an integer >= 1"),
        (["min_lr=-1e-4"], ConfigError, r"min_lr=-0.0001 must be a finite number >= 0.0 or null"),
        (["learning_rate=inf"], ConfigError, r"learning_rate=inf must be a finite number"),
        (["batch_size=2.5"], ConfigError, "batch_size=2.5 must be an integer"),
        (["seed=1e30"], ConfigError, r"seed=1e\+30 must be an integer >= 0 and <= 9223372036854775807"),
        (["optim.eps=-1"], ConfigError, "Invalid epsilon value"),
        (["precision.name=fp8"], ConfigError, "precision.name='fp8' is not one of"),
        (["device=tpu"], ConfigError, "device='tpu' is not understood"),
        (["+optim.nonesuch=1"], ConfigError, "unexpected keyword argument 'nonesuch'"),
        (["attn._target_=kernels.nonesuch"], ConfigError, "cannot be imported"),
    ],
)
def test_bad_settings_fail_before_training(tmp_path, tiny_overrides, extra, error, match):
    with pytest.raises(error, match=match):
        make(tmp_path, tiny_overrides + extra)
    assert not (tmp_path / "run" / ckpt.LAST).exists()


def test_lr_schedule_warmup_cosine_floor():
    lr = [cosine(i, lr=1.0, warmup_iters=10, decay_iters=110, min_lr=0.1) for i in range(130)]
    assert lr[0] == pytest.approx(1 / 11) and lr[9] == pytest.approx(10 / 11)
    assert lr[10] == pytest.approx(1.0) and lr[60] == pytest.approx(0.55)
    assert lr[110] == lr[129] == 0.1
    assert all(a >= b for a, b in zip(lr[10:], lr[11:]))


# every option of every component group, read from configs/<group>/*.yaml (one list of components)
GROUPS = {g: sorted(p.stem for p in (CONFIGS / g).glob("*.yaml")) for g in ("model", "attn", "optim", "precision", "data")}


def test_groups_are_read_from_the_config_directories():
    assert {"sdpa", "naive"} <= set(GROUPS["attn"]) and {"adamw", "sgd"} <= set(GROUPS["optim"])


@pytest.mark.parametrize("group, option", [(g, o) for g, opts in GROUPS.items() for o in opts])
def test_every_config_option_composes_and_instantiates(group, option):
    cfg = compose_cfg([f"{group}={option}"] + (["data.path=/nonexistent"] if option == "text" else []))
    assert cfg[group]._target_
    if group == "model":
        assert instantiate(cfg.model, vocab_size=65).n_layer == cfg.model.n_layer
    elif group == "attn":
        assert callable(instantiate(cfg.attn))
    elif group == "optim":
        policy_free = {k: v for k, v in cfg.optim.items() if k != "param_groups"}  # built apart by the trainer
        opt = instantiate(policy_free)([torch.nn.Parameter(torch.zeros(2, 2))])  # 2-D: Muon takes matrices only
        assert type(opt).__module__.startswith("trainer.optim") and opt.param_groups[0]["lr"] == cfg.optim.lr
    elif group == "precision":
        assert instantiate(cfg.precision).name == option


def test_unknown_group_option_lists_the_available_ones():
    from hydra.errors import MissingConfigException

    with pytest.raises(MissingConfigException, match="Available options"):
        compose_cfg(["attn=nonesuch"])


def test_peak_memory_window_resets_between_runs_of_one_process():
    import sys

    from trainer.monitor import peak_memory

    if not sys.platform.startswith("linux"):
        pytest.skip("peak RSS can only be reset on Linux")
    cpu = torch.device("cpu")
    big = torch.ones(64 * 2**20)  # 256 MiB, touched
    del big
    before = peak_memory(cpu)
    after = peak_memory(cpu, reset=True)  # a new window: its peak is the usage now
    assert after < before - 200 * 2**20 and peak_memory(cpu) >= after


def test_build_re_raises_what_it_does_not_recognize():
    """A constructor's bug (here a KeyError) keeps its type and traceback; only user errors are converted."""
    from omegaconf import OmegaConf

    with pytest.raises(Exception, match="injected bug in a constructor") as info:
        build(OmegaConf.create({"_target_": "buggy_components.BrokenComponent", "size": 2}))
    assert not isinstance(info.value, UserError)
    assert isinstance(info.value, KeyError) or isinstance(info.value.__cause__, KeyError)
    with pytest.raises(ConfigError, match="unexpected keyword argument 'colour'"):
        build(OmegaConf.create({"_target_": "buggy_components.BrokenComponent", "colour": 2}))


def test_a_bug_inside_a_step_is_not_a_user_error(tmp_path, tiny_overrides):
    t = make(tmp_path, tiny_overrides + ["attn._target_=buggy_components.broken_attention", "max_iters=2"])
    with pytest.raises(RuntimeError, match="injected bug") as info:
        t.fit()
    assert not isinstance(info.value, UserError)


@pytest.mark.parametrize(
    "override_dirname, expected",
    [
        ("", "default"),
        ("optim=adamw,attn=naive", "optim=adamw,attn=naive"),
        ("model.n_layer=2,attn=flash", "attn=flash,model.n_layer=2"),
        ("data.path='/a/b/corpus.txt',attn=naive", "attn=naive,data.path=corpus.txt"),  # no stray quote
        ("sample_prompt=\"it's\"", "sample_prompt=its"),
        ("optim.betas=[0.9,0.95],sample_prompt='a,b'", "sample_prompt=a,b,optim.betas=[0.9,0.95]"),
    ],
)
def test_run_name_from_overrides(override_dirname, expected):
    from trainer.config import run_name

    assert run_name(override_dirname) == expected

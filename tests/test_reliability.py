"""Never lose a run (issue #11): divergence, run-directory protection, resume that restores the run,
optimizer/precision changes on resume, filesystem failures, damaged checkpoints, continuous curves.

In-process on tiny configs where the behaviour lives in the Trainer; signals, locks and Hydra's
records are tested through real processes in tests/test_reliability_cli.py.
"""
import errno
import json
import math

import pytest
import torch
from conftest import compose_cfg

from trainer import rundir as ckpt
from trainer.errors import CheckpointError, OutputError, TrainingError
from trainer.loop import Trainer

QUIET = ["sample_tokens=0", "eval_interval=0"]


class StoppingTrainer(Trainer):
    """Stops after ``stop_after`` steps as Ctrl-C would (a real signal is tested in the CLI tests)."""

    stop_after: int | None = None

    def train_step(self, it):
        metrics = super().train_step(it)
        if self.stop_after is not None and it + 1 == self.stop_after:
            self.stop.request()
        return metrics


def make(tmp_path, overrides, name="run"):
    return StoppingTrainer(compose_cfg(overrides), tmp_path / name, overrides)


def poison_after(t, step, value=float("nan")):
    """Make the optimizer write ``value`` into a weight during step ``step`` (the loss of that step is finite)."""
    real_step = t.optimizer.step

    def step_fn(*args, **kwargs):
        out = real_step(*args, **kwargs)
        if t.iteration == step:
            with torch.no_grad():
                next(t.raw_model.parameters()).view(-1)[0] = value
        return out

    t.optimizer.step = step_fn


def ckpt_state(run, name=ckpt.LAST):
    return torch.load(run / name, weights_only=True)


def events(run, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(run), size_guidance={"scalars": 0})
    ea.Reload()
    return [(e.step, e.value) for e in ea.Scalars(tag)]


# -- item 1: divergence never overwrites a good checkpoint -----------------------------------------

def test_update_that_makes_weights_nan_on_an_eval_step_keeps_the_last_good_checkpoint(tmp_path, tiny_overrides):
    # the loss of step 3 is finite; its update writes NaN; step 4 is an eval/checkpoint step
    t = make(tmp_path, tiny_overrides + ["max_iters=8", "eval_interval=2", "sample_tokens=0"])
    poison_after(t, step=3)
    with pytest.raises(TrainingError, match=r"non-finite by step 4; stopped, the last good checkpoint .*ckpt_last.pt is kept"):
        t.fit()
    state = ckpt_state(tmp_path / "run")
    assert state["step"] == 2
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    assert all(torch.isfinite(v).all() for s in state["optimizer"]["state"].values() for v in s.values())


def test_divergence_before_any_checkpoint_says_nothing_was_saved(tmp_path, tiny_overrides):
    t = make(tmp_path, tiny_overrides + ["max_iters=6"] + QUIET)
    poison_after(t, step=1, value=float("inf"))
    with pytest.raises(TrainingError, match="no checkpoint of this run had been saved yet") as info:
        t.fit()
    assert "is kept" not in str(info.value)
    assert not (tmp_path / "run" / ckpt.LAST).exists()
    t.fail(info.value, "diverged")
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["status"] == "diverged"


@pytest.mark.parametrize("log_interval", [1, 5])
def test_non_finite_gradient_stops_at_the_next_check_and_keeps_the_checkpoint(tmp_path, tiny_overrides, log_interval):
    """Steps never wait for the device, so a bad step is caught at the next log point or eval, and
    named; nothing it touched is saved."""
    t = make(tmp_path, tiny_overrides + ["max_iters=10", "eval_interval=4", f"log_interval={log_interval}",
                                         "sample_tokens=0"])
    weight = next(t.raw_model.parameters())
    weight.register_hook(lambda g: g * float("inf") if t.iteration >= 5 else g)  # finite loss, infinite gradient
    with pytest.raises(TrainingError, match=r"gradient norm became non-finite \(nan or inf\) at step 5") as info:
        t.fit()
    assert "ckpt_last.pt is kept" in str(info.value)
    state = torch.load(tmp_path / "run" / ckpt.LAST, weights_only=True)
    assert state["step"] == 4 and all(torch.isfinite(v).all() for v in state["model"].values())


def test_train_step_reads_nothing_from_the_device(tmp_path, tiny_overrides, monkeypatch):
    """No .item()/float() of a tensor inside a step: the loss and norm come back as tensors. (The
    optimizer's step counters are CPU tensors, always, so reading them never waits for a GPU.)"""
    t = make(tmp_path, tiny_overrides + ["max_iters=4"] + QUIET)
    t.train_step(0)  # creates the optimizer state
    counters = {id(s["step"]) for s in t.optimizer.state.values() if "step" in s}
    assert counters and all(s["step"].device.type == "cpu" for s in t.optimizer.state.values())
    reads = []
    for name in ("item", "tolist", "__float__", "__bool__"):
        real = getattr(torch.Tensor, name)

        def read(self, *a, _n=name, _r=real):
            if id(self) not in counters:
                reads.append((_n, tuple(self.shape)))
            return _r(self, *a)

        monkeypatch.setattr(torch.Tensor, name, read)
    metrics = t.train_step(1)
    monkeypatch.undo()
    assert reads == []
    assert torch.is_tensor(metrics["loss"]) and torch.is_tensor(metrics["grad_norm"])


# -- item 3: a fresh run never replaces another run --------------------------------------------

def test_fresh_run_into_a_run_directory_is_refused_unless_overwrite(tmp_path, tiny_overrides):
    base = tiny_overrides + ["max_iters=2"] + QUIET
    make(tmp_path, base).fit()
    saved = (tmp_path / "run" / ckpt.LAST).read_bytes()
    with pytest.raises(OutputError, match="already holds a run .*resume=true.*overwrite=true"):
        make(tmp_path, base)
    assert (tmp_path / "run" / ckpt.LAST).read_bytes() == saved
    assert len(list((tmp_path / "run").glob("events.out.tfevents.*"))) == 1

    t = make(tmp_path, base + ["overwrite=true", "max_iters=3"])  # replaces the old run
    assert t.fit()["step"] == 3
    assert len(list((tmp_path / "run").glob("events.out.tfevents.*"))) == 1
    assert ckpt_state(tmp_path / "run")["step"] == 3


def test_starting_from_another_runs_checkpoint_into_a_used_directory_is_refused(tmp_path, tiny_overrides):
    base = tiny_overrides + ["max_iters=2"] + QUIET
    make(tmp_path, base, "a").fit()
    make(tmp_path, base, "b").fit()
    with pytest.raises(OutputError, match="already holds a run"):
        make(tmp_path, base + [f"resume={tmp_path / 'a'}"], "b")


# -- item 4: one process per run directory ------------------------------------------------------

def test_second_trainer_on_a_locked_run_directory_is_refused_with_the_holder_pid(tmp_path, tiny_overrides):
    import os
    import subprocess
    import sys

    (tmp_path / "run").mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from trainer.rundir import RunDir; "
         "lock = RunDir(Path(sys.argv[1])); print('locked', flush=True); time.sleep(60)", str(tmp_path / "run")],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(OutputError, match=rf"in use by another training process \(PID {holder.pid}\)"):
            make(tmp_path, tiny_overrides + ["max_iters=2"] + QUIET)
    finally:
        holder.kill()
        holder.wait()
    assert make(tmp_path, tiny_overrides + ["max_iters=2"] + QUIET).fit()["status"] == "completed"  # lock died with it
    assert os.path.exists(tmp_path / "run" / ".lock")


# -- item 5: resume continues the run that was started --------------------------------------------

def test_resume_takes_the_saved_config_and_applies_only_the_new_overrides(tmp_path, tiny_overrides, capsys):
    first = tiny_overrides + ["optim=lion", "max_iters=4", "optim.lr=2e-4", "model.dropout=0.1"] + QUIET
    make(tmp_path, first).fit()
    # the resume command names only what changes: everything else comes from the run
    again = tiny_overrides + ["resume=true", "max_iters=6"]
    t = make(tmp_path, again)
    assert t.cfg.optim._target_ == "trainer.optim.Lion" and t.cfg.optim.lr == 2e-4 and t.cfg.model.dropout == 0.1
    assert t.cfg.max_iters == 6 and t.cfg.lr_decay_iters == 6  # follows max_iters, as in a fresh run
    assert t.cfg.learning_rate == 2e-4
    out = capsys.readouterr().out
    assert "max_iters: 4 -> 6" in out and "lr_decay_iters: 4 -> 6" in out
    assert t.fit()["step"] == 6
    assert "optim=lion" in t.overrides and "max_iters=6" in t.overrides and "max_iters=4" not in t.overrides


def test_failed_resume_leaves_the_runs_records_untouched(tmp_path, tiny_overrides):
    make(tmp_path, tiny_overrides + ["max_iters=2"] + QUIET).fit()
    run = tmp_path / "run"
    records = {n: (run / n).read_bytes() for n in ("config.yaml", "summary.json", ckpt.LAST)}
    with pytest.raises(CheckpointError, match="n_embd"):
        make(tmp_path, tiny_overrides + ["resume=true", "model.n_embd=64"])
    assert {n: (run / n).read_bytes() for n in records} == records


# -- item 6: changing the optimizer or precision on resume ------------------------------------------

def test_same_optimizer_new_hyperparameters_carry_state_and_apply_the_new_values(tmp_path, tiny_overrides, capsys):
    make(tmp_path, tiny_overrides + ["max_iters=3"] + QUIET).fit()
    saved = ckpt_state(tmp_path / "run")["optimizer"]
    t = make(tmp_path, tiny_overrides + ["resume=true", "max_iters=5", "optim.weight_decay=0.5", "optim.betas=[0.8,0.9]"])
    assert [g["weight_decay"] for g in t.optimizer.param_groups] == [0.5, 0.0]  # no-decay group stays 0
    assert all(tuple(g["betas"]) == (0.8, 0.9) for g in t.optimizer.param_groups)
    state = t.optimizer.state_dict()["state"]
    assert all(torch.equal(state[i]["exp_avg"], saved["state"][i]["exp_avg"]) for i in saved["state"])
    assert "new hyperparameters: betas, weight_decay" in capsys.readouterr().out
    assert t.fit()["step"] == 5


@pytest.mark.parametrize("new", ["sgd", "adam"])
def test_another_optimizer_type_starts_with_fresh_state(tmp_path, tiny_overrides, capsys, new):
    make(tmp_path, tiny_overrides + ["max_iters=3"] + QUIET).fit()
    t = make(tmp_path, tiny_overrides + ["resume=true", "max_iters=5", f"optim={new}"])
    assert type(t.optimizer).__name__.lower() == new and not t.optimizer.state
    assert "it starts with fresh state" in capsys.readouterr().out
    assert t.fit()["step"] == 5 and t.optimizer.state  # trains on


@pytest.mark.parametrize("old, new", [("fp32", "fp16"), ("fp16", "fp32"), ("fp16", "bf16")])
def test_precision_change_on_resume(tmp_path, tiny_overrides, capsys, old, new):
    make(tmp_path, tiny_overrides + ["max_iters=2", f"precision={old}"] + QUIET).fit()
    t = make(tmp_path, tiny_overrides + ["resume=true", "max_iters=4", f"precision={new}"])
    out = capsys.readouterr().out
    assert t.scaler.is_enabled() == (new == "fp16")
    if new == "fp16":
        assert t.scaler.get_scale() == 2.0**16 and "loss scaling starts fresh" in out
    else:
        assert "saved loss scale is dropped" in out
    assert t.fit()["status"] == "completed"


# -- item 7: filesystem failures -----------------------------------------------------------------

def test_full_disk_on_save_is_one_error_and_leaves_no_temp_file(tmp_path, tiny_overrides, monkeypatch):
    t = make(tmp_path, tiny_overrides + ["max_iters=4", "eval_interval=2", "sample_tokens=0"])
    real_save = torch.save
    calls = []

    def full_disk(obj, f, *args, **kwargs):
        calls.append(f)
        if len(calls) > 2:  # step 2's two checkpoints fit, step 4's do not
            with open(f, "wb") as fh:
                fh.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(ckpt.torch, "save", full_disk)
    with pytest.raises(OutputError, match=r"cannot write checkpoint .*ckpt_last.pt: no space left on device") as info:
        t.fit()
    assert "\n" not in str(info.value)
    run = tmp_path / "run"
    assert not list(run.glob("*.tmp"))
    assert ckpt_state(run)["step"] == 2  # the previous checkpoint is intact
    t.fail(info.value)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "failed" and "no space left" in summary["error"]


def test_checkpoint_path_that_is_a_directory_is_refused_before_training(tmp_path, tiny_overrides):
    (tmp_path / "run" / ckpt.LAST).mkdir(parents=True)
    with pytest.raises(OutputError, match="ckpt_last.pt is a directory"):
        make(tmp_path, tiny_overrides + ["max_iters=2"] + QUIET)


def test_run_directory_under_a_file_or_without_permission(tmp_path, tiny_overrides, monkeypatch):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="is a file, not a directory"):
        StoppingTrainer(compose_cfg(tiny_overrides), tmp_path / "file" / "run", [])
    monkeypatch.setattr("os.access", lambda *a, **k: False)  # as root, chmod cannot take write access away
    with pytest.raises(OutputError, match="no permission to write in"):
        make(tmp_path, tiny_overrides + ["max_iters=2"] + QUIET, "new")


# -- item 8: damaged or foreign checkpoints --------------------------------------------------------

def test_damaged_checkpoints_say_what_to_do(tmp_path, tiny_overrides):
    base = tiny_overrides + ["max_iters=2", "eval_interval=2", "sample_tokens=0"]
    make(tmp_path, base).fit()
    run = tmp_path / "run"
    (run / ckpt.LAST).write_bytes(b"")
    with pytest.raises(CheckpointError, match=rf"is empty \(0 bytes\).*resume={run / ckpt.BEST}"):
        make(tmp_path, base + ["resume=true"])
    (run / ckpt.LAST).write_bytes(b"PK\x03\x04 garbage")
    with pytest.raises(CheckpointError, match=rf"not a readable checkpoint.*resume={run / ckpt.BEST}"):
        make(tmp_path, base + ["resume=true"])
    # following the hint continues the run from its best checkpoint
    t = make(tmp_path, base + [f"resume={run / ckpt.BEST}", "max_iters=3"])
    assert t.iteration == 2 and t.fit()["step"] == 3

    foreign = tmp_path / "weights.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, foreign)
    with pytest.raises(CheckpointError, match=r"not a checkpoint written by scripts/train.py \(missing model"):
        make(tmp_path, base + [f"resume={foreign}"], "other")
    torch.save(torch.zeros(3), foreign)
    with pytest.raises(CheckpointError, match="not a checkpoint written by scripts/train.py"):
        make(tmp_path, base + [f"resume={foreign}"], "other")


# -- item 11: curves stay continuous across a resume ------------------------------------------------

def test_resume_keeps_the_val_curve_continuous_and_the_best_consistent(tmp_path, tiny_overrides):
    base = tiny_overrides + ["max_iters=6", "eval_interval=2", "sample_tokens=0", "optim.lr=1e-2"]
    first = make(tmp_path, base)
    first.stop_after = 4  # interrupted right after the eval at step 4
    assert first.fit()["status"] == "interrupted"
    summary = make(tmp_path, base + ["resume=true"]).fit()
    run = tmp_path / "run"
    val = events(run, "val/loss")
    assert [s for s, _ in val] == [2, 4, 6]
    best = min(v for _, v in val)
    assert summary["best_val_loss"] == pytest.approx(best, rel=1e-6)
    assert ckpt_state(run, ckpt.BEST)["best_val_loss"] == pytest.approx(best, rel=1e-6)
    assert math.isfinite(summary["final_val_loss"])


def test_resume_config_rules():
    from omegaconf import OmegaConf

    from trainer.config import resume_config
    from trainer.errors import ConfigError

    saved = OmegaConf.to_container(compose_cfg(["optim=lion", "max_iters=100", "lr_decay_iters=50"]), resolve=True)
    # only the named keys change; lr_decay_iters was pinned in the saved run, so it stays
    cfg, changes = resume_config(saved, compose_cfg(["resume=true", "max_iters=200"]), ["resume=true", "max_iters=200"])
    assert cfg.optim._target_ == "trainer.optim.Lion" and cfg.max_iters == 200 and cfg.lr_decay_iters == 50
    assert changes == ["max_iters: 100 -> 200"]
    # chains are followed: max_iters -> lr_decay_iters -> schedule.decay_iters, as in a fresh run
    followed = OmegaConf.to_container(compose_cfg(["max_iters=100"]), resolve=True)
    cfg, changes = resume_config(followed, compose_cfg(["max_iters=200"]), ["max_iters=200"])
    assert cfg.lr_decay_iters == 200 and cfg.schedule.decay_iters == 200
    assert "schedule.decay_iters: 100 -> 200" in changes
    cfg, _ = resume_config(followed, compose_cfg(["warmup_iters=0"]), ["warmup_iters=0"])
    assert cfg.schedule.warmup_iters == 0
    # a group choice replaces the group; learning_rate follows optim.lr as it did in the saved run
    cfg, changes = resume_config(saved, compose_cfg(["optim=sgd"]), ["optim=sgd"])
    assert cfg.optim._target_ == "trainer.optim.SGD" and cfg.learning_rate == cfg.optim.lr != saved["learning_rate"]
    assert any(c.startswith("optim._target_:") for c in changes) and any(c.startswith("learning_rate:") for c in changes)
    # the process's own settings come from this command without counting as changes
    cfg, changes = resume_config(saved, compose_cfg(["device=cpu"]), ["device=cpu"])
    assert cfg.device == "cpu" and changes == []
    with pytest.raises(ConfigError, match="cannot be applied on resume"):
        resume_config(saved, compose_cfg(["+experiment=optimizers"]), ["+experiment=optimizers"])


def test_a_checkpoint_from_before_the_redesign_resumes(tmp_path, tiny_overrides):
    """Checkpoints saved by the earlier layout name components by their old ``_target_``s (schedule
    classes, ``TextCorpus``, ``ParamGroups``, ``kernels.sdpa_attention``): resume builds today's."""
    base = tiny_overrides + ["max_iters=2"] + QUIET
    make(tmp_path, base).fit()
    path = tmp_path / "run" / ckpt.LAST
    state = torch.load(path, weights_only=True)
    state["config"]["schedule"] = {k: v for k, v in state["config"]["schedule"].items() if k != "_partial_"}
    state["config"]["schedule"]["_target_"] = "trainer.schedule.WarmupCosine"
    state["config"]["data"]["_target_"] = "trainer.data.TextCorpus"
    state["config"]["attn"]["_target_"] = "kernels.sdpa_attention"
    groups = state["config"]["optim"]["param_groups"]
    groups.pop("_partial_")
    groups["_target_"] = "trainer.optim.ParamGroups"
    torch.save(state, path)
    t = make(tmp_path, tiny_overrides + ["max_iters=4", "resume=true"] + QUIET)
    assert t.iteration == 2 and t.fit()["step"] == 4

"""scripts/train.py and scripts/sample.py as a user runs them: run directories, errors, Ctrl-C."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import REPO

TRAIN = str(REPO / "scripts" / "train.py")
SAMPLE = str(REPO / "scripts" / "sample.py")


def run(args, cwd, env=None, **kw):
    env = {**(env or os.environ), "PYTHONUNBUFFERED": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300, **kw)


def test_run_dir_named_by_overrides_then_sample(tmp_path, tiny_overrides):
    overrides = tiny_overrides + ["max_iters=3", "eval_interval=0"]
    proc = run([TRAIN, "attn=naive", "optim=adamw", *overrides], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert "attn=naive" in run_dir.name and "optim=adamw" in run_dir.name and "/" not in run_dir.name
    assert (run_dir / "ckpt_last.pt").exists() and (run_dir / "config.yaml").exists()
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"
    assert "done: val loss" in proc.stdout and "sample:" in proc.stdout
    # train.log keeps what the console showed (Hydra's own log file used to stay empty)
    log = (run_dir / "train.log").read_text()
    assert log == proc.stdout

    out = run([SAMPLE, str(run_dir), "--prompt", "ALL:", "--num-tokens", "20", "--seed", "3"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ALL:") and len(out.stdout) > 20
    again = run([SAMPLE, str(run_dir), "--prompt", "ALL:", "--num-tokens", "20", "--seed", "3"], cwd=tmp_path)
    assert again.stdout == out.stdout  # seeded


@pytest.mark.parametrize(
    "args, message",
    [
        (["model.n_embd=33"], "error: model.n_embd=33 is not divisible by model.n_head=2"),
        (["data.path=/no/such/file.txt"], "error: data.path=/no/such/file.txt does not exist"),
        (["block_size=64"], "error: block_size=64 exceeds the model's context"),
        (["data.path=???"], "error: Missing mandatory value: data.path"),
        (["device=cuda"] if not torch.cuda.is_available() else ["device=nonsense"], "error: device="),
        (["seed=1e30"], "error: seed=1e+30 must be an integer >= 0"),
        (["optim.eps=-1"], "error: Invalid epsilon value"),
    ],
)
def test_bad_input_is_one_clear_line(tmp_path, tiny_overrides, args, message):
    proc = run([TRAIN, *tiny_overrides, "max_iters=2", *args], cwd=tmp_path)
    assert proc.returncode == 1
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert lines and lines[-1].startswith(message), proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_bug_keeps_its_traceback_and_marks_the_run_failed(tmp_path, tiny_overrides):
    """A RuntimeError from inside a training step is a bug, not bad input: full traceback, exit != 0."""
    run_dir = tmp_path / "r"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])}
    proc = run([TRAIN, *tiny_overrides, "max_iters=2", "attn._target_=buggy_components.broken_attention",
                f"hydra.run.dir={run_dir}"], cwd=tmp_path, env=env)
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr and "RuntimeError: injected bug" in proc.stderr
    assert "error: injected bug" not in proc.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and "injected bug" in summary["error"]
    assert (run_dir / "train.log").read_text().splitlines()[-1].startswith("failed at step 0: injected bug")


@pytest.mark.parametrize("args, hint", [
    (["lr=1e-3"], "hint: 'lr' is not a setting here: use learning_rate (or optim.lr) (see configs/train.yaml)"),
    (["max_iter=3", "n_embd=64"], "hint: 'max_iter' is not a setting here: use max_iters; "
                                  "'n_embd' is not a setting here: use model.n_embd (see configs/train.yaml)"),
])
def test_unknown_key_gets_hydras_error_and_this_trainers_spelling(tmp_path, args, hint):
    proc = run([TRAIN, *args], cwd=tmp_path)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert "is not in struct" in proc.stderr and lines[-1] == hint
    assert not (tmp_path / "runs").exists()


def test_unknown_group_option_lists_choices(tmp_path):
    proc = run([TRAIN, "attn=nonesuch"], cwd=tmp_path)
    assert proc.returncode == 1
    assert "Could not find 'attn/nonesuch'" in proc.stderr and "naive" in proc.stderr and "online" in proc.stderr


def test_flash_on_cpu_without_interpreter_stops_with_both_remedies(tmp_path, tiny_overrides):
    if torch.cuda.is_available():
        pytest.skip("CUDA present: flash runs natively")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, TRAIN, *tiny_overrides, "attn=flash", "max_iters=2"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and "TRITON_INTERPRET=1" in last and "attn=online" in last


def test_ctrl_c_saves_a_checkpoint_and_exits_cleanly(tmp_path, tiny_overrides):
    run_dir = tmp_path / "r"
    args = [TRAIN, *tiny_overrides, "max_iters=100000", "eval_interval=0", "log_interval=1",
            f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, *args], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    for line in proc.stdout:  # wait until training is under way
        if line.startswith("step") and "/100000" in line and int(line.split()[1].split("/")[0]) >= 3:
            break
        assert time.time() < deadline
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted at step" in out and "resume=true" in out and "Traceback" not in err
    state = torch.load(run_dir / "ckpt_last.pt", weights_only=True)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "interrupted" and state["step"] == summary["step"] >= 4

    # resume=true in the same directory continues from there
    proc = run([TRAIN, *tiny_overrides, f"max_iters={state['step'] + 2}", "eval_interval=0", "resume=true",
                f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((run_dir / "summary.json").read_text())["step"] == state["step"] + 2
    log = (run_dir / "train.log").read_text()  # one log for the run, continued by the resume
    assert log.index("interrupted at step") < log.index("resumed from") < log.index("done: val loss")
    assert log.endswith(proc.stdout)

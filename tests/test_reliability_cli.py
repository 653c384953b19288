"""Never lose a run (issue #11), through real processes: SIGTERM on one process and on two torchrun
ranks, the run-directory lock, Hydra's records on a refused or failed resume, the printed resume
command, and filesystem errors Hydra would otherwise report with a traceback."""
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO
from omegaconf import OmegaConf

TRAIN = str(REPO / "scripts" / "train.py")
QUIET = ["eval_interval=0", "sample_tokens=0"]


def env():
    e = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    e.pop("HYDRA_FULL_ERROR", None)
    return e


def run(args, cwd):
    return subprocess.run([sys.executable, TRAIN, *args], cwd=cwd, env=env(), capture_output=True, text=True,
                          timeout=300)


def start(cmd, cwd):
    return subprocess.Popen(cmd, cwd=cwd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def wait_for_step(proc, n, total):
    """Read the progress lines until step ``n`` of ``total`` has been logged (training is under way)."""
    deadline = time.time() + 180
    for line in proc.stdout:
        if line.startswith("step") and f"/{total}:" in line and int(line.split()[1].split("/")[0]) >= n:
            return
        assert time.time() < deadline, "training did not start"
    raise AssertionError(f"process ended early: {proc.stderr.read()[-3000:]}")


def one_error_line(proc):
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 1 and lines and lines[-1].startswith("error:"), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    return lines[-1]


# -- item 2: SIGTERM -------------------------------------------------------------------------------

def test_sigterm_saves_marks_interrupted_exits_143_and_the_printed_command_resumes(tmp_path, tiny_overrides):
    run_dir = tmp_path / "r"
    proc = start([sys.executable, TRAIN, *tiny_overrides, "max_iters=100000", *QUIET, f"hydra.run.dir={run_dir}"],
                 tmp_path)
    wait_for_step(proc, 3, 100000)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]
    assert "Traceback" not in err
    summary = json.loads((run_dir / "summary.json").read_text())
    state = torch.load(run_dir / "ckpt_last.pt", weights_only=True)
    assert summary["status"] == "interrupted" and summary["stopped_by"] == "SIGTERM"
    assert state["step"] == summary["step"] >= 4

    # the printed command, as printed (no overrides repeated), continues the same run
    printed = out.split("Resume with: ")[1].splitlines()[0]
    args = shlex.split(printed)
    assert args[:2] == ["python", "scripts/train.py"]
    done = run([*args[2:], f"max_iters={state['step'] + 2}"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((run_dir / "summary.json").read_text())["step"] == state["step"] + 2
    assert f"max_iters: 100000 -> {state['step'] + 2}" in done.stdout  # the resume lists what changed


def _children(pid):
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(c) for c in f.read().split()]


def _rank_of(pid):
    with open(f"/proc/{pid}/environ", "rb") as f:
        env_vars = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
    return int(env_vars.get(b"RANK", b"-1"))


def _signalled_torchrun(tmp_path, tiny_overrides, send) -> tuple[Path, str]:
    """A 2-rank torchrun of the tiny recipe; once it passed step 3, ``send(proc)`` signals it.
    Returns the run directory and the job's stderr."""
    run_dir = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", TRAIN,
           *tiny_overrides, "max_iters=100000", "gradient_accumulation_steps=2", *QUIET, f"hydra.run.dir={run_dir}"]
    proc = start(cmd, tmp_path)
    try:
        wait_for_step(proc, 3, 100000)
        send(proc)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return run_dir, err


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the worker processes in /proc")
def test_sigterm_to_one_torchrun_rank_stops_every_rank_at_the_same_step(tmp_path, tiny_overrides):
    def to_rank_1(proc):  # only rank 1 is told; rank 0 learns it through the all-reduce
        workers = {_rank_of(p): p for p in _children(proc.pid)}
        os.kill(workers[1], signal.SIGTERM)

    run_dir, err = _signalled_torchrun(tmp_path, tiny_overrides, to_rank_1)
    stops = sorted(ln for ln in err.splitlines() if "stopped by SIGTERM at step" in ln)
    assert [ln.split(":")[0].split()[-1] for ln in stops] == ["0", "1"], err[-3000:]
    steps = {int(ln.rsplit(" ", 1)[1]) for ln in stops}
    assert len(steps) == 1
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["step"] == steps.pop()
    assert torch.load(run_dir / "ckpt_last.pt", weights_only=True)["step"] == summary["step"]


# -- items 3 and 5: Hydra's records survive a refused or failed command -----------------------------

def test_refused_and_failed_commands_leave_the_runs_records(tmp_path, tiny_overrides):
    run_dir = tmp_path / "r"
    first = [*tiny_overrides, "optim=lion", "max_iters=3", *QUIET, f"hydra.run.dir={run_dir}"]
    assert run(first, tmp_path).returncode == 0
    files = ["ckpt_last.pt", "config.yaml", "summary.json", ".hydra/overrides.yaml", ".hydra/config.yaml"]
    before = {n: (run_dir / n).read_bytes() for n in files}
    assert "optim=lion" in (run_dir / ".hydra/overrides.yaml").read_text()

    line = one_error_line(run(first, tmp_path))  # the same command again: a fresh run into a used directory
    assert "already holds a run" in line and "resume=true" in line and "overwrite=true" in line
    line = one_error_line(run([*tiny_overrides, "resume=true", "model.n_embd=64", f"hydra.run.dir={run_dir}"],
                              tmp_path))
    assert "different model shape" in line
    assert {n: (run_dir / n).read_bytes() for n in files} == before

    # a resume naming only what changes continues the Lion run (it used to crash with KeyError)
    p = run([*tiny_overrides, "resume=true", "max_iters=5", f"hydra.run.dir={run_dir}"], tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    overrides = OmegaConf.load(run_dir / ".hydra/overrides.yaml")
    assert "optim=lion" in overrides and "max_iters=5" in overrides and "max_iters=3" not in overrides
    assert OmegaConf.load(run_dir / ".hydra/hydra.yaml").hydra.runtime.choices.optim == "lion"
    assert OmegaConf.load(run_dir / "config.yaml").optim._target_ == "trainer.optim.Lion"


# -- item 4: the lock, between two training processes ------------------------------------------------

def test_second_process_in_a_running_runs_directory_gets_the_holders_pid(tmp_path, tiny_overrides):
    run_dir = tmp_path / "r"
    holder = start([sys.executable, TRAIN, *tiny_overrides, "max_iters=100000", *QUIET, f"hydra.run.dir={run_dir}"],
                   tmp_path)
    try:
        wait_for_step(holder, 2, 100000)
        line = one_error_line(run([*tiny_overrides, "resume=true", f"hydra.run.dir={run_dir}"], tmp_path))
        assert f"in use by another training process (PID {holder.pid})" in line
    finally:
        holder.send_signal(signal.SIGINT)
        holder.communicate(timeout=120)
    assert holder.returncode == 130
    assert len(list(run_dir.glob("events.out.tfevents.*"))) == 1  # the refused process wrote nothing
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "interrupted"


# -- item 7: a run directory Hydra cannot create ------------------------------------------------------

def test_run_dir_under_a_file_is_one_error_line(tmp_path, tiny_overrides):
    (tmp_path / "afile").write_text("x")
    line = one_error_line(run([*tiny_overrides, "max_iters=2", f"hydra.run.dir={tmp_path / 'afile' / 'run'}"],
                              tmp_path))
    assert "is a file, not a directory" in line


def test_checkpoint_path_that_is_a_directory_is_one_error_line(tmp_path, tiny_overrides):
    run_dir = tmp_path / "r"
    (run_dir / "ckpt_last.pt").mkdir(parents=True)
    line = one_error_line(run([*tiny_overrides, "max_iters=2", f"hydra.run.dir={run_dir}"], tmp_path))
    assert "ckpt_last.pt is a directory" in line
    assert not list(Path(run_dir).glob("*.tmp"))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the worker processes in /proc")
def test_ctrl_c_in_a_terminal_under_torchrun_saves_once_on_every_rank(tmp_path, tiny_overrides):
    """A terminal's Ctrl-C reaches torchrun and its workers, and torchrun forwards it once more."""
    # what the terminal does: SIGINT to the whole process group
    run_dir, err = _signalled_torchrun(tmp_path, tiny_overrides, lambda proc: os.killpg(proc.pid, signal.SIGINT))
    stops = [ln for ln in err.splitlines() if "stopped by SIGINT at step" in ln]
    assert len(stops) == 2 and len({ln.rsplit(" ", 1)[1] for ln in stops}) == 1, err[-3000:]
    assert "KeyboardInterrupt" not in err
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["stopped_by"] == "SIGINT"
    assert torch.load(run_dir / "ckpt_last.pt", weights_only=True)["step"] == summary["step"]


def test_stop_signals_repeat_window():
    from trainer.runtime import DistInfo
    from trainer.runtime import REPEAT_WINDOW_S, StopSignals

    with StopSignals(DistInfo()) as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)  # a forwarded copy, right behind: the same request
        time.sleep(0.05)
        assert stop.requested() and stop.exit_code == 143
        time.sleep(REPEAT_WINDOW_S + 0.1)
        with pytest.raises(KeyboardInterrupt):  # a real second Ctrl-C
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.5)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL

"""Data-parallel training with torchrun on CPU (Gloo, 2 processes)."""
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO

TRAIN = str(REPO / "scripts" / "train.py")


def torchrun(nproc, args, cwd):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", TRAIN, *args]
    # a rank that dies in C++ (SIGABRT, SIGSEGV) dumps its Python stacks: a failure says where it was
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONFAULTHANDLER": "1"}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def output(proc) -> str:
    """Both streams' ends, for a failed run's assertion message (the ranks' own lines are on stdout)."""
    return f"--- stdout ---\n{proc.stdout[-2500:]}\n--- stderr ---\n{proc.stderr[-4000:]}"


def single(args, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, TRAIN, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def params(run_dir):
    return torch.load(run_dir / "ckpt_last.pt", weights_only=True)["model"]


@pytest.fixture
def ddp_overrides(tiny_overrides):
    return tiny_overrides + ["eval_interval=0", "sample_tokens=0", "optim.lr=3e-3", "warmup_iters=0",
                             "lr_decay_iters=8"]


def test_two_ranks_train_and_write_one_run(tmp_path, ddp_overrides):
    run_dir = tmp_path / "ddp"
    proc = torchrun(2, ddp_overrides + ["max_iters=8", "eval_interval=4", "gradient_accumulation_steps=2",
                                        "batch_size=8", f"hydra.run.dir={run_dir}"], tmp_path)
    assert proc.returncode == 0, output(proc)
    losses = [float(ln.split("loss ")[1].split(",")[0]) for ln in proc.stdout.splitlines() if ln.startswith("step ")
              and "/8:" in ln]
    assert len(losses) == 8 and all(map(torch.isfinite, torch.tensor(losses)))
    assert sum(losses[-2:]) < sum(losses[:2])
    # the global batch is what the config says (2 accumulation steps x 8 x 32 tokens), split over ranks
    assert "512 tokens per step on 2 process(es)" in proc.stdout
    assert len(list(run_dir.glob("events.out.tfevents.*"))) == 1  # only rank 0 writes
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["step"] == 8


def test_two_ranks_equal_one_process_with_twice_the_batch(tmp_path, ddp_overrides):
    """2 ranks x batch 4 (the global batch split over ranks) == 1 process x batch 8 on the same samples."""
    a, b = tmp_path / "ddp", tmp_path / "one"
    p = torchrun(2, ddp_overrides + ["max_iters=5", "batch_size=4", "gradient_accumulation_steps=2",
                                     f"hydra.run.dir={a}"], tmp_path)
    assert p.returncode == 0, output(p)
    p = single(ddp_overrides + ["max_iters=5", "batch_size=8", "gradient_accumulation_steps=1",
                                f"hydra.run.dir={b}"], tmp_path)
    assert p.returncode == 0, output(p)
    pa, pb = params(a), params(b)
    # Gloo's all-reduce sums the two halves in another order than one process does; Adam divides
    # by sqrt(v), so on near-zero gradients that rounding shows up as ~1e-5 in the weights. Wrong
    # data would move weights by about lr (3e-3) per step, far above this bound.
    for name in pa:
        torch.testing.assert_close(pa[name], pb[name], rtol=0, atol=1e-4, msg=name)


def test_resume_under_two_ranks_continues_the_trajectory(tmp_path, ddp_overrides):
    common = ddp_overrides + ["gradient_accumulation_steps=2", "model.dropout=0.1"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    for p in (torchrun(2, common + ["max_iters=6", f"hydra.run.dir={straight}"], tmp_path),
              torchrun(2, common + ["max_iters=3", f"hydra.run.dir={split}"], tmp_path)):
        assert p.returncode == 0, output(p)
    p = torchrun(2, common + ["max_iters=6", "resume=true", f"hydra.run.dir={split}"], tmp_path)
    assert p.returncode == 0, output(p)
    ps, pr = params(straight), params(split)
    for name in ps:
        torch.testing.assert_close(pr[name], ps[name], rtol=0, atol=1e-6, msg=name)


def test_accumulation_not_divisible_by_world_size_is_a_clear_error(tmp_path, ddp_overrides):
    p = torchrun(2, ddp_overrides + ["max_iters=2", "gradient_accumulation_steps=3",
                                     f"hydra.run.dir={tmp_path / 'bad'}"], tmp_path)
    assert p.returncode != 0
    assert "gradient_accumulation_steps=3 is not divisible by the world size 2" in p.stderr

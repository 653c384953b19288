"""scripts/sample.py: cached decoding, the run's precision, weights-only loading, one-line errors."""
import importlib.util
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO, compose_cfg

import kernels
from trainer.loop import Trainer

SAMPLE = REPO / "scripts" / "sample.py"
spec = importlib.util.spec_from_file_location("sample_script", SAMPLE)
sample = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sample)


@pytest.fixture
def run_dir(tmp_path, tiny_overrides):
    """A checkpoint of a tiny untrained bf16 run (weights, optimizer state, config, tokenizer)."""
    t = Trainer(compose_cfg(tiny_overrides + ["max_iters=0", "precision=bf16", "attn=naive"]), tmp_path / "run")
    t.save()
    t.release()
    return tmp_path / "run"


def sample_main(capsys, *args):
    rc = sample.main([*map(str, args)])
    out, err = capsys.readouterr()
    return rc, out, err


def test_greedy_with_and_without_cache_print_the_same_text(run_dir, capsys):
    args = (run_dir, "--prompt", "ALL:", "--num-tokens", "40", "--temperature", "0")  # past block_size 32
    rc, cached, _ = sample_main(capsys, *args)
    assert rc == 0 and cached.startswith("ALL:")
    rc, uncached, _ = sample_main(capsys, *args, "--no-cache")
    assert rc == 0 and cached == uncached
    rc, strided, _ = sample_main(capsys, *args, "--window-stride", "16")  # the window moves at 33
    rc2, strided_uncached, _ = sample_main(capsys, *args, "--window-stride", "16", "--no-cache")
    assert rc == rc2 == 0 and strided == strided_uncached and strided[:33] == cached[:33]


def test_loads_weights_only_to_cpu_first_and_uses_the_runs_precision(run_dir, monkeypatch):
    seen = {}
    real = sample.load_checkpoint

    def spy(path, map_location="cpu"):
        seen["map_location"] = map_location
        state = real(path, map_location=map_location)
        assert "optimizer" in state  # the file has it; sampling drops it before touching the device
        return state

    monkeypatch.setattr(sample, "load_checkpoint", spy)
    args = sample.parse_args([str(run_dir)])
    model, tok, precision = sample.load_model(args, torch.device("cpu"))
    assert seen["map_location"] == "cpu"
    assert precision.name == "bf16"  # the run trained in bf16
    assert sample.load_model(sample.parse_args([str(run_dir), "--precision", "fp32"]), torch.device("cpu"))[2].name == "fp32"
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_samples_under_the_runs_autocast(run_dir, monkeypatch, capsys):
    dtypes = []
    real = kernels.naive_attention

    def recording(q, k, v, causal=True, scale=None):
        dtypes.append(q.dtype)
        return real(q, k, v, causal, scale)

    monkeypatch.setattr(sample, "build_attention", lambda name, config: recording)
    rc, _, err = sample_main(capsys, run_dir, "--num-tokens", "3")
    assert rc == 0, err
    assert torch.bfloat16 in dtypes  # the projections ran under bf16 autocast


def test_attn_choices_come_from_the_registry(run_dir, capsys):
    assert sample.make_parser()._option_string_actions["--attn"].choices == sorted(kernels.ATTENTION)
    with pytest.raises(SystemExit):
        sample.parse_args([str(run_dir), "--attn", "nonesuch"])
    err = capsys.readouterr().err
    assert "--attn" in err and all(name in err for name in kernels.ATTENTION)


@pytest.mark.parametrize(
    "args, match",
    [
        (["--temperature", "nan"], "--temperature must be a finite number >= 0"),
        (["--temperature", "-1"], "--temperature must be a finite number >= 0"),
        (["--top-k", "-3"], "--top-k must be >= 0"),
        (["--num-tokens", "0"], "--num-tokens"),
        (["--prompt", ""], "--prompt encodes to no tokens"),
        (["--window-stride", "0"], "--window-stride must be from 1 to the model's context (32), got 0"),
        (["--window-stride", "33"], "--window-stride must be from 1 to the model's context (32)"),
        (["--device", "cuda:1"] if not torch.cuda.is_available() else ["--device", "tpu"], "device="),
    ],
)
def test_bad_arguments_are_one_line(run_dir, capsys, args, match):
    rc, out, err = sample_main(capsys, run_dir, *args)
    assert rc == 2 and out == ""
    assert err.startswith("error: ") and match in err and err.count("\n") == 1


def test_non_finite_weights_are_refused(run_dir, capsys):
    state = torch.load(run_dir / "ckpt_last.pt", weights_only=True)
    state["model"]["transformer.h.0.mlp.c_fc.weight"][0, 0] = float("nan")
    torch.save(state, run_dir / "ckpt_last.pt")
    rc, out, err = sample_main(capsys, run_dir)
    assert rc == 2 and out == ""
    assert "non-finite weights" in err and "transformer.h.0.mlp.c_fc.weight" in err and err.count("\n") == 1


def test_flash_on_cpu_without_the_interpreter_is_one_line(run_dir):
    if torch.cuda.is_available():
        pytest.skip("CUDA present: flash runs natively")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(SAMPLE), str(run_dir), "--attn", "flash", "--num-tokens", "3"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith("error: --attn flash cannot run on cpu") and proc.stderr.count("\n") == 1
    assert "Traceback" not in proc.stderr


def test_nanogpts_flag_spellings_sample_the_same_text(run_dir, tmp_path, capsys):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("ALL:\nSpeak", encoding="utf-8")
    ours = sample_main(capsys, run_dir, "--prompt", "ALL:\nSpeak", "--num-tokens", "12", "--num-samples", "2",
                       "--top-k", "5", "--seed", "3", "--precision", "fp32")
    nanogpts = sample_main(capsys, f"--out_dir={run_dir}", f"--start=FILE:{prompt}", "--max_new_tokens=12",
                           "--num_samples=2", "--top_k=5", "--seed=3", "--dtype=float32")
    assert ours[0] == nanogpts[0] == 0 and ours[1] == nanogpts[1]
    samples = ours[1].split("-" * 40 + "\n")
    assert len(samples) == 2 and all(s.startswith("ALL:\nSpeak") for s in samples)
    text_start = sample_main(capsys, "--out_dir", run_dir, "--start", "ALL:\nSpeak", "--max_new_tokens", "12",
                             "--num_samples", "2", "--top_k", "5", "--seed", "3", "--dtype", "float32")
    assert text_start[1] == ours[1]


@pytest.mark.parametrize("args, match", [
    (["--start=FILE:/nonexistent/prompt.txt"], "--start=FILE:/nonexistent/prompt.txt: cannot read /nonexistent/prompt.txt"),
    (["--out_dir", "elsewhere"], "give the checkpoint or run directory once"),
])
def test_nanogpt_spellings_fail_in_one_line(run_dir, capsys, args, match):
    rc, out, err = sample_main(capsys, run_dir, *args)
    assert rc == 2 and out == "" and err.startswith("error: ") and match in err and err.count("\n") == 1


class Payload:
    """Any object a pickle would rebuild by running code: not in a gptlab checkpoint."""


def test_a_checkpoint_with_pickled_code_is_refused_in_one_plain_line(tmp_path, capsys):
    path = tmp_path / "ckpt_last.pt"
    torch.save({"model": Payload(), "step": 0}, path)
    rc, out, err = sample_main(capsys, path)
    assert rc == 2 and out == ""
    assert err == (f"error: refusing to unpickle code from {path}: not a gptlab checkpoint (those hold tensors and "
                   "plain values only, loaded with weights_only=True).\n")
    assert "\x1b" not in err  # none of torch's terminal escape codes

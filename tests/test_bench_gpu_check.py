"""scripts/bench/gpu_check.sh, its report helper gpu_report.py, and the shakespeare_char preset, on CPU.

The GPU measurements themselves need a GPU; what is checked here: the script refuses to run
without one in one line, its dry run (GPU_CHECK_DRY=1) runs every stage's command at tiny sizes
and ends with the report files, the report's target checks are computed from the figures it is
given, and the nanoGPT preset composes to nanoGPT's settings, also with data=text.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import compose_cfg

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "bench" / "gpu_check.sh"


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("GPU_CHECK_DRY", "TINY_SHAKESPEARE")}
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    return {**env, **extra}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_without_cuda_it_stops_with_one_line(tmp_path):
    proc = subprocess.run(["bash", str(SCRIPT), str(tmp_path)], cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1 and "no CUDA device" in lines[0] and "GPU_CHECK_DRY=1" in lines[0]


@pytest.mark.slow
def test_dry_run_runs_every_stage_and_writes_the_report(tmp_path):
    out = tmp_path / "check"
    proc = subprocess.run(["bash", str(SCRIPT), str(out)], cwd=REPO, env=_env(GPU_CHECK_DRY="1", OMP_NUM_THREADS="1"),
                          capture_output=True, text=True, timeout=900)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    stage_ends = [line for line in log.splitlines() if line.startswith("=== ") and ": rc=" in line]
    assert {s.split(":")[0][4:] for s in stage_ends} >= {"tests", "host-python", "gpt2", "long", "others",
                                                         "recipe-flash-1337", "recipe-sdpa-1337", "recipe-sdpa-1338"}
    assert all(s.split("rc=")[1].startswith("0 ") for s in stage_ends), stage_ends
    report = json.loads((out / "gpu_results.json").read_text())
    assert {"date", "gpu", "torch", "triton", "rows"} <= set(report)
    gpt2 = [r for r in report["rows"] if "recipe" not in r]
    assert {(r["attn"], r["compile"]) for r in gpt2} == {(a, c) for a in ("flash", "sdpa", "naive", "online")
                                                         for c in (False, True)}
    assert all(set(r) >= {"attn", "compile", "T", "tokens_per_s", "mfu"} for r in gpt2)
    recipe = [r for r in report["rows"] if r.get("recipe") == "shakespeare_char"]
    assert sorted((r["attn"], r["seed"]) for r in recipe) == [("flash", 1337), ("sdpa", 1337), ("sdpa", 1338)]
    assert all(r["val_loss"] is not None and r["wall_s"] > 0 for r in recipe)
    assert (out / "gpu_results.md").read_text().startswith("# GPU check: none (dry run)")


def _report(tmp_path, gpt2_rows, overhead=None):
    sys.path.insert(0, str(REPO / "scripts" / "bench"))
    try:
        import gpu_report
    finally:
        sys.path.pop(0)
    (tmp_path / "gpt2.jsonl").write_text("".join(json.dumps(r) + "\n" for r in gpt2_rows))
    if overhead is not None:
        (tmp_path / "overhead.json").write_text(json.dumps(overhead))
    return gpu_report.build(tmp_path)


def test_report_checks_each_target_against_the_measured_figures(tmp_path):
    rows = [dict(attn="flash", compile=True, T=1024, tokens_per_s=6.0e5, mfu=0.47, vs_sdpa=1.03),
            dict(attn="sdpa", compile=True, T=1024, tokens_per_s=5.8e5, mfu=0.45, vs_sdpa=None),
            dict(attn="flash", compile=False, T=1024, tokens_per_s=4.0e5, mfu=0.30, vs_sdpa=0.93)]
    overhead = [dict(impl="flash", T=1024, kernel_ms=0.15, wall_ms=0.22, overhead_ms=0.07, host_ms=0.2),
                dict(impl="flash", T=4096, kernel_ms=1.5, wall_ms=1.72, overhead_ms=0.22, host_ms=0.2)]
    report, md = _report(tmp_path, rows, overhead)
    met = {t["target"]: (t["measured"], t["met"]) for t in report["targets"]}
    assert met["GPT-2 small T=1024 compiled: flash MFU >= 45%"] == (0.47, True)
    assert met["GPT-2 small T=1024 compiled: flash tokens/s >= 1.00x sdpa"] == (1.03, True)
    assert met["GPT-2 small T=4096 compiled: flash tokens/s >= 1.15x sdpa"] == (None, None)  # not measured
    assert met["GPT-2 small T=1024 eager: flash tokens/s >= 0.95x sdpa"] == (0.93, False)
    assert met["eager flash fwd+bwd T=1024: host overhead <= 0.1 ms"] == (0.07, True)
    assert met["eager flash fwd+bwd T=4096: host overhead <= 0.1 ms"] == (0.22, False)
    assert "| GPT-2 small T=1024 eager: flash tokens/s >= 0.95x sdpa | 0.93 | NO |" in md
    assert report["gpu"] == "unknown"  # no env.json: said, not invented


def test_shakespeare_char_preset_is_nanogpts_recipe_also_with_data_text(tiny_corpus):
    cfg = compose_cfg(["+experiment=shakespeare_char", "data=text", f"data.path={tiny_corpus}"])
    m = cfg.model
    assert (m.n_layer, m.n_head, m.n_embd, m.block_size, m.dropout, m.bias) == (6, 6, 384, 256, 0.2, False)
    assert (cfg.batch_size, cfg.max_iters, cfg.lr_decay_iters, cfg.warmup_iters, cfg.min_lr) == (64, 5000, 5000, 100, 1e-4)
    assert (cfg.eval_interval, cfg.eval_iters, cfg.learning_rate, list(cfg.optim.betas)) == (250, 200, 1e-3, [0.9, 0.99])
    assert cfg.precision.name == "bf16" and cfg.compile is True and cfg.data.path == str(tiny_corpus)
    assert compose_cfg(["+experiment=shakespeare_char"]).data._target_ == "trainer.data.load_shakespeare"

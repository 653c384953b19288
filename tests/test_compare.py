"""Tests for trainer/compare.py and scripts/compare.py on run directories fabricated with the
trainer's contract (config.yaml, summary.json, TensorBoard events), plus one real tiny sweep."""
from __future__ import annotations

import copy
import csv
import importlib.util
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams

from trainer import compare as cmp
from trainer.compare_plots import _aligned

REPO = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
T0 = 1_700_000_000.0  # fabricated wall-clock start

BASE = {
    "seed": 0, "max_iters": 100, "batch_size": 2, "block_size": 16, "eval_interval": 25,
    "gradient_accumulation_steps": 1, "device": "cpu", "resume": False,
    "model": {"n_layer": 1, "n_embd": 32, "n_head": 2},
    "attn": {"_target_": "kernels.naive.naive_attention"},
    "optim": {"_target_": "trainer.optim.adamw.AdamW", "lr": 1e-3, "betas": [0.9, 0.95]},
    "precision": {"name": "fp32"},
    "data": {"path": "/tmp/somewhere.txt"},
}
ATTN = {"naive": "kernels.naive.naive_attention", "sdpa": "kernels.sdpa.sdpa_attention"}
OPTIM = {"adamw": ("trainer.optim.adamw.AdamW", 1e-3), "sgd": ("trainer.optim.sgd.SGD", 1e-1)}


def load_script():
    spec = importlib.util.spec_from_file_location("compare_script", REPO / "scripts" / "compare.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_config(attn="naive", optim="adamw", seed=0, **top):
    config = copy.deepcopy(BASE)
    config["attn"]["_target_"] = ATTN[attn]
    config["optim"]["_target_"], config["optim"]["lr"] = OPTIM[optim]
    config.update(seed=seed, **top)
    return config


def make_run(root: Path, name: str, config: dict | None, scalars: dict[str, list[tuple[int, float]]],
             summary: dict | None = None, seconds_per_step: float = 0.5, new_style: bool = False,
             choices: dict | None = None, overrides: list[str] | None = None) -> Path:
    """A run dir as the trainer writes it; scalars are {tag: [(step, value)]} at fabricated times."""
    run = root / name
    run.mkdir(parents=True)
    (run / ".hydra").mkdir()
    (run / ".hydra" / "config.yaml").write_text("not: a run\n")  # must not be found as a run
    if choices is not None:  # as Hydra records them, its own groups included
        hydra_choices = {"hydra/launcher": "basic", "hydra/sweeper": "basic", **choices}
        (run / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump(
            {"hydra": {"run": {"dir": "runs/${now:%Y}"}, "runtime": {"choices": hydra_choices}}}))
    if overrides is not None:
        (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    if config is not None:
        (run / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    writer = SummaryWriter(log_dir=str(run))
    # the trainer also logs text samples and hparams; these are tensors that are not scalars
    writer.add_text("sample", "    To be", 0)
    for s in hparams({"lr": 1e-3, "attn": "naive"}, {"val/loss": float("nan")}):
        writer.file_writer.add_summary(s)
    for tag, points in scalars.items():
        for step, value in points:
            writer.add_scalar(tag, value, step, walltime=T0 + seconds_per_step * step, new_style=new_style)
    writer.close()
    if summary is not None:
        (run / "summary.json").write_text(json.dumps(summary))
    return run


def done(step=100, **numbers):
    summary = {"status": "completed", "step": step, "max_iters": 100, "best_val_loss": None,
               "final_val_loss": None, "tokens_per_sec": 1000.0, "peak_mem_bytes": 2**20 * 50,
               "wall_time_s": 60.0, "overrides": [], "error": None}
    summary.update(numbers)
    return summary


def val_curve(losses, every=25):
    return [(every * (i + 1), v) for i, v in enumerate(losses)]


@pytest.fixture
def grid(tmp_path):
    """2x2 attn x optim grid; (naive, adamw) has seeds 0 and 1. Returns root and best losses."""
    root = tmp_path / "sweep"
    curves = {
        ("naive", "adamw", 0): [3.0, 2.5, 2.2, 2.3],
        ("naive", "adamw", 1): [3.1, 2.6, 2.0, 2.1],
        ("naive", "sgd", 0): [3.5, 3.2, 3.0, 2.9],
        ("sdpa", "adamw", 0): [2.9, 2.4, 1.9, 1.95],
        ("sdpa", "sgd", 0): [3.6, 3.4, 3.3, 3.25],
    }
    for (attn, optim, seed), losses in curves.items():
        config = make_config(attn, optim, seed, data={"path": f"/tmp/data_{seed}_{attn}.txt"})
        name = f"attn={attn},optim={optim},seed={seed}"
        scalars = {"val/loss": val_curve(losses), "train/loss": [(s, 3.0) for s in range(0, 101, 10)],
                   "tokens_per_sec": [(s, 900.0 + seed * 100) for s in range(0, 101, 10)]}
        make_run(root, name, config, scalars, done(tokens_per_sec=1000.0 + 100 * seed,
                                                   wall_time_s=60.0 + seed))
    return root, curves


def test_grid_groups_seeds_and_matches_numpy(grid):
    root, curves = grid
    groups, rows, keys = cmp.compare(root)
    assert keys == ["attn._target_", "optim._target_", "optim.lr"]  # data.path and seed ignored
    assert len(rows) == 4
    grouped = next(r for r in rows if r["n"] == 2)
    assert grouped["run"] == "attn=naive,optim=adamw,seed=*"
    assert grouped["seeds"] == [0, 1]
    assert grouped["config"] == {"attn._target_": "naive_attention", "optim._target_": "AdamW",
                                 "optim.lr": 1e-3}
    pair = [curves[("naive", "adamw", s)] for s in (0, 1)]
    best, final = [min(c) for c in pair], [c[-1] for c in pair]
    assert grouped["best_val_loss"] == pytest.approx(np.mean(best))
    assert grouped["best_val_loss_std"] == pytest.approx(np.std(best, ddof=1))
    assert grouped["final_val_loss"] == pytest.approx(np.mean(final))
    assert grouped["final_val_loss_std"] == pytest.approx(np.std(final, ddof=1))
    assert grouped["tokens_per_sec"] == pytest.approx(1050.0)
    assert grouped["wall_time_s"] == pytest.approx(60.5)
    single = next(r for r in rows if r["run"] == "attn=sdpa,optim=sgd,seed=0")
    assert single["best_val_loss_std"] is None and single["best_val_loss"] == pytest.approx(3.25)
    assert single["peak_mem_mb"] == pytest.approx(50.0) and single["steps"] == 100
    assert [r["best_val_loss"] for r in rows] == sorted(r["best_val_loss"] for r in rows)
    assert rows[0]["run"] == "attn=sdpa,optim=adamw,seed=0"


def test_markdown_table(grid, capsys):
    root, _ = grid
    assert load_script().main([str(root)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("| run | attn | optim | optim.lr | seeds | final val loss | best val loss")
    assert len(lines) == 2 + 4
    assert "| attn=naive,optim=adamw,seed=* | naive_attention | AdamW |" in lines[3]
    # final (2.3, 2.1) and best (2.2, 2.0): mean ± sample std
    assert "| 2.2000 ± 0.1414 | 2.1000 ± 0.1414 | 100 | 1050 | 50.0 | 60.5 | completed |" in lines[3]


def test_csv_and_json_parse_back(grid, capsys):
    root, _ = grid
    script = load_script()
    assert script.main([str(root), "--csv"]) == 0
    table = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert len(table) == 4
    grouped = next(r for r in table if r["n"] == "2")
    assert grouped["attn"] == "naive_attention" and grouped["seeds"] == "0 1"
    assert float(grouped["best_val_loss"]) == pytest.approx(2.1)
    assert float(grouped["best_val_loss_std"]) == pytest.approx(np.std([2.2, 2.0], ddof=1))
    assert next(r for r in table if r["n"] == "1")["best_val_loss_std"] == ""

    assert script.main([str(root), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["keys"] == ["attn", "optim", "optim.lr"]
    assert [r["run"] for r in data["rows"]] == [r["run"] for r in table]
    assert data["rows"][1]["runs"] == ["attn=naive,optim=adamw,seed=0", "attn=naive,optim=adamw,seed=1"]
    assert data["rows"][1]["final_val_loss"] == pytest.approx(2.2)


OPTIM_GROUP = {  # resolved optim nodes of two group options, with learning_rate: ${optim.lr}
    "adamw": {"_target_": "trainer.optim.AdamW", "lr": 1e-3, "betas": [0.9, 0.99], "weight_decay": 0.1},
    "sgd": {"_target_": "trainer.optim.SGD", "lr": 0.3, "momentum": 0.9, "weight_decay": 0.0},
}


def optim_run(root, name, optim, lr=None, seed=0, max_iters=100, extra=()):
    config = make_config(seed=seed, max_iters=max_iters)
    config["optim"] = dict(OPTIM_GROUP[optim], **({"lr": lr} if lr else {}))
    config["learning_rate"] = config["optim"]["lr"]
    overrides = [f"optim={optim}", *extra]
    choices = {"model": "nano", "optim": optim, "attn": "naive", "data": "text"}
    return make_run(root, name, config, {"val/loss": val_curve([2.0])}, done(overrides=overrides),
                    choices=choices, overrides=overrides)


def test_group_choice_folds_the_keys_it_explains(tmp_path, capsys):
    root = tmp_path / "runs"
    optim_run(root, "optim=adamw", "adamw")
    optim_run(root, "optim=sgd", "sgd")
    groups, rows, keys = cmp.compare(root)
    assert keys == ["optim"]  # not optim.lr, optim.betas, optim.momentum, learning_rate, ...
    assert {r["run"]: r["config"]["optim"] for r in rows} == {"optim=adamw": "adamw", "optim=sgd": "sgd"}
    _, _, every = cmp.compare(root, all_keys=True)
    assert {"optim", "optim._target_", "optim.lr", "optim.betas", "optim.momentum", "learning_rate"} <= set(every)
    assert load_script().main([str(root), "--all-keys"]) == 0
    header = capsys.readouterr().out.splitlines()[0]
    cells = header.strip("| ").split(" | ")
    assert "optim" in cells and "optim._target_" in cells and len(cells) == len(set(cells))

    # lr swept explicitly next to the choice, and max_iters differing without a choice: columns
    optim_run(root, "optim=adamw,optim.lr=0.003", "adamw", lr=3e-3, extra=["optim.lr=0.003"])
    optim_run(root, "optim=sgd,max_iters=50", "sgd", max_iters=50)
    _, rows, keys = cmp.compare(root)
    assert keys[0] == "optim" and sorted(keys[1:]) == ["max_iters", "optim.lr"]
    assert len(rows) == 4


def test_crashed_and_failed_runs_are_reported_not_averaged(tmp_path, capsys):
    root = tmp_path / "runs"
    config = make_config("naive", "adamw")
    make_run(root, "ok", config, {"val/loss": val_curve([3.0, 2.0, 1.5, 1.4])}, done())
    # Killed hard at step 37: summary still says "running", with start-of-run placeholders.
    killed = {"status": "running", "step": 0, "max_iters": 100, "tokens_per_sec": None}
    make_run(root, "killed", make_config("naive", "adamw", seed=1),
             {"val/loss": val_curve([0.5]), "train/loss": [(s, 3.0) for s in range(38)]}, killed)
    make_run(root, "failed", make_config("naive", "adamw", seed=2), {"train/loss": [(0, 3.0), (5, 9.0)]},
             done(status="failed", step=5, error="RuntimeError: boom", tokens_per_sec=None))
    make_run(root, "no_summary", make_config("naive", "adamw", seed=3), {"train/loss": [(0, 3.0), (3, 3.0)]})

    _, rows, _ = cmp.compare(root)
    assert len(rows) == 4  # nothing merged into the completed run, nothing dropped
    status = {r["run"]: r["status"] for r in rows}
    assert status == {"ok": "completed", "killed": "incomplete (step 37/100)",
                      "failed": "failed (step 5/100)", "no_summary": "incomplete (step 3/100)"}
    killed_row = next(r for r in rows if r["run"] == "killed")
    # placeholders from a "running" summary are not used; the events are
    assert killed_row["wall_time_s"] == pytest.approx(0.5 * 37)
    assert killed_row["best_val_loss"] == pytest.approx(0.5) and killed_row["n"] == 1

    assert load_script().main([str(root)]) == 0
    out = capsys.readouterr().out
    assert "| incomplete (step 37/100) |" in out and "| failed (step 5/100) |" in out


def test_different_tags_and_missing_val_loss(tmp_path, capsys):
    root = tmp_path / "runs"
    fp16 = make_config(precision={"name": "fp16"})
    make_run(root, "fp16", fp16, {"val/loss": val_curve([2.0]), "loss_scale": [(0, 65536.0)],
                                  "skipped_steps": [(0, 1.0)]}, done())
    # new_style=True logs scalars as tensors; they must be read the same
    make_run(root, "fp32", make_config(), {"val/loss": val_curve([2.7, 2.5])}, done(), new_style=True)
    make_run(root, "bf16", make_config(precision={"name": "bf16"}),
             {"train/loss": [(0, 3.0)], "memory/peak_bytes": [(0, 2.0**21), (5, 2.0**22)]},
             {"status": "running", "step": 0, "max_iters": 100})
    _, rows, keys = cmp.compare(root)
    assert keys == ["precision.name"]
    assert [r["run"] for r in rows] == ["fp16", "fp32", "bf16"]  # no val loss sorts last
    assert rows[1]["best_val_loss"] == pytest.approx(2.5) and rows[1]["final_val_loss"] == pytest.approx(2.5)
    assert rows[2]["peak_mem_mb"] == pytest.approx(4.0)  # from memory/peak_bytes events
    assert load_script().main([str(root)]) == 0
    bf16_line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| bf16"))
    assert bf16_line.split(" | ")[3:5] == ["-", "-"]  # final and best val loss


def test_nested_discovery_ignores_hydra_dirs(tmp_path):
    root = tmp_path / "runs"
    make_run(root / "multirun" / "2025-01-01_00-00-00", "attn=naive", make_config(), {}, done())
    make_run(root, "2025-01-02_00-00-00_default", make_config("sdpa"), {}, done())
    (root / "multirun" / "2025-01-01_00-00-00" / "multirun.yaml").write_text("hydra: {}\n")
    runs = cmp.load_runs(root)
    assert sorted(r.rel for r in runs) == ["2025-01-02_00-00-00_default",
                                           "multirun/2025-01-01_00-00-00/attn=naive"]
    # the root itself can be a run
    (single,) = cmp.load_runs(root / "2025-01-02_00-00-00_default")
    assert single.rel == "2025-01-02_00-00-00_default"


def test_empty_and_missing_dirs_exit_2(tmp_path, capsys):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    script = load_script()
    assert script.main([str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err.strip()
    assert "no runs found under" in err and len(err.splitlines()) == 1
    assert script.main([str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
    # the real command line, exit status included
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "compare.py"), str(tmp_path / "empty")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [err]


def test_plots_are_png(grid, tmp_path, capsys):
    root, _ = grid
    make_run(root, "no_val_yet", make_config(), {"train/loss": [(0, 3.0)]}, {"status": "running"})
    plots = tmp_path / "plots"
    assert load_script().main([str(root), "--plot-dir", str(plots)]) == 0
    names = sorted(p.name for p in plots.iterdir())
    assert names == ["throughput_memory.png", "val_loss_vs_step.png", "val_loss_vs_time.png"]
    for name in names:
        data = (plots / name).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 5000


def test_elapsed_time_is_relative_to_run_start(grid):
    root, curves = grid
    groups, _, _ = cmp.compare(root)
    group = next(g for g in groups if len(g.runs) == 2)
    steps, times, losses = _aligned(group)
    np.testing.assert_array_equal(steps, [25, 50, 75, 100])
    # fabricated events start at step 0 (train/loss) and advance 0.5 s per step
    np.testing.assert_allclose(times, np.tile(0.5 * steps, (2, 1)))
    np.testing.assert_allclose(losses, [curves[("naive", "adamw", s)] for s in (0, 1)])


def test_missing_matplotlib_is_one_clear_line(grid, tmp_path, monkeypatch, capsys):
    root, _ = grid
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    assert load_script().main([str(root), "--plot-dir", str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err
    assert err.strip().endswith("matplotlib is not installed: pip install -e '.[plot]'")
    assert len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_real_two_by_two_sweep(tmp_path, capsys):
    text = tmp_path / "corpus.txt"
    text.write_text("To be, or not to be, that is the question:\n" * 200)
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, str(REPO / "scripts" / "train.py"), "-m", "attn=naive,sdpa", "optim=adamw,sgd",
           "max_iters=4", "eval_interval=2", "eval_iters=1", "log_interval=1", "batch_size=2",
           "model.n_layer=1", "model.n_embd=32", "model.n_head=2", "block_size=16", "data=text",
           f"data.path={text}", f"hydra.sweep.dir={sweep}", "sample_tokens=0"]
    env = {**os.environ, "GPTLAB_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]

    plots = tmp_path / "plots"
    assert load_script().main([str(sweep), "--json", "--plot-dir", str(plots)]) == 0
    data = json.loads(capsys.readouterr().out)
    rows = data["rows"]
    assert data["keys"] == ["attn", "optim"]
    assert sorted((r["config"]["attn"], r["config"]["optim"]) for r in rows) == [
        ("naive", "adamw"), ("naive", "sgd"), ("sdpa", "adamw"), ("sdpa", "sgd")]
    assert len({r["run"] for r in rows}) == 4  # four run directories, none shared
    for row in rows:
        assert row["status"] == "completed" and row["n"] == 1
        assert row["best_val_loss"] is not None and np.isfinite(row["best_val_loss"])
        assert row["best_val_loss"] <= row["final_val_loss"]
        assert row["steps"] is not None and row["tokens_per_sec"] > 0 and row["wall_time_s"] > 0
    assert [r["best_val_loss"] for r in rows] == sorted(r["best_val_loss"] for r in rows)
    for name in ("val_loss_vs_step.png", "val_loss_vs_time.png", "throughput_memory.png"):
        assert (plots / name).read_bytes()[:8] == PNG_MAGIC

    assert load_script().main([str(sweep)]) == 0
    table = capsys.readouterr().out.strip().splitlines()
    assert len(table) == 2 + 4


@pytest.mark.parametrize("experiment, group, options", [
    ("optimizers", "optim", ["sgd", "adam", "adamw", "lion"]),
    ("precision", "precision", ["fp32", "bf16", "fp16"]),
])
def test_experiment_configs_sweep_existing_options(experiment, group, options):
    from hydra import compose, initialize_config_dir

    from trainer.config import register_resolvers

    register_resolvers()
    text = (REPO / "configs" / "experiment" / f"{experiment}.yaml").read_text()
    assert text.startswith("# @package _global_\n")
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=[f"+experiment={experiment}", "max_iters=7"],
                      return_hydra_config=True)
    assert cfg.hydra.sweeper.params == {group: ",".join(options)}
    assert cfg.max_iters == 7  # run size stays an ordinary, overridable top-level key
    for option in options:
        assert (REPO / "configs" / group / f"{option}.yaml").is_file()

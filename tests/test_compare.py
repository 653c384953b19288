"""Tests for trainer/analysis/runs.py and scripts/compare.py on run directories fabricated with the
trainer's contract (config.yaml, summary.json, TensorBoard events), plus one real tiny sweep."""
from __future__ import annotations

import copy
import csv
import importlib.util
import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams

from trainer.analysis import runs as cmp
from trainer.analysis.report import compare
from trainer.analysis.plots import _aligned

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
OPTIM = {"adamw": ("trainer.optim.adamw.AdamW", 1e-3), "sgd": ("trainer.optim.sgd.SGD", 1e-1),
         "lion": ("trainer.optim.lion.Lion", 1e-4)}


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


def choices_of(config: dict) -> dict:
    """Hydra's group choices for a config made by make_config (as .hydra/hydra.yaml records them)."""
    attn = {v: k for k, v in ATTN.items()}.get(config["attn"]["_target_"], "custom")
    optim = {v[0]: k for k, v in OPTIM.items()}.get(config["optim"]["_target_"], "custom")
    return {"model": "nano", "attn": attn, "optim": optim, "data": "text",
            "precision": config["precision"]["name"]}


def make_run(root: Path, name: str, config: dict | None, scalars: dict[str, list[tuple[int, float]]],
             summary: dict | None = None, seconds_per_step: float = 0.5, overrides: list[str] = (),
             choices: dict | None = None) -> Path:
    """A run dir exactly as scripts/train.py writes it: config.yaml, summary.json (with the
    overrides), .hydra/{config,hydra,overrides}.yaml and TensorBoard events; scalars are
    {tag: [(step, value)]} at fabricated times."""
    run = root / name
    run.mkdir(parents=True)
    (run / ".hydra").mkdir()
    (run / ".hydra" / "config.yaml").write_text("not: a run\n")  # must not be found as a run
    if config is not None:
        hydra_choices = {"hydra/launcher": "basic", "hydra/sweeper": "basic",  # Hydra's own groups too
                         **(choices if choices is not None else choices_of(config))}
        (run / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump(
            {"hydra": {"run": {"dir": "runs/${now:%Y}"}, "runtime": {"choices": hydra_choices}}}))
        (run / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(list(overrides)))
    writer = SummaryWriter(log_dir=str(run))
    # the trainer also logs text samples and hparams; these are tensors that are not scalars
    writer.add_text("sample", "    To be", 0)
    for s in hparams({"lr": 1e-3, "attn": "naive"}, {"val/loss": float("nan")}):
        writer.file_writer.add_summary(s)
    for tag, points in scalars.items():
        for step, value in points:
            writer.add_scalar(tag, value, step, walltime=T0 + seconds_per_step * step)
    writer.close()
    if summary is not None:
        (run / "summary.json").write_text(json.dumps({**summary, "overrides": list(overrides)}))
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
        config = make_config(attn, optim, seed)
        overrides = [f"attn={attn}", f"optim={optim}", f"seed={seed}"]  # as `-m attn=... optim=... seed=...`
        name = ",".join(overrides)
        scalars = {"val/loss": val_curve(losses), "train/loss": [(s, 3.0) for s in range(0, 101, 10)],
                   "tokens_per_sec": [(s, 900.0 + seed * 100) for s in range(0, 101, 10)]}
        make_run(root, name, config, scalars, done(tokens_per_sec=1000.0 + 100 * seed,
                                                   wall_time_s=60.0 + seed), overrides=overrides)
    return root, curves


def test_grid_groups_seeds_and_matches_numpy(grid):
    root, curves = grid
    groups, rows, keys = compare(root)
    assert keys == ["attn", "optim"]  # the overridden keys that vary; seed is the replicate axis
    assert len(rows) == 4
    grouped = next(r for r in rows if r["n"] == 2)
    assert grouped["run"] == "attn=naive,optim=adamw,seed=*"
    assert grouped["runs"] == ["attn=naive,optim=adamw,seed=0", "attn=naive,optim=adamw,seed=1"]
    assert grouped["seeds"] == [0, 1]
    assert grouped["config"] == {"attn": "naive", "optim": "adamw"}
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
    assert lines[0] == ("| run | attn | optim | seeds | final val loss | best val loss | steps | tokens/s "
                        "| peak mem (MiB) | wall time (s) | status |")  # no bpb or MFU logged: no columns
    assert len(lines) == 2 + 4
    assert "| attn=naive,optim=adamw,seed=* | naive | adamw | 0,1 |" in lines[3]
    # final (2.3, 2.1) and best (2.2, 2.0): mean ± sample std
    assert "| 2.2000 ± 0.1414 | 2.1000 ± 0.1414 | 100 | 1050 | 50.0 | 60.5 | completed |" in lines[3]


def test_csv_and_json_parse_back(grid, capsys):
    root, _ = grid
    script = load_script()
    assert script.main([str(root), "--csv"]) == 0
    table = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert len(table) == 4
    grouped = next(r for r in table if r["n"] == "2")
    assert grouped["attn"] == "naive" and grouped["seeds"] == "0 1"
    assert float(grouped["best_val_loss"]) == pytest.approx(2.1)
    assert float(grouped["best_val_loss_std"]) == pytest.approx(np.std([2.2, 2.0], ddof=1))
    assert next(r for r in table if r["n"] == "1")["best_val_loss_std"] == ""

    assert script.main([str(root), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["keys"] == ["attn", "optim"]
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
    overrides = [f"optim={optim}", "eval_interval=25", f"seed={seed}", *extra]
    choices = {"model": "nano", "optim": optim, "attn": "naive", "data": "text"}
    return make_run(root, name, config, {"val/loss": val_curve([2.0])}, done(), choices=choices,
                    overrides=overrides)


def test_columns_are_the_overrides_that_vary(tmp_path, capsys):
    root = tmp_path / "runs"
    optim_run(root, "optim=adamw", "adamw")
    optim_run(root, "optim=sgd", "sgd", seed=1)
    groups, rows, keys = compare(root)
    # not optim.lr, optim.betas, learning_rate ... (consequences of the choice), nor eval_interval
    # (the same in every run), nor seed (the replicate axis)
    assert keys == ["optim"]
    assert {r["run"]: r["config"]["optim"] for r in rows} == {"optim=adamw": "adamw", "optim=sgd": "sgd"}
    _, _, every = compare(root, all_keys=True)
    assert {"optim", "optim._target_", "optim.lr", "optim.betas", "optim.momentum", "learning_rate"} <= set(every)
    assert load_script().main([str(root), "--all-keys"]) == 0
    header = capsys.readouterr().out.splitlines()[0]
    cells = header.strip("| ").split(" | ")
    assert "optim" in cells and "optim._target_" in cells and len(cells) == len(set(cells))

    # lr overridden in one run and max_iters in another: columns, with every run's own value
    optim_run(root, "optim=adamw,optim.lr=0.003", "adamw", lr=3e-3, extra=["optim.lr=0.003"])
    optim_run(root, "optim=sgd,max_iters=50", "sgd", max_iters=50, extra=["max_iters=50"])
    _, rows, keys = compare(root)
    assert keys == ["optim", "optim.lr", "max_iters"]
    assert len(rows) == 4
    settings = sorted(tuple(r["config"].values()) for r in rows)
    assert settings == [("adamw", 0.001, 100), ("adamw", 0.003, 100), ("sgd", 0.3, 50), ("sgd", 0.3, 100)]


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

    _, rows, _ = compare(root)
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
                                  "skipped_steps": [(0, 1.0)]}, done(), overrides=["precision=fp16"])
    make_run(root, "fp32", make_config(), {"val/loss": val_curve([2.7, 2.5])}, done())  # the default
    make_run(root, "bf16", make_config(precision={"name": "bf16"}),
             {"train/loss": [(0, 3.0)], "memory/peak_bytes": [(0, 2.0**21), (5, 2.0**22)]},
             {"status": "running", "step": 0, "max_iters": 100}, overrides=["precision=bf16"])
    _, rows, keys = compare(root)
    assert keys == ["precision"]  # the run without the override shows its group choice: fp32
    assert [r["config"]["precision"] for r in rows] == ["fp16", "fp32", "bf16"]
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
    groups, _, _ = compare(root)
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


# ------------------------------------------------------------------ --best-by, --baseline, --target

# (optim, lr, seed) -> val loss at steps 25, 50, 75, 100. Each optimizer's best lr has 3 seeds
# (sgd's only 1); adamw's seed 1 and sgd's best never reach the target 1.96.
LR_SWEEP = {
    ("adamw", 1e-3, 0): [3.0, 2.2, 1.95, 1.90],
    ("adamw", 1e-3, 1): [3.0, 2.3, 2.05, 1.97],
    ("adamw", 1e-3, 2): [3.0, 1.99, 1.95, 1.91],
    ("adamw", 3e-3, 0): [3.0, 2.2, 2.0, 1.95],   # lowest single final of adamw, but one seed of 1.95
    ("adamw", 3e-4, 0): [3.0, 2.5, 2.2, 2.05],
    ("sgd", 0.1, 0): [3.0, 2.6, 2.3, 2.1],
    ("sgd", 0.3, 0): [3.0, 2.4, 2.1, 1.97],
    ("lion", 1e-4, 0): [3.0, 2.0, 1.9, 1.80],
    ("lion", 1e-4, 1): [3.0, 2.1, 1.9, 1.81],
    ("lion", 1e-4, 2): [3.0, 2.1, 1.85, 1.79],
    ("lion", 3e-4, 0): [3.0, 2.2, 2.0, 1.85],
    ("lion", 3e-4, 1): [3.0, 2.2, 2.0, 1.84],
    ("lion", 3e-4, 2): [3.0, 2.2, 2.0, 1.86],
}
TOKENS_PER_STEP = BASE["batch_size"] * BASE["block_size"] * BASE["gradient_accumulation_steps"]


@pytest.fixture
def lr_sweep(tmp_path):
    return write_lr_sweep(tmp_path / "lr_sweep")


def write_lr_sweep(root: Path) -> Path:
    for (optim, lr, seed), losses in LR_SWEEP.items():
        config = make_config(optim=optim, seed=seed, learning_rate=lr)
        config["optim"]["lr"] = lr
        overrides = [f"optim={optim}", f"optim.lr={lr}", f"seed={seed}"]
        make_run(root, ",".join(overrides), config,
                 {"val/loss": val_curve(losses), "train/loss": [(0, 3.2)]}, done(), overrides=overrides)
    # lr 1 made sgd diverge: the trainer stopped it at step 40
    overrides = ["optim=sgd", "optim.lr=1.0", "seed=0"]
    config = make_config(optim="sgd", learning_rate=1.0)
    config["optim"]["lr"] = 1.0
    make_run(root, ",".join(overrides), config, {"val/loss": val_curve([3.0]), "train/loss": [(0, 3.2)]},
             done(status="diverged", step=40, final_val_loss=None), overrides=overrides)
    return root


def losses_at(optim, lr):
    """Final losses as TensorBoard stores them (float32)."""
    return [float(np.float32(curve[-1])) for (o, l, _), curve in LR_SWEEP.items() if (o, l) == (optim, lr)]


def test_best_by_picks_each_components_best_lr(lr_sweep):
    from trainer.analysis.report import report
    from trainer.analysis.stats import welch_t_test

    runs = cmp.load_runs(lr_sweep)
    keys = cmp.table_keys(runs)
    assert keys == ["optim", "optim.lr"]
    groups, rows, notes = report(cmp.group_runs(runs, keys), keys, best_by="optim",
                                 baseline="optim=adamw", target=1.96)
    # by mean final val loss: adamw at 1e-3 (mean 1.927) beats 3e-3 (one seed at 1.95)
    assert [(r["config"]["optim"], r["lr"], r["n"]) for r in rows] == [
        ("lion", 1e-4, 3), ("adamw", 1e-3, 3), ("sgd", 0.3, 1)]
    assert [g.runs[0].value("optim") for g in groups] == ["lion", "adamw", "sgd"]
    lion, adamw, sgd = rows
    for row, (optim, lr) in zip(rows, [("lion", 1e-4), ("adamw", 1e-3), ("sgd", 0.3)]):
        finals = losses_at(optim, lr)
        assert row["final_val_loss"] == pytest.approx(np.mean(finals))
        assert row["seeds"] == list(range(len(finals)))
    assert lion["final_val_loss_std"] == pytest.approx(np.std(losses_at("lion", 1e-4), ddof=1))
    assert sgd["final_val_loss_std"] is None

    # Welch's test on the per-seed final losses; no p-value for the baseline or a single seed
    expected = welch_t_test(losses_at("lion", 1e-4), losses_at("adamw", 1e-3))[2]
    assert 0 < expected < 0.05
    assert lion["p_value"] == pytest.approx(expected) and lion["p_value_note"] is None
    assert (adamw["p_value"], adamw["p_value_note"]) == (None, "baseline")
    assert (sgd["p_value"], sgd["p_value_note"]) == (None, "1 seed")
    # the difference of the means, for every row with a finished run (a leave-one-out table's Δ)
    assert lion["delta_val_loss"] == pytest.approx(np.mean(losses_at("lion", 1e-4)) - np.mean(losses_at("adamw", 1e-3)))
    assert (adamw["delta_val_loss"], adamw["delta_val_loss_note"]) == (None, "baseline")
    assert sgd["delta_val_loss"] == pytest.approx(1.97 - np.mean(losses_at("adamw", 1e-3)))

    # first eval at or below 1.96: adamw seeds 0 and 2 at step 75, seed 1 never; lion 75, 75, 75
    assert adamw["target_reached"] == "2/3" and adamw["steps_to_target"] == pytest.approx(75)
    assert adamw["tokens_to_target"] == pytest.approx(75 * TOKENS_PER_STEP)
    assert adamw["time_to_target_s"] == pytest.approx(0.5 * 75)  # run start: the step-0 event
    assert lion["target_reached"] == "3/3" and lion["steps_to_target"] == pytest.approx(75)
    assert sgd["target_reached"] == "0/1" and sgd["steps_to_target"] is None
    never = [n for n in notes if n.startswith("never reached val loss 1.96")]
    assert never == ["never reached val loss 1.96: optim=adamw, optim.lr=0.001, seed=1 (best 1.9700)",
                     "never reached val loss 1.96: optim=sgd, optim.lr=0.3, seed=0 (best 1.9700)"]
    assert any("optim=sgd, optim.lr=1, seed=0 (diverged (step 40/100))" in n for n in notes)
    assert any("(adamw: 3, lion: 2, sgd: 2)" in n for n in notes)  # settings tried per optimizer


def test_best_by_table_csv_json_and_lr_plot(lr_sweep, tmp_path, capsys):
    script = load_script()
    args = [str(lr_sweep), "--best-by", "optim", "--baseline", "optim=adamw", "--target", "1.96"]
    assert script.main(args + ["--plot-dir", str(tmp_path / "plots")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == ("| run | optim | optim.lr | seeds | n | lr | final val loss | best val loss "
                      "| Δ val vs optim=adamw | p vs optim=adamw | reached 1.96 | steps to 1.96 | tokens to 1.96 | time to 1.96 (s) "
                      "| steps | tokens/s | peak mem (MiB) | wall time (s) | status |")
    lion, adamw, sgd = out[2:5]
    assert lion.startswith("| optim=lion,optim.lr=0.0001,seed=* | lion | 0.0001 | 0,1,2 | 3 | 0.0001 "
                           "| 1.8000 ± 0.0100 |")
    assert "| baseline | baseline | 2/3 | 75 | 2400 | 37.5 |" in adamw
    assert "| 1.9700 | 1.9700 | +0.0433 | 1 seed | 0/1 | - | - | - |" in sgd  # 1.97 minus adamw 1e-3's mean
    assert out[5] == "" and all(line.startswith("- ") for line in out[6:])
    assert "Welch" in out[6]
    png = (tmp_path / "plots" / "lr_sensitivity.png").read_bytes()
    assert png[:8] == PNG_MAGIC and len(png) > 5000

    assert script.main(args + ["--csv"]) == 0
    captured = capsys.readouterr()
    header = captured.out.splitlines()[0].split(",")
    assert len(header) == len(set(header)) and header[3:6] == ["n", "seeds", "lr"]
    table = list(csv.DictReader(io.StringIO(captured.out)))
    assert [r["optim"] for r in table] == ["lion", "adamw", "sgd"]
    assert float(table[0]["p_value"]) < 0.05 and table[1]["p_value_note"] == "baseline"
    assert table[1]["target_reached"] == "2/3" and float(table[1]["tokens_to_target"]) == 2400
    assert "never reached val loss 1.96" in captured.err  # notes stay out of the CSV

    assert script.main(args + ["--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["best_by"] == "optim" and data["target"] == 1.96 and len(data["notes"]) == 5
    assert [r["lr"] for r in data["rows"]] == [1e-4, 1e-3, 0.3]


def test_baseline_without_best_by_and_bad_flags(lr_sweep, capsys):
    script = load_script()
    assert script.main([str(lr_sweep), "--baseline", "optim.lr=0.1"]) == 0  # one row matches: sgd's
    lines = capsys.readouterr().out.splitlines()
    assert "p vs optim.lr=0.1" in lines[0]
    assert sum("| baseline |" in line for line in lines) == 1
    # the rows with 3 seeds (adamw 1e-3, lion 1e-4 and 3e-4) are told why they have no p-value
    assert sum("| baseline: 1 seed |" in line for line in lines) == 3
    for bad, message in [
        (["--best-by", "optimizer"], "--best-by optimizer: no run has a setting 'optimizer'"),
        (["--baseline", "adamw"], "--baseline takes key=value (e.g. optim=adamw), got 'adamw'"),
        (["--best-by", "optim", "--baseline", "optim=nadam"], "--baseline optim=nadam matches no row"),
        (["--baseline", "optim=adamw"], "matches 3 rows (use --best-by optim)"),
    ]:
        assert script.main([str(lr_sweep), *bad]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err


def test_best_by_names_a_component_with_no_completed_run(tmp_path, capsys):
    root = tmp_path / "runs"
    for optim, status in [("adamw", "completed"), ("sgd", "diverged")]:
        overrides = [f"optim={optim}"]
        make_run(root, overrides[0], make_config(optim=optim), {"val/loss": val_curve([3.0, 2.5])},
                 done(status=status, step=50), overrides=overrides)
    assert load_script().main([str(root), "--best-by", "optim", "--target", "2.0"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 + 1 + 1 + 4 and lines[2].startswith("| optim=adamw | adamw |")
    assert lines[-3:] == ["- not considered (no finite final val loss): optim=sgd, seed=0 "
                          "(diverged (step 50/100))", "- no completed run for optim = sgd",
                          "- never reached val loss 2.0: optim=adamw, seed=0 (best 2.5000)"]


def test_bpb_and_mfu_columns_only_when_logged(tmp_path, capsys):
    root = tmp_path / "runs"
    make_run(root, "old", make_config(), {"val/loss": val_curve([2.5, 2.4])}, done())
    make_run(root, "new", make_config("sdpa"),
             {"val/loss": val_curve([2.3, 2.2]), "val/bpb": val_curve([3.3, 3.1]), "mfu": [(10, 0.3), (20, 0.4)]},
             done(final_val_bpb=3.1, best_val_bpb=3.1, mfu=0.25), overrides=["attn=sdpa"])
    # a run still going: numbers from its curves (the summary's are placeholders)
    make_run(root, "running", make_config("sdpa", seed=1),
             {"val/loss": val_curve([2.6]), "val/bpb": val_curve([3.6]), "mfu": [(10, 0.3), (20, 0.4)]},
             {"status": "running", "step": 0, "mfu": None, "final_val_bpb": None}, overrides=["attn=sdpa"])
    # the data pipeline's summary key for the last eval's bpb is val_bpb: read as the final one
    make_run(root, "new_no_events", make_config("sdpa", max_iters=50), {}, done(val_bpb=3.0, best_val_bpb=2.9),
             overrides=["attn=sdpa", "max_iters=50"])
    _, rows, _ = compare(root)
    assert rows[-1]["run"] == "new_no_events"  # no val loss: last
    assert (rows[-1]["final_val_bpb"], rows[-1]["best_val_bpb"]) == (3.0, 2.9)
    new, old, running = rows[:3]
    assert new["final_val_bpb"] == pytest.approx(3.1) and new["best_val_bpb"] == pytest.approx(3.1)
    assert new["mfu"] == 0.25  # the summary's number wins over the curve's mean (0.35)
    assert (old["final_val_bpb"], old["best_val_bpb"], old["mfu"]) == (None, None, None)
    assert running["final_val_bpb"] == pytest.approx(3.6) and running["mfu"] == pytest.approx(0.35)
    assert load_script().main([str(root)]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = lines[0].strip("| ").split(" | ")
    bpb = header.index("final val bpb")
    assert header[bpb - 2:bpb + 4] == ["final val loss", "best val loss", "final val bpb", "best val bpb", "steps",
                                       "tokens/s"] and "MFU (%)" in header
    cells = {line.split(" | ")[0].strip("| "): line.strip("| ").split(" | ") for line in lines[2:6]}
    mfu = header.index("MFU (%)")
    assert cells["new"][bpb:bpb + 2] == ["3.1000", "3.1000"] and cells["new"][mfu] == "25.0"
    assert cells["old"][bpb:bpb + 2] == ["-", "-"] and cells["old"][mfu] == "-"


# ------------------------------------------------------------------------- Student t and Welch


@pytest.mark.parametrize("a, b", [(0.5, 3.0), (2.0, 7.5), (40.0, 0.5)])
@pytest.mark.parametrize("x", [0.01, 0.3, 0.7, 0.995])
def test_betainc_closed_forms(a, b, x):
    from trainer.analysis.stats import betainc

    # I_x(a, 1) = x^a and I_x(1, b) = 1 - (1 - x)^b; both branches (x below and above (a+1)/(a+b+2))
    assert betainc(a, 1.0, x) == pytest.approx(x**a, rel=1e-12)
    assert betainc(1.0, b, x) == pytest.approx(1 - (1 - x) ** b, rel=1e-12)
    assert betainc(a, a, 0.5) == pytest.approx(0.5, rel=1e-12)  # symmetry
    assert betainc(a, b, x) + betainc(b, a, 1 - x) == pytest.approx(1.0, abs=1e-12)  # I_x(a,b) = 1 - I_1-x(b,a)


@pytest.mark.parametrize("t", [0.0, 0.1, -0.7, 1.0, 2.5, -12.0, 300.0])
def test_t_p_value_closed_forms(t):
    from trainer.analysis.stats import t_two_sided_p

    # df = 1 is the Cauchy distribution, df = 2 has a closed-form CDF
    assert t_two_sided_p(t, 1) == pytest.approx(1 - 2 / np.pi * np.arctan(abs(t)), rel=1e-12)
    assert t_two_sided_p(t, 2) == pytest.approx(1 - abs(t) / np.sqrt(2 + t * t), rel=1e-12)
    # the normal limit (t's tail is heavier by a relative ~t^4 / (4 df))
    assert t_two_sided_p(t, 1e7) == pytest.approx(math.erfc(abs(t) / math.sqrt(2)), rel=1e-3, abs=1e-300)


@pytest.mark.parametrize("df, t, p", [  # published two-sided critical values of Student's t
    (1, 12.706, 0.05), (2, 4.303, 0.05), (3, 5.841, 0.01), (5, 2.571, 0.05), (10, 2.228, 0.05),
    (10, 3.169, 0.01), (20, 2.086, 0.05), (30, 2.750, 0.01), (120, 1.980, 0.05), (4, 8.610, 0.001),
])
def test_t_p_value_matches_t_tables(df, t, p):
    from trainer.analysis.stats import t_two_sided_p

    assert t_two_sided_p(t, df) == pytest.approx(p, rel=2e-3)  # tables give t to 4 digits


def test_welch_t_test_closed_form_and_undefined_cases():
    from trainer.analysis.stats import welch_t_test

    # equal sizes and variances: df = 2 (n - 1) = 2, where the p-value has a closed form
    t, df, p = welch_t_test([0.0, 2.0], [1.0, 3.0])
    assert t == pytest.approx(-1 / np.sqrt(2)) and df == pytest.approx(2.0)
    assert p == pytest.approx(1 - abs(t) / np.sqrt(2 + t * t))
    # unequal variances: t and the Welch–Satterthwaite df from numpy's sample variances
    a, b = np.array([1.0, 2.0, 3.0, 4.0]), np.array([10.0, 10.5])
    sa, sb = a.var(ddof=1) / a.size, b.var(ddof=1) / b.size
    t, df, p = welch_t_test(list(a), list(b))
    assert t == pytest.approx((a.mean() - b.mean()) / np.sqrt(sa + sb))
    assert df == pytest.approx((sa + sb) ** 2 / (sa**2 / (a.size - 1) + sb**2 / (b.size - 1)))
    assert 0 < p < 1e-3
    with pytest.raises(ValueError, match="at least 2 values"):
        welch_t_test([1.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="zero variance"):
        welch_t_test([1.0, 1.0], [2.0, 2.0])


def test_welch_t_test_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    from trainer.analysis.stats import welch_t_test

    rng = np.random.default_rng(0)
    for _ in range(50):
        a, b = rng.normal(0, 1, rng.integers(2, 9)), rng.normal(0.5, 3, rng.integers(2, 9))
        ref = stats.ttest_ind(a, b, equal_var=False)
        t, _, p = welch_t_test(list(a), list(b))
        assert t == pytest.approx(ref.statistic, rel=1e-10) and p == pytest.approx(ref.pvalue, rel=1e-8)



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
        # the trainer logs val/bpb: on ASCII text with one token per character, bits per byte is
        # the val loss (nats per token) over ln 2
        assert row["final_val_bpb"] == pytest.approx(row["final_val_loss"] / math.log(2), rel=1e-3)
    assert [r["best_val_loss"] for r in rows] == sorted(r["best_val_loss"] for r in rows)
    for name in ("val_loss_vs_step.png", "val_loss_vs_time.png", "throughput_memory.png"):
        assert (plots / name).read_bytes()[:8] == PNG_MAGIC

    assert load_script().main([str(sweep)]) == 0
    table = capsys.readouterr().out.strip().splitlines()
    assert len(table) == 2 + 4 and "| final val bpb | best val bpb |" in table[0]


@pytest.mark.parametrize("experiment, group, options", [
    ("optimizers", "optim", None),  # the preset names none by hand: every configs/optim/*.yaml
    ("precision", "precision", ["fp32", "bf16", "fp16"]),
])
def test_experiment_configs_sweep_existing_options(experiment, group, options):
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from hydra import compose, initialize_config_dir

    import trainer.config  # noqa: F401  (registers the ${run_name:} resolver)

    text = (REPO / "configs" / "experiment" / f"{experiment}.yaml").read_text()
    assert text.startswith("# @package _global_\n")
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=[f"+experiment={experiment}", "max_iters=7"],
                      return_hydra_config=True)
    every = sorted(p.stem for p in (REPO / "configs" / group).glob("*.yaml"))
    swept = OverridesParser.create().parse_override(f"{group}={cfg.hydra.sweeper.params[group]}").value()
    if options is None:
        assert swept.filter(every) == every and {"sgd", "adamw", "lion", "muon"} <= set(every)
        options = every
    else:
        assert cfg.hydra.sweeper.params == {group: ",".join(options)}
    assert cfg.max_iters == 7  # run size stays an ordinary, overridable top-level key
    for option in options:
        assert (REPO / "configs" / group / f"{option}.yaml").is_file()


def test_delta_plot_rows_are_welch_differences_and_the_png_is_written(lr_sweep, tmp_path):
    """The leave-one-out plot: each row's mean final loss minus the baseline's, its standard error
    sqrt(s_a^2/n_a + s_b^2/n_b) and Welch's p."""
    from trainer.analysis.plots import delta_rows
    from trainer.analysis.report import find_baseline, report
    from trainer.analysis.stats import welch_t_test

    runs = cmp.load_runs(lr_sweep)
    keys = cmp.table_keys(runs)
    groups, _, _ = report(cmp.group_runs(runs, keys), keys, best_by="optim")
    base = find_baseline(groups, "optim=adamw")
    rows = delta_rows(groups, keys, base)
    a, b = np.array(losses_at("lion", 1e-4)), np.array(losses_at("adamw", 1e-3))
    assert len(rows) == 2 and rows[0][0] == pytest.approx(a.mean() - b.mean())  # lion first: most negative
    assert rows[0][1] == pytest.approx(math.sqrt(a.var(ddof=1) / 3 + b.var(ddof=1) / 3))
    assert rows[0][2] == pytest.approx(welch_t_test(list(a), list(b))[2])
    assert rows[1][0] == pytest.approx(losses_at("sgd", 0.3)[0] - b.mean()) and rows[1][1] == 0.0  # one seed
    plots = tmp_path / "plots"
    assert load_script().main([str(lr_sweep), "--best-by", "optim", "--baseline", "optim=adamw",
                               "--plot-dir", str(plots)]) == 0
    assert (plots / "delta_vs_baseline.png").read_bytes()[:8] == PNG_MAGIC

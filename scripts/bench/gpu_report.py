#!/usr/bin/env python
"""Turn gpu_check.sh's raw outputs into one JSON file of figures and one markdown table file.

    python scripts/bench/gpu_report.py gpu_check            # reads gpu_check/*, writes gpu_check/gpu_results.{json,md}

Reads, from the folder (each optional; what is missing is reported as missing, never made up):
- ``env.json``: date, gpu, torch, triton (written by gpu_check.sh's env stage);
- ``gpt2.jsonl``: bench_gpt2.py's rows (attn, compile, T, tokens_per_s, mfu, vs_sdpa, ...);
- ``overhead.json``: bench_attention.py --overhead's rows; ``host_python.txt``: its --host-python line;
- ``runs/recipe-*/summary.json`` (+ ``config.yaml``): the shakespeare_char recipe runs.

The JSON (committed later as docs/gpu/<date>_<gpu>.json) has top-level ``date``, ``gpu``, ``torch``,
``triton`` and ``rows``: one object per GPT-2 small variant (``attn``, ``compile``, ``T``,
``tokens_per_s``, ``mfu`` as a fraction) and per recipe run (``recipe``: shakespeare_char, ``attn``,
``seed``, ``val_loss``, ``wall_s``, ``tokens_per_s``); plus ``overhead`` (host overhead rows) and
``targets`` (each of issue 22's targets with the measured figure and whether it was met).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

# (name, how it is checked): each reads the rows and returns (measured, met) or None when missing
TARGETS = [
    ("GPT-2 small T=1024 compiled: flash MFU >= 45%", "mfu", dict(attn="flash", compile=True, T=1024), 0.45),
    ("GPT-2 small T=1024 compiled: flash tokens/s >= 1.00x sdpa", "vs_sdpa", dict(attn="flash", compile=True, T=1024), 1.00),
    ("GPT-2 small T=4096 compiled: flash tokens/s >= 1.15x sdpa", "vs_sdpa", dict(attn="flash", compile=True, T=4096), 1.15),
    ("GPT-2 small T=1024 eager: flash tokens/s >= 0.95x sdpa", "vs_sdpa", dict(attn="flash", compile=False, T=1024), 0.95),
]
OVERHEAD_TARGET_MS = 0.1
RECIPE_VAL_TARGET = 1.47


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def recipe_rows(folder: Path) -> list[dict]:
    rows = []
    for run in sorted((folder / "runs").glob("recipe-*")):
        summary = run / "summary.json"
        if not summary.is_file():
            rows.append({"recipe": "shakespeare_char", "run": run.name, "status": "no summary.json"})
            continue
        s = json.loads(summary.read_text())
        cfg = _config(run)
        rows.append({"recipe": "shakespeare_char", "run": run.name, "attn": _attn(cfg), "seed": cfg.get("seed"),
                     "compile": cfg.get("compile"), "val_loss": s.get("final_val_loss"), "wall_s": s.get("wall_time_s"),
                     "tokens_per_s": s.get("tokens_per_sec"), "steps": s.get("step"), "status": s.get("status")})
    return rows


def _config(run: Path) -> dict:
    path = run / "config.yaml"
    if not path.is_file():
        return {}
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(path))


def _attn(cfg: dict) -> str | None:
    target = (cfg.get("attn") or {}).get("_target_", "")
    return target.rsplit(".", 1)[-1].replace("_attention", "") or None


def find(rows: list[dict], **match) -> dict | None:
    hits = [r for r in rows if all(r.get(k) == v for k, v in match.items())]
    return hits[-1] if hits else None


def check_targets(rows: list[dict], overhead: list[dict]) -> list[dict]:
    out = []
    for name, key, match, bound in TARGETS:
        row = find(rows, **match)
        value = None if row is None else row.get(key)
        out.append({"target": name, "measured": value, "met": None if value is None else value >= bound})
    for row in overhead:
        if row.get("impl") == "flash":
            out.append({"target": f"eager flash fwd+bwd T={row['T']}: host overhead <= {OVERHEAD_TARGET_MS} ms",
                        "measured": row["overhead_ms"], "met": row["overhead_ms"] <= OVERHEAD_TARGET_MS})
    recipe = [r for r in rows if r.get("recipe") and r.get("val_loss") is not None]
    flash = [r for r in recipe if r.get("attn") == "flash"]
    out.append({"target": f"shakespeare_char recipe: flash bf16 val loss <= {RECIPE_VAL_TARGET}",
                "measured": flash[0]["val_loss"] if flash else None,
                "met": None if not flash else flash[0]["val_loss"] <= RECIPE_VAL_TARGET})
    sdpa = [r for r in recipe if r.get("attn") == "sdpa"]
    if flash and sdpa:
        same = [r for r in sdpa if r.get("seed") == flash[0].get("seed")]
        gap = abs(flash[0]["val_loss"] - (same or sdpa)[0]["val_loss"])
        noise = abs(sdpa[0]["val_loss"] - sdpa[1]["val_loss"]) if len(sdpa) > 1 else None
        out.append({"target": "recipe: |flash - sdpa| at the same seed within sdpa's seed-to-seed difference",
                    "measured": gap, "noise": noise, "met": None if noise is None else gap <= max(noise, 1e-3)})
    return out


def _fmt(x, pct=False) -> str:
    if x is None:
        return "missing"
    if isinstance(x, bool):
        return str(x).lower()
    if isinstance(x, float):
        return f"{x:.1%}" if pct else (f"{x:,.0f}" if abs(x) >= 1000 else f"{x:.4g}")
    return str(x)


def markdown(report: dict, host_line: str | None) -> str:
    lines = [f"# GPU check: {report['gpu']} ({report['date']}), torch {report['torch']}, triton {report['triton']}",
             "", "Produced by `bash scripts/bench/gpu_check.sh`; raw figures in gpu_results.json.", "",
             "## Targets (issue 22)", "", "| target | measured | met |", "|---|---:|---|"]
    for t in report["targets"]:
        extra = f" (sdpa seed-to-seed: {_fmt(t['noise'])})" if t.get("noise") is not None else ""
        lines.append(f"| {t['target']} | {_fmt(t['measured'])}{extra} | "
                     f"{'missing' if t['met'] is None else ('yes' if t['met'] else 'NO')} |")
    lines += ["", "## GPT-2 small, bf16 (bench_gpt2.py, alternated rounds, medians)", "",
              "| T | attn | compiled | tokens/s | MFU | vs sdpa (same T, same compile) |", "|---:|---|---|---:|---:|---:|"]
    for r in (r for r in report["rows"] if "recipe" not in r):
        lines.append(f"| {r['T']} | {r['attn']} | {_fmt(r['compile'])} | {_fmt(r['tokens_per_s'])} | "
                     f"{_fmt(r['mfu'], pct=True)} | {'-' if r.get('vs_sdpa') is None else _fmt(r['vs_sdpa'])} |")
    lines += ["", "## Eager flash host overhead (bench_attention.py --overhead)", "",
              "| T | impl | kernels ms | back-to-back ms / call | host overhead ms |", "|---:|---|---:|---:|---:|"]
    for r in report["overhead"]:
        lines.append(f"| {r['T']} | {r['impl']} | {r['kernel_ms']:.3f} | {r['wall_ms']:.3f} | {r['overhead_ms']:.3f} |")
    if host_line:
        lines += ["", host_line]
    lines += ["", "## nanoGPT shakespeare_char recipe (runs concurrently on the one GPU)", "",
              "| run | attn | seed | val loss | wall s | tokens/s | steps | status |", "|---|---|---:|---:|---:|---:|---:|---|"]
    for r in (r for r in report["rows"] if "recipe" in r):
        lines.append(f"| {r['run']} | {_fmt(r.get('attn'))} | {_fmt(r.get('seed'))} | {_fmt(r.get('val_loss'))} | "
                     f"{_fmt(r.get('wall_s'))} | {_fmt(r.get('tokens_per_s'))} | {_fmt(r.get('steps'))} | "
                     f"{_fmt(r.get('status'))} |")
    return "\n".join(lines) + "\n"


def build(folder: Path) -> tuple[dict, str]:
    env = json.loads((folder / "env.json").read_text()) if (folder / "env.json").is_file() else {}
    keep = ("attn", "compile", "T", "batch", "tokens_per_s", "mfu", "vs_sdpa", "compile_mode", "tiny")
    rows = [{k: r.get(k) for k in keep} for r in read_jsonl(folder / "gpt2.jsonl")] + recipe_rows(folder)
    overhead = json.loads((folder / "overhead.json").read_text()) if (folder / "overhead.json").is_file() else []
    report = {"date": env.get("date", "unknown"), "gpu": env.get("gpu", "unknown"), "torch": env.get("torch", "unknown"),
              "triton": env.get("triton", "unknown"), "rows": rows, "overhead": overhead}
    report["targets"] = check_targets(rows, overhead)
    host = folder / "host_python.txt"
    return report, markdown(report, host.read_text().strip() if host.is_file() else None)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or not Path(argv[0]).is_dir():
        print("usage: python scripts/bench/gpu_report.py GPU_CHECK_DIR (a folder gpu_check.sh wrote)", file=sys.stderr)
        return 2
    folder = Path(argv[0])
    report, md = build(folder)
    (folder / "gpu_results.json").write_text(json.dumps(report, indent=1) + "\n")
    (folder / "gpu_results.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())

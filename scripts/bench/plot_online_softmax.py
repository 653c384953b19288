#!/usr/bin/env python
"""Numbers and figures for docs/online_softmax.md: the online-softmax recurrence, step by step.

    python scripts/bench/plot_online_softmax.py                  # print the walk-through, write docs/*.png
    python scripts/bench/plot_online_softmax.py --out-dir /tmp   # figures elsewhere

Runs on a CPU in a few seconds; the figures need matplotlib (``pip install -e ".[plot]"``). Every
number it prints is checked against ``kernels.online_softmax`` and ``torch.softmax`` in float64.
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from kernels import online_softmax

DOCS = Path(__file__).resolve().parents[2] / "docs"
EXAMPLE = [1.0, 3.0, 2.0, 5.0, 0.0, 4.0, 2.0, 6.0, 1.0]  # the row the page walks through
FP16_MAX = torch.finfo(torch.float16).max  # 65504: exp(x) overflows to inf for x > ln(65504) ~ 11.09


def running_stats(x: torch.Tensor, block: int) -> list[tuple[float, float, float]]:
    """(m, alpha, l) after each block of ``x`` (1-D): the recurrence of kernels/online.py."""
    m, l, steps = -math.inf, 0.0, []
    for start in range(0, len(x), block):
        x_j = x[start : start + block]
        m_new = max(m, x_j.max().item())  # m' = max(m, max_j x)
        alpha = math.exp(m - m_new)  # rescales the sum so far to the new max
        l = alpha * l + torch.exp(x_j - m_new).sum().item()  # l' = alpha l + sum_j exp(x - m')
        m = m_new
        steps.append((m, alpha, l))
    return steps


def walk(x: list[float], block: int = 3) -> str:
    """The markdown table of the recurrence on ``x``, verified against online_softmax."""
    t = torch.tensor(x, dtype=torch.float64)
    rows = ["| block | values | m | alpha = exp(m_old - m) | l |", "|---:|---|---:|---:|---:|"]
    for j, (m, alpha, l) in enumerate(running_stats(t, block)):
        values = ", ".join(f"{v:g}" for v in x[j * block : (j + 1) * block])
        a = "0 (nothing before)" if j == 0 else f"{alpha:.4f}"
        rows.append(f"| {j + 1} | {values} | {m:g} | {a} | {l:.4f} |")
    m, _, l = running_stats(t, block)[-1]
    assert math.isclose(l, torch.exp(t - t.max()).sum().item(), rel_tol=1e-12)
    p = torch.exp(t - m) / l  # the second read: normalize
    torch.testing.assert_close(p, torch.softmax(t, 0), rtol=1e-12, atol=0)
    torch.testing.assert_close(p, online_softmax(t, block_size=block), rtol=1e-12, atol=0)
    probs = ", ".join(f"{v:.4f}" for v in p.tolist())
    return "\n".join(rows) + f"\n\nsoftmax = exp(x - {m:g}) / {l:.4f} = [{probs}]"


def fp16_errors(scales: list[float], n: int = 256) -> tuple[list[float], list[float]]:
    """Max |error| against float64 of naive exp(x)/sum(exp(x)) and of online_softmax, both fp16."""
    g = torch.Generator().manual_seed(0)
    base = torch.rand(n, generator=g, dtype=torch.float64) * 2 - 1
    base[0] = 1.0  # the largest logit is exactly `scale`
    naive_err, online_err = [], []
    for scale in scales:
        x = (base * scale).half()
        ref = torch.softmax(x.double(), 0)
        naive = torch.exp(x) / torch.exp(x).sum()  # fp16 throughout: exp overflows to inf, inf/inf = nan
        naive_err.append((naive.double() - ref).abs().max().item())  # nan once anything overflowed
        online_err.append((online_softmax(x, block_size=64).double() - ref).abs().max().item())
    return naive_err, online_err


FP16_TABLE_LOGITS = [8.0, 11.0, 12.0, 1000.0, 60000.0]


def fp16_table() -> str:
    """Markdown table of fp16 errors at a few largest-logit values."""
    naive_err, online_err = fp16_errors(FP16_TABLE_LOGITS)
    rows = ["| largest logit | naive fp16 error | online fp16 error |", "|---:|---:|---:|"]
    rows += [f"| {s:g} | {a:.2g} | {b:.2g} |" for s, a, b in zip(FP16_TABLE_LOGITS, naive_err, online_err)]
    return "\n".join(rows)


def plot_running_stats(path: Path, n: int = 64, block: int = 8) -> None:
    import matplotlib.pyplot as plt

    g = torch.Generator().manual_seed(3)
    x = torch.randn(n, generator=g, dtype=torch.float64) * 2 + torch.linspace(0, 3, n, dtype=torch.float64)
    steps = running_stats(x, block)
    ends = [min((j + 1) * block, n) - 1 for j in range(len(steps))]
    m = [s[0] for s in steps]
    l = [s[2] for s in steps]
    m_final = m[-1]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    ax1.plot(range(n), x, ".", color="gray", label="x (one row of scores)")
    starts = [j * block for j in range(len(steps))]
    ax1.hlines(m, [s - 0.5 for s in starts], [e + 0.5 for e in ends], color="C0",
               label="running max m after each block")
    ax1.axhline(m_final, color="C0", ls=":", lw=1)
    for e in ends[:-1]:
        ax1.axvline(e + 0.5, color="k", lw=0.3, alpha=0.3)
    ax1.set_ylabel("score")
    ax1.legend(loc="upper left", fontsize=8)
    ax2.plot(ends, l, "o-", color="C1", label="l = sum exp(x - m), relative to the running m")
    ax2.plot(ends, [li * math.exp(mi - m_final) for li, mi in zip(l, m)], "s--", color="C2",
             label="the same sum relative to the final max: l * exp(m - m_final)")
    ax2.set_xlabel(f"position in the row (blocks of {block})")
    ax2.set_ylabel("normalizer")
    ax2.legend(loc="upper left", fontsize=8)
    ax1.set_title("Running max m and normalizer l, block by block")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_fp16(path: Path) -> None:
    import matplotlib.pyplot as plt

    scales = [2.0**e for e in torch.arange(0, 16.01, 0.5).tolist()]  # largest logit 1 .. 65536
    scales = [s for s in scales if s < FP16_MAX]
    naive_err, online_err = fp16_errors(scales)
    top, floor = 2.0, 1e-8  # where a NaN error is drawn; smaller errors are drawn at the floor
    online_err = [max(e, floor) for e in online_err]
    fig, ax = plt.subplots(figsize=(7, 4.8))
    finite = [(s, e) for s, e in zip(scales, naive_err) if math.isfinite(e)]
    broken = [s for s, e in zip(scales, naive_err) if not math.isfinite(e)]
    ax.loglog(*zip(*finite), "o-", color="C3", label="naive fp16: exp(x) / sum(exp(x))")
    ax.loglog(broken, [top] * len(broken), "x", color="C3", ms=8, label="naive fp16: NaN (exp overflowed)")
    ax.loglog(scales, online_err, "s-", color="C0", label="online_softmax, fp16 in and out (below 1e-8: at 1e-8)")
    ax.axvline(math.log(FP16_MAX), color="k", ls=":", lw=1)
    ax.text(math.log(FP16_MAX) * 1.1, 3e-8, "ln(65504) = 11.09", fontsize=8)
    ax.set_ylim(floor / 2, 10)
    ax.set_xlabel("largest logit in the row")
    ax.set_ylabel("max |error| against float64 softmax")
    ax.set_title("fp16: naive softmax overflows, online softmax stays finite")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out-dir", type=Path, default=DOCS, help="where the PNGs go (default: docs/)")
    p.add_argument("--no-plots", action="store_true", help="print the numbers only")
    args = p.parse_args(argv)
    print(walk(EXAMPLE) + "\n\n" + fp16_table())
    if not args.no_plots:
        args.out_dir.mkdir(parents=True, exist_ok=True)
        plot_running_stats(args.out_dir / "online_softmax_running_stats.png")
        plot_fp16(args.out_dir / "online_softmax_fp16.png")
        print(f"\nwrote {args.out_dir / 'online_softmax_running_stats.png'} and online_softmax_fp16.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

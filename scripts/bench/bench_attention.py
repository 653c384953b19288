"""Benchmark attention implementations side by side: time, bytes saved for backward, peak memory.

    python scripts/bench/bench_attention.py                        # CPU fp32 / CUDA bf16, T = 128..4096
    python scripts/bench/bench_attention.py --plot attn.png        # also plot time and memory against T
    TRITON_INTERPRET=1 python scripts/bench/bench_attention.py --include-flash --seq-lens 64 128
    python scripts/bench/bench_attention.py --tflops               # CUDA only: TFLOP/s vs SDPA's flash backend
    python scripts/bench/bench_attention.py --overhead             # CUDA: host time above the kernels' GPU time
    python scripts/bench/bench_attention.py --host-python          # any machine: flash's Python per call, launches no-op'd
    python scripts/bench/bench_attention.py --window 256 1024      # flash: sliding windows beside plain causal

On a CPU shared with other jobs, run with OMP_WAIT_POLICY=PASSIVE (or --threads 1): spinning
OpenMP workers that lose their core make an implementation of many small ops (online) look 10x
slower than it is, while a few big ops (naive) barely notice.

Times are medians over ``--repeats`` runs, taken in this process with the implementations
interleaved run by run. ``--tflops`` times each point with ``triton.testing.do_bench`` (CUDA
events, median over ~100 ms of repetitions after warm-up): back-to-back calls, so where the host
takes longer to launch a call than the GPU takes to run it (short T), those columns time the
launching. Its "kernels" columns time the same fwd+bwd with the host taken out: the stream is
held by a GPU spin while the calls queue behind it, as in training, where the CPU runs ahead.
``--overhead`` (CUDA) reports, per implementation and T, the GPU time of one forward+backward
with the host taken out (``held_ms``: the calls queue behind a GPU spin), the wall time per call
of ``--calls`` back-to-back calls (synchronized before and after), and their difference, the host
overhead: what a caller waits beyond the kernels' own time (``host_overhead_ms``). Rounds
alternate the implementations (``common.alternated``); cells are medians over rounds.
``--window W ...`` times flash's forward and fwd+bwd with each sliding window beside plain
causal flash at each T (interleaved run by run, in this process): with the tiles outside the
window skipped, a window's time should grow as T (tiles per block of rows fixed by W) while
causal's grows as T^2. A GPU measurement: under the CPU interpreter (TRITON_INTERPRET=1, T <= 256)
it only shows the mode runs; there the extra masked loops make windows slower at such short T.
``--host-python`` (any machine, no GPU needed) times the Python of one eager forward+backward
through flash's wrapper with every Triton launch replaced by a no-op (the plan, allocations,
autograd), beside the same for an autograd.Function that only clones its input (the floor any
Python attention pays); the CPU default run prints it too.

Memory is measured for every (implementation, T) point in a fresh subprocess so that its peak
figure is its own, with trainer/monitor.py's peak-memory helpers: on CUDA
``torch.cuda.max_memory_allocated`` during one forward+backward, above what was allocated before it; on CPU the process's peak RSS (VmHWM, reset through /proc/self/clear_refs) during one
forward+backward, minus its RSS just before. Each point first runs one forward+backward at the
measured shapes (outside the window), so one-time work such as library start-up and flash's
autotuning at that shape is not counted. Both include the output and the input gradients.
"Saved" is the bytes of the unique storages autograd keeps for backward, counted with
``torch.autograd.graph.saved_tensors_hooks`` (inputs that are saved count too).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

import common
from kernels import ATTENTION
from trainer.monitor import peak_memory

IMPLS = tuple(ATTENTION)  # one registry: configs/attn/*.yaml names
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
MIB = 2**20


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seq-lens", type=int, nargs="+", default=None, help="default 128 512 1024 2048 4096")
    p.add_argument("--batch", type=int, default=None, help="default 1 (4 with --tflops)")
    p.add_argument("--heads", type=int, default=None, help="default 8 (16 with --overhead)")
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default fp32 on CPU, bf16 on CUDA")
    p.add_argument("--device", default=None, help="default cuda when available, else cpu")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's); 1 keeps timings sane on a loaded machine")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per point; the median is reported")
    p.add_argument("--no-causal", dest="causal", action="store_false", help="full (non-causal) attention")
    p.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS))
    p.add_argument("--block-size", type=int, default=None, help="online_attention block size (default: its own)")
    p.add_argument("--include-flash", action="store_true",
                   help="on CPU, run the Triton flash kernel under TRITON_INTERPRET=1 (T <= 256 only)")
    p.add_argument("--plot", metavar="FILE.png", default=None, help="write a plot of time and memory against T")
    p.add_argument("--tflops", action="store_true", help="CUDA only: forward and fwd+bwd TFLOP/s, T 512..16k")
    p.add_argument("--overhead", action="store_true", help="CUDA only: host overhead per fwd+bwd (B=4 H=16 D=64)")
    p.add_argument("--host-python", action="store_true", help="flash's Python per fwd+bwd with no-op launches")
    p.add_argument("--calls", type=int, default=50, help="--overhead / --host-python: back-to-back calls per round")
    p.add_argument("--rounds", type=int, default=5, help="--overhead / --host-python: alternated rounds")
    p.add_argument("--json", metavar="FILE", default=None, help="--overhead: also write the rows as JSON")
    p.add_argument("--window", type=int, nargs="+", default=None, metavar="W",
                   help="flash only: time these sliding windows beside plain causal")
    p.add_argument("--worker", choices=IMPLS, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.heads = args.heads or (16 if args.overhead else 8)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.dtype = args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")
    return args


def load_impl(name: str, block_size: int | None):
    """The attention callable for ``name``; raises ImportError/RuntimeError if it cannot be built."""
    if name == "online":
        from kernels.online import DEFAULT_BLOCK_SIZE, online_attention

        bs = block_size or DEFAULT_BLOCK_SIZE
        return lambda q, k, v, causal=True: online_attention(q, k, v, causal=causal, block_size=bs)
    if name == "sdpa-flash":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        from kernels import sdpa_attention

        def sdpa_flash(q, k, v, causal=True):
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return sdpa_attention(q, k, v, causal=causal)

        return sdpa_flash
    return ATTENTION[name]


def make_inputs(B: int, H: int, T: int, D: int, dtype: torch.dtype, device: str):
    g = torch.Generator(device="cpu").manual_seed(0)
    q, k, v, do = (torch.randn(B, H, T, D, generator=g).to(device=device, dtype=dtype) for _ in range(4))
    return q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), do


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def elapsed_ms(step, device: str) -> float:
    sync(device)
    t0 = time.perf_counter()
    step()
    sync(device)
    return (time.perf_counter() - t0) * 1e3


def measure_memory(fn, q, k, v, do, causal: bool, device: str) -> tuple[int, int]:
    """(bytes saved for backward, peak memory growth) of one forward+backward."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    dev = torch.device(device)
    sync(device)
    base = peak_memory(dev, reset=True)  # right after a reset the peak mark is the current usage
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(q, k, v, causal=causal)
    out.backward(do)
    sync(device)
    peak = peak_memory(dev)
    q.grad = k.grad = v.grad = None
    return sum(storages.values()), peak - base


def run_worker(args: argparse.Namespace) -> dict:
    """Memory of one (impl, T) point, measured in this fresh process."""
    (T,) = args.seq_lens
    dtype, device = DTYPES[args.dtype], args.device
    fn = load_impl(args.worker, args.block_size)
    q, k, v, do = make_inputs(args.batch, args.heads, T, args.head_dim, dtype, device)
    # warm up at the measured shapes, so one-time allocations (library start-up, flash's
    # autotuning at this T) happen before the peak window opens
    fn(q, k, v, causal=args.causal).backward(do)
    q.grad = k.grad = v.grad = None
    saved, peak = measure_memory(fn, q, k, v, do, args.causal, device)
    return dict(saved=saved, peak=peak)


def time_point(impls: list[str], T: int, args: argparse.Namespace) -> dict[str, dict]:
    """Median fwd and fwd+bwd ms per impl, interleaving impls run by run.

    Round-robin order means a burst of load from other processes on a shared machine hits every
    implementation alike instead of whichever happened to be running.
    """
    q, k, v, do = make_inputs(args.batch, args.heads, T, args.head_dim, DTYPES[args.dtype], args.device)
    return time_fns({impl: load_impl(impl, args.block_size) for impl in impls}, q, k, v, do, args)


def time_fns(fns: dict, q, k, v, do, args: argparse.Namespace) -> dict[str, dict]:
    """Median fwd and fwd+bwd ms of each ``fns`` value on these inputs, interleaved run by run."""
    device = args.device
    times: dict[str, dict[str, list]] = {name: {"fwd_ms": [], "fb_ms": []} for name in fns}

    def fwd(fn):
        with torch.no_grad():
            fn(q, k, v, causal=args.causal)

    def fwd_bwd(fn):
        fn(q, k, v, causal=args.causal).backward(do)
        q.grad = k.grad = v.grad = None

    for run in range(args.repeats + 1):  # run 0 warms up
        for name, fn in fns.items():
            for key, step in (("fwd_ms", fwd), ("fb_ms", fwd_bwd)):
                ms = elapsed_ms(lambda: step(fn), device)
                if run:
                    times[name][key].append(ms)
    return {name: {key: statistics.median(ts) for key, ts in t.items()} for name, t in times.items()}


def run_window(args: argparse.Namespace) -> list[dict]:
    """``--window``: flash with each sliding window beside plain causal flash, T by T; prints a table."""
    import functools

    if not args.causal:
        raise SystemExit("bench_attention: --window is a causal sliding window; drop --no-causal")
    T_max = max(args.seq_lens)
    reason = skip_reason("flash", T_max, argparse.Namespace(**{**vars(args), "include_flash": True}))
    if reason:
        raise SystemExit(f"bench_attention --window: {reason}")
    from kernels.flash import flash_attention

    fns = {"causal": flash_attention} | {f"window={w}": functools.partial(flash_attention, window=w)
                                         for w in args.window}
    rows = []
    for T in args.seq_lens:
        q, k, v, do = make_inputs(args.batch, args.heads, T, args.head_dim, DTYPES[args.dtype], args.device)
        times = time_fns(fns, q, k, v, do, args)
        rows += [dict(T=T, attn=name, **t, vs_causal=t["fb_ms"] / times["causal"]["fb_ms"])
                 for name, t in times.items()]
    print(f"\nflash B={args.batch} H={args.heads} D={args.head_dim} {args.dtype} {args.device}; "
          f"times are medians of {args.repeats}\n")
    print("| T | attention | fwd ms | fwd+bwd ms | fwd+bwd / causal |")
    print("|---:|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['T']} | {r['attn']} | {r['fwd_ms']:.2f} | {r['fb_ms']:.2f} | {r['vs_causal']:.2f}x |")
    return rows


def skip_reason(impl: str, T: int, args: argparse.Namespace) -> str | None:
    if impl != "flash":
        return None
    if not args.device.startswith("cuda"):
        if not args.include_flash:
            return "flash: CPU run; pass --include-flash with TRITON_INTERPRET=1 to interpret it"
        if os.environ.get("TRITON_INTERPRET") != "1":
            return "flash: --include-flash on CPU needs TRITON_INTERPRET=1 in the environment"
        if T > 256:
            return f"flash: T={T} > 256 is too slow under the Triton interpreter"
    try:
        load_impl("flash", None)
    except Exception as e:  # the kernel is optional: report and go on
        return f"flash: unavailable ({type(e).__name__}: {e})"
    return None


def spawn_point(impl: str, T: int, args: argparse.Namespace) -> dict | str:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", impl, "--seq-lens", str(T),
           "--batch", str(args.batch), "--heads", str(args.heads), "--head-dim", str(args.head_dim),
           "--dtype", args.dtype, "--device", args.device, "--threads", str(torch.get_num_threads())]
    if not args.causal:
        cmd.append("--no-causal")
    if args.block_size:
        cmd += ["--block-size", str(args.block_size)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["killed (out of memory?)"])[-1]
        return f"{impl} T={T}: failed ({last})"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def ratio(x: float, base: float | None) -> str:
    return f"{x / base:.2f}x" if base else "-"


def print_table(results: dict, args: argparse.Namespace) -> None:
    mem = "CUDA peak MiB" if args.device.startswith("cuda") else "peak RSS growth MiB"
    print(f"\nB={args.batch} H={args.heads} D={args.head_dim} {args.dtype} {args.device} "
          f"causal={args.causal} threads={torch.get_num_threads()}; times are medians of {args.repeats}\n")
    print(f"| T | impl | fwd ms | fwd+bwd ms | fwd+bwd / naive | saved MiB | saved / naive | {mem} | peak / naive |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for T in args.seq_lens:
        base = results.get(("naive", T))
        for impl in args.impls:
            r = results.get((impl, T))
            if r is None:
                continue
            nb = base or {}
            print(f"| {T} | {impl} | {r['fwd_ms']:.1f} | {r['fb_ms']:.1f} | {ratio(r['fb_ms'], nb.get('fb_ms'))} "
                  f"| {r['saved'] / MIB:.1f} | {ratio(r['saved'], nb.get('saved'))} "
                  f"| {r['peak'] / MIB:.1f} | {ratio(r['peak'], nb.get('peak'))} |")


def plot(results: dict, args: argparse.Namespace) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError as e:
        raise SystemExit(f"--plot needs matplotlib: pip install -e .[plot] ({e})") from e
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    panels = (("fb_ms", "forward+backward ms"), ("saved", "MiB saved for backward"), ("peak", "peak memory MiB"))
    for ax, (key, label) in zip(axes, panels):
        for i, impl in enumerate(args.impls):
            pts = [(T, results[(impl, T)][key]) for T in args.seq_lens if (impl, T) in results]
            if pts:
                ts, ys = zip(*pts)
                ys = [y / MIB for y in ys] if key != "fb_ms" else ys
                # distinct markers and dashes: online and sdpa save identical bytes, lines overlap
                ax.plot(ts, ys, marker="os^D"[i % 4], linestyle=("-", "--", ":", "-.")[i % 4], label=impl)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(args.seq_lens, [str(t) for t in args.seq_lens], minor=False)
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set(xlabel="T", ylabel=label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(f"attention B={args.batch} H={args.heads} D={args.head_dim} {args.dtype} {args.device}")
    fig.tight_layout()
    fig.savefig(args.plot, dpi=120)
    print(f"\nwrote {args.plot}")


def attn_flops(B: int, H: int, T: int, D: int, causal: bool) -> float:
    """Forward FLOPs of attention: two T x T x D matmuls, 2 FLOPs per multiply-add; half if causal."""
    return 4 * B * H * T * T * D / (2 if causal else 1)


def run_tflops(args: argparse.Namespace) -> None:
    if not torch.cuda.is_available() or not args.device.startswith("cuda"):
        raise SystemExit("--tflops needs a CUDA device (torch.cuda.is_available() is False here); "
                         "run the default mode on CPU instead")
    B = args.batch or 4
    seq_lens = args.seq_lens or [512, 1024, 2048, 4096, 8192, 16384]
    impls = ["flash", "sdpa-flash", "online"]
    dtype = DTYPES[args.dtype]
    print(f"\nTFLOP/s, {args.dtype}, causal={args.causal}, B={B}; fwd+bwd counts bwd as 2.5x fwd FLOPs; "
          f"'kernels': fwd+bwd with the host's launch time taken out\n")
    heads = [f"{i} fwd | {i} fwd+bwd" + (f" | {i} kernels" if i in HELD else "") for i in impls]
    print("| H | D | T | " + " | ".join(heads) + " |")
    print("|---:|---:|---:|" + "|".join("---:|---:" + ("|---:" if i in HELD else "") for i in impls) + "|")
    for H, D in ((16, 64), (8, 128)):
        for T in seq_lens:
            cells = [tflops_cell(impl, B, H, T, D, dtype, args) for impl in impls]
            print(f"| {H} | {D} | {T} | " + " | ".join(cells) + " |", flush=True)


def tflops_cell(impl: str, B: int, H: int, T: int, D: int, dtype: torch.dtype, args) -> str:
    from triton.testing import do_bench

    if impl == "sdpa-flash" and dtype == torch.float32:
        return "n/a (no fp32) | n/a"  # PyTorch's flash backend takes only fp16/bf16
    try:
        fn = load_impl(impl, args.block_size)
    except Exception as e:
        return f"n/a ({type(e).__name__}) | n/a"
    q, k, v, do = make_inputs(B, H, T, D, dtype, "cuda")
    flops = attn_flops(B, H, T, D, args.causal)

    def fwd():
        with torch.no_grad():
            fn(q, k, v, causal=args.causal)

    def fwd_bwd():
        fn(q, k, v, causal=args.causal).backward(do)

    held = impl in HELD
    try:
        # do_bench warms up (flash tunes here), then takes the median of CUDA-event timings
        f_ms = do_bench(fwd, warmup=25, rep=100, return_mode="median")
        fb_ms = do_bench(fwd_bwd, warmup=25, rep=100, grad_to_none=[q, k, v], return_mode="median")
        k_ms = held_ms(fwd_bwd, [q, k, v])[1] if held else None
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return "OOM | OOM" + (" | OOM" if held else "")
    except RuntimeError as e:  # e.g. a backend that refuses this shape or dtype
        return f"n/a ({str(e).splitlines()[0][:40]}) | n/a" + (" | n/a" if held else "")
    cells = [f"{flops / f_ms / 1e9:.1f}", f"{3.5 * flops / fb_ms / 1e9:.1f}"]
    if held:
        cells.append("n/a (host too slow)" if k_ms is None else f"{3.5 * flops / k_ms / 1e9:.1f}")
    return " | ".join(cells)


HELD = ("flash", "sdpa-flash")  # impls that get a "kernels" column (online's host time is its point)


def held_ms(step, leaves: list, max_calls: int = 20) -> tuple[float, float | None]:
    """(host ms, GPU ms) per call of ``step``: the host's time to launch a call, and the GPU's to
    run it with the host's time taken out (None if that could not be measured).

    The stream is held by a GPU spin (``torch.cuda._sleep``, ~0.5 s at 2 GHz) while at most
    ~50 ms worth of calls queue behind it, so the host never waits; events recorded after the
    spin then time the queued kernels alone. If queueing took longer than half the spin, the GPU
    may have waited on the host, so no GPU time is reported rather than a wrong one."""
    def one():
        for t in leaves:
            t.grad = None
        step()

    one()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    one()
    torch.cuda.synchronize()
    calls = max(3, min(max_calls, int(0.05 / (time.perf_counter() - t0))))
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(1_000_000_000)
    start.record()
    t0 = time.perf_counter()
    for _ in range(calls):
        one()
    queued_s = time.perf_counter() - t0
    end.record()
    end.synchronize()
    return queued_s / calls * 1e3, (start.elapsed_time(end) / calls if queued_s < 0.25 else None)


def host_overhead_ms(wall_s: float, calls: int, kernel_ms: float) -> float:
    """Host time above the kernels' own: the wall time per call of ``calls`` back-to-back calls
    (``wall_s`` for all of them) minus the GPU time of one call with the host taken out. Zero when
    the GPU is the bottleneck; negative only by noise."""
    if calls < 1:
        raise ValueError(f"calls must be at least 1, got {calls}")
    return wall_s * 1e3 / calls - kernel_ms


def overhead_row(impl: str, T: int, rounds: list[dict]) -> dict:
    """One table row from a point's rounds, each ``{"wall_s", "calls", "kernel_ms", "host_ms"}``
    measured side by side: medians over rounds; the overhead is taken per round, then its median."""
    per_round = [host_overhead_ms(r["wall_s"], r["calls"], r["kernel_ms"]) for r in rounds]
    return {"impl": impl, "T": T, "kernel_ms": common.median([r["kernel_ms"] for r in rounds]),
            "wall_ms": common.median([r["wall_s"] * 1e3 / r["calls"] for r in rounds]),
            "host_ms": common.median([r["host_ms"] for r in rounds]), "overhead_ms": common.median(per_round),
            "overhead_rounds_ms": per_round}


def run_overhead(args: argparse.Namespace) -> list[dict]:
    """``--overhead``: per T, flash / sdpa-flash (and flash-op, the registered op called eagerly)
    side by side in alternated rounds; prints the table and returns its rows."""
    if not torch.cuda.is_available() or not args.device.startswith("cuda"):
        raise SystemExit("--overhead needs a CUDA device; on a CPU run --host-python for the part that needs none")
    B, H, D = args.batch or 4, args.heads, args.head_dim
    seq_lens = args.seq_lens or [512, 1024, 2048, 4096]
    impls = {"flash": load_impl("flash", None), "sdpa-flash": load_impl("sdpa-flash", None)}
    print(f"\nhost overhead per fwd+bwd, {args.dtype}, causal={args.causal}, B={B} H={H} D={D}; medians of "
          f"{args.rounds} alternated rounds of {args.calls} back-to-back calls\n")
    print("| T | impl | kernels ms (host taken out) | back-to-back ms / call | host overhead ms | host launch ms |")
    print("|---:|---|---:|---:|---:|---:|")
    rows = []
    for T in seq_lens:
        q, k, v, do = make_inputs(B, H, T, D, DTYPES[args.dtype], "cuda")

        def measure(fn):
            step = lambda: fn(q, k, v, causal=args.causal).backward(do)  # noqa: E731

            def one_round() -> dict:
                host, kernel = held_ms(step, [q, k, v])
                q.grad = k.grad = v.grad = None
                wall = common.seconds(lambda: (step(), setattr(q, "grad", None)), repeat=args.calls,
                                      sync=torch.cuda.synchronize) * args.calls
                return {"wall_s": wall, "calls": args.calls, "kernel_ms": kernel, "host_ms": host}
            return one_round

        raw: dict[str, list[dict]] = {name: [] for name in impls}

        def recorder(name: str, one_round):
            def figure() -> float:
                raw[name].append(one_round())
                return raw[name][-1]["wall_s"]
            return figure

        common.alternated({name: recorder(name, measure(fn)) for name, fn in impls.items()}, args.rounds)
        for name in sorted(raw):
            if any(x["kernel_ms"] is None for x in raw[name]):
                print(f"| {T} | {name} | n/a (host too slow to queue) | | | |")
                continue
            row = overhead_row(name, T, raw[name])
            rows.append(row)
            print(f"| {T} | {name} | {row['kernel_ms']:.3f} | {row['wall_ms']:.3f} | {row['overhead_ms']:.3f} | "
                  f"{row['host_ms']:.3f} |", flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(run_worker(args)))
        return
    if args.tflops:
        run_tflops(args)
        return
    if args.host_python:
        from flash_host import describe, host_python_us

        print(describe(host_python_us(calls=args.calls, rounds=args.rounds)))
        return
    if args.window:
        args.batch = args.batch or 1
        args.seq_lens = args.seq_lens or ([1024, 4096, 16384] if args.device.startswith("cuda") else [128, 256])
        run_window(args)
        return
    if args.overhead:
        rows = run_overhead(args)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=1)
        return
    args.batch = args.batch or 1
    args.seq_lens = args.seq_lens or [128, 512, 1024, 2048, 4096]
    results, notes = {}, []
    for T in args.seq_lens:
        ok = []
        for impl in args.impls:
            reason = skip_reason(impl, T, args)
            r = reason or spawn_point(impl, T, args)
            if isinstance(r, str):
                notes.append(r)
            else:
                results[(impl, T)] = r
                ok.append(impl)
        for impl, t in time_point(ok, T, args).items():
            results[(impl, T)].update(t)
        print(f"  T={T} done", file=sys.stderr, flush=True)
    print_table(results, args)
    for note in dict.fromkeys(notes):  # unique, in order
        print(f"- {note}")
    if args.plot:
        plot(results, args)
    if not args.device.startswith("cuda"):
        from flash_host import describe, host_python_us

        print("\n" + describe(host_python_us(calls=args.calls, rounds=args.rounds)))


if __name__ == "__main__":
    main()

"""How the flash kernels are launched: input checks, launch configs, and eager launch plans.

Imported by ``kernels/flash.py`` (the public function and its autograd) and ``kernels/flash_ops.py``
(the torch.library ops); never imports Triton itself (``kernels_for`` does, on first use).

- ``config`` / ``traced_config``: the config of one launch. Eager launches tune a new bucket of
  sequence lengths on their own arguments (``flash_configs.choose``); a trace only looks the
  bucket up (the cached pick, or the pinned candidate, recorded in ``TRACE_PINNED``).
- ``plan_for``: an eager call's plan, made once per (shapes, strides, dtypes, devices, pointer
  alignment, mask and window, deterministic/TF32 settings): the inputs checked, configs chosen, grids and
  stride tuples worked out, and on a GPU each kernel's compiled binary kept (``_Launch``), so a
  later call with the same key only allocates its outputs and hands the arguments to Triton's
  low-level launcher, skipping ``JITFunction.run``'s per-call binding and cache lookup.
"""
from __future__ import annotations

import contextlib
import functools
import os
import sys

import torch

from kernels import UnavailableError, UnsupportedError, check_qkv, check_window, resolve_scale, tf32_enabled
from kernels import flash_configs as fc

SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
LOG2E = 1.4426950408889634

_NO_INTERPRETER = (
    "flash_attention got CPU tensors, but without a GPU its Triton kernel runs only under Triton's "
    "interpreter: set TRITON_INTERPRET=1 before starting Python to run the real kernel (slowly) on "
    "the CPU, or use attn=online"
)


def check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Input checks that need only shapes and dtypes (so torch.compile traces them)."""
    check_qkv(q, k, v, "flash_attention")
    if q.dtype not in SUPPORTED_DTYPES:
        raise UnsupportedError(f"flash_attention: dtype {q.dtype} is not supported; use float16, bfloat16 or float32")
    if q.shape[-1] not in SUPPORTED_HEAD_DIMS:
        raise UnsupportedError(
            f"flash_attention: head dim D={q.shape[-1]} is not supported; use one of {SUPPORTED_HEAD_DIMS} "
            "(choose n_embd / n_head accordingly) or another attention implementation"
        )
    if q.shape[2] == 0 or k.shape[2] == 0:
        raise ValueError(f"flash_attention: empty sequence (Tq={q.shape[2]}, Tk={k.shape[2]})")


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)  # read once per GPU


def kernels_for(q: torch.Tensor):
    """The Triton kernels module, or an UnavailableError saying why it cannot run on ``q``'s device."""
    if q.device.type not in ("cpu", "cuda"):
        raise UnavailableError(f"flash_attention runs on CUDA GPUs (or the CPU interpreter), not on {q.device.type}")
    if q.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise UnavailableError(_NO_INTERPRETER)
    if q.device.type == "cuda" and _capability(q.device.index) < fc.MIN_CAPABILITY:
        major, minor = _capability(q.device.index)
        raise UnavailableError(
            f"flash_attention needs an NVIDIA GPU of compute capability 7.5 or newer; {q.device} is "
            f"sm_{major}{minor}: use attn=sdpa"
        )
    try:
        from kernels import flash_triton
    except ModuleNotFoundError as err:
        if err.name and err.name.split(".")[0] == "triton":
            raise UnavailableError(
                "flash_attention needs Triton, which is not installed: pip install triton, or use attn=online"
            ) from err
        raise
    if q.device.type == "cpu" and not flash_triton.INTERPRETED:
        raise UnavailableError(
            "flash_attention: TRITON_INTERPRET=1 was set after Triton was imported; set it before "
            "starting Python, or use attn=online"
        )
    return flash_triton


def on_device(t: torch.Tensor):
    """Triton launches on the current CUDA device: make it the tensor's for the launch."""
    if t.device.type != "cuda" or t.device.index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(t.device)


def unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    # kernels assume unit stride along D (vectorized loads); B, H, T strides may be anything
    return t if t.stride(-1) == 1 else t.contiguous()


def constexprs(fk, q: torch.Tensor, causal: bool, window: int | None = None) -> dict:
    """The mask and dtype-dependent flags every attention kernel takes, by name. The window is a
    constexpr (0 = none): the no-window kernels compile as if it did not exist, and each window
    size gets its own binary with its bounds folded in (a model uses one or two sizes)."""
    tf32 = q.dtype == torch.float32 and q.device.type == "cuda" and tf32_enabled()
    return dict(
        HEAD_D=q.shape[-1], CAUSAL=causal, WINDOW=0 if window is None else int(window),
        UPCAST=fk.INTERPRETED and q.dtype == torch.bfloat16,  # the interpreter's bf16 tl.dot is wrong
        PRECISION="tf32" if tf32 else "ieee",  # only fp32 operands read it
    )


def grid(name: str, cfg: fc.Config, t_q, t_k, n_bh) -> tuple:
    """One program per block of rows (keys for dK/dV, queries otherwise) x batch*head."""
    rows, block = (t_k, cfg.block_n) if name == "dkdv" else (t_q, cfg.block_m)
    return (-(-rows // block), n_bh)


def meta(name: str, cfg: fc.Config, consts: dict, interpreted: bool) -> dict:
    """The keyword arguments of a launch: constexprs, block sizes and (compiled) warps and stages."""
    if name == "preprocess":
        out = dict(HEAD_D=consts["HEAD_D"], BLOCK_M=cfg.block_m)
        return out if interpreted else {**out, "num_warps": cfg.num_warps}
    out = dict(consts, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n)
    return out if interpreted else {**out, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}


# ----------------------------------------------------------------------------- launch configs

TUNED: dict = {}  # (kernel, D, bytes, device, dtype, causal, precision, window bucket, T buckets) -> Config
_GPUS: dict = {}  # CUDA device index -> (opt-in shared memory per block, 10 * major + minor)
TRACE_PINNED: set = set()  # (kernel, D, dtype, T buckets, window bucket) a trace found untuned and pinned


def _gpu(fk, device: torch.device) -> tuple[int, int]:
    if device.index not in _GPUS:
        props = fk.triton.runtime.driver.active.utils.get_device_properties(device.index)
        major, minor = _capability(device.index)
        _GPUS[device.index] = (int(props["max_shared_mem"]), 10 * major + minor)
    return _GPUS[device.index]


def window_bucket(consts: dict) -> int:
    """The window's power-of-two bucket (0: no window, so keys stay sortable): the work per program
    grows with the window, so windows of one bucket share a tuning result, like lengths of one bucket."""
    return fc.bucket(consts["WINDOW"]) if consts["WINDOW"] else 0


def _tuning_args(fk, q: torch.Tensor, consts: dict) -> tuple:
    """(tuning key: device, dtype, mask, precision, window bucket; shared memory per block;
    capability; deterministic)."""
    shared, capability = _gpu(fk, q.device)
    key = (q.device.index, str(q.dtype), consts["CAUSAL"], consts["PRECISION"], window_bucket(consts))
    return key, shared, capability, torch.are_deterministic_algorithms_enabled()


def config(fk, name: str, q: torch.Tensor, t_q: int, t_k: int, consts: dict, args: tuple | None) -> fc.Config:
    """The config of kernel ``name`` for this call: tuned on ``args`` (real tensors, the kernel's
    arguments) when its bucket is new; with ``args=None`` the cache's pick or the pinned one."""
    if fk.INTERPRETED or name == "preprocess":
        return fc.INTERPRETER[name] if fk.INTERPRETED else fc.PREPROCESS
    key, shared, capability, deterministic = _tuning_args(fk, q, consts)
    timings: dict = {}
    time_ms = None
    if args is not None:
        kernel, n_bh = fk.KERNELS[name], q.shape[0] * q.shape[1]

        def time_ms(c: fc.Config) -> float:
            run = lambda cfg: kernel[grid(name, cfg, t_q, t_k, n_bh)](*args, **meta(name, cfg, consts, False))  # noqa: E731
            timings[c] = _time_ms(run, c)
            return timings[c]

    cfg = fc.choose(name, consts["HEAD_D"], q.element_size(), shared, t_q, t_k, key, time_ms, TUNED,
                    deterministic, capability)
    if timings and os.environ.get("TRITON_PRINT_AUTOTUNING") == "1":  # Triton's own switch for this
        _print_tuning(name, q, t_q, t_k, cfg, timings, consts)
    return cfg


def traced_config(fk, name: str, q: torch.Tensor, t_q, t_k, consts: dict) -> fc.Config:
    """The config a traced launch bakes into the graph: looked up, never measured. A bucket this
    process has not tuned gets the pinned (first) candidate, and is recorded in TRACE_PINNED."""
    t_q, t_k = int(t_q), int(t_k)  # a symbolic length is specialized: each bucket has its config
    if not fk.INTERPRETED and name != "preprocess":
        key, shared, capability, deterministic = _tuning_args(fk, q, consts)
        if fc.needs_tuning(name, consts["HEAD_D"], q.element_size(), shared, t_q, t_k, key, TUNED,
                           deterministic, capability):
            TRACE_PINNED.add((name, q.shape[-1], str(q.dtype), fc.bucket(t_q), fc.bucket(t_k), window_bucket(consts)))
            if os.environ.get("TRITON_PRINT_AUTOTUNING") == "1":
                print(f"flash trace {name} D={q.shape[-1]} {str(q.dtype).replace('torch.', '')} "
                      f"T<={fc.bucket(t_q)}x{fc.bucket(t_k)}{_window_label(consts)}: not tuned in this process, "
                      "so the graph gets the pinned config (tracing never tunes; an eager call before compiling "
                      "tunes it)",
                      file=sys.stderr, flush=True)
    return config(fk, name, q, t_q, t_k, consts, None)


def _window_label(consts: dict) -> str:
    return f" window<={window_bucket(consts)}" if consts["WINDOW"] else ""


def _label(c: fc.Config) -> str:
    return f"{c.block_m}x{c.block_n} w{c.num_warps} s{c.num_stages}"


def _print_tuning(name: str, q: torch.Tensor, t_q: int, t_k: int, cfg: fc.Config, timings: dict,
                  consts: dict) -> None:
    """One line per tuning (to stderr: stdout may be a sample's text): the pick and every timing."""
    others = ", ".join(f"{_label(c)} {ms * 1000:.1f} us" for c, ms in sorted(timings.items(), key=lambda kv: kv[1]))
    print(f"flash tuning {name} D={q.shape[-1]} {str(q.dtype).replace('torch.', '')} "
          f"T<={fc.bucket(t_q)}x{fc.bucket(t_k)}{_window_label(consts)} on {q.device}: picked {_label(cfg)} ({others})",
          file=sys.stderr, flush=True)


_HOLD_CYCLES = 20_000_000  # about 10 ms of GPU clock: far longer than launching ``reps`` kernels


def _time_ms(run, cfg: fc.Config, reps: int = 10) -> float:
    """Mean ms of one launch over ``reps``, after one warm-up (which compiles). CUDA events only:
    no cache-flush buffer is allocated, so tuning adds nothing to the run's peak memory.

    A short kernel (tens of microseconds at T <= 1024) runs faster than Python can launch it, so
    timing back-to-back launches would time the launching, the same for every config. The stream
    is first held by a GPU spin (``torch.cuda._sleep``) while the launches queue up behind it; the
    events then time the kernels alone, as they run in training, where the CPU runs ahead."""
    run(cfg)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    hold = getattr(torch.cuda, "_sleep", None)
    if hold is not None:
        hold(_HOLD_CYCLES)
    start.record()
    for _ in range(reps):
        run(cfg)
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps


# ----------------------------------------------------------------------------- eager launch plans


class _Launch:
    """One kernel at one config and grid, launched with as little Python per call as Triton allows.

    The first call goes through Triton's ``JITFunction`` (which compiles) and returns the compiled
    kernel. The second goes through it again while a spy on that binary's launcher records the
    arguments Triton hands it (``_learn``): the nine launch arguments, then the kernel arguments,
    whose trailing constexprs differ between Triton versions. From the third call on, this class
    calls the launcher itself with the same layout, skipping ``JITFunction.run``'s argument binding,
    specialization and cache lookup. That is safe because a plan's key fixes every value Triton
    specializes a binary on (the int arguments: shapes and strides; the dtypes; the 16-byte
    alignment of every pointer); only the stream and the tensors themselves change. If what was
    recorded is not the expected layout, or a launch hook is set (a profiler such as proton), every
    launch keeps going through Triton."""

    __slots__ = ("kernel", "grid", "meta", "compiled", "tail", "first", "direct")

    def __init__(self, fk, name: str, cfg: fc.Config, grid_: tuple, consts: dict):
        self.kernel, self.grid = fk.KERNELS[name], grid_
        self.meta = meta(name, cfg, consts, fk.INTERPRETED)
        self.compiled, self.tail, self.first, self.direct = None, (), None, not fk.INTERPRETED

    def __call__(self, stream, *args) -> None:
        c = self.compiled
        if c is not None:
            c.run(self.grid[0], self.grid[1], 1, stream, c.function, c.packed_metadata, None, None, None,
                  *args, *self.tail)
        elif self.direct and self.first is not None:
            self._learn(args)
        else:
            self.first = self.kernel[self.grid](*args, **self.meta)

    def _learn(self, args: tuple) -> None:
        """Launch through the JIT once more, recording what it hands the binary's launcher."""
        binary, seen = self.first, []
        launcher = binary.run  # Triton 3.9: a property over ``_run``; older releases: an attribute
        attr = "_run" if isinstance(getattr(type(binary), "run", None), property) else "run"

        def spy(*launch_args):
            seen.append(launch_args)
            return launcher(*launch_args)

        setattr(binary, attr, spy)
        try:
            returned = self.kernel[self.grid](*args, **self.meta)
        finally:
            setattr(binary, attr, launcher)
        n = len(args)
        if (returned is binary and len(seen) == 1 and len(seen[0]) >= 9 + n
                and tuple(seen[0][:3]) == (self.grid[0], self.grid[1], 1) and seen[0][4] is binary.function
                and seen[0][5] is binary.packed_metadata and seen[0][6:9] == (None, None, None)
                and all(a is b for a, b in zip(seen[0][9:9 + n], args))):
            self.compiled, self.tail = binary, tuple(seen[0][9 + n:])
        else:  # an unexpected layout or a launch hook: keep launching through Triton
            self.direct = False


class Plan:
    """Everything about a forward+backward that depends only on the key: checked inputs, output
    shapes, configs, grids, stride tuples and the launches (the backward's per dO layout)."""

    def __init__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, window: int | None = None):
        self.fk = kernels_for(q)
        B, H, self.t_q, D = q.shape
        self.t_k, self.h, self.causal = k.shape[2], H, causal
        self.device, self.dtype, self.scale = q.device, q.dtype, resolve_scale(None, D)
        self.gpu = q.device.index if q.device.type == "cuda" else None
        self.stream = self.fk.triton.runtime.driver.active.get_current_stream if self.gpu is not None else None
        self.o_shape, self.lse_shape, self.kv_shape = (B, H, self.t_q, D), (B, H, self.t_q), tuple(k.shape)
        self.consts = constexprs(self.fk, q, causal, window)
        self.qkv_strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3])
        self.fwd_tail = (*self.qkv_strides, H, self.t_q, self.t_k)
        self.fwd: _Launch | None = None
        self.bwd: dict = {}  # (dO strides, dO alignment) -> (preprocess, dkdv, dq) launches

    def _make(self, name: str, q: torch.Tensor, args: tuple | None) -> _Launch:
        cfg = config(self.fk, name, q, self.t_q, self.t_k, self.consts, args)
        return _Launch(self.fk, name, cfg, grid(name, cfg, self.t_q, self.t_k, self.o_shape[0] * self.h), self.consts)

    def _run(self, calls: tuple) -> None:
        """Launch ``(launch, args)`` pairs on the tensors' GPU's current stream (or the interpreter)."""
        if self.gpu is None:
            for launch, args in calls:
                launch(0, *args)
        elif self.gpu == torch.cuda.current_device():
            stream = self.stream(self.gpu)
            for launch, args in calls:
                launch(stream, *args)
        else:
            with torch.cuda.device(self.gpu):
                self._run(calls)

    def forward(self, q, k, v, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        o = torch.empty(self.o_shape, dtype=self.dtype, device=self.device)
        lse = torch.empty(self.lse_shape, dtype=torch.float32, device=self.device)
        args = (q, k, v, o, lse, *self.fwd_tail, scale * LOG2E)
        if self.fwd is None:
            with on_device(q):
                self.fwd = self._make("fwd", q, args)
        self._run(((self.fwd, args),))
        return o, lse

    def backward(self, q, k, v, o, lse, do, scale: float) -> tuple[torch.Tensor, ...]:
        do = unit_last_stride(do)
        dq = torch.empty(self.o_shape, dtype=self.dtype, device=self.device)
        dk = torch.empty(self.kv_shape, dtype=self.dtype, device=self.device)
        dv = torch.empty(self.kv_shape, dtype=self.dtype, device=self.device)
        delta = torch.empty(self.lse_shape, dtype=torch.float32, device=self.device)
        do_strides = do.stride()[:3]
        tail = (*self.qkv_strides, *do_strides, self.h, self.t_q, self.t_k, scale * LOG2E, scale)
        pre_args = (o, do, delta, *do_strides, self.h, self.t_q)
        dkdv_args = (q, k, v, do, lse, delta, dk, dv, *tail)
        dq_args = (q, k, v, do, lse, delta, dq, *tail)
        launches = self.bwd.get((do_strides, do.data_ptr() % 16))
        if launches is None:
            with on_device(q):
                pre = self._make("preprocess", q, None)
                self._run(((pre, pre_args),))  # dK/dV and dQ are tuned on this call's delta
                launches = (pre, self._make("dkdv", q, dkdv_args), self._make("dq", q, dq_args))
            self.bwd[(do_strides, do.data_ptr() % 16)] = launches
        self._run(tuple(zip(launches, (pre_args, dkdv_args, dq_args))))
        return dq, dk, dv


PLANS: dict = {}  # key(q, k, v, causal, window) -> Plan


def key(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal, window: int | None = None) -> tuple:
    """Every value a plan depends on: shapes, strides, dtypes, devices, pointer alignment, the mask
    and its window (checked by the caller: True would hash as 1), and the global settings that
    change a config (deterministic algorithms, TF32 for fp32)."""
    return (q.shape, k.shape, v.shape, q.stride(), k.stride(), v.stride(), q.dtype, k.dtype, v.dtype,
            q.device, k.device, v.device, q.data_ptr() % 16, k.data_ptr() % 16, v.data_ptr() % 16, bool(causal),
            window, torch.are_deterministic_algorithms_enabled(),
            q.dtype is torch.float32 and q.is_cuda and tf32_enabled())


def plan_for(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal, window: int | None = None) -> Plan:
    """The launch plan of these inputs, made (inputs checked, configs chosen) on first sight."""
    plan_key = key(q, k, v, causal, window)
    plan = PLANS.get(plan_key)
    if plan is None:
        check(q, k, v)
        check_window(window, causal, "flash_attention")
        plan = PLANS[plan_key] = Plan(q, k, v, bool(causal), window)
    return plan

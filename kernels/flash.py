"""FlashAttention-2 in Triton: ``flash_attention(q, k, v, causal=True, scale=None)``.

The kernels live in ``kernels/flash_triton.py`` and are imported on the first call, so importing
this module never imports Triton. On CUDA the kernels are compiled, and each is launched with a
config from ``kernels/flash_configs.py`` that fits the GPU's shared memory, tuned once per bucket
of sequence lengths (pinned under ``torch.use_deterministic_algorithms(True)``). On a CPU they run
only under Triton's interpreter (``TRITON_INTERPRET=1`` set before Python starts), slowly but with
the same code. There is no silent fallback to another implementation.

The kernel is registered as the custom ops ``gptlab::flash_attn_fwd`` / ``gptlab::flash_attn_bwd``
with fake (meta) implementations, so ``torch.compile`` traces models that use it without graph
breaks, and autograd runs the Triton backward. Eager calls launch the same kernels through a
plain ``torch.autograd.Function`` instead, which costs far less host time per call.

``TRITON_PRINT_AUTOTUNING=1`` (Triton's own switch) prints one line to stderr per tuning: the
kernel, head dim, dtype, length bucket, the config picked and every candidate's time.

Supported: head dims 16, 32, 64, 128 (others raise rather than being padded, so the cost of a
padded head never hides in a benchmark); fp16, bf16 and fp32 inputs, accumulated in fp32. fp32
inputs multiply in full fp32 (``input_precision="ieee"``) unless TF32 is enabled for matmuls
(``torch.backends.cuda.matmul.fp32_precision = "tf32"``, the trainer's ``tf32=true``), in which
case they use TF32 like every other fp32 matmul of the run. Causal attention with Tq != Tk uses
the end-aligned mask (a KV cache's new queries see the whole cache). Any (batch, head, time)
strides are read directly; a non-unit stride along D is copied first.
"""
from __future__ import annotations

import contextlib
import functools
import os
import sys

import torch

from kernels import UnavailableError, UnsupportedError, check_qkv, resolve_scale, tf32_enabled
from kernels import flash_configs as fc

SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_LOG2E = 1.4426950408889634

_NO_INTERPRETER = (
    "flash_attention got CPU tensors, but without a GPU its Triton kernel runs only under Triton's "
    "interpreter: set TRITON_INTERPRET=1 before starting Python to run the real kernel (slowly) on "
    "the CPU, or use attn=online"
)


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> None:
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
    return torch.cuda.get_device_capability(index)  # read once per GPU: every launch checks it


def _kernels(q: torch.Tensor):
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


def _on_device(t: torch.Tensor):
    """Triton launches on the current CUDA device: make it the tensor's for the launch."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def _unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    # kernels assume unit stride along D (vectorized loads); B, H, T strides may be anything
    return t if t.stride(-1) == 1 else t.contiguous()


def _constexprs(fk, q: torch.Tensor, causal: bool) -> dict:
    """The dtype-dependent flags every attention kernel takes, by name."""
    tf32 = q.dtype == torch.float32 and q.device.type == "cuda" and tf32_enabled()
    return dict(
        HEAD_D=q.shape[-1], CAUSAL=causal,
        UPCAST=fk.INTERPRETED and q.dtype == torch.bfloat16,  # the interpreter's bf16 tl.dot is wrong
        PRECISION="tf32" if tf32 else "ieee",  # only fp32 operands read it
    )


_TUNED: dict = {}  # (kernel, D, bytes, device, dtype, causal, precision, T buckets) -> Config
_GPUS: dict = {}  # CUDA device index -> (opt-in shared memory per block, 10 * major + minor)


def _gpu(fk, device: torch.device) -> tuple[int, int]:
    if device.index not in _GPUS:
        props = fk.triton.runtime.driver.active.utils.get_device_properties(device.index)
        major, minor = _capability(device.index)
        _GPUS[device.index] = (int(props["max_shared_mem"]), 10 * major + minor)
    return _GPUS[device.index]


def _launch(fk, name: str, q: torch.Tensor, t_q: int, t_k: int, args: tuple, consts: dict) -> None:
    """Launch kernel ``name`` (one program per row block x batch*head) with its chosen config."""
    kernel = fk.KERNELS[name]
    n_bh = q.shape[0] * q.shape[1]

    def run(cfg: fc.Config) -> None:
        rows, block = (t_k, cfg.block_n) if name == "dkdv" else (t_q, cfg.block_m)
        opts = {} if fk.INTERPRETED else dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        kernel[(-(-rows // block), n_bh)](*args, **consts, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, **opts)

    if fk.INTERPRETED:
        return run(fc.INTERPRETER[name])
    key = (q.device.index, str(q.dtype), consts["CAUSAL"], consts["PRECISION"])
    shared, capability = _gpu(fk, q.device)
    timings: dict = {}

    def time_ms(c: fc.Config) -> float:
        timings[c] = _time_ms(run, c)
        return timings[c]

    cfg = fc.choose(name, consts["HEAD_D"], q.element_size(), shared, t_q, t_k, key, time_ms,
                    _TUNED, torch.are_deterministic_algorithms_enabled(), capability)
    if timings and os.environ.get("TRITON_PRINT_AUTOTUNING") == "1":  # Triton's own switch for this
        _print_tuning(name, q, t_q, t_k, cfg, timings)
    run(cfg)


def _print_tuning(name: str, q: torch.Tensor, t_q: int, t_k: int, cfg: fc.Config, timings: dict) -> None:
    """One line per tuning (to stderr: stdout may be a sample's text): the pick and every timing."""
    def label(c: fc.Config) -> str:
        return f"{c.block_m}x{c.block_n} w{c.num_warps} s{c.num_stages}"

    others = ", ".join(f"{label(c)} {ms * 1000:.1f} us" for c, ms in sorted(timings.items(), key=lambda kv: kv[1]))
    print(f"flash tuning {name} D={q.shape[-1]} {str(q.dtype).replace('torch.', '')} "
          f"T<={fc.bucket(t_q)}x{fc.bucket(t_k)} on {q.device}: picked {label(cfg)} ({others})",
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


def _forward(q, k, v, causal: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    fk = _kernels(q)
    B, H, T_Q, D = q.shape
    T_K = k.shape[2]
    o = torch.empty((B, H, T_Q, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, T_Q), dtype=torch.float32, device=q.device)
    args = (q, k, v, o, lse, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], H, T_Q, T_K, scale * _LOG2E)
    with _on_device(q):
        _launch(fk, "fwd", q, T_Q, T_K, args, _constexprs(fk, q, causal))
    return o, lse


def _backward(q, k, v, o, lse, do, causal: bool, scale: float) -> tuple[torch.Tensor, ...]:
    fk = _kernels(q)
    B, H, T_Q, D = q.shape
    T_K = k.shape[2]
    consts = _constexprs(fk, q, causal)
    dq = torch.empty((B, H, T_Q, D), dtype=q.dtype, device=q.device)
    dk = torch.empty((B, H, T_K, D), dtype=k.dtype, device=k.device)
    dv = torch.empty_like(dk)
    delta = torch.empty_like(lse)
    strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3])
    scalars = (H, T_Q, T_K, scale * _LOG2E, scale)
    with _on_device(q):
        pre = fc.INTERPRETER["preprocess"] if fk.INTERPRETED else fc.PREPROCESS
        opts = {} if fk.INTERPRETED else dict(num_warps=pre.num_warps)
        fk.KERNELS["preprocess"][(-(-T_Q // pre.block_m), B * H)](
            o, do, delta, *do.stride()[:3], H, T_Q, HEAD_D=D, BLOCK_M=pre.block_m, **opts)
        _launch(fk, "dkdv", q, T_Q, T_K, (q, k, v, do, lse, delta, dk, dv, *strides, *scalars), consts)
        _launch(fk, "dq", q, T_Q, T_K, (q, k, v, do, lse, delta, dq, *strides, *scalars), consts)
    return dq, dk, dv


# ----------------------------------------------------------------------------- custom ops


@torch.library.custom_op("gptlab::flash_attn_fwd", mutates_args=())
def flash_attn_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse): the attention output and each row's natural-log log-sum-exp (float32)."""
    return _forward(q, k, v, causal, scale)


@flash_attn_fwd.register_fake
def _(q, k, v, causal, scale):
    B, H, T_Q, D = q.shape
    return q.new_empty((B, H, T_Q, D)), q.new_empty((B, H, T_Q), dtype=torch.float32)


@torch.library.custom_op("gptlab::flash_attn_bwd", mutates_args=())
def flash_attn_bwd(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
    causal: bool, scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) from the forward's saved tensors; P is recomputed from lse, never stored."""
    return _backward(q, k, v, o, lse, _unit_last_stride(do), causal, scale)


@flash_attn_bwd.register_fake
def _(do, q, k, v, o, lse, causal, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _save(ctx, inputs: tuple, o: torch.Tensor, lse: torch.Tensor) -> None:
    """What both autograd paths keep for the backward: the inputs, the output and its LSE."""
    q, k, v, causal, scale = inputs
    ctx.save_for_backward(q, k, v, o, lse)
    ctx.causal, ctx.scale = causal, scale


def _setup_context(ctx, inputs, output) -> None:
    _save(ctx, inputs, *output)
    ctx.mark_non_differentiable(output[1])  # lse


def _backward_rule(ctx, do, _dlse):
    q, k, v, o, lse = ctx.saved_tensors
    dq, dk, dv = flash_attn_bwd(do, q, k, v, o, lse, ctx.causal, ctx.scale)
    return dq, dk, dv, None, None


flash_attn_fwd.register_autograd(_backward_rule, setup_context=_setup_context)


# ----------------------------------------------------------------------------- eager path


class _FlashFunction(torch.autograd.Function):
    """The eager path: the custom ops' kernels behind autograd's cheapest Python wrapper.

    On an H200 a forward+backward through the registered ``torch.library`` op took 0.73-0.88 ms
    of host time at T=512-1024, where its kernels ran in 0.06-0.16 ms; this path took 0.55-0.59 ms
    (the op's dispatch, its autograd wrapper's argument handling and the zeros it makes for the
    unused LSE gradient are gone). torch.compile, fake tensors and dispatch modes still see the op."""

    @staticmethod
    def forward(ctx, q, k, v, causal: bool, scale: float):
        o, lse = _forward(q, k, v, causal, scale)
        _save(ctx, (q, k, v, causal, scale), o, lse)
        return o

    @staticmethod
    @torch.autograd.function.once_differentiable  # no double backward: say so instead of a silent zero
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = _backward(q, k, v, o, lse, _unit_last_stride(do), ctx.causal, ctx.scale)
        return dq, dk, dv, None, None


def _needs_op(q: torch.Tensor) -> bool:
    """Whether this call must go through the registered op: under torch.compile / export, with
    tensor subclasses (fake tensors), or inside a dispatch mode (they see ops, not launches)."""
    return (torch.compiler.is_compiling() or type(q) is not torch.Tensor
            or torch.utils._python_dispatch._get_current_dispatch_mode() is not None)


def flash_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True, scale: float | None = None,
    window: int | None = None,
) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v on (B, H, T, D) tensors with the Triton FlashAttention-2 kernels."""
    if window is not None:  # the kernels' window (skipping tiles outside it) comes with the flash rewrite
        raise UnsupportedError(f"flash_attention: window={window} (sliding-window attention) is not supported "
                               "by the flash kernel yet; use attn=online (blockwise, skips tiles outside the "
                               "window), attn=sdpa or attn=naive")
    _check(q, k, v, causal)
    q, k, v = (_unit_last_stride(t) for t in (q, k, v))
    causal, scale = bool(causal), resolve_scale(scale, q.shape[-1])
    if _needs_op(q):
        return flash_attn_fwd(q, k, v, causal, scale)[0]
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return _FlashFunction.apply(q, k, v, causal, scale)
    return _forward(q, k, v, causal, scale)[0]

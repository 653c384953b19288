"""Launch configurations of the flash kernels: which configs exist, which fit a GPU, which runs.

Pure Python (no Triton, no CUDA), so CPU tests can check every decision made here:
- ``TARGETS``: the NVIDIA architectures the kernels are built for, with their shared memory;
- ``FAST`` / ``SMALL``: the shipped configs per kernel and head-dim bucket;
- ``shared_bytes_estimate`` / ``candidates``: which configs fit a shared-memory budget (an
  over-estimate, checked against real ahead-of-time compiles by tests/test_flash_aot.py);
- ``choose``: the config a launch uses: pinned (deterministic mode, short or decode shapes, a
  single candidate) or the fastest candidate, measured once per bucket of sequence lengths;
  a trace (``time_ms=None``) only looks the bucket up (``needs_tuning`` says whether it is untuned).
"""
from __future__ import annotations

import functools
from typing import Callable, NamedTuple

from kernels import UnavailableError


class Config(NamedTuple):
    """One launch configuration. BLOCK_M tiles queries and BLOCK_N keys in every kernel."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


# compute capability -> (opt-in shared memory per block in bytes, GPUs). Triton reads the real
# limit from the device at run time; this table is what the ahead-of-time check compiles for.
TARGETS = {
    75: (64 * 1024, "T4, RTX 20xx"),
    80: (163 * 1024, "A100, A30"),
    86: (99 * 1024, "A10, A40, RTX 30xx"),
    89: (99 * 1024, "L4, L40, RTX 40xx"),
    90: (227 * 1024, "H100, H200"),
}
MIN_CAPABILITY = (7, 5)  # older GPUs are not compiled for or tested: flash refuses them

# Tier 1, tuned for A100/H100, keyed by the largest head dim each list serves. The forward and dQ
# kernels keep a query block resident and stream keys; the dK/dV kernel keeps a key block (and two
# fp32 accumulators) resident and streams queries, so it wants a small BLOCK_M. None spills
# registers per ptxas (scripts/bench/flash_aot.py --full --ptxas-info); the 4-warp D=128 variants of
# the D<=64 lists spill 0.1-3.5 KB, hence the separate lists. (64, 32, 4, 3) is there for fp32
# at D=128, whose 4-byte tiles leave it the only fwd/dq fit on an A100.
FAST = {
    "fwd": {
        64: [Config(128, 64, 4, 3), Config(128, 64, 8, 3), Config(128, 128, 8, 2), Config(64, 64, 4, 4)],
        128: [Config(128, 64, 8, 3), Config(128, 32, 8, 4), Config(64, 64, 4, 4), Config(64, 64, 4, 3),
              Config(64, 32, 4, 3)],
    },
    "dkdv": {
        64: [Config(32, 128, 8, 3), Config(64, 128, 8, 2), Config(32, 64, 4, 4)],
        128: [Config(32, 64, 8, 3), Config(64, 64, 8, 3), Config(16, 128, 8, 3), Config(16, 64, 4, 4)],
    },
    "dq": {
        64: [Config(128, 32, 8, 3), Config(64, 32, 4, 4), Config(64, 64, 4, 3), Config(128, 64, 8, 3)],
        128: [Config(64, 32, 4, 4), Config(64, 64, 4, 3), Config(64, 64, 8, 3), Config(64, 32, 4, 3)],
    },
}

# Tier 2, used only where no tier-1 config fits: fp32 on ~99 KB parts (sm_86/sm_89). Two
# pipeline stages and smaller tiles.
SMALL = {
    "fwd": {
        64: [Config(64, 64, 4, 2), Config(64, 32, 4, 2)],
        128: [Config(64, 32, 4, 2), Config(32, 32, 4, 2), Config(32, 16, 4, 2)],
    },
    "dkdv": {
        64: [Config(32, 64, 4, 2), Config(16, 64, 4, 2)],
        128: [Config(16, 64, 4, 2), Config(16, 32, 4, 2), Config(16, 16, 4, 2)],
    },
    "dq": {
        64: [Config(64, 32, 4, 2), Config(32, 32, 4, 2)],
        128: [Config(32, 32, 4, 2), Config(32, 16, 4, 2), Config(16, 16, 4, 2)],
    },
}

# sm_75 (T4, RTX 20xx: 64 KB). Without cp.async Triton stages dot operands through shared memory
# in ways the estimate below does not bound (a 128x128 forward block needs 72 KB there at D=16,
# a 16x64 dK/dV block 72 KB at D=128, estimated 22 and 50). So these GPUs get one small config
# per kernel, checked by compiling it for sm_75 at every head dim and dtype (tests/test_flash_aot.py:
# at most 34 KB of 64), not by the estimate.
TURING = {
    "fwd": {64: [Config(64, 32, 4, 2)], 128: [Config(32, 16, 4, 2)]},
    "dkdv": {64: [Config(32, 32, 4, 2)], 128: [Config(16, 16, 4, 2)]},
    "dq": {64: [Config(64, 32, 4, 2)], 128: [Config(16, 16, 4, 2)]},
}
TUNED_KERNELS = tuple(FAST)
PREPROCESS = Config(64, 0, 4, 1)  # a row reduction: no tiles in shared memory worth tuning

# The interpreter ignores warps, stages and shared memory, and its cost is per program and per
# loop trip, so one large block shape is fastest there.
INTERPRETER = {"fwd": Config(64, 64, 1, 1), "dkdv": Config(64, 64, 1, 1), "dq": Config(64, 64, 1, 1),
               "preprocess": Config(128, 0, 1, 1)}

SHORT_T = 64  # at most one block of queries or keys: the config barely matters, so never tune


def shared_bytes_estimate(kernel: str, config: Config, head_dim: int, elem_bytes: int) -> int:
    """Upper estimate of the shared memory one program of ``kernel`` needs (bytes)."""
    # Tile buffers: with triton 3.9 these match sm_90's allocation to within 1 KB (other targets
    # need less); 2 KB covers the rest. fp32 dots also stage the (BLOCK_M, BLOCK_N) score tile
    # through shared memory (at D=32, sm_80: 96 KB where the tiles alone are 80 KB).
    # tests/test_flash_aot.py checks the estimate stays an upper bound on sm_80 and newer.
    block_m, block_n, _, stages = config
    if kernel == "fwd":  # K and V tiles per pipeline stage, plus Q
        tiles = 2 * block_n * head_dim * stages + block_m * head_dim
    elif kernel == "dkdv":  # Q and dO tiles per stage, plus resident K and V
        tiles = 2 * block_m * head_dim * stages + 2 * block_n * head_dim
    elif kernel == "dq":  # K and V tiles per stage, plus resident Q and dO
        tiles = 2 * block_n * head_dim * stages + 2 * block_m * head_dim
    else:
        raise ValueError(f"unknown kernel {kernel!r}")
    scores = block_m * block_n * 4 if elem_bytes == 4 else 0
    return tiles * elem_bytes + scores + 2048


def shipped(kernel: str, head_dim: int, tier: dict | None = None) -> list[Config]:
    """The configs of ``kernel`` in one tier (default FAST, then SMALL) for this head dim."""
    tiers = [tier] if tier is not None else [FAST, SMALL, TURING]
    out = []
    for table in tiers:
        lists = table[kernel]
        out += lists[min(d for d in lists if d >= head_dim)]
    return out


def candidates(kernel: str, head_dim: int, elem_bytes: int, shared_limit: int, capability: int = 90) -> list[Config]:
    """The configs of ``kernel`` that fit ``shared_limit``: tier 1's if any fits, else tier 2's.
    ``capability`` is 10 * major + minor (e.g. 86); below 80 the sm_75 table is used as is.

    Never a config that does not fit: with none, raise UnavailableError with the remedies.
    """
    if capability < 80:
        return shipped(kernel, head_dim, TURING)
    for tier in (FAST, SMALL):
        fits = [c for c in shipped(kernel, head_dim, tier)
                if shared_bytes_estimate(kernel, c, head_dim, elem_bytes) <= shared_limit]
        if fits:
            return fits
    dtype = {2: "16-bit", 4: "fp32"}.get(elem_bytes, f"{elem_bytes}-byte")
    raise UnavailableError(
        f"flash_attention: no {kernel} kernel config for head dim {head_dim} in {dtype} fits this GPU's "
        f"{shared_limit // 1024} KB of shared memory per block; use precision=bf16 (or fp16), a smaller "
        "head dim, or attn=sdpa"
    )


@functools.lru_cache(maxsize=None)
def _candidates_cached(kernel: str, head_dim: int, elem_bytes: int, shared_limit: int, capability: int) -> tuple:
    # choose() runs at every launch; the answer depends on these five values only
    return tuple(candidates(kernel, head_dim, elem_bytes, shared_limit, capability))


def bucket(t: int) -> int:
    """The power of two at or above ``t``: lengths in one bucket share one tuning result."""
    return 1 << max(int(t) - 1, 0).bit_length()


def tuning_key(kernel: str, head_dim: int, elem_bytes: int, key: tuple, t_q: int, t_k: int) -> tuple:
    """The cache key of one tuning: kernel, head dim, element size, ``key`` and the length buckets."""
    return (kernel, head_dim, elem_bytes, *key, bucket(t_q), bucket(t_k))


def _pinned(configs: tuple, t_q: int, t_k: int, deterministic: bool) -> bool:
    return deterministic or len(configs) == 1 or min(t_q, t_k) <= SHORT_T


def needs_tuning(kernel: str, head_dim: int, elem_bytes: int, shared_limit: int, t_q: int, t_k: int, key: tuple,
                 cache: dict, deterministic: bool = False, capability: int = 90) -> bool:
    """Whether ``choose`` would measure the candidates for this launch (nothing cached for it yet)."""
    configs = _candidates_cached(kernel, head_dim, elem_bytes, shared_limit, capability)
    return not _pinned(configs, t_q, t_k, deterministic) and \
        tuning_key(kernel, head_dim, elem_bytes, key, t_q, t_k) not in cache


def choose(
    kernel: str, head_dim: int, elem_bytes: int, shared_limit: int, t_q: int, t_k: int,
    key: tuple, time_ms: Callable[[Config], float] | None, cache: dict, deterministic: bool = False,
    capability: int = 90,
) -> Config:
    """The config a launch of ``kernel`` uses.

    The first candidate (pinned) when ``deterministic``, for short or decode shapes, or when only
    one fits. Otherwise the fastest candidate by ``time_ms``, measured once per ``key`` and
    bucket of (t_q, t_k), so a new sequence length in a known bucket never re-tunes. With
    ``time_ms=None`` (a trace: tracing never measures) the cached pick, or the pinned candidate
    while the bucket is untuned; nothing is cached then, so a later eager call still tunes it.
    """
    configs = _candidates_cached(kernel, head_dim, elem_bytes, shared_limit, capability)
    if _pinned(configs, t_q, t_k, deterministic):
        return configs[0]
    full_key = tuning_key(kernel, head_dim, elem_bytes, key, t_q, t_k)
    if full_key not in cache:
        if time_ms is None:
            return configs[0]
        cache[full_key] = min(configs, key=time_ms)
    return cache[full_key]

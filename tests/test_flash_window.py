"""flash_attention(..., window=W): sliding-window causal attention against a float64 reference.

Query i of Tq sits at key position ``p = i + (Tk - Tq)`` and sees keys ``p - W < j <= p``; a row
that sees no key outputs zeros (lse = -inf). Without CUDA these run the real Triton kernels in
the interpreter (conftest.py), whose launch configs are 64x64 blocks: windows 1, 7 (inside a
block), 64 (exactly one), 65 and 100 (not multiples) and >= T cross block edges in every way;
mixed block shapes (the GPU's 128x64, 32x128, ...) are run by swapping the interpreter's configs.
Tolerances follow tests/test_flash.py: fp32 2e-5; fp16/bf16 against plain PyTorch in the same
dtype (the same masked softmax), at most 2x (fp16) / 4x (bf16, interpreter truncation) its
error plus slack. The last tests check which tiles the kernels load: exactly the blocks the
window reaches, so the work per block of rows is set by W, not by T.
"""
from __future__ import annotations

import functools
import types

import pytest
import torch

from kernels import check_window
from kernels import flash_configs as fc
from kernels import flash_launch
from kernels.flash import flash_attention

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
LOW_PRECISION_RULE = {torch.float16: (2.0, 1e-3), torch.bfloat16: (4.0, 5e-3)}  # (x plain torch error, slack)


def window_mask(tq: int, tk: int, window: int | None, device=None) -> torch.Tensor:
    """(Tq, Tk), True where query i sees key j: ``p - window < j <= p`` with ``p = i + Tk - Tq``."""
    p = torch.arange(tq, device=device)[:, None] + (tk - tq)
    j = torch.arange(tk, device=device)[None, :]
    return (j <= p) & (j > p - window) if window is not None else j <= p


def masked_attention(q, k, v, window, scale=None, return_lse=False):
    """softmax over the visible keys in q's dtype (float64 for the reference); rows with none -> 0."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = (q @ k.transpose(-2, -1)) * scale
    s = s.masked_fill(~window_mask(q.shape[-2], k.shape[-2], window, q.device), float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse.unsqueeze(-1).clamp_min(torch.finfo(s.dtype).min)).nan_to_num(nan=0.0)
    out = p @ v
    return (out, lse) if return_lse else out


def _inputs(shape_q, shape_k, dtype, seed=0):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    make = lambda shape: torch.randn(shape, generator=g, device=DEVICE, dtype=dtype)  # noqa: E731
    return make(shape_q), make(shape_k), make(shape_k), make(shape_q)


def _run(fn, q, k, v, do):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = fn(*leaves)
    out.backward(do)
    return [out.detach()] + [t.grad for t in leaves]


def errors(q, k, v, do, window, fn=None, scale=None) -> list[float]:
    """Max abs error of (out, dq, dk, dv) of ``fn`` (default: flash) against the float64 reference."""
    fn = fn or functools.partial(flash_attention, causal=True, scale=scale, window=window)
    got = _run(fn, q, k, v, do)
    ref = _run(functools.partial(masked_attention, window=window, scale=scale),
               *(t.double() for t in (q, k, v)), do.double())
    assert got[0].dtype == q.dtype and got[0].shape == q.shape
    return [(a.double() - b).abs().max().item() for a, b in zip(got, ref)]


# (Tq, Tk, D, window), Tq == Tk: windows inside a block, exactly one, not a multiple, >= T; several
# query blocks (130, 200) so whole key blocks are skipped; every head dim
SELF_CASES = [
    (100, 100, 16, 1), (130, 130, 32, 7), (130, 130, 64, 64), (130, 130, 16, 65), (200, 200, 32, 100),
    (200, 200, 16, 129), (64, 64, 128, 20), (100, 100, 128, 70), (17, 17, 32, 3), (130, 130, 32, 130),
    (100, 100, 64, 1000),
]
# KV-cache decoding (Tq = 1, 3 after Tk - Tq cached keys) and Tq > Tk (leading rows see no key)
KV_CASES = [
    (1, 9, 16, 1), (1, 9, 32, 4), (1, 64, 64, 64), (1, 77, 16, 10), (1, 200, 32, 65), (1, 200, 128, 300),
    (3, 9, 16, 2), (3, 65, 32, 64), (3, 130, 16, 5), (3, 200, 64, 100), (17, 100, 16, 30), (70, 130, 32, 64),
    (40, 5, 16, 3), (100, 30, 32, 5), (100, 30, 16, 40),
]


@pytest.mark.parametrize("Tq,Tk,D,window", SELF_CASES + KV_CASES)
def test_fp32_matches_float64_reference(Tq, Tk, D, window):
    q, k, v, do = _inputs((1, 2, Tq, D), (1, 2, Tk, D), torch.float32, seed=Tq + Tk + window)
    errs = errors(q, k, v, do, window)
    assert max(errs) < 2e-5, f"out/dq/dk/dv errors {errs}"


LOW_CASES = [(130, 130, 32, 7), (130, 130, 16, 64), (200, 200, 64, 100), (1, 150, 32, 65), (3, 90, 16, 20),
             (70, 20, 32, 5), (100, 100, 128, 70)]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("Tq,Tk,D,window", LOW_CASES)
def test_low_precision_error_within_plain_torch_baseline(dtype, Tq, Tk, D, window):
    q, k, v, do = _inputs((1, 2, Tq, D), (1, 2, Tk, D), dtype, seed=Tq + window)
    flash = errors(q, k, v, do, window)
    plain = errors(q, k, v, do, window, fn=functools.partial(masked_attention, window=window))
    factor, slack = LOW_PRECISION_RULE[dtype]
    for name, f, n in zip(("out", "dq", "dk", "dv"), flash, plain):
        assert f <= factor * n + slack, f"{name}: flash {f:.2e} vs plain torch {n:.2e}"


@pytest.mark.parametrize("Tq,Tk", [(130, 130), (3, 130), (100, 30)])
def test_a_window_covering_every_key_equals_plain_causal(Tq, Tk):
    # W >= Tk: no key is outside the window; the windowed kernels must give plain causal's result
    # (bitwise in the interpreter: the window loops are empty and the masks keep every score)
    q, k, v, do = _inputs((1, 2, Tq, 32), (1, 2, Tk, 32), torch.float32, seed=5)
    plain = _run(functools.partial(flash_attention, causal=True), q, k, v, do)
    for window in (Tk, Tk + 1, 10_000):
        windowed = _run(functools.partial(flash_attention, causal=True, window=window), q, k, v, do)
        for a, b in zip(windowed, plain):
            if DEVICE == "cpu":
                assert torch.equal(a, b), window
            else:
                torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    narrower = _run(functools.partial(flash_attention, causal=True, window=Tk - 1), q, k, v, do)
    if Tq > 1:  # the last row's window then misses key 0: a different result
        assert not torch.equal(narrower[0], plain[0])


def test_rows_that_see_no_key_output_zeros_and_lse_minus_inf():
    from kernels.flash_ops import flash_attn_fwd

    q, k, v, do = _inputs((1, 2, 20, 16), (1, 2, 6, 16), torch.float32)
    out, lse = flash_attn_fwd(q, k, v, True, 0.25, 3)
    ref_out, ref_lse = masked_attention(q.double(), k.double(), v.double(), 3, scale=0.25, return_lse=True)
    assert torch.equal(out[:, :, :14], torch.zeros_like(out[:, :, :14]))  # rows 0..13 sit before key 0
    assert torch.isneginf(lse[:, :, :14]).all() and torch.isfinite(lse[:, :, 14:]).all()
    torch.testing.assert_close(lse[:, :, 14:].double(), ref_lse[:, :, 14:], atol=2e-5, rtol=0)
    torch.testing.assert_close(out.double(), ref_out, atol=2e-5, rtol=0)
    _, dq, _, _ = _run(functools.partial(flash_attention, window=3), q, k, v, do)
    assert torch.equal(dq[:, :, :14], torch.zeros_like(dq[:, :, :14]))


def test_non_contiguous_inputs_and_grad():
    # the model's layout: q, k, v are transposed views of one (B, T, 3, H, D) projection
    B, T, H, D = 2, 100, 2, 32
    g = torch.Generator(device=DEVICE).manual_seed(1)
    qkv = torch.randn(B, T, 3, H, D, generator=g, device=DEVICE)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # (B, H, T, D), strided
    do = torch.randn(B, T, H, D, generator=g, device=DEVICE).transpose(1, 2)
    assert not q.is_contiguous() and not do.is_contiguous()
    assert max(errors(q, k, v, do, 37)) < 2e-5
    assert max(errors(q, k, v, do, 37, scale=0.3)) < 2e-5


# (fwd and dQ block, dK/dV block) shapes the GPU tables use, scaled down: BLOCK_M != BLOCK_N both ways
MIXED_BLOCKS = [((32, 16), (16, 32)), ((16, 32), (32, 16)), ((64, 16), (16, 64))]


@pytest.fixture
def blocks(monkeypatch, request):
    """Run the interpreter with other block shapes (fresh plans, so configs are chosen again)."""
    (fm, fn), (bm, bn) = request.param
    monkeypatch.setattr(flash_launch, "PLANS", {})
    monkeypatch.setitem(fc.INTERPRETER, "fwd", fc.Config(fm, fn, 1, 1))
    monkeypatch.setitem(fc.INTERPRETER, "dq", fc.Config(fm, fn, 1, 1))
    monkeypatch.setitem(fc.INTERPRETER, "dkdv", fc.Config(bm, bn, 1, 1))
    return request.param


@pytest.mark.skipif(DEVICE != "cpu", reason="swaps the interpreter's block configs")
@pytest.mark.parametrize("blocks", MIXED_BLOCKS, indirect=True, ids=["32x16", "16x32", "64x16"])
@pytest.mark.parametrize("Tq,Tk,window", [(100, 100, 1), (70, 70, 16), (70, 70, 33), (3, 90, 20), (60, 25, 5),
                                          (45, 90, 31)])
def test_mixed_block_shapes_match_float64_reference(blocks, Tq, Tk, window):
    q, k, v, do = _inputs((1, 1, Tq, 16), (1, 1, Tk, 16), torch.float32, seed=Tq + window)
    assert max(errors(q, k, v, do, window)) < 2e-5


# ----------------------------------------------------------------------------- tiles visited


class _TileRecorder:
    """Records, per kernel and program, which tiles of one watched tensor the kernels load: every
    masked load the interpreter executes is checked for pointers into that tensor's storage, and
    the rows it reads (mask true) are kept. One load in a kernel's loop is one tile visited."""

    def __init__(self, monkeypatch, watch: dict):
        from triton.runtime import interpreter

        from kernels import flash_triton

        self.builder, self.watch, self.kernel = interpreter.interpreter_builder, watch, None
        self.loads: dict = {}  # (kernel, program id along axis 0) -> [set of rows, one per load]
        monkeypatch.setattr(flash_launch, "PLANS", {})
        for name, fn in list(flash_triton.KERNELS.items()):
            monkeypatch.setitem(flash_triton.KERNELS, name, self._named(name, fn))
        load = self.builder.create_masked_load
        monkeypatch.setattr(self.builder, "create_masked_load", lambda ptrs, mask, *a: self._load(ptrs, mask) or
                            load(ptrs, mask, *a))

    def _named(self, name, fn):
        recorder = self

        class Named:
            def __getitem__(self, grid):
                launch = fn[grid]

                def run(*args, **kwargs):
                    recorder.kernel = name
                    try:
                        return launch(*args, **kwargs)
                    finally:
                        recorder.kernel = None
                return run
        return Named()

    def _load(self, ptrs, mask) -> None:
        if self.kernel not in self.watch:
            return
        t = self.watch[self.kernel]
        base, row_bytes = t.data_ptr(), t.stride(2) * t.element_size()
        addr = ptrs.data[mask.data.astype(bool)].astype("int64")
        addr = addr[(addr >= base) & (addr < base + t.numel() * t.element_size())]
        if addr.size:
            rows = {int(r) for r in (addr - base) // row_bytes}
            self.loads.setdefault((self.kernel, self.builder.grid_idx[0]), []).append(rows)


def _expected_blocks(mask: torch.Tensor, row_block: int, col_block: int) -> dict:
    """{row block: set of column blocks holding at least one True of ``mask``} (empty ones left out)."""
    out: dict = {}
    for i, j in mask.nonzero().tolist():
        out.setdefault(i // row_block, set()).add(j // col_block)
    return out


def _visited(recorder, kernel: str, block: int) -> dict:
    """{program: set of tile indices it loaded} (only the watched tensor's loop loads are seen)."""
    out = {}
    for (name, pid), loads in recorder.loads.items():
        if name == kernel:
            tiles = [min(rows) // block for rows in loads]
            assert len(tiles) == len(set(tiles)), (kernel, pid, tiles)  # no tile loaded twice
            if tiles:
                out[pid] = set(tiles)
    return out


def _tiles(monkeypatch, Tq, Tk, window):
    """Run forward+backward with K watched in the forward and dQ kernels and Q in dK/dV; return
    {kernel: {program: tiles}} and the expected {kernel: {program: tiles}} from the mask."""
    q, k, v, do = _inputs((1, 1, Tq, 16), (1, 1, Tk, 16), torch.float32)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    rec = _TileRecorder(monkeypatch, {"fwd": leaves[1], "dq": leaves[1], "dkdv": leaves[0]})
    flash_attention(*leaves, window=window).backward(do)
    cfg = fc.INTERPRETER
    mask = window_mask(Tq, Tk, window)
    got = {"fwd": _visited(rec, "fwd", cfg["fwd"].block_n), "dq": _visited(rec, "dq", cfg["dq"].block_n),
           "dkdv": _visited(rec, "dkdv", cfg["dkdv"].block_m)}
    want = {"fwd": _expected_blocks(mask, cfg["fwd"].block_m, cfg["fwd"].block_n),
            "dq": _expected_blocks(mask, cfg["dq"].block_m, cfg["dq"].block_n),
            "dkdv": _expected_blocks(mask.T, cfg["dkdv"].block_n, cfg["dkdv"].block_m)}
    return got, want


@pytest.mark.skipif(DEVICE != "cpu", reason="counts the interpreter's loads")
@pytest.mark.parametrize("Tq,Tk,window", [(256, 256, 1), (256, 256, 8), (256, 256, 64), (256, 256, 100),
                                          (200, 200, 129), (1, 200, 10), (3, 200, 70), (100, 30, 5),
                                          (200, 200, None)])
def test_each_kernel_loads_exactly_the_tiles_its_window_reaches(monkeypatch, Tq, Tk, window):
    # forward and dQ: a query block's loop visits the key blocks some row's window reaches, and no
    # other; dK/dV: a key block's loop visits the query blocks whose windows include one of its keys
    got, want = _tiles(monkeypatch, Tq, Tk, window)
    assert got == want


@pytest.mark.skipif(DEVICE != "cpu", reason="counts the interpreter's loads")
@pytest.mark.parametrize("blocks", MIXED_BLOCKS[:2], indirect=True, ids=["32x16", "16x32"])
def test_mixed_block_shapes_load_exactly_the_tiles_the_window_reaches(monkeypatch, blocks):
    for Tq, Tk, window in [(100, 100, 1), (100, 100, 20), (3, 90, 33), (60, 25, 5)]:
        got, want = _tiles(monkeypatch, Tq, Tk, window)
        assert got == want, (Tq, Tk, window)


@pytest.mark.skipif(DEVICE != "cpu", reason="counts the interpreter's loads")
def test_tiles_per_program_depend_on_the_window_not_on_T(monkeypatch):
    most = {}
    for T in (192, 512):
        for window in (8, 100, None):
            got, _ = _tiles(monkeypatch, T, T, window)
            most[T, window] = {kernel: max(map(len, progs.values())) for kernel, progs in got.items()}
    # 64-wide blocks: a window of 8 reaches back into at most one earlier block, 100 into two
    assert most[192, 8] == most[512, 8] == {"fwd": 2, "dq": 2, "dkdv": 2}
    assert most[192, 100] == most[512, 100] == {"fwd": 3, "dq": 3, "dkdv": 3}
    assert most[192, None] == {"fwd": 3, "dq": 3, "dkdv": 3}  # causal: the last block sees them all
    assert most[512, None] == {"fwd": 8, "dq": 8, "dkdv": 8}


# ----------------------------------------------------------------------------- interface


@pytest.mark.parametrize("window", [0, -3, 2.0, "4", True, False, torch.tensor(3)])
def test_bad_window_is_a_one_line_value_error_naming_it(window):
    q, k, v, _ = _inputs((1, 2, 8, 16), (1, 2, 8, 16), torch.float32)
    with pytest.raises(ValueError, match="flash_attention: window must be a positive integer") as info:
        flash_attention(q, k, v, window=window)
    assert f"got {window!r}" in str(info.value) and "\n" not in str(info.value)


def test_window_needs_causal():
    q, k, v, _ = _inputs((1, 2, 8, 16), (1, 2, 8, 16), torch.float32)
    needs_causal = r"^flash_attention: window=4 is a causal sliding window; it needs causal=True$"
    with pytest.raises(ValueError, match=needs_causal):
        flash_attention(q, k, v, causal=False, window=4)
    assert flash_attention(q, k, v, causal=False, window=None).shape == q.shape


def test_check_window_messages():
    check_window(None, False, "x")
    check_window(1, True, "x")
    positive = r"^x: window must be a positive integer \(keys a query sees\) or None, got "
    with pytest.raises(ValueError, match=positive + "0$"):
        check_window(0, True, "x")
    with pytest.raises(ValueError, match=positive + "True$"):
        check_window(True, True, "x")
    with pytest.raises(ValueError, match=r"^x: window=5 is a causal sliding window; it needs causal=True$"):
        check_window(5, False, "x")


def test_a_plan_per_window_and_true_never_finds_window_ones_plan(monkeypatch):
    monkeypatch.setattr(flash_launch, "PLANS", {})
    q, k, v, _ = _inputs((1, 2, 40, 16), (1, 2, 40, 16), torch.float32)
    plain = flash_attention(q, k, v)
    one = flash_attention(q, k, v, window=1)
    torch.testing.assert_close(one, v, atol=1e-6, rtol=0)  # each query sees only its own key
    assert torch.equal(flash_attention(q, k, v, window=1), one)
    flash_attention(q, k, v, window=9)
    assert len(flash_launch.PLANS) == 3
    assert {p.consts["WINDOW"] for p in flash_launch.PLANS.values()} == {0, 1, 9}
    with pytest.raises(ValueError, match="got True"):
        flash_attention(q, k, v, window=True)
    assert torch.equal(flash_attention(q, k, v, window=None), plain)


def test_tuning_is_cached_per_window_bucket(monkeypatch):
    # GPU launch path with the kernels and timing mocked (as in test_flash_configs.py): a window
    # tunes its bucket once; another window in the bucket reuses the pick; another bucket tunes
    launched = []

    class FakeKernel:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            return lambda *args, WINDOW, BLOCK_M, BLOCK_N, **kw: launched.append((self.name, WINDOW, BLOCK_M, BLOCK_N))

    fake = types.SimpleNamespace(INTERPRETED=False, KERNELS={n: FakeKernel(n) for n in ("fwd", "dkdv", "dq")})
    monkeypatch.setattr(flash_launch, "kernels_for", lambda q: fake)
    monkeypatch.setattr(flash_launch, "PLANS", {})
    monkeypatch.setattr(flash_launch, "_gpu", lambda fk, device: (fc.TARGETS[90][0], 90))
    monkeypatch.setattr(flash_launch, "TUNED", {})
    monkeypatch.setattr(flash_launch, "_time_ms", lambda run, cfg, reps=10: run(cfg) or 1.0)
    n_configs = len(fc.candidates("fwd", 64, 2, fc.TARGETS[90][0], 90))
    q = torch.zeros(1, 2, 1000, 64, dtype=torch.bfloat16)
    counts = []
    for window in (100, 120, 300, None):
        launched.clear()
        flash_attention(q, q, q, window=window)
        assert {w for _, w, *_ in launched} == {window or 0}
        counts.append(len(launched))
    assert counts == [n_configs + 1, 1, n_configs + 1, n_configs + 1]  # 100 and 120 share bucket 128
    assert sorted(key[7] for key in flash_launch.TUNED) == [0, 128, 512]


def test_registered_op_passes_opcheck_with_a_window():
    from kernels.flash_ops import flash_attn_fwd

    q, k, v, _ = _inputs((1, 2, 16, 16), (1, 2, 24, 16), torch.float32)
    torch.library.opcheck(flash_attn_fwd, (q, k, v, True, 0.25, 5))
    with pytest.raises(ValueError, match="gptlab::flash_attn_fwd: window must be a positive integer"):
        flash_attn_fwd(q, k, v, True, 0.25, 0)


def test_eager_path_equals_the_registered_op_bitwise():
    from kernels.flash_ops import flash_attn_fwd

    q, k, v, do = _inputs((2, 2, 50, 32), (2, 2, 70, 32), torch.float32)
    eager = _run(functools.partial(flash_attention, causal=True, scale=0.2, window=13), q, k, v, do)
    op = _run(lambda q, k, v: flash_attn_fwd(q, k, v, True, 0.2, 13)[0], q, k, v, do)
    for a, b in zip(eager, op):
        assert torch.equal(a, b)


def test_compiled_fullgraph_matches_eager():
    q, k, v, do = _inputs((1, 2, 80, 16), (1, 2, 80, 16), torch.float32)

    def step(q, k, v):
        return (flash_attention(q, k, v, causal=True, window=20) * do).sum()

    results = [_run(fn, q, k, v, torch.tensor(1.0)) for fn in (step, torch.compile(step, fullgraph=True,
                                                                                   backend="aot_eager"))]
    for eager, compiled in zip(*results):
        torch.testing.assert_close(compiled, eager, atol=0, rtol=0)


@pytest.mark.skipif(DEVICE != "cpu", reason="the interpreted run of the benchmark's --window mode")
def test_bench_attention_window_mode_times_each_window_beside_causal(capsys):
    import importlib
    import sys
    from pathlib import Path

    bench_dir = str(Path(__file__).resolve().parents[1] / "scripts" / "bench")
    sys.path.insert(0, bench_dir)
    try:
        ba = importlib.import_module("bench_attention")
        ba.main(["--window", "8", "40", "--seq-lens", "64", "100", "--heads", "1", "--head-dim", "16",
                 "--repeats", "1", "--device", "cpu"])
        rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "ms" not in line]
        assert [r.split(" | ")[:2] for r in rows] == [[f"| {T}", name] for T in (64, 100)
                                                       for name in ("causal", "window=8", "window=40")]
        assert all(r.endswith("1.00x |") for r in rows if "causal" in r)
        with pytest.raises(SystemExit, match="drop --no-causal"):
            ba.main(["--window", "8", "--no-causal", "--device", "cpu"])
    finally:
        sys.path.remove(bench_dir)

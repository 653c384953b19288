"""kernels/flash_configs.py: which launch configs fit each GPU, and which one a launch uses.

Pure Python (no Triton, no GPU). That the shared-memory estimate used here is an upper bound on
what the compiled kernels really use is checked by tests/test_flash_aot.py.
"""
from __future__ import annotations

import pytest

from kernels import flash_configs as fc
from kernels.flash import SUPPORTED_HEAD_DIMS
from kernels import UnavailableError
from trainer.errors import user_errors

ELEM_BYTES = {"16-bit": 2, "fp32": 4}


@pytest.mark.parametrize("cc", sorted(fc.TARGETS))
@pytest.mark.parametrize("kernel", fc.TUNED_KERNELS)
def test_every_target_has_fitting_configs_for_every_head_dim_and_dtype(cc, kernel):
    limit = fc.TARGETS[cc][0]
    for d in SUPPORTED_HEAD_DIMS:
        for nbytes in ELEM_BYTES.values():
            configs = fc.candidates(kernel, d, nbytes, limit, cc)
            assert configs, (cc, kernel, d, nbytes)
            for c in configs:  # never a config whose estimate exceeds the limit
                if cc >= 80:  # sm_75's table is checked by compiling it (test_flash_aot.py)
                    assert fc.shared_bytes_estimate(kernel, c, d, nbytes) <= limit, (cc, kernel, d, nbytes, c)
                assert c in fc.shipped(kernel, d)


def test_large_gpus_use_the_tuned_tier_and_small_ones_fall_back():
    # A100/H100 16-bit: only tier-1 configs; fp32 D=128 on a 99 KB part needs tier 2; sm_75 (no
    # cp.async: the estimate does not bound its shared memory) always uses its own table
    a100, sm86, sm75 = fc.TARGETS[80][0], fc.TARGETS[86][0], fc.TARGETS[75][0]
    for kernel in fc.TUNED_KERNELS:
        assert set(fc.candidates(kernel, 64, 2, a100, 80)) <= set(fc.FAST[kernel][64])
        assert set(fc.candidates(kernel, 128, 4, sm86, 86)) <= set(fc.SMALL[kernel][128])
        for d in SUPPORTED_HEAD_DIMS:
            for nbytes in ELEM_BYTES.values():
                assert fc.candidates(kernel, d, nbytes, sm75, 75) == fc.shipped(kernel, d, fc.TURING)


def test_no_fitting_config_raises_one_line_user_error():
    with pytest.raises(UnavailableError, match="precision=bf16") as info:
        fc.candidates("dkdv", 128, 4, 32 * 1024)
    assert isinstance(info.value, user_errors())
    assert "attn=sdpa" in str(info.value) and "32 KB" in str(info.value) and "\n" not in str(info.value)


def test_estimate_grows_with_tiles_stages_and_element_size():
    c = fc.Config(64, 64, 4, 3)
    for kernel in fc.TUNED_KERNELS:
        base = fc.shared_bytes_estimate(kernel, c, 64, 2)
        assert fc.shared_bytes_estimate(kernel, c, 64, 4) > base
        assert fc.shared_bytes_estimate(kernel, c, 128, 2) > base
        assert fc.shared_bytes_estimate(kernel, c._replace(num_stages=4), 64, 2) > base
    with pytest.raises(ValueError, match="unknown kernel"):
        fc.shared_bytes_estimate("nope", c, 64, 2)


@pytest.mark.parametrize("t,expected", [(1, 1), (2, 2), (3, 4), (64, 64), (65, 128), (1000, 1024),
                                        (1024, 1024), (1025, 2048), (4096, 4096)])
def test_bucket_is_next_power_of_two(t, expected):
    assert fc.bucket(t) == expected


class Timer:
    """A fake benchmark: config -> ms, counting the measurements taken."""

    def __init__(self, best: fc.Config | None = None):
        self.calls, self.best = [], best

    def __call__(self, cfg: fc.Config) -> float:
        self.calls.append(cfg)
        return 1.0 if cfg == self.best else 2.0 + len(self.calls) * 1e-3


def _choose(timer, cache, t_q, t_k, deterministic=False, kernel="fwd", limit=fc.TARGETS[90][0], key=(0,), cc=90):
    return fc.choose(kernel, 64, 2, limit, t_q, t_k, key, timer, cache, deterministic, cc)


def test_tuning_runs_once_per_length_bucket():
    configs = fc.candidates("fwd", 64, 2, fc.TARGETS[90][0])
    timer, cache = Timer(best=configs[2]), {}
    assert _choose(timer, cache, 1000, 1000) == configs[2]
    assert len(timer.calls) == len(configs)  # each candidate measured once
    for t in (513, 700, 1024):  # same bucket (1024): no new measurement
        assert _choose(timer, cache, t, t) == configs[2]
    assert len(timer.calls) == len(configs)
    _choose(timer, cache, 2000, 2000)  # a new bucket tunes again
    assert len(timer.calls) == 2 * len(configs)
    _choose(timer, cache, 1000, 1000, key=(1,))  # another device / dtype / causal key too
    assert len(timer.calls) == 3 * len(configs)


@pytest.mark.parametrize("t_q,t_k", [(1, 4096), (64, 64), (17, 1000), (2048, 50)])
def test_short_and_decode_shapes_use_the_pinned_config_without_tuning(t_q, t_k):
    timer = Timer()
    assert _choose(timer, {}, t_q, t_k) == fc.candidates("fwd", 64, 2, fc.TARGETS[90][0])[0]
    assert timer.calls == []


@pytest.mark.parametrize("kernel", fc.TUNED_KERNELS)
def test_deterministic_mode_pins_the_first_fitting_config(kernel):
    for cc, (limit, _) in fc.TARGETS.items():
        timer = Timer()
        got = _choose(timer, {}, 4096, 4096, deterministic=True, kernel=kernel, limit=limit, cc=cc)
        assert got == fc.candidates(kernel, 64, 2, limit, cc)[0] and timer.calls == []


def test_single_candidate_is_not_benchmarked():
    # fp32 at D=128 on an A100 leaves one fwd config: nothing to compare
    limit = fc.TARGETS[80][0]
    assert len(fc.candidates("fwd", 128, 4, limit)) == 1
    timer = Timer()
    fc.choose("fwd", 128, 4, limit, 4096, 4096, (0,), timer, {})
    assert timer.calls == []


def test_tuning_times_queued_kernels_not_their_launching(monkeypatch):
    """_time_ms holds the stream with a GPU spin before its start event, so the timed launches queue
    up behind it and the events time kernels, not Python's launch rate (CUDA mocked: the order of
    stream operations is what is checked; the timing itself runs in tests/test_flash_gpu.py)."""
    import torch

    from kernels import flash_launch as flash

    ops = []
    names = iter(["start", "end"])  # _time_ms creates its two events in this order

    class Event:
        def __init__(self, enable_timing=False):
            assert enable_timing
            self.name = next(names)

        def record(self):
            ops.append(self.name)

        def synchronize(self):
            ops.append("sync")

        def elapsed_time(self, other):
            return 5.0

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "_sleep", lambda cycles: ops.append(f"hold {cycles}"))
    ms = flash._time_ms(lambda cfg: ops.append("launch"), fc.Config(64, 64, 4, 3), reps=10)
    assert ms == 0.5
    hold = f"hold {flash._HOLD_CYCLES}"
    assert ops == ["launch", hold, "start"] + ["launch"] * 10 + ["end", "sync"]
    assert flash._HOLD_CYCLES >= 10_000_000  # >= 5 ms even at 2 GHz: far beyond 10 launches of ~50 us


def test_launch_uses_the_fastest_config_and_prints_tunings_on_request(monkeypatch, capsys):
    """flash_attention's launch path on CPU tensors with the Triton kernels and GPU timing mocked:
    the config launched is the one with the smallest measured time, tuning happens once per
    length bucket, and TRITON_PRINT_AUTOTUNING=1 prints each tuning's timings to stderr."""
    import types

    import torch

    from kernels import flash_launch as flash
    from kernels.flash import flash_attention

    launched = []

    class FakeKernel:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            return lambda *args, BLOCK_M, BLOCK_N, **kw: launched.append(
                (self.name, BLOCK_M, BLOCK_N, kw.get("num_warps"), kw.get("num_stages")))

    fake = types.SimpleNamespace(INTERPRETED=False, KERNELS={n: FakeKernel(n) for n in ("fwd", "dkdv", "dq", "preprocess")})
    monkeypatch.setattr(flash, "kernels_for", lambda q: fake)
    monkeypatch.setattr(flash, "PLANS", {})
    monkeypatch.setattr(flash, "_gpu", lambda fk, device: (fc.TARGETS[90][0], 90))
    monkeypatch.setattr(flash, "TUNED", {})
    monkeypatch.setenv("TRITON_PRINT_AUTOTUNING", "1")
    configs = fc.candidates("fwd", 64, 2, fc.TARGETS[90][0], 90)
    fake_ms = {c: 1.0 + i for i, c in enumerate(reversed(configs))}  # the last candidate is fastest

    def time_ms(run, cfg, reps=10):
        run(cfg)
        return fake_ms[cfg]

    monkeypatch.setattr(flash, "_time_ms", time_ms)
    q = torch.zeros(1, 2, 1000, 64, dtype=torch.bfloat16)
    flash_attention(q, q, q)
    best = configs[-1]
    assert launched[-1] == ("fwd", *best)  # tuned: every candidate ran once, then the pick
    assert len(launched) == len(configs) + 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("flash tuning fwd D=64 bfloat16 T<=1024x1024 on cpu: picked ")
    assert f"picked {best.block_m}x{best.block_n} w{best.num_warps} s{best.num_stages} (" in err
    launched.clear()
    flash_attention(torch.zeros(1, 2, 900, 64, dtype=torch.bfloat16), q[:, :, :900], q[:, :, :900])
    assert launched == [("fwd", *best)]  # same bucket: no tuning, no print
    assert capsys.readouterr().err == ""

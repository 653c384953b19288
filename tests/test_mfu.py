"""MFU: FLOPs per token against torch's own FLOP counter, the peak table, CPU calibration, scaling."""
import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from kernels import naive_attention
from models import GPT, GPTConfig
from trainer import monitor as mfu


def nano(**kw):
    torch.manual_seed(0)
    return GPT(GPTConfig(**{**dict(vocab_size=65, block_size=64, n_layer=4, n_head=4, n_embd=128), **kw}),
               naive_attention)


def matmul_weights(model):
    """Parameters that multiply activations (Linear weights; the tied wte once, as the LM head)."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


CPU = torch.device("cpu")


def meter(tmp_path, times, *, tokens_per_step=100, world_size=1, overrides=("peak_tflops=1",), **kw):
    """The Monitor of a nano-model run writing into ``tmp_path``, on a clock that reads ``times``
    (two readings at the start: wall time, then the first window and the training clock)."""
    from conftest import TINY_OVERRIDES, compose_cfg

    return mfu.Monitor(tmp_path, compose_cfg([*TINY_OVERRIDES, *overrides]), nano(), CPU,
                       tokens_per_step=tokens_per_step, world_size=world_size, cache_dir=tmp_path,
                       clock=iter(times).__next__, **kw)


def logged(tmp_path) -> list[str]:
    return (tmp_path / mfu.LOG).read_text().splitlines()


@pytest.mark.parametrize("kw, T", [({}, 64), (dict(n_layer=2, n_embd=64, n_head=2, block_size=32), 24)])
def test_formula_equals_torch_flop_counter_on_a_training_step(kw, T):
    """torch's FlopCounterMode counts every matmul of forward + backward (naive attention's QK^T and
    PV included, at the full T x T): it must equal 6 * (matmul weights) + 12 L T d per token."""
    model = nano(**kw)
    B = 3
    idx = torch.randint(0, 65, (B, T))
    with FlopCounterMode(display=False) as counter:
        _, loss = model(idx, idx)
        loss.backward()
    cfg = model.config
    expected = (6 * matmul_weights(model) + 12 * cfg.n_layer * T * cfg.n_embd) * B * T
    assert counter.get_total_flops() == pytest.approx(expected, rel=1e-9)
    # the trainer's formula counts every non-position parameter: biases and LayerNorms add 6 each
    extra = 6 * (model.num_params() - matmul_weights(model))
    assert mfu.flops_per_token(model, T) == pytest.approx(expected / (B * T) + extra, rel=1e-12)
    assert extra < 0.02 * mfu.flops_per_token(model, T)


def test_nano_flops_per_token_closed_form():
    model = nano()
    N, L, T, d = model.num_params(), 4, 64, 128
    assert mfu.flops_per_token(model, T) == 6 * N + 12 * L * T * d
    assert mfu.flops_per_token(model, T, causal_half=True) == 6 * N + 6 * L * T * d


@pytest.mark.parametrize("world, accum", [(1, 1), (1, 4), (2, 2), (4, 8)])
def test_meter_is_per_device_under_accumulation_and_world_size(tmp_path, world, accum):
    fpt, batch, block, dt, peak = 4.7e6, 12, 64, 0.05, 1e13
    tokens_per_step = accum * batch * block  # the global batch, as the trainer counts it
    m = meter(tmp_path, [0.0, 0.0, dt, 1.0], tokens_per_step=tokens_per_step, world_size=world, write=False)
    m.flops_per_token, m.peak_flops = fpt, peak
    m.log_step(0, 1.0, 1e-3, 1.0, {})  # one step in dt
    per_device_flops = fpt * (accum // world if accum >= world else accum / world) * batch * block
    summary = m.close("completed")
    assert summary["tflops"] * 1e12 == pytest.approx(per_device_flops / dt)
    assert summary["mfu"] == pytest.approx(per_device_flops / dt / peak)
    unknown = meter(tmp_path, [0.0, 0.0, dt, 1.0], tokens_per_step=tokens_per_step, world_size=world, write=False)
    unknown.peak_flops = None  # e.g. an unlisted GPU
    unknown.log_step(0, 1.0, 1e-3, 1.0, {})
    assert unknown.close("completed")["mfu"] is None


@pytest.mark.parametrize(
    "name, precision, tflops",
    [
        ("NVIDIA H100 80GB HBM3", "bf16", 989.4),
        ("NVIDIA H100 PCIe", "bf16", 756.0),
        ("NVIDIA H100 NVL", "fp32", 60.0),
        ("NVIDIA H200", "tf32", 494.7),
        ("NVIDIA A100-SXM4-80GB", "tf32", 156.0),
        ("NVIDIA A100-PCIE-40GB", "fp16", 312.0),
        ("NVIDIA A100 80GB PCIe", "fp32", 19.5),
        ("NVIDIA L4", "bf16", 121.0),
        ("NVIDIA L40S", "bf16", 362.1),  # not taken for an L4
        ("NVIDIA GeForce RTX 4090", "fp16", 165.2),
        ("NVIDIA GeForce RTX 4090", "fp32", 82.6),
        ("Tesla V100-SXM2-16GB", "bf16", None),  # no bf16 tensor cores: unknown, not guessed
        ("NVIDIA Quantum Z9", "bf16", None),
    ],
)
def test_gpu_peak_table(name, precision, tflops, monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")  # fp32 is fp32, not tf32
        peak, why = mfu.peak_flops(torch.device("cuda", 0), precision)
    finally:
        torch.set_float32_matmul_precision(before)
    assert peak == (None if tflops is None else pytest.approx(tflops * 1e12))
    assert name in why and ("datasheet" in why if tflops else "peak_tflops" in why)


def test_gpu_peak_follows_tf32_setting_and_unknown_gpu_says_so(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-40GB")
    cuda = torch.device("cuda", 0)
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert mfu.peak_flops(cuda, "fp32")[0] == pytest.approx(19.5e12)
        torch.set_float32_matmul_precision("high")  # fp32 matmuls may use TF32
        assert mfu.peak_flops(cuda, "fp32")[0] == pytest.approx(156e12)
    finally:
        torch.set_float32_matmul_precision(before)
    assert mfu.peak_flops(cuda, "bf16")[0] == pytest.approx(312e12)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA Mystery 9000")
    peak, why = mfu.peak_flops(cuda, "bf16")
    assert peak is None and "Mystery 9000" in why and "peak_tflops" in why
    assert mfu.peak_flops(cuda, "bf16", peak_tflops=100.0)[0] == pytest.approx(100e12)


def test_cpu_calibration_is_measured_once_and_cached(tmp_path, monkeypatch):
    shape = dict(tokens=256, n_embd=64, vocab_size=65, cache_dir=tmp_path)
    first, why = mfu.peak_flops(CPU, "fp32", **shape)
    assert 1e8 < first < 1e14 and "measured" in why  # a real FLOP/s figure for a CPU
    table = json.loads((tmp_path / mfu.CALIBRATION_FILE).read_text())
    assert list(table.values()) == [first] and f"threads={torch.get_num_threads()}" in next(iter(table))

    def no_measuring(*a, **k):
        raise AssertionError("the cached value should have been used")

    monkeypatch.setattr(mfu, "measure_cpu_flops", no_measuring)
    peak, why = mfu.peak_flops(CPU, "fp32", **shape)
    assert peak == first and "measured" in why


def test_cpu_calibration_counts_flops_of_the_timed_matmuls(monkeypatch):
    """FLOP/s = the closed-form FLOPs of the five matmuls / the time one pass takes."""
    import itertools
    import types

    monkeypatch.setattr(mfu, "time", types.SimpleNamespace(perf_counter=itertools.count(0.0, 0.5).__next__))
    M, d, V = 100, 8, 11  # every reading of the clock is 0.5 s later: one pass per burst, 0.5 s each
    expected = 2 * M * (d * 3 * d + d * d + d * 4 * d + 4 * d * d + d * V) / 0.5
    assert mfu.measure_cpu_flops(M, d, V) == pytest.approx(expected)


def test_throughput_windows_exclude_the_first_and_the_evals(tmp_path):
    m = meter(tmp_path, [0.0, 0.0, 1.0, 2.0, 2.0, 50.0, 53.0, 60.0], overrides=["peak_tflops=0.001"])
    m.flops_per_token = 1e6
    m.log_step(0, 1.0, 1e-3, 1.0, {})  # 1 step in 1 s (warm-up window)
    assert "100 tok/s, 1000.0 ms/step" in logged(tmp_path)[-1]
    m.end_eval(5, 9.0, 1.5)  # an evaluation of steps 1..5 from 1.5 s to 2.0 s: that window is dropped
    assert m.summary["eval_time_s"] == pytest.approx(0.5)
    m.log_step(6, 1.0, 1e-3, 1.0, {})  # 2 steps over 50 - 2 = 48 s
    assert "24000.0 ms/step" in logged(tmp_path)[-1] and f"mfu {1e6 * 100 / 24.0 / 1e9:.1%}" in logged(tmp_path)[-1]
    m.log_step(7, 1.0, 1e-3, 1.0, {})  # 1 step in 53 - 50 = 3 s
    summary = m.close("completed")
    assert summary["tokens_per_sec"] == pytest.approx(3 * 100 / 51.0)  # steady windows only
    assert summary["wall_time_s"] == pytest.approx(60.0)


def test_the_first_window_is_the_average_when_it_is_the_only_one(tmp_path):
    m = meter(tmp_path, [0.0, 0.0, 1.0, 1.5], write=False)
    m.log_step(0, 1.0, 1e-3, 1.0, {})  # 1 step in 1 s
    assert m.close("completed")["tokens_per_sec"] == pytest.approx(100)


# ------------------------------------------------------------------------------------------------
# in a training run


def test_run_logs_mfu_and_tflops_and_profiles(tmp_path, tiny_overrides, monkeypatch, capsys):
    from conftest import compose_cfg
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    import trainer.loop as loop

    events = []
    real_peak, real_step = mfu.peak_memory, loop.Trainer.train_step

    def peak_memory(device, reset=False):
        if reset:
            events.append("reset")
        return real_peak(device, reset)

    monkeypatch.setattr(mfu, "peak_memory", peak_memory)  # the monitor's, when the run is built
    monkeypatch.setattr(loop, "peak_memory", peak_memory)  # the loop's, after the first step
    monkeypatch.setattr(loop.Trainer, "train_step", lambda self, it: (events.append(it), real_step(self, it))[1])
    overrides = tiny_overrides + ["max_iters=10", "eval_interval=0", "sample_tokens=0", "profile=true",
                                  "peak_tflops=0.001", "gradient_accumulation_steps=2"]
    t = loop.Trainer(compose_cfg(overrides), tmp_path / "run", overrides)
    summary = t.fit()
    # the peak-memory window restarts after the first step (warm-up, autotuning), not only before it
    assert events[:4] == ["reset", 0, "reset", 1]
    # one process: achieved FLOP/s = FLOPs per token x tokens/s; MFU against the given peak
    fpt = mfu.flops_per_token(t.raw_model, 32)
    assert summary["tflops"] == pytest.approx(fpt * summary["tokens_per_sec"] / 1e12, rel=1e-6)
    assert summary["mfu"] == pytest.approx(summary["tflops"] / 0.001, rel=1e-6)
    ea = EventAccumulator(str(tmp_path / "run"), size_guidance={"scalars": 0})
    ea.Reload()
    assert {"mfu", "tflops"} <= set(ea.Tags()["scalars"])
    out = capsys.readouterr().out
    assert "TFLOP/s, mfu " in out and "MFU:" in out
    traces = list((tmp_path / "run" / "profile").glob("*.pt.trace.json"))
    assert len(traces) == 1 and json.loads(traces[0].read_text())["traceEvents"]
    assert "aten::mm" in (tmp_path / "run" / "profile" / "top_ops.txt").read_text()


def calibrations(monkeypatch, first: float, remeasured: float) -> list[float]:
    """Make the CPU calibration answer ``first`` (the cached value), then ``remeasured``; returns the
    re-measurements made."""
    calls = []

    def peak_flops(device, precision, remeasure=False, **shape):
        if remeasure:
            calls.append(remeasured)
        return (remeasured if remeasure else first), "measured fp32 matmul at the model's shapes"

    monkeypatch.setattr(mfu, "peak_flops", peak_flops)
    return calls


def test_a_peak_below_the_achieved_rate_is_measured_again_once(tmp_path, monkeypatch):
    """A cached CPU calibration taken on a loaded machine can be far below what the run achieves
    (it happened: 1.9e-5 TFLOP/s cached for a tiny test shape, MFU 10,000%). The first window that
    beats the peak re-measures it; the MFU is then computed against the new peak."""
    calls = calibrations(monkeypatch, 1e6, 4e8)
    m = meter(tmp_path, [0.0, 0.0, 1.0, 2.0], overrides=())  # a CPU without peak_tflops: measured
    m.flops_per_token = 1e6
    m.log_step(0, 1.0, 1e-3, 1.0, {})  # 1e8 FLOP in 1 s against a peak of 1e6: impossible
    assert calls == [4e8] and m.peak_flops == 4e8 and "re-measured" in m.peak_source
    step, note = logged(tmp_path)[-2:]
    assert step.endswith("mfu 25.0%") and "re-measured: 0.0004 TFLOP/s" in note
    m.log_step(1, 1.0, 1e-3, 1.0, {})
    assert logged(tmp_path)[-1].endswith("mfu 25.0%") and calls == [4e8]  # once


def test_a_peak_still_below_the_achieved_rate_reports_no_mfu(tmp_path, monkeypatch):
    calibrations(monkeypatch, 1e6, 2e6)
    m = meter(tmp_path / "measured", [0.0, 0.0, 1.0], overrides=())
    m.flops_per_token = 1e6
    m.log_step(0, 1.0, 1e-3, 1.0, {})
    step, note = logged(tmp_path / "measured")[-2:]
    assert step.endswith("0.0001 TFLOP/s, mfu unknown")
    assert "re-measured: 2e-06 TFLOP/s; still below it: MFU is not reported" in note
    monkeypatch.undo()
    fixed = meter(tmp_path / "set", [0.0, 0.0, 1.0, 2.0])  # peak_tflops set: nothing to re-measure
    fixed.flops_per_token, fixed.peak_flops = 1e6, 1e6
    fixed.log_step(0, 1.0, 1e-3, 1.0, {})
    fixed.log_step(1, 1.0, 1e-3, 1.0, {})
    lines = logged(tmp_path / "set")
    said = [line for line in lines if "exceed the peak" in line]
    assert said == ["MFU: this run's 0.0001 TFLOP/s exceed the peak 1e-06 TFLOP/s (set by peak_tflops): "
                    "MFU is not reported"]  # once
    assert lines[-1].endswith("mfu unknown")


def test_remeasuring_replaces_the_cached_calibration(tmp_path):
    shape = dict(tokens=64, n_embd=32, vocab_size=11, cache_dir=tmp_path)
    first = mfu.peak_flops(CPU, "fp32", **shape)[0]
    path = tmp_path / mfu.CALIBRATION_FILE
    table = json.loads(path.read_text())
    key = next(iter(table))
    path.write_text(json.dumps({key: 1.0}))  # a polluted entry
    assert mfu.peak_flops(CPU, "fp32", **shape)[0] == 1.0
    again = mfu.peak_flops(CPU, "fp32", **shape, remeasure=True)[0]
    assert again > 1e6 and json.loads(path.read_text()) == {key: again}
    assert first > 1e6


def test_training_run_heals_a_polluted_calibration(tmp_path, tiny_overrides, monkeypatch):
    from test_trainer import make as make_trainer

    monkeypatch.setenv("GPTLAB_CACHE", str(tmp_path / "gptlab"))
    real = mfu.peak_flops
    monkeypatch.setattr(mfu, "peak_flops",  # the first (cached) answer is the polluted one
                        lambda *a, remeasure=False, **k: real(*a, remeasure=True, **k) if remeasure else (1.0, "x"))
    t = make_trainer(tmp_path, tiny_overrides + ["max_iters=6", "eval_interval=0", "sample_tokens=0"])
    summary = t.fit()
    assert 0 < summary["mfu"] <= 1
    log = (tmp_path / "run" / "train.log").read_text()
    assert "MFU: the cached CPU calibration (1e-12 TFLOP/s) was below this run's" in log

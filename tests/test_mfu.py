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
    expected = mfu.flops_per_token(matmul_weights(model), cfg.n_layer, cfg.n_embd, T) * B * T
    assert counter.get_total_flops() == pytest.approx(expected, rel=1e-9)
    # the trainer's formula counts every non-position parameter: biases and LayerNorms add 6 each
    extra = 6 * (model.num_params() - matmul_weights(model))
    assert mfu.model_flops_per_token(model, T) == pytest.approx(expected / (B * T) + extra, rel=1e-12)
    assert extra < 0.02 * mfu.model_flops_per_token(model, T)


def test_nano_flops_per_token_closed_form():
    model = nano()
    N, L, T, d = model.num_params(), 4, 64, 128
    assert mfu.model_flops_per_token(model, T) == 6 * N + 12 * L * T * d
    assert mfu.model_flops_per_token(model, T, causal_half=True) == 6 * N + 6 * L * T * d


@pytest.mark.parametrize("world, accum", [(1, 1), (1, 4), (2, 2), (4, 8)])
def test_meter_is_per_device_under_accumulation_and_world_size(world, accum):
    fpt, batch, block, dt, peak = 4.7e6, 12, 64, 0.05, 1e13
    tokens_per_step = accum * batch * block  # the global batch, as the trainer counts it
    speed = mfu.Speed(fpt, tokens_per_step, torch.device("cpu"), world_size=world, peak_flops=peak)
    per_device_flops = fpt * (accum // world if accum >= world else accum / world) * batch * block
    assert speed.rates(dt)["tflops"] * 1e12 == pytest.approx(per_device_flops / dt)
    assert speed.rates(dt)["mfu"] == pytest.approx(per_device_flops / dt / peak)
    assert mfu.Speed(fpt, tokens_per_step, torch.device("cpu"), world, peak_flops=None).rates(dt)["mfu"] is None


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
def test_gpu_peak_table(name, precision, tflops):
    peak = mfu.gpu_peak_flops(name, precision)
    assert peak == (None if tflops is None else pytest.approx(tflops * 1e12))


def test_gpu_peak_follows_tf32_setting_and_unknown_gpu_says_so(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-40GB")
    cuda = torch.device("cuda", 0)
    shape = dict(tokens=768, n_embd=128, vocab_size=65, cache_dir="/nonexistent")
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert mfu.peak_flops_for(cuda, "fp32", **shape)[0] == pytest.approx(19.5e12)
        torch.set_float32_matmul_precision("high")  # fp32 matmuls may use TF32
        assert mfu.peak_flops_for(cuda, "fp32", **shape)[0] == pytest.approx(156e12)
    finally:
        torch.set_float32_matmul_precision(before)
    assert mfu.peak_flops_for(cuda, "bf16", **shape)[0] == pytest.approx(312e12)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA Mystery 9000")
    peak, why = mfu.peak_flops_for(cuda, "bf16", **shape)
    assert peak is None and "Mystery 9000" in why and "peak_tflops" in why
    assert mfu.peak_flops_for(cuda, "bf16", **shape, peak_tflops=100.0)[0] == pytest.approx(100e12)


def test_cpu_calibration_is_measured_once_and_cached(tmp_path, monkeypatch):
    shape = dict(tokens=256, n_embd=64, vocab_size=65, dtype=torch.float32, cache_dir=tmp_path)
    first = mfu.cpu_peak_flops(**shape, seconds=0.05)
    assert 1e8 < first < 1e14  # a real FLOP/s figure for a CPU
    table = json.loads((tmp_path / mfu.CALIBRATION_FILE).read_text())
    assert list(table.values()) == [first] and f"threads={torch.get_num_threads()}" in next(iter(table))

    def no_measuring(*a, **k):
        raise AssertionError("the cached value should have been used")

    monkeypatch.setattr(mfu, "measure_cpu_flops", no_measuring)
    assert mfu.cpu_peak_flops(**shape, seconds=0.05) == first
    peak, why = mfu.peak_flops_for(torch.device("cpu"), "fp32", tokens=256, n_embd=64, vocab_size=65,
                                   cache_dir=tmp_path)
    assert peak == first and "measured" in why


def test_cpu_calibration_counts_flops_of_the_timed_matmuls(monkeypatch):
    """FLOP/s = the closed-form FLOPs of the five matmuls / the time one pass takes."""
    monkeypatch.setattr(mfu, "_timed_matmuls", lambda mats, seconds: 0.5)
    M, d, V = 100, 8, 11
    expected = 2 * M * (d * 3 * d + d * d + d * 4 * d + 4 * d * d + d * V) / 0.5
    assert mfu.measure_cpu_flops(M, d, V) == pytest.approx(expected)


def test_throughput_windows_exclude_the_first_and_what_restart_drops():
    clock = iter([0.0, 1.0, 2.0, 50.0, 53.0, 60.0])
    speed = mfu.Speed(1e6, 100, torch.device("cpu"), peak_flops=1e9, clock=lambda: next(clock))  # t0 = 0
    first = speed.lap(1)  # 1 step in 1 s (warm-up window)
    assert first["step_ms"] == pytest.approx(1000) and first["tokens_per_sec"] == pytest.approx(100)
    assert speed.summary()["tokens_per_sec"] == pytest.approx(100)  # the only window so far
    speed.restart(5)  # e.g. an evaluation ran after iteration 5: steps 1..5's window is dropped; t0 = 2
    second = speed.lap(7)  # 2 steps over 50 - 2 = 48 s
    assert second["step_ms"] == pytest.approx(24_000)
    assert second["mfu"] == pytest.approx(1e6 * 100 / 24.0 / 1e9)
    speed.lap(8)  # 1 step in 53 - 50 = 3 s
    assert speed.summary()["tokens_per_sec"] == pytest.approx(3 * 100 / 51.0)  # steady windows only
    assert speed.lap(8) is None  # no steps since the last lap


# ------------------------------------------------------------------------------------------------
# in a training run


def test_run_logs_mfu_and_tflops_and_profiles(tmp_path, tiny_overrides, monkeypatch, capsys):
    from conftest import compose_cfg
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    import trainer.loop as loop

    events = []
    real_reset, real_step = loop.reset_peak_memory, loop.Trainer.train_step
    monkeypatch.setattr(loop, "reset_peak_memory", lambda device: (events.append("reset"), real_reset(device)))
    monkeypatch.setattr(loop.Trainer, "train_step", lambda self, it: (events.append(it), real_step(self, it))[1])
    overrides = tiny_overrides + ["max_iters=10", "eval_interval=0", "sample_tokens=0", "profile=true",
                                  "peak_tflops=0.001", "gradient_accumulation_steps=2"]
    t = loop.Trainer(compose_cfg(overrides), tmp_path / "run", overrides)
    summary = t.fit()
    # the peak-memory window restarts after the first step (warm-up, autotuning), not only before it
    assert events[:4] == ["reset", 0, "reset", 1]
    # one process: achieved FLOP/s = FLOPs per token x tokens/s; MFU against the given peak
    fpt = mfu.model_flops_per_token(t.raw_model, 32)
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


def test_a_peak_below_the_achieved_rate_is_measured_again_once():
    """A cached CPU calibration taken on a loaded machine can be far below what the run achieves
    (it happened: 1.9e-5 TFLOP/s cached for a tiny test shape, MFU 10,000%). The first window that
    beats the peak re-measures it; the MFU is then computed against the new peak."""
    calls = []
    speed = mfu.Speed(1e6, 100, torch.device("cpu"), peak_flops=1e6, remeasure=lambda: calls.append(1) or 4e8,
                      clock=iter([0.0, 1.0, 2.0]).__next__)
    first = speed.lap(1)  # 1e8 FLOP in 1 s against a peak of 1e6: impossible
    assert calls == [1] and speed.peak_flops == 4e8
    assert first["mfu"] == pytest.approx(0.25)
    assert "re-measured: 0.0004 TFLOP/s" in speed.note and "re-measured" in speed.peak_source
    assert speed.lap(2)["mfu"] == pytest.approx(0.25) and calls == [1]  # once


def test_a_peak_still_below_the_achieved_rate_reports_no_mfu():
    speed = mfu.Speed(1e6, 100, torch.device("cpu"), peak_flops=1e6, remeasure=lambda: 2e6,
                      clock=iter([0.0, 1.0]).__next__)
    got = speed.lap(1)
    assert got["mfu"] is None and got["tflops"] == pytest.approx(1e-4)
    assert "re-measured: 2e-06 TFLOP/s; still below it: MFU is not reported" in speed.note
    fixed = mfu.Speed(1e6, 100, torch.device("cpu"), peak_flops=1e6)  # e.g. peak_tflops set
    assert fixed.rates(1.0)["mfu"] is None
    assert "exceed the peak" in fixed.note and "peak_tflops" not in fixed.note
    fixed.note = None  # the trainer logs and clears it
    assert fixed.rates(1.0)["mfu"] is None and fixed.note is None  # said once


def test_remeasuring_replaces_the_cached_calibration(tmp_path):
    shape = dict(tokens=64, n_embd=32, vocab_size=11, dtype=torch.float32, cache_dir=tmp_path)
    first = mfu.cpu_peak_flops(**shape, seconds=0.02)
    path = tmp_path / mfu.CALIBRATION_FILE
    table = json.loads(path.read_text())
    key = next(iter(table))
    path.write_text(json.dumps({key: 1.0}))  # a polluted entry
    assert mfu.cpu_peak_flops(**shape, seconds=0.02) == 1.0
    again = mfu.cpu_peak_flops(**shape, seconds=0.02, remeasure=True)
    assert again > 1e6 and json.loads(path.read_text()) == {key: again}
    assert first > 1e6


def test_training_run_heals_a_polluted_calibration(tmp_path, tiny_overrides, monkeypatch):
    from test_trainer import make as make_trainer

    from trainer import monitor as mfu_module

    monkeypatch.setenv("GPTLAB_CACHE", str(tmp_path / "gptlab"))
    real = mfu_module.cpu_peak_flops
    monkeypatch.setattr(mfu_module, "cpu_peak_flops",  # the first (cached) answer is the polluted one
                        lambda *a, remeasure=False, **k: real(*a, remeasure=remeasure, **k) if remeasure else 1.0)
    t = make_trainer(tmp_path, tiny_overrides + ["max_iters=6", "eval_interval=0", "sample_tokens=0"])
    summary = t.fit()
    assert 0 < summary["mfu"] <= 1
    log = (tmp_path / "run" / "train.log").read_text()
    assert "MFU: the cached CPU calibration (1e-12 TFLOP/s) was below this run's" in log

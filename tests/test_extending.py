"""README's "Add your own attention or optimizer": the registry, the configs, and the two-file path.

A researcher's attention function and optimizer, in a module outside this package, plus one YAML
each in their own config directory, train through scripts/train.py without editing the package.
"""
import json
import os
import subprocess
import sys
import textwrap

import hydra
import pytest
import torch
from conftest import CONFIGS, REPO
from omegaconf import OmegaConf
from reference import attention_f64

from kernels import ATTENTION

TRAIN = str(REPO / "scripts" / "train.py")


def test_registry_names_are_the_attn_configs():
    # kernels.ATTENTION is the one list that CLIs, benchmarks and tests take their options from
    assert sorted(ATTENTION) == sorted(p.stem for p in (CONFIGS / "attn").glob("*.yaml"))
    for name, fn in ATTENTION.items():
        cfg = OmegaConf.load(CONFIGS / "attn" / f"{name}.yaml")
        assert cfg._partial_ is True, name  # the trainer calls it later with (q, k, v, causal=True)
        assert hydra.utils.get_method(cfg._target_) is fn, name


def test_attention_preset_sweeps_every_option_that_runs_on_a_cpu():
    # the preset names no option by hand: a new configs/attn/<name>.yaml joins the sweep
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from hydra import compose, initialize_config_dir

    from trainer.config import register_resolvers

    register_resolvers()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("train", overrides=["+experiment=attention"], return_hydra_config=True)
    swept = OverridesParser.create().parse_override(f"attn={cfg.hydra.sweeper.params.attn}")
    options = sorted(p.stem for p in (CONFIGS / "attn").glob("*.yaml"))
    assert swept.value().filter(options) == [name for name in options if name != "flash"]


TOY_MODULE = '''
"""A researcher's own components, in a module of their own (not in this package)."""
import torch


def scaled_attention(q, k, v, causal=True, scale=None, temperature=1.0, log_path=None):
    """softmax(q k^T * scale / temperature + end-aligned causal mask) v."""
    if log_path is not None:  # lets the test see that the trainer called this function
        with open(log_path, "a") as f:
            f.write(f"{tuple(q.shape)} {tuple(k.shape)}\\n")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = q @ k.transpose(-2, -1) * (scale / temperature)
    if causal:
        tq, tk = q.shape[-2], k.shape[-2]
        i = torch.arange(tq, device=q.device)[:, None]
        j = torch.arange(tk, device=q.device)
        s = s.masked_fill(j > i + (tk - tq), float("-inf"))
    return torch.softmax(s, dim=-1) @ v


class SignSGD(torch.optim.Optimizer):
    """p -= lr * sign(grad): a whole optimizer in a few lines."""

    def __init__(self, params, lr=1e-3, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.mul_(1 - group["lr"] * group["weight_decay"]).add_(p.grad.sign(), alpha=-group["lr"])
'''


@pytest.fixture
def toy_components(tmp_path):
    """A module on PYTHONPATH and a config directory with attn/scaled.yaml and optim/signsgd.yaml."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "my_components.py").write_text(textwrap.dedent(TOY_MODULE))
    cfg_dir = tmp_path / "my_configs"
    (cfg_dir / "attn").mkdir(parents=True)
    (cfg_dir / "optim").mkdir()
    (cfg_dir / "attn" / "scaled.yaml").write_text(
        "_target_: my_components.scaled_attention\n_partial_: true\ntemperature: 2.0\nlog_path: null\n")
    (cfg_dir / "optim" / "signsgd.yaml").write_text(
        "_target_: my_components.SignSGD\n_partial_: true\nlr: 1.0e-3\nweight_decay: 0.0\n")
    return src, cfg_dir


def test_toy_attention_matches_the_reference(toy_components, monkeypatch):
    # the toy is a real attention: with temperature t it equals the reference at scale / t
    src, _ = toy_components
    monkeypatch.syspath_prepend(str(src))
    from my_components import scaled_attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, t, 8, generator=g, dtype=torch.float64) for t in (5, 9, 9))
    want = attention_f64(q, k, v, causal=True, scale=8**-0.5 / 2.0)
    torch.testing.assert_close(scaled_attention(q, k, v, temperature=2.0), want)


def test_own_attention_and_optimizer_train_through_train_py(tmp_path, tiny_overrides, toy_components):
    src, cfg_dir = toy_components
    log = tmp_path / "calls.txt"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(src), os.environ.get("PYTHONPATH", "")])}
    env.pop("HYDRA_FULL_ERROR", None)
    args = [TRAIN, f"hydra.searchpath=[file://{cfg_dir}]", "attn=scaled", "optim=signsgd",
            f"attn.log_path={log}", *tiny_overrides, "max_iters=2", "eval_interval=0", "sample_tokens=0"]
    proc = subprocess.run([sys.executable, *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert "attn=scaled" in run_dir.name and "optim=signsgd" in run_dir.name
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"
    config = OmegaConf.load(run_dir / "config.yaml")
    assert config.attn._target_ == "my_components.scaled_attention" and config.attn.temperature == 2.0
    assert config.optim._target_ == "my_components.SignSGD"
    # the trainer really called the toy: once per layer per forward, on (B, H, T, D) tensors
    calls = log.read_text().splitlines()
    assert len(calls) >= 2 and calls[0] == "(4, 2, 32, 16) (4, 2, 32, 16)"

"""README's "Add your own attention or optimizer": the registry, the configs, and the two-file path.

README's attention function and YAML (plus a toy optimizer), in a module and a config directory
outside this package, train through scripts/train.py without editing the package.
"""
import json
import os
import re
import subprocess
import sys

import hydra
import pytest
import torch
from conftest import CONFIGS, REPO
from omegaconf import OmegaConf
from reference import attention_f64

from kernels import ATTENTION

TRAIN = str(REPO / "scripts" / "train.py")


def test_attn_configs_name_the_built_in_implementations():
    # configs/attn/ is the one list that CLIs, benchmarks and tests take their options from; the
    # kernels package's own index of its implementations names the same functions
    for name, fn in ATTENTION.items():
        cfg = OmegaConf.load(CONFIGS / "attn" / f"{name}.yaml")
        assert cfg._partial_ is True, name  # the trainer calls it later with (q, k, v, causal=True)
        assert hydra.utils.get_method(cfg._target_) is fn, name


def test_attention_preset_sweeps_every_option_that_runs_on_a_cpu():
    # the preset names no option by hand: a new configs/attn/<name>.yaml joins the sweep
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from hydra import compose, initialize_config_dir

    import trainer.config  # noqa: F401  (registers the ${run_name:} resolver)

    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("train", overrides=["+experiment=attention"], return_hydra_config=True)
    swept = OverridesParser.create().parse_override(f"attn={cfg.hydra.sweeper.params.attn}")
    options = sorted(p.stem for p in (CONFIGS / "attn").glob("*.yaml"))
    assert swept.value().filter(options) == [name for name in options if name != "flash"]


def readme_blocks(lang: str) -> list[str]:
    """The ```lang code blocks of README's "Add your own attention or optimizer" section."""
    text = (REPO / "README.md").read_text()
    section = text.split("## Add your own attention or optimizer", 1)[1].split("\n## ", 1)[0]
    return re.findall(rf"```{lang}\n(.*?)```", section, flags=re.S)


# Added to README's module by the test: a toy optimizer, and a wrapper that logs each call so the
# test sees the trainer use the function (an extra keyword from the command line: +attn.log_path=).
TEST_ADDITIONS = '''

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


_readme_attention = scaled_attention


def scaled_attention(q, k, v, causal=True, scale=None, log_path=None, **kwargs):
    with open(log_path, "a") as f:
        f.write(f"{tuple(q.shape)} {tuple(k.shape)}\\n")
    return _readme_attention(q, k, v, causal=causal, scale=scale, **kwargs)
'''


@pytest.fixture
def toy_components(tmp_path):
    """README's module (plus TEST_ADDITIONS) on PYTHONPATH; README's YAML in a config directory."""
    (module,) = readme_blocks("python")
    (attn_yaml,) = readme_blocks("yaml")
    assert attn_yaml.startswith("# my_configs/attn/scaled.yaml\n")
    src = tmp_path / "src"
    src.mkdir()
    (src / "my_components.py").write_text(module + TEST_ADDITIONS)
    cfg_dir = tmp_path / "my_configs"
    (cfg_dir / "attn").mkdir(parents=True)
    (cfg_dir / "optim").mkdir()
    (cfg_dir / "attn" / "scaled.yaml").write_text(attn_yaml)
    (cfg_dir / "optim" / "signsgd.yaml").write_text(
        "_target_: my_components.SignSGD\n_partial_: true\nlr: 1.0e-3\nweight_decay: 0.0\n")
    return src, cfg_dir


def test_readme_attention_matches_the_reference(toy_components, monkeypatch):
    # README's example is a real attention: with temperature t it equals the reference at scale / t,
    # causal with a KV cache included
    src, _ = toy_components
    monkeypatch.syspath_prepend(str(src))
    from my_components import _readme_attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, t, 8, generator=g, dtype=torch.float64) for t in (5, 9, 9))
    want = attention_f64(q, k, v, causal=True, scale=8**-0.5 / 2.0)
    torch.testing.assert_close(_readme_attention(q, k, v, temperature=2.0), want)
    torch.testing.assert_close(_readme_attention(q, k, v, causal=False), attention_f64(q, k, v, causal=False))


def test_own_attention_and_optimizer_train_through_train_py(tmp_path, tiny_overrides, toy_components):
    src, cfg_dir = toy_components
    log = tmp_path / "calls.txt"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(src), os.environ.get("PYTHONPATH", "")])}
    env.pop("HYDRA_FULL_ERROR", None)
    args = [TRAIN, f"hydra.searchpath=[file://{cfg_dir}]", "attn=scaled", "optim=signsgd",
            f"+attn.log_path={log}", *tiny_overrides, "max_iters=2", "eval_interval=0", "sample_tokens=0"]
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

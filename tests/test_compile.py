"""compile=true with each attention: one graph, the same losses as eager, resume across compiled runs.

torch.compile with Inductor (C++ code generation on a CPU) takes tens of seconds with a cold
cache. So every attention is traced as one whole graph (``fullgraph=True``) with the fast
``aot_eager`` backend, which proves there is no graph break (online's autograd.Function included),
and full Inductor training runs cover the default attention (sdpa) and online's custom backward.
flash runs here under Triton's interpreter, where its ops are opaque custom ops around the real
(interpreted) kernels; its GPU path (triton_op, kernels visible to Inductor) is traced on the CPU
by tests/test_flash_compile.py and run by tests/test_flash_gpu.py. ``compile_mode`` reaches
``torch.compile(mode=...)``; an unknown one is a one-line error.
"""
import pytest
import torch
from conftest import compose_cfg

from kernels import ATTENTION
from models import GPT, GPTConfig
from trainer import rundir as ckpt
from trainer.loop import Trainer

pytestmark = pytest.mark.slow


class LossRecorder(Trainer):
    def train_step(self, it):
        metrics = super().train_step(it)
        self.losses = getattr(self, "losses", []) + [float(metrics["loss"])]
        return metrics


def run(tmp_path, overrides, name):
    trainer = LossRecorder(compose_cfg(overrides), tmp_path / name, overrides)
    trainer.fit()
    return trainer


@pytest.mark.parametrize("attn, pos", [(name, "learned") for name in ATTENTION] + [("sdpa", "rope")])
def test_whole_model_traces_as_one_graph_with_equal_gradients(attn, pos):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=40, block_size=32, n_layer=2, n_head=2, n_embd=32, pos=pos), ATTENTION[attn])
    idx = torch.randint(0, 40, (3, 32))
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)  # a graph break raises
    grads = []
    for fn in (model, compiled):
        model.zero_grad()
        _, loss = fn(idx, idx)
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    (eager_loss, eager_grads), (compiled_loss, compiled_grads) = grads
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(compiled_grads, eager_grads, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("attn", ["sdpa", "online"])
def test_compiled_training_matches_eager(tmp_path, tiny_overrides, attn):
    common = tiny_overrides + [f"attn={attn}", "max_iters=3", "eval_interval=0", "eval_iters=1", "sample_tokens=0"]
    eager = run(tmp_path, common, "eager")
    torch._dynamo.reset()
    compiled = run(tmp_path, common + ["compile=true"], "compiled")
    assert compiled.model is not compiled.raw_model  # really compiled
    torch.testing.assert_close(compiled.losses, eager.losses, rtol=1e-4, atol=1e-5)
    for a, b in zip(eager.raw_model.parameters(), compiled.raw_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)


def test_compiled_checkpoint_resumes_compiled_or_eager(tmp_path, tiny_overrides):
    # lr_decay_iters pinned: the first run stops at max_iters=2 but must follow the 4-step schedule
    common = tiny_overrides + ["max_iters=4", "lr_decay_iters=4", "eval_interval=2", "eval_iters=1", "sample_tokens=0"]
    straight = run(tmp_path, common, "straight")
    first = run(tmp_path, common + ["compile=true", "max_iters=2"], "compiled")
    state = torch.load(tmp_path / "compiled" / ckpt.LAST, weights_only=True)
    assert state["step"] == 2
    assert not [k for k in state["model"] if "_orig_mod" in k]  # saved from the uncompiled module
    for compile_again in ("true", "false"):
        resumed = run(tmp_path, common + [f"compile={compile_again}", f"resume={tmp_path / 'compiled'}"],
                      f"resumed_{compile_again}")
        assert resumed.iteration == 4
        torch.testing.assert_close(first.losses + resumed.losses, straight.losses, rtol=1e-4, atol=1e-5)


def test_compiled_flash_model_has_no_graph_break():
    # torch._dynamo.explain counts breaks instead of raising on the first (fullgraph=True above)
    model = GPT(GPTConfig(vocab_size=40, block_size=32, n_layer=2, n_head=2, n_embd=32), ATTENTION["flash"])
    idx = torch.randint(0, 40, (2, 32))
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model)(idx, idx)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1, explanation.break_reasons


def test_compile_modes_are_torch_modes():
    from torch._inductor import list_mode_options

    from trainer.config import COMPILE_MODES

    assert set(COMPILE_MODES) <= set(list_mode_options()), "a mode torch.compile does not know"
    assert {"default", "reduce-overhead", "max-autotune-no-cudagraphs"} <= set(COMPILE_MODES)


@pytest.mark.parametrize("mode", ["reduce-overhead", "max-autotune-no-cudagraphs"])
def test_compile_mode_reaches_torch_compile(tmp_path, tiny_overrides, monkeypatch, mode):
    seen = []
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: seen.append(kw) or real(model, backend="eager"))
    overrides = tiny_overrides + ["compile=true", f"compile_mode={mode}", "max_iters=0", "eval_iters=1",
                                  "sample_tokens=0"]
    trainer = Trainer(compose_cfg(overrides), tmp_path / "run", overrides)
    trainer.release()
    assert seen == [{"mode": mode}]


def test_unknown_compile_mode_is_a_one_line_user_error(tmp_path, tiny_overrides):
    from trainer.errors import user_errors

    overrides = tiny_overrides + ["compile=true", "compile_mode=fastest", "max_iters=1"]
    with pytest.raises(user_errors(), match="compile_mode='fastest' is not one of") as info:
        Trainer(compose_cfg(overrides), tmp_path / "run", overrides)
    assert "\n" not in str(info.value) and "reduce-overhead" in str(info.value)

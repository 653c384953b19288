"""Test-session setup shared by every test file.

Triton reads TRITON_INTERPRET once, at import, so the choice is made here for the whole process:
without CUDA the flash kernel runs under Triton's CPU interpreter. Ahead-of-time GPU compiles run
in subprocesses that unset it (interpreted kernels cannot be compiled).
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """On a GPU machine Triton compiles natively, so a test that runs a Triton kernel on CPU tensors
    gets the one-line error naming TRITON_INTERPRET=1: report it as skipped, saying how to run it."""
    outcome = yield
    report = outcome.get_result()
    if (call.excinfo is not None and report.failed and torch.cuda.is_available()
            and os.environ.get("TRITON_INTERPRET") != "1" and "TRITON_INTERPRET=1" in str(call.excinfo.value)):
        report.outcome = "skipped"
        report.longrepr = (str(item.path), item.location[1] or 0,
                           "Skipped: needs Triton's CPU interpreter; run: TRITON_INTERPRET=1 pytest -m 'not gpu'")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


# ---------------------------------------------------------------------------------------------
# Shared helpers for tests that build configs and runs.
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"

# A small corpus in the tiny-shakespeare format, repeated so a tiny model can learn it quickly.
TINY_TEXT = (
    "FIRST CITIZEN:\nBefore we proceed any further, hear me speak.\n\n"
    "ALL:\nSpeak, speak.\n\n"
    "FIRST CITIZEN:\nYou are all resolved rather to die than to famish?\n\n"
    "ALL:\nResolved. resolved.\n\n"
) * 40

# Overrides that make any run tiny: a 1-layer, 32-wide model on the tiny corpus.
TINY_OVERRIDES = [
    "model.n_layer=1", "model.n_head=2", "model.n_embd=32", "model.block_size=32",
    "batch_size=4", "eval_iters=2", "log_interval=1", "warmup_iters=2", "sample_tokens=8",
]


def compose_cfg(overrides=()):
    """The training config as scripts/train.py would see it (no `hydra` node)."""
    from hydra import compose, initialize_config_dir

    import trainer.config  # noqa: F401  (registers the ${run_name:} resolver)

    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose("train", overrides=list(overrides))


@pytest.fixture
def tiny_corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(TINY_TEXT, encoding="utf-8")
    return path


@pytest.fixture
def tiny_overrides(tiny_corpus, tmp_path):
    """Overrides for a tiny CPU run on the tiny corpus, with its cache inside tmp_path."""
    return TINY_OVERRIDES + [
        "data=text", f"data.path={tiny_corpus}", f"data.cache_dir={tmp_path / 'cache'}", "device=cpu",
    ]


@pytest.fixture
def offline(monkeypatch):
    """No network: every connection attempt (DNS included) raises, and is recorded; a test that
    uses this fixture fails at teardown if anything tried to connect, unless it took the record
    (``offline.clear()``) after checking an attempt it expected."""
    import socket

    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args[:2])
        raise OSError("network disabled in this offline test")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", lambda self, *a: refuse(*a))
    monkeypatch.setattr(socket.socket, "connect_ex", lambda self, *a: refuse(*a))
    yield attempts
    assert not attempts, f"an offline test tried to reach the network: {attempts[:3]}"

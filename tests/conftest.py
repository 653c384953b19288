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


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)

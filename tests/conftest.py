"""Test harness: runs the real Triton kernels on CPU through Triton's interpreter when CUDA is absent.

TRITON_INTERPRET must be set before triton is imported, so this file does it first thing.
"""
import os

import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

from tests import interpreter_fixes  # noqa: E402

if not ON_GPU:
    interpreter_fixes.install()

DEVICE = "cuda" if ON_GPU else "cpu"


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """A different, reproducible seed per test: fresh random inputs that a failure can replay."""
    seed = hash(request.node.nodeid) % (2**31)
    torch.manual_seed(seed)
    yield

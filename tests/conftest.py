"""Test harness: runs the real Triton kernels on CPU through Triton's interpreter when CUDA is absent.

TRITON_INTERPRET must be set before triton is imported, so this file does it first thing; importing
``fusedformers.kernels`` then applies the interpreter fixes by itself.
"""
import os
import zlib

import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

DEVICE = "cuda" if ON_GPU else "cpu"


@pytest.fixture
def device():
    return DEVICE


# FUSEDFORMERS_TEST_SEED=N draws a different set of inputs for the whole run (default 0: the same every run)
BASE_SEED = int(os.environ.get("FUSEDFORMERS_TEST_SEED", "0"))


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """A different seed per test, stable across runs and processes (crc32 of the test id, not Python's salted
    hash): random inputs that a failure can replay; set FUSEDFORMERS_TEST_SEED to draw new ones."""
    seed = (zlib.crc32(request.node.nodeid.encode()) + BASE_SEED) % (2**31)
    torch.manual_seed(seed)
    request.node.user_properties.append(("seed", seed))
    yield

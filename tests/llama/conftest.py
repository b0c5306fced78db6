"""Fixtures of the LLaMA tests: one tiny GQA checkpoint per module, and our models loaded from it."""
import shutil

import pytest

from fusedformers.models.llama import LlamaForCausalLM
from tests.conftest import DEVICE
from tests.llama.common import make_checkpoint


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """GQA checkpoint (4 query heads, 2 K/V heads), untied embeddings: (directory, HF model on DEVICE)."""
    path = str(tmp_path_factory.mktemp("llama_base"))
    return path, make_checkpoint(path).to(DEVICE)


@pytest.fixture(scope="module")
def fused(base):
    return LlamaForCausalLM.from_pretrained(base[0], device=DEVICE)


@pytest.fixture(scope="module")
def eager(base):
    return LlamaForCausalLM.from_pretrained(base[0], device=DEVICE, attn_implementation="eager")


@pytest.fixture
def broken(tmp_path, base):
    shutil.copytree(base[0], tmp_path, dirs_exist_ok=True)
    return tmp_path

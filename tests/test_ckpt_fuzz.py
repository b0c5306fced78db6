"""The checkpoint fuzzer (tests/ckpt_fuzz.py) in CI: 2 x 150 random mutations of a saved tiny LLaMA and BART
checkpoint, each load either a clear error naming the file or the original model, bit for bit.
FUSEDFORMERS_TEST_SEED draws other cases."""
import pytest

from tests import ckpt_fuzz
from tests.conftest import BASE_SEED


@pytest.mark.parametrize("family", ckpt_fuzz.FAMILIES)
def test_checkpoint_fuzzer(family, capsys):
    status = ckpt_fuzz.main(["--cases", "150", "--seed", str(BASE_SEED), "--family", family])
    out = capsys.readouterr().out
    assert status == 0, out
    assert "150 passed" in out and ", 0 failed" in out, out

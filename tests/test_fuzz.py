"""The kernel fuzzer (tests/fuzz.py) in CI: 4 x 50 random attention / RMSNorm / LayerNorm / RoPE / SiLU*mul cases,
forward and backward, each against its float64 reference under the accuracy rule. FUSEDFORMERS_TEST_SEED draws
other cases."""
import pytest

from tests import fuzz
from tests.conftest import BASE_SEED


@pytest.mark.slow
@pytest.mark.parametrize("chunk", range(4), ids=lambda chunk: f"seed{BASE_SEED * 4 + chunk}")
def test_fuzz_kernels(chunk, capsys):
    status = fuzz.main(["--cases", "50", "--seed", str(BASE_SEED * 4 + chunk)])
    out = capsys.readouterr().out
    assert status == 0, out
    assert "50 passed, 0 failed" in out, out

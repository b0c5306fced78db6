"""The SiLU * mul kernel (``fusedformers.kernels.silu_mul``, LLaMA's ``act_fn(gate_proj(x)) * up_proj(x)`` on the
packed gate/up projection) against a float64 reference: forward and backward within 2x the error of the eager
same-dtype computation (``F.silu(gate) * up`` and autograd through it), every output element written."""
import pytest
import torch
import torch.nn.functional as F

from fusedformers import kernels
from fusedformers.kernels.reference import silu_mul_reference
from fusedformers.kernels.silu_mul import _silu_mul
from tests.helpers import DTYPES, assert_within_eager_error, dtype_id, grads_on_fresh_leaves, poisoned, to64


def packed_view(rows, seq_len, intermediate, dtype, device):
    """[B, L, 2I] view of a wider [B, L, 2I + 8] tensor (strided rows, as a projection's slice), scaled so
    that the SiLU sees its negative tail and its linear part."""
    wide = 3 * torch.randn(rows, seq_len, 2 * intermediate + 8, device=device, dtype=dtype)
    return wide[..., :2 * intermediate]


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("intermediate", [16, 80, 1100], ids=lambda n: f"I{n}")  # 1100: two column blocks
def test_forward_within_eager_error(dtype, intermediate, device):
    gate_up = packed_view(2, 5, intermediate, dtype, device)
    out = kernels.silu_mul(gate_up)
    assert out.shape == (2, 5, intermediate) and out.dtype == dtype and out.is_contiguous()
    expected64 = silu_mul_reference(gate_up.double())
    assert_within_eager_error("out", out, expected64, silu_mul_reference(gate_up))
    if dtype != torch.float32:  # the same two roundings as eager: at most the SiLU's last-ulp ties differ
        assert (out != silu_mul_reference(gate_up)).float().mean() < 0.01


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_gradients_within_eager_error(dtype, device):
    gate_up = packed_view(2, 7, 48, dtype, device)
    grad_out = torch.randn(2, 7, 48, device=device, dtype=dtype)
    _, (got,) = grads_on_fresh_leaves(kernels.silu_mul, (gate_up,), grad_out)
    _, (expected64,) = grads_on_fresh_leaves(silu_mul_reference, (gate_up,), grad_out, dtype=torch.float64)
    _, (eager,) = grads_on_fresh_leaves(silu_mul_reference, (gate_up,), grad_out)
    assert got.shape == gate_up.shape
    assert_within_eager_error("d gate", got[..., :48], expected64[..., :48], eager[..., :48])
    assert_within_eager_error("d up", got[..., 48:], expected64[..., 48:], eager[..., 48:])


def test_every_element_is_written(device):
    """Poisoned outputs, forward and backward: an element the kernel fails to write stays NaN."""
    gate_up = packed_view(3, 4, 40, torch.bfloat16, device)
    out = _silu_mul(gate_up, out=poisoned(3, 4, 40, dtype=torch.bfloat16, device=device))
    assert not torch.isnan(out).any()
    dout = torch.randn(3, 4, 40, device=device, dtype=torch.bfloat16)
    grad = _silu_mul(gate_up, dout, out=poisoned(3, 4, 80, dtype=torch.bfloat16, device=device))
    assert not torch.isnan(grad).any()
    _, (eager,) = grads_on_fresh_leaves(silu_mul_reference, (gate_up,), dout)
    g64, d64 = to64(gate_up, dout)
    _, (expected64,) = grads_on_fresh_leaves(silu_mul_reference, (g64,), d64, dtype=torch.float64)
    assert_within_eager_error("grad", grad, expected64, eager)


def test_matches_the_silu_definition(device):
    """Independent of the reference's chunking: gate is the first half, up the second."""
    gate, up = torch.randn(6, 24, device=device), torch.randn(6, 24, device=device)
    out = kernels.silu_mul(torch.cat((gate, up), dim=-1))
    torch.testing.assert_close(out, gate * torch.sigmoid(gate) * up, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(out, F.silu(up) * gate)


@pytest.mark.parametrize("gate_up,error,match", [
    (lambda d: torch.randn(2, 7, device=d), ValueError, "even last dim"),
    (lambda d: torch.randn(2, 8, device=d).long(), TypeError, "float16, bfloat16 or float32"),
    (lambda d: [1.0, 2.0], TypeError, "gate_up must be a torch.Tensor"),
], ids=["odd_width", "int64", "list"])
def test_bad_input(gate_up, error, match, device):
    with pytest.raises(error, match=match):
        kernels.silu_mul(gate_up(device))

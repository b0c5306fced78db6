"""The RoPE kernel against HF's apply_rotary_pos_emb (fusedformers.kernels.reference.rope_reference): the same
roundings, so 16-bit results are bit-identical; float32 within an ulp or two; gradients as autograd through the
reference."""
import pytest
import torch

from fusedformers import kernels
from fusedformers.kernels.reference import rope_reference
from fusedformers.kernels.rope import _rotate
from tests.helpers import DTYPES, assert_within_eager_error, dtype_id, grads_on_fresh_leaves, params, poisoned, to64


def cos_sin(batch, seq_len, head_dim, dtype, device, offset=0):
    """HF's default RoPE: angles = position * inv_freq (float32), halves repeated, cast to the dtype; positions
    differ per batch row (as with left padding)."""
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim))
    positions = torch.arange(seq_len, device=device)[None, :] + offset + 7 * torch.arange(batch, device=device)[:, None]
    angles = positions[:, :, None].float() * inv_freq
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def projection_view(batch, seq_len, heads, head_dim, dtype, device):
    """[B, L, H, D] view of a [B, L, H * D + 8] projection: strided rows, as a model's q/k are."""
    wide = torch.randn(batch, seq_len, heads * head_dim + 8, device=device, dtype=dtype)
    return wide[:, :, :heads * head_dim].view(batch, seq_len, heads, head_dim)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("heads,head_dim", params([(1, 16), (4, 64), (3, 80), (8, 96), (2, 128), (70, 32)],
                                                  id=lambda heads_dim: "H{}-D{}".format(*heads_dim)))
def test_forward_matches_hf(dtype, heads, head_dim, device):
    x = projection_view(2, 13, heads, head_dim, dtype, device)
    cos, sin = cos_sin(2, 13, head_dim, dtype, device, offset=1000)
    out = kernels.rope(x, cos, sin)
    expected = rope_reference(x, cos, sin)
    assert out.shape == x.shape and out.dtype == dtype and out.is_contiguous()
    if dtype == torch.float32:  # the compiler may fuse a product into the sum (one rounding less)
        torch.testing.assert_close(out, expected, rtol=2e-6, atol=2e-6)
    else:
        assert torch.equal(out, expected), (out.float() - expected.float()).abs().max()


def test_every_element_is_written(device):
    """Poison the output buffer: an element the kernel fails to write stays NaN."""
    x = projection_view(3, 5, 6, 48, torch.bfloat16, device)
    cos, sin = cos_sin(3, 5, 48, torch.bfloat16, device)
    out = _rotate(x, cos, sin, out=poisoned(3, 5, 6, 48, device=device, dtype=torch.bfloat16))
    assert not torch.isnan(out).any()
    assert torch.equal(out, rope_reference(x, cos, sin))


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_gradients_match_autograd_through_hf(dtype, device):
    x = projection_view(2, 9, 4, 64, dtype, device)
    cos, sin = cos_sin(2, 9, 64, dtype, device, offset=300)
    grad_out = torch.randn(2, 9, 4, 64, device=device, dtype=dtype)

    def grad_of(fn, x, cos, sin):  # the gradient of x only
        return grads_on_fresh_leaves(lambda x: fn(x, cos, sin), (x,), grad_out)[1][0]

    got = grad_of(kernels.rope, x, cos, sin)
    expected64 = grad_of(rope_reference, *to64(x, cos, sin))
    eager = grad_of(rope_reference, x, cos, sin)
    assert_within_eager_error("dx", got, expected64, eager)
    if dtype != torch.float32:  # the backward is the same rotation with -sin: the same roundings as autograd
        assert torch.equal(got, eager)


def test_gradients_with_unequal_halves(device):
    """Any cos/sin, not only HF's (equal halves): the gradient is autograd's through the reference."""
    x = projection_view(2, 5, 3, 32, torch.float32, device)
    cos, sin = torch.randn(2, 5, 32, device=device), torch.randn(2, 5, 32, device=device)
    grad_out = torch.randn(2, 5, 3, 32, device=device)
    _, (got,) = grads_on_fresh_leaves(lambda x: kernels.rope(x, cos, sin), (x,), grad_out)
    cos64, sin64 = to64(cos, sin)
    _, (expected,) = grads_on_fresh_leaves(lambda x: rope_reference(x, cos64, sin64), (x,), grad_out,
                                           dtype=torch.float64)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


def test_rotation_keeps_the_norm_of_each_pair(device):
    """A rotation: |(out_j, out_{j+D/2})| = |(x_j, x_{j+D/2})| (float32, cos^2 + sin^2 = 1)."""
    x = projection_view(1, 6, 2, 32, torch.float32, device)
    cos, sin = cos_sin(1, 6, 32, torch.float32, device, offset=5)
    out = kernels.rope(x, cos, sin)

    def pair_norms(t):
        return t[..., :16] ** 2 + t[..., 16:] ** 2

    torch.testing.assert_close(pair_norms(out), pair_norms(x), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out, x)


@pytest.mark.parametrize("mutate,error,match", [
    (lambda x, c, s: (x[0], c, s), ValueError, "x must have 4 dimensions"),
    (lambda x, c, s: (x, c[:, :-1], s), ValueError, r"cos must have shape \[B, L, D\]"),
    (lambda x, c, s: (x, c, s.float()), TypeError, "sin must have x's dtype"),
    (lambda x, c, s: (x[..., :15], c[..., :15], s[..., :15]), ValueError, "head dim D must be even"),
    (lambda x, c, s: (x.long(), c, s), TypeError, "float16, bfloat16 or float32"),
], ids=["x_3d", "cos_length", "sin_dtype", "odd_head_dim", "x_int64"])
def test_bad_input(mutate, error, match, device):
    x = projection_view(1, 4, 2, 16, torch.float16, device)
    cos, sin = cos_sin(1, 4, 16, torch.float16, device)
    with pytest.raises(error, match=match):
        kernels.rope(*mutate(x, cos, sin))

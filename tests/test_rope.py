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


# ----------------------------------------------------------------------------------------------------------------
# The packed q/k/v (rope_qkv): q and k rotated, v copied, optionally into a KV cache, in one launch
# ----------------------------------------------------------------------------------------------------------------
def packed_qkv(batch, seq_len, heads, kv_heads, head_dim, dtype, device):
    """[B, L, (Hq + 2 Hkv) * D] view of a wider projection: strided rows, as a fused projection's slice."""
    width = (heads + 2 * kv_heads) * head_dim
    return torch.randn(batch, seq_len, width + 8, device=device, dtype=dtype)[..., :width]


def hf_rotary(q, k, cos, sin):
    """transformers' own apply_rotary_pos_emb on [B, L, H, D] tensors (it takes [B, H, L, D])."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    q, k = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
    return q.transpose(1, 2), k.transpose(1, 2)


def assert_rotated_like_hf(got, expected, dtype):
    if dtype == torch.float32:  # the compiler may fuse a product into the sum (one rounding less)
        torch.testing.assert_close(got, expected, rtol=2e-6, atol=2e-6)
    else:
        assert torch.equal(got, expected), (got.float() - expected.float()).abs().max()


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("heads,kv_heads,head_dim", params([(4, 2, 16), (4, 4, 32), (8, 1, 64), (3, 3, 80),
                                                           (6, 2, 128)], id=lambda s: "Hq{}-Hkv{}-D{}".format(*s)))
def test_qkv_forward_matches_hf(dtype, heads, kv_heads, head_dim, device):
    qkv = packed_qkv(2, 5, heads, kv_heads, head_dim, dtype, device)
    cos, sin = cos_sin(2, 5, head_dim, dtype, device, offset=500)
    q, k, v = kernels.rope_qkv(qkv, cos, sin, heads, kv_heads)
    q_in, k_in, v_in = qkv.unflatten(-1, (heads + 2 * kv_heads, head_dim)).split((heads, kv_heads, kv_heads), dim=2)
    expected_q, expected_k = hf_rotary(q_in, k_in, cos, sin)
    assert q.shape == (2, 5, heads, head_dim) and k.shape == v.shape == (2, 5, kv_heads, head_dim)
    assert all(t.is_contiguous() and t.dtype == dtype for t in (q, k, v))
    assert_rotated_like_hf(q, expected_q, dtype)
    assert_rotated_like_hf(k, expected_k, dtype)
    assert torch.equal(v, v_in)
    ref_q, ref_k, ref_v = kernels.rope_qkv_reference(qkv, cos, sin, heads, kv_heads)
    assert_rotated_like_hf(q, ref_q, dtype)
    assert torch.equal(v, ref_v)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_qkv_into_cache_at_positions(dtype, device):
    """Poisoned cache (NaN): the tokens land at rows cache_position (not at 0, not in order), rotated like HF's;
    every other row stays untouched; q as without a cache. GQA: 6 query heads, 2 K/V heads."""
    heads, kv_heads, head_dim, max_len = 6, 2, 32, 12
    qkv = packed_qkv(2, 3, heads, kv_heads, head_dim, dtype, device)
    cos, sin = cos_sin(2, 3, head_dim, dtype, device, offset=40)
    k_cache = poisoned(2, kv_heads, max_len, head_dim, dtype=dtype, device=device)
    v_cache = poisoned(2, kv_heads, max_len, head_dim, dtype=dtype, device=device)
    cache_position = torch.tensor([7, 4, 9], device=device)
    q = kernels.rope_qkv(qkv, cos, sin, heads, kv_heads, k_cache=k_cache, v_cache=v_cache,
                         cache_position=cache_position)
    expected_q, expected_k, expected_v = kernels.rope_qkv_reference(qkv, cos, sin, heads, kv_heads)
    assert_rotated_like_hf(q, expected_q, dtype)
    assert_rotated_like_hf(k_cache[:, :, cache_position].transpose(1, 2), expected_k, dtype)
    assert torch.equal(v_cache[:, :, cache_position].transpose(1, 2), expected_v)
    others = torch.ones(max_len, dtype=torch.bool, device=device)
    others[cache_position] = False
    assert torch.isnan(k_cache[:, :, others]).all() and torch.isnan(v_cache[:, :, others]).all()
    # the eager implementation of the op registry: the same cache
    k_ref, v_ref = (poisoned(2, kv_heads, max_len, head_dim, dtype=dtype, device=device) for _ in range(2))
    q_ref = kernels.rope_qkv_reference(qkv, cos, sin, heads, kv_heads, k_cache=k_ref, v_cache=v_ref,
                                       cache_position=cache_position)
    assert_rotated_like_hf(q, q_ref, dtype)
    assert torch.equal(v_cache.nan_to_num(), v_ref.nan_to_num())


def test_qkv_every_q_element_is_written_and_cache_dtype_cast(device):
    """Poisoned q output (launcher level); a float32 cache fed from bfloat16 q/k/v gets the bfloat16 rotation
    cast up (HF rotates in the projection's dtype, the cache update casts)."""
    from fusedformers.kernels.rope import _launch, _split_qkv
    heads, kv_heads, head_dim = 4, 2, 16
    qkv = packed_qkv(2, 3, heads, kv_heads, head_dim, torch.bfloat16, device)
    cos, sin = cos_sin(2, 3, head_dim, torch.bfloat16, device)
    q_in, k_in, v_in = _split_qkv(qkv, heads, kv_heads, head_dim)
    q_out = poisoned(2, 3, heads, head_dim, dtype=torch.bfloat16, device=device)
    k_cache, v_cache = (poisoned(2, kv_heads, 3, head_dim, dtype=torch.float32, device=device) for _ in range(2))
    _launch(q_in, cos, sin, q_out, kv=(k_in, v_in), kv_out=(k_cache, v_cache),
            cache_position=torch.arange(3, device=device))
    expected_q, expected_k, expected_v = kernels.rope_qkv_reference(qkv, cos, sin, heads, kv_heads)
    assert torch.equal(q_out, expected_q)
    assert torch.equal(k_cache, expected_k.transpose(1, 2).float())
    assert torch.equal(v_cache, expected_v.transpose(1, 2).float())


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_qkv_gradients_match_autograd_through_hf(dtype, device):
    """Backward into the packed gradient: rope backward for q and k, identity for v; within 2x the eager error of
    the float64 reference, and (16-bit) the same roundings as autograd through HF's RoPE."""
    heads, kv_heads, head_dim = 4, 2, 32
    qkv = packed_qkv(2, 6, heads, kv_heads, head_dim, dtype, device)
    cos, sin = cos_sin(2, 6, head_dim, dtype, device, offset=90)
    grads = (torch.randn(2, 6, heads, head_dim, device=device, dtype=dtype),
             *(torch.randn(2, 6, kv_heads, head_dim, device=device, dtype=dtype) for _ in range(2)))

    def grad_of(fn, qkv, cos, sin, dtype=None):
        return grads_on_fresh_leaves(lambda x: fn(x, cos, sin, heads, kv_heads), (qkv,), grads, dtype=dtype)[1][0]

    got = grad_of(kernels.rope_qkv, qkv, cos, sin)
    expected64 = grad_of(kernels.rope_qkv_reference, *to64(qkv, cos, sin), dtype=torch.float64)
    eager = grad_of(kernels.rope_qkv_reference, qkv, cos, sin)
    assert got.shape == qkv.shape
    assert_within_eager_error("dqkv", got, expected64, eager)
    v_cols = slice((heads + kv_heads) * head_dim, None)
    assert torch.equal(got[..., v_cols], grads[2].flatten(-2))
    if dtype != torch.float32:
        assert torch.equal(got, eager)


@pytest.mark.parametrize("change,error,match", [
    (dict(num_kv_heads=3), ValueError, r"qkv must be \[B, L, \(num_heads \+ 2 \* num_kv_heads\) \* D\]"),
    (dict(num_heads=0), ValueError, "num_heads must be a positive int"),
    (dict(k_cache="only"), ValueError, "go together"),
    (dict(cache_position="int32"), ValueError, "cache_position must be an int64 tensor"),
    (dict(k_cache="wrong_heads"), ValueError, r"k_cache must have shape \[B, Hkv, max_len, D\]"),
], ids=["width", "heads", "cache_alone", "position_dtype", "cache_heads"])
def test_qkv_bad_input(change, error, match, device):
    qkv = packed_qkv(1, 2, 4, 2, 16, torch.float16, device)
    cos, sin = cos_sin(1, 2, 16, torch.float16, device)
    kwargs = dict(num_heads=4, num_kv_heads=2)
    cache = dict(k_cache=torch.zeros(1, 2, 8, 16, device=device, dtype=torch.float16),
                 v_cache=torch.zeros(1, 2, 8, 16, device=device, dtype=torch.float16),
                 cache_position=torch.arange(2, device=device))
    if change.get("k_cache") == "only":
        kwargs.update(k_cache=cache["k_cache"])
    elif change.get("k_cache") == "wrong_heads":
        kwargs.update(cache, k_cache=torch.zeros(1, 3, 8, 16, device=device, dtype=torch.float16))
    elif change.get("cache_position") == "int32":
        kwargs.update(cache, cache_position=cache["cache_position"].int())
    else:
        kwargs.update(change)
    with pytest.raises(error, match=match):
        kernels.rope_qkv(qkv, cos, sin, kwargs.pop("num_heads"), kwargs.pop("num_kv_heads"), **kwargs)

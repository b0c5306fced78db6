"""Tests of fusedformers.kernels.rms_norm: forward and backward against float64 references, within twice the
error of the eager computation in the same dtype; layouts, the fused residual add, full writes, and argument errors.

On CPU the kernels run through Triton's interpreter, whose cost is per program: row counts stay small.
"""
import pytest
import torch

from fusedformers.kernels.reference import rms_norm_reference
from fusedformers.kernels.rms_norm import MAX_HIDDEN_SIZE, _as_rows, _norm_backward, _norm_forward, rms_norm
from tests.conftest import DEVICE, ON_GPU
from tests.helpers import (
    DTYPE_PARAMS,
    DTYPES,
    assert_within_eager_error,
    dtype_id,
    fresh_leaves,
    grads_on_fresh_leaves,
    params,
    poisoned,
    to64,
)

HIDDEN_SIZES = [64, 96, 200, 1000] + ([4096, 5120, 8192, 16384] if ON_GPU else [])
LAYOUTS = ["vector", "rows", "batch", "sliced", "padded", "transposed"]
EPS = 1e-6
# the quick loop leaves out the widest rows
HIDDEN_SIZE_PARAMS = params(HIDDEN_SIZES, id="N{}".format, slow=lambda n: n >= 1000)


# --- inputs -------------------------------------------------------------------------------------------------

def make_input(layout, n, dtype, device=DEVICE):
    """Random ``[..., n]`` tensor in one of the layouts; never zeros."""
    def randn(*shape):
        return torch.randn(*shape, dtype=dtype, device=device)
    if layout == "vector":  # a single row [N]
        return randn(n)
    if layout == "rows":  # [M, N]
        return randn(37, n)
    if layout == "batch":  # [B, L, N]
        return randn(2, 5, n)
    if layout == "sliced":  # every other position of [B, 2L, N]: leading dims strided, rows still viewable
        return randn(2, 8, n)[:, ::2]
    if layout == "padded":  # rows of a wider buffer: row stride N + 24
        return randn(6, n + 24)[:, :n]
    if layout == "transposed":  # last dim not contiguous: the wrapper must copy
        return randn(n, 6).t()
    raise AssertionError(layout)


def make_weight(n, x_dtype, weight_kind):
    dtype = {"same": x_dtype, "fp32": torch.float32}[weight_kind]
    # around 1 like a trained RMSNorm weight, with random signs and spread
    return (1.0 + 0.5 * torch.randn(n, device=DEVICE)).to(dtype)


def input_grads(fn, x, weight, residual, grad_out, grad_h, dtype=None):
    """Gradients (dx, dweight, dresidual: None without a residual) of ``fn(x, weight, EPS, residual=residual)``
    on fresh leaves (cast to ``dtype`` if given), for the upstream gradients of out (and of h with a residual)."""
    def call(x, weight, residual):
        return fn(x, weight, EPS, residual=residual)

    grad_outputs = grad_out if residual is None else (grad_out, grad_h)
    return grads_on_fresh_leaves(call, (x, weight, residual), grad_outputs, dtype=dtype)[1]


def weight_id(weight_kind):
    return {"same": "weight_same_dtype", "fp32": "weight_fp32"}[weight_kind]


def check_forward(x, weight, residual):
    with torch.no_grad():
        actual = rms_norm(x, weight, EPS, residual=residual)
        eager = rms_norm_reference(x, weight, EPS, residual=residual)
        x64, weight64, residual64 = to64(x, weight, residual)
        expected = rms_norm_reference(x64, weight64, EPS, residual=residual64)
    if residual is None:
        actual, eager, expected = (actual,), (eager,), (expected,)
    assert len(actual) == len(expected)
    for name, a, e, e64 in zip(["out", "h"], actual, eager, expected):
        assert a.dtype == e.dtype, f"{name}: dtype {a.dtype}, HF gives {e.dtype}"
        assert a.shape == x.shape
        assert_within_eager_error(name, a, e64, e)


def check_backward(x, weight, residual, layout=None):
    out_dtype = torch.promote_types(x.dtype, weight.dtype)
    # random upstream gradients; in the given layout so that non-contiguous gradients are exercised too
    grad_out = (make_input(layout, x.shape[-1], out_dtype) if layout else torch.randn_like(x, dtype=out_dtype))
    grad_h = make_input(layout, x.shape[-1], x.dtype) if layout else torch.randn_like(x)
    assert grad_out.shape == x.shape and grad_h.shape == x.shape
    actual = input_grads(rms_norm, x, weight, residual, grad_out, grad_h)
    eager = input_grads(rms_norm_reference, x, weight, residual, grad_out, grad_h)
    expected = input_grads(rms_norm_reference, x, weight, residual, grad_out, grad_h, dtype=torch.float64)
    names = ["dx", "dweight"] + (["dresidual"] if residual is not None else [])
    for name, a, e, e64 in zip(names, actual, eager, expected):
        assert a.dtype == e.dtype, f"{name}: dtype {a.dtype}, eager gives {e.dtype}"
        assert_within_eager_error(name, a, e64, e)


# --- forward and backward against float64 -------------------------------------------------------------------

@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("weight_kind", ["same", "fp32"], ids=weight_id)
@pytest.mark.parametrize("n", HIDDEN_SIZE_PARAMS)
@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
def test_forward(dtype, n, weight_kind, with_residual):
    x = make_input("batch", n, dtype)
    residual = make_input("batch", n, dtype) if with_residual else None
    check_forward(x, make_weight(n, dtype, weight_kind), residual)


@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("weight_kind", ["same", "fp32"], ids=weight_id)
@pytest.mark.parametrize("n", HIDDEN_SIZE_PARAMS)
@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
def test_backward(dtype, n, weight_kind, with_residual):
    x = make_input("batch", n, dtype)
    residual = make_input("batch", n, dtype) if with_residual else None
    check_backward(x, make_weight(n, dtype, weight_kind), residual)


@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("layout", params(LAYOUTS, id=str, slow=lambda layout: layout == "rows"))
@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
def test_layouts_forward_backward(dtype, layout, with_residual):
    n = 96
    x = make_input(layout, n, dtype)
    residual = make_input(layout, n, dtype) if with_residual else None
    weight = make_weight(n, dtype, "same")
    check_forward(x, weight, residual)
    check_backward(x, weight, residual, layout=layout)


def test_mixed_16bit_weight_promotes_to_float32():
    x = make_input("batch", 200, torch.float16)
    weight = make_weight(200, torch.bfloat16, "same")
    assert rms_norm(x, weight).dtype == torch.float32
    check_forward(x, weight, None)
    check_backward(x, weight, None)


@pytest.mark.parametrize("weight_kind", params(["same", "fp32"], id=weight_id, slow=lambda kind: kind == "same"))
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_matches_eager_nearly_bitwise(dtype, weight_kind):
    """HF's roundings are reproduced: the result is eager's, up to rare one-ulp flips (float32 statistics
    summed in another order); h = x + residual is exactly eager's. On CPU this relies on the harness's
    round-to-nearest-even float32 -> bfloat16 cast (tests/interpreter_fixes.py)."""
    n = 1000
    x, residual = make_input("rows", n, dtype), make_input("rows", n, dtype)
    weight = make_weight(n, dtype, weight_kind)
    with torch.no_grad():
        out, h = rms_norm(x, weight, EPS, residual=residual)
        eager_out, eager_h = rms_norm_reference(x, weight, EPS, residual=residual)
    assert torch.equal(h, eager_h)
    # a one-ulp flip of the normalised value (relative eps), then the rounding of the product; float32's rstd
    # may differ by a few ulps
    rtol = (8 if dtype == torch.float32 else 2) * torch.finfo(dtype).eps
    torch.testing.assert_close(out, eager_out, rtol=rtol, atol=0)
    if dtype != torch.float32:
        mismatches = (out != eager_out).float().mean().item()
        assert mismatches <= 0.01, f"{mismatches:.2%} of elements differ from eager"


# --- full writes (poisoned output buffers) ------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_forward_writes_every_element_and_nothing_else(dtype):
    rows, n, pad = 11, 200, 8
    # x and residual with different row strides (n and n + 24)
    x = torch.randn(rows, n, dtype=dtype, device=DEVICE)
    residual = torch.randn(rows, n + 24, dtype=dtype, device=DEVICE)[:, :n]
    weight = make_weight(n, dtype, "same")
    # outputs are the first n columns of NaN-filled wider buffers: every element must be written, the padding
    # columns never
    out_buf = poisoned(rows, n + pad, dtype=dtype, device=DEVICE)
    h_buf = poisoned(rows, n + pad, dtype=dtype, device=DEVICE)
    rstd = poisoned(rows, dtype=torch.float32, device=DEVICE)
    out, h, _, rstd = _norm_forward(x, weight, EPS, residual, out=out_buf[:, :n], h_out=h_buf[:, :n], rstd=rstd)
    assert not torch.isnan(out).any() and not torch.isnan(h).any() and not torch.isnan(rstd).any()
    assert torch.isnan(out_buf[:, n:]).all() and torch.isnan(h_buf[:, n:]).all()
    expected_out, expected_h = rms_norm(x, weight, EPS, residual=residual)
    assert torch.equal(out, expected_out) and torch.equal(h, expected_h)
    expected_rstd = torch.rsqrt(expected_h.float().pow(2).mean(-1) + EPS)
    torch.testing.assert_close(rstd, expected_rstd)


@pytest.mark.parametrize("with_dh", [False, True], ids=["no_dh", "dh"])
@pytest.mark.parametrize("num_programs", [1, 3, 11], ids="programs{}".format)
def test_backward_writes_every_element_and_nothing_else(num_programs, with_dh):
    rows, n, pad, dtype = 11, 200, 8, torch.bfloat16
    h = make_input("rows", n, dtype)[:rows]
    weight = make_weight(n, dtype, "same")
    dy = torch.randn_like(h)
    dh = torch.randn_like(h) if with_dh else None
    rstd = torch.rsqrt(h.float().pow(2).mean(-1) + EPS)
    dx_buf = poisoned(rows, n + pad, dtype=dtype, device=DEVICE)
    # 3 programs over 11 rows: blocks of 4 rows, the last one partly past the end
    dx, dweight, _ = _norm_backward(dy, h, weight, rstd, dh, dx=dx_buf[:, :n], num_programs=num_programs)
    assert not torch.isnan(dx).any() and not torch.isnan(dweight).any()
    assert torch.isnan(dx_buf[:, n:]).all()
    # the split of rows over programs changes only the order of dweight's float32 sum
    ref_dx, ref_dweight, _ = _norm_backward(dy, h, weight, rstd, dh, num_programs=1)
    assert torch.equal(dx, ref_dx)
    torch.testing.assert_close(dweight.float(), ref_dweight.float(), rtol=2**-7, atol=1e-3)


# --- autograd details ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("used", ["out_only", "h_only"])
def test_residual_with_one_output_used(used):
    n, dtype = 96, torch.float32
    x, residual = make_input("batch", n, dtype), make_input("batch", n, dtype)
    weight = make_weight(n, dtype, "same")

    def grads(fn):
        leaves = fresh_leaves(x, weight, residual)
        out, h = fn(leaves[0], leaves[1], EPS, residual=leaves[2])
        target = out if used == "out_only" else h
        (target * torch.linspace(-1, 1, n, device=DEVICE)).sum().backward()
        return [leaf.grad for leaf in leaves]

    actual, expected = grads(rms_norm), grads(rms_norm_reference)
    for name, a, e in zip(["dx", "dweight", "dresidual"], actual, expected):
        if e is None:  # weight is not in h's graph
            assert a is None, f"{name}: eager gives no gradient, the kernel gives one"
            continue
        assert a is not None, name
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-5, msg=name)
    assert actual[0].data_ptr() != actual[2].data_ptr(), "x.grad and residual.grad share memory"


@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
def test_backward_of_sum(with_residual):
    """``.sum().backward()`` sends an expanded gradient (all strides 0): the wrapper must cope."""
    n, dtype = 200, torch.float32
    x = make_input("batch", n, dtype)
    residual = make_input("batch", n, dtype) if with_residual else None
    weight = make_weight(n, dtype, "same")

    def grads(fn):
        leaves = fresh_leaves(x, weight, residual)  # residual: None without one
        outputs = fn(leaves[0], leaves[1], EPS, residual=leaves[2])
        sum(o.sum() for o in (outputs if with_residual else (outputs,))).backward()
        return [leaf.grad for leaf in leaves if leaf is not None]

    for name, a, e in zip(["dx", "dweight", "dresidual"], grads(rms_norm), grads(rms_norm_reference)):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-5, msg=name)


def test_empty_rows():
    x = torch.randn(0, 3, 64, device=DEVICE)
    assert rms_norm(x, torch.randn(64, device=DEVICE)).shape == (0, 3, 64)


def test_rows_view_copies_only_when_needed():
    base = torch.randn(2, 8, 64)
    sliced = base[:, ::2]
    assert _as_rows(sliced, 64).data_ptr() == sliced.data_ptr()  # strided leading dims: still a view
    transposed = torch.randn(64, 6).t()
    rows = _as_rows(transposed, 64)
    assert rows.stride(1) == 1 and torch.equal(rows, transposed)


@pytest.mark.skipif(not ON_GPU, reason="needs > 2^31 elements: GPU only")
def test_int64_row_offsets():
    n, row_stride = 4096, 2**31  # row 1 starts past int32's range
    base = torch.randn(row_stride + n, dtype=torch.float16, device=DEVICE)
    x = base.as_strided((2, n), (row_stride, 1))
    weight = make_weight(n, torch.float16, "same")
    torch.testing.assert_close(rms_norm(x, weight), rms_norm_reference(x, weight), rtol=1e-3, atol=1e-3)


# --- argument errors ----------------------------------------------------------------------------------------

def _x():
    return torch.randn(2, 3, 64, device=DEVICE)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(x=[[1.0]]), TypeError, "x must be a torch.Tensor"),
    (dict(weight="w"), TypeError, "weight must be a torch.Tensor"),
    (dict(x=torch.ones(2, 64, dtype=torch.int32)), TypeError, "x must be float16, bfloat16 or float32"),
    (dict(x=_x().double()), TypeError, "x must be float16, bfloat16 or float32"),
    (dict(weight=torch.randn(64, dtype=torch.float64)), TypeError, "weight must be float16"),
    (dict(weight=torch.randn(63)), ValueError, r"weight must have shape \[N\] = \[64\]"),
    (dict(weight=torch.randn(1, 64)), ValueError, "weight must have 1 dimensions"),
    (dict(x=torch.randn(2, 0)), ValueError, "x's last dimension N must be > 0"),
    (dict(x=torch.tensor(1.0)), ValueError, "x must have at least 1 dimension"),
    (dict(x=torch.randn(1, MAX_HIDDEN_SIZE + 1), weight=torch.randn(MAX_HIDDEN_SIZE + 1)), ValueError,
     f"x's last dimension N must be at most {MAX_HIDDEN_SIZE}"),
    (dict(residual=torch.randn(2, 4, 64)), ValueError, r"residual must have x's shape \(2, 3, 64\)"),
    (dict(residual=torch.randn(2, 3, 64, dtype=torch.float16)), TypeError, "residual must have x's dtype"),
    (dict(residual=torch.ones(2, 3, 64, dtype=torch.int32)), TypeError, "residual must have x's dtype"),
    (dict(weight=torch.randn(64, device="meta")), ValueError, "weight on meta"),
    (dict(residual=torch.randn(2, 3, 64, device="meta")), ValueError, "residual on meta"),
    (dict(eps=0.0), ValueError, "eps must be a positive float"),
    (dict(eps=-1e-6), ValueError, "eps must be a positive float"),
    (dict(eps=float("nan")), ValueError, "eps must be a positive float"),
    (dict(eps="1e-6"), TypeError, "eps must be a positive float"),
    (dict(eps=None), TypeError, "eps must be a positive float"),
], ids=[
    "x_list", "weight_str", "x_int32", "x_float64", "weight_float64", "weight_length", "weight_2d", "x_empty_dim",
    "x_scalar", "x_too_wide", "residual_shape", "residual_fp16", "residual_int32", "weight_meta", "residual_meta",
    "eps_zero", "eps_negative", "eps_nan", "eps_str", "eps_none",
])
def test_bad_arguments(kwargs, error, match):
    args = dict(x=_x(), weight=torch.randn(64, device=DEVICE), eps=EPS, residual=None)
    args.update(kwargs)
    if isinstance(args["x"], torch.Tensor) and args["x"].device.type != DEVICE and "x" in kwargs:
        args["x"] = args["x"].to(DEVICE)
    with pytest.raises(error, match=match):
        rms_norm(**args)

"""Tests of fusedformers.kernels.layer_norm (the RMSNorm kernels with IS_LAYER_NORM): forward and backward against
float64 references, within twice the error of the eager computation in the same dtype (aten's layer_norm, as
``nn.LayerNorm`` and HF's BART compute it); the fused residual add, a broadcast residual, layouts, full writes,
the LayerNorm module, and argument errors.

On CPU the kernels run through Triton's interpreter, whose cost is per program: row counts stay small.
"""
import pytest
import torch
from torch import nn

from fusedformers.kernels import layer_norm
from fusedformers.kernels.reference import layer_norm_reference
from fusedformers.kernels.rms_norm import MAX_HIDDEN_SIZE, _as_rows, _ln_forward_impl, _norm_backward, _norm_forward
from fusedformers.models.layers import LayerNorm
from tests.conftest import DEVICE
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
from tests.test_rms_norm import make_input

# odd widths (masked tail lanes), BART-base's 768 in the slow loop
HIDDEN_SIZE_PARAMS = params([48, 100, 768], id="N{}".format, slow=lambda n: n >= 768)
EPS = 1e-5


# --- inputs -------------------------------------------------------------------------------------------------

def make_params(n, x_dtype, weight_kind):
    """weight around 1 with random signs and spread, bias around 0, in x's dtype or float32 (aten's mixed dtype)."""
    dtype = {"same": x_dtype, "fp32": torch.float32}[weight_kind]
    weight = (1.0 + 0.5 * torch.randn(n, device=DEVICE)).to(dtype)
    bias = (0.5 * torch.randn(n, device=DEVICE)).to(dtype)
    return weight, bias


def make_rows(shape, n, dtype):
    """Random ``[*shape, n]`` with a nonzero mean per row (the mean subtraction matters) and an offset scale."""
    return (2.0 * torch.randn(*shape, n, device=DEVICE) + 3.0).to(dtype)


def weight_id(weight_kind):
    return {"same": "weight_same_dtype", "fp32": "weight_fp32"}[weight_kind]


# (x dtype, parameter dtype kind): float32 parameters with a 16-bit x too (aten's mixed dtype); float16 in the
# quick loop
DTYPE_WEIGHT_PARAMS = params([(dtype, kind) for dtype in DTYPES for kind in ("same", "fp32")
                              if not (dtype == torch.float32 and kind == "fp32")],
                             id=lambda case: f"{dtype_id(case[0])}-{weight_id(case[1])}",
                             slow=lambda case: case[0] != torch.float16)


def input_grads(fn, x, weight, bias, residual, grad_out, dtype=None):
    """Gradients (dx, dweight, dbias, dresidual: None without a residual) of ``fn(x, weight, bias, EPS,
    residual=residual)`` on fresh leaves (cast to ``dtype`` if given)."""
    def call(x, weight, bias, residual):
        return fn(x, weight, bias, EPS, residual=residual)

    return grads_on_fresh_leaves(call, (x, weight, bias, residual), grad_out, dtype=dtype)[1]


def check_forward(x, weight, bias, residual):
    with torch.no_grad():
        actual = layer_norm(x, weight, bias, EPS, residual=residual)
        eager = layer_norm_reference(x, weight, bias, EPS, residual=residual)
        expected = layer_norm_reference(*to64(x, weight, bias), EPS, residual=to64(residual)[0])
    assert actual.dtype == eager.dtype == x.dtype, f"out: dtype {actual.dtype}, aten gives {eager.dtype}"
    assert actual.shape == x.shape
    assert_within_eager_error("out", actual, expected, eager)


def check_backward(x, weight, bias, residual, layout=None):
    # a random upstream gradient; in the given layout so that a non-contiguous gradient is exercised too
    grad_out = make_input(layout, x.shape[-1], x.dtype) if layout else torch.randn_like(x)
    assert grad_out.shape == x.shape
    actual = input_grads(layer_norm, x, weight, bias, residual, grad_out)
    eager = input_grads(layer_norm_reference, x, weight, bias, residual, grad_out)
    expected = input_grads(layer_norm_reference, x, weight, bias, residual, grad_out, dtype=torch.float64)
    names = ["dx", "dweight", "dbias"] + (["dresidual"] if residual is not None else [])
    for name, a, e, e64 in zip(names, actual, eager, expected):
        assert a.dtype == e.dtype, f"{name}: dtype {a.dtype}, eager gives {e.dtype}"
        assert_within_eager_error(name, a, e64, e)


# --- forward and backward against float64 -------------------------------------------------------------------

@pytest.mark.parametrize("check", [check_forward, check_backward], ids=["forward", "backward"])
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("rows", [(3,), (2, 5)], ids=["rows3", "batch2x5"])
@pytest.mark.parametrize("n", HIDDEN_SIZE_PARAMS)
@pytest.mark.parametrize("dtype, weight_kind", DTYPE_WEIGHT_PARAMS)
def test_against_float64(dtype, weight_kind, n, rows, with_residual, check):
    x = make_rows(rows, n, dtype)
    residual = make_rows(rows, n, dtype) if with_residual else None
    check(x, *make_params(n, dtype, weight_kind), residual)


@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("layout", params(["vector", "sliced", "padded", "transposed"], id=str,
                                          slow=lambda layout: layout == "vector"))
@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
def test_layouts_forward_backward(dtype, layout, with_residual):
    n = 100
    x = make_input(layout, n, dtype)
    residual = make_input(layout, n, dtype) if with_residual else None
    weight, bias = make_params(n, dtype, "same")
    check_forward(x, weight, bias, residual)
    check_backward(x, weight, bias, residual, layout=layout)


@pytest.mark.parametrize("positions", [1, 4], ids="L{}".format)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_broadcast_residual(dtype, positions):
    """BART's embedding: ``LN(tokens + positions)`` with the positions ``[L, N]`` broadcast over the batch. At
    L = 1 (a decode step) the kernel reads the one row with a zero row stride; the positions' gradient is the
    sum over the batch."""
    batch, n = 3, 48
    tokens = make_rows((batch, positions), n, dtype)
    pos = make_rows((positions,), n, dtype)
    weight, bias = make_params(n, dtype, "same")

    def run(tokens, weight, bias, pos, *, norm):
        return norm(tokens, weight, bias, EPS, residual=pos.expand_as(tokens))

    if positions == 1:  # the rows of the broadcast positions are a view with row stride 0, not a copy
        assert _as_rows(pos.expand_as(tokens), n).stride(0) == 0
    grad_out = torch.randn_like(tokens)
    outs, grads = zip(*(grads_on_fresh_leaves(run, (tokens, weight, bias, pos), grad_out, dtype=dt, norm=fn)
                        for fn, dt in ((layer_norm, None), (layer_norm_reference, None),
                                       (layer_norm_reference, torch.float64))))
    for name, a, e, e64 in zip(["out", "dtokens", "dweight", "dbias", "dpositions"], (outs[0], *grads[0]),
                               (outs[1], *grads[1]), (outs[2], *grads[2])):
        assert a.dtype == e.dtype, name
        assert_within_eager_error(name, a, e64, e)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_matches_eager_nearly_bitwise(dtype):
    """aten's roundings are reproduced: one rounding of the float32 result, so the kernel's output is eager's up
    to one-ulp flips (float32 statistics summed in another order)."""
    n = 1000
    x, residual = make_rows((9,), n, dtype), make_rows((9,), n, dtype)
    weight, bias = make_params(n, dtype, "same")
    with torch.no_grad():
        out = layer_norm(x, weight, bias, EPS, residual=residual)
        eager = layer_norm_reference(x, weight, bias, EPS, residual=residual)
    ulp = torch.finfo(dtype).eps * eager.abs().clamp_min(1.0)
    assert ((out.float() - eager.float()).abs() <= (8 if dtype == torch.float32 else 1) * ulp).all()
    if dtype != torch.float32:
        mismatches = (out != eager).float().mean().item()
        assert mismatches <= 0.02, f"{mismatches:.2%} of elements differ from eager"


def test_nan_input_gives_nan_row():
    """A NaN in a row makes that row NaN (as aten), and no other row."""
    x = make_rows((4,), 48, torch.float32)
    x[1, 7] = float("nan")
    weight, bias = make_params(48, torch.float32, "same")
    out = layer_norm(x, weight, bias)
    assert torch.isnan(out[1]).all()
    assert not torch.isnan(out[[0, 2, 3]]).any()


# --- full writes (poisoned output buffers) ------------------------------------------------------------------

@pytest.mark.parametrize("store_h", [False, True], ids=["no_h", "store_h"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_forward_writes_every_element_and_nothing_else(dtype, store_h):
    rows, n, pad = 11, 100, 8
    # x and residual with different row strides (n and n + 24)
    x = make_rows((rows,), n, dtype)
    residual = make_rows((rows,), n + 24, dtype)[:, :n]
    weight, bias = make_params(n, dtype, "same")
    # outputs are the first n columns of NaN-filled wider buffers: every element must be written, the padding
    # columns never; h only when asked for
    out_buf = poisoned(rows, n + pad, dtype=dtype, device=DEVICE)
    h_buf = poisoned(rows, n + pad, dtype=dtype, device=DEVICE)
    mean, rstd = (poisoned(rows, dtype=torch.float32, device=DEVICE) for _ in range(2))
    out, h, mean, rstd = _norm_forward(x, weight, EPS, residual, bias=bias, layer_norm=True, store_h=store_h,
                                       out=out_buf[:, :n], h_out=h_buf[:, :n], mean=mean, rstd=rstd)
    assert not torch.isnan(out).any() and not torch.isnan(mean).any() and not torch.isnan(rstd).any()
    assert torch.isnan(out_buf[:, n:]).all() and torch.isnan(h_buf[:, n:]).all()
    expected_h = x + residual
    if store_h:
        assert torch.equal(h, expected_h)
    else:
        assert torch.isnan(h_buf).all(), "h written although not asked for"
    assert torch.equal(out, layer_norm(x, weight, bias, EPS, residual=residual))
    torch.testing.assert_close(mean, expected_h.float().mean(-1))
    torch.testing.assert_close(rstd, torch.rsqrt(expected_h.float().var(-1, unbiased=False) + EPS))


@pytest.mark.parametrize("num_programs", [1, 3, 11], ids="programs{}".format)
def test_backward_writes_every_element_and_nothing_else(num_programs):
    rows, n, pad, dtype = 11, 100, 8, torch.bfloat16
    h = make_rows((rows,), n, dtype)
    weight, _ = make_params(n, dtype, "same")
    dy = torch.randn_like(h)
    mean = h.float().mean(-1)
    rstd = torch.rsqrt(h.float().var(-1, unbiased=False) + EPS)
    dx_buf = poisoned(rows, n + pad, dtype=dtype, device=DEVICE)
    # 3 programs over 11 rows: blocks of 4 rows, the last one partly past the end
    dx, dweight, dbias = _norm_backward(dy, h, weight, rstd, mean=mean, dx=dx_buf[:, :n], num_programs=num_programs)
    assert not torch.isnan(dx).any() and not torch.isnan(dweight).any() and not torch.isnan(dbias).any()
    assert torch.isnan(dx_buf[:, n:]).all()
    # the split of rows over programs changes only the order of dweight's and dbias's float32 sums
    ref_dx, ref_dweight, ref_dbias = _norm_backward(dy, h, weight, rstd, mean=mean, num_programs=1)
    assert torch.equal(dx, ref_dx)
    torch.testing.assert_close(dweight.float(), ref_dweight.float(), rtol=2**-7, atol=1e-3)
    torch.testing.assert_close(dbias.float(), ref_dbias.float(), rtol=2**-7, atol=1e-3)
    torch.testing.assert_close(dbias.float(), dy.float().sum(0), rtol=2**-7, atol=1e-3)


def test_inference_writes_no_h():
    """Without autograd the residual sum stays in registers: the op returns an empty h."""
    x, residual = make_rows((2, 3), 48, torch.float16), make_rows((2, 3), 48, torch.float16)
    weight, bias = make_params(48, torch.float16, "same")
    out, h, mean, rstd = _ln_forward_impl(x, weight, bias, EPS, residual, False)
    assert h.numel() == 0 and mean.shape == rstd.shape == (6,)
    assert torch.equal(out, _ln_forward_impl(x, weight, bias, EPS, residual, True)[0])


# --- autograd details ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
def test_backward_of_sum(with_residual):
    """``.sum().backward()`` sends an expanded gradient (all strides 0): the wrapper must cope."""
    n, dtype = 100, torch.float32
    x = make_rows((2, 5), n, dtype)
    residual = make_rows((2, 5), n, dtype) if with_residual else None
    weight, bias = make_params(n, dtype, "same")

    def grads(fn):
        leaves = fresh_leaves(x, weight, bias, residual)  # residual: None without one
        fn(*leaves[:3], EPS, residual=leaves[3]).sum().backward()
        return [leaf.grad for leaf in leaves if leaf is not None]

    for name, a, e in zip(["dx", "dweight", "dbias", "dresidual"], grads(layer_norm), grads(layer_norm_reference)):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4, msg=name)


def test_empty_rows():
    x = torch.randn(0, 3, 64, device=DEVICE)
    weight, bias = make_params(64, torch.float32, "same")
    assert layer_norm(x, weight, bias).shape == (0, 3, 64)


# --- the module -----------------------------------------------------------------------------------------------

class _Config:
    def __init__(self, attn_implementation):
        self.attn_implementation = attn_implementation


@pytest.mark.parametrize("implementation", ["fused", "eager"])
def test_module_is_nn_layer_norm(implementation):
    """``LayerNorm(config, dim)`` holds ``weight`` and ``bias`` as ``nn.LayerNorm`` (HF checkpoint names) and
    computes ``nn.LayerNorm(x + residual)`` on the op registry's layer_norm."""
    n = 48
    ours, theirs = LayerNorm(_Config(implementation), n), nn.LayerNorm(n)
    assert list(ours.state_dict()) == list(theirs.state_dict()) == ["weight", "bias"]
    assert ours.eps == theirs.eps == 1e-5
    with torch.no_grad():
        for p in (ours.weight, ours.bias):
            p.normal_()
    theirs.load_state_dict(ours.state_dict())
    x, residual = make_rows((2, 3), n, torch.float32), make_rows((2, 3), n, torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(ours(x, residual=residual), theirs(x + residual), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
    ours.reset_parameters()
    assert torch.equal(ours.weight, torch.ones(n)) and torch.equal(ours.bias, torch.zeros(n))


def test_bart_init_weights_resets_layer_norms():
    from fusedformers.models.bart import BartConfig, BartForConditionalGeneration
    config = BartConfig(vocab_size=32, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                        decoder_attention_heads=2, encoder_ffn_dim=16, decoder_ffn_dim=16, max_position_embeddings=8)
    model = BartForConditionalGeneration(config)
    norms = [m for m in model.modules() if isinstance(m, LayerNorm)]
    assert len(norms) == 2 + 2 + 3  # layernorm_embedding per stack, 2 per encoder layer, 3 per decoder layer
    with torch.no_grad():
        for m in norms:
            m.weight.fill_(3.0)
            m.bias.fill_(3.0)
    model._init_weights()
    assert all(torch.equal(m.weight, torch.ones(16)) and torch.equal(m.bias, torch.zeros(16)) for m in norms)


# --- argument errors ----------------------------------------------------------------------------------------

def _x():
    return torch.randn(2, 3, 64, device=DEVICE)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(x=[[1.0]]), TypeError, "x must be a torch.Tensor"),
    (dict(bias=None), TypeError, "bias must be a torch.Tensor"),
    (dict(x=torch.ones(2, 64, dtype=torch.int32)), TypeError, "x must be float16, bfloat16 or float32"),
    (dict(x=_x().double()), TypeError, "x must be float16, bfloat16 or float32"),
    (dict(weight=torch.randn(64, dtype=torch.float16)), TypeError, "weight must have x's dtype torch.float32 or "
                                                                   "float32"),
    (dict(bias=torch.randn(64, dtype=torch.bfloat16)), TypeError, "bias must have weight's dtype torch.float32"),
    (dict(weight=torch.randn(63)), ValueError, r"weight must have shape \[N\] = \[64\]"),
    (dict(bias=torch.randn(65)), ValueError, r"bias must have shape \[N\] = \[64\]"),
    (dict(bias=torch.randn(1, 64)), ValueError, "bias must have 1 dimensions"),
    (dict(x=torch.randn(1, MAX_HIDDEN_SIZE + 1), weight=torch.randn(MAX_HIDDEN_SIZE + 1),
          bias=torch.randn(MAX_HIDDEN_SIZE + 1)), ValueError, f"N must be at most {MAX_HIDDEN_SIZE}"),
    (dict(residual=torch.randn(3, 64)), ValueError, r"residual must have x's shape \(2, 3, 64\)"),
    (dict(residual=torch.randn(2, 3, 64, dtype=torch.float16)), TypeError, "residual must have x's dtype"),
    (dict(bias=torch.randn(64, device="meta")), ValueError, "bias on meta"),
    (dict(eps=0.0), ValueError, "eps must be a positive float"),
    (dict(eps=None), TypeError, "eps must be a positive float"),
], ids=["x_list", "bias_none", "x_int32", "x_float64", "weight_fp16", "bias_dtype", "weight_length", "bias_length",
        "bias_2d", "x_too_wide", "residual_shape", "residual_fp16", "bias_meta", "eps_zero", "eps_none"])
def test_bad_arguments(kwargs, error, match):
    args = dict(x=_x(), weight=torch.randn(64, device=DEVICE), bias=torch.randn(64, device=DEVICE), eps=EPS,
                residual=None)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        layer_norm(**args)


def test_bad_mixed_dtype_of_16_bit_x():
    """A 16-bit x takes parameters in its dtype or float32 (aten's rule), not the other 16-bit type."""
    x = torch.randn(2, 64, device=DEVICE, dtype=torch.bfloat16)
    weight, bias = make_params(64, torch.float16, "same")
    with pytest.raises(TypeError, match="weight must have x's dtype torch.bfloat16 or float32"):
        layer_norm(x, weight, bias)

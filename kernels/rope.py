"""Rotary position embedding (RoPE) in one launch per tensor, forward and backward.

``out = x * cos + rotate_half(x) * sin`` with ``rotate_half(x) = cat(-x2, x1)`` (HF's half-split layout, as in
``apply_rotary_pos_emb``), with HF's roundings: each product is rounded to x's dtype, then their sum. In eager
PyTorch this is five kernels per tensor (two products, a negation, a concatenation and a sum); here it is one,
which matters at decode time, when a step is bound by the host's launches, not by the GPU.

One program handles one token row (b, l): it loads that row's cos and sin once and rotates BLOCK_H heads.
The backward is the same kernel with sin's halves swapped and negated: the gradient of x is
``g * cos + rotate_half^T(g * sin)`` with ``rotate_half^T(y) = cat(y2, -y1)``, i.e.
``dx1 = g1 * cos1 + g2 * sin2`` and ``dx2 = g2 * cos2 - g1 * sin1`` (for HF's RoPE the halves are equal, and this
is the rotation by the opposite angle).
"""

import torch
import triton
import triton.language as tl

from fusedformers.kernels.checks import check_float_dtype, check_kernel_device, check_same_device, check_tensor
from fusedformers.kernels.launch import call_op, cdiv, custom_op, device_context
from fusedformers.kernels.tiles import rope_plan


# ----------------------------------------------------------------------------------------------------------------
# Kernel
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _rope_kernel(
    # tensors
    x_ptr, cos_ptr, sin_ptr, out_ptr,  # x, out [B, L, H, D]; cos, sin [B, L, D]
    # strides (all with unit stride along D; cos and sin share theirs)
    stride_xb, stride_xl, stride_xh,
    stride_cb, stride_cl,
    stride_ob, stride_ol, stride_oh,
    # sizes
    seq_len, num_heads,
    # constexprs
    BACKWARD: tl.constexpr,            # rotate by -sin with its halves swapped (the gradient)
    HALF: tl.constexpr,                # D / 2
    BLOCK_HALF: tl.constexpr,          # HALF rounded up to a power of two
    BLOCK_H: tl.constexpr,
):
    row = tl.program_id(0)             # token row b * L + pos
    b = (row // seq_len).to(tl.int64)
    pos = (row % seq_len).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    cols = tl.arange(0, BLOCK_HALF)    # column j of the first half, and HALF + j of the second
    col_ok = cols < HALF
    tile_ok = (heads[:, None] < num_heads) & col_ok[None, :]

    cs = b * stride_cb + pos * stride_cl
    cos1 = tl.load(cos_ptr + cs + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    cos2 = tl.load(cos_ptr + cs + HALF + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    sin1 = tl.load(sin_ptr + cs + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    sin2 = tl.load(sin_ptr + cs + HALF + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if BACKWARD:
        sin1, sin2 = -sin2, -sin1

    x_row = x_ptr + b * stride_xb + pos * stride_xl + heads[:, None].to(tl.int64) * stride_xh
    x1 = tl.load(x_row + cols[None, :], mask=tile_ok, other=0.0).to(tl.float32)          # [BLOCK_H, BLOCK_HALF]
    x2 = tl.load(x_row + HALF + cols[None, :], mask=tile_ok, other=0.0).to(tl.float32)
    dtype = out_ptr.dtype.element_ty
    # products of two 16-bit floats are exact in fp32, so rounding each to the dtype reproduces PyTorch's
    # x * cos and rotate_half(x) * sin; the sum is then rounded once more, as PyTorch's addition
    out1 = (x1 * cos1).to(dtype).to(tl.float32) + (-x2 * sin1).to(dtype).to(tl.float32)
    out2 = (x2 * cos2).to(dtype).to(tl.float32) + (x1 * sin2).to(dtype).to(tl.float32)
    out_row = out_ptr + b * stride_ob + pos * stride_ol + heads[:, None].to(tl.int64) * stride_oh
    tl.store(out_row + cols[None, :], out1.to(dtype), mask=tile_ok)
    tl.store(out_row + HALF + cols[None, :], out2.to(dtype), mask=tile_ok)


# ----------------------------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------------------------
def _rotate(x, cos, sin, backward=False, out=None):
    """Launch the kernel: x ``[B, L, H, D]`` (unit stride along D), cos/sin ``[B, L, D]``. Returns ``out`` (a new
    contiguous ``[B, L, H, D]`` tensor in x's dtype unless given)."""
    batch, seq_len, num_heads, head_dim = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    if out is None:
        out = torch.empty((batch, seq_len, num_heads, head_dim), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    block_h, block_half, num_warps = rope_plan(num_heads, head_dim)
    grid = (batch * seq_len, cdiv(num_heads, block_h))
    with device_context(x.device):
        _rope_kernel[grid](
            x, cos, sin, out,
            stride_xb=x.stride(0), stride_xl=x.stride(1), stride_xh=x.stride(2),
            stride_cb=cos.stride(0), stride_cl=cos.stride(1),
            stride_ob=out.stride(0), stride_ol=out.stride(1), stride_oh=out.stride(2),
            seq_len=seq_len, num_heads=num_heads,
            BACKWARD=backward, HALF=head_dim // 2, BLOCK_HALF=block_half, BLOCK_H=block_h,
            num_warps=num_warps,
        )
    return out


# ----------------------------------------------------------------------------------------------------------------
# Custom op, autograd and public API
# ----------------------------------------------------------------------------------------------------------------
def _rotate_impl(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool) -> torch.Tensor:
    return _rotate(x, cos, sin, backward)


def _rotate_fake(x, cos, sin, backward):
    return x.new_empty(x.shape)  # contiguous, as _rotate's output


# torch.ops.fusedformers.rope(x, cos, sin, backward): the kernel as one node of a torch.compile graph
rope_op = custom_op("rope", _rotate_impl, _rotate_fake)


class _Rope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return call_op(rope_op, _rotate_impl, x, cos, sin, False)

    @staticmethod
    def backward(ctx, grad_out):
        cos, sin = ctx.saved_tensors
        return call_op(rope_op, _rotate_impl, grad_out, cos, sin, True), None, None


def _check_inputs(x, cos, sin):
    check_tensor("x", x, 4)
    check_tensor("cos", cos, 3)
    check_tensor("sin", sin, 3)
    check_kernel_device("x", x)
    check_float_dtype("x", x)
    check_same_device(x=x, cos=cos, sin=sin)
    batch, seq_len, _, head_dim = x.shape
    if head_dim % 2 != 0:
        raise ValueError(f"x's head dim D must be even (two halves are rotated), got {head_dim}")
    expected = (batch, seq_len, head_dim)
    for name, t in (("cos", cos), ("sin", sin)):
        if tuple(t.shape) != expected:
            raise ValueError(f"{name} must have shape [B, L, D] = {list(expected)} (x is [B, L, H, D]), "
                             f"got {list(t.shape)}")
        if t.dtype != x.dtype:
            raise TypeError(f"{name} must have x's dtype {x.dtype} (HF casts cos/sin to it), got {t.dtype}")
    if cos.stride() != sin.stride() or (head_dim > 1 and cos.stride(-1) != 1):
        raise ValueError("cos and sin must share their strides, with unit stride along D (e.g. contiguous)")


def rope(x, cos, sin):
    """Rotary position embedding, HF's ``apply_rotary_pos_emb`` for one tensor (half-split layout).

    Args:
        x: ``[B, L, H, D]`` float16, bfloat16 or float32, any strides with a unit stride along D (e.g. a view of
            a ``[B, L, H * D]`` projection); D even.
        cos, sin: ``[B, L, D]`` in x's dtype (HF's cos/sin of the positions, the two halves of each row being
            equal for HF's RoPE types, though any values are applied as given).

    Returns a new contiguous ``[B, L, H, D]`` tensor: ``x * cos + rotate_half(x) * sin`` rounded as in
    PyTorch. Differentiable in x.
    """
    _check_inputs(x, cos, sin)
    if torch.is_grad_enabled() and x.requires_grad:
        return _Rope.apply(x, cos, sin)
    return call_op(rope_op, _rotate_impl, x, cos, sin, False)

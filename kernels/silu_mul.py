"""SwiGLU's activation product ``silu(gate) * up`` in one launch, forward and backward, on the packed output of a
fused gate/up projection ``gate_up [..., 2I]`` (gate's I columns, then up's).

HF's LLaMA MLP computes ``act_fn(gate_proj(x)) * up_proj(x)``: two kernels (the SiLU, the product), each
rounding its result to the dtype. This kernel keeps both roundings (the SiLU in float32, rounded to the dtype,
then the product of two dtype values, exact in float32 for 16-bit dtypes, rounded once more), so 16-bit results
match eager PyTorch up to the SiLU's own last-ulp differences. The backward mirrors autograd through the two ops:
``d_up = dout * s`` and ``d_s = dout * up`` (each rounded), then SiLU's backward ``d_s * sig * (1 + g * (1 - sig))``
in float32.

One program handles BLOCK_N columns of one row; the backward is the same kernel with the ``BACKWARD`` switch,
writing the packed gradient ``[..., 2I]``.
"""
import torch
import triton
import triton.language as tl

from fusedformers.kernels.checks import check_float_dtype, check_kernel_device, check_same_device, check_tensor
from fusedformers.kernels.launch import call_op, cdiv, custom_op, device_context
from fusedformers.kernels.tiles import silu_mul_plan


# ----------------------------------------------------------------------------------------------------------------
# Kernel
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _silu_mul_kernel(
    # tensors: gate_up [M, 2I] (gate, then up); dout [M, I] (BACKWARD); out [M, I], or d gate_up [M, 2I]
    gate_up_ptr, dout_ptr, out_ptr,
    # strides: the rows' (the column stride is 1)
    stride_gate_up_row, stride_dout_row, stride_out_row,
    # sizes
    N,                                 # I, the output's width
    # constexprs
    BACKWARD: tl.constexpr,            # the gradient of gate_up from dout
    BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # int64: row * stride cannot overflow on large tensors
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = cols < N
    src = gate_up_ptr + row * stride_gate_up_row
    g = tl.load(src + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(src + N + cols, mask=mask, other=0.0).to(tl.float32)   # up's column j sits I columns later
    dtype = gate_up_ptr.dtype.element_ty
    # PyTorch's silu is x / (1 + exp(-x)) with a correctly rounded division (Triton's `/` is the GPU's
    # approximate one: div_rn is not); tl.exp is within 2 ulp of PyTorch's expf, so a 16-bit result can still
    # differ by 1 ulp at a rounding tie
    denominator = 1.0 + tl.exp(-g)
    s = tl.div_rn(g, denominator).to(dtype).to(tl.float32)  # F.silu's result, rounded to the dtype
    dst = out_ptr + row * stride_out_row
    if BACKWARD:
        do = tl.load(dout_ptr + row * stride_dout_row + cols, mask=mask, other=0.0).to(tl.float32)
        d_up = (do * s).to(dtype)                            # autograd of s * up: dout * s, rounded
        d_s = (do * u).to(dtype).to(tl.float32)              # and dout * up, rounded
        sig = tl.div_rn(1.0, denominator)
        d_gate = d_s * sig * (1.0 + g * (1.0 - sig))         # SiLU's backward, in float32
        tl.store(dst + cols, d_gate.to(dtype), mask=mask)
        tl.store(dst + N + cols, d_up, mask=mask)
    else:
        tl.store(dst + cols, (s * u).to(dtype), mask=mask)


# ----------------------------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------------------------
def _as_rows(t):
    """``t [..., n]`` as a 2-D ``[M, n]`` tensor with unit column stride (a view when possible)."""
    rows = t.reshape(-1, t.shape[-1])
    return rows if rows.stride(-1) == 1 or rows.shape[0] == 0 else rows.contiguous()


def _silu_mul(gate_up, dout=None, out=None):
    """Forward (``dout`` None): ``[..., 2I] -> [..., I]``; backward: the gradient ``[..., 2I]`` of gate_up.
    Returns ``out`` (a new contiguous tensor in gate_up's dtype unless given, contiguous)."""
    width = gate_up.shape[-1]
    intermediate = width // 2
    backward = dout is not None
    if out is None:
        out = torch.empty(gate_up.shape if backward else gate_up.shape[:-1] + (intermediate,), dtype=gate_up.dtype,
                          device=gate_up.device)
    if out.numel() == 0:
        return out
    rows = _as_rows(gate_up)
    dout_rows = _as_rows(dout) if backward else rows
    out_rows = out.view(-1, out.shape[-1])
    block_n, num_warps = silu_mul_plan(intermediate)
    grid = (rows.shape[0], cdiv(intermediate, block_n))
    with device_context(gate_up.device):
        _silu_mul_kernel[grid](
            rows, dout_rows, out_rows,
            stride_gate_up_row=rows.stride(0), stride_dout_row=dout_rows.stride(0), stride_out_row=out_rows.stride(0),
            N=intermediate,
            BACKWARD=backward, BLOCK_N=block_n,
            num_warps=num_warps,
        )
    return out


# ----------------------------------------------------------------------------------------------------------------
# Custom ops, autograd and public API
# ----------------------------------------------------------------------------------------------------------------
def _forward_impl(gate_up: torch.Tensor) -> torch.Tensor:
    return _silu_mul(gate_up)


def _forward_fake(gate_up):
    return gate_up.new_empty(gate_up.shape[:-1] + (gate_up.shape[-1] // 2,))


def _backward_impl(dout: torch.Tensor, gate_up: torch.Tensor) -> torch.Tensor:
    return _silu_mul(gate_up, dout)


def _backward_fake(dout, gate_up):
    return gate_up.new_empty(gate_up.shape)


# torch.ops.fusedformers.silu_mul(gate_up) and its backward: one node each of a torch.compile graph
silu_mul_op = custom_op("silu_mul", _forward_impl, _forward_fake)
silu_mul_backward_op = custom_op("silu_mul_backward", _backward_impl, _backward_fake)


class _SiluMul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate_up):
        ctx.save_for_backward(gate_up)
        return call_op(silu_mul_op, _forward_impl, gate_up)

    @staticmethod
    def backward(ctx, dout):
        (gate_up,) = ctx.saved_tensors
        return call_op(silu_mul_backward_op, _backward_impl, dout, gate_up)


def silu_mul(gate_up):
    """``silu(gate) * up`` of a packed gate/up projection (HF's ``act_fn(gate_proj(x)) * up_proj(x)`` with SiLU).

    Args:
        gate_up: ``[..., 2I]`` float16, bfloat16 or float32: gate's I columns, then up's (any strides).

    Returns a new contiguous ``[..., I]`` tensor, rounded as eager PyTorch's two ops. Differentiable.
    """
    check_tensor("gate_up", gate_up)
    if gate_up.dim() == 0 or gate_up.shape[-1] % 2 != 0:
        raise ValueError(f"gate_up must be [..., 2I] (an even last dim: gate, then up), got {list(gate_up.shape)}")
    check_kernel_device("gate_up", gate_up)
    check_float_dtype("gate_up", gate_up)
    check_same_device(gate_up=gate_up)
    if torch.is_grad_enabled() and gate_up.requires_grad:
        return _SiluMul.apply(gate_up)
    return call_op(silu_mul_op, _forward_impl, gate_up)

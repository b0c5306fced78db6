"""RMSNorm (LLaMA's ``LlamaRMSNorm``) and LayerNorm (``nn.LayerNorm``, as BART uses it), optionally fused with
the residual add, forward and backward in Triton.

One file holds the kernels, their launchers and the ``torch.autograd.Function``s. The forward kernel handles one
row per program, like the layer-norm tutorial of Triton; the backward kernel loops over a block of rows per
program so that it can keep float32 partial sums of the weight (and bias) gradients in registers. LayerNorm is
the same kernels with the constexpr ``IS_LAYER_NORM``: the row's mean is subtracted first and a bias added.

RMSNorm semantics are those of Hugging Face (see ``fusedformers.kernels.reference.rms_norm_reference``)::

    h   = x + residual                       # rounded to x's dtype (only with residual)
    hn  = h.float() * rsqrt(mean(h.float() ** 2, -1) + eps)
    out = weight * hn.to(x.dtype)            # PyTorch type promotion of weight and x

LayerNorm semantics are aten's ``layer_norm`` (``fusedformers.kernels.reference.layer_norm_reference``); BART's
post-LN layers compute ``LN(hidden + sublayer_out)``::

    h   = x + residual                       # rounded to x's dtype (only with residual)
    c   = h.float() - mean(h.float(), -1)    # statistics in float32, biased variance
    out = (c * rsqrt(mean(c ** 2, -1) + eps) * weight + bias).to(x.dtype)   # one rounding, in x's dtype
"""
import numbers

import torch
import triton
import triton.language as tl

from fusedformers.kernels.checks import check_float_dtype, check_kernel_device, check_same_device, check_tensor
from fusedformers.kernels.launch import call_op, cdiv, custom_op, device_context, next_power_of_2
from fusedformers.kernels.tiles import rms_norm_backward_programs, rms_norm_num_warps

# Largest hidden size handled: a whole row lives in registers (BLOCK_N = next_power_of_2(N)).
MAX_HIDDEN_SIZE = 65536


# ----------------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _rms_norm_fwd_kernel(
    # tensors: x, residual, out, h = x + residual [M, N]; weight, bias [N]; mean, rstd [M] fp32 (one per row)
    x_ptr, residual_ptr, weight_ptr, bias_ptr, out_ptr, h_ptr, mean_ptr, rstd_ptr,
    # strides: the rows' (the column stride is 1; a residual row stride of 0 broadcasts one row to every row)
    stride_x_row, stride_residual_row, stride_out_row, stride_h_row,
    # sizes
    N,
    # scalars
    eps,
    # constexprs
    HAS_RESIDUAL: tl.constexpr,
    STORE_H: tl.constexpr,  # write h = x + residual (RMSNorm returns it; LayerNorm only keeps it for backward)
    IS_LAYER_NORM: tl.constexpr,  # LayerNorm: subtract the mean, add the bias, round once (bias_ptr, mean_ptr)
    BLOCK_N: tl.constexpr,
):
    # one row per program; int64 so that row * stride cannot overflow int32 on large tensors
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N  # BLOCK_N is N rounded up to a power of two: the tail lanes are masked off
    x = tl.load(x_ptr + row * stride_x_row + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(residual_ptr + row * stride_residual_row + cols, mask=mask, other=0.0)
        # add in float32, then round once to x's dtype: the result of PyTorch's `residual + hidden_states`
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)
        if STORE_H:
            tl.store(h_ptr + row * stride_h_row + cols, x, mask=mask)
    h = x.to(tl.float32)
    if IS_LAYER_NORM:
        # masked lanes were loaded as 0 and add nothing to the sum; divide by the true N
        mean = tl.sum(h, axis=0) / N
        tl.store(mean_ptr + row, mean)
        # centred row (two passes over registers: no cancellation as in E[h^2] - mean^2); the masked lanes
        # are set back to 0 so that they add nothing to the variance
        h = tl.where(mask, h - mean, 0.0)
    # masked lanes are 0 and add nothing to the sum of squares; divide by the true N (the biased variance)
    variance = tl.sum(h * h, axis=0) / N
    rstd = tl.rsqrt(variance + eps)
    tl.store(rstd_ptr + row, rstd)
    if IS_LAYER_NORM:
        w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(bias_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        # aten's layer_norm: all in float32, one rounding to out's dtype
        y = h * rstd * w + b
    else:
        # HF rounds the normalised value to x's dtype before it multiplies by the weight
        normed = (h * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)
        w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        # the product of two 16-bit floats is exact in float32, so one rounding to out's dtype matches PyTorch's
        y = w * normed
    tl.store(out_ptr + row * stride_out_row + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_bwd_kernel(
    # tensors: grad of out, the normalised input h, weight, mean and rstd per row, grad of the returned h
    # (RMSNorm's residual path), grad of h, dweight and dbias partials [num_programs, N] fp32
    dout_ptr, h_ptr, weight_ptr, mean_ptr, rstd_ptr, dh_ptr, dx_ptr, dweight_partial_ptr, dbias_partial_ptr,
    # strides: the rows' (the column stride is 1)
    stride_dout_row, stride_h_row, stride_dh_row, stride_dx_row,
    # sizes
    M, N,
    # constexprs
    HAS_DH: tl.constexpr,
    IS_LAYER_NORM: tl.constexpr,  # LayerNorm: centred rows (mean_ptr), a bias gradient (dbias_partial_ptr)
    ROWS_PER_PROGRAM: tl.constexpr,  # a power of two, so that few variants get compiled
    BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N  # BLOCK_N is N rounded up to a power of two: the tail lanes are masked off
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    dw_acc = tl.zeros([BLOCK_N], dtype=tl.float32)  # this program's share of dweight, summed in float32
    if IS_LAYER_NORM:
        db_acc = tl.zeros([BLOCK_N], dtype=tl.float32)  # and of dbias
    # this program handles rows [row_start, row_start + ROWS_PER_PROGRAM); the last block may run past M,
    # so each row is masked with row < M (a masked row loads zeros and adds nothing to dweight)
    row_start = pid.to(tl.int64) * ROWS_PER_PROGRAM  # int64 so that row * stride cannot overflow int32
    for i in range(0, ROWS_PER_PROGRAM):
        row = row_start + i
        row_ok = row < M
        row_mask = mask & row_ok
        dy = tl.load(dout_ptr + row * stride_dout_row + cols, mask=row_mask, other=0.0).to(tl.float32)
        h = tl.load(h_ptr + row * stride_h_row + cols, mask=row_mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + row, mask=row_ok, other=0.0)
        if IS_LAYER_NORM:
            mean = tl.load(mean_ptr + row, mask=row_ok, other=0.0)
            # out = h_hat * weight + bias, h_hat = (h - mean) * rstd, no rounding in between (masked lanes: dy
            # and g are 0 there, so their h_hat adds nothing below)
            h_hat = (h - mean) * rstd
            dw_acc += dy * h_hat
            db_acc += dy
            g = dy * w
            # d((h - mean(h)) * rstd(h))/dh applied to g: rstd * (g - mean(g) - h_hat * mean(g * h_hat))
            dx = rstd * (g - tl.sum(g, axis=0) / N - h_hat * (tl.sum(g * h_hat, axis=0) / N))
        else:
            h_hat = h * rstd  # normalised value before rounding
            # out = weight * round(h_hat): dweight sees the rounded value, as in the forward pass
            dw_acc += dy * h_hat.to(h_ptr.dtype.element_ty).to(tl.float32)
            # the rounding passes gradients through unchanged; d(h * rstd(h))/dh applied to g:
            #   rstd * (g - h_hat * mean(g * h_hat))
            g = dy * w
            dx = rstd * (g - h_hat * (tl.sum(g * h_hat, axis=0) / N))
        if HAS_DH:
            # h was also returned (fused residual add): its own gradient adds to the one through the norm
            dx += tl.load(dh_ptr + row * stride_dh_row + cols, mask=row_mask, other=0.0).to(tl.float32)
        tl.store(dx_ptr + row * stride_dx_row + cols, dx.to(dx_ptr.dtype.element_ty), mask=row_mask)
    # row pid of the [num_programs, N] float32 partials; summed over programs by the launcher
    tl.store(dweight_partial_ptr + pid.to(tl.int64) * N + cols, dw_acc, mask=mask)
    if IS_LAYER_NORM:
        tl.store(dbias_partial_ptr + pid.to(tl.int64) * N + cols, db_acc, mask=mask)


# ----------------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------------
def _as_rows(t, n):
    """View ``t`` as ``[rows, n]`` with a unit column stride; copies only when the strides do not allow it."""
    if t.stride(-1) != 1:
        t = t.contiguous()
    t = t.reshape(-1, n)
    if t.stride(1) != 1 and t.shape[0] * t.shape[1] > 0:
        t = t.contiguous()
    return t


def _norm_forward(x, weight, eps, residual=None, *, bias=None, layer_norm=False, store_h=True, out=None, h_out=None,
                  mean=None, rstd=None, num_warps=None):
    """Launch the forward kernel on 2-D rows: RMSNorm, or LayerNorm with ``layer_norm`` (then ``bias`` is needed).

    x, residual: ``[M, N]`` with unit column stride (the residual's row stride may be 0: one row for every row);
    weight, bias ``[N]`` contiguous. ``store_h``: with a residual, write ``h = x + residual`` (RMSNorm returns
    it; LayerNorm keeps it only for the backward). The output buffers may be given (``out [M, N]`` of dtype
    ``promote_types(x, weight)`` for RMSNorm, x's dtype for LayerNorm; ``h_out [M, N]`` of x's dtype, each with
    unit column stride; ``mean`` (LayerNorm), ``rstd`` ``[M]`` float32) or are allocated.
    Returns ``(out, h_out, mean, rstd)``: h_out None unless stored, mean None for RMSNorm.
    """
    rows, n = x.shape
    block_n = next_power_of_2(n)
    if out is None:
        out_dtype = x.dtype if layer_norm else torch.promote_types(x.dtype, weight.dtype)
        out = torch.empty((rows, n), dtype=out_dtype, device=x.device)
    if rstd is None:
        rstd = torch.empty(rows, dtype=torch.float32, device=x.device)
    if layer_norm and mean is None:
        mean = torch.empty(rows, dtype=torch.float32, device=x.device)
    store_h = store_h and residual is not None
    if store_h and h_out is None:
        h_out = torch.empty_like(x, memory_format=torch.contiguous_format)
    if rows == 0:
        return out, h_out, mean, rstd
    _rms_norm_fwd_kernel[(rows,)](
        # unused pointers (no residual, no h, RMSNorm's bias and mean) get a valid tensor that is never read
        x, residual if residual is not None else x, weight, bias if layer_norm else weight, out,
        h_out if store_h else out, mean if layer_norm else rstd, rstd,
        stride_x_row=x.stride(0), stride_residual_row=residual.stride(0) if residual is not None else 0,
        stride_out_row=out.stride(0), stride_h_row=h_out.stride(0) if store_h else 0,
        N=n, eps=eps,
        HAS_RESIDUAL=residual is not None,
        STORE_H=store_h,
        IS_LAYER_NORM=layer_norm,
        BLOCK_N=block_n,
        num_warps=num_warps or rms_norm_num_warps(block_n),
    )
    return out, h_out, mean, rstd


def _norm_backward(dy, h, weight, rstd, dh=None, *, mean=None, dx=None, num_programs=None, num_warps=None):
    """Launch the backward kernel on 2-D rows: RMSNorm, or LayerNorm when ``mean`` is given (``num_programs`` is
    a target; the rows are split in power-of-two blocks).

    dy ``[M, N]`` (grad of out), h ``[M, N]`` (the normalised input, x or x + residual), weight ``[N]``,
    rstd and mean ``[M]`` float32, dh ``[M, N]`` (grad of RMSNorm's returned h) or None; all with unit column
    stride. ``dx`` (``[M, N]``, h's dtype) may be given. Returns ``(dx, dweight, dbias)`` with dweight and dbias
    in weight's dtype (dbias None for RMSNorm).
    """
    rows, n = h.shape
    block_n = next_power_of_2(n)
    layer_norm = mean is not None
    if dx is None:
        dx = torch.empty((rows, n), dtype=h.dtype, device=h.device)
    if rows == 0:
        return dx, torch.zeros_like(weight), (torch.zeros_like(weight) if layer_norm else None)
    if num_programs is None:
        num_programs = rms_norm_backward_programs(rows, h.device)
    # rows per program rounded up to a power of two (it is a constexpr: this bounds the compiled variants)
    rows_per_program = next_power_of_2(cdiv(rows, num_programs))
    num_programs = cdiv(rows, rows_per_program)  # every program gets at least one row
    dw_partial = torch.empty((num_programs, n), dtype=torch.float32, device=h.device)
    db_partial = torch.empty((num_programs, n), dtype=torch.float32, device=h.device) if layer_norm else None
    _rms_norm_bwd_kernel[(num_programs,)](
        # unused pointers (no dh, RMSNorm's mean and dbias) get a valid tensor that is never read or written
        dy, h, weight, mean if layer_norm else rstd, rstd, dh if dh is not None else dy, dx, dw_partial,
        db_partial if layer_norm else dw_partial,
        stride_dout_row=dy.stride(0), stride_h_row=h.stride(0), stride_dh_row=dh.stride(0) if dh is not None else 0,
        stride_dx_row=dx.stride(0), M=rows, N=n,
        HAS_DH=dh is not None,
        IS_LAYER_NORM=layer_norm,
        ROWS_PER_PROGRAM=rows_per_program,
        BLOCK_N=block_n,
        num_warps=num_warps or rms_norm_num_warps(block_n),
    )
    dweight = dw_partial.sum(dim=0).to(weight.dtype)
    dbias = db_partial.sum(dim=0).to(weight.dtype) if layer_norm else None
    return dx, dweight, dbias


# ----------------------------------------------------------------------------------------------------------------
# Custom ops, autograd and public API: RMSNorm
# ----------------------------------------------------------------------------------------------------------------
def _forward_impl(x: torch.Tensor, weight: torch.Tensor, eps: float,
                  residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The forward on x of any shape ``[..., N]``: ``(out, h, rstd)``; out and h (x + residual, an empty tensor
    without residual) in x's shape, rstd ``[rows]`` float32."""
    n = x.shape[-1]
    residual_rows = _as_rows(residual, n) if residual is not None else None
    with device_context(x.device):
        out, h, _, rstd = _norm_forward(_as_rows(x, n), weight, eps, residual_rows)
    return out.view(x.shape), (h.view(x.shape) if residual is not None else x.new_empty(0)), rstd


def _forward_fake(x, weight, eps, residual):
    rows = x.numel() // x.shape[-1]
    return (x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype)),
            x.new_empty(x.shape if residual is not None else (0,)), x.new_empty((rows,), dtype=torch.float32))


def _backward_impl(dout: torch.Tensor, normalised: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
                   dh: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dx, dweight)``: dout, dh (or None) the gradients of out and h, ``normalised`` the rows the forward
    normalised (x, or h = x + residual), all in x's shape; dx in that shape, dweight in weight's dtype."""
    n = normalised.shape[-1]
    dh_rows = _as_rows(dh, n) if dh is not None else None
    with device_context(normalised.device):
        dx, dweight, _ = _norm_backward(_as_rows(dout, n), _as_rows(normalised, n), weight, rstd, dh_rows)
    return dx.view(normalised.shape), dweight


def _backward_fake(dout, normalised, weight, rstd, dh):
    return normalised.new_empty(normalised.shape), weight.new_empty(weight.shape)


# torch.ops.fusedformers.rms_norm_forward / rms_norm_backward: the kernels as single torch.compile graph nodes
rms_norm_forward_op = custom_op("rms_norm_forward", _forward_impl, _forward_fake)
rms_norm_backward_op = custom_op("rms_norm_backward", _backward_impl, _backward_fake)


class RMSNormFunction(torch.autograd.Function):
    """Autograd wrapper; ``forward(x, weight, eps, residual)`` returns ``out`` or ``(out, h)``."""

    @staticmethod
    def forward(ctx, x, weight, eps, residual):
        out, h, rstd = call_op(rms_norm_forward_op, _forward_impl, x, weight, eps, residual)
        ctx.has_residual = residual is not None
        ctx.save_for_backward(h if residual is not None else x, weight, rstd)
        ctx.set_materialize_grads(False)  # an unused output (out or h) gets None, not a tensor of zeros
        return (out, h) if residual is not None else out

    @staticmethod
    def backward(ctx, dout, *maybe_dh):
        normalised, weight, rstd = ctx.saved_tensors
        dh = maybe_dh[0] if ctx.has_residual else None
        if dout is None:
            # only h was used: the norm contributes nothing and weight gets no gradient (as in eager PyTorch)
            dx = dh.contiguous() if dh is not None else torch.zeros_like(normalised)
            dweight = None
        else:
            dx, dweight = call_op(rms_norm_backward_op, _backward_impl, dout, normalised, weight, rstd, dh)
        # h = x + residual: both receive the same gradient
        dresidual = dx if ctx.has_residual else None
        return dx, dweight, None, dresidual


def _check_inputs(x, weight, eps, residual, bias=None, layer_norm=False):
    """Argument checks of :func:`rms_norm` and (``layer_norm``) :func:`layer_norm`, which also takes ``bias``."""
    check_tensor("x", x)
    check_tensor("weight", weight, 1)
    if layer_norm:
        check_tensor("bias", bias, 1)
    check_kernel_device("x", x)
    check_float_dtype("x", x)
    check_float_dtype("weight", weight)
    if layer_norm:
        # aten's layer_norm: the parameters in x's dtype, or float32 for a 16-bit x (its "mixed dtype")
        if weight.dtype not in (x.dtype, torch.float32):
            raise TypeError(f"weight must have x's dtype {x.dtype} or float32, got {weight.dtype}")
        if bias.dtype != weight.dtype:
            raise TypeError(f"bias must have weight's dtype {weight.dtype}, got {bias.dtype}")
    if x.dim() == 0:
        raise ValueError("x must have at least 1 dimension [..., N], got a 0-d tensor")
    n = x.shape[-1]
    if n == 0:
        raise ValueError(f"x's last dimension N must be > 0, got shape {tuple(x.shape)}")
    if n > MAX_HIDDEN_SIZE:
        raise ValueError(f"x's last dimension N must be at most {MAX_HIDDEN_SIZE} (a whole row is normalised "
                         f"in registers), got {n}")
    if tuple(weight.shape) != (n,):
        raise ValueError(f"weight must have shape [N] = [{n}] (x's last dimension), got {tuple(weight.shape)}")
    if layer_norm and tuple(bias.shape) != (n,):
        raise ValueError(f"bias must have shape [N] = [{n}] (x's last dimension), got {tuple(bias.shape)}")
    if residual is not None:
        check_tensor("residual", residual)
        if tuple(residual.shape) != tuple(x.shape):
            raise ValueError(f"residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
        if residual.dtype != x.dtype:
            raise TypeError(f"residual must have x's dtype {x.dtype}, got {residual.dtype}")
    check_same_device(x=x, weight=weight, bias=bias, residual=residual)
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"eps must be a positive float, got {type(eps).__name__}")
    if not eps > 0:  # also rejects NaN
        raise ValueError(f"eps must be a positive float, got {eps}")


def rms_norm(x, weight, eps=1e-6, residual=None):
    """RMSNorm of the last dimension, as Hugging Face's ``LlamaRMSNorm``; optionally fused with the residual add.

    Args:
        x: ``[..., N]`` float16, bfloat16 or float32, any strides (copied only when the rows cannot be viewed
            with a unit column stride).
        weight: ``[N]``, float16, bfloat16 or float32.
        eps: positive float added to the mean square.
        residual: None, or ``[..., N]`` with x's shape and dtype.

    Returns:
        Without residual: ``out [..., N]``, ``weight * (x.float() * rsqrt(mean(x.float()**2, -1) + eps)).to(x.dtype)``
        in the dtype ``torch.promote_types(weight.dtype, x.dtype)``.
        With residual: ``(rms_norm(h), h)`` where ``h = x + residual`` ``[..., N]`` in x's dtype (the fused
        add + norm of a LLaMA decoder layer).

    Differentiable in x, weight and residual (dweight is reduced in float32, then cast to weight's dtype).
    Hidden sizes up to ``MAX_HIDDEN_SIZE``; larger N raises ``ValueError``.
    """
    _check_inputs(x, weight, eps, residual)
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                              or (residual is not None and residual.requires_grad))
    if not needs_grad:  # inference: no autograd Function (its bookkeeping costs more than the launch)
        out, h, _ = call_op(rms_norm_forward_op, _forward_impl, x, weight.contiguous(), float(eps), residual)
        return (out, h) if residual is not None else out
    return RMSNormFunction.apply(x, weight.contiguous(), float(eps), residual)


# ----------------------------------------------------------------------------------------------------------------
# Custom ops, autograd and public API: LayerNorm
# ----------------------------------------------------------------------------------------------------------------
def _ln_forward_impl(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                     residual: torch.Tensor | None,
                     keep_h: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The LayerNorm forward on x of any shape ``[..., N]``: ``(out, h, mean, rstd)``; out in x's shape and
    dtype; h = x + residual in x's shape when ``keep_h`` (for the backward), else an empty tensor; mean, rstd
    ``[rows]`` float32."""
    n = x.shape[-1]
    residual_rows = _as_rows(residual, n) if residual is not None else None
    with device_context(x.device):
        out, h, mean, rstd = _norm_forward(_as_rows(x, n), weight, eps, residual_rows, bias=bias, layer_norm=True,
                                           store_h=keep_h)
    return out.view(x.shape), (h.view(x.shape) if h is not None else x.new_empty(0)), mean, rstd


def _ln_forward_fake(x, weight, bias, eps, residual, keep_h):
    rows = x.numel() // x.shape[-1]
    stats = (x.new_empty((rows,), dtype=torch.float32), x.new_empty((rows,), dtype=torch.float32))
    return x.new_empty(x.shape), x.new_empty(x.shape if residual is not None and keep_h else (0,)), *stats


def _ln_backward_impl(dout: torch.Tensor, normalised: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor,
                      rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dx, dweight, dbias)``: dout the gradient of out, ``normalised`` the rows the forward normalised (x, or
    h = x + residual), both in x's shape; dx in that shape and x's dtype, dweight and dbias in weight's dtype."""
    n = normalised.shape[-1]
    with device_context(normalised.device):
        dx, dweight, dbias = _norm_backward(_as_rows(dout, n), _as_rows(normalised, n), weight, rstd, mean=mean)
    return dx.view(normalised.shape), dweight, dbias


def _ln_backward_fake(dout, normalised, weight, mean, rstd):
    return normalised.new_empty(normalised.shape), weight.new_empty(weight.shape), weight.new_empty(weight.shape)


# torch.ops.fusedformers.layer_norm_forward / layer_norm_backward
layer_norm_forward_op = custom_op("layer_norm_forward", _ln_forward_impl, _ln_forward_fake)
layer_norm_backward_op = custom_op("layer_norm_backward", _ln_backward_impl, _ln_backward_fake)


class LayerNormFunction(torch.autograd.Function):
    """Autograd wrapper; ``forward(x, weight, bias, eps, residual)`` returns ``LN(x + residual)``."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, residual):
        out, h, mean, rstd = call_op(layer_norm_forward_op, _ln_forward_impl, x, weight, bias, eps, residual, True)
        ctx.has_residual = residual is not None
        ctx.save_for_backward(h if residual is not None else x, weight, mean, rstd)
        return out

    @staticmethod
    def backward(ctx, dout):
        normalised, weight, mean, rstd = ctx.saved_tensors
        dx, dweight, dbias = call_op(layer_norm_backward_op, _ln_backward_impl, dout, normalised, weight, mean, rstd)
        # h = x + residual: both receive the same gradient
        return dx, dweight, dbias, None, (dx if ctx.has_residual else None)


def layer_norm(x, weight, bias, eps=1e-5, residual=None):
    """LayerNorm of the last dimension, as ``torch.nn.LayerNorm`` (aten's ``layer_norm``); optionally of
    ``x + residual``, fused (BART's post-LN ``LN(hidden + sublayer_out)`` is ``layer_norm(sublayer_out, ...,
    residual=hidden)``).

    Args:
        x: ``[..., N]`` float16, bfloat16 or float32, any strides (copied only when the rows cannot be viewed
            with a unit column stride).
        weight, bias: ``[N]``, in x's dtype, or both float32 (also for a 16-bit x, as aten allows).
        eps: positive float added to the variance.
        residual: None, or ``[..., N]`` with x's shape and dtype; a broadcast one (e.g. ``pos.expand_as(x)`` of
            ``pos [L, N]``) is read without a copy where its rows can be viewed with one row stride (L = 1).

    Returns:
        ``out [..., N]`` in x's dtype: with ``h = x + residual`` rounded to x's dtype (or ``h = x``),
        ``((h - mean) * rsqrt(var + eps) * weight + bias)`` with the mean and the biased variance of each row in
        float32, the whole expression in float32, rounded once.

    Differentiable in x, weight, bias and residual (dweight and dbias are reduced in float32, then cast to
    weight's dtype). Hidden sizes up to ``MAX_HIDDEN_SIZE``; larger N raises ``ValueError``.
    """
    _check_inputs(x, weight, eps, residual, bias, layer_norm=True)
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or bias.requires_grad
                                              or (residual is not None and residual.requires_grad))
    if not needs_grad:  # inference: no autograd Function, and h = x + residual is not written
        return call_op(layer_norm_forward_op, _ln_forward_impl, x, weight.contiguous(), bias.contiguous(),
                       float(eps), residual, False)[0]
    return LayerNormFunction.apply(x, weight.contiguous(), bias.contiguous(), float(eps), residual)

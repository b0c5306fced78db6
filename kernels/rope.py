"""Rotary position embedding (RoPE) in one launch, forward and backward; for attention, q and k rotated and v
copied in that same launch, straight from the packed q/k/v projection into the KV cache.

``out = x * cos + rotate_half(x) * sin`` with ``rotate_half(x) = cat(-x2, x1)`` (HF's half-split layout, as in
``apply_rotary_pos_emb``), with HF's roundings: each product is rounded to x's dtype, then their sum. In eager
PyTorch this is five kernels per tensor (two products, a negation, a concatenation and a sum); here it is one,
which matters at decode time, when a step is bound by the host's launches, not by the GPU.

One program handles one token row (b, l): it loads that row's cos and sin once and rotates BLOCK_H heads.
The backward is the same kernel with sin's halves swapped and negated: the gradient of x is
``g * cos + rotate_half^T(g * sin)`` with ``rotate_half^T(y) = cat(y2, -y1)``, i.e.
``dx1 = g1 * cos1 + g2 * sin2`` and ``dx2 = g2 * cos2 - g1 * sin1`` (for HF's RoPE the halves are equal, and this
is the rotation by the opposite angle).

With ``QKV`` the kernel takes three inputs (q ``[B, L, Hq, D]``, k and v ``[B, L, Hkv, D]``: in the forward,
views of one packed projection ``[B, L, (Hq + 2 Hkv) * D]``) and three outputs; the grid's head axis holds the q
blocks, then the k blocks, then the v blocks: q and k are rotated, v is copied. With ``TO_CACHE`` the k and v
outputs are KV-cache buffers ``[B, Hkv, max_len, D]`` and token l goes to their row ``cache_position[l]`` (a
device tensor, so a recorded CUDA graph replays the write at the position the step itself advanced). The
backward of the packed op (no cache) is the same kernel in the other direction: the gradients of q, k, v in, the
packed gradient out.
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
def _rope_heads(
    src_ptr, dst_ptr,                  # the token row's first head in the input and in the output
    stride_src_h, stride_dst_h,        # head strides (unit stride along D)
    heads, num_heads,                  # [BLOCK_H] head indices of this program, and the tensor's head count
    cos1, cos2, sin1, sin2,            # [1, BLOCK_HALF] float32 halves of the row's cos and sin
    ROTATE: tl.constexpr,              # rotate (q, k), or copy as is (v)
    HALF: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    """One [BLOCK_H, D] tile of a token row: rotated (or copied) from src to dst."""
    cols = tl.arange(0, BLOCK_HALF)    # column j of the first half, and HALF + j of the second
    tile_ok = (heads[:, None] < num_heads) & (cols < HALF)[None, :]
    src = src_ptr + heads[:, None].to(tl.int64) * stride_src_h
    dst = dst_ptr + heads[:, None].to(tl.int64) * stride_dst_h
    x1 = tl.load(src + cols[None, :], mask=tile_ok, other=0.0)                   # [BLOCK_H, BLOCK_HALF]
    x2 = tl.load(src + HALF + cols[None, :], mask=tile_ok, other=0.0)
    if ROTATE:
        dtype = src_ptr.dtype.element_ty  # HF rotates in the input's dtype (a cache may hold another one)
        x1 = x1.to(tl.float32)
        x2 = x2.to(tl.float32)
        # products of two 16-bit floats are exact in fp32, so rounding each to the dtype reproduces PyTorch's
        # x * cos and rotate_half(x) * sin; the sum is then rounded once more, as PyTorch's addition
        out1 = ((x1 * cos1).to(dtype).to(tl.float32) + (-x2 * sin1).to(dtype).to(tl.float32)).to(dtype)
        out2 = ((x2 * cos2).to(dtype).to(tl.float32) + (x1 * sin2).to(dtype).to(tl.float32)).to(dtype)
    else:
        out1, out2 = x1, x2
    tl.store(dst + cols[None, :], out1.to(dst_ptr.dtype.element_ty), mask=tile_ok)
    tl.store(dst + HALF + cols[None, :], out2.to(dst_ptr.dtype.element_ty), mask=tile_ok)


@triton.jit
def _rope_kernel(
    # tensors
    q_ptr, k_ptr, v_ptr,               # inputs [B, L, H, D]: q (the only one without QKV), k, v [B, L, Hkv, D]
    cos_ptr, sin_ptr,                  # [B, L, D]
    q_out_ptr, k_out_ptr, v_out_ptr,   # outputs: q [B, L, Hq, D]; k, v [B, L, Hkv, D], or caches (TO_CACHE)
    cache_position_ptr,                # [L] int64: the cache row of each token (TO_CACHE)
    # strides (all with unit stride along D; k and v share theirs, in and out; cos and sin share theirs)
    stride_qb, stride_ql, stride_qh,
    stride_kvb, stride_kvl, stride_kvh,
    stride_cb, stride_cl,
    stride_qob, stride_qol, stride_qoh,
    stride_kvob, stride_kvol, stride_kvoh,  # of a cache [B, Hkv, max_len, D]: its strides 0, 2, 1
    # sizes
    seq_len, num_heads, num_kv_heads,
    # constexprs
    BACKWARD: tl.constexpr,            # rotate by -sin with its halves swapped (the gradient)
    QKV: tl.constexpr,                 # k (rotated) and v (copied) too, after q on the grid's head axis
    TO_CACHE: tl.constexpr,            # k and v go to rows cache_position[l] of the outputs
    HALF: tl.constexpr,                # D / 2
    BLOCK_HALF: tl.constexpr,          # HALF rounded up to a power of two
    BLOCK_H: tl.constexpr,
):
    row = tl.program_id(0)             # token row b * L + pos
    b = (row // seq_len).to(tl.int64)
    pos = (row % seq_len).to(tl.int64)
    block = tl.program_id(1)           # head block: q's, then (QKV) k's, then v's
    q_blocks = tl.cdiv(num_heads, BLOCK_H)

    cols = tl.arange(0, BLOCK_HALF)
    col_ok = cols < HALF
    cs = b * stride_cb + pos * stride_cl
    cos1 = tl.load(cos_ptr + cs + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    cos2 = tl.load(cos_ptr + cs + HALF + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    sin1 = tl.load(sin_ptr + cs + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    sin2 = tl.load(sin_ptr + cs + HALF + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if BACKWARD:
        sin1, sin2 = -sin2, -sin1

    if block < q_blocks:
        heads = block * BLOCK_H + tl.arange(0, BLOCK_H)
        _rope_heads(q_ptr + b * stride_qb + pos * stride_ql, q_out_ptr + b * stride_qob + pos * stride_qol,
                    stride_qh, stride_qoh, heads, num_heads, cos1, cos2, sin1, sin2,
                    True, HALF, BLOCK_HALF)
    elif QKV:
        kv_blocks = tl.cdiv(num_kv_heads, BLOCK_H)
        if TO_CACHE:
            out_row = tl.load(cache_position_ptr + pos).to(tl.int64)   # where token pos goes in the cache
        else:
            out_row = pos
        kv_in = b * stride_kvb + pos * stride_kvl
        kv_out = b * stride_kvob + out_row * stride_kvol
        kv_block = block - q_blocks
        if kv_block < kv_blocks:       # k: rotated
            heads = kv_block * BLOCK_H + tl.arange(0, BLOCK_H)
            _rope_heads(k_ptr + kv_in, k_out_ptr + kv_out, stride_kvh, stride_kvoh, heads, num_kv_heads,
                        cos1, cos2, sin1, sin2, True, HALF, BLOCK_HALF)
        else:                          # v: copied
            heads = (kv_block - kv_blocks) * BLOCK_H + tl.arange(0, BLOCK_H)
            _rope_heads(v_ptr + kv_in, v_out_ptr + kv_out, stride_kvh, stride_kvoh, heads, num_kv_heads,
                        cos1, cos2, sin1, sin2, False, HALF, BLOCK_HALF)


# ----------------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------------
def _launch(q, cos, sin, q_out, backward=False, kv=None, kv_out=None, cache_position=None):
    """Launch the kernel: q ``[B, L, H, D]`` -> q_out (rotated); with ``kv = (k, v)`` (``[B, L, Hkv, D]``, one
    set of strides) also k -> rotated and v -> copied into ``kv_out = (k_out, v_out)``: ``[B, L, Hkv, D]``
    tensors, or with ``cache_position [L]`` (int64) cache buffers ``[B, Hkv, max_len, D]`` written at those rows.
    Every tensor has unit stride along D."""
    batch, seq_len, num_heads, head_dim = q.shape
    num_kv_heads = kv[0].shape[2] if kv is not None else 0
    if batch * seq_len * head_dim * (num_heads + num_kv_heads) == 0:
        return
    # one head block size for q, k and v: the smaller head count's (GQA: Hkv), so k and v blocks are not mostly
    # masked off
    block_h, block_half, num_warps = rope_plan(min(num_heads, num_kv_heads) if kv is not None else num_heads,
                                               head_dim)
    q_blocks = cdiv(num_heads, block_h)
    kv_blocks = cdiv(num_kv_heads, block_h)
    k, v = kv if kv is not None else (q, q)
    k_out, v_out = kv_out if kv is not None else (q_out, q_out)
    to_cache = cache_position is not None
    # a cache [B, Hkv, max_len, D] is addressed as [B, row, head, D]
    kv_out_strides = (k_out.stride(0), k_out.stride(2), k_out.stride(1)) if to_cache else k_out.stride()[:3]
    grid = (batch * seq_len, q_blocks + 2 * kv_blocks)
    with device_context(q.device):
        _rope_kernel[grid](
            q, k, v, cos, sin, q_out, k_out, v_out, cache_position if to_cache else q,
            stride_qb=q.stride(0), stride_ql=q.stride(1), stride_qh=q.stride(2),
            stride_kvb=k.stride(0), stride_kvl=k.stride(1), stride_kvh=k.stride(2),
            stride_cb=cos.stride(0), stride_cl=cos.stride(1),
            stride_qob=q_out.stride(0), stride_qol=q_out.stride(1), stride_qoh=q_out.stride(2),
            stride_kvob=kv_out_strides[0], stride_kvol=kv_out_strides[1], stride_kvoh=kv_out_strides[2],
            seq_len=seq_len, num_heads=num_heads, num_kv_heads=num_kv_heads,
            BACKWARD=backward, QKV=kv is not None, TO_CACHE=to_cache, HALF=head_dim // 2,
            BLOCK_HALF=block_half, BLOCK_H=block_h,
            # x * cos + rotate_half(x) * sin as two rounded products and a sum, as PyTorch's three kernels: no
            # FMA (in float32 it would round once where PyTorch rounds twice; 16-bit products are exact anyway)
            num_warps=num_warps, enable_fp_fusion=False,
        )


def _unit_stride(x):
    return x if x.stride(-1) == 1 else x.contiguous()


def _rotate(x, cos, sin, backward=False, out=None):
    """One tensor: x ``[B, L, H, D]`` (unit stride along D), cos/sin ``[B, L, D]``. Returns ``out`` (a new
    contiguous ``[B, L, H, D]`` tensor in x's dtype unless given)."""
    x = _unit_stride(x)
    if out is None:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _launch(x, cos, sin, out, backward)
    return out


def _split_qkv(qkv, num_heads, num_kv_heads, head_dim):
    """Views q ``[B, L, Hq, D]``, k, v ``[B, L, Hkv, D]`` of a packed projection ``[B, L, (Hq + 2 Hkv) * D]``."""
    heads = qkv.unflatten(-1, (num_heads + 2 * num_kv_heads, head_dim))
    return heads.split((num_heads, num_kv_heads, num_kv_heads), dim=2)


def _rotate_qkv(qkv, cos, sin, num_heads, k_cache=None, v_cache=None, cache_position=None):
    """The packed projection ``qkv [B, L, (Hq + 2 Hkv) * D]`` (unit stride along the last dim): q and k rotated,
    v copied, into new contiguous ``[B, L, H, D]`` tensors (returns q, k, v), or k and v into the cache buffers
    at ``cache_position`` (returns q)."""
    qkv = _unit_stride(qkv)
    batch, seq_len, width = qkv.shape
    head_dim = cos.shape[-1]
    num_kv_heads = (width // head_dim - num_heads) // 2
    q, k, v = _split_qkv(qkv, num_heads, num_kv_heads, head_dim)
    q_out = torch.empty(q.shape, dtype=qkv.dtype, device=qkv.device)
    if k_cache is not None:
        _launch(q, cos, sin, q_out, kv=(k, v), kv_out=(k_cache, v_cache), cache_position=cache_position)
        return q_out
    k_out, v_out = (torch.empty(k.shape, dtype=qkv.dtype, device=qkv.device) for _ in range(2))
    _launch(q, cos, sin, q_out, kv=(k, v), kv_out=(k_out, v_out))
    return q_out, k_out, v_out


def _rotate_qkv_backward(dq, dk, dv, cos, sin):
    """The packed gradient ``[B, L, (Hq + 2 Hkv) * D]`` of ``_rotate_qkv`` without a cache: the rope backward of
    dq and dk, dv as is."""
    dq = _unit_stride(dq)
    if dk.stride() != dv.stride() or dk.stride(-1) != 1:
        dk, dv = dk.contiguous(), dv.contiguous()
    batch, seq_len, num_heads, head_dim = dq.shape
    num_kv_heads = dk.shape[2]
    dqkv = torch.empty(batch, seq_len, (num_heads + 2 * num_kv_heads) * head_dim, dtype=dq.dtype, device=dq.device)
    q_out, k_out, v_out = _split_qkv(dqkv, num_heads, num_kv_heads, head_dim)
    _launch(dq, cos, sin, q_out, backward=True, kv=(dk, dv), kv_out=(k_out, v_out))
    return dqkv


# ----------------------------------------------------------------------------------------------------------------
# Custom ops, autograd and public API
# ----------------------------------------------------------------------------------------------------------------
def _rotate_impl(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool) -> torch.Tensor:
    return _rotate(x, cos, sin, backward)


def _rotate_fake(x, cos, sin, backward):
    return x.new_empty(x.shape)  # contiguous, as _rotate's output


def _rope_qkv_impl(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   num_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _rotate_qkv(qkv, cos, sin, num_heads)


def _rope_qkv_fake(qkv, cos, sin, num_heads):
    batch, seq_len, width = qkv.shape
    head_dim = cos.shape[-1]
    num_kv_heads = (width // head_dim - num_heads) // 2
    kv_shape = (batch, seq_len, num_kv_heads, head_dim)
    return qkv.new_empty(batch, seq_len, num_heads, head_dim), qkv.new_empty(kv_shape), qkv.new_empty(kv_shape)


def _rope_qkv_backward_impl(dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, cos: torch.Tensor,
                            sin: torch.Tensor) -> torch.Tensor:
    return _rotate_qkv_backward(dq, dk, dv, cos, sin)


def _rope_qkv_backward_fake(dq, dk, dv, cos, sin):
    batch, seq_len, num_heads, head_dim = dq.shape
    return dq.new_empty(batch, seq_len, (num_heads + 2 * dk.shape[2]) * head_dim)


def _rope_qkv_cache_impl(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int,
                         k_cache: torch.Tensor, v_cache: torch.Tensor, cache_position: torch.Tensor) -> torch.Tensor:
    return _rotate_qkv(qkv, cos, sin, num_heads, k_cache, v_cache, cache_position)


def _rope_qkv_cache_fake(qkv, cos, sin, num_heads, k_cache, v_cache, cache_position):
    batch, seq_len, _ = qkv.shape
    return qkv.new_empty(batch, seq_len, num_heads, cos.shape[-1])


# torch.ops.fusedformers.rope(x, cos, sin, backward): the kernel as one node of a torch.compile graph
rope_op = custom_op("rope", _rotate_impl, _rotate_fake)
# the packed q/k/v: without a cache (returns q, k, v; its backward), and into a cache (mutates k_cache, v_cache)
rope_qkv_op = custom_op("rope_qkv", _rope_qkv_impl, _rope_qkv_fake)
rope_qkv_backward_op = custom_op("rope_qkv_backward", _rope_qkv_backward_impl, _rope_qkv_backward_fake)
rope_qkv_cache_op = custom_op("rope_qkv_cache", _rope_qkv_cache_impl, _rope_qkv_cache_fake,
                              mutates_args=("k_cache", "v_cache"))


class _Rope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return call_op(rope_op, _rotate_impl, x, cos, sin, False)

    @staticmethod
    def backward(ctx, grad_out):
        cos, sin = ctx.saved_tensors
        return call_op(rope_op, _rotate_impl, grad_out, cos, sin, True), None, None


class _RopeQKV(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv, cos, sin, num_heads):
        ctx.save_for_backward(cos, sin)
        return call_op(rope_qkv_op, _rope_qkv_impl, qkv, cos, sin, num_heads)

    @staticmethod
    def backward(ctx, dq, dk, dv):
        cos, sin = ctx.saved_tensors
        return call_op(rope_qkv_backward_op, _rope_qkv_backward_impl, dq, dk, dv, cos, sin), None, None, None


def _check_cos_sin(x_name, x, cos, sin, batch, seq_len, head_dim, what):
    expected = (batch, seq_len, head_dim)
    for name, t in (("cos", cos), ("sin", sin)):
        if tuple(t.shape) != expected:
            raise ValueError(f"{name} must have shape [B, L, D] = {list(expected)} ({what}), got {list(t.shape)}")
        if t.dtype != x.dtype:
            raise TypeError(f"{name} must have {x_name}'s dtype {x.dtype} (HF casts cos/sin to it), got {t.dtype}")
    if cos.stride() != sin.stride() or (head_dim > 1 and cos.stride(-1) != 1):
        raise ValueError("cos and sin must share their strides, with unit stride along D (e.g. contiguous)")


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
    _check_cos_sin("x", x, cos, sin, batch, seq_len, head_dim, "x is [B, L, H, D]")


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


def _check_qkv_inputs(qkv, cos, sin, num_heads, num_kv_heads, k_cache, v_cache, cache_position):
    check_tensor("qkv", qkv, 3)
    check_tensor("cos", cos, 3)
    check_tensor("sin", sin, 3)
    check_kernel_device("qkv", qkv)
    check_float_dtype("qkv", qkv)
    for name, value in (("num_heads", num_heads), ("num_kv_heads", num_kv_heads)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    batch, seq_len, width = qkv.shape
    head_dim = cos.shape[-1]
    if head_dim % 2 != 0 or width != (num_heads + 2 * num_kv_heads) * head_dim:
        raise ValueError(f"qkv must be [B, L, (num_heads + 2 * num_kv_heads) * D] = "
                         f"[B, L, {num_heads + 2 * num_kv_heads} * D] with D = cos's last dim ({head_dim}, even), "
                         f"got {list(qkv.shape)}")
    _check_cos_sin("qkv", qkv, cos, sin, batch, seq_len, head_dim, "qkv is [B, L, (Hq + 2 Hkv) * D]")
    if (k_cache is None) != (v_cache is None) or (k_cache is None) != (cache_position is None):
        raise ValueError("k_cache, v_cache and cache_position go together: pass all three or none")
    if k_cache is None:
        check_same_device(qkv=qkv, cos=cos, sin=sin)
        return
    check_tensor("k_cache", k_cache, 4)
    check_tensor("cache_position", cache_position, 1)
    check_same_device(qkv=qkv, cos=cos, sin=sin, k_cache=k_cache, v_cache=v_cache, cache_position=cache_position)
    expected = (batch, num_kv_heads, k_cache.shape[2], head_dim)
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if tuple(t.shape) != expected:
            raise ValueError(f"{name} must have shape [B, Hkv, max_len, D] = {list(expected)}, got {list(t.shape)}")
        check_float_dtype(name, t)
    if k_cache.stride() != v_cache.stride() or k_cache.stride(-1) != 1:
        raise ValueError("k_cache and v_cache must share their strides, with unit stride along D (e.g. contiguous)")
    if cache_position.dtype != torch.int64 or cache_position.shape[0] != seq_len:
        raise ValueError(f"cache_position must be an int64 tensor [L] = [{seq_len}], got {cache_position.dtype} "
                         f"{list(cache_position.shape)}")


def rope_qkv(qkv, cos, sin, num_heads, num_kv_heads, *, k_cache=None, v_cache=None, cache_position=None):
    """RoPE of q and k from the packed q/k/v projection, in one launch; with a KV cache, k and v are written into
    it in that same launch (HF's ``apply_rotary_pos_emb`` on q and k, then the cache update).

    Args:
        qkv: ``[B, L, (Hq + 2 Hkv) * D]`` float16, bfloat16 or float32 (q's heads, k's, v's), any strides with a
            unit stride along the last dim (e.g. a fused projection's output).
        cos, sin: ``[B, L, D]`` in qkv's dtype (D even), as for :func:`rope`.
        num_heads, num_kv_heads: Hq and Hkv.
        k_cache, v_cache: optional cache buffers ``[B, Hkv, max_len, D]`` (one set of strides, unit along D; any of
            the three float dtypes: the rotated k is rounded in qkv's dtype, then cast), written in place at rows
            ``cache_position``.
        cache_position: ``[L]`` int64 device tensor, the cache row of each token (no host value is read, so a
            CUDA graph can replay the write). Values must lie in ``[0, max_len)``.

    Returns:
        without a cache: ``(q, k, v)``, new contiguous ``[B, L, Hq, D]``, ``[B, L, Hkv, D]``, ``[B, L, Hkv, D]``
        (q and k rotated, rounded as HF's; v a copy), differentiable in qkv;
        with a cache: ``q`` only (not differentiable; the cache holds k and v).
    """
    _check_qkv_inputs(qkv, cos, sin, num_heads, num_kv_heads, k_cache, v_cache, cache_position)
    if k_cache is not None:
        return call_op(rope_qkv_cache_op, _rope_qkv_cache_impl, qkv, cos, sin, num_heads, k_cache, v_cache,
                       cache_position)
    if torch.is_grad_enabled() and qkv.requires_grad:
        return _RopeQKV.apply(qkv, cos, sin, num_heads)
    return call_op(rope_qkv_op, _rope_qkv_impl, qkv, cos, sin, num_heads)

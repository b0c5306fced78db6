"""Fused masked attention: causal (with a past-length offset) + key padding + GQA/MQA, forward and backward.

One Triton program handles one block of BLOCK_M query rows of one (batch, query head) and streams over the keys
in blocks of BLOCK_N with an online softmax (exp2, fp32 statistics). The masks are never materialised:
- causal: query row i sits at absolute position ``past_len + i`` and sees key j iff ``j <= past_len + i``;
- key padding: HF's 2-D ``attention_mask`` [B, Lk]; each batch row's first and last real key (``kv_start``,
  ``kv_end``) bound the key loop, so all-padding blocks (left or right padding) are skipped, and the mask row
  is read per key block for holes;
- key blocks entirely above the causal diagonal are skipped; blocks entirely below it run without the causal
  mask, only the blocks that straddle the diagonal pay for it.
A query row with no visible key outputs zeros (and gets zero gradients): its log-sum-exp is stored as +inf.

Backward: a dK/dV kernel (one program per key block and KV head, looping over the query heads of its GQA group,
so grouped gradients are summed without atomics) and a dQ kernel (one program per query block and query head).
``attention`` dispatches Lq <= 16 without autograd to the split-KV decode kernel (kernels/decode_attention.py).
"""
import contextlib
import math

import torch
import triton
import triton.language as tl

from kernels.checks import check_attention_inputs, check_kernel_device
from kernels.decode_attention import decode_attention, key_padding_range

LOG2E = 1.4426950408889634
DECODE_MAX_QUERY_LEN = 16  # Lq at or below this (and no autograd) goes to the split-KV decode kernel
# lengths vary from call to call: one compiled kernel serves them all (no re-specialisation on 1 or on
# multiples of 16, which would compile a new variant the first time each case appears)
LENGTH_ARGS = ["q_len", "k_len", "past_len"]


# ----------------------------------------------------------------------------------------------------------------
# Shared pieces
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _key_visibility(offs_n, b, k_len, mask_ptr, stride_mask_b, stride_mask_n, HAS_PADDING: tl.constexpr):
    """[BLOCK_N] bool: the key exists (j < Lk) and is a real token in batch row b's padding mask."""
    if HAS_PADDING:
        row = mask_ptr + b.to(tl.int64) * stride_mask_b
        return tl.load(row + offs_n * stride_mask_n, mask=offs_n < k_len, other=0) != 0
    else:
        return offs_n < k_len


@triton.jit
def _key_loop_bounds(b, start_m, q_len, k_len, past_len, kv_start_ptr, kv_end_ptr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                     HAS_PADDING: tl.constexpr):
    """Key range [lo, hi) that the query rows [start_m, start_m + BLOCK_M) can see, and diag_lo: keys below it
    are visible to every row of the block (no causal mask needed), keys in [diag_lo, hi) straddle the diagonal.
    lo and diag_lo are multiples of BLOCK_N."""
    lo = 0
    hi = k_len
    if HAS_PADDING:
        lo = (tl.load(kv_start_ptr + b) // BLOCK_N) * BLOCK_N
        hi = tl.load(kv_end_ptr + b)
    diag_lo = hi
    if CAUSAL:
        last_row = tl.minimum(start_m + BLOCK_M, q_len) - 1
        hi = tl.minimum(hi, past_len + last_row + 1)        # the block's last row sees keys <= past_len + last_row
        first_row_limit = past_len + start_m + 1           # the block's first row sees keys < this
        diag_lo = tl.maximum((first_row_limit // BLOCK_N) * BLOCK_N, lo)
        diag_lo = tl.minimum(diag_lo, tl.maximum(hi, lo))
    return lo, hi, diag_lo


@triton.jit
def _query_program_coords(num_heads, kv_batch_index_ptr, GROUP_SIZE: tl.constexpr, HAS_KV_INDEX: tl.constexpr):
    """For a program of the grid (query blocks, Hq, B): (pid_m, pid_bh = b * Hq + h, b, h, kv_b, kv_h).
    Query blocks of one head are adjacent in launch order, so they share that head's K/V in L2; the head and
    batch axes are separate because a grid's second and third axes are limited to 65535."""
    h = tl.program_id(1)
    b = tl.program_id(2)
    pid_bh = b * num_heads + h
    kv_h = h // GROUP_SIZE                       # GQA: query heads [kv_h * G, (kv_h + 1) * G) share KV head kv_h
    kv_b = b
    if HAS_KV_INDEX:
        kv_b = tl.load(kv_batch_index_ptr + b)   # query batch row b reads K/V batch row kv_batch_index[b]
    return tl.program_id(0), pid_bh, b, h, kv_b, kv_h


_forced_blocks = None  # (BLOCK_M, BLOCK_N) while forced_block_sizes() is active


@contextlib.contextmanager
def forced_block_sizes(block_m, block_n):
    """Run the kernels with these tile sizes (for tests: the GPU's tiles have BLOCK_M != BLOCK_N, which the
    interpreter's default 16 x 16 tiles would never exercise)."""
    global _forced_blocks
    previous, _forced_blocks = _forced_blocks, (block_m, block_n)
    try:
        yield
    finally:
        _forced_blocks = previous


# GPU tiles per kernel (BLOCK_M query rows, BLOCK_N keys, num_warps, num_stages) for head dims up to 64 / 128 /
# 256. Chosen ahead of time so that no kernel spills registers on sm_90 (ptxas; tests/test_sm90_compile.py
# checks it). The dK/dV kernel keeps two fp32 [BLOCK_N, D] accumulators in registers, so it steps through the
# queries 32 rows at a time. fp32 inputs run exact (ieee) dots on the CUDA cores and need small tiles.
# Tuning them by measurement is bench/NOTES.md's job.
_GPU_TILES = {
    "fwd": {64: (128, 64, 4, 3), 128: (128, 64, 8, 3), 256: (64, 32, 8, 2)},
    "dkdv": {64: (32, 128, 8, 3), 128: (32, 64, 8, 3), 256: (32, 32, 8, 2)},
    "dq": {64: (128, 64, 8, 3), 128: (128, 64, 8, 3), 256: (64, 32, 8, 2)},
}
_GPU_TILES_FP32 = {
    "fwd": {128: (16, 64, 4, 2), 256: (16, 16, 4, 2)},
    "dkdv": {128: (16, 32, 4, 2), 256: (16, 16, 4, 2)},
    "dq": {128: (32, 16, 4, 2), 256: (16, 16, 4, 2)},
}


def _block_config(kernel, head_dim, dtype, device):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of ``kernel`` in "fwd", "dkdv", "dq". The interpreter gets
    small blocks so small test shapes span several blocks and exercise the skipping and diagonal logic. On the
    GPU the tiles must fit the 227 KB of shared memory per block of sm_90."""
    if _forced_blocks is not None:
        return (*_forced_blocks, 4, 1)
    if device.type != "cuda":
        return 16, 16, 4, 1
    tiles = (_GPU_TILES_FP32 if dtype == torch.float32 else _GPU_TILES)[kernel]
    return tiles[min(d for d in tiles if d >= head_dim)]


# ----------------------------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _fwd_inner(acc, m_i, l_i, q, k_block_ptr, v_block_ptr, lo, hi, b, offs_m, k_len, past_len, qk_scale,
               mask_ptr, stride_mask_b, stride_mask_n,
               BLOCK_N: tl.constexpr, APPLY_CAUSAL: tl.constexpr, HAS_PADDING: tl.constexpr,
               DOT_PRECISION: tl.constexpr):
    """Online-softmax accumulation over key blocks [lo, hi). Scores are kept in log2 units (scaled by
    sm_scale * log2(e)) so exp2 can be used."""
    k_block_ptr = tl.advance(k_block_ptr, (0, lo))
    v_block_ptr = tl.advance(v_block_ptr, (lo, 0))
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k_t = tl.load(k_block_ptr, boundary_check=(0, 1), padding_option="zero")   # [BLOCK_D, BLOCK_N]
        scores = tl.dot(q, k_t, input_precision=DOT_PRECISION) * qk_scale        # [BLOCK_M, BLOCK_N]
        visible = _key_visibility(offs_n, b, k_len, mask_ptr, stride_mask_b, stride_mask_n, HAS_PADDING)
        visible = visible[None, :]
        if APPLY_CAUSAL:
            visible = visible & (offs_n[None, :] <= past_len + offs_m[:, None])
        scores = tl.where(visible, scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        # a row that has seen no visible key yet keeps m = -inf; subtract 0 instead to avoid inf - inf = NaN
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_shift)
        p = tl.math.exp2(scores - m_shift[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_block_ptr, boundary_check=(0, 1), padding_option="zero")     # [BLOCK_N, BLOCK_D]
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
        k_block_ptr = tl.advance(k_block_ptr, (0, BLOCK_N))
        v_block_ptr = tl.advance(v_block_ptr, (BLOCK_N, 0))
    return acc, m_i, l_i


@triton.jit(do_not_specialize=LENGTH_ARGS)
def _attn_fwd_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr,
    mask_ptr, kv_start_ptr, kv_end_ptr, kv_batch_index_ptr,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_mask_b, stride_mask_n,
    num_heads, q_len, k_len, past_len, qk_scale,
    GROUP_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_PADDING: tl.constexpr, HAS_KV_INDEX: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_m, pid_bh, b, h, kv_b, kv_h = _query_program_coords(num_heads, kv_batch_index_ptr, GROUP_SIZE,
                                                            HAS_KV_INDEX)
    start_m = pid_m * BLOCK_M

    q_base = q_ptr + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    k_base = k_ptr + kv_b.to(tl.int64) * stride_kb + kv_h.to(tl.int64) * stride_kh
    v_base = v_ptr + kv_b.to(tl.int64) * stride_vb + kv_h.to(tl.int64) * stride_vh
    q_block_ptr = tl.make_block_ptr(q_base, (q_len, HEAD_DIM), (stride_qm, stride_qd), (start_m, 0),
                                    (BLOCK_M, BLOCK_D), (1, 0))
    # K is read transposed: a [BLOCK_D, BLOCK_N] tile of K^T
    k_block_ptr = tl.make_block_ptr(k_base, (HEAD_DIM, k_len), (stride_kd, stride_kn), (0, 0),
                                    (BLOCK_D, BLOCK_N), (0, 1))
    v_block_ptr = tl.make_block_ptr(v_base, (k_len, HEAD_DIM), (stride_vn, stride_vd), (0, 0),
                                    (BLOCK_N, BLOCK_D), (1, 0))

    offs_m = start_m + tl.arange(0, BLOCK_M)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    q = tl.load(q_block_ptr, boundary_check=(0, 1), padding_option="zero")

    lo, hi, diag_lo = _key_loop_bounds(b, start_m, q_len, k_len, past_len, kv_start_ptr, kv_end_ptr,
                                       BLOCK_M, BLOCK_N, CAUSAL, HAS_PADDING)
    # keys [lo, diag_lo): fully below the causal diagonal for every row of this block
    acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, k_block_ptr, v_block_ptr, lo, diag_lo, b, offs_m, k_len,
                               past_len, qk_scale, mask_ptr, stride_mask_b, stride_mask_n,
                               BLOCK_N, False, HAS_PADDING, DOT_PRECISION)
    if CAUSAL:
        # keys [diag_lo, hi): straddle the diagonal, masked per element
        acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, k_block_ptr, v_block_ptr, diag_lo, hi, b, offs_m, k_len,
                                   past_len, qk_scale, mask_ptr, stride_mask_b, stride_mask_n,
                                   BLOCK_N, True, HAS_PADDING, DOT_PRECISION)

    has_keys = l_i > 0.0
    acc = acc / tl.where(has_keys, l_i, 1.0)[:, None]          # rows with no visible key stay exactly zero
    lse = tl.where(has_keys, m_i + tl.math.log2(tl.where(has_keys, l_i, 1.0)), float("inf"))
    lse_row = lse_ptr + pid_bh.to(tl.int64) * q_len            # lse is [B, Hq, Lq] contiguous, log2 units
    tl.store(lse_row + offs_m, lse, mask=offs_m < q_len)
    out_base = out_ptr + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
    out_block_ptr = tl.make_block_ptr(out_base, (q_len, HEAD_DIM), (stride_om, stride_od), (start_m, 0),
                                      (BLOCK_M, BLOCK_D), (1, 0))
    tl.store(out_block_ptr, acc.to(out_ptr.dtype.element_ty), boundary_check=(0, 1))


# ----------------------------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _bwd_preprocess_kernel(out_ptr, dout_ptr, delta_ptr,
                           stride_ob, stride_oh, stride_om, stride_od,
                           stride_dob, stride_doh, stride_dom, stride_dod,
                           num_heads, q_len,
                           HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta[b, h, i] = sum_d out[b, h, i, d] * dout[b, h, i, d] (fp32), the softmax-backward row term."""
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    pid_bh = b * num_heads + h
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    tile_mask = (offs_m[:, None] < q_len) & (offs_d[None, :] < HEAD_DIM)
    o = tl.load(out_ptr + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
                + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od, mask=tile_mask, other=0.0)
    do = tl.load(dout_ptr + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh
                 + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod, mask=tile_mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(delta_ptr + pid_bh.to(tl.int64) * q_len + offs_m, delta, mask=offs_m < q_len)


@triton.jit
def _bwd_dkdv_inner(dk, dv, k, v, key_visible, offs_n, q_ptrs_base, do_ptrs_base, lse_row, delta_row,
                    stride_qm, stride_dom, offs_d, lo, hi, q_len, past_len, qk_scale,
                    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, APPLY_CAUSAL: tl.constexpr,
                    DOT_PRECISION: tl.constexpr):
    """Accumulate dK, dV of one key block over the query rows [lo, hi), working with transposed scores
    S^T [BLOCK_N, BLOCK_M] so no transpose of the accumulators is needed."""
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_ok = offs_m < q_len
        tile_mask = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
        q = tl.load(q_ptrs_base + offs_m[:, None] * stride_qm, mask=tile_mask, other=0.0)        # [M, D]
        do = tl.load(do_ptrs_base + offs_m[:, None] * stride_dom, mask=tile_mask, other=0.0)     # [M, D]
        # rows past Lq read lse = +inf, so their probabilities are exactly zero
        lse = tl.load(lse_row + offs_m, mask=row_ok, other=float("inf"))
        delta = tl.load(delta_row + offs_m, mask=row_ok, other=0.0)
        scores_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale            # [N, M]
        visible = key_visible[:, None]
        if APPLY_CAUSAL:
            visible = visible & (offs_n[:, None] <= past_len + offs_m[None, :])
        p_t = tl.where(visible, tl.math.exp2(scores_t - lse[None, :]), 0.0)
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)                           # [N, M]
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit(do_not_specialize=LENGTH_ARGS)
def _attn_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, dout_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
    mask_ptr, kv_start_ptr, kv_end_ptr, kv_batch_index_ptr,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_mask_b, stride_mask_n,
    num_heads, q_len, k_len, past_len, qk_scale, sm_scale,
    GROUP_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_PADDING: tl.constexpr, HAS_KV_INDEX: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One program: key block pid_n of (batch b, KV head kv_h). dK/dV are written per *query* batch row
    ([B, Hkv, Lk, D]); with kv_batch_index the wrapper sums rows that share a K/V row."""
    pid_n = tl.program_id(0)
    kv_h = tl.program_id(1)                      # grid (key blocks, Hkv, B)
    b = tl.program_id(2)
    kv_b = b
    if HAS_KV_INDEX:
        kv_b = tl.load(kv_batch_index_ptr + b)
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    kv_tile_mask = (offs_n[:, None] < k_len) & (offs_d[None, :] < HEAD_DIM)

    k = tl.load(k_ptr + kv_b.to(tl.int64) * stride_kb + kv_h.to(tl.int64) * stride_kh
                + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask=kv_tile_mask, other=0.0)
    v = tl.load(v_ptr + kv_b.to(tl.int64) * stride_vb + kv_h.to(tl.int64) * stride_vh
                + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=kv_tile_mask, other=0.0)
    key_visible = _key_visibility(offs_n, b, k_len, mask_ptr, stride_mask_b, stride_mask_n, HAS_PADDING)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    # query rows that can see this key block: all rows, or with causal the rows i with past_len + i >= start_n;
    # rows below diag_hi straddle the diagonal (some keys of the block are still in their future)
    m_lo = 0
    diag_hi = 0
    if CAUSAL:
        m_lo = (tl.maximum(start_n - past_len, 0) // BLOCK_M) * BLOCK_M
        diag_hi = tl.minimum(tl.maximum(start_n + BLOCK_N - past_len, m_lo), q_len)
    m_hi = q_len
    if HAS_PADDING:
        # a key block that holds no real token of this row gets zero gradients: empty its query loops
        kv_start = tl.load(kv_start_ptr + b)
        kv_end = tl.load(kv_end_ptr + b)
        no_real_key = (start_n >= kv_end) | (start_n + BLOCK_N <= kv_start)
        m_hi = tl.where(no_real_key, 0, m_hi)
        diag_hi = tl.where(no_real_key, 0, diag_hi)
    for g in range(GROUP_SIZE):
        h = kv_h * GROUP_SIZE + g
        bh = b * num_heads + h
        q_ptrs_base = q_ptr + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh + offs_d[None, :] * stride_qd
        do_ptrs_base = (dout_ptr + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh
                        + offs_d[None, :] * stride_dod)
        lse_row = lse_ptr + bh.to(tl.int64) * q_len
        delta_row = delta_ptr + bh.to(tl.int64) * q_len
        if CAUSAL:
            dk, dv = _bwd_dkdv_inner(dk, dv, k, v, key_visible, offs_n, q_ptrs_base, do_ptrs_base, lse_row,
                                     delta_row, stride_qm, stride_dom, offs_d, m_lo, diag_hi, q_len, past_len,
                                     qk_scale, HEAD_DIM, BLOCK_M, True, DOT_PRECISION)
            unmasked_lo = ((diag_hi + BLOCK_M - 1) // BLOCK_M) * BLOCK_M
            unmasked_lo = tl.maximum(unmasked_lo, m_lo)
        else:
            unmasked_lo = 0
        # the masked loop ends at a block boundary: it covered [m_lo, ceil(diag_hi)), continue from there
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, key_visible, offs_n, q_ptrs_base, do_ptrs_base, lse_row,
                                 delta_row, stride_qm, stride_dom, offs_d, unmasked_lo, m_hi, q_len, past_len,
                                 qk_scale, HEAD_DIM, BLOCK_M, False, DOT_PRECISION)

    dk = dk * sm_scale
    out_offsets = offs_n[:, None] * stride_dkn + offs_d[None, :] * stride_dkd
    dkv_base = b.to(tl.int64) * stride_dkb + kv_h.to(tl.int64) * stride_dkh
    tl.store(dk_ptr + dkv_base + out_offsets, dk.to(dk_ptr.dtype.element_ty), mask=kv_tile_mask)
    tl.store(dv_ptr + dkv_base + out_offsets, dv.to(dv_ptr.dtype.element_ty), mask=kv_tile_mask)


@triton.jit
def _bwd_dq_inner(dq, q, do, lse, delta, k_t_block_ptr, v_t_block_ptr, lo, hi, b, offs_m, k_len, past_len,
                  qk_scale, mask_ptr, stride_mask_b, stride_mask_n,
                  BLOCK_N: tl.constexpr, APPLY_CAUSAL: tl.constexpr, HAS_PADDING: tl.constexpr,
                  DOT_PRECISION: tl.constexpr):
    k_t_block_ptr = tl.advance(k_t_block_ptr, (0, lo))
    v_t_block_ptr = tl.advance(v_t_block_ptr, (0, lo))
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k_t = tl.load(k_t_block_ptr, boundary_check=(0, 1), padding_option="zero")   # [D, N]
        v_t = tl.load(v_t_block_ptr, boundary_check=(0, 1), padding_option="zero")   # [D, N]
        scores = tl.dot(q, k_t, input_precision=DOT_PRECISION) * qk_scale           # [M, N]
        visible = _key_visibility(offs_n, b, k_len, mask_ptr, stride_mask_b, stride_mask_n, HAS_PADDING)
        visible = visible[None, :]
        if APPLY_CAUSAL:
            visible = visible & (offs_n[None, :] <= past_len + offs_m[:, None])
        p = tl.where(visible, tl.math.exp2(scores - lse[:, None]), 0.0)
        dp = tl.dot(do, v_t, input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k_t.dtype), tl.trans(k_t), input_precision=DOT_PRECISION)
        k_t_block_ptr = tl.advance(k_t_block_ptr, (0, BLOCK_N))
        v_t_block_ptr = tl.advance(v_t_block_ptr, (0, BLOCK_N))
    return dq


@triton.jit(do_not_specialize=LENGTH_ARGS)
def _attn_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, dout_ptr, lse_ptr, delta_ptr, dq_ptr,
    mask_ptr, kv_start_ptr, kv_end_ptr, kv_batch_index_ptr,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    stride_mask_b, stride_mask_n,
    num_heads, q_len, k_len, past_len, qk_scale, sm_scale,
    GROUP_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_PADDING: tl.constexpr, HAS_KV_INDEX: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_m, pid_bh, b, h, kv_b, kv_h = _query_program_coords(num_heads, kv_batch_index_ptr, GROUP_SIZE,
                                                            HAS_KV_INDEX)
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)

    q_block_ptr = tl.make_block_ptr(q_ptr + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh,
                                    (q_len, HEAD_DIM), (stride_qm, stride_qd), (start_m, 0),
                                    (BLOCK_M, BLOCK_D), (1, 0))
    do_block_ptr = tl.make_block_ptr(dout_ptr + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh,
                                     (q_len, HEAD_DIM), (stride_dom, stride_dod), (start_m, 0),
                                     (BLOCK_M, BLOCK_D), (1, 0))
    k_t_block_ptr = tl.make_block_ptr(k_ptr + kv_b.to(tl.int64) * stride_kb + kv_h.to(tl.int64) * stride_kh,
                                      (HEAD_DIM, k_len), (stride_kd, stride_kn), (0, 0),
                                      (BLOCK_D, BLOCK_N), (0, 1))
    v_t_block_ptr = tl.make_block_ptr(v_ptr + kv_b.to(tl.int64) * stride_vb + kv_h.to(tl.int64) * stride_vh,
                                      (HEAD_DIM, k_len), (stride_vd, stride_vn), (0, 0),
                                      (BLOCK_D, BLOCK_N), (0, 1))
    q = tl.load(q_block_ptr, boundary_check=(0, 1), padding_option="zero")
    do = tl.load(do_block_ptr, boundary_check=(0, 1), padding_option="zero")
    row_ok = offs_m < q_len
    lse = tl.load(lse_ptr + pid_bh.to(tl.int64) * q_len + offs_m, mask=row_ok, other=float("inf"))
    delta = tl.load(delta_ptr + pid_bh.to(tl.int64) * q_len + offs_m, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    lo, hi, diag_lo = _key_loop_bounds(b, start_m, q_len, k_len, past_len, kv_start_ptr, kv_end_ptr,
                                       BLOCK_M, BLOCK_N, CAUSAL, HAS_PADDING)
    dq = _bwd_dq_inner(dq, q, do, lse, delta, k_t_block_ptr, v_t_block_ptr, lo, diag_lo, b, offs_m, k_len,
                       past_len, qk_scale, mask_ptr, stride_mask_b, stride_mask_n,
                       BLOCK_N, False, HAS_PADDING, DOT_PRECISION)
    if CAUSAL:
        dq = _bwd_dq_inner(dq, q, do, lse, delta, k_t_block_ptr, v_t_block_ptr, diag_lo, hi, b, offs_m, k_len,
                           past_len, qk_scale, mask_ptr, stride_mask_b, stride_mask_n,
                           BLOCK_N, True, HAS_PADDING, DOT_PRECISION)
    dq = dq * sm_scale
    dq_block_ptr = tl.make_block_ptr(dq_ptr + b.to(tl.int64) * stride_dqb + h.to(tl.int64) * stride_dqh,
                                     (q_len, HEAD_DIM), (stride_dqm, stride_dqd), (start_m, 0),
                                     (BLOCK_M, BLOCK_D), (1, 0))
    tl.store(dq_block_ptr, dq.to(dq_ptr.dtype.element_ty), boundary_check=(0, 1))


# ----------------------------------------------------------------------------------------------------------------
# Launchers and autograd
# ----------------------------------------------------------------------------------------------------------------
class _MaskArgs:
    """Kernel arguments derived from key_padding_mask and kv_batch_index (dummies when absent)."""

    def __init__(self, q, key_padding_mask, kv_batch_index):
        self.has_padding = key_padding_mask is not None
        self.has_kv_index = kv_batch_index is not None
        if self.has_padding:
            # first real key and one past the last of each row bound the key loops (no host sync)
            self.kv_start, self.kv_end = key_padding_range(key_padding_mask)
            # bool loads as a byte through a zero-copy view; integer masks are compared with 0 in the kernel
            self.mask = (key_padding_mask.view(torch.uint8) if key_padding_mask.dtype == torch.bool
                         else key_padding_mask)
            self.stride_b, self.stride_n = self.mask.stride()
        else:
            self.mask = self.kv_start = self.kv_end = q  # never read: HAS_PADDING is False
            self.stride_b = self.stride_n = 0
        # the kernels read kv_batch_index[b] with unit stride
        self.kv_batch_index = kv_batch_index.contiguous() if self.has_kv_index else q


def _dot_precision(dtype):
    # fp32 inputs get full-precision dots: tf32 would exceed the eager fp32 error budget
    return "ieee" if dtype == torch.float32 else "tf32"


def _attention_forward(q, k, v, causal, past_len, sm_scale, masks, out=None):
    """Launch the forward kernel. Returns (out [B, Hq, Lq, D], lse [B, Hq, Lq] fp32 in log2 units)."""
    batch, num_heads, q_len, head_dim = q.shape
    num_kv_heads, k_len = k.shape[1], k.shape[2]
    if out is None:
        out = torch.empty(batch, num_heads, q_len, head_dim, device=q.device, dtype=q.dtype)
    lse = torch.empty(batch, num_heads, q_len, device=q.device, dtype=torch.float32)
    block_m, block_n, num_warps, num_stages = _block_config("fwd", head_dim, q.dtype, q.device)
    grid = (triton.cdiv(q_len, block_m), num_heads, batch)
    _attn_fwd_kernel[grid](
        q, k, v, out, lse, masks.mask, masks.kv_start, masks.kv_end, masks.kv_batch_index,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), masks.stride_b, masks.stride_n,
        num_heads, q_len, k_len, past_len, sm_scale * LOG2E,
        GROUP_SIZE=num_heads // num_kv_heads, HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim),
        BLOCK_M=block_m, BLOCK_N=block_n, CAUSAL=causal, HAS_PADDING=masks.has_padding,
        HAS_KV_INDEX=masks.has_kv_index, DOT_PRECISION=_dot_precision(q.dtype),
        num_warps=num_warps, num_stages=num_stages,
    )
    return out, lse


def _attention_backward(dout, q, k, v, out, lse, causal, past_len, sm_scale, masks):
    """Launch the backward kernels. Returns (dq, dk, dv) with the shapes of q, k, v."""
    batch, num_heads, q_len, head_dim = q.shape
    kv_batch, num_kv_heads, k_len = k.shape[0], k.shape[1], k.shape[2]
    block_d = triton.next_power_of_2(head_dim)
    common = dict(GROUP_SIZE=num_heads // num_kv_heads, HEAD_DIM=head_dim, BLOCK_D=block_d, CAUSAL=causal,
                  HAS_PADDING=masks.has_padding, HAS_KV_INDEX=masks.has_kv_index,
                  DOT_PRECISION=_dot_precision(q.dtype))

    delta = torch.empty_like(lse)
    preprocess_rows = 16 if q.device.type != "cuda" else 64
    _bwd_preprocess_kernel[(triton.cdiv(q_len, preprocess_rows), num_heads, batch)](
        out, dout, delta, *out.stride(), *dout.stride(), num_heads, q_len,
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=preprocess_rows)

    # dK/dV per query batch row; with kv_batch_index several rows may share one K/V row and are summed below
    grad_dtype = torch.float32 if masks.has_kv_index else k.dtype
    dk = torch.empty(batch, num_kv_heads, k_len, head_dim, device=k.device, dtype=grad_dtype)
    dv = torch.empty_like(dk)
    block_m, block_n, num_warps, num_stages = _block_config("dkdv", head_dim, q.dtype, q.device)
    _attn_bwd_dkdv_kernel[(triton.cdiv(k_len, block_n), num_kv_heads, batch)](
        q, k, v, dout, lse, delta, dk, dv, masks.mask, masks.kv_start, masks.kv_end, masks.kv_batch_index,
        *q.stride(), *k.stride(), *v.stride(), *dout.stride(), *dk.stride(), masks.stride_b, masks.stride_n,
        num_heads, q_len, k_len, past_len, sm_scale * LOG2E, sm_scale, **common,
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps, num_stages=num_stages)

    dq = torch.empty(batch, num_heads, q_len, head_dim, device=q.device, dtype=q.dtype)
    block_m, block_n, num_warps, num_stages = _block_config("dq", head_dim, q.dtype, q.device)
    _attn_bwd_dq_kernel[(triton.cdiv(q_len, block_m), num_heads, batch)](
        q, k, v, dout, lse, delta, dq, masks.mask, masks.kv_start, masks.kv_end, masks.kv_batch_index,
        *q.stride(), *k.stride(), *v.stride(), *dout.stride(), *dq.stride(), masks.stride_b, masks.stride_n,
        num_heads, q_len, k_len, past_len, sm_scale * LOG2E, sm_scale, **common,
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps, num_stages=num_stages)

    if masks.has_kv_index:
        index = masks.kv_batch_index.long()
        dk = torch.zeros(kv_batch, num_kv_heads, k_len, head_dim, device=k.device,
                         dtype=torch.float32).index_add_(0, index, dk).to(k.dtype)
        dv = torch.zeros(kv_batch, num_kv_heads, k_len, head_dim, device=v.device,
                         dtype=torch.float32).index_add_(0, index, dv).to(v.dtype)
    return dq, dk, dv


class _FusedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, past_len, sm_scale, key_padding_mask, kv_batch_index):
        masks = _MaskArgs(q, key_padding_mask, kv_batch_index)
        out, lse = _attention_forward(q, k, v, causal, past_len, sm_scale, masks)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.masks, ctx.causal, ctx.past_len, ctx.sm_scale = masks, causal, past_len, sm_scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = _attention_backward(dout, q, k, v, out, lse, ctx.causal, ctx.past_len, ctx.sm_scale,
                                         ctx.masks)
        return dq, dk, dv, None, None, None, None, None


def attention(q, k, v, *, causal=True, key_padding_mask=None, past_len=None, sm_scale=None, kv_batch_index=None):
    """Fused masked attention.

    Args:
        q: ``[B, Hq, Lq, D]``; any strides (e.g. a transposed view of a ``[B, Lq, Hq, D]`` projection).
        k, v: ``[B, Hkv, Lk, D]``, or ``[Bkv, Hkv, Lk, D]`` with ``kv_batch_index``; any strides (e.g. a slice
            ``cache[:, :, :Lk]`` of a preallocated KV cache). ``Hq % Hkv == 0`` (MHA, GQA, MQA; no K/V copies).
        causal: query i (absolute position ``past_len + i``) sees key j iff ``j <= past_len + i``.
        key_padding_mask: ``[B, Lk]`` bool or int, HF's 2-D attention_mask (1 = real token, 0 = padding),
            indexed by q's batch row.
        past_len: int, default ``Lk - Lq`` (bottom-right alignment, the KV-cache case).
        sm_scale: softmax scale, default ``1 / sqrt(D)``.
        kv_batch_index: int32/int64 ``[B]``; query batch row r reads K/V batch row ``kv_batch_index[r]``
            (beam search over encoder K/V stored once per source).

    Returns ``[B, Hq, Lq, D]`` in q's dtype. A query row with no visible key is zero. fp16, bf16 and fp32;
    D a multiple of 8 in [16, 256]. Differentiable in q, k and v. With Lq <= 16 and no gradient needed, the
    split-KV decode kernel runs instead.
    """
    batch, num_heads, q_len, head_dim, num_kv_heads, k_len = check_attention_inputs(
        q, k, v, key_padding_mask, kv_batch_index, past_len)
    check_kernel_device("q", q)
    if past_len is None:
        past_len = k_len - q_len
    if sm_scale is None:
        sm_scale = 1.0 / math.sqrt(head_dim)
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    # Triton launches on the current CUDA device: make it q's
    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
        if q_len <= DECODE_MAX_QUERY_LEN and not needs_grad:
            return decode_attention(q, k, v, causal=causal, key_padding_mask=key_padding_mask, past_len=past_len,
                                    sm_scale=sm_scale, kv_batch_index=kv_batch_index)
        return _FusedAttention.apply(q, k, v, causal, past_len, float(sm_scale), key_padding_mask, kv_batch_index)

"""Split-KV decode attention: a few query rows against a long cached K/V.

Used for one decode step (Lq = 1), a few speculative tokens (Lq <= 16) and cached cross-attention. With so few
query rows the usual "one program per block of queries" launch would leave most of the GPU idle at B = 1, so the
key axis is split instead (flash-decoding):

1. ``_decode_split_kernel``: one program per (row block, key split, batch x kv head). It loads each K/V block
   of its split once and multiplies it with *all* query rows that share the kv head (``GROUP_SIZE = Hq // Hkv``
   heads x Lq rows, GQA/MQA without ``repeat_interleave``), keeping an online softmax in the exp2 domain
   (``kernels/online_softmax.py``, shared with the attention kernels). It writes its unnormalised fp32 output,
   running max and running sum.
2. ``_decode_combine_kernel``: one program per few query rows (4 at D = 128) merges the splits in one pass:
   ``out = sum_s 2^(m_s - M) acc_s / sum_s 2^(m_s - M) l_s`` with ``M = max_s m_s``.

When there is a single split the first kernel normalises and writes the output itself (no combine launch).

Masking: causal with a past offset (query i sits at absolute position ``past_len + i``), an optional sliding
window (query i also sees key j only if ``j >= past_len + i - window``; blocks below it are skipped) and HF's 2-D key
padding mask (1 = token, 0 = padding; left/right padding or holes). A query row that sees no key outputs zeros,
and a split that sees no key contributes nothing (its max is -inf and its weight 2^(-inf) = 0). Key blocks
outside a row block's visible range ``[first valid key, min(last valid key + 1, causal limit))`` are skipped by
the loop bounds, so whole splits of left padding, right padding or the causal future cost nothing.

The arguments are assumed validated by ``fusedformers.kernels.checks.check_attention_inputs`` (the caller does it).
"""
import collections
import math
import weakref

import torch
import triton
import triton.language as tl

from fusedformers.kernels.checks import check_kv_batch_index_range
from fusedformers.kernels.launch import cdiv, strides
from fusedformers.kernels.online_softmax import LOG2E, online_softmax_step
from fusedformers.kernels.tiles import decode_plan, dot_precision


# ----------------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def kv_batch_row(kv_batch_index_ptr, b, kv_batch):
    """The K/V batch row that query batch row ``b`` reads, ``kv_batch_index[b]`` (int64), checked against
    ``[0, kv_batch)`` on every launch: an entry outside prints itself and traps, which ends the kernel and the CUDA
    context like a failed device assert (no host sync, no extra launch), and the read is clamped to row 0 so no
    program reads outside K/V. Through the interpreter the launchers check on the host first (a ValueError)."""
    kv_b = tl.load(kv_batch_index_ptr + b).to(tl.int64)
    out_of_range = (kv_b < 0) | (kv_b >= kv_batch)
    if out_of_range:
        tl.device_print("fusedformers: kv_batch_index entry outside [0, k's batch): ", kv_b)
        tl.inline_asm_elementwise("trap;", "=r", [], dtype=tl.int32, is_pure=False, pack=1)
    return tl.where(out_of_range, 0, kv_b)


# lengths and split sizes change from one decode step to the next: one compiled split kernel serves them all
@triton.jit(do_not_specialize=["q_len", "k_len", "past_len", "kv_batch", "window", "split_size", "num_splits",
                             "num_row_blocks"])
def _decode_split_kernel(
    # tensors
    q_ptr, k_ptr, v_ptr, out_ptr,                    # q [B, Hq, Lq, D]; k, v [B or Bkv, Hkv, Lk, D]; out like q
    part_acc_ptr, part_max_ptr, part_sum_ptr,        # [B, Hq, Lq, num_splits, D], [B, Hq, Lq, num_splits] fp32
    mask_ptr, kv_start_ptr, kv_end_ptr, kv_batch_index_ptr,  # [B, Lk] padding mask; int32 [B]; int [B]
    # strides
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_mask_b, stride_mask_n,
    # sizes
    num_kv_heads, q_len, k_len, past_len, kv_batch,  # kv_batch: k's batch (kv_batch_index's range)
    window,                                          # sliding window (keys before a query's position; HAS_WINDOW)
    # scalars
    qk_scale,                                        # sm_scale * log2(e)
    # split of the key axis
    split_size, num_splits, num_row_blocks,
    # constexprs
    GROUP_SIZE: tl.constexpr,                        # Hq // Hkv
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    HAS_PADDING: tl.constexpr,
    HAS_KV_INDEX: tl.constexpr,
    WRITE_OUT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Partial attention of one key split for BLOCK_M of the ``GROUP_SIZE * Lq`` query rows of one (batch, kv
    head).

    kv_start / kv_end: first valid key and last valid key + 1 of each batch row (``key_padding_range``).
    WRITE_OUT (single split): out gets the normalised result. Otherwise part_acc gets the unnormalised output
    of this split, and part_max / part_sum its running max (log2 domain) and running sum.
    """
    # flat 1-D grid: row blocks of one (split, batch x kv head) are adjacent, so they share K/V through L2,
    # and no grid axis can exceed its 65535 limit
    pid = tl.program_id(0)
    row_block = pid % num_row_blocks
    split = (pid // num_row_blocks) % num_splits
    pid_bkv = pid // (num_row_blocks * num_splits)  # = b * Hkv + kv_h
    b = pid_bkv // num_kv_heads
    kv_h = pid_bkv % num_kv_heads

    # ---- query rows: row r of this kv head is query head kv_h * GROUP_SIZE + r // Lq, query position r % Lq
    offs_r = row_block * BLOCK_M + tl.arange(0, BLOCK_M)
    num_rows = GROUP_SIZE * q_len
    row_valid = offs_r < num_rows  # rows past GROUP_SIZE * Lq pad the block up to BLOCK_M >= 16 for tl.dot
    q_head = (kv_h * GROUP_SIZE + offs_r // q_len).to(tl.int64)
    q_pos = offs_r % q_len
    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < HEAD_DIM  # BLOCK_D = next power of 2 >= D (D = 80, 96, ...)

    q_ptrs = (q_ptr + b.to(tl.int64) * stride_qb + q_head[:, None] * stride_qh
              + q_pos.to(tl.int64)[:, None] * stride_qm + offs_d[None, :] * stride_qd)
    q = tl.load(q_ptrs, mask=row_valid[:, None] & d_valid[None, :], other=0.0)

    # ---- K/V base of this (kv batch row, kv head); batch/head offsets in int64 (B*H*L*D may exceed 2^31)
    if HAS_KV_INDEX:
        kv_b = kv_batch_row(kv_batch_index_ptr, b, kv_batch)  # beam search: several query rows share one K/V row
    else:
        kv_b = b.to(tl.int64)
    k_base = k_ptr + kv_b * stride_kb + kv_h.to(tl.int64) * stride_kh
    v_base = v_ptr + kv_b * stride_vb + kv_h.to(tl.int64) * stride_vh

    # ---- key range of this program: its split, cut to the valid keys of batch row b and the causal limit
    lo = split * split_size  # split_size is a multiple of BLOCK_N
    hi = tl.minimum(lo + split_size, k_len)
    if HAS_PADDING:
        kv_start = tl.load(kv_start_ptr + b)  # = Lk for a fully padded row (and kv_end = 0): empty range
        kv_end = tl.load(kv_end_ptr + b)
        lo = tl.maximum(lo, (kv_start // BLOCK_N) * BLOCK_N)  # stay block aligned
        hi = tl.minimum(hi, kv_end)
    if CAUSAL:
        # the last query position in this row block sees keys j <= past_len + q_pos
        max_pos = tl.max(tl.where(row_valid, q_pos, 0), axis=0)
        hi = tl.minimum(hi, past_len + max_pos + 1)
        if HAS_WINDOW:
            # the first query position in this row block sees keys j >= past_len + q_pos - window: key blocks
            # below are skipped (lo stays block aligned)
            min_pos = tl.min(tl.where(row_valid, q_pos, q_len), axis=0)
            lo = tl.maximum(lo, (tl.maximum(past_len + min_pos - window, 0) // BLOCK_N) * BLOCK_N)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running max of the scaled scores (log2 units)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running sum of 2^(score - m_i)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)  # running sum of 2^(score - m_i) * v

    offs_bn = tl.arange(0, BLOCK_N)
    # pointers to the first key block; the key offset lo * stride is taken in int64, the in-block offsets
    # (< BLOCK_N rows) stay small, and each iteration advances the pointers by one block
    k_ptrs = (k_base + lo.to(tl.int64) * stride_kn
              + offs_bn[:, None] * stride_kn + offs_d[None, :] * stride_kd)
    v_ptrs = (v_base + lo.to(tl.int64) * stride_vn
              + offs_bn[:, None] * stride_vn + offs_d[None, :] * stride_vd)
    # an empty range (lo >= hi) runs no iteration: the split then reports max -inf, sum 0, output 0
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_bn
        key_in = offs_n < hi  # the split end, the valid-key end, the causal limit, Lk
        kv_mask = key_in[:, None] & d_valid[None, :]
        k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
        v = tl.load(v_ptrs, mask=kv_mask, other=0.0)

        # scores in log2 units: q.k * sm_scale * log2(e), fp32 accumulation
        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale

        visible = key_in[None, :] & row_valid[:, None]
        if HAS_PADDING:
            # holes inside [kv_start, kv_end), and the keys of the first block that precede kv_start
            pad = tl.load(mask_ptr + b.to(tl.int64) * stride_mask_b + offs_n.to(tl.int64) * stride_mask_n,
                          mask=key_in, other=0)
            visible = visible & (pad != 0)[None, :]
        if CAUSAL:
            visible = visible & (offs_n[None, :] <= past_len + q_pos[:, None])
            if HAS_WINDOW:
                visible = visible & (offs_n[None, :] >= past_len + q_pos[:, None] - window)
        scores = tl.where(visible, scores, float("-inf"))

        p, alpha, m_i, l_i = online_softmax_step(m_i, l_i, scores)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        k_ptrs += BLOCK_N * stride_kn
        v_ptrs += BLOCK_N * stride_vn

    if WRITE_OUT:
        # single split: normalise here; a row that saw no key has l = 0 and acc = 0, so it outputs 0
        out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
        out_ptrs = (out_ptr + b.to(tl.int64) * stride_ob + q_head[:, None] * stride_oh
                    + q_pos.to(tl.int64)[:, None] * stride_om + offs_d[None, :] * stride_od)
        tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=row_valid[:, None] & d_valid[None, :])
    else:
        # partial row index: ((b * Hq + q_head) * Lq + q_pos) = pid_bkv * GROUP_SIZE * Lq + r, since q_head =
        # kv_h * GROUP_SIZE + r // Lq; the split is the second-fastest axis, D the fastest
        part_row = pid_bkv.to(tl.int64) * num_rows + offs_r
        part_idx = part_row * num_splits + split
        tl.store(part_max_ptr + part_idx, m_i, mask=row_valid)
        tl.store(part_sum_ptr + part_idx, l_i, mask=row_valid)
        tl.store(part_acc_ptr + part_idx[:, None] * HEAD_DIM + offs_d[None, :], acc,
                 mask=row_valid[:, None] & d_valid[None, :])


# lengths and split counts change from one decode step to the next: one compiled combine kernel serves them all
@triton.jit(do_not_specialize=["num_heads", "q_len", "num_rows", "num_splits"])
def _decode_combine_kernel(
    # tensors
    out_ptr,                                         # [B, Hq, Lq, D], any strides
    part_acc_ptr, part_max_ptr, part_sum_ptr,        # [B, Hq, Lq, num_splits, D], [B, Hq, Lq, num_splits] fp32
    # strides
    stride_ob, stride_oh, stride_om, stride_od,
    # sizes
    num_heads, q_len, num_rows, num_splits,
    # constexprs
    HEAD_DIM: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Merge the splits of BLOCK_R query rows: ``out = sum_s w_s acc_s / sum_s w_s l_s``, ``w_s = 2^(m_s - M)``.

    Row ``(b * Hq + h) * Lq + i`` of ``num_rows = B * Hq * Lq``. One pass: the splits are read BLOCK_S at a
    time as a ``[BLOCK_R, BLOCK_S, BLOCK_D]`` tile (every split in one step up to BLOCK_S splits: the max, the
    sum and the partial output loads are all in flight at once) and merged into a running max, sum and
    accumulator, as the online softmax merges key blocks.
    """
    offs_r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_valid = offs_r < num_rows
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < HEAD_DIM
    stat_base = offs_r * num_splits  # [BLOCK_R]: first split of each row in part_max / part_sum

    m_run = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)  # largest split max so far
    total = tl.zeros([BLOCK_R], dtype=tl.float32)  # sum of 2^(m_s - m_run) l_s so far
    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)  # sum of 2^(m_s - m_run) acc_s so far
    for s0 in range(0, num_splits, BLOCK_S):
        stat_mask = row_valid[:, None] & (s0 + offs_s < num_splits)[None, :]
        stat_idx = stat_base[:, None] + s0 + offs_s[None, :]  # [BLOCK_R, BLOCK_S]
        m = tl.load(part_max_ptr + stat_idx, mask=stat_mask, other=float("-inf"))
        part_sum = tl.load(part_sum_ptr + stat_idx, mask=stat_mask, other=0.0)
        part = tl.load(part_acc_ptr + stat_idx[:, :, None] * HEAD_DIM + offs_d[None, None, :],
                       mask=stat_mask[:, :, None] & d_valid[None, None, :], other=0.0)
        m_new = tl.maximum(m_run, tl.max(m, axis=1))
        # no split saw a key yet: subtract 0 so that every weight is 2^-inf = 0 (not NaN); a split that saw no
        # key has m = -inf, so weight 0 (its acc and l are 0 too)
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_run - m_ref)
        w = tl.math.exp2(m - m_ref[:, None])
        total = total * alpha + tl.sum(w * part_sum, axis=1)
        acc = acc * alpha[:, None] + tl.sum(w[:, :, None] * part, axis=1)
        m_run = m_new
    out = acc / tl.where(total > 0.0, total, 1.0)[:, None]  # a row that saw no key: acc = 0, outputs 0

    # row -> (b, h, i) of the output
    q_pos = offs_r % q_len
    head = (offs_r // q_len) % num_heads
    b = offs_r // (q_len * num_heads)
    out_ptrs = (out_ptr + (b * stride_ob + head * stride_oh + q_pos * stride_om)[:, None]
                + offs_d[None, :] * stride_od)
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=row_valid[:, None] & d_valid[None, :])


# ----------------------------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------------------------

def key_padding_range(key_padding_mask):
    """Per batch row, the first valid key and the last valid key + 1, as int32 ``[B]`` tensors.

    A fully padded row gets ``(Lk, 0)``, an empty range. Pure torch ops on the mask's device (no host sync).
    A model passes the same mask tensors to every layer of a forward pass (a decoder layer two: its
    self-attention's and the source's), so the last few results are kept and reused while the very same tensor
    object, unmodified (same version counter), comes back. A mask changed behind autograd's back (``.data``
    writes, NumPy or DLPack aliases) keeps its version: pass a new tensor then.
    """
    # inference-mode tensors have no version counter: those are not cached
    cacheable = not key_padding_mask.is_inference()
    if cacheable:
        for entry in _recent_key_ranges:
            if entry[0]() is key_padding_mask and entry[1] == key_padding_mask._version:
                return entry[2]
    valid = key_padding_mask != 0
    k_len = valid.shape[1]
    positions = torch.arange(k_len, device=valid.device, dtype=torch.int32)
    kv_start = torch.where(valid, positions, k_len).amin(dim=1)
    kv_end = torch.where(valid, positions + 1, 0).amax(dim=1)
    result = (kv_start.to(torch.int32).contiguous(), kv_end.to(torch.int32).contiguous())
    if cacheable:
        _recent_key_ranges.appendleft((weakref.ref(key_padding_mask), key_padding_mask._version, result))
    return result


# (weak reference to a mask, its version counter, its key range), most recent first: see key_padding_range
_recent_key_ranges = collections.deque(maxlen=4)


def decode_attention(q, k, v, *, causal=True, key_padding_mask=None, past_len=None, sm_scale=None,
                     kv_batch_index=None, out=None, num_splits=None, key_range=None, window=None):
    """Masked attention for few query rows (Lq <= 16) against a long K/V, split over the key axis.

    q ``[B, Hq, Lq, D]``; k, v ``[B, Hkv, Lk, D]`` or ``[Bkv, Hkv, Lk, D]`` with ``kv_batch_index`` (int ``[B]``:
    query row r reads K/V row ``kv_batch_index[r]``); any strides. ``key_padding_mask``: HF ``[B, Lk]``
    attention mask (bool or int, 1 = token), indexed by the query batch row. Causal: query i sees key j iff
    ``j <= past_len + i`` (``past_len`` defaults to ``Lk - Lq``), and with a sliding ``window`` (int >= 0, causal
    only) also ``j >= past_len + i - window``. ``sm_scale`` defaults to ``1/sqrt(D)``.
    Returns ``[B, Hq, Lq, D]`` in q's dtype, contiguous, or writes into ``out`` (same shape and dtype, any
    strides) and returns it. ``num_splits`` overrides the split heuristic; ``key_range`` takes a precomputed
    ``key_padding_range(key_padding_mask)``. Arguments are assumed validated (``check_attention_inputs``), but
    for kv_batch_index's range, checked here.
    """
    batch, num_heads, q_len, head_dim = q.shape
    num_kv_heads, k_len = k.shape[1], k.shape[2]
    if kv_batch_index is not None and kv_batch_index.device.type == "cpu":  # CUDA: the kernel checks
        check_kv_batch_index_range(kv_batch_index, k.shape[0])
    if past_len is None:
        past_len = k_len - q_len
    if window is not None and not causal:
        raise ValueError("window needs causal=True: a bidirectional sliding window is not supported")
    if sm_scale is None:
        sm_scale = 1.0 / math.sqrt(head_dim)
    if out is None:
        out = torch.empty((batch, num_heads, q_len, head_dim), dtype=q.dtype, device=q.device)
    elif tuple(out.shape) != tuple(q.shape) or out.dtype != q.dtype or out.device != q.device:
        raise ValueError(f"out must be a {q.dtype} tensor of shape {tuple(q.shape)} on {q.device}, "
                         f"got {out.dtype} {tuple(out.shape)} on {out.device}")

    plan = decode_plan(batch, num_heads, num_kv_heads, q_len, k_len, head_dim, causal=causal, past_len=past_len,
                       device=q.device, num_splits=num_splits, dtype=q.dtype)
    splits = plan["num_splits"]

    has_padding = key_padding_mask is not None
    if has_padding:
        kv_start, kv_end = key_range if key_range is not None else key_padding_range(key_padding_mask)
        # bool loads as a byte (zero-copy view); other int types are compared with 0 in the kernel
        mask = key_padding_mask.view(torch.uint8) if key_padding_mask.dtype == torch.bool else key_padding_mask
        stride_mask_b, stride_mask_n = mask.stride()
    else:
        kv_start = kv_end = mask = q  # placeholders, never read (HAS_PADDING=False)
        stride_mask_b = stride_mask_n = 0
    has_kv_index = kv_batch_index is not None
    kv_batch_index = kv_batch_index.contiguous() if has_kv_index else q  # placeholder when unused

    if splits == 1:
        part_acc = part_max = part_sum = out  # placeholders, never written (WRITE_OUT=True)
    else:
        part_acc = torch.empty((batch, num_heads, q_len, splits, head_dim), dtype=torch.float32, device=q.device)
        part_max = torch.empty((batch, num_heads, q_len, splits), dtype=torch.float32, device=q.device)
        part_sum = torch.empty_like(part_max)

    grid = (plan["num_row_blocks"] * splits * batch * num_kv_heads,)
    _decode_split_kernel[grid](
        q, k, v, out, part_acc, part_max, part_sum, mask, kv_start, kv_end, kv_batch_index,
        **strides("q", q, "bhmd"), **strides("k", k, "bhnd"), **strides("v", v, "bhnd"),
        **strides("o", out, "bhmd"), stride_mask_b=stride_mask_b, stride_mask_n=stride_mask_n,
        num_kv_heads=num_kv_heads, q_len=q_len, k_len=k_len, past_len=past_len, kv_batch=k.shape[0],
        window=0 if window is None else min(window, max(past_len + q_len, 0)),
        qk_scale=sm_scale * LOG2E,
        split_size=plan["split_size"], num_splits=splits, num_row_blocks=plan["num_row_blocks"],
        GROUP_SIZE=num_heads // num_kv_heads, HEAD_DIM=head_dim,
        BLOCK_M=plan["block_m"], BLOCK_N=plan["block_n"], BLOCK_D=plan["block_d"],
        CAUSAL=causal, HAS_WINDOW=window is not None, HAS_PADDING=has_padding, HAS_KV_INDEX=has_kv_index,
        WRITE_OUT=splits == 1,
        DOT_PRECISION=dot_precision(q.dtype),
        num_warps=plan["num_warps"], num_stages=plan["num_stages"],
    )
    if splits > 1:
        num_rows = batch * num_heads * q_len
        block_r = plan["combine_rows"]
        _decode_combine_kernel[(cdiv(num_rows, block_r),)](
            out, part_acc, part_max, part_sum,
            **strides("o", out, "bhmd"),
            num_heads=num_heads, q_len=q_len, num_rows=num_rows, num_splits=splits,
            HEAD_DIM=head_dim, BLOCK_R=block_r, BLOCK_S=plan["combine_splits"],  # fixed: no variant per split count
            BLOCK_D=plan["block_d"],
            num_warps=plan["combine_num_warps"],
        )
    return out

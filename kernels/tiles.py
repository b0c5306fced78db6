"""Tile tables and tile policy of every kernel: block sizes, warps, stages and grid splits.

The launchers ask this module how to launch, and so does ``tests/test_sm90_compile.py``, which compiles each
configuration for sm_90 offline (ptxas) and checks registers, spills and shared memory: what the test checks is
what the launchers run. On CPU (Triton's interpreter) the policy picks small tiles, so small test shapes span
several blocks and exercise the skipping, diagonal and split logic; on the GPU the tiles were chosen so that no
kernel spills registers on sm_90 (``bench/NOTES.md``).
"""
import contextlib
import functools

import torch

from fusedformers.kernels import autotune
from fusedformers.kernels.launch import cdiv, next_power_of_2

# ----------------------------------------------------------------------------------------------------------------
# Attention (kernels/attention.py): forward, dK/dV and dQ kernels
# ----------------------------------------------------------------------------------------------------------------
# GPU tiles per kernel (BLOCK_M query rows, BLOCK_N keys, num_warps, num_stages) for head dims up to 64 / 128 /
# 256. Chosen ahead of time so that no kernel spills registers on sm_90 (ptxas; tests/test_sm90_compile.py
# checks it). The 16-bit forward takes 128 keys per block where that fits (fewer instructions per score: the
# accumulator rescale and the loop overhead are per block). The dK/dV kernel keeps two fp32 [BLOCK_N, D]
# accumulators in registers, so it steps through the queries 32 rows at a time; its transposed scores
# [BLOCK_N, BLOCK_M] need BLOCK_N >= 64 rows per warpgroup, or both warpgroups of 8 warps compute the same tile
# (BLOCK_N = 128 at D = 128). fp32 inputs run exact (ieee) dots on the CUDA cores and need small tiles.
# Tuning them by measurement is bench/NOTES.md's job.
_GPU_TILES = {
    "fwd": {64: (128, 128, 8, 3), 128: (128, 128, 8, 2), 256: (128, 32, 8, 2)},
    "dkdv": {64: (32, 128, 8, 3), 128: (32, 128, 8, 2), 256: (32, 32, 8, 2)},
    "dq": {64: (128, 64, 8, 3), 128: (128, 64, 8, 3), 256: (64, 32, 8, 2)},
}
# What autotuning (FUSEDFORMERS_AUTOTUNE=1, kernels/autotune.py) measures for 16-bit inputs: the default above
# and other tiles that compile for sm_90 without spills (an offline ptxas sweep of BLOCK_M x BLOCK_N x warps x
# stages per kernel and head dim class; tests/test_sm90_compile.py compiles every one of them).
_GPU_TILE_CANDIDATES = {
    "fwd": {64: [(128, 128, 8, 3), (128, 64, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3), (128, 64, 8, 4)],
            128: [(128, 128, 8, 2), (128, 64, 8, 3), (128, 64, 8, 2), (128, 64, 8, 4), (128, 32, 8, 3),
                  (64, 64, 4, 3)],
            256: [(128, 32, 8, 2), (64, 32, 8, 2), (64, 32, 8, 3), (64, 64, 8, 2)]},
    "dkdv": {64: [(32, 128, 8, 3), (32, 64, 8, 2), (32, 64, 8, 3), (64, 64, 8, 2), (16, 128, 8, 2)],
             128: [(32, 128, 8, 2), (32, 64, 8, 3), (32, 64, 8, 2), (32, 32, 8, 3), (16, 64, 8, 3), (16, 128, 8, 3)],
             256: [(32, 32, 8, 2), (32, 32, 8, 3), (16, 32, 8, 3), (16, 64, 8, 2)]},
    "dq": {64: [(128, 64, 8, 3), (128, 64, 8, 2), (128, 32, 8, 3), (64, 64, 4, 3), (64, 32, 4, 3)],
           128: [(128, 64, 8, 3), (128, 64, 8, 2), (128, 32, 8, 3), (64, 64, 8, 3), (64, 32, 8, 3)],
           256: [(64, 32, 8, 2), (64, 32, 8, 3), (128, 32, 8, 2)]},
}
_GPU_TILES_FP32 = {
    "fwd": {128: (16, 64, 4, 2), 256: (16, 16, 4, 2)},
    "dkdv": {128: (16, 32, 4, 2), 256: (16, 16, 4, 2)},
    "dq": {128: (32, 16, 8, 2), 256: (16, 16, 4, 2)},  # 128: 4 warps spill with the three key loops
}
# With dropout each score also needs a Philox draw (10 rounds of 32-bit multiplies), which raises register
# pressure: these 16-bit tiles replace the ones above where those spill (fp32 keeps its tiles; at D=256 its
# dK/dV kernel spills ~28 B with dropout).
_GPU_TILES_DROPOUT = {
    "fwd": {64: (128, 64, 8, 3), 128: (128, 64, 8, 3), 256: (64, 32, 8, 2)},
    "dkdv": {128: (32, 32, 8, 3)},
    "dq": {128: (128, 32, 8, 3), 256: (32, 32, 8, 2)},
}

# Without causal masking (BART's encoder and cross-attention) the 16-bit forward at D = 128 keeps 128 x 64: its
# 128 x 128 tile spills one register there (4 B, saved and reloaded around the key loops).
_GPU_TILES_NONCAUSAL = {
    "fwd": {128: (128, 64, 8, 3)},
}

_forced_blocks = None  # (BLOCK_M, BLOCK_N) while forced_block_sizes() is active


@contextlib.contextmanager
def forced_block_sizes(block_m, block_n):
    """Run the attention kernels with these tile sizes (for tests: the GPU's tiles have BLOCK_M != BLOCK_N,
    which the interpreter's default 16 x 16 tiles would never exercise)."""
    global _forced_blocks
    previous, _forced_blocks = _forced_blocks, (block_m, block_n)
    try:
        yield
    finally:
        _forced_blocks = previous


def _head_dim_class(tiles, head_dim):
    return min(d for d in tiles if d >= head_dim)


def tile_candidates(kernel, head_dim):
    """The 16-bit tiles autotuning may pick for ``kernel`` at this head dim (all spill-free on sm_90)."""
    tiles = _GPU_TILE_CANDIDATES[kernel]
    return tiles[_head_dim_class(tiles, head_dim)]


def _block_config(kernel, head_dim, dtype, device, dropout=False, causal=True):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of ``kernel`` in "fwd", "dkdv", "dq". The interpreter gets
    small blocks so small test shapes span several blocks and exercise the skipping and diagonal logic. On the
    GPU the tiles must fit the 227 KB of shared memory per block of sm_90."""
    if _forced_blocks is not None:
        return (*_forced_blocks, 4, 1)
    if device.type != "cuda":
        return 16, 16, 4, 1
    tiles = (_GPU_TILES_FP32 if dtype == torch.float32 else _GPU_TILES)[kernel]
    head_dim_class = _head_dim_class(tiles, head_dim)
    if dropout and dtype != torch.float32:
        return _GPU_TILES_DROPOUT[kernel].get(head_dim_class, tiles[head_dim_class])
    if not causal and dtype != torch.float32:
        return _GPU_TILES_NONCAUSAL.get(kernel, {}).get(head_dim_class, tiles[head_dim_class])
    return tiles[head_dim_class]


def attention_tile(kernel, q, k, causal, masks, dropout, launch):
    """The tile ``(BLOCK_M, BLOCK_N, num_warps, num_stages)`` to launch ``kernel`` with: the offline default, or,
    with FUSEDFORMERS_AUTOTUNE=1 on CUDA for 16-bit inputs without dropout, the fastest of the spill-free
    candidates measured on this call (``kernels/autotune.py``; ``launch(tile)`` runs the kernel)."""
    head_dim = q.shape[-1]
    default = _block_config(kernel, head_dim, q.dtype, q.device, dropout.active, causal)
    if not (autotune.ENABLED and q.is_cuda and _forced_blocks is None and q.dtype != torch.float32
            and not dropout.active):
        return default
    candidates = [default] + [t for t in tile_candidates(kernel, head_dim) if t != default]
    key = (head_dim, q.dtype, causal, masks.has_padding, masks.has_kv_index, q.shape[1] // k.shape[1],
           next_power_of_2(q.shape[2]), next_power_of_2(k.shape[2]))
    return autotune.choose(kernel, key, candidates, launch)


def elementwise_rows(device):
    """Rows (and keys) per program of the small attention kernels (backward preprocess, dropout mask)."""
    return 64 if device.type == "cuda" else 16


def dot_precision(dtype):
    """``tl.dot``'s input precision: fp32 inputs get full-precision dots (tf32 would exceed the eager fp32 error
    budget)."""
    return "ieee" if dtype == torch.float32 else "tf32"


# ----------------------------------------------------------------------------------------------------------------
# Split-KV decode attention (kernels/decode_attention.py)
# ----------------------------------------------------------------------------------------------------------------
# upper bound on the number of key splits (bounds the fp32 partial buffers and the combine's work per row)
MAX_SPLITS = 128
# the combine kernel reduces over splits in chunks of this many (one compiled variant for any split count)
COMBINE_SPLIT_CHUNK = 16


@functools.lru_cache(maxsize=None)
def _sm_count(device_index):
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def decode_plan(batch, num_heads, num_kv_heads, q_len, k_len, head_dim, *, causal=True, past_len=None,
                device="cpu", num_splits=None, dtype=torch.bfloat16):
    """Block sizes and the key split for one launch; returns a dict.

    Splits: the key range a causal query can see (``min(Lk, past_len + Lq)`` keys) is cut into ``num_splits``
    equal runs of whole BLOCK_N blocks. On a GPU the split count targets about 4 programs per SM when
    ``B * Hkv * row blocks`` alone is below 2 per SM (capped by the number of key blocks and MAX_SPLITS);
    on CPU (Triton's interpreter) 2 splits whenever there are 2 key blocks, so the combine path is exercised.
    ``num_splits`` overrides the choice (clamped to [1, min(number of key blocks, MAX_SPLITS)]).
    """
    device = torch.device(device)
    on_gpu = device.type == "cuda"
    group_size = num_heads // num_kv_heads
    num_rows = group_size * q_len  # query rows that share one kv head
    block_d = max(16, next_power_of_2(head_dim))
    # rows padded to >= 16 for tl.dot; more than 64 rows (MQA with many speculative tokens) -> row blocks
    block_m = min(64, max(16, next_power_of_2(num_rows)))
    num_row_blocks = cdiv(num_rows, block_m)
    if on_gpu and dtype == torch.float32:
        # exact (ieee) fp32 dots run on the CUDA cores: 16 x 16 tiles keep them in registers (no ptxas spills)
        block_m, block_n = 16, 16
        num_row_blocks = cdiv(num_rows, block_m)
    elif on_gpu:
        block_n = 64 if block_d <= 128 else 32
    else:
        block_n = 32  # the interpreter's cost is per block: few, mid-sized blocks
    if past_len is None:
        past_len = k_len - q_len
    # keys past past_len + Lq - 1 are invisible to every causal query
    k_visible = max(1, min(k_len, past_len + q_len)) if causal else k_len
    num_key_blocks = cdiv(k_visible, block_n)

    if num_splits is None:
        if on_gpu:
            sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
            base_programs = batch * num_kv_heads * num_row_blocks
            if base_programs >= 2 * sms:
                num_splits = 1
            else:
                num_splits = cdiv(4 * sms, base_programs)
        else:
            num_splits = 2
    num_splits = max(1, min(num_splits, num_key_blocks, MAX_SPLITS))
    # equal splits of whole blocks; drop splits that would start past the visible range
    blocks_per_split = cdiv(num_key_blocks, num_splits)
    num_splits = cdiv(num_key_blocks, blocks_per_split)

    # the combine merges this many query rows per program: one on a GPU (B * Hq * Lq programs), many in the
    # interpreter (its cost is per program)
    combine_rows = 1 if on_gpu else min(64, next_power_of_2(batch * num_heads * q_len))

    num_warps = 8 if block_m * block_d >= 64 * 128 else 4
    num_stages = 3 if block_d <= 128 else 2
    if on_gpu and dtype == torch.float32:
        num_warps, num_stages = 4, 2
    return dict(block_m=block_m, block_n=block_n, block_d=block_d, num_row_blocks=num_row_blocks,
                num_splits=num_splits, split_size=blocks_per_split * block_n, num_warps=num_warps,
                num_stages=num_stages, combine_rows=combine_rows, combine_num_warps=4)


# ----------------------------------------------------------------------------------------------------------------
# RMSNorm (kernels/rms_norm.py)
# ----------------------------------------------------------------------------------------------------------------
def rms_norm_num_warps(block_n):
    """Warps per program for a row block of ``block_n`` elements (about 256 elements per warp, 1 to 16 warps)."""
    return min(max(block_n // 256, 1), 16)


def rms_norm_backward_programs(rows, device):
    """Programs of the backward kernel: a few per SM on a GPU (each keeps a float32 dweight partial sum)."""
    if device.type == "cuda":
        target = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        target = 8  # Triton's interpreter: every program is run in turn, keep the dweight partials few
    return max(1, min(rows, target))


# ----------------------------------------------------------------------------------------------------------------
# RoPE (kernels/rope.py)
# ----------------------------------------------------------------------------------------------------------------
def rope_plan(num_heads, head_dim):
    """(BLOCK_H heads per program, BLOCK_HALF = D / 2 rounded up to a power of two, num_warps)."""
    block_h = min(next_power_of_2(num_heads), 64)
    block_half = next_power_of_2(head_dim // 2)
    num_warps = 4 if block_h * block_half >= 1024 else 1
    return block_h, block_half, num_warps

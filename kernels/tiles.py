"""Tile tables and tile policy of every kernel: block sizes, warps, stages and grid splits.

The launchers ask this module how to launch, and so does ``bench/static.py`` (the offline compile report), which
compiles each configuration offline (ptxas) for sm_90 and for the other GPU generations and records registers,
spills and shared memory (gated in CI): what the report checks is what the launchers run. On CPU (Triton's
interpreter) the policy picks small tiles, so small test shapes span several blocks and exercise the skipping,
diagonal and split logic.

On a GPU the tiles depend on its **shared-memory class**: the most shared memory one block may opt in to
(``torch.cuda.get_device_properties(d).shared_memory_per_block_optin``), looked up once per device
(``device_gpu``). Each class has its own tables, chosen so that no kernel spills registers or asks for more
shared memory than the class allows when compiled for the class's architectures (``SHARED_MEMORY_CLASSES``).
The policy functions take a ``GpuInfo`` (``gpu_info(properties)``), so they can be tested without a GPU.
"""
import contextlib
import functools
from typing import NamedTuple

import torch

from fusedformers.kernels import autotune
from fusedformers.kernels.launch import cdiv, next_power_of_2

# ----------------------------------------------------------------------------------------------------------------
# Attention (kernels/attention.py): forward, dK/dV and dQ kernels
# ----------------------------------------------------------------------------------------------------------------
# GPU tiles per kernel (BLOCK_M query rows, BLOCK_N keys, num_warps, num_stages) for head dims up to 64 / 128 /
# 256. Chosen ahead of time so that no kernel spills registers on sm_90 (ptxas; bench/static.py
# checks it). The 16-bit forward takes 128 keys per block where that fits (fewer instructions per score: the
# accumulator rescale and the loop overhead are per block). The dK/dV kernel keeps two fp32 [BLOCK_N, D]
# accumulators in registers, so it steps through the queries 32 rows at a time; its transposed scores
# [BLOCK_N, BLOCK_M] need BLOCK_N >= 64 rows per warpgroup, or both warpgroups of 8 warps compute the same tile
# (BLOCK_N = 128 at D = 128). fp32 inputs run exact (ieee) dots on the CUDA cores and need small tiles.
# Tuning them by measurement is bench/NOTES.md's job.
_GPU_TILES = {
    "fwd": {64: (128, 128, 8, 3), 128: (128, 128, 8, 2), 256: (128, 32, 8, 3)},  # 256: 2 stages spill 4 B causal
    "dkdv": {64: (32, 128, 8, 3), 128: (32, 128, 8, 2), 256: (32, 32, 8, 2)},
    "dq": {64: (128, 64, 8, 3), 128: (128, 64, 8, 3), 256: (64, 32, 8, 2)},
}
# What autotuning (FUSEDFORMERS_AUTOTUNE=1, kernels/autotune.py) measures for 16-bit inputs: the default above
# and other tiles that compile for sm_90 without spills (an offline ptxas sweep of BLOCK_M x BLOCK_N x warps x
# stages per kernel and head dim class; bench/static.py compiles every one of them).
_GPU_TILE_CANDIDATES = {
    "fwd": {64: [(128, 128, 8, 3), (128, 64, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3), (128, 64, 8, 4)],
            128: [(128, 128, 8, 2), (128, 64, 8, 3), (128, 64, 8, 2), (128, 64, 8, 4), (128, 32, 8, 3),
                  (64, 64, 4, 3)],
            256: [(128, 32, 8, 3), (64, 32, 8, 2), (64, 32, 8, 3), (64, 64, 8, 2)]},
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

# fp32 with dropout (the Philox draws add registers): the fp32 forward tile spills 8 B at D=64 on sm_90
_GPU_TILES_FP32_DROPOUT = {"fwd": {128: (16, 32, 8, 2)}}

# Without causal masking (BART's encoder and cross-attention) the 16-bit forward at D = 128 keeps 128 x 64: its
# 128 x 128 tile spills one register there (4 B, saved and reloaded around the key loops).
_GPU_TILES_NONCAUSAL = {
    "fwd": {128: (128, 64, 8, 3)},
}

# ---- other shared-memory classes. The tables above are the sm_90 class's (wgmma, 227 KB per block). Before sm_90
# Triton lowers 16-bit dots to mma.sync, whose operand fragments live in registers, and pipelines the K/V loads
# through shared memory (num_stages - 1 buffers): several sm_90 tiles spill or exceed 99 KB there (dQ at D=128
# needs 118,784 B). These were picked by an offline ptxas sweep for sm_86/89, sm_80 and sm_75 (BLOCK_M x BLOCK_N x
# warps x stages): the largest tile with no spills within the class's shared memory; bench/static.py compiles
# every entry for the class's architectures, and so do the families tiles_sm80/86/89/75 of
# tests/test_sm90_compile.py. The entries that spilled with the rewritten kernels (three key loops: masked edge
# blocks, unmasked interior, masked diagonal; the holes flag; the kv_batch_row check), up to 152 B, were swept
# again: the largest tile (more keys first, then fewer stages) without spills at every head dim of its class (D=80
# pads to BLOCK_D=128 and needs more registers than D=128). Re-sweep when the kernels change.
# sm_80 class (A100, 163 KB): ptxas allocates registers differently for sm_80 than for sm_86, so its tiles differ
# where sm_86's spill on sm_80 (dK/dV at D=128: 12 B at 32 x 64 with 3 stages; it takes 2). The 16-bit forward
# at D=128 takes 64 x 128 (255 registers; 128 x 64 spills 24 B at D=80, 48 B at D=128), with dropout too.
_SM80_TILES = {
    "fwd": {64: (128, 64, 8, 3), 128: (64, 128, 8, 2), 256: (64, 64, 8, 2)},
    "dkdv": {64: (16, 128, 8, 2), 128: (32, 64, 8, 2), 256: (32, 32, 8, 3)},
    "dq": {64: (128, 32, 8, 3), 128: (64, 64, 8, 3), 256: (64, 32, 8, 3)},
}
_SM80_TILES_DROPOUT = {
    "fwd": {64: (128, 64, 8, 2), 128: (64, 128, 8, 2)},
    "dkdv": {64: (32, 32, 8, 2), 128: (32, 32, 8, 3), 256: (16, 32, 8, 2)},
    "dq": {256: (32, 64, 8, 2)},  # 64 x 32, 3 stages spills 4 B with dropout
}
# fp32 (CUDA-core dots) before sm_90: sm_90's tiles, but dK/dV at D=256 with 8 warps (4 spill 8 B on sm_80/86)
# and, on sm_80, one stage (two spill 8 B). On sm_80 the forward and dQ take 8 warps: with 4, ptxas spills 16-40 B
# while using only 80-128 registers (forward 16 x 64 at D=64; dQ 32 x 16 at D=64, 16 x 16 at D=256); dQ at
# D=128 takes 16 x 32 (32 x 16 spills 4 B there); dK/dV at D=128 16 x 16 with 4 warps (16 x 32 spills 32 B there
# with 4 warps, 8 B with 8; 8 warps spill at 16 x 16 without causal masking, at 16 x 64 and 32 x 32 at D=64)
_SM80_TILES_FP32 = {
    "fwd": {128: (16, 64, 8, 2), 256: (16, 32, 8, 2)},
    "dkdv": {128: (16, 16, 4, 2), 256: (16, 16, 8, 1)},
    "dq": {128: (16, 32, 8, 2), 256: (16, 32, 8, 2)},
}
# sm_86 class (A10, A40, RTX 30; L4, L40S, RTX 40 are sm_89 with the same 99 KB). The 16-bit forward at D=128
# takes 128 x 32 (197-212 registers, causal or not, with dropout too): 128 x 64 spills 152 B, 64 x 128 8 B at
# D=80 (and 3 stages exceed 99 KB), 64 x 64 16 B without causal masking (ptxas stops at 128 registers)
_SM86_TILES = {
    "fwd": {64: (128, 64, 8, 3), 128: (128, 32, 8, 2), 256: (64, 32, 8, 2)},
    "dkdv": {64: (16, 128, 8, 2), 128: (32, 64, 8, 3), 256: (32, 32, 8, 2)},
    "dq": {64: (128, 32, 8, 3), 128: (64, 64, 8, 3), 256: (32, 32, 8, 3)},
}
_SM86_TILES_DROPOUT = {"fwd": {128: (128, 32, 8, 2)}, "dkdv": {64: (32, 32, 8, 2)}}
_SM86_TILES_FP32 = {
    "fwd": {128: (16, 64, 4, 2), 256: (16, 16, 4, 2)},
    "dkdv": {128: (16, 32, 4, 2), 256: (16, 16, 8, 2)},
    "dq": {128: (32, 16, 4, 2), 256: (16, 16, 4, 2)},
}
# sm_75 class (T4, RTX 20: 64 KB). Triton 3.6 has no tensor-core dot below sm_80: fp16 dots run on the CUDA cores
# like fp32 ones, for both dtypes, with 8 warps to spread the operands. None: no 16 x 16 tile or more of that
# kernel compiles for sm_75 without spilling (the backward at D=256: dK/dV spills 1.7 KB at 16 x 16, 8 warps),
# so the policy raises naming the GPU. bf16 needs sm_80 (check_dtype_supported raises). At 16 x 16 with 8 warps
# ptxas spills some kernels while using only 128 registers (dQ at D=64: 4 B; the forward at D=256: 4 B, 16 B with
# dropout), where the next larger tile gets 255 registers and does not: dQ at D=64 takes 32 x 16, the forward at
# D=256 16 x 32 (with and without dropout).
_SM75_TILES = {
    "fwd": {64: (16, 32, 8, 2), 128: (16, 32, 8, 2), 256: (16, 32, 8, 2)},
    "dkdv": {64: (16, 16, 8, 2), 128: (16, 16, 8, 2), 256: None},
    "dq": {64: (32, 16, 8, 2), 128: (16, 16, 8, 2), 256: None},
}
_SM75_TILES_DROPOUT = {}
# fp32 on sm_75: ptxas spills at several of the fp16 tiles above; the backward at D=256 needs more than 64 KB
_SM75_TILES_FP32 = {
    "fwd": {128: (16, 32, 8, 2), 256: (16, 16, 4, 2)},
    "dkdv": {128: (16, 32, 4, 2), 256: None},
    "dq": {128: (16, 16, 8, 2), 256: None},
}

# name: (opt-in shared memory per block of the class, the architectures its tables are compiled for offline,
# 16-bit tiles, fp32 tiles, 16-bit tiles with dropout where they differ). Largest first: a GPU gets the first
# class whose limit its own reaches.
SHARED_MEMORY_CLASSES = {
    "sm90": (232448, (90,), _GPU_TILES, _GPU_TILES_FP32, _GPU_TILES_DROPOUT),  # 227 KB: H100, H200
    "sm80": (166912, (80,), _SM80_TILES, _SM80_TILES_FP32, _SM80_TILES_DROPOUT),  # 163 KB: A100
    "sm86": (101376, (86, 89), _SM86_TILES, _SM86_TILES_FP32, _SM86_TILES_DROPOUT),  # 99 KB: A10, L4, L40S
    "sm75": (65536, (75,), _SM75_TILES, _SM75_TILES_FP32, _SM75_TILES_DROPOUT),  # 64 KB: T4
}


class GpuInfo(NamedTuple):
    """What the tile policy needs to know about a GPU (``gpu_info``)."""
    name: str                 # e.g. "NVIDIA H100 80GB HBM3"
    capability: tuple         # (major, minor)
    shared_memory: int        # opt-in shared memory per block, bytes
    sm_count: int
    tile_class: str           # key of SHARED_MEMORY_CLASSES


def gpu_info(properties):
    """``GpuInfo`` of ``torch.cuda.get_device_properties(d)``, or of any object with its ``name``, ``major``,
    ``minor``, ``shared_memory_per_block_optin`` and ``multi_processor_count`` (tests pass fakes).
    Raises for a GPU with less shared memory per block than the smallest class (64 KB)."""
    shared = properties.shared_memory_per_block_optin
    for name, (limit, *_) in SHARED_MEMORY_CLASSES.items():
        if shared >= limit:
            return GpuInfo(properties.name, (properties.major, properties.minor), shared,
                           properties.multi_processor_count, name)
    raise RuntimeError(f"{properties.name} allows {shared} bytes of shared memory per block; the attention kernels "
                       f"need at least {min(c[0] for c in SHARED_MEMORY_CLASSES.values())} (compute capability 7.5)")


# what device_gpu answers for a CUDA device where there is no CUDA runtime (offline compile scripts)
SM90_OFFLINE = GpuInfo("sm_90 (offline)", (9, 0), 232448, 132, "sm90")


@functools.lru_cache(maxsize=None)
def _device_gpu(device_index):
    if not torch.cuda.is_available():
        return SM90_OFFLINE
    return gpu_info(torch.cuda.get_device_properties(device_index))


def device_gpu(device):
    """``GpuInfo`` of a CUDA device (looked up once per device), None for any other device (the interpreter).
    Without a CUDA runtime (offline compile scripts) a CUDA device means sm_90 (an H100)."""
    if not isinstance(device, torch.device):
        device = torch.device(device)
    if device.type != "cuda":
        return None
    index = device.index
    if index is None:
        if not torch.cuda.is_available():
            return SM90_OFFLINE
        index = torch.cuda.current_device()
    return _device_gpu(index)


def check_dtype_supported(dtype, gpu):
    """bf16 needs compute capability 8.0: raise naming the GPU otherwise (a T4 is 7.5)."""
    if gpu is not None and dtype == torch.bfloat16 and gpu.capability < (8, 0):
        major, minor = gpu.capability
        raise TypeError(f"bf16 attention needs compute capability >= 8.0; {gpu.name} is {major}.{minor} "
                        f"(use float16 or float32)")


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


def tile_candidates(kernel, head_dim, gpu=None):
    """The 16-bit tiles autotuning may pick for ``kernel`` at this head dim: the sm_90 class's (all spill-free
    on sm_90); other classes have none but their default."""
    if gpu is not None and gpu.tile_class != "sm90":
        return []
    tiles = _GPU_TILE_CANDIDATES[kernel]
    return tiles[_head_dim_class(tiles, head_dim)]


def _block_config(kernel, head_dim, dtype, device, dropout=False, gpu=None, causal=True, window_only=False):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of ``kernel`` in "fwd", "dkdv", "dq". The interpreter gets
    small blocks so small test shapes span several blocks and exercise the skipping and diagonal logic. On a
    GPU (``gpu``: a ``GpuInfo``, default ``device_gpu(device)``) the tables of its shared-memory class.
    ``window_only``: a sliding window without a padding mask, whose forward and dQ variants ptxas serializes
    (wgmma, C7515) at three pipeline stages on sm_90 (D=64 forward, D=64 and D=128 dQ): two there."""
    if _forced_blocks is not None:
        return (*_forced_blocks, 4, 1)
    if gpu is None:
        gpu = device_gpu(device)
        if gpu is None:
            return 16, 16, 4, 1
    check_dtype_supported(dtype, gpu)
    _, _, tiles, tiles_fp32, tiles_dropout = SHARED_MEMORY_CLASSES[gpu.tile_class]
    tiles = (tiles_fp32 if dtype == torch.float32 else tiles)[kernel]
    head_dim_class = _head_dim_class(tiles, head_dim)
    tile = tiles[head_dim_class]
    if dropout and dtype != torch.float32:
        tile = tiles_dropout.get(kernel, {}).get(head_dim_class, tile)
    elif dropout and gpu.tile_class == "sm90":
        tile = _GPU_TILES_FP32_DROPOUT.get(kernel, {}).get(head_dim_class, tile)
    elif not causal and dtype != torch.float32 and gpu.tile_class == "sm90":
        tile = _GPU_TILES_NONCAUSAL.get(kernel, {}).get(head_dim_class, tile)
    elif window_only and kernel != "dkdv" and dtype != torch.float32 and gpu.tile_class == "sm90" and tile:
        tile = (*tile[:3], min(tile[3], 2))
    if tile is None:
        major, minor = gpu.capability
        raise RuntimeError(f"the attention {_KERNEL_NAMES[kernel]} kernel at head dim {head_dim} does not fit "
                           f"{gpu.name} (compute capability {major}.{minor}, {gpu.shared_memory} bytes of shared "
                           f"memory per block): no tile of it compiles for this GPU within that shared memory and "
                           f"without register spills (head dims up to 128 run there)")
    return tile


_KERNEL_NAMES = {"fwd": "forward", "dkdv": "backward (dK/dV)", "dq": "backward (dQ)"}


def attention_tile(kernel, q, k, causal, masks, dropout, launch):
    """The tile ``(BLOCK_M, BLOCK_N, num_warps, num_stages)`` to launch ``kernel`` with: the offline default, or,
    with FUSEDFORMERS_AUTOTUNE=1 on CUDA for 16-bit inputs without dropout, the fastest of the spill-free
    candidates measured on this call (``kernels/autotune.py``; ``launch(tile)`` runs the kernel)."""
    head_dim = q.shape[-1]
    gpu = device_gpu(q.device)
    default = _block_config(kernel, head_dim, q.dtype, q.device, dropout.active, gpu, causal=causal,
                            window_only=masks.has_window and not masks.has_padding)
    if not (autotune.ENABLED and gpu is not None and _forced_blocks is None and q.dtype != torch.float32
            and not dropout.active):
        return default
    candidates = [default] + [t for t in tile_candidates(kernel, head_dim, gpu) if t != default]
    if not causal:  # the tiles the non-causal variant replaces spill there: not candidates either
        spilling = _GPU_TILES[kernel][_head_dim_class(_GPU_TILES[kernel], head_dim)]
        candidates = [t for t in candidates if t != spilling or spilling == default]
    if len(candidates) == 1:
        return default
    key = (head_dim, q.dtype, causal, masks.has_window, masks.has_padding, masks.has_kv_index, q.shape[1] // k.shape[1],
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
# fewest keys per split on a GPU: a split of one 64-key block spends more on its prologue (Q load, key range) and
# epilogue (partial stores, re-read by the combine) than on its keys; 256 keys are 4 K/V blocks, enough for the
# num_stages pipeline to overlap loads with the dots
MIN_SPLIT_KEYS = 256
# the combine's tile per BLOCK_D on a GPU: (query rows per program, splits per step). 4 warps hold the
# [rows, splits, BLOCK_D] tile with the rows on warps, D on lanes (4 floats each) and the splits in registers, so
# the merge over splits needs no shared memory; these sizes compile for sm_90 with one barrier and <= 96 registers
# (others, e.g. 4 x 16 at D = 128, give Triton's layouts 6 barriers). The interpreter merges 16 splits at a time.
COMBINE_TILES = {16: (32, 16), 32: (16, 8), 64: (8, 16), 128: (4, 8), 256: (2, 16)}
COMBINE_SPLIT_CHUNK = 16
COMBINE_NUM_WARPS = 4


def decode_plan(batch, num_heads, num_kv_heads, q_len, k_len, head_dim, *, causal=True, past_len=None,
                device="cpu", num_splits=None, dtype=torch.bfloat16, gpu=None):
    """Block sizes and the key split for one launch; returns a dict.

    Splits: the key range a causal query can see (``k_visible = min(Lk, past_len + Lq)`` keys) is cut into
    ``num_splits`` equal runs of whole BLOCK_N blocks. On a GPU (``gpu``: a ``GpuInfo``, default
    ``device_gpu(device)``), with ``P = B * Hkv * row blocks`` programs without a split and ``SMs`` SMs:

        num_splits = 1                                                    if P >= 2 * SMs
        num_splits = min(ceil(4 * SMs / P), floor(k_visible / MIN_SPLIT_KEYS), MAX_SPLITS)   otherwise

    i.e. about 4 programs per SM (the split kernel is memory bound: several programs per SM keep loads in
    flight), but never fewer than MIN_SPLIT_KEYS = 256 keys per split (every split but the last). H100
    (132 SMs), B = 1, Hkv = 8: 16 splits of 256 keys at Lk = 4k, 32 of 256 at 8k, 64 of 512 at 32k; B = 16:
    5 splits at 8k. On CPU (Triton's interpreter) 2 splits whenever there are 2 key blocks, so the combine path
    is exercised. ``num_splits`` overrides the choice (clamped to [1, min(number of key blocks, MAX_SPLITS)]).

    Combine (``_decode_combine_kernel``): ``combine_rows`` query rows per program (``COMBINE_TILES``),
    ``combine_splits`` splits per step of its single pass.
    """
    if gpu is None:
        gpu = device_gpu(device)
    on_gpu = gpu is not None
    check_dtype_supported(dtype, gpu)
    # before sm_80 Triton's dots run on the CUDA cores for every dtype: the fp32 tiles
    cuda_core_dots = on_gpu and (dtype == torch.float32 or gpu.capability < (8, 0))
    group_size = num_heads // num_kv_heads
    num_rows = group_size * q_len  # query rows that share one kv head
    block_d = max(16, next_power_of_2(head_dim))
    # rows padded to >= 16 for tl.dot; more than 64 rows (MQA with many speculative tokens) -> row blocks
    block_m = min(64, max(16, next_power_of_2(num_rows)))
    if cuda_core_dots:
        # exact (ieee) fp32 dots and pre-sm_80 dots run on the CUDA cores: 16 x 16 tiles keep them in registers
        block_m, block_n = 16, 16
    elif on_gpu:
        block_n = 64 if block_d <= 128 else 32
    else:
        block_n = 32  # the interpreter's cost is per block: few, mid-sized blocks
    num_row_blocks = cdiv(num_rows, block_m)
    if past_len is None:
        past_len = k_len - q_len
    # keys past past_len + Lq - 1 are invisible to every causal query
    k_visible = max(1, min(k_len, past_len + q_len)) if causal else k_len
    num_key_blocks = cdiv(k_visible, block_n)

    if num_splits is None:
        if on_gpu:
            base_programs = batch * num_kv_heads * num_row_blocks
            if base_programs >= 2 * gpu.sm_count:
                num_splits = 1
            else:
                num_splits = min(cdiv(4 * gpu.sm_count, base_programs), k_visible // MIN_SPLIT_KEYS)
        else:
            num_splits = 2
    num_splits = max(1, min(num_splits, num_key_blocks, MAX_SPLITS))
    # equal splits of whole blocks; drop splits that would start past the visible range
    blocks_per_split = cdiv(num_key_blocks, num_splits)
    num_splits = cdiv(num_key_blocks, blocks_per_split)

    # the combine merges several query rows per program: on a GPU as many as its warps hold (4 at D = 128), in
    # the interpreter many (its cost is per program)
    if on_gpu:
        combine_rows, combine_splits = COMBINE_TILES[block_d]
    else:
        combine_rows, combine_splits = min(64, next_power_of_2(batch * num_heads * q_len)), COMBINE_SPLIT_CHUNK

    num_warps = 8 if block_m * block_d >= 64 * 128 else 4
    num_stages = 3 if block_d <= 128 else 2
    if cuda_core_dots:
        # 4 warps spill 12 B at D=128 on sm_90 (fp32, causal + padding; bench/static.py)
        num_warps, num_stages = (8 if block_d >= 128 else 4), 2
    elif on_gpu and gpu.shared_memory < 166912 and block_m * block_d >= 64 * 128:
        num_stages = 2  # 99 KB (sm_86/89): 3 stages of 64 x 128 K/V blocks with a 64-row Q tile do not fit
    return dict(block_m=block_m, block_n=block_n, block_d=block_d, num_row_blocks=num_row_blocks,
                num_splits=num_splits, split_size=blocks_per_split * block_n, num_warps=num_warps,
                num_stages=num_stages, combine_rows=combine_rows, combine_splits=combine_splits,
                combine_num_warps=COMBINE_NUM_WARPS)


# ----------------------------------------------------------------------------------------------------------------
# RMSNorm and LayerNorm (kernels/rms_norm.py: one forward and one backward kernel serve both)
# ----------------------------------------------------------------------------------------------------------------
def rms_norm_num_warps(block_n):
    """Warps per program for a row block of ``block_n`` elements (about 256 elements per warp, 1 to 16 warps);
    RMSNorm's and LayerNorm's (whose rows cost one more reduction and, in the backward, one more partial sum)."""
    return min(max(block_n // 256, 1), 16)


def rms_norm_backward_programs(rows, device):
    """Programs of the backward kernel: a few per SM on a GPU (each keeps a float32 dweight partial sum, and
    LayerNorm's a dbias one)."""
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


# ----------------------------------------------------------------------------------------------------------------
# SiLU * mul (kernels/silu_mul.py)
# ----------------------------------------------------------------------------------------------------------------
def silu_mul_plan(intermediate_size):
    """(BLOCK_N columns of the output row per program, num_warps): at most 1024 columns (8 per thread with 4
    warps), so a decode step's single row still spreads over several programs."""
    block_n = min(next_power_of_2(intermediate_size), 1024)
    num_warps = 4 if block_n >= 1024 else (2 if block_n >= 256 else 1)
    return block_n, num_warps

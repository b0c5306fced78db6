"""Offline compile report: every kernel variant a launcher can pick, compiled for NVIDIA GPUs on any machine.

``python -m fusedformers.bench.static [--arch sm_90a,sm_89,sm_86,sm_80,sm_100a] [--subset ci|all] [--out DIR]``

Triton compiles for any NVIDIA target without a GPU, and its wheel ships ptxas, cuobjdump and nvdisasm. For
each variant (kernel, head dim, dtype, causal / padding / kv-index / dropout flags, the padding-mask dtypes HF
passes, the launchers' tiles and the autotune candidates) this records, per architecture:
- registers and spill bytes (``ptxas -v`` for that architecture), shared memory against the architecture's
  per-block opt-in limit;
- the MMA kind the dots lower to (wgmma / mma.sync / tcgen05; from the PTX), serialized wgmma (ptxas C7515 on
  sm_90a), HGMMA and ``WARPGROUP.DEPBAR`` (wgmma wait) counts in the SASS;
- for the attention kernels, the SASS instructions of each inner loop (the body between a loop's branch target
  and its backward branch) and per score: ``loop instructions x num_warps x 32 / (BLOCK_M x BLOCK_N)``.

The launch arguments are the launchers' own: each launcher (``kernels/attention.py``, ``decode_attention.py``,
``rms_norm.py``, also LayerNorm's, ``rope.py``) is called on ``meta`` tensors with its kernels replaced by
recorders, its tile choice asked of ``kernels/tiles.py`` for a CUDA device, and every recorded launch is
specialised by Triton's own JIT binder (pointers 16-byte aligned, integer 1 a constexpr, other integers divisible
by 16 get ``tt.divisibility``, ``do_not_specialize`` honoured): what is compiled here is what the JIT would
compile.

The full set (``all_variants``): on sm_90a every flag set for bf16 (wgmma serialization depends on the mask
kind), fp16 / fp32 / D=80 with FEWER_FLAGS, and the autotune candidates; on the other architectures FEWER_FLAGS
(registers and shared memory barely move with the mask kind). ``--subset ci`` is the representative part the CI
gates compile (``ci_variants``).

Writes ``<out>/<arch>.json`` (default ``bench/results/static/``) and ``<out>/report.md``; the gates in
``tests/test_static_report.py`` assert over the same records. Under ``TRITON_INTERPRET=1`` ``@triton.jit`` yields
interpreter objects that cannot be compiled, so this module re-runs itself in a subprocess with it unset.
"""
import argparse
import contextlib
import dataclasses
import datetime
import importlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import types

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(ROOT, "bench", "results", "static")

# Largest shared memory one block may opt in to (cudaDevAttrMaxSharedMemoryPerBlockOptin), in bytes. Source: the
# CUDA C++ Programming Guide, "Technical Specifications per Compute Capability" (maximum shared memory per thread
# block: 227 KB for 9.0 and 10.0, 163 KB for 8.0, 99 KB for 8.6 and 8.9), and the Hopper, Ampere and Ada tuning
# guides (H100: 227 KB; A100: 163 KB; GA10x and AD10x: 99 KB).
ARCHS = {
    "sm_90a": dict(capability=90, shared_limit=232448, gpus="H100, H200, GH200"),
    "sm_89": dict(capability=89, shared_limit=101376, gpus="L4, L40S, RTX 40"),
    "sm_86": dict(capability=86, shared_limit=101376, gpus="A10, A40, RTX 30"),
    "sm_80": dict(capability=80, shared_limit=166912, gpus="A100, A30"),
    "sm_100a": dict(capability=100, shared_limit=232448, gpus="B200, GB200"),
}
DEFAULT_ARCHS = ("sm_90a", "sm_89", "sm_86", "sm_80", "sm_100a")
ATTENTION_KERNELS = ("fwd", "dkdv", "dq", "decode_split")

# The reference row (quoted from issue 10, not re-implemented here): Triton's fused-attention tutorial forward
# compiled for sm_90a at D=128.
TUTORIAL_REFERENCE = dict(kernel="Triton tutorial fwd (quoted)", dtype="bf16", head_dim=128, tile="128x128",
                          mma="wgmma (TMA loads)", hgmma_waits="32 / 4", sass_per_score=7.7)

# Representative model shapes: LLaMA (32 query heads, 8 KV heads) for attention; sequence length 4096. The JIT
# specialises on integer values (1, divisible by 16), so these choose which variant is compiled.
BATCH, NUM_HEADS, NUM_KV_HEADS, SEQ_LEN = 2, 32, 8, 4096
SM_COUNT = 132  # rms_norm backward programs (4 per SM on an H100)


# ----------------------------------------------------------------------------------------------------------------
# Variants
# ----------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Variant:
    """One kernel compile: which launcher call produces it and with what (``tile`` None = the launcher's choice;
    for attention a (BLOCK_M, BLOCK_N, num_warps, num_stages) autotune candidate otherwise)."""
    kernel: str                  # fwd, dkdv, dq, bwd_preprocess, dropout_mask, decode_split, decode_combine, ...
    dtype: str                   # bf16, fp16, fp32
    head_dim: int = 0            # attention, decode, rope
    causal: bool = False
    padding: str = "none"        # none, bool, int64: the dtype of HF's 2-D attention_mask
    kv_index: bool = False
    dropout: bool = False
    tile: tuple = None           # an autotune candidate, else the launcher's default
    heads: tuple = ()            # decode (Hq, Hkv, Lq); rope (H,), or (Hq, Hkv): the packed q/k/v
    hidden: int = 0              # rms_norm, layer_norm; silu_mul (its I)
    residual: bool = False       # rms_norm: fused residual add (forward) / gradient of h (backward); layer_norm:
                                 # fused residual add with h kept for the backward (forward only)
    backward: bool = False       # rope, silu_mul
    cache: bool = False          # rope of the packed q/k/v: k and v written into a KV cache

    @property
    def key(self):
        parts = [self.kernel, self.dtype]
        if self.head_dim:
            parts.append(f"D{self.head_dim}")
        if self.heads:
            parts.append("H" + "/".join(map(str, self.heads)))
        if self.hidden:
            parts.append(f"N{self.hidden}")
        flags = [name for name, on in (("causal", self.causal), (f"pad_{self.padding}", self.padding != "none"),
                                       ("kv_index", self.kv_index), ("dropout", self.dropout),
                                       ("residual", self.residual), ("backward", self.backward),
                                       ("cache", self.cache)) if on]
        parts.append("+".join(flags) or "plain")
        parts.append("default" if self.tile is None else "tile{}x{}w{}s{}".format(*self.tile))
        return "/".join(parts)


DTYPES = ("bf16", "fp16", "fp32")
ATTENTION_HEAD_DIMS = (64, 128, 256)  # the tile classes; D=80 (padded to BLOCK_D=128) is added below
# (causal, padding, kv_index, dropout). bf16: causal x every mask kind, then kv-index (BART cross-attention in
# beam search; a cache shared across rows) and dropout (training) with the masks models pass with them.
ATTENTION_FLAGS = ([(causal, padding, False, False) for causal in (False, True)
                    for padding in ("none", "bool", "int64")]
                   + [(False, "int64", True, False), (True, "int64", True, False),
                      (True, "none", False, True), (True, "int64", False, True), (False, "int64", False, True)])
# fp16 (compiles as bf16 does), fp32 (exact dots on the CUDA cores), D=80, and every flag set on the other
# architectures (where the gates are registers and shared memory, which the mask kind barely moves): these
FEWER_FLAGS = [(False, "none", False, False), (True, "int64", False, False), (True, "int64", False, True)]
AUTOTUNE_FLAGS = [(True, "int64", False, False)]
# decode: (Hq, Hkv, Lq): GQA, MQA (Hkv = 1 is a constexpr for the JIT), speculative tokens (2 row blocks)
DECODE_HEADS = ((32, 8, 1), (8, 1, 1), (32, 4, 16))
DECODE_FLAGS = [(True, "int64", False), (True, "none", False), (False, "int64", True)]
RMS_NORM_HIDDEN = (1024, 4096, 8192, 16384)
LAYER_NORM_HIDDEN = (768, 1024, 4096)  # BART-base, BART-large, a wide one
ROPE_SHAPES = ((32, 64), (8, 128), (32, 128), (16, 80), (32, 256))
# the packed q/k/v (Hq, Hkv, D): LLaMA-3 8B / 70B GQA, LLaMA-2 7B MHA, a D=64 MHA
ROPE_QKV_SHAPES = ((32, 8, 128), (64, 8, 128), (32, 32, 128), (16, 16, 64))
SILU_MUL_SIZES = (11008, 14336, 28672)  # LLaMA-2 7B, LLaMA-3 8B, LLaMA-3 70B intermediate sizes


def all_variants(arch="sm_90a"):
    """Every variant the launchers can pick (for the shapes above), the default tiles first. On sm_90a every
    flag set (wgmma serialization depends on them); elsewhere FEWER_FLAGS."""
    import torch

    tiles = importlib.import_module("fusedformers.kernels.tiles")
    out = []
    for kernel in ("fwd", "dkdv", "dq"):
        for dtype in DTYPES:
            for head_dim in ATTENTION_HEAD_DIMS + (80,):
                every_flag = arch == "sm_90a" and dtype == "bf16" and head_dim != 80
                for causal, padding, kv_index, dropout in (ATTENTION_FLAGS if every_flag else FEWER_FLAGS):
                    out.append(Variant(kernel, dtype, head_dim, causal, padding, kv_index, dropout))
    for dtype in DTYPES:
        for head_dim in ATTENTION_HEAD_DIMS + (80,):
            out.append(Variant("bwd_preprocess", dtype, head_dim))
    out.append(Variant("dropout_mask", "fp32"))
    for dtype in DTYPES:
        for head_dim in ATTENTION_HEAD_DIMS + (80,):
            for heads in (DECODE_HEADS if dtype == "bf16" else DECODE_HEADS[:1]):
                for causal, padding, kv_index in (DECODE_FLAGS if dtype == "bf16" else DECODE_FLAGS[:1]):
                    out.append(Variant("decode_split", dtype, head_dim, causal, padding, kv_index, heads=heads))
            out.append(Variant("decode_combine", dtype, head_dim, heads=DECODE_HEADS[0]))
    for dtype in DTYPES:
        for hidden in RMS_NORM_HIDDEN:
            for residual in (False, True):
                out.append(Variant("rms_norm_fwd", dtype, hidden=hidden, residual=residual))
                out.append(Variant("rms_norm_bwd", dtype, hidden=hidden, residual=residual))
        for hidden in LAYER_NORM_HIDDEN:
            for residual in (False, True):
                out.append(Variant("layer_norm_fwd", dtype, hidden=hidden, residual=residual))
            out.append(Variant("layer_norm_bwd", dtype, hidden=hidden))
        for heads, head_dim in ROPE_SHAPES:
            for backward in (False, True):
                out.append(Variant("rope", dtype, head_dim, heads=(heads,), backward=backward))
        # the packed q/k/v: the forward into a KV cache (inference) and the backward (training, no cache)
        for heads, kv_heads, head_dim in ROPE_QKV_SHAPES:
            out.append(Variant("rope", dtype, head_dim, heads=(heads, kv_heads), cache=True))
            out.append(Variant("rope", dtype, head_dim, heads=(heads, kv_heads), backward=True))
        for size in SILU_MUL_SIZES:
            for backward in (False, True):
                out.append(Variant("silu_mul", dtype, hidden=size, backward=backward))
    # autotune (FUSEDFORMERS_AUTOTUNE=1): 16-bit, no dropout; every candidate of kernels/tiles.py per head-dim
    # class (D=80 has D=128's candidates); the default tile is already above. The candidates are sm_90's (on
    # other GPUs a candidate that fails to launch is skipped)
    for kernel in ("fwd", "dkdv", "dq") if arch == "sm_90a" else ():
        for head_dim in ATTENTION_HEAD_DIMS:
            default = tuple(tiles._block_config(kernel, head_dim, torch.bfloat16, torch.device("cuda")))
            for tile in tiles.tile_candidates(kernel, head_dim):
                if tuple(tile) == default:
                    continue
                for causal, padding, kv_index, dropout in AUTOTUNE_FLAGS:
                    out.append(Variant(kernel, "bf16", head_dim, causal, padding, kv_index, dropout, tile=tuple(tile)))
    unique = {}
    for variant in out:
        unique.setdefault(variant, None)
    return list(unique)


def ci_variants(arch):
    """A representative subset for CI: per kernel the benchmark's case (bf16, causal + int64 padding) at every
    head-dim class, the other mask kinds, dtypes and flags at D=128; on sm_90a also D=80, fp16 causal + padding
    and every fwd autotune candidate at D=128. Covers every kernel of every launcher."""
    chosen = []
    for variant in all_variants(arch):
        v = variant
        if v.kernel in ("fwd", "dkdv", "dq"):
            if v.tile is not None:
                keep = (arch == "sm_90a" and v.kernel == "fwd" and v.head_dim == 128 and v.causal
                        and v.padding == "int64")
            elif v.dtype == "bf16" and v.causal and v.padding == "int64" and not v.kv_index:
                keep = (v.head_dim in (64, 128, 256) or arch == "sm_90a") and (not v.dropout or v.head_dim == 128)
            elif v.head_dim == 128 and not v.dropout and not v.kv_index:
                keep = v.dtype == "bf16" or (v.causal and v.padding == "int64")
            else:
                keep = False
        elif v.kernel == "decode_split":
            keep = v.dtype == "bf16" and v.head_dim == 128 and v.padding == "int64" and v.causal
        elif v.kernel in ("rms_norm_fwd", "rms_norm_bwd"):
            keep = v.dtype == "bf16" and v.hidden in (4096, 16384) and v.residual
        elif v.kernel in ("layer_norm_fwd", "layer_norm_bwd"):
            keep = v.dtype == "bf16" and v.hidden == 1024 and (v.residual or v.kernel == "layer_norm_bwd")
        elif v.kernel == "rope":
            keep = v.dtype == "bf16" and v.heads in ((32,), (32, 8)) and v.head_dim == 128 and (v.backward or v.cache)
        elif v.kernel == "silu_mul":
            keep = v.dtype == "bf16" and v.hidden == 14336
        else:  # bwd_preprocess, dropout_mask, decode_combine
            keep = v.dtype in ("bf16", "fp32") and v.head_dim in (0, 128)
        if keep:
            chosen.append(variant)
    return chosen


def default_table_variants():
    """The rows of the README table: the launchers' defaults for the benchmark's case (bf16, causal + int64
    padding), per kernel and head-dim class."""
    rows = [Variant(kernel, "bf16", head_dim, True, "int64") for kernel in ("fwd", "dkdv", "dq")
            for head_dim in (64, 128, 256)]
    rows += [Variant("decode_split", "bf16", 128, True, "int64", heads=DECODE_HEADS[0]),
             Variant("decode_combine", "bf16", 128, heads=DECODE_HEADS[0]),
             Variant("rms_norm_fwd", "bf16", hidden=4096, residual=True),
             Variant("rms_norm_bwd", "bf16", hidden=4096, residual=True),
             Variant("rope", "bf16", 128, heads=(32,), backward=False)]
    return rows


# ----------------------------------------------------------------------------------------------------------------
# The launchers' own launch arguments, recorded on meta tensors
# ----------------------------------------------------------------------------------------------------------------
class _Recorder:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](*args, **kwargs)`` records the call."""

    def __init__(self, fn, launches):
        self.fn, self.launches = fn, launches

    def __getitem__(self, grid):
        def record(*args, **kwargs):
            self.launches.append((self.fn, args, kwargs))
        return record


@contextlib.contextmanager
def _recording(modules):
    """Replace every JIT kernel of ``modules`` by a recorder; yields the list of recorded launches."""
    from triton.runtime.jit import JITFunction

    launches, saved = [], []
    for module in modules:
        for name, value in list(vars(module).items()):
            if isinstance(value, JITFunction):
                saved.append((module, name, value))
                setattr(module, name, _Recorder(value, launches))
    try:
        yield launches
    finally:
        for module, name, value in saved:
            setattr(module, name, value)


@contextlib.contextmanager
def _patched(module, name, value):
    saved = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, saved)


def _kernel_names():
    """Variant.kernel -> the JIT function's name."""
    return dict(fwd="_attn_fwd_kernel", dkdv="_attn_bwd_dkdv_kernel", dq="_attn_bwd_dq_kernel",
                bwd_preprocess="_bwd_preprocess_kernel", dropout_mask="_dropout_mask_kernel",
                decode_split="_decode_split_kernel", decode_combine="_decode_combine_kernel",
                rms_norm_fwd="_rms_norm_fwd_kernel", rms_norm_bwd="_rms_norm_bwd_kernel", rope="_rope_kernel",
                layer_norm_fwd="_rms_norm_fwd_kernel", layer_norm_bwd="_rms_norm_bwd_kernel",
                silu_mul="_silu_mul_kernel")


def record_launch(variant, arch="sm_90a"):
    """``(jit_fn, args, kwargs)`` of the launch that compiles ``variant`` for ``arch``: the launcher runs on meta
    tensors with the tiles kernels/tiles.py picks for a CUDA device of that arch (or the variant's autotune
    candidate); ``torch.cuda.get_device_properties`` answers with the arch's SM count and shared memory."""
    import torch

    attention = importlib.import_module("fusedformers.kernels.attention")
    decode = importlib.import_module("fusedformers.kernels.decode_attention")
    rms_norm = importlib.import_module("fusedformers.kernels.rms_norm")
    rope = importlib.import_module("fusedformers.kernels.rope")
    silu_mul = importlib.import_module("fusedformers.kernels.silu_mul")
    tiles = importlib.import_module("fusedformers.kernels.tiles")
    meta, cuda = torch.device("meta"), torch.device("cuda")
    dtype = dict(bf16=torch.bfloat16, fp16=torch.float16, fp32=torch.float32)[variant.dtype]
    v = variant

    # a policy that asks the device (SM count, shared memory per block) gets this arch's figures
    props = types.SimpleNamespace(name=f"offline {arch}", major=ARCHS[arch]["capability"] // 10,
                                  minor=ARCHS[arch]["capability"] % 10, multi_processor_count=SM_COUNT,
                                  shared_memory_per_block_optin=ARCHS[arch]["shared_limit"],
                                  total_memory=80 * 2 ** 30)
    gpu = tiles.gpu_info(props)  # the tile class of this arch's GPUs (kernels/tiles.py SHARED_MEMORY_CLASSES)

    def attention_tile(kernel, q, k, causal, masks, dropout, launch):
        # the launcher's tile policy for a GPU of this arch (or the variant's autotune candidate)
        if v.tile is not None:
            return v.tile
        return tiles._block_config(kernel, q.shape[-1], q.dtype, cuda, dropout.active, gpu, causal=causal)

    def decode_plan(*args, **kwargs):
        return tiles.decode_plan(*args, **{**kwargs, "device": cuda, "gpu": gpu})

    def padding_mask(batch, k_len):
        if v.padding == "none":
            return None
        return torch.ones(batch, k_len, device=meta, dtype=torch.bool if v.padding == "bool" else torch.int64)

    def heads_first(batch, length, heads, head_dim):
        # HF's projections: [B, L, H, D] viewed as [B, H, L, D]
        return torch.empty(batch, length, heads, head_dim, device=meta, dtype=dtype).transpose(1, 2)

    modules = (attention, decode, rms_norm, rope, silu_mul)
    with _recording(modules) as launches, _patched(attention, "attention_tile", attention_tile), \
            _patched(attention, "elementwise_rows", lambda device: tiles.elementwise_rows(cuda)), \
            _patched(decode, "decode_plan", decode_plan), \
            _patched(torch.cuda, "get_device_properties", lambda device=None: props), \
            _patched(torch.cuda, "get_device_capability", lambda device=None: (props.major, props.minor)):
        if v.kernel in ("fwd", "dkdv", "dq", "bwd_preprocess"):
            q = heads_first(BATCH, SEQ_LEN, NUM_HEADS, v.head_dim)
            k = heads_first(BATCH, SEQ_LEN, NUM_KV_HEADS, v.head_dim)
            val = heads_first(BATCH, SEQ_LEN, NUM_KV_HEADS, v.head_dim)
            kv_batch_index = torch.arange(BATCH, device=meta) if v.kv_index else None
            masks = attention._MaskArgs(q, padding_mask(BATCH, SEQ_LEN), kv_batch_index)
            dropout = attention._DropoutArgs(q, 0.1 if v.dropout else 0.0, attention.draw_dropout_seed(meta))
            scale = v.head_dim ** -0.5
            if v.kernel == "fwd":
                attention._attention_forward(q, k, val, v.causal, 0, scale, masks, dropout)
            else:
                out = heads_first(BATCH, SEQ_LEN, NUM_HEADS, v.head_dim)
                dout = heads_first(BATCH, SEQ_LEN, NUM_HEADS, v.head_dim)
                lse = torch.empty(BATCH, NUM_HEADS, SEQ_LEN, device=meta, dtype=torch.float32)
                attention._attention_backward(dout, q, k, val, out, lse, v.causal, 0, scale, masks, dropout)
        elif v.kernel == "dropout_mask":
            seed = attention.draw_dropout_seed(meta)
            attention.dropout_keep_mask(seed, BATCH, NUM_HEADS, SEQ_LEN, SEQ_LEN, 0.1)
        elif v.kernel in ("decode_split", "decode_combine"):
            num_heads, num_kv_heads, q_len = v.heads
            q = heads_first(BATCH, q_len, num_heads, v.head_dim)
            # a static KV cache [B, Hkv, S_max, D], sliced to the current length
            cache = torch.empty(BATCH, num_kv_heads, 2 * SEQ_LEN, v.head_dim, device=meta, dtype=dtype)
            k = val = cache[:, :, :SEQ_LEN]
            kv_batch_index = torch.arange(BATCH, device=meta) if v.kv_index else None
            decode.decode_attention(q, k, val, causal=v.causal, key_padding_mask=padding_mask(BATCH, SEQ_LEN),
                                    kv_batch_index=kv_batch_index, num_splits=8)
        elif v.kernel in ("rms_norm_fwd", "rms_norm_bwd"):
            rows = BATCH * SEQ_LEN
            x = torch.empty(rows, v.hidden, device=meta, dtype=dtype)
            weight = torch.empty(v.hidden, device=meta, dtype=dtype)
            if v.kernel == "rms_norm_fwd":
                rms_norm._norm_forward(x, weight, 1e-6, residual=x if v.residual else None)
            else:
                rstd = torch.empty(rows, device=meta, dtype=torch.float32)
                rms_norm._norm_backward(x, x, weight, rstd, dh=x if v.residual else None,
                                        num_programs=4 * SM_COUNT)
        elif v.kernel in ("layer_norm_fwd", "layer_norm_bwd"):
            rows = BATCH * SEQ_LEN
            x = torch.empty(rows, v.hidden, device=meta, dtype=dtype)
            weight = torch.empty(v.hidden, device=meta, dtype=dtype)
            if v.kernel == "layer_norm_fwd":
                rms_norm._norm_forward(x, weight, 1e-5, residual=x if v.residual else None, bias=weight,
                                       layer_norm=True)
            else:
                stats = torch.empty(rows, device=meta, dtype=torch.float32)
                rms_norm._norm_backward(x, x, weight, stats, mean=stats, num_programs=4 * SM_COUNT)
        elif v.kernel == "rope" and len(v.heads) == 1:
            (num_heads,) = v.heads
            x = torch.empty(BATCH, SEQ_LEN, num_heads, v.head_dim, device=meta, dtype=dtype)
            cos = torch.empty(BATCH, SEQ_LEN, v.head_dim, device=meta, dtype=dtype)
            rope._rotate(x, cos, cos, backward=v.backward)
        elif v.kernel == "rope":
            num_heads, num_kv_heads = v.heads
            cos = torch.empty(BATCH, SEQ_LEN, v.head_dim, device=meta, dtype=dtype)
            if v.backward:
                dq = torch.empty(BATCH, SEQ_LEN, num_heads, v.head_dim, device=meta, dtype=dtype)
                dk = torch.empty(BATCH, SEQ_LEN, num_kv_heads, v.head_dim, device=meta, dtype=dtype)
                rope._rotate_qkv_backward(dq, dk, dk, cos, cos)
            else:  # a decode step's launch shape: rows of the packed projection into a [B, Hkv, 2 S, D] cache
                qkv = torch.empty(BATCH, 1, (num_heads + 2 * num_kv_heads) * v.head_dim, device=meta, dtype=dtype)
                cache = torch.empty(BATCH, num_kv_heads, 2 * SEQ_LEN, v.head_dim, device=meta, dtype=dtype)
                rope._rotate_qkv(qkv, cos[:, :1], cos[:, :1], num_heads, cache, cache,
                                 torch.empty(1, device=meta, dtype=torch.int64))
        elif v.kernel == "silu_mul":
            gate_up = torch.empty(BATCH * SEQ_LEN, 2 * v.hidden, device=meta, dtype=dtype)
            dout = torch.empty(BATCH * SEQ_LEN, v.hidden, device=meta, dtype=dtype) if v.backward else None
            silu_mul._silu_mul(gate_up, dout)
        else:
            raise ValueError(f"bench/static.py: unknown kernel {v.kernel!r} in variant {v.key}")
    wanted = _kernel_names()[v.kernel]
    found = [launch for launch in launches if launch[0].__name__ == wanted]
    if not found:
        raise RuntimeError(f"bench/static.py: the launcher of {v.key} launched {[f.__name__ for f, _, _ in launches]}"
                           f", not {wanted}")
    return found[0]


def specialise(fn, args, kwargs, capability):
    """``(ASTSource, options)`` as Triton's JIT builds them for this launch on a GPU of ``capability``: its own
    binder decides which arguments become constexprs (integers equal to 1) and which get ``tt.divisibility``
    (pointers and integers divisible by 16), honouring ``do_not_specialize``."""
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.compiler import ASTSource
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", capability, 32)
    backend = CUDABackend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    return ASTSource(fn, signature, constexprs, attrs), target, options


def compile_variant(variant, arch):
    """Compile ``variant`` for ``arch`` (a key of ARCHS); returns ``(compiled, {constexpr name: value},
    specialisation, ptxas log)`` (see ``specialisation_summary``; the log of Triton's own ptxas run, empty when
    the kernel came from Triton's cache)."""
    import triton

    fn, args, kwargs = record_launch(variant, arch)
    source, target, options = specialise(fn, args, kwargs, ARCHS[arch]["capability"])
    log = io.StringIO()
    triton.knobs.nvidia.dump_ptxas_log = True  # Triton prints ptxas -v's report: one ptxas run, not two
    with contextlib.redirect_stdout(log):
        compiled = triton.compile(source, target=target, options=options.__dict__)
    constexprs = {p.name: kwargs[p.name] for p in fn.params if p.is_constexpr and p.name in kwargs}
    return compiled, constexprs, specialisation_summary(fn, source), log.getvalue()


def specialisation_summary(fn, source):
    """What the JIT made of the runtime arguments: ``ones`` (integers equal to 1, compiled as constants),
    ``plain_ints`` (integers without the divisibility-16 hint: not divisible, or do_not_specialize),
    ``pointers`` (name -> type) and ``aligned_pointers`` (those with the 16-byte alignment hint)."""
    hinted = {fn.arg_names[path[0]] for path, attrs in source.attrs.items()
              if any(attr[0] == "tt.divisibility" for attr in attrs)}
    declared = {p.name for p in fn.params if p.is_constexpr}
    signature = source.signature
    return dict(ones=[n for n, t in signature.items() if t == "constexpr" and n not in declared],
                plain_ints=[n for n, t in signature.items() if t in ("i32", "i64") and n not in hinted],
                pointers={n: t for n, t in signature.items() if t.startswith("*")},
                aligned_pointers=[n for n, t in signature.items() if t.startswith("*") and n in hinted])


# ----------------------------------------------------------------------------------------------------------------
# What ptxas and the SASS say
# ----------------------------------------------------------------------------------------------------------------
def _tool(name, capability=90):
    import triton
    from triton.backends.nvidia.compiler import get_ptxas
    if name == "ptxas":
        return get_ptxas(capability).path
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def ptxas_report(ptx, arch, log=""):
    """ptxas -v of the PTX for ``arch`` (with Triton's own flags; ``log``: the report of Triton's own run, if
    any): registers, spill store/load bytes, and whether it warns C7515 (wgmma serialized)."""
    if "Used" in log and "spill stores" in log:
        return _parse_ptxas_log(log)
    capability = ARCHS[arch]["capability"]
    with tempfile.TemporaryDirectory() as tmp:
        ptx_path = os.path.join(tmp, "kernel.ptx")
        with open(ptx_path, "w") as f:
            f.write(ptx)
        result = subprocess.run([_tool("ptxas", capability), "-lineinfo", "-v", f"--gpu-name={arch}", ptx_path,
                                 "-o", os.path.join(tmp, "kernel.cubin")], capture_output=True, text=True)
    log = result.stdout + result.stderr
    if result.returncode != 0:
        raise RuntimeError(f"ptxas failed for {arch}:\n{log}")
    return _parse_ptxas_log(log)


def _parse_ptxas_log(log):
    return dict(registers=int(re.search(r"Used (\d+) registers", log).group(1)),
                spill_stores=int(re.search(r"(\d+) bytes spill stores", log).group(1)),
                spill_loads=int(re.search(r"(\d+) bytes spill loads", log).group(1)),
                serialized_wgmma="C7515" in log,
                ptxas_warnings=sorted(set(re.findall(r"\((C\d{4})\)", log))))


_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_BRANCH = re.compile(r"^(@!?U?P\w+\s+)?BRA(\.\w+)*\s+(?:`\()?(0x[0-9a-f]+|\.L_\w+)")


def sass(cubin):
    """``[(address, instruction text)]`` of the kernel's SASS (cuobjdump -sass)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        result = subprocess.run([_tool("cuobjdump"), "-sass", path], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"cuobjdump -sass failed: {result.stderr}")
    return [(int(address, 16), text) for address, text in _SASS_LINE.findall(result.stdout)]


def sass_loops(instructions, min_size=16):
    """The innermost loops: ``[(start, end)]`` instruction index ranges, from each backward branch (the loop's
    bottom; sm_80-sm_89 code often leaves its loops by a predicated ``CALL.REL.NOINC`` and branches back
    unconditionally) back to its target. Backward branches over fewer than ``min_size`` instructions (spin-waits)
    or over an ``EXIT`` (jumps back from out-of-line stubs) are not loops here; a loop that contains another is not
    innermost."""
    index = {address: i for i, (address, _) in enumerate(instructions)}
    loops = []
    for i, (address, text) in enumerate(instructions):
        match = _BRANCH.match(text)
        if not match or not match.group(3).startswith("0x"):
            continue
        target = int(match.group(3), 16)
        if target >= address or target not in index or i - index[target] + 1 < min_size:
            continue
        if any("EXIT" in body for _, body in instructions[index[target]:i]):
            continue
        loops.append((index[target], i))
    return [(s, e) for s, e in loops if not any((s2, e2) != (s, e) and s <= s2 and e2 <= e for s2, e2 in loops)]


def sass_report(cubin, num_warps, block_m=None, block_n=None):
    """Tensor-core instruction counts (HGMMA: wgmma, HMMA: mma.sync, UTC*MMA: tcgen05) and wgmma waits of the
    kernel, and per inner loop: instructions (NOPs excluded), its MMAs and waits, and SASS instructions per score
    (with the tile's BLOCK_M x BLOCK_N)."""
    instructions = sass(cubin)

    def counts(body):
        ops = [text.split()[1] if text.startswith("@") else text.split()[0] for _, text in body]
        return dict(instructions=sum(1 for op in ops if not op.startswith("NOP")),
                    hgmma=sum(1 for op in ops if op.startswith("HGMMA")),
                    hmma=sum(1 for op in ops if op.startswith("HMMA")),
                    utcmma=sum(1 for op in ops if op.startswith("UTC") and "MMA" in op),
                    wgmma_waits=sum(1 for op in ops if op.startswith("WARPGROUP.DEPBAR")))

    whole = counts(instructions)
    loops = []
    for start, end in sass_loops(instructions):
        loop = counts(instructions[start:end + 1])
        loop["address"] = hex(instructions[start][0])
        if block_m and block_n:
            loop["sass_per_score"] = round(loop["instructions"] * num_warps * 32 / (block_m * block_n), 2)
        loops.append(loop)
    return dict(sass_instructions=whole["instructions"], hgmma=whole["hgmma"], hmma=whole["hmma"],
                utcmma=whole["utcmma"], wgmma_waits=whole["wgmma_waits"], loops=loops)


def mma_kind(ptx):
    """The tensor-core instruction family in the PTX (none: the dots, if any, run on the CUDA cores)."""
    kinds = [name for name, pattern in (("tcgen05", "tcgen05.mma"), ("wgmma", "wgmma.mma_async"),
                                        ("mma.sync", "mma.sync")) if pattern in ptx]
    return "+".join(kinds) or "none"


_DOT = re.compile(r"= (tt\.dot|ttng\.warp_group_dot|ttng\.tc_gen5_mma)\s.*?:\s*"
                  r"(?:tensor|!ttg\.memdesc)<(\d+)x(\d+)x(\w+)")


def dots(ttgir):
    """Each dot of the TTGIR: ``[{"op", "rows", "k", "dtype"}]`` (op ``ttng.warp_group_dot`` lowers to wgmma)."""
    return [dict(op=op, rows=int(rows), k=int(k), dtype=dtype) for op, rows, k, dtype in _DOT.findall(ttgir)]


# ----------------------------------------------------------------------------------------------------------------
# One record per variant and arch
# ----------------------------------------------------------------------------------------------------------------
def measure(variant, arch):
    """The record of ``variant`` compiled for ``arch`` (a dict; ``error`` set if it does not compile)."""
    started = time.perf_counter()
    record = dict(key=variant.key, variant={k: v for k, v in dataclasses.asdict(variant).items()
                                            if v not in (None, (), 0, False, "none") or k in ("causal",)})
    try:
        compiled, constexprs, specialisation, log = compile_variant(variant, arch)
    except Exception as error:  # recorded: a variant that does not compile is a finding, the sweep goes on
        record["error"] = f"{type(error).__name__}: {str(error)[:2000]}"
        return record
    num_warps = compiled.metadata.num_warps
    block_m, block_n = constexprs.get("BLOCK_M"), constexprs.get("BLOCK_N")
    record.update(num_warps=num_warps, num_stages=compiled.metadata.num_stages,
                  constexprs=constexprs, specialisation=specialisation,
                  shared=compiled.metadata.shared, shared_limit=ARCHS[arch]["shared_limit"],
                  mma=mma_kind(compiled.asm["ptx"]), dots=dots(compiled.asm["ttgir"]))
    record.update(ptxas_report(compiled.asm["ptx"], arch, log))
    attention_tile = variant.kernel in ATTENTION_KERNELS
    record.update(sass_report(compiled.asm["cubin"], num_warps, block_m if attention_tile else None,
                              block_n if attention_tile else None))
    if attention_tile and record["loops"]:
        # the main (unmasked) loop: the shortest loop that does matrix work
        mma_loops = [loop for loop in record["loops"] if loop["hgmma"] or loop["hmma"] or loop["utcmma"]]
        mma_loops = mma_loops or record["loops"]
        main = min(mma_loops, key=lambda loop: loop["instructions"])
        record["main_loop_instructions"] = main["instructions"]
        record["sass_per_score"] = main.get("sass_per_score")
    record["compile_s"] = round(time.perf_counter() - started, 2)
    return record


# ----------------------------------------------------------------------------------------------------------------
# Gates (tests/test_static_report.py asserts these over the records)
# ----------------------------------------------------------------------------------------------------------------
def gate_failures(record, arch):
    """The gates ``record`` fails on ``arch``, as messages (empty: it passes): it compiles; no spills; shared
    memory within the arch's limit; on sm_90a no serialized wgmma, and every 16-bit dot of an attention kernel
    with at least 64 rows per warpgroup lowers to wgmma."""
    if "error" in record:
        return [f"does not compile: {record['error'][:300]}"]
    failures = []
    if record["spill_stores"] or record["spill_loads"]:
        failures.append(f"spills {record['spill_stores']} B stores / {record['spill_loads']} B loads "
                        f"({record['registers']} registers)")
    if record["shared"] > record["shared_limit"]:
        failures.append(f"{record['shared']} B shared > {arch}'s {record['shared_limit']} B")
    if arch == "sm_90a":
        if record["serialized_wgmma"]:
            failures.append("wgmma serialized (ptxas C7515)")
        if record["variant"]["kernel"] in ATTENTION_KERNELS:
            warpgroups = max(1, record["num_warps"] // 4)
            for dot in record["dots"]:
                if (dot["dtype"] in ("bf16", "f16") and dot["rows"] // warpgroups >= 64
                        and dot["op"] != "ttng.warp_group_dot"):
                    failures.append(f"a {dot['rows']}-row {dot['dtype']} dot ({dot['rows'] // warpgroups} rows per "
                                    f"warpgroup) lowers to {dot['op']}, not wgmma")
    return failures


# ----------------------------------------------------------------------------------------------------------------
# Running, files, tables
# ----------------------------------------------------------------------------------------------------------------
def _measure_task(task):
    variant, arch = task
    return arch, measure(variant, arch)


def run(arch, subset="all", jobs=1, progress=True):
    """Compile and measure every variant of ``subset`` for ``arch``; returns the records (in variant order) and
    the seconds it took."""
    started = time.perf_counter()
    tasks = [(variant, arch) for variant in (all_variants(arch) if subset == "all" else ci_variants(arch))]
    records = []
    if jobs > 1:
        import multiprocessing

        pool = multiprocessing.get_context("spawn").Pool(jobs)
        results = pool.imap(_measure_task, tasks, chunksize=2)
    else:
        pool, results = None, map(_measure_task, tasks)
    try:
        for done, (_, record) in enumerate(results, 1):
            records.append(record)
            if progress and (done % 50 == 0 or done == len(tasks)):
                print(f"  {arch}: {done}/{len(tasks)} compiled ({time.perf_counter() - started:.0f} s)", flush=True)
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    return records, time.perf_counter() - started


def write_json(out_dir, arch, records, subset, seconds, date=None):
    """Write ``<out_dir>/<arch>.json``: the arch, its shared-memory limit, the triton and torch versions, the
    date, the shapes, and one record per variant (``measure``)."""
    import torch
    import triton

    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{arch}.json")
    data = dict(arch=arch, capability=ARCHS[arch]["capability"], gpus=ARCHS[arch]["gpus"],
                shared_limit=ARCHS[arch]["shared_limit"], triton=triton.__version__, torch=torch.__version__,
                date=date or datetime.date.today().isoformat(), subset=subset, seconds=round(seconds, 1),
                shapes=dict(batch=BATCH, num_heads=NUM_HEADS, num_kv_heads=NUM_KV_HEADS, seq_len=SEQ_LEN),
                records=records)
    records = data.pop("records")
    with open(path, "w") as f:  # one record per line: small files, readable diffs
        f.write(json.dumps(data, indent=1)[:-2] + ',\n "records": [\n')
        f.write(",\n".join(json.dumps(record, separators=(",", ":")) for record in records))
        f.write("\n ]\n}\n")
    return path


def _tile(record):
    constexprs = record.get("constexprs", {})
    if "BLOCK_M" in constexprs and "BLOCK_N" in constexprs:
        return f"{constexprs['BLOCK_M']}x{constexprs['BLOCK_N']}"
    return "x".join(str(constexprs[k]) for k in ("BLOCK_R", "BLOCK_H", "BLOCK_N") if k in constexprs) or "-"


def _label(variant):
    v = variant
    what = {"decode_split": "decode split", "decode_combine": "decode combine", "rms_norm_fwd": "rms_norm fwd",
            "rms_norm_bwd": "rms_norm bwd", "layer_norm_fwd": "layer_norm fwd", "layer_norm_bwd": "layer_norm bwd",
            "bwd_preprocess": "bwd preprocess"}.get(v["kernel"], v["kernel"])
    if v.get("hidden"):
        return f"{what} N={v['hidden']}"
    return f"{what} D={v['head_dim']}" if v.get("head_dim") else what


def markdown_table(records, arch):
    """A markdown table of ``records`` for ``arch``."""
    lines = [f"| {arch} | tile, warps, stages | registers | spill stores (B) | shared (B) | MMA | serialized | "
             "HGMMA / waits | SASS per loop iteration | per score |",
             "| --- | --- | ---: | ---: | ---: | --- | --- | --- | --- | ---: |"]
    limit = ARCHS[arch]["shared_limit"]
    for record in records:
        if "error" in record:
            lines.append(f"| {_label(record['variant'])} | - | error: {record['error'][:80]} | | | | | | | |")
            continue
        shared = f"{record['shared']}" + (" **over**" if record["shared"] > limit else "")
        spills = record["spill_stores"]
        loops = " / ".join(str(loop["instructions"]) for loop in record["loops"]) if "sass_per_score" in record \
            else "-"
        per_score = record.get("sass_per_score")
        lines.append(
            f"| {_label(record['variant'])} | {_tile(record)}, {record['num_warps']}, {record['num_stages']} | "
            f"{record['registers']} | {'**' + str(spills) + '**' if spills else 0} | {shared} | {record['mma']} | "
            f"{'**yes**' if record['serialized_wgmma'] else 'no'} | {record['hgmma']} / {record['wgmma_waits']} | "
            f"{loops} | {per_score if per_score is not None else '-'} |")
    return "\n".join(lines)


def report_markdown(results, seconds, subset):
    """The report: per arch the default variants' table, then every variant that fails a gate. ``seconds``:
    {arch: compile seconds}."""
    import triton

    by_key = {arch: {r["key"]: r for r in records} for arch, records in results.items()}
    defaults = [v.key for v in default_table_variants()]
    parts = [f"# Offline compile report (triton {triton.__version__}, {datetime.date.today().isoformat()}, "
             f"subset {subset}, {sum(map(len, results.values()))} compiles in {sum(seconds.values()):.0f} s)", "",
             "Default variants: bf16, causal + int64 padding (HF's attention_mask), B=2, Hq=32, Hkv=8, L=4096; "
             "decode Hq=32, Hkv=8, Lq=1; rms_norm 8192 rows x N; rope H=32. SASS per loop iteration lists each "
             "inner loop (causal: the unmasked and the diagonal loop); per score uses the shortest loop with "
             "matrix work. Reference (quoted from issue 10, not compiled here): Triton's fused-attention tutorial "
             f"forward, D=128, 128x128 tile, TMA loads, 4 waits per 32 HGMMAs, "
             f"{TUTORIAL_REFERENCE['sass_per_score']} SASS instructions per score.", ""]
    for arch, records in results.items():
        rows = [by_key[arch][key] for key in defaults if key in by_key[arch]]
        parts += [f"## {arch} ({ARCHS[arch]['gpus']}; shared-memory limit {ARCHS[arch]['shared_limit']} B)", "",
                  markdown_table(rows, arch), ""]
        failing = [(r, gate_failures(r, arch)) for r in records]
        failing = [(r, f) for r, f in failing if f]
        parts.append(f"{len(records)} variants compiled in {seconds[arch]:.0f} s; {len(failing)} fail a gate"
                     + (":" if failing else "."))
        parts.append("")
        for record, failures in failing:
            parts.append(f"- `{record['key']}`: " + "; ".join(failures))
        parts.append("")
    return "\n".join(parts)


README_START, README_END = "<!-- static-report:start -->", "<!-- static-report:end -->"


def load_results(out_dir, archs):
    """``({arch: [record]}, {arch: seconds}, subset)`` from the ``<arch>.json`` files in ``out_dir``."""
    results, seconds, subsets = {}, {}, set()
    for arch in archs:
        path = os.path.join(out_dir, f"{arch}.json")
        if not os.path.exists(path):
            continue
        with open(path) as f:
            data = json.load(f)
        results[arch], seconds[arch] = data["records"], data["seconds"]
        subsets.add(data["subset"])
    return results, seconds, "+".join(sorted(subsets))


def readme_block(results, seconds):
    """The README's table: the default variants on sm_90a in full with the tutorial's reference row, then
    registers / spill bytes / shared KB of the attention defaults on every arch."""
    import triton

    by_key = {arch: {r["key"]: r for r in records} for arch, records in results.items()}
    defaults = [v.key for v in default_table_variants()]
    lines = [f"triton {triton.__version__}; bf16, causal + int64 padding (HF's `attention_mask`), the launchers' "
             "default tiles; B=2, Hq=32, Hkv=8, L=4096 (decode: Lq=1, 8 splits). Written by `python -m "
             "fusedformers.bench.static --readme README.md` from `bench/results/static/`.", ""]
    if "sm_90a" in by_key:
        rows = [by_key["sm_90a"][key] for key in defaults if key in by_key["sm_90a"]]
        lines.append(markdown_table(rows, "sm_90a"))
        ref = TUTORIAL_REFERENCE
        lines.append(f"| *{ref['kernel']}* D={ref['head_dim']} | {ref['tile']}, TMA | | | | wgmma | no | "
                     f"{ref['hgmma_waits']} | | {ref['sass_per_score']} |")
        lines.append("")
    attention = [key for key in defaults if key.split("/")[0] in ("fwd", "dkdv", "dq", "decode_split")]
    archs = list(by_key)
    lines.append("| registers / spill stores B / shared KB | " + " | ".join(
        f"{arch} (limit {ARCHS[arch]['shared_limit'] / 1024:g} KB)" for arch in archs) + " |")
    lines.append("| --- |" + " --- |" * len(archs))
    for key in attention:
        cells = []
        for arch in archs:
            record = by_key[arch].get(key)
            if record is None or "error" in record:
                cells.append("-" if record is None else "error")
                continue
            spills = record["spill_stores"]
            shared = f"{record['shared'] / 1024:.1f}"
            over = record["shared"] > record["shared_limit"]
            cells.append(f"{record['registers']} / {'**' + str(spills) + '**' if spills else 0} / "
                         f"{'**' + shared + '**' if over else shared}")
        label = _label(by_key[archs[0]][key]["variant"]) if key in by_key[archs[0]] else key
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append("")
    counts = []
    for arch, records in results.items():
        failing = sum(1 for r in records if gate_failures(r, arch))
        counts.append(f"{arch}: {len(records)} variants, {failing} failing a gate ({seconds[arch]:.0f} s)")
    lines.append("Full set (`bench/results/static/report.md` lists every failing variant): " + "; ".join(counts)
                 + ".")
    return "\n".join(lines)


def rewrite_readme(path, block):
    """Replace the text between README_START and README_END in ``path`` by ``block``."""
    with open(path) as f:
        text = f.read()
    if README_START not in text or README_END not in text:
        raise ValueError(f"{path}: no {README_START} ... {README_END} block to rewrite")
    head, rest = text.split(README_START, 1)
    tail = rest.split(README_END, 1)[1]
    with open(path, "w") as f:
        f.write(f"{head}{README_START}\n{block}\n{README_END}{tail}")


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m fusedformers.bench.static", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default=",".join(DEFAULT_ARCHS),
                        help=f"comma-separated targets among {', '.join(ARCHS)} (default: all)")
    parser.add_argument("--subset", choices=("ci", "all"), default="all",
                        help="ci: the representative subset the gates compile; all: every variant (default)")
    parser.add_argument("--out", default=DEFAULT_OUT, help="where <arch>.json and report.md go "
                        "(default: bench/results/static)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compile processes (default: CPUs)")
    parser.add_argument("--list", action="store_true", help="print the variant keys and exit")
    parser.add_argument("--from-json", action="store_true",
                        help="compile nothing: write report.md from the <arch>.json files already in --out")
    parser.add_argument("--readme", default=None, metavar="README.md",
                        help="also rewrite the offline compile report block of this file")
    args = parser.parse_args(argv)
    args.arch = [a.strip() for a in args.arch.split(",") if a.strip()]
    unknown = [a for a in args.arch if a not in ARCHS]
    if unknown:
        parser.error(f"--arch: unknown {unknown}; known: {', '.join(ARCHS)}")
    return args


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        # @triton.jit under the interpreter cannot be compiled: run again in a process without it
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        return subprocess.run([sys.executable, "-m", "fusedformers.bench.static", *argv], env=env).returncode
    args = parse_args(argv)
    if args.list:
        for arch in args.arch:
            for variant in (all_variants(arch) if args.subset == "all" else ci_variants(arch)):
                print(arch, variant.key)
        return 0
    if args.from_json:
        results, seconds, subset = load_results(args.out, args.arch)
    else:
        results, seconds, subset = {}, {}, args.subset
        for arch in args.arch:  # one file per arch as soon as it is done
            results[arch], seconds[arch] = run(arch, args.subset, args.jobs)
            print("wrote", write_json(args.out, arch, results[arch], args.subset, seconds[arch]), flush=True)
    report = report_markdown(results, seconds, subset)
    with open(os.path.join(args.out, "report.md"), "w") as f:
        f.write(report + "\n")
    print(report)
    if args.readme:
        rewrite_readme(args.readme, readme_block(results, seconds))
        print("updated", args.readme)
    return 0


if __name__ == "__main__":
    sys.exit(main())

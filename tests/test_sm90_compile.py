"""Compile the attention and decode kernels ahead of time, on any machine, with the tiles the tile policy gives each
GPU generation (sm_90, sm_80, sm_86, sm_89, sm_75): a script for sweeping tile tables by hand. The report and CI
gates over every variant the launchers pick are bench/static.py's (tests/test_static_report.py); CI runs this
file's T4 family (sm_75, which the report does not cover).

The interpreter runs the kernels' logic on CPU but never compiles them, so a kernel that fails to lower for
the GPU, spills registers, or asks for more shared memory than sm_90 has (227 KB per block) would pass the CPU
suite and break on the GPU. triton ships ptxas, so this compiles to a cubin with the same block sizes, warps
and stages that the launchers choose on a GPU, and checks the resources.

Under TRITON_INTERPRET=1 (the CPU test suite) ``@triton.jit`` yields interpreter objects that cannot be
compiled, so each test runs this file as a script in a subprocess with the interpreter off:
``python tests/test_sm90_compile.py attention|decode|rms_norm|layer_norm|tiles_sm86|...``.
"""
import importlib
import os
import re
import subprocess
import sys
import tempfile
import types

import pytest
import torch
import triton

try:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
except ImportError:  # pragma: no cover - triton moved these; fail loudly rather than skip
    GPUTarget = ASTSource = None

attention_mod = importlib.import_module("fusedformers.kernels.attention")
decode_mod = importlib.import_module("fusedformers.kernels.decode_attention")
rms_norm_mod = importlib.import_module("fusedformers.kernels.rms_norm")
rope_mod = importlib.import_module("fusedformers.kernels.rope")
silu_mul_mod = importlib.import_module("fusedformers.kernels.silu_mul")
tiles = importlib.import_module("fusedformers.kernels.tiles")

SM90_MAX_SHARED_BYTES = 232448  # 227 KB: the most dynamic shared memory one block may use on sm_90
# the most shared memory one block may opt in to (cudaDevAttrMaxSharedMemoryPerBlockOptin) per target arch
MAX_SHARED_BYTES = {90: SM90_MAX_SHARED_BYTES, 89: 101376, 86: 101376, 80: 166912, 75: 65536}
CUDA = torch.device("cuda")


def _gpu(name, major, minor, shared_memory_per_block_optin, multi_processor_count):
    return types.SimpleNamespace(name=name, major=major, minor=minor, multi_processor_count=multi_processor_count,
                                 shared_memory_per_block_optin=shared_memory_per_block_optin)


# torch.cuda.get_device_properties of one GPU per target arch (the fields the tile policy reads), so the policy
# can be asked for each arch's tiles on any machine (kernels/tiles.py gpu_info)
GPU_PROPERTIES = {
    90: _gpu("NVIDIA H100 80GB HBM3", 9, 0, 232448, 132),
    80: _gpu("NVIDIA A100-SXM4-80GB", 8, 0, 166912, 108),
    86: _gpu("NVIDIA A10", 8, 6, 101376, 72),
    89: _gpu("NVIDIA L4", 8, 9, 101376, 58),
    75: _gpu("Tesla T4", 7, 5, 65536, 40),
}
FLOAT_ARGS = ("qk_scale", "sm_scale", "eps", "dropout_p", "dropout_scale")
TRITON_DTYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def compile_sm90(fn, pointer_types, constexprs, num_warps, num_stages, arch=90):
    """Compile ``fn`` for sm_90 (or the compute capability ``arch``, e.g. 80, 86, 89, 75) as the JIT specialises
    a real launch: pointers 16-byte aligned, unit strides (``stride_*d``, ``stride_mask_n``) constant 1, other
    strides divisible by 16; scale/eps args fp32, other ints i32."""
    assert ASTSource is not None, "triton.compiler.ASTSource / GPUTarget not found in this triton"
    constexprs = dict(constexprs)
    signature, attrs = {}, {}
    for index, name in enumerate(fn.arg_names):
        if name.startswith("stride_") and (name.endswith("d") or name == "stride_mask_n"):
            constexprs.setdefault(name, 1)
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in pointer_types:
            signature[name] = pointer_types[name]
            attrs[(index,)] = [["tt.divisibility", 16]]
        elif name in FLOAT_ARGS:
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
            if name.startswith("stride_"):
                attrs[(index,)] = [["tt.divisibility", 16]]
    return triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
                          target=GPUTarget("cuda", arch, 32),
                          options=dict(num_warps=num_warps, num_stages=num_stages))


def ptxas_report(compiled):
    """(registers, spill store bytes) that ptxas reports for the kernel (spills never show in the PTX itself),
    for the arch it was compiled for (sm_90 as sm_90a, as Triton does)."""
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    arch = compiled.metadata.target.arch
    gpu_name = "sm_90a" if arch == 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        ptx_path = os.path.join(tmp, "kernel.ptx")
        with open(ptx_path, "w") as f:
            f.write(compiled.asm["ptx"])
        result = subprocess.run([ptxas, "-v", "--gpu-name", gpu_name, ptx_path, "-o", os.path.join(tmp, "k.cubin")],
                                capture_output=True, text=True, check=True)
    report = result.stdout + result.stderr
    registers = int(re.search(r"Used (\d+) registers", report).group(1))
    spill_stores = int(re.search(r"(\d+) bytes spill stores", report).group(1))
    return registers, spill_stores


def assert_fits_sm90(name, compiled):
    """No spills, and no more shared memory than the compiled arch allows (sm_90 or another, MAX_SHARED_BYTES)."""
    arch = compiled.metadata.target.arch
    shared, limit = compiled.metadata.shared, MAX_SHARED_BYTES[arch]
    assert shared <= limit, f"{name}: {shared} bytes of shared memory > sm_{arch}'s {limit}"
    registers, spill_stores = ptxas_report(compiled)
    print(f"  sm_{arch} {name}: {registers} registers, {spill_stores} B spill stores, {shared} B shared", flush=True)
    assert spill_stores == 0, f"{name}: ptxas spills {spill_stores} bytes of registers ({registers} registers)"


def check_attention_kernels(dtype, head_dim, dropout=False, arch=90, window=False):
    """The tiles the tile policy picks for ``arch``'s GPU (GPU_PROPERTIES) fit that arch (``window``: the
    sliding-window variants, which share the tiles)."""
    gpu = tiles.gpu_info(GPU_PROPERTIES[arch])
    element = "*" + TRITON_DTYPE[dtype]
    pointers = dict(q_ptr=element, k_ptr=element, v_ptr=element, out_ptr=element, dout_ptr=element,
                    dk_ptr=element, dv_ptr=element, dq_ptr=element, lse_ptr="*fp32", delta_ptr="*fp32",
                    mask_ptr="*u8", kv_start_ptr="*i32", kv_end_ptr="*i32", kv_holes_ptr="*i32",
                    kv_batch_index_ptr="*i64", seed_ptr="*i64")
    block_d = triton.next_power_of_2(head_dim)
    for name, kernel in (("fwd", attention_mod._attn_fwd_kernel), ("dkdv", attention_mod._attn_bwd_dkdv_kernel),
                         ("dq", attention_mod._attn_bwd_dq_kernel)):
        try:
            block_m, block_n, num_warps, num_stages = tiles._block_config(name, head_dim, dtype, CUDA, dropout, gpu)
        except RuntimeError as error:  # the policy says this kernel does not fit this GPU (T4, D=256 backward)
            print(f"  sm_{arch} {kernel.__name__} {dtype} D={head_dim}: no tile: {error}", flush=True)
            continue
        common = dict(GROUP_SIZE=4, HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_n,
                      CAUSAL=True, HAS_WINDOW=window, HAS_PADDING=True, HAS_KV_INDEX=False, HAS_DROPOUT=dropout,
                      DOT_PRECISION=tiles.dot_precision(dtype))
        compiled = compile_sm90(kernel, pointers, common, num_warps, num_stages, arch)
        assert_fits_sm90(f"{kernel.__name__} {dtype} D={head_dim}{' dropout' if dropout else ''}"
                         f"{' window' if window else ''} "
                         f"{block_m}x{block_n} w{num_warps} s{num_stages}", compiled)
        if window:  # and without padding, on its own tile
            tile = tiles._block_config(name, head_dim, dtype, CUDA, dropout, gpu, window_only=True)
            compiled = compile_sm90(kernel, pointers, dict(common, BLOCK_M=tile[0], BLOCK_N=tile[1],
                                                           HAS_PADDING=False), tile[2], tile[3], arch)
            assert_fits_sm90(f"{kernel.__name__} {dtype} D={head_dim} window, no padding "
                             f"{tile[0]}x{tile[1]} w{tile[2]} s{tile[3]}", compiled)
    compiled = compile_sm90(attention_mod._bwd_preprocess_kernel, pointers,
                            dict(HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=tiles.elementwise_rows(CUDA)), 4, 1,
                            arch)
    assert_fits_sm90("_bwd_preprocess_kernel", compiled)


def check_decode_kernels(dtype, head_dim, num_heads, num_kv_heads, q_len, arch=90, window=False):
    plan = tiles.decode_plan(2, num_heads, num_kv_heads, q_len, 4096, head_dim, num_splits=8, dtype=dtype,
                             gpu=tiles.gpu_info(GPU_PROPERTIES[arch]))
    element = "*" + TRITON_DTYPE[dtype]
    pointers = dict(q_ptr=element, k_ptr=element, v_ptr=element, out_ptr=element, part_acc_ptr="*fp32",
                    part_max_ptr="*fp32", part_sum_ptr="*fp32", mask_ptr="*u8", kv_start_ptr="*i32",
                    kv_end_ptr="*i32", kv_batch_index_ptr="*i64")
    compiled = compile_sm90(decode_mod._decode_split_kernel, pointers, dict(
        GROUP_SIZE=num_heads // num_kv_heads, HEAD_DIM=head_dim, BLOCK_M=plan["block_m"], BLOCK_N=plan["block_n"],
        BLOCK_D=plan["block_d"], CAUSAL=True, HAS_WINDOW=window, HAS_PADDING=True, HAS_KV_INDEX=False,
        WRITE_OUT=False, DOT_PRECISION=tiles.dot_precision(dtype)), plan["num_warps"], plan["num_stages"], arch)
    assert_fits_sm90(f"_decode_split_kernel {dtype} D={head_dim}{' window' if window else ''} "
                     f"{plan['block_m']}x{plan['block_n']} "
                     f"w{plan['num_warps']} s{plan['num_stages']}", compiled)
    compiled = compile_sm90(decode_mod._decode_combine_kernel, pointers, dict(
        HEAD_DIM=head_dim, BLOCK_R=plan["combine_rows"], BLOCK_S=plan["combine_splits"],
        BLOCK_D=plan["block_d"]), plan["combine_num_warps"], 1, arch)
    assert_fits_sm90(f"_decode_combine_kernel {plan['combine_rows']} rows x {plan['combine_splits']} splits",
                     compiled)


def check_rms_norm_kernels(dtype, hidden, layer_norm=False):
    """RMSNorm's kernels with the fused residual (and the gradient of h), or (``layer_norm``) LayerNorm's: the
    forward with the residual, writing h (training) and not (inference), and the backward."""
    block_n = triton.next_power_of_2(hidden)
    num_warps = tiles.rms_norm_num_warps(block_n)
    element = "*" + TRITON_DTYPE[dtype]
    pointers = dict(x_ptr=element, residual_ptr=element, weight_ptr=element, bias_ptr=element, out_ptr=element,
                    h_ptr=element, mean_ptr="*fp32", rstd_ptr="*fp32", dout_ptr=element, dh_ptr=element,
                    dx_ptr=element, dweight_partial_ptr="*fp32", dbias_partial_ptr="*fp32")
    what = f"{'LayerNorm' if layer_norm else 'RMSNorm'} {dtype} N={hidden}"
    for store_h in ((False, True) if layer_norm else (True,)):
        compiled = compile_sm90(rms_norm_mod._rms_norm_fwd_kernel, pointers,
                                dict(HAS_RESIDUAL=True, STORE_H=store_h, IS_LAYER_NORM=layer_norm, BLOCK_N=block_n),
                                num_warps, 1)
        assert_fits_sm90(f"_rms_norm_fwd_kernel {what}{' storing h' if store_h else ''}", compiled)
    compiled = compile_sm90(rms_norm_mod._rms_norm_bwd_kernel, pointers,
                            dict(HAS_DH=not layer_norm, IS_LAYER_NORM=layer_norm, ROWS_PER_PROGRAM=8,
                                 BLOCK_N=block_n), num_warps, 1)
    assert_fits_sm90(f"_rms_norm_bwd_kernel {what}", compiled)


def check_rope_kernel(dtype, num_heads, head_dim, num_kv_heads=0):
    """One tensor (``num_kv_heads`` 0, the backward), or the packed q/k/v: into a KV cache (forward) and without
    (backward)."""
    element = "*" + TRITON_DTYPE[dtype]
    block_h, block_half, num_warps = tiles.rope_plan(min(num_heads, num_kv_heads or num_heads), head_dim)
    pointers = {name: element for name in ("q_ptr", "k_ptr", "v_ptr", "cos_ptr", "sin_ptr", "q_out_ptr", "k_out_ptr",
                                           "v_out_ptr")}
    pointers["cache_position_ptr"] = "*i64"
    flags = [dict(BACKWARD=True, QKV=False, TO_CACHE=False)] if not num_kv_heads else \
        [dict(BACKWARD=False, QKV=True, TO_CACHE=True), dict(BACKWARD=True, QKV=True, TO_CACHE=False)]
    for flag in flags:
        compiled = compile_sm90(rope_mod._rope_kernel, pointers,
                                dict(flag, HALF=head_dim // 2, BLOCK_HALF=block_half, BLOCK_H=block_h), num_warps, 1)
        assert_fits_sm90(f"_rope_kernel {dtype} H={num_heads}/{num_kv_heads} D={head_dim} {flag}", compiled)


def check_silu_mul_kernel(dtype, intermediate_size):
    element = "*" + TRITON_DTYPE[dtype]
    block_n, num_warps = tiles.silu_mul_plan(intermediate_size)
    pointers = dict(gate_up_ptr=element, dout_ptr=element, out_ptr=element)
    for backward in (False, True):
        compiled = compile_sm90(silu_mul_mod._silu_mul_kernel, pointers, dict(BACKWARD=backward, BLOCK_N=block_n),
                                num_warps, 1)
        assert_fits_sm90(f"_silu_mul_kernel {dtype} I={intermediate_size} backward={backward}", compiled)


def check_beam_kernels(num_beams, ngram, num_eos):
    """The beam-search bookkeeping kernels as generate launches them (kernels/beam_search.py)."""
    from fusedformers.kernels import beam_search as beam_mod
    pointers = dict(scores_ptr="*fp32", seqs_ptr="*i64", running_scores_ptr="*fp32", step_ptr="*i64",
                    eos_ptr="*i64", forced_eos_ptr="*i64")
    compiled = compile_sm90(beam_mod._beam_scores_kernel, pointers,
                            dict(NGRAM=ngram, NUM_EOS=num_eos, NUM_FORCED_EOS=1, HAS_FORCED_BOS=True, BLOCK_V=1024,
                                 BLOCK_J=64), 4, 1)
    assert_fits_sm90(f"_beam_scores_kernel ngram={ngram}", compiled)
    num_candidates = max(2, 1 + num_eos) * num_beams
    pointers = {name: ("*fp32" if name in ("cand_scores_ptr", "running_scores_ptr", "finished_scores_ptr",
                                           "length_scale_ptr") else
                       "*i1" if name in ("is_finished_ptr", "can_improve_ptr", "stop_flags_ptr", "stopped_ptr") else
                       "*i32" if name == "arrivals_ptr" else "*i64")
                for name in beam_mod._beam_update_kernel.arg_names if name.endswith("_ptr")}
    compiled = compile_sm90(beam_mod._beam_update_kernel, pointers,
                            dict(K=num_beams, NUM_EOS=num_eos, EARLY_STOP=False, BOUND_AT_MAX_LENGTH=False,
                                 MULTIPLY=True, BLOCK_K=triton.next_power_of_2(num_beams),
                                 BLOCK_C=triton.next_power_of_2(num_candidates),
                                 BLOCK_M=triton.next_power_of_2(num_beams + num_candidates), BLOCK_T=128,
                                 BLOCK_B=128), beam_mod.update_num_warps(num_beams, num_candidates), 1)
    assert_fits_sm90(f"_beam_update_kernel K={num_beams}", compiled)


def check_autotune_candidates(dtype, kernel_name):
    """Every tile autotuning may pick (kernels/tiles.py _GPU_TILE_CANDIDATES) for this kernel."""
    element = "*" + TRITON_DTYPE[dtype]
    pointers = dict(q_ptr=element, k_ptr=element, v_ptr=element, out_ptr=element, dout_ptr=element,
                    dk_ptr=element, dv_ptr=element, dq_ptr=element, lse_ptr="*fp32", delta_ptr="*fp32",
                    mask_ptr="*u8", kv_start_ptr="*i32", kv_end_ptr="*i32", kv_holes_ptr="*i32",
                    kv_batch_index_ptr="*i64", seed_ptr="*i64")
    kernel = {"fwd": attention_mod._attn_fwd_kernel, "dkdv": attention_mod._attn_bwd_dkdv_kernel,
              "dq": attention_mod._attn_bwd_dq_kernel}[kernel_name]
    for head_dim in tiles._GPU_TILE_CANDIDATES[kernel_name]:
        for block_m, block_n, num_warps, num_stages in tiles.tile_candidates(kernel_name, head_dim):
            constexprs = dict(GROUP_SIZE=4, HEAD_DIM=head_dim, BLOCK_D=head_dim, BLOCK_M=block_m, BLOCK_N=block_n,
                              CAUSAL=True, HAS_WINDOW=False, HAS_PADDING=True, HAS_KV_INDEX=False,
                              HAS_DROPOUT=False, DOT_PRECISION="tf32")
            compiled = compile_sm90(kernel, pointers, constexprs, num_warps, num_stages)
            assert_fits_sm90(f"{kernel.__name__} D={head_dim} {block_m}x{block_n} w{num_warps} s{num_stages}",
                             compiled)


DECODE_CASES = [(torch.bfloat16, 128, 32, 8, 1), (torch.float16, 64, 16, 16, 1), (torch.bfloat16, 256, 8, 1, 4),
                (torch.float32, 80, 8, 2, 16), (torch.bfloat16, 128, 32, 2, 16),
                (torch.bfloat16, 256, 32, 4, 16)]  # the largest split tile: 64 rows x D=256


def check_tiles_for_arch(kind, dtype, head_dim, *rest):
    """One attention or decode case of another GPU generation: ``rest`` ends with the arch (80, 86, 89, 75)."""
    (check_attention_kernels if kind == "attention" else check_decode_kernels)(dtype, head_dim, *rest)


def _arch_cases(arch):
    """Every tile table entry of ``arch``'s shared-memory class (kernels/tiles.py SHARED_MEMORY_CLASSES): each
    16-bit head dim class (fp16 shares bf16's tiles: at D=128 only), fp32, dropout, and the decode kernels.
    Before sm_80 there is no bf16: fp16 instead."""
    half = torch.bfloat16 if arch >= 80 else torch.float16
    cases = [("attention", half, head_dim, False, arch) for head_dim in (64, 80, 128, 256)]
    cases += [("attention", torch.float16, 128, False, arch)] if arch >= 80 else []
    cases += [("attention", torch.float32, head_dim, False, arch) for head_dim in (64, 256)]
    cases += [("attention", half, head_dim, True, arch) for head_dim in (64, 128, 256)]
    cases += [("decode", half if dtype == torch.bfloat16 else dtype, *shape, arch)
              for dtype, *shape in DECODE_CASES]
    return cases


def _ci_subset(cases):
    """What CI compiles of a ``tiles_sm*`` family (the whole family takes ~100 s per arch, sm_75 several minutes):
    the two head dims whose sm_90 tiles overflow 99 KB (D=128, 256), training at D=128, and LLaMA-shaped decode.
    ``python tests/test_sm90_compile.py tiles_sm86`` compiles all of them."""
    return [case for case in cases if case[0] == "attention" and case[1] != torch.float32 and
            (case[2:4] in ((128, False), (256, False), (128, True)))
            or case[0] == "decode" and case[2:6] == (128, 32, 8, 1)]


CASES = {
    # every 16-bit head dim class (80 pads to 128); fp32 at each tile class
    "attention": (check_attention_kernels, [(dtype, head_dim) for dtype in (torch.bfloat16, torch.float16)
                                            for head_dim in (64, 80, 128, 256)]
                  + [(torch.float32, head_dim) for head_dim in (64, 128, 256)]
                  # dropout (training): BART's D=64 and LLaMA's D=128
                  + [(torch.bfloat16, head_dim, True) for head_dim in (64, 128, 256)]
                  # sliding window: Mistral's and Qwen2's D=128, Gemma 2's D=256
                  + [(torch.bfloat16, head_dim, False, 90, True) for head_dim in (128, 256)]),
    "decode": (check_decode_kernels, DECODE_CASES + [(torch.bfloat16, 128, 32, 8, 1, 90, True)]),
    "autotune": (check_autotune_candidates, [(torch.bfloat16, name) for name in ("fwd", "dkdv", "dq")]),
    # the other GPU generations' tile classes (sm_89 shares sm_86's tables: compiled for both)
    **{f"tiles_sm{arch}": (check_tiles_for_arch, _arch_cases(arch)) for arch in (80, 86, 89, 75)},
    # beam search: BART-large-cnn's 4 beams, n-gram 3, one eos; 8 beams with two eos ids
    "beam_search": (check_beam_kernels, [(4, 3, 1), (8, 0, 2), (16, 3, 1)]),
    "rope": (check_rope_kernel, [(torch.bfloat16, 32, 64), (torch.bfloat16, 8, 128), (torch.float16, 64, 128),
                                 (torch.float32, 32, 256), (torch.bfloat16, 16, 80),
                                 # the packed q/k/v: GQA, MHA, fp32
                                 (torch.bfloat16, 32, 128, 8), (torch.float16, 32, 128, 32),
                                 (torch.float32, 64, 128, 8), (torch.bfloat16, 16, 64, 16)]),
    "silu_mul": (check_silu_mul_kernel, [(dtype, size) for dtype in (torch.bfloat16, torch.float32)
                                         for size in (11008, 14336, 28672)]),
    # hidden 16384: the backward spills 156 B (a whole row in registers; bench/NOTES.md step 11)
    "rms_norm": (check_rms_norm_kernels, [(dtype, hidden) for dtype in (torch.bfloat16, torch.float32)
                                          for hidden in (1024, 5120, 8192)]),
    # BART-base's and BART-large's d_model, and a wide one
    "layer_norm": (check_rms_norm_kernels, [(dtype, hidden, True) for dtype in (torch.bfloat16, torch.float32)
                                            for hidden in (768, 1024, 4096)]),
}


def _family_cases(family, ci=False):
    cases = CASES[family][1]
    return _ci_subset(cases) if ci and family.startswith("tiles_") else cases


# CI runs the T4 family only: bench/static.py's gates (tests/test_static_report.py) compile the others' variants for
# sm_90a, sm_89, sm_86 and sm_80; the script families stay for sweeping tiles by hand
@pytest.mark.slow
@pytest.mark.parametrize("family", ["tiles_sm75", "beam_search"])
def test_kernels_compile_for_sm90(family):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, os.path.abspath(__file__), family, "--ci"], env=env,
                            capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, f"compile check of {family} failed:\n{result.stdout}\n{result.stderr}"
    assert result.stdout.count("ok ") == len(_family_cases(family, ci=True)), result.stdout


if __name__ == "__main__":
    check = CASES[sys.argv[1]][0]
    cases = _family_cases(sys.argv[1], ci="--ci" in sys.argv[2:])
    for case in cases:
        check(*case)
        print("ok", sys.argv[1], case, flush=True)

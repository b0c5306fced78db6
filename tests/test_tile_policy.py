"""The per-GPU tile policy (kernels/tiles.py) without a GPU: fake device properties pick the shared-memory class,
each class gets its own tables, bf16 below sm_80 fails naming the GPU, and the split-KV decode plan follows its
documented rule. That every table entry fits its class (shared memory, no spills) is checked by compiling it
for the class's architectures: tests/test_sm90_compile.py, families tiles_sm80/86/89/75."""
import types

import pytest
import torch

from fusedformers.kernels import tiles
from tests.test_sm90_compile import GPU_PROPERTIES, MAX_SHARED_BYTES

KERNELS = ("fwd", "dkdv", "dq")


def _gpu(arch):
    return tiles.gpu_info(GPU_PROPERTIES[arch])


def test_each_gpu_gets_the_class_of_its_shared_memory():
    assert {arch: _gpu(arch).tile_class for arch in GPU_PROPERTIES} == {
        90: "sm90", 80: "sm80", 86: "sm86", 89: "sm86", 75: "sm75"}
    # the class is chosen by shared memory, not by the compute capability: sm_100 (B200) has sm_90's 227 KB,
    # sm_120 (RTX 50) sm_86's 99 KB
    b200 = types.SimpleNamespace(name="NVIDIA B200", major=10, minor=0, shared_memory_per_block_optin=232448,
                                 multi_processor_count=148)
    rtx = types.SimpleNamespace(name="NVIDIA GeForce RTX 5090", major=12, minor=0,
                                shared_memory_per_block_optin=101376, multi_processor_count=170)
    assert tiles.gpu_info(b200).tile_class == "sm90" and tiles.gpu_info(rtx).tile_class == "sm86"
    # each class's limit is the arch limit the compile test checks against
    for name, (limit, archs, *_) in tiles.SHARED_MEMORY_CLASSES.items():
        assert all(MAX_SHARED_BYTES[arch] == limit for arch in archs), name
    small = types.SimpleNamespace(name="Tiny GPU", major=7, minor=0, shared_memory_per_block_optin=49152,
                                  multi_processor_count=8)
    with pytest.raises(RuntimeError, match="Tiny GPU allows 49152 bytes"):
        tiles.gpu_info(small)


def test_device_properties_are_read_once_per_device(monkeypatch):
    calls = []

    def properties(index):
        calls.append(index)
        return GPU_PROPERTIES[86 if index == 0 else 75]

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", properties)
    tiles._device_gpu.cache_clear()
    try:
        assert tiles.device_gpu(torch.device("cuda", 0)).tile_class == "sm86"
        assert tiles.device_gpu("cuda:0").name == "NVIDIA A10"
        assert tiles.device_gpu(torch.device("cuda", 1)).tile_class == "sm75"
        assert tiles._block_config("dq", 128, torch.float16, torch.device("cuda", 1)) == \
            tiles._SM75_TILES["dq"][128]
        assert calls == [0, 1]
        assert tiles.device_gpu(torch.device("cpu")) is None
    finally:
        tiles._device_gpu.cache_clear()


@pytest.mark.parametrize("arch", sorted(GPU_PROPERTIES))
def test_every_class_has_a_tile_for_every_case(arch):
    gpu = _gpu(arch)
    dtypes = (torch.float16, torch.float32) + ((torch.bfloat16,) if arch >= 80 else ())
    for kernel in KERNELS:
        for head_dim in (16, 64, 80, 128, 256):
            for dtype in dtypes:
                for dropout in (False, True):
                    if arch == 75 and kernel != "fwd" and head_dim > 128:
                        with pytest.raises(RuntimeError, match=r"backward .* at head dim \d+ does not fit Tesla T4"):
                            tiles._block_config(kernel, head_dim, dtype, torch.device("cuda"), dropout, gpu)
                        continue
                    tile = tiles._block_config(kernel, head_dim, dtype, torch.device("cuda"), dropout, gpu)
                    block_m, block_n, warps, stages = tile
                    assert block_m & (block_m - 1) == 0 and block_n & (block_n - 1) == 0
                    assert warps in (4, 8) and stages in (1, 2, 3, 4)
                    if arch == 90 and not dropout:  # the sm_90 tables are the ones autotuning and bench know
                        table = tiles._GPU_TILES_FP32 if dtype == torch.float32 else tiles._GPU_TILES
                        assert tile == table[kernel][tiles._head_dim_class(table[kernel], head_dim)]
    # the sm_90 class is the only one with autotuning candidates; the interpreter keeps its small tiles
    assert bool(tiles.tile_candidates("fwd", 128, gpu)) == (arch == 90)
    assert tiles._block_config("dq", 128, torch.bfloat16, torch.device("cpu")) == (16, 16, 4, 1)


def test_tiles_that_exceed_99_kb_are_not_given_to_sm86():
    """The issue's failure: sm_90's dQ tiles need 118,784 B (D=128) and 106,496 B (D=256) on sm_86, over its
    101,376 B; the sm_86 class must not pick them."""
    gpu = _gpu(86)
    assert tiles._block_config("dq", 128, torch.bfloat16, None, False, gpu) != (128, 64, 8, 3)
    assert tiles._block_config("dq", 256, torch.bfloat16, None, False, gpu) != (64, 32, 8, 2)


def test_bf16_below_sm80_names_the_gpu():
    t4 = _gpu(75)
    with pytest.raises(TypeError, match=r"bf16 attention needs compute capability >= 8.0; Tesla T4 is 7.5"):
        tiles._block_config("fwd", 64, torch.bfloat16, None, False, t4)
    with pytest.raises(TypeError, match="Tesla T4 is 7.5"):
        tiles.decode_plan(1, 8, 8, 1, 1000, 64, dtype=torch.bfloat16, gpu=t4)
    # fp16 on a T4: CUDA-core dots (the sm_75 tiles; decode: the fp32 plan)
    assert tiles._block_config("fwd", 128, torch.float16, None, False, t4) == tiles._SM75_TILES["fwd"][128]
    plan = tiles.decode_plan(1, 8, 8, 1, 1000, 64, dtype=torch.float16, gpu=t4)
    assert (plan["block_m"], plan["block_n"], plan["num_stages"]) == (16, 16, 2)


# ---------------------------------------------------------------------------------------------------------------
# split-KV decode plan


@pytest.mark.parametrize("shape, splits, split_keys", [
    ((1, 8, 4096), 16, 256), ((1, 8, 8192), 32, 256), ((1, 8, 32768), 64, 512), ((16, 8, 8192), 5, 1664),
    ((64, 8, 4096), 1, 4096)], ids=str)
def test_decode_splits_on_an_h100(shape, splits, split_keys):
    """The documented figures: Llama-3-8B-like GQA (32 query heads, 8 kv heads), D = 128, one new token."""
    batch, num_kv_heads, k_len = shape
    plan = tiles.decode_plan(batch, 32, num_kv_heads, 1, k_len, 128, gpu=_gpu(90))
    assert (plan["num_splits"], plan["split_size"]) == (splits, split_keys)
    assert (plan["combine_rows"], plan["combine_splits"]) == (4, 8)


@pytest.mark.parametrize("arch", [90, 80, 86])
def test_decode_splits_have_at_least_256_keys(arch):
    gpu = _gpu(arch)
    for batch in (1, 2, 8, 64):
        for num_heads, num_kv_heads in ((32, 8), (32, 32), (8, 1)):
            for k_len in (1, 255, 256, 511, 700, 4096, 8193, 131072):
                for q_len in (1, 4):
                    plan = tiles.decode_plan(batch, num_heads, num_kv_heads, q_len, k_len, 128, gpu=gpu)
                    splits = plan["num_splits"]
                    assert 1 <= splits <= tiles.MAX_SPLITS
                    assert plan["split_size"] % plan["block_n"] == 0
                    assert (splits - 1) * plan["split_size"] < k_len <= splits * plan["split_size"]
                    if splits > 1:
                        assert plan["split_size"] >= tiles.MIN_SPLIT_KEYS
                        # splitting only while the launch is below 2 programs per SM
                        assert batch * num_kv_heads * plan["num_row_blocks"] < 2 * gpu.sm_count

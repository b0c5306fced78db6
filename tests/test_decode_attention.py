"""Split-KV decode attention (kernels/decode_attention.py) against the eager reference.

Every case writes into a NaN-poisoned ``out`` buffer, so an element the kernels fail to write fails the test.
The kernel's error against float64 truth may be at most 2x the eager same-dtype error plus a small atol.
On CPU the kernels run in Triton's interpreter: shapes stay small there; larger shapes run only on a GPU.
"""
import importlib
import math

import pytest
import torch

from fusedformers.kernels import tiles
from fusedformers.kernels.decode_attention import decode_attention, decode_plan, key_padding_range
from fusedformers.kernels.reference import attention_reference
from tests.conftest import ON_GPU
from tests.helpers import (
    DTYPE_PARAMS,
    assert_within_eager_error,
    causal_id,
    dtype_id,
    lengths_mask,
    make_qkv,
    params,
    poison_,
    to64,
)
from tests.test_sm90_compile import GPU_PROPERTIES

decode_module = importlib.import_module("fusedformers.kernels.decode_attention")

def _check(name, q, k, v, out=None, num_splits=None, **kwargs):
    """Run the kernel into a poisoned buffer and compare with float64 truth within the eager error budget."""
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    poison_(out)
    got = decode_attention(q, k, v, out=out, num_splits=num_splits, **kwargs)
    assert got is out
    ref_kwargs = {key: val for key, val in kwargs.items() if key != "key_range"}
    expected64 = attention_reference(*to64(q, k, v), **ref_kwargs)
    eager = attention_reference(q, k, v, **ref_kwargs)
    assert_within_eager_error(name, got, expected64, eager)
    return got


# ---------------------------------------------------------------------------------------------------------------
# dtypes, head dims, shapes


@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
@pytest.mark.parametrize("head_dim", [16, 64, 80, 96, 128, 256], ids="D{}".format)
def test_dtypes_and_head_dims(dtype, head_dim, device):
    q, k, v = make_qkv(2, 4, 2, 3, 37, head_dim, dtype, device)
    mask = lengths_mask([37, 30], 37, device, left=True)
    _check(f"{dtype} D={head_dim}", q, k, v, causal=True, key_padding_mask=mask)


@pytest.mark.parametrize("heads", [  # the quick loop: GQA 4:1 only
    pytest.param((2, 2), id="mha", marks=pytest.mark.slow), pytest.param((8, 2), id="gqa4"),
    pytest.param((4, 1), id="mqa", marks=pytest.mark.slow)])
@pytest.mark.parametrize("q_len", [1, 3, 16], ids="Lq{}".format)
@pytest.mark.parametrize("k_len", params([1, 37, 200], id="Lk{}".format, slow=lambda k_len: k_len == 200))
@pytest.mark.parametrize("causal", [True, False], ids=causal_id)
def test_shapes(heads, q_len, k_len, causal, device):
    num_heads, num_kv_heads = heads
    q, k, v = make_qkv(2, num_heads, num_kv_heads, q_len, k_len, 64, torch.float16, device)
    # Lq > Lk with the default past_len = Lk - Lq < 0: the first queries see no key and must output zeros
    _check(f"H={heads} Lq={q_len} Lk={k_len} causal={causal}", q, k, v, causal=causal)


@pytest.mark.parametrize("q_len", params([1, 4], id="Lq{}".format, slow=lambda q_len: q_len == 4))
@pytest.mark.parametrize("past_len", [0, 10, "default", 200], ids="past_{}".format)
def test_explicit_past_len(q_len, past_len, device):
    k_len = 70
    past_len = k_len - q_len if past_len == "default" else past_len  # 200 > Lk: every key visible
    q, k, v = make_qkv(2, 4, 2, q_len, k_len, 32, torch.bfloat16, device)
    mask = lengths_mask([70, 55], k_len, device)
    _check(f"past_len={past_len}", q, k, v, causal=True, past_len=past_len, key_padding_mask=mask)


def test_sm_scale(device):
    q, k, v = make_qkv(1, 4, 4, 2, 45, 64, torch.float32, device)
    _check("sm_scale", q, k, v, causal=False, sm_scale=0.3)


@pytest.mark.parametrize("heads_q_len", [(8, 1, 16), (12, 1, 7), (16, 2, 9)], ids=["128rows", "84rows", "72rows"])
def test_many_rows_per_kv_head(heads_q_len, device):
    """group * Lq > 64 query rows share a kv head: several row blocks read the same K/V."""
    num_heads, num_kv_heads, q_len = heads_q_len
    q, k, v = make_qkv(1, num_heads, num_kv_heads, q_len, 70, 32, torch.float16, device)
    assert decode_plan(1, num_heads, num_kv_heads, q_len, 70, 32, device=device)["num_row_blocks"] > 1
    _check(f"rows={num_heads // num_kv_heads * q_len}", q, k, v, causal=True)


# ---------------------------------------------------------------------------------------------------------------
# key padding


def _padding_mask(kind, batch, k_len, device):
    if kind == "left":
        return lengths_mask([k_len, k_len - 29, 1], k_len, device, left=True)[:batch]
    if kind == "right":
        return lengths_mask([k_len - 40, k_len, 3], k_len, device)[:batch]
    if kind == "ragged":  # rows of different lengths, one of them needing two splits' worth of padding
        return lengths_mask([k_len, 17, k_len - 1], k_len, device)[:batch]
    if kind == "holes":
        mask = torch.rand(batch, k_len, device=device) > 0.3
        mask[:, 5:50] = False  # a run of holes longer than a key block
        return mask
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["left", "right", "ragged", "holes"])
@pytest.mark.parametrize("causal", params([True, False], id=causal_id, slow=lambda causal: not causal))
def test_key_padding(kind, causal, device):
    k_len = 90
    q, k, v = make_qkv(3, 4, 2, 2, k_len, 32, torch.float16, device)
    _check(f"{kind} causal={causal}", q, k, v, causal=causal, key_padding_mask=_padding_mask(kind, 3, k_len, device))


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.int32, torch.int64, torch.uint8],
                         ids=lambda dtype: f"mask_{dtype_id(dtype)}")
def test_mask_dtypes(mask_dtype, device):
    q, k, v = make_qkv(2, 2, 1, 3, 50, 16, torch.float16, device)
    mask = lengths_mask([50, 20], 50, device, left=True, dtype=mask_dtype)
    _check(str(mask_dtype), q, k, v, causal=False, key_padding_mask=mask)


@pytest.mark.parametrize("causal", [True, False], ids=causal_id)
@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
def test_fully_padded_row_outputs_zeros(causal, dtype, device):
    q, k, v = make_qkv(3, 4, 2, 3, 70, 32, dtype, device)
    mask = torch.ones(3, 70, dtype=torch.bool, device=device)
    mask[1] = False
    mask[2, 1:] = False  # only key 0: for causal, every query sees it
    got = _check("fully padded", q, k, v, causal=causal, key_padding_mask=mask)
    assert torch.equal(got[1], torch.zeros_like(got[1]))


def test_query_sees_no_key_with_causal_and_padding(device):
    """Right-padded keys beyond past_len + i: the first queries see only padding and output zeros."""
    q, k, v = make_qkv(1, 2, 2, 4, 40, 32, torch.float16, device)
    mask = lengths_mask([4], 40, device, left=True)  # only keys 36..39 are real
    got = _check("no visible key", q, k, v, causal=True, past_len=35, key_padding_mask=mask)
    assert torch.equal(got[:, :, 0], torch.zeros_like(got[:, :, 0]))  # query 0 sees keys <= 35: all padding


def test_key_padding_range(device):
    mask = torch.tensor([[0, 1, 1, 0, 1, 0], [0, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1]], device=device)
    start, end = key_padding_range(mask)
    assert start.dtype == end.dtype == torch.int32
    assert start.tolist() == [1, 6, 0] and end.tolist() == [5, 0, 6]
    # a precomputed range (shared by all layers) gives the same result
    q, k, v = make_qkv(3, 2, 1, 1, 6, 16, torch.float16, device)
    _check("key_range", q, k, v, causal=False, key_padding_mask=mask, key_range=(start, end))


# ---------------------------------------------------------------------------------------------------------------
# kv_batch_index, strides, output buffer


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64], ids=lambda dtype: f"index_{dtype_id(dtype)}")
def test_kv_batch_index(index_dtype, device):
    """Beam search: 5 query rows share the encoder K/V of 2 source sentences; the mask follows the query row."""
    q, k, v = make_qkv(5, 4, 2, 1, 60, 32, torch.bfloat16, device, kv_batch=2)
    index = torch.tensor([1, 0, 1, 1, 0], dtype=index_dtype, device=device)
    mask = lengths_mask([60, 40, 60, 60, 40], 60, device)
    _check("kv_batch_index", q, k, v, causal=False, key_padding_mask=mask, kv_batch_index=index)


@pytest.mark.parametrize("window", [0, 1, 20, 45, 500], ids="W{}".format)
@pytest.mark.parametrize("num_splits", [1, 4], ids="splits{}".format)
def test_sliding_window(window, num_splits, device):
    """Causal sliding window: windows of the own key only, one key, less than a block, several blocks, more
    than Lk; with GQA, left padding, holes (row 1: the windows of 0 and 1 key of its first queries hold only
    padding, so those rows are zero), a past offset, kv_batch_index and one or several key splits (the splits
    below the window are empty)."""
    q, k, v = make_qkv(3, 4, 2, 5, 150, 32, torch.float32, device, kv_batch=2)
    index = torch.tensor([0, 1, 1], device=device)
    mask = lengths_mask([150, 150, 120], 150, device, left=True)
    mask[1, 100:143] = 0                                 # holes up to just before the third query's position
    _check(f"window={window}", q, k, v, causal=True, past_len=140, key_padding_mask=mask, kv_batch_index=index,
           num_splits=num_splits, window=window)


def test_sliding_window_skips_blocks_below_it(device):
    """Key blocks below every row's window are never loaded: NaN K/V there leaves the output finite."""
    q, k, v = make_qkv(1, 2, 1, 2, 200, 32, torch.float32, device)
    k[:, :, :128] = float("nan")                         # queries at 198, 199 with window 40 see keys >= 158
    v[:, :, :128] = float("nan")
    out = decode_attention(q, k, v, causal=True, window=40, num_splits=2)
    expected = attention_reference(*to64(q, k[:, :, 128:], v[:, :, 128:]), causal=True, window=40)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


def test_kv_cache_slice(device):
    """A slice cache[:, :, :L] of a preallocated KV cache (row stride of the full cache), without copying."""
    cache_k = torch.randn(2, 2, 128, 64, dtype=torch.float16, device=device)
    cache_v = torch.randn(2, 2, 128, 64, dtype=torch.float16, device=device)
    k, v = cache_k[:, :, :75], cache_v[:, :, :75]
    assert not k.is_contiguous()
    q = torch.randn(2, 4, 3, 64, dtype=torch.float16, device=device)
    mask = lengths_mask([128, 113], 128, device, left=True)[:, :75]  # the preallocated mask, sliced too
    assert not mask.is_contiguous()
    _check("cache slice", q, k, v, causal=True, key_padding_mask=mask)


def test_transposed_views(device):
    """q, k, v as [B, L, H, D] projections viewed as [B, H, L, D]; out written through a transposed view too."""
    q, k, v = make_qkv(2, 4, 2, 3, 66, 80, torch.float16, device, layout="bshd")
    out = torch.empty(2, 3, 4, 80, dtype=torch.float16, device=device).transpose(1, 2)
    _check("transposed", q, k, v, out=out, causal=True)


def test_default_output_is_contiguous_in_q_dtype(device):
    q, k, v = make_qkv(1, 2, 1, 2, 40, 24, torch.bfloat16, device)
    got = decode_attention(q, k, v, causal=False)
    assert got.dtype == q.dtype and got.shape == q.shape and got.is_contiguous()
    assert_within_eager_error("default out", got, attention_reference(*to64(q, k, v), causal=False),
                              attention_reference(q, k, v, causal=False))


def test_out_buffer_rejected_when_wrong(device):
    q, k, v = make_qkv(1, 2, 1, 2, 40, 32, torch.float16, device)
    with pytest.raises(ValueError, match="out must be"):
        decode_attention(q, k, v, out=torch.empty(1, 2, 2, 16, dtype=torch.float16, device=device))


# ---------------------------------------------------------------------------------------------------------------
# splits


class _LaunchCounter:
    """Stands in for a @triton.jit kernel and counts launches (kernel[grid](...))."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


@pytest.mark.parametrize("k_len", [37, 200], ids="Lk{}".format)
def test_default_plan_splits_on_cpu(k_len, device, monkeypatch):
    """The heuristic splits the keys even on CPU (>= 2 when there are 2 key blocks), so the combine runs."""
    plan = decode_plan(1, 4, 2, 1, k_len, 64, causal=True, device=device)
    assert plan["num_splits"] >= 2
    assert plan["split_size"] % plan["block_n"] == 0
    assert (plan["num_splits"] - 1) * plan["split_size"] < k_len <= plan["num_splits"] * plan["split_size"]
    counter = _LaunchCounter(decode_module._decode_combine_kernel)
    monkeypatch.setattr(decode_module, "_decode_combine_kernel", counter)
    q, k, v = make_qkv(1, 4, 2, 1, k_len, 64, torch.float16, device)
    _check("default split", q, k, v, causal=True)
    assert counter.launches == 1


def test_single_split_skips_combine(device, monkeypatch):
    counter = _LaunchCounter(decode_module._decode_combine_kernel)
    monkeypatch.setattr(decode_module, "_decode_combine_kernel", counter)
    q, k, v = make_qkv(1, 4, 2, 2, 20, 32, torch.float16, device)  # one key block: one split
    assert decode_plan(1, 4, 2, 2, 20, 32, device=device)["num_splits"] == 1
    _check("one split", q, k, v, causal=True)
    assert counter.launches == 0


@pytest.mark.parametrize("num_splits", params([1, 3, 7, 19], id="splits{}".format, slow=lambda splits: splits > 3))
def test_forced_num_splits(num_splits, device):
    """Many splits (19 > the combine's chunk of 16), some of them empty (left padding, causal future)."""
    k_len, past_len = 700, 600  # causal: keys >= 603 are invisible, 603 keys = 19 blocks of 32 on CPU
    q, k, v = make_qkv(2, 2, 1, 3, k_len, 32, torch.float16, device)
    mask = lengths_mask([k_len, 300], k_len, device, left=True)  # row 1: the first splits see only padding
    plan = decode_plan(2, 2, 1, 3, k_len, 32, causal=True, past_len=past_len, device=device, num_splits=num_splits)
    if not ON_GPU:
        assert plan["num_splits"] == num_splits
    _check(f"splits={num_splits}", q, k, v, causal=True, past_len=past_len, key_padding_mask=mask,
           num_splits=num_splits)


def test_gpu_plan_in_the_interpreter(device, monkeypatch):
    """An H100's plan run through the interpreter (or the GPU at hand): 64-key blocks, splits of >= 256 keys,
    and the combine's GPU tile (4 rows per program, the last program half empty; 8 splits per step, so 10
    splits take two steps, the second partly masked), with left padding that empties the first splits."""
    gpu = tiles.gpu_info(GPU_PROPERTIES[90])
    monkeypatch.setattr(tiles, "device_gpu", lambda device: gpu)
    k_len = 2900
    plan = decode_plan(1, 6, 2, 1, k_len, 128, device=device)
    assert (plan["block_n"], plan["num_splits"], plan["split_size"]) == (64, 10, 320)
    assert (plan["combine_rows"], plan["combine_splits"]) == (4, 8)
    q, k, v = make_qkv(1, 6, 2, 1, k_len, 128, torch.float16, device)
    k[:, :, -100:] *= 3  # the largest scores in the last split: the second combine step must rescale the first's
    mask = lengths_mask([k_len - 700], k_len, device, left=True)
    _check("H100 plan", q, k, v, causal=True, key_padding_mask=mask)


def test_gpu_plan_fills_the_machine():
    """B = 1 decode against 128k keys: splits bring the launch to >= 2 programs per SM (GPU only)."""
    if not ON_GPU:
        pytest.skip("needs a GPU (SM count)")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    plan = decode_plan(1, 32, 8, 1, 131072, 128, causal=True, device="cuda")
    programs = plan["num_row_blocks"] * plan["num_splits"] * 8
    assert programs >= 2 * sms
    assert plan["split_size"] % plan["block_n"] == 0


# ---------------------------------------------------------------------------------------------------------------
# larger shapes: GPU only


@pytest.mark.skipif(not ON_GPU, reason="large shapes only on a GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("q_len", [1, 4, 16], ids="Lq{}".format)
@pytest.mark.parametrize("k_len", [4133, 32771], ids="Lk{}".format)
def test_long_kv_gpu(dtype, q_len, k_len, device):
    q, k, v = make_qkv(2, 32, 8, q_len, k_len, 128, dtype, device)
    mask = lengths_mask([k_len, k_len - 3000], k_len, device, left=True)
    _check(f"Lk={k_len}", q, k, v, causal=True, key_padding_mask=mask)


@pytest.mark.skipif(not ON_GPU, reason="large shapes only on a GPU")
def test_int64_offsets_gpu(device):
    """K/V with more than 2^31 elements: the last kv batch row starts past element 2^31."""
    kv_batch, num_kv_heads, k_len, head_dim = 66, 8, 32768, 128
    if torch.cuda.get_device_properties(0).total_memory < 16 * 2**30:
        pytest.skip("needs ~9 GB of GPU memory")
    kv = torch.empty(kv_batch, num_kv_heads, k_len, head_dim, dtype=torch.float16, device=device)
    assert kv.numel() > 2**31
    kv[-1].normal_()
    q = torch.randn(1, 8, 1, head_dim, dtype=torch.float16, device=device)
    index = torch.tensor([kv_batch - 1], device=device)
    out = poison_(torch.empty_like(q))
    decode_attention(q, kv, kv, causal=False, kv_batch_index=index, out=out)
    row = kv[-1:]
    assert_within_eager_error("int64 offsets", out,
                              attention_reference(*to64(q, row, row), causal=False),
                              attention_reference(q, row, row, causal=False))
    assert math.isfinite(out.float().abs().max().item())


@pytest.mark.skipif(not ON_GPU, reason="counts compiled CUDA kernels")
def test_no_recompile_as_the_cache_grows_gpu(device):
    """A generation calls decode with a new Lk (and split count) every step: after one launch with a single
    split and one with several, no step may compile another kernel variant (a JIT compile costs ~1 s)."""
    import fusedformers.kernels.decode_attention as decode_mod

    def compiled_variants():
        # triton 3.6: JITFunction.device_caches[device] = (kernel_cache, ...); kernel_cache: key -> kernel
        return sum(len(entry[0]) for kernel in (decode_mod._decode_split_kernel, decode_mod._decode_combine_kernel)
                   for entry in kernel.device_caches.values())

    full_mask = torch.ones(1, 20000, dtype=torch.bool, device=device)  # a model slices one mask per step

    def step(k_len):
        q, k, v = make_qkv(1, 32, 8, 1, k_len, 128, torch.bfloat16, device)
        decode_attention(q, k, v, causal=True, key_padding_mask=full_mask[:, :k_len])

    step(40)       # one split: the split kernel writes the output
    step(5000)     # several splits and the combine kernel
    before = compiled_variants()
    assert before >= 3
    for k_len in (65, 129, 257, 513, 961, 1024, 2047, 4096, 16385):
        step(k_len)
    assert compiled_variants() == before


def test_key_padding_range_reuses_only_the_same_unmodified_mask(device):
    """The key range is cached for the last mask object; a new tensor or an in-place change recomputes it."""
    from fusedformers.kernels.decode_attention import key_padding_range

    mask = torch.ones(2, 10, dtype=torch.long, device=device)
    mask[1, :4] = 0
    first = key_padding_range(mask)
    assert key_padding_range(mask) is first
    assert first[0].tolist() == [0, 4] and first[1].tolist() == [10, 10]
    mask[0, 7:] = 0                                    # in place: bumps the version counter
    changed = key_padding_range(mask)
    assert changed is not first and changed[1].tolist() == [7, 10]
    other = mask.clone()
    assert key_padding_range(other) is not changed
    assert key_padding_range(other)[1].tolist() == [7, 10]

"""Fused masked attention against float64 and same-dtype eager references (forward and gradients)."""
import importlib
import math
import os
import random
import subprocess
import sys

import pytest
import torch

from fusedformers import kernels
from fusedformers.kernels.attention import (
    _attention_forward,
    _DropoutArgs,
    _MaskArgs,
    forced_block_sizes,
    padding_holes,
)
from fusedformers.kernels.decode_attention import key_padding_range
from fusedformers.kernels.reference import attention_reference
from tests.conftest import ON_GPU
from tests.helpers import (
    DTYPE_PARAMS,
    DTYPES,
    assert_within_eager_error,
    causal_id,
    dtype_id,
    grads_on_fresh_leaves,
    lengths_mask,
    make_padding_mask,
    make_qkv,
    params,
    poison_,
    reports_config,
    to64,
)


def check_forward(q, k, v, *, causal, key_padding_mask=None, past_len=None, kv_batch_index=None, via_dispatch=False,
                  window=None):
    """Run the fused forward kernel into a NaN-poisoned buffer and compare with the references."""
    kwargs = dict(causal=causal, key_padding_mask=key_padding_mask, past_len=past_len, kv_batch_index=kv_batch_index,
                  window=window)
    if via_dispatch:
        out = kernels.attention(q, k, v, **kwargs)
    else:
        masks = _MaskArgs(q, key_padding_mask, kv_batch_index, window)
        out = poison_(torch.empty_like(q, memory_format=torch.contiguous_format))
        resolved_past = k.shape[2] - q.shape[2] if past_len is None else past_len
        _attention_forward(q, k, v, causal, resolved_past, 1.0 / math.sqrt(q.shape[-1]), masks, _DropoutArgs(q, 0.0),
                           out=out)
    q64, k64, v64 = to64(q, k, v)
    expected = attention_reference(q64, k64, v64, **kwargs)
    eager = attention_reference(q, k, v, **kwargs)
    assert_within_eager_error("out", out, expected, eager)
    return out


def check_backward(q, k, v, *, causal, key_padding_mask=None, past_len=None, kv_batch_index=None, window=None):
    """Gradients of the fused attention for a random upstream gradient, compared with the references."""
    kwargs = dict(causal=causal, key_padding_mask=key_padding_mask, past_len=past_len, kv_batch_index=kv_batch_index,
                  window=window)
    dout = torch.randn(q.shape, device=q.device, dtype=q.dtype)
    _, fused = grads_on_fresh_leaves(kernels.attention, (q, k, v), dout, **kwargs)
    _, expected = grads_on_fresh_leaves(attention_reference, (q, k, v), dout, dtype=torch.float64, **kwargs)
    _, eager = grads_on_fresh_leaves(attention_reference, (q, k, v), dout, **kwargs)
    for name, got, want, budget in zip(("dq", "dk", "dv"), fused, expected, eager):
        assert got.shape == want.shape, name
        assert_within_eager_error(name, got, want, budget)


def lengths_id(lengths):
    """(q_len, k_len, past_len) -> 'Lq20-Lk45-past10' (no 'past' part for the default past_len=None)."""
    q_len, k_len, past_len = lengths
    return f"Lq{q_len}-Lk{k_len}" + ("" if past_len is None else f"-past{past_len}")


def heads_id(heads):
    return "H{}-Hkv{}".format(*heads)


def padding_id(padding):
    return "nopad" if padding is None else padding


# ---------------------------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
@pytest.mark.parametrize("head_dim", [16, 32, 64, 80, 96, 128, 256], ids="D{}".format)
def test_forward_head_dims(dtype, head_dim, device):
    q, k, v = make_qkv(2, 2, 1, 37, 37, head_dim, dtype, device)
    check_forward(q, k, v, causal=True, key_padding_mask=make_padding_mask(2, 37, "left", device))


@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
@pytest.mark.parametrize("q_len,k_len,past_len", params(
    [(1, 1, None), (1, 50, None), (17, 17, None), (33, 70, None), (20, 45, 10), (40, 40, 0), (50, 20, None)],
    id=lengths_id))
@pytest.mark.parametrize("causal", [True, False], ids=causal_id)
def test_forward_lengths_and_past(dtype, q_len, k_len, past_len, causal, device):
    q, k, v = make_qkv(2, 4, 2, q_len, k_len, 64, dtype, device)
    check_forward(q, k, v, causal=causal, past_len=past_len)


@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
@pytest.mark.parametrize("padding", ["left", "right", "holes", "empty"])
@pytest.mark.parametrize("causal", [True, False], ids=causal_id)
@pytest.mark.parametrize("num_heads,num_kv_heads", params([(4, 4), (4, 2), (4, 1)], id=heads_id,
                                                          slow=lambda heads: heads != (4, 2)))
def test_forward_padding_gqa(dtype, padding, causal, num_heads, num_kv_heads, device):
    q, k, v = make_qkv(3, num_heads, num_kv_heads, 29, 41, 32, dtype, device)
    check_forward(q, k, v, causal=causal, key_padding_mask=make_padding_mask(3, 41, padding, device))


@pytest.mark.parametrize("layout", ["bshd", "cache_slice"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=dtype_id)
def test_forward_strided_inputs(layout, dtype, device):
    q, k, v = make_qkv(2, 4, 2, 24, 40, 64, dtype, device, layout=layout)
    assert not k.is_contiguous()
    check_forward(q, k, v, causal=True, key_padding_mask=make_padding_mask(2, 40, "left", device))


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.int32, torch.int64, torch.uint8],
                         ids=lambda dtype: f"mask_{dtype_id(dtype)}")
def test_forward_mask_dtypes(mask_dtype, device):
    q, k, v = make_qkv(3, 2, 2, 20, 33, 32, torch.float16, device)
    mask = make_padding_mask(3, 33, "left", device).to(mask_dtype)
    check_forward(q, k, v, causal=True, key_padding_mask=mask)


@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
def test_forward_kv_batch_index(dtype, device):
    # 2 sources, 3 beams each: K/V stored once per source
    q, k, v = make_qkv(6, 4, 2, 19, 27, 32, dtype, device, kv_batch=2)
    kv_batch_index = torch.tensor([0, 0, 0, 1, 1, 1], device=device, dtype=torch.int32)
    mask = make_padding_mask(2, 27, "right", device)[kv_batch_index]
    check_forward(q, k, v, causal=False, key_padding_mask=mask, kv_batch_index=kv_batch_index)


@pytest.mark.slow
def test_strided_kv_batch_index_and_inference_mode(device):
    """kv_batch_index may be a strided view; masks made under torch.inference_mode work (no version counter)."""
    q, k, v = make_qkv(4, 2, 2, 20, 23, 32, torch.float32, device, kv_batch=2)
    kv_batch_index = torch.tensor([1, 9, 0, 9, 0, 9, 1, 9], device=device)[::2]   # 9 would be out of range
    check_forward(q, k, v, causal=False, kv_batch_index=kv_batch_index)
    check_backward(q, k, v, causal=False, kv_batch_index=kv_batch_index)
    with torch.inference_mode():
        mask = make_padding_mask(4, 23, "left", device)
        for q_len in (20, 3):  # fused kernel and decode dispatch
            out = kernels.attention(q[:, :, :q_len], k, v, key_padding_mask=mask, kv_batch_index=kv_batch_index)
            expected = attention_reference(q[:, :, :q_len], k, v, key_padding_mask=mask,
                                           kv_batch_index=kv_batch_index)
            torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_fully_masked_rows_are_zero(device):
    # left padding in a causal self-attention: the padded query rows see no key at all
    q, k, v = make_qkv(2, 2, 2, 30, 30, 32, torch.float16, device)
    mask = lengths_mask([30, 9], 30, device, left=True)  # row 1: keys 0..20 padded
    out = check_forward(q, k, v, causal=True, key_padding_mask=mask)
    assert torch.all(out[1, :, :21] == 0)
    assert out[1, :, 21:].abs().sum() > 0


@pytest.mark.parametrize("causal", [True, False], ids=causal_id)
def test_padding_holes_in_some_rows(causal, device):
    """Rows without holes in their mask run their inner key blocks unmasked (bounded by the first and last real
    key); a row with holes, even one hole in a block that would otherwise run unmasked, must still hide them,
    forward and backward."""
    k_len = 80  # five key blocks of the interpreter's 16 x 16 tiles
    mask = torch.ones(4, k_len, dtype=torch.long, device=device)
    mask[0, :7] = 0                          # left padding only
    mask[1, 40] = 0                          # one hole, in an inner block
    mask[2, 70:] = 0                         # right padding and two holes
    mask[2, 33:35] = 0
    mask[3, :3] = 0                          # padding on both sides, no hole
    mask[3, 77:] = 0
    kv_start, kv_end = key_padding_range(mask)
    real, holes = padding_holes(mask, kv_start, kv_end)
    assert holes.tolist() == [0, 1, 1, 0] and torch.equal(real, mask.to(torch.uint8))
    q, k, v = make_qkv(4, 2, 1, 60, k_len, 32, torch.float32, device)
    check_forward(q, k, v, causal=causal, key_padding_mask=mask)
    check_backward(q, k, v, causal=causal, key_padding_mask=mask)


@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
@pytest.mark.parametrize("q_len", [1, 5, 16], ids="Lq{}".format)
def test_dispatch_small_q_matches(dtype, q_len, device):
    """fusedformers.kernels.attention sends Lq <= 16 to the decode kernel by itself; the result must be just as
    accurate."""
    q, k, v = make_qkv(2, 4, 2, q_len, 45, 64, dtype, device)
    check_forward(q, k, v, causal=True, key_padding_mask=make_padding_mask(2, 45, "left", device),
                  via_dispatch=True)


@pytest.mark.slow
def test_randomized_forward(device, request):
    rng = random.Random(torch.initial_seed())
    for draw in range(12 if not ON_GPU else 60):
        num_kv_heads = rng.choice([1, 2])
        num_heads = num_kv_heads * rng.choice([1, 2, 3])
        q_len = rng.randint(1, 40)
        k_len = rng.randint(1, 60)
        past_len = rng.choice([None, rng.randint(0, 10)])
        causal = rng.random() < 0.7
        batch = rng.randint(1, 3)
        dtype = rng.choice(DTYPES)
        head_dim = rng.choice([16, 40, 64])
        layout = rng.choice(["contiguous", "bshd", "cache_slice"])
        padding = rng.choice([None, "left", "right", "holes"])
        via_dispatch = rng.random() < 0.5
        with reports_config(request, draw=draw, batch=batch, num_heads=num_heads, num_kv_heads=num_kv_heads,
                            q_len=q_len, k_len=k_len, past_len=past_len, causal=causal, dtype=dtype,
                            head_dim=head_dim, layout=layout, padding=padding, via_dispatch=via_dispatch):
            q, k, v = make_qkv(batch, num_heads, num_kv_heads, q_len, k_len, head_dim, dtype, device, layout=layout)
            mask = make_padding_mask(batch, k_len, padding, device)
            check_forward(q, k, v, causal=causal, key_padding_mask=mask, past_len=past_len, via_dispatch=via_dispatch)


# ---------------------------------------------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
@pytest.mark.parametrize("head_dim", params([16, 64, 80, 128], id="D{}".format, slow=lambda d: d not in (64, 80)))
def test_backward_head_dims(dtype, head_dim, device):
    q, k, v = make_qkv(2, 2, 2, 33, 33, head_dim, dtype, device)
    check_backward(q, k, v, causal=True, key_padding_mask=make_padding_mask(2, 33, "left", device))


@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
@pytest.mark.parametrize("num_heads,num_kv_heads", params([(4, 4), (4, 2), (4, 1)], id=heads_id,
                                                          slow=lambda heads: heads != (4, 1)))
@pytest.mark.parametrize("padding", params([None, "left", "right", "empty"], id=padding_id,
                                           slow=lambda padding: padding not in ("left", "empty")))
def test_backward_gqa_padding(dtype, num_heads, num_kv_heads, padding, device):
    q, k, v = make_qkv(2, num_heads, num_kv_heads, 26, 26, 32, dtype, device)
    check_backward(q, k, v, causal=True, key_padding_mask=make_padding_mask(2, 26, padding, device))


@pytest.mark.parametrize("q_len,k_len,past_len,causal", params(
    [(1, 20, None, True), (17, 40, None, True), (20, 45, 7, True), (40, 23, None, False), (35, 35, 0, True)],
    id=lambda case: f"{lengths_id(case[:3])}-{causal_id(case[3])}", slow=lambda case: case[0] != 1))
def test_backward_lengths(q_len, k_len, past_len, causal, device):
    q, k, v = make_qkv(2, 4, 2, q_len, k_len, 32, torch.float16, device, layout="bshd")
    check_backward(q, k, v, causal=causal, past_len=past_len,
                   key_padding_mask=make_padding_mask(2, k_len, "right", device))


@pytest.mark.slow
def test_backward_kv_batch_index(device):
    q, k, v = make_qkv(4, 2, 2, 18, 21, 32, torch.float32, device, kv_batch=2)
    kv_batch_index = torch.tensor([1, 0, 1, 1], device=device)
    check_backward(q, k, v, causal=False, kv_batch_index=kv_batch_index,
                   key_padding_mask=make_padding_mask(4, 21, "holes", device))


def test_backward_fully_masked_rows_have_zero_grad(device):
    q, k, v = make_qkv(2, 2, 2, 20, 20, 32, torch.float32, device)
    mask = lengths_mask([12, 20], 20, device, left=True)  # row 0: keys 0..7 padded
    q.requires_grad_(True)
    out = kernels.attention(q, k, v, causal=True, key_padding_mask=mask)
    out.sum().backward()
    assert torch.isfinite(q.grad).all()
    assert torch.all(q.grad[0, :, :8] == 0)


@pytest.mark.slow
def test_randomized_backward(device, request):
    rng = random.Random(torch.initial_seed() + 1)
    for draw in range(6 if not ON_GPU else 30):
        num_kv_heads = rng.choice([1, 2])
        num_heads = num_kv_heads * rng.choice([1, 2])
        q_len, k_len = rng.randint(1, 40), rng.randint(1, 40)
        batch = rng.randint(1, 3)
        head_dim, dtype, layout = rng.choice([16, 48]), rng.choice(DTYPES), rng.choice(["contiguous", "bshd"])
        causal, past_len = rng.random() < 0.7, rng.choice([None, rng.randint(0, 10)])
        padding = rng.choice([None, "left", "right", "holes"])
        with reports_config(request, draw=draw, batch=batch, num_heads=num_heads, num_kv_heads=num_kv_heads,
                            q_len=q_len, k_len=k_len, past_len=past_len, causal=causal, dtype=dtype,
                            head_dim=head_dim, layout=layout, padding=padding):
            q, k, v = make_qkv(batch, num_heads, num_kv_heads, q_len, k_len, head_dim, dtype, device, layout=layout)
            check_backward(q, k, v, causal=causal, past_len=past_len,
                           key_padding_mask=make_padding_mask(batch, k_len, padding, device))


@pytest.mark.parametrize("block_m,block_n", params([(32, 16), (16, 32), (64, 16)],
                                                   id=lambda tile: "tile{}x{}".format(*tile),
                                                   slow=lambda tile: tile != (64, 16)))
@pytest.mark.parametrize("q_len,k_len,past_len,padding", params(
    [(45, 45, None, "left"), (37, 70, None, "right"), (40, 52, 5, "holes"), (70, 30, None, None)],
    id=lambda case: f"{lengths_id(case[:3])}-{padding_id(case[3])}", slow=lambda case: case[3] != "left"))
def test_unequal_tiles(block_m, block_n, q_len, k_len, past_len, padding, device):
    """The GPU runs BLOCK_M != BLOCK_N (e.g. 128 x 64): the diagonal and skipping bounds must hold for any
    tile shape, forward and backward."""
    from fusedformers.kernels.attention import forced_block_sizes

    q, k, v = make_qkv(2, 4, 2, q_len, k_len, 32, torch.float32, device)
    mask = make_padding_mask(2, k_len, padding, device)
    with forced_block_sizes(block_m, block_n):
        check_forward(q, k, v, causal=True, key_padding_mask=mask, past_len=past_len)
        check_backward(q, k, v, causal=True, key_padding_mask=mask, past_len=past_len)


# ---------------------------------------------------------------------------------------------------------------
# Sliding window
# ---------------------------------------------------------------------------------------------------------------
WINDOW_CASES = [
    # (window, (BLOCK_M, BLOCK_N), (q_len, k_len, past_len), padding): windows of no key but the own one, one key,
    # less than a block, several blocks and more than Lk; tiles of the interpreter's size and unequal ones
    (0, (16, 16), (37, 45, None), None),
    (1, (16, 16), (37, 45, 8), "left"),
    (5, (32, 16), (40, 40, 0), "right"),
    (20, (16, 32), (37, 52, 5), "holes"),
    (100, (16, 16), (30, 30, None), "left"),
    (3, (16, 16), (20, 45, None), "empty"),
]


def window_case_id(case):
    window, tile, lengths, padding = case
    return f"W{window}-tile{tile[0]}x{tile[1]}-{lengths_id(lengths)}-{padding_id(padding)}"


@pytest.mark.parametrize("window,tile,lengths,padding", params(WINDOW_CASES, id=window_case_id,
                                                               slow=lambda case: case[0] in (0, 100)))
def test_window_forward_and_backward(window, tile, lengths, padding, device):
    """Causal sliding window with GQA, padding and a past offset, forward and gradients; small tiles make the
    window's lower edge cross several key blocks (skipped, masked and unmasked blocks in one program)."""
    (block_m, block_n), (q_len, k_len, past_len) = tile, lengths
    q, k, v = make_qkv(2, 4, 2, q_len, k_len, 32, torch.float32, device)
    mask = make_padding_mask(2, k_len, padding, device)
    with forced_block_sizes(block_m, block_n):
        check_forward(q, k, v, causal=True, key_padding_mask=mask, past_len=past_len, window=window)
        check_backward(q, k, v, causal=True, key_padding_mask=mask, past_len=past_len, window=window)


@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
def test_window_kv_batch_index_and_decode_dispatch(dtype, device):
    """kv_batch_index with a window (fused kernel and backward), and the same window through the Lq <= 16
    dispatch to the decode kernel."""
    q, k, v = make_qkv(3, 2, 1, 24, 40, 32, dtype, device, kv_batch=2, layout="bshd")
    kv_batch_index = torch.tensor([1, 0, 1], device=device)
    mask = make_padding_mask(3, 40, "left", device)
    check_forward(q, k, v, causal=True, key_padding_mask=mask, kv_batch_index=kv_batch_index, window=6)
    check_backward(q, k, v, causal=True, key_padding_mask=mask, kv_batch_index=kv_batch_index, window=6)
    check_forward(q[:, :, :5], k, v, causal=True, key_padding_mask=mask, kv_batch_index=kv_batch_index, window=6,
                  via_dispatch=True)


def test_window_skips_key_blocks_outside_it(device):
    """Key blocks below every row's window are never loaded: NaN keys and values there leave the output and the
    gradients finite (a masked load would still multiply NaN by 0), and their gradients are exactly zero."""
    q, k, v = make_qkv(1, 2, 2, 16, 80, 32, torch.float32, device)     # queries at positions 64..79
    window = 20                                                         # keys >= 44: blocks from 32 on
    k[:, :, :32] = float("nan")
    v[:, :, :32] = float("nan")
    with forced_block_sizes(16, 16):
        out, grads = grads_on_fresh_leaves(kernels.attention, (q, k, v), torch.randn_like(q), causal=True,
                                           window=window)
    expected = attention_reference(*to64(q, k[:, :, 32:], v[:, :, 32:]), past_len=32, window=window)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
    assert all(torch.isfinite(grad).all() for grad in grads)
    assert torch.all(grads[1][:, :, :32] == 0) and torch.all(grads[2][:, :, :32] == 0)


def test_window_row_outside_all_real_keys_is_zero(device):
    """A row whose window holds only padding outputs zeros and gets zero gradients, like a fully padded row."""
    q, k, v = make_qkv(1, 2, 2, 20, 20, 32, torch.float32, device)
    mask = torch.ones(1, 20, dtype=torch.long, device=device)
    mask[0, 5:15] = 0                        # rows 10..14 with window 4 see keys 6..14 at most: all padding
    out = check_forward(q, k, v, causal=True, key_padding_mask=mask, window=4)
    assert torch.all(out[0, :, 10:15] == 0) and out[0, :, 15:].abs().sum() > 0
    check_backward(q, k, v, causal=True, key_padding_mask=mask, window=4)


@pytest.mark.parametrize("window,causal,error,match", [
    (-1, True, ValueError, "window must be an int >= 0"),
    (2.0, True, ValueError, "window must be an int >= 0"),
    (3, False, ValueError, "window needs causal=True"),
], ids=["negative", "float", "not_causal"])
def test_window_bad_input(window, causal, error, match, device):
    q, k, v = _good(device)
    with pytest.raises(error, match=match):
        kernels.attention(q, k, v, causal=causal, window=window)


# ---------------------------------------------------------------------------------------------------------------
# Larger shapes: GPU only (the CPU interpreter runs the same code paths above at small shapes)
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.skipif(not ON_GPU, reason="large shapes run on the GPU; CPU covers the same paths at small shapes")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("head_dim", [64, 128], ids="D{}".format)
def test_large_gpu(dtype, head_dim, device):
    q, k, v = make_qkv(2, 8, 2, 1000, 1000, head_dim, dtype, device, layout="bshd")
    mask = make_padding_mask(2, 1000, "left", device)
    check_forward(q, k, v, causal=True, key_padding_mask=mask)
    check_backward(q, k, v, causal=True, key_padding_mask=mask)


@pytest.mark.skipif(not ON_GPU, reason="needs > 2^31-element K/V tensors: GPU only")
def test_int64_offsets_gpu(device):
    """K/V batch row 2 starts past element 2^31: the kernels' batch/head offsets must be int64."""
    k_len, head_dim = (1 << 23) + 17, 128
    k = torch.randn(3, 1, k_len, head_dim, device=device, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    q = torch.randn(2, 2, 32, head_dim, device=device, dtype=torch.bfloat16)
    kv_batch_index = torch.tensor([2, 0], device=device)
    out = kernels.attention(q, k, v, causal=False, kv_batch_index=kv_batch_index)
    for row in range(2):
        kv_row = kv_batch_index[row].item()
        expected = attention_reference(q[row:row + 1].float(), k[kv_row:kv_row + 1].float(),
                                       v[kv_row:kv_row + 1].float(), causal=False)
        assert (out[row:row + 1].float() - expected).abs().max().item() < 2e-2


def check_rows_far_apart(seq_len, heads_in_storage, head_dim, real_keys, device):
    """q, k, v, dout: head 0 of ``[1, L, heads_in_storage, D]`` tensors (the layout a model's projections give),
    so row i starts at element i * heads_in_storage * D; only the last ``real_keys`` keys are real (left
    padding, not causal), which keeps the float32 reference at [L, real_keys]. Forward and gradients of every
    row are compared with it."""
    dtype = torch.bfloat16

    def head0():
        return torch.randn(1, seq_len, heads_in_storage, head_dim, device=device, dtype=dtype)[:, :, :1].transpose(1, 2)

    q, k, v, dout = head0(), head0(), head0(), head0()
    mask = lengths_mask([real_keys], seq_len, device, left=True, dtype=torch.bool)
    out, (dq, dk, dv) = grads_on_fresh_leaves(kernels.attention, (q, k, v), dout, causal=False, key_padding_mask=mask)

    def reference(q, k, v):  # [L, D] x [real_keys, D]
        return torch.softmax(q @ k.T / math.sqrt(head_dim), dim=-1) @ v

    # reference on the real keys only, in float32
    expected, (dq32, dk32, dv32) = grads_on_fresh_leaves(
        reference, (q[0, 0], k[0, 0, -real_keys:], v[0, 0, -real_keys:]), dout[0, 0], dtype=torch.float32)
    tolerance = 3e-2
    assert (out[0, 0].float() - expected).abs().max().item() < tolerance
    assert (dq[0, 0].float() - dq32).abs().max().item() < tolerance
    for name, grad, want in (("dk", dk, dk32), ("dv", dv, dv32)):
        scale = want.abs().max().item()
        assert (grad[0, 0, -real_keys:].float() - want).abs().max().item() < tolerance * max(1.0, scale), name
        assert grad[0, 0, :-real_keys].abs().max().item() == 0, f"{name} of padding keys"


def test_rows_far_apart(device):
    check_rows_far_apart(70, 3, 32, 20, device)


@pytest.mark.skipif(not ON_GPU, reason="needs > 2^31-element tensors: GPU only")
def test_row_offsets_past_int32_gpu(device):
    """Row 2^18 of a [1, L, 64, 128] layout starts at element 2^31: the backward kernels' row and key offsets
    (hand-built pointers, unlike the forward's block pointers) must be int64. 4 GiB per tensor."""
    check_rows_far_apart((1 << 18) + 300, 64, 128, 256, device)


# ---------------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------------
def _good(device):
    return make_qkv(2, 4, 2, 8, 8, 32, torch.float16, device)


@pytest.mark.parametrize("mutate,error,match", [
    (lambda q, k, v: (q[0], k, v, {}), ValueError, "q must have 4 dimensions"),
    (lambda q, k, v: (q, k[:1], v[:1], {}), ValueError, "batch"),
    (lambda q, k, v: (q, k, v[:, :, :4], {}), ValueError, "v must have k's shape"),
    (lambda q, k, v: (q, k[..., :16], v[..., :16], {}), ValueError, "head dim"),
    (lambda q, k, v: (q[:, :3], k, v, {}), ValueError, "multiple of k/v's head count"),
    (lambda q, k, v: (q, k.float(), v, {}), TypeError, "share one dtype"),
    (lambda q, k, v: (q.double(), k.double(), v.double(), {}), TypeError, "float16, bfloat16 or float32"),
    (lambda q, k, v: (q, k, v, {"key_padding_mask": torch.ones(2, 9, dtype=torch.long, device=q.device)}),
     ValueError, "key_padding_mask must have shape"),
    (lambda q, k, v: (q, k, v, {"key_padding_mask": torch.ones(2, 8, device=q.device)}),
     TypeError, "key_padding_mask must be bool or integer"),
    (lambda q, k, v: (q, k, v, {"kv_batch_index": torch.zeros(3, dtype=torch.long, device=q.device)}),
     ValueError, "kv_batch_index must have shape"),
    (lambda q, k, v: (q, k, v, {"kv_batch_index": torch.zeros(2, device=q.device)}),
     TypeError, "kv_batch_index must be int32 or int64"),
    (lambda q, k, v: (q, k, v, {"past_len": -1}), ValueError, "past_len must be >= 0"),
    (lambda q, k, v: (q, k, v, {"past_len": 1.5}), TypeError, "past_len must be an int"),
    (lambda q, k, v: (q[..., :12], k[..., :12], v[..., :12], {}), ValueError, "head dim D must be a multiple of 8"),
    (lambda q, k, v: (q.numpy() if q.device.type == "cpu" else "q", k, v, {}), TypeError, "q must be a torch.Tensor"),
    (lambda q, k, v: (q, k, v, {"sm_scale": -0.5}), ValueError, "sm_scale must be positive"),
], ids=[
    "q_3d", "kv_batch_differs", "v_length", "kv_head_dim", "heads_not_multiple", "mixed_dtypes", "float64",
    "mask_shape", "mask_float", "index_shape", "index_float", "past_len_negative", "past_len_float", "head_dim_12",
    "q_numpy", "sm_scale_negative",
])
def test_bad_input(mutate, error, match, device):
    q, k, v, kwargs = mutate(*_good(device))
    with pytest.raises(error, match=match):
        kernels.attention(q, k, v, **kwargs)


def test_batch_above_grid_limit(device):
    """The fused kernels' limit (Lq > 16 here); the 1-D split-KV decode grid has none."""
    q = torch.randn(65536, 1, 17, 16, device=device)
    with pytest.raises(ValueError, match="batch size must be at most 65535"):
        kernels.attention(q, q, q)


@pytest.mark.parametrize("bad_index", [[0, 2], [-1, 0]], ids=["index_too_big", "index_negative"])
def test_kv_batch_index_out_of_range(bad_index, device):
    """An index outside [0, Bkv) would read outside K/V. CPU: ValueError. CUDA: the kernels check it (no host
    sync): they print the entry and trap, which ends the CUDA context like a device assert, so it runs in a child
    process there, once through the decode kernel (Lq = 8) and once through the fused forward (Lq = 32)."""
    if device == "cpu":
        q, k, v = _good(device)
        index = torch.tensor(bad_index, device=device)
        with pytest.raises(ValueError, match=r"kv_batch_index entries must be in \[0, 2\)"):
            kernels.attention(q, k, v, kv_batch_index=index)
        return
    for q_len in (8, 32):
        script = ("import torch; from fusedformers import kernels; "
                  f"q = torch.randn(2, 2, {q_len}, 16, device='cuda', dtype=torch.float16); "
                  f"kernels.attention(q, q, q, kv_batch_index=torch.tensor({bad_index}, device='cuda')); "
                  "torch.cuda.synchronize()")
        result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                                cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        output = result.stdout + result.stderr
        # the kernel's printf, or (if the driver drops the printf buffer at the trap) the CUDA error the trap
        # raises: never a clean exit (an unverified detail until a GPU runs this)
        stopped = "kv_batch_index entry outside" in output or "CUDA error" in output or "AcceleratorError" in output
        assert result.returncode != 0 and stopped, output[-2000:]


@pytest.mark.parametrize("q_len", [4, 20], ids=["decode", "fused"])
def test_kernels_check_kv_batch_index_themselves(q_len, monkeypatch, capfd):
    """The kernels' own check (what runs on CUDA, where there is no host check): with the host check switched off,
    the interpreter runs the kernel's branch for an entry outside [0, Bkv): it prints the entry, then stops at the
    trap (the interpreter cannot run inline PTX: an error instead of the GPU's trap)."""
    for name in ("attention", "decode_attention"):  # the modules (fusedformers.kernels.attention is the function)
        module = importlib.import_module(f"fusedformers.kernels.{name}")
        monkeypatch.setattr(module, "check_kv_batch_index_range", lambda *args: None)
    q = torch.randn(2, 2, q_len, 16, dtype=torch.float16)
    k, v = (torch.randn(1, 2, 24, 16, dtype=torch.float16) for _ in range(2))
    with pytest.raises(Exception, match="inline_asm"):
        kernels.attention(q, k, v, kv_batch_index=torch.tensor([0, 1000]))
    assert "kv_batch_index entry outside [0, k's batch):  [1000]" in capfd.readouterr().out
    kernels.attention(q, k, v, kv_batch_index=torch.tensor([0, 0]))  # in range: no trap


def test_kv_batch_index_checked_on_every_call():
    """The range check is never skipped on a remembered verdict: a write that does not move the version counter
    (through ``.numpy()``) after a checked call is caught by the next call instead of reading K/V row 1000.
    CPU only: the write goes through numpy (on CUDA the check is the device assert of the test above)."""
    q, k, v = _good("cpu")
    index = torch.tensor([0, 1])
    kernels.attention(q, k, v, kv_batch_index=index)
    index.numpy()[1] = 1000
    with pytest.raises(ValueError, match=r"kv_batch_index entries must be in \[0, 2\)"):
        kernels.attention(q, k, v, kv_batch_index=index)


def test_bad_input_devices(device):
    q, k, v = _good(device)
    mask = torch.ones(2, 8, dtype=torch.long, device="meta")
    with pytest.raises(ValueError, match="one device"):
        kernels.attention(q, k, v, key_padding_mask=mask)

"""Attention dropout inside the fused kernels: the same results as the eager reference given the kernel's own
mask (forward and gradients), a mask with the right statistics that does not depend on tiling, and seeds that
follow torch's generators."""
import math

import pytest
import torch

from fusedformers import kernels
from fusedformers.kernels.attention import (
    _attention_forward,
    _DropoutArgs,
    _MaskArgs,
    draw_dropout_seed,
    dropout_keep_mask,
    forced_block_sizes,
)
from fusedformers.kernels.reference import attention_reference
from tests.helpers import (
    DTYPE_PARAMS,
    assert_within_eager_error,
    causal_id,
    grads_on_fresh_leaves,
    make_padding_mask,
    make_qkv,
    poison_,
    to64,
)


def generator(device, seed):
    return torch.Generator(device=device).manual_seed(seed)


def kernel_mask(device, seed, batch, num_heads, q_len, k_len, dropout_p):
    """The keep mask the kernels use when given ``generator(device, seed)``."""
    return dropout_keep_mask(draw_dropout_seed(device, generator(device, seed)), batch, num_heads, q_len, k_len,
                             dropout_p)


CASES = [
    # (num_heads, num_kv_heads, q_len, k_len, past_len, causal, padding, kv_batch)
    (4, 2, 37, 45, None, True, "left", None),
    (4, 4, 40, 40, None, False, "right", None),
    (4, 1, 29, 29, 0, True, "empty", None),      # GQA 4:1, a fully padded row
    (2, 2, 21, 50, 10, True, "holes", 1),        # past offset, kv_batch_index
]


def case_id(case):
    """'H4-Hkv2-Lq37-Lk45-causal-left' (+ '-past10', '-kvbatch1')."""
    num_heads, num_kv_heads, q_len, k_len, past_len, causal, padding, kv_batch = case
    return (f"H{num_heads}-Hkv{num_kv_heads}-Lq{q_len}-Lk{k_len}-{causal_id(causal)}-{padding}"
            + ("" if past_len is None else f"-past{past_len}") + ("" if kv_batch is None else f"-kvbatch{kv_batch}"))


@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
@pytest.mark.parametrize("case", [  # the quick loop: the GQA 4:1 case with a fully padded row
    pytest.param(case, id=case_id(case), marks=[] if case[6] == "empty" else [pytest.mark.slow]) for case in CASES])
def test_forward_and_gradients_match_reference_with_kernel_mask(dtype, case, device):
    check_with_kernel_mask(dtype, case, device)


def test_window_with_dropout_kv_batch_index(device):
    """A sliding window combined with dropout, a past offset, holes and kv_batch_index."""
    check_with_kernel_mask(torch.float32, CASES[3], device, window=7)


def check_with_kernel_mask(dtype, case, device, window=None):
    """Forward (into a poisoned buffer) and gradients of one of CASES with dropout, against the references given
    the kernel's own dropout mask."""
    num_heads, num_kv_heads, q_len, k_len, past_len, causal, padding, kv_batch = case
    batch, head_dim, dropout_p, seed = 2, 32, 0.3, 1234
    q, k, v = make_qkv(batch, num_heads, num_kv_heads, q_len, k_len, head_dim, dtype, device, kv_batch=kv_batch)
    kv_batch_index = None if kv_batch is None else torch.zeros(batch, dtype=torch.int32, device=device)
    mask = make_padding_mask(batch, k_len, padding, device)
    keep = kernel_mask(device, seed, batch, num_heads, q_len, k_len, dropout_p)
    kwargs = dict(causal=causal, key_padding_mask=mask, past_len=past_len, kv_batch_index=kv_batch_index,
                  window=window)
    ref_kwargs = dict(kwargs, dropout_p=dropout_p, dropout_mask=keep)

    # forward into a poisoned buffer
    out = poison_(torch.empty_like(q))
    resolved_past = k_len - q_len if past_len is None else past_len
    dropout = _DropoutArgs(q, dropout_p, draw_dropout_seed(q.device, generator(device, seed)))
    _attention_forward(q, k, v, causal, resolved_past, 1.0 / math.sqrt(head_dim),
                       _MaskArgs(q, mask, kv_batch_index, window), dropout, out=out)
    q64, k64, v64 = to64(q, k, v)
    assert_within_eager_error("out", out, attention_reference(q64, k64, v64, **ref_kwargs),
                              attention_reference(q, k, v, **ref_kwargs))

    # gradients through the autograd Function (the backward kernels regenerate the mask)
    dout = torch.randn(q.shape, device=device, dtype=dtype)
    _, fused = grads_on_fresh_leaves(kernels.attention, (q, k, v), dout, **kwargs, dropout_p=dropout_p,
                                     generator=generator(device, seed))
    _, expected = grads_on_fresh_leaves(attention_reference, (q, k, v), dout, dtype=torch.float64, **ref_kwargs)
    _, eager = grads_on_fresh_leaves(attention_reference, (q, k, v), dout, **ref_kwargs)
    for name, got, want, budget in zip(("dq", "dk", "dv"), fused, expected, eager):
        assert_within_eager_error(name, got, want, budget)


@pytest.mark.slow
@pytest.mark.parametrize("dropout_p", [0.1, 0.5, 0.9], ids="p{}".format)
def test_mask_statistics(dropout_p, device):
    batch, num_heads, q_len, k_len = 2, 3, 48, 128
    keep = kernel_mask(device, 7, batch, num_heads, q_len, k_len, dropout_p).float()
    n = keep.numel()
    # the kept fraction is Binomial(n, 1 - p) / n: within 5 standard deviations
    assert abs(keep.mean().item() - (1 - dropout_p)) < 5 * math.sqrt(dropout_p * (1 - dropout_p) / n)
    # no structure: every query row of every (batch, head) is a different draw (two independent rows of 128
    # keys agree everywhere with probability (p^2 + (1-p)^2)^128 < 1e-10), and neighbouring keys are independent
    rows = keep.reshape(-1, k_len)
    assert torch.unique(rows, dim=0).shape[0] == rows.shape[0]
    neighbours = (keep[..., 1:] == keep[..., :-1]).float().mean().item()
    same_by_chance = dropout_p ** 2 + (1 - dropout_p) ** 2
    assert abs(neighbours - same_by_chance) < 0.05
    other_seed = kernel_mask(device, 8, batch, num_heads, q_len, k_len, dropout_p).float()
    assert (keep != other_seed).float().mean().item() > 0.5 * (2 * dropout_p * (1 - dropout_p))


@pytest.mark.slow
def test_mask_does_not_depend_on_tiles(device):
    """The counter is the element's position, not its tile: other block sizes give the same output."""
    q, k, v = make_qkv(2, 2, 1, 45, 45, 32, torch.float32, device)
    mask = make_padding_mask(2, 45, "left", device)

    def run():
        return kernels.attention(q, k, v, key_padding_mask=mask, dropout_p=0.4, generator=generator(device, 3))

    reference = run()
    for block_m, block_n in ((16, 32), (32, 16)):
        with forced_block_sizes(block_m, block_n):
            torch.testing.assert_close(run(), reference, rtol=1e-5, atol=1e-5)


def test_seeds_follow_torch_generators(device):
    q, k, v = make_qkv(1, 2, 2, 20, 20, 16, torch.float32, device)
    torch.manual_seed(11)
    first = kernels.attention(q, k, v, dropout_p=0.5)
    second = kernels.attention(q, k, v, dropout_p=0.5)
    torch.manual_seed(11)
    assert torch.equal(kernels.attention(q, k, v, dropout_p=0.5), first)   # torch.manual_seed reproduces
    assert not torch.equal(first, second)                                  # each call draws a new mask
    assert torch.equal(kernels.attention(q, k, v, dropout_p=0.0), kernels.attention(q, k, v))


def test_small_query_with_dropout_uses_the_fused_kernel(device):
    """Lq <= 16 without autograd normally goes to the decode kernel, which has no dropout."""
    q, k, v = make_qkv(2, 2, 2, 3, 40, 32, torch.float32, device)
    with torch.no_grad():
        out = kernels.attention(q, k, v, dropout_p=0.25, generator=generator(device, 5))
    keep = kernel_mask(device, 5, 2, 2, 3, 40, 0.25)
    expected = attention_reference(*to64(q, k, v), dropout_p=0.25, dropout_mask=keep)
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_mean_over_masks_is_unbiased(device):
    """1 / (1 - p) scaling: the average output over many masks approaches the output without dropout."""
    q, k, v = make_qkv(1, 1, 1, 4, 16, 16, torch.float32, device)
    expected = attention_reference(*to64(q, k, v), causal=False)
    trials = 400
    keeps = torch.stack([kernel_mask(device, s, 1, 1, 4, 16, 0.5) for s in range(trials)])
    probs = torch.softmax((q.double() @ k.double().transpose(-1, -2)) / 4.0, -1)
    outs = (torch.where(keeps, probs * 2.0, 0.0) @ v.double())             # the reference with each kernel mask
    spread = outs.std(0) / math.sqrt(trials)
    assert ((outs.mean(0) - expected).abs() <= 5 * spread + 1e-9).all()


@pytest.mark.parametrize("dropout_p", [-0.1, 1.0, 1.5, "0.1"], ids=["p-0.1", "p1.0", "p1.5", "p_str"])
def test_bad_dropout_p(dropout_p, device):
    q, k, v = make_qkv(1, 2, 2, 8, 8, 16, torch.float32, device)
    with pytest.raises(ValueError, match="dropout_p"):
        kernels.attention(q, k, v, dropout_p=dropout_p)

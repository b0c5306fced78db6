"""LLaMA against HF transformers on tiny checkpoints HF writes (shared fixtures: tests/llama/conftest.py):
logits against HF (padded, unpadded, bf16) and the KV cache."""

import pytest
import torch
import transformers

from fusedformers.models.kv_cache import KVCache
from fusedformers.models.llama import LlamaForCausalLM
from tests.conftest import DEVICE
from tests.llama.common import (
    ATOL,
    TINY,
    assert_logits_close,
    hf_logits,
    hf_positions,
    left_padded_batch,
)

# ----------------------------------------------------------------------------------------------- logits

@pytest.mark.parametrize("impl", ["fused", "eager"])
def test_logits_match_hf_left_padded(base, impl):
    path, hf = base
    model = LlamaForCausalLM.from_pretrained(path, device=DEVICE, attn_implementation=impl)
    ids, mask = left_padded_batch([12, 9, 4], 12)
    with torch.no_grad():
        ours = model(ids, attention_mask=mask).logits  # positions 0 ... L-1, as HF's forward
    assert ours.shape == (3, 12, TINY["vocab_size"])
    assert torch.isfinite(ours).all()
    assert_logits_close(ours, hf_logits(hf, ids, mask), mask)


def test_default_positions_are_hfs_whatever_the_mask(base):
    """forward's default position ids are 0 ... L-1 (HF's forward), not the mask's running count: a mask with a
    hole or with values of 2 gives HF's logits (before: off by up to 4.2); explicit position_ids still rule."""
    path, hf = base
    model = LlamaForCausalLM.from_pretrained(path, device=DEVICE, attn_implementation="eager")
    ids, mask = left_padded_batch([10, 10], 10, seed=28)
    mask[0, 4:6] = 0   # a hole
    mask[1, 3] = 2     # HF reads any nonzero value as a token
    with torch.no_grad():
        ours = model(ids, attention_mask=mask).logits
        reference = hf(ids, attention_mask=mask).logits
        assert_logits_close(ours, reference, mask != 0)
        positions = hf_positions((mask != 0).long())
        assert_logits_close(model(ids, attention_mask=mask, position_ids=positions).logits,
                            hf(ids, attention_mask=mask, position_ids=positions).logits, mask != 0)


def test_mask_dtypes_give_the_same_logits(fused):
    ids, mask = left_padded_batch([9, 5], 9, seed=11)
    with torch.no_grad():
        ref = fused(ids, attention_mask=mask).logits
        for other in (mask.bool(), mask.float(), mask.int()):
            assert torch.equal(fused(ids, attention_mask=other).logits, ref)


def test_logits_match_hf_without_mask(base, fused):
    ids, _ = left_padded_batch([10], 10, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(fused(ids).logits, base[1](ids).logits, atol=ATOL, rtol=1e-4)


def test_kv_cache_decode_matches_full_forward(fused):
    """Prefill then one token per step through forward(past_key_values=...) equals one full forward."""
    ids, mask = left_padded_batch([10, 6], 10, seed=2)
    with torch.no_grad():
        full = fused(ids, attention_mask=mask).logits
        out = fused(ids[:, :7], attention_mask=mask[:, :7], use_cache=True, max_cache_len=10)
        cache = out.past_key_values
        assert isinstance(cache, KVCache) and cache.length == 7 and cache.max_len == 10
        steps = [out.logits]
        for t in range(7, 10):
            out = fused(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], past_key_values=cache)
            assert out.past_key_values is cache and cache.length == t + 1
            steps.append(out.logits)
    assert_logits_close(torch.cat(steps, dim=1), full, mask)


def test_kv_cache_under_autocast(base):
    """Under autocast the projections come out in the autocast dtype; the cache keeps the model's dtype and
    takes them (as HF's cache does), for forward(use_cache=True) and generate."""
    model = LlamaForCausalLM.from_pretrained(base[0], device=DEVICE, attn_implementation="eager")
    ids, mask = left_padded_batch([6, 4], 6, seed=9)
    with torch.no_grad(), torch.autocast(torch.device(DEVICE).type, dtype=torch.bfloat16):
        out = model(ids, attention_mask=mask, use_cache=True)
        tokens = model.generate(ids, attention_mask=mask, max_new_tokens=3, eos_token_id=[])
    assert out.past_key_values.k[0].dtype == torch.float32 and out.past_key_values.length == 6
    assert tokens.shape == (2, 9)


def test_kv_cache_grows_when_continued_past_its_size(fused):
    """As with HF's dynamic cache: forward(use_cache=True) then more tokens through out.past_key_values."""
    ids, mask = left_padded_batch([9, 5], 9, seed=3)
    with torch.no_grad():
        full = fused(ids, attention_mask=mask).logits
        out = fused(ids[:, :4], attention_mask=mask[:, :4], use_cache=True)
        assert out.past_key_values.max_len == 4
        rest = fused(ids[:, 4:], attention_mask=mask, past_key_values=out.past_key_values)
        assert out.past_key_values.max_len >= 9 and out.past_key_values.length == 9
        last = fused(ids, attention_mask=mask, logits_to_keep=torch.tensor([2, 8], device=DEVICE)).logits
    assert_logits_close(torch.cat([out.logits, rest.logits], dim=1), full, mask)
    torch.testing.assert_close(last, full[:, [2, 8]], atol=ATOL, rtol=1e-4)


def test_kv_cache_in_place_views_and_reorder():
    cache = KVCache(num_layers=2, batch_size=3, num_kv_heads=2, max_len=5, head_dim=4)
    k_new = torch.randn(3, 4, 2, 4).transpose(1, 2)  # [B, Hkv, 4, D] strided view, as the model passes
    k, v = cache.update(0, k_new, k_new * 2, cache.next_positions(4), kv_len=4)
    assert k.shape == (3, 2, 4, 4) and k.data_ptr() == cache.k[0].data_ptr()
    torch.testing.assert_close(k, k_new)
    cache.update(1, k_new, k_new, cache.next_positions(4), kv_len=4)
    cache.advance(4)
    cache.reorder(torch.tensor([2, 2, 0]))
    torch.testing.assert_close(cache.k[0][:, :, :4], k_new[[2, 2, 0]])
    torch.testing.assert_close(cache.v[0][:, :, :4], 2 * k_new[[2, 2, 0]])
    with pytest.raises(ValueError, match="exceeds max_len 5"):
        cache.update(0, k_new[:, :, :2], k_new[:, :, :2], cache.next_positions(2), kv_len=6)


# ----------------------------------------------------------------------------------------------- bf16

def test_bf16_logits_within_hf_bf16_error(base):
    """bf16 (the deployment dtype): our error against HF's fp32 logits stays within 2x the error of HF's own
    bf16 computation on the same checkpoint (plus a small slack), at the real positions of a padded batch."""
    path, hf32 = base
    ids, mask = left_padded_batch([12, 7], 12, seed=5)
    reference = hf_logits(hf32, ids, mask).double()
    hf16 = transformers.LlamaForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to(DEVICE).eval()
    hf16.set_attn_implementation("eager")
    ours = LlamaForCausalLM.from_pretrained(path, device=DEVICE, dtype=torch.bfloat16)
    with torch.no_grad():
        ours_logits = ours(ids, attention_mask=mask).logits
    assert ours_logits.dtype == torch.bfloat16 and torch.isfinite(ours_logits).all()
    real = mask.bool()
    ours_error = (ours_logits[real].double() - reference[real]).abs().max().item()
    hf_error = (hf_logits(hf16, ids, mask)[real].double() - reference[real]).abs().max().item()
    assert ours_error <= 2 * hf_error + 1e-2, f"bf16 logits error {ours_error:.3e} vs HF bf16's {hf_error:.3e}"

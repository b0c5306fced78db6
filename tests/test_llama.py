"""fusedformers.models.llama against Hugging Face transformers (a test-only reference) on tiny random checkpoints
that HF writes.

Without a GPU the fused kernels run through Triton's interpreter (tests/conftest.py), so sequences stay short
(<= 24) and few tokens are generated; checkpoints are shared per module.
"""
import json
import os
import shutil
import warnings
from dataclasses import replace

import pytest
import torch
import transformers

from fusedformers.models import llama as llama_module
from fusedformers.models.checkpoint import assign_state_dict, load_safetensors_state_dict
from fusedformers.models.generation import apply_logits_processing, pick_next_token
from fusedformers.models.kv_cache import KVCache
from fusedformers.models.llama import LlamaConfig, LlamaForCausalLM
from tests.conftest import DEVICE
from tests.helpers import reference_with_kernel_dropout

transformers.logging.set_verbosity_error()

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
            eos_token_id=2, initializer_range=0.1)
PAD = 0
ATOL = 2e-4 if DEVICE == "cpu" else 1e-3  # fp32 logits of magnitude ~1; GPU tf32 dots are coarser


def make_checkpoint(path, seed=0, **overrides):
    """Save a random HF LLaMA (float32) to ``path``; returns the HF model in eval mode."""
    torch.manual_seed(seed)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**TINY, **overrides}))
    hf.set_attn_implementation("eager")
    hf.save_pretrained(path)
    return hf.eval()


def edit_config(path, edit):
    config_path = os.path.join(path, "config.json")
    with open(config_path) as f:
        config = json.load(f)
    edit(config)
    with open(config_path, "w") as f:
        json.dump(config, f)


def left_padded_batch(lengths, total, seed=0):
    """input_ids, attention_mask ``[B, total]``: row b has ``lengths[b]`` real tokens, left-padded with PAD."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, TINY["vocab_size"], (len(lengths), total), generator=g)
    mask = torch.zeros(len(lengths), total, dtype=torch.long)
    for row, n in enumerate(lengths):
        mask[row, total - n:] = 1
    return ids.masked_fill(mask == 0, PAD).to(DEVICE), mask.to(DEVICE)


def hf_positions(mask):
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)


def hf_logits(hf, ids, mask):
    with torch.no_grad():
        return hf(ids, attention_mask=mask, position_ids=hf_positions(mask)).logits


def assert_logits_close(ours, ref, mask):
    """Only real (unpadded) query positions: HF's padded rows are garbage by design, ours are zero-attention."""
    real = mask.bool()
    torch.testing.assert_close(ours[real], ref[real], atol=ATOL, rtol=1e-4)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """GQA checkpoint (4 query heads, 2 K/V heads), untied embeddings: (directory, HF model on DEVICE)."""
    path = str(tmp_path_factory.mktemp("llama_base"))
    return path, make_checkpoint(path).to(DEVICE)


@pytest.fixture(scope="module")
def fused(base):
    return LlamaForCausalLM.from_pretrained(base[0], device=DEVICE)


# ----------------------------------------------------------------------------------------------- logits

@pytest.mark.parametrize("impl", ["fused", "eager"])
def test_logits_match_hf_left_padded(base, impl):
    path, hf = base
    model = LlamaForCausalLM.from_pretrained(path, device=DEVICE, attn_implementation=impl)
    ids, mask = left_padded_batch([12, 9, 4], 12)
    with torch.no_grad():
        ours = model(ids, attention_mask=mask).logits  # positions from the mask, as HF's generate
    assert ours.shape == (3, 12, TINY["vocab_size"])
    assert torch.isfinite(ours).all()
    assert_logits_close(ours, hf_logits(hf, ids, mask), mask)


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
    k, v = cache.update(0, k_new, k_new * 2)
    assert k.shape == (3, 2, 4, 4) and k.data_ptr() == cache.k[0].data_ptr()
    torch.testing.assert_close(k, k_new)
    cache.update(1, k_new, k_new)
    cache.advance(4)
    cache.reorder(torch.tensor([2, 2, 0]))
    torch.testing.assert_close(cache.k[0][:, :, :4], k_new[[2, 2, 0]])
    torch.testing.assert_close(cache.v[0][:, :, :4], 2 * k_new[[2, 2, 0]])
    with pytest.raises(ValueError, match="exceeds max_len 5"):
        cache.update(0, k_new[:, :, :2], k_new[:, :, :2])


# ----------------------------------------------------------------------------------------------- generation

def test_greedy_generation_matches_hf(base, fused):
    ids, mask = left_padded_batch([10, 7, 3], 10, seed=3)
    ref = base[1].generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=PAD)
    ours = fused.generate(ids, attention_mask=mask, max_new_tokens=6)
    assert ours.shape == (3, 16)
    assert torch.equal(ours, ref)


@pytest.mark.parametrize("impl", ["fused", "eager"])
def test_static_cache_generation_matches_hf(base, fused, eager, impl):
    """cache_implementation="static": fixed-shape steps over the whole cache (a CUDA graph on the GPU) give
    HF's tokens on a left-padded batch, with rows finishing at different times."""
    model = fused if impl == "fused" else eager
    ids, mask = left_padded_batch([9, 4, 7], 9, seed=19)
    with torch.no_grad():
        eos = int(model(ids, attention_mask=mask).logits[1, -1].argmax())  # row 1 stops at once
    kwargs = dict(attention_mask=mask, max_new_tokens=6, eos_token_id=eos, pad_token_id=PAD)
    static = model.generate(ids, cache_implementation="static", **kwargs)
    assert torch.equal(static, hf_greedy(base[1], ids, mask, max_new_tokens=6, eos_token_id=eos))
    assert torch.equal(static, model.generate(ids, **kwargs))
    with pytest.raises(ValueError, match="cache_implementation"):
        model.generate(ids, cache_implementation="offloaded", **kwargs)


def test_static_cache_is_reused_and_rebuilt_when_the_shape_changes(eager):
    ids, mask = left_padded_batch([6, 4], 6, seed=22)
    first = eager.generate(ids, attention_mask=mask, max_new_tokens=4, cache_implementation="static")
    state = eager._static_state
    again = eager.generate(ids, attention_mask=mask, max_new_tokens=4, cache_implementation="static")
    assert eager._static_state is state and torch.equal(first, again)
    other_ids, other_mask = left_padded_batch([5, 5], 6, seed=23)  # same shape, other prompt: same buffers
    assert torch.equal(eager.generate(other_ids, attention_mask=other_mask, max_new_tokens=4,
                                      cache_implementation="static"),
                       eager.generate(other_ids, attention_mask=other_mask, max_new_tokens=4))
    assert eager._static_state is state
    eager.generate(ids, attention_mask=mask, max_new_tokens=5, cache_implementation="static")
    assert eager._static_state is not state  # another length: a new cache and step
    eager.release_static_cache()
    assert eager._static_state is None


def test_static_cache_sampling_matches_the_dynamic_path(fused):
    ids, mask = left_padded_batch([6, 3], 6, seed=20)
    kwargs = dict(attention_mask=mask, max_new_tokens=4, do_sample=True, top_k=0, temperature=1.3)
    assert torch.equal(fused.generate(ids, seed=5, cache_implementation="static", **kwargs),
                       fused.generate(ids, seed=5, **kwargs))


@pytest.mark.skipif(DEVICE != "cuda", reason="records a CUDA graph")
def test_static_cache_records_one_cuda_graph(fused, monkeypatch):
    from fusedformers.models import cuda_graph
    recorded = []
    real_record = cuda_graph.StepGraph._record

    def record(self):
        real_record(self)
        recorded.append(self.graph)

    monkeypatch.setattr(cuda_graph.StepGraph, "_record", record)
    fused.release_static_cache()
    for seed in (21, 24):  # the second call replays the graph recorded by the first, on another prompt
        ids, mask = left_padded_batch([8, 5], 8, seed=seed)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            static = fused.generate(ids, attention_mask=mask, max_new_tokens=6, cache_implementation="static")
        failed = [str(w.message) for w in caught if "CUDA graph failed" in str(w.message)]
        assert not failed, failed  # a failed recording warns and falls back to eager steps
        assert torch.equal(static, fused.generate(ids, attention_mask=mask, max_new_tokens=6))
    assert len(recorded) == 1 and recorded[0] is not None


def test_generation_finished_rows_pad_and_eos_list(base, fused):
    """A row that emits an eos continues with pad; generation stops once every row has finished."""
    ids, mask = left_padded_batch([8, 5], 8, seed=4)
    free = fused.generate(ids, attention_mask=mask, max_new_tokens=6, eos_token_id=[127, 126])
    eos = [int(free[0, 9]), 127]  # row 0 finishes at its second new token
    ref = base[1].generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, eos_token_id=eos,
                           pad_token_id=PAD)
    ours = fused.generate(ids, attention_mask=mask, max_new_tokens=6, eos_token_id=eos, pad_token_id=PAD)
    assert torch.equal(ours, ref)
    assert (ours[0, 10:] == PAD).all()
    # min_new_tokens keeps eos from being picked for the first tokens
    ref = base[1].generate(ids, attention_mask=mask, max_new_tokens=4, min_new_tokens=3, do_sample=False,
                           eos_token_id=eos, pad_token_id=PAD)
    ours = fused.generate(ids, attention_mask=mask, max_new_tokens=4, min_new_tokens=3, eos_token_id=eos,
                          pad_token_id=PAD)
    assert torch.equal(ours, ref)
    assert int(ours[0, 9]) != eos[0]


def test_generation_stops_when_every_row_finished(base, fused):
    """All rows finish long before max_new_tokens (past the stop-check interval): output ends where HF's does."""
    from fusedformers.models.llama import STOP_CHECK_INTERVAL

    ids, mask = left_padded_batch([6, 4], 6, seed=7)
    free = fused.generate(ids, attention_mask=mask, max_new_tokens=3, eos_token_id=[127])
    eos = sorted({int(free[0, 7]), int(free[1, 8])})  # row 0 ends at its 2nd new token, row 1 by its 3rd
    assert 127 not in eos
    max_new = STOP_CHECK_INTERVAL + 5
    ref = base[1].generate(ids, attention_mask=mask, max_new_tokens=max_new, do_sample=False, eos_token_id=eos,
                           pad_token_id=PAD)
    ours = fused.generate(ids, attention_mask=mask, max_new_tokens=max_new, eos_token_id=eos, pad_token_id=PAD)
    assert ours.shape[1] < ids.shape[1] + max_new
    assert torch.equal(ours, ref)


def test_generation_defaults_from_generation_config(tmp_path, base):
    shutil.copytree(base[0], tmp_path, dirs_exist_ok=True)
    with open(tmp_path / "generation_config.json", "w") as f:
        json.dump({"max_new_tokens": 2, "eos_token_id": 127, "pad_token_id": 0, "do_sample": False}, f)
    model = LlamaForCausalLM.from_pretrained(str(tmp_path), device=DEVICE, attn_implementation="eager")
    ids, mask = left_padded_batch([5, 3], 5, seed=12)
    out = model.generate(ids, attention_mask=mask)
    assert out.shape == (2, 7)
    assert torch.equal(out, base[1].generate(ids, attention_mask=mask, max_new_tokens=2, do_sample=False,
                                             pad_token_id=PAD))


@pytest.fixture(scope="module")
def eager(base):
    return LlamaForCausalLM.from_pretrained(base[0], device=DEVICE, attn_implementation="eager")


def hf_greedy(hf, ids, mask, **kwargs):
    return hf.generate(ids, attention_mask=mask, do_sample=False, pad_token_id=PAD, **kwargs)


@pytest.mark.parametrize("prompt_len", [6, 24])
def test_default_length_is_20_new_tokens_as_hf(base, eager, prompt_len):
    """No max_new_tokens / max_length anywhere: HF generates 20 new tokens (capped by the position table),
    whatever the prompt length."""
    ids, mask = left_padded_batch([prompt_len, prompt_len - 2], prompt_len, seed=13)
    ours = eager.generate(ids, attention_mask=mask, eos_token_id=[])
    assert ours.shape == (2, prompt_len + 20)
    assert torch.equal(ours, hf_greedy(base[1], ids, mask, eos_token_id=None))


@pytest.mark.parametrize("kwargs", [dict(max_length=11), dict(min_length=14, max_new_tokens=9),
                                    dict(min_new_tokens=3, min_length=9, max_new_tokens=6),
                                    dict(min_new_tokens=1, min_length=14, max_new_tokens=8)])
def test_max_and_min_length_count_the_prompt(base, eager, kwargs):
    """eos among the likely tokens, so that min_length / min_new_tokens really suppress it."""
    ids, mask = left_padded_batch([8, 5], 8, seed=14)
    with torch.no_grad():
        eos = int(eager(ids, attention_mask=mask).logits[:, -1].argmax(-1)[0])  # row 0's next greedy token
    ours = eager.generate(ids, attention_mask=mask, eos_token_id=eos, pad_token_id=PAD, **kwargs)
    assert torch.equal(ours, hf_greedy(base[1], ids, mask, eos_token_id=eos, **kwargs))


@pytest.mark.parametrize("setting", [dict(repetition_penalty=1.3), dict(num_beams=2), dict(no_repeat_ngram_size=2),
                                     dict(forced_eos_token_id=5), dict(num_return_sequences=2)])
def test_unsupported_generation_settings_are_errors(tmp_path, base, eager, setting):
    """HF would apply them: an error, not silently different tokens; from the call or the generation config."""
    ids, mask = left_padded_batch([5, 5], 5, seed=15)
    with pytest.raises(NotImplementedError, match=list(setting)[0]):
        eager.generate(ids, attention_mask=mask, max_new_tokens=2, **setting)
    shutil.copytree(base[0], tmp_path, dirs_exist_ok=True)
    with open(tmp_path / "generation_config.json", "w") as f:
        json.dump({"eos_token_id": 2, "pad_token_id": 0, **setting}, f)
    model = LlamaForCausalLM.from_pretrained(str(tmp_path), device=DEVICE, attn_implementation="eager")
    with pytest.raises(NotImplementedError, match=list(setting)[0]):
        model.generate(ids, attention_mask=mask, max_new_tokens=2)


def test_off_values_of_other_settings_are_accepted(base, eager):
    ids, mask = left_padded_batch([6, 4], 6, seed=16)
    plain = eager.generate(ids, attention_mask=mask, max_new_tokens=4)
    same = eager.generate(ids, attention_mask=mask, max_new_tokens=4, num_beams=1, repetition_penalty=1.0,
                          num_return_sequences=1, use_cache=False)
    assert torch.equal(plain, same)
    with pytest.raises(TypeError, match="unexpected arguments"):
        eager.generate(ids, attention_mask=mask, max_new_tokens=4, no_such_setting=3)


def test_generation_keys_of_a_legacy_config_json(tmp_path, base):
    """Without generation_config.json HF reads the generation keys of config.json (here max_length)."""
    shutil.copytree(base[0], tmp_path, dirs_exist_ok=True)
    os.remove(tmp_path / "generation_config.json")
    edit_config(str(tmp_path), lambda c: c.update(max_length=12))
    model = LlamaForCausalLM.from_pretrained(str(tmp_path), device=DEVICE, attn_implementation="eager")
    hf = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path)).to(DEVICE).eval()
    ids, mask = left_padded_batch([7, 5], 7, seed=17)
    ours = model.generate(ids, attention_mask=mask, eos_token_id=[])
    assert ours.shape == (2, 12)
    assert torch.equal(ours, hf_greedy(hf, ids, mask, eos_token_id=None))


def test_sampling_seeded_and_top_k_top_p(fused):
    ids, mask = left_padded_batch([6, 4], 6, seed=5)
    kwargs = dict(attention_mask=mask, max_new_tokens=5, do_sample=True, temperature=1.5, top_k=0)
    first = fused.generate(ids, seed=7, **kwargs)
    assert torch.equal(first, fused.generate(ids, seed=7, **kwargs))
    others = [fused.generate(ids, seed=s, **kwargs) for s in (8, 9)]
    assert any(not torch.equal(first, o) for o in others), "three seeds gave identical samples"
    greedy = fused.generate(ids, attention_mask=mask, max_new_tokens=5)
    assert torch.equal(fused.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=True, top_k=1,
                                      seed=3), greedy)
    assert torch.equal(fused.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=True, top_p=1e-6,
                                      top_k=0, seed=3), greedy)


def test_sampling_matches_hf_under_global_seed(base, fused):
    """Same processors in the same order and one multinomial draw per step: HF's tokens under the same seed."""
    ids, mask = left_padded_batch([6, 4], 6, seed=6)
    kwargs = dict(attention_mask=mask, max_new_tokens=5, do_sample=True, temperature=0.7, top_k=20, top_p=0.9)
    torch.manual_seed(11)
    ref = base[1].generate(ids, pad_token_id=PAD, **kwargs)
    torch.manual_seed(11)
    assert torch.equal(fused.generate(ids, **kwargs), ref)


def test_logits_processing_matches_hf_processors():
    from transformers.generation.logits_process import (
        MinNewTokensLengthLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )
    logits = torch.randn(4, 50) * 3
    logits[0, :3] = 5.0  # ties at the top-k boundary
    prompt = torch.zeros(4, 7, dtype=torch.long)
    for temperature, top_k, top_p in [(0.7, 5, 0.8), (1.0, 0, 0.3), (2.0, 3, 1.0), (1.0, 1, 0.5), (0.5, 0, 1e-9)]:
        expected = logits
        if temperature != 1.0:
            expected = TemperatureLogitsWarper(temperature)(prompt, expected)
        if top_k:
            expected = TopKLogitsWarper(top_k)(prompt, expected)
        if top_p < 1.0:
            expected = TopPLogitsWarper(top_p)(prompt, expected)
        ours = apply_logits_processing(logits, do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p)
        torch.testing.assert_close(ours, expected)
        assert (ours > float("-inf")).sum(-1).min() >= 1
    expected = MinNewTokensLengthLogitsProcessor(5, 2, [3, 9])(torch.zeros(4, 6, dtype=torch.long), logits)
    torch.testing.assert_close(apply_logits_processing(logits, num_generated=1, min_new_tokens=2,
                                                       eos_token_ids=[3, 9]), expected)
    torch.testing.assert_close(apply_logits_processing(logits, num_generated=2, min_new_tokens=2,
                                                       eos_token_ids=[3, 9]), logits)
    assert torch.equal(pick_next_token(logits), logits.argmax(-1))


# ----------------------------------------------------------------------------------------------- training

def hf_grads(hf):
    return {name.removeprefix("model."): p.grad for name, p in hf.named_parameters()}


def loss_inputs():
    ids, mask = left_padded_batch([10, 7], 10, seed=8)
    # -100 on padding and on each row's first real token: HF's loss would predict it from a padded position,
    # whose output is garbage in HF and zero-attention here
    follows_padding = torch.nn.functional.pad(mask[:, :-1], (1, 0), value=1) == 0
    labels = ids.masked_fill((mask == 0) | follows_padding, -100)
    labels[0, 4] = -100
    return ids, mask, labels


@pytest.fixture(scope="module")
def trained(base):
    """Loss and parameter gradients of HF and of our fused model on one left-padded batch with -100 labels."""
    path, hf = base
    ids, mask, labels = loss_inputs()
    hf.zero_grad()
    ref = hf(ids, attention_mask=mask, position_ids=hf_positions(mask), labels=labels).loss
    ref.backward()
    ref_grads = {k: g.clone() for k, g in hf_grads(hf).items()}
    hf.zero_grad()
    model = LlamaForCausalLM.from_pretrained(path, device=DEVICE).train()
    loss = model(ids, attention_mask=mask, labels=labels).loss
    loss.backward()
    return model, loss.detach(), ref.detach(), ref_grads


def test_loss_and_gradients_match_hf(trained):
    model, loss, ref_loss, ref_grads = trained
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    grads = {name: p.grad for name, p in model.named_parameters()}
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        assert grad is not None, f"no gradient for {name}"
        torch.testing.assert_close(grad, ref_grads[name], atol=1e-5, rtol=1e-3, msg=lambda m: f"{name}: {m}")
    assert grads["embed_tokens.weight"][PAD].abs().max() == 0  # padding_idx, as HF's nn.Embedding


def test_gradient_checkpointing_same_gradients(base, trained):
    model, loss, _, _ = trained
    plain = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    model.gradient_checkpointing_enable()
    try:
        ids, mask, labels = loss_inputs()
        checkpointed = model(ids, attention_mask=mask, labels=labels).loss
        checkpointed.backward()
    finally:
        model.gradient_checkpointing_disable()
    torch.testing.assert_close(checkpointed.detach(), loss)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, plain[name], atol=1e-6, rtol=1e-5, msg=lambda m: f"{name}: {m}")


def test_attention_dropout_runs_in_the_kernel(tmp_path, monkeypatch):
    """config.attention_dropout in training: the fused model gives the loss and gradients of the eager model
    whose reference attention uses the kernel's own dropout masks; masks follow torch.manual_seed, also through
    gradient checkpointing; a different seed gives a different loss; eval mode has no dropout."""
    make_checkpoint(tmp_path, seed=3, attention_dropout=0.2)
    fused = LlamaForCausalLM.from_pretrained(tmp_path, device=DEVICE).train()
    eager = LlamaForCausalLM.from_pretrained(tmp_path, device=DEVICE, attn_implementation="eager").train()
    monkeypatch.setitem(llama_module.IMPLEMENTATIONS, "eager",
                        llama_module.IMPLEMENTATIONS["eager"]._replace(attention=reference_with_kernel_dropout))
    ids, mask, labels = loss_inputs()

    def loss_and_grads(model, seed):
        torch.manual_seed(seed)
        model.zero_grad()
        loss = model(ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}

    loss, grads = loss_and_grads(fused, 5)
    expected_loss, expected_grads = loss_and_grads(eager, 5)
    torch.testing.assert_close(loss, expected_loss, atol=1e-5, rtol=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], atol=1e-5, rtol=1e-3, msg=lambda m: f"{name}: {m}")
    assert not torch.equal(loss_and_grads(fused, 6)[0], loss)
    fused.gradient_checkpointing_enable()
    checkpointed_loss, checkpointed_grads = loss_and_grads(fused, 5)
    assert torch.equal(checkpointed_loss, loss)
    for name, grad in grads.items():
        torch.testing.assert_close(checkpointed_grads[name], grad, atol=1e-6, rtol=1e-5)
    fused.eval()
    with torch.no_grad():
        assert torch.equal(fused(ids, attention_mask=mask).logits, fused(ids, attention_mask=mask).logits)


# ----------------------------------------------------------------------------------------------- config variants

def legacy_rope(config):
    """Rewrite transformers 5's rope_parameters as the older rope_theta + rope_scaling spelling."""
    params = dict(config.pop("rope_parameters"))
    config["rope_theta"] = params.pop("rope_theta")
    rope_type = params.pop("rope_type")
    if rope_type == "default":
        config["rope_scaling"] = None
    elif rope_type == "llama3":
        config["rope_scaling"] = {"rope_type": "llama3", **params}  # as Llama 3.1 configs spell it
    else:
        config["rope_scaling"] = {"type": rope_type, **params}  # as Llama 2 era configs spell it


ROPES = {
    "default": {"rope_type": "default", "rope_theta": 5000.0},
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 3.0},
    # max_position_embeddings 8 below: the 12-token prompt and the generated tokens grow the NTK base
    "dynamic": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0},
    # wavelengths 6.3 (kept), 19.9 (smoothed), >= 63 (divided by factor) around the cut-offs 8 and 32
    "llama3": {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
}

VARIANTS = {
    "mha": dict(num_key_value_heads=4),
    "mqa": dict(num_key_value_heads=1),
    "tied": dict(tie_word_embeddings=True),
    "head_dim_32": dict(head_dim=32),
    "attention_and_mlp_bias": dict(attention_bias=True, mlp_bias=True),
    "eos_list_gelu": dict(eos_token_id=[2, 5], hidden_act="gelu_pytorch_tanh"),
}
for _name, _rope in ROPES.items():
    _extra = {"max_position_embeddings": 8} if _name == "dynamic" else {}
    VARIANTS[f"rope_{_name}"] = dict(rope_parameters=_rope, **_extra)
    VARIANTS[f"rope_{_name}_legacy"] = dict(rope_parameters=_rope, **_extra, _legacy=True)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_config_variant_logits(tmp_path, variant):
    overrides = dict(VARIANTS[variant])
    legacy = overrides.pop("_legacy", False)
    hf = make_checkpoint(str(tmp_path), seed=1, **overrides).to(DEVICE)
    if legacy:
        edit_config(str(tmp_path), legacy_rope)
        with open(tmp_path / "config.json") as f:
            assert "rope_parameters" not in json.load(f)
    model = LlamaForCausalLM.from_pretrained(str(tmp_path), device=DEVICE)
    if "rope_parameters" in overrides:
        assert model.config.rope_parameters == {**overrides["rope_parameters"],
                                                **model.config.rope_parameters}
    if overrides.get("tie_word_embeddings"):
        assert model.lm_head.weight is model.embed_tokens.weight
    else:
        assert model.lm_head.weight is not model.embed_tokens.weight
    ids, mask = left_padded_batch([12, 8], 12, seed=9)
    with torch.no_grad():
        assert_logits_close(model(ids, attention_mask=mask).logits, hf_logits(hf, ids, mask), mask)
    if variant in ("eos_list_gelu", "rope_dynamic"):
        assert model.config.eos_token_id == hf.config.eos_token_id
        ref = hf.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=PAD)
        assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=3), ref)


def test_sharded_checkpoint_and_dtype(tmp_path, base):
    hf = base[1]
    hf.save_pretrained(str(tmp_path), max_shard_size="40KB")
    assert os.path.exists(tmp_path / "model.safetensors.index.json")
    assert not os.path.exists(tmp_path / "model.safetensors")
    model = LlamaForCausalLM.from_pretrained(str(tmp_path), device=DEVICE, dtype=torch.bfloat16,
                                             attn_implementation="eager")
    assert all(p.dtype == torch.bfloat16 and p.device.type == torch.device(DEVICE).type
               for p in model.parameters())
    torch.testing.assert_close(model.layers[1].mlp.up_proj.weight,
                               hf.model.layers[1].mlp.up_proj.weight.to(torch.bfloat16))
    ids, mask = left_padded_batch([6, 4], 6, seed=10)
    with torch.no_grad():
        logits = model(ids, attention_mask=mask).logits
    assert logits.dtype == torch.bfloat16
    assert_close = (logits.float() - hf_logits(hf, ids, mask)).abs()[mask.bool()].max()
    assert assert_close < 0.1


@pytest.mark.parametrize("dtype,expected", [("bfloat16", torch.bfloat16), ("torch.float16", torch.float16),
                                            ("auto", torch.bfloat16), (None, torch.bfloat16)])
def test_dtype_names_and_auto(tmp_path, base, dtype, expected):
    """dtype by name, or "auto" (the default, as in HF 5): the checkpoint's own dtype (here bf16)."""
    hf16 = transformers.LlamaForCausalLM.from_pretrained(base[0], dtype=torch.bfloat16)
    hf16.save_pretrained(tmp_path)
    kwargs = {} if dtype is None else {"dtype": dtype}
    model = LlamaForCausalLM.from_pretrained(str(tmp_path), device=DEVICE, attn_implementation="eager", **kwargs)
    assert model.dtype == expected
    with pytest.raises(ValueError, match="dtype must be"):
        LlamaForCausalLM.from_pretrained(str(tmp_path), dtype="bf16")


def test_tied_config_with_a_different_stored_lm_head_loads_untied_as_hf(tmp_path, base):
    def untie_values(sd):
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"] + 0.5

    shutil.copytree(base[0], tmp_path, dirs_exist_ok=True)
    edit_config(str(tmp_path), lambda c: c.update(tie_word_embeddings=True))
    rewrite_weights(tmp_path, untie_values)
    with pytest.warns(UserWarning, match="untied"):
        model = LlamaForCausalLM.from_pretrained(str(tmp_path), device=DEVICE, attn_implementation="eager")
    assert model.lm_head.weight is not model.embed_tokens.weight
    hf = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path)).to(DEVICE).eval()
    ids, mask = left_padded_batch([6, 6], 6, seed=18)
    with torch.no_grad():
        assert_logits_close(model(ids, attention_mask=mask).logits, hf_logits(hf, ids, mask), mask)


# ----------------------------------------------------------------------------------------------- save / load

@pytest.mark.parametrize("tied", [False, True])
def test_save_pretrained_loads_in_hf(tmp_path, base, tied):
    path = base[0]
    if tied:
        path = str(tmp_path / "src")
        make_checkpoint(path, seed=2, tie_word_embeddings=True, rope_parameters=ROPES["llama3"])
    model = LlamaForCausalLM.from_pretrained(path, device=DEVICE)
    with torch.no_grad():  # make the round trip non-trivial: weights that differ from the source checkpoint
        model.norm.weight.mul_(1.5)
        model.layers[0].self_attn.k_proj.weight.add_(0.01)
    out = str(tmp_path / "saved")
    model.save_pretrained(out)
    hf = transformers.LlamaForCausalLM.from_pretrained(out).to(DEVICE).eval()
    assert (hf.lm_head.weight is hf.model.embed_tokens.weight) == tied
    ids, mask = left_padded_batch([9, 5], 9, seed=11)
    with torch.no_grad():
        ours = model(ids, attention_mask=mask).logits
    assert_logits_close(ours, hf_logits(hf, ids, mask), mask)
    reloaded = LlamaForCausalLM.from_pretrained(out, device=DEVICE)
    assert replace(reloaded.config, extra={}) == replace(model.config, extra={})
    for (name, p), q in zip(model.state_dict().items(), reloaded.state_dict().values()):
        assert torch.equal(p, q), name


def test_untied_config_without_lm_head_ties(tmp_path, base):
    shutil.copytree(base[0], tmp_path, dirs_exist_ok=True)
    state_dict = load_safetensors_state_dict(str(tmp_path), "cpu", torch.float32)
    del state_dict["lm_head.weight"]
    from safetensors.torch import save_file
    save_file(state_dict, str(tmp_path / "model.safetensors"))
    model = LlamaForCausalLM.from_pretrained(str(tmp_path), attn_implementation="eager")
    assert model.lm_head.weight is model.embed_tokens.weight


# ----------------------------------------------------------------------------------------------- bad checkpoints

@pytest.fixture
def broken(tmp_path, base):
    shutil.copytree(base[0], tmp_path, dirs_exist_ok=True)
    return tmp_path


def rewrite_weights(path, edit):
    from safetensors.torch import save_file
    state_dict = load_safetensors_state_dict(str(path), "cpu", torch.float32)
    edit(state_dict)
    save_file(state_dict, str(path / "model.safetensors"))


def test_missing_config_json(broken):
    os.remove(broken / "config.json")
    with pytest.raises(FileNotFoundError, match=r"config\.json not found"):
        LlamaForCausalLM.from_pretrained(str(broken))


def test_missing_weights_file(broken):
    os.remove(broken / "model.safetensors")
    with pytest.raises(FileNotFoundError, match=r"looked for model\.safetensors and model\.safetensors\.index"):
        LlamaForCausalLM.from_pretrained(str(broken))


def test_missing_tensor(broken):
    rewrite_weights(broken, lambda sd: sd.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(KeyError, match=r"missing tensors: \['layers\.1\.mlp\.up_proj\.weight'\]"):
        LlamaForCausalLM.from_pretrained(str(broken))


def test_unexpected_tensor(broken):
    rewrite_weights(broken, lambda sd: sd.update({"model.layers.0.self_attn.q_proj.bias": torch.zeros(64)}))
    with pytest.raises(KeyError, match=r"unexpected tensors: \['layers\.0\.self_attn\.q_proj\.bias'\]"):
        LlamaForCausalLM.from_pretrained(str(broken))


def test_wrong_shape(broken):
    rewrite_weights(broken, lambda sd: sd.update({"model.norm.weight": torch.ones(32)}))
    with pytest.raises(ValueError, match=r"norm\.weight: expected \(64,\), got \(32,\)"):
        LlamaForCausalLM.from_pretrained(str(broken))


def test_unknown_rope_type(broken):
    edit_config(broken, lambda c: c.update(rope_parameters={"rope_type": "yarn", "factor": 2.0,
                                                            "rope_theta": 10000.0}))
    with pytest.raises(ValueError, match="unsupported rope type 'yarn'"):
        LlamaForCausalLM.from_pretrained(str(broken))
    edit_config(broken, lambda c: (c.pop("rope_parameters"), c.update(rope_scaling={"type": "su", "factor": 2.0})))
    with pytest.raises(ValueError, match="unsupported rope type 'su'"):
        LlamaForCausalLM.from_pretrained(str(broken))
    edit_config(broken, lambda c: c.update(rope_scaling={"type": "linear"}))
    with pytest.raises(ValueError, match=r"missing \['factor'\]"):
        LlamaForCausalLM.from_pretrained(str(broken))


def test_unknown_model_type_and_fields(broken):
    edit_config(broken, lambda c: c.update(model_type="mistral"))
    with pytest.raises(ValueError, match="unsupported model_type 'mistral'"):
        LlamaForCausalLM.from_pretrained(str(broken))
    edit_config(broken, lambda c: c.update(model_type="llama", sliding_window=4096))
    with pytest.raises(ValueError, match=r"not understood .*\['sliding_window'\]"):
        LlamaForCausalLM.from_pretrained(str(broken))
    edit_config(broken, lambda c: (c.pop("sliding_window"), c.update(hidden_act="tanh")))
    with pytest.raises(ValueError, match="unsupported hidden_act 'tanh'"):
        LlamaForCausalLM.from_pretrained(str(broken))


def test_config_fields_parsed():
    config = LlamaConfig.from_dict({**TINY, "model_type": "llama", "num_key_value_heads": None, "head_dim": None,
                                    "rope_theta": 500000.0, "rope_scaling": None, "eos_token_id": [2, 7],
                                    "transformers_version": "4.40.0", "torch_dtype": "bfloat16"})
    assert config.num_key_value_heads == 4 and config.head_dim == 16
    assert config.rope_parameters == {"rope_type": "default", "rope_theta": 500000.0}
    assert config.eos_token_id == [2, 7]
    both = {**TINY, "model_type": "llama", "rope_theta": 10000.0, "rope_scaling": {"type": "linear", "factor": 2.0},
            "rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}}
    assert LlamaConfig.from_dict(both).rope_parameters == both["rope_parameters"]
    both["rope_scaling"]["factor"] = 4.0
    with pytest.raises(ValueError, match="rope_scaling .* disagrees with rope_parameters"):
        LlamaConfig.from_dict(both)
    with pytest.raises(ValueError, match=r"multiple of num_key_value_heads"):
        LlamaConfig.from_dict({**TINY, "model_type": "llama", "num_key_value_heads": 3})


def test_assign_state_dict_reports_everything_at_once():
    module = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    good = {k: v.clone() for k, v in module.state_dict().items()}
    bad = dict(good)
    del bad["0.bias"], bad["1.weight"]
    bad["2.weight"] = torch.zeros(1)
    with pytest.raises(KeyError, match=r"missing tensors: \['0\.bias', '1\.weight'\]; unexpected tensors: "
                                       r"\['2\.weight'\]"):
        assign_state_dict(module, bad)
    bad = dict(good, **{"0.weight": torch.zeros(3, 5), "1.bias": torch.zeros(3)})
    with pytest.raises(ValueError, match=r"0\.weight: expected \(3, 4\), got \(3, 5\); 1\.bias: expected \(2,\)"):
        assign_state_dict(module, bad)
    renamed = {"first." + k[2:] if k.startswith("0.") else k: v for k, v in good.items()}
    assign_state_dict(module, renamed, aliases={"first.weight": "0.weight", "first.bias": "0.bias"})
    assert module[0].weight is not None and module[0].weight.data_ptr() == good["0.weight"].data_ptr()


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

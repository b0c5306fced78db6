"""LLaMA against HF transformers on tiny checkpoints HF writes (shared fixtures: tests/llama/conftest.py):
greedy, sampling and static-cache generation, generation settings."""
import json
import os
import shutil
import warnings

import pytest
import torch
import transformers

from fusedformers.models.generation import SAMPLING_SEARCH, pick_next_token, process_scores, resolve_settings
from fusedformers.models.llama import LlamaForCausalLM
from tests.conftest import DEVICE
from tests.helpers import kwargs_id
from tests.llama.common import (
    PAD,
    edit_config,
    hf_greedy,
    hf_positions,
    left_padded_batch,
)

# ----------------------------------------------------------------------------------------------- generation

def test_greedy_generation_matches_hf(base, fused):
    ids, mask = left_padded_batch([10, 7, 3], 10, seed=3)
    ref = base[1].generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=PAD)
    ours = fused.generate(ids, attention_mask=mask, max_new_tokens=6)
    assert ours.shape == (3, 16)
    assert torch.equal(ours, ref)


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_generation_stops_when_every_row_finished(base, fused):
    """All rows finish long before max_new_tokens (past the stop-check interval): output ends where HF's does."""
    from fusedformers.models.generation import STOP_CHECK_INTERVAL

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


@pytest.mark.parametrize("prompt_len", [6, 24], ids=lambda n: f"prompt{n}")
def test_default_length_is_20_new_tokens_as_hf(base, eager, prompt_len):
    """No max_new_tokens / max_length anywhere: HF generates 20 new tokens (capped by the position table),
    whatever the prompt length."""
    ids, mask = left_padded_batch([prompt_len, prompt_len - 2], prompt_len, seed=13)
    ours = eager.generate(ids, attention_mask=mask, eos_token_id=[])
    assert ours.shape == (2, prompt_len + 20)
    assert torch.equal(ours, hf_greedy(base[1], ids, mask, eos_token_id=None))


@pytest.mark.parametrize("kwargs", [dict(max_length=11), dict(min_length=14, max_new_tokens=9),
                                    dict(min_new_tokens=3, min_length=9, max_new_tokens=6),
                                    dict(min_new_tokens=1, min_length=14, max_new_tokens=8)], ids=kwargs_id)
def test_max_and_min_length_count_the_prompt(base, eager, kwargs):
    """eos among the likely tokens, so that min_length / min_new_tokens really suppress it."""
    ids, mask = left_padded_batch([8, 5], 8, seed=14)
    with torch.no_grad():
        eos = int(eager(ids, attention_mask=mask).logits[:, -1].argmax(-1)[0])  # row 0's next greedy token
    ours = eager.generate(ids, attention_mask=mask, eos_token_id=eos, pad_token_id=PAD, **kwargs)
    assert torch.equal(ours, hf_greedy(base[1], ids, mask, eos_token_id=eos, **kwargs))


@pytest.mark.parametrize("setting", [dict(repetition_penalty=1.3), dict(num_beams=2), dict(no_repeat_ngram_size=2),
                                     dict(forced_eos_token_id=5), dict(num_return_sequences=2)], ids=kwargs_id)
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


@pytest.mark.slow
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


def test_explicit_none_turns_a_setting_off_as_hf(base, fused):
    """An argument passed as None overrides the config and means "off", as in HF: top_k=None samples from the
    whole vocabulary (not HF's default top-k of 50); max_length=None leaves the default length rule."""
    ids, mask = left_padded_batch([6, 4], 6, seed=26)
    kwargs = dict(attention_mask=mask, max_new_tokens=4, do_sample=True, temperature=3.0, top_k=None)
    torch.manual_seed(12)
    ref = base[1].generate(ids, pad_token_id=PAD, **kwargs)
    torch.manual_seed(12)
    assert torch.equal(fused.generate(ids, **kwargs), ref)
    settings = resolve_settings({"max_length": 12}, {"max_length": None}, implemented=SAMPLING_SEARCH, what="test",
                                prompt_len=5)
    assert settings.max_length == 5 + 20


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
        settings = resolve_settings({}, dict(do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p),
                                    implemented=SAMPLING_SEARCH, what="test", prompt_len=7)
        ours = process_scores(prompt, logits, settings)
        torch.testing.assert_close(ours, expected)
        assert (ours > float("-inf")).sum(-1).min() >= 1
    expected = MinNewTokensLengthLogitsProcessor(5, 2, [3, 9])(torch.zeros(4, 6, dtype=torch.long), logits)
    settings = resolve_settings({}, dict(min_new_tokens=2, eos_token_id=[3, 9]), implemented=SAMPLING_SEARCH,
                                what="test", prompt_len=5)
    generated = torch.zeros(4, 6, dtype=torch.long)   # 5 prompt tokens, 1 generated
    torch.testing.assert_close(process_scores(generated, logits, settings), expected)
    torch.testing.assert_close(process_scores(torch.zeros(4, 7, dtype=torch.long), logits, settings), logits)
    assert torch.equal(pick_next_token(logits), logits.argmax(-1))


def test_generate_checks_its_inputs(eager):
    """A mask is never broadcast or sliced to fit: wrong shapes, a 1-D mask, an empty batch and a fractional
    length are clear errors naming the argument (before: silent broadcast, 'expanded size', IndexError, or a
    silently truncated max_new_tokens)."""
    ids, mask = left_padded_batch([5, 3], 5, seed=27)
    bad_masks = {"one row for two": mask[:1], "one position too many": torch.cat([mask, mask[:, :1]], 1),
                 "1-D": mask[0]}
    for what, bad in bad_masks.items():
        with pytest.raises(ValueError, match=r"attention_mask must have the shape of input_ids \(2, 5\)"):
            eager.generate(ids, attention_mask=bad, max_new_tokens=2)
    with pytest.raises(ValueError, match="input_ids must hold at least one token"):
        eager.generate(ids[:0], max_new_tokens=2)
    with pytest.raises(ValueError, match=r"input_ids must be an integer tensor \[B, P\]"):
        eager.generate(ids[0], max_new_tokens=2)
    with pytest.raises(TypeError, match="max_new_tokens must be an int, got 2.5"):
        eager.generate(ids, attention_mask=mask, max_new_tokens=2.5)


def test_a_huge_max_new_tokens_allocates_as_it_goes(base, eager, monkeypatch):
    """max_new_tokens=10**6 with an eos at the first step: the KV cache is made for the prompt and a first
    stretch (and would double as needed), not for a million positions (before: 1.37 GB for this tiny model);
    the tokens are HF's. The growth itself: test_growing_generation_matches_hf."""
    sizes = []
    new_kv_cache = eager.new_kv_cache
    monkeypatch.setattr(eager, "new_kv_cache", lambda batch, max_len: sizes.append(max_len) or
                        new_kv_cache(batch, max_len))
    ids, mask = left_padded_batch([6, 4], 6, seed=29)
    with torch.no_grad():
        first = eager(ids, attention_mask=mask, position_ids=hf_positions(mask)).logits[:, -1].argmax(-1)
    eos = sorted(set(first.tolist()))
    ours = eager.generate(ids, attention_mask=mask, max_new_tokens=10**6, eos_token_id=eos, pad_token_id=PAD)
    assert ours.shape == (2, 7) and sizes and max(sizes) <= 6 + 64
    assert torch.equal(ours, hf_greedy(base[1], ids, mask, eos_token_id=eos, max_new_tokens=10**6))


def test_growing_generation_matches_hf(base, eager, monkeypatch):
    """Buffers that start small and double (here from room for 2 new tokens) give HF's tokens."""
    from fusedformers.models import generation
    monkeypatch.setattr(generation, "INITIAL_ROOM", 2)
    monkeypatch.setattr("fusedformers.models.llama.INITIAL_ROOM", 2)
    ids, mask = left_padded_batch([7, 4], 7, seed=30)
    ours = eager.generate(ids, attention_mask=mask, max_new_tokens=11, eos_token_id=[], pad_token_id=PAD)
    assert torch.equal(ours, hf_greedy(base[1], ids, mask, eos_token_id=None, max_new_tokens=11))

"""LLaMA against HF transformers on tiny checkpoints HF writes (shared fixtures: tests/llama/conftest.py):
config variants, loading, saving and bad checkpoints."""
import json
import os
import re
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch
import transformers

from fusedformers.models.checkpoint import assign_state_dict, load_safetensors_state_dict
from fusedformers.models.llama import LlamaConfig, LlamaForCausalLM
from tests.conftest import DEVICE
from tests.llama.common import (
    PAD,
    TINY,
    assert_logits_close,
    edit_config,
    hf_logits,
    left_padded_batch,
    make_checkpoint,
)

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


@pytest.mark.slow
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
    torch.testing.assert_close(model.state_dict()["layers.1.mlp.up_proj.weight"],
                               hf.model.layers[1].mlp.up_proj.weight.to(torch.bfloat16))
    ids, mask = left_padded_batch([6, 4], 6, seed=10)
    with torch.no_grad():
        logits = model(ids, attention_mask=mask).logits
    assert logits.dtype == torch.bfloat16
    assert_close = (logits.float() - hf_logits(hf, ids, mask)).abs()[mask.bool()].max()
    assert assert_close < 0.1


def _directory_bytes(path):
    return {name: (path / name).read_bytes() for name in sorted(os.listdir(path))}


def test_failed_save_leaves_the_checkpoint_intact(tmp_path, base):
    """A config value JSON cannot hold (numpy's int64) fails the save before anything is written: the directory
    (here the very checkpoint the model came from) keeps its files byte for byte and still loads."""
    shutil.copytree(base[0], tmp_path, dirs_exist_ok=True)
    model = LlamaForCausalLM.from_pretrained(str(tmp_path), device=DEVICE, attn_implementation="eager")
    before = _directory_bytes(tmp_path)
    model.config.pad_token_id = np.int64(0)
    with pytest.raises(TypeError, match=r"config\.json cannot be written.*Nothing was written"):
        model.save_pretrained(str(tmp_path))
    assert _directory_bytes(tmp_path) == before
    model.generation_config = {"pad_token_id": np.int64(0)}
    model.config.pad_token_id = 0
    with pytest.raises(TypeError, match=r"generation_config\.json cannot be written"):
        model.save_pretrained(str(tmp_path))
    assert _directory_bytes(tmp_path) == before
    LlamaForCausalLM.from_pretrained(str(tmp_path), device=DEVICE, attn_implementation="eager")


def test_save_over_a_sharded_checkpoint_replaces_it(tmp_path, base):
    """Saving over a sharded checkpoint: the old shards and index go (after the new files are in place), so the
    directory holds one checkpoint, which HF and we load to the same logits."""
    hf = base[1]
    hf.save_pretrained(str(tmp_path), max_shard_size="40KB")
    shards = sorted(name for name in os.listdir(tmp_path) if name.startswith("model-"))
    assert len(shards) > 1
    model = LlamaForCausalLM.from_pretrained(str(tmp_path), device=DEVICE, attn_implementation="eager")
    model.save_pretrained(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["config.json", "generation_config.json", "model.safetensors"]
    ids, mask = left_padded_batch([6, 4], 6, seed=12)
    reloaded = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path)).to(DEVICE).eval()
    ours = LlamaForCausalLM.from_pretrained(str(tmp_path), device=DEVICE, attn_implementation="eager")
    with torch.no_grad():
        assert_logits_close(ours(ids, attention_mask=mask).logits, hf_logits(hf, ids, mask), mask)
    assert_logits_close(hf_logits(reloaded, ids, mask), hf_logits(hf, ids, mask), mask)


@pytest.mark.parametrize("dtype,expected", [("bfloat16", torch.bfloat16), ("torch.float16", torch.float16),
                                            ("auto", torch.bfloat16), (None, torch.bfloat16)],
                         ids=["bfloat16", "torch.float16", "auto", "default"])
def test_dtype_names_and_auto(tmp_path, base, dtype, expected):
    """dtype by name, or "auto" (the default, as in HF 5): the checkpoint's own dtype (here bf16)."""
    hf16 = transformers.LlamaForCausalLM.from_pretrained(base[0], dtype=torch.bfloat16)
    hf16.save_pretrained(tmp_path)
    kwargs = {} if dtype is None else {"dtype": dtype}
    model = LlamaForCausalLM.from_pretrained(str(tmp_path), device=DEVICE, attn_implementation="eager", **kwargs)
    assert model.dtype == expected
    with pytest.raises(ValueError, match="dtype must be"):
        LlamaForCausalLM.from_pretrained(str(tmp_path), dtype="bf16")


@pytest.mark.parametrize("where,value", [("argument", torch.float64), ("argument", torch.int32),
                                         ("argument", "int8"), ("config", "float64"), ("config", "int64")],
                         ids=["arg-float64", "arg-int32", "arg-int8-name", "config-float64", "config-int64"])
def test_unsupported_dtypes_name_their_source(tmp_path, base, where, value):
    """float64 and integer dtypes are refused the same way whether passed as a torch dtype or a name, and the
    error names where the value came from (the argument, or config.json's field) instead of a wall of errors."""
    shutil.copytree(base[0], tmp_path, dirs_exist_ok=True)
    if where == "config":
        edit_config(str(tmp_path), lambda c: c.update(dtype=value))
        with pytest.raises(ValueError, match=f"dtype must be .*config.json's 'dtype' is '{value}'"):
            LlamaForCausalLM.from_pretrained(str(tmp_path), attn_implementation="eager")
    else:
        with pytest.raises(ValueError, match="dtype must be .*the dtype argument is"):
            LlamaForCausalLM.from_pretrained(str(tmp_path), dtype=value, attn_implementation="eager")


@pytest.mark.skipif(torch.cuda.is_available(), reason="asks for CUDA on a machine without it")
def test_cuda_device_without_cuda_is_a_clear_error(base):
    with pytest.raises(ValueError, match="CUDA is not available"):
        LlamaForCausalLM.from_pretrained(base[0], device="cuda", attn_implementation="eager")


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

@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_save_pretrained_loads_in_hf(tmp_path, base, tied):
    path = base[0]
    if tied:
        path = str(tmp_path / "src")
        make_checkpoint(path, seed=2, tie_word_embeddings=True, rope_parameters=ROPES["llama3"])
    model = LlamaForCausalLM.from_pretrained(path, device=DEVICE)
    with torch.no_grad():  # make the round trip non-trivial: weights that differ from the source checkpoint
        model.norm.weight.mul_(1.5)
        model.state_dict()["layers.0.self_attn.k_proj.weight"].add_(0.01)  # a view of the packed qkv_proj
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


def test_missing_lm_head_is_tied_only_when_the_config_ties(tmp_path, base):
    """No lm_head.weight in the checkpoint: with tie_word_embeddings false that is a missing tensor (HF reports
    it; tying silently gave logits off by ~6 and a later save wrote tie_word_embeddings: true); with true the
    head is the embedding (one Parameter)."""
    shutil.copytree(base[0], tmp_path, dirs_exist_ok=True)
    state_dict = load_safetensors_state_dict(str(tmp_path), "cpu", torch.float32)
    del state_dict["lm_head.weight"]
    from safetensors.torch import save_file
    save_file(state_dict, str(tmp_path / "model.safetensors"))
    with pytest.raises(KeyError, match="lm_head.weight"):
        LlamaForCausalLM.from_pretrained(str(tmp_path), attn_implementation="eager")
    edit_config(str(tmp_path), lambda c: c.update(tie_word_embeddings=True))
    model = LlamaForCausalLM.from_pretrained(str(tmp_path), attn_implementation="eager")
    assert model.lm_head.weight is model.embed_tokens.weight


# ----------------------------------------------------------------------------------------------- bad checkpoints

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
    edit_config(broken, lambda c: (c.pop("sliding_window"), c.update(hidden_act="swiglu_unknown")))
    with pytest.raises(ValueError, match="unsupported hidden_act 'swiglu_unknown'"):
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


def _shard(tmp_path, base):
    base[1].save_pretrained(str(tmp_path), max_shard_size="40KB")
    index_path = tmp_path / "model.safetensors.index.json"
    return index_path, json.loads(index_path.read_text())


def test_index_weight_map_must_match_the_shards(tmp_path, base):
    """A sharded checkpoint's index is checked against the shards (before: ignored): a tensor listed in the
    wrong shard, or listed and held by none, is an error naming the index."""
    index_path, index = _shard(tmp_path, base)
    held = {}
    for tensor_name, shard in index["weight_map"].items():
        held.setdefault(shard, []).append(tensor_name)
    crowded = next(shard for shard, names in sorted(held.items()) if len(names) > 1)  # still read once moved
    other = next(shard for shard in sorted(held) if shard != crowded)
    name = held[crowded][0]
    wrong = json.loads(json.dumps(index))
    wrong["weight_map"][name] = other
    index_path.write_text(json.dumps(wrong))
    with pytest.raises(ValueError, match=rf"weight_map puts '{name}' in '{other}', but {crowded} holds it"):
        LlamaForCausalLM.from_pretrained(str(tmp_path), attn_implementation="eager")
    extra = json.loads(json.dumps(index))
    extra["weight_map"]["model.layers.9.mlp.up_proj.weight"] = crowded
    index_path.write_text(json.dumps(extra))
    with pytest.raises(ValueError, match=r"weight_map lists tensors no shard holds: \['model.layers.9"):
        LlamaForCausalLM.from_pretrained(str(tmp_path), attn_implementation="eager")


@pytest.mark.parametrize("file_name", ["config.json", "generation_config.json"])
def test_json_files_must_hold_objects(broken, file_name):
    (broken / file_name).write_text("[1, 2]")
    with pytest.raises(ValueError, match=rf"{file_name} must hold a JSON object"):
        LlamaForCausalLM.from_pretrained(str(broken), attn_implementation="eager")


@pytest.mark.parametrize("field,value,what", [("hidden_size", "64", "a positive integer"),
                                              ("num_attention_heads", 0, "a positive integer"),
                                              ("num_key_value_heads", 2.0, "a positive integer"),
                                              ("num_hidden_layers", -1, "an integer >= 0"),
                                              ("rms_norm_eps", 0, "a positive number"),
                                              ("attention_dropout", 1.5, r"a number in \[0, 1\]")],
                         ids=["hidden_size-str", "heads-zero", "kv_heads-float", "layers-negative", "eps-zero",
                              "dropout-above-1"])
def test_config_values_of_the_wrong_type_or_range(broken, field, value, what):
    """Before: errors from torch.empty or a ZeroDivisionError; now the field, what it must be and its value."""
    edit_config(str(broken), lambda c: c.update({field: value}))
    with pytest.raises(ValueError, match=rf"config.json field '{field}' must be {what}, got {re.escape(repr(value))}"):
        LlamaForCausalLM.from_pretrained(str(broken), attn_implementation="eager")


# ------------------------------------------------------ defects found by the checkpoint fuzzer (tests/ckpt_fuzz.py)

def _load(path):
    return LlamaForCausalLM.from_pretrained(str(path), attn_implementation="eager")


@pytest.mark.parametrize("field,value,what", [("head_dim", 2**63, "at most 2147483647"),
                                              ("rms_norm_eps", float("inf"), "a positive number"),
                                              ("rope_theta", -1.0, "a positive number"),
                                              ("rope_theta", "ten", "a positive number"),
                                              ("rope_parameters", ["default"], "an object or null"),
                                              ("attention_bias", "false", "true, false or null"),
                                              ("tie_word_embeddings", 1, "true, false or null"),
                                              ("pad_token_id", [None], r"a token id \(an integer\) or null"),
                                              ("eos_token_id", [2, "3"],
                                               r"a token id \(an integer\), a list of them or null")],
                         ids=["head_dim-2**63", "eps-inf", "rope_theta-negative", "rope_theta-str",
                              "rope_parameters-list", "bias-str", "tie-int", "pad-list", "eos-list-of-str"])
def test_config_values_the_fuzzer_found(broken, field, value, what):
    """Before: an overflow TypeError from torch.empty (2**63), silently NaN or zeroed activations (an infinite
    epsilon, a negative RoPE base), float() / dict() errors, a string "false" switching biases on, a list pad id
    passed on."""
    edit_config(str(broken), lambda c: c.update({field: value}))
    with pytest.raises(ValueError, match=rf"config.json field '{field}' must be {what}, got {re.escape(repr(value))}"):
        _load(broken)


def test_hidden_act_of_another_type(broken):
    edit_config(str(broken), lambda c: c.update(hidden_act=["silu"]))  # before: TypeError unhashable type: 'list'
    with pytest.raises(ValueError, match=r"config\.json: unsupported hidden_act \['silu'\]"):
        _load(broken)


def test_config_errors_name_config_json(broken):
    """Every refusal of the config names config.json (before: "num_attention_heads (4) must be a multiple of
    num_key_value_heads (3)" without saying which file)."""
    edit_config(str(broken), lambda c: c.update(num_key_value_heads=3))
    with pytest.raises(ValueError, match=r"/config\.json: num_attention_heads \(4\) must be a multiple"):
        _load(broken)


def test_layer_count_is_checked_against_the_weights(broken):
    """Before: a model of that many layers was built first (num_hidden_layers 10**9: for ever)."""
    edit_config(str(broken), lambda c: c.update(num_hidden_layers=3))
    with pytest.raises(ValueError, match=r"'num_hidden_layers' is 3, but .*model\.safetensors holds layers 0\.\.1"):
        _load(broken)


def test_mismatch_errors_name_the_weights_and_the_config(broken):
    rewrite_weights(broken, lambda sd: sd.pop("model.norm.weight"))
    with pytest.raises(KeyError, match=r"model\.safetensors does not match the model of \S*config\.json: missing"):
        _load(broken)
    edit_config(str(broken), lambda c: c.update(intermediate_size=96))
    rewrite_weights(broken, lambda sd: sd.update({"model.norm.weight": torch.ones(64)}))
    with pytest.raises(ValueError, match=r"tensor shapes or dtypes in \S*model\.safetensors do not match the model "
                                         r"of \S*config\.json: layers\.0\.mlp\.down_proj\.weight: expected \(64, 96\)"):
        _load(broken)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
def test_integer_tensor_for_a_float_parameter(broken, dtype):
    """Before: a RuntimeError from load_state_dict ("Only Tensors of floating point dtype can require
    gradients") or an integer Parameter."""
    rewrite_weights(broken, lambda sd: sd.update({"model.norm.weight": sd["model.norm.weight"].to(dtype)}))
    with pytest.raises(ValueError, match=rf"norm\.weight: expected a floating-point tensor, got {dtype}"):
        _load(broken)


def _corrupt(path, damage):
    data = bytearray(path.read_bytes())
    if damage == "truncated":
        data = data[:len(data) // 2]
    elif damage == "header length":
        data[7] ^= 0x10  # a header longer than the file
    elif damage == "header json":
        data[9] = ord("[")
    else:  # not UTF-8 inside the header
        data[12] = 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["truncated", "header length", "header json", "header utf-8"])
def test_corrupt_safetensors_names_the_file(broken, damage):
    """Before: safetensors' own SafetensorError ("header too large", "invalid JSON in header") naming no file."""
    _corrupt(broken / "model.safetensors", damage)
    with pytest.raises(ValueError, match=r"model\.safetensors is not a valid safetensors file"):
        _load(broken)


def test_corrupt_or_wrong_shard_names_the_index(tmp_path, base):
    index_path, index = _shard(tmp_path, base)
    shard = sorted(set(index["weight_map"].values()))[0]
    _corrupt(tmp_path / shard, "truncated")
    with pytest.raises(ValueError, match=rf"{shard} \(a shard listed in \S*model\.safetensors\.index\.json\) is "
                                         r"not a valid safetensors file"):
        _load(tmp_path)
    index["weight_map"][next(iter(index["weight_map"]))] = "config.json"
    index_path.write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"config\.json \(a shard listed in"):
        _load(tmp_path)
    index["weight_map"][next(iter(index["weight_map"]))] = [shard]  # before: TypeError unhashable type: 'list'
    index_path.write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"weight_map values must be shard file names"):
        _load(tmp_path)


@pytest.mark.parametrize("content", [b'{"model_type": "ll\xffama"}', b'{"a": ' + b"[" * 10**5 + b"]" * 10**5 + b"}"],
                         ids=["not-utf-8", "nested-too-deeply"])
@pytest.mark.parametrize("file_name", ["config.json", "generation_config.json"])
def test_undecodable_json_names_the_file(broken, file_name, content):
    """Before: UnicodeDecodeError / RecursionError, neither naming the file."""
    (broken / file_name).write_bytes(content)
    with pytest.raises(ValueError, match=rf"{file_name} is not (valid|a usable) JSON"):
        _load(broken)


# ------------------------------------------------------------------------------- packed projections, HF's names

def test_state_dict_has_hf_names_and_a_save_is_byte_identical(tmp_path, base):
    """q/k/v and gate/up are packed into one matmul each, but state_dict lists HF's names with HF's values (within
    an attention or MLP module in HF's order), a load -> save round trip writes the very same safetensors file,
    and load_state_dict takes HF's names (strict)."""
    path, hf = base
    model = LlamaForCausalLM.from_pretrained(path, device=DEVICE)
    state = model.state_dict()
    hf_state = {k.removeprefix("model."): v for k, v in hf.state_dict().items()}
    assert sorted(state) == sorted(hf_state)
    assert [k for k in state if k.startswith("layers.0.self_attn.")] == [f"layers.0.self_attn.{p}_proj.weight"
                                                                        for p in "qkvo"]
    for name, tensor in state.items():
        assert torch.equal(tensor, hf_state[name]), name
    assert "layers.0.self_attn.qkv_proj.weight" in dict(model.named_parameters())
    model.save_pretrained(str(tmp_path))
    with open(os.path.join(path, "model.safetensors"), "rb") as f, open(tmp_path / "model.safetensors", "rb") as g:
        assert f.read() == g.read()
    fresh = LlamaForCausalLM(model.config).to(DEVICE)
    name = "layers.1.self_attn.v_proj.weight"
    assert not torch.equal(fresh.state_dict()[name], hf_state[name])
    result = fresh.load_state_dict(hf_state)
    assert not result.missing_keys and not result.unexpected_keys
    for name, tensor in fresh.state_dict().items():
        assert torch.equal(tensor, hf_state[name]), name


def test_load_state_dict_names_hf_tensors(base):
    """A dict without k_proj / with an unknown bias: load_state_dict's errors name HF's tensors, not the packed
    ones."""
    model = LlamaForCausalLM.from_pretrained(base[0], device=DEVICE)
    state = model.state_dict()
    partial = {k: v for k, v in state.items() if k != "layers.1.self_attn.k_proj.weight"}
    partial["layers.0.mlp.up_proj.bias"] = torch.zeros(TINY["intermediate_size"])
    with pytest.raises(RuntimeError) as error:
        model.load_state_dict(partial)
    message = str(error.value)
    assert '"layers.1.self_attn.k_proj.weight"' in message and '"layers.0.mlp.up_proj.bias"' in message
    assert "qkv_proj" not in message and "gate_up_proj" not in message
    result = model.load_state_dict(partial, strict=False)
    assert result.missing_keys == ["layers.1.self_attn.k_proj.weight"]
    assert result.unexpected_keys == ["layers.0.mlp.up_proj.bias"]
    wrong = dict(state, **{"layers.0.mlp.gate_proj.weight": torch.zeros(3, TINY["hidden_size"])})
    with pytest.raises(RuntimeError, match=r"size mismatch for layers\.0\.mlp\.gate_proj\.weight"):
        model.load_state_dict(wrong)


def test_named_grads_has_hf_names(base):
    model = LlamaForCausalLM.from_pretrained(base[0], device=DEVICE, attn_implementation="eager").train()
    ids, mask = left_padded_batch([5, 4], 5, seed=3)
    model(ids, attention_mask=mask, labels=ids).loss.backward()
    grads = model.named_grads()
    assert list(grads) == list(model.state_dict())
    qkv = model.layers[0].self_attn.qkv_proj.weight.grad
    q_rows = TINY["num_attention_heads"] * TINY["head_dim"]
    assert torch.equal(grads["layers.0.self_attn.q_proj.weight"], qkv[:q_rows])
    assert torch.equal(grads["layers.0.self_attn.k_proj.weight"],
                       qkv[q_rows:q_rows + TINY["num_key_value_heads"] * TINY["head_dim"]])

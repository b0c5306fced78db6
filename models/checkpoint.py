"""Checkpoint I/O shared by the models: HF-layout directories (config.json, generation_config.json,
model.safetensors or sharded model-0000x-of-0000y.safetensors + model.safetensors.index.json).

Loading goes tensor by tensor straight to the target device and dtype, and is strict: every missing, unexpected or
wrongly shaped tensor is reported at once.
"""
import json
import os
import re

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from fusedformers.models.generation import GENERATION_KEYS

CONFIG_NAME = "config.json"
GENERATION_CONFIG_NAME = "generation_config.json"
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"


def read_json(path):
    """Parse a JSON file; FileNotFoundError names the path, ValueError names the file on a syntax error."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such file: {path}")
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:  # UnicodeDecodeError: bytes that are not UTF-8
            raise ValueError(f"{path} is not valid JSON: {e}") from e
        except RecursionError as e:
            raise ValueError(f"{path} is not a usable JSON file: nested too deeply ({e})") from e


def read_json_object(path):
    """A JSON file that must hold an object (a dict); ValueError naming the file otherwise."""
    value = read_json(path)
    if not isinstance(value, dict):
        raise ValueError(f"{path} must hold a JSON object ({{...}}), got a {type(value).__name__}")
    return value


def load_config_dict(model_dir):
    """The model's config.json as a dict."""
    path = os.path.join(os.fspath(model_dir), CONFIG_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{CONFIG_NAME} not found: looked for {path}")
    return read_json_object(path)


def load_generation_config(model_dir):
    """generation_config.json as a dict, or {} when the directory has none."""
    path = os.path.join(os.fspath(model_dir), GENERATION_CONFIG_NAME)
    return read_json_object(path) if os.path.isfile(path) else {}


def safetensors_files(model_dir):
    """(paths of the weight files, weight_map): model.safetensors and None, or the shards named in
    model.safetensors.index.json and its ``weight_map`` ({tensor name: shard file name})."""
    model_dir = os.fspath(model_dir)
    single = os.path.join(model_dir, WEIGHTS_NAME)
    if os.path.isfile(single):
        return [single], None
    index_path = os.path.join(model_dir, WEIGHTS_INDEX_NAME)
    if os.path.isfile(index_path):
        weight_map = read_json_object(index_path).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index_path} has no 'weight_map'")
        if not all(isinstance(name, str) and name and name == os.path.basename(name) and name not in (".", "..")
                   for name in weight_map.values()):
            raise ValueError(f"{index_path}: weight_map values must be shard file names in {model_dir}")
        names = set(weight_map.values())
        shards = [os.path.join(model_dir, name) for name in sorted(names)]
        missing = [s for s in shards if not os.path.isfile(s)]
        if missing:
            raise FileNotFoundError(f"shards listed in {index_path} are missing: {missing}")
        return shards, weight_map
    raise FileNotFoundError(f"no weights in {model_dir}: looked for {WEIGHTS_NAME} and {WEIGHTS_INDEX_NAME}")


# config.json fields that never change a model's computation: HF bookkeeping, training-time settings, and the
# generation settings config.json may carry (read as generation defaults when a checkpoint has no
# generation_config.json). Both models keep them (to_dict writes them back) and refuse every other field they do
# not read: an unknown field might change the model, and a silently different model is worse than an error.
IGNORED_CONFIG_KEYS = frozenset(GENERATION_KEYS) | frozenset({
    "architectures", "transformers_version", "_name_or_path", "_commit_hash", "dtype", "torch_dtype",
    "initializer_range", "init_std", "use_cache", "auto_map", "_attn_implementation",
    "_attn_implementation_autoset", "return_dict", "output_hidden_states", "output_attentions", "torchscript",
    "use_bfloat16", "tf_legacy_loss", "pruned_heads", "chunk_size_feed_forward", "is_encoder_decoder",
    "is_decoder", "cross_attention_hidden_size", "add_cross_attention", "tie_encoder_decoder", "finetuning_task",
    "id2label", "label2id", "num_labels", "_num_labels", "task_specific_params", "problem_type", "tokenizer_class",
    "prefix", "sep_token_id", "output_scores", "return_dict_in_generate", "gradient_checkpointing",
})


def refuse_unknown_fields(config_dict, understood, model_name, also_ignored=()):
    """The one rule of both models for config.json fields: those in ``understood`` (read by the model) and the
    bookkeeping fields (``IGNORED_CONFIG_KEYS``, ``also_ignored``) pass; any other field raises a ValueError
    naming it, since it might change the computation. Returns the ignored fields (kept and written back)."""
    ignored = IGNORED_CONFIG_KEYS | frozenset(also_ignored)
    unknown = sorted(k for k in config_dict if k not in understood and k not in ignored)
    if unknown:
        raise ValueError(f"{CONFIG_NAME} fields not understood by fusedformers {model_name}: {unknown} (known "
                         f"bookkeeping fields are ignored; these might change the model, so they are refused)")
    return {k: v for k, v in config_dict.items() if k not in understood}


MAX_CONFIG_INT = 2**31 - 1  # the largest size, count or token id a config.json field may hold


def check_config_values(values, positive_ints=(), nonnegative_ints=(), probabilities=(), positive_numbers=(),
                        bools=(), token_ids=()):
    """ValueError naming the config.json field whose value has the wrong type or range (``values``: field ->
    value; fields absent from it are not checked): before a wrong value reaches ``torch.empty`` or a division.

    Sizes and counts are at most ``MAX_CONFIG_INT``; positive numbers are finite; ``bools``: true, false or null
    (the string "false" is truthy: it would silently switch a feature on); ``token_ids``: an integer of at most
    ``MAX_CONFIG_INT`` in magnitude or null (for ``*eos_token_id`` fields also a list of such integers)."""
    def fail(name, what):
        raise ValueError(f"config.json field {name!r} must be {what}, got {values[name]!r}")

    def is_int(value):
        return isinstance(value, int) and not isinstance(value, bool)

    def is_number(value):
        return isinstance(value, (int, float)) and not isinstance(value, bool)

    def is_token_id(value):
        return is_int(value) and abs(value) <= MAX_CONFIG_INT

    for name in (*positive_ints, *nonnegative_ints):  # sizes torch.empty would overflow on (or take forever)
        if name in values and is_int(values[name]) and values[name] > MAX_CONFIG_INT:
            fail(name, f"at most {MAX_CONFIG_INT}")
    for name in positive_ints:
        if name in values and not (is_int(values[name]) and values[name] > 0):
            fail(name, "a positive integer")
    for name in nonnegative_ints:
        if name in values and not (is_int(values[name]) and values[name] >= 0):
            fail(name, "an integer >= 0")
    for name in probabilities:
        if name in values and not (is_number(values[name]) and 0.0 <= values[name] <= 1.0):
            fail(name, "a number in [0, 1]")
    for name in positive_numbers:  # finite: an infinite epsilon or RoPE base silently zeroes activations
        if name in values and not (is_number(values[name]) and 0 < values[name] < float("inf")):
            fail(name, "a positive number")
    for name in bools:
        if name in values and not isinstance(values[name], bool | None):
            fail(name, "true, false or null")
    for name in token_ids:
        value = values.get(name)
        if name.endswith("eos_token_id") and isinstance(value, list) and value:
            if not all(is_token_id(v) for v in value):
                fail(name, "a token id (an integer), a list of them or null")
        elif name in values and not (value is None or is_token_id(value)):
            fail(name, "a token id (an integer) or null")


DTYPE_NAMES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
               "float": torch.float32, "half": torch.float16}


def _model_dtype(value, source):
    """A torch dtype or its name -> one of the dtypes the models run in (the kernels' float32, float16,
    bfloat16); ValueError naming ``source`` (the argument or the config.json field) otherwise."""
    if isinstance(value, str) and value.removeprefix("torch.") in DTYPE_NAMES:
        return DTYPE_NAMES[value.removeprefix("torch.")]
    if isinstance(value, torch.dtype) and value in DTYPE_NAMES.values():
        return value
    raise ValueError(f"dtype must be float32, float16 or bfloat16 (a torch dtype or its name; the argument also "
                     f"takes 'auto'): {source} is {value!r}")


def resolve_dtype(dtype, config_dict):
    """``from_pretrained``'s dtype: float32, float16 or bfloat16 as a torch dtype or its name ("bfloat16",
    "torch.float16"), or "auto" / None (as HF: the checkpoint's own dtype, from config.json's ``dtype`` /
    ``torch_dtype``; None when the config does not say, meaning the stored tensors' dtype). ValueError names the
    argument or the config.json field for anything else (float64, integer dtypes, unknown names)."""
    if dtype is None or dtype == "auto":
        for field_name in ("dtype", "torch_dtype"):
            stored = config_dict.get(field_name)
            if stored not in (None, "auto"):
                return _model_dtype(stored, f"config.json's {field_name!r}")
        return None
    return _model_dtype(dtype, "the dtype argument")


def load_safetensors_state_dict(model_dir, device="cpu", dtype=None):
    """Read every tensor of the checkpoint, each loaded directly on ``device``; floating tensors cast to ``dtype``
    (when given; else to the dtype of the first floating tensor, so that the model has one dtype),
    integer/bool tensors kept as stored. A sharded checkpoint's index must say where every tensor is: a tensor
    in another shard than its ``weight_map`` entry, or an entry no shard holds, is a ValueError naming the index.
    Returns ``{name: tensor}``."""
    device = str(torch.device(device))
    state_dict = {}
    paths, weight_map = safetensors_files(model_dir)
    index_path = os.path.join(os.fspath(model_dir), WEIGHTS_INDEX_NAME)
    for path in paths:
        try:
            with safe_open(path, framework="pt", device=device) as f:
                for name in f.keys():
                    if name in state_dict:
                        raise ValueError(f"tensor {name!r} appears in more than one shard ({path})")
                    if weight_map is not None and weight_map.get(name) != os.path.basename(path):
                        raise ValueError(f"{index_path}: weight_map puts {name!r} in {weight_map.get(name)!r}, "
                                         f"but {os.path.basename(path)} holds it")
                    tensor = f.get_tensor(name)
                    if dtype is None and tensor.is_floating_point():
                        dtype = tensor.dtype
                    if dtype is not None and tensor.is_floating_point() and tensor.dtype != dtype:
                        tensor = tensor.to(dtype)
                    state_dict[name] = tensor
        except SafetensorError as e:  # a truncated or corrupt file: safetensors' message does not name it
            listed = f" (a shard listed in {index_path})" if weight_map is not None else ""
            raise ValueError(f"{path}{listed} is not a valid safetensors file: {e}") from e
    if weight_map is not None and set(weight_map) - set(state_dict):
        raise ValueError(f"{index_path}: weight_map lists tensors no shard holds: "
                         f"{sorted(set(weight_map) - set(state_dict))}")
    return state_dict


def weights_source(model_dir):
    """How errors name a checkpoint's weights: the path of model.safetensors, or of the index of a sharded one."""
    model_dir = os.fspath(model_dir)
    single = os.path.join(model_dir, WEIGHTS_NAME)
    return single if os.path.isfile(single) else os.path.join(model_dir, WEIGHTS_INDEX_NAME) + " (and its shards)"


def check_layer_count(state_dict, stack, count, field_name, source):
    """ValueError when config.json's layer count ``count`` (field ``field_name``) disagrees with the layers
    ``{stack}.{i}.`` of the checkpoint, before a model with that many layers is built (a count of 10**9 would
    take forever to build just to report the missing tensors)."""
    pattern = re.compile(rf"^{re.escape(stack)}\.(\d+)\.")
    stored = sorted({int(m.group(1)) for name in state_dict if (m := pattern.match(name))})
    if stored != list(range(count)):
        held = f"layers {stored[0]}..{stored[-1]} ({len(stored)})" if stored else "no layers"
        raise ValueError(f"config.json field {field_name!r} is {count}, but {source} holds {held} under "
                         f"{stack!r}")


def tied_parameter_groups(module):
    """Lists of names under which one Parameter appears more than once (e.g. a tied embedding and lm_head)."""
    by_id = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(param), []).append(name)
    return [names for names in by_id.values() if len(names) > 1]


def _set_by_name(module, name, value):
    owner_name, _, attr = name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    setattr(owner, attr, value)


def assign_state_dict(module, state_dict, aliases=None, tied=(), source="checkpoint", model="the model"):
    """Load ``state_dict`` into ``module`` strictly, taking ownership of the tensors (no second copy lingers:
    the module's parameters become the given tensors, so the module may be built on the meta device).

    aliases: ``{checkpoint_name: module_name}``, renames applied first; a value of None drops that checkpoint
    tensor (for known unused entries such as rotary ``inv_freq`` buffers of old checkpoints).
    tied: module names that may be absent from the checkpoint because their Parameter is shared with another
    name, or ``(name, source_name)`` pairs to tie after loading (``name`` becomes ``source_name``'s Parameter).
    Parameters the module already shares (detected from the module itself) are loaded once, from whichever of
    their names the checkpoint has, and stay one shared Parameter.
    source, model: what the tensors were read from (e.g. the path of model.safetensors) and what the module is
    (e.g. "the model of <path>/config.json"), named in the errors.
    Raises KeyError listing every missing and unexpected name, ValueError listing every shape mismatch and every
    integer or bool tensor given for a floating-point parameter.
    """
    aliases = aliases or {}
    loaded = {}
    for name, tensor in state_dict.items():
        target = aliases.get(name, name)
        if target is None:
            continue
        if target in loaded:
            raise ValueError(f"two tensors of {source} map to {target!r} (check the aliases)")
        loaded[target] = tensor

    tie_pairs = [t for t in tied if not isinstance(t, str)]
    tied = [t if isinstance(t, str) else t[0] for t in tied]
    expected = module.state_dict(keep_vars=True)  # every name, shared parameters under each of their names
    groups = tied_parameter_groups(module)
    for name, source in tie_pairs:
        if name in loaded:  # a checkpoint that stores the tied copy too: the source's tensor is the one kept
            if source not in loaded:
                loaded[source] = loaded[name]
            del loaded[name]
    optional = set(tied)
    for names in groups:
        if any(n in loaded for n in names):
            optional.update(names)
    missing = sorted(n for n in expected if n not in loaded and n not in optional)
    missing += sorted(names[0] for names in groups
                      if not any(n in loaded for n in names) and names[0] not in missing)
    unexpected = sorted(n for n in loaded if n not in expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing tensors: {missing}")
        if unexpected:
            parts.append(f"unexpected tensors: {unexpected}")
        raise KeyError(f"{source} does not match {model}: " + "; ".join(parts))
    mismatched = [f"{n}: expected {tuple(expected[n].shape)}, got {tuple(t.shape)}"
                  for n, t in sorted(loaded.items()) if tuple(t.shape) != tuple(expected[n].shape)]
    mismatched += [f"{n}: expected a floating-point tensor, got {t.dtype}" for n, t in sorted(loaded.items())
                   if expected[n].is_floating_point() and not t.is_floating_point()]
    if mismatched:
        raise ValueError(f"tensor shapes or dtypes in {source} do not match {model}: " + "; ".join(mismatched))

    # one tensor per shared Parameter: the first of its names found in the checkpoint; the others are dropped
    shared = []
    for names in groups:
        present = [n for n in names if n in loaded]
        keep = present[0]
        for n in present[1:]:
            del loaded[n]
        shared.append((keep, [n for n in names if n != keep]))
    missing_keys, unexpected_keys = module.load_state_dict(loaded, strict=False, assign=True)
    assert not unexpected_keys, unexpected_keys
    for keep, others in shared:
        param = module.get_parameter(keep)
        for n in others:
            _set_by_name(module, n, param)
    for name, source in tie_pairs:
        _set_by_name(module, name, module.get_parameter(source))
    left = [n for n, t in module.state_dict(keep_vars=True).items() if t.is_meta]
    if left:
        raise KeyError(f"tensors left unloaded (declared tied but not shared) from {source}: {left}")
    return module


def _json_text(obj, file_name):
    """``obj`` as the text of ``file_name``; TypeError naming the file for a value JSON cannot hold (before any
    file is written)."""
    try:
        return json.dumps(obj, indent=2, sort_keys=True) + "\n"
    except (TypeError, ValueError) as e:
        raise TypeError(f"{file_name} cannot be written: {e}; config values must be JSON types (int, float, str, "
                        f"bool, None, lists and dicts of them). Nothing was written.") from e


def _fsync(path):
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _superseded_files(model_dir, writes_generation_config):
    """Files of a previous checkpoint in ``model_dir`` that a new single-file save replaces: the shards named by
    its index and the index itself, and a generation_config.json the new save does not write."""
    index_path = os.path.join(model_dir, WEIGHTS_INDEX_NAME)
    stale = []
    if os.path.isfile(index_path):
        try:
            weight_map = read_json(index_path).get("weight_map") or {}
            shards = {name for name in weight_map.values() if isinstance(name, str)}
        except (ValueError, AttributeError):
            shards = set()  # an unreadable index: it goes, the files it might name stay
        stale += [os.path.join(model_dir, name) for name in sorted(shards)
                  if name != WEIGHTS_NAME and os.path.basename(name) == name]
        stale.append(index_path)
    if not writes_generation_config:
        stale.append(os.path.join(model_dir, GENERATION_CONFIG_NAME))
    return [path for path in stale if os.path.isfile(path)]


def save_safetensors(module_state_dict, model_dir, config_dict, generation_config=None, skip=()):
    """Write ``model.safetensors`` (contiguous CPU tensors, each shared tensor once, names in ``skip`` left out,
    e.g. a tied ``lm_head.weight``) and ``config.json`` (+ ``generation_config.json`` when given).

    Atomic per file and all-or-nothing for the save: everything is serialised first (a config value JSON cannot
    hold is a TypeError naming the file, before anything is written), each file is written to a temporary file
    in ``model_dir``, flushed to disk and only then moved over the old one (``os.replace``). A failure leaves the
    previous checkpoint as it was. Files of the previous checkpoint that this one supersedes (shards and their
    index, a generation_config.json not written now) are removed only after the new files are in place."""
    model_dir = os.fspath(model_dir)
    skip = set(skip)
    tensors, seen = {}, {}
    for name, tensor in module_state_dict.items():
        if name in skip:
            continue
        tensor = tensor.detach()
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
               tuple(tensor.stride())) if tensor.numel() else None
        if key is not None and key in seen:
            continue  # a tied weight under a second name: written once, as HF expects
        if key is not None:
            seen[key] = name
        tensors[name] = tensor.to("cpu").contiguous()
    texts = {CONFIG_NAME: _json_text(config_dict, CONFIG_NAME)}
    if generation_config:
        texts[GENERATION_CONFIG_NAME] = _json_text(generation_config, GENERATION_CONFIG_NAME)
    os.makedirs(model_dir, exist_ok=True)
    stale = _superseded_files(model_dir, GENERATION_CONFIG_NAME in texts)
    suffix = f".tmp-{os.getpid()}"
    temporary = {}  # final path -> temporary path, in the order they are moved into place
    try:
        weights = os.path.join(model_dir, WEIGHTS_NAME)
        temporary[weights] = weights + suffix
        save_file(tensors, temporary[weights], metadata={"format": "pt"})
        _fsync(temporary[weights])
        for file_name, text in texts.items():
            path = os.path.join(model_dir, file_name)
            temporary[path] = path + suffix
            with open(temporary[path], "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
    except BaseException:
        for path in temporary.values():
            if os.path.exists(path):
                os.remove(path)
        raise
    for path, temp in temporary.items():
        os.replace(temp, path)
    for path in stale:
        os.remove(path)

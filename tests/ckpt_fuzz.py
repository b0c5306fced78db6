"""Checkpoint fuzzer: random mutations of saved tiny LLaMA and BART checkpoints, each loaded with
``from_pretrained``::

    python -m tests.ckpt_fuzz --cases 200 --seed 0 [--family llama bart] [--show-errors]

A tiny LLaMA and a tiny BART checkpoint are saved once (by HF transformers, as users get them) and loaded with
``attn_implementation="eager"``: loading is what is fuzzed, so the model runs the PyTorch reference ops. Each case
copies one checkpoint to a temporary directory (as one model.safetensors or, for some cases, as two shards and a
model.safetensors.index.json), applies ONE random mutation and loads it. Mutations: truncated safetensors files
(in the header length, the JSON header or the body), bit flips and random bytes in each of those three parts,
header JSON lies (dtype, shape, data_offsets out of range / overlapping / not covering the buffer, malformed
entries), tensors dropped, renamed, reshaped, retyped (integer, bool, float64, float16, bfloat16) or added;
broken shard indexes (entries missing, wrong or missing shards, malformed JSON, weight_map not a dict, bad
values) and deleted shards; config.json truncated, not an object, invalid UTF-8, values of the wrong type or out
of range, fields missing or unknown, a wrong model_type or dtype; generation_config.json broken.

The oracle, per case — the load either
  * raises one of ``CLEAR_ERRORS`` (ValueError, KeyError, TypeError, NotImplementedError: exactly these types,
    not subclasses such as json.JSONDecodeError or UnicodeDecodeError; OSError and its subclasses such as
    FileNotFoundError, which carry the path),
    raised by the loader itself (the innermost frame is in fusedformers.models: a deliberate check, not an error
    escaping from Python, torch or safetensors), whose message names the mutated file (its base name, e.g.
    ``config.json`` or the shard) — and the mutation is not one that must load (see below); or
  * returns a model whose eager logits on a fixed input, parameters and buffers (compared bitwise, NaN equal to
    NaN), tied-parameter groups and dtype equal those of the expected model: the original checkpoint loaded the
    same way, with the values the mutation stored where it changed them on purpose. Such value-changing
    mutations must load: bit flips in the tensor bodies (the file then stores other weights; safetensors has no
    checksum), tensors retyped to float64 (exact) or float16 / bfloat16 (rounded: the model gets the rounded
    values in the config's dtype), BART's final_logits_bias dropped (HF reads zeros), a config.json dtype of
    float16 / bfloat16 (the model in that dtype, as loading the original with that dtype gives), renames to
    another name of BART's shared embedding; likewise the unmutated single-file and sharded layouts.
Anything else fails: another exception type, an error from deeper code or one that does not name the file, a
model whose forward raises, a different model, a wrong dtype, or a case running past ``--timeout`` seconds
(SIGALRM; a hard crash ends the run and its last "case" line names the culprit with ``--verbose``).

Each failure prints one line that reproduces it (``--seed S --only-case I``); exit status 1 if any.
"""
import argparse
import json
import os
import random
import re
import shutil
import signal
import struct
import sys
import tempfile
import time
import traceback
import warnings

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported (the eager path does not use it)

from safetensors.torch import load_file, save_file  # noqa: E402

import fusedformers.models as models_package  # noqa: E402
from fusedformers.models.bart import BartForConditionalGeneration  # noqa: E402
from fusedformers.models.checkpoint import tied_parameter_groups  # noqa: E402
from fusedformers.models.llama import LlamaForCausalLM  # noqa: E402

FAMILIES = ("llama", "bart")
CLEAR_ERRORS = (ValueError, KeyError, TypeError, FileNotFoundError, OSError, NotImplementedError)
MODEL_CLASSES = {"llama": LlamaForCausalLM, "bart": BartForConditionalGeneration}
MODELS_DIR = os.path.realpath(models_package.__path__[0])
WEIGHTS, INDEX, CONFIG, GENERATION = ("model.safetensors", "model.safetensors.index.json", "config.json",
                                      "generation_config.json")
SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}
BART_SHARED = ("model.shared.weight", "model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight",
               "lm_head.weight")


# ----------------------------------------------------------------------------------------------------------------
# The pristine checkpoints and what they load to
# ----------------------------------------------------------------------------------------------------------------
def save_originals(root, families=FAMILIES):
    """Save the tiny HF LLaMA and/or BART of the tests (float32) under ``root``: {family: directory}."""
    import transformers

    from tests.llama.common import make_checkpoint
    from tests.test_bart import make_hf_bart
    transformers.logging.set_verbosity_error()
    dirs = {family: os.path.join(root, family) for family in families}
    if "llama" in dirs:
        make_checkpoint(dirs["llama"])
    if "bart" in dirs:
        make_hf_bart().save_pretrained(dirs["bart"])
    return dirs


def fixed_inputs(family):
    g = torch.Generator().manual_seed(1234)
    if family == "llama":
        return dict(input_ids=torch.randint(3, 128, (2, 9), generator=g))
    return dict(input_ids=torch.randint(3, 100, (2, 9), generator=g),
                decoder_input_ids=torch.randint(3, 100, (2, 5), generator=g))


def load(family, directory, **kwargs):
    return MODEL_CLASSES[family].from_pretrained(directory, attn_implementation="eager", **kwargs)


def logits_of(family, model):
    with torch.no_grad():
        return model(**fixed_inputs(family)).logits


def model_name(family, checkpoint_name):
    """The parameter a checkpoint tensor loads into."""
    if family == "llama":
        return checkpoint_name.removeprefix("model.")
    return "model.shared.weight" if checkpoint_name in BART_SHARED else checkpoint_name


class Expected:
    """The model a case must load to: the original in ``dtype``, with ``edits`` ({checkpoint tensor name:
    values}) written into its parameters."""

    def __init__(self, originals):
        self.originals = originals
        self._cache = {}

    def get(self, family, dtype=torch.float32, edits=None):
        """(logits, {name: tensor} of the state, tied groups)."""
        key = (family, dtype)
        if edits or key not in self._cache:
            model = load(family, self.originals[family], dtype=dtype)
            with torch.no_grad():
                for name, values in (edits or {}).items():
                    # state_dict's views: LLaMA's packed projections appear under HF's names
                    target = model.state_dict(keep_vars=True)[model_name(family, name)]
                    target.copy_(values.to(target.dtype))
            result = (logits_of(family, model), model.state_dict(), tied_parameter_groups(model))
            if edits:
                return result
            self._cache[key] = result
        return self._cache[key]


# ----------------------------------------------------------------------------------------------------------------
# Raw safetensors: 8-byte little-endian header length, JSON header, body
# ----------------------------------------------------------------------------------------------------------------
def read_raw(path):
    with open(path, "rb") as f:
        data = f.read()
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + length]), data[8 + length:]


def write_raw(path, header, body, header_bytes=None):
    if header_bytes is None:
        header_bytes = json.dumps(header, separators=(",", ":")).encode()
        header_bytes += b" " * (-len(header_bytes) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header_bytes)) + header_bytes + body)


def tensor_from_bytes(entry, body):
    """A tensor of a header entry decoded from ``body`` (the trusted reading of a file this fuzzer wrote)."""
    begin, end = entry["data_offsets"]
    data = bytearray(body[begin:end])
    return torch.frombuffer(data, dtype=SAFETENSORS_DTYPES[entry["dtype"]]).reshape(entry["shape"]).clone()


# ----------------------------------------------------------------------------------------------------------------
# A case: the directory, what the mutation did and what it expects
# ----------------------------------------------------------------------------------------------------------------
class Case:
    def __init__(self, family, directory, original, rng):
        self.family, self.dir, self.original, self.rng = family, directory, original, rng
        self.blame = set()        # base names of the files an error must name (any one of them)
        self.edits = {}           # checkpoint tensor name -> the values the load must give it
        self.dtype = torch.float32
        self.must_load = False    # the mutation keeps a valid checkpoint: an error is a failure
        self.what = []            # description, for the failure line

    def path(self, name):
        return os.path.join(self.dir, name)

    def note(self, text):
        self.what.append(text)

    def sharded(self):
        return os.path.isfile(self.path(INDEX))

    def shard(self):
        """Split model.safetensors into two shards + index (tensors alternate between the shards)."""
        tensors = load_file(self.path(WEIGHTS))
        names = sorted(tensors)
        weight_map = {name: SHARDS[i % 2] for i, name in enumerate(names)}
        for shard in SHARDS:
            save_file({n: tensors[n] for n in names if weight_map[n] == shard}, self.path(shard),
                      metadata={"format": "pt"})
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        with open(self.path(INDEX), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        os.remove(self.path(WEIGHTS))
        self.note("sharded")

    def weights_file(self):
        """A weights file to mutate (blamed, with the index when sharded)."""
        name = self.rng.choice(SHARDS) if self.sharded() else WEIGHTS
        self.blame.add(name)
        if self.sharded():
            self.blame.add(INDEX)
        return name

    def read_json(self, name):
        with open(self.path(name)) as f:
            return json.load(f)

    def write_json(self, name, value):
        with open(self.path(name), "w") as f:
            json.dump(value, f, indent=2)

    def edit_tensors(self, edit):
        """Rewrite a weights file with safetensors (a valid file): ``edit(tensors)`` changes the dict."""
        name = self.weights_file()
        tensors = load_file(self.path(name))
        edit(tensors)
        save_file(tensors, self.path(name), metadata={"format": "pt"})
        return name


def pick_tensor(case, tensors):
    return case.rng.choice(sorted(tensors))


# ----------------------------------------------------------------------------------------------------------------
# Mutations: each changes case.dir and says what it expects
# ----------------------------------------------------------------------------------------------------------------
def m_identity(case):
    case.must_load = True
    case.note("no mutation")


def m_truncate(case):
    name = case.weights_file()
    with open(case.path(name), "rb") as f:
        data = f.read()
    (length,) = struct.unpack("<Q", data[:8])
    where = case.rng.choice(["length", "header", "body", "last byte"])
    cut = {"length": case.rng.randint(0, 7), "header": case.rng.randint(8, 8 + length - 1),
           "body": case.rng.randint(8 + length, len(data) - 1), "last byte": len(data) - 1}[where]
    with open(case.path(name), "wb") as f:
        f.write(data[:cut])
    case.note(f"{name} truncated in the {where} to {cut} of {len(data)} bytes")


def _mutate_bytes(case, name, begin, end, what):
    """Flip a bit, write random bytes or zeros in data[begin:end]; returns the new data."""
    with open(case.path(name), "rb") as f:
        data = bytearray(f.read())
    kind = case.rng.choice(["bit flip", "random byte", "random bytes", "zeros"])
    pos = case.rng.randrange(begin, end)
    if kind == "bit flip":
        bit = case.rng.randrange(8)
        data[pos] ^= 1 << bit
        kind += f" (bit {bit})"
    elif kind == "random byte":
        data[pos] = case.rng.randrange(256)
    else:
        count = min(case.rng.randint(2, 16), end - pos)
        data[pos:pos + count] = bytes(case.rng.randrange(256) if kind == "random bytes" else 0 for _ in range(count))
        kind += f" x{count}"
    with open(case.path(name), "wb") as f:
        f.write(data)
    case.note(f"{name}: {kind} at byte {pos} ({what})")
    return bytes(data)


def m_header_length_bytes(case):
    name = case.weights_file()
    _mutate_bytes(case, name, 0, 8, "header length")


def m_header_length_value(case):
    name = case.weights_file()
    header, body = read_raw(case.path(name))
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8 or 8)  # room to lie by a few bytes into the padding
    with open(case.path(name), "wb") as f:
        f.write(struct.pack("<Q", len(header_bytes)) + header_bytes + body)
    with open(case.path(name), "rb") as f:
        data = bytearray(f.read())
    length = len(header_bytes)
    value = case.rng.choice([0, 1, 7, length - 1, length - 2, length + 1, length + 8, len(data), 2**63 - 1, 2**64 - 1,
                             2**32, 100_000_001])
    data[:8] = struct.pack("<Q", value)
    with open(case.path(name), "wb") as f:
        f.write(data)
    case.note(f"{name}: header length {length} -> {value}")


def m_header_bytes(case):
    name = case.weights_file()
    with open(case.path(name), "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
    _mutate_bytes(case, name, 8, 8 + length, "JSON header")


def m_body_bytes(case):
    name = case.weights_file()
    header, _ = read_raw(case.path(name))
    with open(case.path(name), "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        size = os.fstat(f.fileno()).st_size
    data = _mutate_bytes(case, name, 8 + length, size, "tensor body")
    body = data[8 + length:]
    for tensor_name, entry in header.items():
        if tensor_name != "__metadata__":  # the values the file now stores; only the changed tensors matter
            case.edits[tensor_name] = tensor_from_bytes(entry, body)
    case.must_load = True


def m_header_lie(case):
    name = case.weights_file()
    header, body = read_raw(case.path(name))
    names = sorted(n for n in header if n != "__metadata__")
    target = case.rng.choice(names)
    entry = header[target]
    rng = case.rng
    kind = rng.choice(["dtype", "shape", "offsets", "entry", "header", "metadata"])
    if kind == "dtype":
        entry["dtype"] = rng.choice(["F16", "BF16", "F64", "I32", "U32", "I64", "BOOL", "U8", "I8", "F8_E4M3",
                                     "f32", "float32", "", 32, None, ["F32"]])
        lie = f"dtype {entry['dtype']!r}"
    elif kind == "shape":
        shape = list(entry["shape"])
        options = [shape[::-1], shape + [1], [1] + shape, shape[:-1], [], [0], [-1] + shape[1:],
                   [shape[0] * 2] + shape[1:], [str(d) for d in shape], [float(d) for d in shape], "64", None,
                   [2**62] + shape[1:], [d + 1 for d in shape]]
        if len(shape) == 2:
            options.append([shape[0] * 2, shape[1] // 2] if shape[1] % 2 == 0 else [shape[0] * shape[1]])
        entry["shape"] = rng.choice(options)
        lie = f"shape {shape} -> {entry['shape']!r}"
    elif kind == "offsets":
        begin, end = entry["data_offsets"]
        others = [header[n]["data_offsets"] for n in names if n != target]
        other = rng.choice(others) if others else [0, 0]
        options = {"past the end": [begin, len(body) + 4], "reversed": [end, begin], "negative": [-4, end],
                   "another tensor's": list(other), "shifted by 4": [begin + 4, end + 4],
                   "shorter": [begin, end - 4], "empty": [begin, begin], "huge": [begin, 2**64 - 1],
                   "floats": [float(begin), float(end)], "strings": [str(begin), str(end)],
                   "one number": [begin], "three numbers": [begin, end, end], "null": None}
        choice = rng.choice(sorted(options))
        entry["data_offsets"] = options[choice]
        lie = f"data_offsets {choice} {entry['data_offsets']!r}"
    elif kind == "entry":
        choice = rng.choice(["no dtype", "no shape", "no data_offsets", "not an object", "extra key"])
        if choice == "not an object":
            header[target] = rng.choice([[entry["dtype"], entry["shape"], entry["data_offsets"]], "F32", 0, None])
        elif choice == "extra key":
            entry["checksum"] = 1234
        else:
            del entry[choice.removeprefix("no ")]
        lie = f"entry {choice}"
    elif kind == "header":
        header = rng.choice([[header], "header", 5, None, {}])
        lie = f"header replaced by {json.dumps(header)[:40]}"
    else:
        header["__metadata__"] = rng.choice([{"format": "np"}, {"format": 5}, ["pt"], "pt", None,
                                            {"format": "pt", "extra": {"nested": 1}}])
        lie = f"__metadata__ {header['__metadata__']!r}"
    write_raw(case.path(name), header, body)
    case.note(f"{name}: header lies about {target}: {lie}")


def m_header_duplicate_key(case):
    """The JSON header names a tensor twice (json.dumps cannot write that: the text is edited)."""
    name = case.weights_file()
    header, body = read_raw(case.path(name))
    names = sorted(n for n in header if n != "__metadata__")
    target = case.rng.choice(names)
    other = header[case.rng.choice(names)]
    text = json.dumps(header, separators=(",", ":"))
    twin = json.dumps({target: case.rng.choice([header[target], other])}, separators=(",", ":"))[1:-1]
    text = text[:-1] + "," + twin + "}"
    header_bytes = text.encode() + b" " * (-len(text) % 8)
    write_raw(case.path(name), None, body, header_bytes)
    case.note(f"{name}: header names {target} twice")


def m_drop(case):
    def edit(tensors):
        target = pick_tensor(case, tensors)
        del tensors[target]
        case.note(f"dropped {target}")
        if case.family == "bart" and target == "final_logits_bias" and not case.sharded():
            case.edits[target] = torch.zeros(tensors_shape(case, target))  # optional in HF's BART: zeros
            case.must_load = True
    case.edit_tensors(edit)


def tensors_shape(case, name):
    return load_file(os.path.join(case.original, WEIGHTS))[name].shape


def m_rename(case):
    def edit(tensors):
        target = pick_tensor(case, tensors)
        rng = case.rng
        options = [target + ".orig", target.upper(), target.replace(".", "_"), "", " " + target,
                   target.replace("layers.0", "layers.7"), "model." + target, target.removeprefix("model."),
                   target.replace("weight", "bias"), rng.choice(sorted(tensors))]
        if case.family == "bart" and target in BART_SHARED:
            options += [n for n in BART_SHARED if n != target]
        new = rng.choice(options)
        tensors[new] = tensors.pop(target)
        case.note(f"renamed {target} -> {new!r}")
        if case.family == "llama" and new.removeprefix("model.") == target.removeprefix("model.") and new != target \
                and not case.sharded():
            case.must_load = True  # the "model." prefix is optional (bare LlamaModel names)
        if case.family == "bart" and target in BART_SHARED and new in BART_SHARED and not case.sharded():
            case.must_load = True  # another name of the one shared embedding
    case.edit_tensors(edit)


def m_reshape(case):
    def edit(tensors):
        target = pick_tensor(case, tensors)
        t = tensors[target]
        shape = list(t.shape)
        options = [[t.numel()], [1] + shape, shape + [1], [t.numel() // 2, 2] if t.numel() % 2 == 0 else [1, t.numel()]]
        options = [s for s in options if s != shape]
        new = case.rng.choice(options)
        tensors[target] = t.reshape(new).contiguous()
        case.note(f"reshaped {target} {shape} -> {new}")
    case.edit_tensors(edit)


def m_retype(case):
    def edit(tensors):
        target = pick_tensor(case, tensors)
        dtype = case.rng.choice([torch.int64, torch.int32, torch.int8, torch.uint8, torch.bool, torch.float64,
                                 torch.float16, torch.bfloat16])
        t = tensors[target]
        tensors[target] = t.to(dtype)
        case.note(f"retyped {target} to {dtype}")
        if dtype.is_floating_point:
            case.edits[target] = t.to(dtype).to(torch.float32)  # the stored values, in the config's dtype
            case.must_load = True
    case.edit_tensors(edit)


def m_extra_tensor(case):
    def edit(tensors):
        rng = case.rng
        prefix = "model." if case.family == "llama" else "model.encoder."
        new = rng.choice([prefix + "layers.0.extra.weight", prefix + "layers.9.mlp.up_proj.weight", "extra",
                          prefix + "norm.bias", "lm_head.bias", prefix + "layers.0.self_attn.q_proj.bias"])
        dtype = rng.choice([torch.float32, torch.float16, torch.int64])
        tensors[new] = torch.ones(rng.randint(1, 64), dtype=dtype)
        case.note(f"extra tensor {new} {tuple(tensors[new].shape)} {dtype}")
    case.edit_tensors(edit)


def m_duplicate_across_shards(case):
    if not case.sharded():
        case.shard()
    first = load_file(case.path(SHARDS[0]))
    second = load_file(case.path(SHARDS[1]))
    target = case.rng.choice(sorted(first))
    second[target] = first[target]
    save_file(second, case.path(SHARDS[1]), metadata={"format": "pt"})
    case.blame.update({SHARDS[1], INDEX})
    case.note(f"{target} in both shards")


def m_index(case):
    if not case.sharded():
        case.shard()
    case.blame.add(INDEX)
    rng = case.rng
    index = case.read_json(INDEX)
    weight_map = index["weight_map"]
    target = rng.choice(sorted(weight_map))
    kind = rng.choice(["entry missing", "wrong shard", "missing shard file", "extra entry", "weight_map not a dict",
                       "bad value", "index not an object", "no weight_map", "truncated", "bytes", "shard deleted"])
    if kind == "entry missing":
        del weight_map[target]
    elif kind == "wrong shard":
        weight_map[target] = SHARDS[1 - SHARDS.index(weight_map[target])]
    elif kind == "missing shard file":
        weight_map[target] = "model-00003-of-00002.safetensors"
    elif kind == "extra entry":
        weight_map["model.layers.5.extra.weight"] = rng.choice(SHARDS)
    elif kind == "weight_map not a dict":
        index["weight_map"] = rng.choice([sorted(weight_map.items()), list(weight_map), "model.safetensors", 5,
                                          None, True])
    elif kind == "bad value":
        weight_map[target] = rng.choice([5, None, [SHARDS[0]], {"file": SHARDS[0]}, "", "../" + SHARDS[0],
                                         "sub/" + SHARDS[0], ".", True, CONFIG, INDEX, GENERATION])
    elif kind == "index not an object":
        index = rng.choice([[index], "index", 5, None])
    elif kind == "no weight_map":
        del index["weight_map"]
    if kind in ("truncated", "bytes"):
        with open(case.path(INDEX), "rb") as f:
            data = f.read()
        if kind == "truncated":
            with open(case.path(INDEX), "wb") as f:
                f.write(data[:rng.randrange(len(data))])
        else:
            _mutate_bytes(case, INDEX, 0, len(data), "index")
    elif kind == "shard deleted":
        shard = rng.choice(SHARDS)
        os.remove(case.path(shard))
        case.blame.add(shard)
        kind += f" ({shard})"
    else:
        case.write_json(INDEX, index)
    case.note(f"index: {kind} ({target})")


# config.json fields by kind (the kind decides which values are invalid rather than merely different)
CONFIG_KINDS = {
    "llama": {"vocab_size": "dim", "hidden_size": "dim", "intermediate_size": "dim", "num_hidden_layers": "count",
              "num_attention_heads": "dim", "num_key_value_heads": "dim", "head_dim": "dim",
              "max_position_embeddings": "dim", "rms_norm_eps": "positive", "attention_dropout": "probability",
              "hidden_act": "name", "tie_word_embeddings": "bool", "attention_bias": "bool", "mlp_bias": "bool",
              "bos_token_id": "token", "eos_token_id": "token", "pad_token_id": "token",
              "rope_parameters": "rope", "rope_theta": "positive", "rope_scaling": "rope", "dtype": "dtype",
              "torch_dtype": "dtype", "model_type": "name", "partial_rotary_factor": "positive",
              "quantization_config": "other", "initializer_range": "other", "use_cache": "other",
              "pretraining_tp": "other", "architectures": "other", "transformers_version": "other"},
    "bart": {"vocab_size": "dim", "d_model": "dim", "encoder_layers": "count", "decoder_layers": "count",
             "encoder_attention_heads": "dim", "decoder_attention_heads": "dim", "encoder_ffn_dim": "dim",
             "decoder_ffn_dim": "dim", "max_position_embeddings": "dim", "scale_embedding": "bool",
             "activation_function": "name", "dropout": "probability", "attention_dropout": "probability",
             "activation_dropout": "probability", "encoder_layerdrop": "probability",
             "decoder_layerdrop": "probability", "init_std": "other", "pad_token_id": "token",
             "bos_token_id": "token", "eos_token_id": "token", "decoder_start_token_id": "token",
             "forced_bos_token_id": "token", "forced_eos_token_id": "token", "tie_word_embeddings": "bool",
             "normalize_before": "bool", "add_final_layer_norm": "bool", "static_position_embeddings": "bool",
             "normalize_embedding": "bool", "add_bias_logits": "bool", "dtype": "dtype", "model_type": "name",
             "id2label": "other", "label2id": "other", "is_encoder_decoder": "other", "architectures": "other",
             "classifier_dropout": "other", "use_cache": "other"},
}
JUNK = ["", "x", [], {}, [1, 2], {"a": 1}, None, True, False]


def invalid_values(kind, value):
    """Values of a field that are invalid for its kind (never a valid value that merely changes the model)."""
    wrong_types = [str(value), [value], {"value": value}, None, True, False, ""]
    if kind in ("dim", "count"):
        return wrong_types + [value + 0.5, float(value), -1, -value, 10**30, 2**63, 2**64, 1e300, float("nan"),
                              float("inf")] + ([0] if kind == "dim" else [])
    if kind == "positive":
        return wrong_types + [0, 0.0, -1e-6, -1, float("nan"), float("inf"), float("-inf"), 10**400 // 10**399]
    if kind == "probability":
        return wrong_types + [-0.1, 1.5, 2, float("nan"), float("inf"), 10**30]
    if kind == "token":
        return [str(value), [str(value)], {"id": value}, 0.5, float(value) + 0.5, True, 10**30, [None], [[1]],
                -(10**30), float("nan")]
    if kind == "bool":
        return ["true", "false", "", 0, 1, 2, 0.0, [], {}, [True]]
    if kind == "name":
        return [5, [], {}, None, True, "", " " + str(value), str(value).upper()]
    if kind == "rope":
        return ["default", 5, [], [("rope_type", "default")], {"rope_type": 5}, {"rope_type": []},
                {"rope_type": "default", "rope_theta": "ten"}, {"rope_type": "default", "rope_theta": -1.0},
                {"rope_type": "default", "rope_theta": 0}, {"rope_type": "default", "rope_theta": None},
                {"rope_type": "linear", "factor": "2"}, {"rope_type": "linear", "factor": 0},
                {"rope_type": "linear", "factor": -2.0}, {"rope_type": "linear", "factor": []},
                {"rope_type": "llama3", "factor": 8.0}, {"rope_type": "linear", "factor": float("inf")},
                {"type": None}, {"rope_type": None, "type": 5}, {"rope_theta": float("inf")},
                {"rope_type": "default", "rope_theta": float("nan")}]
    if kind == "dtype":
        return ["float64", "int8", "int64", "bool", "complex64", "f32", "", 32, [], {}, True, "torch.float64",
                "float8_e4m3fn", "uint8"]
    return JUNK + [10**30, -1, float("nan")]


def m_config_value(case):
    config = case.read_json(CONFIG)
    kinds = CONFIG_KINDS[case.family]
    field = case.rng.choice(sorted(kinds))
    old = config.get(field, 1)
    value = case.rng.choice(invalid_values(kinds[field], old if isinstance(old, (int, float)) else 64))
    config[field] = value
    case.write_json(CONFIG, config)
    case.blame.add(CONFIG)
    case.note(f"config.json {field}: {old!r} -> {value!r}")


def m_config_out_of_range(case):
    config = case.read_json(CONFIG)
    rng = case.rng
    if case.family == "llama":
        options = [("num_attention_heads", 3), ("num_attention_heads", 5), ("num_key_value_heads", 3),
                   ("num_key_value_heads", 8), ("head_dim", 15), ("head_dim", 17), ("hidden_size", 65),
                   ("vocab_size", 127), ("num_hidden_layers", 3), ("num_hidden_layers", 0), ("intermediate_size", 1),
                   ("pad_token_id", 128), ("pad_token_id", -1), ("pad_token_id", 10**6), ("bos_token_id", -5),
                   ("eos_token_id", [2, 10**6]), ("attention_dropout", 1.0001), ("rms_norm_eps", -1e-6),
                   ("max_position_embeddings", 0), ("max_position_embeddings", -64),
                   ("partial_rotary_factor", 0.5)]
    else:
        options = [("encoder_attention_heads", 3), ("decoder_attention_heads", 5), ("d_model", 65),
                   ("vocab_size", 99), ("encoder_layers", 3), ("decoder_layers", 0), ("encoder_ffn_dim", 1),
                   ("pad_token_id", 100), ("pad_token_id", -1), ("pad_token_id", 10**6), ("bos_token_id", -5),
                   ("decoder_start_token_id", 100), ("forced_eos_token_id", [2, 10**6]), ("dropout", 1.0001),
                   ("max_position_embeddings", 8), ("max_position_embeddings", 0), ("encoder_layerdrop", -0.5)]
    field, value = rng.choice(options)
    old = config.get(field)
    config[field] = value
    case.write_json(CONFIG, config)
    case.blame.add(CONFIG)
    case.note(f"config.json {field}: {old!r} -> {value!r} (out of range)")


def m_config_missing(case):
    config = case.read_json(CONFIG)
    field = case.rng.choice(sorted(config))
    del config[field]
    case.write_json(CONFIG, config)
    case.blame.add(CONFIG)
    case.note(f"config.json without {field}")


def m_config_unknown(case):
    config = case.read_json(CONFIG)
    field = case.rng.choice(["sliding_window", "my_field", "use_flash", "num_experts", "rope_fancy", "__class__",
                             "extra", ""])
    config[field] = case.rng.choice([1, "x", None, [1], {"a": 1}, True, 4096])
    case.write_json(CONFIG, config)
    case.blame.add(CONFIG)
    case.note(f"config.json unknown field {field!r} = {config[field]!r}")


def m_config_model_type(case):
    config = case.read_json(CONFIG)
    value = case.rng.choice(["bart" if case.family == "llama" else "llama", "mistral", "gpt2", "mbart", "LLAMA",
                             "", None, 5, ["llama"], "missing"])
    if value == "missing":
        del config["model_type"]
    else:
        config["model_type"] = value
    case.write_json(CONFIG, config)
    case.blame.add(CONFIG)
    case.note(f"config.json model_type {value!r}")


def m_config_dtype(case):
    config = case.read_json(CONFIG)
    value = case.rng.choice(["float16", "bfloat16", "torch.bfloat16", "float32", "auto", None] +
                            invalid_values("dtype", None))
    config["dtype"] = value
    case.write_json(CONFIG, config)
    case.blame.add(CONFIG)
    case.note(f"config.json dtype {value!r}")
    valid = {"float16": torch.float16, "bfloat16": torch.bfloat16, "torch.bfloat16": torch.bfloat16,
             "float32": torch.float32, "auto": torch.float32, None: torch.float32}
    if isinstance(value, str | None) and value in valid:
        case.dtype = valid[value]
        case.must_load = True


def m_config_equivalent(case):
    """Config changes that describe the same model: the load must succeed and give it."""
    config = case.read_json(CONFIG)
    if case.family == "llama":
        options = [("tie_word_embeddings", True),  # the stored lm_head differs: loaded untied, as HF does
                   ("use_cache", False), ("attention_dropout", 0.5), ("head_dim", None), ("rope_theta", 10000.0),
                   ("rope_scaling", None), ("torch_dtype", "float32"), ("transformers_version", "4.40.0"),
                   ("architectures", None), ("max_position_embeddings", 4096), ("pad_token_id", None),
                   ("eos_token_id", [2, 5]), ("pretraining_tp", 1), ("_name_or_path", "x/y")]
    else:
        options = [("dropout", 0.5), ("attention_dropout", 0.3), ("activation_dropout", 0.9), ("use_cache", False),
                   ("transformers_version", "4.40.0"), ("architectures", None), ("forced_bos_token_id", 0),
                   ("eos_token_id", [2, 5]), ("init_std", 0.02), ("normalize_before", False),
                   ("tie_word_embeddings", True), ("is_encoder_decoder", True)]
    field, value = case.rng.choice(options)
    config[field] = value
    case.write_json(CONFIG, config)
    case.blame.add(CONFIG)
    case.must_load = True
    case.note(f"config.json {field} = {value!r} (the same model)")


def _break_json_file(case, name):
    rng = case.rng
    with open(case.path(name), "rb") as f:
        data = f.read()
    kind = rng.choice(["truncated", "empty", "not an object", "invalid UTF-8", "NUL byte", "BOM", "trailing junk",
                       "two objects", "deleted", "directory", "deep nesting"])
    if kind == "truncated":
        data = data[:rng.randrange(1, len(data))]
    elif kind == "empty":
        data = b""
    elif kind == "not an object":
        data = rng.choice([b"[1, 2]", b"\"config\"", b"5", b"null", b"true", b"[" + data + b"]"])
    elif kind == "invalid UTF-8":
        pos = rng.randrange(len(data))
        data = data[:pos] + rng.choice([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x80"]) + data[pos + 1:]
    elif kind == "NUL byte":
        pos = rng.randrange(len(data))
        data = data[:pos] + b"\x00" + data[pos + 1:]
    elif kind == "BOM":
        data = b"\xef\xbb\xbf" + data
    elif kind == "trailing junk":
        data = data + b"}"
    elif kind == "two objects":
        data = data + data
    elif kind == "deep nesting":
        depth = rng.choice([2_000, 100_000])
        data = data.rstrip().removesuffix(b"}") + b', "deep": ' + b"[" * depth + b"]" * depth + b"}"
    if kind == "deleted":
        os.remove(case.path(name))
    elif kind == "directory":
        os.remove(case.path(name))
        os.mkdir(case.path(name))
    else:
        with open(case.path(name), "wb") as f:
            f.write(data)
    case.blame.add(name)
    case.note(f"{name}: {kind}")
    if kind == "deleted" and name == GENERATION:
        case.must_load = True  # optional: config.json's generation keys are the fallback


def m_config_file(case):
    _break_json_file(case, CONFIG)


def m_generation_config(case):
    if case.rng.random() < 0.5:
        _break_json_file(case, GENERATION)
        return
    config = case.read_json(GENERATION)
    field = case.rng.choice(sorted(config) + ["max_new_tokens", "num_beams", "do_sample"])
    config[field] = case.rng.choice(JUNK + [-1, 10**30, "x", float("nan")])
    case.write_json(GENERATION, config)
    case.blame.add(GENERATION)
    case.note(f"generation_config.json {field} = {config[field]!r}")


# name -> (weight, function); tensor-level and header mutations apply to a shard in about a third of the cases
MUTATIONS = {
    "identity": (1, m_identity),
    "truncate": (4, m_truncate),
    "header_length_bytes": (3, m_header_length_bytes),
    "header_length_value": (3, m_header_length_value),
    "header_bytes": (6, m_header_bytes),
    "body_bytes": (4, m_body_bytes),
    "header_lie": (10, m_header_lie),
    "header_duplicate_key": (2, m_header_duplicate_key),
    "drop": (3, m_drop),
    "rename": (3, m_rename),
    "reshape": (3, m_reshape),
    "retype": (4, m_retype),
    "extra_tensor": (2, m_extra_tensor),
    "duplicate_across_shards": (1, m_duplicate_across_shards),
    "index": (8, m_index),
    "config_value": (14, m_config_value),
    "config_out_of_range": (5, m_config_out_of_range),
    "config_missing": (4, m_config_missing),
    "config_unknown": (2, m_config_unknown),
    "config_model_type": (2, m_config_model_type),
    "config_dtype": (3, m_config_dtype),
    "config_equivalent": (3, m_config_equivalent),
    "config_file": (4, m_config_file),
    "generation_config": (4, m_generation_config),
}
SHARDABLE = {"identity", "truncate", "header_length_bytes", "header_length_value", "header_bytes", "body_bytes",
             "header_lie", "header_duplicate_key", "drop", "rename", "reshape", "retype", "extra_tensor"}


# ----------------------------------------------------------------------------------------------------------------
# Running a case
# ----------------------------------------------------------------------------------------------------------------
def case_plan(seed, cases, families):
    """[(index, family, mutation)]: case i depends only on the seed, i and the families (its random choices are
    drawn from its own generator), so a failure replays with ``--only-case``."""
    rng = random.Random(seed)
    names = sorted(MUTATIONS)
    weights = [MUTATIONS[n][0] for n in names]
    return [(index, families[index % len(families)], rng.choices(names, weights)[0]) for index in range(cases)]


class CaseTimeout(BaseException):
    """Raised by SIGALRM: a BaseException, so that no ``except Exception`` in the loader swallows it."""


def _on_alarm(signum, frame):
    raise CaseTimeout()


def names_file(message, names):
    return any(re.search(rf"(?<![\w.-]){re.escape(name)}", message) for name in names)


def raised_by_loader(error):
    frames = traceback.extract_tb(error.__traceback__)
    return bool(frames) and os.path.realpath(frames[-1].filename).startswith(MODELS_DIR + os.sep)


def equal_bitwise(a, b):
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.is_floating_point():
        return bool(((a == b) | (a.isnan() & b.isnan())).all())
    return torch.equal(a, b)


def check_model(case, model, expected):
    """None when ``model`` is the expected model, else what differs."""
    want_logits, want_state, want_groups = expected.get(case.family, case.dtype, case.edits)
    state = model.state_dict()
    if sorted(state) != sorted(want_state):
        return f"state names differ: {sorted(set(state) ^ set(want_state))[:5]}"
    dtypes = {t.dtype for t in state.values()}
    if dtypes != {t.dtype for t in want_state.values()}:
        return f"loaded in {sorted(map(str, dtypes))}, expected {case.dtype}"
    differing = [n for n in state if not equal_bitwise(state[n], want_state[n])]
    if differing:
        return f"silently different tensors: {differing[:4]}"
    if sorted(map(sorted, tied_parameter_groups(model))) != sorted(map(sorted, want_groups)):
        return f"tied groups {tied_parameter_groups(model)}, expected {want_groups}"
    logits = logits_of(case.family, model)
    if not equal_bitwise(logits, want_logits):
        return "silently different logits"
    return None


def run_case(seed, index, family, mutation, originals, expected, timeout, work_root):
    """(outcome, detail): outcome "loaded", "refused" (a clear error) or "FAIL"; detail the description plus the
    error line or what differs."""
    rng = random.Random(seed * 1_000_003 + index)
    case = Case(family, os.path.join(work_root, f"case{index}"), originals[family], rng)
    shutil.copytree(originals[family], case.dir)
    try:
        if mutation in SHARDABLE and rng.random() < 0.35 and mutation != "duplicate_across_shards":
            case.shard()
        MUTATIONS[mutation][1](case)
        what = "; ".join(case.what)
        previous_handler = signal.signal(signal.SIGALRM, _on_alarm)
        signal.alarm(timeout)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    model = load(family, case.dir)
                except CaseTimeout:
                    raise
                except Exception as error:  # noqa: BLE001 - the oracle judges every exception
                    message = f"{type(error).__name__}: {error}"
                    first = message.splitlines()[0][:400]
                    if type(error) not in CLEAR_ERRORS and not isinstance(error, OSError):
                        return "FAIL", f"{what}\n  unclear exception type {first}\n{_tail(error)}"
                    if not raised_by_loader(error):
                        return "FAIL", f"{what}\n  error from outside the loader: {first}\n{_tail(error)}"
                    if not names_file(str(error), case.blame):
                        return "FAIL", f"{what}\n  error does not name {sorted(case.blame)}: {first}"
                    if case.must_load:
                        return "FAIL", f"{what}\n  a valid checkpoint was refused: {first}\n{_tail(error)}"
                    return "refused", f"{what}\n  {first}"
                try:
                    problem = check_model(case, model, expected)
                except CaseTimeout:
                    raise
                except Exception as error:  # noqa: BLE001
                    problem = f"the loaded model fails: {type(error).__name__}: {error}\n{_tail(error)}"
                if problem:
                    return "FAIL", f"{what}\n  {problem}"
                return "loaded", what
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, previous_handler)
    except CaseTimeout:
        return "FAIL", f"{'; '.join(case.what)}\n  timed out after {timeout} s"
    finally:
        shutil.rmtree(case.dir, ignore_errors=True)


def _tail(error):
    return "".join(traceback.format_exception(error, limit=-3)).rstrip()


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m tests.ckpt_fuzz", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--family", nargs="+", choices=FAMILIES, default=list(FAMILIES))
    parser.add_argument("--only-case", type=int, default=None, help="run this case index of the plan only")
    parser.add_argument("--timeout", type=int, default=20, help="seconds per case (SIGALRM)")
    parser.add_argument("--show-errors", action="store_true", help="print every case's outcome (for review)")
    parser.add_argument("--verbose", action="store_true", help="print each case before it runs")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    plan = case_plan(args.seed, args.cases if args.only_case is None else args.only_case + 1, args.family)
    if args.only_case is not None:
        plan = [plan[args.only_case]]
    counts = {"loaded": 0, "refused": 0, "FAIL": 0}
    family_args = "" if args.family == list(FAMILIES) else f" --family {' '.join(args.family)}"
    with tempfile.TemporaryDirectory(prefix="ckpt_fuzz_") as root:
        originals = save_originals(os.path.join(root, "originals"), args.family)
        expected = Expected(originals)
        for index, family, mutation in plan:
            if args.verbose:
                print(f"case {index}: {family} {mutation}", flush=True)
            outcome, detail = run_case(args.seed, index, family, mutation, originals, expected, args.timeout, root)
            counts[outcome] += 1
            if outcome == "FAIL":
                print(f"FAIL {family} case {index} ({mutation}): {detail}\n  reproduce: python -m tests.ckpt_fuzz "
                      f"--seed {args.seed}{family_args} --only-case {index}", flush=True)
            elif args.show_errors:
                print(f"{outcome} {family} case {index} ({mutation}): {detail}", flush=True)
    print(f"ckpt_fuzz: {counts['loaded'] + counts['refused']} passed ({counts['loaded']} loaded the expected model, "
          f"{counts['refused']} refused clearly), {counts['FAIL']} failed ({len(plan)} cases, seed {args.seed}, "
          f"{time.perf_counter() - start:.0f} s)", flush=True)
    return 1 if counts["FAIL"] else 0


if __name__ == "__main__":
    sys.exit(main())

"""LLaMA's config.json (``LlamaConfig``) and RoPE math (inverse frequencies of every supported rope type, cos/sin).

``fusedformers.models.llama`` holds the model; this module holds what it is parsed from and the position math that
depends only on the config.
"""
import math
from dataclasses import dataclass, field

import torch

from fusedformers.models.checkpoint import check_config_values, refuse_unknown_fields
from fusedformers.models.layers import ACTIVATIONS

ROPE_TYPES = ("default", "linear", "dynamic", "llama3")
# keys each rope type reads (besides rope_type/type and rope_theta); "factor" is required where listed
ROPE_KEYS = {"default": (), "linear": ("factor",), "dynamic": ("factor",),
             "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}

# LLaMA's own bookkeeping fields (see checkpoint.IGNORED_CONFIG_KEYS for those of every model)
LLAMA_IGNORED_KEYS = ("pretraining_tp",)


@dataclass
class LlamaConfig:
    """The architecture fields of an HF LLaMA config.json. ``rope_parameters`` is normalised to transformers 5's
    spelling: ``{"rope_type": ..., "rope_theta": ..., <type's keys>}``."""
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rope_parameters: dict
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 2048
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    attention_dropout: float = 0.0
    bos_token_id: int | None = 1
    eos_token_id: int | list | None = 2
    pad_token_id: int | None = None
    extra: dict = field(default_factory=dict)  # ignored bookkeeping fields, written back by to_dict()
    # the registered ops the model runs (fusedformers.models.ops.OPS), read at call time; not written to config.json
    attn_implementation: str = "fused"

    @classmethod
    def from_dict(cls, d):
        """Parse an HF config.json dict; raises ValueError on anything it would otherwise have to guess."""
        d = dict(d)
        model_type = d.pop("model_type", None)
        if model_type != "llama":
            raise ValueError(f"unsupported model_type {model_type!r}: fusedformers LlamaForCausalLM loads "
                             f"model_type 'llama' only")
        if d.get("quantization_config") is not None:
            raise ValueError("quantized checkpoints (config.json 'quantization_config') are not supported")
        d.pop("quantization_config", None)
        required = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"]
        absent = [k for k in required if d.get(k) is None]
        if absent:
            raise ValueError(f"config.json lacks required fields {absent}")
        args = {k: d.pop(k) for k in required}
        check_config_values({**args, **{k: d[k] for k in ("num_key_value_heads", "head_dim") if d.get(k) is not None}},
                            positive_ints=required[:2] + ["intermediate_size", "num_attention_heads",
                                                          "num_key_value_heads", "head_dim"],
                            nonnegative_ints=["num_hidden_layers"])
        num_heads = args["num_attention_heads"]
        args["num_key_value_heads"] = d.pop("num_key_value_heads", None) or num_heads
        args["head_dim"] = d.pop("head_dim", None) or args["hidden_size"] // num_heads
        if num_heads % args["num_key_value_heads"]:
            raise ValueError(f"num_attention_heads ({num_heads}) must be a multiple of num_key_value_heads "
                             f"({args['num_key_value_heads']})")
        for name in ("rms_norm_eps", "max_position_embeddings", "hidden_act", "tie_word_embeddings",
                     "attention_bias", "mlp_bias", "attention_dropout", "bos_token_id", "eos_token_id",
                     "pad_token_id"):
            if name in d:
                value = d.pop(name)
                if value is not None or name.endswith("token_id"):
                    args[name] = value
        check_config_values(args, positive_ints=["max_position_embeddings"], probabilities=["attention_dropout"],
                            positive_numbers=["rms_norm_eps"],
                            bools=["tie_word_embeddings", "attention_bias", "mlp_bias"],
                            token_ids=["bos_token_id", "eos_token_id", "pad_token_id"])
        if not isinstance(args.get("hidden_act", "silu"), str) or args.get("hidden_act", "silu") not in ACTIVATIONS:
            raise ValueError(f"unsupported hidden_act {args['hidden_act']!r}; supported: {sorted(ACTIVATIONS)}")
        args["rope_parameters"] = parse_rope(d.pop("rope_parameters", None), d.pop("rope_scaling", None),
                                             d.pop("rope_theta", None),
                                             args.get("max_position_embeddings", 2048))
        if d.pop("partial_rotary_factor", 1.0) not in (None, 1.0):
            raise ValueError("partial_rotary_factor != 1 is not supported for LLaMA")
        # every field read above was popped from d: what is left must be bookkeeping
        extra = refuse_unknown_fields(d, (), "LlamaConfig", also_ignored=LLAMA_IGNORED_KEYS)
        return cls(**args, extra=extra)

    def to_dict(self):
        """HF config.json; RoPE in both spellings (``rope_parameters``, and ``rope_theta`` + ``rope_scaling``)."""
        d = {k: v for k, v in self.extra.items() if k not in ("architectures", "transformers_version")}
        d.update({k: getattr(self, k) for k in self.__dataclass_fields__ if k not in ("extra", "attn_implementation")})
        rope = dict(self.rope_parameters)
        legacy = {k: v for k, v in rope.items() if k != "rope_theta"}
        d.update({"model_type": "llama", "architectures": ["LlamaForCausalLM"], "rope_parameters": rope,
                  # the older spelling too, for transformers 4 (transformers 5 reads both; they agree)
                  "rope_theta": rope["rope_theta"],
                  "rope_scaling": legacy if rope["rope_type"] != "default" else None})
        return d


def parse_rope(rope_parameters, rope_scaling, rope_theta, max_position_embeddings):
    """Normalise RoPE settings given as transformers 5's ``rope_parameters`` or as the older ``rope_theta`` +
    ``rope_scaling`` (whose type key is ``rope_type`` or ``type``) into ``{"rope_type", "rope_theta", ...}``.
    When a config carries both spellings they must agree."""
    for name, value in (("rope_parameters", rope_parameters), ("rope_scaling", rope_scaling)):
        if value is not None and not isinstance(value, dict):
            raise ValueError(f"config.json field {name!r} must be an object or null, got {value!r}")
    check_config_values({"rope_theta": rope_theta} if rope_theta is not None else {}, positive_numbers=["rope_theta"])
    if rope_parameters is not None:
        rope = _parse_rope_dict(rope_parameters, rope_theta, max_position_embeddings)
        if rope_theta is not None and float(rope_theta) != rope["rope_theta"]:
            raise ValueError(f"config.json rope_theta {rope_theta} disagrees with rope_parameters {rope_parameters}")
        if rope_scaling is not None and _parse_rope_dict(rope_scaling, rope["rope_theta"],
                                                         max_position_embeddings) != rope:
            raise ValueError(f"config.json rope_scaling {rope_scaling} disagrees with rope_parameters "
                             f"{rope_parameters}; keep one")
        return rope
    return _parse_rope_dict(rope_scaling or {}, rope_theta, max_position_embeddings)


def _parse_rope_dict(params, rope_theta, max_position_embeddings):
    params = dict(params)
    rope_type = params.pop("rope_type", None)
    legacy_type = params.pop("type", None)
    if rope_type is not None and legacy_type is not None and rope_type != legacy_type:
        raise ValueError(f"rope settings name two types: rope_type {rope_type!r}, type {legacy_type!r}")
    rope_type = rope_type or legacy_type or "default"
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"unsupported rope type {rope_type!r}; supported: {list(ROPE_TYPES)}")
    theta = params.pop("rope_theta", None)
    theta = theta if theta is not None else rope_theta if rope_theta is not None else 10000.0
    check_config_values({"rope_theta": theta}, positive_numbers=["rope_theta"])  # <= 0: NaN angles
    theta = float(theta)
    if params.pop("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError("partial_rotary_factor != 1 is not supported for LLaMA")
    if rope_type == "llama3":
        params.setdefault("original_max_position_embeddings", max_position_embeddings)
    if rope_type == "default":
        params.pop("factor", None)  # HF ignores a factor given with the default type
    allowed = ROPE_KEYS[rope_type]
    missing = [k for k in allowed if params.get(k) is None]
    unknown = [k for k in params if k not in allowed]
    if missing or unknown:
        raise ValueError(f"rope type {rope_type!r} needs {list(allowed)}; missing {missing}, unknown {unknown}")
    check_config_values(params, positive_numbers=["factor", "low_freq_factor", "high_freq_factor"],
                        positive_ints=["original_max_position_embeddings"])
    return {"rope_type": rope_type, "rope_theta": theta, **params}


def rope_inv_freq(config, device, seq_len=None):
    """Inverse frequencies ``[head_dim // 2]`` (float32) of the config's RoPE type. ``seq_len`` (1 + the largest
    position of the call) matters only for "dynamic" NTK scaling, which grows the base past
    max_position_embeddings exactly as HF's dynamic rope update does."""
    p, dim = config.rope_parameters, config.head_dim
    base = p["rope_theta"]
    if p["rope_type"] == "dynamic" and seq_len is not None and seq_len > config.max_position_embeddings:
        factor = p["factor"]
        base = base * ((factor * seq_len / config.max_position_embeddings) - (factor - 1)) ** (dim / (dim - 2))
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim))
    if p["rope_type"] == "linear":
        inv_freq = inv_freq / p["factor"]
    elif p["rope_type"] == "llama3":
        factor, old_len = p["factor"], p["original_max_position_embeddings"]
        low_freq_wavelen = old_len / p["low_freq_factor"]
        high_freq_wavelen = old_len / p["high_freq_factor"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - p["low_freq_factor"]) / (p["high_freq_factor"] - p["low_freq_factor"])
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
        inv_freq = torch.where(is_medium, smoothed, scaled)
    return inv_freq


def rope_cos_sin(inv_freq, position_ids, dtype):
    """cos, sin ``[B, L, head_dim]`` in ``dtype`` for ``position_ids [B, L]`` (angles in float32)."""
    angles = position_ids[:, :, None].float() * inv_freq[None, None, :]
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)

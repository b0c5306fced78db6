"""LLaMA for causal LM on the fusedformers kernels, loading and saving Hugging Face checkpoints.

Layout (one decoder layer, the residual add fused into the following RMSNorm)::

    x = embed_tokens(input_ids)                                   # [B, L, hidden]
    for layer:  normed, h = input_layernorm(x, residual=h)         # h = x + h, normed = rms_norm(h)
                x = o_proj(attention(rope(q), rope(k), v))         # GQA/MQA: K/V heads never repeated
                normed, h = post_attention_layernorm(x, residual=h)
                x = down_proj(act(gate_proj(normed)) * up_proj(normed))
    logits = lm_head(norm(x, residual=h))                          # [B, L, vocab]

Module names follow HF's checkpoint names without the ``model.`` prefix (``layers.0.self_attn.q_proj``, ...).
``attn_implementation="fused"`` runs the Triton kernels, ``"eager"`` the PyTorch references of
``fusedformers.kernels.reference``.
"""
import math
import warnings
from collections import namedtuple
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from fusedformers.kernels import attention, attention_reference, rms_norm, rms_norm_reference, rope, rope_reference
from fusedformers.kernels.checks import triton_can_run
from fusedformers.models.beam_search import generation_defaults_from_model_config
from fusedformers.models.checkpoint import (
    assign_state_dict,
    load_config_dict,
    load_generation_config,
    load_safetensors_state_dict,
    resolve_dtype,
    save_safetensors,
)
from fusedformers.models.cuda_graph import StepGraph
from fusedformers.models.generation import (
    IGNORED_SETTINGS,
    UNSUPPORTED_OFF,
    apply_logits_processing,
    make_generator,
    pick_next_token,
    resolve_generation_args,
)
from fusedformers.models.kv_cache import KVCache

STOP_CHECK_INTERVAL = 8  # generate() asks the GPU whether every row has finished once per this many steps

Ops = namedtuple("Ops", "attention rms_norm rope")
IMPLEMENTATIONS = {"fused": Ops(attention, rms_norm, rope),
                   "eager": Ops(attention_reference, rms_norm_reference, rope_reference)}

ACTIVATIONS = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}

ROPE_TYPES = ("default", "linear", "dynamic", "llama3")
# keys each rope type reads (besides rope_type/type and rope_theta); "factor" is required where listed
ROPE_KEYS = {"default": (), "linear": ("factor",), "dynamic": ("factor",),
             "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}

# config.json fields that do not change the computation: HF bookkeeping, training-time init, and the generation
# defaults that old transformers versions stored in config.json. Any other unknown field is an error.
IGNORED_CONFIG_KEYS = frozenset({
    "architectures", "transformers_version", "_name_or_path", "_commit_hash", "dtype", "torch_dtype",
    "initializer_range", "use_cache", "pretraining_tp", "auto_map", "_attn_implementation",
    "_attn_implementation_autoset", "return_dict", "output_hidden_states", "output_attentions", "torchscript",
    "use_bfloat16", "tf_legacy_loss", "pruned_heads", "chunk_size_feed_forward", "is_encoder_decoder",
    "is_decoder", "cross_attention_hidden_size", "add_cross_attention", "tie_encoder_decoder", "finetuning_task",
    "id2label", "label2id", "num_labels", "task_specific_params", "problem_type", "tokenizer_class", "prefix",
    "sep_token_id", "decoder_start_token_id",
    "max_length", "min_length", "do_sample", "early_stopping", "num_beams", "num_beam_groups",
    "diversity_penalty", "temperature", "top_k", "top_p", "typical_p", "repetition_penalty", "length_penalty",
    "no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "bad_words_ids", "num_return_sequences",
    "output_scores", "return_dict_in_generate", "forced_bos_token_id", "forced_eos_token_id",
    "remove_invalid_values", "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens",
})


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
        if args.get("hidden_act", "silu") not in ACTIVATIONS:
            raise ValueError(f"unsupported hidden_act {args['hidden_act']!r}; supported: {sorted(ACTIVATIONS)}")
        args["rope_parameters"] = parse_rope(d.pop("rope_parameters", None), d.pop("rope_scaling", None),
                                             d.pop("rope_theta", None),
                                             args.get("max_position_embeddings", 2048))
        if d.pop("partial_rotary_factor", 1.0) not in (None, 1.0):
            raise ValueError("partial_rotary_factor != 1 is not supported for LLaMA")
        unknown = sorted(k for k in d if k not in IGNORED_CONFIG_KEYS)
        if unknown:
            raise ValueError(f"config.json fields not understood by fusedformers LlamaConfig: {unknown} (known "
                             f"bookkeeping fields are ignored; these might change the model, so they are refused)")
        return cls(**args, extra=d)

    def to_dict(self):
        """HF config.json; RoPE in both spellings (``rope_parameters``, and ``rope_theta`` + ``rope_scaling``)."""
        d = {k: v for k, v in self.extra.items() if k not in ("architectures", "transformers_version")}
        d.update({k: getattr(self, k) for k in self.__dataclass_fields__ if k != "extra"})
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
    theta = float(theta if theta is not None else rope_theta if rope_theta is not None else 10000.0)
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
    return {"rope_type": rope_type, "rope_theta": theta, **params}


# ---------------------------------------------------------------------------------------------------------- RoPE

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


def positions_from_mask(attention_mask, past_len, q_len, batch, device):
    """Position ids ``[B, Lq]`` of the last ``q_len`` tokens: ``cumsum(mask) - 1`` with padding at 0 (HF's
    generate, so left-padded rows start at 0), or ``past_len + arange(q_len)`` without a mask."""
    if attention_mask is None:
        return torch.arange(past_len, past_len + q_len, device=device)[None, :].expand(batch, q_len)
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 0)[:, -q_len:]


# -------------------------------------------------------------------------------------------------------- layers

_warned_cpu = False


def _implementation(impl, device):
    """The Ops (attention, rms_norm, rope) to run: "fused" falls back to "eager", with one warning, where Triton
    cannot run (CPU tensors without TRITON_INTERPRET=1)."""
    global _warned_cpu
    if impl == "fused" and not triton_can_run(device):
        if not _warned_cpu:
            _warned_cpu = True
            warnings.warn(f"the fused Triton kernels need CUDA (or TRITON_INTERPRET=1); tensors are on {device}, "
                          "so LLaMA runs the eager PyTorch references", stacklevel=3)
        impl = "eager"
    return IMPLEMENTATIONS[impl]


class RMSNorm(nn.Module):
    """LLaMA RMSNorm over the last dim (HF LlamaRMSNorm semantics), optionally fused with the residual add."""

    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.impl = "fused"

    def forward(self, x, residual=None):
        """x ``[..., dim]`` → rms_norm(x); with residual: ``(rms_norm(x + residual), x + residual)``."""
        return _implementation(self.impl, x.device).rms_norm(x, self.weight, self.eps, residual=residual)


class Attention(nn.Module):
    """Self-attention of one layer: q/k/v projections, RoPE, a KV-cache write, masked causal GQA attention."""

    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=bias)
        self.attention_dropout = config.attention_dropout
        self.impl = "fused"

    def forward(self, x, cos, sin, key_padding_mask, cache, past_len, slot=None):
        """x ``[B, L, hidden]``; cos/sin ``[B, L, D]``; key_padding_mask ``[B, past_len + L]`` or None;
        cache: KVCache or None. With ``slot`` (a fixed-shape decode step, see ``decode_one``): one token
        (L = 1) written at the cache position held in the device tensor ``slot`` [1], attending over the whole
        cache, whose unwritten positions key_padding_mask ``[B, max_len]`` marks as padding.
        Returns ``[B, L, hidden]``."""
        batch, q_len, _ = x.shape
        ops = _implementation(self.impl, x.device)
        q = ops.rope(self.q_proj(x).view(batch, q_len, self.num_heads, self.head_dim), cos, sin)
        k = ops.rope(self.k_proj(x).view(batch, q_len, self.num_kv_heads, self.head_dim), cos, sin)
        v = self.v_proj(x).view(batch, q_len, self.num_kv_heads, self.head_dim)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, L, D] views, no copies
        causal = True
        if slot is not None:
            k, v = cache.write_slot(self.layer_idx, slot, k, v)  # the whole cache [B, Hkv, max_len, D]
            causal, past_len = False, None  # one query: the mask alone hides the positions after it
        elif cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # views [B, Hkv, past_len + L, D] of the cache
        dropout_p = self.attention_dropout if self.training else 0.0   # on the probabilities, like HF's
        out = ops.attention(q, k, v, causal=causal, key_padding_mask=key_padding_mask, past_len=past_len,
                            dropout_p=dropout_p)
        return self.o_proj(out.transpose(1, 2).reshape(batch, q_len, self.num_heads * self.head_dim))


class MLP(nn.Module):
    """SwiGLU feed-forward: ``down(act(gate(x)) * up(x))``, ``[B, L, hidden] -> [B, L, hidden]``."""

    def __init__(self, config):
        super().__init__()
        bias = config.mlp_bias
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=bias)
        self.act = ACTIVATIONS[config.hidden_act]

    def forward(self, x):
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Pre-norm decoder layer; the residual add is fused into the RMSNorm that follows it."""

    def __init__(self, config, layer_idx):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, residual, cos, sin, key_padding_mask, cache=None, past_len=0, slot=None):
        """x: previous sublayer's output ``[B, L, hidden]``; residual: the residual stream before adding x (None
        in the first layer, where x is the embedding). Returns (this layer's MLP output, residual stream)."""
        if residual is None:
            residual, normed = x, self.input_layernorm(x)
        else:
            normed, residual = self.input_layernorm(x, residual)
        x = self.self_attn(normed, cos, sin, key_padding_mask, cache, past_len, slot)
        normed, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(normed), residual


@dataclass
class CausalLMOutput:
    logits: torch.Tensor                 # [B, L, vocab] (L = logits_to_keep when given)
    loss: torch.Tensor | None = None     # mean shifted cross-entropy over labels != -100
    past_key_values: KVCache | None = None


# ---------------------------------------------------------------------------------------------------------- model

class LlamaForCausalLM(nn.Module):
    """HF-compatible LLaMA causal LM on the fused kernels (see the module docstring for the layout)."""

    def __init__(self, config, attn_implementation="fused"):
        super().__init__()
        self.config = config
        pad = config.pad_token_id
        padding_idx = pad if isinstance(pad, int) and -config.vocab_size <= pad < config.vocab_size else None
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=padding_idx)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.generation_config = {}
        self.gradient_checkpointing = False
        self._inv_freq = {}  # device -> float32 [head_dim // 2]; not a buffer, so .to(dtype) cannot round it
        self._static_state = None  # generate(cache_implementation="static")'s cache and recorded step
        self.set_attn_implementation(attn_implementation)

    # ------------------------------------------------------------------------------------------- setup

    def set_attn_implementation(self, attn_implementation):
        """"fused" (Triton kernels) or "eager" (PyTorch references) for attention and RMSNorm."""
        if attn_implementation not in IMPLEMENTATIONS:
            raise ValueError(f"attn_implementation must be one of {list(IMPLEMENTATIONS)}, "
                             f"got {attn_implementation!r}")
        self.attn_implementation = attn_implementation
        for module in self.modules():
            if isinstance(module, (RMSNorm, Attention)):
                module.impl = attn_implementation

    def gradient_checkpointing_enable(self):
        """Recompute each decoder layer in the backward pass (torch.utils.checkpoint, non-reentrant)."""
        self.gradient_checkpointing = True

    def gradient_checkpointing_disable(self):
        self.gradient_checkpointing = False

    def tie_weights(self):
        self.lm_head.weight = self.embed_tokens.weight
        self.config.tie_word_embeddings = True

    @property
    def device(self):
        return self.embed_tokens.weight.device

    @property
    def dtype(self):
        return self.embed_tokens.weight.dtype

    @classmethod
    def from_pretrained(cls, model_dir, dtype="auto", device="cpu", attn_implementation="fused"):
        """Load an HF LLaMA directory (config.json + model.safetensors or sharded safetensors). Built on the meta
        device, then each checkpoint tensor is loaded straight to ``device`` in ``dtype`` and becomes the
        parameter (one copy). ``dtype``: a torch dtype, its name, or "auto" (as HF 5: the checkpoint's dtype).
        ``lm_head`` is tied to ``embed_tokens`` (one Parameter) when the config says so or the checkpoint has no
        ``lm_head.weight``; a checkpoint whose stored lm_head differs from the embedding is loaded untied, with a
        warning, as HF does. Generation defaults: generation_config.json, else config.json's generation keys."""
        config_dict = load_config_dict(model_dir)
        config = LlamaConfig.from_dict(config_dict)
        state_dict = load_safetensors_state_dict(model_dir, device=device, dtype=resolve_dtype(dtype, config_dict))
        if "lm_head.weight" not in state_dict:
            config.tie_word_embeddings = True
        elif config.tie_word_embeddings and not torch.equal(state_dict["lm_head.weight"],
                                                            state_dict["model.embed_tokens.weight"]):
            warnings.warn("the config ties lm_head to embed_tokens but the checkpoint stores a different "
                          "lm_head.weight: loading them untied (as HF does)", stacklevel=2)
            config.tie_word_embeddings = False
        with torch.device("meta"):
            model = cls(config, attn_implementation=attn_implementation)
        aliases = {name: name[len("model."):] for name in state_dict if name.startswith("model.")}
        aliases.update({name: None for name in state_dict if name.endswith("rotary_emb.inv_freq")})
        assign_state_dict(model, state_dict, aliases=aliases)
        model.generation_config = (load_generation_config(model_dir)
                                   or generation_defaults_from_model_config(config_dict))
        return model.eval()

    def save_pretrained(self, model_dir):
        """Write config.json, generation_config.json and model.safetensors in HF's layout (``model.`` prefix,
        a tied lm_head written once, under embed_tokens)."""
        tied = self.lm_head.weight is self.embed_tokens.weight
        self.config.tie_word_embeddings = tied
        state_dict = {(k if k.startswith("lm_head.") else "model." + k): v for k, v in self.state_dict().items()}
        config_dict = self.config.to_dict()
        config_dict["dtype"] = str(self.dtype).removeprefix("torch.")
        generation_config = dict(self.generation_config) or {
            k: getattr(self.config, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")
            if getattr(self.config, k) is not None}
        save_safetensors(state_dict, model_dir, config_dict, generation_config=generation_config,
                         skip=("lm_head.weight",) if tied else ())

    def new_kv_cache(self, batch_size, max_len):
        """An empty KVCache for ``max_len`` positions in the model's dtype and device."""
        c = self.config
        return KVCache(c.num_hidden_layers, batch_size, c.num_key_value_heads, max_len, c.head_dim,
                       dtype=self.dtype, device=self.device)

    def rope(self, position_ids, dtype):
        """cos, sin ``[B, L, D]`` for ``position_ids [B, L]``."""
        device = position_ids.device
        if self.config.rope_parameters["rope_type"] == "dynamic":
            inv_freq = rope_inv_freq(self.config, device, seq_len=int(position_ids.max()) + 1)
        else:
            if device not in self._inv_freq:
                self._inv_freq[device] = rope_inv_freq(self.config, device)
            inv_freq = self._inv_freq[device]
        return rope_cos_sin(inv_freq, position_ids, dtype)

    # ------------------------------------------------------------------------------------------- forward

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, labels=None,
                use_cache=False, logits_to_keep=0, max_cache_len=None):
        """input_ids ``[B, L]``; attention_mask ``[B, past + L]`` (HF's 1 = token, 0 = padding; left padding);
        position_ids ``[B, L]`` (default: from the mask, see ``positions_from_mask``); past_key_values: a KVCache
        that this call appends to (in place; it grows when continued past its size); use_cache without one
        allocates a KVCache of ``max_cache_len`` (default L) positions; labels ``[B, L]`` → mean cross-entropy
        of token t+1 given tokens ≤ t, -100 ignored; logits_to_keep > 0 computes logits of the last that many
        positions only (a 1-D tensor: of those positions).
        Returns CausalLMOutput(logits ``[B, L, vocab]``, loss, past_key_values)."""
        batch, q_len = input_ids.shape
        checkpointing = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        cache = past_key_values
        if cache is None and use_cache and not checkpointing:
            cache = self.new_kv_cache(batch, max_cache_len or q_len)
        past_len = cache.length if cache is not None else 0
        if cache is not None:
            cache.reserve(past_len + q_len)  # a cache continued past its size grows, like HF's dynamic cache
        if attention_mask is not None and tuple(attention_mask.shape) != (batch, past_len + q_len):
            raise ValueError(f"attention_mask must be [B, past + L] = [{batch}, {past_len + q_len}], "
                             f"got {tuple(attention_mask.shape)}")
        if attention_mask is not None and attention_mask.dtype.is_floating_point:
            attention_mask = attention_mask != 0  # HF also takes 1.0 / 0.0 masks; the kernels read bool or int
        if position_ids is None:
            position_ids = positions_from_mask(attention_mask, past_len, q_len, batch, input_ids.device)
        key_padding_mask = attention_mask  # an all-ones mask is correct too; generate() drops it when unpadded
        x, residual = self._layers(input_ids, position_ids, key_padding_mask, cache, past_len, checkpointing)
        if cache is not None:
            cache.advance(q_len)
        if isinstance(logits_to_keep, torch.Tensor):  # HF: a 1-D tensor of the positions to keep
            x, residual = x[:, logits_to_keep], residual[:, logits_to_keep]
        elif logits_to_keep:
            x, residual = x[:, -logits_to_keep:], residual[:, -logits_to_keep:]
        x, _ = self.norm(x, residual)
        logits = self.lm_head(x)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten().to(logits.device),
                                   ignore_index=-100)
        return CausalLMOutput(logits=logits, loss=loss, past_key_values=cache)

    def _layers(self, input_ids, position_ids, key_padding_mask, cache, past_len, checkpointing=False, slot=None):
        """Embedding and decoder layers: (last layer's output, residual stream), before the final norm."""
        x = self.embed_tokens(input_ids)
        cos, sin = self.rope(position_ids, x.dtype)
        residual = None
        for layer in self.layers:
            if checkpointing:
                x, residual = checkpoint(layer, x, residual, cos, sin, key_padding_mask, use_reentrant=False)
            else:
                x, residual = layer(x, residual, cos, sin, key_padding_mask, cache, past_len, slot)
        return x, residual

    def _static_decoding(self, batch, total):
        """The KV cache, fixed input buffers and recorded step (``models/cuda_graph.py``) of
        ``cache_implementation="static"``, kept on the model and reused by the next ``generate`` with the same
        batch size, length, dtype, device, implementation and parameter storage (HF keeps its static cache too;
        ``release_static_cache()`` frees it). On CUDA the step is a replayed CUDA graph, unless the RoPE is
        "dynamic" (its frequencies depend on the host's view of the length)."""
        device = self.device
        key = (batch, total, self.dtype, device, self.attn_implementation,
               tuple(p.data_ptr() for p in self.parameters()))
        state = self._static_state
        if state is None or state["key"] != key:
            self._static_state = None  # the old cache and graph go before the new ones are allocated
            cache = self.new_kv_cache(batch, total)
            inputs = dict(token=torch.zeros(batch, 1, dtype=torch.long, device=device),
                          position=torch.zeros(batch, 1, dtype=torch.long, device=device),
                          slot=torch.zeros(1, dtype=torch.long, device=device),
                          key_mask=torch.zeros(batch, total, dtype=torch.bool, device=device))
            graph_device = device if self.config.rope_parameters["rope_type"] != "dynamic" else None
            step = StepGraph(lambda: self.decode_one(**inputs, cache=cache), graph_device)
            state = dict(key=key, cache=cache, step=step, **inputs)
            self._static_state = state
        state["cache"].reset()
        return state

    def release_static_cache(self):
        """Free the KV cache and recorded decode step kept by ``generate(cache_implementation="static")``."""
        self._static_state = None

    @staticmethod
    def _static_decoder(state, mask, prompt_len):
        """``decode(token [B], positions [B, 1], length) -> logits [B, vocab]`` through the recorded step: the
        inputs are copied into its fixed buffers, then it runs (``decode_one``)."""
        state["key_mask"].copy_(mask != 0)
        state["key_mask"][:, prompt_len:] = False  # positions not generated yet
        cache = state["cache"]

        def decode(token, positions, length):
            state["token"].copy_(token[:, None])
            state["position"].copy_(positions)
            state["slot"].fill_(length - 1)  # the new token is the (length)-th of the sequence
            logits = state["step"]()
            cache.advance(1)
            return logits

        return decode

    def decode_one(self, token, position, slot, key_mask, cache):
        """A decode step whose every launch has the same arguments each time (what a CUDA graph records):
        token, position ``[B, 1]`` and slot ``[1]`` (the cache position to write) are device tensors;
        key_mask ``[B, max_len]`` bool marks the cache positions to attend to (the slot is set here). Writes the
        token's K/V into the cache and returns the next-token logits ``[B, vocab]``; cache.length is not moved."""
        key_mask.index_fill_(1, slot, True)
        x, residual = self._layers(token, position, key_mask, cache, None, slot=slot)
        x, _ = self.norm(x, residual)
        return self.lm_head(x)[:, -1]

    # ------------------------------------------------------------------------------------------- generate

    @torch.no_grad()
    def generate(self, input_ids, attention_mask=None, max_new_tokens=None, min_new_tokens=None, do_sample=None,
                 temperature=None, top_k=None, top_p=None, generator=None, seed=None, eos_token_id=None,
                 pad_token_id=None, max_length=None, min_length=None, cache_implementation=None, **other_settings):
        """Greedy or sampled continuation like HF's ``generate``: returns ``[B, P + N]`` (prompt, then new
        tokens; a row that produced eos continues with pad; stops early once every row has finished).

        Arguments left None come from generation_config.json (else config.json's generation keys), else from
        HF's defaults (20 new tokens, do_sample False, temperature 1, top_k 50, top_p 1). ``max_length`` and
        ``min_length`` count the prompt, as in HF. top_k=0 disables top-k. ``generator`` (a torch.Generator) or
        ``seed`` (an int) makes sampling reproducible; otherwise the global RNG is used. Other HF settings are
        accepted at their "off" value (num_beams=1, repetition_penalty=1.0, use_cache=True, ...); another value,
        passed or in the generation config, raises NotImplementedError rather than giving different tokens.
        The prompt is prefilled into a KVCache of P + max_new_tokens positions, then one token per step.
        ``cache_implementation="static"`` (HF's name for its compiled path): every decode step has the same
        launch arguments (it attends over the whole cache, the mask hiding what is not written yet), so on CUDA
        it is recorded once as a CUDA graph and replayed (``models/cuda_graph.py``); same tokens."""
        batch, prompt_len = input_ids.shape
        if cache_implementation not in (None, "dynamic", "static"):
            raise ValueError(f"cache_implementation must be None, 'dynamic' or 'static', got {cache_implementation!r}")
        unknown = sorted(set(other_settings) - set(UNSUPPORTED_OFF) - set(IGNORED_SETTINGS))
        if unknown:
            raise TypeError(f"generate() got unexpected arguments {unknown}")
        args = resolve_generation_args(self.generation_config, self.config.eos_token_id, self.config.pad_token_id,
                                       prompt_len, self.config.max_position_embeddings,
                                       max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
                                       max_length=max_length, min_length=min_length, do_sample=do_sample,
                                       temperature=temperature, top_k=top_k, top_p=top_p,
                                       eos_token_id=eos_token_id, pad_token_id=pad_token_id, **other_settings)
        new_tokens, eos_ids, pad = args["max_new_tokens"], args["eos_token_ids"], args["pad_token_id"]
        generator = make_generator(seed if generator is None else generator, input_ids.device)
        if attention_mask is None:  # HF: infer the mask from pad tokens unless pad is also an eos token
            pad_given = pad_token_id if pad_token_id is not None else self.generation_config.get(
                "pad_token_id", self.config.pad_token_id)
            if pad_given is not None and pad_given not in eos_ids and bool((input_ids == pad_given).any()):
                attention_mask = (input_ids != pad_given).long()
            else:
                attention_mask = torch.ones_like(input_ids)
        total = prompt_len + new_tokens
        mask = torch.ones(batch, total, dtype=attention_mask.dtype, device=input_ids.device)
        mask[:, :prompt_len] = attention_mask
        tokens = torch.full((batch, total), pad, dtype=input_ids.dtype, device=input_ids.device)
        tokens[:, :prompt_len] = input_ids
        eos = torch.tensor(eos_ids, dtype=input_ids.dtype, device=input_ids.device)
        unfinished = torch.ones(batch, dtype=torch.bool, device=input_ids.device)

        static = self._static_decoding(batch, total) if cache_implementation == "static" else None
        cache = static["cache"] if static else self.new_kv_cache(batch, total)
        positions = positions_from_mask(attention_mask, 0, prompt_len, batch, input_ids.device)
        # one host sync here instead of one per step: without padding the kernels need no mask at all
        padded = bool((attention_mask == 0).any())
        step_mask = (lambda n: mask[:, :n]) if padded else (lambda n: None)
        out = self(input_ids, attention_mask=step_mask(prompt_len), position_ids=positions, past_key_values=cache,
                   logits_to_keep=1)
        if static:
            decode = self._static_decoder(static, mask, prompt_len)
        else:
            def decode(token, positions, length):
                return self(token[:, None], attention_mask=step_mask(length), position_ids=positions,
                            past_key_values=cache, logits_to_keep=1).logits[:, -1]
        logits = out.logits[:, -1]
        # the stop test reads the GPU every STOP_CHECK_INTERVAL steps only (a host sync stalls the launch
        # queue); steps run past the moment every row finished only produce pad and are cut off again
        finished_at = torch.full((batch,), total, dtype=torch.long, device=input_ids.device)
        length = prompt_len
        for step in range(new_tokens):
            logits = apply_logits_processing(logits, num_generated=step,
                                             min_new_tokens=args["min_new_tokens"], eos_token_ids=eos_ids,
                                             do_sample=args["do_sample"], temperature=args["temperature"],
                                             top_k=args["top_k"], top_p=args["top_p"])
            next_token = pick_next_token(logits, args["do_sample"], generator)
            next_token = torch.where(unfinished, next_token, torch.full_like(next_token, pad))
            tokens[:, length] = next_token
            length += 1
            if eos.numel():
                just_finished = unfinished & torch.isin(next_token, eos)
                finished_at = torch.where(just_finished, torch.full_like(finished_at, length), finished_at)
                unfinished &= ~just_finished
            if length == total:
                break
            if (step + 1) % STOP_CHECK_INTERVAL == 0 and not bool(unfinished.any()):
                break
            positions = positions[:, -1:] + 1
            logits = decode(next_token, positions, length)
        if eos.numel() and not bool(unfinished.any()):
            length = int(finished_at.max())  # HF stops at the step where the last row finished
        return tokens[:, :length]

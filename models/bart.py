"""BART for conditional generation on the fused attention kernel, loading and saving HF checkpoints.

Layout and parameter names follow HF's ``BartForConditionalGeneration`` so that a checkpoint maps 1:1:
``model.shared`` (ONE token embedding Parameter, also used as ``model.encoder.embed_tokens``,
``model.decoder.embed_tokens`` and ``lm_head``), ``final_logits_bias``, learned positions with offset 2,
``layernorm_embedding``, post-LN encoder/decoder layers.

Shapes: B batch (sources), N decoder rows (B * num_beams while generating), Ls source length, Lt target length,
d = d_model, H heads, D = d / H head dim, V vocab.

Attention: q/k/v are transposed views of the ``[B, L, d]`` projections (no copies). Encoder self-attention is
bidirectional with the source padding mask; decoder self-attention is causal and, while generating, reads a
preallocated :class:`KVCache`; cross-attention K/V are projected once per source sentence and read by every beam
through ``kv_batch_index`` (never expanded, never reordered: beam search reorders the self-attention cache only).
"""
import functools
import math
import warnings
from dataclasses import dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import nn

from fusedformers.models import beam_search
from fusedformers.models.base import ModelBase
from fusedformers.models.checkpoint import (
    assign_state_dict,
    check_config_values,
    check_layer_count,
    refuse_unknown_fields,
    save_safetensors,
)
from fusedformers.models.cuda_graph import StepGraph
from fusedformers.models.generation import (
    BEAM_SEARCH,
    INITIAL_ROOM,
    STOP_CHECK_INTERVAL,
    check_prompt,
    decoder_prompt,
    generation_defaults_from_model_config,
    resolve_settings,
    sample_loop,
)
from fusedformers.models.kv_cache import KVCache
from fusedformers.models.layers import ACTIVATIONS, CheckpointedLayer, LayerNorm, PackedLinear, PackedProjections
from fusedformers.models.ops import OPS, check_implementation, ops_for

POSITION_OFFSET = 2  # BART's learned positions are stored shifted by 2 (a fairseq legacy)
# BART's own bookkeeping fields in HF and fairseq-converted config.json files (see checkpoint.IGNORED_CONFIG_KEYS
# for those of every model): classification-head and legacy training settings, the extra_pos_embeddings and
# num_hidden_layers aliases (checked in from_dict)
BART_IGNORED_KEYS = ("classifier_dropout", "classif_dropout", "output_past", "extra_pos_embeddings",
                     "num_hidden_layers")
# config.json fields that from_pretrained requires (the others default to HF's BartConfig defaults)
ARCHITECTURE_FIELDS = ("vocab_size", "d_model", "encoder_layers", "decoder_layers", "encoder_attention_heads",
                       "decoder_attention_heads", "encoder_ffn_dim", "decoder_ffn_dim", "max_position_embeddings")


# ----------------------------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class BartConfig:
    """The fields of HF's config.json that the model uses (defaults: HF's ``BartConfig`` defaults).

    ``extra`` keeps config.json's bookkeeping fields so that :meth:`to_dict` writes them back unchanged; any other
    field is refused (``checkpoint.refuse_unknown_fields``, the rule LLaMA follows too).
    """
    vocab_size: int = 50265
    d_model: int = 1024
    encoder_layers: int = 12
    decoder_layers: int = 12
    encoder_attention_heads: int = 16
    decoder_attention_heads: int = 16
    encoder_ffn_dim: int = 4096
    decoder_ffn_dim: int = 4096
    max_position_embeddings: int = 1024
    scale_embedding: bool = False
    activation_function: str = "gelu"
    dropout: float = 0.1
    attention_dropout: float = 0.0
    activation_dropout: float = 0.0
    encoder_layerdrop: float = 0.0
    decoder_layerdrop: float = 0.0
    init_std: float = 0.02
    pad_token_id: int | None = 1
    bos_token_id: int | None = 0
    eos_token_id: int | list | None = 2
    decoder_start_token_id: int | None = 2
    forced_bos_token_id: int | None = None
    forced_eos_token_id: int | list | None = 2
    extra: dict = field(default_factory=dict)
    # the registered ops the model runs (fusedformers.models.ops.OPS), read at call time; not written to config.json
    attn_implementation: str = "fused"

    def __post_init__(self):
        check_config_values(vars(self), positive_ints=("vocab_size", "d_model", "encoder_attention_heads",
                                                       "decoder_attention_heads", "encoder_ffn_dim",
                                                       "decoder_ffn_dim", "max_position_embeddings"),
                            nonnegative_ints=("encoder_layers", "decoder_layers"),
                            probabilities=("dropout", "attention_dropout", "activation_dropout", "encoder_layerdrop",
                                           "decoder_layerdrop"),
                            bools=("scale_embedding",),
                            token_ids=("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id",
                                       "forced_bos_token_id", "forced_eos_token_id"))
        if not isinstance(self.activation_function, str) or self.activation_function not in ACTIVATIONS:
            raise ValueError(f"unsupported activation_function {self.activation_function!r}; "
                             f"supported: {sorted(ACTIVATIONS)}")
        for side in ("encoder", "decoder"):
            heads = getattr(self, f"{side}_attention_heads")
            if self.d_model % heads:
                raise ValueError(f"d_model ({self.d_model}) must be divisible by {side}_attention_heads ({heads})")

    @classmethod
    def from_dict(cls, config_dict):
        """Build from an HF config.json dict; rejects other model types, the pre-LN / untied variants and fields it
        does not know."""
        model_type = config_dict.get("model_type")
        if model_type != "bart":
            raise ValueError(f"config.json has model_type {model_type!r}; fusedformers.models.bart loads only 'bart'")
        unsupported = {
            "normalize_before": (True, "pre-LayerNorm layers (normalize_before=true, mBART-style)"),
            "add_final_layer_norm": (True, "a final encoder/decoder LayerNorm (add_final_layer_norm=true)"),
            "static_position_embeddings": (True, "sinusoidal positions (static_position_embeddings=true)"),
            "normalize_embedding": (False, "no embedding LayerNorm (normalize_embedding=false)"),
            "add_bias_logits": (True, "add_bias_logits=true"),
            "force_bos_token_to_be_generated": (True, "the legacy force_bos_token_to_be_generated=true (set "
                                                      "generation's forced_bos_token_id instead)"),
            "tie_word_embeddings": (False, "an lm_head untied from the token embedding (tie_word_embeddings=false)"),
        }
        check_config_values(config_dict, bools=tuple(unsupported))  # "false" would pass as a true value
        # the architecture: HF's defaults (bart-large's) would silently build another model (e.g. 16 heads of 4)
        absent = [name for name in ARCHITECTURE_FIELDS if config_dict.get(name) is None]
        if absent:
            raise ValueError(f"config.json lacks required fields {absent}")
        for key, (bad_value, what) in unsupported.items():
            if config_dict.get(key, not bad_value) == bad_value:
                raise ValueError(f"this BART variant is not supported: {what}; only the post-LN BART of "
                                 f"HF's BartForConditionalGeneration with tied embeddings is implemented")
        if config_dict.get("extra_pos_embeddings", POSITION_OFFSET) != POSITION_OFFSET:
            raise ValueError(f"config.json's extra_pos_embeddings must be {POSITION_OFFSET} (BART's learned position "
                             f"offset), got {config_dict['extra_pos_embeddings']!r}")
        if "num_hidden_layers" in config_dict and config_dict["num_hidden_layers"] != config_dict["encoder_layers"]:
            raise ValueError(f"config.json's num_hidden_layers ({config_dict['num_hidden_layers']!r}) is HF's alias of "
                             f"encoder_layers ({config_dict.get('encoder_layers')!r}) and must equal it")
        names = {f.name for f in fields(cls)} - {"extra", "attn_implementation"}
        known = {k: v for k, v in config_dict.items() if k in names}
        # the variant switches checked above are understood too (at their supported values), and kept
        extra = refuse_unknown_fields(config_dict, names | {"model_type"}, "BartConfig",
                                      also_ignored=(*unsupported, *BART_IGNORED_KEYS))
        return cls(**known, extra=extra)

    def to_dict(self):
        """config.json contents (HF-loadable)."""
        out = dict(self.extra)
        out.update({f.name: getattr(self, f.name) for f in fields(self)
                    if f.name not in ("extra", "attn_implementation")})
        out["model_type"] = "bart"
        out.setdefault("architectures", ["BartForConditionalGeneration"])
        out.setdefault("is_encoder_decoder", True)
        return out


@dataclass
class Seq2SeqLMOutput:
    """logits ``[B, Lt, V]``; loss (mean cross-entropy over labels != -100) or None;
    encoder_last_hidden_state ``[B, Ls, d]``."""
    logits: torch.Tensor
    loss: torch.Tensor | None = None
    encoder_last_hidden_state: torch.Tensor | None = None


def shift_tokens_right(input_ids, pad_token_id, decoder_start_token_id):
    """Decoder inputs from labels ``[B, Lt]``: prepend decoder_start, drop the last token, -100 -> pad."""
    if pad_token_id is None:
        raise ValueError("config.pad_token_id must be set to shift labels into decoder_input_ids")
    if decoder_start_token_id is None:
        raise ValueError("config.decoder_start_token_id must be set to shift labels into decoder_input_ids")
    shifted = input_ids.new_empty(input_ids.shape)
    shifted[:, 1:] = input_ids[:, :-1]
    shifted[:, 0] = decoder_start_token_id
    return shifted.masked_fill_(shifted == -100, pad_token_id)


# ----------------------------------------------------------------------------------------------------------------
# Attention
# ----------------------------------------------------------------------------------------------------------------
class BartAttention(PackedProjections):
    """Multi-head attention: projections around the fused (or eager) attention kernel. Self-attention packs HF's
    q/k/v projections into one matmul (``qkv_proj``), cross-attention its k/v (``kv_proj``: projected once per
    source) and keeps ``q_proj``; ``state_dict`` shows HF's names (``q_proj.weight``, ...,
    ``fusedformers.models.layers.PackedProjections``)."""

    def __init__(self, config, num_heads, cross=False):
        super().__init__()
        self.config = config
        d_model = config.d_model
        self.num_heads = num_heads
        self.head_dim = d_model // num_heads
        self.scaling = self.head_dim ** -0.5
        if cross:
            self.q_proj = nn.Linear(d_model, d_model)
            self.kv_proj = PackedLinear(d_model, (("k_proj", d_model), ("v_proj", d_model)))
        else:
            self.qkv_proj = PackedLinear(d_model, (("q_proj", d_model), ("k_proj", d_model), ("v_proj", d_model)))
        self.out_proj = nn.Linear(d_model, d_model)

    def _heads(self, packed, count):
        """``[B, L, count * d]`` -> ``count`` tensors ``[B, H, L, D]`` (views)."""
        parts = packed.unflatten(-1, (count, self.num_heads, self.head_dim))
        return [parts[:, :, i].transpose(1, 2) for i in range(count)]

    def project_qkv(self, hidden_states):
        """Self-attention: ``[B, L, d]`` -> q, k, v ``[B, H, L, D]`` (views of one matmul's output)."""
        return self._heads(self.qkv_proj(hidden_states), 3)

    def project_kv(self, source):
        """Cross-attention: source ``[B, L, d]`` -> k, v ``[B, H, L, D]`` (views of one matmul's output)."""
        return self._heads(self.kv_proj(source), 2)

    def forward(self, query, key, value, *, causal, key_padding_mask=None, past_len=None, kv_batch_index=None):
        """query: q ``[N, H, Lq, D]`` (self-attention, from :meth:`project_qkv`) or the hidden states
        ``[N, Lq, d]`` (cross-attention: projected here); key/value ``[N or Bkv, H, Lk, D]`` -> ``[N, Lq, d]``."""
        q = query if query.dim() == 4 else self._heads(self.q_proj(query), 1)[0]
        attention = ops_for(self.config.attn_implementation, q.device).attention
        dropout_p = self.config.attention_dropout if self.training else 0.0
        # the eager path scales q before the matmul, as HF's BART rounds it
        out = attention(q, key, value, causal=causal, key_padding_mask=key_padding_mask, past_len=past_len,
                        sm_scale=self.scaling, kv_batch_index=kv_batch_index, dropout_p=dropout_p,
                        scale_before_matmul=True)
        return self.out_proj(out.transpose(1, 2).flatten(2))


# ----------------------------------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------------------------------
class _BartLayer(CheckpointedLayer):
    """Shared by the encoder and decoder layers: the post-LN feed-forward block."""

    def _init_ffn(self, config, ffn_dim):
        d = config.d_model
        self.fc1 = nn.Linear(d, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, d)
        self.final_layer_norm = LayerNorm(config, d)
        self.activation = ACTIVATIONS[config.activation_function]
        self.dropout, self.activation_dropout = config.dropout, config.activation_dropout

    def _residual_ffn(self, x):
        """x = LN(x + fc2(act(fc1(x)))) (the residual add fused into the LayerNorm)."""
        h = F.dropout(self.activation(self.fc1(x)), self.activation_dropout, self.training)
        return self.final_layer_norm(F.dropout(self.fc2(h), self.dropout, self.training), residual=x)


class BartEncoderLayer(_BartLayer):
    """Post-LN: x = LN(x + SelfAttn(x)); x = LN(x + FFN(x))."""

    def __init__(self, config):
        super().__init__()
        self.self_attn = BartAttention(config, config.encoder_attention_heads)
        self.self_attn_layer_norm = LayerNorm(config, config.d_model)
        self._init_ffn(config, config.encoder_ffn_dim)

    def forward(self, hidden_states, attention_mask=None):
        """hidden_states ``[B, Ls, d]``, attention_mask ``[B, Ls]`` bool (True = token) -> ``[B, Ls, d]``."""
        q, k, v = self.self_attn.project_qkv(hidden_states)
        attn = self.self_attn(q, k, v, causal=False, key_padding_mask=attention_mask)
        hidden_states = self.self_attn_layer_norm(F.dropout(attn, self.dropout, self.training), residual=hidden_states)
        hidden_states = self._residual_ffn(hidden_states)
        if hidden_states.dtype == torch.float16 and not torch.isfinite(hidden_states).all():
            clamp = torch.finfo(torch.float16).max - 1000  # as HF: keep fp16 activations finite
            hidden_states = hidden_states.clamp(-clamp, clamp)
        return hidden_states


class BartDecoderLayer(_BartLayer):
    """Post-LN: causal self-attention, cross-attention over the encoder output, FFN."""

    def __init__(self, config, layer_idx):
        super().__init__()
        d, heads = config.d_model, config.decoder_attention_heads
        self.layer_idx = layer_idx
        self.self_attn = BartAttention(config, heads)
        self.self_attn_layer_norm = LayerNorm(config, d)
        self.encoder_attn = BartAttention(config, heads, cross=True)
        self.encoder_attn_layer_norm = LayerNorm(config, d)
        self._init_ffn(config, config.decoder_ffn_dim)

    def forward(self, hidden_states, encoder_hidden_states=None, encoder_attention_mask=None, attention_mask=None,
                *, cache=None, cache_position=None, past_len=0, cross_kv=None, kv_batch_index=None):
        """hidden_states ``[N, Lt, d]`` -> ``[N, Lt, d]``.

        encoder_hidden_states ``[B, Ls, d]`` (cross K/V projected here) or cross_kv = (k, v) ``[B, H, Ls, D]``
        precomputed once per source; kv_batch_index ``[N]`` maps decoder rows to source rows (None: N == B).
        encoder_attention_mask ``[N, Ls]``; attention_mask ``[N, Lt]`` decoder padding (training only).
        cache: the self-attention KVCache (generation): the new K/V are written at the device positions
        ``cache_position [Lt]``, after the ``past_len`` positions already there. ``past_len=None``: a fixed-shape
        step (one token per row, see ``BartDecoder.forward``): the whole cache is attended, attention_mask
        ``[N, max_len]`` marking the written positions.
        """
        q, k, v = self.self_attn.project_qkv(hidden_states)
        if cache is not None:
            kv_len = None if past_len is None else past_len + hidden_states.shape[1]
            k, v = cache.update(self.layer_idx, k, v, cache_position, kv_len)
        # a fixed-shape step has one query row: the mask alone hides the positions after it
        attn = self.self_attn(q, k, v, causal=past_len is not None, key_padding_mask=attention_mask,
                              past_len=past_len)
        hidden_states = self.self_attn_layer_norm(F.dropout(attn, self.dropout, self.training), residual=hidden_states)

        if cross_kv is None:
            cross_kv = self.encoder_attn.project_kv(encoder_hidden_states)
        attn = self.encoder_attn(hidden_states, *cross_kv, causal=False, key_padding_mask=encoder_attention_mask,
                                 kv_batch_index=kv_batch_index)
        hidden_states = self.encoder_attn_layer_norm(F.dropout(attn, self.dropout, self.training),
                                                     residual=hidden_states)
        return self._residual_ffn(hidden_states)


class BartLearnedPositionalEmbedding(nn.Embedding):
    """Positions ``[past_len, past_len + L)`` read from rows shifted by 2."""

    def __init__(self, max_positions, d_model):
        super().__init__(max_positions + POSITION_OFFSET, d_model)
        self.max_positions = max_positions

    def forward(self, seq_len, past_len=0):
        """-> ``[L, d]``."""
        if past_len + seq_len > self.max_positions:
            raise ValueError(f"sequence of {past_len + seq_len} positions exceeds max_position_embeddings "
                             f"({self.max_positions})")
        positions = torch.arange(past_len, past_len + seq_len, device=self.weight.device) + POSITION_OFFSET
        return F.embedding(positions, self.weight)


class BartScaledEmbedding(nn.Embedding):
    """Token embedding times embed_scale (sqrt(d_model) with scale_embedding); the pad row gets no gradient."""

    def __init__(self, vocab_size, d_model, padding_idx, embed_scale):
        super().__init__(vocab_size, d_model, padding_idx=padding_idx)
        self.embed_scale = embed_scale

    def forward(self, input_ids):
        embedded = super().forward(input_ids)
        return embedded * self.embed_scale if self.embed_scale != 1.0 else embedded  # x * 1.0 is x: no launch


def _expand_mask_check(mask, ids, what):
    if mask is None:
        return None
    if mask.shape != ids.shape:
        raise ValueError(f"{what} must have the shape of its ids {tuple(ids.shape)}, got {tuple(mask.shape)}")
    return mask if mask.dtype == torch.bool else mask != 0


class _Stack(nn.Module):
    """Shared pieces of the encoder and the decoder: embeddings and LayerDrop (checkpointing is in the layers)."""

    def __init__(self, config, shared, layers, layerdrop):
        super().__init__()
        self.embed_tokens = shared
        self.embed_positions = BartLearnedPositionalEmbedding(config.max_position_embeddings, config.d_model)
        self.layernorm_embedding = LayerNorm(config, config.d_model)
        self.layers = nn.ModuleList(layers)
        self.dropout, self.layerdrop = config.dropout, layerdrop

    def _embed(self, input_ids, past_len=0, position=None):
        """LN(tokens + positions), the add fused into the LayerNorm; ``position``: a device ``[1]`` tensor, the
        position of the one token per row of a fixed-shape step (instead of ``past_len``, a host int). The
        positions ``[L, d]`` are the residual, broadcast over the batch: a zero row stride at L = 1 (a decode
        step, no copy); a longer one is expanded by the kernel's wrapper (one copy in place of the add)."""
        if position is None:
            positions = self.embed_positions(input_ids.shape[1], past_len)
        else:  # a view of the table from row POSITION_OFFSET on: no offset add
            positions = F.embedding(position, self.embed_positions.weight[POSITION_OFFSET:])
        tokens = self.embed_tokens(input_ids)
        return F.dropout(self.layernorm_embedding(tokens, residual=positions.expand_as(tokens)), self.dropout,
                         self.training)

    def _skip_layer(self):
        """LayerDrop. As HF, one draw per layer in training even when layerdrop is 0, so that a seeded run
        consumes the RNG like HF's and gets the same dropout masks."""
        return self.training and bool(torch.rand([]) < self.layerdrop)


class BartEncoder(_Stack):
    """Token + learned positions (offset 2) -> layernorm_embedding -> post-LN self-attention layers."""

    def __init__(self, config, shared):
        super().__init__(config, shared, [BartEncoderLayer(config) for _ in range(config.encoder_layers)],
                         config.encoder_layerdrop)

    def forward(self, input_ids, attention_mask=None):
        """input_ids ``[B, Ls]``, attention_mask ``[B, Ls]`` -> last hidden state ``[B, Ls, d]``."""
        attention_mask = _expand_mask_check(attention_mask, input_ids, "attention_mask")
        hidden = self._embed(input_ids)
        for layer in self.layers:
            if not self._skip_layer():
                hidden = layer(hidden, attention_mask)
        return hidden


class BartDecoder(_Stack):
    """Causal self-attention with a KV cache, cross-attention over cached encoder K/V, post-LN layers."""

    def __init__(self, config, shared):
        super().__init__(config, shared, [BartDecoderLayer(config, i) for i in range(config.decoder_layers)],
                         config.decoder_layerdrop)

    def forward(self, input_ids, encoder_hidden_states=None, encoder_attention_mask=None, attention_mask=None, *,
                cache=None, cross_kv=None, kv_batch_index=None, position=None):
        """input_ids ``[N, Lt]`` -> ``[N, Lt, d]``. Training/scoring: encoder_hidden_states ``[N, Ls, d]``.
        Generation: cache (advanced by Lt here), cross_kv (one (k, v) per layer) and kv_batch_index.
        ``position`` (a device ``[1]`` tensor): a fixed-shape step, one token per row at that position (no
        host value read, so it can be recorded as a CUDA graph): its K/V are written there, the whole cache is
        attended with attention_mask ``[N, max_len]`` (True: written), and cache.length is not moved."""
        if encoder_attention_mask is not None and encoder_attention_mask.dtype != torch.bool:
            encoder_attention_mask = encoder_attention_mask != 0
        if position is not None:
            past_len, cache_position = None, position
            hidden = self._embed(input_ids, position=position)
        else:
            attention_mask = _expand_mask_check(attention_mask, input_ids, "decoder_attention_mask")
            past_len = cache.length if cache is not None else 0
            cache_position = None
            if cache is not None:
                cache.reserve(past_len + input_ids.shape[1])  # a cache continued past its size grows
                cache_position = cache.next_positions(input_ids.shape[1])
            hidden = self._embed(input_ids, past_len)
        for layer in self.layers:
            if self._skip_layer():
                continue
            layer_kv = cross_kv[layer.layer_idx] if cross_kv is not None else None
            hidden = layer(hidden, encoder_hidden_states, encoder_attention_mask, attention_mask, cache=cache,
                           cache_position=cache_position, past_len=past_len, cross_kv=layer_kv,
                           kv_batch_index=kv_batch_index)
        if cache is not None and position is None:
            cache.advance(input_ids.shape[1])
        return hidden


class BartModel(nn.Module):
    """Encoder and decoder sharing one token embedding Parameter (``shared``)."""

    def __init__(self, config):
        super().__init__()
        embed_scale = math.sqrt(config.d_model) if config.scale_embedding else 1.0
        pad = config.pad_token_id  # one outside the vocabulary marks no row (as in LLaMA; nn.Embedding would assert)
        padding_idx = pad if pad is not None and -config.vocab_size <= pad < config.vocab_size else None
        self.shared = BartScaledEmbedding(config.vocab_size, config.d_model, padding_idx, embed_scale)
        self.encoder = BartEncoder(config, self.shared)
        self.decoder = BartDecoder(config, self.shared)


# ----------------------------------------------------------------------------------------------------------------
# Conditional generation model
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class DecodingState:
    """What the decoder reads while generating N = B * num_beams rows for B sources.

    self_cache: KVCache ``[N, H, max_len, D]`` per layer (the only thing beam search reorders);
    cross_kv: per layer (k, v) ``[B, H, Ls, D]``, projected once per source;
    kv_batch_index: int32 ``[N]`` decoder row -> source row (None when N == B);
    cross_mask: ``[N, Ls]`` bool source padding per decoder row (None: no padding).
    """
    self_cache: KVCache
    cross_kv: list
    kv_batch_index: torch.Tensor | None
    cross_mask: torch.Tensor | None


SHARED_EMBEDDING_NAMES = ("model.shared.weight", "model.encoder.embed_tokens.weight",
                          "model.decoder.embed_tokens.weight", "lm_head.weight")


def _check_tied_aliases_agree(state_dict, source):
    """The shared embedding may be stored under several names; they must hold the same values (HF would leave
    a differing lm_head untied, which this model, with one shared Parameter, cannot represent)."""
    present = [name for name in SHARED_EMBEDDING_NAMES if name in state_dict]
    for name in present[1:]:
        if not torch.equal(state_dict[name], state_dict[present[0]]):
            raise ValueError(f"{source} stores {name} with values different from {present[0]}: this model ties "
                             f"the token embedding, the encoder/decoder embeddings and the LM head (one tensor)")


class BartForConditionalGeneration(ModelBase):
    """HF-compatible BART with an LM head tied to the shared token embedding."""

    def __init__(self, config, generation_config=None):
        super().__init__()
        check_implementation(config.attn_implementation)
        self.config = config
        self.generation_config = dict(generation_config) if generation_config is not None \
            else generation_defaults_from_model_config(config.to_dict())
        self.model = BartModel(config)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.lm_head.weight = self.model.shared.weight  # one Parameter: encoder, decoder and LM head
        self.register_buffer("final_logits_bias", torch.zeros(1, config.vocab_size))
        if not any(t.is_meta for t in self.parameters()):
            self._init_weights()

    # -- construction / IO --------------------------------------------------------------------------------------
    def _init_weights(self):
        """HF's initialisation: normal(0, init_std) weights, zero biases, zero pad embedding, unit LayerNorms."""
        std = self.config.init_std
        with torch.no_grad():
            for module in self.modules():
                if isinstance(module, nn.Linear) and module is not self.lm_head:
                    module.weight.normal_(0.0, std)
                    if module.bias is not None:
                        module.bias.zero_()
                elif isinstance(module, nn.Embedding):
                    module.weight.normal_(0.0, std)
                    if module.padding_idx is not None:
                        module.weight[module.padding_idx].zero_()
                elif isinstance(module, LayerNorm):
                    module.weight.fill_(1.0)
                    module.bias.zero_()
            self.final_logits_bias.zero_()

    @classmethod
    def from_pretrained(cls, model_dir, dtype="auto", device="cpu", attn_implementation="fused"):
        """Load an HF BART checkpoint directory (config.json, [generation_config.json], safetensors weights).

        ``dtype``: a torch dtype, its name, or "auto" (as HF 5: the checkpoint's dtype). The token embedding may
        be stored as ``model.shared.weight`` or only under one of its tied aliases
        (``model.encoder.embed_tokens.weight``, ``model.decoder.embed_tokens.weight``, ``lm_head.weight``);
        aliases stored with different values raise ValueError (this model always ties them). Missing or
        unexpected tensors raise KeyError listing them all.
        """
        config, _, state_dict, generation_config, names = cls.load_pretrained_parts(
            BartConfig, model_dir, dtype, device, attn_implementation)
        for side in ("encoder", "decoder"):
            check_layer_count(state_dict, f"model.{side}.layers", getattr(config, f"{side}_layers"),
                              f"{side}_layers", names["source"])
        _check_tied_aliases_agree(state_dict, names["source"])
        if "final_logits_bias" not in state_dict:  # optional in HF checkpoints: zeros
            # the checkpoint's float dtype (float32 for one with no float tensor: strict loading reports them)
            dtype = next((t.dtype for t in state_dict.values() if t.is_floating_point()), torch.float32)
            state_dict["final_logits_bias"] = torch.zeros(1, config.vocab_size, device=device, dtype=dtype)
        with torch.device("meta"):
            model = cls(config, generation_config)
        aliases = {"model.encoder.version": None, "model.decoder.version": None}
        assign_state_dict(model, state_dict, aliases=aliases, **names)
        return model.eval()

    def save_pretrained(self, model_dir):
        """Write an HF-loadable directory: config.json, generation_config.json, model.safetensors (the shared
        embedding once, as ``model.shared.weight``)."""
        config_dict = self.config.to_dict()
        config_dict["dtype"] = str(self.final_logits_bias.dtype).removeprefix("torch.")
        tied = ("model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight", "lm_head.weight")
        save_safetensors(self.state_dict(), model_dir, config_dict, generation_config=self.generation_config or None,
                         skip=tied)

    @property
    def device(self):
        return self.final_logits_bias.device

    @property
    def dtype(self):
        return self.final_logits_bias.dtype

    # -- forward ----------------------------------------------------------------------------------------------------
    def logits(self, hidden_states):
        """``[..., d]`` -> ``[..., V]``."""
        return self.lm_head(hidden_states) + self.final_logits_bias.to(hidden_states.dtype)

    def forward(self, input_ids=None, attention_mask=None, decoder_input_ids=None, decoder_attention_mask=None,
                labels=None, encoder_outputs=None):
        """input_ids/attention_mask ``[B, Ls]``; decoder_input_ids/decoder_attention_mask ``[B, Lt]`` (default:
        labels shifted right, else input_ids shifted right); labels ``[B, Lt]`` with -100 ignored;
        encoder_outputs: a ``[B, Ls, d]`` tensor, a tuple whose first item is one, or an object with
        ``.last_hidden_state``. Returns :class:`Seq2SeqLMOutput`."""
        if decoder_input_ids is None:
            source = labels if labels is not None else input_ids
            if source is None:
                raise ValueError("pass decoder_input_ids, labels or input_ids")
            decoder_input_ids = shift_tokens_right(source, self.config.pad_token_id,
                                                   self.config.decoder_start_token_id)
        if encoder_outputs is None:
            if input_ids is None:
                raise ValueError("pass input_ids or encoder_outputs")
            encoder_hidden = self.model.encoder(input_ids, attention_mask)
        elif isinstance(encoder_outputs, torch.Tensor):
            encoder_hidden = encoder_outputs
        elif hasattr(encoder_outputs, "last_hidden_state"):
            encoder_hidden = encoder_outputs.last_hidden_state
        else:
            encoder_hidden = encoder_outputs[0]
        hidden = self.model.decoder(decoder_input_ids, encoder_hidden, attention_mask, decoder_attention_mask)
        logits = self.logits(hidden)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1).to(logits.device),
                                   ignore_index=-100)
        return Seq2SeqLMOutput(logits=logits, loss=loss, encoder_last_hidden_state=encoder_hidden)

    # -- generation -------------------------------------------------------------------------------------------------
    def prepare_decoding(self, input_ids, attention_mask, num_beams, max_len):
        """Run the encoder on the B sources and project every layer's cross-attention K/V once.

        Returns a :class:`DecodingState` for N = B * num_beams decoder rows with a self-attention cache of
        ``max_len`` positions."""
        batch = input_ids.shape[0]
        encoder_hidden = self.model.encoder(input_ids, attention_mask)
        decoder = self.model.decoder
        cross_kv = [layer.encoder_attn.project_kv(encoder_hidden) for layer in decoder.layers]
        kv_batch_index = cross_mask = None
        if num_beams > 1:
            kv_batch_index = torch.arange(batch, device=input_ids.device, dtype=torch.int32)
            kv_batch_index = kv_batch_index.repeat_interleave(num_beams)
        if attention_mask is not None:
            cross_mask = (attention_mask != 0).repeat_interleave(num_beams, dim=0)
        return DecodingState(self.new_kv_cache(batch * num_beams, max_len), cross_kv, kv_batch_index, cross_mask)

    def new_kv_cache(self, batch_size, max_len):
        """An empty decoder self-attention KVCache for ``max_len`` positions in the model's dtype and device."""
        c = self.config
        return KVCache(c.decoder_layers, batch_size, c.decoder_attention_heads, max_len,
                       c.d_model // c.decoder_attention_heads, dtype=self.dtype, device=self.device)

    def decode_step(self, decoder_input_ids, state):
        """Feed the new decoder tokens ``[N, n]`` (written into the cache) -> next-token logits ``[N, V]``."""
        hidden = self.model.decoder(decoder_input_ids, encoder_attention_mask=state.cross_mask,
                                    cache=state.self_cache, cross_kv=state.cross_kv,
                                    kv_batch_index=state.kv_batch_index)
        return self.logits(hidden[:, -1])

    @torch.no_grad()
    def generate(self, input_ids, attention_mask=None, *, decoder_input_ids=None, cache_implementation=None,
                 **settings):
        """Greedy (num_beams=1) or beam search with HF ``generate`` semantics.

        ``settings`` are HF's generation arguments (num_beams, max_new_tokens, max_length, min_new_tokens,
        min_length, length_penalty, early_stopping, no_repeat_ngram_size, forced_bos_token_id,
        forced_eos_token_id, eos_token_id, pad_token_id, decoder_start_token_id, num_return_sequences, ...),
        resolved by ``fusedformers.models.generation.resolve_settings``: those passed over generation_config.json
        (or config.json's generation fields) over HF's global defaults; as in HF, an argument passed explicitly,
        even as None, overrides the config (None: that feature off, e.g. ``forced_eos_token_id=None``). A
        setting HF would apply that is not implemented (do_sample=True, repetition_penalty=1.2, ...) raises
        NotImplementedError; ``use_cache`` is accepted and ignored (the cache is always used, same result).

        input_ids/attention_mask ``[B, Ls]``. Returns ``[B * num_return_sequences, P + generated]`` token ids,
        P the decoder prompt length (1: decoder_start_token_id); finished rows are padded with pad_token_id.

        ``cache_implementation="static"`` (HF's name for its fixed-shape path), with beams: the self-attention
        cache is allocated for the whole length, and after the decoder prompt every step — bookkeeping, cache
        reorder and decoder — has fixed shapes and reads no host value, so on CUDA it is recorded once as a CUDA
        graph and replayed (``_recorded_beam_step``); greedy decoding likewise records its decoder step
        (``_recorded_greedy_step``); same tokens."""
        if cache_implementation not in (None, "dynamic", "static"):
            raise ValueError(f"cache_implementation must be None, 'dynamic' or 'static', got {cache_implementation!r}")
        check_prompt(input_ids, attention_mask, "input_ids")
        if decoder_input_ids is not None:
            check_prompt(decoder_input_ids, None, "decoder_input_ids")
        resolved = resolve_settings(self.generation_config, settings, implemented=BEAM_SEARCH,
                                    what="BART generate (greedy and beam search)",
                                    max_position_embeddings=self.config.max_position_embeddings,
                                    decoder_input_ids=decoder_input_ids)
        prompt = decoder_prompt(resolved, input_ids.shape[0], decoder_input_ids, input_ids.device)
        expand = max(resolved.num_beams, resolved.num_return_sequences)
        static = cache_implementation == "static"
        if static and resolved.max_length > self.config.max_position_embeddings:
            warnings.warn(f"cache_implementation='static' needs max_length ({resolved.max_length}) <= "
                          f"max_position_embeddings ({self.config.max_position_embeddings}); generating with the "
                          "dynamic cache", stacklevel=2)
            static = False
        # the self-attention cache: the whole length (static), or room for a first stretch of tokens, grown by
        # doubling
        state = self.prepare_decoding(input_ids, attention_mask, expand, resolved.max_length if static else
                                      min(resolved.max_length, prompt.shape[1] + INITIAL_ROOM))

        def step(tokens):
            return self.decode_step(tokens, state)

        # a decoder position past the learned table is an error: check for the end every step near it
        near_the_end = resolved.max_length > self.config.max_position_embeddings
        if static and resolved.num_beams == 1:
            step = self._recorded_greedy_step(state)
        if resolved.num_beams > 1:
            fused = ops_for(self.config.attn_implementation, self.device) is OPS["fused"]
            recorded = functools.partial(self._recorded_beam_step, state, resolved, fused) if static else None
            return beam_search.beam_search(step, prompt.repeat_interleave(expand, dim=0), resolved,
                                           reorder_cache=state.self_cache.reorder, fused=fused,
                                           recorded_step=recorded, sync_stop=near_the_end)
        return sample_loop(step, prompt, resolved, stop_check_interval=1 if near_the_end else STOP_CHECK_INTERVAL)

    def _recorded_beam_step(self, decoding, settings, fused, beams, logits):
        """The fixed-shape beam step of ``generate(cache_implementation="static")``: a :class:`StepGraph` whose
        every call runs one whole step — the bookkeeping (``beam_search.advance``) on the logits buffer, the
        reorder of the whole self-attention cache, the decoder on ``beams.next_tokens`` at the device-side
        position ``prompt_len + step - 1`` — and returns the next logits in the same buffer. Nothing reads a
        host value, so on CUDA the step is a replayed CUDA graph. ``beams``: the ``BeamState``; ``logits``: the
        decoder prompt's next-token logits ``[N, V]``."""
        cache = decoding.self_cache
        logits_buffer = logits.clone()
        cache_positions = torch.arange(cache.max_len, device=logits.device)

        def body():
            beam_search.advance(beams, logits_buffer, settings, fused)
            cache.reorder(beams.beam_idx, cache.max_len)
            position = beams.step + (beams.prompt_len - 1)   # of the token fed (after a stop: unchanged)
            logits_buffer.copy_(self._fixed_shape_logits(decoding, beams.next_tokens, position, cache_positions))
            return logits_buffer

        return StepGraph(body, logits.device if logits.is_cuda else None)

    def _fixed_shape_logits(self, decoding, tokens, position, cache_positions):
        """The decoder's fixed-shape step: ``tokens [N, 1]`` at the device-side ``position [1]``, their K/V
        written there, the whole self-attention cache attended with the positions ``<= position`` visible
        (``cache_positions``: ``arange(max_len)``). Returns next-token logits ``[N, V]``; reads no host value."""
        cache = decoding.self_cache
        written = (cache_positions <= position).expand(cache.batch_size, cache.max_len)
        hidden = self.model.decoder(tokens, encoder_attention_mask=decoding.cross_mask, attention_mask=written,
                                    cache=cache, cross_kv=decoding.cross_kv, kv_batch_index=decoding.kv_batch_index,
                                    position=position)
        return self.logits(hidden[:, -1])

    def _recorded_greedy_step(self, decoding):
        """Greedy decoding's ``step(tokens)`` for ``generate(cache_implementation="static")``: the decoder prompt
        runs as usual (it fills the cache's first positions); every later call copies the tokens ``[N, 1]`` into
        a fixed buffer and runs a :class:`StepGraph` (a replayed CUDA graph on CUDA) that feeds them at a
        device-side position it advances itself. Returns next-token logits ``[N, V]`` (the same buffer each
        step: the loop consumes it before the next call)."""
        cache = decoding.self_cache
        device = cache.storage.device
        tokens = torch.zeros(cache.batch_size, 1, dtype=torch.long, device=device)
        position = torch.zeros(1, dtype=torch.long, device=device)
        cache_positions = torch.arange(cache.max_len, device=device)
        logits_buffer = None

        def body():
            logits_buffer.copy_(self._fixed_shape_logits(decoding, tokens, position, cache_positions))
            position.add_(1)
            return logits_buffer

        graph = StepGraph(body, device if device.type == "cuda" else None)

        def step(new_tokens):
            nonlocal logits_buffer
            if logits_buffer is None:  # the decoder prompt
                logits = self.decode_step(new_tokens, decoding)
                logits_buffer = torch.empty_like(logits)
                position.fill_(cache.length)
                return logits
            tokens.copy_(new_tokens)
            return graph()

        return step

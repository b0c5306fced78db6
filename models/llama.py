"""LLaMA for causal LM on the fusedformers kernels, loading and saving Hugging Face checkpoints.

Layout (one decoder layer, the residual add fused into the following RMSNorm)::

    x = embed_tokens(input_ids)                                   # [B, L, hidden]
    for layer:  normed, h = input_layernorm(x, residual=h)         # h = x + h, normed = rms_norm(h)
                q, k, v = rope_qkv(qkv_proj(normed))               # one launch; with a cache, k and v go into it
                x = o_proj(attention(q, k, v))                     # GQA/MQA: K/V heads never repeated
                normed, h = post_attention_layernorm(x, residual=h)
                x = down_proj(silu_mul(gate_up_proj(normed)))      # act(gate) * up in one launch
    logits = lm_head(norm(x, residual=h))                          # [B, L, vocab]

Nine launches per layer and decode step. HF's q/k/v and gate/up projections are packed into one matmul each
(``qkv_proj``, ``gate_up_proj``: ``fusedformers.models.layers.PackedLinear``); ``state_dict()``, ``save_pretrained``
and ``load_state_dict`` use HF's names (``layers.0.self_attn.q_proj.weight``, ... without the ``model.`` prefix),
and ``named_grads()`` gives the gradients under them. The ops (attention, RMSNorm, RoPE, SiLU * mul) come from the
registry ``fusedformers.models.ops.OPS`` under
``config.attn_implementation``, read at call time: ``"fused"`` runs the Triton kernels, ``"eager"`` the PyTorch
references of ``fusedformers.kernels.reference``. Config parsing and RoPE math live in
``fusedformers.models.llama_config``; the generation loop in ``fusedformers.models.generation``.
"""
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fusedformers.models.base import ModelBase
from fusedformers.models.checkpoint import (
    assign_state_dict,
    check_layer_count,
    save_safetensors,
)
from fusedformers.models.cuda_graph import StepGraph
from fusedformers.models.generation import (
    INITIAL_ROOM,
    SAMPLING_SEARCH,
    check_prompt,
    make_generator,
    resolve_settings,
    sample_loop,
    with_room,
)
from fusedformers.models.kv_cache import KVCache
from fusedformers.models.layers import ACTIVATIONS, CheckpointedLayer, PackedLinear, PackedProjections, warn_once
from fusedformers.models.llama_config import LlamaConfig, rope_cos_sin, rope_inv_freq
from fusedformers.models.ops import check_implementation, ops_for

__all__ = ["LlamaConfig", "LlamaForCausalLM", "CausalLMOutput"]


def positions_from_mask(attention_mask, past_len, q_len, batch, device):
    """Position ids ``[B, Lq]`` of the last ``q_len`` tokens: ``cumsum(mask) - 1`` with padding at 0 (HF's
    generate, so left-padded rows start at 0), or ``past_len + arange(q_len)`` without a mask."""
    if attention_mask is None:
        return torch.arange(past_len, past_len + q_len, device=device)[None, :].expand(batch, q_len)
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 0)[:, -q_len:]


# -------------------------------------------------------------------------------------------------------- layers

class RMSNorm(nn.Module):
    """LLaMA RMSNorm over the last dim (HF LlamaRMSNorm semantics), optionally fused with the residual add."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.weight = nn.Parameter(torch.ones(config.hidden_size))
        self.eps = config.rms_norm_eps

    def forward(self, x, residual=None):
        """x ``[..., dim]`` → rms_norm(x); with residual: ``(rms_norm(x + residual), x + residual)``."""
        return ops_for(self.config.attn_implementation, x.device).rms_norm(x, self.weight, self.eps,
                                                                            residual=residual)


class Attention(PackedProjections):
    """Self-attention of one layer: the q/k/v projection (one matmul), RoPE of q and k fused with the KV-cache write,
    masked causal GQA attention, the output projection."""

    def __init__(self, config, layer_idx):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        bias = config.attention_bias
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        # HF's q_proj, k_proj, v_proj stacked: [(Hq + 2 Hkv) * D, hidden]; state_dict shows them under HF's names
        self.qkv_proj = PackedLinear(config.hidden_size, (("q_proj", q_size), ("k_proj", kv_size),
                                                          ("v_proj", kv_size)), bias=bias)
        self.o_proj = nn.Linear(q_size, config.hidden_size, bias=bias)

    def forward(self, x, cos, sin, key_padding_mask, *, cache=None, cache_position=None, past_len=0):
        """x ``[B, L, hidden]``; cos/sin ``[B, L, D]``; key_padding_mask ``[B, past_len + L]`` or None.

        cache: a KVCache that this call's K/V are written into, at the device positions ``cache_position [L]``
        (by the RoPE launch itself: ``KVCache.update_rope``). ``past_len`` (an int) is the number of positions
        before this call: attention runs causally over the cache's first ``past_len + L`` positions.
        ``past_len=None`` marks a fixed-shape decode step (one token, see ``LlamaForCausalLM.static_step``): it
        attends over the whole cache, whose unwritten positions key_padding_mask ``[B, max_len]`` marks as padding.
        Returns ``[B, L, hidden]``."""
        batch, q_len, _ = x.shape
        ops = ops_for(self.config.attn_implementation, x.device)
        qkv = self.qkv_proj(x)                                             # [B, L, (Hq + 2 Hkv) * D]
        if cache is not None and not (torch.is_grad_enabled() and qkv.requires_grad):
            kv_len = None if past_len is None else past_len + q_len
            q, k, v = cache.update_rope(self.layer_idx, ops.rope_qkv, qkv, cos, sin, self.num_heads, cache_position,
                                        kv_len)
        else:  # no cache, or a cached call that autograd records: the differentiable op, then the cache write
            q, k, v = ops.rope_qkv(qkv, cos, sin, self.num_heads, self.num_kv_heads)
            k, v = k.transpose(1, 2), v.transpose(1, 2)                    # [B, Hkv, L, D] views, no copies
            if cache is not None:
                kv_len = None if past_len is None else past_len + q_len
                k, v = cache.update(self.layer_idx, k, v, cache_position, kv_len)
        q = q.transpose(1, 2)                                              # [B, Hq, L, D]
        dropout_p = self.config.attention_dropout if self.training else 0.0   # on the probabilities, like HF's
        # a fixed-shape step has one query row: the mask alone hides the positions after it
        out = ops.attention(q, k, v, causal=past_len is not None, key_padding_mask=key_padding_mask,
                            past_len=past_len, dropout_p=dropout_p)
        return self.o_proj(out.transpose(1, 2).reshape(batch, q_len, self.num_heads * self.head_dim))


class MLP(PackedProjections):
    """SwiGLU feed-forward: ``down(act(gate(x)) * up(x))``, ``[B, L, hidden] -> [B, L, hidden]``; gate and up are
    one matmul, and with SiLU the activation and the product one launch (``silu_mul``)."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        bias = config.mlp_bias
        size = config.intermediate_size
        # HF's gate_proj, up_proj stacked: [2I, hidden]; state_dict shows them under HF's names
        self.gate_up_proj = PackedLinear(config.hidden_size, (("gate_proj", size), ("up_proj", size)), bias=bias)
        self.down_proj = nn.Linear(size, config.hidden_size, bias=bias)
        self.act = ACTIVATIONS[config.hidden_act]
        self.fused_act = config.hidden_act in ("silu", "swish")

    def forward(self, x):
        gate_up = self.gate_up_proj(x)                                     # [B, L, 2I]
        if self.fused_act:
            h = ops_for(self.config.attn_implementation, x.device).silu_mul(gate_up)
        else:
            gate, up = gate_up.chunk(2, dim=-1)
            h = self.act(gate) * up
        return self.down_proj(h)


class DecoderLayer(CheckpointedLayer):
    """Pre-norm decoder layer; the residual add is fused into the RMSNorm that follows it."""

    def __init__(self, config, layer_idx):
        super().__init__()
        self.input_layernorm = RMSNorm(config)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config)
        self.mlp = MLP(config)

    def forward(self, x, residual, cos, sin, key_padding_mask, *, cache=None, cache_position=None, past_len=0):
        """x: previous sublayer's output ``[B, L, hidden]``; residual: the residual stream before adding x (None
        in the first layer, where x is the embedding); the cache arguments as ``Attention.forward``'s.
        Returns (this layer's MLP output, residual stream)."""
        if residual is None:
            residual, normed = x, self.input_layernorm(x)
        else:
            normed, residual = self.input_layernorm(x, residual)
        x = self.self_attn(normed, cos, sin, key_padding_mask, cache=cache, cache_position=cache_position,
                           past_len=past_len)
        normed, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(normed), residual


@dataclass
class CausalLMOutput:
    logits: torch.Tensor                 # [B, L, vocab] (L = logits_to_keep when given)
    loss: torch.Tensor | None = None     # mean shifted cross-entropy over labels != -100
    past_key_values: KVCache | None = None


@dataclass
class StaticDecoding:
    """``generate(cache_implementation="static")``'s state, kept on the model for the next call of the same
    shape: the KV cache, the fixed input buffers of the decode step and the recorded step (a CUDA graph on CUDA,
    ``fusedformers.models.cuda_graph``). The step advances ``position`` and ``cache_position`` itself, on the
    device: set once after the prefill (``start``), they need nothing from the host between steps."""
    key: tuple                    # (batch, total, dtype, device, implementation, parameter storage)
    cache: KVCache                # [B, Hkv, total, D] per layer
    token: torch.Tensor           # [B, 1] the token to feed
    position: torch.Tensor        # [B, 1] its position id (RoPE); +1 by each step
    cache_position: torch.Tensor  # [1] the cache position it is written at; +1 by each step
    key_mask: torch.Tensor        # [B, total] bool: the cache positions to attend to
    step: StepGraph | None = None

    def start(self, last_positions, cache_length):
        """Before the first decode step: the next token's position ids are ``last_positions [B, 1] + 1`` (the
        prompt's last ones) and it goes to cache position ``cache_length`` (the prompt's length)."""
        torch.add(last_positions, 1, out=self.position)
        self.cache_position.fill_(cache_length)


# ---------------------------------------------------------------------------------------------------------- model

class LlamaForCausalLM(ModelBase):
    """HF-compatible LLaMA causal LM on the fused kernels (see the module docstring for the layout)."""

    def __init__(self, config):
        super().__init__()
        check_implementation(config.attn_implementation)
        self.config = config
        pad = config.pad_token_id
        padding_idx = pad if isinstance(pad, int) and -config.vocab_size <= pad < config.vocab_size else None
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=padding_idx)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.generation_config = {}
        self._inv_freq = {}  # device -> float32 [head_dim // 2]; not a buffer, so .to(dtype) cannot round it
        self._static_state = None  # generate(cache_implementation="static")'s StaticDecoding

    # ------------------------------------------------------------------------------------------- setup

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
        parameter (one copy; HF's q/k/v and gate/up tensors are concatenated into the packed ``qkv_proj`` and
        ``gate_up_proj``, and missing or unexpected tensors are named as HF names them). ``dtype``: a torch
        dtype, its name, or "auto" (as HF 5: the checkpoint's dtype).
        ``lm_head`` is tied to ``embed_tokens`` (one Parameter) when the config says so; a checkpoint whose stored
        lm_head differs from the embedding is loaded untied, with a warning, as HF does. An untied config without
        ``lm_head.weight`` is an error naming the missing tensor (HF reports it missing).
        Generation defaults: generation_config.json, else config.json's generation keys."""
        config, config_dict, state_dict, generation_config, names = cls.load_pretrained_parts(
            LlamaConfig, model_dir, dtype, device, attn_implementation)
        check_layer_count({k.removeprefix("model."): v for k, v in state_dict.items()}, "layers",
                          config.num_hidden_layers, "num_hidden_layers", names["source"])
        stored_head, embedding = state_dict.get("lm_head.weight"), state_dict.get("model.embed_tokens.weight")
        if (config.tie_word_embeddings and stored_head is not None and embedding is not None
                and not torch.equal(stored_head, embedding)):
            warnings.warn("the config ties lm_head to embed_tokens but the checkpoint stores a different "
                          "lm_head.weight: loading them untied (as HF does)", stacklevel=2)
            config.tie_word_embeddings = False
        with torch.device("meta"):
            model = cls(config)
        aliases = {name: name[len("model."):] for name in state_dict if name.startswith("model.")}
        aliases.update({name: None for name in state_dict if name.endswith("rotary_emb.inv_freq")})
        assign_state_dict(model, state_dict, aliases=aliases, **names)
        model.generation_config = generation_config
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
        position_ids ``[B, L]`` (default ``past + 0 … L-1`` whatever the mask, as HF's forward; ``generate``
        passes the mask's positions, ``positions_from_mask``, as HF's generate does); past_key_values: a KVCache
        that this call appends to (in place; it grows when continued past its size); use_cache without one
        allocates a KVCache of ``max_cache_len`` (default L) positions; labels ``[B, L]`` → mean cross-entropy
        of token t+1 given tokens ≤ t, -100 ignored; logits_to_keep > 0 computes logits of the last that many
        positions only (a 1-D tensor: of those positions). With gradient checkpointing in training, use_cache
        makes no cache (as HF; one warning) and a call given past_key_values runs its layers without
        checkpointing (exact; one warning).
        Returns CausalLMOutput(logits ``[B, L, vocab]``, loss, past_key_values)."""
        batch, q_len = input_ids.shape
        cache = past_key_values
        if cache is None and use_cache:
            if self.checkpointing_now():  # as HF: no new cache while checkpointing (it would keep activations)
                warn_once("use_cache", "use_cache=True is incompatible with gradient checkpointing in training: "
                                       "no KV cache is made (as HF)")
            else:
                cache = self.new_kv_cache(batch, max_cache_len or q_len)
        past_len = cache.length if cache is not None else 0
        if attention_mask is not None and tuple(attention_mask.shape) != (batch, past_len + q_len):
            raise ValueError(f"attention_mask must be [B, past + L] = [{batch}, {past_len + q_len}], "
                             f"got {tuple(attention_mask.shape)}")
        if attention_mask is not None and attention_mask.dtype.is_floating_point:
            attention_mask = attention_mask != 0  # HF also takes 1.0 / 0.0 masks; the kernels read bool or int
        if position_ids is None:
            position_ids = positions_from_mask(None, past_len, q_len, batch, input_ids.device)
        cache_position = None
        if cache is not None:
            cache.reserve(past_len + q_len)  # a cache continued past its size grows, like HF's dynamic cache
            cache_position = cache.next_positions(q_len)
        # an all-ones mask is correct too; generate() drops it when nothing is padded
        x, residual = self.decoder(input_ids, position_ids, attention_mask, cache, cache_position, past_len)
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

    def decoder(self, input_ids, position_ids, key_padding_mask, cache=None, cache_position=None, past_len=0):
        """Embedding and decoder layers: (last layer's output, residual stream) ``[B, L, hidden]`` each, before
        the final norm; the cache arguments as ``Attention.forward``'s."""
        x = self.embed_tokens(input_ids)
        cos, sin = self.rope(position_ids, x.dtype)
        residual = None
        for layer in self.layers:
            x, residual = layer(x, residual, cos, sin, key_padding_mask, cache=cache, cache_position=cache_position,
                                past_len=past_len)
        return x, residual

    # ------------------------------------------------------------------------------------------- generate

    @torch.no_grad()
    def generate(self, input_ids, attention_mask=None, *, generator=None, seed=None, cache_implementation=None,
                 **settings):
        """Greedy or sampled continuation like HF's ``generate``: returns ``[B, P + N]`` (prompt, then new
        tokens; a row that produced eos continues with pad; stops early once every row has finished).

        ``settings`` are HF's generation arguments (max_new_tokens, max_length, min_new_tokens, min_length,
        do_sample, temperature, top_k, top_p, eos_token_id, pad_token_id, ...), resolved by
        ``fusedformers.models.generation.resolve_settings``: the call's over generation_config.json (else
        config.json's generation keys) over HF's defaults (20 new tokens, greedy, temperature 1, top_k 50, top_p
        1); ``max_length`` and ``min_length`` count the prompt; top_k=0 disables top-k. A setting HF would apply
        that is not implemented here (num_beams=2, repetition_penalty=1.3, ...) raises NotImplementedError; off
        values are accepted. ``generator`` (a torch.Generator) or ``seed`` (an int) makes sampling reproducible;
        otherwise the global RNG is used. Without attention_mask, pad tokens in the prompt are masked (as HF,
        unless pad is also an eos token).

        The prompt is prefilled into a KVCache of P + max_new_tokens positions (``prefill``), then one token per
        step (``decode_step``), in ``fusedformers.models.generation.sample_loop``.
        ``cache_implementation="static"`` (HF's name for its compiled path): every decode step has the same
        launch arguments (it attends over the whole cache, the mask hiding what is not written yet), so on CUDA
        it is recorded once as a CUDA graph and replayed (``static_step``); same tokens."""
        if cache_implementation not in (None, "dynamic", "static"):
            raise ValueError(f"cache_implementation must be None, 'dynamic' or 'static', got {cache_implementation!r}")
        check_prompt(input_ids, attention_mask)
        batch, prompt_len = input_ids.shape
        token_ids = {k: getattr(self.config, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
        resolved = resolve_settings(self.generation_config, settings, implemented=SAMPLING_SEARCH,
                                    what="LLaMA generate (greedy and sampling)", prompt_len=prompt_len,
                                    max_position_embeddings=self.config.max_position_embeddings,
                                    model_defaults=token_ids)
        generator = make_generator(seed if generator is None else generator, input_ids.device)
        pad = resolved.pad_token_id
        if attention_mask is None:  # HF: infer the mask from pad tokens unless pad is also an eos token
            if pad is not None and pad not in resolved.eos_token_ids and bool((input_ids == pad).any()):
                attention_mask = (input_ids != pad).long()
            else:
                attention_mask = torch.ones_like(input_ids)
        total = resolved.max_length
        # one host sync here instead of one per step: without padding the kernels need no mask at all
        padded = bool((attention_mask == 0).any())
        if cache_implementation == "static":  # fixed shapes: the whole length up front
            static = self._static_decoding(batch, total, attention_mask)
            cache = static.cache
        else:  # room for the prompt and a first stretch of tokens; forward grows it (doubling)
            static = None
            cache = self.new_kv_cache(batch, min(total, prompt_len + INITIAL_ROOM))
        mask = attention_mask  # [B, length]: the prompt's mask, then 1 for every generated token
        positions = positions_from_mask(attention_mask, 0, prompt_len, batch, input_ids.device)

        def step(tokens):
            nonlocal positions, mask
            if cache.length == 0:
                logits = self.prefill(tokens, mask if padded else None, positions, cache)
                if static is not None:  # from here on the recorded step advances its own positions
                    static.start(positions[:, -1:], cache.length)
                return logits
            if static is not None:
                return self.static_step(static, tokens)
            positions = positions[:, -1:] + 1
            length = cache.length + 1
            mask = with_room(mask, length, 1)
            return self.decode_step(tokens, mask[:, :length] if padded else None, positions, cache)

        return sample_loop(step, input_ids, resolved, generator)

    def prefill(self, input_ids, attention_mask, position_ids, cache):
        """The prompt ``[B, P]`` into an empty ``cache``: next-token logits ``[B, vocab]``."""
        return self(input_ids, attention_mask=attention_mask, position_ids=position_ids, past_key_values=cache,
                    logits_to_keep=1).logits[:, -1]

    def decode_step(self, tokens, attention_mask, position_ids, cache):
        """One token per row ``[B, 1]`` at ``position_ids [B, 1]``, appended to ``cache``: logits ``[B, vocab]``.
        attention_mask ``[B, cache.length + 1]`` or None (nothing padded)."""
        return self(tokens, attention_mask=attention_mask, position_ids=position_ids, past_key_values=cache,
                    logits_to_keep=1).logits[:, -1]

    def static_step(self, state, tokens):
        """``decode_step`` through the fixed buffers of a :class:`StaticDecoding` (its recorded step, after
        ``state.start``): the tokens ``[B, 1]`` are copied in and the step runs; it reads its position and cache
        position from the device and advances them itself, so nothing of the host's feeds it (no sync, no
        length bookkeeping; ``cache.length`` only follows along, for the host's view). Returns logits
        ``[B, vocab]``."""
        state.token.copy_(tokens)
        logits = state.step()
        state.cache.advance(1)
        return logits

    def _fixed_shape_step(self, state):
        """The body a CUDA graph records: every launch has the same arguments each time. Reads the token,
        position and cache position from the state's device buffers, writes the token's K/V into the cache, marks
        its position in ``key_mask``, advances ``position`` and ``cache_position`` by one (on the device) and
        returns the next-token logits ``[B, vocab]``; cache.length is not moved."""
        state.key_mask.index_fill_(1, state.cache_position, True)
        x, residual = self.decoder(state.token, state.position, state.key_mask, state.cache, state.cache_position,
                                   past_len=None)
        x, _ = self.norm(x, residual)
        state.position.add_(1)
        state.cache_position.add_(1)
        return self.lm_head(x)[:, -1]

    def _static_decoding(self, batch, total, attention_mask):
        """The :class:`StaticDecoding` of ``cache_implementation="static"``, kept on the model and reused by the
        next ``generate`` with the same batch size, length, dtype, device, implementation and parameter storage
        (HF keeps its static cache too; ``release_static_cache()`` frees it). On CUDA the step is a replayed
        CUDA graph, unless the RoPE is "dynamic" (its frequencies depend on the host's view of the length)."""
        device = self.device
        key = (batch, total, self.dtype, device, self.attn_implementation,
               tuple(p.data_ptr() for p in self.parameters()))
        state = self._static_state
        if state is None or state.key != key:
            self._static_state = None  # the old cache and graph go before the new ones are allocated
            state = StaticDecoding(
                key=key, cache=self.new_kv_cache(batch, total),
                token=torch.zeros(batch, 1, dtype=torch.long, device=device),
                position=torch.zeros(batch, 1, dtype=torch.long, device=device),
                cache_position=torch.zeros(1, dtype=torch.long, device=device),
                key_mask=torch.zeros(batch, total, dtype=torch.bool, device=device))
            graph_device = device if self.config.rope_parameters["rope_type"] != "dynamic" else None
            state.step = StepGraph(lambda: self._fixed_shape_step(state), graph_device)
            self._static_state = state
        state.cache.reset()
        prompt_len = attention_mask.shape[1]
        state.key_mask[:, :prompt_len] = attention_mask != 0
        state.key_mask[:, prompt_len:] = False  # positions not generated yet
        return state

    def release_static_cache(self):
        """Free the KV cache and recorded decode step kept by ``generate(cache_implementation="static")``."""
        self._static_state = None

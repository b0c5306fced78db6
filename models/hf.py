"""Stock Hugging Face transformers models on the fused kernels.

Two entry points:

- :func:`register` adds ``"fusedformers"`` to transformers' ``AttentionInterface`` (the attention function) and to
  its ``AttentionMaskInterface`` (the mask function, under the same name: a custom attention registered without
  one silently gets no mask). After it, ``from_pretrained(..., attn_implementation="fusedformers")`` runs every
  self- and cross-attention of a model that uses the interfaces on :func:`fusedformers.kernels.attention`.
- :func:`apply` registers, switches a loaded model to ``"fusedformers"`` and swaps its RMSNorm modules for the
  fused RMSNorm kernel in place (same parameters, same state_dict names).

The mask function does not build HF's 4-D ``[B, 1, Lq, Lk]`` tensor: it returns a :class:`FusedMask` that carries
HF's 2-D padding mask sliced to the keys the attention sees, whether the pattern is causal, the causal offset
(``past_len``: query i sits at absolute position ``past_len + i`` among the keys; from the cache's query offset) and
the sliding window of HF's sliding-window causal masks (Mistral, Qwen2, Gemma 2/3's local layers).
The model hands it, unopened, to the attention function, which calls the kernel with it.

What the kernel cannot express runs HF's own ``sdpa_attention_forward`` on the mask HF's ``sdpa_mask`` would
have built from the same arguments (so the result is exactly ``attn_implementation="sdpa"``'s; for logit
softcapping, which HF's sdpa drops, the model's own eager attention), with one warning per reason: a ready-made
mask tensor passed by the caller (e.g. 4-D), a mask pattern other than causal, sliding-window causal or
bidirectional (packed sequences, image-token overlays, a chunk that some key falls outside of, a bidirectional
sliding window), logit softcapping, an additive position bias (T5-style relative positions, ALiBi), attention
sinks, head dims or dtypes the kernel does not take, and devices where Triton cannot run.

transformers is imported when these functions are called (it is no dependency of the package): without it they
raise ``ImportError`` saying so.
"""
import sys

import torch

from fusedformers.kernels import attention
from fusedformers.kernels import rms_norm as fused_rms_norm
from fusedformers.kernels.checks import triton_can_run
from fusedformers.models.layers import warn_once

# the name registered in both transformers interfaces
NAME = "fusedformers"

# the dtypes the kernel takes
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _transformers():
    """The transformers modules this file uses: ``(masking_utils, modeling_utils, sdpa_attention)``."""
    try:
        from transformers import masking_utils, modeling_utils
        from transformers.integrations import sdpa_attention
    except ImportError as error:
        raise ImportError("fusedformers.models.hf needs Hugging Face transformers >= 5 (`pip install transformers`); "
                          f"importing it failed: {error}") from error
    if not hasattr(masking_utils, "AttentionMaskInterface"):
        raise ImportError("fusedformers.models.hf needs transformers >= 5 (masking_utils.AttentionMaskInterface), "
                          f"found transformers {getattr(__import__('transformers'), '__version__', '?')}")
    return masking_utils, modeling_utils, sdpa_attention


# ----------------------------------------------------------------------------------------------------------------
# The mask function
# ----------------------------------------------------------------------------------------------------------------
class FusedMask:
    """What the ``"fusedformers"`` mask function hands the attention instead of a 4-D tensor.

    Attributes:
        padding: ``[B, Lk]`` bool, HF's 2-D attention mask for the ``Lk`` keys the attention sees (True = token),
            or None (no padding).
        causal: whether query i sees only the keys at or before its position.
        past_len: int, query i sits at key position ``past_len + i`` (the cache's query offset minus the first
            key's offset); 0 for bidirectional masks.
        window: None, or the sliding window of a causal mask: query i also sees only keys at positions
            ``>= past_len + i - window`` (HF's ``sliding_window`` minus one).
        kv_length: the number of keys the mask was made for.
        fallback_reason: None, or why the kernel cannot express this mask (the attention then runs HF's sdpa).

    ``sdpa_mask()`` / ``eager_mask()`` build, once, what HF's ``sdpa_mask`` / ``eager_mask`` return for the same
    arguments: the fallback paths' masks.
    """

    # it stands where HF's 4-D [B, 1, Lq, Lk] mask would: generate, when it makes the mask ahead of the forward
    # (a compileable cache), passes it back to the model, whose mask function then hands it through
    ndim = 4

    def __init__(self, sdpa_args, padding, causal, past_len, kv_length, fallback_reason=None, window=None):
        self.padding, self.causal, self.past_len, self.kv_length = padding, causal, past_len, kv_length
        self.window = window
        self.shape = (sdpa_args["batch_size"], 1, sdpa_args["q_length"], kv_length)
        self.fallback_reason = fallback_reason
        self._sdpa_args = sdpa_args
        self._built_masks = {}  # HF's 4-D masks for the fallbacks, built once per forward

    def sdpa_mask(self):
        return self._built("sdpa_mask")

    def eager_mask(self):
        """HF's ``eager_mask`` for the same arguments (None or a 4-D additive float mask in the model's dtype)."""
        return self._built("eager_mask")

    def _built(self, maker):
        if maker not in self._built_masks:
            masking_utils, _, _ = _transformers()
            self._built_masks[maker] = getattr(masking_utils, maker)(**self._sdpa_args)
        return self._built_masks[maker]

    def __repr__(self):
        padding = None if self.padding is None else tuple(self.padding.shape)
        return (f"FusedMask(padding={padding}, causal={self.causal}, past_len={self.past_len}, "
                f"window={self.window}, kv_length={self.kv_length}, fallback_reason={self.fallback_reason!r})")


def _as_int(value):
    """A cache offset as a Python int (a StaticCache gives a 0-d tensor: one host sync per forward, not per layer)."""
    return int(value.item()) if isinstance(value, torch.Tensor) else int(value)


def _closure(function):
    """The free variables of a closure, by name ({} for a plain function)."""
    cells = function.__closure__ or ()
    return dict(zip(function.__code__.co_freevars, (cell.cell_contents for cell in cells)))


def _local_pattern(mask_function, masking_utils):
    """HF's local causal mask functions, told apart (both come with ``local_size``): ``("sliding", W)`` for
    ``sliding_window_causal_mask_function(W)`` (key kv visible to query q iff ``q - W < kv <= q``), ``("chunked", C)``
    for ``chunked_causal_mask_function(C, ...)``, None for any other function. Recognised by their code objects
    (``and_masks`` of the overlay and ``causal_mask_function``), reading W or C from the overlay itself: pure Python,
    nothing evaluated on tensors (this runs inside torch.compile traces)."""
    and_code = masking_utils.and_masks(masking_utils.causal_mask_function).__code__
    if getattr(mask_function, "__code__", None) is not and_code:
        return None
    parts = _closure(mask_function).get("mask_functions", ())
    if len(parts) != 2 or parts[1] is not masking_utils.causal_mask_function:
        return None
    overlay = parts[0]
    code = getattr(overlay, "__code__", None)
    if code is masking_utils.sliding_window_overlay(1).__code__:
        return "sliding", int(_closure(overlay)["sliding_window"])
    if code is masking_utils.chunked_overlay(1, None).__code__:
        return "chunked", int(_closure(overlay)["chunk_size"])
    return None


def fused_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None, attention_mask=None,
               local_size=None, allow_is_causal_skip=True, use_vmap=False, **kwargs):
    """The ``AttentionMaskInterface`` entry of ``"fusedformers"``: called by HF's ``create_causal_mask`` /
    ``create_bidirectional_mask`` / ``create_sliding_window_causal_mask`` once per forward, with the arguments of
    HF's ``sdpa_mask`` (``attention_mask``: the 2-D mask as bool ``[B, >= kv_offset + kv_length]`` or None; query i
    at absolute position ``q_offset + i``, key j at ``kv_offset + j``). Returns a :class:`FusedMask`."""
    if isinstance(attention_mask, FusedMask):  # made ahead of the forward by generate (see FusedMask.ndim)
        return attention_mask
    masking_utils, _, _ = _transformers()
    sdpa_args = dict(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                     kv_offset=kv_offset, attention_mask=attention_mask, local_size=local_size,
                     allow_is_causal_skip=allow_is_causal_skip, use_vmap=use_vmap, **kwargs)
    if mask_function is not None:
        sdpa_args["mask_function"] = mask_function
    else:
        mask_function = masking_utils.causal_mask_function
    # one query against a compileable (static) cache: its position is a device tensor. Which keys it sees is one
    # row of the mask, evaluated on the device from HF's own index function (causal, sliding window, chunks...)
    # and applied as padding: reading the position would sync the host and break a torch.compile graph (HF
    # compiles these decode steps). Overlays that need vmap take the general path below.
    if q_length == 1 and isinstance(q_offset, torch.Tensor) and not use_vmap:
        device = q_offset.device
        keys = (torch.arange(kv_length, device=device) + kv_offset)[None, :]
        rows = torch.arange(batch_size, device=device)[:, None]
        visible = torch.as_tensor(mask_function(rows, 0, q_offset, keys), dtype=torch.bool, device=device)
        visible = visible.expand(batch_size, kv_length)
        if attention_mask is not None:
            padding = masking_utils.prepare_padding_mask(attention_mask, kv_length, kv_offset)
            visible = visible & padding[:, kv_offset:kv_offset + kv_length].bool()
        return FusedMask(sdpa_args, visible, False, 0, kv_length)
    q_offset, kv_offset = _as_int(q_offset), _as_int(kv_offset)

    causal = mask_function is masking_utils.causal_mask_function

    reason = window = None
    if not causal and mask_function is not masking_utils.bidirectional_mask_function:
        # HF's sliding-window or chunked causal mask without overlays (they pass local_size; overlays turn on
        # use_vmap, packed sequences and block ids turn the causal skip off, which a compileable cache also does
        # for one-query decode steps): plain causal as long as every query's window or chunk reaches back to
        # position 0; beyond that a sliding window runs on the kernel's window (HF's kv > q - W is the kernel's
        # j >= past_len + i - (W - 1)), a chunk falls back
        plain = not use_vmap and (allow_is_causal_skip or q_length == 1)
        local = _local_pattern(mask_function, masking_utils) if plain and local_size is not None else None
        if local is not None and q_offset + q_length <= local[1]:
            causal = True
        elif local is not None and local[0] == "sliding":
            causal, window = True, local[1] - 1
        elif local is not None:
            reason = f"a chunked attention pattern (chunks of {local[1]} keys) that some key falls outside of"
        else:
            reason = ("a mask pattern other than causal, sliding-window causal or bidirectional (e.g. packed "
                      "sequences, a mask overlay or a bidirectional sliding window)")

    padding = None
    if attention_mask is not None:
        padding = masking_utils.prepare_padding_mask(attention_mask, kv_length, kv_offset)
        padding = padding[:, kv_offset:kv_offset + kv_length]
    past_len = q_offset - kv_offset if causal else 0
    return FusedMask(sdpa_args, padding, causal, past_len, kv_length, reason, window)


# ----------------------------------------------------------------------------------------------------------------
# The attention function
# ----------------------------------------------------------------------------------------------------------------
def _fallback_reason(query, key, value, attention_mask, kwargs):
    """Why this call cannot run on the kernel (a phrase for the warning), or None."""
    if isinstance(attention_mask, FusedMask):
        if attention_mask.fallback_reason is not None:
            return attention_mask.fallback_reason
        if key.shape[2] != attention_mask.kv_length:
            return f"keys ({key.shape[2]}) that differ from the mask's length ({attention_mask.kv_length})"
    elif attention_mask is not None:
        return (f"a ready-made attention mask tensor of shape {tuple(attention_mask.shape)} (e.g. a 4-D mask passed "
                f"by the caller) instead of HF's 2-D mask")
    if kwargs.get("softcap") is not None:
        return "attention logit softcapping"
    if kwargs.get("position_bias") is not None:
        return "an additive position bias (e.g. T5's relative positions)"
    if kwargs.get("s_aux") is not None or kwargs.get("sinks") is not None:
        return "attention sinks"
    if not triton_can_run(query.device):
        return f"tensors on {query.device}, where Triton cannot run (CUDA, or TRITON_INTERPRET=1 on CPU)"
    if query.dtype not in _KERNEL_DTYPES or key.dtype != query.dtype or value.dtype != query.dtype:
        return f"dtype {query.dtype} (the kernel takes float16, bfloat16, float32)"
    head_dim = query.shape[-1]
    if key.shape[-1] != head_dim or value.shape[-1] != head_dim:
        return f"q/k/v head dims {query.shape[-1]}/{key.shape[-1]}/{value.shape[-1]} that differ"
    if not (16 <= head_dim <= 256 and head_dim % 8 == 0):
        return f"head dim {head_dim} (the kernel takes multiples of 8 in 16..256)"
    if key.shape[0] != query.shape[0] or query.shape[1] % key.shape[1] != 0:
        return f"q {tuple(query.shape)} and k {tuple(key.shape)} that are not a (grouped) batch-aligned pair"
    return None


def _fallback(reason, module, query, key, value, attention_mask, **kwargs):
    """HF's attention for a call the kernel cannot run, with one warning per reason: sdpa on HF's sdpa mask; for
    softcapping, the model file's own eager attention on HF's eager mask (HF's sdpa would drop the softcap)."""
    _, _, sdpa_attention = _transformers()
    eager = None
    if kwargs.get("softcap") is not None:
        eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    warn_once(f"hf fallback: {reason}", f"attn_implementation='{NAME}': {type(module).__name__} runs HF's "
                                        f"{'sdpa' if eager is None else 'eager'} attention for {reason}")
    if eager is not None:
        if isinstance(attention_mask, FusedMask):
            attention_mask = attention_mask.eager_mask()
        return eager(module, query, key, value, attention_mask, **kwargs)
    if isinstance(attention_mask, FusedMask):
        attention_mask = attention_mask.sdpa_mask()
    return sdpa_attention.sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def fused_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                            **kwargs):
    """The ``AttentionInterface`` entry of ``"fusedformers"`` (the signature of HF's ``sdpa_attention_forward``).

    Args:
        module: the calling attention module (``is_causal`` read from it when no mask was made).
        query: ``[B, Hq, Lq, D]``; key, value: ``[B, Hkv, Lk, D]`` (GQA without copies; any strides).
        attention_mask: the :class:`FusedMask` made by :func:`fused_mask`; None (no mask function ran: HF sdpa's
            rule, causal from the top-left corner when ``is_causal`` and ``Lq > 1``); or a tensor (falls back).
        dropout: attention dropout probability (the kernel's own Philox stream, so not sdpa's random masks).
        scaling: softmax scale, default ``1 / sqrt(D)``.

    Returns ``(out [B, Lq, Hq, D] contiguous, None)`` like HF's sdpa (no attention weights).
    """
    reason = _fallback_reason(query, key, value, attention_mask, kwargs)
    if reason is not None:
        return _fallback(reason, module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                         is_causal=is_causal, **kwargs)
    if attention_mask is None:  # HF sdpa's rule without a mask
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        padding, causal, past_len, window = None, bool(causal) and query.shape[2] > 1, 0, None
    else:
        padding, causal, past_len = attention_mask.padding, attention_mask.causal, attention_mask.past_len
        window = attention_mask.window
    out = attention(query, key, value, causal=causal, key_padding_mask=padding, past_len=past_len,
                    sm_scale=scaling, dropout_p=float(dropout), window=window)
    return out.transpose(1, 2).contiguous(), None


def register():
    """Add ``"fusedformers"`` to transformers' ``AttentionInterface`` and ``AttentionMaskInterface`` (idempotent).
    Afterwards ``AutoModel*.from_pretrained(path, attn_implementation="fusedformers")`` and
    ``model.set_attn_implementation("fusedformers")`` accept the name."""
    masking_utils, modeling_utils, _ = _transformers()
    modeling_utils.AttentionInterface.register(NAME, fused_attention_forward)
    masking_utils.AttentionMaskInterface.register(NAME, fused_mask)


# ----------------------------------------------------------------------------------------------------------------
# apply(model): attention switch and RMSNorm swap
# ----------------------------------------------------------------------------------------------------------------
# HF RMSNorm classes by formula: "llama" is weight * normed.to(x.dtype) (weight in `weight`, eps in
# `variance_epsilon`); "gemma" is (normed * (1 + weight.float())).to(x.dtype) (eps in `eps`)
RMS_NORM_KINDS = {
    "LlamaRMSNorm": "llama", "MistralRMSNorm": "llama", "Qwen2RMSNorm": "llama", "Qwen3RMSNorm": "llama",
    "Qwen3MoeRMSNorm": "llama", "Qwen2MoeRMSNorm": "llama", "MixtralRMSNorm": "llama", "Phi3RMSNorm": "llama",
    "OlmoRMSNorm": "llama", "Olmo2RMSNorm": "llama", "GraniteRMSNorm": "llama", "Starcoder2RMSNorm": "llama",
    "GemmaRMSNorm": "gemma", "Gemma2RMSNorm": "gemma", "Gemma3RMSNorm": "gemma",
}


class FusedRMSNorm(torch.nn.Module):
    """An HF RMSNorm module on :func:`fusedformers.kernels.rms_norm`, holding the original module's ``weight``
    Parameter (so state_dict names and tied or shared parameters stay). ``offset`` is 1 for Gemma's
    ``1 + weight`` scale (the kernel then gets ``1 + weight`` in float32, as Gemma scales in float32)."""

    def __init__(self, weight, eps, offset=0.0):
        super().__init__()
        self.weight = weight
        self.eps = eps
        self.offset = offset

    def forward(self, x):
        if x.dtype not in _KERNEL_DTYPES or not triton_can_run(x.device) or x.shape[-1] != self.weight.shape[0]:
            return self._eager(x)
        if self.offset:
            return fused_rms_norm(x, self.weight.float() + self.offset, self.eps).to(x.dtype)
        return fused_rms_norm(x, self.weight, self.eps)

    def _eager(self, x):
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        if self.offset:
            return (normed * (self.weight.float() + self.offset)).to(x.dtype)
        return self.weight * normed.to(x.dtype)

    def extra_repr(self):
        return f"{tuple(self.weight.shape)}, eps={self.eps}, offset={self.offset}"


def _fused_rms_norm_of(module):
    """The :class:`FusedRMSNorm` replacing an HF RMSNorm module, or None for a class not in RMS_NORM_KINDS."""
    kind = RMS_NORM_KINDS.get(type(module).__name__)
    if kind is None or not isinstance(getattr(module, "weight", None), torch.nn.Parameter):
        return None
    if kind == "gemma":
        return FusedRMSNorm(module.weight, float(module.eps), offset=1.0)
    return FusedRMSNorm(module.weight, float(module.variance_epsilon))


def apply(model, rms_norm=True):
    """Put a loaded transformers model on the kernels, in place; returns the model.

    Calls :func:`register`, switches the model (and its sub-models) to ``attn_implementation="fusedformers"``
    and, with ``rms_norm``, replaces each RMSNorm module of a known class (``RMS_NORM_KINDS``) by a
    :class:`FusedRMSNorm` holding the same weight Parameter under the same name (state_dict unchanged; Gemma's
    ``1 + weight`` kept). RMSNorm classes of unknown formula are left as they are, with one warning naming them.
    """
    register()
    model.set_attn_implementation(NAME)
    if rms_norm:
        unknown = set()
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                fused = _fused_rms_norm_of(child)
                if fused is not None:
                    setattr(parent, name, fused)
                elif type(child).__name__.endswith("RMSNorm") and not isinstance(child, FusedRMSNorm):
                    unknown.add(type(child).__name__)
        if unknown:
            warn_once(f"hf rmsnorm {sorted(unknown)}", f"fusedformers.models.hf.apply: left {sorted(unknown)} as "
                                                       f"they are (formula not known to match the kernel)")
    return model

"""Eager PyTorch references with Hugging Face semantics.

These are the readable versions of what the Triton kernels compute. The tests compare the kernels with them
(run in float64 for the "true" answer, and in the input dtype for the "eager error" budget), and the models can
select them with ``attn_implementation="eager"``.
"""
import math

import torch
import torch.nn.functional as F


def causal_padding_mask(batch, q_len, k_len, *, causal=True, key_padding_mask=None, past_len=None, device=None,
                        window=None):
    """Boolean visibility mask ``[B, 1, Lq, Lk]``: True where query i may attend to key j.

    Causal: query i sits at absolute position ``past_len + i`` and sees key j iff ``j <= past_len + i``
    (HF's ``_make_causal_mask`` with ``past_key_values_length``); ``past_len`` defaults to ``Lk - Lq``.
    ``window`` (causal only): also ``j >= past_len + i - window``, the last ``window`` keys before the query's own
    position (HF's ``sliding_window = window + 1``).
    ``key_padding_mask`` is HF's 2-D ``attention_mask`` ``[B, Lk]`` (1 = real token, 0 = padding), expanded
    like HF's ``_expand_mask``.
    """
    if past_len is None:
        past_len = k_len - q_len
    visible = torch.ones(batch, 1, q_len, k_len, dtype=torch.bool, device=device)
    if causal:
        query_pos = past_len + torch.arange(q_len, device=device)
        key_pos = torch.arange(k_len, device=device)
        visible = visible & (key_pos[None, :] <= query_pos[:, None])[None, None]
        if window is not None:
            visible = visible & (key_pos[None, :] >= query_pos[:, None] - window)[None, None]
    elif window is not None:
        raise ValueError("window needs causal=True")
    if key_padding_mask is not None:
        visible = visible & key_padding_mask.to(device=device, dtype=torch.bool)[:, None, None, :]
    return visible


def attention_reference(q, k, v, *, causal=True, key_padding_mask=None, past_len=None, sm_scale=None,
                        kv_batch_index=None, scale_before_matmul=False, dropout_p=0.0, dropout_mask=None, window=None):
    """Eager masked attention in the dtype of its inputs.

    q ``[B, Hq, Lq, D]``; k, v ``[B, Hkv, Lk, D]`` (or ``[Bkv, Hkv, Lk, D]`` with ``kv_batch_index [B]``);
    returns ``[B, Hq, Lq, D]``. GQA by repeating K/V heads (as HF's ``repeat_kv``). A query row with no visible
    key outputs zeros. ``window``: sliding window, as in ``causal_padding_mask``. ``scale_before_matmul`` scales q
    first, as BART does; LLaMA scales the scores.
    ``dropout_p > 0`` drops attention probabilities (training): with ``F.dropout``'s random mask, or with
    ``dropout_mask`` (bool ``[B, Hq, Lq, Lk]``, True = kept; e.g. the fused kernel's, from
    ``fusedformers.kernels.attention.dropout_keep_mask``), scaling the kept ones by ``1 / (1 - dropout_p)``.
    """
    batch, num_heads, q_len, head_dim = q.shape
    if kv_batch_index is not None:
        k, v = k[kv_batch_index.long()], v[kv_batch_index.long()]
    group = num_heads // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(head_dim)
    if scale_before_matmul:
        scores = torch.matmul(q * scale, k.transpose(-1, -2))
    else:
        scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    visible = causal_padding_mask(batch, q_len, k.shape[2], causal=causal, key_padding_mask=key_padding_mask,
                                  past_len=past_len, device=q.device, window=window)
    scores = scores.masked_fill(~visible, float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    probs = torch.where(visible.any(dim=-1, keepdim=True), probs, torch.zeros_like(probs))
    if dropout_p > 0.0 and dropout_mask is not None:
        probs = torch.where(dropout_mask, probs / (1.0 - dropout_p), torch.zeros_like(probs))
    elif dropout_p > 0.0:
        probs = torch.nn.functional.dropout(probs, p=dropout_p, training=True)
    return torch.matmul(probs, v)


def rope_reference(x, cos, sin):
    """HF's ``apply_rotary_pos_emb`` for one tensor: ``x * cos + rotate_half(x) * sin``, in x's dtype.

    x ``[B, L, H, D]``; cos, sin ``[B, L, D]`` (broadcast over the heads); ``rotate_half(x) = cat(-x2, x1)``.
    """
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def rope_qkv_reference(qkv, cos, sin, num_heads, num_kv_heads, *, k_cache=None, v_cache=None, cache_position=None):
    """:func:`fusedformers.kernels.rope.rope_qkv` in PyTorch: the packed projection ``qkv [B, L, (Hq + 2 Hkv) * D]``
    split into q, k, v heads, HF's RoPE on q and k; without a cache returns ``(q, k, v)`` (``[B, L, H, D]``),
    with one writes k and v into ``k_cache, v_cache [B, Hkv, max_len, D]`` at rows ``cache_position [L]``
    (``index_copy_``, cast to the cache's dtype) and returns q."""
    head_dim = cos.shape[-1]
    heads = qkv.unflatten(-1, (num_heads + 2 * num_kv_heads, head_dim))
    q, k, v = heads.split((num_heads, num_kv_heads, num_kv_heads), dim=2)
    q, k = rope_reference(q, cos, sin), rope_reference(k, cos, sin)
    if k_cache is None:
        return q, k, v
    k_cache.index_copy_(2, cache_position, k.transpose(1, 2).to(k_cache.dtype))
    v_cache.index_copy_(2, cache_position, v.transpose(1, 2).to(v_cache.dtype))
    return q


def silu_mul_reference(gate_up):
    """HF's SwiGLU product ``act_fn(gate_proj(x)) * up_proj(x)`` on the packed ``gate_up [..., 2I]`` (gate, then
    up): ``silu(gate) * up`` ``[..., I]``, the SiLU rounded to the dtype, then the product."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def rms_norm_reference(x, weight, eps=1e-6, residual=None):
    """HF ``LlamaRMSNorm``: statistics in float32, normalised value cast back to x's dtype, then times weight.

    With ``residual``: ``h = x + residual`` (in x's dtype) and returns ``(rms_norm(h), h)``.
    """
    if residual is not None:
        x = x + residual
    hidden = x.to(torch.float32)
    variance = hidden.pow(2).mean(-1, keepdim=True)
    hidden = hidden * torch.rsqrt(variance + eps)
    out = weight * hidden.to(x.dtype)
    return (out, x) if residual is not None else out


def layer_norm_reference(x, weight, bias, eps=1e-5, residual=None):
    """``torch.nn.LayerNorm`` of the last dimension (aten's ``layer_norm``: statistics and the affine map in float32
    for 16-bit x, one rounding to x's dtype), as HF's BART uses it; with ``residual``, of ``x + residual`` (in
    x's dtype): BART's post-LN ``LN(hidden + sublayer_out)``. x ``[..., N]``, weight and bias ``[N]``."""
    if residual is not None:
        x = x + residual
    return torch.nn.functional.layer_norm(x, (x.shape[-1],), weight, bias, eps)

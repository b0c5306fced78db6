"""Decode attention: one new query token (Lq = 1) against a KV cache, bf16, D = 128, GQA 32/8 and MHA 32/32,
cache 1k..32k, B 1..64; with B > 1, row 0 of the cache is left-padded by a quarter (a shorter prompt).
Ours: ``kernels.attention(q, k, v, key_padding_mask=mask)``, which dispatches Lq = 1 to the split-KV decode kernel
(no K/V head repeat). Alternatives:

- ``sdpa_mask_repeatkv``: SDPA on K/V already repeated to 32 heads, given the 4-D boolean mask (the SDPA call of
  HF's path when a row is padded; the repeat is done once, outside the timing, as in the anchors);
- ``hf_repeat+sdpa_mask`` (GQA only): the same with HF's ``repeat_kv`` inside the timing, as HF runs it every
  step;
- ``sdpa_gqa_nomask``: SDPA with ``enable_gqa=True`` and no mask (HF's path when nothing is padded; it ignores the
  padding, so it is a speed limit, not the same result).

The figure is the achieved TB/s of the K/V cache read: 2 · B · Hkv · S · D · 2 bytes per call, for everyone
(the repeated copies and the skipped padding are not counted).
"""
import torch
import torch.nn.functional as F

from fusedformers.bench.attention import sdpa_bool_mask
from fusedformers.bench.common import DTYPES, Case

NAME = "decode"
MODES = ("decode",)
HEAD_DIM = 128
IMPLS = ("ours", "sdpa_mask_repeatkv", "hf_repeat+sdpa_mask", "sdpa_gqa_nomask")


def _shape(q_heads, kv_heads, batch, cache):
    return dict(dtype="bf16", B=batch, Hq=q_heads, Hkv=kv_heads, S=cache, D=HEAD_DIM)


def shapes(quick):
    if quick:
        return [_shape(32, 8, 1, 4096), _shape(32, 8, 16, 4096), _shape(32, 8, 64, 1024), _shape(32, 32, 1, 32768)]
    out = []
    for q_heads, kv_heads in ((32, 8), (32, 32)):
        for cache in (1024, 2048, 4096, 8192, 16384, 32768):
            for batch in (1, 4, 16, 64):
                if batch * cache <= 262144:  # at most 256k cached tokens per case (8 GiB of K/V for MHA)
                    out.append(_shape(q_heads, kv_heads, batch, cache))
    return out


DRY_RUN_SHAPES = [dict(dtype="bf16", B=2, Hq=4, Hkv=2, S=80, D=32)]
PROOF_SHAPES = [_shape(32, 8, 1, 8192), _shape(32, 8, 16, 8192)]  # LLaMA-3-8B's heads, an 8k cache


def repeat_kv(x, n_rep):
    """HF's repeat_kv: [B, Hkv, S, D] -> [B, Hkv * n_rep, S, D] (a copy)."""
    batch, kv_heads, length, head_dim = x.shape
    if n_rep == 1:
        return x
    return x[:, :, None].expand(batch, kv_heads, n_rep, length, head_dim).reshape(
        batch, kv_heads * n_rep, length, head_dim)


def kv_bytes(batch, kv_heads, cache, head_dim, element_size):
    return 2 * batch * kv_heads * cache * head_dim * element_size


def cases(shape, runner):
    from fusedformers.kernels import attention
    device = runner.device
    dtype = DTYPES[shape["dtype"]]
    batch, q_heads, kv_heads, cache, head_dim = shape["B"], shape["Hq"], shape["Hkv"], shape["S"], shape["D"]
    group = q_heads // kv_heads
    q = torch.randn(batch, q_heads, 1, head_dim, device=device, dtype=dtype)
    k, v = (torch.randn(batch, kv_heads, cache, head_dim, device=device, dtype=dtype) for _ in range(2))
    key_padding_mask = torch.ones(batch, cache, dtype=torch.long, device=device)
    if batch > 1:
        key_padding_mask[0, : cache // 4] = 0
    ours_mask = key_padding_mask if batch > 1 else None
    bool_mask = sdpa_bool_mask(key_padding_mask, 1)
    k_rep, v_rep = repeat_kv(k, group), repeat_kv(v, group)

    impls = {
        "ours": lambda: attention(q, k, v, causal=True, key_padding_mask=ours_mask),
        "sdpa_mask_repeatkv": lambda: F.scaled_dot_product_attention(q, k_rep, v_rep, attn_mask=bool_mask),
    }
    if group > 1:
        impls["hf_repeat+sdpa_mask"] = lambda: F.scaled_dot_product_attention(
            q, repeat_kv(k, group), repeat_kv(v, group), attn_mask=bool_mask)
    impls["sdpa_gqa_nomask"] = lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=group > 1)

    def check():
        ours = impls["ours"]()
        sdpa = impls["sdpa_mask_repeatkv"]()
        return {"max_abs_diff_vs_sdpa_mask": (ours.float() - sdpa.float()).abs().max().item()}

    nbytes = kv_bytes(batch, kv_heads, cache, head_dim, k.element_size())
    heads = f"{'GQA' if group > 1 else 'MHA'} {q_heads}/{kv_heads}"
    label = f"{heads} B={batch} S={cache}" + (" (row 0 padded 25%)" if batch > 1 else "")
    shape = dict(shape, padded_rows=1 if batch > 1 else 0, padding=cache // 4 if batch > 1 else 0,
                 x_name="cache length S")
    yield Case(NAME, "decode", label, f"{heads} B={batch}", cache, shape, impls, "TB/s", nbytes,
               flops=4.0 * batch * q_heads * cache * head_dim, nbytes=nbytes, check=check)

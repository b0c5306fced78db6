"""Attention prefill: causal + key padding (row 0 of each batch left-padded by a quarter), H = 16, B·L ≈ 16k
tokens, forward and forward+backward. Ours: ``kernels.attention(q, k, v, causal=True, key_padding_mask=mask)``
with HF's 2-D mask. Alternatives:

- ``sdpa_mask``: SDPA given the 4-D boolean mask [B, 1, L, L] (causal & padding), what transformers' sdpa path
  builds (``masking_utils.sdpa_mask``) and passes when a row is padded;
- ``sdpa_flash_nopad``: SDPA's flash backend with ``is_causal=True`` and no padding at all: the speed limit of a
  causal kernel that ignores padding (it does less masking work than the others);
- ``flex``: ``torch.compile(flex_attention)`` with a causal + padding BlockMask (built once, outside the timing);
- ``hf_eager``: HF's eager attention, matmul + additive mask + fp32 softmax + matmul; skipped where its
  [B, H, L, L] intermediates would not fit in the free GPU memory.

Shapes with ``dropout`` (training, as BART's attention_dropout): everyone drops attention probabilities with
that p (ours in the kernel; SDPA's ``dropout_p``; ``F.dropout`` on HF eager's probabilities); FlexAttention has
no dropout and is skipped.
"""
import math

import torch
import torch.nn.functional as F

from fusedformers.bench.common import DTYPES, Case, attention_bytes, attention_flops

NAME = "attention"
MODES = ("fwd", "fwd+bwd")
HEADS = 16
TOKENS = 16384  # B·L
IMPLS = ("ours", "sdpa_mask", "sdpa_flash_nopad", "flex", "hf_eager")


def _shape(dtype, length, head_dim, dropout=0.0):
    shape = dict(dtype=dtype, B=max(1, TOKENS // length), H=HEADS, L=length, D=head_dim)
    return dict(shape, dropout=dropout) if dropout else shape


def shapes(quick):
    if quick:
        return [_shape("bf16", 1024, 128), _shape("bf16", 16384, 128), _shape("bf16", 4096, 64),
                _shape("fp16", 4096, 128), _shape("bf16", 1024, 64, dropout=0.1)]
    lengths = [512, 1024, 2048, 4096, 8192, 16384]
    some = [1024, 4096, 16384]
    return ([_shape("bf16", n, 128) for n in lengths] + [_shape("bf16", n, 64) for n in some]
            + [_shape("fp16", n, 128) for n in some] + [_shape("fp16", n, 64) for n in some]
            + [_shape("bf16", n, 64, dropout=0.1) for n in (1024, 4096)])


DRY_RUN_SHAPES = [dict(dtype="bf16", B=2, H=2, L=48, D=32), dict(dtype="bf16", B=2, H=2, L=48, D=32, dropout=0.1)]
# the one-call GPU proof (bash bench/gpu_check.sh proof): LLaMA's D=128 at 4k and 16k, BART's D=64 at 4k, against
# SDPA with HF's mask and FlexAttention (``impls``: the alternatives timed; the others cost minutes to compile)
PROOF_SHAPES = [dict(dtype="bf16", B=4, H=HEADS, L=4096, D=128, impls=("ours", "sdpa_mask", "flex")),
                dict(dtype="bf16", B=1, H=HEADS, L=16384, D=128, impls=("ours", "sdpa_mask", "flex")),
                dict(dtype="bf16", B=2, H=HEADS, L=4096, D=64, impls=("ours", "sdpa_mask", "flex"))]


# ------------------------------------------------------------------------------------------ the alternatives
def left_padded_mask(batch, length, device):
    """HF's 2-D attention_mask [B, L] (1 = token): row 0 left-padded by a quarter, the other rows full."""
    mask = torch.ones(batch, length, dtype=torch.long, device=device)
    mask[0, : length // 4] = 0
    return mask


def sdpa_bool_mask(key_padding_mask, q_len):
    """[B, 1, Lq, Lk] bool, True = attend: causal (query i at position Lk - Lq + i) & key padding, as
    transformers' sdpa_mask builds it."""
    k_len = key_padding_mask.shape[1]
    device = key_padding_mask.device
    query_pos = torch.arange(q_len, device=device)[:, None] + (k_len - q_len)
    causal = torch.arange(k_len, device=device)[None, :] <= query_pos
    return causal[None, None] & key_padding_mask.bool()[:, None, None, :]


def additive_mask(bool_mask, dtype):
    """HF's eager mask: 0 where visible, the dtype's minimum elsewhere."""
    return torch.zeros(bool_mask.shape, dtype=dtype, device=bool_mask.device).masked_fill(
        ~bool_mask, torch.finfo(dtype).min)


def hf_eager_attention(q, k, v, mask, dropout_p=0.0):
    """HF's eager_attention_forward: scores = q k^T · scale + mask, softmax in fp32, dropout, then times v."""
    scores = torch.matmul(q, k.transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))
    scores = scores + mask
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    if dropout_p:
        probs = F.dropout(probs, p=dropout_p, training=True)
    return torch.matmul(probs, v)


def hf_eager_bytes(batch, heads, q_len, k_len, element_size, backward):
    """Rough peak memory of hf_eager's [B, H, Lq, Lk] intermediates: scores and masked scores in the input
    dtype, fp32 probabilities and their cast; the backward keeps the probabilities and adds fp32 gradients."""
    per_element = 2 * element_size + 4 + element_size
    if backward:
        per_element += 4 + 2 * element_size
    return batch * heads * q_len * k_len * per_element


def flex_block_mask(key_padding_mask, heads=None):
    """FlexAttention BlockMask for causal & key padding (queries and keys of equal length)."""
    from torch.nn.attention.flex_attention import create_block_mask
    valid = key_padding_mask.bool()
    batch, length = valid.shape

    def causal_and_padding(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & valid[b, kv_idx]

    return create_block_mask(causal_and_padding, batch, heads, length, length, device=valid.device)


def sdpa_flash_causal(q, k, v, dropout_p=0.0):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p)


# ------------------------------------------------------------------------------------------------- the cases
def _visible_rows(bool_mask):
    """[B, 1, Lq, 1]: query rows that see at least one key (SDPA's output on the others is not defined alike)."""
    return bool_mask.any(dim=-1, keepdim=True)


def cases(shape, runner):
    """The forward case, then the forward+backward case, of one shape (tensors shared)."""
    from fusedformers.kernels import attention
    device = runner.device
    dtype = DTYPES[shape["dtype"]]
    batch, heads, length, head_dim = shape["B"], shape["H"], shape["L"], shape["D"]
    q, k, v = (torch.randn(batch, heads, length, head_dim, device=device, dtype=dtype) for _ in range(3))
    key_padding_mask = left_padded_mask(batch, length, device)
    bool_mask = sdpa_bool_mask(key_padding_mask, length)
    extra_mask = additive_mask(bool_mask, dtype)
    from torch.nn.attention.flex_attention import flex_attention
    flex = runner.compile(flex_attention)
    block_mask = flex_block_mask(key_padding_mask)
    free = runner.free_bytes()
    dropout_p = shape.get("dropout", 0.0)
    with_dropout = f" dropout {dropout_p}" if dropout_p else ""
    label_base = f"{shape['dtype']} B={batch} H={heads} L={length} D={head_dim}{with_dropout}"
    group = f"{shape['dtype']} D={head_dim}{with_dropout}"
    shape = dict(shape, padded_rows=1, padding=length // 4, x_name="L (B = 16k / L)")

    def impls_for(q, k, v):
        return {
            "ours": lambda: attention(q, k, v, causal=True, key_padding_mask=key_padding_mask, dropout_p=dropout_p),
            "sdpa_mask": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=bool_mask, dropout_p=dropout_p),
            "sdpa_flash_nopad": lambda: sdpa_flash_causal(q, k, v, dropout_p),
            "flex": lambda: flex(q, k, v, block_mask=block_mask),
            "hf_eager": lambda: hf_eager_attention(q, k, v, extra_mask, dropout_p),
        }

    def skips(backward):
        skipped = {"flex": "FlexAttention has no dropout"} if dropout_p else {}
        need = hf_eager_bytes(batch, heads, length, length, q.element_size(), backward)
        if need > 0.8 * free:
            skipped["hf_eager"] = f"needs ~{need / 2**30:.0f} GiB of {free / 2**30:.0f} GiB free"
        return skipped

    def check_forward():
        ours = attention(q, k, v, causal=True, key_padding_mask=key_padding_mask)
        sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=bool_mask)
        rows = _visible_rows(bool_mask).expand_as(ours)
        return {"max_abs_diff_vs_sdpa_mask": (ours.float() - sdpa.float())[rows].abs().max().item()}

    flops = attention_flops(batch, heads, length, length, head_dim, causal=True)
    nbytes = attention_bytes(batch, heads, length, heads, length, head_dim, q.element_size())
    yield Case(NAME, "fwd", f"fwd {label_base}", f"fwd {group}", length, shape,
               impls_for(q, k, v), "TFLOP/s", flops, flops=flops, nbytes=nbytes, skipped=skips(False),
               check=None if dropout_p else check_forward)  # random masks differ: nothing to compare

    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    grad_out = torch.randn_like(q)
    forward = impls_for(*leaves)
    impls = {name: (lambda fn=fn: fn().backward(grad_out)) for name, fn in forward.items()}
    flops = attention_flops(batch, heads, length, length, head_dim, causal=True, backward=True)
    nbytes = attention_bytes(batch, heads, length, heads, length, head_dim, q.element_size(), backward=True)
    yield Case(NAME, "fwd+bwd", f"fwd+bwd {label_base}", f"fwd+bwd {group}", length,
               shape, impls, "TFLOP/s", flops, flops=flops, nbytes=nbytes, skipped=skips(True),
               grad_to_none=leaves)

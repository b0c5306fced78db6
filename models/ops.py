"""The op implementations the models call, looked up by name at call time (the shape of HF's
``ALL_ATTENTION_FUNCTIONS``): ``OPS[name]`` holds the attention, RMSNorm, RoPE (one tensor, and the packed q/k/v
with its KV-cache write), SiLU * mul and LayerNorm functions of one implementation.

A model stores the name in ``config.attn_implementation`` (``model.set_attn_implementation(name)`` changes it)
and its modules call ``ops_for(config.attn_implementation, device)`` on every forward, so a switch takes effect
at the next call and no name is passed through constructors. ``"fused"`` falls back to ``"eager"``, with one
warning per process, where Triton cannot run (CPU tensors without ``TRITON_INTERPRET=1``).

Every attention function takes ``(q, k, v, *, causal, key_padding_mask, past_len, sm_scale, kv_batch_index,
dropout_p, scale_before_matmul)`` with the shapes of :func:`fusedformers.kernels.attention`; ``rope_qkv`` and
``silu_mul`` those of :func:`fusedformers.kernels.rope_qkv` and :func:`fusedformers.kernels.silu_mul` (the eager
ones: HF's RoPE on q and k then ``index_copy_`` into the cache; ``F.silu(gate) * up``).
"""
from collections import namedtuple

from fusedformers.kernels import (
    attention,
    attention_reference,
    layer_norm,
    layer_norm_reference,
    rms_norm,
    rms_norm_reference,
    rope,
    rope_qkv,
    rope_qkv_reference,
    rope_reference,
    silu_mul,
    silu_mul_reference,
)
from fusedformers.kernels.checks import triton_can_run

# the module, not its names: models/layers.py imports this module too (its LayerNorm looks up ops_for)
from fusedformers.models import layers

Ops = namedtuple("Ops", "attention rms_norm rope rope_qkv silu_mul layer_norm")


def fused_attention(q, k, v, *, scale_before_matmul=False, **kwargs):
    """The fused kernel. ``scale_before_matmul`` only sets where the eager path rounds the scaled query (BART
    scales q before the matmul, LLaMA the scores after it); the kernel scales in float32 inside, so it has no
    such rounding to place."""
    return attention(q, k, v, **kwargs)


def eager_attention(q, k, v, **kwargs):
    """The PyTorch reference (``fusedformers.kernels.reference.attention_reference``), HF's eager semantics."""
    return attention_reference(q, k, v, **kwargs)


OPS = {
    "fused": Ops(fused_attention, rms_norm, rope, rope_qkv, silu_mul, layer_norm),
    "eager": Ops(eager_attention, rms_norm_reference, rope_reference, rope_qkv_reference, silu_mul_reference,
                 layer_norm_reference),
}

def check_implementation(name):
    """ValueError unless ``name`` is registered in :data:`OPS`."""
    if name not in OPS:
        raise ValueError(f"attn_implementation must be one of {sorted(OPS)}, got {name!r}")


def ops_for(name, device):
    """The :class:`Ops` registered under ``name``; ``"fused"`` on a device where Triton cannot run gives the eager
    ops, with one warning per process."""
    if name == "fused" and not triton_can_run(device):
        layers.warn_once("cpu fallback", f"the fused Triton kernels need CUDA (or TRITON_INTERPRET=1); tensors are on "
                                         f"{device}, so the models run the eager PyTorch references")
        name = "eager"
    return OPS[name]

"""fusedformers Triton kernels: fused masked attention (forward and backward, with a split-KV decode path,
attention dropout), RMSNorm and LayerNorm (forward and backward, optionally fused with the residual add), RoPE
(also of a packed q/k/v projection, written into a KV cache in the same launch), SwiGLU's SiLU * mul, and the
beam-search bookkeeping (``kernels.beam_search``).

With ``TRITON_INTERPRET=1`` (set before triton is imported) the kernels run on CPU through Triton's interpreter;
importing this package applies the interpreter fixes of ``fusedformers.kernels.interpreter`` by itself.
"""
from fusedformers.kernels import interpreter

if interpreter.interpreter_on():
    interpreter.install()

from fusedformers.kernels.attention import attention  # noqa: E402
from fusedformers.kernels.reference import (  # noqa: E402
    attention_reference,
    layer_norm_reference,
    rms_norm_reference,
    rope_qkv_reference,
    rope_reference,
    silu_mul_reference,
)
from fusedformers.kernels.rms_norm import layer_norm, rms_norm  # noqa: E402
from fusedformers.kernels.rope import rope, rope_qkv  # noqa: E402
from fusedformers.kernels.silu_mul import silu_mul  # noqa: E402

__all__ = ["attention", "layer_norm", "rms_norm", "rope", "rope_qkv", "silu_mul", "attention_reference",
           "layer_norm_reference", "rms_norm_reference", "rope_reference", "rope_qkv_reference", "silu_mul_reference"]

"""fusedformers Triton kernels: fused masked attention (forward and backward, with a split-KV decode path,
attention dropout), RMSNorm (forward and backward, optionally fused with the residual add) and RoPE."""
from kernels.attention import attention
from kernels.rms_norm import rms_norm
from kernels.rope import rope
from kernels.reference import attention_reference, rms_norm_reference, rope_reference

__all__ = ["attention", "rms_norm", "rope", "attention_reference", "rms_norm_reference", "rope_reference"]

"""fusedformers Triton kernels: fused masked attention (forward and backward, with a split-KV decode path)
and RMSNorm (forward and backward, optionally fused with the residual add)."""
from kernels.attention import attention
from kernels.rms_norm import rms_norm
from kernels.reference import attention_reference, rms_norm_reference

__all__ = ["attention", "rms_norm", "attention_reference", "rms_norm_reference"]

"""fusedformers models: HF-compatible LLaMA and BART built on the fused Triton kernels."""

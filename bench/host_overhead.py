"""Host-side cost of our launchers and of a LLaMA decode step, with the Triton launches stubbed out.

At batch 1 a decode step is bound by the host (Python, argument checks, launches), not by the GPU, so this is
worth watching; it runs anywhere (CPU tensors, the kernels never run) in a few seconds::

    python -m fusedformers.bench.host_overhead

It times, per call: ``fusedformers.kernels.attention`` on a decode step (Lq = 1, split-KV path) with and
without a padding mask, ``fusedformers.kernels.rms_norm`` with and without the fused residual,
``fusedformers.kernels.rope`` beside the eager RoPE it replaces (whose five PyTorch ops here run on CPU,
without a GPU launch each), and one decode step of a 16-layer LLaMA of tiny width
(so that its matmuls cost next to nothing on CPU and the figure is the model's host work). Figures
are from this machine's CPU: on a GPU machine each torch op and Triton launch adds its own launch cost.
"""
import os
import sys
import time

os.environ.setdefault("TRITON_INTERPRET", "1")  # CPU tensors pass the launchers' device checks

import torch  # noqa: E402


class _NoLaunch:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](...)`` does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def stub_launches():
    from fusedformers import kernels  # noqa: F401  (loads the kernel modules)
    for module_name in ("attention", "decode_attention", "rms_norm", "rope"):
        module_name = "fusedformers.kernels." + module_name
        module = sys.modules[module_name]
        for name in dir(module):
            if name.startswith("_") and name.endswith("_kernel"):
                setattr(module, name, _NoLaunch())


def per_call_us(fn, calls=1000):
    for _ in range(20):
        fn()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


def tiny_llama_decode_step(layers=16):
    from fusedformers.models.llama import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig.from_dict(dict(model_type="llama", vocab_size=256, hidden_size=64, intermediate_size=128,
                                        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=4096))
    model = LlamaForCausalLM(config).eval()
    cache = model.new_kv_cache(1, 4096)
    model(torch.randint(0, 256, (1, 128)), past_key_values=cache)
    token = torch.zeros(1, 1, dtype=torch.long)
    return lambda: model(token, past_key_values=cache, position_ids=torch.full((1, 1), cache.length))


def main():
    stub_launches()
    from fusedformers import kernels
    q = torch.randn(1, 32, 1, 64)
    cache = torch.randn(2, 1, 8, 512, 64)
    k, v = cache[0, :, :, :300], cache[1, :, :, :300]
    mask = torch.ones(1, 512, dtype=torch.long)[:, :300]
    x, residual, weight = torch.randn(1, 1, 2048), torch.randn(1, 1, 2048), torch.randn(2048)
    cos, sin = torch.randn(1, 1, 64), torch.randn(1, 1, 64)
    from fusedformers.kernels.reference import rope_reference
    with torch.no_grad():
        rows = [
            ("attention, decode step (Lq=1, Lk=300, 32/8 heads)", lambda: kernels.attention(q, k, v)),
            ("attention, decode step with a padding mask", lambda: kernels.attention(q, k, v, key_padding_mask=mask)),
            ("rms_norm (1 x 2048)", lambda: kernels.rms_norm(x, weight)),
            ("rms_norm with residual", lambda: kernels.rms_norm(x, weight, residual=residual)),
            ("rope (1 x 1 x 32 x 64)", lambda: kernels.rope(q.view(1, 1, 32, 64), cos, sin)),
            ("rope, eager PyTorch (HF's apply_rotary_pos_emb)", lambda: rope_reference(q.view(1, 1, 32, 64), cos, sin)),
        ]
        for label, fn in rows:
            print(f"{label:55s} {per_call_us(fn):8.1f} us per call", flush=True)
        step = tiny_llama_decode_step()
        print(f"{'LLaMA decode step, 16 layers (tiny width)':55s} {per_call_us(step, calls=100):8.1f} us per step")


if __name__ == "__main__":
    main()

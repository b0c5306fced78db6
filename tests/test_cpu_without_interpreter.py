"""Without TRITON_INTERPRET, CPU tensors cannot run the Triton kernels: the kernels say so clearly, and the models
fall back to the eager references with one warning. Runs in a subprocess, since this suite turns the
interpreter on for itself."""
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent("""
    import tempfile, warnings
    import torch, transformers
    from fusedformers import kernels
    from fusedformers.models.llama import LlamaForCausalLM

    x = torch.randn(2, 8)
    for call in (lambda: kernels.rms_norm(x, torch.ones(8)),
                 lambda: kernels.attention(*(torch.randn(1, 2, 20, 16) for _ in range(3)))):
        try:
            call()
            raise SystemExit("no error")
        except ValueError as error:
            assert "need CUDA tensors" in str(error) and "TRITON_INTERPRET" in str(error), error

    path = tempfile.mkdtemp()
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1)
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    fused = LlamaForCausalLM.from_pretrained(path)
    eager = LlamaForCausalLM.from_pretrained(path, attn_implementation="eager")
    ids = torch.randint(0, 64, (2, 6))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            out, ref = fused(ids).logits, eager(ids).logits
            fused(ids)
    messages = [str(w.message) for w in caught if "eager PyTorch references" in str(w.message)]
    assert len(messages) == 1, messages
    assert torch.equal(out, ref)
    print("cpu fallback ok")
""")


@pytest.mark.slow
def test_kernels_refuse_cpu_and_models_fall_back():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300,
                            cwd=ROOT)
    assert result.returncode == 0 and "cpu fallback ok" in result.stdout, result.stdout + result.stderr

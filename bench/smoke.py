"""CPU smoke check (no GPU): each kernel once at a tiny shape through Triton's interpreter, against its eager
reference. The error of ours against a float64 reference must stay within 2 x the error of the eager reference
run in the same dtype, plus a small absolute slack (the tests' rule). TRITON_INTERPRET=1 must be set before
triton is imported (``fusedformers.bench.__main__`` does it).
"""
import time

import torch

ATOL = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _error(actual, expected):
    return (actual.double() - expected.double()).abs().max().item()


def _verdict(ours, reference64, eager):
    """(our max error, budget) against the float64 reference."""
    scale = max(1.0, reference64.abs().max().item())
    return _error(ours, reference64), 2 * _error(eager, reference64) + ATOL[ours.dtype] * scale


def _padded(batch, length, pad):
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, :pad] = 0  # row 0 left-padded
    return mask


def attention_forward():
    from fusedformers.kernels import attention, attention_reference
    q = torch.randn(2, 4, 40, 32, dtype=torch.bfloat16)
    k, v = (torch.randn(2, 2, 40, 32, dtype=torch.bfloat16) for _ in range(2))
    mask = _padded(2, 40, 10)
    ours = attention(q, k, v, causal=True, key_padding_mask=mask)
    ref = attention_reference(q.double(), k.double(), v.double(), causal=True, key_padding_mask=mask)
    eager = attention_reference(q, k, v, causal=True, key_padding_mask=mask)
    return "attention fwd  bf16 B=2 Hq=4 Hkv=2 L=40 D=32 causal+left padding", [_verdict(ours, ref, eager)]


def attention_backward():
    from fusedformers.kernels import attention, attention_reference
    q = torch.randn(2, 4, 40, 32, dtype=torch.float16)
    k, v = (torch.randn(2, 2, 40, 32, dtype=torch.float16) for _ in range(2))
    grad_out = torch.randn_like(q)
    mask = _padded(2, 40, 10)

    def grads(fn, dtype):
        leaves = [t.to(dtype, copy=True).requires_grad_() for t in (q, k, v)]
        fn(*leaves, causal=True, key_padding_mask=mask).backward(grad_out.to(dtype))
        return [t.grad for t in leaves]

    ours, ref, eager = grads(attention, torch.float16), grads(attention_reference, torch.float64), \
        grads(attention_reference, torch.float16)
    verdicts = [_verdict(*g) for g in zip(ours, ref, eager)]
    return "attention bwd  fp16 B=2 Hq=4 Hkv=2 L=40 D=32 causal+left padding: dq, dk, dv", verdicts


def decode():
    from fusedformers.kernels import attention, attention_reference
    q = torch.randn(2, 4, 1, 32, dtype=torch.bfloat16)
    k, v = (torch.randn(2, 2, 80, 32, dtype=torch.bfloat16) for _ in range(2))
    mask = _padded(2, 80, 20)
    ours = attention(q, k, v, causal=True, key_padding_mask=mask)  # Lq = 1: the split-KV decode kernel
    ref = attention_reference(q.double(), k.double(), v.double(), causal=True, key_padding_mask=mask)
    eager = attention_reference(q, k, v, causal=True, key_padding_mask=mask)
    return "decode (split-KV) bf16 B=2 Hq=4 Hkv=2 Lq=1 Lk=80 D=32 padded", [_verdict(ours, ref, eager)]


def rms_norm_forward():
    from fusedformers.kernels import rms_norm, rms_norm_reference
    x = torch.randn(32, 256, dtype=torch.bfloat16)
    weight = 1 + 0.1 * torch.randn(256, dtype=torch.bfloat16)
    ours = rms_norm(x, weight, 1e-6)
    ref = rms_norm_reference(x.double(), weight.double(), 1e-6)
    eager = rms_norm_reference(x, weight, 1e-6)
    return "rms_norm fwd   bf16 rows=32 hidden=256", [_verdict(ours, ref, eager)]


def rms_norm_backward():
    from fusedformers.kernels import rms_norm, rms_norm_reference
    x = torch.randn(32, 256, dtype=torch.float16)
    weight = 1 + 0.1 * torch.randn(256, dtype=torch.float16)
    grad_out = torch.randn_like(x)

    def grads(fn, dtype):
        leaves = [x.to(dtype, copy=True).requires_grad_(), weight.to(dtype, copy=True).requires_grad_()]
        fn(*leaves, 1e-6).backward(grad_out.to(dtype))
        return [t.grad for t in leaves]

    ours, ref, eager = grads(rms_norm, torch.float16), grads(rms_norm_reference, torch.float64), \
        grads(rms_norm_reference, torch.float16)
    return "rms_norm bwd   fp16 rows=32 hidden=256: dx, dweight", [_verdict(*g) for g in zip(ours, ref, eager)]


CHECKS = (attention_forward, attention_backward, decode, rms_norm_forward, rms_norm_backward)


def run():
    """Print one line per kernel; returns True when every kernel is within its error budget."""
    torch.manual_seed(0)
    passed = 0
    for check in CHECKS:
        start = time.perf_counter()
        try:
            name, verdicts = check()
        except Exception as error:
            print(f"smoke {check.__name__}: FAILED {type(error).__name__}: {error}", flush=True)
            continue
        ok = all(err <= budget for err, budget in verdicts)
        errors = ", ".join(f"{err:.2e}" for err, _ in verdicts)
        budgets = ", ".join(f"{budget:.2e}" for _, budget in verdicts)
        print(f"smoke {name}: max error vs float64 reference {errors} (budget {budgets}) "
              f"{'ok' if ok else 'TOO LARGE'} [{time.perf_counter() - start:.1f} s]", flush=True)
        passed += ok
    print(f"smoke: {passed}/{len(CHECKS)} kernels match their eager references", flush=True)
    return passed == len(CHECKS)

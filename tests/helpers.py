"""Shared assertions: a kernel's error against a float64 reference may be at most a small multiple of the error
of the eager computation in the same dtype, plus a small absolute slack; NaN never passes."""
import torch

from fusedformers.kernels.attention import draw_dropout_seed, dropout_keep_mask
from fusedformers.kernels.reference import attention_reference

# absolute slack added to the eager-error budget, per dtype
ATOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float64: 1e-10}


def max_error(actual, expected):
    return (actual.double() - expected.double()).abs().max().item()


def assert_within_eager_error(name, actual, expected64, eager, factor=2.0, atol=None):
    """actual, eager: same-dtype results; expected64: float64 reference of the same computation."""
    assert actual.shape == expected64.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected64.shape)}"
    assert not torch.isnan(actual).any(), f"{name}: NaN in the kernel's output"
    assert torch.isfinite(actual).all(), f"{name}: inf in the kernel's output"
    atol = ATOL[actual.dtype] if atol is None else atol
    kernel_err = max_error(actual, expected64)
    eager_err = max_error(eager, expected64)
    budget = factor * eager_err + atol
    assert kernel_err <= budget, (f"{name}: max error {kernel_err:.3e} > {factor} x eager error {eager_err:.3e} "
                                  f"+ atol {atol:.1e}")


def poison_(t):
    """Fill a tensor with NaN so that an element the kernel fails to write is caught."""
    return t.fill_(float("nan"))


def reference_with_kernel_dropout(q, k, v, *, dropout_p=0.0, **kwargs):
    """``attention_reference`` that draws its dropout mask exactly as the fused kernel does (a seed from the
    device's default generator, then the kernel's Philox mask): a model on the eager path then consumes the
    RNG as the fused model does and applies the same masks, so the two can be compared in training."""
    keep = None
    if dropout_p > 0.0:
        seed = draw_dropout_seed(q.device)
        keep = dropout_keep_mask(seed, q.shape[0], q.shape[1], q.shape[2], k.shape[2], dropout_p)
    return attention_reference(q, k, v, dropout_p=dropout_p, dropout_mask=keep, **kwargs)

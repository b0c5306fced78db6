"""What the kernel tests share: dtype lists and readable ids, input makers (q/k/v, HF padding masks), NaN poison,
float64 copies, gradients on fresh leaves, and the accuracy rule.

The accuracy rule: a kernel's error against a float64 reference may be at most a small multiple (2x) of the error
of the eager computation in the same dtype, plus a small absolute slack; NaN and inf never pass.
"""
import contextlib

import pytest
import torch

from fusedformers.kernels.attention import draw_dropout_seed, dropout_keep_mask
from fusedformers.kernels.reference import attention_reference

# --- dtypes and test ids -----------------------------------------------------------------------------------------

# the dtypes the kernels take
DTYPES = [torch.float16, torch.bfloat16, torch.float32]

_SHORT_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64",
                torch.bool: "bool", torch.uint8: "u8", torch.int32: "i32", torch.int64: "i64"}


def dtype_id(dtype):
    """Short name of a dtype for test ids: ``torch.bfloat16`` -> ``"bf16"``; usable as ``ids=dtype_id``."""
    return _SHORT_NAMES[dtype]


def params(values, id, slow=None):
    """``pytest.param`` for each of ``values`` (a tuple gives one argument per argname) with the test id
    ``id(value)``; where ``slow(value)`` is true the case also gets the ``slow`` mark (left out of the quick loop,
    ``pytest -m "not slow"``)."""
    marked = []
    for value in values:
        args = value if isinstance(value, tuple) else (value,)
        marks = [pytest.mark.slow] if slow is not None and slow(value) else []
        marked.append(pytest.param(*args, id=id(value), marks=marks))
    return marked


# DTYPES as test parameters: float16 in the quick loop, bfloat16 and float32 marked slow
DTYPE_PARAMS = params(DTYPES, id=dtype_id, slow=lambda dtype: dtype != torch.float16)


def kwargs_id(kwargs):
    """A test id for a dict of keyword arguments: ``max_length=11-min_length=14``."""
    return "-".join(f"{key}={value}" for key, value in kwargs.items())


def causal_id(causal):
    return "causal" if causal else "noncausal"


# --- accuracy ----------------------------------------------------------------------------------------------------

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


# --- poison and float64 ------------------------------------------------------------------------------------------

def poison_(t):
    """Fill a tensor with NaN in place (and return it), so that an element the kernel fails to write is caught."""
    return t.fill_(float("nan"))


def poisoned(*shape, dtype, device):
    """A new contiguous NaN-filled tensor of ``shape``: an output buffer for a kernel."""
    return poison_(torch.empty(*shape, dtype=dtype, device=device))


def to64(*tensors):
    """Detached float64 copies of ``tensors`` (a list; None stays None): the inputs of a float64 reference."""
    return [None if t is None else t.detach().double() for t in tensors]


# --- gradients ---------------------------------------------------------------------------------------------------

def fresh_leaves(*tensors, dtype=None):
    """Detached leaves that require grad (a list; None stays None), cast to ``dtype`` if given. Without a cast a
    leaf is a view of the input's storage with its strides, so a strided input stays strided."""
    leaves = []
    for t in tensors:
        if t is not None:
            t = t.detach() if dtype is None else t.detach().to(dtype)
            t.requires_grad_(True)
        leaves.append(t)
    return leaves


def grads_on_fresh_leaves(fn, inputs, grad_outputs, *, dtype=None, **kwargs):
    """Run ``fn(*leaves, **kwargs)`` on fresh leaf copies of ``inputs`` (cast to ``dtype`` if given; a None input
    is passed as None) and backpropagate ``grad_outputs`` (one tensor, or a tuple with one per output of ``fn``;
    each cast to its output's dtype). Returns ``(outputs, grads)``: the detached output (a tuple if ``fn`` returns
    one) and one gradient per input (None for a None input)."""
    leaves = fresh_leaves(*inputs, dtype=dtype)
    outputs = fn(*leaves, **kwargs)
    as_tuple = isinstance(outputs, tuple)
    outs = outputs if as_tuple else (outputs,)
    grads = grad_outputs if isinstance(grad_outputs, (tuple, list)) else (grad_outputs,)
    assert len(grads) == len(outs), f"{len(grads)} gradients for {len(outs)} outputs"
    used = [leaf for leaf in leaves if leaf is not None]
    found = iter(torch.autograd.grad(outs, used, [g.to(o.dtype) for g, o in zip(grads, outs)]))
    detached = tuple(o.detach() for o in outs)
    return (detached if as_tuple else detached[0]), [None if leaf is None else next(found) for leaf in leaves]


# --- attention inputs --------------------------------------------------------------------------------------------

def make_qkv(batch, num_heads, num_kv_heads, q_len, k_len, head_dim, dtype, device, layout="contiguous",
             kv_batch=None):
    """Random q ``[B, H, Lq, D]`` and k, v ``[Bkv, Hkv, Lk, D]`` (``Bkv = kv_batch or B``) in one of the layouts:
    'contiguous'; 'bshd': transposed views of ``[B, L, H, D]`` projections, as a model produces them;
    'cache_slice': k and v are ``[:, :, :Lk]`` slices of a preallocated cache 13 positions longer."""
    kv_batch = batch if kv_batch is None else kv_batch

    def randn(*shape):
        return torch.randn(*shape, device=device, dtype=dtype)

    if layout == "bshd":
        q = randn(batch, q_len, num_heads, head_dim).transpose(1, 2)
        k = randn(kv_batch, k_len, num_kv_heads, head_dim).transpose(1, 2)
        v = randn(kv_batch, k_len, num_kv_heads, head_dim).transpose(1, 2)
    elif layout == "cache_slice":
        q = randn(batch, num_heads, q_len, head_dim)
        k = randn(kv_batch, num_kv_heads, k_len + 13, head_dim)[:, :, :k_len]
        v = randn(kv_batch, num_kv_heads, k_len + 13, head_dim)[:, :, :k_len]
    elif layout == "contiguous":
        q = randn(batch, num_heads, q_len, head_dim)
        k = randn(kv_batch, num_kv_heads, k_len, head_dim)
        v = randn(kv_batch, num_kv_heads, k_len, head_dim)
    else:
        raise ValueError(layout)
    return q, k, v


def lengths_mask(lengths, k_len, device, left=False, dtype=torch.int64):
    """HF attention mask ``[B, Lk]`` (1 = real token) with ``lengths[r]`` real tokens in row r: right padding, or
    left padding with ``left=True``."""
    pos = torch.arange(k_len, device=device)[None, :]
    lengths = torch.tensor(lengths, device=device)[:, None]
    mask = pos >= k_len - lengths if left else pos < lengths
    return mask.to(dtype)


def padding_lengths(batch, k_len):
    """Real tokens per row for ``make_padding_mask``: all of them in row 0, fewer in each later row (at least 1
    token padded there, at most all)."""
    return [k_len] + [k_len - min(k_len, (row * k_len) // (batch + 1) + 1) for row in range(1, batch)]


def make_padding_mask(batch, k_len, kind, device):
    """HF-style int64 attention mask ``[B, Lk]`` of one kind: 'left' or 'right' padding with a different length per
    row (``padding_lengths``: row 0 has none), 'holes' (random zeros; key 0 always real), 'empty' (row 1 fully
    padded), or None (returns None)."""
    if kind is None:
        return None
    if kind in ("left", "right"):
        return lengths_mask(padding_lengths(batch, k_len), k_len, device, left=kind == "left")
    if kind == "holes":
        mask = (torch.rand(batch, k_len, device=device) > 0.3).long()
        mask[:, 0] = 1
        return mask
    if kind == "empty":
        mask = torch.ones(batch, k_len, dtype=torch.long, device=device)
        mask[min(1, batch - 1)] = 0
        return mask
    raise ValueError(kind)


def reference_with_kernel_dropout(q, k, v, *, dropout_p=0.0, **kwargs):
    """``attention_reference`` that draws its dropout mask exactly as the fused kernel does (a seed from the
    device's default generator, then the kernel's Philox mask): a model on the eager path then consumes the
    RNG as the fused model does and applies the same masks, so the two can be compared in training."""
    keep = None
    if dropout_p > 0.0:
        seed = draw_dropout_seed(q.device)
        keep = dropout_keep_mask(seed, q.shape[0], q.shape[1], q.shape[2], k.shape[2], dropout_p)
    return attention_reference(q, k, v, dropout_p=dropout_p, dropout_mask=keep, **kwargs)


# --- randomized tests --------------------------------------------------------------------------------------------

def seed_of(request):
    """The per-test seed conftest drew for this test (``request.node.user_properties``)."""
    return dict(request.node.user_properties).get("seed")


@contextlib.contextmanager
def reports_config(request, **config):
    """Wrap a check of a randomly drawn configuration: a failure inside is re-raised as an AssertionError whose
    message names the configuration and the test's seed (conftest derives it from the test id and
    FUSEDFORMERS_TEST_SEED: rerunning the same test with the same FUSEDFORMERS_TEST_SEED replays the draws)."""
    try:
        yield
    except Exception as error:
        described = ", ".join(f"{key}={value}" for key, value in config.items())
        raise AssertionError(f"{type(error).__name__}: {error}\n  configuration: {described}\n"
                             f"  seed: {seed_of(request)}") from error

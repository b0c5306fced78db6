"""Host-side helpers for the launchers: integer arithmetic, the CUDA device guard, named strides.

triton 3.6 makes ``triton.cdiv`` and ``triton.next_power_of_2`` constexpr functions, whose Python call unwraps
every argument (~1-2 µs each); a decode step calls a launcher per layer, and the launchers use them several times
per call, so plain versions are used on the host instead.
"""
import contextlib
import functools

import torch


def cdiv(a, b):
    """ceil(a / b) for non-negative ints."""
    return -(-a // b)


def next_power_of_2(n):
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def custom_op(name, impl, fake, mutates_args=()):
    """Register ``impl`` (its type annotations give the schema) as the PyTorch custom op ``fusedformers::name``,
    with ``fake`` computing its outputs' shapes, dtypes and strides for tracing; ``mutates_args``: the names of
    the arguments it writes in place (e.g. a KV cache). Returns the op.

    The kernels are launched from Python, which torch.compile cannot trace; as registered ops they appear in the
    graph as single nodes (no graph break, ``torch.compile(fullgraph=True)`` works) and run their launcher when
    the graph runs. Outside tracing, :func:`call_op` skips the dispatcher."""
    op = torch.library.custom_op(f"fusedformers::{name}", mutates_args=mutates_args)(impl)
    op.register_fake(fake)
    return op


def call_op(op, impl, *args):
    """``op(*args)`` while torch.compile traces; ``impl(*args)`` (the op's own Python implementation) otherwise:
    the dispatcher costs ~25 us per call on this project's CPU machine (about 5x a plain call), which the decode
    path, a few ops per layer per token, would pay in eager mode for nothing."""
    if torch.compiler.is_compiling():
        return op(*args)
    return impl(*args)


def device_context(device):
    """Triton launches on the current CUDA device: this makes it ``device`` (nothing to do off CUDA)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


@functools.lru_cache(maxsize=None)
def _stride_names(name, dims):
    return tuple(f"stride_{name}{dim}" for dim in dims)


def strides(name, t, dims):
    """``t``'s strides as named kernel arguments, so that a launch cannot pass two of them in the wrong order:
    ``strides("q", q, "bhmd")`` is ``{"stride_qb": q.stride(0), "stride_qh": ..., "stride_qm": ...,
    "stride_qd": q.stride(3)}``; ``dims`` names every dimension of ``t``. The names are built once per
    (name, dims): a launcher calls this several times per launch, on the decode path's host budget."""
    names = _stride_names(name, dims)
    values = t.stride()
    if len(values) != len(names):
        raise ValueError(f"strides({name!r}): {len(names)} dimension names {dims!r} for a {len(values)}-D tensor")
    return dict(zip(names, values))

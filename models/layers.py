"""Pieces the models build their layers from: the activation table, the gradient-checkpointing base, LayerNorm."""
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

# the module, not its names: models/ops.py imports this module too (warn_once)
from fusedformers.models import ops


def _gelu_tanh(x):
    return F.gelu(x, approximate="tanh")


# config.json activation names (HF's ACT2FN spellings) -> function
ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_new": _gelu_tanh,
    "gelu_fast": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "relu": F.relu,
    "relu6": F.relu6,
    "silu": F.silu,
    "swish": F.silu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "mish": F.mish,
}

_warned = set()


def warn_once(key, message):
    """``warnings.warn(message)`` the first time ``key`` is seen in this process."""
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, stacklevel=3)


class CheckpointedLayer(nn.Module):
    """A layer that recomputes itself in the backward pass (``torch.utils.checkpoint``, non-reentrant) while
    ``gradient_checkpointing`` is set, the module trains and autograd records (HF's GradientCheckpointingLayer).

    A call that writes a KV cache (keyword ``cache`` not None) is not checkpointed: the recomputation would
    write the cache a second time, and dropping the cache, as HF does, would attend without the past. It runs
    as a plain call, exact, and the first such call warns that those activations are kept."""
    gradient_checkpointing = False

    def __call__(self, *args, **kwargs):
        # subclasses take `cache` keyword-only, so a cached call is always seen here
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            if kwargs.get("cache") is None:
                return checkpoint(super().__call__, *args, use_reentrant=False, **kwargs)
            warn_once("cache", "gradient checkpointing is skipped for calls with a KV cache (the layers run "
                               "normally and keep their activations; the result is exact)")
        return super().__call__(*args, **kwargs)


def set_gradient_checkpointing(model, enabled):
    """Turn checkpointing on or off for every :class:`CheckpointedLayer` of ``model``."""
    for module in model.modules():
        if isinstance(module, CheckpointedLayer):
            module.gradient_checkpointing = enabled


class LayerNorm(nn.Module):
    """``nn.LayerNorm`` over the last dim (parameters ``weight`` and ``bias``, as in HF checkpoints) on the op
    registry's ``layer_norm`` (the fused kernel, or aten's), optionally fused with the residual add before it."""

    def __init__(self, config, dim, eps=1e-5):
        super().__init__()
        self.config = config
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x, residual=None):
        """x ``[..., dim]`` (and residual of x's shape and dtype) -> ``LN(x + residual)`` ``[..., dim]``."""
        return ops.ops_for(self.config.attn_implementation, x.device).layer_norm(x, self.weight, self.bias,
                                                                                 self.eps, residual=residual)

    def reset_parameters(self):
        """Unit weight, zero bias (``nn.LayerNorm``'s initialisation)."""
        with torch.no_grad():
            self.weight.fill_(1.0)
            self.bias.zero_()

    def extra_repr(self):
        return f"{self.weight.shape[0]}, eps={self.eps}"

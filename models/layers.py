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


# ----------------------------------------------------------------------------------------------------------------
# Projections packed into one matmul, under HF's names
# ----------------------------------------------------------------------------------------------------------------
class PackedLinear(nn.Linear):
    """One ``nn.Linear`` holding several of HF's projections stacked along the output dim (LLaMA's q/k/v and
    gate/up), so that they run as one matmul: ``parts = (("q_proj", n_q), ("k_proj", n_kv), ...)`` names each
    slice of ``weight [sum(n), in]`` (and of ``bias [sum(n)]``) in order. The module that owns it
    (:class:`PackedProjections`) shows the slices under those names in ``state_dict`` and loads them from them."""

    def __init__(self, in_features, parts, bias=True):
        self.parts = tuple((name, int(size)) for name, size in parts)
        super().__init__(in_features, sum(size for _, size in self.parts), bias=bias)

    def split(self, tensor):
        """``tensor`` (this module's weight, bias, or a gradient of them) cut into its parts along dim 0:
        ``[(part name, view), ...]``."""
        return list(zip((name for name, _ in self.parts), tensor.split([size for _, size in self.parts])))


class PackedProjections(nn.Module):
    """Base of a module whose :class:`PackedLinear` children stand for HF's separate projections. Its
    ``state_dict`` lists HF's names (``q_proj.weight``, ... in HF's order, views of the packed tensor, so a
    save writes HF's layout) and ``load_state_dict`` takes them (concatenated into the packed parameter; a
    missing part is reported under its HF name). The packed names themselves are accepted on load too."""

    def __init__(self):
        super().__init__()
        self._missing_parts = {}  # packed name -> HF names missing from the dict being loaded
        self.register_state_dict_post_hook(_unpack_state_dict)
        self.register_load_state_dict_pre_hook(_pack_state_dict)
        self.register_load_state_dict_post_hook(_report_missing_parts)

    def packed_linears(self):
        """``(attribute name, PackedLinear)`` of the direct children."""
        return [(name, child) for name, child in self.named_children() if isinstance(child, PackedLinear)]


def _unpack_state_dict(module, state_dict, prefix, local_metadata):
    # this module's entries are the last ones written: rewritten in place, in order, a packed entry replaced by
    # its parts (HF's order: each part's weight, then its bias)
    packed = dict(module.packed_linears())
    entries = [(key, state_dict.pop(key)) for key in [k for k in state_dict if k.startswith(prefix)]]
    values = dict(entries)
    for key, value in entries:
        owner, _, attr = key[len(prefix):].rpartition(".")
        child = packed.get(owner)
        if child is None:
            state_dict[key] = value
        elif attr == "weight":
            bias = values.get(f"{prefix}{owner}.bias")
            weights = child.split(value)
            biases = child.split(bias) if bias is not None else [(name, None) for name, _ in weights]
            for (name, weight), (_, part_bias) in zip(weights, biases):
                state_dict[f"{prefix}{name}.weight"] = weight
                if part_bias is not None:
                    state_dict[f"{prefix}{name}.bias"] = part_bias


def _pack_state_dict(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    module._missing_parts = {}
    for packed_name, child in module.packed_linears():
        for attr in ("weight", "bias"):
            target = getattr(child, attr)
            packed_key = f"{prefix}{packed_name}.{attr}"
            keys = [f"{prefix}{name}.{attr}" for name, _ in child.parts]
            present = [k for k in keys if k in state_dict]
            if target is None or packed_key in state_dict:  # HF names of an absent bias stay: unexpected
                continue
            if len(present) < len(keys):  # reported under HF's names once the child has reported the packed one
                module._missing_parts[packed_key] = [k for k in keys if k not in state_dict]
                for k in present:
                    state_dict.pop(k)
                continue
            tensors = [state_dict.pop(k) for k in keys]
            shapes = [(size,) + tuple(target.shape[1:]) for _, size in child.parts]
            bad = [f"size mismatch for {k}: copying a param with shape {tuple(t.shape)} from checkpoint, the shape "
                   f"in current model is {shape}." for k, t, shape in zip(keys, tensors, shapes) if t.shape != shape]
            if bad:
                error_msgs.extend(bad)
                module._missing_parts[packed_key] = []
                continue
            state_dict[packed_key] = torch.cat(tensors)


def _report_missing_parts(module, incompatible_keys):
    missing = incompatible_keys.missing_keys
    for packed_key, parts in module._missing_parts.items():
        if packed_key in missing:
            index = missing.index(packed_key)
            missing[index:index + 1] = parts
    module._missing_parts = {}


def named_grads(model):
    """``{name: gradient}`` of ``model.named_parameters()`` under HF's names (those of ``state_dict``, tied
    duplicates left out): a :class:`PackedLinear` parameter's gradient cut into its parts (views); None where a
    parameter has no gradient."""
    out = {}
    for name, param in model.named_parameters():
        owner, _, attr = name.rpartition(".")
        module = model.get_submodule(owner) if owner else model
        if isinstance(module, PackedLinear):
            parent = owner.rpartition(".")[0]
            pieces = module.split(param.grad) if param.grad is not None else [(p, None) for p, _ in module.parts]
            for part, piece in pieces:
                out[f"{parent}.{part}.{attr}" if parent else f"{part}.{attr}"] = piece
        else:
            out[name] = param.grad
    return out

"""RMSNorm over the hidden dimension: hidden 1024..8192, rows 4096 and 16384, fp16/bf16, forward and
forward+backward (gradients of x and weight). Ours: ``kernels.rms_norm(x, weight, eps)``. Alternatives:

- ``hf_eager``: LlamaRMSNorm's math (fp32 statistics, normalised value cast back, times weight);
- ``torch_compile``: ``torch.compile`` of that same function (dynamic=False, one graph per shape);
- ``F.rms_norm``: ``torch.nn.functional.rms_norm`` (its own rounding, same traffic).

The figure is TB/s: forward 2 · rows · hidden · element size (read x, write y); forward+backward 5 · rows ·
hidden · element size (also read dy and x again, write dx), as in the anchors.
"""
import torch
import torch.nn.functional as F

from fusedformers.bench.common import DTYPES, Case

NAME = "rmsnorm"
MODES = ("fwd", "fwd+bwd")
EPS = 1e-6
IMPLS = ("ours", "hf_eager", "torch_compile", "F.rms_norm")


def shapes(quick):
    if quick:
        return [dict(dtype="bf16", rows=4096, hidden=4096), dict(dtype="bf16", rows=16384, hidden=8192),
                dict(dtype="fp16", rows=4096, hidden=1024)]
    return [dict(dtype=dtype, rows=rows, hidden=hidden)
            for dtype in ("bf16", "fp16") for rows in (4096, 16384) for hidden in (1024, 2048, 4096, 8192)]


DRY_RUN_SHAPES = [dict(dtype="bf16", rows=64, hidden=256)]
# the proof leaves torch.compile out: its cold compile would take a quarter of the proof's budget
PROOF_SHAPES = [dict(dtype="bf16", rows=16384, hidden=4096, impls=("ours", "hf_eager", "F.rms_norm"))]


def hf_rms_norm(x, weight, eps=EPS):
    """LlamaRMSNorm.forward."""
    hidden = x.to(torch.float32)
    variance = hidden.pow(2).mean(-1, keepdim=True)
    hidden = hidden * torch.rsqrt(variance + eps)
    return weight * hidden.to(x.dtype)


def cases(shape, runner):
    from fusedformers.kernels import rms_norm
    device = runner.device
    dtype = DTYPES[shape["dtype"]]
    rows, hidden = shape["rows"], shape["hidden"]
    x = torch.randn(rows, hidden, device=device, dtype=dtype)
    weight = 1 + 0.1 * torch.randn(hidden, device=device, dtype=dtype)
    compiled = runner.compile(hf_rms_norm)
    shape = dict(shape, x_name="hidden size")

    def impls_for(x, weight):
        return {
            "ours": lambda: rms_norm(x, weight, EPS),
            "hf_eager": lambda: hf_rms_norm(x, weight),
            "torch_compile": lambda: compiled(x, weight),
            "F.rms_norm": lambda: F.rms_norm(x, (hidden,), weight, EPS),
        }

    def check():
        diff = (rms_norm(x, weight, EPS).float() - hf_rms_norm(x, weight).float()).abs().max().item()
        return {"max_abs_diff_vs_hf_eager": diff}

    label = f"{shape['dtype']} rows={rows} hidden={hidden}"
    group = f"{shape['dtype']} rows={rows}"
    nbytes = 2 * x.numel() * x.element_size()
    yield Case(NAME, "fwd", f"fwd {label}", f"fwd {group}", hidden, shape, impls_for(x, weight), "TB/s",
               nbytes, nbytes=nbytes, check=check)

    leaves = [x.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()]
    grad_out = torch.randn_like(x)
    impls = {name: (lambda fn=fn: fn().backward(grad_out)) for name, fn in impls_for(*leaves).items()}
    nbytes = 5 * x.numel() * x.element_size()
    yield Case(NAME, "fwd+bwd", f"fwd+bwd {label}", f"fwd+bwd {group}", hidden, shape, impls, "TB/s", nbytes,
               nbytes=nbytes, grad_to_none=leaves)

"""The kernels as PyTorch custom ops (``torch.ops.fusedformers.*``): ``torch.library.opcheck`` over representative
inputs (schema, fake/meta shapes and strides, autograd registration, AOT dispatch with dynamic shapes), and
``torch.compile(fullgraph=True)`` of our LLaMA through them with no graph break, forward and backward.

On CPU the ops run their kernels through Triton's interpreter; the traces go through the registered ops all the
same (``aot_eager`` compiles the graph without code generation, so no C++ compiler is needed).
"""
import pytest
import torch

from fusedformers.kernels import attention, layer_norm, rms_norm, rope, rope_qkv, silu_mul
from fusedformers.kernels.attention import (
    attention_backward_op,
    attention_forward_op,
    decode_attention_op,
    draw_dropout_seed,
)
from fusedformers.kernels.rms_norm import (
    layer_norm_backward_op,
    layer_norm_forward_op,
    rms_norm_backward_op,
    rms_norm_forward_op,
)
from fusedformers.kernels.rope import rope_op, rope_qkv_backward_op, rope_qkv_cache_op, rope_qkv_op
from fusedformers.kernels.silu_mul import silu_mul_backward_op, silu_mul_op
from tests.conftest import DEVICE
from tests.helpers import make_padding_mask

DTYPE = torch.float16


def _qkv(batch=2, heads=4, kv_heads=2, q_len=20, k_len=24, head_dim=16, kv_batch=None):
    q = torch.randn(batch, heads, q_len, head_dim, device=DEVICE, dtype=DTYPE)
    k, v = (torch.randn(kv_batch or batch, kv_heads, k_len, head_dim, device=DEVICE, dtype=DTYPE) for _ in range(2))
    return q, k, v


@pytest.mark.parametrize("case", ["causal-padding-gqa", "kv-batch-index", "dropout", "window"])
def test_opcheck_attention(case):
    q, k, v = _qkv(kv_batch=1 if case == "kv-batch-index" else None)
    mask = make_padding_mask(2, k.shape[2], "left", device=DEVICE) if case != "kv-batch-index" else None
    index = torch.tensor([0, 0], device=DEVICE) if case == "kv-batch-index" else None
    dropout_p = 0.25 if case == "dropout" else 0.0
    seed = draw_dropout_seed(q.device) if dropout_p else None
    window = 5 if case == "window" else None  # the trailing int? argument (None: its default)
    settings = (True, k.shape[2] - q.shape[2], 0.25, dropout_p, window)
    torch.library.opcheck(attention_forward_op, (q, k, v, mask, index, seed, *settings))
    out, lse = attention_forward_op(q, k, v, mask, index, seed, *settings)
    dout = torch.randn_like(out)
    torch.library.opcheck(attention_backward_op, (dout, q, k, v, out, lse, mask, index, seed, *settings))
    torch.library.opcheck(decode_attention_op, (q[:, :, -3:], k, v, mask, index, True, k.shape[2] - 3, 0.25, window))


@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
def test_opcheck_rms_norm_and_rope(with_residual):
    x = torch.randn(2, 5, 48, device=DEVICE, dtype=DTYPE)
    weight = torch.randn(48, device=DEVICE, dtype=DTYPE)
    residual = torch.randn_like(x) if with_residual else None
    torch.library.opcheck(rms_norm_forward_op, (x, weight, 1e-6, residual))
    out, h, rstd = rms_norm_forward_op(x, weight, 1e-6, residual)
    dh = torch.randn_like(x) if with_residual else None
    torch.library.opcheck(rms_norm_backward_op, (torch.randn_like(out), h if with_residual else x, weight, rstd, dh))
    rows = torch.randn(2, 5, 3, 16, device=DEVICE, dtype=DTYPE)
    cos, sin = (torch.randn(2, 5, 16, device=DEVICE, dtype=DTYPE) for _ in range(2))
    torch.library.opcheck(rope_op, (rows, cos, sin, with_residual))  # the backward flag, both ways


def assert_compiles_like_eager(step, tensors):
    """``step(*tensors)`` (a scalar loss) traces as one graph with no break, and the compiled call gives the eager
    call's loss and gradients bit for bit."""
    leaves = [t.clone().requires_grad_() for t in tensors]
    explanation = torch._dynamo.explain(step)(*leaves)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1, explanation.break_reasons
    compiled_leaves = [t.clone().requires_grad_() for t in tensors]
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss, expected = compiled(*compiled_leaves), step(*leaves)
    assert torch.equal(loss, expected)
    loss.backward()
    expected.backward()
    for ours, eager in zip(compiled_leaves, leaves):
        assert torch.equal(ours.grad, eager.grad)


@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("weight_dtype", [DTYPE, torch.float32], ids=["weight_fp16", "weight_fp32"])
def test_opcheck_layer_norm(with_residual, weight_dtype):
    x = torch.randn(2, 5, 48, device=DEVICE, dtype=DTYPE)
    weight, bias = (torch.randn(48, device=DEVICE, dtype=weight_dtype) for _ in range(2))
    residual = torch.randn_like(x) if with_residual else None
    for keep_h in (False, True):
        torch.library.opcheck(layer_norm_forward_op, (x, weight, bias, 1e-5, residual, keep_h))
    out, h, mean, rstd = layer_norm_forward_op(x, weight, bias, 1e-5, residual, True)
    normalised = h if with_residual else x
    torch.library.opcheck(layer_norm_backward_op, (torch.randn_like(out), normalised, weight, mean, rstd))


def test_layer_norm_compiles_without_graph_breaks():
    """BART's post-LN ``LN(hidden + attn)`` through the fused op: one graph, eager's values and gradients."""
    x, residual = (torch.randn(2, 20, 64, device=DEVICE, dtype=DTYPE) for _ in range(2))
    weight, bias = (torch.randn(64, device=DEVICE, dtype=DTYPE) for _ in range(2))

    def step(x, residual, weight, bias):
        return layer_norm(x * 2, weight, bias, residual=residual).float().square().sum()

    assert_compiles_like_eager(step, (x, residual, weight, bias))


def test_opcheck_rope_qkv_and_silu_mul():
    """The packed q/k/v RoPE (returning q, k, v; its backward; the variant that writes a KV cache in place, declared
    as mutating it) and SiLU * mul with its backward."""
    qkv = torch.randn(2, 5, (4 + 2 * 2) * 16, device=DEVICE, dtype=DTYPE)
    cos, sin = (torch.randn(2, 5, 16, device=DEVICE, dtype=DTYPE) for _ in range(2))
    torch.library.opcheck(rope_qkv_op, (qkv, cos, sin, 4))
    q, k, v = rope_qkv_op(qkv, cos, sin, 4)
    grads = tuple(torch.randn_like(t) for t in (q, k, v))
    torch.library.opcheck(rope_qkv_backward_op, (*grads, cos, sin))
    k_cache, v_cache = (torch.zeros(2, 2, 9, 16, device=DEVICE, dtype=DTYPE) for _ in range(2))
    torch.library.opcheck(rope_qkv_cache_op, (qkv, cos, sin, 4, k_cache, v_cache, torch.arange(3, 8, device=DEVICE)))
    gate_up = torch.randn(2, 5, 48, device=DEVICE, dtype=DTYPE)
    torch.library.opcheck(silu_mul_op, (gate_up,))
    torch.library.opcheck(silu_mul_backward_op, (torch.randn(2, 5, 24, device=DEVICE, dtype=DTYPE), gate_up))


def test_kernel_functions_compile_without_graph_breaks():
    """attention (prefill with gradients, and the decode path), RMSNorm with residual, RoPE (one tensor and the
    packed q/k/v), SiLU * mul: one graph, the same values as the eager calls, and the same gradients."""
    q, k, v = _qkv()
    mask = make_padding_mask(2, k.shape[2], "left", device=DEVICE)
    x = torch.randn(2, 20, 64, device=DEVICE, dtype=DTYPE)
    weight = torch.randn(64, device=DEVICE, dtype=DTYPE)
    cos, sin = (torch.randn(2, 20, 16, device=DEVICE, dtype=DTYPE) for _ in range(2))

    def step(q, k, v, x, weight):
        out = attention(q, k, v, causal=True, key_padding_mask=mask)
        decoded = attention(q[:, :, -1:].detach(), k.detach(), v.detach(), key_padding_mask=mask)
        normed, h = rms_norm(x, weight, residual=out.transpose(1, 2).reshape(2, 20, 64))
        rotated = rope(normed.view(2, 20, 4, 16), cos, sin)
        rq, rk, rv = rope_qkv(normed[..., :48], cos, sin, 1, 1)  # the packed q/k/v: one head each
        gated = silu_mul(normed)
        return (rotated.float().square().sum() + h.float().sum() + decoded.float().sum()
                + (rq.float() * rk.float()).sum() + rv.float().sum() + gated.float().square().sum())

    assert_compiles_like_eager(step, (q, k, v, x, weight))


@pytest.mark.slow
def test_llama_compiles_fullgraph(tmp_path):
    """Our LLaMA on the fused ops: dynamo traces the whole forward in one graph (no break), and the compiled model
    gives the eager model's logits, loss and gradients."""
    from fusedformers.models.llama import LlamaForCausalLM
    from tests.llama.common import left_padded_batch, make_checkpoint

    make_checkpoint(tmp_path)
    model = LlamaForCausalLM.from_pretrained(tmp_path, device=DEVICE)
    ids, mask = left_padded_batch([12, 7], 12)
    explanation = torch._dynamo.explain(model)(ids, attention_mask=mask)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1, explanation.break_reasons
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    labels = ids.masked_fill(mask == 0, -100)
    ours = compiled(ids, attention_mask=mask, labels=labels)
    ours.loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    eager = model(ids, attention_mask=mask, labels=labels)
    eager.loss.backward()
    assert torch.equal(ours.logits, eager.logits) and torch.equal(ours.loss, eager.loss)
    for name, p in model.named_parameters():
        assert torch.allclose(grads[name], p.grad, rtol=0, atol=1e-6), name

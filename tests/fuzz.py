"""Kernel fuzzer: random attention, RMSNorm, LayerNorm, RoPE and SiLU*mul cases, forward and backward, each
against its float64 reference under the accuracy rule (error at most 2x the eager same-dtype computation's, plus a
small slack; NaN never passes)::

    python -m tests.fuzz --cases 200 --seed 0 [--kinds attention rms_norm layer_norm rope silu_mul]

Without CUDA the kernels run on CPU through Triton's interpreter (set here before triton is imported), so shapes
stay small. Each failure prints one line that reproduces it (``--seed S --only-case I``); exit status 1 if any.
Attention cases draw: batch, query/KV head ratios (MHA, GQA, MQA), Lq and Lk (Lq = 1 and Lq > Lk included), head
dims 16-256, fp32/fp16/bf16, causal with or without ``past_len``, left / right / holey / fully masked padding,
``kv_batch_index``, strided and sliced views, attention dropout, causal sliding windows (0, 1, a few keys, more
than Lk).
"""
import argparse
import os
import random
import sys
import time
import traceback

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

from fusedformers import kernels  # noqa: E402
from fusedformers.kernels.reference import (  # noqa: E402
    attention_reference,
    layer_norm_reference,
    rms_norm_reference,
    rope_reference,
    silu_mul_reference,
)
from tests.helpers import (  # noqa: E402
    DTYPES,
    assert_within_eager_error,
    grads_on_fresh_leaves,
    make_padding_mask,
    make_qkv,
    reference_with_kernel_dropout,
    to64,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# attention twice: it has by far the most cases to cover
KINDS = ("attention", "rms_norm", "attention", "layer_norm", "rope", "silu_mul")


def draw_attention(rng):
    """One attention case: a dict of plain values (printed in a failure's reproduction line)."""
    num_kv_heads = rng.choice([1, 2, 4])
    case = dict(batch=rng.randint(1, 3), num_kv_heads=num_kv_heads,
                num_heads=num_kv_heads * rng.choice([1, 2, 4]),
                q_len=rng.choice([1, rng.randint(2, 16), rng.randint(17, 48)]), k_len=rng.randint(1, 48),
                head_dim=rng.choice([16, 32, 64, 64, 128, 256]), dtype=rng.choice(DTYPES),
                causal=rng.random() < 0.6, layout=rng.choice(["contiguous", "bshd", "cache_slice"]),
                padding=rng.choice([None, "left", "right", "holes", "empty"]),
                kv_batch=None, backward=rng.random() < 0.5, dropout_p=rng.choice([0.0, 0.0, 0.0, 0.3]))
    case["past_len"] = rng.choice([None, 0, rng.randint(0, 20)]) if case["causal"] else None
    if rng.random() < 0.25:
        case["kv_batch"] = rng.randint(1, 2)
    if case["dropout_p"]:
        case["backward"] = True  # dropout runs in training, through autograd
    case["window"] = rng.choice([None, None, 0, 1, rng.randint(2, 24), 64]) if case["causal"] else None
    return case


def run_attention(case, generator):
    batch, kv_batch = case["batch"], case["kv_batch"]
    q, k, v = make_qkv(batch, case["num_heads"], case["num_kv_heads"], case["q_len"], case["k_len"],
                       case["head_dim"], case["dtype"], DEVICE, layout=case["layout"], kv_batch=kv_batch)
    kwargs = dict(causal=case["causal"], past_len=case["past_len"], window=case.get("window"),
                  key_padding_mask=make_padding_mask(batch, case["k_len"], case["padding"], DEVICE))
    if kv_batch is not None:
        kwargs["kv_batch_index"] = torch.randint(0, kv_batch, (batch,), generator=generator).to(DEVICE)
    if not case["backward"]:
        out = kernels.attention(q, k, v, **kwargs)
        assert_within_eager_error("out", out, attention_reference(*to64(q, k, v), **kwargs),
                                  attention_reference(q, k, v, **kwargs))
        return
    dout = torch.randn(q.shape, device=DEVICE, dtype=q.dtype)
    dropout_p = case["dropout_p"]
    seed = int(torch.randint(0, 2**31, (1,), generator=generator))
    torch.manual_seed(seed)  # the fused kernel and the reference draw the same dropout seed from torch's RNG
    out, fused = grads_on_fresh_leaves(kernels.attention, (q, k, v), dout, dropout_p=dropout_p, **kwargs)
    results = {}
    for name, dtype in (("expected", torch.float64), ("eager", None)):
        torch.manual_seed(seed)
        results[name] = grads_on_fresh_leaves(reference_with_kernel_dropout, (q, k, v), dout, dtype=dtype,
                                              dropout_p=dropout_p, **kwargs)
    assert_within_eager_error("out", out, results["expected"][0], results["eager"][0])
    for name, got, want, eager in zip(("dq", "dk", "dv"), fused, results["expected"][1], results["eager"][1]):
        assert_within_eager_error(name, got, want, eager)


def _as_tuple(outputs):
    return outputs if isinstance(outputs, tuple) else (outputs,)


def draw_rms_norm(rng):
    return dict(rows=rng.randint(1, 40), hidden=rng.choice([8, 64, 96, 512, 1000, 2048]), dtype=rng.choice(DTYPES),
                residual=rng.random() < 0.5, strided=rng.random() < 0.3, backward=rng.random() < 0.5)


def run_rms_norm(case, generator):
    dtype, hidden = case["dtype"], case["hidden"]

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(DEVICE, dtype)

    x = randn(case["rows"], hidden + 8)[:, :hidden] if case["strided"] else randn(case["rows"], hidden)  # row stride
    weight = randn(hidden) * 0.5 + 1
    inputs = (x, weight) + ((randn(*x.shape),) if case["residual"] else ())

    def fused(x, weight, residual=None):
        return kernels.rms_norm(x, weight, 1e-5, residual=residual)

    def reference(x, weight, residual=None):
        return rms_norm_reference(x, weight, 1e-5, residual=residual)

    outputs = ("y", "h") if case["residual"] else ("y",)
    grad_outputs = tuple(randn(*x.shape) for _ in outputs)
    grad_outputs = grad_outputs if case["residual"] else grad_outputs[0]
    got, got_grads = grads_on_fresh_leaves(fused, inputs, grad_outputs)
    want, want_grads = grads_on_fresh_leaves(reference, inputs, grad_outputs, dtype=torch.float64)
    eager, eager_grads = grads_on_fresh_leaves(reference, inputs, grad_outputs)
    for name, a, b, c in zip(outputs, _as_tuple(got), _as_tuple(want), _as_tuple(eager)):
        assert_within_eager_error(name, a, b, c)
    if case["backward"]:
        for name, a, b, c in zip(("dx", "dweight", "dresidual"), got_grads, want_grads, eager_grads):
            assert_within_eager_error(name, a, b, c)


def draw_layer_norm(rng):
    return dict(rows=rng.randint(1, 40), hidden=rng.choice([8, 48, 100, 768, 1024]), dtype=rng.choice(DTYPES),
                fp32_params=rng.random() < 0.3, residual=rng.random() < 0.5, strided=rng.random() < 0.3,
                backward=rng.random() < 0.5)


def run_layer_norm(case, generator):
    dtype, hidden = case["dtype"], case["hidden"]

    def randn(*shape, dtype=dtype):
        return torch.randn(*shape, generator=generator).to(DEVICE, dtype)

    x = randn(case["rows"], hidden + 8)[:, :hidden] if case["strided"] else randn(case["rows"], hidden)  # row stride
    param_dtype = torch.float32 if case["fp32_params"] else dtype
    weight, bias = randn(hidden, dtype=param_dtype) * 0.5 + 1, randn(hidden, dtype=param_dtype) * 0.1
    inputs = (x, weight, bias) + ((randn(*x.shape),) if case["residual"] else ())
    dout = randn(*x.shape)

    def fused(x, weight, bias, residual=None):
        return kernels.layer_norm(x, weight, bias, 1e-5, residual=residual)

    def reference(x, weight, bias, residual=None):
        return layer_norm_reference(x, weight, bias, 1e-5, residual=residual)

    got, got_grads = grads_on_fresh_leaves(fused, inputs, dout)
    want, want_grads = grads_on_fresh_leaves(reference, inputs, dout, dtype=torch.float64)
    eager, eager_grads = grads_on_fresh_leaves(reference, inputs, dout)
    assert_within_eager_error("y", got, want, eager)
    if case["backward"]:
        for name, a, b, c in zip(("dx", "dweight", "dbias", "dresidual"), got_grads, want_grads, eager_grads):
            assert_within_eager_error(name, a, b, c)


def draw_silu_mul(rng):
    return dict(rows=rng.randint(1, 40), size=rng.choice([1, 8, 100, 1024, 2752]), dtype=rng.choice(DTYPES),
                strided=rng.random() < 0.3, backward=rng.random() < 0.5)


def run_silu_mul(case, generator):
    rows, width = case["rows"], 2 * case["size"]
    gate_up = torch.randn(rows, width + 16, generator=generator).to(DEVICE, case["dtype"]) * 3
    gate_up = gate_up[:, :width] if case["strided"] else gate_up[:, :width].contiguous()
    dout = torch.randn(rows, case["size"], generator=generator).to(DEVICE, case["dtype"])
    got, (got_grad,) = grads_on_fresh_leaves(kernels.silu_mul, (gate_up,), dout)
    want, (want_grad,) = grads_on_fresh_leaves(silu_mul_reference, (gate_up,), dout, dtype=torch.float64)
    eager, (eager_grad,) = grads_on_fresh_leaves(silu_mul_reference, (gate_up,), dout)
    assert_within_eager_error("out", got, want, eager)
    if case["backward"]:
        assert_within_eager_error("dgate_up", got_grad, want_grad, eager_grad)


def draw_rope(rng):
    return dict(batch=rng.randint(1, 2), seq_len=rng.randint(1, 24), heads=rng.choice([1, 3, 8, 32]),
                head_dim=rng.choice([16, 32, 64, 128]), dtype=rng.choice(DTYPES), transposed=rng.random() < 0.5)


def run_rope(case, generator):
    batch, seq_len, heads, head_dim, dtype = (case[k] for k in ("batch", "seq_len", "heads", "head_dim", "dtype"))
    shape = (batch, heads, seq_len, head_dim) if case["transposed"] else (batch, seq_len, heads, head_dim)
    x = torch.randn(*shape, generator=generator).to(DEVICE, dtype)
    x = x.transpose(1, 2) if case["transposed"] else x  # [B, L, H, D], strided when transposed
    angles = torch.arange(seq_len)[None, :, None].float() * torch.rand(head_dim // 2, generator=generator)
    angles = torch.cat((angles, angles), -1).expand(batch, -1, -1)
    cos, sin = angles.cos().to(DEVICE, dtype), angles.sin().to(DEVICE, dtype)
    dout = torch.randn(x.shape, generator=generator).to(DEVICE, dtype)
    got, (grad_x,) = grads_on_fresh_leaves(lambda x: kernels.rope(x, cos, sin), (x,), dout)  # cos, sin: constants
    want, (want_x,) = grads_on_fresh_leaves(lambda x: rope_reference(x, cos.double(), sin.double()), (x,), dout,
                                            dtype=torch.float64)
    eager, (eager_x,) = grads_on_fresh_leaves(lambda x: rope_reference(x, cos, sin), (x,), dout)
    assert_within_eager_error("out", got, want, eager)
    assert_within_eager_error("dx", grad_x, want_x, eager_x)


DRAW = {"attention": draw_attention, "rms_norm": draw_rms_norm, "layer_norm": draw_layer_norm, "rope": draw_rope,
        "silu_mul": draw_silu_mul}
RUN = {"attention": run_attention, "rms_norm": run_rms_norm, "layer_norm": run_layer_norm, "rope": run_rope,
       "silu_mul": run_silu_mul}


def case_plan(seed, cases, kinds):
    """[(index, kind, case)]: the same list for the same seed, cases and kinds (case i does not depend on how
    the others ran), so a failure replays with ``--only-case``."""
    rng = random.Random(seed)
    plan = []
    for index in range(cases):
        kind = kinds[index % len(kinds)]
        plan.append((index, kind, DRAW[kind](rng)))
    return plan


def run_case(seed, index, kind, case):
    """None when the case passes, else the error text."""
    generator = torch.Generator().manual_seed(seed * 100_003 + index)
    torch.manual_seed(seed * 100_003 + index)
    try:
        RUN[kind](case, generator)
    except Exception as error:  # noqa: BLE001 - every failure is reported, whatever its type
        return f"{type(error).__name__}: {error}".splitlines()[0] + "\n" + traceback.format_exc(limit=-3)
    return None


def describe(case):
    return " ".join(f"{k}={str(v).removeprefix('torch.')}" for k, v in case.items())


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m tests.fuzz", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    parser.add_argument("--only-case", type=int, default=None, help="run this case index of the plan only")
    args = parser.parse_args(argv)
    start, failures = time.perf_counter(), 0
    plan = case_plan(args.seed, args.cases, args.kinds)
    if args.only_case is not None:
        plan = [plan[args.only_case]]
    for index, kind, case in plan:
        error = run_case(args.seed, index, kind, case)
        if error is not None:
            failures += 1
            print(f"FAIL {kind} case {index}: {describe(case)}\n  reproduce: python -m tests.fuzz --seed "
                  f"{args.seed} --cases {args.cases} --kinds {' '.join(args.kinds)} --only-case {index}\n  {error}",
                  flush=True)
    print(f"fuzz: {len(plan) - failures} passed, {failures} failed ({len(plan)} cases, seed {args.seed}, "
          f"{time.perf_counter() - start:.0f} s, {DEVICE})", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

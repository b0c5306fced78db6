"""Device launches and host synchronisations, counted on any machine (CPU included).

At batch 1 a decode step is bound by how many kernels it launches (each costs ~1-2 µs even replayed from a
CUDA graph, ~5-10 µs from Python) and by every host synchronisation, which drains the launch queue. Both can be
counted without a GPU: every aten op that would launch device work is seen by a ``TorchDispatchMode``, every
Triton kernel launch by a hook on the kernel objects' ``run``.

What counts as a launch:
- one per Triton kernel launch (the aten ops Triton's CPU interpreter runs inside a launch are not counted);
- one per aten op, except views and metadata (``view``, ``transpose``, ``expand``, ``slice``, ``detach``, ...:
  ops whose result aliases an input without writing it), allocations (``empty``, ``empty_strided``, ...) and the
  host reads below.

What counts as a host synchronisation: an aten op that returns a host value read from a tensor
(``_local_scalar_dense``: ``.item()``, ``int(t)``, ``bool(t)``, ``if t:``; ``equal``, ``is_nonzero``), and
``Tensor.tolist()`` (on CPU tensors it reaches no aten op, so it is hooked).

Not counted: the checks the launchers run on the host for CPU tensors only (``kernels.checks.host_only_check``,
e.g. ``kv_batch_index``'s range), which CUDA kernels make themselves without a launch; they are listed in
``cpu_only``.

``LaunchCounter`` is a context manager; ``count(fn)`` runs ``fn`` under one and returns the counter. Its ``ops``
(a Counter by op name) say what was counted. Used by ``tests/test_launch_budget.py`` (which holds the budgets)
and by the benchmark's model part (``launches_per_step``).
"""
import collections
import functools

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fusedformers.kernels.checks import in_host_only_check

# ops that allocate or only describe a tensor: no kernel runs
_NO_LAUNCH = frozenset({
    "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "empty_permuted", "resize_",
    "lift_fresh", "lift_fresh_copy", "detach", "alias", "set_", "is_same_size", "sym_size", "sym_stride",
    "sym_numel", "sym_storage_offset", "_has_compatible_shallow_copy_type", "is_coalesced", "dim", "size",
    "stride", "numel", "storage_offset", "is_contiguous", "_nested_tensor_size", "record_stream",
    "_unsafe_view", "_reshape_alias", "promote_types", "result_type",   # views without an alias annotation
    "scalar_tensor",   # torch.where(cond, x, 0.0) wraps the Python scalar in a 0-dim host tensor
})
# ops that read a value back to the host (on a GPU: wait for every queued kernel)
_HOST_READS = frozenset({"_local_scalar_dense", "equal", "is_nonzero"})


def _op_name(func):
    return func.__name__.split(".")[0]   # "mm.default" -> "mm"


def _is_view(func):
    """An op whose output aliases an input that it does not write (a view, or a no-op ``to``/``contiguous``)."""
    schema = func._schema
    returns_alias = any(r.alias_info is not None and not r.alias_info.is_write for r in schema.returns)
    return returns_alias


class _Mode(TorchDispatchMode):
    def __init__(self, counter):
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counter._see(func)
        return func(*args, **(kwargs or {}))


class LaunchCounter:
    """Counts device launches (``launches``) and host synchronisations (``syncs``) inside ``with``.

    ``ops``: a Counter of what was counted as a launch (``"triton:<kernel name>"`` or the aten op's name);
    ``sync_ops``: the same for the host reads."""

    def __init__(self):
        self.launches = 0
        self.syncs = 0
        self.ops = collections.Counter()
        self.sync_ops = collections.Counter()
        self.cpu_only = collections.Counter()
        self._inside_triton = 0
        self._mode = None
        self._restore = []

    def _see(self, func):
        if self._inside_triton:
            return
        name = _op_name(func)
        if in_host_only_check():  # the interpreter path's host check of what CUDA kernels check themselves
            self.cpu_only[name] += 1
            return
        if name in _HOST_READS:
            self.syncs += 1
            self.sync_ops[name] += 1
            if name != "equal":   # equal also compares on the device
                return
        if name in _NO_LAUNCH or _is_view(func):
            return
        self.launches += 1
        self.ops[name] += 1

    def _triton_launch(self, kernel_name):
        self.launches += 1
        self.ops[f"triton:{kernel_name}"] += 1

    def _hook_triton(self):
        from triton.runtime import interpreter, jit
        counter = self
        for cls in (jit.JITFunction, interpreter.InterpretedFunction):
            original = cls.run

            @functools.wraps(original)
            def run(kernel, *args, __original=original, **kwargs):
                if kwargs.get("warmup"):
                    return __original(kernel, *args, **kwargs)
                if not counter._inside_triton:
                    name = getattr(kernel, "__name__", None) or getattr(getattr(kernel, "fn", None), "__name__", "?")
                    counter._triton_launch(name)
                counter._inside_triton += 1
                try:
                    return __original(kernel, *args, **kwargs)
                finally:
                    counter._inside_triton -= 1

            cls.run = run
            self._restore.append((cls, "run", original))

    def _hook_tolist(self):
        original = torch.Tensor.tolist
        counter = self

        def tolist(tensor):
            if not counter._inside_triton:
                counter.syncs += 1
                counter.sync_ops["tolist"] += 1
            return original(tensor)

        torch.Tensor.tolist = tolist
        self._restore.append((torch.Tensor, "tolist", original))

    def __enter__(self):
        self._hook_triton()
        self._hook_tolist()
        self._mode = _Mode(self)
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        self._mode.__exit__(*exc)
        for owner, name, original in reversed(self._restore):
            setattr(owner, name, original)
        self._restore.clear()
        return False

    def __repr__(self):
        return f"LaunchCounter(launches={self.launches}, syncs={self.syncs}, ops={dict(self.ops.most_common())})"


def count(fn, *args, **kwargs):
    """Run ``fn(*args, **kwargs)`` under a :class:`LaunchCounter`; returns ``(result, counter)``."""
    with LaunchCounter() as counter:
        result = fn(*args, **kwargs)
    return result, counter


def per_unit(count_small, count_large, units_small, units_large):
    """The slope and intercept of a count measured at two sizes (per layer from 1- and 2-layer models, per step
    from two generation lengths): ``(per unit, rest)``."""
    slope = (count_large - count_small) / (units_large - units_small)
    return slope, count_small - slope * units_small


# ----------------------------------------------------------------------------------------------------------------
# Launches per decode step of the models (tiny widths: the counts do not depend on the width)
# ----------------------------------------------------------------------------------------------------------------
LLAMA_SHAPE = dict(model_type="llama", vocab_size=96, hidden_size=64, intermediate_size=64, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1, eos_token_id=2,
                   pad_token_id=0)
BART_SHAPE = dict(model_type="bart", vocab_size=96, d_model=32, encoder_layers=1, encoder_attention_heads=2,
                  decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=128)


def _ours(kind, layers):
    torch.manual_seed(0)
    if kind == "llama":
        from fusedformers.models.llama import LlamaConfig, LlamaForCausalLM
        return LlamaForCausalLM(LlamaConfig.from_dict(dict(LLAMA_SHAPE, num_hidden_layers=layers))).eval()
    from fusedformers.models.bart import BartConfig, BartForConditionalGeneration
    return BartForConditionalGeneration(BartConfig.from_dict(dict(BART_SHAPE, decoder_layers=layers))).eval()


def _hf(kind, layers):
    import transformers
    torch.manual_seed(0)
    if kind == "llama":
        config = transformers.LlamaConfig(**{k: v for k, v in LLAMA_SHAPE.items() if k != "model_type"},
                                          num_hidden_layers=layers)
        model = transformers.LlamaForCausalLM(config)
    else:
        config = transformers.BartConfig(**{k: v for k, v in BART_SHAPE.items() if k != "model_type"},
                                         decoder_layers=layers)
        model = transformers.BartForConditionalGeneration(config)
    model.set_attn_implementation("sdpa")
    return model.eval()


def _generate(model, kind, new_tokens, settings):
    """One ``generate`` of ``new_tokens`` tokens that cannot stop early, from a padded prompt (LLaMA: left
    padding; BART: a padded source), so that the padding masks' work is counted too."""
    g = torch.Generator().manual_seed(1)
    device = next(model.parameters()).device
    ids = torch.randint(3, 90, (settings.pop("batch", 1), 8), generator=g).to(device)
    mask = torch.ones_like(ids)
    if kind == "llama":
        mask[:, :2] = 0   # left padding
    else:
        mask[:, -2:] = 0  # a padded source
    kwargs = dict(attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **settings)
    if kind == "llama":
        kwargs.update(do_sample=False)
    with torch.no_grad():
        return model.generate(ids, **kwargs)


def launches_per_step(generate_with, steps=(1, 2)):
    """``(launches, host syncs)`` per decode step of ``generate_with(new_tokens)``: the slope between two
    generation lengths (``steps``, so the prefill and the final cut are excluded), with the recorded steps run
    eagerly (a CUDA graph's replay issues the same kernels, but the counter cannot see inside it)."""
    from fusedformers.models.cuda_graph import StepGraph
    StepGraph.enabled = False
    try:
        counters = [count(generate_with, new_tokens)[1] for new_tokens in steps]
    finally:
        StepGraph.enabled = True
    return (per_unit(counters[0].launches, counters[1].launches, *steps)[0],
            per_unit(counters[0].syncs, counters[1].syncs, *steps)[0])


def decode_step_launches(kind, impl="ours", layers=(1, 2), steps=(1, 2), device=None, **settings):
    """Launches and syncs per decode step of ``generate`` (tiny model of ``kind`` "llama" or "bart", ``impl``
    "ours" or "hf"), split into per decoder layer and outside the layers: :func:`launches_per_step` over
    ``steps``, then the slope between two layer counts. ``device``: where the models run (default: CUDA if there
    is one, else the CPU, where the fused kernels need ``TRITON_INTERPRET=1``).

    Returns ``{"per_layer", "outside", "syncs_per_step", "per_step"}`` (the last at ``layers[0]`` layers)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    build = _ours if impl == "ours" else _hf
    per_step, syncs = {}, {}
    for n in layers:
        model = build(kind, n).to(device)
        per_step[n], syncs[n] = launches_per_step(lambda s: _generate(model, kind, s, dict(settings)), steps)
    per_layer, outside = per_unit(per_step[layers[0]], per_step[layers[1]], *layers)
    return {"per_layer": per_layer, "outside": outside, "syncs_per_step": syncs[layers[0]],
            "per_step": per_step[layers[0]]}


def main():
    import os
    os.environ.setdefault("TRITON_INTERPRET", "1")
    cases = [("llama", "ours", {}), ("llama", "ours", {"cache_implementation": "static"}), ("llama", "hf", {}),
             ("bart", "ours", {}), ("bart", "hf", {}), ("bart", "ours", {"num_beams": 4}),
             ("bart", "hf", {"num_beams": 4})]
    for kind, impl, settings in cases:
        r = decode_step_launches(kind, impl, **settings)
        print(f"{kind:6s} {impl:5s} {str(settings):40s} per layer {r['per_layer']:6.2f}  outside {r['outside']:6.2f}  "
              f"syncs/step {r['syncs_per_step']:5.2f}", flush=True)


if __name__ == "__main__":
    main()

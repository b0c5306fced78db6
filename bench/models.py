"""Whole models in bf16, ours beside Hugging Face transformers (``attn_implementation="sdpa"``), both loaded from
the same random checkpoint that transformers writes with ``save_pretrained`` to a temporary directory.

- Llama-3.2-1B-shaped (hidden 2048, 16 layers, 32 heads / 8 KV heads, ffn 8192, vocab 128256, tied embeddings,
  rope_theta 500000): prefill B=8 x 512 (logits of the last position, KV cache filled); greedy 128 new tokens
  for B=1 (prompt 128) and B=8 (prompt 512, row 0 left-padded by a quarter), HF with its default dynamic cache
  and with ``cache_implementation="static"`` (HF then compiles its decode step itself); ours with its default
  loop, and again with ``cache_implementation="static"`` (each decode step replayed as one CUDA graph).
- BART-large-shaped (d_model 1024, 12+12 layers, 16 heads, ffn 4096, vocab 50265): greedy B=8, source 512
  (row 0 half padding) -> 64 new tokens; beam 4, B=4; a training step B=8, source 512, target 128 (forward +
  backward of the loss, no optimizer; dropout as configured, 0.1, in both), and the same step with
  attention_dropout 0.1 as well, as a checkpoint or fine-tuning config that sets it trains (ours drops in the
  kernel; HF's sdpa path passes dropout_p to SDPA).

Figures are tok/s: new tokens x B per second for generate, prompt tokens per second for prefill,
(source + target) tokens per second for the training step. Before timing, each generate runs once per
implementation and the new tokens are compared with ours (random weights in bf16 have near-ties, so a late
divergence can be numerics, not a bug; the HF-static-vs-HF-dynamic comparison shows how much HF differs from
itself).
"""
import gc
import tempfile

import torch

from fusedformers.bench.common import Case, describe_error, print_error
from fusedformers.bench.launches import launches_per_step

NAME = "models"
MODES = ("model",)
LLAMA_PAD = 0

LLAMA_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
                tie_word_embeddings=True, pad_token_id=LLAMA_PAD, bos_token_id=1, eos_token_id=2)
BART_LARGE = dict(vocab_size=50265, d_model=1024, encoder_layers=12, decoder_layers=12, encoder_attention_heads=16,
                  decoder_attention_heads=16, encoder_ffn_dim=4096, decoder_ffn_dim=4096, max_position_embeddings=1024)

# tiny stand-ins for --dry-run (the same code paths on CPU, through Triton's interpreter)
LLAMA_TINY = dict(LLAMA_1B, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=128, max_position_embeddings=256)
BART_TINY = dict(BART_LARGE, vocab_size=128, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                 decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=128)


def shapes(quick):
    """One case per entry (the same in --quick: the models are the point of the part)."""
    return [
        dict(model="llama", task="prefill", B=8, prompt=512),
        dict(model="llama", task="greedy", B=1, prompt=128, new=128),
        dict(model="llama", task="greedy", B=8, prompt=512, new=128),
        dict(model="llama", task="greedy", B=1, prompt=128, new=128, ours_cache="static"),
        dict(model="llama", task="greedy", B=8, prompt=512, new=128, ours_cache="static"),
        dict(model="bart", task="greedy", B=8, source=512, new=64),
        dict(model="bart", task="greedy", B=8, source=512, new=64, ours_cache="static"),
        dict(model="bart", task="beam4", B=4, source=512, new=64),
        dict(model="bart", task="beam4", B=4, source=512, new=64, ours_cache="static"),
        dict(model="bart", task="train", B=8, source=512, target=128),
        dict(model="bart", task="train", B=8, source=512, target=128, attention_dropout=0.1),
    ]


# the proof: Llama-3.2-1B-shaped greedy decoding, ours with its default and its static cache
PROOF_SHAPES = [dict(model="llama", task="greedy", B=1, prompt=128, new=64),
                dict(model="llama", task="greedy", B=1, prompt=128, new=64, ours_cache="static",
                     impls=("ours", "hf_sdpa")),
                dict(model="bart", task="beam4", B=4, source=512, new=32, ours_cache="static",
                     impls=("ours", "hf_sdpa"))]

DRY_RUN_SHAPES = [
    dict(model="llama", task="prefill", B=2, prompt=16),
    dict(model="llama", task="greedy", B=1, prompt=8, new=3),
    dict(model="llama", task="greedy", B=2, prompt=12, new=3),
    dict(model="llama", task="greedy", B=2, prompt=12, new=3, ours_cache="static"),
    dict(model="bart", task="greedy", B=2, source=16, new=3),
    dict(model="bart", task="beam4", B=2, source=16, new=3),
    dict(model="bart", task="beam4", B=1, source=8, new=2, ours_cache="static", impls=("ours", "hf_sdpa")),
    dict(model="bart", task="train", B=2, source=16, target=8),
    dict(model="bart", task="train", B=2, source=16, target=8, attention_dropout=0.1),
]


# ------------------------------------------------------------------------------------------ the HF baselines
def hf_load(cls, model_dir, device):
    """transformers' from_pretrained, bf16, PyTorch SDPA attention."""
    return cls.from_pretrained(model_dir, dtype=torch.bfloat16, attn_implementation="sdpa").to(device).eval()


def hf_llama_prefill(model, ids, mask, positions):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                     logits_to_keep=1).logits


def hf_llama_greedy(model, ids, mask, new_tokens, static_cache=False):
    extra = {"cache_implementation": "static"} if static_cache else {}
    return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                          do_sample=False, pad_token_id=LLAMA_PAD, **extra)


def hf_bart_generate(model, ids, mask, new_tokens, beams, static_cache=False):
    extra = {"cache_implementation": "static"} if static_cache else {}
    return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                          num_beams=beams, do_sample=False, early_stopping=False, **extra)


def train_step(model, ids, mask, labels):
    """Forward with labels, then backward of the loss (HF's and ours take the same arguments)."""
    model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()


# ------------------------------------------------------------------------------------------------- ours
def ours_llama_prefill(model, ids, mask, positions):
    with torch.no_grad():
        return model(ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1).logits


def ours_llama_greedy(model, ids, mask, new_tokens, cache_implementation=None):
    return model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                          do_sample=False, pad_token_id=LLAMA_PAD, cache_implementation=cache_implementation)


def ours_bart_generate(model, ids, mask, new_tokens, beams, cache_implementation=None):
    return model.generate(ids, attention_mask=mask, num_beams=beams, max_new_tokens=new_tokens,
                          min_new_tokens=new_tokens, early_stopping=False, cache_implementation=cache_implementation)


# ------------------------------------------------------------------------------------------------- loading
class _Loaded:
    """The pair (ours, HF) of the model in use; loading the other model frees this one."""
    kind = None
    ours = hf = None
    tmp = None


def _save_random(kind, config, device):
    import transformers
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    cls = transformers.LlamaForCausalLM if kind == "llama" else transformers.BartForConditionalGeneration
    config_cls = transformers.LlamaConfig if kind == "llama" else transformers.BartConfig
    torch.manual_seed(0)
    with torch.device(device):
        model = cls(config_cls(**config))
    tmp = tempfile.TemporaryDirectory(prefix=f"bench-{kind}-")
    model.to(torch.bfloat16).save_pretrained(tmp.name)
    del model
    return cls, tmp


def release():
    if _Loaded.tmp is not None:
        _Loaded.tmp.cleanup()
    _Loaded.kind = _Loaded.ours = _Loaded.hf = _Loaded.tmp = None
    torch._dynamo.reset()  # HF's static-cache generate compiled graphs (and CUDA graphs) that hold the model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def load(kind, runner):
    if _Loaded.kind == kind:
        return _Loaded.ours, _Loaded.hf
    release()
    config = (LLAMA_1B if kind == "llama" else BART_LARGE) if not runner.dry_run else (
        LLAMA_TINY if kind == "llama" else BART_TINY)
    hf_cls, tmp = _save_random(kind, config, runner.device)
    if kind == "llama":
        from fusedformers.models.llama import LlamaForCausalLM as Ours
    else:
        from fusedformers.models.bart import BartForConditionalGeneration as Ours
    _Loaded.hf = hf_load(hf_cls, tmp.name, runner.device)
    _Loaded.ours = Ours.from_pretrained(tmp.name, dtype=torch.bfloat16, device=runner.device)
    _Loaded.kind, _Loaded.tmp = kind, tmp
    return _Loaded.ours, _Loaded.hf


finish = release  # called once the part is done


# ------------------------------------------------------------------------------------------------- checks
def compare_tokens(ours, theirs, prompt_len):
    """'yes', or where the new tokens first differ."""
    a, b = ours[:, prompt_len:], theirs[:, prompt_len:]
    if a.shape != b.shape:
        return f"no: shapes {tuple(a.shape)} vs {tuple(b.shape)}"
    equal = a == b
    if bool(equal.all()):
        return "yes"
    rows_equal = int(equal.all(dim=1).sum())
    first = min(int((~row).nonzero()[0]) for row in equal if not bool(row.all()))
    return (f"no: {rows_equal}/{a.shape[0]} rows equal, {int(equal.sum())}/{equal.numel()} tokens, "
            f"first difference at new token {first}")


def _token_check(case, outputs_of, prompt_len, counted=None):
    """Run each implementation once (its warm-up), compare the tokens with ours and HF static with HF. One that
    fails here is marked skipped, so the timing does not pay for (say) a failing compile a second time.
    ``counted``: {name: generate_with(new_tokens)} whose launches per step are recorded too."""
    def check():
        outputs = {}
        for name in case.impls:
            try:
                outputs[name] = outputs_of[name]()
            except Exception as error:
                print_error(case, name, error)
                case.skipped[name] = f"failed in its warm-up call: {describe_error(error)}"
                continue
            case.warm.add(name)
        result = {f"same_tokens_{name}": compare_tokens(outputs["ours"], out, prompt_len)
                  for name, out in outputs.items() if name != "ours" and "ours" in outputs}
        if "hf_sdpa_static" in outputs and "hf_sdpa" in outputs:
            result["hf_static_vs_hf_sdpa"] = compare_tokens(outputs["hf_sdpa_static"], outputs["hf_sdpa"], prompt_len)
        for name, generate_with in (counted or {}).items():
            try:
                launches, syncs = launches_per_step(generate_with)
            except Exception as error:
                print_error(case, f"{name} launch count", error)
                continue
            result.update({f"launches_per_step_{name}": launches, f"syncs_per_step_{name}": syncs})
        return result
    return check


# ------------------------------------------------------------------------------------------------- cases
def _random_ids(batch, length, vocab, device, low=3):
    return torch.randint(low, vocab, (batch, length), device=device)


def _llama_cases(spec, runner):
    ours, hf = load("llama", runner)
    device, batch, prompt = runner.device, spec["B"], spec["prompt"]
    ids = _random_ids(batch, prompt, hf.config.vocab_size, device)
    mask = torch.ones_like(ids)
    if batch > 1:
        mask[0, : prompt // 4] = 0
        ids = ids.masked_fill(mask == 0, LLAMA_PAD)
    padded = " (row 0 left-padded 25%)" if batch > 1 else ""
    shape = dict(spec, dtype="bf16", layers=hf.config.num_hidden_layers, hidden=hf.config.hidden_size)
    if spec["task"] == "prefill":
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        impls = {"ours": lambda: ours_llama_prefill(ours, ids, mask, positions),
                 "hf_sdpa": lambda: hf_llama_prefill(hf, ids, mask, positions)}

        def check():
            diff = (impls["ours"]().float() - impls["hf_sdpa"]().float()).abs().max().item()
            return {"max_abs_diff_last_logits_vs_hf": diff}

        label = f"llama prefill B={batch} x {prompt}{padded}"
        return Case(NAME, "prefill", label, label, None, shape, impls, "tok/s", batch * prompt, check=check,
                    rep_ms=1000)
    new = spec["new"]
    ours_cache = spec.get("ours_cache")
    impls = {"ours": lambda: ours_llama_greedy(ours, ids, mask, new, ours_cache),
             "hf_sdpa": lambda: hf_llama_greedy(hf, ids, mask, new),
             "hf_sdpa_static": lambda: hf_llama_greedy(hf, ids, mask, new, static_cache=True)}
    label = f"llama greedy B={batch} prompt {prompt} +{new}{padded}"
    if ours_cache == "static":
        label += " (ours: static cache, CUDA graph)"
    case = Case(NAME, "generate", label, label, None, shape, impls, "tok/s", batch * new, wall_clock=True)
    counted = {"ours": lambda n: ours_llama_greedy(ours, ids, mask, n, ours_cache),
               "hf_sdpa": lambda n: hf_llama_greedy(hf, ids, mask, n)}
    case.check = _token_check(case, impls, prompt, counted)
    return case


def _set_attention_dropout(ours, hf, p):
    """Each case sets its own attention dropout on both models (HF's BartAttention keeps it as ``dropout``)."""
    from fusedformers.models.bart import BartAttention
    for module in ours.modules():
        if isinstance(module, BartAttention):
            module.attention_dropout = p
    for module in hf.modules():
        if type(module).__name__ == "BartAttention":
            module.dropout = p


def _bart_cases(spec, runner):
    ours, hf = load("bart", runner)
    _set_attention_dropout(ours, hf, spec.get("attention_dropout", 0.0))
    device, batch, source = runner.device, spec["B"], spec["source"]
    vocab, pad = hf.config.vocab_size, hf.config.pad_token_id
    ids = _random_ids(batch, source, vocab, device)
    mask = torch.ones_like(ids)
    mask[0, source // 2:] = 0
    ids = ids.masked_fill(mask == 0, pad)
    shape = dict(spec, dtype="bf16", layers=hf.config.encoder_layers, d_model=hf.config.d_model)
    if spec["task"] == "train":
        ours.train()
        hf.train()
        labels = _random_ids(batch, spec["target"], vocab, device)
        impls = {"ours": lambda: train_step(ours, ids, mask, labels),
                 "hf_sdpa": lambda: train_step(hf, ids, mask, labels)}
        params = list(ours.parameters()) + list(hf.parameters())

        def check():
            with torch.no_grad():
                losses = {name: float(model(input_ids=ids, attention_mask=mask, labels=labels).loss)
                          for name, model in (("ours", ours), ("hf_sdpa", hf))}
            return {f"loss_{name}": value for name, value in losses.items()}

        with_dropout = f", attention_dropout {spec['attention_dropout']}" if spec.get("attention_dropout") else ""
        label = f"bart train step B={batch} src {source} tgt {spec['target']} (row 0 half padded{with_dropout})"
        return Case(NAME, "train", label, label, None, shape, impls, "tok/s", batch * (source + spec["target"]),
                    grad_to_none=params, check=check, rep_ms=1000)
    ours.eval()
    hf.eval()
    beams = 4 if spec["task"] == "beam4" else 1
    new = spec["new"]
    ours_cache = spec.get("ours_cache")
    impls = {"ours": lambda: ours_bart_generate(ours, ids, mask, new, beams, ours_cache),
             "hf_sdpa": lambda: hf_bart_generate(hf, ids, mask, new, beams)}
    if ours_cache == "static":
        impls["hf_sdpa_static"] = lambda: hf_bart_generate(hf, ids, mask, new, beams, static_cache=True)
    label = f"bart {'beam 4' if beams > 1 else 'greedy'} B={batch} src {source} +{new} (row 0 half padded)"
    if ours_cache == "static":
        label += " (ours: static cache, recorded step)"
    case = Case(NAME, "generate", label, label, None, shape, impls, "tok/s", batch * new, wall_clock=True)
    counted = {"ours": lambda n: ours_bart_generate(ours, ids, mask, n, beams, ours_cache),
               "hf_sdpa": lambda n: hf_bart_generate(hf, ids, mask, n, beams)}
    case.check = _token_check(case, impls, 1, counted)  # the decoder prompt is decoder_start_token_id
    return case


def cases(spec, runner):
    yield (_llama_cases if spec["model"] == "llama" else _bart_cases)(spec, runner)

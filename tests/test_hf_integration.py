"""Stock transformers models on the kernels (fusedformers.models.hf): attn_implementation="fusedformers" against
"sdpa" on the same weights, from tiny random checkpoints saved by transformers and loaded back.

Every fused run makes HF's sdpa fallback raise (``fused_only``), so a pass means every attention call ran on the
kernel; the fallback tests check the opposite (one warning, sdpa's exact result). Logits follow the accuracy rule
of tests/helpers.py against the same model in float64 (sdpa): the fused error at most 2x sdpa's error in the same
dtype plus a small slack, on the real (unpadded) query positions (HF's padded query rows are garbage by design).
"""
import sys
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

from fusedformers.models import hf, layers  # noqa: E402
from tests.conftest import DEVICE  # noqa: E402
from tests.helpers import assert_within_eager_error, dtype_id  # noqa: E402

transformers.logging.set_verbosity_error()

# tiny decoder-only configs: GQA (4 query heads over 2 K/V heads), head dim 16, weights wider than HF's init so
# that greedy tokens are not decided by rounding
DECODER = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
               eos_token_id=2, initializer_range=0.2, tie_word_embeddings=False)
CAUSAL_FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {}),  # sliding_window 4096: every key inside the window
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {}),  # q/k RMSNorm
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {"hidden_activation": "gelu_pytorch_tanh"}),  # 1 + weight norms
    # local/global layers (window 4096: every key inside), query_pre_attn_scalar scaling; softcap: see below
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"attn_logit_softcapping": None}),
}
SEQ2SEQ = dict(vocab_size=96, d_model=32, encoder_layers=2, decoder_layers=1, encoder_attention_heads=2,
               decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
               pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2, init_std=0.5,
               forced_eos_token_id=None)
SEQ2SEQ_FAMILIES = {
    "bart": ("BartConfig", "BartForConditionalGeneration", {}),
    "mbart": ("MBartConfig", "MBartForConditionalGeneration", {}),
    "marian": ("MarianConfig", "MarianMTModel", {"decoder_start_token_id": 1}),
    "pegasus": ("PegasusConfig", "PegasusForConditionalGeneration", {"decoder_start_token_id": 1}),
}


# --- checkpoints and models --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """``checkpoint(family, **overrides)``: the directory of a tiny random model saved by transformers (one per
    family and overrides in this module). Norm weights are drawn away from their init, so Gemma's ``1 + weight``
    and every norm's scale matter."""
    saved = {}

    def make(family, **overrides):
        key = (family, tuple(sorted(overrides.items())))
        if key not in saved:
            config_name, model_name, extra = {**CAUSAL_FAMILIES, **SEQ2SEQ_FAMILIES}[family]
            base = SEQ2SEQ if family in SEQ2SEQ_FAMILIES else DECODER
            config = getattr(transformers, config_name)(**{**base, **extra, **overrides})
            torch.manual_seed(0)
            model = getattr(transformers, model_name)(config)
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if "norm" in name:
                        p.add_(torch.randn_like(p) * 0.3)
            saved[key] = str(tmp_path_factory.mktemp(family))
            model.save_pretrained(saved[key])
        return saved[key]

    return make


def load(path, attn, dtype=torch.float32, seq2seq=False):
    auto = transformers.AutoModelForSeq2SeqLM if seq2seq else transformers.AutoModelForCausalLM
    return auto.from_pretrained(path, attn_implementation=attn, dtype=dtype).to(DEVICE).eval()


@pytest.fixture
def fused_only(monkeypatch):
    """Registers "fusedformers", makes its sdpa fallback raise and records the kernel calls (their keyword
    arguments): a test using it proves that every attention call ran on the kernel."""
    hf.register()
    calls = []
    kernel = hf.attention

    def counted(q, k, v, **kwargs):
        calls.append(dict(kwargs, q_len=q.shape[2], k_len=k.shape[2]))
        return kernel(q, k, v, **kwargs)

    def no_fallback(*args, **kwargs):
        raise AssertionError("the fusedformers attention fell back to HF's sdpa")

    monkeypatch.setattr(hf, "attention", counted)
    monkeypatch.setattr(transformers.integrations.sdpa_attention, "sdpa_attention_forward", no_fallback)
    return calls


@pytest.fixture
def fresh_warnings(monkeypatch):
    """Forget the warnings already given in this process (each fallback reason warns once)."""
    monkeypatch.setattr(layers, "_warned", set())
    hf.register()


def padded_batch(kind, batch=3, length=9, vocab=96, pad=0, seed=0):
    """input_ids, attention_mask ``[B, L]``: row 0 full, later rows 2 and 5 tokens shorter, padded on ``kind``."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    for row in range(1, batch):
        short = 2 + 3 * (row - 1)
        if kind == "left":
            mask[row, :short] = 0
        else:
            mask[row, length - short:] = 0
    return ids.masked_fill(mask == 0, pad).to(DEVICE), mask.to(DEVICE)


def real_rows(logits, mask):
    return logits[mask.bool()]


def loss_and_gradients(model, **inputs):
    """One training step of ``model`` (train mode) on ``inputs``: (loss, {parameter name: gradient})."""
    loss = model.train()(**inputs).loss
    loss.backward()
    return loss.detach(), {name: p.grad for name, p in model.named_parameters() if p.grad is not None}


def assert_same_generation(ours, sdpa, ids, settings):
    """The same tokens from HF's generate, and close step scores (tiny random models repeat tokens, so the
    scores carry most of the signal)."""
    settings = dict(settings, return_dict_in_generate=True, output_scores=True)
    expected, result = sdpa.generate(ids, **settings), ours.generate(ids, **settings)
    assert result.sequences.tolist() == expected.sequences.tolist(), settings
    torch.testing.assert_close(torch.stack(result.scores), torch.stack(expected.scores), rtol=1e-4, atol=1e-4)


# --- decoder-only families ---------------------------------------------------------------------------------------

# every family in float32 and float16 with left and right padding; bfloat16 once
LOGITS_CASES = [pytest.param(family, dtype, padding, id=f"{family}-{dtype_id(dtype)}-{padding}")
                for family in CAUSAL_FAMILIES for dtype in (torch.float32, torch.float16)
                for padding in ("left", "right")]
LOGITS_CASES.append(pytest.param("llama", torch.bfloat16, "left", id="llama-bf16-left"))


@pytest.mark.parametrize("family, dtype, padding", LOGITS_CASES)
def test_causal_lm_logits(family, dtype, padding, checkpoint, fused_only):
    path = checkpoint(family)
    ids, mask = padded_batch(padding)
    with torch.no_grad():
        ref64 = load(path, "sdpa", torch.float64)(ids, attention_mask=mask).logits
        sdpa = load(path, "sdpa", dtype)(ids, attention_mask=mask).logits
        ours = load(path, hf.NAME, dtype)(ids, attention_mask=mask).logits
    assert len(fused_only) == DECODER["num_hidden_layers"]
    assert all(call["causal"] and call["key_padding_mask"] is not None for call in fused_only)
    assert_within_eager_error(f"{family} logits", real_rows(ours, mask), real_rows(ref64, mask),
                              real_rows(sdpa, mask))


@pytest.mark.parametrize("family", list(CAUSAL_FAMILIES))
def test_causal_lm_greedy_tokens(family, checkpoint, fused_only):
    """Left-padded batch, HF's generate with its DynamicCache: prefill, then decode steps of one query."""
    path = checkpoint(family)
    ids, mask = padded_batch("left")
    settings = dict(attention_mask=mask, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    assert_same_generation(load(path, hf.NAME), load(path, "sdpa"), ids, settings)
    decode_steps = [call for call in fused_only if call["q_len"] == 1]
    assert len(decode_steps) == 5 * DECODER["num_hidden_layers"]
    assert [call["past_len"] for call in decode_steps[::2]] == [9, 10, 11, 12, 13]


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_static_cache_generate(family, checkpoint, fused_only):
    """HF's StaticCache: keys are the whole preallocated cache, the unwritten slots padding (not compiled on CPU).
    Mistral's sliding-window mask (window longer than the sequence) stays on the kernel in the decode steps."""
    path = checkpoint(family)
    ids, mask = padded_batch("left")
    # disable_compile: compiled decode steps are test_static_cache_generate_compiled's
    settings = dict(attention_mask=mask, max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0,
                    cache_implementation="static", disable_compile=True)
    expected = load(path, "sdpa").generate(ids, **settings)
    tokens = load(path, hf.NAME).generate(ids, **settings)
    assert tokens.tolist() == expected.tolist()
    # every call sees the whole preallocated cache (prompt + new tokens - 1), the unwritten slots as padding: the
    # prefill is causal; a decode step's one query sees the keys up to its own position, by the causal offset or
    # (a StaticCache's position is a device tensor) by the padding mask alone
    calls = fused_only[::2]
    assert [(call["q_len"], call["k_len"]) for call in calls] == [(9, 13)] + [(1, 13)] * 4
    assert calls[0]["causal"] and calls[0]["past_len"] == 0

    def keys_seen_by_row_0(call):
        padding = call["key_padding_mask"][0].bool()
        return int(padding[:call["past_len"] + 1].sum() if call["causal"] else padding.sum())
    assert [keys_seen_by_row_0(call) for call in calls[1:]] == [10, 11, 12, 13]


def test_static_cache_generate_compiled(checkpoint, fused_only):
    """HF compiles a static cache's decode steps (on CUDA by itself; here asked to on CPU): with fullgraph=True the
    forward traces through the fusedformers mask and the kernels' custom ops without a graph break, and the tokens
    are sdpa's."""
    path = checkpoint("llama")
    ids, mask = padded_batch("left")
    compile_config = transformers.CompileConfig(fullgraph=True, backend="aot_eager", mode=None)
    compile_config._compile_all_devices = True  # HF's switch to compile off CUDA too (a class attribute)
    settings = dict(attention_mask=mask, max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0,
                    cache_implementation="static")
    expected = load(path, "sdpa").generate(ids, **settings, disable_compile=True)
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    tokens = load(path, hf.NAME).generate(ids, **settings, compile_config=compile_config)
    assert tokens.tolist() == expected.tolist()
    assert counters["stats"]["unique_graphs"] >= 1 and not counters["graph_break"], dict(counters)


def test_sampling_tokens(checkpoint, fused_only):
    path = checkpoint("qwen2")
    ids, mask = padded_batch("left", batch=2)
    settings = dict(attention_mask=mask, max_new_tokens=5, do_sample=True, top_k=8, pad_token_id=0)
    torch.manual_seed(3)
    expected = load(path, "sdpa").generate(ids, **settings)
    torch.manual_seed(3)
    tokens = load(path, hf.NAME).generate(ids, **settings)
    assert tokens.tolist() == expected.tolist()


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma"])
def test_causal_lm_loss_and_gradients(family, checkpoint, fused_only):
    """Training step (train mode, attention dropout 0) on a right-padded batch: loss and every parameter's
    gradient against float64, the accuracy rule with sdpa's float32 error."""
    path = checkpoint(family)
    ids, mask = padded_batch("right")
    labels = ids.masked_fill(mask == 0, -100)

    def loss_and_grads(attn, dtype):
        return loss_and_gradients(load(path, attn, dtype), input_ids=ids, attention_mask=mask, labels=labels)

    loss64, grads64 = loss_and_grads("sdpa", torch.float64)
    loss_sdpa, grads_sdpa = loss_and_grads("sdpa", torch.float32)
    loss, grads = loss_and_grads(hf.NAME, torch.float32)
    assert any(call["q_len"] > 1 for call in fused_only)
    assert_within_eager_error("loss", loss, loss64, loss_sdpa)
    assert grads.keys() == grads64.keys()
    for name in grads64:
        assert_within_eager_error(f"grad {name}", grads[name], grads64[name], grads_sdpa[name])


def test_gradient_checkpointing(checkpoint, fused_only):
    """HF's gradient checkpointing recomputes the layers with the mask object: the same loss and gradients."""
    path = checkpoint("llama")
    ids, mask = padded_batch("right")
    results = []
    for checkpointing in (False, True):
        model = load(path, hf.NAME).train()
        if checkpointing:
            model.gradient_checkpointing_enable()
        loss = model(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
        loss.backward()
        results.append([loss.detach()] + [p.grad for p in model.parameters()])
    calls = len(fused_only)
    assert calls == 2 * DECODER["num_hidden_layers"] + DECODER["num_hidden_layers"]  # + one recompute per layer
    for plain, recomputed in zip(*results):
        torch.testing.assert_close(recomputed, plain, rtol=0, atol=0)


@pytest.mark.parametrize("family", ["bert", "vit"])
def test_encoder_models(family, tmp_path, fused_only):
    """Encoder-only models: BERT's bidirectional padding mask; ViT makes no mask at all (None: HF sdpa's rule,
    non-causal from the module)."""
    torch.manual_seed(0)
    common = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                  initializer_range=0.2)
    if family == "bert":
        model = transformers.BertModel(transformers.BertConfig(vocab_size=96, **common))
        ids, mask = padded_batch("right")
        inputs, rows = dict(input_ids=ids, attention_mask=mask), mask.bool()
    else:
        model = transformers.ViTModel(transformers.ViTConfig(image_size=16, patch_size=4, **common))
        inputs, rows = dict(pixel_values=torch.randn(2, 3, 16, 16, device=DEVICE)), slice(None)
    model.save_pretrained(tmp_path)
    cls = type(model)

    def run(attn, dtype):
        loaded = cls.from_pretrained(tmp_path, attn_implementation=attn, dtype=dtype).to(DEVICE).eval()
        cast = {name: x.to(dtype) if x.is_floating_point() else x for name, x in inputs.items()}
        with torch.no_grad():
            return loaded(**cast).last_hidden_state[rows]

    ref64, sdpa, ours = run("sdpa", torch.float64), run("sdpa", torch.float32), run(hf.NAME, torch.float32)
    assert len(fused_only) == 2 and not any(call["causal"] for call in fused_only)
    assert all((call["key_padding_mask"] is not None) == (family == "bert") for call in fused_only)
    assert_within_eager_error(f"{family} hidden states", ours, ref64, sdpa)


def test_attention_dropout_in_training(checkpoint, fused_only):
    """attention_dropout reaches the kernel in train mode (its own Philox stream: reproducible under
    torch.manual_seed, not sdpa's masks) and is off in eval mode."""
    model = load(checkpoint("llama", attention_dropout=0.5), hf.NAME).train()
    ids, mask = padded_batch("left")
    outputs = []
    for seed in (5, 5, 6):
        torch.manual_seed(seed)
        outputs.append(model(ids, attention_mask=mask).logits.detach())
    assert {call["dropout_p"] for call in fused_only} == {0.5}
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=0)
    assert not torch.allclose(outputs[0], outputs[2])
    model.eval()
    with torch.no_grad():
        model(ids, attention_mask=mask)
    assert fused_only[-1]["dropout_p"] == 0.0


# --- fallbacks ---------------------------------------------------------------------------------------------------

def fallback_warnings(record):
    return [str(w.message) for w in record if f"attn_implementation='{hf.NAME}'" in str(w.message)]


# windows shorter than the 9-token prompt: Mistral's sliding_window, Qwen2's use_sliding_window (every layer from
# max_window_layers on), Gemma 2's local layers (every other one)
WINDOW_FAMILIES = {
    "mistral": dict(sliding_window=4),
    "qwen2": dict(use_sliding_window=True, sliding_window=4, max_window_layers=0),
    "gemma2": dict(sliding_window=4),
}


@pytest.mark.parametrize("family", list(WINDOW_FAMILIES))
def test_sliding_window_shorter_than_the_sequence(family, checkpoint, fused_only):
    """A sliding window that hides keys runs on the kernel's window (HF's ``sliding_window = W`` is the kernel's
    ``window = W - 1``): the logits of sdpa (2x rule against float64) with left padding, no fallback."""
    path = checkpoint(family, **WINDOW_FAMILIES[family])
    ids, mask = padded_batch("left")
    with torch.no_grad():
        ref64 = load(path, "sdpa", torch.float64)(ids, attention_mask=mask).logits
        sdpa = load(path, "sdpa")(ids, attention_mask=mask).logits
        ours = load(path, hf.NAME)(ids, attention_mask=mask).logits
    assert_within_eager_error(f"{family} logits", real_rows(ours, mask), real_rows(ref64, mask),
                              real_rows(sdpa, mask))
    windows = [call["window"] for call in fused_only]
    assert 3 in windows and all(window in (None, 3) for window in windows), windows


def test_sliding_window_greedy_tokens(checkpoint, fused_only):
    """Mistral with a window shorter than the sequence under HF's generate (prefill, then decode steps whose window
    hides the oldest keys of its cache): sdpa's tokens and scores, every call on the kernel."""
    path = checkpoint("mistral", sliding_window=4)
    ids, mask = padded_batch("left")
    settings = dict(attention_mask=mask, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    assert_same_generation(load(path, hf.NAME), load(path, "sdpa"), ids, settings)
    assert all(call["window"] == 3 for call in fused_only if call["q_len"] + call["past_len"] > 4)


def test_bidirectional_sliding_window_and_chunks_fall_back(fresh_warnings):
    """What the kernel has no window for: a bidirectional sliding window, and chunked attention whose chunk some
    key falls outside of, run HF's sdpa on HF's mask (one warning each); HF's sliding-window causal mask does not."""
    from transformers import masking_utils

    args = dict(batch_size=1, q_length=8, kv_length=8, attention_mask=None, local_size=4)
    sliding = hf.fused_mask(mask_function=masking_utils.sliding_window_causal_mask_function(4), **args)
    assert (sliding.causal, sliding.window, sliding.fallback_reason) == (True, 3, None)
    bidirectional = hf.fused_mask(mask_function=masking_utils.sliding_window_bidirectional_mask_function(4), **args)
    assert "bidirectional sliding window" in bidirectional.fallback_reason
    chunked = hf.fused_mask(mask_function=masking_utils.chunked_causal_mask_function(4, torch.zeros(1)), **args)
    assert "chunked attention" in chunked.fallback_reason
    short = hf.fused_mask(mask_function=masking_utils.chunked_causal_mask_function(8, torch.zeros(1)), **args)
    assert (short.causal, short.window, short.fallback_reason) == (True, None, None)


def test_fallback_softcap_runs_the_models_eager_attention(checkpoint, fresh_warnings):
    """Gemma 2's logit softcapping (HF's sdpa drops it): the model's own eager attention, on HF's eager mask."""
    path = checkpoint("gemma2", attn_logit_softcapping=5.0)
    ids, mask = padded_batch("left")
    with torch.no_grad():
        expected = load(path, "eager")(ids, attention_mask=mask).logits
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            logits = load(path, hf.NAME)(ids, attention_mask=mask).logits
    messages = fallback_warnings(record)
    assert len(messages) == 1 and "eager attention for attention logit softcapping" in messages[0], messages
    torch.testing.assert_close(logits, expected, rtol=0, atol=0)


def test_fallback_4d_mask_and_packed_sequences(checkpoint, fresh_warnings):
    """A 4-D mask passed by the caller, and packed sequences (positions restarting, no attention mask, no cache:
    HF's rule for detecting them), run HF's sdpa: the logits of attn_implementation="sdpa", one warning per reason."""
    path = checkpoint("llama")
    sdpa, ours = load(path, "sdpa"), load(path, hf.NAME)
    ids, _ = padded_batch("left", batch=2)
    allowed = torch.rand(2, 1, 9, 9, generator=torch.Generator().manual_seed(1)) > 0.3
    allowed |= torch.eye(9, dtype=torch.bool)
    positions = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4]] * 2, device=DEVICE)
    with torch.no_grad(), warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for kwargs in (dict(attention_mask=allowed.to(DEVICE)), dict(position_ids=positions, use_cache=False)):
            torch.testing.assert_close(ours(ids, **kwargs).logits, sdpa(ids, **kwargs).logits, rtol=0, atol=0)
    messages = fallback_warnings(record)
    assert len(messages) == 2, messages
    assert "4-D" in messages[0] and "packed" in messages[1]


def test_fallback_softcap_and_bias(fresh_warnings):
    """Softcap and an additive position bias reach HF's sdpa function unchanged."""
    q, k, v = (torch.randn(1, 2, 5, 16, device=DEVICE) for _ in range(3))
    module = torch.nn.Module()
    expected = transformers.integrations.sdpa_attention.sdpa_attention_forward(module, q, k, v, None)[0]
    for kwargs in (dict(softcap=30.0), dict(position_bias=torch.zeros(1, 2, 5, 5, device=DEVICE))):
        with pytest.warns(UserWarning, match="runs HF's sdpa"):
            out, _ = hf.fused_attention_forward(module, q, k, v, None, **kwargs)
        torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_without_transformers_a_clear_error(monkeypatch):
    """transformers is imported when called, not when fusedformers.models.hf is imported."""
    monkeypatch.setitem(sys.modules, "transformers", None)
    for call in (hf.register, lambda: hf.apply(torch.nn.Linear(2, 2))):
        with pytest.raises(ImportError, match="needs Hugging Face transformers >= 5"):
            call()


def test_register_is_idempotent_and_names_both_interfaces():
    from transformers import masking_utils, modeling_utils
    hf.register()
    hf.register()
    assert modeling_utils.ALL_ATTENTION_FUNCTIONS[hf.NAME] is hf.fused_attention_forward
    assert masking_utils.ALL_MASK_ATTENTION_FUNCTIONS[hf.NAME] is hf.fused_mask


# --- encoder-decoder families ------------------------------------------------------------------------------------

def seq2seq_batch(batch=3, seed=0):
    """Right-padded source ``[B, 8]`` (pad 1)."""
    return padded_batch("right", batch=batch, length=8, pad=1, seed=seed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=dtype_id)
@pytest.mark.parametrize("family", list(SEQ2SEQ_FAMILIES))
def test_seq2seq_logits(family, dtype, checkpoint, fused_only):
    """Encoder self-attention (padding, non-causal), decoder self-attention (causal, padded decoder inputs) and
    cross-attention (the encoder's padding), one forward with labels."""
    path = checkpoint(family)
    ids, mask = seq2seq_batch()
    decoder_ids, decoder_mask = padded_batch("right", batch=3, length=6, pad=1, seed=1)
    inputs = dict(attention_mask=mask, decoder_input_ids=decoder_ids, decoder_attention_mask=decoder_mask)
    with torch.no_grad():
        ref64 = load(path, "sdpa", torch.float64, seq2seq=True)(ids, **inputs).logits
        sdpa = load(path, "sdpa", dtype, seq2seq=True)(ids, **inputs).logits
        ours = load(path, hf.NAME, dtype, seq2seq=True)(ids, **inputs).logits
    kinds = sorted({(call["causal"], call["k_len"]) for call in fused_only})
    assert kinds == [(False, 6), (False, 8), (True, 6)] or kinds == [(False, 8), (True, 6)], kinds
    # encoder self-attention per encoder layer, decoder self- and cross-attention per decoder layer
    assert len(fused_only) == SEQ2SEQ["encoder_layers"] + 2 * SEQ2SEQ["decoder_layers"]
    assert_within_eager_error(f"{family} logits", real_rows(ours, decoder_mask), real_rows(ref64, decoder_mask),
                              real_rows(sdpa, decoder_mask))


# greedy and beam search for BART; beam search (cache reordering, cross-attention over the expanded source) for the
# other families, whose attention code is BART's (time: each generation is ~3 s through the interpreter)
@pytest.mark.parametrize("family, num_beams", [("bart", 1), ("bart", 2), ("mbart", 2), ("marian", 2), ("pegasus", 2)])
def test_seq2seq_generate_tokens(family, num_beams, checkpoint, fused_only):
    path = checkpoint(family)
    ids, mask = seq2seq_batch(batch=2, seed=2)
    settings = dict(attention_mask=mask, max_new_tokens=5, min_new_tokens=5, do_sample=False, num_beams=num_beams,
                    num_return_sequences=num_beams)
    assert_same_generation(load(path, hf.NAME, seq2seq=True), load(path, "sdpa", seq2seq=True), ids, settings)
    cross = [call for call in fused_only if call["q_len"] == 1 and not call["causal"]]
    assert cross and all(call["key_padding_mask"].shape == (2 * num_beams, 8) for call in cross)


def test_seq2seq_loss_and_gradients(checkpoint, fused_only):
    path = checkpoint("bart")
    ids, mask = seq2seq_batch()
    labels, label_mask = padded_batch("right", batch=3, length=6, pad=1, seed=4)
    labels = labels.masked_fill(label_mask == 0, -100)

    def loss_and_grads(attn, dtype):
        model = transformers.AutoModelForSeq2SeqLM.from_pretrained(
            path, attn_implementation=attn, dtype=dtype, dropout=0.0, activation_dropout=0.0).to(DEVICE)
        return loss_and_gradients(model, input_ids=ids, attention_mask=mask, labels=labels)

    loss64, grads64 = loss_and_grads("sdpa", torch.float64)
    loss_sdpa, grads_sdpa = loss_and_grads("sdpa", torch.float32)
    loss, grads = loss_and_grads(hf.NAME, torch.float32)
    assert fused_only
    assert_within_eager_error("loss", loss, loss64, loss_sdpa)
    for name in grads64:
        assert_within_eager_error(f"grad {name}", grads[name], grads64[name], grads_sdpa[name])


# --- apply(model) ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=dtype_id)
@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma"])
def test_apply_swaps_norms_in_place(family, dtype, checkpoint, fused_only, monkeypatch):
    path = checkpoint(family)
    ids, mask = padded_batch("left")
    model = load(path, "sdpa", dtype)
    names = list(model.state_dict())
    norm_calls = []
    kernel = hf.fused_rms_norm
    monkeypatch.setattr(hf, "fused_rms_norm", lambda *args: (norm_calls.append(1), kernel(*args))[1])
    assert hf.apply(model) is model
    assert model.config._attn_implementation == hf.NAME
    assert list(model.state_dict()) == names
    norms = [m for m in model.modules() if isinstance(m, hf.FusedRMSNorm)]
    per_layer = 4 if family == "qwen3" else 2
    assert len(norms) == DECODER["num_hidden_layers"] * per_layer + 1
    with torch.no_grad():
        ours = model(ids, attention_mask=mask).logits
        ref64 = load(path, "sdpa", torch.float64)(ids, attention_mask=mask).logits
        sdpa = load(path, "sdpa", dtype)(ids, attention_mask=mask).logits
    assert len(norm_calls) == len(norms) and len(fused_only) == DECODER["num_hidden_layers"]
    assert_within_eager_error(f"{family} logits", real_rows(ours, mask), real_rows(ref64, mask),
                              real_rows(sdpa, mask))


def test_llama_compiles_fullgraph_on_fusedformers(checkpoint, fused_only):
    """A stock HF Llama on "fusedformers" traces as one graph with no break (the mask object and the kernels'
    custom ops included), and the compiled forward gives the eager forward's logits."""
    model = load(checkpoint("llama"), hf.NAME)
    ids, mask = padded_batch("left")
    with torch.no_grad():
        explanation = torch._dynamo.explain(model)(input_ids=ids, attention_mask=mask)
        assert explanation.graph_break_count == 0 and explanation.graph_count == 1, explanation.break_reasons
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        assert torch.equal(compiled(input_ids=ids, attention_mask=mask).logits,
                           model(input_ids=ids, attention_mask=mask).logits)

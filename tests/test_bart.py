"""fusedformers.models.bart against HF transformers on tiny random checkpoints saved by HF itself.

On CPU the fused kernels run through Triton's interpreter (slow: ~20 ms per program), so the fused path gets a
forward/backward comparison and one greedy + one beam generation; the many generation settings run on the eager
path, which shares every line of the model and search code except the attention call.
"""
import contextlib
import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")

from fusedformers.models import ops  # noqa: E402
from fusedformers.models.bart import BartConfig, BartForConditionalGeneration, shift_tokens_right  # noqa: E402
from tests.helpers import reference_with_kernel_dropout  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TINY = dict(d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
            encoder_ffn_dim=128, decoder_ffn_dim=128, vocab_size=100, max_position_embeddings=64)
PAD, EOS = 1, 2


def make_hf_bart(seed=0, eos_bias=1.5, **overrides):
    """A random HF BART whose greedy/beam outputs depend on the input and sometimes stop early: weights wider
    than HF's init, random LayerNorms and a logits bias that favours eos a little."""
    config = transformers.BartConfig(**{**TINY, "init_std": 0.3, **overrides})
    torch.manual_seed(seed)
    model = transformers.BartForConditionalGeneration(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name or "layernorm" in name:
                p.normal_(1.0 if name.endswith("weight") else 0.0, 0.3)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.1)
        model.model.shared.weight.normal_(0.0, 0.1)
        model.final_logits_bias.normal_(0.0, 0.5)
        model.final_logits_bias[0, EOS] += eos_bias
    return model.eval()


@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory):
    """(directory, HF model on DEVICE) of a tiny BART saved by HF (dropout 0.1, as BART checkpoints have)."""
    model = make_hf_bart()
    path = tmp_path_factory.mktemp("bart") / "tiny"
    model.save_pretrained(path)
    return path, model.to(DEVICE)


@pytest.fixture(scope="module")
def models(hf_checkpoint):
    path, _ = hf_checkpoint
    return {impl: BartForConditionalGeneration.from_pretrained(path, device=DEVICE, attn_implementation=impl)
            for impl in ("fused", "eager")}


@pytest.fixture(scope="module")
def source_batch():
    """input_ids/attention_mask [3, 12], rows right-padded to 12, 8 and 5 tokens (eos last, as tokenizers do)."""
    g = torch.Generator().manual_seed(1234)
    lengths = [12, 8, 5]
    ids = torch.randint(3, TINY["vocab_size"], (3, 12), generator=g)
    mask = torch.zeros(3, 12, dtype=torch.long)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1
        ids[row, n - 1] = EOS
        ids[row, n:] = PAD
    return ids.to(DEVICE), mask.to(DEVICE)


@pytest.fixture(scope="module")
def target_batch():
    """labels [3, 7] with -100 after each row's end, and the matching decoder_attention_mask."""
    g = torch.Generator().manual_seed(99)
    labels = torch.randint(3, TINY["vocab_size"], (3, 7), generator=g)
    decoder_mask = torch.ones(3, 7, dtype=torch.long)
    for row, n in enumerate([7, 4, 6]):
        labels[row, n:] = -100
        decoder_mask[row, n + 1:] = 0  # decoder inputs are labels shifted right: one more real position
    return labels.to(DEVICE), decoder_mask.to(DEVICE)


def assert_close(name, actual, expected, atol=2e-5, rtol=1e-4):
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


# ----------------------------------------------------------------------------------------------------------------
# forward, loss, gradients
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", ["fused", "eager"])
def test_forward_matches_hf(impl, hf_checkpoint, models, source_batch, target_batch):
    _, hf = hf_checkpoint
    model = models[impl]
    ids, mask = source_batch
    labels, decoder_mask = target_batch
    decoder_ids = shift_tokens_right(labels, PAD, model.config.decoder_start_token_id)
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids,
                      decoder_attention_mask=decoder_mask)
        out = model(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids,
                    decoder_attention_mask=decoder_mask)
        from_encoder = model(attention_mask=mask, decoder_input_ids=decoder_ids,
                             decoder_attention_mask=decoder_mask, encoder_outputs=(out.encoder_last_hidden_state,))
    source_real, target_real = mask.bool(), decoder_mask.bool()
    assert_close("encoder output", out.encoder_last_hidden_state[source_real],
                 expected.encoder_last_hidden_state[source_real])
    assert_close("logits", out.logits[target_real], expected.logits[target_real])
    assert torch.equal(from_encoder.logits, out.logits)


def _loss_and_grads(model, ids, mask, labels, seed=None):
    if seed is not None:
        torch.manual_seed(seed)
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    loss.backward()
    grads = model.named_grads() if hasattr(model, "named_grads") else {n: p.grad for n, p in model.named_parameters()}
    return loss.detach(), {name: grad.detach().clone() for name, grad in grads.items()}


@pytest.mark.parametrize("impl", ["fused", "eager"])
def test_loss_and_gradients_match_hf(impl, hf_checkpoint, source_batch, target_batch):
    path, hf = hf_checkpoint
    model = BartForConditionalGeneration.from_pretrained(path, device=DEVICE, attn_implementation=impl)
    ids, mask = source_batch
    labels, _ = target_batch
    # train mode, dropout 0.1: the same seed gives HF's dropout masks (same RNG draws in the same order)
    hf.train()
    try:
        expected_loss, expected_grads = _loss_and_grads(hf, ids, mask, labels, seed=11)
    finally:
        hf.eval()
    model.train()
    loss, grads = _loss_and_grads(model, ids, mask, labels, seed=11)
    assert_close("loss", loss, expected_loss)
    assert set(grads) == set(expected_grads), set(grads) ^ set(expected_grads)
    for name, grad in grads.items():
        scale = expected_grads[name].abs().max().item()
        assert_close(f"grad {name}", grad, expected_grads[name], atol=1e-5 + 1e-4 * scale, rtol=1e-3)


def test_shift_tokens_right_matches_hf(target_batch):
    from transformers.models.bart.modeling_bart import shift_tokens_right as hf_shift
    labels, _ = target_batch
    assert torch.equal(shift_tokens_right(labels, PAD, EOS), hf_shift(labels, PAD, EOS))


def test_relu_and_scaled_embedding_match_hf(tmp_path, source_batch):
    """Another activation and scale_embedding=True, eager path."""
    hf = make_hf_bart(seed=3, activation_function="relu", scale_embedding=True)
    hf.save_pretrained(tmp_path)
    hf = hf.to(DEVICE)
    model = BartForConditionalGeneration.from_pretrained(tmp_path, device=DEVICE, attn_implementation="eager")
    assert model.config.activation_function == "relu" and model.config.scale_embedding
    ids, mask = source_batch
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask).logits
        actual = model(input_ids=ids, attention_mask=mask).logits
    assert_close("logits", actual, expected)


# ----------------------------------------------------------------------------------------------------------------
# generation
# ----------------------------------------------------------------------------------------------------------------
GENERATION_SETTINGS = {
    "greedy": dict(max_new_tokens=8),
    "greedy-min-forced": dict(max_new_tokens=6, min_new_tokens=3, forced_bos_token_id=5, no_repeat_ngram_size=2),
    "beam3-lp": dict(num_beams=3, max_new_tokens=8, length_penalty=2.0),
    "beam4-ngram-min-bos-eos": dict(num_beams=4, max_new_tokens=8, length_penalty=0.5, no_repeat_ngram_size=2,
                                    min_new_tokens=3, forced_bos_token_id=0, forced_eos_token_id=EOS),
    "beam3-early-stop": dict(num_beams=3, max_new_tokens=8, early_stopping=True),
    "beam3-never": dict(num_beams=3, max_new_tokens=8, early_stopping="never", length_penalty=1.5),
    "beam4-return2": dict(num_beams=4, max_new_tokens=7, num_return_sequences=2, length_penalty=-0.5),
    "beam3-no-forced-eos": dict(num_beams=3, max_new_tokens=6, forced_eos_token_id=None, eos_token_id=[EOS, 7]),
}


@pytest.mark.parametrize("setting", list(GENERATION_SETTINGS))
def test_generate_matches_hf_eager(setting, hf_checkpoint, models, source_batch):
    _, hf = hf_checkpoint
    ids, mask = source_batch
    kwargs = GENERATION_SETTINGS[setting]
    expected = hf.generate(ids, attention_mask=mask, **kwargs)
    actual = models["eager"].generate(ids, attention_mask=mask, **kwargs)
    assert actual.shape == expected.shape and torch.equal(actual, expected), f"\nours {actual}\nHF   {expected}"


@pytest.mark.slow
@pytest.mark.parametrize("setting", ["greedy", "beam4-ngram-min-bos-eos"])
def test_generate_matches_hf_fused(setting, hf_checkpoint, models, source_batch):
    _, hf = hf_checkpoint
    ids, mask = source_batch
    ids, mask = ids[1:], mask[1:]  # two padded sources keep the interpreter's work small
    kwargs = dict(GENERATION_SETTINGS[setting], max_new_tokens=6)
    expected = hf.generate(ids, attention_mask=mask, **kwargs)
    with record_cross_attention(models["fused"]) as seen:
        actual = models["fused"].generate(ids, attention_mask=mask, **kwargs)
    assert actual.shape == expected.shape and torch.equal(actual, expected), f"\nours {actual}\nHF   {expected}"
    assert_cross_kv_once_per_source(seen, models["fused"], ids.shape[0], kwargs.get("num_beams", 1))


@pytest.mark.parametrize("setting", list(GENERATION_SETTINGS))
def test_static_cache_matches_default_loop_and_hf(setting, hf_checkpoint, models, source_batch, monkeypatch):
    """generate(cache_implementation="static"): the fixed-shape step (with beams: bookkeeping, whole-cache
    reorder and decoder; greedy: the decoder; at the device-side position; on CUDA a recorded, replayed CUDA
    graph) gives the default loop's tokens and HF's."""
    from fusedformers.models.cuda_graph import StepGraph
    recorded = []
    record = StepGraph._record
    monkeypatch.setattr(StepGraph, "_record", lambda self: recorded.append(self) or record(self))
    _, hf = hf_checkpoint
    ids, mask = source_batch
    kwargs = GENERATION_SETTINGS[setting]
    expected = hf.generate(ids, attention_mask=mask, **kwargs)
    default = models["eager"].generate(ids, attention_mask=mask, **kwargs)
    static = models["eager"].generate(ids, attention_mask=mask, cache_implementation="static", **kwargs)
    assert torch.equal(default, expected), f"\nours {default}\nHF   {expected}"
    assert static.shape == expected.shape and torch.equal(static, expected), f"\nstatic {static}\nHF     {expected}"
    if DEVICE == "cuda" and expected.shape[1] > 4:  # more than the two eager warm-up steps: the graph replays
        assert recorded and all(graph.graph is not None for graph in recorded)


@pytest.mark.slow
def test_static_beam_step_fused_matches_hf(hf_checkpoint, models, source_batch):
    """The same on the Triton kernels (attention, beam bookkeeping)."""
    _, hf = hf_checkpoint
    ids, mask = source_batch
    ids, mask = ids[1:], mask[1:]
    kwargs = dict(GENERATION_SETTINGS["beam4-ngram-min-bos-eos"], max_new_tokens=6)
    expected = hf.generate(ids, attention_mask=mask, **kwargs)
    static = models["fused"].generate(ids, attention_mask=mask, cache_implementation="static", **kwargs)
    assert torch.equal(static, expected), f"\nstatic {static}\nHF     {expected}"


def test_static_cache_past_the_position_table_falls_back_with_a_warning(models, source_batch, monkeypatch):
    """A length the position table cannot hold up front: the dynamic loop (which errors only if a row gets
    there), said in a warning; a cache_implementation that does not exist: ValueError."""
    ids, mask = source_batch
    model = models["eager"]
    kwargs = dict(num_beams=2, max_new_tokens=6)
    expected = model.generate(ids, attention_mask=mask, **kwargs)
    monkeypatch.setattr(model.config, "max_position_embeddings", 5)  # the table itself keeps its 64 rows
    with pytest.warns(UserWarning, match=r"needs max_length \(7\) <= max_position_embeddings \(5\)"):
        out = model.generate(ids, attention_mask=mask, cache_implementation="static", **kwargs)
    assert torch.equal(out, expected)
    with pytest.raises(ValueError, match="cache_implementation must be None, 'dynamic' or 'static'"):
        model.generate(ids, attention_mask=mask, cache_implementation="offloaded", **kwargs)


@pytest.mark.parametrize("prefix", [[[2, 5], [2, 9], [2, 11]], [[5], [9], [11]]], ids=["with-start", "no-start"])
def test_generate_with_decoder_prefix_matches_hf(prefix, hf_checkpoint, models, source_batch):
    """A user decoder prefix; HF prepends decoder_start_token_id when the rows do not start with it."""
    _, hf = hf_checkpoint
    ids, mask = source_batch
    prefix = torch.tensor(prefix, device=DEVICE)
    for kwargs in (dict(max_new_tokens=5), dict(num_beams=3, max_new_tokens=5, no_repeat_ngram_size=2)):
        expected = hf.generate(ids, attention_mask=mask, decoder_input_ids=prefix, **kwargs)
        actual = models["eager"].generate(ids, attention_mask=mask, decoder_input_ids=prefix, **kwargs)
        assert torch.equal(actual, expected), f"{kwargs}\nours {actual}\nHF   {expected}"


def test_generate_outputs_are_nontrivial(hf_checkpoint, source_batch):
    """Guard on the fixture: the compared outputs include early eos + padding and full-length rows."""
    _, hf = hf_checkpoint
    ids, mask = source_batch
    out = hf.generate(ids, attention_mask=mask, num_beams=3, max_new_tokens=8, length_penalty=2.0)
    greedy = hf.generate(ids, attention_mask=mask, max_new_tokens=8)
    both = [out, greedy]
    assert any((o == PAD).any() for o in both), "no row finished early"
    assert any(len(set(row[1:].tolist())) > 2 for o in both for row in o), "degenerate outputs"


def test_generation_defaults_from_generation_config(tmp_path, source_batch):
    """Unset generate() arguments come from generation_config.json, as in HF."""
    hf = make_hf_bart(seed=5)
    hf.generation_config.num_beams = 3
    hf.generation_config.no_repeat_ngram_size = 2
    hf.generation_config.max_length = 7
    hf.generation_config.length_penalty = 0.7
    hf.generation_config.forced_bos_token_id = 0
    hf.save_pretrained(tmp_path)
    hf = hf.to(DEVICE)
    model = BartForConditionalGeneration.from_pretrained(tmp_path, device=DEVICE, attn_implementation="eager")
    ids, mask = source_batch
    expected = hf.generate(ids, attention_mask=mask)
    actual = model.generate(ids, attention_mask=mask)
    assert expected.shape[1] <= 7 and torch.equal(actual, expected), f"\nours {actual}\nHF   {expected}"


@contextlib.contextmanager
def record_cross_attention(model):
    """Yields a dict of lists, filled while inside: 'projected' (batch of every call to a cross-attention k/v
    projection), 'queries' and 'keys' (batch of the queries and of the K/V each cross-attention call reads)."""
    seen = {"projected": [], "queries": [], "keys": []}

    def on_projection(module, args, out):
        seen["projected"].append(args[0].shape[0])

    def on_cross_attention(module, args, kwargs, out):  # args: (queries [N, Lq, d], key [B, H, Ls, D], value)
        seen["queries"].append(args[0].shape[0])
        seen["keys"].append(args[1].shape[0])

    hooks = []
    for layer in model.model.decoder.layers:
        cross = layer.encoder_attn
        hooks += [cross.kv_proj.register_forward_hook(on_projection),   # k and v: one packed matmul
                  cross.register_forward_hook(on_cross_attention, with_kwargs=True)]
    try:
        yield seen
    finally:
        for hook in hooks:
            hook.remove()


def assert_cross_kv_once_per_source(seen, model, num_sources, num_beams):
    num_layers = len(model.model.decoder.layers)
    assert seen["projected"] == [num_sources] * num_layers  # once per layer, for the sources only
    assert len(seen["queries"]) > num_layers  # several decoding steps read them
    assert set(seen["queries"]) == {num_sources * num_beams}
    assert set(seen["keys"]) == {num_sources}  # never expanded per beam


def test_cross_attention_kv_projected_once_per_source(models, source_batch):
    """Generating with beams projects cross-attention K/V once per layer for the B sources (not per beam or
    per step), and every step reads them with batch B, indexed per beam row; only the self-attention cache
    has B * num_beams rows."""
    model = models["eager"]
    ids, mask = source_batch
    num_sources, num_beams = ids.shape[0], 3
    with record_cross_attention(model) as seen:
        model.generate(ids, attention_mask=mask, num_beams=num_beams, max_new_tokens=5)
    assert_cross_kv_once_per_source(seen, model, num_sources, num_beams)

    state = model.prepare_decoding(ids, mask, num_beams, max_len=8)
    assert all(k.shape[0] == num_sources and v.shape[0] == num_sources for k, v in state.cross_kv)
    assert state.self_cache.batch_size == num_sources * num_beams
    assert state.kv_batch_index.tolist() == [s for s in range(num_sources) for _ in range(num_beams)]


# ----------------------------------------------------------------------------------------------------------------
# tying, training switches
# ----------------------------------------------------------------------------------------------------------------
def test_embeddings_and_lm_head_are_one_parameter(models, hf_checkpoint, source_batch, target_batch):
    path, _ = hf_checkpoint
    model = BartForConditionalGeneration.from_pretrained(path, device=DEVICE, attn_implementation="eager")
    shared = model.model.shared.weight
    assert model.model.encoder.embed_tokens.weight is shared
    assert model.model.decoder.embed_tokens.weight is shared
    assert model.lm_head.weight is shared
    assert sum(p is shared for p in model.parameters()) == 1

    before = shared.detach().clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    ids, mask = source_batch
    labels, _ = target_batch
    model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    optimizer.step()
    changed = (shared.detach() - before).abs().amax(dim=1) > 0
    assert changed.sum() > 10  # label rows (lm_head) and input rows (embeddings) moved
    for view in (model.model.encoder.embed_tokens.weight, model.model.decoder.embed_tokens.weight,
                 model.lm_head.weight):
        assert view is shared and torch.equal(view, shared)
    # the embedding lookup sees the updated rows too
    with torch.no_grad():
        token = int(changed.nonzero()[0])
        looked_up = model.model.encoder.embed_tokens(torch.tensor([[token]], device=DEVICE))[0, 0]
    assert torch.equal(looked_up, shared[token] * model.model.encoder.embed_tokens.embed_scale)


@pytest.mark.slow
def test_gradient_checkpointing_same_gradients(hf_checkpoint, source_batch, target_batch):
    """Train mode with dropout 0.1 (fused attention): same seed -> same gradients with and without
    checkpointing, and the layers really are recomputed."""
    path, _ = hf_checkpoint
    model = BartForConditionalGeneration.from_pretrained(path, device=DEVICE).train()
    ids, mask = source_batch
    labels, _ = target_batch
    calls = []
    hook = model.model.decoder.layers[0].register_forward_pre_hook(lambda *a: calls.append(1))  # recompute stops early

    def run():
        torch.manual_seed(7)
        calls.clear()
        return _loss_and_grads(model, ids, mask, labels)

    loss, grads = run()
    plain_calls = len(calls)
    model.gradient_checkpointing_enable()
    ckpt_loss, ckpt_grads = run()
    ckpt_calls = len(calls)
    model.gradient_checkpointing_disable()
    hook.remove()
    assert plain_calls == 1 and ckpt_calls == 2
    assert torch.equal(loss, ckpt_loss)
    for name, grad in grads.items():
        assert_close(f"grad {name}", ckpt_grads[name], grad, atol=1e-6, rtol=1e-5)


@pytest.mark.slow
def test_attention_dropout_runs_in_the_kernel(tmp_path, monkeypatch, source_batch, target_batch):
    """attention_dropout 0.1 in training: the fused model gives the loss and gradients of the eager model whose
    reference attention uses the kernel's own dropout masks (same RNG draws, same masks), with no warning;
    masks follow torch.manual_seed, also through gradient checkpointing; eval mode has no dropout. The other
    dropouts are off, so a different seed changes the loss only if attention dropout really runs."""
    hf = make_hf_bart(seed=2, attention_dropout=0.1, dropout=0.0, activation_dropout=0.0)
    hf.save_pretrained(tmp_path)
    fused = BartForConditionalGeneration.from_pretrained(tmp_path, device=DEVICE).train()
    eager = BartForConditionalGeneration.from_pretrained(tmp_path, device=DEVICE, attn_implementation="eager")
    monkeypatch.setitem(ops.OPS, "eager", ops.OPS["eager"]._replace(attention=reference_with_kernel_dropout))
    ids, mask = source_batch
    labels, _ = target_batch
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss, grads = _loss_and_grads(fused, ids, mask, labels, seed=5)
    expected_loss, expected_grads = _loss_and_grads(eager.train(), ids, mask, labels, seed=5)
    assert_close("loss", loss, expected_loss)
    for name, grad in grads.items():
        scale = expected_grads[name].abs().max().item()
        assert_close(f"grad {name}", grad, expected_grads[name], atol=1e-5 + 1e-4 * scale, rtol=1e-3)
    other_seed, _ = _loss_and_grads(fused, ids, mask, labels, seed=6)
    assert not torch.equal(loss, other_seed)    # attention dropout is active
    fused.gradient_checkpointing_enable()
    ckpt_loss, ckpt_grads = _loss_and_grads(fused, ids, mask, labels, seed=5)
    assert torch.equal(ckpt_loss, loss)
    for name, grad in grads.items():
        assert_close(f"checkpointed grad {name}", ckpt_grads[name], grad, atol=1e-6, rtol=1e-5)
    fused.eval()
    with torch.no_grad():
        assert torch.equal(fused(input_ids=ids).logits, fused(input_ids=ids).logits)


# ----------------------------------------------------------------------------------------------------------------
# checkpoints
# ----------------------------------------------------------------------------------------------------------------
def test_save_pretrained_loads_in_hf(tmp_path, models, source_batch):
    model = models["eager"]
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "model.safetensors")
    assert "model.shared.weight" in saved and "lm_head.weight" not in saved
    assert "model.encoder.embed_tokens.weight" not in saved
    reloaded_hf = transformers.BartForConditionalGeneration.from_pretrained(tmp_path).to(DEVICE).eval()
    assert reloaded_hf.lm_head.weight.data_ptr() == reloaded_hf.model.shared.weight.data_ptr()
    ours_again = BartForConditionalGeneration.from_pretrained(tmp_path, device=DEVICE, attn_implementation="eager")
    ids, mask = source_batch
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
        assert_close("HF reload", reloaded_hf(input_ids=ids, attention_mask=mask).logits, expected)
        assert torch.equal(ours_again(input_ids=ids, attention_mask=mask).logits, expected)
    assert json.loads((tmp_path / "generation_config.json").read_text())["forced_eos_token_id"] == EOS
    assert torch.equal(reloaded_hf.generate(ids, attention_mask=mask, num_beams=2, max_new_tokens=4),
                       model.generate(ids, attention_mask=mask, num_beams=2, max_new_tokens=4))


def _copy_checkpoint(src, dst, rename=None, drop=(), add=None):
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "generation_config.json"):
        (dst / name).write_bytes((src / name).read_bytes())
    tensors = load_file(src / "model.safetensors")
    for old, new in (rename or {}).items():
        tensors[new] = tensors.pop(old)
    for name in drop:
        del tensors[name]
    tensors.update(add or {})
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


@pytest.mark.parametrize("alias", ["model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight",
                                   "lm_head.weight"])
def test_shared_weight_stored_only_under_an_alias(alias, tmp_path, hf_checkpoint, models, source_batch):
    path, _ = hf_checkpoint
    _copy_checkpoint(path, tmp_path, rename={"model.shared.weight": alias})
    model = BartForConditionalGeneration.from_pretrained(tmp_path, device=DEVICE, attn_implementation="eager")
    assert model.lm_head.weight is model.model.shared.weight is model.model.encoder.embed_tokens.weight
    ids, mask = source_batch
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits,
                           models["eager"](input_ids=ids, attention_mask=mask).logits)


def test_checkpoint_without_final_logits_bias_loads_zeros(tmp_path, hf_checkpoint):
    path, _ = hf_checkpoint
    _copy_checkpoint(path, tmp_path, drop=["final_logits_bias"])
    model = BartForConditionalGeneration.from_pretrained(tmp_path, attn_implementation="eager")
    assert torch.equal(model.final_logits_bias, torch.zeros(1, TINY["vocab_size"]))


def test_load_errors_are_clear(tmp_path, hf_checkpoint):
    path, _ = hf_checkpoint
    missing = "model.decoder.layers.1.fc2.weight"
    with pytest.raises(KeyError, match="missing.*" + missing.replace(".", r"\.")):
        BartForConditionalGeneration.from_pretrained(_copy_checkpoint(path, tmp_path / "a", drop=[missing]))
    with pytest.raises(KeyError, match=r"unexpected.*model\.encoder\.layers\.0\.adapter\.weight"):
        BartForConditionalGeneration.from_pretrained(_copy_checkpoint(
            path, tmp_path / "b", add={"model.encoder.layers.0.adapter.weight": torch.zeros(2)}))
    with pytest.raises(KeyError, match="missing.*model.shared.weight"):
        BartForConditionalGeneration.from_pretrained(_copy_checkpoint(path, tmp_path / "c",
                                                                      drop=["model.shared.weight"]))
    no_weights = tmp_path / "d"
    no_weights.mkdir()
    (no_weights / "config.json").write_bytes((path / "config.json").read_bytes())
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        BartForConditionalGeneration.from_pretrained(no_weights)
    with pytest.raises(FileNotFoundError, match="config.json"):
        BartForConditionalGeneration.from_pretrained(tmp_path / "nowhere")


def test_aliases_of_the_shared_embedding_must_agree(tmp_path, hf_checkpoint):
    """A stored lm_head that differs from the shared embedding cannot be one tied tensor: a clear error."""
    path, _ = hf_checkpoint
    shared = load_file(path / "model.safetensors")["model.shared.weight"]
    with pytest.raises(ValueError, match="lm_head.weight with values different from model.shared.weight"):
        BartForConditionalGeneration.from_pretrained(
            _copy_checkpoint(path, tmp_path / "a", add={"lm_head.weight": shared + 1.0}))


_DROP = object()  # _edit_config: remove the field


def _edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    for name in [k for k, v in changes.items() if v is _DROP]:
        del config[name]
    (path / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("change, message", [
    ({"scale_embedding": "false"}, r"field 'scale_embedding' must be true, false or null, got 'false'"),
    ({"normalize_before": "false"}, r"field 'normalize_before' must be true, false or null, got 'false'"),
    ({"pad_token_id": [None]}, r"field 'pad_token_id' must be a token id \(an integer\) or null, got \[None\]"),
    ({"pad_token_id": 0.5}, r"field 'pad_token_id' must be a token id"),
    ({"encoder_attention_heads": _DROP}, r"config\.json lacks required fields \['encoder_attention_heads'\]"),
    ({"encoder_layers": 3}, r"'encoder_layers' is 3, but \S*model\.safetensors holds layers 0\.\.1"),
    ({"activation_function": ["gelu"]}, r"config\.json: unsupported activation_function \['gelu'\]"),
    ({"encoder_attention_heads": 3}, r"config\.json: d_model \(64\) must be divisible"),
], ids=["scale_embedding-str", "normalize_before-str", "pad-list", "pad-float", "heads-missing", "layers-3",
        "activation-list", "heads-not-dividing"])
def test_config_defects_found_by_the_fuzzer(change, message, tmp_path, hf_checkpoint):
    """tests/ckpt_fuzz.py found these. Before: "false" switched scale_embedding on (a silently different model)
    and passed normalize_before; a list or float pad id reached nn.Embedding (TypeError, IndexError); a missing
    head count took HF's default of 16 (heads of 4 dims: a silently different model); 3 layers were built and
    then reported missing; an unhashable activation was a TypeError; errors did not name config.json."""
    path, _ = hf_checkpoint
    _edit_config(_copy_checkpoint(path, tmp_path), **change)
    with pytest.raises(ValueError, match=message):
        BartForConditionalGeneration.from_pretrained(tmp_path, attn_implementation="eager")


def test_pad_token_id_outside_the_vocabulary_loads(tmp_path, hf_checkpoint, models, source_batch):
    """Before: AssertionError("Padding_idx must be within num_embeddings") from nn.Embedding; as in LLaMA, such
    a pad id marks no embedding row (it only matters for gradients), the model is the same."""
    path, _ = hf_checkpoint
    _edit_config(_copy_checkpoint(path, tmp_path), pad_token_id=1000)
    model = BartForConditionalGeneration.from_pretrained(tmp_path, device=DEVICE, attn_implementation="eager")
    ids, mask = source_batch
    decoder_ids = ids[:, :4]
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids).logits,
                           models["eager"](input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids).logits)


def test_integer_tensors_and_mismatches_name_the_files(tmp_path, hf_checkpoint):
    """Before: an int8 final_logits_bias loaded as an integer buffer and other integer tensors were a
    RuntimeError from load_state_dict; missing tensors named neither model.safetensors nor config.json."""
    path, _ = hf_checkpoint
    tensors = load_file(path / "model.safetensors")
    for name in ("final_logits_bias", "model.encoder.layers.0.fc1.bias"):
        with pytest.raises(ValueError, match=rf"tensor shapes or dtypes in \S*model\.safetensors do not match the "
                                             rf"model of \S*config\.json: {name}: expected a floating-point tensor"):
            BartForConditionalGeneration.from_pretrained(_copy_checkpoint(
                path, tmp_path / name, add={name: tensors[name].to(torch.int8)}))
    with pytest.raises(KeyError, match=r"model\.safetensors does not match the model of \S*config\.json: missing"):
        BartForConditionalGeneration.from_pretrained(_copy_checkpoint(path, tmp_path / "drop",
                                                                      drop=["model.encoder.layers.0.fc1.bias"]))


@pytest.mark.parametrize("dtype,expected", [("bfloat16", torch.bfloat16), ("auto", torch.float32),
                                            (None, torch.float32)], ids=["bfloat16", "auto", "default"])
def test_dtype_names_and_auto(dtype, expected, hf_checkpoint):
    path, _ = hf_checkpoint
    kwargs = {} if dtype is None else {"dtype": dtype}
    model = BartForConditionalGeneration.from_pretrained(path, attn_implementation="eager", **kwargs)
    assert {p.dtype for p in model.parameters()} == {expected}


def test_generate_accepts_the_off_values_of_sampling_and_cache(models, source_batch):
    ids, mask = source_batch
    model = models["eager"]
    plain = model.generate(ids, attention_mask=mask, max_new_tokens=3)
    assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False,
                                      use_cache=True), plain)
    with pytest.raises(NotImplementedError, match="do_sample"):
        model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=True)


@pytest.mark.parametrize("setting", [dict(repetition_penalty=1.2), dict(num_beam_groups=2),
                                     dict(bad_words_ids=[[5]])], ids=["repetition_penalty", "num_beam_groups",
                                                                      "bad_words_ids"])
def test_unsupported_generation_settings_are_errors(setting, models, source_batch):
    """HF settings that BART's generate does not implement: NotImplementedError naming them (as the README
    promises), for greedy and beams; a name that is no generation setting: TypeError."""
    ids, mask = source_batch
    for num_beams in (1, 3):
        with pytest.raises(NotImplementedError, match=list(setting)[0]):
            models["eager"].generate(ids, attention_mask=mask, max_new_tokens=3, num_beams=num_beams, **setting)
    with pytest.raises(TypeError, match="unexpected arguments"):
        models["eager"].generate(ids, attention_mask=mask, max_new_tokens=3, no_such_setting=1)


@pytest.mark.parametrize("change, message", [
    ({"model_type": "mbart"}, "model_type"),
    ({"normalize_before": True}, "pre-LayerNorm"),
    ({"add_final_layer_norm": True}, "final"),
    ({"tie_word_embeddings": False}, "untied"),
    ({"activation_function": "swiglu_unknown"}, "activation_function"),
    ({"encoder_attention_heads": 5}, "divisible"),
    ({"d_model": "64"}, "config.json field 'd_model' must be a positive integer"),
    ({"decoder_attention_heads": 0}, "config.json field 'decoder_attention_heads' must be a positive integer"),
    ({"dropout": -0.1}, r"config.json field 'dropout' must be a number in \[0, 1\]"),
    # one rule with LLaMA: a field the model does not read might change it, so it is refused, named
    ({"layernorm_embedding_eps": 1e-3}, r"not understood by fusedformers BartConfig: \['layernorm_embedding_eps'\]"),
    ({"extra_pos_embeddings": 0}, "extra_pos_embeddings must be 2"),
    ({"num_hidden_layers": 7}, "num_hidden_layers .* must equal"),
    ({"force_bos_token_to_be_generated": True}, "force_bos_token_to_be_generated"),
    ({"encoder_layers": float("nan")}, "encoder_layers"),  # the checkpoint fuzzer's seed 11 case 85 (a KeyError)
], ids=["mbart", "normalize_before", "add_final_layer_norm", "untied", "unknown_activation", "heads_not_dividing",
        "d_model-str", "heads-zero", "dropout-negative", "unknown-field", "position-offset", "layers-alias",
        "legacy-force-bos", "layers-nan"])
def test_config_rejects_unsupported_variants(change, message, hf_checkpoint):
    path, _ = hf_checkpoint
    config = json.loads((path / "config.json").read_text())
    with pytest.raises(ValueError, match=message):
        BartConfig.from_dict({**config, **change})


# the fields of a fairseq-converted BART config.json on the Hub (facebook/bart-large-cnn) that transformers 5 no
# longer writes: bookkeeping, or variant switches at BART's values; they load and are written back
LEGACY_BART_FIELDS = {"_num_labels": 3, "add_bias_logits": False, "add_final_layer_norm": False,
                      "classif_dropout": 0.0, "extra_pos_embeddings": 2, "force_bos_token_to_be_generated": False,
                      "gradient_checkpointing": False, "normalize_before": False, "normalize_embedding": True,
                      "output_past": True, "static_position_embeddings": False, "num_hidden_layers": 2,
                      "no_repeat_ngram_size": 3, "num_beams": 4, "length_penalty": 2.0, "min_length": 56,
                      "max_length": 142, "early_stopping": True, "prefix": " ",
                      "task_specific_params": {"summarization": {"num_beams": 4}}}


def test_config_round_trip_keeps_hf_fields(hf_checkpoint):
    path, _ = hf_checkpoint
    config_dict = {**json.loads((path / "config.json").read_text()), **LEGACY_BART_FIELDS}
    config = BartConfig.from_dict(config_dict)
    assert (config.d_model, config.encoder_layers, config.decoder_ffn_dim) == (64, 2, 128)
    assert (config.pad_token_id, config.eos_token_id, config.forced_eos_token_id) == (PAD, EOS, EOS)
    written = config.to_dict()
    for key, value in config_dict.items():
        assert written[key] == value, key


def test_bf16_logits_within_hf_bf16_error(hf_checkpoint, source_batch, target_batch):
    """bf16: our error against HF's fp32 logits stays within 2x HF's own bf16 error (plus a small slack)."""
    path, hf32 = hf_checkpoint
    ids, mask = source_batch
    labels, decoder_mask = target_batch
    decoder_ids = shift_tokens_right(labels, PAD, hf32.config.decoder_start_token_id)
    inputs = dict(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids,
                  decoder_attention_mask=decoder_mask)
    hf16 = transformers.BartForConditionalGeneration.from_pretrained(path, dtype=torch.bfloat16).to(DEVICE).eval()
    ours = BartForConditionalGeneration.from_pretrained(path, device=DEVICE, dtype=torch.bfloat16)
    with torch.no_grad():
        reference = hf32(**inputs).logits.double()
        hf_logits = hf16(**inputs).logits
        our_logits = ours(**inputs).logits
    assert our_logits.dtype == torch.bfloat16 and torch.isfinite(our_logits).all()
    real = decoder_mask.bool()
    ours_error = (our_logits[real].double() - reference[real]).abs().max().item()
    hf_error = (hf_logits[real].double() - reference[real]).abs().max().item()
    assert ours_error <= 2 * hf_error + 1e-2, f"bf16 logits error {ours_error:.3e} vs HF bf16's {hf_error:.3e}"


def test_generate_checks_its_inputs(models, source_batch):
    ids, mask = source_batch
    with pytest.raises(ValueError, match="input_ids must hold at least one token"):
        models["eager"].generate(ids[:0], attention_mask=mask[:0], max_new_tokens=2)
    with pytest.raises(ValueError, match=r"attention_mask must have the shape of input_ids"):
        models["eager"].generate(ids, attention_mask=mask[:1], max_new_tokens=2)
    with pytest.raises(ValueError, match=r"decoder_input_ids must be an integer tensor \[B, P\]"):
        models["eager"].generate(ids, attention_mask=mask, decoder_input_ids=ids[0, :2], max_new_tokens=2)


def test_growing_decoder_cache_matches_hf(hf_checkpoint, models, source_batch, monkeypatch):
    """The decoder's self-attention cache starts with room for a few tokens and doubles (here from 2), for
    greedy and beams: HF's tokens; a huge max_new_tokens does not allocate for all of it up front."""
    monkeypatch.setattr("fusedformers.models.bart.INITIAL_ROOM", 2)
    _, hf = hf_checkpoint
    ids, mask = source_batch
    sizes = []
    model = models["eager"]
    new_kv_cache = model.new_kv_cache
    monkeypatch.setattr(model, "new_kv_cache", lambda batch, max_len: sizes.append(max_len) or
                        new_kv_cache(batch, max_len))
    for kwargs in (dict(max_new_tokens=8), dict(num_beams=3, max_new_tokens=8, length_penalty=2.0)):
        expected = hf.generate(ids, attention_mask=mask, **kwargs)
        actual = model.generate(ids, attention_mask=mask, **kwargs)
        assert torch.equal(actual, expected), f"{kwargs}\nours {actual}\nHF   {expected}"
    assert sizes == [3, 3]

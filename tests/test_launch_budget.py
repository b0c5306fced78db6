"""Launch and host-sync budgets of a decode step, counted on CPU (``fusedformers.bench.launches``: every Triton
launch and every aten op that launches device work; a host sync is a value read back to the host; per layer = the
slope between 1- and 2-layer models).

The issue "a decode step near the memory roofline" set the budgets; the figures before it were: LLaMA 16 per
layer; BART 19 per decoder layer (greedy and beams) and 77 launches outside the layers per beam step, with 4 host
reads per step. LLaMA's layer is now nine launches (two RMSNorms, the packed q/k/v matmul, RoPE + the KV-cache
write, attention, o_proj, the packed gate/up matmul, SiLU * mul, down_proj); BART's decoder layer thirteen (the
packed q/k/v matmul, the cache write of k and v, self-attention, out_proj, LayerNorm + residual, the cross q matmul,
cross-attention, out_proj, LayerNorm + residual, fc1, GELU, fc2, LayerNorm + residual). The static paths (a
recorded CUDA graph on a GPU) must not sync at all: the recorded steps advance their own positions on the device.
"""
import pytest
import torch

from fusedformers.bench.launches import LLAMA_SHAPE, count, decode_step_launches
from fusedformers.models import beam_search
from fusedformers.models.generation import GenerationSettings
from fusedformers.models.kv_cache import KVCache

# held at today's figures (the budgets in brackets), so that a regression fails here
LLAMA_LAUNCHES_PER_LAYER = 9    # [10]
BART_PER_LAYER = 13             # [16]
BEAM_BOOKKEEPING = 7            # [20] float32 logits; 16-bit logits add their float32 cast


@pytest.mark.parametrize("cache_implementation", [None, "static"], ids=["dynamic", "static"])
def test_llama_launches_per_layer(cache_implementation):
    settings = {"cache_implementation": cache_implementation} if cache_implementation else {}
    # over 8 steps: the loop's look at its stop verdict (once per 8 steps) is counted too
    result = decode_step_launches("llama", "ours", steps=(1, 9), **settings)
    assert result["per_layer"] <= LLAMA_LAUNCHES_PER_LAYER, result
    assert result["syncs_per_step"] == 0, result


def test_llama_static_step_reads_nothing_from_the_host():
    """One recorded step (run eagerly here) does not sync, and it advances its own position and cache position
    on the device, writing the token's K/V at the next cache row."""
    from fusedformers.models.llama import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig.from_dict(dict(LLAMA_SHAPE, num_hidden_layers=2))).eval()
    prompt = torch.randint(3, 90, (2, 5))
    mask = torch.ones_like(prompt)
    with torch.no_grad():
        state = model._static_decoding(2, 9, mask)
        positions = torch.arange(5).expand(2, 5)
        model.prefill(prompt, None, positions, state.cache)
        state.start(positions[:, -1:], state.cache.length)
        for step in range(2):
            before = state.cache.k[0][:, :, 5 + step].clone()
            _, counter = count(model.static_step, state, torch.tensor([[7], [8]]))
            assert counter.syncs == 0, counter.sync_ops
            assert not torch.equal(state.cache.k[0][:, :, 5 + step], before)  # written at the advanced row
            assert state.position.tolist() == [[6 + step], [6 + step]]
            assert state.cache_position.tolist() == [6 + step]


@pytest.mark.parametrize("settings", [dict(), dict(cache_implementation="static"), dict(num_beams=4),
                                      dict(num_beams=4, cache_implementation="static")],
                         ids=["greedy", "greedy-static", "beam4", "beam4-static"])
def test_bart_decoder_layer_budget(settings):
    figures = decode_step_launches("bart", steps=(1, 9) if settings else (1, 2), **settings)
    assert figures["per_layer"] <= BART_PER_LAYER, figures
    assert figures["syncs_per_step"] == 0, figures


def test_beam_bookkeeping_budget():
    """One beam step's bookkeeping (processors, top-k, finished hypotheses, stop verdict), the reorder of a
    4-layer self-attention cache and the host's look at the verdict: log-softmax, the two kernels, top-k, the
    reorder's gather and copy, the verdict's copy to the host; no host read."""
    settings = GenerationSettings(prompt_len=1, max_length=12, min_length=3, do_sample=False, temperature=1.0,
                                  top_k=0, top_p=1.0, num_beams=4, num_return_sequences=1, length_penalty=1.0,
                                  early_stopping=False, no_repeat_ngram_size=3, forced_bos_token_id=0,
                                  forced_eos_token_ids=[2], eos_token_ids=[2], pad_token_id=1)
    batch, vocab = 2, 64
    prompt = torch.full((batch * settings.num_beams, 1), 2, dtype=torch.long)
    state = beam_search.new_state(prompt, settings, vocab)
    cache = KVCache(4, batch * settings.num_beams, 2, settings.max_length, 16)
    poll = beam_search.StopPoll(state.stopped)

    def step(logits):
        beam_search.advance(state, logits, settings, fused=True)
        cache.reorder(state.beam_idx, cache.max_len)
        poll.after_step()

    for _ in range(2):  # a later step, not the first
        logits = torch.randn(batch * settings.num_beams, vocab)
        _, counter = count(step, logits)
    assert counter.launches <= BEAM_BOOKKEEPING, counter
    assert counter.syncs == 0, counter
    assert counter.ops["triton:_beam_update_kernel"] == 1, counter


@pytest.mark.parametrize("layout", ["packed", "separate", "v-before-k"])
def test_kv_cache_write_of_a_packed_projection_is_one_launch(layout):
    """k and v that are views of one packed projection (BART's q/k/v) go into the cache in one launch, with the
    values two writes give; separate tensors, or views in another order, take two launches."""
    batch, heads, length, head_dim = 2, 3, 4, 8
    qkv = torch.randn(batch, length, 3, heads, head_dim)
    if layout == "separate":
        k, v = (qkv[:, :, i].transpose(1, 2).clone() for i in (1, 2))
    else:
        k, v = (qkv[:, :, i].transpose(1, 2) for i in ((1, 2) if layout == "packed" else (2, 1)))
    cache = KVCache(2, batch, heads, 10, head_dim)
    cache.storage.fill_(float("nan"))
    positions = torch.tensor([6, 2, 3, 9])
    _, counter = count(cache.update, 1, k, v, positions)
    assert counter.launches == (1 if layout == "packed" else 2), counter
    k_cache, v_cache = cache.layer(1)
    assert torch.equal(k_cache[:, :, positions], k) and torch.equal(v_cache[:, :, positions], v)
    untouched = torch.ones(10, dtype=torch.bool)
    untouched[positions] = False
    assert cache.storage[:, 1][:, :, :, untouched].isnan().all() and cache.storage[:, 0].isnan().all()

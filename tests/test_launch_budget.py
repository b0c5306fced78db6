"""Launch and host-sync budgets of a decode step, counted on CPU (``fusedformers.bench.launches``: every Triton
launch and every aten op that launches device work; per layer = the slope between 1- and 2-layer models).

These are the budgets of the issue "a decode step near the memory roofline"; the figures before it were:
LLaMA 16 per layer; BART 19 per decoder layer (greedy and beams) and 77 launches outside the layers per beam
step, with 4 host reads per step."""
import pytest
import torch

from fusedformers.bench.launches import count, decode_step_launches
from fusedformers.models import beam_search
from fusedformers.models.generation import GenerationSettings
from fusedformers.models.kv_cache import KVCache

BART_PER_LAYER = 16
BEAM_BOOKKEEPING = 20


@pytest.mark.parametrize("settings", [dict(), dict(num_beams=4), dict(num_beams=4, cache_implementation="static")],
                         ids=["greedy", "beam4", "beam4-static"])
def test_bart_decoder_layer_budget(settings):
    figures = decode_step_launches("bart", **settings)
    assert figures["per_layer"] <= BART_PER_LAYER, figures
    assert figures["syncs_per_step"] == 0, figures


def test_beam_bookkeeping_budget():
    """One beam step's bookkeeping (processors, top-k, finished hypotheses, stop verdict), the reorder of a
    4-layer self-attention cache and the host's look at the verdict: <= 20 launches, no host read."""
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

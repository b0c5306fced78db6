"""The beam-search bookkeeping kernels (``fusedformers.kernels.beam_search``) against the PyTorch reference step
(``fusedformers.models.beam_search.advance_reference``, whose tokens tests/test_bart.py checks against HF).

Both run the same steps on the same random logits, for every combination of the settings that change the
bookkeeping; after each step the states must be equal: the running beams (until the search stops: after that
they are never read), the finished hypotheses (the slots holding one; placeholder slots tie at -1e9 and
``torch.topk`` orders ties as it pleases), the stop heuristics and the step counter; then the results."""
import pytest
import torch

from fusedformers.models import beam_search
from fusedformers.models.generation import GenerationSettings, StopPoll
from tests.conftest import DEVICE

BASE = dict(prompt_len=2, max_length=9, min_length=4, do_sample=False, temperature=1.0, top_k=0, top_p=1.0,
            num_beams=3, num_return_sequences=2, length_penalty=1.0, early_stopping=False, no_repeat_ngram_size=2,
            forced_bos_token_id=None, forced_eos_token_ids=[2], eos_token_ids=[2, 7], pad_token_id=1)
CASES = {
    "ngram2-min-forced-eos": dict(),
    "early-stop": dict(early_stopping=True, no_repeat_ngram_size=0),
    "never-lp1.5": dict(early_stopping="never", length_penalty=1.5),
    "lp-negative-ngram3": dict(length_penalty=-0.5, no_repeat_ngram_size=3, forced_eos_token_ids=None),
    "no-eos": dict(eos_token_ids=[], forced_eos_token_ids=None, min_length=0, pad_token_id=None),
    "forced-bos-4-beams": dict(prompt_len=1, forced_bos_token_id=5, num_beams=4, num_return_sequences=4),
}


def _meaningful(state):
    """What of a state the search's result can depend on."""
    current = int(state.step) % 2
    done = state.is_finished
    view = dict(finished=done, finished_seqs=torch.where(done[..., None], state.finished_seqs[current], -5),
                finished_scores=torch.where(done, state.finished_scores, 0.0),
                finished_len=torch.where(done, state.finished_len, 0), can_improve=state.can_improve,
                stop_flags=state.stop_flags, stopped=state.stopped, step=state.step)
    if not bool(state.stopped):
        view.update(running_seqs=state.running_seqs[current], running_scores=state.running_scores,
                    next_tokens=state.next_tokens)
    return view


@pytest.mark.parametrize("case", list(CASES))
def test_fused_step_matches_reference(case):
    settings = GenerationSettings(**dict(BASE, **CASES[case]))
    batch, vocab, num_beams = 2, 37, settings.num_beams
    g = torch.Generator().manual_seed(torch.initial_seed() % 2**31)
    prompt = torch.randint(0, vocab, (batch, settings.prompt_len), generator=g).repeat_interleave(num_beams, 0)
    prompt = prompt.to(DEVICE)
    reference, fused = (beam_search.new_state(prompt, settings, vocab) for _ in range(2))
    fused.next_tokens.fill_(-3)  # poisoned: the kernel must write them
    # two more steps than the search can take: steps after it stopped must change nothing
    for step in range(settings.max_length - settings.prompt_len + 2):
        logits = (torch.randn(batch * num_beams, vocab, generator=g) * 3).to(DEVICE)
        before = [(s.running_seqs[int(s.step) % 2].flatten(0, 1).clone(), int(s.step), bool(s.stopped))
                  for s in (reference, fused)]
        beam_search.advance(reference, logits, settings, fused=False)
        beam_search.advance(fused, logits, settings, fused=True)
        expected, actual = _meaningful(reference), _meaningful(fused)
        assert expected.keys() == actual.keys()
        for name in expected:
            assert torch.equal(actual[name], expected[name]), f"step {step}: {name}\n{actual[name]}\n" \
                                                                 f"{expected[name]}"
        # beam_idx names the row each beam continues (the cache reorder): its sequence so far is that row's
        for state, (old_seqs, old_step, was_stopped) in zip((reference, fused), before):
            length = settings.prompt_len + old_step
            if was_stopped:
                assert torch.equal(state.beam_idx, torch.arange(batch * num_beams, device=DEVICE))
            elif not bool(state.stopped):
                new_seqs = state.running_seqs[int(state.step) % 2].flatten(0, 1)
                assert torch.equal(new_seqs[:, :length], old_seqs[state.beam_idx][:, :length])
    assert bool(fused.stopped)
    assert torch.equal(beam_search.finalize(fused, settings.num_return_sequences),
                       beam_search.finalize(reference, settings.num_return_sequences))


def test_fused_step_checks_logits_shape():
    settings = GenerationSettings(**BASE)
    prompt = torch.zeros(6, 2, dtype=torch.long, device=DEVICE)
    state = beam_search.new_state(prompt, settings, 11)
    with pytest.raises(ValueError, match=r"logits must be \[B \* num_beams, V\] = \[6, 11\], got \[6, 12\]"):
        beam_search.advance(state, torch.zeros(6, 12, device=DEVICE), settings, fused=True)


class _LateStopPoll(beam_search.StopPoll):
    """A StopPoll that sees the verdict three steps late, as one on CUDA may."""

    def __init__(self, flag, lead=4):
        super().__init__(flag, lead)
        self.seen = []

    def after_step(self, flag=None):
        self.seen.append(super().after_step(flag))
        return len(self.seen) > 3 and self.seen[-4]


@pytest.mark.parametrize("sync_stop", [False, True])
def test_sync_stop_takes_no_step_past_the_end(sync_stop, monkeypatch):
    """With a late look at the verdict the loop takes a few no-op steps after the search stopped, which must not
    change the result; ``sync_stop`` (BART near the end of its position table) takes none."""
    monkeypatch.setattr(beam_search, "StopPoll", _LateStopPoll)
    settings = GenerationSettings(**dict(BASE, max_length=12, eos_token_ids=[2], forced_eos_token_ids=None,
                                         min_length=0, early_stopping=True))
    vocab, num_beams = 5, settings.num_beams
    g = torch.Generator().manual_seed(3)
    table = (torch.randn(64, vocab, generator=g) * 2).to(DEVICE)
    table[:, 2] += 1.0  # eos is likely: the search stops well before max_length
    fed = []

    def step(tokens):
        fed.append(tokens.shape[1])
        return table[tokens[:, -1] * 7 % 64 + len(fed)]

    prompt = torch.ones(2 * num_beams, settings.prompt_len, dtype=torch.long, device=DEVICE)
    out = beam_search.beam_search(step, prompt, settings, reorder_cache=lambda beam_idx: None, sync_stop=sync_stop)
    fed_sync = []

    def step_sync(tokens):
        fed_sync.append(tokens.shape[1])
        return table[tokens[:, -1] * 7 % 64 + len(fed_sync)]

    monkeypatch.setattr(beam_search, "StopPoll", StopPoll)  # on CPU: sees each verdict at once
    expected = beam_search.beam_search(step_sync, prompt, settings, reorder_cache=lambda beam_idx: None)
    assert torch.equal(out, expected)
    steps_needed = len(fed_sync)
    assert steps_needed < settings.max_length - settings.prompt_len  # it did stop early
    assert len(fed) == steps_needed if sync_stop else len(fed) > steps_needed

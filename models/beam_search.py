"""Beam search with the semantics of HF transformers' ``generate`` (HF >= 4.50's vectorised algorithm), as a
fixed-shape step with no host synchronisation.

The loop is model-agnostic: it calls ``step(tokens [N, n]) -> logits [N, V]`` (which appends the new tokens to
the model's self-attention cache and returns the next-token logits) and ``reorder_cache(beam_idx [N])`` (row r
of the cache becomes old row ``beam_idx[r]``; for BART only the decoder self-attention cache moves,
cross-attention K/V stay per source). Settings and logits processors are ``fusedformers.models.generation``'s.

Per step (:func:`advance`): the processors applied to the log-softmax (no_repeat_ngram_size, min_length,
forced bos/eos, at the device-side length), plus each beam's running score; the top
``max(2, 1 + n_eos) * num_beams`` candidates per source; the best ``num_beams`` candidates that did not end keep
running; candidates among the top ``num_beams`` that ended compete with the finished hypotheses, scored
``sum_logprobs / generated_len ** length_penalty``; early_stopping True / False (heuristic at the current
length) / "never" (at max_length when length_penalty > 0). Outputs are padded with pad_token_id (eos when pad is
0 or unset) and cut to the longest returned hypothesis.

Every quantity lives in a :class:`BeamState` of fixed-shape device tensors, including the length (``step``) and
the stop verdict: a step reads no host value, so the whole step (model and bookkeeping) can be recorded once as a
CUDA graph and replayed. Once the search has stopped, a further step changes nothing (its cache reorder is the
identity), so the host may look at the verdict late (:class:`StopPoll`) without changing the result.
Two implementations share the state: ``fusedformers.kernels.beam_search`` (two Triton kernels and a top-k:
``advance(..., fused=True)``) and :func:`advance_reference`, the readable PyTorch version, which the eager
implementation runs and the tests compare against.
"""
from dataclasses import dataclass

import torch

from fusedformers.kernels.beam_search import beam_advance
from fusedformers.models.generation import StopPoll

NEG_LARGE = -1.0e9  # HF's "impossible" score for beams
STOP_FLAGS = 3      # per source: cannot improve, all finished with early_stopping=True, every candidate ended


@dataclass
class BeamState:
    """The search's state for B sources x K beams (N = B * K decoder rows), T = max_length token positions.

    Sequences are double-buffered (index ``step % 2`` is current): a step reads one buffer and writes the other,
    so no row is overwritten while another still reads it."""
    batch: int
    num_beams: int
    num_candidates: int        # C = max(2, 1 + n_eos) * K per source
    prompt_len: int
    max_length: int
    vocab: int
    running_seqs: torch.Tensor     # [2, B, K, T] int64, filled with `fill` after the current length
    finished_seqs: torch.Tensor    # [2, B, K, T] int64
    running_scores: torch.Tensor   # [B, K] float32 sum of log-probs (NEG_LARGE: beams 1.. before the 1st step)
    finished_scores: torch.Tensor  # [B, K] float32 length-penalised, best first
    finished_len: torch.Tensor     # [B, K] int64 generated tokens of each finished hypothesis (0: none)
    is_finished: torch.Tensor      # [B, K] bool
    can_improve: torch.Tensor      # [B] bool
    step: torch.Tensor             # [1] int64 steps taken: the current length is prompt_len + step
    stop_flags: torch.Tensor       # [STOP_FLAGS, B] bool, of the last step
    stopped: torch.Tensor          # [1] bool: the search is over (every later step is a no-op)
    arrivals: torch.Tensor         # [1] int32 the fused update's programs that finished this step
    next_tokens: torch.Tensor      # [N, 1] int64 the tokens to feed next
    beam_idx: torch.Tensor         # [N] int64 the cache row each row continues (reorder_cache's argument)
    length_scale: torch.Tensor     # [T + 1] float32: (t - prompt_len) ** length_penalty, or its reciprocal
    eos: torch.Tensor              # [n_eos] int64 (may be empty)
    forced_eos: torch.Tensor       # [n_forced_eos] int64 (may be empty)
    cand_scores: torch.Tensor      # [B, C] float32 this step's top candidates (scratch)
    cand_index: torch.Tensor       # [B, C] int64 their index beam * V + token (scratch)

    @property
    def multiply_by_reciprocal(self):
        """On CUDA PyTorch divides a tensor by a Python float as a multiplication by its float32 reciprocal; HF
        divides the scores by Python floats, so the length scale is that reciprocal on CUDA (the quotient on
        CPU), for the same bits as HF's."""
        return self.length_scale.is_cuda


def new_state(prompt, settings, vocab):
    """The :class:`BeamState` before the first step, for ``prompt [B * K, P]`` (each source's prompt repeated per
    beam) and the resolved ``settings``; ``vocab`` the logits' width."""
    num_beams, prompt_len, max_length = settings.num_beams, settings.prompt_len, settings.max_length
    device = prompt.device
    batch = prompt.shape[0] // num_beams
    eos = settings.eos_token_ids
    fill = (settings.pad_token_id or eos[0]) if eos else -1  # HF: pad, or eos when pad is 0/unset, else -1
    seqs = torch.full((2, batch, num_beams, max_length), fill, dtype=torch.long, device=device)
    seqs[:, :, :, :prompt_len] = prompt.view(batch, num_beams, prompt_len)
    running_scores = torch.zeros(batch, num_beams, device=device)
    running_scores[:, 1:] = NEG_LARGE  # the first step expands beam 0 only (all beams are identical)
    lengths = torch.tensor([float(max(t - prompt_len, 0)) ** settings.length_penalty if t > prompt_len else 1.0
                            for t in range(max_length + 1)], dtype=torch.float64).float()
    num_candidates = max(2, 1 + len(eos)) * num_beams
    rows = batch * num_beams

    def ids(values):
        return torch.tensor(values or [], dtype=torch.long, device=device)

    return BeamState(
        batch=batch, num_beams=num_beams, num_candidates=num_candidates, prompt_len=prompt_len,
        max_length=max_length, vocab=vocab, running_seqs=seqs, finished_seqs=seqs.clone(),
        running_scores=running_scores,
        finished_scores=torch.full((batch, num_beams), NEG_LARGE, device=device),
        finished_len=torch.zeros(batch, num_beams, dtype=torch.long, device=device),
        is_finished=torch.zeros(batch, num_beams, dtype=torch.bool, device=device),
        can_improve=torch.ones(batch, dtype=torch.bool, device=device),
        step=torch.zeros(1, dtype=torch.long, device=device),
        stop_flags=torch.zeros(STOP_FLAGS, batch, dtype=torch.bool, device=device),
        stopped=torch.zeros(1, dtype=torch.bool, device=device),
        arrivals=torch.zeros(1, dtype=torch.int32, device=device),
        next_tokens=prompt[:, -1:].clone(),
        beam_idx=torch.arange(rows, device=device),
        length_scale=(1.0 / lengths if device.type == "cuda" else lengths).to(device),
        eos=ids(eos), forced_eos=ids(settings.forced_eos_token_ids),
        cand_scores=torch.empty(batch, num_candidates, device=device),
        cand_index=torch.empty(batch, num_candidates, dtype=torch.long, device=device),
    )


# ----------------------------------------------------------------------------------------------------------------
# The reference step (PyTorch): the semantics, readable; every value on the device
# ----------------------------------------------------------------------------------------------------------------
def _gather(tensor, index):
    """tensor ``[B, K, ...]``, index ``[B, J]`` -> ``[B, J, ...]`` (rows picked per batch item)."""
    while index.dim() < tensor.dim():
        index = index.unsqueeze(-1)
    return torch.take_along_dim(tensor, index, dim=1)


def _scale(state, scores, length):
    """``scores / (length - prompt_len) ** length_penalty`` for a device ``length`` (HF's float32 rounding)."""
    scale = state.length_scale[length]
    return scores * scale if state.multiply_by_reciprocal else scores / scale


def process_scores_at(state, sequences, cur_len, log_probs, settings):
    """HF's processors on ``log_probs [N, V]`` for ``sequences [N, T]`` whose first ``cur_len`` (a device ``[1]``
    tensor) tokens are written: ``generation.process_scores`` for a length the host does not know. The token
    ids come from ``state`` (device tensors made once), so a recorded step copies nothing from the host."""
    n = settings.no_repeat_ngram_size
    scores = log_probs
    if n > 0 and sequences.shape[1] >= n:
        windows = sequences.unfold(1, n, 1)                                         # [N, W, n]
        suffix = torch.gather(sequences, 1, (cur_len - n + 1 + torch.arange(n - 1, device=cur_len.device))
                              .clamp(min=0).expand(sequences.shape[0], n - 1))     # [N, n-1]
        starts = torch.arange(windows.shape[1], device=cur_len.device)
        same_prefix = (windows[:, :, :-1] == suffix[:, None, :]).all(-1) & (starts <= cur_len - n)
        vocab = scores.shape[-1]
        banned = torch.zeros(scores.shape[0], vocab + 1, dtype=torch.bool, device=scores.device)
        banned.scatter_(1, torch.where(same_prefix, windows[:, :, -1], vocab), True)
        scores = scores.masked_fill(banned[:, :vocab], float("-inf"))
    if state.eos.numel() and settings.min_length > 0:
        suppressed = scores.index_fill(-1, state.eos, float("-inf"))
        scores = torch.where(cur_len < settings.min_length, suppressed, scores)
    columns = torch.arange(scores.shape[-1], device=scores.device)
    forced_bos = settings.forced_bos_token_id
    for forced, at_length in ((columns == forced_bos if forced_bos is not None else None, 1),
                              (torch.isin(columns, state.forced_eos) if settings.forced_eos_token_ids is not None
                               else None, settings.max_length - 1)):
        if forced is not None:
            now = cur_len == at_length
            scores = torch.where(now & ~forced, float("-inf"), torch.where(now, 0.0, scores))
    return scores


def advance_reference(state, logits, settings):
    """One search step on next-token ``logits [N, V]``: updates ``state`` in place (see the module docstring).
    No host value is read. After the search stopped it changes nothing and sets the identity ``beam_idx``."""
    s = state
    batch, num_beams, vocab = s.batch, s.num_beams, s.vocab
    # [1]; a step after the search stopped (a no-op) may see max_length: clamped so that indexing stays in range
    cur_len = (s.prompt_len + s.step).clamp(max=s.max_length - 1)
    parity = s.step % 2
    seqs = s.running_seqs.index_select(0, parity)[0]                                 # [B, K, T]
    finished_seqs = s.finished_seqs.index_select(0, parity)[0]

    log_probs = process_scores_at(s, seqs.view(batch * num_beams, -1), cur_len,
                                  torch.log_softmax(logits.float(), dim=-1), settings)
    log_probs = log_probs.view(batch, num_beams, vocab) + s.running_scores[:, :, None]
    cand_scores, cand_index = torch.topk(log_probs.view(batch, num_beams * vocab), s.num_candidates)
    cand_beam, cand_token = cand_index // vocab, cand_index % vocab
    cand_seqs = _gather(seqs, cand_beam)                                             # [B, C, T]
    cand_seqs.scatter_(2, cur_len.expand(batch, s.num_candidates, 1), cand_token[:, :, None])
    cand_done = torch.isin(cand_token, s.eos) | (cur_len + 1 >= s.max_length)

    # the best num_beams candidates that did not end keep running
    keep_scores = cand_scores + cand_done.to(torch.float32) * NEG_LARGE
    keep = torch.topk(keep_scores, num_beams)[1]
    running_seqs, running_scores = _gather(cand_seqs, keep), _gather(keep_scores, keep)
    parent = _gather(cand_beam, keep)

    # candidates among the top num_beams that ended compete with the finished hypotheses
    just_finished = cand_done & (torch.arange(s.num_candidates, device=cand_done.device) < num_beams)
    final_scores = _scale(s, cand_scores, cur_len + 1)
    all_done = s.is_finished.all(dim=-1, keepdim=True) & (settings.early_stopping is True)
    final_scores = final_scores + all_done.to(torch.float32) * NEG_LARGE
    final_scores = final_scores + (~s.can_improve[:, None]).to(torch.float32) * NEG_LARGE
    final_scores = final_scores + (~just_finished).to(torch.float32) * NEG_LARGE
    merged_scores = torch.cat([s.finished_scores, final_scores], dim=1)
    best = torch.topk(merged_scores, num_beams)[1]
    generated = (cur_len + 1 - s.prompt_len).expand(batch, s.num_candidates)
    finished_seqs = _gather(torch.cat([finished_seqs, cand_seqs], dim=1), best)
    finished_scores = _gather(merged_scores, best)
    finished_len = _gather(torch.cat([s.finished_len, generated], dim=1), best)
    is_finished = _gather(torch.cat([s.is_finished, just_finished], dim=1), best)

    # can a running beam still beat the worst finished hypothesis?
    if settings.early_stopping == "never" and settings.length_penalty > 0.0:
        best_len = torch.full_like(cur_len, s.max_length)
    else:
        best_len = cur_len + 1
    best_running = _scale(s, running_scores[:, :1], best_len)
    worst_finished = torch.where(is_finished, finished_scores.min(dim=1, keepdim=True)[0], NEG_LARGE)
    can_improve = s.can_improve & torch.any(best_running > worst_finished, dim=-1)
    flags = torch.stack([~can_improve, is_finished.all(-1) & (settings.early_stopping is True),
                         cand_done.all(-1)])

    # commit, unless the search had stopped: then nothing moves (the sequences go to the other buffer, which
    # the unmoved step does not read)
    go = ~s.stopped
    s.running_seqs.index_copy_(0, 1 - parity, running_seqs[None])
    s.finished_seqs.index_copy_(0, 1 - parity, finished_seqs[None])
    for old, new in ((s.running_scores, running_scores), (s.finished_scores, finished_scores),
                     (s.finished_len, finished_len), (s.is_finished, is_finished), (s.can_improve, can_improve),
                     (s.stop_flags, flags)):
        old.copy_(torch.where(go, new, old))
    rows = batch * num_beams
    tokens = running_seqs.view(rows, -1).gather(1, cur_len.expand(rows, 1))
    s.next_tokens.copy_(torch.where(go, tokens, s.next_tokens))
    parent_rows = parent + torch.arange(batch, device=parent.device)[:, None] * num_beams
    s.beam_idx.copy_(torch.where(go, parent_rows.view(-1), torch.arange(rows, device=parent.device)))
    s.stopped.copy_(s.stopped | flags.all(-1).any())
    s.step.add_(go.long())


def advance(state, logits, settings, fused):
    """One step: the Triton kernels (``fused``) or :func:`advance_reference`; same state, same result."""
    if fused:
        beam_advance(state, logits, settings)
    else:
        advance_reference(state, logits, settings)


def finalize(state, num_return_sequences):
    """The search's result (one host read): ``[B * num_return_sequences, P + generated]``, per source its best
    hypotheses, best first, cut to the longest returned one."""
    current = state.finished_seqs[int(state.step) % 2]
    sequences = current[:, :num_return_sequences].reshape(state.batch * num_return_sequences, -1)
    generated = int(state.finished_len[:, :num_return_sequences].max())
    return sequences[:, :state.prompt_len + generated]


def beam_search(step, prompt, settings, reorder_cache, fused=False, recorded_step=None, sync_stop=False):
    """Beam search over ``prompt [B * num_beams, P]`` (each source's prompt repeated per beam).

    ``step(tokens [N, n]) -> logits [N, V]`` feeds tokens to the model; ``reorder_cache(beam_idx [N])`` moves
    its self-attention cache rows. ``fused``: the bookkeeping on the Triton kernels. ``recorded_step``: instead
    of calling ``step`` and ``reorder_cache`` each step, build once ``recorded_step(state, logits)``, a callable
    that runs a whole step (bookkeeping, cache reorder, the model on ``state.next_tokens`` at the device-side
    length) and returns the next logits buffer (``fusedformers.models.bart``'s recorded beam step).
    ``sync_stop``: read the stop verdict after every step, waiting for it (a caller that must not take a step
    past the search's end: BART near the end of its position table); otherwise ``StopPoll`` looks without
    waiting, and on CUDA may see the stop a few (no-op) steps late.

    Returns ``[B * num_return_sequences, P + generated]``: per source its best hypotheses, best first.
    """
    logits = step(prompt)
    state = new_state(prompt, settings, logits.shape[-1])
    poll = StopPoll(state.stopped)
    steps = settings.max_length - settings.prompt_len
    if recorded_step is not None:
        run = recorded_step(state, logits)
        for _ in range(steps):
            run()
            if poll.after_step():
                break
    else:
        for _ in range(steps):
            advance(state, logits, settings, fused)
            reorder_cache(state.beam_idx)
            if bool(state.stopped) if sync_stop else poll.after_step():
                break
            logits = step(state.next_tokens)
    return finalize(state, settings.num_return_sequences)

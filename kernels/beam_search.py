"""Beam-search bookkeeping in two Triton launches and a top-k, with no host synchronisation.

A beam step of HF's ``generate`` is ~80 small PyTorch ops (processors, top-k, gathers of scores, sequences and
finished hypotheses, the stop heuristics) and, in HF, a host read per step to decide whether to stop. Here:

1. ``_beam_scores_kernel`` (one program per decoder row): HF's logits processors at the device-side length —
   no_repeat_ngram_size (-inf for tokens that would repeat an n-gram of the row), min_length (-inf for eos),
   forced bos at length 1, forced eos at max_length - 1 — then adds the row's running score, in place on the
   float32 log-softmax;
2. ``torch.topk`` of the top ``C = max(2, 1 + n_eos) * K`` candidates per source;
3. ``_beam_update_kernel`` (one program per source): the candidates that keep running, the merge of the ended
   ones into the finished hypotheses, the sequences (double-buffered, so no row is overwritten while read), the
   tokens and cache rows of the next step, the stop heuristics; the last program to finish reads every
   source's verdict and moves the step counter, so the next launch sees it.

The state is ``fusedformers.models.beam_search.BeamState``; ``advance_reference`` there is the same step in
PyTorch (the semantics, and the tests' reference). Selections (the running beams, the finished hypotheses)
are stable descending sorts, as ``torch.topk``'s order on distinct values.
"""
import torch
import triton
import triton.language as tl

from fusedformers.kernels.launch import device_context, next_power_of_2

NEG_LARGE = tl.constexpr(-1.0e9)   # HF's "impossible" score, as fusedformers.models.beam_search.NEG_LARGE


# ----------------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _stable_rank_desc(key, idx, ok):
    """Each entry's place in a stable descending sort of the ``ok`` entries of ``key`` (ties: lower idx first)."""
    ahead = (key[None, :] > key[:, None]) | ((key[None, :] == key[:, None]) & (idx[None, :] < idx[:, None]))
    return tl.sum((ahead & ok[None, :]).to(tl.int32), axis=1)


@triton.jit
def _candidates(cand_scores_ptr, cand_index_ptr, eos_ptr, b, c, ok, num_candidates, vocab, cur_len, max_length,
                NUM_EOS: tl.constexpr):
    """Candidate ``c`` of source ``b``: (score, beam, token, ended: an eos token or the last position)."""
    score = tl.load(cand_scores_ptr + b * num_candidates + c, mask=ok, other=float("-inf"))
    index = tl.load(cand_index_ptr + b * num_candidates + c, mask=ok, other=0)
    beam, token = index // vocab, index % vocab
    ended = (c * 0 + cur_len + 1) >= max_length
    for i in tl.static_range(NUM_EOS):
        ended = ended | (token == tl.load(eos_ptr + i))
    return score, beam, token, ended


@triton.jit
def _pick(select, values):
    """``select [R, M]`` one-hot per row, ``values [M]`` -> ``[R]`` the selected values (exact, -inf included)."""
    return tl.sum(tl.where(select, values[None, :], 0), axis=1)


@triton.jit
def _length_scaled(scores, length_scale_ptr, length, MULTIPLY: tl.constexpr):
    """``scores / (length - prompt_len) ** length_penalty`` rounded as PyTorch does it for a Python divisor."""
    scale = tl.load(length_scale_ptr + length)
    if MULTIPLY:   # CUDA: times the float32 reciprocal
        return scores * scale
    else:
        return scores / scale


# ----------------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _beam_scores_kernel(
    # tensors
    scores_ptr,          # [N, V] float32 log-probs, processed in place, plus the running score
    seqs_ptr,            # running sequences [2, N, T] int64 (buffer step % 2 is current)
    running_scores_ptr,  # [N] float32
    step_ptr,            # [1] int64: the length is prompt_len + step
    eos_ptr, forced_eos_ptr,  # int64 [NUM_EOS], [NUM_FORCED_EOS]
    # strides and sizes
    stride_scores_row, stride_seqs_buffer, max_length, vocab,
    # settings
    prompt_len, min_length, forced_bos,
    NGRAM: tl.constexpr, NUM_EOS: tl.constexpr, NUM_FORCED_EOS: tl.constexpr, HAS_FORCED_BOS: tl.constexpr,
    BLOCK_V: tl.constexpr, BLOCK_J: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    step = tl.load(step_ptr)
    cur_len = prompt_len + step
    seq = seqs_ptr + (step % 2) * stride_seqs_buffer + row * max_length
    out = scores_ptr + row * stride_scores_row
    if NGRAM > 0:
        # the n-gram starting at j repeats the row's last n-1 tokens: its last token is banned (j <= len - n)
        for j0 in range(0, cur_len - NGRAM + 1, BLOCK_J):
            j = j0 + tl.arange(0, BLOCK_J)
            same = j <= cur_len - NGRAM
            for t in tl.static_range(NGRAM - 1):
                token = tl.load(seq + j + t, mask=same, other=-1)
                same = same & (token == tl.load(seq + cur_len - NGRAM + 1 + t))
            banned = tl.load(seq + j + NGRAM - 1, mask=same, other=0)
            tl.store(out + banned, float("-inf"), mask=same)
    if NUM_EOS > 0:
        if cur_len < min_length:
            for i in tl.static_range(NUM_EOS):
                tl.store(out + tl.load(eos_ptr + i), float("-inf"))
    tl.debug_barrier()  # the -inf above, stored by some threads, are read below by others

    force_bos = HAS_FORCED_BOS & (cur_len == 1)
    force_eos = (NUM_FORCED_EOS > 0) & (cur_len == max_length - 1)
    running = tl.load(running_scores_ptr + row)
    for v0 in range(0, vocab, BLOCK_V):
        v = v0 + tl.arange(0, BLOCK_V)
        x = tl.load(out + v, mask=v < vocab)
        if force_bos:   # HF's order: forced bos, then forced eos (which wins when both apply)
            x = tl.where(v == forced_bos, 0.0, float("-inf"))
        if force_eos:
            hit = v < 0
            for i in tl.static_range(NUM_FORCED_EOS):
                hit = hit | (v == tl.load(forced_eos_ptr + i))
            x = tl.where(hit, 0.0, float("-inf"))
        tl.store(out + v, x + running, mask=v < vocab)


@triton.jit
def _beam_update_kernel(
    # this step's candidates, from torch.topk
    cand_scores_ptr, cand_index_ptr,     # [B, C] float32, int64 (beam * V + token)
    # the state (fusedformers.models.beam_search.BeamState)
    running_seqs_ptr, finished_seqs_ptr,  # [2, B, K, T] int64
    running_scores_ptr, finished_scores_ptr, finished_len_ptr, is_finished_ptr,  # [B, K]
    can_improve_ptr,                     # [B] bool
    stop_flags_ptr,                      # [3, B] bool: cannot improve, all finished (early stop), all ended
    step_ptr, stopped_ptr, arrivals_ptr,  # [1] int64, [1] bool, [1] int32
    next_tokens_ptr, beam_idx_ptr,       # [N] int64 each
    length_scale_ptr, eos_ptr,           # [T + 1] float32, [NUM_EOS] int64
    # sizes
    batch, num_candidates, vocab, max_length, stride_seqs_buffer,
    # settings
    prompt_len,
    K: tl.constexpr, NUM_EOS: tl.constexpr, EARLY_STOP: tl.constexpr, BOUND_AT_MAX_LENGTH: tl.constexpr,
    MULTIPLY: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr,
    BLOCK_B: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    r = tl.arange(0, BLOCK_K)           # a beam slot of this source (running or finished)
    r_ok = r < K
    rows = b * K + r                    # its decoder row
    if tl.load(stopped_ptr):
        tl.store(beam_idx_ptr + rows, rows, mask=r_ok)   # nothing moves
    else:
        step = tl.load(step_ptr)
        cur_len = prompt_len + step
        src = (step % 2) * stride_seqs_buffer
        dst = ((step + 1) % 2) * stride_seqs_buffer

        # the best K candidates that did not end keep running
        c = tl.arange(0, BLOCK_C)
        c_ok = c < num_candidates
        score, beam, token, ended = _candidates(cand_scores_ptr, cand_index_ptr, eos_ptr, b, c, c_ok,
                                                num_candidates, vocab, cur_len, max_length, NUM_EOS)
        key = score + ended.to(tl.float32) * NEG_LARGE
        keep = (_stable_rank_desc(key, c, c_ok)[None, :] == r[:, None]) & c_ok[None, :]   # [BLOCK_K, BLOCK_C]
        keep_score = _pick(keep, key)
        keep_beam = _pick(keep, beam)
        keep_token = _pick(keep, token)

        # the finished hypotheses (m < K) and this step's candidates (m - K) compete for the K finished slots
        m = tl.arange(0, BLOCK_M)
        m_ok = m < K + num_candidates
        old = m < K
        is_cand = (m >= K) & m_ok
        cand_score, cand_beam, cand_token, cand_ended = _candidates(
            cand_scores_ptr, cand_index_ptr, eos_ptr, b, m - K, is_cand, num_candidates, vocab, cur_len,
            max_length, NUM_EOS)
        just_finished = cand_ended & (m - K < K) & is_cand    # only the top K candidates may finish
        old_finished = tl.load(is_finished_ptr + b * K + r, mask=r_ok, other=1) != 0
        all_finished = tl.min(old_finished.to(tl.int32), axis=0) > 0
        can_improve = tl.load(can_improve_ptr + b) != 0
        final = _length_scaled(cand_score, length_scale_ptr, cur_len + 1, MULTIPLY)
        final = final + (EARLY_STOP & all_finished).to(tl.float32) * NEG_LARGE   # HF's three additions, in order
        final = final + (1 - can_improve.to(tl.float32)) * NEG_LARGE
        final = final + (~just_finished).to(tl.float32) * NEG_LARGE
        merged = tl.where(old, tl.load(finished_scores_ptr + b * K + m, mask=old, other=0.0), final)
        best = (_stable_rank_desc(merged, m, m_ok)[None, :] == r[:, None]) & m_ok[None, :]  # [BLOCK_K, BLOCK_M]
        best_score = _pick(best, merged)
        best_from = _pick(best, m)
        generated = cur_len + 1 - prompt_len
        best_len = _pick(best, tl.where(old, tl.load(finished_len_ptr + b * K + m, mask=old, other=0), generated))
        old_flags = tl.load(is_finished_ptr + b * K + m, mask=old, other=0) != 0
        best_finished = _pick(best, tl.where(old, old_flags, just_finished).to(tl.int32)) != 0
        best_beam = _pick(best, cand_beam)
        best_token = _pick(best, cand_token)

        # sequences: running slot r continues keep_beam; finished slot r copies old slot best_from, or the
        # candidate's beam with its token at cur_len
        best_old = best_from < K
        for t0 in range(0, max_length, BLOCK_T):
            t = t0 + tl.arange(0, BLOCK_T)
            tile_ok = r_ok[:, None] & (t < max_length)[None, :]
            at_len = t[None, :] == cur_len
            running = tl.load(running_seqs_ptr + src + (b * K + keep_beam)[:, None] * max_length + t[None, :],
                              mask=tile_ok, other=0)
            tl.store(running_seqs_ptr + dst + rows[:, None] * max_length + t[None, :],
                     tl.where(at_len, keep_token[:, None], running), mask=tile_ok)
            kept = tl.load(finished_seqs_ptr + src + (b * K + best_from)[:, None] * max_length + t[None, :],
                           mask=tile_ok & best_old[:, None], other=0)
            new = tl.load(running_seqs_ptr + src + (b * K + best_beam)[:, None] * max_length + t[None, :],
                          mask=tile_ok & ~best_old[:, None], other=0)
            new = tl.where(at_len, best_token[:, None], new)
            tl.store(finished_seqs_ptr + dst + rows[:, None] * max_length + t[None, :],
                     tl.where(best_old[:, None], kept, new), mask=tile_ok)

        # can a running beam still beat the worst finished hypothesis? (at the new length, or at max_length)
        if BOUND_AT_MAX_LENGTH:
            bound_len = max_length + step * 0
        else:
            bound_len = cur_len + 1
        best_running = _length_scaled(tl.sum(tl.where(r == 0, keep_score, 0.0), axis=0), length_scale_ptr,
                                      bound_len, MULTIPLY)
        worst = tl.where(best_finished, tl.min(tl.where(r_ok, best_score, float("inf")), axis=0), NEG_LARGE)
        improves = tl.sum(((best_running > worst) & r_ok).to(tl.int32), axis=0) > 0
        can_improve = can_improve & improves
        finished_all = tl.min(tl.where(r_ok, best_finished, True).to(tl.int32), axis=0) > 0
        ended_all = tl.min(tl.where(c_ok, ended, True).to(tl.int32), axis=0) > 0

        tl.debug_barrier()  # every thread has read the [B, K] state above before any slot is overwritten
        tl.store(running_scores_ptr + rows, keep_score, mask=r_ok)
        tl.store(finished_scores_ptr + rows, best_score, mask=r_ok)
        tl.store(finished_len_ptr + rows, best_len, mask=r_ok)
        tl.store(is_finished_ptr + rows, best_finished, mask=r_ok)
        tl.store(next_tokens_ptr + rows, keep_token, mask=r_ok)
        tl.store(beam_idx_ptr + rows, b * K + keep_beam, mask=r_ok)
        tl.store(can_improve_ptr + b, can_improve)
        tl.store(stop_flags_ptr + b, can_improve == 0)
        tl.store(stop_flags_ptr + batch + b, EARLY_STOP & finished_all)
        tl.store(stop_flags_ptr + 2 * batch + b, ended_all)

        # the last program to get here ends the step for everyone: stop when every source agrees on one reason
        tl.debug_barrier()  # every thread's stores above come before this program's arrival (released by it)
        if tl.atomic_add(arrivals_ptr, 1) == batch - 1:   # acq_rel: the other programs' flags are visible
            stop_any = step < 0   # False, as a tensor (a loop-carried value keeps its type)
            for reason in tl.static_range(3):
                agree = step >= 0
                for b0 in range(0, batch, BLOCK_B):
                    sources = b0 + tl.arange(0, BLOCK_B)
                    flags = tl.load(stop_flags_ptr + reason * batch + sources, mask=sources < batch, other=1)
                    agree = agree & (tl.min(flags.to(tl.int32), axis=0) > 0)
                stop_any = stop_any | agree
            tl.store(stopped_ptr, stop_any)
            tl.store(step_ptr, step + 1)
            tl.store(arrivals_ptr, 0)


# ----------------------------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------------------------
def update_num_warps(num_beams, num_candidates):
    """Warps of the update kernel: its rank matrices are ``[K + C, K + C]`` (padded), so the registers grow with
    the beams; sm_90 without spills: 4 warps at K = 4 (96 registers), 8 at K = 8 with two eos ids (126), 16 at
    K = 16 (116) (tests/test_sm90_compile.py, family beam_search; 4 warps at K = 16 spilled 220 B)."""
    return min(16, max(4, next_power_of_2(num_beams + num_candidates) // 4))


def beam_advance(state, logits, settings):
    """One beam-search step on next-token ``logits [N, V]`` (N = B * K rows): updates ``state`` (a
    ``fusedformers.models.beam_search.BeamState``) in place, reading no host value. Launches: the float32 cast
    (16-bit logits only) and log-softmax, as HF's; the processors kernel; a top-k; the update kernel."""
    s = state
    rows, vocab = logits.shape
    if rows != s.batch * s.num_beams or vocab != s.vocab:
        raise ValueError(f"logits must be [B * num_beams, V] = [{s.batch * s.num_beams}, {s.vocab}], "
                         f"got {list(logits.shape)}")
    scores = torch.log_softmax(logits.float(), dim=-1)   # HF: float32 first, then log-softmax
    num_eos, num_forced_eos = s.eos.numel(), s.forced_eos.numel()
    with device_context(logits.device):
        _beam_scores_kernel[(rows,)](
            scores, s.running_seqs, s.running_scores, s.step, s.eos, s.forced_eos,
            scores.stride(0), s.running_seqs.stride(0), s.max_length, vocab,
            s.prompt_len, settings.min_length if num_eos else 0,
            settings.forced_bos_token_id if settings.forced_bos_token_id is not None else -1,
            NGRAM=settings.no_repeat_ngram_size, NUM_EOS=num_eos, NUM_FORCED_EOS=num_forced_eos,
            HAS_FORCED_BOS=settings.forced_bos_token_id is not None,
            BLOCK_V=min(1024, next_power_of_2(vocab)), BLOCK_J=64, num_warps=4,
        )
        torch.topk(scores.view(s.batch, s.num_beams * vocab), s.num_candidates, out=(s.cand_scores, s.cand_index))
        _beam_update_kernel[(s.batch,)](
            s.cand_scores, s.cand_index,
            s.running_seqs, s.finished_seqs,
            s.running_scores, s.finished_scores, s.finished_len, s.is_finished,
            s.can_improve, s.stop_flags, s.step, s.stopped, s.arrivals,
            s.next_tokens, s.beam_idx, s.length_scale, s.eos,
            s.batch, s.num_candidates, vocab, s.max_length, s.running_seqs.stride(0),
            s.prompt_len,
            K=s.num_beams, NUM_EOS=num_eos, EARLY_STOP=settings.early_stopping is True,
            BOUND_AT_MAX_LENGTH=settings.early_stopping == "never" and settings.length_penalty > 0.0,
            MULTIPLY=s.multiply_by_reciprocal,
            BLOCK_K=next_power_of_2(s.num_beams), BLOCK_C=next_power_of_2(s.num_candidates),
            BLOCK_M=next_power_of_2(s.num_beams + s.num_candidates), BLOCK_T=128, BLOCK_B=128,
            num_warps=update_num_warps(s.num_beams, s.num_candidates),
        )

"""Beam search with the semantics of HF transformers' ``generate`` (HF >= 4.50's vectorised algorithm).

The loop is model-agnostic: it calls ``step(tokens [N, n]) -> logits [N, V]`` (which appends the new tokens to
the model's self-attention cache and returns the next-token logits) and ``reorder_cache(beam_idx [N])`` (row r
of the cache becomes old row ``beam_idx[r]``; for BART only the decoder self-attention cache moves,
cross-attention K/V stay per source). Settings and logits processors are ``fusedformers.models.generation``'s.

Per step: top ``max(2, 1 + n_eos) * num_beams`` candidates per source (processors applied to the log-softmax),
finished hypotheses scored ``sum_logprobs / generated_len ** length_penalty``, early_stopping True / False
(heuristic at the current length) / "never" (at max_length when length_penalty > 0), outputs padded with
pad_token_id (eos when pad is 0 or unset) and cut to the longest returned hypothesis.
"""
import torch

from fusedformers.models.generation import process_scores

NEG_LARGE = -1.0e9  # HF's "impossible" score for beams


def _hits_eos(tokens, eos_token_ids):
    if not eos_token_ids:
        return torch.zeros(tokens.shape, dtype=torch.bool, device=tokens.device)
    return torch.isin(tokens, torch.tensor(eos_token_ids, device=tokens.device))


# ----------------------------------------------------------------------------------------------------------------
# Beam search
# ----------------------------------------------------------------------------------------------------------------
def _gather(tensor, index):
    """tensor ``[B, K, ...]``, index ``[B, J]`` -> ``[B, J, ...]`` (rows picked per batch item)."""
    while index.dim() < tensor.dim():
        index = index.unsqueeze(-1)
    return torch.take_along_dim(tensor, index, dim=1)


def beam_search(step, prompt, settings, reorder_cache):
    """Beam search over ``prompt [B * num_beams, P]`` (each source's prompt repeated per beam).

    Returns ``[B * num_return_sequences, P + generated]``: per source its best hypotheses, best first.
    """
    num_beams, prompt_len, max_length = settings.num_beams, settings.prompt_len, settings.max_length
    length_penalty, early_stopping = settings.length_penalty, settings.early_stopping
    device = prompt.device
    batch = prompt.shape[0] // num_beams
    eos = settings.eos_token_ids
    # per source, keep enough candidates that num_beams of them are still running even if some end in eos
    num_candidates = max(2, 1 + len(eos)) * num_beams
    is_top_beam = torch.arange(num_candidates, device=device) < num_beams
    fill = (settings.pad_token_id or eos[0]) if eos else -1  # HF: pad, or eos when pad is 0/unset, else -1

    # running hypotheses and finished ones, [B, K, max_length] token ids padded with `fill`
    running_seqs = torch.full((batch, num_beams, max_length), fill, dtype=torch.long, device=device)
    running_seqs[:, :, :prompt_len] = prompt.view(batch, num_beams, prompt_len)
    finished_seqs = running_seqs.clone()
    running_scores = torch.zeros(batch, num_beams, device=device)  # sum of log-probs
    running_scores[:, 1:] = NEG_LARGE  # the first step expands beam 0 only (all beams are identical)
    finished_scores = torch.full((batch, num_beams), NEG_LARGE, device=device)  # length-penalised
    is_finished = torch.zeros(batch, num_beams, dtype=torch.bool, device=device)
    can_improve = torch.ones(batch, 1, dtype=torch.bool, device=device)
    # flat row (source * K + beam) each generated token came from; -1 = not generated
    running_origin = torch.full((batch, num_beams, max_length - prompt_len), -1, dtype=torch.int32, device=device)
    finished_origin = running_origin.clone()
    batch_offset = torch.arange(batch, device=device)[:, None] * num_beams

    cur_len = prompt_len
    tokens = prompt
    while True:
        logits = step(tokens).float()                                                       # [B*K, V]
        vocab = logits.shape[-1]
        flat_seqs = running_seqs[:, :, :cur_len].reshape(batch * num_beams, cur_len)
        log_probs = process_scores(flat_seqs, torch.log_softmax(logits, dim=-1), settings)
        log_probs = log_probs.view(batch, num_beams, vocab) + running_scores[:, :, None]
        log_probs = log_probs.view(batch, num_beams * vocab)

        # top candidates over all beams of a source
        cand_scores, cand_index = torch.topk(log_probs, num_candidates)                    # [B, C]
        cand_beam = cand_index // vocab
        cand_seqs = _gather(running_seqs, cand_beam)
        cand_seqs[:, :, cur_len] = cand_index % vocab
        cand_origin = _gather(running_origin, cand_beam)
        cand_origin[:, :, cur_len - prompt_len] = (cand_beam + batch_offset).to(torch.int32)
        cand_done = _hits_eos(cand_seqs[:, :, cur_len], eos) | (cur_len + 1 >= max_length)  # [B, C]

        # the best num_beams candidates that did not finish keep running
        keep = torch.topk(cand_scores + cand_done.to(torch.float32) * NEG_LARGE, num_beams)[1]
        running_seqs = _gather(cand_seqs, keep)
        running_scores = _gather(cand_scores + cand_done.to(torch.float32) * NEG_LARGE, keep)
        running_origin = _gather(cand_origin, keep)

        # candidates among the top num_beams that finished compete with the finished hypotheses
        just_finished = cand_done & is_top_beam[None, :]
        final_scores = cand_scores / ((cur_len + 1 - prompt_len) ** length_penalty)
        all_done = torch.all(is_finished, dim=-1, keepdim=True) & (early_stopping is True)
        final_scores += all_done.to(torch.float32) * NEG_LARGE
        final_scores += (~can_improve).to(torch.float32) * NEG_LARGE
        final_scores += (~just_finished) * NEG_LARGE
        best = torch.topk(torch.cat([finished_scores, final_scores], dim=1), num_beams)[1]
        finished_seqs = _gather(torch.cat([finished_seqs, cand_seqs], dim=1), best)
        finished_scores = _gather(torch.cat([finished_scores, final_scores], dim=1), best)
        finished_origin = _gather(torch.cat([finished_origin, cand_origin], dim=1), best)
        is_finished = _gather(torch.cat([is_finished, just_finished], dim=1), best)

        # move the self-attention cache rows to the beams that continue
        reorder_cache(running_origin[:, :, cur_len - prompt_len].reshape(-1))
        cur_len += 1

        # can a running beam still beat the worst finished hypothesis?
        if early_stopping == "never" and length_penalty > 0.0:
            best_len = max_length - prompt_len
        else:
            best_len = cur_len - prompt_len
        best_running = running_scores[:, :1] / (best_len ** length_penalty)
        worst_finished = torch.where(is_finished, finished_scores.min(dim=1, keepdim=True)[0], NEG_LARGE)
        can_improve = can_improve & torch.any(best_running > worst_finished, dim=-1, keepdim=True)

        stop = (not can_improve.any()) or (early_stopping is True and bool(is_finished.all())) \
            or bool(cand_done.all())
        if stop:
            break
        tokens = running_seqs[:, :, cur_len - 1].reshape(-1, 1)

    num_return = settings.num_return_sequences
    sequences = finished_seqs[:, :num_return].reshape(batch * num_return, max_length)
    origin = finished_origin[:, :num_return].reshape(batch * num_return, -1)
    generated = int((origin != -1).sum(dim=1).max())
    return sequences[:, :prompt_len + generated]

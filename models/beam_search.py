"""Greedy and beam search for encoder-decoder models with the semantics of HF transformers' ``generate``.

The search loops are model-agnostic: they call ``step(tokens [N, n]) -> logits [N, V]`` (which appends the new
tokens to the model's self-attention cache and returns the next-token logits) and, for beams,
``reorder_cache(beam_idx [N])`` (row r of the cache becomes old row ``beam_idx[r]``; only the decoder
self-attention cache moves, cross-attention K/V stay per source).

HF semantics reproduced here:
- settings: call arguments > generation_config.json (or config.json's generation keys) > HF's global defaults;
  ``max_new_tokens`` over ``max_length`` (lengths count the decoder prompt, i.e. decoder_start_token_id);
- logits processors in HF's order: no_repeat_ngram_size, min_length, min_new_tokens, forced_bos_token_id,
  forced_eos_token_id (greedy: on the float32 logits; beams: on their log-softmax);
- greedy: rows that finished get pad_token_id until every row is done or max_length is reached;
- beam search (HF >= 4.50 vectorised algorithm): top ``max(2, 1 + n_eos) * num_beams`` candidates per source,
  finished hypotheses scored ``sum_logprobs / generated_len ** length_penalty``, early_stopping True / False
  (heuristic at the current length) / "never" (at max_length when length_penalty > 0), outputs padded with
  pad_token_id (eos when pad is 0 or unset) and cut to the longest returned hypothesis.
"""
from dataclasses import dataclass

import torch

from fusedformers.models.generation import as_id_list, check_supported, pick_next_token, suppress_eos

# HF GenerationConfig global defaults for the settings this module implements
DEFAULTS = {"max_length": 20, "min_length": 0, "num_beams": 1, "num_return_sequences": 1, "length_penalty": 1.0,
            "early_stopping": False, "no_repeat_ngram_size": 0, "forced_bos_token_id": None,
            "forced_eos_token_id": None}

# generation keys read from config.json when a checkpoint has no generation_config.json (HF's legacy fallback)
GENERATION_KEYS = ("max_length", "max_new_tokens", "min_length", "min_new_tokens", "num_beams", "early_stopping",
                   "length_penalty", "no_repeat_ngram_size", "num_return_sequences", "forced_bos_token_id",
                   "forced_eos_token_id", "bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id",
                   "do_sample", "repetition_penalty", "encoder_no_repeat_ngram_size", "bad_words_ids",
                   "num_beam_groups", "diversity_penalty", "encoder_repetition_penalty", "suppress_tokens",
                   "begin_suppress_tokens", "exponential_decay_length_penalty", "sequence_bias",
                   "renormalize_logits", "remove_invalid_values", "force_words_ids", "constraints", "penalty_alpha")

# settings HF would honour that this module does not implement: value that means "off"
UNSUPPORTED_OFF = {"do_sample": False, "repetition_penalty": 1.0, "encoder_repetition_penalty": 1.0,
                   "encoder_no_repeat_ngram_size": 0, "bad_words_ids": None, "num_beam_groups": 1,
                   "diversity_penalty": 0.0, "suppress_tokens": None, "begin_suppress_tokens": None,
                   "exponential_decay_length_penalty": None, "sequence_bias": None, "renormalize_logits": False,
                   "remove_invalid_values": False, "force_words_ids": None, "constraints": None,
                   "penalty_alpha": 0.0}

NEG_LARGE = -1.0e9  # HF's "impossible" score for beams


def generation_defaults_from_model_config(config_dict):
    """HF's fallback generation config: the generation keys of config.json (non-None values)."""
    return {k: config_dict[k] for k in GENERATION_KEYS if config_dict.get(k) is not None}


@dataclass
class GenerationSettings:
    """Resolved settings. Lengths are decoder lengths including the prompt (``prompt_len`` tokens)."""
    max_length: int
    min_length: int
    prompt_len: int
    num_beams: int
    num_return_sequences: int
    length_penalty: float
    early_stopping: bool | str
    no_repeat_ngram_size: int
    forced_bos_token_id: int | None
    forced_eos_token_ids: list | None
    eos_token_ids: list
    pad_token_id: int | None
    decoder_start_token_id: int


class _Unset:
    def __repr__(self):
        return "UNSET"


UNSET = _Unset()  # default of generate()'s arguments: "not passed" (None passed explicitly means "off")


def resolve_generation_settings(generation_config, given, *, max_position_embeddings=None, decoder_input_ids=None):
    """HF's precedence: ``given`` (the arguments passed to generate, None included) > ``generation_config``
    (a dict: generation_config.json) > HF's global defaults."""
    check_supported(generation_config, given, UNSUPPORTED_OFF, "fusedformers.models.beam_search")

    def pick(name):
        if name in given:  # passed explicitly; None falls back to HF's global default (if it has one)
            return given[name] if given[name] is not None else DEFAULTS.get(name)
        if generation_config.get(name) is not None:
            return generation_config[name]
        return DEFAULTS.get(name)

    start = pick("decoder_start_token_id")
    if start is None:
        start = pick("bos_token_id")
    if start is None and decoder_input_ids is None:
        raise ValueError("decoder_start_token_id (or bos_token_id) must be set for encoder-decoder generation")
    prompt_len = 1 if decoder_input_ids is None else _prompt_with_start(decoder_input_ids, start).shape[1]

    max_new_tokens = pick("max_new_tokens")
    if max_new_tokens is not None:
        max_length = max_new_tokens + prompt_len
    elif given.get("max_length") is not None or generation_config.get("max_length") is not None:
        max_length = pick("max_length")
    else:  # HF: 20 new tokens by default, capped at the position table
        max_length = DEFAULTS["max_length"] + prompt_len
        if max_position_embeddings is not None:
            max_length = min(max_length, max_position_embeddings)
    if prompt_len >= max_length:
        raise ValueError(f"decoder prompt length {prompt_len} leaves nothing to generate with max_length "
                         f"{max_length}; set max_new_tokens")
    min_new_tokens = pick("min_new_tokens")
    min_length = min_new_tokens + prompt_len if min_new_tokens is not None else pick("min_length")

    eos = as_id_list(pick("eos_token_id"))
    pad = pick("pad_token_id")
    if pad is None and eos:
        pad = eos[0]
    forced_eos = pick("forced_eos_token_id")
    early_stopping = pick("early_stopping")
    if early_stopping not in (True, False, "never"):
        raise ValueError(f"early_stopping must be True, False or 'never', got {early_stopping!r}")
    num_beams = int(pick("num_beams"))
    num_return_sequences = int(pick("num_return_sequences"))
    if num_beams < 1:
        raise ValueError(f"num_beams must be >= 1, got {num_beams}")
    if num_return_sequences > num_beams:
        raise ValueError(f"num_return_sequences ({num_return_sequences}) must be <= num_beams ({num_beams}); "
                         f"greedy decoding returns one sequence per input")
    return GenerationSettings(
        max_length=int(max_length), min_length=int(min_length or 0), prompt_len=prompt_len, num_beams=num_beams,
        num_return_sequences=num_return_sequences, length_penalty=float(pick("length_penalty")),
        early_stopping=early_stopping, no_repeat_ngram_size=int(pick("no_repeat_ngram_size") or 0),
        forced_bos_token_id=pick("forced_bos_token_id"),
        forced_eos_token_ids=as_id_list(forced_eos) if forced_eos is not None else None,
        eos_token_ids=eos, pad_token_id=pad, decoder_start_token_id=start)


def _prompt_with_start(decoder_input_ids, start):
    """HF prepends decoder_start_token_id to user decoder_input_ids that do not all start with it."""
    if start is not None and (decoder_input_ids[:, 0] != start).all():
        column = torch.full_like(decoder_input_ids[:, :1], start)
        return torch.cat([column, decoder_input_ids], dim=1)
    return decoder_input_ids


def decoder_prompt(settings, batch_size, decoder_input_ids, device):
    """The decoder's first input ``[B, P]``: decoder_start_token_id, or the user's prefix (start prepended)."""
    if decoder_input_ids is None:
        return torch.full((batch_size, 1), settings.decoder_start_token_id, dtype=torch.long, device=device)
    return _prompt_with_start(decoder_input_ids.to(device=device, dtype=torch.long),
                              settings.decoder_start_token_id)


# ----------------------------------------------------------------------------------------------------------------
# Logits processors (HF order)
# ----------------------------------------------------------------------------------------------------------------
def ban_repeated_ngrams(sequences, scores, ngram_size):
    """-inf for every token that would complete an n-gram already present in its row.

    sequences ``[N, L]`` (the whole decoder sequence so far), scores ``[N, V]``."""
    length = sequences.shape[1]
    if ngram_size <= 0 or length < ngram_size:
        return scores
    suffix = sequences[:, length - ngram_size + 1:]                       # [N, n-1] the last n-1 tokens
    windows = sequences.unfold(1, ngram_size, 1)                          # [N, W, n] every n-gram
    same_prefix = (windows[:, :, :-1] == suffix[:, None, :]).all(dim=-1)  # [N, W]
    vocab = scores.shape[-1]
    banned = torch.zeros(scores.shape[0], vocab + 1, dtype=torch.bool, device=scores.device)
    banned.scatter_(1, torch.where(same_prefix, windows[:, :, -1], vocab), True)  # non-matches -> spare column
    return scores.masked_fill(banned[:, :vocab], float("-inf"))


def force_token(scores, token_ids):
    """Every score -inf except ``token_ids`` at 0."""
    forced = torch.full_like(scores, float("-inf"))
    forced[:, token_ids] = 0
    return forced


def process_scores(sequences, scores, settings):
    """Apply the logits processors to next-token scores ``[N, V]`` given the sequences ``[N, L]`` so far."""
    length = sequences.shape[1]
    scores = ban_repeated_ngrams(sequences, scores, settings.no_repeat_ngram_size)
    if settings.eos_token_ids and length < settings.min_length:  # min_length / min_new_tokens
        scores = suppress_eos(scores, settings.eos_token_ids)
    if settings.forced_bos_token_id is not None and length == 1:
        scores = force_token(scores, settings.forced_bos_token_id)
    if settings.forced_eos_token_ids is not None and length == settings.max_length - 1:
        scores = force_token(scores, settings.forced_eos_token_ids)
    return scores


def _hits_eos(tokens, eos_token_ids):
    if not eos_token_ids:
        return torch.zeros(tokens.shape, dtype=torch.bool, device=tokens.device)
    return torch.isin(tokens, torch.tensor(eos_token_ids, device=tokens.device))


# ----------------------------------------------------------------------------------------------------------------
# Greedy
# ----------------------------------------------------------------------------------------------------------------
def greedy_search(step, prompt, settings):
    """prompt ``[B, P]`` -> ``[B, P + generated]``; rows that hit eos continue with pad_token_id."""
    sequences = prompt
    unfinished = torch.ones(prompt.shape[0], dtype=torch.bool, device=prompt.device)
    tokens = prompt
    while True:
        scores = process_scores(sequences, step(tokens).float(), settings)
        next_tokens = pick_next_token(scores)
        if settings.eos_token_ids:
            next_tokens = torch.where(unfinished, next_tokens, settings.pad_token_id)
        sequences = torch.cat([sequences, next_tokens[:, None]], dim=1)
        unfinished &= ~_hits_eos(next_tokens, settings.eos_token_ids)
        if sequences.shape[1] >= settings.max_length or not unfinished.any():
            return sequences
        tokens = next_tokens[:, None]


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

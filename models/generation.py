"""Token picking shared by the models' ``generate``, with Hugging Face's semantics and order.

HF applies, to float32 logits of the last position: min_new_tokens (eos set to -inf while fewer than
``min_new_tokens`` tokens were generated), then, only when sampling, temperature, top-k and top-p; then greedy
argmax or one multinomial draw from the softmax.
"""
import torch

# HF GenerationConfig defaults, used when neither the caller nor generation_config.json sets a value
HF_DEFAULTS = {"max_length": 20, "do_sample": False, "temperature": 1.0, "top_k": 50, "top_p": 1.0,
               "min_new_tokens": 0, "min_length": 0}

# settings HF's generate honours that this module does not implement, with the value that means "off": a
# checkpoint or a call that sets another value gets NotImplementedError instead of silently different tokens
UNSUPPORTED_OFF = {"num_beams": 1, "num_return_sequences": 1, "repetition_penalty": 1.0, "no_repeat_ngram_size": 0,
                   "forced_bos_token_id": None, "forced_eos_token_id": None, "bad_words_ids": None,
                   "suppress_tokens": None, "begin_suppress_tokens": None, "min_p": None, "typical_p": 1.0,
                   "epsilon_cutoff": 0.0, "eta_cutoff": 0.0, "encoder_repetition_penalty": 1.0,
                   "encoder_no_repeat_ngram_size": 0, "num_beam_groups": 1, "diversity_penalty": 0.0,
                   "exponential_decay_length_penalty": None, "sequence_bias": None, "renormalize_logits": False,
                   "remove_invalid_values": False, "force_words_ids": None, "constraints": None,
                   "penalty_alpha": None, "guidance_scale": None, "watermarking_config": None}
# accepted and without effect on the tokens (HF's use_cache=False recomputes every step, same result)
IGNORED_SETTINGS = ("use_cache",)


def as_id_list(token_ids):
    """None, an int, or a list of ints → list of ints."""
    if token_ids is None:
        return []
    if isinstance(token_ids, int):
        return [token_ids]
    if isinstance(token_ids, torch.Tensor):
        return [int(t) for t in token_ids.flatten().tolist()]
    return [int(t) for t in token_ids]


def check_supported(generation_config, given, unsupported, what):
    """NotImplementedError naming the first setting of ``unsupported`` ({name: value that means off}) that is
    not off: the call's value when ``given`` has the name (an explicit None: off), else the generation config's.
    ``what`` names the search in the message."""
    for key, off in unsupported.items():
        value = given[key] if key in given else generation_config.get(key)
        if value is not None and value != off and value not in ([], {}):
            raise NotImplementedError(f"generation setting {key}={value!r} is not supported by {what}; "
                                      f"set it to {off!r}")


def resolve_generation_args(generation_config, model_config_eos, model_config_pad, prompt_len,
                            max_position_embeddings=None, **given):
    """Merge call arguments (None = not given) over generation_config.json over HF's defaults.

    Lengths as HF's decoder-only generate: max_new_tokens, else max_length (prompt included), else 20 new
    tokens capped at max_position_embeddings; eos is suppressed until min_new_tokens new tokens, else (when
    min_new_tokens is not set) min_length tokens counting the prompt. Settings HF would apply that are not
    implemented raise NotImplementedError.
    Returns a dict with max_new_tokens, min_new_tokens (the effective one), do_sample, temperature, top_k,
    top_p, eos_token_ids (list), pad_token_id (int: pad, else the first eos, else 0 as HF warns and does).
    """
    given = {k: v for k, v in given.items() if k not in IGNORED_SETTINGS}
    check_supported(generation_config, {k: v for k, v in given.items() if v is not None}, UNSUPPORTED_OFF,
                    "this generate (greedy and sampling)")

    def pick(name):
        if given.get(name) is not None:
            return given[name]
        if generation_config.get(name) is not None:
            return generation_config[name]
        return HF_DEFAULTS.get(name)

    if pick("max_new_tokens") is not None:
        max_new_tokens = pick("max_new_tokens")
    elif given.get("max_length") is not None or generation_config.get("max_length") is not None:
        max_new_tokens = pick("max_length") - prompt_len
    else:
        max_length = HF_DEFAULTS["max_length"] + prompt_len
        if max_position_embeddings is not None:
            max_length = min(max_length, max_position_embeddings)
        max_new_tokens = max_length - prompt_len
    if max_new_tokens <= 0:
        raise ValueError(f"nothing to generate: max_new_tokens resolved to {max_new_tokens} (prompt length "
                         f"{prompt_len}); pass max_new_tokens")
    if given.get("min_new_tokens") is not None or generation_config.get("min_new_tokens") is not None:
        min_new_tokens = int(pick("min_new_tokens"))  # HF: min_new_tokens, when set, replaces min_length
    else:
        min_new_tokens = int(pick("min_length") or 0) - prompt_len
    eos = given.get("eos_token_id")
    if eos is None:
        eos = generation_config.get("eos_token_id", model_config_eos)
    eos_token_ids = as_id_list(eos)
    pad = given.get("pad_token_id")
    if pad is None:
        pad = generation_config.get("pad_token_id", model_config_pad)
    if pad is None:
        pad = eos_token_ids[0] if eos_token_ids else 0
    return {"max_new_tokens": int(max_new_tokens), "min_new_tokens": max(0, min_new_tokens),
            "do_sample": bool(pick("do_sample")), "temperature": float(pick("temperature")),
            "top_k": int(pick("top_k") or 0), "top_p": float(pick("top_p")),
            "eos_token_ids": eos_token_ids, "pad_token_id": int(pad)}


def suppress_eos(logits, eos_token_ids):
    """Set the eos columns of ``logits [B, V]`` to -inf (HF's MinNewTokensLengthLogitsProcessor)."""
    if eos_token_ids:
        ids = torch.tensor(eos_token_ids, device=logits.device)
        logits = logits.index_fill(-1, ids, float("-inf"))
    return logits


def top_k_filter(logits, top_k):
    """Keep the ``top_k`` largest logits of each row (ties with the k-th kept, as HF), others -inf."""
    top_k = min(top_k, logits.shape[-1])
    kth_largest = torch.topk(logits, top_k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth_largest, float("-inf"))


def top_p_filter(logits, top_p, min_tokens_to_keep=1):
    """Nucleus filtering: keep the smallest set of most probable tokens whose probability sums to at least
    ``top_p`` (at least ``min_tokens_to_keep``); HF removes, in ascending order, tokens whose cumulative
    probability is ``<= 1 - top_p``."""
    sorted_logits, sorted_idx = torch.sort(logits, descending=False, dim=-1)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove_sorted = cumulative <= (1 - top_p)
    remove_sorted[..., -min_tokens_to_keep:] = False
    remove = remove_sorted.scatter(-1, sorted_idx, remove_sorted)
    return logits.masked_fill(remove, float("-inf"))


def apply_logits_processing(logits, *, num_generated=0, min_new_tokens=0, eos_token_ids=(), do_sample=False,
                            temperature=1.0, top_k=None, top_p=None):
    """Process next-token logits ``[B, V]`` (cast to float32, as HF) in HF's order.

    num_generated: tokens generated so far (eos is suppressed while ``num_generated < min_new_tokens``).
    temperature/top_k/top_p apply only when ``do_sample`` (HF's warpers); top_k None/0 and top_p None/1.0 are
    off. Returns new float32 logits ``[B, V]`` with removed tokens at -inf.
    """
    logits = logits.float()
    if num_generated < min_new_tokens:
        logits = suppress_eos(logits, list(eos_token_ids))
    if not do_sample:
        return logits
    if temperature is not None and temperature != 1.0:
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
        logits = logits / temperature
    if top_k:
        if top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {top_k}")
        logits = top_k_filter(logits, top_k)
    if top_p is not None and top_p < 1.0:
        if not 0.0 <= top_p <= 1.0:
            raise ValueError(f"top_p must be in [0, 1], got {top_p}")
        logits = top_p_filter(logits, top_p)
    return logits


def make_generator(generator, device):
    """None → None (the global RNG); an int seed → a new torch.Generator on ``device`` seeded with it."""
    if generator is None or isinstance(generator, torch.Generator):
        return generator
    g = torch.Generator(device=device)
    g.manual_seed(int(generator))
    return g


def pick_next_token(logits, do_sample=False, generator=None):
    """Next token ids ``[B]`` from processed logits ``[B, V]``: argmax, or one draw from softmax(logits)."""
    if not do_sample:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float(), dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)

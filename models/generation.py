"""Generation shared by both models, with the semantics of Hugging Face transformers' ``generate``: one settings
resolver, the logits processors in HF's order, token picking, and the greedy / sampling loop.

A model's ``generate`` resolves its settings here, builds a ``step(tokens [N, n]) -> logits [N, V]`` (feed the
new tokens, which the model writes into its KV cache, and return the next-token logits of the last position),
and runs :func:`sample_loop` (greedy or sampling) or ``beam_search.beam_search`` over it.

HF semantics reproduced here:
- settings: call arguments > generation_config.json (or config.json's generation keys) > the model config's
  token ids > HF's global defaults; an argument passed explicitly, even as None, overrides the config (None
  then turns that feature off, as in HF: ``forced_eos_token_id=None``, ``eos_token_id=None``, ``top_k=None``;
  ``max_length=None`` leaves the default length rule);
- lengths count the prompt (the decoder prompt for encoder-decoder models): ``max_new_tokens``, else
  ``max_length``, else 20 new tokens capped at max_position_embeddings; ``min_new_tokens``, when set, replaces
  ``min_length``; pad falls back to the first eos token;
- logits processors in HF's order, on float32 scores: no_repeat_ngram_size, min_length / min_new_tokens,
  forced_bos_token_id, forced_eos_token_id, then, when sampling, temperature, top-k and top-p;
- a setting HF would apply that the chosen search does not implement raises NotImplementedError rather than
  giving other tokens.
"""
import collections
import operator
from dataclasses import dataclass

import torch

STOP_CHECK_INTERVAL = 8  # the loop asks the GPU whether every row has finished once per this many steps
# generation buffers (KV caches, tokens, masks) start with room for the prompt and this many new tokens and
# double as needed, so max_new_tokens=10**6 with an early eos does not allocate for a million positions
INITIAL_ROOM = 64

# HF GenerationConfig's global defaults for the settings implemented here
HF_DEFAULTS = {"max_length": 20, "min_length": 0, "do_sample": False, "temperature": 1.0, "top_k": 50, "top_p": 1.0,
               "num_beams": 1, "num_return_sequences": 1, "length_penalty": 1.0, "early_stopping": False,
               "no_repeat_ngram_size": 0}

# every setting of HF's generate that changes the tokens, with the value that means "off" (None is off too). A
# search lists the ones it implements; a call or a generation config that sets another one raises
# NotImplementedError.
OFF_VALUES = {"do_sample": False, "num_beams": 1, "num_return_sequences": 1, "no_repeat_ngram_size": 0,
              "forced_bos_token_id": None, "forced_eos_token_id": None, "repetition_penalty": 1.0,
              "encoder_repetition_penalty": 1.0, "encoder_no_repeat_ngram_size": 0, "bad_words_ids": None,
              "suppress_tokens": None, "begin_suppress_tokens": None, "min_p": 0.0, "typical_p": 1.0,
              "epsilon_cutoff": 0.0, "eta_cutoff": 0.0, "num_beam_groups": 1, "diversity_penalty": 0.0,
              "exponential_decay_length_penalty": None, "sequence_bias": None, "renormalize_logits": False,
              "remove_invalid_values": False, "force_words_ids": None, "constraints": None, "penalty_alpha": 0.0,
              "guidance_scale": 1.0, "watermarking_config": None}
# what an explicit None means where it is not HF's global default: HF keeps the None and skips the processor
EXPLICIT_NONE = {"top_k": 0}
# settings of the implemented features that are not on/off switches
TUNING_SETTINGS = ("max_new_tokens", "max_length", "min_new_tokens", "min_length", "temperature", "top_k", "top_p",
                   "length_penalty", "early_stopping", "eos_token_id", "pad_token_id", "bos_token_id",
                   "decoder_start_token_id")
# accepted and without effect on the tokens (HF's use_cache=False recomputes every step: the same result)
IGNORED_SETTINGS = ("use_cache",)
KNOWN_SETTINGS = frozenset(OFF_VALUES) | frozenset(TUNING_SETTINGS) | frozenset(IGNORED_SETTINGS)

# what each search implements (the rest of OFF_VALUES must be off)
SAMPLING_SEARCH = frozenset({"do_sample"})
BEAM_SEARCH = frozenset({"num_beams", "num_return_sequences", "no_repeat_ngram_size", "forced_bos_token_id",
                         "forced_eos_token_id"})

# generation keys read from config.json when a checkpoint has no generation_config.json (HF's legacy fallback)
GENERATION_KEYS = tuple(sorted(KNOWN_SETTINGS - {"use_cache"}))


def generation_defaults_from_model_config(config_dict):
    """HF's fallback generation config: the generation keys of config.json (non-None values)."""
    return {k: config_dict[k] for k in GENERATION_KEYS if config_dict.get(k) is not None}


def as_id_list(token_ids):
    """None, an int, a tensor, or a list of ints → list of ints."""
    if token_ids is None:
        return []
    if isinstance(token_ids, int):
        return [token_ids]
    if isinstance(token_ids, torch.Tensor):
        return [int(t) for t in token_ids.flatten().tolist()]
    return [int(t) for t in token_ids]


def check_settings(generation_config, given, implemented, what):
    """TypeError for a ``given`` name that is no generation setting; NotImplementedError naming the first setting
    of :data:`OFF_VALUES` outside ``implemented`` that is not off: the call's value when ``given`` has the name
    (an explicit None: off), else the generation config's. ``what`` names the search in the message."""
    unknown = sorted(set(given) - KNOWN_SETTINGS)
    if unknown:
        raise TypeError(f"generate() got unexpected arguments {unknown}")
    for key, off in OFF_VALUES.items():
        if key in implemented:
            continue
        value = given[key] if key in given else generation_config.get(key)
        if value is not None and value != off and value not in ([], {}):
            raise NotImplementedError(f"generation setting {key}={value!r} is not supported by {what}; "
                                      f"set it to {off!r}")


def check_prompt(input_ids, attention_mask, name="input_ids"):
    """ValueError unless ``input_ids`` is a non-empty ``[B, P]`` integer tensor and ``attention_mask`` is None or
    ``[B, P]`` like it (never broadcast: a ``[1, P]`` mask for a batch of B would silently mask every row alike)."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype.is_floating_point:
        shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"{name} must be an integer tensor [B, P], got {shape}")
    if input_ids.numel() == 0:
        raise ValueError(f"{name} must hold at least one token per row and one row, got shape "
                         f"{tuple(input_ids.shape)}")
    if attention_mask is not None and (not isinstance(attention_mask, torch.Tensor)
                                       or tuple(attention_mask.shape) != tuple(input_ids.shape)):
        shape = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask)
        raise ValueError(f"attention_mask must have the shape of {name} {tuple(input_ids.shape)} ([B, P], 1 = token, "
                         f"0 = padding), got {shape}")


@dataclass
class GenerationSettings:
    """Resolved settings. Lengths count the prompt (``prompt_len`` tokens; the decoder prompt for BART)."""
    prompt_len: int
    max_length: int
    min_length: int
    do_sample: bool
    temperature: float
    top_k: int
    top_p: float
    num_beams: int
    num_return_sequences: int
    length_penalty: float
    early_stopping: bool | str
    no_repeat_ngram_size: int
    forced_bos_token_id: int | None
    forced_eos_token_ids: list | None
    eos_token_ids: list
    pad_token_id: int | None
    decoder_start_token_id: int | None = None


def _strict_int(name, value):
    """An integer setting (HF: TypeError for ``max_new_tokens=2.5``); numpy and torch integers are accepted."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {value!r}") from None


def resolve_settings(generation_config, given, *, implemented, what, prompt_len=None,
                     max_position_embeddings=None, model_defaults=None, decoder_input_ids=None):
    """Merge ``given`` (the arguments passed to generate; None included) over ``generation_config`` (a dict) over
    ``model_defaults`` (the model config's token ids) over :data:`HF_DEFAULTS`.

    ``prompt_len``: the prompt's length (decoder-only); for an encoder-decoder model leave it None and pass
    ``decoder_input_ids`` (or None): the decoder prompt is decoder_start_token_id, or the user's prefix with it
    prepended (see :func:`decoder_prompt`). Raises TypeError / NotImplementedError / ValueError on unknown,
    unimplemented or impossible settings."""
    check_settings(generation_config, given, implemented, what)
    model_defaults = model_defaults or {}

    def pick(name):
        if name in given:  # passed explicitly; None: that feature off (HF's global default, or EXPLICIT_NONE)
            if given[name] is not None:
                return given[name]
            return EXPLICIT_NONE.get(name, HF_DEFAULTS.get(name))
        for source in (generation_config, model_defaults):
            if source.get(name) is not None:
                return source[name]
        return HF_DEFAULTS.get(name)

    start = None
    if prompt_len is None:  # encoder-decoder: the decoder prompt
        start = pick("decoder_start_token_id")
        if start is None:
            start = pick("bos_token_id")
        if start is None and decoder_input_ids is None:
            raise ValueError("decoder_start_token_id (or bos_token_id) must be set for encoder-decoder generation")
        prompt_len = 1 if decoder_input_ids is None else _prompt_with_start(decoder_input_ids, start).shape[1]

    if pick("max_new_tokens") is not None:
        max_length = _strict_int("max_new_tokens", pick("max_new_tokens")) + prompt_len
    elif given.get("max_length") is not None or ("max_length" not in given
                                                  and generation_config.get("max_length") is not None):
        max_length = _strict_int("max_length", pick("max_length"))
    else:  # HF: 20 new tokens by default, capped at the position table
        max_length = HF_DEFAULTS["max_length"] + prompt_len
        if max_position_embeddings is not None:
            max_length = min(max_length, max_position_embeddings)
    if max_length <= prompt_len:
        raise ValueError(f"nothing to generate: max_new_tokens resolved to {max_length - prompt_len} (prompt length "
                         f"{prompt_len}, max_length {max_length}); pass max_new_tokens")
    min_new_tokens = pick("min_new_tokens")
    min_length = min_new_tokens + prompt_len if min_new_tokens is not None else pick("min_length") or 0

    eos = as_id_list(pick("eos_token_id"))
    pad = pick("pad_token_id")
    if pad is None and eos:
        pad = eos[0]  # HF's fallback (it warns)
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
        prompt_len=prompt_len, max_length=int(max_length), min_length=int(min_length),
        do_sample=bool(pick("do_sample")), temperature=float(pick("temperature")), top_k=int(pick("top_k") or 0),
        top_p=float(pick("top_p")), num_beams=num_beams, num_return_sequences=num_return_sequences,
        length_penalty=float(pick("length_penalty")), early_stopping=early_stopping,
        no_repeat_ngram_size=int(pick("no_repeat_ngram_size") or 0), forced_bos_token_id=pick("forced_bos_token_id"),
        forced_eos_token_ids=as_id_list(forced_eos) if forced_eos is not None else None,
        eos_token_ids=eos, pad_token_id=None if pad is None else int(pad), decoder_start_token_id=start)


def _prompt_with_start(decoder_input_ids, start):
    """HF prepends decoder_start_token_id to user decoder_input_ids that do not all start with it."""
    if start is not None and (decoder_input_ids[:, 0] != start).all():
        column = torch.full_like(decoder_input_ids[:, :1], start)
        return torch.cat([column, decoder_input_ids], dim=1)
    return decoder_input_ids


def decoder_prompt(settings, batch_size, decoder_input_ids, device):
    """An encoder-decoder model's first decoder input ``[B, P]``: decoder_start_token_id, or the user's prefix
    (start prepended)."""
    if decoder_input_ids is None:
        return torch.full((batch_size, 1), settings.decoder_start_token_id, dtype=torch.long, device=device)
    return _prompt_with_start(decoder_input_ids.to(device=device, dtype=torch.long),
                              settings.decoder_start_token_id)


# ----------------------------------------------------------------------------------------------------------------
# Logits processors (HF's order)
# ----------------------------------------------------------------------------------------------------------------
def ban_repeated_ngrams(sequences, scores, ngram_size):
    """-inf for every token that would complete an n-gram already present in its row.

    sequences ``[N, L]`` (the whole sequence so far), scores ``[N, V]``."""
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


def suppress_eos(scores, eos_token_ids):
    """Set the eos columns of ``scores [N, V]`` to -inf (HF's MinLength / MinNewTokensLength processors)."""
    if eos_token_ids:
        ids = torch.tensor(eos_token_ids, device=scores.device)
        scores = scores.index_fill(-1, ids, float("-inf"))
    return scores


def force_token(scores, token_ids):
    """Every score -inf except ``token_ids`` at 0."""
    forced = torch.full_like(scores, float("-inf"))
    forced[:, token_ids] = 0
    return forced


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


def sampling_warpers(logits, temperature=1.0, top_k=None, top_p=None):
    """HF's sampling warpers in order: temperature, top-k (None/0: off), top-p (None/1.0: off)."""
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


def process_scores(sequences, scores, settings):
    """Apply the logits processors to next-token scores ``[N, V]`` (cast to float32) given the sequences
    ``[N, L]`` so far (prompt included), in HF's order; the sampling warpers only when ``settings.do_sample``."""
    length = sequences.shape[1]
    scores = ban_repeated_ngrams(sequences, scores.float(), settings.no_repeat_ngram_size)
    if settings.eos_token_ids and length < settings.min_length:  # min_length / min_new_tokens
        scores = suppress_eos(scores, settings.eos_token_ids)
    if settings.forced_bos_token_id is not None and length == 1:
        scores = force_token(scores, settings.forced_bos_token_id)
    if settings.forced_eos_token_ids is not None and length == settings.max_length - 1:
        scores = force_token(scores, settings.forced_eos_token_ids)
    if settings.do_sample:
        scores = sampling_warpers(scores, settings.temperature, settings.top_k, settings.top_p)
    return scores


def make_generator(generator, device):
    """None → None (the global RNG); an int seed → a new torch.Generator on ``device`` seeded with it."""
    if generator is None or isinstance(generator, torch.Generator):
        return generator
    g = torch.Generator(device=device)
    g.manual_seed(int(generator))
    return g


def pick_next_token(scores, do_sample=False, generator=None):
    """Next token ids ``[N]`` from processed scores ``[N, V]``: argmax, or one draw from softmax(scores)."""
    if not do_sample:
        return scores.argmax(dim=-1)
    probs = torch.softmax(scores.float(), dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)


def with_room(buffer, length, fill):
    """``buffer [B, C]`` itself when ``C >= length``, else a copy at least twice as wide (and at least
    ``length``) whose new columns hold ``fill``."""
    if buffer.shape[1] >= length:
        return buffer
    grown = buffer.new_full((buffer.shape[0], max(length, 2 * buffer.shape[1])), fill)
    grown[:, :buffer.shape[1]] = buffer
    return grown


class StopPoll:
    """Whether a generation loop (beam search, greedy / sampling) has stopped, read without draining the device's
    queue.

    Each step's verdict is copied to (pinned) host memory without waiting and read from there: a copy still in
    flight may leave the previous verdict, which is still right, since the verdict only ever turns True (and
    steps after the stop are no-ops). On CUDA the host also keeps at most ``lead`` steps queued ahead of the GPU
    (it waits for the event of the step ``lead`` back, which leaves ``lead`` steps in the queue), so that an
    early stop does not leave a whole max_length of no-op steps queued. On CPU every copy is done when it
    returns."""

    def __init__(self, flag, lead=4):
        self.flag = flag
        self.cuda = flag.is_cuda
        self.lead = lead
        self.host = torch.zeros(flag.shape, dtype=flag.dtype, pin_memory=self.cuda)
        self.events = collections.deque()

    def after_step(self, flag=None):
        """Queue the copy of this step's verdict (``flag``, else the one given at construction); True if the host
        has seen that the search is over."""
        self.host.copy_(self.flag if flag is None else flag, non_blocking=self.cuda)
        if self.cuda:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.flag.device))
            self.events.append(event)
            if len(self.events) > self.lead:
                self.events.popleft().synchronize()
        return bool(self.host.numpy()[0])  # host memory: a plain read


# ----------------------------------------------------------------------------------------------------------------
# The greedy / sampling loop
# ----------------------------------------------------------------------------------------------------------------
def sample_loop(step, prompt, settings, generator=None, stop_check_interval=STOP_CHECK_INTERVAL):
    """Greedy or sampled continuation of ``prompt [N, P]``: returns ``[N, P + generated]``.

    ``step(tokens [N, n]) -> logits [N, V]`` feeds the prompt first, then one token per step. A row that produced
    eos continues with pad; the loop stops early once every row has finished (asking the device once per
    ``stop_check_interval`` steps, since a host sync stalls the launch queue; the extra steps only produce pad)
    and the result is cut at the step where the last row finished, as HF's. The look is a ``StopPoll``: no host
    sync (on CUDA the verdict arrives a few steps late, which only adds pad steps); ``stop_check_interval=1``
    reads it synchronously, for a caller that must not step past the last row's end."""
    batch, prompt_len = prompt.shape
    total = settings.max_length
    pad = settings.pad_token_id if settings.pad_token_id is not None else 0  # pad is only written after an eos
    sequences = torch.full((batch, min(total, prompt_len + INITIAL_ROOM)), pad, dtype=prompt.dtype,
                           device=prompt.device)  # grows (with_room) as tokens come
    sequences[:, :prompt_len] = prompt
    eos = torch.tensor(settings.eos_token_ids, dtype=prompt.dtype, device=prompt.device)
    unfinished = torch.ones(batch, dtype=torch.bool, device=prompt.device)
    finished_at = torch.full((batch,), total, dtype=torch.long, device=prompt.device)
    poll = StopPoll(unfinished[:1])
    logits = step(prompt)
    length = prompt_len
    for num_generated in range(total - prompt_len):
        scores = process_scores(sequences[:, :length], logits, settings)
        next_token = pick_next_token(scores, settings.do_sample, generator)
        if eos.numel():
            next_token = torch.where(unfinished, next_token, torch.full_like(next_token, pad))
        sequences = with_room(sequences, length + 1, pad)
        sequences[:, length] = next_token
        length += 1
        if eos.numel():
            just_finished = unfinished & torch.isin(next_token, eos)
            finished_at = torch.where(just_finished, torch.full_like(finished_at, length), finished_at)
            unfinished &= ~just_finished
        if length == total:
            break
        if (num_generated + 1) % stop_check_interval == 0:
            if stop_check_interval == 1:  # the caller must not step past the last row's end (BART near its table)
                if not bool(unfinished.any()):
                    break
            elif poll.after_step(~unfinished.any(0, keepdim=True)):
                break
        logits = step(next_token[:, None])
    if eos.numel() and not bool(unfinished.any()):
        length = int(finished_at.max())  # HF stops at the step where the last row finished
    return sequences[:, :length]

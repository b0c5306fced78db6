"""Shared pieces of the LLaMA tests: a tiny HF config, checkpoints HF writes, padded batches, HF references.

Without a GPU the fused kernels run through Triton's interpreter (tests/conftest.py), so sequences stay short
(<= 24) and few tokens are generated; the checkpoint is shared per module (tests/llama/conftest.py).
"""
import json
import os

import torch
import transformers

from tests.conftest import DEVICE

transformers.logging.set_verbosity_error()

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
            eos_token_id=2, initializer_range=0.1)
PAD = 0
ATOL = 2e-4 if DEVICE == "cpu" else 1e-3  # fp32 logits of magnitude ~1; GPU tf32 dots are coarser


def make_checkpoint(path, seed=0, **overrides):
    """Save a random HF LLaMA (float32) to ``path``; returns the HF model in eval mode."""
    torch.manual_seed(seed)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**TINY, **overrides}))
    hf.set_attn_implementation("eager")
    hf.save_pretrained(path)
    return hf.eval()


def edit_config(path, edit):
    config_path = os.path.join(path, "config.json")
    with open(config_path) as f:
        config = json.load(f)
    edit(config)
    with open(config_path, "w") as f:
        json.dump(config, f)


def left_padded_batch(lengths, total, seed=0):
    """input_ids, attention_mask ``[B, total]``: row b has ``lengths[b]`` real tokens, left-padded with PAD."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, TINY["vocab_size"], (len(lengths), total), generator=g)
    mask = torch.zeros(len(lengths), total, dtype=torch.long)
    for row, n in enumerate(lengths):
        mask[row, total - n:] = 1
    return ids.masked_fill(mask == 0, PAD).to(DEVICE), mask.to(DEVICE)


def hf_positions(mask):
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)


def hf_logits(hf, ids, mask):
    with torch.no_grad():
        return hf(ids, attention_mask=mask).logits  # HF's forward: positions 0 ... L-1, as ours


def assert_logits_close(ours, ref, mask):
    """Only real (unpadded) query positions: HF's padded rows are garbage by design, ours are zero-attention."""
    real = mask.bool()
    torch.testing.assert_close(ours[real], ref[real], atol=ATOL, rtol=1e-4)


def hf_greedy(hf, ids, mask, **kwargs):
    return hf.generate(ids, attention_mask=mask, do_sample=False, pad_token_id=PAD, **kwargs)


def hf_grads(hf):
    return {name.removeprefix("model."): p.grad for name, p in hf.named_parameters()}


def loss_inputs():
    ids, mask = left_padded_batch([10, 7], 10, seed=8)
    # -100 on padding and on each row's first real token: HF's loss would predict it from a padded position,
    # whose output is garbage in HF and zero-attention here
    follows_padding = torch.nn.functional.pad(mask[:, :-1], (1, 0), value=1) == 0
    labels = ids.masked_fill((mask == 0) | follows_padding, -100)
    labels[0, 4] = -100
    return ids, mask, labels

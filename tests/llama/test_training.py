"""LLaMA against HF transformers on tiny checkpoints HF writes (shared fixtures: tests/llama/conftest.py):
loss, gradients, gradient checkpointing, attention dropout."""

import warnings

import pytest
import torch

from fusedformers.models import layers, ops
from fusedformers.models.llama import LlamaForCausalLM
from tests.conftest import DEVICE
from tests.helpers import reference_with_kernel_dropout
from tests.llama.common import (
    PAD,
    assert_logits_close,
    hf_grads,
    left_padded_batch,
    loss_inputs,
    make_checkpoint,
)

# ----------------------------------------------------------------------------------------------- training

@pytest.fixture(scope="module")
def trained(base):
    """Loss and parameter gradients of HF and of our fused model on one left-padded batch with -100 labels."""
    path, hf = base
    ids, mask, labels = loss_inputs()
    hf.zero_grad()
    ref = hf(ids, attention_mask=mask, labels=labels).loss
    ref.backward()
    ref_grads = {k: g.clone() for k, g in hf_grads(hf).items()}
    hf.zero_grad()
    model = LlamaForCausalLM.from_pretrained(path, device=DEVICE).train()
    loss = model(ids, attention_mask=mask, labels=labels).loss
    loss.backward()
    return model, loss.detach(), ref.detach(), ref_grads


def test_loss_and_gradients_match_hf(trained):
    model, loss, ref_loss, ref_grads = trained
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    grads = model.named_grads()  # under HF's names: the packed q/k/v and gate/up gradients cut into HF's parts
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        assert grad is not None, f"no gradient for {name}"
        torch.testing.assert_close(grad, ref_grads[name], atol=1e-5, rtol=1e-3, msg=lambda m: f"{name}: {m}")
    assert grads["embed_tokens.weight"][PAD].abs().max() == 0  # padding_idx, as HF's nn.Embedding


def test_gradient_checkpointing_same_gradients(base, trained):
    model, loss, _, _ = trained
    plain = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    model.gradient_checkpointing_enable()
    try:
        ids, mask, labels = loss_inputs()
        checkpointed = model(ids, attention_mask=mask, labels=labels).loss
        checkpointed.backward()
    finally:
        model.gradient_checkpointing_disable()
    torch.testing.assert_close(checkpointed.detach(), loss)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, plain[name], atol=1e-6, rtol=1e-5, msg=lambda m: f"{name}: {m}")


@pytest.mark.slow
def test_attention_dropout_runs_in_the_kernel(tmp_path, monkeypatch):
    """config.attention_dropout in training: the fused model gives the loss and gradients of the eager model
    whose reference attention uses the kernel's own dropout masks; masks follow torch.manual_seed, also through
    gradient checkpointing; a different seed gives a different loss; eval mode has no dropout."""
    make_checkpoint(tmp_path, seed=3, attention_dropout=0.2)
    fused = LlamaForCausalLM.from_pretrained(tmp_path, device=DEVICE).train()
    eager = LlamaForCausalLM.from_pretrained(tmp_path, device=DEVICE, attn_implementation="eager").train()
    monkeypatch.setitem(ops.OPS, "eager", ops.OPS["eager"]._replace(attention=reference_with_kernel_dropout))
    ids, mask, labels = loss_inputs()

    def loss_and_grads(model, seed):
        torch.manual_seed(seed)
        model.zero_grad()
        loss = model(ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}

    loss, grads = loss_and_grads(fused, 5)
    expected_loss, expected_grads = loss_and_grads(eager, 5)
    torch.testing.assert_close(loss, expected_loss, atol=1e-5, rtol=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], atol=1e-5, rtol=1e-3, msg=lambda m: f"{name}: {m}")
    assert not torch.equal(loss_and_grads(fused, 6)[0], loss)
    fused.gradient_checkpointing_enable()
    checkpointed_loss, checkpointed_grads = loss_and_grads(fused, 5)
    assert torch.equal(checkpointed_loss, loss)
    for name, grad in grads.items():
        torch.testing.assert_close(checkpointed_grads[name], grad, atol=1e-6, rtol=1e-5)
    fused.eval()
    with torch.no_grad():
        assert torch.equal(fused(ids, attention_mask=mask).logits, fused(ids, attention_mask=mask).logits)


def test_gradient_checkpointing_with_a_kv_cache_is_exact(base, monkeypatch):
    """Train mode + gradient checkpointing + past_key_values: the cached calls run their layers without
    checkpointing (one warning), so logits, cache length and gradients equal the unchecked run's and the
    logits equal a full forward's; the cache is neither dropped nor advanced without its keys."""
    model = LlamaForCausalLM.from_pretrained(base[0], device=DEVICE, attn_implementation="eager").train()
    ids, mask = left_padded_batch([9, 6], 9, seed=31)
    monkeypatch.setattr(layers, "_warned", set())

    def run():
        model.zero_grad()
        cache = model.new_kv_cache(2, 4)   # grows when continued past its size
        first = model(ids[:, :5], attention_mask=mask[:, :5], past_key_values=cache).logits
        second = model(ids[:, 5:], attention_mask=mask, past_key_values=cache).logits
        (first.square().mean() + second.square().mean()).backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters()}
        return torch.cat([first, second], dim=1).detach(), cache.length, grads

    logits, length, grads = run()
    model.gradient_checkpointing_enable()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            checkpointed, checkpointed_length, checkpointed_grads = run()
    finally:
        model.gradient_checkpointing_disable()
    messages = [str(w.message) for w in caught if "KV cache" in str(w.message)]
    assert len(messages) == 1, messages
    assert length == checkpointed_length == ids.shape[1]
    assert torch.equal(checkpointed, logits)
    for name, grad in grads.items():
        torch.testing.assert_close(checkpointed_grads[name], grad, atol=1e-6, rtol=1e-5,
                                   msg=lambda m: f"{name}: {m}")
    with torch.no_grad():
        full = model(ids, attention_mask=mask).logits
    assert_logits_close(logits, full, mask)

    # use_cache=True without a cache while checkpointing: as HF, no cache is made (one warning), and the layers
    # really are checkpointed (fewer tensors kept for backward than without checkpointing)
    def saved_bytes(**kwargs):
        total = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: total.append(t.numel() * t.element_size()) or t,
                                                      lambda t: t):
            out = model(ids, attention_mask=mask, **kwargs)
        return out, sum(total)

    model.gradient_checkpointing_enable()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out, checkpointed_bytes = saved_bytes(use_cache=True)
    finally:
        model.gradient_checkpointing_disable()
    assert out.past_key_values is None
    assert any("use_cache=True is incompatible" in str(w.message) for w in caught)
    assert checkpointed_bytes < saved_bytes()[1] / 2

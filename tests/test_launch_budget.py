"""Launch and host-sync budgets of a decode step (``fusedformers.bench.launches``, counted on CPU: Triton launches
plus the aten ops that would launch device work; a host sync is a value read back to the host).

At batch 1 a decode step is bound by its launches and syncs, not by the GPU's arithmetic. LLaMA's layer is nine
launches (two RMSNorms, the packed q/k/v matmul, RoPE + the KV-cache write, attention, o_proj, the packed gate/up
matmul, SiLU * mul, down_proj); the budget leaves one spare. The static path (a recorded CUDA graph on a GPU)
must not sync at all: the recorded step advances its own positions on the device.
"""
import pytest
import torch

from fusedformers.bench.launches import LLAMA_SHAPE, count, decode_step_launches

LLAMA_LAUNCHES_PER_LAYER = 10


@pytest.mark.parametrize("cache_implementation", [None, "static"], ids=["dynamic", "static"])
def test_llama_launches_per_layer(cache_implementation):
    settings = {"cache_implementation": cache_implementation} if cache_implementation else {}
    result = decode_step_launches("llama", "ours", **settings)
    assert result["per_layer"] <= LLAMA_LAUNCHES_PER_LAYER, result
    if cache_implementation == "static":
        assert result["syncs_per_step"] == 0, result


def test_llama_static_step_reads_nothing_from_the_host():
    """One recorded step (run eagerly here) does not sync, and it advances its own position and cache position
    on the device, writing the token's K/V at the next cache row."""
    from fusedformers.models.llama import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig.from_dict(dict(LLAMA_SHAPE, num_hidden_layers=2))).eval()
    prompt = torch.randint(3, 90, (2, 5))
    mask = torch.ones_like(prompt)
    with torch.no_grad():
        state = model._static_decoding(2, 9, mask)
        positions = torch.arange(5).expand(2, 5)
        model.prefill(prompt, None, positions, state.cache)
        state.start(positions[:, -1:], state.cache.length)
        for step in range(2):
            before = state.cache.k[0][:, :, 5 + step].clone()
            _, counter = count(model.static_step, state, torch.tensor([[7], [8]]))
            assert counter.syncs == 0, counter.sync_ops
            assert not torch.equal(state.cache.k[0][:, :, 5 + step], before)  # written at the advanced row
            assert state.position.tolist() == [[6 + step], [6 + step]]
            assert state.cache_position.tolist() == [6 + step]

"""The checkpoint fuzzer (tests/ckpt_fuzz.py) in CI: 2 x 150 random mutations of a saved tiny LLaMA and BART
checkpoint, each load either a clear error naming the file or the original model, bit for bit.
FUSEDFORMERS_TEST_SEED draws other cases."""
import pytest
import torch

from tests import ckpt_fuzz
from tests.conftest import BASE_SEED


@pytest.mark.parametrize("family", ckpt_fuzz.FAMILIES)
def test_checkpoint_fuzzer(family, capsys):
    status = ckpt_fuzz.main(["--cases", "150", "--seed", str(BASE_SEED), "--family", family])
    out = capsys.readouterr().out
    assert status == 0, out
    assert "150 passed" in out and ", 0 failed" in out, out


def _perturbed(model):
    with torch.no_grad():
        model.lm_head.weight[0, 0] += 1e-3
    return model


def _raise(error):
    raise error


@pytest.mark.parametrize("loader, verdict", [
    (_perturbed, "silently different tensors: ['lm_head.weight']"),
    (lambda model: _raise(RuntimeError("boom")), "unclear exception type RuntimeError: boom"),
    (lambda model: _raise(ValueError("no file named")), "error does not name"),
    (lambda model: _raise(ValueError("config.json model.safetensors: raised outside the loader")),
     "error from outside the loader"),
], ids=["different-model", "runtime-error", "unnamed-file", "outside-the-loader"])
def test_the_oracle_catches_bad_loads(loader, verdict, monkeypatch, capsys):
    """The fuzzer can fail: a loader that changes a weight by 1e-3 or raises unclear errors fails every case
    (the expected models are built with the real loader)."""
    real_load = ckpt_fuzz.load
    monkeypatch.setattr(ckpt_fuzz, "load", lambda family, directory, **kwargs: real_load(family, directory, **kwargs)
                        if kwargs else loader(real_load(family, directory)))
    status = ckpt_fuzz.main(["--cases", "40", "--seed", str(BASE_SEED), "--family", "llama"])
    out = capsys.readouterr().out
    assert status == 1
    assert verdict in out, out

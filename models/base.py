"""What both models share around their layers: the implementation switch, gradient checkpointing and the first
steps of ``from_pretrained`` (HF's PreTrainedModel, in small)."""
import os

import torch
from torch import nn

from fusedformers.models.checkpoint import (
    CONFIG_NAME,
    load_config_dict,
    load_generation_config,
    load_safetensors_state_dict,
    resolve_dtype,
    weights_source,
)
from fusedformers.models.generation import generation_defaults_from_model_config
from fusedformers.models.layers import named_grads, set_gradient_checkpointing
from fusedformers.models.ops import check_implementation


class ModelBase(nn.Module):
    """Base of the models: ``self.config`` holds ``attn_implementation``, a name of the op registry
    ``fusedformers.models.ops.OPS`` that every module reads at call time."""
    gradient_checkpointing = False

    @property
    def attn_implementation(self):
        return self.config.attn_implementation

    def set_attn_implementation(self, attn_implementation):
        """A name registered in ``fusedformers.models.ops.OPS`` ("fused": the Triton kernels, "eager": the
        PyTorch references); every module uses it from its next call on."""
        check_implementation(attn_implementation)
        self.config.attn_implementation = attn_implementation

    def gradient_checkpointing_enable(self):
        """Recompute each layer in the backward pass (torch.utils.checkpoint, non-reentrant; training only)."""
        set_gradient_checkpointing(self, True)
        self.gradient_checkpointing = True

    def gradient_checkpointing_disable(self):
        set_gradient_checkpointing(self, False)
        self.gradient_checkpointing = False

    def named_grads(self):
        """The parameters' gradients under HF's parameter names: ``{name: grad or None}`` for every name of
        ``named_parameters()``, except that a packed projection (LLaMA's ``qkv_proj``, ``gate_up_proj``) appears
        as HF's parts (``q_proj.weight``, ``k_proj.weight``, ...; views of the packed gradient). The names of
        ``state_dict()``, tied duplicates left out, as HF's ``named_parameters()``: compare gradients with an HF
        model's by name."""
        return named_grads(self)

    def checkpointing_now(self):
        """The layers recompute in backward in this call: checkpointing is on, the model trains, autograd
        records."""
        return self.gradient_checkpointing and self.training and torch.is_grad_enabled()

    @staticmethod
    def load_pretrained_parts(config_class, model_dir, dtype, device, attn_implementation):
        """Read an HF checkpoint directory: (config, config.json dict, state_dict on ``device`` in ``dtype``,
        generation config, names: ``{"source": the weights file(s), "model": the model of config.json}``, how
        errors name them: ``assign_state_dict``'s keywords). The generation config is generation_config.json,
        else config.json's generation keys (HF's fallback). A ValueError of the config's parsing that does not
        name config.json gets its path in front."""
        check_implementation(attn_implementation)
        if torch.device(device).type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device={device!r}, but CUDA is not available on this machine (torch "
                             f"{torch.__version__}); load with device='cpu'")
        config_dict = load_config_dict(model_dir)
        config_path = os.path.join(os.fspath(model_dir), CONFIG_NAME)
        try:
            config = config_class.from_dict(config_dict)
        except ValueError as e:
            if CONFIG_NAME in str(e):
                raise
            raise ValueError(f"{config_path}: {e}") from e
        config.attn_implementation = attn_implementation
        state_dict = load_safetensors_state_dict(model_dir, device=device, dtype=resolve_dtype(dtype, config_dict))
        generation_config = load_generation_config(model_dir) or generation_defaults_from_model_config(config_dict)
        names = {"source": weights_source(model_dir), "model": f"the model of {config_path}"}
        return config, config_dict, state_dict, generation_config, names

"""The sliced decoder layers: the original (now narrower) submodules under their original names, plus the two
residual shortcut matrices that carry the stream from one basis (and width) to the next."""

from __future__ import annotations

import torch
from torch import nn


class SlicedLlamaLayer(nn.Module):
    """A Llama-family decoder layer whose residual stream changes basis (and width) twice:
    [.., d_in] --attn_shortcut--> [.., d_mid] --mlp_shortcut--> [.., d_out]."""

    def __init__(self, layer: nn.Module, attn_shortcut: nn.Linear, mlp_shortcut: nn.Linear):
        super().__init__()
        self.self_attn = layer.self_attn
        self.mlp = layer.mlp
        self.input_layernorm = layer.input_layernorm
        self.post_attention_layernorm = layer.post_attention_layernorm
        self.attn_shortcut = attn_shortcut
        self.mlp_shortcut = mlp_shortcut
        if hasattr(layer, "attention_type"):  # read by some HF model forwards to pick the mask
            self.attention_type = layer.attention_type

    def forward(self, hidden_states: torch.Tensor, attention_mask=None, **kwargs) -> torch.Tensor:
        attended, _ = self.self_attn(
            hidden_states=self.input_layernorm(hidden_states), attention_mask=attention_mask, **kwargs
        )
        hidden_states = self.attn_shortcut(hidden_states) + attended
        return self.mlp_shortcut(hidden_states) + self.mlp(self.post_attention_layernorm(hidden_states))


class SlicedOPTLayer(nn.Module):
    """An OPT (pre-norm) decoder layer with residual shortcut matrices, as :class:`SlicedLlamaLayer`."""

    def __init__(self, layer: nn.Module, attn_shortcut: nn.Linear, mlp_shortcut: nn.Linear):
        super().__init__()
        self.self_attn = layer.self_attn
        self.self_attn_layer_norm = layer.self_attn_layer_norm
        self.fc1 = layer.fc1
        self.fc2 = layer.fc2
        self.final_layer_norm = layer.final_layer_norm
        self.activation_fn = layer.activation_fn
        self.attn_shortcut = attn_shortcut
        self.mlp_shortcut = mlp_shortcut
        self.do_layer_norm_before = True  # read by effllm.adapters (append_kv); SliceGPT needs pre-norm OPT

    def forward(self, hidden_states: torch.Tensor, attention_mask=None, **kwargs) -> torch.Tensor:
        kwargs.pop("use_cache", None)  # OPT's attention does not take it
        attended, _ = self.self_attn(
            hidden_states=self.self_attn_layer_norm(hidden_states), attention_mask=attention_mask, **kwargs
        )
        hidden_states = self.attn_shortcut(hidden_states) + attended
        mlp_out = self.fc2(self.activation_fn(self.fc1(self.final_layer_norm(hidden_states))))
        return self.mlp_shortcut(hidden_states) + mlp_out


SLICED_LAYERS = (SlicedLlamaLayer, SlicedOPTLayer)


def sliced_layer_class(model: nn.Module) -> type[nn.Module]:
    """The sliced layer class for ``model``'s family (OPT, or the Llama family)."""
    return SlicedOPTLayer if model.config.model_type == "opt" else SlicedLlamaLayer


def is_sliced(model: nn.Module) -> bool:
    """Whether any decoder layer of ``model`` is a SliceGPT layer (carries shortcut matrices)."""
    return any(isinstance(m, SLICED_LAYERS) for m in model.modules())

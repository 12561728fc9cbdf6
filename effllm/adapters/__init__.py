"""Architecture adapters: the one place that knows where a model family keeps its parts.

Every method in effllm (early exit, layer skipping, pruning, slicing, layer scores) reaches a model only
through an adapter, never through attribute paths of its own:

    adapter = get_adapter(model)
    cache = adapter.new_cache()
    hidden = adapter.embed(input_ids, cache=cache)              # [batch, seq, d]
    context = adapter.context(hidden, cache=cache)              # masks and positions, once per step
    for i in range(adapter.num_layers):
        hidden = adapter.run_layer(i, hidden, context)          # updates layer i's K/V in `cache`
    logits = adapter.logits(hidden)                             # final norm + LM head   [batch, seq, V]

Families: the Llama family (Llama, Mistral, Qwen2, Gemma v1, Gemma 3), OPT, GPT-2, and the T5 decoder (its
encoder output is given to :meth:`T5Adapter.context`). Parts are returned by role so that methods can
say "the q projection of layer 12" for any family:

    adapter.attention_projections(i)   {"q", "k", "v", "o"} (GPT-2: {"qkv", "o"}: one fused Conv1D)
    adapter.mlp_projections(i)         {"gate", "up", "down"} (OPT, GPT-2, plain T5: {"up", "down"})
    adapter.norms(i)                   {"attention", "mlp", ...} the layer's norms by the branch they feed
    adapter.linears(i)                 qualified module name -> module, as in model.named_modules()
    adapter.weight(module)             the weight as [out_features, in_features] (transposes Conv1D)

Layout: :mod:`effllm.adapters.base` holds the protocol (:class:`ArchitectureAdapter`, :class:`LayerContext`,
the device helpers); one module per family holds its adapter (``llama``: Llama, Mistral, Qwen2, Gemma v1,
Gemma 3; ``opt``; ``gpt2``; ``t5``); :data:`ADAPTERS` maps each ``config.model_type`` to its adapter.
"""

from __future__ import annotations

from torch import nn

from effllm import records
from effllm.adapters.base import (
    ArchitectureAdapter,
    LayerContext,
    UnsupportedArchitectureError,
    module_device,
    to_device,
)
from effllm.adapters.gpt2 import GPT2Adapter
from effllm.adapters.llama import LlamaFamilyAdapter
from effllm.adapters.opt import OPTAdapter
from effllm.adapters.t5 import T5Adapter

__all__ = ["ADAPTERS", "ArchitectureAdapter", "GPT2Adapter", "LayerContext", "LlamaFamilyAdapter", "OPTAdapter",
           "T5Adapter", "UnsupportedArchitectureError", "get_adapter", "module_device", "to_device"]

# config.model_type -> the adapter of its family
ADAPTERS: dict[str, type[ArchitectureAdapter]] = {
    "llama": LlamaFamilyAdapter,
    "mistral": LlamaFamilyAdapter,
    "qwen2": LlamaFamilyAdapter,
    "gemma": LlamaFamilyAdapter,
    "gemma3_text": LlamaFamilyAdapter,
    "opt": OPTAdapter,
    "gpt2": GPT2Adapter,
    "t5": T5Adapter,
}


def get_adapter(model: nn.Module) -> ArchitectureAdapter:
    """The adapter for ``model``'s family (cached on the model)."""
    cached = records.ADAPTER.get(model)
    if cached is not None:
        return cached
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ADAPTERS:
        raise UnsupportedArchitectureError(
            f"No architecture adapter for model_type {model_type!r}; supported: {', '.join(sorted(ADAPTERS))}"
        )
    adapter = ADAPTERS[model_type](model)
    records.ADAPTER.set(model, adapter)
    return adapter

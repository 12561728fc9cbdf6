"""ShortGPT (Men et al. 2024): remove whole decoder layers in place, all or nothing."""

from __future__ import annotations

from torch import nn

from effllm import records
from effllm.adapters import ArchitectureAdapter


def remove_layers(model: nn.Module, adapter: ArchitectureAdapter, remove: list[int]) -> None:
    """Remove the layers ``remove`` in place, or, if anything fails part-way (Ctrl-C included), put back the
    layer list, the attention layer indices and the config as they were: cheap, since the removed layers
    are still in memory until this returns."""
    layers = adapter.layers
    before = list(layers)
    attentions = [adapter.attention(i) for i in range(len(layers))]
    indices = [getattr(attention, "layer_idx", None) for attention in attentions]
    config = (model.config.num_hidden_layers, getattr(model.config, "layer_types", None))
    keep = [i for i in range(len(layers)) if i not in set(remove)]
    try:
        for i in sorted(remove, reverse=True):
            del layers[i]
        for new_index in range(len(layers)):  # KV-cache slots are indexed by layer_idx
            attention = adapter.attention(new_index)
            if hasattr(attention, "layer_idx"):
                attention.layer_idx = new_index
        model.config.num_hidden_layers = len(layers)
        if config[1] is not None:
            model.config.layer_types = [config[1][i] for i in keep]
    except BaseException:
        while len(layers):
            del layers[len(layers) - 1]
        layers.extend(before)
        for attention, index in zip(attentions, indices, strict=True):
            if index is not None:
                attention.layer_idx = index
        model.config.num_hidden_layers = config[0]
        if config[1] is not None:
            model.config.layer_types = config[1]
        raise
    finally:
        records.ADAPTER.clear(model)  # the cached adapter holds per-layer facts

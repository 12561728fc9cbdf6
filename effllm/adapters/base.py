"""The adapter protocol: :class:`ArchitectureAdapter` (the base class every family's adapter extends), the
per-step :class:`LayerContext`, and the device helpers adapters of models spread over devices use.

A family's adapter (effllm.adapters.llama, .opt, .gpt2, .t5) sets the part accessors (``layers``,
``embed_tokens``, ``final_norm``, ``attention_projections``, ...) and ``run_layer``; everything built on them
(``linears``, ``logits``, ``forward``, the cache helpers) is written once here.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicCache, EncoderDecoderCache
from transformers.masking_utils import create_causal_mask
from transformers.pytorch_utils import Conv1D


class UnsupportedArchitectureError(TypeError):
    """The model's family has no adapter."""


@dataclass
class LayerContext:
    """What every layer of one forward step shares: positions, the cache and lazily built masks.

    Masks depend on how many tokens a layer has cached, which differs between layers once some are
    skipped, so they are built per (kind, cached length) on first use and reused.
    """

    hidden: torch.Tensor  # the step's input states, [batch, q, d]: shape, dtype and device for masks
    position_ids: torch.LongTensor  # [batch, q]
    cache: Cache | None
    attention_mask: torch.Tensor | None = None  # optional 2-D padding mask [batch, past + q]
    extras: dict[str, Any] = field(default_factory=dict)
    memo: dict[tuple | str, Any] = field(default_factory=dict)  # masks, rotary tables, biases by key


def module_device(module: nn.Module) -> torch.device:
    """Where ``module`` computes: its accelerate hook's execution device (offloaded or dispatched models),
    else the device of its first parameter or buffer that is not on "meta", else the CPU."""
    # lazily: building the list of every submodule on each call costs more than a decode step's layer
    for candidate in itertools.chain((module,), module.modules()):
        device = getattr(getattr(candidate, "_hf_hook", None), "execution_device", None)
        if device is not None:
            return torch.device(device)
        if candidate is module:
            for tensor in (*module.parameters(), *module.buffers()):
                if tensor.device.type != "meta":
                    return tensor.device
    return torch.device("cpu")


def to_device(value: Any, device: torch.device) -> Any:
    """``value`` (a tensor, a tuple/list of tensors, or anything else, returned as is) on ``device``: masks
    and rotary tables built next to one layer, used by a layer on another device."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple | list):
        return type(value)(to_device(v, device) for v in value)
    return value


class ArchitectureAdapter:
    """Base class: one subclass per family. Subclasses set the part accessors and ``run_layer``.

    Models spread over devices (``device_map``): every method moves its input to the device of the part
    it runs (``layer_device(i)``, the embeddings', the final norm's, the head's) and returns the result
    there, so the caller never has to know where a layer lives.
    """

    family: str = ""

    def __init__(self, model: nn.Module):
        self.model = model
        self.config = model.config

    # ---- structure ---------------------------------------------------------------------------------
    @property
    def layers(self) -> nn.ModuleList:
        raise NotImplementedError

    @property
    def layers_path(self) -> str:
        """Qualified name of the layer list, as in model.named_modules()."""
        raise NotImplementedError

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def hidden_size(self) -> int:
        return self.embed_tokens.weight.shape[1]

    @property
    def vocab_size(self) -> int:
        return self.lm_head.weight.shape[0]

    @property
    def embed_tokens(self) -> nn.Embedding:
        raise NotImplementedError

    @property
    def final_norm(self) -> nn.Module:
        raise NotImplementedError

    @property
    def lm_head(self) -> nn.Linear:
        return self.model.get_output_embeddings()

    @property
    def tied_embeddings(self) -> bool:
        """True when the LM head and the input embeddings share one matrix."""
        return self.lm_head.weight.data_ptr() == self.embed_tokens.weight.data_ptr()

    def layer(self, i: int) -> nn.Module:
        if not 0 <= i < self.num_layers:
            raise IndexError(f"layer index {i} out of range: the model has {self.num_layers} layers (0..{self.num_layers - 1})")
        return self.layers[i]

    def layer_name(self, i: int) -> str:
        return f"{self.layers_path}.{i}"

    def layer_device(self, i: int) -> torch.device:
        """Where layer ``i`` computes (see :func:`module_device`)."""
        return module_device(self.layer(i))

    def attention(self, i: int) -> nn.Module:
        raise NotImplementedError

    def mlp(self, i: int) -> nn.Module:
        raise NotImplementedError

    def attention_projections(self, i: int) -> dict[str, nn.Module]:
        raise NotImplementedError

    def mlp_projections(self, i: int) -> dict[str, nn.Module]:
        raise NotImplementedError

    def norms(self, i: int) -> dict[str, nn.Module]:
        raise NotImplementedError

    def linears(self, i: int) -> dict[str, nn.Module]:
        """Every prunable linear of layer ``i`` by its qualified name (as in ``model.named_modules()``)."""
        wanted = {id(m) for m in [*self.attention_projections(i).values(), *self.mlp_projections(i).values()]}
        prefix = self.layer_name(i)
        return {
            f"{prefix}.{name}": module
            for name, module in self.layer(i).named_modules()
            if id(module) in wanted
        }

    @staticmethod
    def weight(module: nn.Module) -> torch.Tensor:
        """The weight of a linear as [out_features, in_features] (a view; GPT-2's Conv1D stores [in, out])."""
        return module.weight.t() if isinstance(module, Conv1D) else module.weight

    # ---- running -----------------------------------------------------------------------------------
    def new_cache(self) -> Cache:
        return DynamicCache(config=self.config)

    @staticmethod
    def cached_length(cache: Cache | None, layer: int = 0) -> int:
        if cache is None:
            return 0
        if isinstance(cache, EncoderDecoderCache):
            cache = cache.self_attention_cache
        return int(cache.get_seq_length(layer))

    def default_position_ids(self, input_ids: torch.Tensor, cache: Cache | None) -> torch.LongTensor:
        past = self.cached_length(cache)
        positions = torch.arange(past, past + input_ids.shape[1], device=input_ids.device)
        return positions.unsqueeze(0).expand(input_ids.shape[0], -1)

    def embed(
        self, input_ids: torch.LongTensor, position_ids: torch.LongTensor | None = None, cache: Cache | None = None
    ) -> torch.Tensor:
        """Input states of layer 0 for ``input_ids`` [batch, q] (token and, where used, position embeddings)."""
        return self.embed_tokens(input_ids.to(module_device(self.embed_tokens)))

    def context(
        self,
        hidden: torch.Tensor,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        attention_mask: torch.Tensor | None = None,
        **extras: Any,
    ) -> LayerContext:
        if position_ids is None:
            position_ids = self.default_position_ids(hidden[..., 0], cache)
        return LayerContext(hidden, position_ids, cache, attention_mask, dict(extras))

    def run_layer(self, i: int, hidden: torch.Tensor, context: LayerContext) -> torch.Tensor:
        """Run decoder layer ``i`` on ``hidden`` [batch, q, d], appending its K/V to the context's cache."""
        raise NotImplementedError

    def append_kv(self, i: int, hidden: torch.Tensor, context: LayerContext) -> None:
        """Append to the cache the K/V that layer ``i`` would compute from ``hidden``, without running the
        rest of the layer: CALM's state propagation for layers an early exit skipped."""
        raise UnsupportedArchitectureError(
            f"K/V-only propagation is not implemented for the {self.family!r} adapter; "
            "implemented for: llama family (llama, mistral, qwen2, gemma, gemma3), opt, gpt2, t5"
        )

    def causal_mask(self, i: int, context: LayerContext, cache: Cache | None = None) -> Any:
        """Layer ``i``'s causal mask in the form its attention implementation wants, built once per
        cached length (layers that skipped tokens have shorter caches)."""
        cache = context.cache if cache is None else cache
        key = ("causal", self.cached_length(context.cache, i))
        if key not in context.memo:
            context.memo[key] = create_causal_mask(
                config=self.config, inputs_embeds=context.hidden, attention_mask=context.attention_mask,
                cache=cache, position_ids=context.position_ids, layer_idx=i,
            )
        return context.memo[key]

    @staticmethod
    def split_heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
        """[batch, q, heads * head_dim] -> [batch, heads, q, head_dim], the layout of the KV cache."""
        return x.view(*x.shape[:-1], -1, head_dim).transpose(1, 2)

    def normed(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.final_norm(hidden.to(module_device(self.final_norm)))

    def logits(self, hidden: torch.Tensor, rows: torch.LongTensor | None = None) -> torch.Tensor:
        """Final norm and LM head on states of any layer (the logit lens on intermediate layers).

        ``rows``: only these vocabulary ids' logits, in that order (a pruned vocabulary; the head's
        other rows are never read)."""
        return self.head_logits(self.normed(hidden), rows)

    def head_logits(self, normed: torch.Tensor, rows: torch.LongTensor | None = None) -> torch.Tensor:
        """The LM head alone on states that are already normed (:meth:`normed`), ``rows`` as in :meth:`logits`."""
        head = self.lm_head
        device = module_device(head)
        normed = normed.to(device)
        if rows is not None:
            rows = rows.to(device)
        if rows is None:
            return head(normed)
        bias = None if head.bias is None else head.bias[rows]
        return torch.nn.functional.linear(normed, self.weight(head)[rows], bias)

    @torch.no_grad()
    def forward(
        self,
        input_ids: torch.LongTensor,
        cache: Cache | None = None,
        layers: list[int] | range | None = None,
        output_hidden_states: bool = False,
        **context_kwargs: Any,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Run ``layers`` (default: all) on ``input_ids``; return (logits, [embeddings, h_1, h_2, ...]).

        The hidden-state list holds the input to the first layer and every run layer's output when
        ``output_hidden_states`` is set, else it is empty.
        """
        position_ids = context_kwargs.pop("position_ids", None)
        hidden = self.embed(input_ids, position_ids=position_ids, cache=cache)
        context = self.context(hidden, position_ids=position_ids, cache=cache, **context_kwargs)
        states = [hidden] if output_hidden_states else []
        for i in range(self.num_layers) if layers is None else layers:
            hidden = self.run_layer(i, hidden, context)
            if output_hidden_states:
                states.append(hidden)
        return self.logits(hidden), states


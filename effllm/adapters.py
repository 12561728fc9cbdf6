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
"""

from __future__ import annotations

import inspect
import itertools
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicCache, EncoderDecoderCache
from transformers.masking_utils import (
    create_bidirectional_mask,
    create_causal_mask,
    create_sliding_window_causal_mask,
)
from transformers.pytorch_utils import Conv1D

from effllm import records


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
    _masks: dict[tuple, Any] = field(default_factory=dict)


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

    def _causal_mask(self, i: int, context: LayerContext, cache: Cache | None = None) -> Any:
        """Layer ``i``'s causal mask in the form its attention implementation wants, built once per
        cached length (layers that skipped tokens have shorter caches)."""
        cache = context.cache if cache is None else cache
        key = ("causal", self.cached_length(context.cache, i))
        if key not in context._masks:
            context._masks[key] = create_causal_mask(
                config=self.config, inputs_embeds=context.hidden, attention_mask=context.attention_mask,
                cache=cache, position_ids=context.position_ids, layer_idx=i,
            )
        return context._masks[key]

    @staticmethod
    def _heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
        """[batch, q, heads * head_dim] -> [batch, heads, q, head_dim], the layout of the KV cache."""
        return x.view(*x.shape[:-1], -1, head_dim).transpose(1, 2)

    def normed(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.final_norm(hidden.to(module_device(self.final_norm)))

    def logits(self, hidden: torch.Tensor, rows: torch.LongTensor | None = None) -> torch.Tensor:
        """Final norm and LM head on states of any layer (the logit lens on intermediate layers).

        ``rows``: only these vocabulary ids' logits, in that order (a pruned vocabulary; the head's
        other rows are never read)."""
        return self._head(self.normed(hidden), rows)

    def _head(self, normed: torch.Tensor, rows: torch.LongTensor | None) -> torch.Tensor:
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


# ----------------------------------------------------------------------------------------------------


class LlamaFamilyAdapter(ArchitectureAdapter):
    """Llama, Mistral, Qwen2, Gemma v1 and Gemma 3 (text): pre-norm blocks with rotary positions.

    Gemma v1 (Gemma-1.1-7b-it, model_type "gemma") is a Llama block with three differences that live inside
    its own modules, so the adapter needs no branch for them: the embedding scales by sqrt(d)
    (GemmaTextScaledWordEmbedding, as Gemma 3's), RMSNorm multiplies by (1 + weight), and the MLP's
    activation is GELU (tanh). Unlike Gemma 3 it has no sandwich norms, no q/k norms, no sliding layers and no
    logit soft-capping; the 7B has 16 K/V heads (no GQA) of head_dim 256, so q/k/v are wider than d.
    """

    family = "llama"

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self.base = model.model
        layer_types = getattr(self.config, "layer_types", None)
        if layer_types is None or self.config.model_type == "mistral":
            sliding = getattr(self.config, "sliding_window", None) is not None
            layer_types = ["sliding_attention" if sliding else "full_attention"] * self.config.num_hidden_layers
        self.layer_types = list(layer_types)
        self._rotary_by_type = "layer_type" in inspect.signature(self.base.rotary_emb.forward).parameters

    @property
    def layers(self) -> nn.ModuleList:
        return self.base.layers

    @property
    def layers_path(self) -> str:
        return "model.layers"

    @property
    def embed_tokens(self) -> nn.Embedding:
        return self.base.embed_tokens  # Gemma 3's scales by sqrt(d) inside

    @property
    def final_norm(self) -> nn.Module:
        return self.base.norm

    def attention(self, i: int) -> nn.Module:
        return self.layer(i).self_attn

    def mlp(self, i: int) -> nn.Module:
        return self.layer(i).mlp

    def attention_projections(self, i: int) -> dict[str, nn.Module]:
        attn = self.attention(i)
        return {"q": attn.q_proj, "k": attn.k_proj, "v": attn.v_proj, "o": attn.o_proj}

    def mlp_projections(self, i: int) -> dict[str, nn.Module]:
        mlp = self.mlp(i)
        return {"gate": mlp.gate_proj, "up": mlp.up_proj, "down": mlp.down_proj}

    def norms(self, i: int) -> dict[str, nn.Module]:
        layer = self.layer(i)
        if hasattr(layer, "pre_feedforward_layernorm"):  # Gemma 3: sandwich norms around both branches
            return {
                "attention": layer.input_layernorm,
                "attention_out": layer.post_attention_layernorm,
                "mlp": layer.pre_feedforward_layernorm,
                "mlp_out": layer.post_feedforward_layernorm,
            }
        return {"attention": layer.input_layernorm, "mlp": layer.post_attention_layernorm}

    def _mask(self, i: int, context: LayerContext) -> Any:
        kind = self.layer_types[i]
        key = (kind, self.cached_length(context.cache, i))
        if key not in context._masks:
            make = create_sliding_window_causal_mask if kind == "sliding_attention" else create_causal_mask
            context._masks[key] = make(
                config=self.config,
                inputs_embeds=context.hidden,
                attention_mask=context.attention_mask,
                cache=context.cache,
                position_ids=context.position_ids,
                layer_idx=i,
            )
        return context._masks[key]

    def _rotary(self, i: int, context: LayerContext) -> tuple[torch.Tensor, torch.Tensor]:
        kind = self.layer_types[i] if self._rotary_by_type else "shared"
        key = ("rotary", kind)
        if key not in context._masks:
            args = (kind,) if self._rotary_by_type else ()
            context._masks[key] = self.base.rotary_emb(context.hidden, context.position_ids, *args)
        return context._masks[key]

    def run_layer(self, i: int, hidden: torch.Tensor, context: LayerContext) -> torch.Tensor:
        device = self.layer_device(i)
        out = self.layer(i)(
            hidden.to(device),
            attention_mask=to_device(self._mask(i, context), device),
            position_ids=context.position_ids.to(device),
            cache=context.cache,
            use_cache=context.cache is not None,
            position_embeddings=to_device(self._rotary(i, context), device),
        )
        return out[0] if isinstance(out, tuple) else out

    def append_kv(self, i: int, hidden: torch.Tensor, context: LayerContext) -> None:
        layer, attn = self.layer(i), self.attention(i)
        x = layer.input_layernorm(hidden.to(self.layer_device(i)))
        key = self._heads(attn.k_proj(x), attn.head_dim)
        value = self._heads(attn.v_proj(x), attn.head_dim)
        if hasattr(attn, "k_norm"):  # Gemma 3 (and Qwen 3) normalise keys per head before rotary
            key = attn.k_norm(key)
        cos, sin = to_device(self._rotary(i, context), key.device)
        rotate = inspect.getmodule(type(attn)).apply_rotary_pos_emb
        _, key = rotate(key, key, cos, sin)
        context.cache.update(key, value, i)

    def logits(self, hidden: torch.Tensor, rows: torch.LongTensor | None = None) -> torch.Tensor:
        logits = self._head(self.normed(hidden), rows)
        softcap = getattr(self.config, "final_logit_softcapping", None)
        if softcap:  # Gemma 2/3 checkpoints that set it
            logits = torch.tanh(logits / softcap) * softcap
        return logits


class OPTAdapter(ArchitectureAdapter):
    """OPT: learned positions (offset 2), optional project_in/out around the layers."""

    family = "opt"

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self.decoder = model.model.decoder

    @property
    def layers(self) -> nn.ModuleList:
        return self.decoder.layers

    @property
    def layers_path(self) -> str:
        return "model.decoder.layers"

    @property
    def embed_tokens(self) -> nn.Embedding:
        return self.decoder.embed_tokens

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def final_norm(self) -> nn.Module | None:
        return self.decoder.final_layer_norm  # None for opt-350m (post-norm)

    def attention(self, i: int) -> nn.Module:
        return self.layer(i).self_attn

    def mlp(self, i: int) -> nn.Module:
        return self.layer(i)  # fc1/fc2 sit directly on the layer

    def attention_projections(self, i: int) -> dict[str, nn.Module]:
        attn = self.attention(i)
        return {"q": attn.q_proj, "k": attn.k_proj, "v": attn.v_proj, "o": attn.out_proj}

    def mlp_projections(self, i: int) -> dict[str, nn.Module]:
        layer = self.layer(i)
        return {"up": layer.fc1, "down": layer.fc2}

    def norms(self, i: int) -> dict[str, nn.Module]:
        layer = self.layer(i)
        return {"attention": layer.self_attn_layer_norm, "mlp": layer.final_layer_norm}

    def embed(self, input_ids, position_ids=None, cache=None):
        if position_ids is None:
            position_ids = self.default_position_ids(input_ids, cache)
        hidden = self.decoder.embed_tokens(input_ids.to(module_device(self.decoder.embed_tokens)))
        if self.decoder.project_in is not None:
            hidden = self.decoder.project_in(hidden)
        positions = self.decoder.embed_positions(
            None, 0, position_ids=position_ids.to(module_device(self.decoder.embed_positions)))
        return hidden + positions.to(hidden.device)

    def run_layer(self, i, hidden, context):
        device = self.layer_device(i)
        out = self.layer(i)(
            hidden.to(device), attention_mask=to_device(self._causal_mask(i, context), device),
            cache=context.cache, use_cache=context.cache is not None,
            position_ids=context.position_ids.to(device),
        )
        return out[0] if isinstance(out, tuple) else out

    def append_kv(self, i, hidden, context):
        layer, attn = self.layer(i), self.attention(i)
        hidden = hidden.to(self.layer_device(i))
        x = layer.self_attn_layer_norm(hidden) if layer.do_layer_norm_before else hidden
        context.cache.update(self._heads(attn.k_proj(x), attn.head_dim), self._heads(attn.v_proj(x), attn.head_dim), i)

    def normed(self, hidden):
        if self.decoder.final_layer_norm is not None:
            hidden = self.decoder.final_layer_norm(hidden.to(module_device(self.decoder.final_layer_norm)))
        if self.decoder.project_out is not None:
            hidden = self.decoder.project_out(hidden.to(module_device(self.decoder.project_out)))
        return hidden


class GPT2Adapter(ArchitectureAdapter):
    """GPT-2: learned absolute positions, fused qkv in Conv1D modules (weights stored [in, out])."""

    family = "gpt2"

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.transformer.h

    @property
    def layers_path(self) -> str:
        return "transformer.h"

    @property
    def embed_tokens(self) -> nn.Embedding:
        return self.model.transformer.wte

    @property
    def final_norm(self) -> nn.Module:
        return self.model.transformer.ln_f

    def attention(self, i):
        return self.layer(i).attn

    def mlp(self, i):
        return self.layer(i).mlp

    def attention_projections(self, i):
        attn = self.attention(i)
        return {"qkv": attn.c_attn, "o": attn.c_proj}

    def mlp_projections(self, i):
        mlp = self.mlp(i)
        return {"up": mlp.c_fc, "down": mlp.c_proj}

    def norms(self, i):
        layer = self.layer(i)
        return {"attention": layer.ln_1, "mlp": layer.ln_2}

    def append_kv(self, i, hidden, context):
        attn = self.attention(i)
        hidden = hidden.to(self.layer_device(i))
        _, key, value = attn.c_attn(self.layer(i).ln_1(hidden)).split(attn.split_size, dim=2)
        context.cache.update(self._heads(key, attn.head_dim), self._heads(value, attn.head_dim), i)

    def embed(self, input_ids, position_ids=None, cache=None):
        if position_ids is None:
            position_ids = self.default_position_ids(input_ids, cache)
        transformer = self.model.transformer
        tokens = transformer.wte(input_ids.to(module_device(transformer.wte)))
        return tokens + transformer.wpe(position_ids.to(module_device(transformer.wpe))).to(tokens.device)

    def run_layer(self, i, hidden, context):
        device = self.layer_device(i)
        out = self.layer(i)(
            hidden.to(device), cache=context.cache, attention_mask=to_device(self._causal_mask(i, context), device),
            use_cache=context.cache is not None, position_ids=context.position_ids.to(device),
        )
        return out[0] if isinstance(out, tuple) else out


class T5Adapter(ArchitectureAdapter):
    """The T5 decoder (the setting of CALM and FREE). ``context`` needs ``encoder_hidden_states``.

    The relative position bias belongs to layer 0 and is shared by all layers; the adapter computes it
    itself so that any subset of layers can run.
    """

    family = "t5"

    def __init__(self, model):
        super().__init__(model)
        self.decoder = model.decoder
        self.config = model.decoder.config  # the decoder stack's copy: num_layers = num_decoder_layers

    @property
    def layers(self):
        return self.decoder.block

    @property
    def layers_path(self):
        return "decoder.block"

    @property
    def embed_tokens(self):
        return self.decoder.embed_tokens

    @property
    def final_norm(self):
        return self.decoder.final_layer_norm

    def attention(self, i):
        return self.layer(i).layer[0].SelfAttention

    def cross_attention(self, i):
        return self.layer(i).layer[1].EncDecAttention

    def mlp(self, i):
        return self.layer(i).layer[2].DenseReluDense

    def attention_projections(self, i):
        attn = self.attention(i)
        return {"q": attn.q, "k": attn.k, "v": attn.v, "o": attn.o}

    def cross_attention_projections(self, i):
        attn = self.cross_attention(i)
        return {"q": attn.q, "k": attn.k, "v": attn.v, "o": attn.o}

    def mlp_projections(self, i):
        mlp = self.mlp(i)
        if hasattr(mlp, "wi_0"):  # gated (T5 v1.1, Flan-T5)
            return {"gate": mlp.wi_0, "up": mlp.wi_1, "down": mlp.wo}
        return {"up": mlp.wi, "down": mlp.wo}

    def norms(self, i):
        layer = self.layer(i)
        return {"attention": layer.layer[0].layer_norm, "cross_attention": layer.layer[1].layer_norm,
                "mlp": layer.layer[2].layer_norm}

    def new_cache(self):
        return EncoderDecoderCache(DynamicCache(config=self.config), DynamicCache(config=self.config))

    def encode(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Encoder states [batch, source, d] of ``input_ids`` [batch, source] (``attention_mask``: 1 = token,
        0 = padding), computed where the encoder lives (the ids may come from the CPU)."""
        device = module_device(self.model.encoder)
        return self.model.encoder(
            input_ids=input_ids.to(device), attention_mask=to_device(attention_mask, device)
        ).last_hidden_state

    def context(self, hidden, position_ids=None, cache=None, attention_mask=None, **extras):
        """As the base class; ``encoder_hidden_states`` (from :meth:`encode`) is required and
        ``encoder_attention_mask`` (the 2-D padding mask of the source, [batch, source]) optional."""
        if "encoder_hidden_states" not in extras:
            raise ValueError("T5Adapter.context needs encoder_hidden_states=adapter.encode(source_ids)")
        return super().context(hidden, position_ids, cache, attention_mask, **extras)

    def _encoder_mask(self, context: LayerContext) -> Any:
        """The cross-attention mask in the form T5Attention adds to its scores: what T5Stack builds with
        create_bidirectional_mask from the 2-D source padding mask (a 4-D mask [batch, 1, q, source], or
        None when nothing is padded). A raw 2-D 0/1 mask would be *added* to the scores (+1 on real tokens,
        0 on padding): no masking at all, and a broadcasting error on batches."""
        if "encoder" not in context._masks:
            encoder_mask = context.extras.get("encoder_attention_mask")
            if encoder_mask is not None:
                encoder_mask = create_bidirectional_mask(
                    config=self.config, inputs_embeds=context.hidden, attention_mask=encoder_mask,
                    encoder_hidden_states=context.extras["encoder_hidden_states"],
                )
            context._masks["encoder"] = encoder_mask
        return context._masks["encoder"]

    def _self_attention_inputs(self, i, context):
        past = self.cached_length(context.cache, i)
        key = ("self", past)
        if key not in context._masks:
            self_cache = context.cache.self_attention_cache if context.cache is not None else None
            mask = self._causal_mask(i, context, cache=self_cache)
            q = context.hidden.shape[1]
            # the bias table lives in layer 0's attention, which may sit on another device than the states
            bias = self.attention(0).compute_bias(q, past + q, device=module_device(self.attention(0)),
                                                  past_seen_tokens=past)
            context._masks[key] = (mask, bias)
        return context._masks[key]

    def run_layer(self, i, hidden, context):
        device = self.layer_device(i)
        mask, bias = to_device(self._self_attention_inputs(i, context), device)
        out = self.layer(i)(
            hidden.to(device),
            attention_mask=mask,
            position_bias=bias,
            encoder_hidden_states=context.extras["encoder_hidden_states"].to(device),
            encoder_attention_mask=to_device(self._encoder_mask(context), device),
            cache=context.cache,
        )
        return out[0]

    def append_kv(self, i, hidden, context):
        attn = self.attention(i)
        x = self.layer(i).layer[0].layer_norm(hidden.to(self.layer_device(i)))
        key = self._heads(attn.k(x), attn.key_value_proj_dim)
        value = self._heads(attn.v(x), attn.key_value_proj_dim)
        context.cache.self_attention_cache.update(key, value, i)

    def normed(self, hidden):
        hidden = self.final_norm(hidden.to(module_device(self.final_norm)))
        if getattr(self.config, "scale_decoder_outputs", False):
            hidden = hidden * (self.config.d_model**-0.5)
        return hidden


_ADAPTERS: dict[str, type[ArchitectureAdapter]] = {
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
    if model_type not in _ADAPTERS:
        raise UnsupportedArchitectureError(
            f"No architecture adapter for model_type {model_type!r}; supported: {', '.join(sorted(_ADAPTERS))}"
        )
    adapter = _ADAPTERS[model_type](model)
    records.ADAPTER.set(model, adapter)
    return adapter

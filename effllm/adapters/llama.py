"""The Llama family's adapter: Llama, Mistral, Qwen2, Gemma v1 and Gemma 3 (text), pre-norm decoder blocks with
rotary positions, grouped K/V heads, and (Mistral, Gemma 3) sliding-window layers."""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from effllm.adapters.base import ArchitectureAdapter, LayerContext, to_device


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

    def layer_mask(self, i: int, context: LayerContext) -> Any:
        """Layer ``i``'s attention mask (causal, or sliding-window on sliding layers), built once per cached length."""
        kind = self.layer_types[i]
        key = (kind, self.cached_length(context.cache, i))
        if key not in context.memo:
            make = create_sliding_window_causal_mask if kind == "sliding_attention" else create_causal_mask
            context.memo[key] = make(
                config=self.config,
                inputs_embeds=context.hidden,
                attention_mask=context.attention_mask,
                cache=context.cache,
                position_ids=context.position_ids,
                layer_idx=i,
            )
        return context.memo[key]

    def rotary_embeddings(self, i: int, context: LayerContext) -> tuple[torch.Tensor, torch.Tensor]:
        """The rotary (cos, sin) tables layer ``i`` takes as ``position_embeddings``, built once per step."""
        kind = self.layer_types[i] if self._rotary_by_type else "shared"
        key = ("rotary", kind)
        if key not in context.memo:
            args = (kind,) if self._rotary_by_type else ()
            context.memo[key] = self.base.rotary_emb(context.hidden, context.position_ids, *args)
        return context.memo[key]

    def run_layer(self, i: int, hidden: torch.Tensor, context: LayerContext) -> torch.Tensor:
        device = self.layer_device(i)
        out = self.layer(i)(
            hidden.to(device),
            attention_mask=to_device(self.layer_mask(i, context), device),
            position_ids=context.position_ids.to(device),
            cache=context.cache,
            use_cache=context.cache is not None,
            position_embeddings=to_device(self.rotary_embeddings(i, context), device),
        )
        return out[0] if isinstance(out, tuple) else out

    def append_kv(self, i: int, hidden: torch.Tensor, context: LayerContext) -> None:
        layer, attn = self.layer(i), self.attention(i)
        x = layer.input_layernorm(hidden.to(self.layer_device(i)))
        key = self.split_heads(attn.k_proj(x), attn.head_dim)
        value = self.split_heads(attn.v_proj(x), attn.head_dim)
        if hasattr(attn, "k_norm"):  # Gemma 3 (and Qwen 3) normalise keys per head before rotary
            key = attn.k_norm(key)
        cos, sin = to_device(self.rotary_embeddings(i, context), key.device)
        rotate = inspect.getmodule(type(attn)).apply_rotary_pos_emb
        _, key = rotate(key, key, cos, sin)
        context.cache.update(key, value, i)

    def logits(self, hidden: torch.Tensor, rows: torch.LongTensor | None = None) -> torch.Tensor:
        logits = self.head_logits(self.normed(hidden), rows)
        softcap = getattr(self.config, "final_logit_softcapping", None)
        if softcap:  # Gemma 2/3 checkpoints that set it
            logits = torch.tanh(logits / softcap) * softcap
        return logits


"""The T5 decoder's adapter (the setting of CALM and FREE): cross-attention to the encoder's states, the
relative position bias of layer 0 shared by every layer, and T5's output scaling before a tied head."""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import DynamicCache, EncoderDecoderCache
from transformers.masking_utils import create_bidirectional_mask

from effllm.adapters.base import ArchitectureAdapter, LayerContext, module_device, to_device


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
        if "encoder" not in context.memo:
            encoder_mask = context.extras.get("encoder_attention_mask")
            if encoder_mask is not None:
                encoder_mask = create_bidirectional_mask(
                    config=self.config, inputs_embeds=context.hidden, attention_mask=encoder_mask,
                    encoder_hidden_states=context.extras["encoder_hidden_states"],
                )
            context.memo["encoder"] = encoder_mask
        return context.memo["encoder"]

    def _self_attention_inputs(self, i, context):
        past = self.cached_length(context.cache, i)
        key = ("self", past)
        if key not in context.memo:
            self_cache = context.cache.self_attention_cache if context.cache is not None else None
            mask = self.causal_mask(i, context, cache=self_cache)
            q = context.hidden.shape[1]
            # the bias table lives in layer 0's attention, which may sit on another device than the states
            bias = self.attention(0).compute_bias(q, past + q, device=module_device(self.attention(0)),
                                                  past_seen_tokens=past)
            context.memo[key] = (mask, bias)
        return context.memo[key]

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
        key = self.split_heads(attn.k(x), attn.key_value_proj_dim)
        value = self.split_heads(attn.v(x), attn.key_value_proj_dim)
        context.cache.self_attention_cache.update(key, value, i)

    def normed(self, hidden):
        hidden = self.final_norm(hidden.to(module_device(self.final_norm)))
        if getattr(self.config, "scale_decoder_outputs", False):
            hidden = hidden * (self.config.d_model**-0.5)
        return hidden


"""OPT's adapter: learned positions (offset 2), pre-norm (or post-norm, opt-350m) layers, optional
project_in / project_out around the layers."""

from __future__ import annotations

from torch import nn

from effllm.adapters.base import ArchitectureAdapter, module_device, to_device


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
            hidden.to(device), attention_mask=to_device(self.causal_mask(i, context), device),
            cache=context.cache, use_cache=context.cache is not None,
            position_ids=context.position_ids.to(device),
        )
        return out[0] if isinstance(out, tuple) else out

    def append_kv(self, i, hidden, context):
        layer, attn = self.layer(i), self.attention(i)
        hidden = hidden.to(self.layer_device(i))
        x = layer.self_attn_layer_norm(hidden) if layer.do_layer_norm_before else hidden
        context.cache.update(self.split_heads(attn.k_proj(x), attn.head_dim), self.split_heads(attn.v_proj(x), attn.head_dim), i)

    def normed(self, hidden):
        if self.decoder.final_layer_norm is not None:
            hidden = self.decoder.final_layer_norm(hidden.to(module_device(self.decoder.final_layer_norm)))
        if self.decoder.project_out is not None:
            hidden = self.decoder.project_out(hidden.to(module_device(self.decoder.project_out)))
        return hidden


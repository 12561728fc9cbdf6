"""GPT-2's adapter: learned absolute positions, the fused qkv projection in Conv1D modules (weights stored
[in, out]; :meth:`ArchitectureAdapter.weight` gives them as [out, in])."""

from __future__ import annotations

from torch import nn

from effllm.adapters.base import ArchitectureAdapter, module_device, to_device


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
        context.cache.update(self.split_heads(key, attn.head_dim), self.split_heads(value, attn.head_dim), i)

    def embed(self, input_ids, position_ids=None, cache=None):
        if position_ids is None:
            position_ids = self.default_position_ids(input_ids, cache)
        transformer = self.model.transformer
        tokens = transformer.wte(input_ids.to(module_device(transformer.wte)))
        return tokens + transformer.wpe(position_ids.to(module_device(transformer.wpe))).to(tokens.device)

    def run_layer(self, i, hidden, context):
        device = self.layer_device(i)
        out = self.layer(i)(
            hidden.to(device), cache=context.cache, attention_mask=to_device(self.causal_mask(i, context), device),
            use_cache=context.cache is not None, position_ids=context.position_ids.to(device),
        )
        return out[0] if isinstance(out, tuple) else out


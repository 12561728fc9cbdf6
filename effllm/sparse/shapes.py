"""The projections' shapes: of a loaded model's layer, of a config, or of the seed's model (its speedup table);
random weights of these shapes stand in for the real ones in the timings."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from effllm.adapters import get_adapter

TOKEN_COUNTS = (1, 16, 2048)  # decode, a small batch, a long prefill
PROJECTION_KINDS = ("q", "k", "v", "o", "gate", "up", "down")


# The seed's per-projection speedups of 2:4 over dense on CodeLlama-13B (PAPERS.md, section D).
SEED_SPEEDUPS = {"q": 1.36, "k": 1.36, "v": 1.36, "o": 1.36, "gate": 1.01, "up": 1.01, "down": 1.20}


# --------------------------------------------------------------------------------------------------
# Shapes


@dataclass(frozen=True)
class ProjectionShape:
    """One projection's weight shape [out_features, in_features], by role."""

    kind: str  # q, k, v, o, gate, up, down (GPT-2: qkv)
    out_features: int
    in_features: int


def projection_shapes(model: nn.Module, layer: int = 0) -> list[ProjectionShape]:
    """The attention and MLP projection shapes of decoder layer ``layer`` of ``model`` (via its adapter)."""
    adapter = get_adapter(model)
    parts = {**adapter.attention_projections(layer), **adapter.mlp_projections(layer)}
    return [ProjectionShape(kind, *adapter.weight(module).shape) for kind, module in parts.items()]


def config_projection_shapes(
    hidden_size: int,
    intermediate_size: int,
    num_attention_heads: int,
    num_key_value_heads: int | None = None,
    head_dim: int | None = None,
) -> list[ProjectionShape]:
    """q/k/v/o/gate/up/down shapes of a Llama-family layer from its config numbers (no weights needed)."""
    num_key_value_heads = num_key_value_heads or num_attention_heads
    head_dim = head_dim or hidden_size // num_attention_heads
    q, kv = num_attention_heads * head_dim, num_key_value_heads * head_dim
    return [
        ProjectionShape("q", q, hidden_size), ProjectionShape("k", kv, hidden_size),
        ProjectionShape("v", kv, hidden_size), ProjectionShape("o", hidden_size, q),
        ProjectionShape("gate", intermediate_size, hidden_size), ProjectionShape("up", intermediate_size, hidden_size),
        ProjectionShape("down", hidden_size, intermediate_size),
    ]


# The seed's model (its speedup table); random weights of these shapes stand in for the real ones.
SHAPE_SETS: dict[str, dict[str, int]] = {
    "codellama-13b": {"hidden_size": 5120, "intermediate_size": 13824, "num_attention_heads": 40,
                      "num_key_value_heads": 40},
}


def shape_set(name: str, model: nn.Module | None = None) -> list[ProjectionShape]:
    """``"model"``: the projection shapes of ``model``; or a named set of :data:`SHAPE_SETS`."""
    if name == "model":
        if model is None:
            raise ValueError("shape_set('model') needs the model whose shapes to use: shape_set('model', model).")
        return projection_shapes(model)
    if name not in SHAPE_SETS:
        raise ValueError(f"Unknown shape set {name!r}; allowed: model, {', '.join(SHAPE_SETS)}.")
    return config_projection_shapes(**SHAPE_SETS[name])

"""Trainable exit modules: what maps an intermediate state h_l to a state the final norm and LM head read.

The decoding core applies exits as ``exit_transform(layer, hidden) -> hidden`` (1-based layer, hidden
[b, q, d]; the result goes through the model's final norm and LM head). :class:`ExitModules` is such a
callable: one module per trained exit layer, the identity (the plain logit lens) at any other layer.

Kinds (``kind``), all position-wise except ``layer``:

- ``affine``: h A + b, initialised to the identity (a tuned lens, Belrose et al. 2023).
- ``mlp``: h + MLP(norm(h)), a copy of the last decoder layer's MLP with the norm in front of it
  (Llama family, T5), or a fresh pre-norm GELU MLP with a zero output projection (other families). It
  starts as "layer l's state plus the last layer's MLP update", then learns.
- ``mlp2``: two such blocks, copies of the last two layers' MLPs (twice the cost of ``mlp``).
- ``affine+mlp``: the affine map, then the MLP block.
- ``layer``: a copy of the whole last decoder layer, attention included (Kangaroo, Liu et al. 2024). Not
  position-wise: a decoder needs a K/V cache per exit for it (see the package docstring); Llama family only.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from effllm.adapters import get_adapter

EXIT_KINDS = ("affine", "mlp", "mlp2", "affine+mlp", "layer")


class AffineExit(nn.Module):
    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, hidden_size)
        with torch.no_grad():
            self.linear.weight.copy_(torch.eye(hidden_size))
            self.linear.bias.zero_()

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.linear(hidden)


class MLPExit(nn.Module):
    """h + post(mlp(norm(h))): ``norm``, ``mlp`` and the optional ``post`` norm are copied modules."""

    def __init__(self, norm: nn.Module, mlp: nn.Module, post: nn.Module | None = None):
        super().__init__()
        self.norm, self.mlp, self.post = norm, mlp, post

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        update = self.mlp(self.norm(hidden))
        if self.post is not None:
            update = self.post(update)
        return hidden + update


class T5FFExit(nn.Module):
    """A copy of T5's feed-forward sub-layer (norm, MLP and residual inside)."""

    def __init__(self, ff: nn.Module):
        super().__init__()
        self.ff = ff

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.ff(hidden)


def _fresh_mlp(hidden_size: int) -> MLPExit:
    up, down = nn.Linear(hidden_size, 4 * hidden_size), nn.Linear(4 * hidden_size, hidden_size)
    nn.init.zeros_(down.weight)
    nn.init.zeros_(down.bias)
    return MLPExit(nn.LayerNorm(hidden_size), nn.Sequential(up, nn.GELU(), down))


def _mlp_exit(model: nn.Module, last: int | None = None) -> nn.Module:
    """An MLP block copied from layer ``last`` (0-based; default the last layer)."""
    adapter = get_adapter(model)
    last = adapter.num_layers - 1 if last is None else last
    if adapter.family == "llama":
        norms = adapter.norms(last)
        post = copy.deepcopy(norms["mlp_out"]) if "mlp_out" in norms else None  # Gemma 3's sandwich norm
        return MLPExit(copy.deepcopy(norms["mlp"]), copy.deepcopy(adapter.mlp(last)), post)
    if adapter.family == "t5":
        return T5FFExit(copy.deepcopy(adapter.layer(last).layer[-1]))
    return _fresh_mlp(adapter.hidden_size)


class LayerExit(nn.Module):
    """A copy of the last decoder layer run on h_l over a whole window (causal attention, no cache)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        adapter = get_adapter(model)
        if adapter.family != "llama":
            raise ValueError(f"exit kind 'layer' is implemented for the Llama family; this model is {adapter.family!r}")
        self.layer = copy.deepcopy(adapter.layer(adapter.num_layers - 1))
        object.__setattr__(self, "_model", model)  # not a submodule: the backbone is not this module's

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        adapter = get_adapter(self._model)
        context = adapter.context(hidden)
        last = adapter.num_layers - 1
        out = self.layer(hidden, attention_mask=adapter.layer_mask(last, context), position_ids=context.position_ids,
                         past_key_values=None, use_cache=False, position_embeddings=adapter.rotary_embeddings(last, context))
        return out[0] if isinstance(out, tuple) else out


class ExitModules(nn.Module):
    """Exit modules at some layers: ``exits(layer, hidden)`` applies layer ``layer``'s module (1-based) and is
    the identity at every other layer; ``exits.layers`` are the trained ones, ``exits.position_wise`` says
    whether a decoder may apply them without a cache."""

    def __init__(self, modules: dict[int, nn.Module], kind: str):
        super().__init__()
        self.kind = kind
        self.blocks = nn.ModuleDict({str(layer): module for layer, module in sorted(modules.items())})

    @property
    def layers(self) -> list[int]:
        return [int(key) for key in self.blocks]

    @property
    def position_wise(self) -> bool:
        return self.kind != "layer"

    def flops_per_check(self, layer: int) -> int:
        """Matmul FLOPs of one position through layer ``layer``'s exit: two per weight of its linear maps (0
        where the exit is the identity; an attention exit's score products, which grow with the context, are
        not counted)."""
        if str(layer) not in self.blocks:
            return 0
        return 2 * sum(m.weight.numel() for m in self.blocks[str(layer)].modules() if isinstance(m, nn.Linear))

    def forward(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        block = self.blocks[str(layer)] if str(layer) in self.blocks else None
        if block is None:
            return hidden
        parameter = next(block.parameters())
        return block(hidden.to(parameter.dtype)).to(hidden.dtype)


def build_exit_modules(model: nn.Module, kind: str, layers: list[int]) -> ExitModules:
    """Fresh exit modules of ``kind`` (see :data:`EXIT_KINDS`) at ``layers`` (1-based), on the model's device,
    in float32 (they train in float32; :meth:`ExitModules.forward` casts around them)."""
    adapter = get_adapter(model)
    device = next(model.parameters()).device
    modules: dict[int, nn.Module] = {}
    for layer in layers:
        if kind == "affine":
            block: nn.Module = AffineExit(adapter.hidden_size)
        elif kind == "mlp":
            block = _mlp_exit(model)
        elif kind == "mlp2":
            block = nn.Sequential(_mlp_exit(model, adapter.num_layers - 2), _mlp_exit(model))
        elif kind == "affine+mlp":
            block = nn.Sequential(AffineExit(adapter.hidden_size), _mlp_exit(model))
        elif kind == "layer":
            block = LayerExit(model)
        else:
            raise ValueError(f"unknown exit kind {kind!r}; allowed: {', '.join(EXIT_KINDS)}")
        modules[layer] = block
    exits = ExitModules(modules, kind).to(device=device, dtype=torch.float32)
    return exits.requires_grad_(True)

"""Speed ceilings from the weights a decoded token reads: what a policy could reach at best on this model.

Decoding one token at batch 1 is memory-bound: its time is about the bytes of the weights it reads (on this
project's 2-core CPUs the matrix-vector products are 73% of a step, ``python -m effllm.bench decode-profile``).
So the weights a token reads bound the speed-up a policy can give over full depth, whatever its exits decide:

    full depth      sum of every decoder layer + the LM head (the final norm and the head's rows)
    exit at E       layers 1..E + the exit module at E (a trained one, if any) + the head once

A claim whose bar lies above a policy's ceiling cannot hold on this model, at any n: on SmolLM2-135M the tied
head is 21% of the weights (28.3M of 134.5M), so an exit at layer E of 30 reads (3.54 E + 28.3)M and the ceiling
is 1.36x at E = 20, 1.66x at 15, 2.10x at 10.

:func:`ceiling` is the best case of each policy, every token leaving at the first layer it may leave at:

- static exit at E, FREE's shallow layer E, CALM at its candidate layer j (the first check's head read is the
  output; ``kv='propagate'`` adds the K/V projections of the layers above j, which the copied state runs through);
- layer skipping with a fixed plan (static, early exit): the planned layers and the head; random: the budget's
  share of every layer (expected), plus the skipped layers' K/V projections with ``kv='propagate'``;
  controllers decide per token: no ceiling (NaN);
- self-speculation at full acceptance, g drafts at layer E: a round emits g + 1 tokens and reads
  (g + 1) x layers 1..E, g heads (+ exit modules) for the drafts, layers E+1..L and one head to verify;
- full depth and HF generate: 1.

Every count is of parameters, read once per token; an embedding row lookup, biases and norms are counted with their
layer (they are a rounding error), attention over the cache is not (it grows with the context, and at the sizes
here it is small beside the weights). These are ceilings, not predictions: a policy also pays for its checks.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch.nn as nn

from effllm import records
from effllm.adapters import get_adapter
from effllm.decoding.plans import plan_layers
from effllm.decoding.policies import Calm, Free, Full, Policy, SelfSpec, Skip, StaticExit


def _parameters(module: nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


@dataclass(frozen=True)
class WeightReads:
    """Parameters one decoded token reads: ``layers[i]`` for decoder layer i + 1 (0-based list), ``kv[i]`` for its
    K and V projections (what state propagation runs), ``head`` for the final norm and the LM head (a tied head is
    the embedding matrix, read in full), ``exits[E]`` for a trained exit module at layer E."""

    layers: tuple[int, ...]
    kv: tuple[int, ...]
    head: int
    exits: dict[int, int]

    @classmethod
    def of(cls, model: nn.Module, exit_transform: Callable[..., Any] | None = None) -> WeightReads:
        """Counted on ``model`` (any family an adapter knows), with the exit modules of ``exit_transform`` (trained
        exits: :class:`effllm.training.modules.ExitModules`; None: the model's attached exits, as decoding does; a
        plain function counts as free)."""
        adapter = get_adapter(model)
        if exit_transform is None:
            exit_transform = records.EXITS.get(model)
        layers, kv = [], []
        for i in range(adapter.num_layers):
            layers.append(_parameters(adapter.layer(i)))
            projections = adapter.attention_projections(i)
            # K and V; GPT-2's fused c_attn ("qkv") holds q, k and v in equal thirds
            kv.append(_parameters(projections["k"]) + _parameters(projections["v"]) if "k" in projections
                      else 2 * _parameters(projections["qkv"]) // 3)
        head = _parameters(adapter.lm_head) + _parameters(adapter.final_norm)
        exits = {}
        blocks = getattr(exit_transform, "blocks", None)
        if isinstance(blocks, nn.ModuleDict):
            exits = {int(layer): _parameters(block) for layer, block in blocks.items()}
        return cls(tuple(layers), tuple(kv), head, exits)

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def full(self) -> int:
        """One full-depth token."""
        return sum(self.layers) + self.head

    def exit_at(self, layer: int) -> int:
        """One token that runs layers 1..``layer`` and leaves through the exit there."""
        if not 1 <= layer <= self.n_layers:
            raise ValueError(f"layer must be in 1..{self.n_layers} (1-based); got {layer!r}")
        return sum(self.layers[:layer]) + self.exits.get(layer, 0) + self.head

    def exit_ceiling(self, layer: int) -> float:
        """Full depth over one token leaving at ``layer``: the speed-up if every token left there."""
        return self.full / self.exit_at(layer)


def ceiling(reads: WeightReads, policy: Policy | None) -> float:
    """The best speed-up over full depth ``policy`` can reach on the model ``reads`` counts (see the module
    docstring); None (HF generate) and :class:`Full` are 1, a per-token controller NaN."""
    if policy is None or isinstance(policy, Full):
        return 1.0
    if isinstance(policy, StaticExit):
        return reads.exit_ceiling(policy.static_exit_layer)
    if isinstance(policy, Free):
        return reads.exit_ceiling(policy.shallow_exit_layer)
    if isinstance(policy, Calm):
        j = policy.candidate_layer
        propagated = sum(reads.kv[j:]) if policy.kv_mode == "propagate" else 0
        return reads.full / (reads.exit_at(j) + propagated)
    if isinstance(policy, SelfSpec):
        e, g = policy.draft_exit_layer, policy.num_draft_tokens
        shallow = sum(reads.layers[:e])
        round_reads = ((g + 1) * shallow + g * (reads.exits.get(e, 0) + reads.head)
                       + sum(reads.layers[e:]) + reads.head)
        return (g + 1) * reads.full / round_reads
    if isinstance(policy, Skip):
        return _skip_ceiling(reads, policy)
    return math.nan


def _skip_ceiling(reads: WeightReads, policy: Skip) -> float:
    kept = plan_layers(policy, reads.n_layers)
    if kept is not None:
        return reads.full / (sum(reads.layers[i] for i in kept) + reads.head)
    if policy.skip_mode == "random":
        share = policy.budget
        propagated = (1 - share) * sum(reads.kv) if policy.kv_mode == "propagate" else 0
        return reads.full / (share * sum(reads.layers) + propagated + reads.head)
    return math.nan  # controllers choose per token: no fixed best case


def self_spec_bound(reads: WeightReads, rate: float, draft_length: int, draft_layer: int) -> float:
    """Self-speculation's speed-up over full depth at a measured acceptance ``rate`` (accepted drafts over drafted,
    as the decoder reports it), in weight reads: a round emits 1 + rate x g tokens and reads what
    :func:`ceiling`'s round reads (g + 1 passes through layers 1..E, g draft heads and exits, the deep layers and one
    head to verify). The weight-read version of :func:`effllm.decoding.speculative.speedup_at_acceptance_rate`,
    which counts layers only and so leaves out the head each draft reads."""
    if not 0 <= rate <= 1:
        raise ValueError(f"rate must lie in [0, 1]; got {rate!r}")
    e, g = draft_layer, draft_length
    round_reads = ((g + 1) * sum(reads.layers[:e]) + g * (reads.exits.get(e, 0) + reads.head)
                   + sum(reads.layers[e:]) + reads.head)
    return (1 + rate * g) * reads.full / round_reads


def ceilings(model: nn.Module, policies: dict[str, Policy | None],
             exit_transform: Callable[..., Any] | None = None) -> dict[str, float]:
    """:func:`ceiling` of every labelled policy on ``model`` (the ``speedup_ceiling`` column of result tables)."""
    reads = WeightReads.of(model, exit_transform)
    return {label: ceiling(reads, policy) for label, policy in policies.items()}

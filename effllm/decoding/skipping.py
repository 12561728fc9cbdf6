"""Layer skipping (Glavas et al., "Dynamic layer selection in decoder-only transformers", seed 003): which
layers a generated token runs, and the skip step of the decoding core.

    decode(model, ids, 64, Skip(skip_mode="static", budget=8 / 24))
    out.num_layers_run  # [1, new]: how many layers ran for each new token
    out.exit_layers     # [1, new]: the 1-based last layer that ran (the head reads its state)
    out.layers_run      # per new token: the 0-based indices of the layers that ran

A skipped layer is not computed at all: its input state goes on to the next layer unchanged. Later tokens
that run the layer still attend to the skipped position, so its K/V must come from somewhere:
``kv="propagate"`` computes only the layer's K and V projections from the copied state (the adapter's
``append_kv``: about a sixth of the layer's work on SmolLM2), ``"none"`` leaves the position out of that
layer's cache, so the layer's later attention sees only the positions where it ran (each layer's cache then
has its own length, and its causal mask is sized to it). Static patterns and early exit never run a skipped
layer again, so no K/V is computed for it in either mode (both give the same tokens; ``Skip.kv_mode`` is
``none``).

As in the paper's code (``skip_prompt=False``), the prompt runs at full depth and only generated tokens skip,
so the first new token comes from all L layers. ``skip_prompt=True`` (static and early exit) runs the prompt
through the kept layers too, which makes static skipping equal to a model built from the kept layers alone.
"""

from __future__ import annotations

from pathlib import Path

import torch

from effllm.controllers import SkipControllers
from effllm.decoding.exits import exit_logits
from effllm.decoding.plans import budget_layer_count, plan_layers
from effllm.decoding.policies import Skip
from effllm.decoding.state import DecodeState, Emitted, StepResult, Strategy


def skip_controllers(policy: Skip, model: torch.nn.Module) -> SkipControllers | None:
    """The controllers a ``controller``-mode policy drives ``model`` with (loaded from a path if need be and checked
    against the model), None for the other modes."""
    if policy.skip_mode != "controller":
        return None
    controller = policy.controller
    if isinstance(controller, Path):
        controller = SkipControllers.load(controller, model)
    elif not isinstance(controller, SkipControllers):
        raise ValueError(f"controller must be SkipControllers or the path of a saved file; got "
                         f"{type(controller).__name__}")
    controller.check_model(model)
    return controller


class SkipStrategy(Strategy):
    """The skip step: per token, the planned layers run; the others get propagated K/V or none."""

    def __init__(self, policy: Skip, adapter, model: torch.nn.Module):
        self.policy, self.adapter = policy, adapter
        self.n_layers = adapter.num_layers
        self.fixed = plan_layers(policy, self.n_layers)
        self.controllers = skip_controllers(policy, model)
        self.n_random = budget_layer_count(self.n_layers, policy.budget) if policy.skip_mode == "random" else None
        self.generator = torch.Generator(device="cpu").manual_seed(policy.seed)
        # Fixed patterns never run a skipped layer again, so its K/V would never be read (kv_mode "none").
        self.propagate = policy.kv_mode == "propagate"
        self.prompt_layers = self.fixed if policy.skip_prompt else list(range(self.n_layers))

    def first_token(self, state: DecodeState, hidden: torch.Tensor) -> Emitted:
        token = exit_logits(self.adapter, self.n_layers, hidden[:, -1:]).argmax(-1).to(state.next_token.device)
        return Emitted(token, _read_layer(self.prompt_layers), tuple(self.prompt_layers))

    def step(self, state: DecodeState) -> StepResult:
        adapter = self.adapter
        hidden = adapter.embed(state.next_token, position_ids=state.position_ids(state.position, 1), cache=state.cache)
        context = state.context(hidden, state.position)
        if self.fixed is not None:
            planned = self.fixed
        elif self.controllers is None:  # a random route for this token
            planned = sorted(torch.randperm(self.n_layers, generator=self.generator)[: self.n_random].tolist())
        else:
            planned = None
        ran = []
        for i in range(self.n_layers):
            run = i in planned if planned is not None else bool(
                self.controllers.keep(i, hidden[:, -1], self.generator).item() > 0.5)
            if run:
                hidden = adapter.run_layer(i, hidden, context)
                ran.append(i)
            elif self.propagate:
                adapter.append_kv(i, hidden, context)
        state.position += 1
        # the head reads the last state, which skipped layers pass on unchanged: the prediction of layer L
        token = exit_logits(adapter, self.n_layers, hidden[:, -1:]).argmax(-1).to(state.next_token.device)
        return StepResult([Emitted(token, _read_layer(ran), tuple(ran))])


def _read_layer(ran) -> int:
    """The exit layer of a token that ran the 0-based layers ``ran``: the last one that ran, 1-based (0: none ran,
    the head reads the embedding)."""
    return max(ran) + 1 if len(ran) else 0

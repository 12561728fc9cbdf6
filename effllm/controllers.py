"""Learned per-token skip controllers (Glavas et al. 2024, seed 003): one Linear(d, 2) per layer and a hard
Gumbel-softmax decide keep / skip for every generated token; trained on a frozen backbone with the cost-aware
loss CE + alpha * (mean fraction of executed layers).

    controllers, history = train_controllers(model, controller_examples("arithmetic", tokenizer, 48), alpha=1.0)
    controllers.save(path)                               # safetensors + a checksummed sidecar (effllm.io)
    decode(model, ids, 64, Skip(skip_mode="controller", controller=SkipControllers.load(path, model)))

During training every layer runs on every token and a skipped token's output is replaced by its input
(:func:`mixed_forward`), which gives the same states as decoding with ``Skip(kv="propagate")``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from effllm import checks, io
from effllm.adapters import get_adapter
from effllm.models import fingerprint

CONTROLLER_FORMAT = "effllm-skip-controllers/1"


def hard_gumbel_softmax(logits: torch.Tensor, tau: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """One-hot samples of softmax(``logits``) over the last dim, with the straight-through gradient of
    the soft Gumbel-softmax sample (what ``torch.nn.functional.gumbel_softmax(hard=True)`` computes).

    Written here because torch's function draws its noise from the global generator only; a
    ``generator`` makes controller decisions reproducible without touching the global seed.
    """
    uniform = torch.rand(logits.shape, generator=generator, dtype=torch.float32).to(logits.device)
    gumbel = -torch.log(-torch.log(uniform.clamp(1e-10, 1.0 - 1e-7)))
    soft = torch.softmax((logits.float() + gumbel) / tau, dim=-1)
    hard = torch.nn.functional.one_hot(soft.argmax(-1), logits.shape[-1]).to(soft.dtype)
    return (hard - soft.detach() + soft).to(logits.dtype)


class ControllerMismatchError(ValueError):
    """A controller file or object was trained for another model."""


class SkipControllers(nn.Module):
    """One Linear(d, 2) per layer: logits of (keep, skip) for the state entering that layer.

    ``with_fixed_input=True`` feeds a constant vector instead of the state (the paper's fixed-input
    controller), so a layer's decision no longer depends on the token. The state is standardised first
    (layer norm without weights) and scaled to unit length, and the fixed input is ones / d: the original
    code feeds the raw state (or ones), whose size grows with the width and the depth, so one learning
    rate moved some layers' logits by tens per step. Scaled inputs make one learning rate suit every layer
    and model width (Adam moves a fixed-input logit by about 2 * lr per step).
    ``meta`` records the model the controllers were trained for (``fingerprint``, ``model``) and the
    training settings.
    """

    def __init__(self, n_layers: int, hidden_size: int, with_fixed_input: bool = False, tau: float = 1.0,
                 meta: dict[str, Any] | None = None, init_keep_logit: float = 0.0):
        super().__init__()
        self.controllers = nn.ModuleList(nn.Linear(hidden_size, 2) for _ in range(n_layers))
        for linear in self.controllers:
            # Start from the keep probability sigmoid(init_keep_logit) on every layer (0: the paper's 50/50).
            nn.init.normal_(linear.weight, std=1e-3)
            nn.init.constant_(linear.bias, 0.0)
            linear.bias.data[0] = init_keep_logit
        self.with_fixed_input = with_fixed_input
        self.tau = tau
        self.meta = dict(meta or {})

    @property
    def num_layers(self) -> int:
        return len(self.controllers)

    @property
    def hidden_size(self) -> int:
        return self.controllers[0].in_features

    def logits(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """(keep, skip) logits [..., 2] of 0-based ``layer`` for states ``hidden`` [..., d] (detached)."""
        linear = self.controllers[layer]
        x = hidden.detach().to(device=linear.weight.device, dtype=linear.weight.dtype)
        if self.with_fixed_input:
            return linear(torch.ones_like(x) / x.shape[-1])
        return linear(nn.functional.layer_norm(x, x.shape[-1:]) / math.sqrt(x.shape[-1]))

    def keep(self, layer: int, hidden: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Hard keep decisions [...] (1.0 keep, 0.0 skip; straight-through gradient) for ``hidden`` [..., d]."""
        return hard_gumbel_softmax(self.logits(layer, hidden), self.tau, generator)[..., 0]

    def keep_probabilities(self, hidden: torch.Tensor | None = None) -> torch.Tensor:
        """Per layer, the probability of keeping it: [L] for fixed-input controllers (``hidden`` unused),
        else [L, ...] for states ``hidden`` [..., d] (the same state offered to every layer)."""
        if hidden is None:
            if not self.with_fixed_input:
                raise ValueError("keep_probabilities needs hidden states for hidden-state controllers")
            hidden = torch.zeros(self.hidden_size)
        with torch.no_grad():
            return torch.stack([torch.softmax(self.logits(i, hidden), -1)[..., 0] for i in range(self.num_layers)]).cpu()

    def check_model(self, model: nn.Module) -> None:
        """Raise :class:`ControllerMismatchError` unless these controllers were trained for ``model``."""
        adapter = get_adapter(model)
        trained_for = self.meta.get("model", "an unnamed model")
        if (self.num_layers, self.hidden_size) != (adapter.num_layers, adapter.hidden_size):
            raise ControllerMismatchError(
                f"skip controllers trained for {trained_for} ({self.num_layers} layers of width {self.hidden_size}) "
                f"cannot drive this model ({adapter.num_layers} layers of width {adapter.hidden_size}); train "
                "controllers for it with effllm.controllers.train_controllers"
            )
        recorded = self.meta.get("fingerprint")
        if recorded is not None and recorded != fingerprint(model):
            raise ControllerMismatchError(
                f"skip controllers trained for {trained_for} (weights fingerprint {recorded}) do not belong to this "
                f"model (fingerprint {fingerprint(model)}): same shape, other weights. Train controllers for "
                "it with effllm.controllers.train_controllers"
            )

    def save(self, path: str | Path) -> Path:
        """Write ``<path>`` (safetensors) and ``<path>.json`` (what they were trained for and how, and one checksum
        over both: effllm.io)."""
        header = {"num_layers": self.num_layers, "hidden_size": self.hidden_size,
                  "with_fixed_input": self.with_fixed_input, "tau": self.tau, "meta": self.meta}
        return io.save_tensors(path, self.state_dict(), header, CONTROLLER_FORMAT)

    @classmethod
    def load(cls, path: str | Path, model: nn.Module | None = None) -> SkipControllers:
        """Load controllers saved by :meth:`save` (a missing, changed or foreign file raises
        :class:`effllm.io.ArtifactError`); with ``model``, check they were trained for it."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no skip controllers at {path} (need {path.name} and {path.name}.json, "
                                    "written by SkipControllers.save)")
        tensors, header = io.load_tensors(path, CONTROLLER_FORMAT)
        controllers = cls(header["num_layers"], header["hidden_size"], header["with_fixed_input"], header["tau"],
                          header["meta"])
        controllers.load_state_dict(tensors)
        if model is not None:
            try:
                controllers.check_model(model)
            except ControllerMismatchError as error:
                raise ControllerMismatchError(f"{path}: {error}") from None
        return controllers


# --------------------------------------------------------------------------------------------------
# The training pass


def mixed_forward(
    model: nn.Module,
    input_ids: torch.LongTensor,
    keep: torch.Tensor | Callable[[int, torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """All positions of ``input_ids`` [b, s] in one causal pass where position t skips layer i when
    ``keep[i, b, t]`` is 0: the layer runs on every position, and a skipped position's output is replaced
    by its input. Returns the last states [b, s, d] (before the final norm).

    The skipped positions' K/V at layer i come from their input state, so this is decoding with
    ``kv="propagate"`` done in parallel (the paper's training pass). ``keep`` is a [L, b, s] tensor
    (bool or float; fractional values mix) or ``keep(i, hidden) -> [b, s]``, called on the state entering
    layer i (differentiable: the controllers' training uses it). Gradients flow when enabled.
    """
    adapter = get_adapter(model)
    hidden = adapter.embed(input_ids)
    context = adapter.context(hidden)
    for i in range(adapter.num_layers):
        gate = keep(i, hidden) if callable(keep) else keep[i]
        gate = gate.to(device=hidden.device, dtype=hidden.dtype).unsqueeze(-1)  # [b, s, 1]
        hidden = adapter.run_layer(i, hidden, context) * gate + hidden * (1 - gate)
    return hidden




# --------------------------------------------------------------------------------------------------
# Controller training (cost-aware loss, frozen backbone)


def _controller_gate(controllers: SkipControllers, skip_positions: torch.Tensor, generator: torch.Generator,
                     decisions: list[torch.Tensor]) -> Callable[[int, torch.Tensor], torch.Tensor]:
    """The ``keep`` of :func:`mixed_forward` in training: controller decisions on skippable positions, 1
    elsewhere; each layer's decisions are appended to ``decisions`` for the cost term."""
    def keep(i: int, hidden: torch.Tensor) -> torch.Tensor:
        decision = controllers.keep(i, hidden, generator).to(hidden.device)
        decision = torch.where(skip_positions, decision, torch.ones_like(decision))
        decisions.append(decision)
        return decision

    return keep


@dataclass(frozen=True)
class ControllerTraining:
    """The settings of :func:`train_controllers`: the loss weight ``alpha`` of the layer cost, ``steps`` of Adam
    at ``lr``, the Gumbel-softmax temperature ``tau``, the initial keep logit, the seed, and whether the
    controllers read a fixed input instead of the hidden state."""

    with_fixed_input: bool = False
    alpha: float = 0.5
    steps: int = 60
    lr: float = 0.05
    tau: float = 1.0
    init_keep_logit: float = 2.0
    seed: int = 0


def train_controllers(
    model: nn.Module,
    examples: Sequence[tuple[torch.LongTensor, torch.Tensor]],
    settings: ControllerTraining | None = None,
    *,
    model_name: str | None = None,
    progress: bool = True,
    **overrides: Any,
) -> tuple[SkipControllers, pd.DataFrame]:
    """Train one :class:`SkipControllers` on a frozen ``model`` with the cost-aware loss
    CE + ``alpha`` * (mean fraction of executed layers). ``settings`` (default :class:`ControllerTraining`), with
    any of its fields given as keywords (``alpha=1.0, steps=40``) replacing its values.

    ``examples`` are (input_ids [1, n], label_mask [1, n]) pairs: label positions are the answer tokens.
    As in the paper's code, prompt positions always run every layer; answer positions (as inputs) skip
    where the controllers say so; CE is taken on predicting the answer tokens and the cost on the answer
    positions that predict one. Each step is one example (Adam, ``lr``), seeded by ``seed``. Every layer
    starts with keep probability sigmoid(``init_keep_logit``) (0.88 by default: start near the full model,
    since a pretrained model's loss is far from its optimum when half its layers are skipped at random). The model's
    weights and ``requires_grad`` flags are left as they were. Returns the controllers (in eval use:
    ``generate(..., skip_mode="controller", controller=...)``) and a per-step history.
    """
    settings = dataclasses.replace(settings or ControllerTraining(), **overrides)
    with_fixed_input, alpha, steps, lr = settings.with_fixed_input, settings.alpha, settings.steps, settings.lr
    tau, init_keep_logit, seed = settings.tau, settings.init_keep_logit, settings.seed
    if not examples:
        raise ValueError("train_controllers needs at least one (input_ids, label_mask) example")
    checks.number("alpha", alpha, low=0, hint=" (the weight of the layer cost)")
    checks.positive_int("steps", steps)
    for k, (ids, mask) in enumerate(examples):
        if ids.dim() != 2 or ids.shape[0] != 1 or mask.shape != ids.shape or not bool(mask[:, 1:].any()):
            raise ValueError(f"example {k} must be (input_ids [1, n], label_mask [1, n]) with at least one label "
                             f"after the first position; got shapes {tuple(ids.shape)}, {tuple(mask.shape)}")
    adapter = get_adapter(model)
    device = next(model.parameters()).device
    meta = {"model": model_name or getattr(model.config, "_name_or_path", "") or model.config.model_type,
            "fingerprint": fingerprint(model), "alpha": alpha, "steps": steps, "lr": lr, "seed": seed,
            "examples": len(examples), "loss": "CE + alpha * mean fraction of executed layers"}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        controllers = SkipControllers(adapter.num_layers, adapter.hidden_size, with_fixed_input, tau, meta,
                                      init_keep_logit).to(device)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    order = torch.randperm(len(examples), generator=generator).tolist()
    optimizer = torch.optim.Adam(controllers.parameters(), lr=lr)
    flags = [p.requires_grad for p in model.parameters()]
    history = []
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for step in tqdm(range(steps), desc="train controllers", disable=not progress):
            ids, label_mask = examples[order[step % len(examples)]]
            ids, label_mask = ids.to(device), label_mask.to(device).bool()
            skip_positions = label_mask.clone()
            skip_positions[:, -1] = False  # the last token predicts nothing
            decisions: list[torch.Tensor] = []
            keep = _controller_gate(controllers, skip_positions, generator, decisions)
            with torch.enable_grad():
                hidden = mixed_forward(model, ids, keep)
                logits = adapter.logits(hidden[:, :-1]).float()  # position t predicts token t + 1
                targets = ids[:, 1:][label_mask[:, 1:]]
                ce = nn.functional.cross_entropy(logits[label_mask[:, 1:]], targets)
                fraction = torch.stack([d[skip_positions].mean() for d in decisions]).mean()
                loss = ce + alpha * fraction
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            history.append({"step": step, "loss": loss.item(), "ce": ce.item(), "layer_fraction": fraction.item()})
    finally:
        for p, flag in zip(model.parameters(), flags, strict=True):
            p.requires_grad_(flag)
    controllers.eval()
    return controllers, pd.DataFrame(history)

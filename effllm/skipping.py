"""Dynamic layer selection in decoder-only transformers (Glavas et al., NeurIPS ENLSP 2024; seed 003):
layer skipping against early exit, learned per-token skip controllers, and the per-sequence oracle.

    out = generate(model, input_ids, max_new_tokens=64, skip_mode="static", budget=8 / 24)
    out.sequences      # [1, prompt + new] as HF `generate` returns them
    out.exit_layers    # [1, new]: how many layers ran for each new token
    out.layers_run     # per new token: the 0-based indices of the layers that ran

Skip modes (``skip_mode``), for greedy decoding of one sequence with a KV cache:

- ``static``: every new token runs the same layers: ``skip_pattern="every-k"`` keeps every k-th layer
  (layers 0, k, 2k, ... and the last), a list of kept 0-based layer indices keeps exactly those, and
  ``budget=b`` keeps round(b * L) layers spread evenly with the first and the last kept.
- ``random``: every new token runs its own random choice of round(b * L) layers (seeded by ``seed``).
- ``controller``: per token and layer, a :class:`SkipControllers` Linear(d, 2) followed by a hard
  Gumbel-softmax on the (detached) state entering the layer decides keep / skip; with
  ``with_fixed_input`` it sees a constant input instead, which makes it a learned per-layer skip rate.
- ``early-exit``: early exit expressed as skipping: run the first round(b * L) layers, skip the rest.

A skipped layer is not computed at all: its state is copied to the next layer (the residual stream
goes on unchanged). Later tokens that run the layer still attend to the skipped position, so its K/V
must come from somewhere: ``skipped_kv="propagate"`` computes only the layer's K and V projections
from the copied state (the adapter's ``append_kv``: about a sixth of the layer's work on SmolLM2),
``"none"`` leaves the position out of that layer's cache, so the layer's later attention sees only the
positions where it ran (each layer's cache then has its own length, and its causal mask is sized to
it). Static patterns and early exit never run a skipped layer again, so no K/V is computed for it in
either mode (both give the same tokens).

As in the paper's code (``skip_prompt=False``), the prompt runs at full depth and only generated
tokens skip, so the first new token always comes from all L layers. ``skip_prompt=True`` (static and
early exit) runs the prompt through the kept layers too, which makes static skipping equal to a model
built from the kept layers alone.

Controllers are trained on a frozen backbone with the cost-aware loss
CE + alpha * (mean fraction of executed layers) (:func:`train_controllers`); during training every
layer runs on every token and a skipped token's output is replaced by its input
(:func:`mixed_forward`), which gives the same states as decoding with ``skipped_kv="propagate"``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from effllm.adapters import get_adapter
from effllm.exits import ExitOutput

SKIP_MODES = ("static", "random", "controller", "early-exit")
SKIPPED_KV = ("propagate", "none")
# The paper's 4 / 8 / 12 / 24 layers of OPT-IML-1.3b (24 layers), as fractions of the depth.
PAPER_BUDGETS = (4 / 24, 8 / 24, 12 / 24, 24 / 24)
CONTROLLER_FORMAT = "effllm-skip-controllers/1"


# --------------------------------------------------------------------------------------------------
# Which layers run


def budget_layer_count(n_layers: int, budget: float) -> int:
    """Number of layers a ``budget`` (fraction of the depth in (0, 1]) executes: round(b * L), at least 1."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or math.isnan(budget) or not 0 < budget <= 1:
        raise ValueError(
            f"budget must be a fraction of the layers in (0, 1] (e.g. 8/24 for a third); got {budget!r}"
        )
    return max(1, int(math.floor(budget * n_layers + 0.5)))


def every_k_pattern(n_layers: int, k: int) -> list[int]:
    """Keep every ``k``-th layer, the first and the last included: 0, k, 2k, ..., L-1 (0-based)."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"the k of an 'every-k' skip pattern must be an integer >= 1; got {k!r}")
    return sorted({*range(0, n_layers, k), n_layers - 1})


def uniform_pattern(n_layers: int, n_kept: int) -> list[int]:
    """``n_kept`` layers spread evenly over the depth, first and last kept (only the first when n_kept = 1)."""
    if not 1 <= n_kept <= n_layers:
        raise ValueError(f"n_kept must be between 1 and {n_layers}; got {n_kept}")
    if n_kept == 1:
        return [0]
    return [int(i) for i in np.round(np.linspace(0, n_layers - 1, n_kept)).astype(int)]


def static_layers(n_layers: int, skip_pattern: Any = None, budget: float | None = None) -> list[int]:
    """The kept 0-based layers of a static pattern: ``skip_pattern`` ("every-k", or a list / tensor of kept
    layers), ``budget`` (a fraction: :func:`uniform_pattern`), or neither (every layer, nothing skipped)."""
    if skip_pattern is not None and budget is not None:
        raise ValueError(
            f"give either skip_pattern or budget for a static pattern, not both; got skip_pattern={skip_pattern!r} "
            f"and budget={budget!r}"
        )
    if budget is not None:
        return uniform_pattern(n_layers, budget_layer_count(n_layers, budget))
    if skip_pattern is None:
        return list(range(n_layers))
    if isinstance(skip_pattern, str):
        match = re.fullmatch(r"every-(\d+)", skip_pattern.strip())
        if not match:
            raise ValueError(
                f"unknown skip_pattern {skip_pattern!r}; allowed: 'every-k' (k >= 1, e.g. 'every-3'), or a list "
                f"of the 0-based layers to keep (0..{n_layers - 1})"
            )
        return every_k_pattern(n_layers, int(match.group(1)))
    if isinstance(skip_pattern, torch.Tensor):
        skip_pattern = skip_pattern.flatten().tolist()
    if not isinstance(skip_pattern, (list, tuple, range)):
        raise ValueError(
            f"skip_pattern must be 'every-k' or a list of kept 0-based layers; got {type(skip_pattern).__name__}"
        )
    kept = list(skip_pattern)
    if not kept:
        raise ValueError(
            f"skip_pattern {skip_pattern!r} drops every layer; keep at least one of the layers 0..{n_layers - 1}"
        )
    bad = [i for i in kept if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n_layers]
    if bad:
        raise ValueError(f"skip_pattern holds {bad!r}, which are not layers of this model: allowed 0..{n_layers - 1}")
    if len(set(kept)) != len(kept):
        raise ValueError(f"skip_pattern lists a layer twice: {skip_pattern!r}")
    return sorted(kept)


def early_exit_layers(n_layers: int, budget: float) -> list[int]:
    """Early exit as skipping: the first round(b * L) layers run, every layer above them is skipped."""
    return list(range(budget_layer_count(n_layers, budget)))


# --------------------------------------------------------------------------------------------------
# Controllers


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


def model_fingerprint(model: nn.Module) -> str:
    """A short hash of the model's architecture and a sample of its weights: what a controller file
    records, so that controllers trained for one model are never used on another."""
    adapter = get_adapter(model)
    digest = hashlib.sha256()
    digest.update(f"{model.config.model_type}:{adapter.num_layers}:{adapter.hidden_size}".encode())
    samples = [adapter.embed_tokens.weight[:4, :64]]
    for i in (0, adapter.num_layers - 1):
        samples += [adapter.weight(m)[:4, :64] for m in adapter.mlp_projections(i).values()]
    for sample in samples:
        digest.update(sample.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


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
                "controllers for it with effllm.skipping.train_controllers"
            )
        recorded = self.meta.get("fingerprint")
        if recorded is not None and recorded != model_fingerprint(model):
            raise ControllerMismatchError(
                f"skip controllers trained for {trained_for} (weights fingerprint {recorded}) do not belong to this "
                f"model (fingerprint {model_fingerprint(model)}): same shape, other weights. Train controllers for "
                "it with effllm.skipping.train_controllers"
            )

    def save(self, path: str | Path) -> Path:
        """Write ``<path>`` (safetensors) and ``<path>.json`` (what they were trained for and how)."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous() for k, v in self.state_dict().items()}, path)
        header = {"format": CONTROLLER_FORMAT, "num_layers": self.num_layers, "hidden_size": self.hidden_size,
                  "with_fixed_input": self.with_fixed_input, "tau": self.tau, "meta": self.meta}
        path.with_name(path.name + ".json").write_text(json.dumps(header, indent=1))
        return path

    @classmethod
    def load(cls, path: str | Path, model: nn.Module | None = None) -> SkipControllers:
        """Load controllers saved by :meth:`save`; with ``model``, check they were trained for it."""
        from safetensors.torch import load_file

        path = Path(path)
        header_path = path.with_name(path.name + ".json")
        if not path.is_file() or not header_path.is_file():
            raise FileNotFoundError(f"no skip controllers at {path} (need {path.name} and {header_path.name})")
        header = json.loads(header_path.read_text())
        if header.get("format") != CONTROLLER_FORMAT:
            raise ValueError(f"{header_path} is not a skip-controller file (format {header.get('format')!r}, "
                             f"expected {CONTROLLER_FORMAT!r})")
        controllers = cls(header["num_layers"], header["hidden_size"], header["with_fixed_input"], header["tau"],
                          header["meta"])
        controllers.load_state_dict(load_file(path))
        if model is not None:
            try:
                controllers.check_model(model)
            except ControllerMismatchError as error:
                raise ControllerMismatchError(f"{path}: {error}") from None
        return controllers


# --------------------------------------------------------------------------------------------------
# Decoding


@dataclass
class SkipOutput(ExitOutput):
    """:class:`effllm.exits.ExitOutput` plus, per new token, the 0-based layers that ran for it
    (``exit_layers`` holds their number)."""

    layers_run: list[tuple[int, ...]] = field(default_factory=list)
    num_layers: int = 0  # the model's depth L

    @property
    def layer_fraction(self) -> float:
        """Mean fraction of the L layers executed per new token."""
        return float(self.exit_layers.double().mean()) / self.num_layers


def _check_controller(controller: Any, model: nn.Module) -> SkipControllers:
    if controller is None:
        raise ValueError("skip_mode='controller' needs controller= (SkipControllers, or the path of a saved file)")
    if isinstance(controller, (str, Path)):
        return SkipControllers.load(controller, model)
    if not isinstance(controller, SkipControllers):
        raise ValueError(f"controller must be SkipControllers or a path to a saved file; got {type(controller).__name__}")
    controller.check_model(model)
    return controller


def _eos_tensor(model: nn.Module, eos_token_id: int | list[int] | None, device: torch.device) -> torch.Tensor:
    if eos_token_id is None:
        eos_token_id = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or [])
    return torch.tensor(ids, dtype=torch.long, device=device)


@torch.no_grad()
def generate(
    model: nn.Module,
    input_ids: torch.LongTensor,
    max_new_tokens: int,
    *,
    skip_pattern: str | Sequence[int] | torch.Tensor | None = None,
    budget: float | None = None,
    skip_mode: str = "static",
    controller: SkipControllers | str | Path | None = None,
    skipped_kv: str = "propagate",
    eos_token_id: int | list[int] | None = None,
    seed: int = 0,
    skip_prompt: bool = False,
) -> SkipOutput:
    """Greedy generation of up to ``max_new_tokens`` tokens after ``input_ids`` [1, prompt], skipping layers.

    ``skip_mode``: ``static`` (``skip_pattern`` "every-k" or kept layers, or ``budget``; neither: no skipping),
    ``random`` (``budget``: a random round(b * L) layers per token, from ``seed``), ``controller``
    (``controller``: :class:`SkipControllers` or its file; hard Gumbel-softmax decisions seeded by ``seed``),
    ``early-exit`` (``budget``: the first round(b * L) layers). ``skipped_kv``: ``propagate`` (skipped
    layers get K/V from the copied state) or ``none`` (they get none for that position). ``budget`` is a
    fraction of the layers in (0, 1]. Generation stops at ``eos_token_id`` (default: the model's; ``[]``:
    never). See the module docstring for ``skip_prompt``.
    """
    if skip_mode not in SKIP_MODES:
        raise ValueError(f"unknown skip_mode {skip_mode!r}; allowed: {', '.join(SKIP_MODES)}")
    if skipped_kv not in SKIPPED_KV:
        raise ValueError(f"unknown skipped_kv {skipped_kv!r}; allowed: {', '.join(SKIPPED_KV)}")
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[1] < 1:
        shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"input_ids must be a LongTensor [1, prompt_len >= 1]; got {shape}")
    if input_ids.shape[0] != 1:
        raise ValueError(
            f"layer skipping decodes one sequence at a time (batch 1: each token runs its own layers); got batch "
            f"{input_ids.shape[0]}: call generate once per prompt"
        )
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer; got {max_new_tokens!r}")
    adapter = get_adapter(model)
    if adapter.family == "t5":
        raise ValueError("layer skipping decodes decoder-only models (llama family, opt, gpt2); got a T5 "
                         "encoder-decoder")
    n_layers = adapter.num_layers
    controllers = None
    fixed_layers: list[int] | None = None  # the layers every new token runs (static, early exit)
    if skip_mode == "static":
        fixed_layers = static_layers(n_layers, skip_pattern, budget)
    elif skip_mode == "early-exit":
        if skip_pattern is not None or budget is None:
            raise ValueError("skip_mode='early-exit' takes budget= (fraction of layers run from the bottom), "
                             f"not skip_pattern; got skip_pattern={skip_pattern!r}, budget={budget!r}")
        fixed_layers = early_exit_layers(n_layers, budget)
    elif skip_mode == "random":
        if skip_pattern is not None or budget is None:
            raise ValueError("skip_mode='random' takes budget= (fraction of layers each token runs), not "
                             f"skip_pattern; got skip_pattern={skip_pattern!r}, budget={budget!r}")
        n_random = budget_layer_count(n_layers, budget)
    else:
        if skip_pattern is not None or budget is not None:
            raise ValueError("skip_mode='controller' takes neither skip_pattern nor budget (the controllers' training "
                             f"sets their budget); got skip_pattern={skip_pattern!r}, budget={budget!r}")
        controllers = _check_controller(controller, model)
    if skip_prompt and fixed_layers is None:
        raise ValueError(f"skip_prompt=True needs the same layers for every token (static or early-exit); "
                         f"skip_mode={skip_mode!r} decides per token: leave skip_prompt=False")

    device = input_ids.device
    eos = _eos_tensor(model, eos_token_id, device)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    propagate = skipped_kv == "propagate" and fixed_layers is None  # fixed patterns never run a skipped layer again

    cache = adapter.new_cache()
    prompt_len = input_ids.shape[1]
    prompt_layers = fixed_layers if skip_prompt else list(range(n_layers))
    positions = torch.arange(prompt_len, device=device).unsqueeze(0)
    hidden = adapter.embed(input_ids, position_ids=positions, cache=cache)
    context = adapter.context(hidden, position_ids=positions, cache=cache)
    for i in prompt_layers:
        hidden = adapter.run_layer(i, hidden, context)
    next_token = adapter.logits(hidden[:, -1:]).argmax(-1)  # [1, 1]
    new_tokens, layers_run = [next_token], [tuple(prompt_layers)]

    for step in range(1, max_new_tokens):
        if bool(torch.isin(next_token, eos).any()):
            break
        position = torch.tensor([[prompt_len + step - 1]], device=device)
        hidden = adapter.embed(next_token, position_ids=position, cache=cache)
        context = adapter.context(hidden, position_ids=position, cache=cache)
        if fixed_layers is not None:
            planned = fixed_layers
        elif controllers is None:  # random route for this token
            planned = sorted(torch.randperm(n_layers, generator=generator)[:n_random].tolist())
        else:
            planned = None
        ran = []
        for i in range(n_layers):
            if planned is not None:
                run = i in planned
            else:
                run = bool(controllers.keep(i, hidden[:, -1], generator).item() > 0.5)
            if run:
                hidden = adapter.run_layer(i, hidden, context)
                ran.append(i)
            elif propagate:
                adapter.append_kv(i, hidden, context)
        next_token = adapter.logits(hidden[:, -1:]).argmax(-1)
        new_tokens.append(next_token)
        layers_run.append(tuple(ran))
    out = SkipOutput(
        sequences=torch.cat([input_ids, *new_tokens], dim=1),
        exit_layers=torch.tensor([[len(r) for r in layers_run]], device=device),
        confidences=[[] for _ in layers_run],
        layers_run=layers_run,
        num_layers=n_layers,
    )
    return out


# --------------------------------------------------------------------------------------------------
# Teacher-forced passes (training, analyses, test references)


def mixed_forward(
    model: nn.Module,
    input_ids: torch.LongTensor,
    keep: torch.Tensor | Callable[[int, torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """All positions of ``input_ids`` [b, s] in one causal pass where position t skips layer i when
    ``keep[i, b, t]`` is 0: the layer runs on every position, and a skipped position's output is replaced
    by its input. Returns the last states [b, s, d] (before the final norm).

    The skipped positions' K/V at layer i come from their input state, so this is decoding with
    ``skipped_kv="propagate"`` done in parallel (the paper's training pass). ``keep`` is a [L, b, s] tensor
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


def _prompt_cache(adapter: Any, input_ids: torch.LongTensor, prompt_len: int) -> Any:
    """The KV cache of ``input_ids[:, :prompt_len]`` run through every layer."""
    cache = adapter.new_cache()
    hidden = adapter.embed(input_ids[:, :prompt_len], cache=cache)
    context = adapter.context(hidden, cache=cache)
    for i in range(adapter.num_layers):
        hidden = adapter.run_layer(i, hidden, context)
    return cache


@torch.no_grad()
def continuation_states(
    model: nn.Module, input_ids: torch.LongTensor, prompt_len: int, layers: Sequence[int], prompt_cache: Any = None
) -> torch.Tensor:
    """States [b, s - prompt_len, d] (before the final norm) of the continuation ``input_ids[:, prompt_len:]``
    when the prompt runs at full depth and every continuation token runs only ``layers`` (0-based, in
    order): the teacher-forced counterpart of static skipping and early exit. ``prompt_cache`` (the
    prompt's cache, copied before use) saves recomputing the prompt for several patterns."""
    if not 1 <= prompt_len < input_ids.shape[1]:
        raise ValueError(f"prompt_len must be in 1..{input_ids.shape[1] - 1} for sequences of {input_ids.shape[1]} "
                         f"tokens; got {prompt_len}")
    adapter = get_adapter(model)
    if prompt_cache is None:
        cache = _prompt_cache(adapter, input_ids, prompt_len)
    else:
        cache = copy.deepcopy(prompt_cache)
    positions = torch.arange(prompt_len, input_ids.shape[1], device=input_ids.device)
    positions = positions.unsqueeze(0).expand(input_ids.shape[0], -1)
    hidden = adapter.embed(input_ids[:, prompt_len:], position_ids=positions, cache=cache)
    context = adapter.context(hidden, position_ids=positions, cache=cache)
    for i in layers:
        hidden = adapter.run_layer(i, hidden, context)
    return hidden


@torch.no_grad()
def hidden_similarity(
    model: nn.Module,
    token_ids: torch.LongTensor,
    prompt_len: int,
    layer_counts: Sequence[int],
    batch_size: int = 4,
    progress: bool = True,
) -> pd.DataFrame:
    """Cosine similarity of the last states to the full model's, under layer skipping (uniform pattern,
    first and last kept) and early exit (the first n layers) running the same number n of layers.

    ``token_ids`` [N, s]: the first ``prompt_len`` tokens of each window run at full depth, the rest with
    the pattern (teacher forcing). One row per (method, n): ``layers_run``, ``layer_fraction``,
    ``cosine`` (states before the final norm) and ``cosine_normed`` (after it: what the LM head reads),
    each the mean over every continuation token, and ``tokens``.
    """
    adapter = get_adapter(model)
    n_layers = adapter.num_layers
    counts = sorted({int(n) for n in layer_counts})
    if not counts or counts[0] < 1 or counts[-1] > n_layers:
        raise ValueError(f"layer_counts must be layer numbers in 1..{n_layers}; got {list(layer_counts)!r}")
    patterns = {("skipping", n): uniform_pattern(n_layers, n) for n in counts}
    patterns.update({("early exit", n): list(range(n)) for n in counts})
    sums = {key: torch.zeros(2, dtype=torch.float64) for key in patterns}
    total = 0
    device = next(model.parameters()).device
    for start in tqdm(range(0, token_ids.shape[0], batch_size), desc="hidden similarity", disable=not progress):
        batch = token_ids[start : start + batch_size].to(device)
        prompt_cache = _prompt_cache(adapter, batch, prompt_len)
        full = continuation_states(model, batch, prompt_len, range(n_layers), prompt_cache)
        full_normed = adapter.normed(full)
        for key, layers in patterns.items():
            states = continuation_states(model, batch, prompt_len, layers, prompt_cache)
            cos = nn.functional.cosine_similarity(states.float(), full.float(), dim=-1)
            cos_normed = nn.functional.cosine_similarity(adapter.normed(states).float(), full_normed.float(), dim=-1)
            sums[key] += torch.stack([cos.sum(), cos_normed.sum()]).double().cpu()
        total += full.shape[0] * full.shape[1]
    return pd.DataFrame(
        {"method": method, "layers_run": n, "layer_fraction": n / n_layers, "cosine": float(s[0] / total),
         "cosine_normed": float(s[1] / total), "tokens": total}
        for (method, n), s in sums.items()
    )


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


def train_controllers(
    model: nn.Module,
    examples: Sequence[tuple[torch.LongTensor, torch.Tensor]],
    *,
    with_fixed_input: bool = False,
    alpha: float = 0.5,
    steps: int = 60,
    lr: float = 0.05,
    tau: float = 1.0,
    init_keep_logit: float = 2.0,
    seed: int = 0,
    model_name: str | None = None,
    progress: bool = True,
) -> tuple[SkipControllers, pd.DataFrame]:
    """Train one :class:`SkipControllers` on a frozen ``model`` with the cost-aware loss
    CE + ``alpha`` * (mean fraction of executed layers).

    ``examples`` are (input_ids [1, n], label_mask [1, n]) pairs: label positions are the answer tokens.
    As in the paper's code, prompt positions always run every layer; answer positions (as inputs) skip
    where the controllers say so; CE is taken on predicting the answer tokens and the cost on the answer
    positions that predict one. Each step is one example (Adam, ``lr``), seeded by ``seed``. Every layer
    starts with keep probability sigmoid(``init_keep_logit``) (0.88 by default: start near the full model,
    since a pretrained model's loss is far from its optimum when half its layers are skipped at random). The model's
    weights and ``requires_grad`` flags are left as they were. Returns the controllers (in eval use:
    ``generate(..., skip_mode="controller", controller=...)``) and a per-step history.
    """
    if not examples:
        raise ValueError("train_controllers needs at least one (input_ids, label_mask) example")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha < 0:
        raise ValueError(f"alpha (weight of the layer cost) must be a number >= 0; got {alpha!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer; got {steps!r}")
    for k, (ids, mask) in enumerate(examples):
        if ids.dim() != 2 or ids.shape[0] != 1 or mask.shape != ids.shape or not bool(mask[:, 1:].any()):
            raise ValueError(f"example {k} must be (input_ids [1, n], label_mask [1, n]) with at least one label "
                             f"after the first position; got shapes {tuple(ids.shape)}, {tuple(mask.shape)}")
    adapter = get_adapter(model)
    device = next(model.parameters()).device
    meta = {"model": model_name or getattr(model.config, "_name_or_path", "") or model.config.model_type,
            "fingerprint": model_fingerprint(model), "alpha": alpha, "steps": steps, "lr": lr, "seed": seed,
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


# --------------------------------------------------------------------------------------------------
# Prompts, references and generation quality


def task_prompts(name: str, tokenizer: Any, n: int, split: str = "test", seed: int = 0) -> list[dict[str, Any]]:
    """``n`` prompts of task ``name`` with reference answers: ``arithmetic`` (chat question -> worked
    solution), ``humaneval`` (code prompt -> canonical solution) or ``alpaca`` (the paper's data, from the
    hub: instruction [+ input] -> output). Each item: ``input_ids`` [1, p], ``reference``, ``prompt``.
    The choice of items is seeded; the order of the data set is kept."""
    from effllm import data
    from effllm.models import chat_input_ids

    allowed = ("arithmetic", "humaneval", "alpaca")
    if name not in allowed:
        raise ValueError(f"unknown task {name!r} for layer-selection prompts; allowed: {', '.join(allowed)}")
    rows = data.load(name, "train" if name == "alpaca" else split)
    if n < 1:
        raise ValueError(f"n must be >= 1; got {n}")
    picked = sorted(torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))[:n].tolist())
    items = []
    for k in picked:
        row = rows[k]
        if name == "arithmetic":
            prompt, reference = row["question"], row["solution"]
            ids = chat_input_ids(tokenizer, prompt)
        elif name == "humaneval":
            prompt, reference = row["prompt"], row["canonical_solution"]
            ids = tokenizer(prompt, return_tensors="pt").input_ids
        else:
            prompt = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
            reference = row["output"]
            if getattr(tokenizer, "chat_template", None):
                ids = chat_input_ids(tokenizer, prompt)
            else:  # OPT-IML and other base tokenizers: the Alpaca prompt format
                ids = tokenizer(f"### Instruction:\n{prompt}\n\n### Response:\n", return_tensors="pt").input_ids
        items.append({"input_ids": ids, "reference": reference, "prompt": prompt})
    return items


def controller_examples(
    name: str, tokenizer: Any, n: int, split: str = "train", seed: int = 0, max_len: int = 256
) -> list[tuple[torch.LongTensor, torch.Tensor]]:
    """(input_ids [1, m], label_mask [1, m]) pairs for :func:`train_controllers`: prompt, then the reference
    answer and the end-of-sequence token as labels (cut to ``max_len`` tokens)."""
    examples = []
    for item in task_prompts(name, tokenizer, n, split=split, seed=seed):
        answer = tokenizer(item["reference"], add_special_tokens=False, return_tensors="pt").input_ids
        eos = torch.tensor([[tokenizer.eos_token_id]]) if tokenizer.eos_token_id is not None else answer[:, :0]
        ids = torch.cat([item["input_ids"], answer, eos], dim=1)[:, :max_len]
        mask = torch.zeros_like(ids, dtype=torch.bool)
        mask[:, item["input_ids"].shape[1] :] = True
        if mask[:, 1:].any():
            examples.append((ids, mask))
    return examples


def budget_settings(n_layers: int, budgets: Sequence[float], modes: Sequence[str] = ("static", "early-exit")
                    ) -> list[dict[str, Any]]:
    """One :func:`generate` setting per (mode, budget): dicts with ``label``, ``skip_mode``, ``budget`` and
    ``layers`` (the number of layers each decoded token runs). Budgets that round to the same number of
    layers on this depth give one setting."""
    settings = []
    for mode in modes:
        if mode not in ("static", "early-exit", "random"):
            raise ValueError(f"budget_settings takes the modes static, early-exit, random; got {mode!r}")
        seen = set()
        for b in budgets:
            n = budget_layer_count(n_layers, b)
            if n not in seen:
                seen.add(n)
                settings.append({"label": f"{mode} {n}/{n_layers}", "skip_mode": mode, "budget": float(b),
                                 "layers": n})
    return settings


def skipping_bench_settings(n_layers: int) -> list[dict[str, Any]]:
    """Rows for the early-exit benchmark: static skipping at each of the paper's budgets below full depth
    (4, 8, 12 of 24 layers as fractions of ``n_layers``), as a "label" plus generate() parameters."""
    return [
        {"label": f"skip@{budget_layer_count(n_layers, b)}/{n_layers}", "method": "skip", "skip_mode": "static",
         "budget": b}
        for b in PAPER_BUDGETS[:-1]
    ]


def run_generations(
    model: nn.Module,
    tokenizer: Any,
    items: Sequence[dict[str, Any]],
    settings: Sequence[dict[str, Any]],
    max_new_tokens: int,
    eos_token_id: int | list[int] | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """Decode every item of :func:`task_prompts` with every setting (dicts of :func:`generate` parameters
    plus a ``label``; other keys are carried into the table). One row per (setting, item): ``item``,
    the setting's keys, ``text``, ``new_tokens``, ``layer_fraction`` (mean over decoded tokens after the
    first, which always comes from the full-depth prompt pass), ``seconds``."""
    n_layers = get_adapter(model).num_layers
    accepted = {"skip_pattern", "budget", "skip_mode", "controller", "skipped_kv", "seed", "skip_prompt"}
    rows = []
    jobs = [(s, k) for s in settings for k in range(len(items))]
    for setting, k in tqdm(jobs, desc="generate", disable=not progress):
        params = {key: value for key, value in setting.items() if key in accepted}
        ids = items[k]["input_ids"].to(next(model.parameters()).device)
        start = time.perf_counter()
        out = generate(model, ids, max_new_tokens, eos_token_id=eos_token_id, **params)
        seconds = time.perf_counter() - start
        new = out.sequences[0, ids.shape[1] :]
        decoded = out.exit_layers[0, 1:].double()
        rows.append({
            "item": k, **{key: value for key, value in setting.items() if key != "controller"},
            "text": tokenizer.decode(new, skip_special_tokens=True), "new_tokens": int(new.numel()),
            "layer_fraction": float(decoded.mean()) / n_layers if decoded.numel() else float("nan"),
            "seconds": seconds,
        })
    return pd.DataFrame(rows)


def score_generations(generations: pd.DataFrame, items: Sequence[dict[str, Any]], full_label: str) -> pd.DataFrame:
    """Add per-row ROUGE-L F against the item's reference (``rougeL_reference``) and against the output of
    the setting labelled ``full_label`` on the same item (``rougeL_full``)."""
    from effllm.metrics import rouge_l

    full = generations[generations.label == full_label].set_index("item").text
    if full.empty:
        raise ValueError(f"no generations labelled {full_label!r}; labels: {sorted(generations.label.unique())}")
    scored = generations.copy()
    scored["rougeL_reference"] = [rouge_l([t], [items[k]["reference"]]) for t, k in zip(scored.text, scored.item,
                                                                                       strict=True)]
    scored["rougeL_full"] = [rouge_l([t], [full[k]]) for t, k in zip(scored.text, scored.item, strict=True)]
    return scored


# --------------------------------------------------------------------------------------------------
# The per-sequence oracle: multiple-choice knapsack over the budget models


@dataclass
class OracleSolution:
    choice: np.ndarray  # [n_sequences]: index of the chosen budget model for each sequence
    total_quality: float
    total_cost: int


def _check_oracle_inputs(quality: Any, costs: Any) -> tuple[np.ndarray, np.ndarray]:
    quality = np.asarray(quality, dtype=np.float64)
    costs = np.asarray(costs)
    if quality.ndim != 2 or quality.shape[0] < 1 or quality.shape[1] < 1:
        raise ValueError(f"quality must be [n_sequences, n_models] with both >= 1; got shape {quality.shape}")
    if costs.shape != (quality.shape[1],):
        raise ValueError(f"costs must hold one cost per model ({quality.shape[1]}); got shape {costs.shape}")
    if not np.issubdtype(costs.dtype, np.integer) or (costs < 0).any():
        raise ValueError(f"costs must be integers >= 0 (layer counts); got {costs.tolist()!r}")
    if not np.isfinite(quality).all():
        raise ValueError("quality holds NaN or infinite values")
    return quality, costs.astype(np.int64)


def _knapsack_table(quality: np.ndarray, costs: np.ndarray, capacity: int) -> tuple[np.ndarray, np.ndarray]:
    """best[t, c]: the most quality of sequences < t at total cost exactly c (-inf: unreachable); pick[t, c]
    the model chosen for sequence t - 1 on that optimum."""
    n, m = quality.shape
    best = np.full((n + 1, capacity + 1), -np.inf)
    pick = np.zeros((n + 1, capacity + 1), dtype=np.int64)
    best[0, 0] = 0.0
    for t in range(n):
        for j in range(m):
            c = costs[j]
            if c > capacity:
                continue
            candidate = best[t, : capacity + 1 - c] + quality[t, j]
            better = candidate > best[t + 1, c:]
            best[t + 1, c:][better] = candidate[better]
            pick[t + 1, c:][better] = j
    return best, pick


def oracle_knapsack(quality: Any, costs: Any, capacity: int) -> OracleSolution:
    """Choose one model per sequence to maximise the total ``quality`` [n, m] with the total of ``costs``
    [m] (integer layer counts) at most ``capacity`` (n times the average layer budget, rounded down).

    Solved exactly by dynamic programming over the integer total cost (O(n * m * capacity)); an exact
    multiple-choice knapsack because the costs are integer layer counts. Raises when no choice fits.
    """
    quality, costs = _check_oracle_inputs(quality, costs)
    capacity = int(capacity)
    if capacity < quality.shape[0] * int(costs.min()):
        raise ValueError(f"capacity {capacity} is below the cheapest choice ({quality.shape[0]} sequences x "
                         f"{int(costs.min())} layers)")
    best, pick = _knapsack_table(quality, costs, capacity)
    total_cost = int(np.argmax(best[-1]))  # first maximum: the cheapest total cost reaching it
    choice = np.zeros(quality.shape[0], dtype=np.int64)
    c = total_cost
    for t in range(quality.shape[0], 0, -1):
        choice[t - 1] = pick[t, c]
        c -= costs[choice[t - 1]]
    return OracleSolution(choice, float(quality[np.arange(len(choice)), choice].sum()), total_cost)


def oracle_frontier(quality: Any, costs: Any, n_layers: int) -> pd.DataFrame:
    """The oracle's best mean quality at every achievable average layer budget: one row per total cost
    from the cheapest to the dearest choice: ``avg_layers``, ``layer_fraction`` (of ``n_layers``),
    ``mean_quality`` (the best mean over sequences whose total cost is at most that)."""
    quality, costs = _check_oracle_inputs(quality, costs)
    n = quality.shape[0]
    capacity = n * int(costs.max())
    best, _ = _knapsack_table(quality, costs, capacity)
    reachable = np.maximum.accumulate(best[-1])
    start = n * int(costs.min())
    totals = np.arange(start, capacity + 1)
    return pd.DataFrame({"total_cost": totals, "avg_layers": totals / n, "layer_fraction": totals / n / n_layers,
                         "mean_quality": reachable[start:] / n})


def oracle_fraction_to_match(quality: Any, costs: Any, target: float, n_layers: int) -> float:
    """The smallest average fraction of layers at which the oracle's mean quality reaches ``target`` (for
    example the full model's mean quality); NaN when no choice reaches it."""
    frontier = oracle_frontier(quality, costs, n_layers)
    reached = frontier[frontier.mean_quality >= target - 1e-12]
    return float(reached.layer_fraction.iloc[0]) if len(reached) else float("nan")

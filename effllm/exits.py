"""Greedy decoding with a KV cache that can stop each token at any layer: full depth, static exit, CALM
and FREE (shallow-deep decoding with synchronized parallel decoding).

    out = generate(model, input_ids, max_new_tokens=64, method="calm",
                   exit_conf_type="softmax", exit_conf_threshold=0.9, exit_min_layer=20)
    out.sequences      # [batch, prompt + new] as HF `generate` returns them
    out.exit_layers    # [batch, new]: the 1-based layer each new token left from (L = full depth)

Parameter names follow the CALM / FREE code (seed 001). The prompt is always run at full depth (it is
the "encoder side" of a decoder-only model), so the first new token leaves from layer L. With a
threshold above 1, which no confidence reaches, CALM never exits and reproduces HF ``generate``.

Skipped layers still need K/V for later tokens. ``state_propagation=True`` (CALM) copies the exit state
upward and computes only the skipped layers' K/V projections from it (:meth:`append_kv` of the
adapter). The decoding loop is written here rather than as a ``generate`` logits processor because
it changes which layers run per token, which HF's generation loop has no hook for.

FREE (Bae et al. 2023) on a decoder-only model: every token runs layers 1..``shallow_exit_layer``; a
confident token is emitted from there and its shallow state is stacked; the next token that is not
confident runs the deep layers on the stacked states and its own in one causal pass
(:func:`deep_pass`), which gives the stacked tokens exact deep K/V, and is emitted from layer L.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from effllm.adapters import get_adapter

METHODS = ("full", "static", "calm", "free")
CONFIDENCE_TYPES = ("softmax", "state")


@dataclass
class ExitOutput:
    sequences: torch.LongTensor  # [batch, prompt + new]
    exit_layers: torch.LongTensor  # [batch, new], 1-based
    confidences: list[list[float]] = field(default_factory=list)  # per new token: confidence at each checked layer

    @property
    def avg_layers(self) -> float:
        return float(self.exit_layers.double().mean())


def _check_threshold(name: str, value: float) -> float:
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or value < 0:
        raise ValueError(
            f"{name} must be a number >= 0 (a value above 1 disables exiting); got {value!r}"
        )
    return float(value)


def _check_layer(name: str, value: int, n_layers: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= n_layers:
        raise ValueError(f"{name} must be a layer between 1 and {n_layers} (1-based); got {value!r}")
    return value


def softmax_confidence(logits: torch.Tensor) -> torch.Tensor:
    """CALM's softmax response: p1 - p2, the gap between the two largest probabilities ([..., V] -> [...])."""
    top2 = torch.softmax(logits.float(), dim=-1).topk(2, dim=-1).values
    return top2[..., 0] - top2[..., 1]


def state_confidence(previous: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
    """CALM's hidden-state saturation: cos(h_{l-1}, h_l)."""
    return torch.nn.functional.cosine_similarity(previous.float(), current.float(), dim=-1)


def decayed_threshold(threshold: float, t: int, max_new_tokens: int) -> float:
    """CALM's decaying threshold: lambda_t = lambda * (0.9 + 0.1 * exp(-4 t / N))."""
    return threshold * (0.9 + 0.1 * math.exp(-4.0 * t / max_new_tokens))


@torch.no_grad()
def deep_pass(
    adapter, hidden: torch.Tensor, position_ids: torch.LongTensor, cache, layers: range
) -> torch.Tensor:
    """Run ``layers`` on ``hidden`` [batch, k, d] at ``position_ids`` [batch, k] in one causal pass,
    appending the k tokens' K/V to each layer's cache (FREE's synchronized parallel decoding)."""
    context = adapter.context(hidden, position_ids=position_ids, cache=cache)
    for i in layers:
        hidden = adapter.run_layer(i, hidden, context)
    return hidden


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    input_ids: torch.LongTensor,
    max_new_tokens: int,
    method: str = "full",
    eos_token_id: int | list[int] | None = None,
    static_exit_layer: int | None = None,
    exit_conf_type: str = "softmax",
    exit_conf_threshold: float = 0.9,
    exit_min_layer: int = 1,
    exit_position_temp: float | None = None,
    state_propagation: bool = True,
    shallow_exit_layer: int | None = None,
    shallow2deep_conf_type: str = "softmax",
    shallow2deep_conf_threshold: float = 0.9,
    exit_transform: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
) -> ExitOutput:
    """Greedy generation of up to ``max_new_tokens`` tokens after ``input_ids`` [batch, prompt].

    ``method``: ``full`` (every layer; batch of equal-length prompts allowed), ``static`` (every new token
    uses layers 1..``static_exit_layer``), ``calm`` (batch 1: after each layer >= ``exit_min_layer``
    compute the ``exit_conf_type`` confidence and exit once it reaches ``exit_conf_threshold``;
    ``exit_position_temp`` set -> CALM's decaying threshold over the ``max_new_tokens`` positions),
    ``free`` (batch 1: shallow exit at ``shallow_exit_layer`` when the ``shallow2deep_conf_type`` confidence
    exceeds ``shallow2deep_conf_threshold``, deep layers synchronized in parallel on the next deep token).
    ``exit_transform(layer, h)`` maps an intermediate state before the final norm and LM head (a fitted
    exit); ``None`` is the logit lens. Generation stops early at ``eos_token_id`` (default: the model's).
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; allowed: {', '.join(METHODS)}")
    if exit_conf_type not in CONFIDENCE_TYPES:
        raise ValueError(f"unknown exit_conf_type {exit_conf_type!r}; allowed: {', '.join(CONFIDENCE_TYPES)}")
    if input_ids.dim() != 2 or input_ids.shape[1] < 1:
        raise ValueError(f"input_ids must be [batch, prompt_len >= 1]; got shape {tuple(input_ids.shape)}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer; got {max_new_tokens!r}")
    adapter = get_adapter(model)
    n_layers = adapter.num_layers
    threshold = _check_threshold("exit_conf_threshold", exit_conf_threshold)
    exit_min_layer = _check_layer("exit_min_layer", exit_min_layer, n_layers)
    if method == "static":
        if static_exit_layer is None:
            raise ValueError(f"method='static' needs static_exit_layer (1..{n_layers})")
        depth = _check_layer("static_exit_layer", static_exit_layer, n_layers)
    else:
        depth = n_layers
    if method in ("calm", "free") and input_ids.shape[0] != 1:
        raise ValueError(
            f"method={method!r} decodes one sequence at a time (batch 1, as in CALM and FREE); got batch "
            f"{input_ids.shape[0]}: call generate once per prompt"
        )
    if method == "free":
        if shallow_exit_layer is None:
            raise ValueError(f"method='free' needs shallow_exit_layer (1..{n_layers - 1})")
        shallow = _check_layer("shallow_exit_layer", shallow_exit_layer, n_layers - 1)
        tau = _check_threshold("shallow2deep_conf_threshold", shallow2deep_conf_threshold)
        if shallow2deep_conf_type != "softmax":
            raise ValueError(f"unknown shallow2deep_conf_type {shallow2deep_conf_type!r}; allowed: softmax")
    if eos_token_id is None:
        eos_token_id = getattr(model.generation_config, "eos_token_id", None)
    eos = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []),
                       device=input_ids.device)

    def head(layer: int, hidden: torch.Tensor) -> torch.Tensor:
        if exit_transform is not None and layer < n_layers:
            hidden = exit_transform(layer, hidden)
        return adapter.logits(hidden)

    cache = adapter.new_cache()
    # Prompt at the depth every token uses: all layers, or the static model's first `depth` layers.
    hidden = adapter.embed(input_ids, cache=cache)
    context = adapter.context(hidden, cache=cache)
    for i in range(depth):
        hidden = adapter.run_layer(i, hidden, context)
    next_token = head(depth, hidden[:, -1:]).argmax(-1)  # [batch, 1]

    new_tokens, exit_layers, confidences = [next_token], [torch.full_like(next_token, depth)], [[]]
    finished = torch.isin(next_token, eos)
    if method == "free":
        return _generate_free(adapter, input_ids, cache, next_token, exit_layers, max_new_tokens, eos,
                              shallow, tau, head)
    for t in range(1, max_new_tokens):
        if bool(finished.all()):
            break
        hidden = adapter.embed(next_token, cache=cache)
        context = adapter.context(hidden, cache=cache)
        step_threshold = threshold if exit_position_temp is None else decayed_threshold(threshold, t, max_new_tokens)
        exit_layer, logits, checked = depth, None, []
        for i in range(depth):
            previous = hidden
            hidden = adapter.run_layer(i, hidden, context)
            layer = i + 1
            if method != "calm" or layer < exit_min_layer or layer == n_layers:
                continue
            if exit_conf_type == "softmax":
                logits = head(layer, hidden)
                confidence = float(softmax_confidence(logits)[0, -1])
            else:
                confidence = float(state_confidence(previous, hidden)[0, -1])
            checked.append(confidence)
            if confidence >= step_threshold:
                exit_layer = layer
                if state_propagation:
                    for j in range(layer, n_layers):
                        adapter.append_kv(j, hidden, context)
                break
            logits = None
        if logits is None or exit_layer == n_layers:
            logits = head(exit_layer, hidden)
        next_token = logits[:, -1:].argmax(-1)
        # Finished sequences keep emitting EOS (HF pads them with pad = eos for greedy search likewise).
        next_token = torch.where(finished, eos[:1].expand_as(next_token) if eos.numel() else next_token, next_token)
        new_tokens.append(next_token)
        exit_layers.append(torch.full_like(next_token, exit_layer))
        confidences.append(checked)
        finished |= torch.isin(next_token, eos)
    return ExitOutput(
        sequences=torch.cat([input_ids, *new_tokens], dim=1),
        exit_layers=torch.cat(exit_layers, dim=1),
        confidences=confidences,
    )


def _generate_free(adapter, input_ids, cache, first_token, exit_layers, max_new_tokens, eos, shallow, tau, head):
    """FREE's loop after the full-depth prompt (batch 1). See PAPERS.md section A."""
    n_layers = adapter.num_layers
    tokens, confidences = [first_token], [[]]
    stack: list[torch.Tensor] = []  # shallow states [1, 1, d] of tokens whose deep layers have not run
    stack_positions: list[int] = []
    next_token = first_token
    position = input_ids.shape[1]  # position of the token being fed
    for _ in range(1, max_new_tokens):
        if bool(torch.isin(next_token, eos).any()):
            break
        hidden = adapter.embed(next_token, cache=cache)
        context = adapter.context(hidden, cache=cache)
        for i in range(shallow):
            hidden = adapter.run_layer(i, hidden, context)
        shallow_logits = head(shallow, hidden)
        confidence = float(softmax_confidence(shallow_logits)[0, -1])
        if confidence > tau:
            stack.append(hidden)
            stack_positions.append(position)
            next_token, exit_layer = shallow_logits[:, -1:].argmax(-1), shallow
        else:
            states = torch.cat([*stack, hidden], dim=1)
            positions = torch.tensor([[*stack_positions, position]], device=hidden.device)
            deep = deep_pass(adapter, states, positions, cache, range(shallow, n_layers))
            stack.clear()
            stack_positions.clear()
            next_token, exit_layer = head(n_layers, deep[:, -1:]).argmax(-1), n_layers
        tokens.append(next_token)
        exit_layers.append(torch.full_like(next_token, exit_layer))
        confidences.append([confidence])
        position += 1
    return ExitOutput(
        sequences=torch.cat([input_ids, *tokens], dim=1),
        exit_layers=torch.cat(exit_layers, dim=1),
        confidences=confidences,
    )

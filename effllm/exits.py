"""Greedy decoding with a KV cache that can stop each token at any layer: full depth, static exit, CALM,
FREE (shallow-deep decoding with synchronized parallel decoding), and layer skipping.

    out = generate(model, input_ids, max_new_tokens=64, method="calm",
                   exit_conf_type="softmax", exit_conf_threshold=0.9, exit_min_layer=20)
    out.sequences      # [batch, prompt + new] as HF `generate` returns them
    out.exit_layers    # [batch, new]: the 1-based layer each new token left from (L = full depth)

Parameter names follow the CALM / FREE code (seed 001) and the vocabulary-pruning code (seed 000).
The prompt is always run at full depth (it is the "encoder side" of a decoder-only model), so the first
new token leaves from layer L. With a threshold above 1, which no confidence reaches, CALM and FREE never
exit and reproduce HF ``generate``. On T5 (the papers' own setting) ``input_ids`` is the encoder input
and ``sequences`` starts with the decoder start token, as HF returns it.

The skipped layers of an exited token still owe K/V to later tokens. Two ways to pay, as in the papers:

- ``state_propagation=True`` (CALM): copy the exit state upward and compute only the skipped layers'
  K/V projections from it (:meth:`append_kv` of the architecture adapter).
- ``state_propagation=False`` (CALM) and FREE: keep the exit state *pending*; the next token that runs a
  layer the pending tokens skipped runs it on the pending states and its own in one causal pass
  (:func:`deep_pass`), which gives them the exact K/V the full model would have. FREE's synchronized
  parallel decoding is this with a single exit layer ``shallow_exit_layer``.

The decoding loop is written here rather than as a ``generate`` logits processor because it changes
which layers run per token, which HF's generation loop has no hook for.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from effllm.adapters import get_adapter

METHODS = ("full", "static", "calm", "free", "skip")
CONFIDENCE_TYPES = ("softmax", "state", "meta")
VOCAB_REDUCTIONS = ("none", "fixed", "decaying", "adaptive")


@dataclass
class ExitOutput:
    sequences: torch.LongTensor  # [batch, prompt + new]
    exit_layers: torch.LongTensor  # [batch, new], 1-based
    confidences: list[list[float]] = field(default_factory=list)  # per new token: confidence at each checked layer
    thresholds: list[float] = field(default_factory=list)  # per new token: the threshold in force (nan: none)
    confidence_flops: list[int] = field(default_factory=list)  # per new token: FLOPs spent on exit decisions
    confidence_seconds: list[float] = field(default_factory=list)  # per new token: time spent on them
    rollbacks: int = 0  # FREE: tokens revised by the deep model after a synchronized pass
    layers_run: list[list[int]] | None = None  # layer skipping: the 0-based layers each new token ran

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


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"unknown {name} {value!r}; allowed: {', '.join(allowed)}")
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


def decaying_k(k: int, k_min: int, layer: int, n_layers: int) -> int:
    """Vincenti et al.'s decaying vocabulary size: k_l = max(k_min, floor(k / (1 + (k - k_min)/k_min * l/L)))."""
    return max(k_min, math.floor(k / (1 + (k - k_min) / k_min * layer / n_layers)))


def adaptive_k(vocab_size: int, confidence: float, k_min: int) -> int:
    """Vincenti et al.'s adaptive vocabulary size: k = V (1 - 0.9 c) of the previous layer's confidence."""
    return max(k_min, math.ceil(vocab_size * (1.0 - 0.9 * confidence)))


def head_flops(hidden_size: int, rows: int) -> int:
    """FLOPs of one LM-head product over ``rows`` vocabulary entries: (2d - 1) per row (Vincenti et al.)."""
    return (2 * hidden_size - 1) * rows


class ExitHead:
    """Logits and confidence at an exit: fitted exit map, final norm, LM head on the full or a pruned
    vocabulary, and the FLOPs and time every exit decision costs.

    Vocabulary pruning (Vincenti et al. 2024): at the first checked layer ``prune_layer`` the full head
    gives z and the candidate ids I = top-k(z); later layers compute logits for I only (``fixed`` k;
    ``decaying`` k_l; ``adaptive`` k = V (1 - 0.9 c_{l-1})), each time keeping the current layer's best
    k_{l+1} of I, and an exit emits I[argmax]. The final layer always uses the full vocabulary.
    """

    def __init__(
        self,
        adapter,
        exit_transform: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
        conf_type: str = "softmax",
        meta_classifier: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
        type_vocab_reduct: str = "none",
        k: int = 256,
        k_min: int | None = None,
        prune_layer: int = 1,
    ):
        self.adapter = adapter
        self.n_layers = adapter.num_layers
        self.vocab_size = adapter.vocab_size
        self.hidden_size = adapter.hidden_size
        self.exit_transform = exit_transform
        self.conf_type = _check_choice("exit_conf_type", conf_type, CONFIDENCE_TYPES)
        if conf_type == "meta" and meta_classifier is None:
            raise ValueError("exit_conf_type='meta' needs meta_classifier= (see effllm.lens.fit_meta_classifier)")
        self.meta_classifier = meta_classifier
        self.reduct = _check_choice("type_vocab_reduct", type_vocab_reduct, VOCAB_REDUCTIONS)
        if self.reduct != "none":
            if conf_type != "softmax":
                raise ValueError(f"vocabulary pruning needs exit_conf_type='softmax'; got {conf_type!r}")
            if isinstance(k, bool) or not isinstance(k, int) or not 2 <= k <= self.vocab_size:
                raise ValueError(f"k must be an integer in [2, {self.vocab_size}] (the vocabulary size); got {k!r}")
            k_min = max(2, k // 16) if k_min is None else k_min
            if isinstance(k_min, bool) or not isinstance(k_min, int) or not 2 <= k_min <= k:
                raise ValueError(f"k_min must be an integer in [2, k={k}]; got {k_min!r}")
        self.k, self.k_min, self.prune_layer = k, k_min, prune_layer
        self.new_token()

    def new_token(self) -> None:
        self.rows: torch.LongTensor | None = None  # candidate ids for the next check (None: full vocabulary)
        self.flops = 0
        self.seconds = 0.0

    def logits(self, layer: int, hidden: torch.Tensor, rows: torch.LongTensor | None = None) -> torch.Tensor:
        if self.exit_transform is not None and layer < self.n_layers:
            hidden = self.exit_transform(layer, hidden)
        return self.adapter.logits(hidden, rows)

    def final(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary greedy token [batch, 1] from the last position of ``hidden``."""
        return self.logits(layer, hidden[:, -1:]).argmax(-1)

    def confidence(self, layer: int, hidden: torch.Tensor, previous: torch.Tensor) -> tuple[float, torch.Tensor | None]:
        """The exit confidence at ``layer`` (batch 1, last position) and, for softmax, the token [1, 1] the
        exit would emit (a full-vocabulary id); None where the token needs the full head on exit."""
        start = time.perf_counter()
        token = None
        if self.conf_type == "softmax":
            rows = self.rows
            logits = self.logits(layer, hidden[:, -1:], rows)[0, -1]  # [V] or [k_l]
            confidence = float(softmax_confidence(logits))
            local = logits.argmax()
            token = (local if rows is None else rows[local]).view(1, 1)
            self.flops += head_flops(self.hidden_size, logits.shape[-1])
            if self.reduct != "none" and layer >= self.prune_layer:
                self.rows = self._next_rows(layer, logits, rows, confidence)
        elif self.conf_type == "state":
            confidence = float(state_confidence(previous[:, -1], hidden[:, -1])[0])
            self.flops += 6 * self.hidden_size  # two norms and a dot product
        else:
            confidence = float(self.meta_classifier(layer, hidden[:, -1:]).reshape(-1)[-1])
            self.flops += 2 * self.hidden_size
        self.seconds += time.perf_counter() - start
        return confidence, token

    def _next_rows(self, layer: int, logits: torch.Tensor, rows: torch.LongTensor | None, confidence: float):
        ids = torch.arange(logits.shape[-1], device=logits.device) if rows is None else rows
        if self.reduct == "fixed":
            size = self.k
        elif self.reduct == "decaying":
            size = decaying_k(self.k, self.k_min, layer + 1, self.n_layers)
        else:
            size = adaptive_k(self.vocab_size, confidence, self.k_min)
        size = min(size, ids.shape[0])
        if rows is not None and size == ids.shape[0]:
            return rows
        return ids[logits.topk(size).indices]


class AdaptiveThreshold:
    """FREE's adaptive threshold estimator: a two-component Beta mixture over shallow confidences.

    At every synchronization the decoder records (c, 1[shallow argmax == deep argmax]) for the token the
    deep model decided; the two classes' Beta parameters are fitted by moments
    (alpha = m (m (1 - m) / s^2 - 1), beta = alpha (1 - m) / m), and the threshold becomes the smallest
    grid point in [0.3, 0.9] whose posterior probability of "agree" exceeds ``zeta``. Updates stop after
    ``max_sequences`` sequences (the first ~300 in FREE). One object persists across ``generate`` calls.
    """

    def __init__(self, initial: float = 0.9, zeta: float = 0.4, max_sequences: int = 300,
                 grid: tuple[float, float, float] = (0.3, 0.9, 0.01), min_per_class: int = 3):
        self.threshold = _check_threshold("shallow2deep_conf_threshold", initial)
        if not 0 < zeta < 1:
            raise ValueError(f"zeta must lie in (0, 1); got {zeta!r}")
        self.zeta, self.max_sequences, self.min_per_class = zeta, max_sequences, min_per_class
        low, high, step = grid
        self.grid = [low + step * i for i in range(int(round((high - low) / step)) + 1)]
        self.samples: list[tuple[float, bool]] = []
        self.sequences = 0
        self.history: list[tuple[int, int, float]] = []  # (sequence, samples so far, threshold) after each fit

    @property
    def frozen(self) -> bool:
        return self.sequences > self.max_sequences

    def start_sequence(self) -> None:
        self.sequences += 1

    def record(self, confidence: float, agree: bool) -> None:
        if self.frozen:
            return
        self.samples.append((float(confidence), bool(agree)))
        fitted = self.fit()
        if fitted is not None:
            self.threshold = fitted
        self.history.append((self.sequences, len(self.samples), self.threshold))

    @staticmethod
    def beta_moments(values: list[float]) -> tuple[float, float]:
        eps = 1e-4
        x = [min(max(v, eps), 1 - eps) for v in values]
        m = sum(x) / len(x)
        var = sum((v - m) ** 2 for v in x) / max(len(x) - 1, 1)
        var = max(var, 1e-6)
        common = m * (1 - m) / var - 1
        if common <= 0:  # variance too large for a Beta: fall back to the flattest Beta with this mean
            common = 1e-3
        alpha = m * common
        return alpha, alpha * (1 - m) / m

    @staticmethod
    def beta_log_pdf(x: float, alpha: float, beta: float) -> float:
        x = min(max(x, 1e-6), 1 - 1e-6)
        return ((alpha - 1) * math.log(x) + (beta - 1) * math.log1p(-x)
                + math.lgamma(alpha + beta) - math.lgamma(alpha) - math.lgamma(beta))

    def posterior_agree(self, confidence: float) -> float | None:
        agree = [c for c, a in self.samples if a]
        disagree = [c for c, a in self.samples if not a]
        if len(agree) < self.min_per_class or len(disagree) < self.min_per_class:
            return None
        prior = len(agree) / len(self.samples)
        la = math.log(prior) + self.beta_log_pdf(confidence, *self.beta_moments(agree))
        ld = math.log(1 - prior) + self.beta_log_pdf(confidence, *self.beta_moments(disagree))
        return 1.0 / (1.0 + math.exp(min(ld - la, 700.0)))

    def fit(self) -> float | None:
        """The threshold the current samples give, or None while a class has too few samples."""
        if self.posterior_agree(0.5) is None:
            return None
        for tau in self.grid:
            if self.posterior_agree(tau) > self.zeta:
                return tau
        return self.grid[-1]


@torch.no_grad()
def deep_pass(
    adapter, hidden: torch.Tensor, position_ids: torch.LongTensor, cache, layers: range, **extras
) -> torch.Tensor:
    """Run ``layers`` on ``hidden`` [batch, k, d] at ``position_ids`` [batch, k] in one causal pass,
    appending the k tokens' K/V to each layer's cache (FREE's synchronized parallel decoding)."""
    context = adapter.context(hidden, position_ids=position_ids, cache=cache, **extras)
    for i in layers:
        hidden = adapter.run_layer(i, hidden, context)
    return hidden


def _crop(cache, length: int) -> None:
    """Drop every cached position >= ``length`` in every layer (FREE's rollback)."""
    self_cache = getattr(cache, "self_attention_cache", cache)
    surplus = int(self_cache.get_seq_length()) - length  # every layer holds the same length after a sync
    if surplus > 0:
        self_cache.crop(-surplus)  # transformers 5: a negative count removes that many positions


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
    *,
    meta_classifier: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
    use_adapt_threshold: bool = False,
    adapt_threshold: AdaptiveThreshold | None = None,
    rollback_threshold: float | None = None,
    type_vocab_reduct: str = "none",
    k: int = 256,
    k_min: int | None = None,
    attention_mask: torch.Tensor | None = None,
    **skip_params,
) -> ExitOutput:
    """Greedy generation of up to ``max_new_tokens`` tokens after ``input_ids`` [batch, prompt].

    ``method``:

    - ``full``: every layer (a batch of equal-length prompts is allowed).
    - ``static``: every new token uses layers 1..``static_exit_layer``.
    - ``calm`` (batch 1): after each layer >= ``exit_min_layer`` compute the ``exit_conf_type`` confidence
      (``softmax`` p1 - p2, ``state`` cos(h_{l-1}, h_l), ``meta`` a fitted classifier passed as
      ``meta_classifier(layer, h) -> probability``) and exit once it reaches ``exit_conf_threshold``
      (``exit_position_temp`` set: CALM's decaying threshold over the ``max_new_tokens`` positions).
    - ``free`` (batch 1): shallow exit at ``shallow_exit_layer`` when the ``shallow2deep_conf_type``
      confidence exceeds ``shallow2deep_conf_threshold``; deep layers synchronized in parallel on the
      next deep token. ``use_adapt_threshold``: FREE's Beta-mixture estimator starting from that
      threshold (pass ``adapt_threshold=AdaptiveThreshold(...)`` to keep learning across calls).
      ``rollback_threshold`` (nats): after a synchronized pass, revise from the first shallow token whose
      deep cross-entropy exceeds it.
    - ``skip``: layer skipping, delegated to :func:`effllm.skipping.generate` with ``skip_params``.

    ``type_vocab_reduct`` (``none`` | ``fixed`` | ``decaying`` | ``adaptive``) with ``k`` (and ``k_min``)
    prunes the vocabulary of the softmax confidence from ``exit_min_layer`` on (CALM and FREE's shallow
    exit). ``exit_transform(layer, h)`` maps an intermediate state before the final norm and LM head (a
    fitted exit); ``None`` is the logit lens. Generation stops at ``eos_token_id`` (default: the model's).
    """
    _check_choice("method", method, METHODS)
    if method == "skip":
        from effllm import skipping  # layer selection (PAPERS.md C) lives in its own module

        return skipping.generate(model, input_ids, max_new_tokens, eos_token_id=eos_token_id, **skip_params)
    if skip_params:
        raise TypeError(f"generate() got unexpected keyword argument(s) {sorted(skip_params)} for method={method!r}")
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[1] < 1:
        shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"input_ids must be a LongTensor [batch, prompt_len >= 1]; got {shape}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer; got {max_new_tokens!r}")
    adapter = get_adapter(model)
    n_layers = adapter.num_layers
    threshold = _check_threshold("exit_conf_threshold", exit_conf_threshold)
    exit_min_layer = _check_layer("exit_min_layer", exit_min_layer, n_layers)
    _check_choice("exit_conf_type", exit_conf_type, CONFIDENCE_TYPES)
    if exit_position_temp is not None:
        _check_threshold("exit_position_temp", exit_position_temp)
    depth = n_layers
    if method == "static":
        if static_exit_layer is None:
            raise ValueError(f"method='static' needs static_exit_layer (1..{n_layers})")
        depth = _check_layer("static_exit_layer", static_exit_layer, n_layers)
    if method in ("calm", "free") and input_ids.shape[0] != 1:
        raise ValueError(
            f"method={method!r} decodes one sequence at a time (batch 1, as in CALM and FREE); got batch "
            f"{input_ids.shape[0]}: call generate once per prompt"
        )
    if method == "free":
        if shallow_exit_layer is None:
            raise ValueError(f"method='free' needs shallow_exit_layer (1..{n_layers - 1})")
        shallow = _check_layer("shallow_exit_layer", shallow_exit_layer, n_layers - 1)
        _check_choice("shallow2deep_conf_type", shallow2deep_conf_type, ("softmax",))
        threshold = _check_threshold("shallow2deep_conf_threshold", shallow2deep_conf_threshold)
        if use_adapt_threshold and adapt_threshold is None:
            adapt_threshold = AdaptiveThreshold(initial=threshold)
        if not use_adapt_threshold:
            adapt_threshold = None
        if rollback_threshold is not None:
            _check_threshold("rollback_threshold", rollback_threshold)
        if type_vocab_reduct != "none" and exit_min_layer >= shallow:
            raise ValueError(
                f"FREE with vocabulary pruning prunes at exit_min_layer < shallow_exit_layer={shallow}; "
                f"got exit_min_layer={exit_min_layer}"
            )
        checked_layers = {shallow}
        conf_type = "softmax"
    else:
        if use_adapt_threshold or rollback_threshold is not None:
            raise ValueError("use_adapt_threshold and rollback_threshold belong to method='free'")
        checked_layers = set(range(exit_min_layer, n_layers)) if method == "calm" else set()
        conf_type = exit_conf_type
    exit_head = ExitHead(adapter, exit_transform, conf_type, meta_classifier, type_vocab_reduct, k, k_min,
                         prune_layer=exit_min_layer)
    if type_vocab_reduct != "none" and method == "free":
        checked_layers.add(exit_min_layer)  # the full-vocabulary check that picks the candidates
    if eos_token_id is None:
        eos_token_id = getattr(model.generation_config, "eos_token_id", None)
    eos = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []),
                       device=input_ids.device)

    extras = {}
    prompt = input_ids
    if getattr(model.config, "is_encoder_decoder", False):
        extras["encoder_hidden_states"] = adapter.encode(input_ids, attention_mask=attention_mask)
        if attention_mask is not None:
            extras["encoder_attention_mask"] = attention_mask
        start = model.generation_config.decoder_start_token_id
        prompt = torch.full((input_ids.shape[0], 1), start, dtype=torch.long, device=input_ids.device)

    decoder = _Decoder(adapter, exit_head, extras, checked_layers, method == "calm" and state_propagation,
                       method == "free", first_token_position=prompt.shape[1])
    if adapt_threshold is not None:
        adapt_threshold.start_sequence()
    cache = adapter.new_cache()
    # Prompt at the depth every token uses: all layers, or the static model's first `depth` layers.
    hidden = adapter.embed(prompt, cache=cache)
    context = adapter.context(hidden, cache=cache, **extras)
    for i in range(depth):
        hidden = adapter.run_layer(i, hidden, context)
    next_token = exit_head.final(depth, hidden).to(input_ids.device)  # [batch, 1]; the head may sit elsewhere

    tokens, exit_layers = [next_token], [depth]
    out = ExitOutput(sequences=prompt, exit_layers=prompt, confidences=[[]], thresholds=[math.nan],
                     confidence_flops=[0], confidence_seconds=[0.0])
    finished = torch.isin(next_token, eos)
    position = prompt.shape[1]  # position of the token fed next
    while len(tokens) < max_new_tokens and not bool(finished.all()):
        t = len(tokens)
        if method == "free":
            step_threshold = adapt_threshold.threshold if adapt_threshold is not None else threshold
        elif method == "calm" and exit_position_temp is not None:
            step_threshold = decayed_threshold(threshold, t, max_new_tokens)
        else:
            step_threshold = threshold
        exit_head.new_token()
        step = decoder.step(next_token, position, cache, depth, step_threshold, strict=method == "free")
        next_token = step.token.to(input_ids.device)
        # Finished sequences keep emitting EOS (HF pads them with pad = eos for greedy search likewise).
        if eos.numel():
            next_token = torch.where(finished, eos[:1].expand_as(next_token), next_token)
        tokens.append(next_token)
        exit_layers.append(step.exit_layer)
        out.confidences.append(step.confidences)
        out.thresholds.append(step_threshold if checked_layers else math.nan)
        out.confidence_flops.append(exit_head.flops)
        out.confidence_seconds.append(exit_head.seconds)
        position += 1
        if adapt_threshold is not None and step.shallow_token is not None and step.exit_layer == n_layers:
            adapt_threshold.record(step.confidences[-1], bool(step.shallow_token.item() == next_token.item()))
        if step.synced:
            if rollback_threshold is not None and step.synced_logits is not None:
                revised = _rollback(step, tokens, exit_layers, rollback_threshold, n_layers)
                if revised is not None:
                    out.rollbacks += len(tokens) - revised
                    del tokens[revised + 1:], exit_layers[revised + 1:]
                    del out.confidences[revised + 1:], out.thresholds[revised + 1:]
                    del out.confidence_flops[revised + 1:], out.confidence_seconds[revised + 1:]
                    next_token = tokens[-1]
                    position = prompt.shape[1] + revised
                    _crop(cache, position)
                    decoder.pending.clear()
        finished |= torch.isin(next_token, eos)
    out.sequences = torch.cat([prompt, *tokens], dim=1)
    out.exit_layers = torch.tensor([exit_layers] * prompt.shape[0], device=prompt.device)
    return out


def _rollback(step, tokens, exit_layers, rollback_threshold, n_layers) -> int | None:
    """Index (into ``tokens``) of the first shallow token the deep pass revises, after revising it."""
    # step.synced_positions[j] fed tokens[index_j] and predicted tokens[index_j + 1]
    log_probs = torch.log_softmax(step.synced_logits.float(), dim=-1)  # [q, V], the last row is the new token's
    first_token_position = step.first_token_position
    for row, position in enumerate(step.synced_positions[:-1]):
        index = position - first_token_position + 1  # tokens[index] was predicted at `position`
        emitted = int(tokens[index].item())
        if -float(log_probs[row, emitted]) > rollback_threshold:
            tokens[index] = log_probs[row].argmax().view(1, 1)
            exit_layers[index] = n_layers
            return index
    return None


@dataclass
class _Step:
    token: torch.LongTensor  # [batch, 1]
    exit_layer: int
    confidences: list[float]
    synced: bool = False  # pending tokens were completed in this step (FREE: a deep token)
    shallow_token: torch.LongTensor | None = None  # FREE: what the shallow exit would have emitted
    synced_logits: torch.Tensor | None = None  # rollback: deep logits of [pending..., current]
    synced_positions: list[int] = field(default_factory=list)
    first_token_position: int = 0


class _Decoder:
    """One token through the layers: exit checks, and the K/V owed by tokens that exited earlier."""

    def __init__(self, adapter, exit_head: ExitHead, extras: dict, checked_layers: set[int], propagate: bool,
                 free: bool, first_token_position: int):
        self.adapter, self.exit_head, self.extras = adapter, exit_head, extras
        self.checked_layers = checked_layers
        self.propagate, self.free = propagate, free
        self.n_layers = adapter.num_layers
        # Tokens whose higher layers have not run yet: position -> [next layer to run (0-based), state].
        # Invariant: the tokens a layer has not run are the latest positions, so a joint pass over them and
        # the current token is an ordinary causal pass over contiguous positions.
        self.pending: dict[int, list] = {}
        self.first_token_position = first_token_position

    def step(self, token, position, cache, depth, threshold, strict) -> _Step:
        adapter, head = self.adapter, self.exit_head
        hidden = adapter.embed(token, position_ids=torch.tensor([[position]], device=token.device), cache=cache)
        context = adapter.context(hidden, position_ids=torch.tensor([[position]], device=token.device), cache=cache,
                                  **self.extras)
        confidences, shallow_token, synced = [], None, False
        joined: list[int] = []  # pending positions advanced together with this token, ascending
        for i in range(depth):
            joining = [p for p, (layer, _) in self.pending.items() if layer == i and p not in joined]
            if joining:
                joined = sorted(joined + joining)
                synced = True
            if joined:  # run layer i on [pending states..., this token] in one causal pass
                states = torch.cat([self.pending[p][1] for p in joined] + [hidden], dim=1)
                positions = torch.tensor([[*joined, position]], device=hidden.device)
                out = adapter.run_layer(i, states, adapter.context(states, position_ids=positions, cache=cache,
                                                                    **self.extras))
                for j, p in enumerate(joined):
                    self.pending[p] = [i + 1, out[:, j : j + 1]]
                previous, hidden = hidden, out[:, -1:]
            else:
                previous, hidden = hidden, adapter.run_layer(i, hidden, context)
            layer = i + 1
            if layer not in self.checked_layers or layer == self.n_layers:
                continue
            confidence, candidate = head.confidence(layer, hidden, previous)
            if self.free and layer != max(self.checked_layers):
                continue  # FREE with vocabulary pruning: this check only picks the candidates
            confidences.append(confidence)
            exits_here = confidence > threshold if strict else confidence >= threshold
            if self.free:
                shallow_token = candidate
            if exits_here:
                emitted = candidate if candidate is not None else head.final(layer, hidden)
                if self.propagate:  # nothing is ever pending then: `context` is this token's alone
                    for j in range(layer, self.n_layers):
                        adapter.append_kv(j, hidden, context)
                else:
                    self.pending[position] = [layer, hidden]
                return _Step(emitted, layer, confidences)
        if depth < self.n_layers:  # static exit: skipped layers get nothing (the prompt ran at that depth)
            return _Step(head.final(depth, hidden), depth, confidences)
        step = _Step(None, self.n_layers, confidences, synced=synced or bool(joined), shallow_token=shallow_token)
        if joined and self.free:
            states = torch.cat([self.pending[p][1] for p in joined] + [hidden], dim=1)
            step.synced_logits = head.logits(self.n_layers, states)[0]  # [q, V]
            step.synced_positions = [*joined, position]
            step.first_token_position = self.first_token_position
        for p in joined:
            del self.pending[p]
        step.token = head.final(self.n_layers, hidden)
        return step

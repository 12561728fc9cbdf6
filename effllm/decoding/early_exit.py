"""Early exit: the exit head, CALM's confidences and decaying threshold, FREE's shallow-deep decoding with
synchronized parallel decoding, rollback and adaptive threshold, and vocabulary pruning of the confidence.

One strategy, :class:`ExitStrategy`, serves :class:`~effllm.decoding.policies.Full` (no exit checked),
:class:`~effllm.decoding.policies.StaticExit` (every token stops at the same depth, the prompt too),
:class:`~effllm.decoding.policies.Calm` and :class:`~effllm.decoding.policies.Free`: they differ only in
which layers are checked and what happens to the layers a token skipped.

The skipped layers of an exited token still owe K/V to later tokens. Two ways to pay, as in the papers:

- CALM with ``state_propagation=True``: copy the exit state upward and compute only the skipped layers' K/V
  projections from it (the adapter's ``append_kv``).
- CALM with ``state_propagation=False``, and FREE: keep the exit state *pending*; the next token that runs a
  layer the pending tokens skipped runs it on the pending states and its own in one causal pass, which gives
  them the exact K/V the full model would have. FREE's synchronized parallel decoding is this with a single
  exit layer.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from effllm import checks
from effllm.decoding.policies import Calm, Free, Policy, StaticExit, VocabPruning, _threshold
from effllm.decoding.state import DecodeState, Emitted, StepResult, Strategy


def softmax_confidence(logits: torch.Tensor) -> torch.Tensor:
    """CALM's softmax response: p1 - p2, the gap between the two largest probabilities ([..., V] -> [...])."""
    top2 = torch.softmax(logits.float(), dim=-1).topk(2, dim=-1).values
    return top2[..., 0] - top2[..., 1]


def state_confidence(previous: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
    """CALM's hidden-state saturation: cos(h_{l-1}, h_l)."""
    return torch.nn.functional.cosine_similarity(previous.float(), current.float(), dim=-1)


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
    """Logits and confidence at an exit: exit map, final norm, LM head on the full or a pruned vocabulary, and
    the FLOPs and time every exit decision costs.

    Vocabulary pruning (Vincenti et al. 2024): at ``prune_layer`` the full head gives z and the candidate ids
    I = top-k(z); later checks compute logits for I only (``fixed`` k; ``decaying`` k_l; ``adaptive``
    k = V (1 - 0.9 c_{l-1})), each time keeping the current layer's best k_{l+1} of I, and an exit emits
    I[argmax]. The final layer always uses the full vocabulary.
    """

    def __init__(self, adapter, exit_transform: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
                 conf_type: str = "softmax", meta_classifier: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
                 vocab: VocabPruning | None = None, prune_layer: int = 1):
        self.adapter = adapter
        self.n_layers = adapter.num_layers
        self.vocab_size = adapter.vocab_size
        self.hidden_size = adapter.hidden_size
        self.exit_transform = exit_transform
        self.conf_type = conf_type
        self.meta_classifier = meta_classifier
        self.vocab = vocab
        if vocab is not None:
            vocab.check(self.vocab_size)
        self.prune_layer = prune_layer
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
        """The exit confidence at ``layer`` (batch 1, last position) and, for softmax, the token [1, 1] the exit
        would emit (a full-vocabulary id); None where the token needs the full head on exit."""
        start = time.perf_counter()
        token = None
        if self.conf_type == "softmax":
            rows = self.rows
            logits = self.logits(layer, hidden[:, -1:], rows)[0, -1]  # [V] or [k_l]
            confidence = float(softmax_confidence(logits))
            local = logits.argmax()
            token = (local if rows is None else rows[local]).view(1, 1)
            self.flops += head_flops(self.hidden_size, logits.shape[-1])
            if self.vocab is not None and layer >= self.prune_layer:
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
        vocab = self.vocab
        if vocab.type_vocab_reduct == "fixed":
            size = vocab.k
        elif vocab.type_vocab_reduct == "decaying":
            size = decaying_k(vocab.k, vocab.k_min, layer + 1, self.n_layers)
        else:
            size = adaptive_k(self.vocab_size, confidence, vocab.k_min)
        size = min(size, ids.shape[0])
        if rows is not None and size == ids.shape[0]:
            return rows
        return ids[logits.topk(size).indices]


class AdaptiveThreshold:
    """FREE's adaptive threshold estimator: a two-component Beta mixture over shallow confidences.

    At every synchronization the decoder records (c, 1[shallow argmax == deep argmax]) for the token the deep
    model decided; the two classes' Beta parameters are fitted by moments (alpha = m (m (1 - m) / s^2 - 1),
    beta = alpha (1 - m) / m), and the threshold becomes the smallest grid point in [0.3, 0.9] whose posterior
    probability of "agree" exceeds ``zeta``. Updates stop after ``max_sequences`` sequences (the first ~300 in
    FREE). One object persists across decoding calls.
    """

    def __init__(self, initial: float = 0.9, zeta: float = 0.4, max_sequences: int = 300,
                 grid: tuple[float, float, float] = (0.3, 0.9, 0.01), min_per_class: int = 3):
        self.threshold = _threshold("shallow2deep_conf_threshold", initial)
        self.zeta = checks.fraction("zeta", zeta, zero=False, one=False)
        self.max_sequences = checks.positive_int("max_sequences", max_sequences)
        self.min_per_class = checks.positive_int("min_per_class", min_per_class)
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


def allow_crop(cache: Any) -> None:
    """Let :func:`crop_cache` roll back sliding-window layers (Mistral, Gemma 3): such a layer forgets positions
    older than its window unless it records them until the next crop."""
    for layer in getattr(cache, "self_attention_cache", cache).layers:
        if hasattr(layer, "activate_past_recording"):
            layer.activate_past_recording()


def crop_cache(cache: Any, length: int) -> None:
    """Drop every cached position >= ``length`` in every layer (FREE's rollback, rejected drafts). Sliding-window
    layers need :func:`allow_crop` once, before decoding; cropping also trims what they recorded."""
    self_cache = getattr(cache, "self_attention_cache", cache)
    for layer in range(len(self_cache.layers)):
        surplus = int(self_cache.get_seq_length(layer)) - length
        if surplus > 0 or getattr(self_cache.layers[layer], "record_past", False):
            self_cache.layers[layer].crop(-max(surplus, 0))  # transformers 5: a negative count removes that many


@dataclass
class _Pass:
    """What one token's pass through the layers found."""

    token: torch.LongTensor | None  # [batch, 1]
    exit_layer: int
    confidences: list[float]
    synced: bool = False  # pending tokens were completed in this pass (FREE: a deep token)
    shallow_token: torch.LongTensor | None = None  # FREE: what the shallow exit would have emitted
    synced_logits: torch.Tensor | None = None  # rollback: deep logits of [pending..., current]
    synced_positions: list[int] = field(default_factory=list)


class ExitStrategy(Strategy):
    """Full depth, static exit, CALM and FREE: one token through the layers with exit checks, and the K/V owed
    by tokens that exited earlier."""

    def __init__(self, policy: Policy, adapter, exit_transform, max_new_tokens: int):
        self.policy, self.adapter = policy, adapter
        self.n_layers = n = adapter.num_layers
        self.max_new_tokens = max_new_tokens
        self.depth = policy.static_exit_layer if isinstance(policy, StaticExit) else n
        self.free = isinstance(policy, Free)
        self.calm = isinstance(policy, Calm)
        self.estimator = None
        if self.calm:
            self.checked_layers = set(range(policy.exit_min_layer, n))
            head = ExitHead(adapter, exit_transform, policy.exit_conf_type, policy.meta_classifier, policy.vocab,
                            prune_layer=policy.exit_min_layer)
        elif self.free:
            self.checked_layers = {policy.shallow_exit_layer}
            if policy.vocab is not None:
                self.checked_layers.add(policy.candidate_layer)  # the full check that picks the candidates
            head = ExitHead(adapter, exit_transform, "softmax", None, policy.vocab,
                            prune_layer=policy.candidate_layer or 1)
            if policy.use_adapt_threshold:
                self.estimator = policy.adapt_threshold or AdaptiveThreshold(initial=policy.shallow2deep_conf_threshold)
                self.estimator.start_sequence()
        else:
            self.checked_layers = set()
            head = ExitHead(adapter, exit_transform)
        self.head = head
        self.propagate = self.calm and policy.state_propagation
        self.prompt_layers = range(self.depth)
        # Tokens whose higher layers have not run yet: position -> [next layer to run (0-based), state].
        # Invariant: the tokens a layer has not run are the latest positions, so a joint pass over them and the
        # current token is an ordinary causal pass over contiguous positions.
        self.pending: dict[int, list] = {}
        self.rollbacks = 0
        self.first_position = 0

    def prepare_cache(self, cache: Any) -> None:
        if getattr(self.policy, "rollback_threshold", None) is not None:
            allow_crop(cache)

    def after_prompt(self, state: DecodeState, hidden: torch.Tensor) -> None:
        self.first_position = state.position  # where the first generated token is fed

    def first_token(self, state: DecodeState, hidden: torch.Tensor) -> Emitted:
        token = self.head.final(self.depth, hidden).to(state.next_token.device)
        return Emitted(token, self.depth, tuple(range(self.depth)))

    def _threshold(self, t: int) -> float:
        if self.free:
            return self.estimator.threshold if self.estimator is not None else self.policy.shallow2deep_conf_threshold
        if self.calm:
            return self.policy.threshold_at(t, self.max_new_tokens)
        return math.nan

    def step(self, state: DecodeState) -> StepResult:
        threshold = self._threshold(state.generated)
        self.head.new_token()
        found = self._pass(state, threshold)
        token = found.token.to(state.next_token.device)
        emitted = Emitted(token, found.exit_layer, tuple(range(found.exit_layer)), found.confidences,
                          threshold if self.checked_layers else math.nan, self.head.flops, self.head.seconds)
        state.position += 1
        if self.estimator is not None and found.shallow_token is not None and found.exit_layer == self.n_layers:
            self.estimator.record(found.confidences[-1], bool(found.shallow_token.item() == token.item()))
        rollback = getattr(self.policy, "rollback_threshold", None)
        if found.synced and rollback is not None and found.synced_logits is not None:
            revised = self._rollback(state, found, rollback)
            if revised is not None:
                return revised
        return StepResult([emitted])

    def _rollback(self, state: DecodeState, found: _Pass, rollback_threshold: float) -> StepResult | None:
        """Revise the first stacked token whose deep cross-entropy exceeds the threshold, dropping what followed."""
        log_probs = torch.log_softmax(found.synced_logits.float(), dim=-1)  # [q, V]; the last row is the new token's
        for row, position in enumerate(found.synced_positions[:-1]):
            index = position - self.first_position + 1  # token `index` was predicted at `position`
            emitted = int(state.records[index].token.item())
            if -float(log_probs[row, emitted]) > rollback_threshold:
                old = state.records[index]
                self.rollbacks += len(state.records) + 1 - index  # the revised token, what followed, this step's
                revised = Emitted(log_probs[row].argmax().view(1, 1).to(state.next_token.device), self.n_layers,
                                  tuple(range(self.n_layers)), old.confidences, old.threshold, old.flops, old.seconds)
                state.position = self.first_position + index
                crop_cache(state.cache, state.position)
                self.pending.clear()
                return StepResult([revised], rewind=index)
        return None

    def _pass(self, state: DecodeState, threshold: float) -> _Pass:
        adapter, head = self.adapter, self.head
        position = state.position
        hidden = adapter.embed(state.next_token, position_ids=state.position_ids(position, 1), cache=state.cache)
        context = state.context(hidden, position)
        strict = self.free  # FREE exits when the confidence exceeds the threshold, CALM when it reaches it
        confidences, shallow_token, synced = [], None, False
        joined: list[int] = []  # pending positions advanced together with this token, ascending
        for i in range(self.depth):
            joining = [p for p, (layer, _) in self.pending.items() if layer == i and p not in joined]
            if joining:
                joined = sorted(joined + joining)
                synced = True
            if joined:  # run layer i on [pending states..., this token] in one causal pass
                states = torch.cat([self.pending[p][1] for p in joined] + [hidden], dim=1)
                positions = torch.tensor([[*joined, position]], device=hidden.device)
                joint = adapter.context(states, position_ids=positions, cache=state.cache, **state.extras)
                out = adapter.run_layer(i, states, joint)
                for j, p in enumerate(joined):
                    self.pending[p] = [i + 1, out[:, j : j + 1]]
                previous, hidden = hidden, out[:, -1:]
            else:
                previous, hidden = hidden, adapter.run_layer(i, hidden, context)
            layer = i + 1
            if layer not in self.checked_layers or layer == self.n_layers:
                continue
            confidence, candidate = head.confidence(layer, hidden, previous)
            if self.free and layer != self.policy.shallow_exit_layer:
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
                return _Pass(emitted, layer, confidences)
        if self.depth < self.n_layers:  # static exit: skipped layers get nothing (the prompt ran at that depth)
            return _Pass(head.final(self.depth, hidden), self.depth, confidences)
        found = _Pass(None, self.n_layers, confidences, synced=synced or bool(joined), shallow_token=shallow_token)
        if joined and self.free:
            states = torch.cat([self.pending[p][1] for p in joined] + [hidden], dim=1)
            found.synced_logits = head.logits(self.n_layers, states)[0]  # [q, V]
            found.synced_positions = [*joined, position]
        for p in joined:
            del self.pending[p]
        found.token = head.final(self.n_layers, hidden)
        return found

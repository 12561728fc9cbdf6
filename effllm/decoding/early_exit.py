"""Early exit: CALM's and FREE's decoding step (one strategy for full depth, static exit, CALM and FREE), FREE's
synchronized parallel decoding, rollback and adaptive threshold. The exit head and the confidences live in
:mod:`effllm.decoding.exits` (re-exported here).

One strategy, :class:`ExitStrategy`, serves :class:`~effllm.decoding.policies.Full` (no exit checked),
:class:`~effllm.decoding.policies.StaticExit` (every token stops at the same depth, the prompt too),
:class:`~effllm.decoding.policies.Calm` and :class:`~effllm.decoding.policies.Free`: they differ only in
which layers are checked and what happens to the layers a token skipped.

The skipped layers of an exited token still owe K/V to later tokens. Two ways to pay, as in the papers (the
policy's ``kv_mode``):

- ``propagate`` (CALM's default, ``Calm(kv="propagate")``): copy the exit state upward and compute only the
  skipped layers' K/V projections from it (the adapter's ``append_kv``).
- ``deferred`` (``Calm(kv="deferred")``, and FREE): keep the exit state until the next token that runs a layer
  the deferred tokens skipped; it runs that layer on their states and its own in one causal pass, which gives
  them the exact K/V the full model would have. FREE's synchronized parallel decoding is this with a single
  exit layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from effllm import checks
from effllm.decoding.exits import (  # noqa: F401 (ExitHead and the confidences have always been importable here)
    ExitHead,
    adaptive_k,
    decaying_k,
    head_flops,
    softmax_confidence,
    state_confidence,
)
from effllm.decoding.policies import Calm, Free, Policy, StaticExit, check_threshold
from effllm.decoding.state import DecodeState, Emitted, StepResult, Strategy


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
        self.threshold = check_threshold("threshold", initial)
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
    synced: bool = False  # deferred tokens were completed in this pass (FREE: a deep token)
    shallow_token: torch.LongTensor | None = None  # FREE: what the shallow exit would have emitted
    synced_logits: torch.Tensor | None = None  # rollback: deep logits of [deferred..., current]
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
            self.checked_layers = set(range(policy.candidate_layer, n))
            head = ExitHead(adapter, exit_transform, policy.exit_conf_type, policy.meta_classifier, policy.vocab,
                            candidate_layer=policy.candidate_layer)
        elif self.free:
            self.checked_layers = {policy.shallow_exit_layer}
            if policy.vocab is not None:
                self.checked_layers.add(policy.candidate_layer)  # the full check that picks the candidates
            head = ExitHead(adapter, exit_transform, "softmax", None, policy.vocab,
                            candidate_layer=policy.candidate_layer or 1)
            if policy.use_adapt_threshold:
                self.estimator = policy.adapt_threshold or AdaptiveThreshold(initial=policy.threshold)
                self.estimator.start_sequence()
        else:
            self.checked_layers = set()
            head = ExitHead(adapter, exit_transform)
        self.head = head
        self.propagate = policy.kv_mode == "propagate"
        self.prompt_layers = range(self.depth)
        # Deferred tokens, whose higher layers have not run yet: position -> [next layer to run (0-based), state].
        # Invariant: the tokens a layer has not run are the latest positions, so a joint pass over them and the
        # current token is an ordinary causal pass over contiguous positions.
        self.deferred: dict[int, list] = {}
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
            return self.estimator.threshold if self.estimator is not None else self.policy.threshold
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
                self.deferred.clear()
                return StepResult([revised], rewind=index)
        return None

    def _pass(self, state: DecodeState, threshold: float) -> _Pass:
        adapter, head = self.adapter, self.head
        position = state.position
        hidden = adapter.embed(state.next_token, position_ids=state.position_ids(position, 1), cache=state.cache)
        context = state.context(hidden, position)
        strict = self.free  # FREE exits when the confidence exceeds the threshold, CALM when it reaches it
        confidences, shallow_token, synced = [], None, False
        joined: list[int] = []  # deferred positions advanced together with this token, ascending
        for i in range(self.depth):
            joining = [p for p, (layer, _) in self.deferred.items() if layer == i and p not in joined]
            if joining:
                joined = sorted(joined + joining)
                synced = True
            if joined:  # run layer i on [deferred states..., this token] in one causal pass
                states = torch.cat([self.deferred[p][1] for p in joined] + [hidden], dim=1)
                positions = torch.tensor([[*joined, position]], device=hidden.device)
                joint = adapter.context(states, position_ids=positions, cache=state.cache, **state.extras)
                out = adapter.run_layer(i, states, joint)
                for j, p in enumerate(joined):
                    self.deferred[p] = [i + 1, out[:, j : j + 1]]
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
                if self.propagate:  # nothing is ever deferred then: `context` is this token's alone
                    for j in range(layer, self.n_layers):
                        adapter.append_kv(j, hidden, context)
                else:
                    self.deferred[position] = [layer, hidden]
                return _Pass(emitted, layer, confidences)
        if self.depth < self.n_layers:  # static exit: skipped layers get nothing (the prompt ran at that depth)
            return _Pass(head.final(self.depth, hidden), self.depth, confidences)
        found = _Pass(None, self.n_layers, confidences, synced=synced or bool(joined), shallow_token=shallow_token)
        if joined and self.free:
            states = torch.cat([self.deferred[p][1] for p in joined] + [hidden], dim=1)
            found.synced_logits = head.logits(self.n_layers, states)[0]  # [q, V]
            found.synced_positions = [*joined, position]
        for p in joined:
            del self.deferred[p]
        found.token = head.final(self.n_layers, hidden)
        return found

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

from effllm.decoding.adaptive_threshold import AdaptiveThreshold
from effllm.decoding.exits import (  # noqa: F401 (ExitHead and the confidences have always been importable here)
    ExitHead,
    adaptive_k,
    decaying_k,
    head_flops,
    softmax_confidence,
    state_confidence,
)
from effllm.decoding.policies import Calm, Free, Policy, StaticExit
from effllm.decoding.state import DecodeState, Emitted, StepResult, Strategy


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
        self.prompt_states: list[tuple[int, torch.Tensor, torch.Tensor]] = []  # CALM's checks of token 0

    def prepare_cache(self, cache: Any) -> None:
        if getattr(self.policy, "rollback_threshold", None) is not None:
            allow_crop(cache)

    def after_prompt(self, state: DecodeState, hidden: torch.Tensor) -> None:
        self.first_position = state.position  # where the first generated token is fed

    def after_prompt_layer(self, layer: int, previous: torch.Tensor, hidden: torch.Tensor) -> None:
        """CALM checks token 0 too (``deploying_t5.py:926``, ``pos_time`` 1): keep the last prompt position's state
        at each checked layer (the prompt itself runs every layer: its K/V are needed)."""
        if self.calm and layer in self.checked_layers and layer < self.n_layers:
            self.prompt_states.append((layer, previous[:, -1:], hidden[:, -1:]))

    def first_token(self, state: DecodeState, hidden: torch.Tensor) -> Emitted:
        if self.calm and self.prompt_states:
            threshold = self._threshold(0)
            self.head.new_token()
            confidences = []
            for layer, previous, current in self.prompt_states:
                confidence, candidate = self.head.confidence(layer, current, previous)
                confidences.append(confidence)
                if confidence > threshold:
                    token = candidate if candidate is not None else self.head.final(layer, current)
                    return Emitted(token.to(state.next_token.device), layer, tuple(range(layer)), confidences,
                                   threshold, self.head.flops, self.head.seconds)
            token = self.head.final(self.depth, hidden).to(state.next_token.device)
            return Emitted(token, self.depth, tuple(range(self.depth)), confidences, threshold, self.head.flops,
                           self.head.seconds)
        token = self.head.final(self.depth, hidden).to(state.next_token.device)
        return Emitted(token, self.depth, tuple(range(self.depth)))

    def _threshold(self, t: int) -> float:
        if self.free:
            return self.estimator.threshold if self.estimator is not None else self.policy.threshold
        if self.calm:  # generated token k uses position k + 1 (deploying_t5.py:926: past length + 1)
            return self.policy.threshold_at(t + 1, self.max_new_tokens)
        return math.nan

    def step(self, state: DecodeState) -> StepResult:
        threshold = self._threshold(state.generated)
        self.head.new_token()
        found = self._pass(state, threshold)
        token = found.token.to(state.next_token.device)
        emitted = Emitted(token, found.exit_layer, tuple(range(found.exit_layer)), found.confidences,
                          threshold if self.checked_layers else math.nan, self.head.flops, self.head.seconds)
        state.position += 1
        if self.estimator is not None and found.synced_logits is not None:
            self._record_synchronized(state, found, token)
        rollback = getattr(self.policy, "rollback_threshold", None)
        if found.synced and rollback is not None and found.synced_logits is not None:
            revised = self._rollback(state, found, rollback)
            if revised is not None:
                return revised
        return StepResult([emitted])

    def _record_synchronized(self, state: DecodeState, found: _Pass, token: torch.Tensor) -> None:
        """FREE's calibration set (``deploying_t5.py:898-906``): at a synchronized pass, every stacked token's
        (shallow confidence, shallow token == deep argmax at its position) and the current token's."""
        deep = found.synced_logits.argmax(-1)  # [q]: the deep prediction at each stacked position and the current
        confidences, agreed = [], []
        for row, position in enumerate(found.synced_positions[:-1]):
            record = state.records[position - self.first_position + 1]  # the token predicted at `position`
            confidences.append(record.confidences[-1])
            agreed.append(int(record.token.item()) == int(deep[row].item()))
        confidences.append(found.confidences[-1])
        agreed.append(int(found.shallow_token.item()) == int(token.item()))
        self.estimator.record(confidences, agreed)

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
            exits_here = confidence > threshold  # both exit above it: get_skip_mask keeps `conf <= threshold`
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

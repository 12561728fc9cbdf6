"""The exit: what a model predicts from the state after layer l, written once for decoding, analyses and training.

    transform = resolve_exit_transform(model, None)       # the model's trained exits, or None (logit lens)
    logits = exit_logits(adapter, 20, hidden, transform)  # [..., V]: exit map, final norm, LM head
    logits = exit_logits(adapter, 20, hidden, transform, rows=candidates)  # [..., k]: a pruned vocabulary
    hits, in_top = agreement_counts(adapter, 20, hidden, final_ids, transform, top_k=5)

An *exit transform* ``(layer, hidden) -> hidden`` maps an intermediate state before the shared final norm and LM
head (fitted linear exits, trained exit modules); it is never applied at the last layer L, whose state the head
reads as it is. Without one, ``exit_logits`` is the logit lens. The confidences an exit decision reads (CALM's
softmax response and hidden-state saturation; the ``meta`` classifier is a callable the policy carries) and the
FLOPs they cost are here too, with :class:`ExitHead`, the per-token exit head of the decoding engine (vocabulary
pruning of the softmax confidence, Vincenti et al. 2024).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import torch

from effllm import records

ExitTransform = Callable[[int, torch.Tensor], torch.Tensor]
LOGIT_LENS = "logit-lens"  # exit_transform=LOGIT_LENS: the plain final norm + head even if the model has exits


def resolve_exit_transform(model: torch.nn.Module, exit_transform: Any) -> ExitTransform | None:
    """The exit map to use: an explicit callable; ``LOGIT_LENS`` for none; None for the exits attached to the
    model (``records.EXITS``, set by exit training) or, without any, the plain logit lens."""
    if exit_transform is None:
        return records.EXITS.get(model)
    if isinstance(exit_transform, str):
        if exit_transform != LOGIT_LENS:
            raise ValueError(f"exit_transform must be a callable (layer, hidden) -> hidden, None or {LOGIT_LENS!r}; "
                             f"got {exit_transform!r}")
        return None
    if not callable(exit_transform):
        raise ValueError(f"exit_transform must be a callable (layer, hidden) -> hidden; got {type(exit_transform).__name__}")
    return exit_transform


def exit_logits(adapter: Any, layer: int, hidden: torch.Tensor, exit_transform: ExitTransform | None = None,
                rows: torch.LongTensor | None = None) -> torch.Tensor:
    """Logits [..., V] (``rows``: only those vocabulary ids, [..., k]) of the exit after the 1-based ``layer`` from
    its states ``hidden`` [..., d]: ``exit_transform`` below the last layer, then the final norm and LM head."""
    if exit_transform is not None and layer < adapter.num_layers:
        hidden = exit_transform(layer, hidden)
    return adapter.logits(hidden, rows)


@torch.no_grad()
def agreement_counts(adapter: Any, layer: int, hidden: torch.Tensor, target: torch.LongTensor,
                     exit_transform: ExitTransform | None = None, top_k: int = 1) -> tuple[int, int]:
    """How many positions of ``hidden`` [..., d] the exit at ``layer`` predicts as ``target`` [...] (top-1
    agreement, usually with the final layer's argmax), and how many hold ``target`` among their ``top_k``."""
    logits = exit_logits(adapter, layer, hidden, exit_transform)
    target = target.to(logits.device)
    hits = int((logits.argmax(-1) == target).sum())
    if top_k == 1:
        return hits, hits
    top = logits.topk(top_k, dim=-1).indices  # [..., k]
    return hits, int((top == target.unsqueeze(-1)).any(-1).sum())


# --------------------------------------------------------------------------------------------------
# Confidences and their cost


def softmax_confidence(logits: torch.Tensor) -> torch.Tensor:
    """CALM's softmax response: p1 - p2, the gap between the two largest probabilities ([..., V] -> [...])."""
    top2 = torch.softmax(logits.float(), dim=-1).topk(2, dim=-1).values
    return top2[..., 0] - top2[..., 1]


def state_confidence(previous: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
    """CALM's hidden-state saturation: cos(h_{l-1}, h_l)."""
    return torch.nn.functional.cosine_similarity(previous.float(), current.float(), dim=-1)


def decaying_k(k: int, k_min: int, layer: int, n_layers: int) -> int:
    """The decaying size of the paper's text with k as its start: k_l = max(k_min, floor(k / (1 + (k - k_min)/k_min
    * l/L))). The engine follows the authors' code instead (start 35000: :mod:`effllm.decoding.vocab_schedule`)."""
    return max(k_min, math.floor(k / (1 + (k - k_min) / k_min * layer / n_layers)))


def adaptive_k(vocab_size: int, confidence: float, k_min: int) -> int:
    """An adaptive size from the whole vocabulary, k = V (1 - 0.9 c); the engine follows the authors' code instead
    (k_i = int(k_{i-1} (1 - 0.9 c_{i-1})) from k: :mod:`effllm.decoding.vocab_schedule`)."""
    return max(k_min, math.ceil(vocab_size * (1.0 - 0.9 * confidence)))


def head_flops(hidden_size: int, rows: int) -> int:
    """FLOPs of one LM-head product over ``rows`` vocabulary entries: (2d - 1) per row (Vincenti et al.)."""
    return (2 * hidden_size - 1) * rows


# --------------------------------------------------------------------------------------------------
# The decoding engine's exit head


class ExitHead:
    """Logits and confidence at an exit: :func:`exit_logits` on the full or a pruned vocabulary, and the FLOPs
    and time every exit decision costs.

    Vocabulary pruning (Vincenti et al. 2024): at ``candidate_layer`` the full head gives z and the candidate ids
    I = top-k(z); later checks compute logits for I only (``fixed`` k; ``decaying`` k_l; ``adaptive``
    k_l = k_{l-1} (1 - 0.9 c_{l-1}): the authors' rules, :mod:`effllm.decoding.vocab_schedule`), each time
    keeping the current layer's best k_{l+1} of I, and an exit emits
    I[argmax]. The final layer always uses the full vocabulary. ``vocab`` is a
    :class:`effllm.decoding.policies.VocabPruning`.
    """

    def __init__(self, adapter, exit_transform: ExitTransform | None = None, conf_type: str = "softmax",
                 meta_classifier: ExitTransform | None = None, vocab: Any = None, candidate_layer: int = 1):
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
        self.candidate_layer = candidate_layer
        self.new_token()

    def new_token(self) -> None:
        self.rows: torch.LongTensor | None = None  # candidate ids for the next check (None: full vocabulary)
        self.previous_confidence = 0.0  # the adaptive schedule sizes a check's pick from the check before
        self.flops = 0
        self.seconds = 0.0

    def logits(self, layer: int, hidden: torch.Tensor, rows: torch.LongTensor | None = None) -> torch.Tensor:
        return exit_logits(self.adapter, layer, hidden, self.exit_transform, rows)

    def final(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary greedy token [batch, 1] from the last position of ``hidden``."""
        return self.logits(layer, hidden[:, -1:]).argmax(-1)

    def confidence(self, layer: int, hidden: torch.Tensor, previous: torch.Tensor) -> tuple[float, torch.Tensor | None]:
        """The exit confidence at ``layer`` (batch 1, last position) and, for softmax, the token [1, 1] the exit
        would emit (a full-vocabulary id); None where the token needs the full head on exit."""
        start = time.perf_counter()
        token = None
        if self.conf_type == "softmax":
            logits = self.logits(layer, hidden[:, -1:], self.rows)[0, -1]  # [V] or [k_l]
            confidence, token = self.score(layer, logits)
        elif self.conf_type == "state":
            confidence = float(state_confidence(previous[:, -1], hidden[:, -1])[0])
            self.flops += 6 * self.hidden_size  # two norms and a dot product
        else:
            confidence = float(self.meta_classifier(layer, hidden[:, -1:]).reshape(-1)[-1])
            self.flops += 2 * self.hidden_size
        self.seconds += time.perf_counter() - start
        return confidence, token

    def score(self, layer: int, logits: torch.Tensor) -> tuple[float, torch.Tensor]:
        """The softmax confidence and token [1, 1] of ``logits`` [V] (or [k]: scored on the current candidates
        ``self.rows``) at ``layer``, with their FLOPs, and the candidates the next check scores. The lock-step
        batch scores many rows' full-vocabulary logits in one product and hands each row's here."""
        rows = self.rows
        confidence = float(softmax_confidence(logits))
        local = logits.argmax()
        token = (local if rows is None else rows[local]).view(1, 1)
        self.flops += head_flops(self.hidden_size, logits.shape[-1])
        if self.vocab is not None and layer >= self.candidate_layer:
            self.rows = self._next_rows(layer, logits, rows, confidence)
        return confidence, token

    def _next_rows(self, layer: int, logits: torch.Tensor, rows: torch.LongTensor | None, confidence: float):
        """The candidates the next check scores (:mod:`effllm.decoding.vocab_schedule`): picked here from the
        logits just scored, the size from the schedule (the adaptive one from the previous check's confidence)."""
        ids = torch.arange(logits.shape[-1], device=logits.device) if rows is None else rows
        if rows is None:
            size = self.vocab.first_size(layer, self.n_layers)
        else:
            size = self.vocab.next_size(layer, self.n_layers, rows.shape[0], self.previous_confidence)
        self.previous_confidence = confidence
        size = min(size, ids.shape[0])  # upstream torch.topk raises here; the rows in hand are the most
        if rows is not None and size == ids.shape[0]:
            return rows
        return ids[logits.topk(size).indices]

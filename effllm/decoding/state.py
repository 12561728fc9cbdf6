"""What a decoding strategy works with: the decoding state, one emitted token, one step's result, and the
strategy interface (see :mod:`effllm.decoding.core`)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class Emitted:
    """One generated token and what it cost."""

    token: torch.LongTensor  # [batch, 1]
    exit_layer: int
    layers_run: tuple[int, ...] = ()
    confidences: list[float] = field(default_factory=list)
    threshold: float = math.nan
    flops: int = 0
    seconds: float = 0.0


@dataclass
class StepResult:
    emitted: list[Emitted]
    rewind: int | None = None  # drop generated tokens from this index on before appending `emitted`


@dataclass
class DecodeState:
    """What a strategy reads and updates while decoding one batch."""

    adapter: Any
    cache: Any
    extras: dict[str, Any]  # encoder states and mask for T5
    next_token: torch.LongTensor  # [batch, 1]: the newest token, not fed yet
    position: int  # its position (the number of positions cached before it, for an unpadded row)
    max_new_tokens: int
    generated: int  # tokens generated so far
    offsets: torch.LongTensor | None = None  # [batch]: left-padding of each row (positions shift by it)
    prompt_mask: torch.Tensor | None = None  # [batch, prompt]: 0 at pad positions, for padded batches
    records: list[Emitted] = field(default_factory=list)  # the generated tokens so far (the core's list)

    def position_ids(self, start: int, count: int) -> torch.LongTensor:
        """Position ids [batch, count] for ``count`` tokens fed from position ``start`` on."""
        device = self.next_token.device
        base = torch.arange(start, start + count, device=device).unsqueeze(0).expand(self.next_token.shape[0], -1)
        if self.offsets is None:
            return base
        # Left padding shifts each row's positions; pad positions (masked out) get 0, as any value would do.
        return (base - self.offsets.unsqueeze(1)).clamp(min=0)

    def mask_for(self, start: int, count: int) -> torch.Tensor | None:
        """The 2-D padding mask [batch, start + count] for ``count`` tokens fed from position ``start`` on
        (None: no padding). Generated tokens are never padding."""
        if self.prompt_mask is None:
            return None
        prompt = self.prompt_mask[:, : start + count]
        ones = prompt.new_ones(prompt.shape[0], start + count - prompt.shape[1])
        return torch.cat([prompt, ones], dim=1)

    def context(self, hidden: torch.Tensor, start: int) -> Any:
        """The layer context for ``hidden`` [batch, q, d], q tokens fed from position ``start`` on."""
        count = hidden.shape[1]
        return self.adapter.context(hidden, position_ids=self.position_ids(start, count), cache=self.cache,
                                    attention_mask=self.mask_for(start, count), **self.extras)


class Strategy:
    """How one policy decodes. ``prompt_layers``: the 0-based layers the prompt runs."""

    prompt_layers: Sequence[int]

    def prepare_cache(self, cache: Any) -> None:
        """Called once with the new cache, before the prompt pass (e.g. to allow rolling it back)."""

    def after_prompt_layer(self, layer: int, previous: torch.Tensor, hidden: torch.Tensor) -> None:
        """Called after each prompt layer (1-based ``layer``) with its input and output states."""

    def after_prompt(self, state: DecodeState, hidden: torch.Tensor) -> None:
        """Called with the prompt's last-layer states (before the first token is picked)."""

    def first_token(self, state: DecodeState, hidden: torch.Tensor) -> Emitted:
        raise NotImplementedError

    def step(self, state: DecodeState) -> StepResult:
        raise NotImplementedError

"""Many prompts at once, each row decoding as it would alone: what quality tables are made of.

    outputs = decode_rows(model, [p.input_ids for p in prompts], 48, Calm(threshold=0.9), batch_size=32)
    outputs[i]            # the DecodeOutput of prompt i, as decode(model, prompts[i], 48, policy) gives it

Quality needs no batch 1 (only speed does), and on a 2-core machine decoding one prompt at a time is what kept
the prompt counts small. :func:`decode_rows` left-pads the prompts into batches of ``batch_size`` and decodes
each batch with :func:`effllm.decoding.core.decode`, then splits the batch into one output per prompt (its own
tokens up to its end of sequence, exit layers, confidences and counters). Every policy decodes batches: full
and static depth natively; the per-token policies (CALM, FREE, skipping, self-speculation) in lock step
(:mod:`effllm.decoding.lockstep`), where each row keeps its own exits.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from effllm import checks
from effllm.decoding.core import DecodeOutput, decode
from effllm.decoding.policies import Policy

__all__ = ["decode_rows", "pad_left"]


def pad_left(prompts: Sequence[torch.LongTensor], pad_token_id: int = 0) -> tuple[torch.LongTensor, torch.Tensor]:
    """(input_ids [n, P], attention_mask [n, P]) of ``prompts`` ([1, p_i] or [p_i]) padded on the left."""
    rows = [p.reshape(-1) for p in prompts]
    width = max(r.shape[0] for r in rows)
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long, device=rows[0].device)
    mask = torch.zeros((len(rows), width), dtype=torch.long, device=rows[0].device)
    for i, r in enumerate(rows):
        ids[i, width - r.shape[0]:] = r
        mask[i, width - r.shape[0]:] = 1
    return ids, mask


def _chunks(order: list[int], batch_size: int) -> list[list[int]]:
    """``order`` cut into round(n / batch_size) (at least one) consecutive batches of equal size (within one row):
    a remainder joins the batches instead of costing a batch of its own. Lock-step decoding pays every step once per
    batch whatever its rows, so 102 prompts at batch_size 32 decode as 3 batches of 34, not 32 + 32 + 32 + 6."""
    count = max(1, round(len(order) / batch_size))
    size, extra = divmod(len(order), count)
    chunks, start = [], 0
    for i in range(count):
        end = start + size + (i < extra)
        chunks.append(order[start:end])
        start = end
    return chunks


def decode_rows(model: torch.nn.Module, prompts: Sequence[torch.LongTensor], max_new_tokens: int,
                policy: Policy | None = None, *, batch_size: int = 32, eos_token_id: Any = None,
                exit_transform: Any = None) -> list[DecodeOutput]:
    """One :class:`DecodeOutput` per prompt (``prompts``: [1, p_i] id tensors), each what decoding that prompt alone
    gives, decoded about ``batch_size`` prompts at a time (:func:`_chunks`): prompts of similar length together (a FREE policy with the
    adaptive threshold: in the order given, each batch calibrating on the batches before). Generation stops at each row's end of sequence (``eos_token_id`` as for :func:`decode`)."""
    checks.positive_int("batch_size", batch_size)
    if not len(prompts):
        raise ValueError("prompts is empty; give at least one [1, p] id tensor")
    order = list(range(len(prompts)))
    if not getattr(policy, "use_adapt_threshold", False):  # similar lengths share a batch: less padding to run
        order.sort(key=lambda i: prompts[i].shape[-1])
    outputs: dict[int, DecodeOutput] = {}
    for chunk in _chunks(order, batch_size):
        if len(chunk) == 1:
            outputs[chunk[0]] = decode(model, prompts[chunk[0]].reshape(1, -1), max_new_tokens, policy,
                                       eos_token_id=eos_token_id, exit_transform=exit_transform)
            continue
        ids, mask = pad_left([prompts[i] for i in chunk])
        out = decode(model, ids, max_new_tokens, policy, eos_token_id=eos_token_id, attention_mask=mask,
                     exit_transform=exit_transform)
        outputs.update(zip(chunk, out.split(mask), strict=True))
    return [outputs[i] for i in range(len(prompts))]

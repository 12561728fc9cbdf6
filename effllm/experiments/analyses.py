"""Teacher-forced analyses behind the notebooks' figures: what skipping and early exit do to the hidden states,
and where generated tokens leave the model.

    table = hidden_similarity(model, windows, prompt_len=32, layer_counts=[5, 10, 15, 30])
    histogram = exit_histogram({"CALM 0.9": outputs}, n_layers=30)
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from effllm.adapters import get_adapter
from effllm.decoding import DecodeOutput
from effllm.decoding.plans import uniform_pattern


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



def exit_histogram(outputs: Mapping[str, Sequence[DecodeOutput]], n_layers: int) -> pd.DataFrame:
    """Where generated tokens left the model: one row per (setting, exit layer 1..L) with ``tokens`` and
    ``fraction`` of that setting's generated tokens (the first token of each prompt included: it leaves from the
    prompt pass)."""
    rows = []
    for label, outs in outputs.items():
        layers = torch.cat([o.exit_layers[0] for o in outs])
        counts = torch.bincount(layers.cpu(), minlength=n_layers + 1)[1:]
        rows += [{"setting": label, "exit_layer": layer, "tokens": int(c), "fraction": float(c) / len(layers)}
                 for layer, c in enumerate(counts.tolist(), start=1)]
    return pd.DataFrame(rows)


def token_exits(output: DecodeOutput, tokenizer: Any) -> pd.DataFrame:
    """One generation as a table: ``position``, ``token`` (its text) and ``exit_layer`` of every new token."""
    new = output.sequences[0, output.sequences.shape[1] - output.exit_layers.shape[1]:]
    return pd.DataFrame({"position": range(len(new)), "token": [tokenizer.decode([int(t)]) for t in new],
                         "exit_layer": output.exit_layers[0].tolist()})

"""Analyses of dynamic vocabulary pruning for early-exit confidence (Vincenti et al. 2024; seed 000).

The pruned confidence itself lives in the decoding engine (:class:`effllm.decoding.exits.ExitHead`,
``type_vocab_reduct``); this module measures what the paper plots, teacher-forced on text:

    table = layer_analysis(model, token_ids, prune_layer=20, k=256, exit_transform=exits)
    table.groupby("layer")[["confidence", "confidence_pruned"]].mean()   # confidence per layer
    survival_rate(table[table.layer == 20].final_rank, ks=[16, 256, 4096])  # does the final token survive?
    confidence_check_cost(model, ks=[256, None])                         # FLOPs and measured time of one check

Definitions used throughout: the *final token* of a position is the full model's greedy prediction (argmax
at layer L); its *rank* at layer l is the number of vocabulary entries whose logit at l is strictly larger
than its own (0 = it is the argmax; ties count in its favour); the *candidates* are the top-k ids of the
layer-``prune_layer`` logits, which fixed-k pruning keeps for every later layer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from effllm import checks
from effllm.adapters import get_adapter
from effllm.decoding.exits import exit_logits, head_flops, softmax_confidence


def final_token_ranks(logits: torch.Tensor, final_ids: torch.LongTensor) -> torch.LongTensor:
    """Rank of ``final_ids`` [...] among ``logits`` [..., V]: how many ids have a strictly larger logit."""
    if logits.shape[:-1] != final_ids.shape:
        raise ValueError(
            f"final_ids must have the shape of logits without the vocabulary axis: logits {tuple(logits.shape)}, "
            f"final_ids {tuple(final_ids.shape)}"
        )
    target = logits.gather(-1, final_ids.unsqueeze(-1))  # [..., 1]
    return (logits > target).sum(-1)


def survival_rate(ranks: Sequence[int] | torch.Tensor | pd.Series, ks: Sequence[int]) -> pd.DataFrame:
    """For each k in ``ks``: the fraction of ``ranks`` below k, i.e. how often the final token is among the
    top-k candidates (``k``, ``survival``, ``tokens``)."""
    ranks = ranks.cpu().numpy() if isinstance(ranks, torch.Tensor) else np.asarray(ranks, dtype=np.int64)
    if ranks.size == 0:
        raise ValueError("survival_rate needs at least one rank; got none")
    for k in ks:
        checks.integer("every k", k, low=1)
    return pd.DataFrame(
        {"k": list(ks), "survival": [float((ranks < k).mean()) for k in ks], "tokens": ranks.size}
    )


def _check_layers(layers: Sequence[int] | None, prune_layer: int, n_layers: int) -> list[int]:
    checks.layer("prune_layer", prune_layer, n_layers)
    layers = list(range(1, n_layers + 1)) if layers is None else sorted(set(layers))
    bad = [layer for layer in layers if isinstance(layer, bool) or not isinstance(layer, int) or not 1 <= layer <= n_layers]
    if bad:  # one message for the whole list: every offending layer at once
        raise ValueError(f"layers must lie between 1 and {n_layers} (1-based); got {bad}")
    return layers


def _layer_rows(logits: torch.Tensor, layer: int, final: torch.LongTensor, prune_layer: int,
                candidates: torch.LongTensor, survived: torch.Tensor) -> dict[str, Any]:
    """The columns of one layer's rows (see :func:`layer_analysis`) from its exit logits [c, V]."""
    row = {"layer": layer, "confidence": softmax_confidence(logits).cpu().numpy(),
           "agrees": (logits.argmax(-1) == final).cpu().numpy(),
           "final_rank": final_token_ranks(logits, final).cpu().numpy()}
    if layer >= prune_layer:
        # at the pruning layer itself the check uses the full vocabulary (it picks the candidates)
        pruned = logits if layer == prune_layer else logits.gather(-1, candidates)  # == W[I]·LN(h)
        if layer == prune_layer:
            pruned_ids = pruned.argmax(-1)
        else:
            pruned_ids = candidates.gather(-1, pruned.argmax(-1, keepdim=True))[:, 0]
        row["confidence_pruned"] = softmax_confidence(pruned).cpu().numpy()
        row["agrees_pruned"] = (pruned_ids == final).cpu().numpy()
        row["final_in_candidates"] = survived.cpu().numpy()
    return row


@torch.no_grad()
def layer_analysis(
    model: torch.nn.Module,
    token_ids: torch.LongTensor,
    prune_layer: int,
    k: int = 256,
    exit_transform: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
    layers: Sequence[int] | None = None,
    batch_size: int = 4,
    chunk_tokens: int = 256,
    encoder_input_ids: torch.LongTensor | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """Teacher-forced exit statistics per position and layer, with and without a pruned vocabulary.

    ``token_ids`` [n, seq] are run through the model once; for every position and every layer in ``layers``
    (1-based, default all) the exit logits are W·LN(h_l) (after ``exit_transform`` for l < L, as in the
    decoding engine). Returns a tidy table with one row per (sequence, position, layer):

    - ``confidence``: p1 - p2 of the softmax over the full vocabulary (CALM's softmax response);
    - ``confidence_pruned``: what the engine's fixed-k pruned check computes: at ``prune_layer`` the full
      vocabulary (that check picks the k candidates), above it p1 - p2 over the candidates only; NaN below
      ``prune_layer`` (no check runs there);
    - ``agrees`` / ``agrees_pruned``: the full / pruned argmax is the final token;
    - ``final_rank``: the final token's rank at this layer over the full vocabulary;
    - ``final_in_candidates``: the final token is among the candidates (NaN below ``prune_layer``).

    ``encoder_input_ids`` [n, src] (T5): the encoder input, and ``token_ids`` are the decoder's inputs.
    Logits are computed ``chunk_tokens`` positions at a time, so a 262k vocabulary fits in memory.
    """
    adapter = get_adapter(model)
    n_layers, vocab = adapter.num_layers, adapter.vocab_size
    layers = _check_layers(layers, prune_layer, n_layers)
    checks.integer("k", k, 2, vocab, hint=f" (p1 - p2 needs two candidates; V = {vocab})")
    if not isinstance(token_ids, torch.Tensor) or token_ids.dim() != 2:
        raise ValueError(f"token_ids must be a LongTensor [n_sequences, seq_len]; got {getattr(token_ids, 'shape', token_ids)!r}")
    if encoder_input_ids is not None and encoder_input_ids.shape[0] != token_ids.shape[0]:
        raise ValueError(f"encoder_input_ids has {encoder_input_ids.shape[0]} rows, token_ids {token_ids.shape[0]}")
    needed = sorted(set(layers) | {prune_layer})
    device = next(model.parameters()).device
    tables = []
    for start in tqdm(range(0, token_ids.shape[0], batch_size), desc="layer analysis", disable=not progress):
        batch = token_ids[start : start + batch_size].to(device)
        extras = {}
        if encoder_input_ids is not None:
            extras["encoder_hidden_states"] = adapter.encode(encoder_input_ids[start : start + batch_size].to(device))
        hidden = adapter.embed(batch)
        context = adapter.context(hidden, **extras)
        states = {}
        for i in range(n_layers):
            hidden = adapter.run_layer(i, hidden, context)
            if i + 1 in needed or i + 1 == n_layers:
                states[i + 1] = hidden.reshape(-1, hidden.shape[-1])  # [b * seq, d]
        n_tokens = batch.numel()
        sequence = (torch.arange(batch.shape[0]) + start).repeat_interleave(batch.shape[1])
        position = torch.arange(batch.shape[1]).repeat(batch.shape[0])
        for lo in range(0, n_tokens, chunk_tokens):
            hi = min(lo + chunk_tokens, n_tokens)
            def logits_at(layer: int) -> torch.Tensor:  # [c, V], one layer at a time (a 262k vocabulary is large)
                return exit_logits(adapter, layer, states[layer][lo:hi], exit_transform).float()  # noqa: B023

            final = logits_at(n_layers).argmax(-1)  # [c]
            candidates = logits_at(prune_layer).topk(k, dim=-1).indices  # [c, k]
            survived = (candidates == final.unsqueeze(-1)).any(-1)
            for layer in layers:
                row = _layer_rows(logits_at(layer), layer, final, prune_layer, candidates, survived)
                tables.append(pd.DataFrame({"sequence": sequence[lo:hi].numpy(),
                                            "position": position[lo:hi].numpy(), **row}))
    table = pd.concat(tables, ignore_index=True)
    for column in ("confidence_pruned", "agrees_pruned", "final_in_candidates"):
        if column not in table:
            table[column] = float("nan")
    table.attrs.update(prune_layer=prune_layer, k=k, vocab_size=vocab, n_layers=n_layers)
    return table


def confidence_check_cost(
    model: torch.nn.Module,
    ks: Sequence[int | None],
    min_run_time: float = 0.2,
    seed: int = 0,
) -> pd.DataFrame:
    """FLOPs and measured time of one softmax-confidence check at an exit, for each candidate-set size.

    One check is what the engine does per visited layer: LM head over the candidate rows of the final-normed
    state, softmax, p1 - p2 (``softmax_confidence(adapter.logits(h, rows))``). ``None`` (or k = V) is the
    full vocabulary. The candidate ids are a seeded random choice (the cost does not depend on which ids).
    Times are medians from ``torch.utils.benchmark.Timer.blocked_autorange`` on the model's device, batch 1.
    Returns ``k``, ``flops`` ((2d - 1)·k, Vincenti et al.), ``ms``, ``flops_ratio`` and ``speedup`` (full
    vocabulary over this k).
    """
    from torch.utils import benchmark

    adapter = get_adapter(model)
    vocab, d = adapter.vocab_size, adapter.hidden_size
    sizes = []
    for k in ks:
        if k is not None:
            checks.integer("every k", k, 2, vocab, hint=" (or None for the full vocabulary)")
        sizes.append(vocab if k is None else k)
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(1, 1, d, generator=generator).to(device=device, dtype=next(model.parameters()).dtype)
    rows = []
    for size in sorted(set(sizes) | {vocab}):
        ids = None if size == vocab else torch.randperm(vocab, generator=generator)[:size].to(device)
        timer = benchmark.Timer(
            stmt="softmax_confidence(adapter.logits(hidden, ids))",
            globals={"softmax_confidence": softmax_confidence, "adapter": adapter, "hidden": hidden, "ids": ids},
            num_threads=torch.get_num_threads(),
        )
        with torch.no_grad():
            measurement = timer.blocked_autorange(min_run_time=min_run_time)
        rows.append({"k": size, "flops": head_flops(d, size), "ms": measurement.median * 1e3})
    table = pd.DataFrame(rows)
    full = table[table.k == vocab].iloc[0]
    table["flops_ratio"] = full.flops / table.flops
    table["speedup"] = full.ms / table.ms
    return table[table.k.isin(sizes)].reset_index(drop=True)

"""One model, every method: measuring cost and quality on a common footing (notebook 07).

    rows = pareto_front(table, cost="flops_per_token", quality="rougeL_vs_dense")   # bool per row
    flops_per_token(model, context_len=256)          # matmul FLOPs of one decoded token at full depth
    decode_flops(model, outputs, prompts)            # of decode() outputs: what each token actually ran

Costs are of two kinds. *Measured* (by :mod:`effllm.experiments`): decode tokens per second and prefill
seconds, on the machine the code runs on. *Counted* (here): parameters and matmul FLOPs per decoded token. The FLOP count is analytic, from the weights that exist: every 2-D
parameter of a decoder layer is a matrix that multiplies the token's state (this holds for the dense,
Wanda-pruned, SliceGPT-sliced (shortcut matrices included) and ShortGPT-shortened models), plus the
attention scores and the weighted sum over the context, plus the LM head. Norms, activations, rotary
embeddings and softmax are left out (a few percent on these models). How skipped layers are paid for
follows the decoding method (see :func:`decode_flops`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import pandas as pd
import torch
from torch import nn

from effllm import checks
from effllm.adapters import get_adapter

KV_POLICIES = ("propagate", "deferred", "none")


# --------------------------------------------------------------------------------------------------
# Counting


def parameter_count(model: nn.Module) -> int:
    """Parameters of ``model``, each shared tensor (tied embeddings and LM head) counted once."""
    return sum({p.data_ptr(): p.numel() for p in model.parameters()}.values())


def _attention_shape(model: nn.Module) -> tuple[int, int]:
    config = getattr(model.config, "get_text_config", lambda: model.config)()
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", None)
    if heads is None:
        raise ValueError(f"cannot read the number of attention heads from {type(config).__name__}")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return int(heads), int(head_dim)


def _matrices(module: nn.Module) -> list[torch.Tensor]:
    return [p for p in module.parameters() if p.dim() == 2]


def layer_flops(model: nn.Module, layer: int, context_len: int, nonzero_only: bool = False) -> int:
    """Matmul FLOPs of decoder layer ``layer`` (0-based) for one token attending to ``context_len`` positions
    (itself included): 2 per weight of every matrix of the layer (``nonzero_only``: per nonzero weight, the
    count a sparse kernel could reach), plus 4 * heads * head_dim * context_len for scores and weighted sum."""
    checks.positive_int("context_len", context_len, hint=" (positions attended)")
    adapter = get_adapter(model)
    module = adapter.layer(layer)
    weights = sum(int(torch.count_nonzero(w)) if nonzero_only else w.numel() for w in _matrices(module))
    heads, head_dim = _attention_shape(model)
    return 2 * weights + 4 * heads * head_dim * context_len


def lm_head_flops(model: nn.Module) -> int:
    """Matmul FLOPs of one full LM-head product (2 per weight of the head)."""
    return 2 * get_adapter(model).lm_head.weight.numel()


def flops_per_token(model: nn.Module, context_len: int, layers: Sequence[int] | None = None,
                    nonzero_only: bool = False) -> int:
    """Matmul FLOPs of one decoded token: the ``layers`` it runs (default all, 0-based) at ``context_len``
    attended positions, plus the full LM head. ``nonzero_only`` counts only nonzero weights (pruned models)."""
    adapter = get_adapter(model)
    n_layers = adapter.num_layers
    layers = range(n_layers) if layers is None else layers
    bad = [i for i in layers if not 0 <= i < n_layers]
    if bad:
        raise ValueError(f"layers must be 0-based indices below {n_layers}; got {bad}")
    return sum(layer_flops(model, i, context_len, nonzero_only) for i in layers) + lm_head_flops(model)


def _kv_flops(model: nn.Module, layer: int) -> int:
    projections = get_adapter(model).attention_projections(layer)
    return sum(2 * projections[role].weight.numel() for role in ("k", "v") if role in projections)


def decode_flops(model: nn.Module, outputs: Sequence[Any], prompts: Sequence[torch.LongTensor],
                 kv_policy: str = "propagate", transform_flops_per_check: int = 0) -> float:
    """Mean matmul FLOPs per decode step of :func:`effllm.decoding.decode` ``outputs`` (one per prompt). The first new token comes from the prefill and is not a decode step.

    Each step's token attends to prompt + (tokens so far) positions and runs the layers its output says
    (``layers_run`` when given, else layers 1..``exit_layers``). A layer it skips costs, by ``kv_policy``:
    ``propagate`` its K/V projections (CALM's state propagation, skipping's ``kv="propagate"``),
    ``deferred`` the whole layer (FREE and CALM without propagation run it later in a synchronized pass),
    ``none`` nothing. Every token pays its exit checks (``confidence_flops``, plus ``transform_flops_per_check``
    per check for a fitted exit map); a token that leaves at a checked layer takes its logits from that check,
    every other token (full depth, static exit, skipping) pays one full LM head."""
    if kv_policy not in KV_POLICIES:
        raise ValueError(f"unknown kv_policy {kv_policy!r}; allowed: {', '.join(KV_POLICIES)}")
    if len(outputs) != len(prompts) or not outputs:
        raise ValueError(f"need one output per prompt and at least one; got {len(outputs)} outputs, "
                         f"{len(prompts)} prompts")
    n_layers = get_adapter(model).num_layers
    head = lm_head_flops(model)
    kv = [_kv_flops(model, i) for i in range(n_layers)]
    total, steps = 0.0, 0
    for out, prompt in zip(outputs, prompts, strict=True):
        exit_layers = out.exit_layers[0].tolist()
        layers_run = getattr(out, "layers_run", None) or [None] * len(exit_layers)
        flops = getattr(out, "confidence_flops", None) or [0] * len(exit_layers)
        checks = getattr(out, "confidences", None) or [[] for _ in exit_layers]
        for j in range(1, len(exit_layers)):
            context = prompt.shape[1] + j
            ran = set(layers_run[j]) if layers_run[j] else set(range(int(exit_layers[j])))
            # A token that left at a checked layer got its logits from that check (its confidence FLOPs).
            exited_at_check = int(exit_layers[j]) < n_layers and len(checks[j]) > 0
            cost = 0
            for i in range(n_layers):
                if i in ran or kv_policy == "deferred":
                    cost += layer_flops(model, i, context)
                elif kv_policy == "propagate":
                    cost += kv[i]
            cost += 0 if exited_at_check else head
            cost += int(flops[j]) + transform_flops_per_check * len(checks[j])
            total += cost
            steps += 1
    if steps == 0:
        raise ValueError("the outputs hold no decode step (each has one new token); decode at least 2 tokens")
    return total / steps


# --------------------------------------------------------------------------------------------------
# The frontier


def pareto_front(table: pd.DataFrame, cost: str, quality: str, minimize_cost: bool = True,
                 maximize_quality: bool = True) -> pd.Series:
    """Boolean Series (``table``'s index): True for the rows no other row dominates, i.e. no row is at
    least as good on both ``cost`` and ``quality`` and strictly better on one. Rows with a missing value
    are never on the front. ``minimize_cost=False`` for a benefit such as tokens/s.

    One sort and a sweep, O(n log n): rows are grouped by equal cost from best to worst; a group's best
    quality is on the front when it beats every strictly cheaper row's quality."""
    for column in (cost, quality):
        if column not in table.columns:
            raise ValueError(f"no column {column!r}; columns: {', '.join(map(str, table.columns))}")
    c = pd.to_numeric(table[cost], errors="coerce").to_numpy(dtype=float)
    q = pd.to_numeric(table[quality], errors="coerce").to_numpy(dtype=float)
    c = c if minimize_cost else -c
    q = q if maximize_quality else -q
    on_front = [False] * len(table)
    rows = sorted((i for i in range(len(table)) if not (math.isnan(c[i]) or math.isnan(q[i]))), key=lambda i: c[i])
    best_cheaper, start = -math.inf, 0
    while start < len(rows):  # one group of equal cost at a time
        end = start
        while end < len(rows) and c[rows[end]] == c[rows[start]]:
            end += 1
        top = max(q[i] for i in rows[start:end])
        if top > best_cheaper:
            for i in rows[start:end]:
                on_front[i] = bool(q[i] == top)
            best_cheaper = top
        start = end
    return pd.Series(on_front, index=table.index, dtype=bool)

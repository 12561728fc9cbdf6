"""The per-sequence oracle of Glavas et al. (2024): for each sequence pick one of the budget models (e.g. the
4 / 8 / 12 / 24-layer models) so that the mean quality is highest while the average layer count stays within a
budget: a multiple-choice knapsack, solved exactly by dynamic programming because the costs are integer layer
counts.

Quality and cost are paired **by model label**: ``quality`` is a table with one column per model (a
``pandas.DataFrame`` indexed by sequence) and ``costs`` maps the same labels to layer counts, so a column order
that differs from the cost order cannot mispair them (it once turned "needs all layers" into "needs half").

    frontier = oracle_frontier(per_item, {"4/30": 4, "8/30": 8, "full": 30}, n_layers=30)
    oracle_fraction_to_match(per_item, costs, target=per_item["full"].mean(), n_layers=30)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd


@dataclass
class OracleSolution:
    choice: np.ndarray  # [n_sequences]: index of the chosen budget model for each sequence
    total_quality: float
    total_cost: int


def _check_oracle_inputs(quality: Any, costs: Any) -> tuple[np.ndarray, np.ndarray]:
    """``quality`` [n_sequences, n_models] and ``costs`` [n_models] as arrays in the same model order.

    A ``DataFrame`` of qualities needs ``costs`` as a mapping label -> layers, and the two are paired by label
    (the mapping's order does not matter). Plain arrays pair by position (for callers that built both from one
    list)."""
    if isinstance(quality, pd.DataFrame):
        if not isinstance(costs, Mapping):
            raise ValueError("with a quality table (one column per model), give costs as a mapping {model label: "
                             f"layers}} so that they pair by label, not by position; got {type(costs).__name__}")
        labels = list(quality.columns)
        missing, extra = [c for c in labels if c not in costs], [c for c in costs if c not in labels]
        if missing or extra:
            raise ValueError(f"costs and quality name different models: no cost for {missing}, no quality column "
                             f"for {extra}; quality columns: {labels}")
        costs = [costs[label] for label in labels]
        quality = quality.to_numpy(dtype=np.float64)
    elif isinstance(costs, Mapping):
        raise ValueError("costs given by label need quality as a DataFrame with those labels as columns")
    quality = np.asarray(quality, dtype=np.float64)
    costs = np.asarray(costs)
    if quality.ndim != 2 or quality.shape[0] < 1 or quality.shape[1] < 1:
        raise ValueError(f"quality must be [n_sequences, n_models] with both >= 1; got shape {quality.shape}")
    if costs.shape != (quality.shape[1],):
        raise ValueError(f"costs must hold one cost per model ({quality.shape[1]}); got shape {costs.shape}")
    if not np.issubdtype(costs.dtype, np.integer) or (costs < 0).any():
        raise ValueError(f"costs must be integers >= 0 (layer counts); got {costs.tolist()!r}")
    if not np.isfinite(quality).all():
        raise ValueError("quality holds NaN or infinite values")
    return quality, costs.astype(np.int64)


def _knapsack_table(quality: np.ndarray, costs: np.ndarray, capacity: int) -> tuple[np.ndarray, np.ndarray]:
    """best[t, c]: the most quality of sequences < t at total cost exactly c (-inf: unreachable); pick[t, c]
    the model chosen for sequence t - 1 on that optimum."""
    n, m = quality.shape
    best = np.full((n + 1, capacity + 1), -np.inf)
    pick = np.zeros((n + 1, capacity + 1), dtype=np.int64)
    best[0, 0] = 0.0
    for t in range(n):
        for j in range(m):
            c = costs[j]
            if c > capacity:
                continue
            candidate = best[t, : capacity + 1 - c] + quality[t, j]
            better = candidate > best[t + 1, c:]
            best[t + 1, c:][better] = candidate[better]
            pick[t + 1, c:][better] = j
    return best, pick


def oracle_knapsack(quality: Any, costs: Any, capacity: int) -> OracleSolution:
    """Choose one model per sequence to maximise the total ``quality`` [n, m] with the total of ``costs``
    [m] (integer layer counts) at most ``capacity`` (n times the average layer budget, rounded down).

    Solved exactly by dynamic programming over the integer total cost (O(n * m * capacity)); an exact
    multiple-choice knapsack because the costs are integer layer counts. Raises when no choice fits.
    """
    quality, costs = _check_oracle_inputs(quality, costs)
    capacity = int(capacity)
    if capacity < quality.shape[0] * int(costs.min()):
        raise ValueError(f"capacity {capacity} is below the cheapest choice ({quality.shape[0]} sequences x "
                         f"{int(costs.min())} layers)")
    best, pick = _knapsack_table(quality, costs, capacity)
    total_cost = int(np.argmax(best[-1]))  # first maximum: the cheapest total cost reaching it
    choice = np.zeros(quality.shape[0], dtype=np.int64)
    c = total_cost
    for t in range(quality.shape[0], 0, -1):
        choice[t - 1] = pick[t, c]
        c -= costs[choice[t - 1]]
    return OracleSolution(choice, float(quality[np.arange(len(choice)), choice].sum()), total_cost)


def oracle_frontier(quality: Any, costs: Any, n_layers: int) -> pd.DataFrame:
    """The oracle's best mean quality at every achievable average layer budget: one row per total cost
    from the cheapest to the dearest choice: ``avg_layers``, ``layer_fraction`` (of ``n_layers``),
    ``mean_quality`` (the best mean over sequences whose total cost is at most that)."""
    quality, costs = _check_oracle_inputs(quality, costs)
    n = quality.shape[0]
    capacity = n * int(costs.max())
    best, _ = _knapsack_table(quality, costs, capacity)
    reachable = np.maximum.accumulate(best[-1])
    start = n * int(costs.min())
    totals = np.arange(start, capacity + 1)
    return pd.DataFrame({"total_cost": totals, "avg_layers": totals / n, "layer_fraction": totals / n / n_layers,
                         "mean_quality": reachable[start:] / n})


def oracle_fraction_to_match(quality: Any, costs: Any, target: float, n_layers: int) -> float:
    """The smallest average fraction of layers at which the oracle's mean quality reaches ``target`` (for
    example the full model's mean quality); NaN when no choice reaches it."""
    frontier = oracle_frontier(quality, costs, n_layers)
    reached = frontier[frontier.mean_quality >= target - 1e-12]
    return float(reached.layer_fraction.iloc[0]) if len(reached) else float("nan")

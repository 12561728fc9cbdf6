"""Layer-skipping plans (seed 003): which 0-based layers a generated token runs, from a pattern or a budget.

    static_layers(30, "every-3")        # 0, 3, 6, ..., 27, 29
    static_layers(30, budget=8 / 24)    # 10 layers spread evenly, first and last kept
    early_exit_layers(30, 8 / 24)       # layers 0..9
"""

from __future__ import annotations

import math
import re
from typing import Any, Protocol

import numpy as np
import torch

from effllm import checks


class SkipPlan(Protocol):
    """What :func:`plan_layers` reads of a :class:`effllm.decoding.policies.Skip` (the policies import this
    module, so it names no policy)."""

    skip_mode: str
    skip_pattern: Any
    budget: float | None

# The paper's 4 / 8 / 12 / 24 layers of OPT-IML-1.3b (24 layers), as fractions of the depth.
PAPER_BUDGETS = (4 / 24, 8 / 24, 12 / 24, 24 / 24)


def check_budget(budget: float) -> float:
    """A layer budget: a fraction of the layers in (0, 1]."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or math.isnan(budget) or not 0 < budget <= 1:
        raise ValueError(f"budget must be a fraction of the layers in (0, 1] (e.g. 8/24 for a third); got {budget!r}")
    return float(budget)


def budget_layer_count(n_layers: int, budget: float) -> int:
    """Number of layers a ``budget`` (fraction of the depth in (0, 1]) executes: round(b * L), at least 1."""
    check_budget(budget)
    return max(1, int(math.floor(budget * n_layers + 0.5)))


def every_k_pattern(n_layers: int, k: int) -> list[int]:
    """Keep every ``k``-th layer, the first and the last included: 0, k, 2k, ..., L-1 (0-based)."""
    checks.positive_int("the k of an 'every-k' skip pattern", k)
    return sorted({*range(0, n_layers, k), n_layers - 1})


def uniform_pattern(n_layers: int, n_kept: int) -> list[int]:
    """``n_kept`` layers spread evenly over the depth, first and last kept (only the first when n_kept = 1)."""
    checks.integer("n_kept", n_kept, 1, n_layers)
    if n_kept == 1:
        return [0]
    return [int(i) for i in np.round(np.linspace(0, n_layers - 1, n_kept)).astype(int)]


def static_layers(n_layers: int, skip_pattern: Any = None, budget: float | None = None) -> list[int]:
    """The kept 0-based layers of a static pattern: ``skip_pattern`` ("every-k", or a list / tensor of kept
    layers), ``budget`` (a fraction: :func:`uniform_pattern`), or neither (every layer, nothing skipped)."""
    if skip_pattern is not None and budget is not None:
        raise ValueError(f"give either skip_pattern or budget for a static pattern, not both; got "
                         f"skip_pattern={skip_pattern!r} and budget={budget!r}")
    if budget is not None:
        return uniform_pattern(n_layers, budget_layer_count(n_layers, budget))
    if skip_pattern is None:
        return list(range(n_layers))
    if isinstance(skip_pattern, str):
        match = re.fullmatch(r"every-(\d+)", skip_pattern.strip())
        if not match:
            raise ValueError(f"unknown skip_pattern {skip_pattern!r}; allowed: 'every-k' (k >= 1, e.g. 'every-3'), or "
                             f"a list of the 0-based layers to keep (0..{n_layers - 1})")
        return every_k_pattern(n_layers, int(match.group(1)))
    if isinstance(skip_pattern, torch.Tensor):
        skip_pattern = skip_pattern.flatten().tolist()
    if not isinstance(skip_pattern, (list, tuple, range)):
        raise ValueError(f"skip_pattern must be 'every-k' or a list of kept 0-based layers; got "
                         f"{type(skip_pattern).__name__}")
    kept = list(skip_pattern)
    if not kept:
        raise ValueError(f"skip_pattern {skip_pattern!r} drops every layer; keep at least one of the layers "
                         f"0..{n_layers - 1}")
    bad = [i for i in kept if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n_layers]
    if bad:
        raise ValueError(f"skip_pattern holds {bad!r}, which are not layers of this model: allowed 0..{n_layers - 1}")
    if len(set(kept)) != len(kept):
        raise ValueError(f"skip_pattern lists a layer twice: {skip_pattern!r}")
    return sorted(kept)


def early_exit_layers(n_layers: int, budget: float) -> list[int]:
    """Early exit as skipping: the first round(b * L) layers run, every layer above them is skipped."""
    return list(range(budget_layer_count(n_layers, budget)))


def plan_layers(policy: SkipPlan, n_layers: int) -> list[int] | None:
    """The layers every generated token runs under ``policy`` (static, early exit); None when it is decided per
    token (random, controller)."""
    if policy.skip_mode == "static":
        return static_layers(n_layers, policy.skip_pattern, policy.budget)
    if policy.skip_mode == "early-exit":
        return early_exit_layers(n_layers, policy.budget)
    return None

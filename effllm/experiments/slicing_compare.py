"""Constant vs dynamic slicing vs ShortGPT on one model, at several mean slice fractions (notebook 06).

    settings = CompareSettings(match_parameters=True, pass_row=True, sweep_means=(0.3,))
    table = compare_methods(model, calibration, [0.2, 0.3], 0.1, evaluate, settings=settings)

Each row is a fresh copy of the model sliced by :func:`effllm.slicing.slice_model` and scored by ``evaluate``.
``sweep_means`` adds the authors' amplitude sweep at those levels: dynamic slicing at every A of
:func:`effllm.slicing.amplitude_grid` (``np.arange(0, M + 0.01, 0.02)``, DynamicSlicing
``experiments/mean_cut_accuracy_experiments.py:69``) beyond the rows already run (A = 0 is the constant row,
A = ``amplitude`` the dynamic one).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from effllm import records
from effllm.adapters import get_adapter
from effllm.capture import check_calibration
from effllm.models import check_complete
from effllm.slicing import (
    amplitude_grid,
    equal_parameter_constant_fraction,
    equal_parameter_shortgpt_layers,
    layer_scores,
    slice_fractions,
    slice_model,
    unique_parameters,
)
from effllm.slicing.checks import check_family, check_mean, check_scores


@dataclass(frozen=True)
class CompareSettings:
    """How :func:`compare_methods` runs. ``match_parameters``: a fourth row per M, constant slicing at the
    fraction of :func:`effllm.slicing.equal_parameter_constant_fraction` (equal parameter count to the dynamic
    model at M). ``pass_row``: ``evaluate(model, row)`` rather than ``evaluate(model)``. ``slice_head``: SliceGPT's
    ``do_slice_head`` for every SliceGPT row and the parameter matching (False: full-width head, as the authors
    run it). ``sweep_means``: levels M (each one of ``means``) also sliced at every amplitude of
    :func:`effllm.slicing.amplitude_grid` (rows with matched "sweep")."""

    batch_size: int = 8
    progress: bool = True
    match_parameters: bool = False
    pass_row: bool = False
    slice_head: bool = False
    sweep_means: tuple[float, ...] = ()


@dataclass(frozen=True)
class _Plan:
    mean: float
    method: str  # constant | dynamic | shortgpt
    matched: str  # mean | parameters | sweep
    amplitude: float
    match_amplitude: float = math.nan  # constant at equal parameters: the dynamic vector (mean, this A) it matches


def _plans(means: list[float], amplitude: float, settings: CompareSettings) -> list[_Plan]:
    plans = []
    for mean in means:
        plans += [_Plan(mean, "constant", "mean", 0.0), _Plan(mean, "dynamic", "mean", amplitude),
                  _Plan(mean, "shortgpt", "parameters", math.nan)]
        if settings.match_parameters:
            plans.append(_Plan(mean, "constant", "parameters", 0.0, match_amplitude=amplitude))
    for mean in settings.sweep_means:
        plans += [_Plan(mean, "dynamic", "sweep", a) for a in amplitude_grid(mean) if a not in (0.0, amplitude)]
    return plans


def _slice_copy(model: nn.Module, calibration: torch.Tensor, plan: _Plan, fractions: dict[tuple[float, float], Any],
                bi_scores: torch.Tensor, settings: CompareSettings) -> tuple[nn.Module, float]:
    """A sliced copy of ``model`` for ``plan`` and the mean slice fraction it was sliced at."""
    copied = copy.deepcopy(model)
    n_layers = get_adapter(model).num_layers
    batch_size, slice_head = settings.batch_size, settings.slice_head
    if plan.method == "constant":
        fraction = plan.mean if plan.matched == "mean" else equal_parameter_constant_fraction(
            model, fractions[(plan.mean, plan.match_amplitude)], slice_head)
        slice_model(copied, calibration, mean=fraction, batch_size=batch_size, slice_head=slice_head)
    elif plan.method == "dynamic":
        vector = fractions[(plan.mean, plan.amplitude)]
        fraction = float(torch.as_tensor(vector, dtype=torch.float64).mean())
        slice_model(copied, calibration, fractions=vector, batch_size=batch_size, slice_head=slice_head)
    else:
        n_remove = equal_parameter_shortgpt_layers(model, mean=plan.mean, slice_head=slice_head)
        fraction = math.nan
        slice_model(copied, calibration, mean=n_remove / n_layers, method="shortgpt", scores=bi_scores,
                    batch_size=batch_size)
    return copied, fraction


@torch.no_grad()
def compare_methods(
    model: nn.Module,
    calibration: torch.Tensor,
    means: list[float],
    amplitude: float,
    evaluate: Callable[..., dict[str, Any]],
    lr_scores: torch.Tensor | None = None,
    bi_scores: torch.Tensor | None = None,
    settings: CompareSettings | None = None,
) -> Any:
    """Slice copies of ``model`` three ways at each mean slice fraction M in ``means`` and evaluate each.

    ``constant``: SliceGPT with every fraction M. ``dynamic``: fractions from layer redundancy with mean M
    and ``amplitude`` (:func:`effllm.slicing.slice_fractions`). ``shortgpt``: ShortGPT removing
    :func:`effllm.slicing.equal_parameter_shortgpt_layers` layers (equal parameter count to the constant model).
    :class:`CompareSettings` adds rows (``match_parameters``, ``sweep_means``) and picks the head width. A
    ``dense`` row (M = 0) comes first. ``evaluate(model) -> dict`` adds its entries (perplexity, accuracy, ...)
    to each row; with ``settings.pass_row`` it is called ``evaluate(model, row)``, ``row`` holding the row's
    mean, method, matched and amplitude (e.g. to run a costly metric at some levels only). ``model`` itself is
    left unchanged; LR / BI scores are computed once when not given. Returns a tidy DataFrame: mean, method,
    matched ("mean": sliced at mean fraction M; "parameters": matched in size, ShortGPT to constant and the extra
    constant row to dynamic; "sweep": dynamic at another amplitude of the authors' grid; "" for dense),
    amplitude (0 for constant and dense, NaN for ShortGPT), slice_fraction (the mean fraction actually sliced),
    layers, parameters, params_ratio, removed_layers, dims, then the evaluation's columns.
    """
    import pandas as pd
    from tqdm.auto import tqdm

    settings = CompareSettings() if settings is None else settings
    check_complete(model, "compare slicing methods on this model")
    adapter = check_family(model, "slicegpt")
    check_calibration(model, calibration)
    for mean in means:
        check_mean(mean)
    missing = [m for m in settings.sweep_means if m not in means]
    if missing:
        raise ValueError(f"sweep_means {missing} are not among means {list(means)}: the sweep adds amplitudes at "
                         "compared levels; add them to means.")
    n_layers = adapter.num_layers
    lr_scores = check_scores(lr_scores, n_layers, "lr")
    bi_scores = check_scores(bi_scores, n_layers, "bi")
    if lr_scores is None:
        lr_scores = layer_scores(model, calibration, "lr", settings.batch_size)
    if bi_scores is None:
        bi_scores = layer_scores(model, calibration, "bi", settings.batch_size)
    plans = _plans(means, amplitude, settings)
    fractions = {(plan.mean, plan.amplitude): slice_fractions(lr_scores, plan.mean, plan.amplitude)
                 for plan in plans if plan.method == "dynamic"}  # all checked up front

    def run(candidate: nn.Module, row: dict[str, Any]) -> dict[str, Any]:
        return evaluate(candidate, dict(row)) if settings.pass_row else evaluate(candidate)

    dense_count = unique_parameters(model)
    dense_row = {"mean": 0.0, "method": "dense", "matched": "", "amplitude": 0.0, "slice_fraction": 0.0}
    rows = [{**dense_row, "layers": n_layers, "parameters": dense_count, "removed_layers": [],
             "dims": [adapter.hidden_size] * n_layers, **run(model, dense_row)}]
    for plan in tqdm(plans, desc="slice + evaluate", disable=not settings.progress):
        copied, fraction = _slice_copy(model, calibration, plan, fractions, bi_scores, settings)
        recorded = records.SLICING.get(copied)
        row = {"mean": plan.mean, "method": plan.method, "matched": plan.matched, "amplitude": plan.amplitude,
               "slice_fraction": fraction}
        copied_layers = get_adapter(copied).num_layers
        rows.append({**row, "layers": copied_layers, "parameters": unique_parameters(copied),
                     "removed_layers": recorded.get("removed_layers", []),
                     "dims": recorded.get("dims", [adapter.hidden_size] * copied_layers), **run(copied, row)})
        del copied
    table = pd.DataFrame(rows)
    table.insert(table.columns.get_loc("parameters") + 1, "params_ratio", table.parameters / dense_count)
    return table

"""Pruning-mask analysis (seed 002): how much the masks of sub-models calibrated on different domains overlap.

Given mask sets of one model (calibration set -> {linear: bool mask}), :func:`compare_mask_sets` orders them by
domain and returns the pairwise Jaccard of their pruned positions (per linear, per layer, whole model), the
whole-model pairs with their domains and the random-mask baseline of each pair, the whole-model matrix, and one
row of means: same-domain pairs against cross-domain pairs. :func:`weight_view` shows where two sets differ on
the q projection of one layer, as notebook 04 does, and :func:`three_way_view` which of three sets prune each weight
there (the seed's math_qa / math_orca / opus_books comparison). The sweep step ``mask_overlap``
(:mod:`effllm.runner.summaries`) runs these on the masks a sweep's runs saved and writes what they return.

Plotting functions only plot: they take the tables the computing functions return.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from effllm import data, domains, plots, pruning
from effllm.adapters import get_adapter

PAIR_COLUMNS = ["a", "b", "intersection", "union", "jaccard"]
DIFFERENCE_MEANINGS = ("kept by both", "pruned only in {first}", "pruned only in {second}", "pruned in both")


class MaskComparisonError(ValueError):
    """Mask sets (or a model) that the comparison cannot use as asked."""


@dataclass
class MaskOverlap:
    """What :func:`compare_mask_sets` finds for one group of mask sets."""

    masks: dict[str, dict[str, torch.Tensor]]  # ordered by domain
    domains: dict[str, str]  # mask set -> its calibration domain
    pairwise: pd.DataFrame  # pruning.pairwise_jaccard: every pair at every level
    pairs: pd.DataFrame  # whole-model pairs with domain_a, domain_b, same_domain, baseline
    matrix: pd.DataFrame  # whole-model Jaccard, sets x sets
    row: dict[str, Any]  # mask_sets, same/cross-domain pair counts and mean Jaccard, random_baseline


# --------------------------------------------------------------------------------------------------
# Computing


def calibration_domain(name: str) -> str:
    """The domain of calibration set ``name`` (a built-in set of effllm.domains or a seed's hub set), else
    ``"other"``."""
    if name in domains.CALIBRATION_SETS:
        return domains.CALIBRATION_SETS[name][0]
    return domains.HUB_CALIBRATION_DOMAINS.get(name) or domains.HUB_CALIBRATION_DOMAINS.get(
        data.canonical_name(name), "other")


def order_by_domain(masks: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """``masks`` ordered by domain (ties keep their order), and each set's domain."""
    set_domains = {name: calibration_domain(name) for name in masks}
    order = sorted(masks, key=lambda name: (set_domains[name], list(masks).index(name)))
    return {name: masks[name] for name in order}, set_domains


def mask_density(masks: dict[str, torch.Tensor]) -> float:
    """The fraction of pruned weights over all linears of one mask set."""
    return sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())


def domain_pairs(pairwise: pd.DataFrame, set_domains: dict[str, str], density: dict[str, float],
                 group: str) -> pd.DataFrame:
    """The whole-model rows of ``pairwise`` with the group, both domains, whether they are the same, and the
    Jaccard two random masks of the pair's densities would have."""
    pairs = pairwise[pairwise.level == "model"][PAIR_COLUMNS].copy()
    pairs.insert(0, "group", group)
    pairs["domain_a"] = [set_domains[a] for a in pairs.a]
    pairs["domain_b"] = [set_domains[b] for b in pairs.b]
    pairs["same_domain"] = pairs.domain_a == pairs.domain_b
    pairs["baseline"] = [pruning.random_mask_jaccard(density[a], density[b])
                         for a, b in zip(pairs.a, pairs.b, strict=True)]
    return pairs


def overlap_row(group: str, mask_sets: int, pairs: pd.DataFrame) -> dict[str, Any]:
    """One group's means: same-domain and cross-domain Jaccard (NaN without such pairs) and the baseline."""
    same, cross = pairs[pairs.same_domain].jaccard, pairs[~pairs.same_domain].jaccard
    return {"group": group, "mask_sets": mask_sets, "same_domain_pairs": len(same),
            "same_domain_jaccard": float(same.mean()) if len(same) else math.nan,
            "cross_domain_pairs": len(cross),
            "cross_domain_jaccard": float(cross.mean()) if len(cross) else math.nan,
            "random_baseline": float(pairs.baseline.mean())}


def compare_mask_sets(masks: dict[str, dict[str, torch.Tensor]], group: str,
                      roles: dict[str, tuple[int, str]] | None = None) -> MaskOverlap:
    """Every pair of at least two mask sets of one model, ordered by domain (see the module docstring);
    ``roles`` (pruning.linear_roles of the model) gives each linear's layer and kind."""
    if len(masks) < 2:
        raise MaskComparisonError(f"a comparison needs two mask sets; got {', '.join(masks) or 'none'}")
    masks, set_domains = order_by_domain(masks)
    pairwise = pruning.pairwise_jaccard(masks, roles)
    density = {name: mask_density(set_masks) for name, set_masks in masks.items()}
    pairs = domain_pairs(pairwise, set_domains, density, group)
    matrix = pruning.jaccard_matrix(pairwise, "model")
    pairwise.insert(0, "group", group)
    return MaskOverlap(masks, set_domains, pairwise, pairs, matrix, overlap_row(group, len(masks), pairs))


def viewed_linear(model: Any, layer: int | None) -> tuple[str, int]:
    """The q projection's qualified name at ``layer`` (None: the middle layer), and that layer."""
    adapter = get_adapter(model)
    layer = adapter.num_layers // 2 if layer is None else layer
    roles = pruning.linear_roles(model)
    linear = next((name for name, (i, kind) in roles.items() if i == layer and kind in ("q", "qkv")), None)
    if linear is None:
        raise MaskComparisonError(f"the model has no q projection at layer {layer} (it has "
                                  f"{adapter.num_layers} layers)")
    return linear, layer


def difference_table(mask_a: torch.Tensor, mask_b: torch.Tensor, first: str, second: str) -> pd.DataFrame:
    """How many weights fall in each code of pruning.mask_difference, with what the code means."""
    difference = pruning.mask_difference(mask_a, mask_b)
    meanings = [meaning.format(first=first, second=second) for meaning in DIFFERENCE_MEANINGS]
    return pd.DataFrame({"code": range(4), "meaning": meanings,
                         "weights": [int((difference == k).sum()) for k in range(4)]})


def three_way_codes(masks: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Per weight, which of three masks prune it: bit i (1, 2, 4) set where mask i is True (0: kept by all three,
    7: pruned in all three)."""
    if len(masks) != 3 or len({tuple(m.shape) for m in masks}) != 1:
        raise MaskComparisonError(f"a three-way view needs three masks of one shape; got shapes "
                                  f"{[tuple(m.shape) for m in masks]}")
    return sum(m.to(torch.int64) << i for i, m in enumerate(masks))


def three_way_table(masks: tuple[torch.Tensor, ...], names: tuple[str, str, str]) -> pd.DataFrame:
    """How many weights each of the 8 patterns of :func:`three_way_codes` holds, with the sets that prune them."""
    codes = three_way_codes(masks)
    counts = torch.bincount(codes.flatten(), minlength=8)
    pruned_in = [", ".join(n for i, n in enumerate(names) if code >> i & 1) or "none (kept by all)"
                 for code in range(8)]
    return pd.DataFrame({"code": range(8), "pruned_in": pruned_in, "sets_pruning": [bin(c).count("1") for c in range(8)],
                         "weights": counts.tolist(), "share": (counts.double() / codes.numel()).tolist()})


def three_way_view(model: Any, layer: int | None, masks: dict[str, dict[str, Any]], names: tuple[str, str, str],
                   title: str, max_pixels: int = 1024) -> tuple[Any, pd.DataFrame]:
    """The seed's three-way comparison (math_qa / math_orca / opus_books) on the q projection of ``layer``: a map of
    which of the three sub-models prune each weight (only the weights where they disagree coloured) and the
    :func:`three_way_table` there."""
    import matplotlib.colors as mcolors

    linear, _ = viewed_linear(model, layer)
    chosen = tuple(masks[name][linear] for name in names)
    table = three_way_table(chosen, names)
    codes = three_way_codes(chosen)
    module = dict(model.named_modules())[linear]
    if get_adapter(model).weight(module) is not module.weight:  # GPT-2's Conv1D stores the transpose
        codes = codes.t()
    rows, columns = codes.shape
    r, c = min(rows, max_pixels), min(columns, max_pixels)
    crop = "" if (r, c) == (rows, columns) else f" (top-left {r} x {c} of {rows} x {columns})"
    # kept by all: white; pruned by all: grey; pruned by one set only: its colour; by two: a darker mix
    colours = ["white", "tab:red", "tab:blue", "purple", "tab:green", "olive", "teal", "0.8"]
    fig, (ax, bar) = plots.new_figure(1, 2, figsize=(12, 4.6), gridspec_kw={"width_ratios": [2, 1]})
    ax.imshow(codes[:r, :c].numpy(), cmap=mcolors.ListedColormap(colours), vmin=-0.5, vmax=7.5,
              interpolation="nearest", aspect="auto")
    ax.grid(False)
    ax.set(xlabel="input column", ylabel="output row", title=f"which sub-models prune each weight{crop}")
    disagree = table[(table.sets_pruning > 0) & (table.sets_pruning < 3)]
    bar.barh(disagree.pruned_in, disagree.share, color=[colours[c] for c in disagree.code])
    bar.set(xlabel="share of the projection's weights", title="pruned by one or two of the three only")
    fig.suptitle(f"{linear}: {', '.join(names)} · {title}")
    return fig, table


# --------------------------------------------------------------------------------------------------
# Figures


def weight_view(model: Any, layer: int | None, masks: dict[str, dict[str, Any]], pair: tuple[str, str],
                title: str) -> tuple[Any, pd.DataFrame]:
    """Notebook 04's weight view of the q projection of ``layer`` (None: the middle one) for two mask sets,
    and the :func:`difference_table` of the two masks there."""
    linear, _ = viewed_linear(model, layer)
    module = dict(model.named_modules())[linear]
    first, second = pair
    dense = module.weight.detach().float().cpu()
    mask_a, mask_b = masks[first][linear], masks[second][linear]
    if get_adapter(model).weight(module) is not module.weight:  # GPT-2's Conv1D stores the transpose
        dense, mask_a, mask_b = dense.t(), mask_a.t(), mask_b.t()
    fig = plots.plot_weight_views(dense.masked_fill(mask_a, 0), dense.masked_fill(mask_b, 0), mask_a, mask_b,
                                  (first, second), f"{linear}: {first} and {second} · {title}")
    return fig, difference_table(mask_a, mask_b, first, second)


def jaccard_figure(matrix: pd.DataFrame, set_domains: dict[str, str], baseline: float, title: str) -> Any:
    """The whole-model Jaccard matrix, sets labelled with their domains, lines between domain blocks."""
    n = len(matrix)
    fig, ax = plots.new_figure(figsize=(1.6 + 0.55 * n, 1.2 + 0.5 * n))
    image = ax.imshow(matrix.values, cmap="viridis", vmin=min(baseline, float(np.nanmin(matrix.values))), vmax=1)
    for (i, j), value in np.ndenumerate(matrix.values):
        ax.text(j, i, f"{value:.3f}", ha="center", va="center", color="white" if value < 0.8 else "black",
                fontsize=7)
    labels = [f"{name} ({set_domains[name]})" for name in matrix.index]
    ax.set_xticks(range(n), labels, rotation=35, ha="right", fontsize=7)
    ax.set_yticks(range(n), labels, fontsize=7)
    edges = [i for i in range(1, n) if set_domains[matrix.index[i]] != set_domains[matrix.index[i - 1]]]
    for edge in edges:  # domain blocks: same-domain pairs lie inside them
        ax.axhline(edge - 0.5, color="white", linewidth=1.5)
        ax.axvline(edge - 0.5, color="white", linewidth=1.5)
    ax.grid(False)
    fig.colorbar(image, ax=ax, label=f"Jaccard of pruned positions (random masks: {baseline:.3f})")
    ax.set_title(title, fontsize=9)
    return fig


def same_vs_cross_figure(table: pd.DataFrame, title: str) -> Any:
    """Every pair's whole-model Jaccard per group, same-domain against cross-domain, with their means and the
    random-mask baseline (``table``: the :func:`domain_pairs` of all groups)."""
    fig, ax = plots.new_figure(figsize=(1.8 + 1.3 * table.group.nunique(), 3.6))
    groups = list(dict.fromkeys(table.group))
    for offset, (same, colour, label) in enumerate([(True, "tab:green", "same domain"),
                                                    (False, "tab:grey", "cross domain")]):
        rows = table[table.same_domain == same]
        x = [groups.index(g) + (offset - 0.5) * 0.3 for g in rows.group]
        ax.scatter(x, rows.jaccard, s=12, color=colour, alpha=0.7, label=label)
        means = rows.groupby("group", sort=False).jaccard.mean()
        ax.scatter([groups.index(g) + (offset - 0.5) * 0.3 for g in means.index], means.values, marker="_",
                   s=400, color=colour)
    baselines = table.groupby("group", sort=False).baseline.mean()
    ax.scatter([groups.index(g) for g in baselines.index], baselines.values, marker="x", color="black",
               label="random masks")
    ax.set_xticks(range(len(groups)), groups, rotation=20, ha="right", fontsize=7)
    ax.set_ylabel("whole-model Jaccard of a pair")
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=9)
    return fig

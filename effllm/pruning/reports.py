"""Reading masks: the sparsity report, the Jaccard similarity of two sub-models' pruned positions (seed 002),
and where two mask sets differ."""

from __future__ import annotations

import math
import re
from typing import Any

import torch
from torch import nn

from effllm.adapters import get_adapter
from effllm.pruning.masks import MaskMismatchError

# --------------------------------------------------------------------------------------------------
# Reporting


def linear_roles(model: nn.Module) -> dict[str, tuple[int, str]]:
    """Qualified name of every prunable linear -> (layer index, kind: q/k/v/o/qkv/gate/up/down)."""
    adapter = get_adapter(model)
    names = {id(module): name for name, module in model.named_modules()}
    roles = {}
    for i in range(adapter.num_layers):
        for kind, module in {**adapter.attention_projections(i), **adapter.mlp_projections(i)}.items():
            roles[names[id(module)]] = (i, kind)
    return roles


def sparsity_report(model: nn.Module, masks: dict[str, torch.Tensor]) -> Any:
    """One row per masked linear: name, layer, kind (q/k/v/o/qkv/gate/up/down), zeros (weights that are
    exactly zero now), masked, total, sparsity (zeros / total)."""
    import pandas as pd

    roles = linear_roles(model)
    modules = dict(model.named_modules())
    rows = []
    for name, mask in masks.items():
        module = modules[name]
        layer, kind = roles.get(name, (None, "other"))
        zeros = int((module.weight == 0).sum())
        rows.append({"name": name, "layer": layer, "kind": kind, "zeros": zeros, "masked": int(mask.sum()),
                     "total": module.weight.numel(), "sparsity": zeros / module.weight.numel()})
    return pd.DataFrame(rows, columns=["name", "layer", "kind", "zeros", "masked", "total", "sparsity"])


# --------------------------------------------------------------------------------------------------
# Mask similarity (seed 002): Jaccard of the pruned positions of two sub-models

JACCARD_LEVELS = ("linear", "layer", "model")


def random_mask_jaccard(sparsity_a: float, sparsity_b: float | None = None) -> float:
    """Expected Jaccard of two independent uniformly random masks pruning ``sparsity_a`` and ``sparsity_b``
    of the weights: p_a p_b / (p_a + p_b - p_a p_b); 1/3 for two 50% masks. The baseline to beat."""
    p, q = sparsity_a, sparsity_a if sparsity_b is None else sparsity_b
    union = p + q - p * q
    return p * q / union if union else math.nan


def mask_jaccard(
    masks_a: dict[str, torch.Tensor], masks_b: dict[str, torch.Tensor], roles: dict[str, tuple[int, str]] | None = None
) -> Any:
    """Jaccard J = |A and B| / |A or B| of the pruned positions, one row per linear both mask sets hold:
    name, layer, kind, intersection, union, jaccard (NaN when neither prunes anything there).

    ``roles`` (from :func:`linear_roles`) gives layer and kind; without it the layer is the first integer
    in the name and the kind its last part. Pool rows with :func:`jaccard_levels`."""
    import pandas as pd

    if set(masks_a) != set(masks_b):
        only_a, only_b = sorted(set(masks_a) - set(masks_b)), sorted(set(masks_b) - set(masks_a))
        raise MaskMismatchError(
            f"The two mask sets name different linears (only in the first: {only_a[:3]}, only in the second: "
            f"{only_b[:3]}); compare masks of the same model."
        )
    rows = []
    for name, mask_a in masks_a.items():
        mask_b = masks_b[name]
        if mask_a.shape != mask_b.shape:
            raise MaskMismatchError(f"Masks of {name!r} differ in shape: {tuple(mask_a.shape)} and {tuple(mask_b.shape)}.")
        intersection = int((mask_a & mask_b).sum())
        union = int((mask_a | mask_b).sum())
        if roles is not None and name in roles:
            layer, kind = roles[name]
        else:
            numbers = re.findall(r"\.(\d+)\.", f".{name}.")
            layer, kind = (int(numbers[0]) if numbers else None), name.rsplit(".", 1)[-1]
        rows.append({"name": name, "layer": layer, "kind": kind, "intersection": intersection, "union": union,
                     "jaccard": intersection / union if union else math.nan})
    return pd.DataFrame(rows, columns=["name", "layer", "kind", "intersection", "union", "jaccard"])


def jaccard_levels(per_linear: Any) -> Any:
    """Per-linear rows of :func:`mask_jaccard` pooled per layer and for the whole model (sums of
    intersections over sums of unions, so big matrices weigh more): rows with level = linear | layer |
    model, name, layer, intersection, union, jaccard."""
    import pandas as pd

    linear = per_linear.assign(level="linear")
    layer = per_linear.groupby("layer", as_index=False)[["intersection", "union"]].sum()
    layer = layer.assign(level="layer", name=[f"layer {i}" for i in layer.layer], kind="all")
    model = pd.DataFrame([{"level": "model", "name": "model", "layer": None, "kind": "all",
                           "intersection": int(per_linear.intersection.sum()), "union": int(per_linear.union.sum())}])
    table = pd.concat([linear, layer, model], ignore_index=True)
    table["jaccard"] = [i / u if u else math.nan for i, u in zip(table.intersection, table.union, strict=True)]
    return table[["level", "name", "layer", "kind", "intersection", "union", "jaccard"]]


def pairwise_jaccard(masks: dict[str, dict[str, torch.Tensor]], roles: dict[str, tuple[int, str]] | None = None) -> Any:
    """:func:`jaccard_levels` for every pair (a, b), a before b in ``masks`` (sub-model name -> its masks):
    a tidy table with columns a, b, level, name, layer, kind, intersection, union, jaccard."""
    import pandas as pd

    names = list(masks)
    if len(names) < 2:
        raise ValueError(f"Pairwise Jaccard needs at least two mask sets; got {len(names)} ({names}).")
    tables = []
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            table = jaccard_levels(mask_jaccard(masks[a], masks[b], roles))
            table.insert(0, "b", b)
            table.insert(0, "a", a)
            tables.append(table)
    return pd.concat(tables, ignore_index=True)


def jaccard_matrix(pairwise: Any, level: str = "model", name: str = "model") -> Any:
    """A symmetric sub-model x sub-model DataFrame of one row kind of :func:`pairwise_jaccard` (diagonal 1)."""
    import pandas as pd

    if level not in JACCARD_LEVELS:
        raise ValueError(f"level must be one of {', '.join(JACCARD_LEVELS)}; got {level!r}.")
    rows = pairwise[(pairwise.level == level) & (pairwise.name == name)]
    if rows.empty:
        raise ValueError(f"No {level} rows named {name!r} in this table (e.g. {pairwise.name.iloc[0]!r}).")
    names = list(dict.fromkeys([*pairwise.a, *pairwise.b]))
    matrix = pd.DataFrame(1.0, index=names, columns=names)
    for row in rows.itertuples():
        matrix.loc[row.a, row.b] = matrix.loc[row.b, row.a] = row.jaccard
    return matrix


# --------------------------------------------------------------------------------------------------
# Where two mask sets differ (the weight views in effllm.plots draw it)

# mask_difference codes
KEPT_BOTH, PRUNED_ONLY_A, PRUNED_ONLY_B, PRUNED_BOTH = 0, 1, 2, 3


def mask_difference(mask_a: torch.Tensor, mask_b: torch.Tensor) -> torch.Tensor:
    """Per weight: 0 kept by both, 1 pruned only in A, 2 pruned only in B, 3 pruned in both (int8, same shape)."""
    if mask_a.shape != mask_b.shape:
        raise ValueError(f"Masks of different shapes: {tuple(mask_a.shape)} and {tuple(mask_b.shape)}.")
    return mask_a.to(torch.int8) + 2 * mask_b.to(torch.int8)

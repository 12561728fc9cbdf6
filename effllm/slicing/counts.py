"""Parameter counts from the dense model's shapes (nothing is sliced): what SliceGPT with given fractions
leaves, what ShortGPT removing n layers leaves, and the equal-parameter baselines built on them."""

from __future__ import annotations

import torch
from torch import nn

from effllm.slicing.checks import check_family, check_mean, output_dims, sliced_dims


def _linear_count(linear: nn.Linear, d_in: int | None = None, d_out: int | None = None, bias: bool = False) -> int:
    out_features, in_features = linear.weight.shape
    out_features = out_features if d_out is None else d_out
    in_features = in_features if d_in is None else d_in
    return out_features * in_features + (out_features if bias or linear.bias is not None else 0)


def _has_shift(norm: nn.Module | None) -> bool:
    return getattr(norm, "bias", None) is not None


def sliced_parameter_count(model: nn.Module, fractions: torch.Tensor | list[float], slice_head: bool = False) -> int:
    """The number of parameters :func:`slice_model` with ``fractions`` (and ``slice_head``) would leave in this
    (dense) model.

    Follows the surgery step by step: embeddings (and OPT's positions) keep layer 0's d_0 columns; layer
    l's q/k/v read d_l, its attention output and MLP input live in d_l, its MLP output in d_{l+1}; every
    layer gains shortcuts d_l x d_l and d_l x d_{l+1} and two RMSNorms; the untied LM head and the final norm
    read the full D (the last layer writes D), or with ``slice_head`` the last d. Folding a LayerNorm's bias
    (OPT) gives the linears it feeds a bias.
    """
    adapter = check_family(model, "slicegpt")
    n_layers = adapter.num_layers
    if len(fractions) != n_layers:
        raise ValueError(f"fractions has {len(fractions)} entries; the model has {n_layers} layers (one each).")
    dims = sliced_dims(fractions, adapter.hidden_size)
    d_outs = output_dims(dims, adapter.hidden_size, slice_head)
    total = adapter.embed_tokens.weight.shape[0] * dims[0]
    if model.config.model_type == "opt":
        total += adapter.decoder.embed_positions.weight.shape[0] * dims[0]
    for i in range(n_layers):
        d_in = d_mid = dims[i]
        d_out = d_outs[i]
        attention, mlp, norms = adapter.attention_projections(i), adapter.mlp_projections(i), adapter.norms(i)
        total += sum(_linear_count(attention[k], d_in=d_in, bias=_has_shift(norms["attention"])) for k in "qkv")
        total += _linear_count(attention["o"], d_out=d_mid)
        total += sum(_linear_count(m, d_in=d_mid, bias=_has_shift(norms["mlp"])) for k, m in mlp.items() if k != "down")
        total += _linear_count(mlp["down"], d_out=d_out)
        total += d_in + d_mid  # the two RMSNorms
        total += d_in * d_mid + d_mid * d_out  # the two shortcut matrices
    d_head = d_outs[-1]
    total += d_head + _linear_count(adapter.lm_head, d_in=d_head, bias=_has_shift(adapter.final_norm))
    return total


def unique_parameters(module: nn.Module) -> int:
    """Parameters of ``module``, a tensor shared by two modules (a tied head) counted once."""
    return sum(p.numel() for p in module.parameters())  # parameters() skips shared (tied) tensors


def shortgpt_parameter_count(model: nn.Module, n_remove: int) -> int:
    """The number of parameters left after removing ``n_remove`` decoder layers (all layers of the
    supported families have the same size, so which ones does not matter)."""
    adapter = check_family(model, "shortgpt")
    n_layers = adapter.num_layers
    if not 0 <= n_remove < n_layers:
        raise ValueError(f"n_remove must be in [0, {n_layers - 1}] (the model has {n_layers} layers); got {n_remove}.")
    sizes = {unique_parameters(adapter.layer(i)) for i in range(n_layers)}
    if len(sizes) != 1:
        raise ValueError(f"the layers differ in size ({sorted(sizes)}); the count depends on which are removed.")
    return unique_parameters(model) - n_remove * sizes.pop()


def equal_parameter_shortgpt_layers(
    model: nn.Module, mean: float | None = None, fractions: torch.Tensor | list[float] | None = None,
    slice_head: bool = False,
) -> int:
    """How many layers ShortGPT must remove so that the model's parameter count comes as close as possible
    to SliceGPT's with ``fractions`` (or constant ``mean``, and ``slice_head``): the baseline "at equal
    parameter count".

    Ties go to removing fewer layers. The answer can be 0: SliceGPT unties the LM head and adds shortcut
    matrices, so light slicing of a small model with a large vocabulary saves fewer parameters than one
    layer holds.
    """
    adapter = check_family(model, "slicegpt")
    if (mean is None) == (fractions is None):
        raise ValueError("give either mean (constant slicing) or fractions (one per layer), not both.")
    if fractions is None:
        check_mean(mean)
        fractions = [float(mean)] * adapter.num_layers
    target = sliced_parameter_count(model, fractions, slice_head)
    gaps = [abs(shortgpt_parameter_count(model, n) - target) for n in range(adapter.num_layers)]
    return min(range(len(gaps)), key=lambda n: (gaps[n], n))


def equal_parameter_constant_fraction(model: nn.Module, fractions: torch.Tensor | list[float],
                                      slice_head: bool = False) -> float:
    """The constant slice fraction whose SliceGPT model comes closest in parameter count to slicing with
    ``fractions`` (e.g. a dynamic vector), both with ``slice_head``: constant slicing "at equal parameter count",
    the like-for-like baseline when a dynamic vector and the constant one of the same mean differ in size (the
    shortcut matrices are quadratic in each layer's width).

    The kept width d = round((1 - p) D) is an integer, so the candidates are p = 1 - d / D for d = 1..D; the
    count grows with d, found by bisection; ties go to the larger model (the harder baseline)."""
    adapter = check_family(model, "slicegpt")
    hidden = adapter.hidden_size
    target = sliced_parameter_count(model, fractions, slice_head)
    n_layers = adapter.num_layers

    def count(d: int) -> int:
        return sliced_parameter_count(model, [1 - d / hidden] * n_layers, slice_head)

    low, high = 1, hidden  # smallest d with count(d) >= target, or hidden when none reaches it
    while low < high:
        middle = (low + high) // 2
        if count(middle) >= target:
            high = middle
        else:
            low = middle + 1
    best = low if low == 1 or abs(count(low) - target) <= abs(count(low - 1) - target) else low - 1
    return 1 - best / hidden

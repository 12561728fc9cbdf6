"""Pruning a model layer by layer: collect each layer's input statistics, score, mask, move on (``prune``)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers.pytorch_utils import Conv1D

from effllm import records
from effllm.adapters import get_adapter
from effllm.capture import LayerByLayer, capture_inputs
from effllm.models import check_complete, mark_incomplete
from effllm.pruning.scores import check_arguments, magnitude_mask, sparsegpt_prune, wanda_mask

# --------------------------------------------------------------------------------------------------
# Pruning a model


def _stored_mask(module: nn.Module, mask: torch.Tensor) -> torch.Tensor:
    """A mask [out, in] in the module weight's own layout (Conv1D stores [in, out])."""
    return mask.t().contiguous() if isinstance(module, Conv1D) else mask


def _input_statistics(
    runner: LayerByLayer, i: int, linears: dict[str, nn.Module], method: str
) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """Run layer ``i`` once and sum each linear's input statistics over all calibration tokens: Wanda needs
    sum_t x_tj^2 per input column [in], SparseGPT sum_t x_t x_t^T [in, in]. Also returns the token counts."""
    statistics: dict[str, torch.Tensor] = {}
    tokens: dict[str, int] = {}

    def accumulate(name: str, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()  # [tokens, in]
        stat = x.pow(2).sum(0) if method == "wanda" else x.t() @ x
        statistics[name] = statistics[name] + stat if name in statistics else stat
        tokens[name] = tokens.get(name, 0) + x.shape[0]

    with capture_inputs(linears, accumulate):
        runner.run(i)
    return statistics, tokens


@torch.no_grad()
def prune(
    model: nn.Module,
    method: str,
    sparsity: float | None,
    pattern: str = "unstructured",
    calibration: torch.LongTensor | None = None,
    batch_size: int = 8,
    progress: bool = True,
    **method_kwargs: Any,
) -> dict[str, torch.Tensor]:
    """Prune ``model`` in place; return its masks (qualified name -> bool [weight shape], True = zeroed, on CPU).

    ``method``: "magnitude" (no calibration needed; ``calibration`` is ignored), "wanda" or "sparsegpt"
    (``calibration`` token ids [n_samples, seq_len] required). ``sparsity`` in [0, 1); with an N:M
    ``pattern`` ("2:4", "4:8") pass None or N/M. Options: magnitude ``per_row=True``; sparsegpt
    ``blocksize=128, percdamp=0.01``. All arguments are checked before any weight changes. A failure or
    Ctrl-C after the first weight changed leaves the layers below pruned: the model is then marked, and
    ``prune``, ``slice_model``, ``save_pruned`` and ``save_sliced`` refuse it with a message that says where
    it stopped (:class:`effllm.models.IncompleteModelError`); reload it.
    """
    check_complete(model, "prune this model")
    sparsity, n_m, options = check_arguments(model, method, sparsity, pattern, calibration, method_kwargs)
    adapter = get_adapter(model)
    runner = None if method == "magnitude" else LayerByLayer(model, calibration, batch_size=batch_size)
    masks: dict[str, torch.Tensor] = {}
    n_layers, layer, changed = adapter.num_layers, 0, False
    try:
        for layer in tqdm(range(n_layers), desc=f"{method} {pattern}", unit="layer", disable=not progress):
            linears = adapter.linears(layer)
            if runner is not None:
                statistics, tokens = _input_statistics(runner, layer, linears, method)
            for name, module in linears.items():
                weight = adapter.weight(module)  # [out, in]
                if method == "magnitude":
                    mask = magnitude_mask(weight, sparsity, n_m, per_row=options["per_row"])
                elif method == "wanda":
                    mask = wanda_mask(weight, statistics.pop(name), sparsity, n_m)
                else:
                    hessian = 2 * statistics.pop(name) / tokens[name]
                    new_weight, mask = sparsegpt_prune(weight, hessian, sparsity, n_m, **options)
                    changed = True
                    weight.copy_(new_weight.to(weight.dtype))
                stored = _stored_mask(module, mask)
                changed = True
                module.weight[stored] = 0
                masks[name] = stored.cpu()
            if runner is not None:
                runner.advance(layer)  # the next layer is calibrated on this pruned layer's outputs
    except BaseException as error:
        # Undoing would need a copy of every weight pruned so far (SparseGPT changes all of a layer's weights,
        # Wanda zeroes half of them): as much memory as the model's linears. The model is marked instead.
        if runner is not None:
            try:
                runner.offload()  # the layer on the compute device goes back where it lives
            except Exception:  # noqa: S110 - the first error is the one to report
                pass
        if changed:
            mark_incomplete(model, (
                f"pruning ({method} {pattern}, sparsity {sparsity:g}) was interrupted at layer {layer} of {n_layers} "
                f"(0-based) by {type(error).__name__}: layers 0-{layer - 1} are pruned and layer {layer} may be "
                "partly; the model is partly pruned: reload it (effllm.models.load_model) and prune again"
                if layer else
                f"pruning ({method} {pattern}, sparsity {sparsity:g}) was interrupted in layer 0 of {n_layers} by "
                f"{type(error).__name__}: layer 0 may be partly pruned: reload it (effllm.models.load_model) and "
                "prune again"))
        raise
    records.PRUNING.set(model, {"method": method, "sparsity": sparsity, "pattern": pattern,
                                                  "options": options, "masks": masks})
    return masks



"""``slice_model``: the entry point of SliceGPT (constant or dynamic fractions) and ShortGPT layer removal, with
every input checked before the model is touched and the settings recorded on the model (``records.SLICING``)."""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import nn

from effllm import records
from effllm.adapters import ArchitectureAdapter
from effllm.capture import check_calibration
from effllm.models import check_complete, mark_incomplete
from effllm.slicing.checks import check_family, check_mean, check_scores, sliced_dims
from effllm.slicing.scores import layer_scores, slice_fractions
from effllm.slicing.shortgpt import remove_layers
from effllm.slicing.slicegpt import rotate_and_slice


def _shortgpt(model: nn.Module, adapter: ArchitectureAdapter, calibration: torch.Tensor, mean: float,
              scores: torch.Tensor | None, batch_size: int) -> nn.Module:
    n_layers = adapter.num_layers
    check_mean(mean)
    scores = check_scores(scores, n_layers, "bi")
    n_remove = round(mean * n_layers)
    if n_remove >= n_layers:
        raise ValueError(f"mean={mean} removes all {n_layers} layers; use a smaller mean.")
    influence = layer_scores(model, calibration, kind="bi", batch_size=batch_size) if scores is None else scores
    remove = sorted(torch.argsort(influence, stable=True)[:n_remove].tolist())
    remove_layers(model, adapter, remove)
    record_settings(model, {"method": "shortgpt", "mean": mean, "removed_layers": remove,
                            "original_num_layers": n_layers})
    return model


def slice_model(
    model: nn.Module,
    calibration: torch.Tensor,
    mean: float | None = None,
    fractions: torch.Tensor | list[float] | None = None,
    method: Literal["slicegpt", "shortgpt"] = "slicegpt",
    amplitude: float | None = None,
    batch_size: int = 8,
    scores: torch.Tensor | None = None,
    slice_head: bool = False,
) -> nn.Module:
    """Slice ``model`` in place with SliceGPT, or remove layers with ShortGPT, and return it.

    SliceGPT: ``fractions`` gives one slice fraction per layer (0 = keep every dimension); ``mean``
    alone slices every layer by ``mean``; ``mean`` with ``amplitude`` slices dynamically by layer
    redundancy (:func:`slice_fractions` of :func:`layer_scores` ``kind="lr"``). ShortGPT: removes the
    round(mean * L) layers of lowest Block Influence. ``calibration``: token ids [n_samples, seq_len].
    ``scores``: this model's :func:`layer_scores` (LR for dynamic slicing, BI for ShortGPT) when they are
    already computed, to save a calibration pass. Every input is checked before the model is touched.
    The settings are recorded on the model (``records.SLICING``) (and written by :func:`save_sliced`).

    ``slice_head``: SliceGPT's ``do_slice_head``. False (the default, as the authors' code runs it: DynamicSlicing
    ``src/slicegpt/rotate.py:161, 271-274``): the last layer's output, the final norm and the LM head stay at the
    full width D, so layer L-1's fraction slices its input and middle signal only. True: they keep layer L-1's
    d_{L-1} directions (what effllm did before).

    All or nothing: ShortGPT puts every removed layer back if it is interrupted (Ctrl-C, an error) part-way;
    SliceGPT cannot be undone without a copy of the whole model, so an interrupted SliceGPT marks the model,
    and ``slice_model``, ``prune``, ``save_sliced`` and ``save_pruned`` refuse it with a message that says
    where it stopped (:class:`effllm.models.IncompleteModelError`): reload it.
    """
    check_complete(model, "slice this model")
    if method not in ("slicegpt", "shortgpt"):
        raise ValueError(f"method must be 'slicegpt' or 'shortgpt'; got {method!r}.")
    adapter = check_family(model, method)
    check_calibration(model, calibration)
    n_layers = adapter.num_layers

    if method == "shortgpt":
        if mean is None or fractions is not None or amplitude is not None or slice_head:
            raise ValueError("shortgpt takes mean = the fraction of layers to remove (no fractions, no amplitude, "
                             "no slice_head).")
        return _shortgpt(model, adapter, calibration, mean, scores, batch_size)

    if (mean is None) == (fractions is None):
        raise ValueError("give either mean (constant, or dynamic with amplitude) or fractions (one per layer), not both.")
    if fractions is None:
        check_mean(mean)
        if amplitude is None:
            fractions = [float(mean)] * n_layers
        else:
            scores = check_scores(scores, n_layers, "lr")
            if scores is None:
                scores = layer_scores(model, calibration, "lr", batch_size)
            fractions = slice_fractions(scores, mean, amplitude)
    elif amplitude is not None:
        raise ValueError("amplitude goes with mean (dynamic slicing); with explicit fractions leave it out.")
    if len(fractions) != n_layers:
        raise ValueError(f"fractions has {len(fractions)} entries; the model has {n_layers} layers (one each).")
    dims = sliced_dims(fractions, adapter.hidden_size)
    where = {"step": "while folding the norms into the linears"}
    try:
        rotate_and_slice(model, calibration, dims, batch_size, where, slice_head=slice_head)
    except BaseException as error:
        mark_incomplete(model, f"slicing (SliceGPT, mean {sum(dims) / len(dims) / adapter.hidden_size:.3g} of "
                               f"the width kept) was interrupted {where['step']} by {type(error).__name__}; the "
                               "model is partly sliced: reload it (effllm.models.load_model) and slice again")
        raise
    record_settings(model, {"method": "slicegpt", "mean": mean, "amplitude": amplitude,
                            "fractions": [float(p) for p in fractions], "dims": dims, "slice_head": bool(slice_head)})
    return model


def record_settings(model: nn.Module, settings: dict[str, Any]) -> None:
    records.SLICING.set(model, settings)

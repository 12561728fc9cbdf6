"""Layer scores from the cosine between each decoder layer's input and output (Layer Redundancy of dynamic
slicing, ShortGPT's Block Influence), the slice fractions of dynamic slicing, and the authors' amplitude grid.

Which state of the *last* layer is compared with its input: the authors' LR code reads HF's
``output_hidden_states``, whose last entry comes after the final norm, so their last layer's score compares its
input with final_norm(output) (DynamicSlicing ``short_hf.py:76-88`` pairs ``hiddens[i]`` with ``hiddens[i+1]``
of the ``output_hidden_states=True`` forward at ``short_hf.py:137-141``; ``calculate_LR.py:82-87`` min-max
normalises the sums). The paper's text describes the raw output. Both are here (``last_layer``).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from torch import nn

from effllm.capture import LayerByLayer, check_calibration
from effllm.slicing.checks import check_mean

LAST_LAYER_STATES = ("normed", "raw")
DEFAULT_LAST_LAYER = {"lr": "normed", "bi": "raw"}  # LR as the authors' code computes it; BI as before
AMPLITUDE_STEP = 0.02  # DynamicSlicing experiments/mean_cut_accuracy_experiments.py:69


def minmax(values: torch.Tensor) -> torch.Tensor:
    """Scale to [0, 1]; a constant vector (nothing to rank) maps to zeros."""
    spread = values.max() - values.min()
    if spread == 0:
        return torch.zeros_like(values)
    return (values - values.min()) / spread


def _normed_outputs(runner: LayerByLayer, outputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """The last layer's outputs after the final norm, as HF's ``hidden_states[-1]`` holds them."""
    normed = [runner.adapter.normed(out).to(out.device) for out in outputs]
    if normed and normed[0].shape != outputs[0].shape:
        raise ValueError(
            f"the model's final norm changes the width ({outputs[0].shape[-1]} -> {normed[0].shape[-1]}, e.g. "
            "OPT's project_out): the last layer's normed output cannot be compared with its input; "
            "use last_layer='raw'."
        )
    return normed


@torch.no_grad()
def layer_scores(
    model: nn.Module,
    calibration: torch.Tensor,
    kind: Literal["lr", "bi"] = "lr",
    batch_size: int = 8,
    last_layer: Literal["normed", "raw"] | None = None,
) -> torch.Tensor:
    """One score per decoder layer from the cosine between its input and output states, float64 [L].

    ``kind="lr"``: Layer Redundancy, v_i = 1 - minmax(sum over tokens of (1 - cos(h_{i-1}, h_i))), so
    1 marks the most redundant layer (the one that changes its input least). ``kind="bi"``: ShortGPT's
    Block Influence, BI_i = 1 - mean over tokens of cos(x_i, x_{i+1}); low BI = little influence.

    ``last_layer``: the state of the last layer compared with its input. ``"normed"``: final_norm(output),
    what the authors' code runs (HF's ``hidden_states[-1]`` is after the final norm: DynamicSlicing
    ``short_hf.py:76-88, 137-141``, ``calculate_LR.py:82-87``), the default for LR. ``"raw"``: the layer's own
    output, what the paper's text describes, the default for BI (ShortGPT removal as effllm has run it).
    Every other layer's score is the same either way.
    """
    if kind not in ("lr", "bi"):
        raise ValueError(f"kind must be 'lr' (layer redundancy) or 'bi' (block influence); got {kind!r}.")
    last_layer = DEFAULT_LAST_LAYER[kind] if last_layer is None else last_layer
    if last_layer not in LAST_LAYER_STATES:
        raise ValueError(f"last_layer must be one of {LAST_LAYER_STATES} (or None: {DEFAULT_LAST_LAYER}); "
                         f"got {last_layer!r}.")
    check_calibration(model, calibration)
    runner = LayerByLayer(model, calibration, batch_size=batch_size)
    distance = torch.zeros(runner.num_layers, dtype=torch.float64)  # sum over tokens of (1 - cos)
    n_tokens = sum(state.shape[0] * state.shape[1] for state in runner.states)
    for i in range(runner.num_layers):
        outputs = runner.run(i)
        compared = outputs
        if i == runner.num_layers - 1 and last_layer == "normed":
            compared = _normed_outputs(runner, outputs)
        for before, after in zip(runner.states, compared, strict=True):
            cos = torch.nn.functional.cosine_similarity(before.double(), after.double(), dim=-1)
            distance[i] += (1 - cos).sum()
        runner.advance(i, outputs)
    if kind == "bi":
        return distance / n_tokens
    return 1 - minmax(distance)


def slice_fractions(scores: torch.Tensor, mean: float, amplitude: float) -> torch.Tensor:
    """Per-layer slice fractions p_i = (M - A) + A * u_i / mean(u), u = minmax(scores), float64 [L].

    mean(p) = M by construction; ``amplitude`` A = 0 is constant slicing. The more redundant a layer
    (higher score), the more of it is sliced. All-equal scores give constant slicing.
    """
    check_mean(mean)
    scores = torch.as_tensor(scores, dtype=torch.float64)
    if scores.dim() != 1 or scores.numel() == 0:
        raise ValueError(f"scores must be a non-empty 1-D tensor (one per layer); got shape {tuple(scores.shape)}.")
    if amplitude < 0:
        raise ValueError(f"amplitude must be >= 0 (0 = constant slicing); got {amplitude}.")
    u = minmax(scores)
    if amplitude == 0 or u.mean() == 0:
        return torch.full_like(u, float(mean))
    fractions = (mean - amplitude) + amplitude * u / u.mean()
    if fractions.min() < 0 or fractions.max() >= 1:
        raise ValueError(
            f"mean={mean}, amplitude={amplitude} give slice fractions from {fractions.min():.4f} to "
            f"{fractions.max():.4f}; every fraction must lie in [0, 1). Use a smaller amplitude "
            f"(at most mean={mean} keeps the least redundant layer at >= 0)."
        )
    return fractions


def amplitude_grid(mean: float) -> list[float]:
    """The amplitudes A the authors sweep at mean slice fraction M: ``np.arange(0, M + 0.01, 0.02)``
    (DynamicSlicing ``experiments/mean_cut_accuracy_experiments.py:69``), A = 0 (constant slicing) first;
    at M = 0.3: 0, 0.02, ..., 0.30 (16 values); at M = 0.35 it ends at 0.34.

    Two departures, both at the edge: each value is rounded to 12 decimals (``arange`` accumulates its
    steps: 0.30000000000000004 would put the least redundant layer at M - A = -6e-17, which
    :func:`slice_fractions` refuses), and an A above M (``arange``'s end M + 0.01 lets one in when M is not
    on the 0.02 grid, e.g. M = 0.335 -> 0.34) is left out, since it gives that layer a negative fraction.
    """
    check_mean(mean)
    grid = np.round(np.arange(0, mean + 0.01, AMPLITUDE_STEP), 12)
    return [float(a) for a in grid if a <= mean]

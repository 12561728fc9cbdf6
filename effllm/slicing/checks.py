"""Input checks of slicing, all run before anything is modified: the mean slice fraction, the model family, the
per-layer fractions (and the kept widths they give), and precomputed layer scores."""

from __future__ import annotations

import torch
from torch import nn

from effllm.adapters import ArchitectureAdapter, UnsupportedArchitectureError, get_adapter
from effllm.slicing.layers import is_sliced

SLICEGPT_FAMILIES = ("llama", "mistral", "qwen2", "opt")
SHORTGPT_FAMILIES = ("llama", "mistral", "qwen2", "gemma3_text", "opt")


def check_mean(mean: float) -> None:
    if not 0 <= mean < 1:
        raise ValueError(f"mean slice fraction M must be in [0, 1); got {mean}. M = 0.25 slices 25%.")


def check_family(model: nn.Module, method: str) -> ArchitectureAdapter:
    """The adapter of a model that ``method`` ("slicegpt" or "shortgpt") can slice, else a clear error."""
    allowed = SLICEGPT_FAMILIES if method == "slicegpt" else SHORTGPT_FAMILIES
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in allowed:
        raise UnsupportedArchitectureError(
            f"{method} supports model types {', '.join(allowed)}; got {model_type!r}. "
            + ("Gemma 3's sandwich norms (a norm on each branch output) are not foldable into a rotation. "
               if model_type == "gemma3_text" and method == "slicegpt" else "")
            + "Use a supported model (e.g. smollm2-135m or tiny-llama)."
        )
    adapter = get_adapter(model)
    if is_sliced(model):
        raise ValueError(
            "This model is already sliced with SliceGPT (its layers carry shortcut matrices); slicing it again "
            "is not supported. Slice the original model with the fractions you want instead."
        )
    if model_type == "opt" and method == "slicegpt":
        decoder = adapter.decoder
        if not model.config.do_layer_norm_before or decoder.project_in is not None or decoder.project_out is not None:
            raise UnsupportedArchitectureError(
                "SliceGPT needs a pre-norm OPT without project_in/project_out (opt-350m is post-norm and "
                "projects its embeddings); use another OPT size."
            )
    return adapter


def sliced_dims(fractions: torch.Tensor | list[float], hidden_size: int) -> list[int]:
    """Kept dimensions d_l = round((1 - p_l) * D) per layer, after checking every fraction."""
    fractions = torch.as_tensor(fractions, dtype=torch.float64)
    if fractions.dim() != 1:
        raise ValueError(f"fractions must be a 1-D vector (one per layer); got shape {tuple(fractions.shape)}.")
    bad = [(i, float(p)) for i, p in enumerate(fractions) if not 0 <= p < 1]
    if bad:
        raise ValueError(f"slice fractions must be in [0, 1) (0 = keep every dimension); got {bad} (layer, fraction).")
    dims = [round((1 - float(p)) * hidden_size) for p in fractions]
    empty = [i for i, d in enumerate(dims) if d < 1]
    if empty:
        raise ValueError(
            f"fractions leave layers {empty} no dimension of the {hidden_size} (d = round((1 - p) * D) = 0); "
            "use smaller fractions for them."
        )
    return dims


def output_dims(dims: list[int], hidden_size: int, slice_head: bool) -> list[int]:
    """Each layer's output width: the next layer's d_{l+1}; the last layer's is the full D unless the head is
    sliced (then d_{L-1}), as SliceGPT's ``do_slice_head`` (DynamicSlicing ``src/slicegpt/rotate.py:271-274``)."""
    return dims[1:] + [dims[-1] if slice_head else hidden_size]


def check_scores(scores: torch.Tensor | None, n_layers: int, kind: str) -> torch.Tensor | None:
    """Precomputed layer scores as float64 [n_layers], or None when none were given."""
    if scores is None:
        return None
    scores = torch.as_tensor(scores, dtype=torch.float64)
    if scores.shape != (n_layers,) or not torch.isfinite(scores).all():
        raise ValueError(
            f"scores must be {n_layers} finite numbers (layer_scores(model, calibration, kind={kind!r}) of this "
            f"model); got shape {tuple(scores.shape)}."
        )
    return scores

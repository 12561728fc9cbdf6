"""Masks: checking that they fit a model, applying them, saving and loading them (alone, or with the pruned
model in a sealed folder)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from effllm import io, models, records
from effllm.adapters import get_adapter
from effllm.models import check_complete

MASKS_FILE = "pruning_masks.safetensors"
MASKS_FORMAT = "effllm-masks/2"
MASKS_KIND = "effllm-masks"  # effllm.io kinds: a masks file (with its sidecar), a saved pruned-model folder
PRUNED_KIND = "effllm-pruned"


class MaskMismatchError(ValueError):
    """Masks that do not fit a model (another architecture, other layer names or weight shapes)."""



# --------------------------------------------------------------------------------------------------
# Masks: checking, applying, saving


def mask_target(model: nn.Module, names: list[str] | None = None) -> dict[str, Any]:
    """What masks must agree with: model_type, layer count, the weight shape of each named linear (default:
    every prunable linear) and :func:`effllm.models.fingerprint` of the weights pruning leaves alone, so that
    masks bind to the model they came from, not only to its shapes."""
    adapter = get_adapter(model)
    modules = dict(model.named_modules())
    if names is None:
        names = [name for i in range(adapter.num_layers) for name in adapter.linears(i)]
    return {
        "model_type": adapter.config.model_type,
        "num_layers": adapter.num_layers,
        "weights": {name: list(modules[name].weight.shape) for name in names if name in modules},
        "weights_sha256": models.fingerprint(model),
    }


def _check_mask_values(masks: dict[str, torch.Tensor]) -> None:
    """Every mask is a bool tensor whose bytes are 0 or 1. A bool tensor read from corrupt bytes holds other
    values, which indexing treats as True: such masks are refused, not used."""
    for name, mask in masks.items():
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            kind = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise MaskMismatchError(f"Mask {name!r} is {kind}; masks must be bool tensors (True = zeroed).")
        raw = mask.detach().contiguous().view(torch.uint8)
        if raw.numel() and int(raw.max()) > 1:
            bad = int((raw > 1).sum())
            raise MaskMismatchError(
                f"Mask {name!r} holds {bad} of {raw.numel()} bytes that are neither 0 nor 1: corrupt mask data. "
                "Load the masks from an intact file (or prune again)."
            )


def check_masks(model: nn.Module, masks: dict[str, torch.Tensor], fingerprint: dict[str, Any] | None = None) -> None:
    """Raise :class:`MaskMismatchError` unless every mask is a clean bool tensor naming a module of ``model``
    with a weight of the mask's shape, and, if given, the saved ``fingerprint`` (:func:`mask_target`)
    matches the model's type, depth and weights."""
    _check_mask_values(masks)
    adapter = get_adapter(model)
    if fingerprint is not None:
        here = (adapter.config.model_type, adapter.num_layers)
        saved = (fingerprint.get("model_type"), fingerprint.get("num_layers"))
        if here != saved:
            raise MaskMismatchError(
                f"These masks were saved for a {saved[0]} model with {saved[1]} layers; this model is a {here[0]} "
                f"model with {here[1]} layers. Use masks pruned from this model (or prune it again)."
            )
        saved_weights = fingerprint.get("weights_sha256")
        if saved_weights is not None and saved_weights != (here_weights := models.fingerprint(model)):
            raise MaskMismatchError(
                f"These masks were computed on another model: its embeddings and norms have fingerprint "
                f"{saved_weights[:12]}..., this model's {here_weights[:12]}... (another checkpoint of the same "
                "shapes, or the same one in another dtype). Use masks pruned from this model (or prune it again)."
            )
    modules = dict(model.named_modules())
    missing = [name for name in masks if name not in modules or not hasattr(modules[name], "weight")]
    if missing:
        raise MaskMismatchError(
            f"{len(missing)} of {len(masks)} masks name no weight of this {adapter.config.model_type} model "
            f"(first: {missing[0]!r}); masks for another model? Nothing was changed."
        )
    for name, mask in masks.items():
        shape = tuple(modules[name].weight.shape)
        if tuple(mask.shape) != shape:
            raise MaskMismatchError(
                f"Mask {name!r} has shape {tuple(mask.shape)}; the model's weight there is {shape} "
                "and masks must be bool of that shape. Masks for another model? Nothing was changed."
            )


@torch.no_grad()
def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> nn.Module:
    """Zero ``model``'s weights where ``masks`` are True. Every name and shape is checked first, so
    masks for another model raise :class:`MaskMismatchError` and leave the model untouched."""
    check_masks(model, masks)
    modules = dict(model.named_modules())
    for name, mask in masks.items():
        weight = modules[name].weight
        weight[mask.to(weight.device)] = 0
    return model


def save_masks(masks: dict[str, torch.Tensor], path: str | Path, model: nn.Module | None = None) -> Path:
    """Write ``masks`` to a safetensors file and its checksummed sidecar ``path.json`` (effllm.io); with
    ``model``, also the model's :func:`mask_target`, which :func:`load_masks` checks."""
    meta: dict[str, Any] = {"format": MASKS_FORMAT}
    if model is not None:
        check_masks(model, masks)
        meta["fingerprint"] = mask_target(model, list(masks))
    else:
        _check_mask_values(masks)
    return io.save_tensors(path, masks, meta, MASKS_KIND)


def load_masks(path: str | Path, model: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """Read masks written by :func:`save_masks` after checking the file against its sidecar's checksum
    (:class:`effllm.io.ArtifactError` when it was changed, cut short or never finished) and that every byte
    is 0 or 1; with ``model``, check that they fit it, its weights included (else :class:`MaskMismatchError`)."""
    masks, meta = io.load_tensors(path, MASKS_KIND)
    if meta.get("format") != MASKS_FORMAT:
        raise io.ArtifactError(f"{path} has masks format {meta.get('format')!r}; this effllm reads {MASKS_FORMAT!r}")
    _check_mask_values(masks)
    if model is not None:
        check_masks(model, masks, meta.get("fingerprint"))
    return masks


def save_pruned(
    model: nn.Module, folder: str | Path, masks: dict[str, torch.Tensor] | None = None, tokenizer: Any = None
) -> Path:
    """Save a pruned model (``save_pretrained``: config and weights), its masks, the tokenizer if given, and
    the pruning settings and fingerprint, sealed with one checksum over every file (effllm.io): the folder
    appears whole, in one rename, or not at all. ``masks`` defaults to those of the last :func:`prune` call on
    ``model``. An existing ``folder`` is replaced only when it is empty or an earlier saved pruned model."""
    check_complete(model, "save this model")
    recorded = records.PRUNING.get(model)
    if masks is None:
        if recorded is None:
            raise ValueError("This model was not pruned with effllm.pruning.prune here; pass its masks=... explicitly.")
        masks = recorded["masks"]
    check_masks(model, masks)
    folder = Path(folder)
    io.check_replaceable(folder, PRUNED_KIND)
    settings = {}
    if recorded is not None and masks is recorded["masks"]:  # the settings describe these masks
        settings = {key: value for key, value in recorded.items() if key != "masks"}
    info = {"format": MASKS_FORMAT, "fingerprint": mask_target(model, list(masks)), "pruning": settings}
    with io.staging(folder) as staging:
        model.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        io.save_tensors(staging / MASKS_FILE, masks, {"format": MASKS_FORMAT, "fingerprint": info["fingerprint"]},
                        MASKS_KIND)
        io.seal(staging, PRUNED_KIND, info)
    return folder


def load_pruned(folder: str | Path, **from_pretrained_kwargs: Any) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """Load a folder written by :func:`save_pruned`: ``(model in eval mode, masks)``, after checking every file
    against the folder's seal (:class:`effllm.io.ArtifactError` for a missing, changed or added file, or a
    folder saved by an older effllm), that the masks fit the model, its weights included, and that the weights
    are zero wherever the masks say."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    folder = Path(folder)
    info = io.verify(folder, PRUNED_KIND)
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, **from_pretrained_kwargs)
    except ValueError:  # encoder-decoder checkpoints (T5)
        model = AutoModelForSeq2SeqLM.from_pretrained(folder, **from_pretrained_kwargs)
    model.eval()
    masks = load_masks(folder / MASKS_FILE)
    check_masks(model, masks, info["fingerprint"])
    modules = dict(model.named_modules())
    for name, mask in masks.items():
        if modules[name].weight[mask.to(modules[name].weight.device)].any():
            raise ValueError(f"{folder}: weights of {name} are not zero where its mask says; the folder is inconsistent.")
    return model, masks



"""Pruning: magnitude, Wanda (Sun et al. 2023) and SparseGPT (Frantar & Alistarh 2023), unstructured or N:M.

    masks = prune(model, "wanda", 0.5, calibration=ids)                 # ids: LongTensor [n_samples, seq_len]
    masks = prune(model, "sparsegpt", None, pattern="2:4", calibration=ids)
    sparsity_report(model, masks)                                       # a tidy table, one row per linear
    save_pruned(model, "out/wanda-code")                                # weights + masks + fingerprint
    model, masks = load_pruned("out/wanda-code")

Every linear the architecture adapter lists for a decoder layer (attention and MLP projections) is
pruned; embeddings and the LM head never are. Layers are pruned in order and each is calibrated on the
outputs of the already pruned layers below it (``LayerByLayer``), as in Wanda's ``prune_wanda`` and
SparseGPT's sequential mode. Within one layer all linears see the inputs of the unpruned layer (one
capture pass, then all are pruned), as both reference codes do.

Masks map a linear's qualified module name (as in ``model.named_modules()``) to a bool tensor of the
module weight's own shape (GPT-2's Conv1D: [in, out]), True where the weight was zeroed.

Selection rules (the ``scores`` are [out, in], higher is kept):
- unstructured: within each output row, zero the ``int(in * sparsity)`` lowest (Wanda's per-output
  comparison group). Magnitude uses the same per-row rule by default, so magnitude and Wanda differ only
  in the score; ``prune(..., "magnitude", ..., per_row=False)`` gives the per-matrix threshold of the
  magnitude baseline in Wanda's code (``prune_magnitude``).
- N:M: in every group of M consecutive input columns, zero the N lowest of each row. ``sparsity`` must be
  None or exactly N/M then (it carries no extra information; a different value is an error).
- SparseGPT chooses masks as its paper does: adaptively per block of ``blocksize`` columns (unstructured:
  the ``int(out * block * sparsity)`` lowest of w^2 / [H^-1]_jj^2 across the whole block, so the exact
  sparsity holds per block, not per row) or per N:M group, and updates the remaining weights of the row
  to compensate (optimal brain surgeon, H = 2 X^T X / n + 1% of its mean diagonal).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers.pytorch_utils import Conv1D

from effllm import io, models, records
from effllm.adapters import get_adapter
from effllm.capture import LayerByLayer, capture_inputs, check_calibration
from effllm.models import check_complete, mark_incomplete

METHODS = ("magnitude", "wanda", "sparsegpt")
METHOD_OPTIONS: dict[str, dict[str, Any]] = {  # the **method_kwargs each method accepts, with defaults
    "magnitude": {"per_row": True},
    "wanda": {},
    "sparsegpt": {"blocksize": 128, "percdamp": 0.01},
}
MASKS_FILE = "pruning_masks.safetensors"
MASKS_FORMAT = "effllm-masks/2"
MASKS_KIND = "effllm-masks"  # effllm.io kinds: a masks file (with its sidecar), a saved pruned-model folder
PRUNED_KIND = "effllm-pruned"


class MaskMismatchError(ValueError):
    """Masks that do not fit a model (another architecture, other layer names or weight shapes)."""


# --------------------------------------------------------------------------------------------------
# Arguments


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """``"unstructured"`` -> None; ``"N:M"`` -> (N, M) with 1 <= N < M. Anything else is a ValueError."""
    if not isinstance(pattern, str):
        raise ValueError(f"pattern must be a string, 'unstructured' or 'N:M' such as '2:4'; got {pattern!r}.")
    if pattern.strip().lower() == "unstructured":
        return None
    match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", pattern)
    if match is None:
        raise ValueError(
            f"Cannot parse pattern {pattern!r}: allowed are 'unstructured' or 'N:M' with integers 1 <= N < M "
            "(for example '2:4' or '4:8')."
        )
    n, m = int(match.group(1)), int(match.group(2))
    if not 1 <= n < m:
        raise ValueError(
            f"Pattern {pattern!r} gives N={n}, M={m}; N:M sparsity needs 1 <= N < M (for example '2:4' or '4:8')."
        )
    return n, m


def _check_arguments(
    model: nn.Module, method: str, sparsity: float | None, pattern: str, calibration: torch.Tensor | None,
    method_kwargs: dict[str, Any],
) -> tuple[float, tuple[int, int] | None, dict[str, Any]]:
    """Validate everything before the model is touched; return (sparsity, (N, M) or None, method options)."""
    if method not in METHODS:
        raise ValueError(f"Unknown pruning method {method!r}; allowed: {', '.join(METHODS)}.")
    unknown = set(method_kwargs) - set(METHOD_OPTIONS[method])
    if unknown:
        allowed = ", ".join(METHOD_OPTIONS[method]) or "none"
        raise TypeError(f"Unknown option(s) {sorted(unknown)} for method {method!r}; its options: {allowed}.")
    options = {**METHOD_OPTIONS[method], **method_kwargs}
    n_m = parse_pattern(pattern)
    if n_m is not None:
        n, m = n_m
        if sparsity is not None and abs(float(sparsity) - n / m) > 1e-9:
            raise ValueError(
                f"sparsity={sparsity} does not match pattern {pattern!r}, which zeroes exactly N/M = {n / m:g}; "
                f"pass sparsity=None (or {n / m:g}) with an N:M pattern."
            )
        sparsity = n / m
    if sparsity is None:
        raise ValueError("sparsity=None is only allowed with an N:M pattern; give a fraction in [0, 1) such as 0.5.")
    if not isinstance(sparsity, int | float) or not 0 <= float(sparsity) < 1:
        raise ValueError(f"sparsity must be a fraction in [0, 1) (the share of weights to zero); got {sparsity!r}.")
    if method != "magnitude":
        if calibration is None:
            raise ValueError(
                f"Method {method!r} needs calibration token ids (LongTensor [n_samples, seq_len], e.g. from "
                "effllm.data.calibration(...)); only 'magnitude' prunes without them."
            )
        check_calibration(model, calibration)
    if method == "sparsegpt" and n_m is not None and options["blocksize"] % n_m[1]:
        raise ValueError(f"SparseGPT's blocksize ({options['blocksize']}) must be a multiple of M={n_m[1]}.")
    if n_m is not None:
        adapter = get_adapter(model)
        for i in range(adapter.num_layers):
            for name, module in adapter.linears(i).items():
                columns = adapter.weight(module).shape[1]
                if columns % n_m[1]:
                    raise ValueError(
                        f"Pattern {pattern!r} needs every linear's input size to be a multiple of M={n_m[1]}; "
                        f"{name} has {columns} inputs. Use a pattern whose M divides it, or 'unstructured'."
                    )
    return float(sparsity), n_m, options


# --------------------------------------------------------------------------------------------------
# Scores and masks (all on [out, in] weights; True = zero this weight)


def lowest_mask(scores: torch.Tensor, sparsity: float, n_m: tuple[int, int] | None = None) -> torch.Tensor:
    """Mask of the lowest ``scores`` [out, in]: per row ``int(in * sparsity)`` (unstructured) or N per group
    of M consecutive columns in every row (N:M)."""
    rows, columns = scores.shape
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if n_m is None:
        k = int(columns * sparsity)
        if k:
            # A stable sort, as Wanda's code, so ties are broken by column order everywhere.
            order = torch.sort(scores, dim=1, stable=True)[1]
            mask.scatter_(1, order[:, :k], True)
        return mask
    n, m = n_m
    groups = scores.reshape(rows, columns // m, m)  # [out, in / M, M]
    lowest = torch.topk(groups, n, dim=2, largest=False)[1]
    return mask.reshape(rows, columns // m, m).scatter_(2, lowest, True).reshape(rows, columns)


def magnitude_mask(
    weight: torch.Tensor, sparsity: float, n_m: tuple[int, int] | None = None, per_row: bool = True
) -> torch.Tensor:
    """Magnitude pruning of ``weight`` [out, in]: |W| with the per-row (or N:M) rule of :func:`lowest_mask`;
    ``per_row=False`` (unstructured only) zeroes the ``int(numel * sparsity)`` lowest of the whole matrix."""
    scores = weight.detach().abs().float()
    if per_row or n_m is not None:
        return lowest_mask(scores, sparsity, n_m)
    k = int(scores.numel() * sparsity)
    mask = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    if k:
        mask[torch.sort(scores.flatten(), stable=True)[1][:k]] = True
    return mask.reshape(scores.shape)


def wanda_scores(weight: torch.Tensor, input_sq_norms: torch.Tensor) -> torch.Tensor:
    """Wanda's S_ij = |W_ij| * ||X_j||_2 for ``weight`` [out, in] and the per-input-column sums of squares
    of the calibration inputs [in] (over all tokens)."""
    return weight.detach().abs().float() * input_sq_norms.sqrt().float().reshape(1, -1)


def wanda_mask(
    weight: torch.Tensor, input_sq_norms: torch.Tensor, sparsity: float, n_m: tuple[int, int] | None = None
) -> torch.Tensor:
    """Wanda's mask of ``weight`` [out, in]: the lowest :func:`wanda_scores` per row (or per N:M group)."""
    return lowest_mask(wanda_scores(weight, input_sq_norms), sparsity, n_m)


def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float,
    n_m: tuple[int, int] | None = None,
    blocksize: int = 128,
    percdamp: float = 0.01,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT on one linear: ``weight`` [out, in], ``hessian`` = 2 X^T X / n [in, in].

    Returns (pruned weight [out, in] in float32, mask [out, in]). Columns are processed left to right; the
    error of zeroing column j, scaled by 1/[H^-1]_jj, is spread over the columns to its right through the
    row j of the upper Cholesky factor of H^-1 (lazily, a block at a time, as in the paper's Algorithm 1).
    """
    W = weight.detach().float().clone(memory_format=torch.contiguous_format)
    H = hessian.float().clone()
    columns = W.shape[1]
    # Inputs that were always zero carry no information: their weights can go (and H needs a 1 there).
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H_inv = _upper_cholesky_of_inverse(H, percdamp)
    mask = torch.zeros_like(W, dtype=torch.bool)
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        W1 = W[:, i1:i2].clone(memory_format=torch.contiguous_format)
        Err1 = torch.zeros_like(W1)
        H_inv1 = H_inv[i1:i2, i1:i2]
        d = torch.diag(H_inv1)  # [block]
        mask1 = torch.zeros_like(W1, dtype=torch.bool)
        if n_m is None:
            # Adaptive mask selection: the lowest OBS saliencies w^2 / [H^-1]_jj^2 over the whole block.
            saliency = (W1**2 / d.reshape(1, -1) ** 2).flatten()
            k = int(saliency.numel() * sparsity)
            if k:
                mask1.view(-1)[torch.topk(saliency, k, largest=False)[1]] = True
        for i in range(i2 - i1):
            if n_m is not None and i % n_m[1] == 0:
                # N:M masks are chosen on the already updated weights of each group, as in the reference.
                n, m = n_m
                saliency = W1[:, i : i + m] ** 2 / d[i : i + m].reshape(1, -1) ** 2
                mask1.scatter_(1, i + torch.topk(saliency, n, dim=1, largest=False)[1], True)
            w = W1[:, i]
            q = w.masked_fill(mask1[:, i], 0)
            err = (w - q) / d[i]
            W1[:, i:] -= err.unsqueeze(1) @ H_inv1[i, i:].unsqueeze(0)
            W1[:, i] = q
            Err1[:, i] = err
        W[:, i1:i2] = W1
        mask[:, i1:i2] = mask1
        W[:, i2:] -= Err1 @ H_inv[i1:i2, i2:]  # the block's errors reach the later columns at once
    mask |= dead.reshape(1, -1)
    W[mask] = 0
    return W, mask


def _upper_cholesky_of_inverse(H: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp I)^-1, raising the dampening tenfold if H is too ill-conditioned."""
    diagonal = torch.arange(H.shape[0], device=H.device)
    damp = percdamp * torch.mean(torch.diag(H))
    for _attempt in range(4):
        damped = H.clone()
        damped[diagonal, diagonal] += damp
        L, info = torch.linalg.cholesky_ex(damped)
        if info == 0:
            inverse = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if info == 0:
                return U
        damp = damp * 10
    raise RuntimeError("SparseGPT: the Hessian is not positive definite even with 1000x the dampening.")


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
    sparsity, n_m, options = _check_arguments(model, method, sparsity, pattern, calibration, method_kwargs)
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

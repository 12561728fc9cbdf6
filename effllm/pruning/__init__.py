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

    scores.py     the checked arguments; lowest_mask, magnitude_mask, wanda_mask, sparsegpt_prune on one weight
    layerwise.py  prune: the layer-by-layer loop over a model
    masks.py      check_masks, apply_masks, save_masks / load_masks, save_pruned / load_pruned
    reports.py    sparsity_report, linear_roles, the Jaccard of mask sets (seed 002), mask_difference
"""

from effllm.pruning.layerwise import prune
from effllm.pruning.masks import (
    MASKS_FILE,
    MASKS_FORMAT,
    MASKS_KIND,
    PRUNED_KIND,
    MaskMismatchError,
    apply_masks,
    check_masks,
    load_masks,
    load_pruned,
    mask_target,
    save_masks,
    save_pruned,
)
from effllm.pruning.reports import (
    JACCARD_LEVELS,
    KEPT_BOTH,
    PRUNED_BOTH,
    PRUNED_ONLY_A,
    PRUNED_ONLY_B,
    jaccard_levels,
    jaccard_matrix,
    linear_roles,
    mask_difference,
    mask_jaccard,
    pairwise_jaccard,
    random_mask_jaccard,
    sparsity_report,
)
from effllm.pruning.scores import (
    METHOD_OPTIONS,
    METHODS,
    check_arguments,
    lowest_mask,
    magnitude_mask,
    parse_pattern,
    sparsegpt_prune,
    wanda_mask,
    wanda_scores,
)

__all__ = [
    "JACCARD_LEVELS", "KEPT_BOTH", "MASKS_FILE", "MASKS_FORMAT", "MASKS_KIND", "METHODS", "METHOD_OPTIONS",
    "PRUNED_BOTH", "PRUNED_KIND", "PRUNED_ONLY_A", "PRUNED_ONLY_B", "MaskMismatchError", "apply_masks",
    "check_arguments", "check_masks", "jaccard_levels", "jaccard_matrix", "linear_roles", "load_masks",
    "load_pruned", "lowest_mask", "magnitude_mask", "mask_difference", "mask_jaccard", "mask_target",
    "pairwise_jaccard", "parse_pattern", "prune", "random_mask_jaccard", "save_masks", "save_pruned",
    "sparsegpt_prune", "sparsity_report", "wanda_mask", "wanda_scores",
]

"""Pruning's arguments, checked before any weight changes, and the scores and masks of each method on one
[out, in] weight: lowest-score selection (per row or N:M), magnitude, Wanda, SparseGPT's OBS update."""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from effllm.adapters import get_adapter
from effllm.capture import check_calibration

METHODS = ("magnitude", "wanda", "sparsegpt")
METHOD_OPTIONS: dict[str, dict[str, Any]] = {  # the **method_kwargs each method accepts, with defaults
    "magnitude": {"per_row": True},
    "wanda": {},
    "sparsegpt": {"blocksize": 128, "percdamp": 0.01},
}


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


def check_arguments(
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



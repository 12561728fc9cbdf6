"""N:M patterns: finding the first row and group that breaks one, checking a weight for 2:4."""

from __future__ import annotations

import torch


class SparsePatternError(ValueError):
    """A weight that does not have the N:M pattern a sparse format needs."""


# --------------------------------------------------------------------------------------------------
# Patterns


def as_matrix(weight: torch.Tensor, name: str) -> torch.Tensor:
    """``weight`` itself when it is a dense 2-D tensor [out, in]; else a ValueError naming ``name``."""
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.layout != torch.strided:
        shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"{name}: expected a dense 2-D weight [out_features, in_features]; got {shape}.")
    return weight.detach()


def find_pattern_violation(weight: torch.Tensor, n: int = 2, m: int = 4) -> tuple[int, int, int] | None:
    """The first (row, group, zeros) of ``weight`` [out, in] whose group of ``m`` consecutive inputs holds
    fewer than ``n`` zeros, in row-major order; None when every group has at least ``n`` zeros."""
    weight = as_matrix(weight, "weight")
    rows, columns = weight.shape
    if columns % m:
        raise SparsePatternError(
            f"A {n}:{m} pattern needs the input size to be a multiple of {m}; this weight is [{rows}, {columns}]."
        )
    zeros = (weight.reshape(rows, columns // m, m) == 0).sum(dim=2)  # [out, in / m]
    bad = (zeros < n).nonzero()
    if bad.shape[0] == 0:
        return None
    row, group = (int(v) for v in bad[0])  # nonzero() lists indices in row-major order: the first bad group
    return row, group, int(zeros[row, group])


def check_2_4(weight: torch.Tensor, name: str = "weight") -> None:
    """Raise :class:`SparsePatternError` unless every group of 4 consecutive input weights in every row of
    ``weight`` [out, in] holds at least 2 zeros (the pattern 2:4 sparse tensor cores need)."""
    violation = find_pattern_violation(as_matrix(weight, name), 2, 4)
    if violation is not None:
        row, group, zeros = violation
        values = weight[row, 4 * group : 4 * group + 4].detach().float().cpu().tolist()
        raise SparsePatternError(
            f"{name} [{weight.shape[0]}, {weight.shape[1]}] is not 2:4 sparse: row {row}, group {group} "
            f"(input columns {4 * group}..{4 * group + 3}, values {[round(v, 4) for v in values]}) has "
            f"{zeros} zero(s); 2:4 needs at least 2 zeros in every group of 4 consecutive inputs of a row. "
            "Prune with effllm.pruning.prune(model, method, None, pattern='2:4') first."
        )


def is_2_4(weight: torch.Tensor) -> bool:
    """True when ``weight`` [out, in] has the 2:4 pattern (see :func:`check_2_4`)."""
    weight = as_matrix(weight, "weight")
    return weight.shape[1] % 4 == 0 and find_pattern_violation(weight, 2, 4) is None



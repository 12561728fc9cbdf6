"""Weight surgery helpers of SliceGPT: float64 arithmetic, results cast back to the parameter's dtype and device.

Set a weight (and the shape fields that follow it), fold a norm into its readers, centre a residual writer,
rotate a linear's input or output, build a shortcut matrix or an RMSNorm over kept dimensions, swap a module by
identity, and the PCA of a signal's covariance.
"""

from __future__ import annotations

import torch
from torch import nn


def set_weight(module: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    dtype, device = module.weight.dtype, module.weight.device
    module.weight = nn.Parameter(weight.to(dtype=dtype, device=device), requires_grad=False)
    if bias is not None:
        module.bias = nn.Parameter(bias.to(dtype=dtype, device=device), requires_grad=False)
    if isinstance(module, nn.Linear):
        module.out_features, module.in_features = module.weight.shape
    elif isinstance(module, nn.Embedding):
        module.embedding_dim = module.weight.shape[1]


def bias_of(linear: nn.Linear) -> torch.Tensor | None:
    return None if linear.bias is None else linear.bias.detach().double()


def fold_norm(norm: nn.Module, linears: list[nn.Linear]) -> None:
    """Fold a norm's scale (and bias) into the linears that read it: W <- W diag(w), b <- b + W beta."""
    scale = norm.weight.detach().double()
    shift = getattr(norm, "bias", None)
    for linear in linears:
        weight = linear.weight.detach().double()
        bias = bias_of(linear)
        if shift is not None:
            extra = weight @ shift.detach().double()
            bias = extra if bias is None else bias + extra
        set_weight(linear, weight * scale, bias)


def centre_output(linear: nn.Linear) -> None:
    """Make a linear that writes to the residual stream produce zero-mean outputs (OPT's LayerNorm)."""
    weight = linear.weight.detach().double()
    bias = bias_of(linear)
    set_weight(linear, weight - weight.mean(dim=0, keepdim=True), None if bias is None else bias - bias.mean())


def rotate_input(linear: nn.Linear, basis: torch.Tensor) -> None:
    """The linear reads x = z basis^T: W <- W basis ([out, D] @ [D, d])."""
    set_weight(linear, linear.weight.detach().double() @ basis)


def rotate_output(linear: nn.Linear, basis: torch.Tensor) -> None:
    """The linear writes z = y basis: W <- basis^T W, b <- basis^T b."""
    bias = bias_of(linear)
    set_weight(linear, basis.T @ linear.weight.detach().double(), None if bias is None else bias @ basis)


def shortcut(matrix: torch.Tensor, like: torch.Tensor) -> nn.Linear:
    """An ``nn.Linear`` computing z @ matrix ([d_a, d_b]) on the residual stream."""
    linear = nn.Linear(matrix.shape[0], matrix.shape[1], bias=False, dtype=like.dtype, device=like.device)
    set_weight(linear, matrix.T)
    return linear


def rms_norm(dim: int, full_dim: int, eps: float, like: torch.Tensor) -> nn.RMSNorm:
    """RMSNorm over ``dim`` kept dimensions that equals the original RMSNorm over ``full_dim``."""
    norm = nn.RMSNorm(dim, eps=eps * dim / full_dim, dtype=like.dtype, device=like.device)
    with torch.no_grad():
        norm.weight.fill_((full_dim / dim) ** 0.5)
    norm.weight.requires_grad_(False)
    return norm


def norm_eps(norm: nn.Module) -> float:
    for name in ("variance_epsilon", "eps"):  # HF RMSNorms / nn.LayerNorm, nn.RMSNorm
        if isinstance(getattr(norm, name, None), float):
            return getattr(norm, name)
    return 1e-6


def replace_module(model: nn.Module, old: nn.Module, new: nn.Module) -> None:
    """Put ``new`` wherever ``old`` is a child (found by identity, not by an attribute path)."""
    for parent in model.modules():
        for name, child in list(parent.named_children()):
            if child is old:
                setattr(parent, name, new)


def pca(covariance: torch.Tensor) -> torch.Tensor:
    """Eigenvectors of a float64 covariance as columns, by descending eigenvalue: Q [D, D]."""
    # One thread: a few-hundred-wide eigh is ~0.05 s single-threaded but can take seconds multi-threaded
    # when the CPU is shared (measured on the 2-core default machine), and it is never the bottleneck.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _, vectors = torch.linalg.eigh(covariance)
    finally:
        torch.set_num_threads(threads)
    return vectors.flip(-1)


def covariance(states: list[torch.Tensor]) -> torch.Tensor:
    flat = [s.reshape(-1, s.shape[-1]).double() for s in states]
    return sum(x.T @ x for x in flat)

"""What this machine has for sparse matmuls: the device, whether 2:4 kernels exist on it and for which
shapes and dtypes, the defaults that follow, and one dictionary that says it all (``environment``)."""

from __future__ import annotations

import importlib.util
import os
import platform
from typing import Any

import torch

FORMATS = ("semi-structured", "csr")
BACKENDS = ("torch", "torchao")
SEMI_STRUCTURED_DTYPES = (torch.float16, torch.bfloat16)
MIN_COMPUTE_CAPABILITY = (8, 0)  # Ampere: the first GPUs with sparse tensor cores

CPU_NOTE = (
    "No 2:4 semi-structured sparse kernel exists on CPU: torch's semi-structured tensors and torchao's "
    "sparsify_ need a CUDA GPU with compute capability >= 8.0. Measured instead on this CPU: dense matmul "
    "against torch sparse CSR (to_sparse_csr) of the same weights at 50% unstructured sparsity."
)

# Minimum (rows, columns) of a 2:4 weight, and both must be multiples of them, per backend and dtype. Read
# from torch's classes when they have the table (a private attribute); these are torch 2.13's values.
_FALLBACK_SHAPE_CONSTRAINTS = {
    "cusparselt": {torch.float16: (16, 16), torch.bfloat16: (16, 16)},
    "cutlass": {torch.float16: (32, 64), torch.bfloat16: (32, 64)},
}


class SparseFormatUnavailableError(RuntimeError):
    """The requested sparse format has no kernel on this device (or its library is not installed)."""


# --------------------------------------------------------------------------------------------------
# What this machine has


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``"auto"``/None: the CUDA GPU if there is one, else the CPU; ``"cpu"``; ``"cuda"`` or ``"cuda:N"``
    (an error naming what is there when no such GPU exists)."""
    if device is None or (isinstance(device, str) and device == "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"Unknown device {device!r}; allowed: 'auto', 'cpu', 'cuda' or 'cuda:N'.") from error
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SparseFormatUnavailableError(
                f"device={str(device)!r} was asked for, but torch {torch.__version__} sees no CUDA GPU on this "
                "machine. Use device='auto' or 'cpu' (sparse CSR is measured there), or run on a GPU machine."
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device={str(device)!r}: this machine has {torch.cuda.device_count()} CUDA device(s).")
    elif device.type != "cpu":
        raise ValueError(f"Unsupported device {str(device)!r}; allowed: 'auto', 'cpu', 'cuda' or 'cuda:N'.")
    return device


def device_name(device: str | torch.device | None = "auto") -> str:
    """The device a number was measured on, for tables and JSON."""
    device = resolve_device(device)
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"{torch.cuda.get_device_name(device)} (CUDA, compute capability {major}.{minor})"
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def semi_structured_unavailable_reason(device: str | torch.device | None = "auto") -> str | None:
    """Why 2:4 semi-structured kernels cannot run on ``device``; None when they can."""
    device = resolve_device(device)
    if device.type != "cuda":
        return ("no 2:4 semi-structured kernel exists on CPU: torch.sparse.to_sparse_semi_structured (cuSPARSELt / "
                "CUTLASS) and torchao's sparsify_ run on CUDA GPUs with compute capability >= 8.0 only")
    capability = torch.cuda.get_device_capability(device)
    if capability < MIN_COMPUTE_CAPABILITY:
        return (f"{torch.cuda.get_device_name(device)} has compute capability {capability[0]}.{capability[1]}; "
                "2:4 sparse tensor cores need >= 8.0 (Ampere or newer)")
    return None


def semi_structured_backend() -> str:
    """``"cusparselt"`` when torch was built with cuSPARSELt (what ``to_sparse_semi_structured`` uses), else
    ``"cutlass"``."""
    available = getattr(torch.backends, "cusparselt", None)
    return "cusparselt" if available is not None and available.is_available() else "cutlass"


def semi_structured_class(backend: str) -> type:
    """torch's semi-structured tensor class of ``backend`` (cusparselt or cutlass)."""
    if backend == "cusparselt":
        return torch.sparse.SparseSemiStructuredTensorCUSPARSELT
    return torch.sparse.SparseSemiStructuredTensorCUTLASS


def semi_structured_constraints(dtype: torch.dtype, backend: str | None = None) -> tuple[int, int] | None:
    """Minimum (rows, columns) of a 2:4 weight of ``dtype`` (both dimensions must also be multiples of them);
    None when ``dtype`` is not one of the supported fp16 / bf16."""
    backend = backend or semi_structured_backend()
    if backend not in _FALLBACK_SHAPE_CONSTRAINTS:
        raise ValueError(f"Unknown semi-structured backend {backend!r}; allowed: cusparselt, cutlass.")
    if dtype not in SEMI_STRUCTURED_DTYPES:
        return None
    table = getattr(semi_structured_class(backend), "_DTYPE_SHAPE_CONSTRAINTS", None)
    if table is not None and dtype in table:
        return int(table[dtype].sparse_min_rows), int(table[dtype].sparse_min_cols)
    return _FALLBACK_SHAPE_CONSTRAINTS[backend][dtype]


def semi_structured_shape_reason(
    out_features: int, in_features: int, dtype: torch.dtype, backend: str | None = None
) -> str | None:
    """Why a weight [out_features, in_features] of ``dtype`` cannot become a semi-structured tensor (the
    device aside); None when it can."""
    backend = backend or semi_structured_backend()
    constraints = semi_structured_constraints(dtype, backend)
    if constraints is None:
        return f"dtype {dtype} is not supported by 2:4 kernels; allowed: float16, bfloat16"
    min_rows, min_cols = constraints
    if out_features < min_rows or out_features % min_rows or in_features < min_cols or in_features % min_cols:
        return (f"shape [{out_features}, {in_features}] does not fit {backend}: rows must be a multiple of "
                f"{min_rows} and columns a multiple of {min_cols}")
    return None


def torchao_version() -> str | None:
    """The installed torchao version (the optional ``sparse`` extra), or None."""
    if importlib.util.find_spec("torchao") is None:
        return None
    from importlib.metadata import version

    return version("torchao")


def default_format(device: str | torch.device | None = "auto") -> str:
    """The sparse format that has a kernel on ``device``: 2:4 semi-structured where possible, else CSR."""
    return "semi-structured" if semi_structured_unavailable_reason(device) is None else "csr"


def default_pattern(fmt: str) -> tuple[str, float]:
    """(pruning pattern, sparsity) measured with a format: 2:4 for semi-structured, 50% unstructured for CSR."""
    check_format(fmt)
    return ("2:4", 0.5) if fmt == "semi-structured" else ("unstructured", 0.5)


def default_dtype(device: str | torch.device | None = "auto") -> torch.dtype:
    """float16 on a GPU (what 2:4 kernels take), float32 on a CPU (what CSR and the embedded models use)."""
    return torch.float16 if resolve_device(device).type == "cuda" else torch.float32


def environment(device: str | torch.device | None = "auto") -> dict[str, Any]:
    """What sparse kernels this machine has, and what a benchmark on ``device`` therefore measures."""
    device = resolve_device(device)
    reason = semi_structured_unavailable_reason(device)
    fmt = default_format(device)
    pattern, sparsity = default_pattern(fmt)
    if reason is None:
        note = (f"2:4 semi-structured sparse matmul ({semi_structured_backend()}) against dense "
                f"{str(default_dtype(device)).replace('torch.', '')} matmul on {device_name(device)}.")
    else:
        note = CPU_NOTE if device.type == "cpu" else (
            f"No 2:4 kernel on this GPU ({reason}). Measured instead: dense against torch sparse CSR at 50% "
            "unstructured sparsity.")
    return {
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "semi_structured_available": reason is None,
        "semi_structured_reason": reason,
        "semi_structured_backend": semi_structured_backend() if reason is None else None,
        "torchao": torchao_version(),
        "format": fmt,
        "pattern": pattern,
        "sparsity": sparsity,
        "dtype": str(default_dtype(device)).replace("torch.", ""),
        "note": note,
    }



def check_format(fmt: str) -> None:
    """Raise ValueError unless ``fmt`` is one of :data:`FORMATS`."""
    if fmt not in FORMATS:
        raise ValueError(f"Unknown sparse format {fmt!r}; allowed: {', '.join(FORMATS)}.")



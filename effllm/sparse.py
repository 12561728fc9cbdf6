"""Sparse inference: 2:4 semi-structured kernels (CUDA), sparse CSR (anywhere), and what they buy in speed.

    check_2_4(weight, name="q_proj")                    # SparsePatternError naming the first bad row/group
    report = sparsify_model(model, "semi-structured")   # a 2:4-pruned model on a CUDA GPU (fp16/bf16)
    report = sparsify_model(model, "csr")               # any pruned model, any device: torch sparse CSR
    shapes = shape_set("codellama-13b")                 # or shape_set("model", model): q/k/v/o/gate/up/down
    table = projection_timings(shapes, [1, 16, 2048], "csr")
    table = end_to_end_timings(dense_model, sparse_model, prompt_ids, decode_tokens=16)

What exists where (torch 2.13):
- 2:4 semi-structured sparse matmul (``torch.sparse.to_sparse_semi_structured``; torchao's ``sparsify_``
  with ``SemiSparseWeightConfig`` wraps the same tensor subclass) runs on CUDA GPUs of compute capability
  >= 8.0 only, through cuSPARSELt (fp16/bf16 weights whose both dimensions are multiples of 16) or, where
  torch was built without cuSPARSELt, CUTLASS (rows a multiple of 32, columns of 64). A layer whose shape
  does not fit stays dense, and the conversion report says why.
- On CPU there is no 2:4 kernel at all. What torch has there is sparse CSR (``to_sparse_csr``, MKL's sparse
  BLAS), which works for any mask, 2:4 or unstructured; that is what this module measures on a CPU, and
  every table says so.

Timings use ``torch.utils.benchmark.Timer`` (CUDA synchronisation, warm-up and blocked runs handled by it)
with ``threads`` intra-op threads (default: torch's setting); dense and sparse are measured alternately in
``rounds`` and the fastest median of each is kept, which makes the ratio less sensitive to other processes
on a shared machine. Speed is a ratio measured in one run: ``speedup = dense time / sparse time``. Nothing
here needs a GPU to import or to run on a CPU; the CUDA path follows torch's documented API and is tested
only where a GPU with 2:4 kernels is present.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import platform
import warnings
from dataclasses import asdict, dataclass
from typing import Any

import pandas as pd
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from effllm import records
from effllm.adapters import get_adapter

FORMATS = ("semi-structured", "csr")
BACKENDS = ("torch", "torchao")
TOKEN_COUNTS = (1, 16, 2048)  # decode, a small batch, a long prefill
PROJECTION_KINDS = ("q", "k", "v", "o", "gate", "up", "down")
SEMI_STRUCTURED_DTYPES = (torch.float16, torch.bfloat16)
MIN_COMPUTE_CAPABILITY = (8, 0)  # Ampere: the first GPUs with sparse tensor cores

# The seed's per-projection speedups of 2:4 over dense on CodeLlama-13B (PAPERS.md, section D).
SEED_SPEEDUPS = {"q": 1.36, "k": 1.36, "v": 1.36, "o": 1.36, "gate": 1.01, "up": 1.01, "down": 1.20}

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


class SparsePatternError(ValueError):
    """A weight that does not have the N:M pattern a sparse format needs."""


class SparseFormatUnavailableError(RuntimeError):
    """The requested sparse format has no kernel on this device (or its library is not installed)."""


# --------------------------------------------------------------------------------------------------
# Patterns


def _as_matrix(weight: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.layout != torch.strided:
        shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"{name}: expected a dense 2-D weight [out_features, in_features]; got {shape}.")
    return weight.detach()


def find_pattern_violation(weight: torch.Tensor, n: int = 2, m: int = 4) -> tuple[int, int, int] | None:
    """The first (row, group, zeros) of ``weight`` [out, in] whose group of ``m`` consecutive inputs holds
    fewer than ``n`` zeros, in row-major order; None when every group has at least ``n`` zeros."""
    weight = _as_matrix(weight, "weight")
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
    violation = find_pattern_violation(_as_matrix(weight, name), 2, 4)
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
    weight = _as_matrix(weight, "weight")
    return weight.shape[1] % 4 == 0 and find_pattern_violation(weight, 2, 4) is None


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


def _semi_structured_class(backend: str) -> type:
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
    table = getattr(_semi_structured_class(backend), "_DTYPE_SHAPE_CONSTRAINTS", None)
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
    _check_format(fmt)
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


# --------------------------------------------------------------------------------------------------
# Converting weights and models


def _quiet_csr(weight: torch.Tensor) -> torch.Tensor:
    with warnings.catch_warnings():  # "Sparse CSR tensor support is in beta state": once per process, noise here
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return weight.to_sparse_csr()


class CSRLinear(nn.Module):
    """A linear layer whose weight [out, in] is held in torch sparse CSR; ``y = W_csr @ x^T`` (sparse BLAS).

    The CSR arrays are kept as three plain buffers (row pointers, column indices, values) and the CSR tensor
    is assembled on each call (no copy), because a CSR tensor itself cannot be deep-copied or saved in a
    state dict in torch 2.13.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        weight = _as_matrix(weight, "CSRLinear weight")
        self.out_features, self.in_features = weight.shape
        csr = _quiet_csr(weight.contiguous())
        self.register_buffer("crow_indices", csr.crow_indices())
        self.register_buffer("col_indices", csr.col_indices())
        self.register_buffer("values", csr.values())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @classmethod
    def from_module(cls, module: nn.Module) -> CSRLinear:
        """From an ``nn.Linear`` or GPT-2's ``Conv1D`` (which stores its weight as [in, out])."""
        if isinstance(module, Conv1D):
            return cls(module.weight.detach().t(), module.bias)
        if isinstance(module, nn.Linear):
            return cls(module.weight.detach(), module.bias)
        raise TypeError(f"CSRLinear converts nn.Linear or Conv1D modules; got {type(module).__name__}.")

    @property
    def nnz(self) -> int:
        return int(self.values.numel())

    @property
    def weight(self) -> torch.Tensor:
        """The weight [out, in] as a sparse CSR tensor (what ``adapter.weight`` sees)."""
        return self.weight_csr()

    def weight_csr(self) -> torch.Tensor:
        # The arrays come from to_sparse_csr, so they are valid: no per-call invariant check.
        return torch.sparse_csr_tensor(self.crow_indices, self.col_indices, self.values,
                                       (self.out_features, self.in_features), check_invariants=False)

    def to_dense_weight(self) -> torch.Tensor:
        return self.weight_csr().to_dense()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        leading = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)  # [tokens, in]
        y = torch.sparse.mm(self.weight_csr(), x2.t()).t().contiguous()  # [tokens, out]
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*leading, self.out_features)

    def extra_repr(self) -> str:
        density = self.nnz / (self.out_features * self.in_features)
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, density={density:.3f}")


def to_semi_structured(weight: torch.Tensor, backend: str | None = None, name: str = "weight") -> torch.Tensor:
    """A 2:4-sparse ``weight`` [out, in] (CUDA, fp16/bf16) as torch's semi-structured sparse tensor.

    Checks the device, dtype, shape and the 2:4 pattern first (the kernel's compression would otherwise
    silently drop the extra non-zeros) and raises with the reason.
    """
    weight = _as_matrix(weight, name)
    reason = semi_structured_unavailable_reason(weight.device)
    if reason is not None:
        raise SparseFormatUnavailableError(f"{name}: {reason}.")
    backend = backend or semi_structured_backend()
    reason = semi_structured_shape_reason(*weight.shape, weight.dtype, backend)
    if reason is not None:
        raise ValueError(f"{name}: {reason}.")
    check_2_4(weight, name)
    return _semi_structured_class(backend).from_dense(weight.contiguous())


def _as_linear(module: nn.Module) -> nn.Linear:
    """An nn.Linear with the module's weight [out, in] (GPT-2's Conv1D holds [in, out])."""
    if isinstance(module, nn.Linear):
        return module
    weight = module.weight.detach().t().contiguous()
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=module.bias is not None,
                       device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if module.bias is not None:
            linear.bias.copy_(module.bias)
    return linear


def _is_sparse(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return isinstance(module, CSRLinear) or isinstance(weight, torch.sparse.SparseSemiStructuredTensor) or (
        isinstance(weight, torch.Tensor) and weight.layout != torch.strided)


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"Unknown sparse format {fmt!r}; allowed: {', '.join(FORMATS)}.")


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


@dataclass
class LayerConversion:
    """What :func:`sparsify_model` did with one linear."""

    name: str
    layer: int
    kind: str
    out_features: int
    in_features: int
    density: float  # share of non-zero weights
    format: str  # "semi-structured", "csr" or "dense" (kept dense: see reason)
    reason: str | None = None


@torch.no_grad()
def sparsify_model(model: nn.Module, fmt: str, backend: str = "torch") -> pd.DataFrame:
    """Convert every attention and MLP projection of ``model`` (in place) to the sparse format ``fmt``.

    ``fmt="semi-structured"``: 2:4 semi-structured tensors (CUDA, compute capability >= 8.0, fp16/bf16
    weights that are 2:4 sparse), through torch (``backend="torch"``) or torchao's ``sparsify_``
    (``backend="torchao"``, the optional ``sparse`` extra). A layer whose shape the kernel does not take stays
    dense, with the reason in the report. ``fmt="csr"``: :class:`CSRLinear` (torch sparse CSR), any device,
    any mask. Everything is checked before the first layer changes, so a bad request leaves the model as it
    was. Returns one row per linear (:class:`LayerConversion`). The converted model is for inference.
    """
    _check_format(fmt)
    if backend not in BACKENDS:
        raise ValueError(f"Unknown backend {backend!r}; allowed: {', '.join(BACKENDS)}.")
    if backend == "torchao" and fmt != "semi-structured":
        raise ValueError(f"backend='torchao' converts to 'semi-structured' only; got format {fmt!r}.")
    adapter = get_adapter(model)
    targets: list[tuple[int, str, str, nn.Module]] = []  # (layer, kind, qualified name, module)
    for i in range(adapter.num_layers):
        names = {id(module): name for name, module in adapter.linears(i).items()}
        for kind, module in {**adapter.attention_projections(i), **adapter.mlp_projections(i)}.items():
            if _is_sparse(module):
                raise ValueError(f"{names.get(id(module), kind)} is already sparse ({type(module).__name__}); "
                                 "convert a dense model (copy.deepcopy it before converting).")
            targets.append((i, kind, names[id(module)], module))

    rows: list[LayerConversion] = []
    if fmt == "semi-structured":
        device = targets[0][3].weight.device if targets else torch.device("cpu")
        reason = semi_structured_unavailable_reason(device)
        if reason is not None:
            raise SparseFormatUnavailableError(
                f"Cannot convert to 2:4 semi-structured on {device}: {reason}. On this machine use "
                "sparsify_model(model, 'csr') (torch sparse CSR) instead. The model was not changed.")
        if backend == "torchao" and torchao_version() is None:
            raise SparseFormatUnavailableError(
                "backend='torchao' needs torchao (pip install 'effllm[sparse]'); or use backend='torch'. "
                "The model was not changed.")
        chosen = semi_structured_backend()
        for i, kind, name, module in targets:
            weight = adapter.weight(module)
            if weight.dtype not in SEMI_STRUCTURED_DTYPES:
                raise ValueError(
                    f"{name} is {weight.dtype}; 2:4 kernels take float16 or bfloat16. Convert the model first "
                    "(model.half() or model.to(torch.bfloat16)). The model was not changed.")
            check_2_4(weight, name)
            shape_reason = semi_structured_shape_reason(*weight.shape, weight.dtype, chosen)
            rows.append(LayerConversion(name, i, kind, *weight.shape, float((weight != 0).float().mean()),
                                        "dense" if shape_reason else fmt, shape_reason))
        converted = {row.name for row in rows if row.format == fmt}
        for _i, _kind, name, module in targets:
            if name in converted and not isinstance(module, nn.Linear):
                _set_submodule(model, name, _as_linear(module))
        if backend == "torchao":
            from torchao.sparsity import semi_sparse_weight, sparsify_  # (an alias of SemiSparseWeightConfig)

            sparsify_(model, semi_sparse_weight(), filter_fn=lambda _module, fqn: fqn in converted)
        else:
            for name in converted:
                linear = model.get_submodule(name)
                linear.weight = nn.Parameter(to_semi_structured(linear.weight, chosen, name), requires_grad=False)
    else:
        for i, kind, name, module in targets:
            weight = adapter.weight(module)
            rows.append(LayerConversion(name, i, kind, *weight.shape, float((weight != 0).float().mean()), fmt))
        for _i, _kind, name, module in targets:
            _set_submodule(model, name, CSRLinear.from_module(module))
    records.SPARSE.set(model, {"format": fmt, "backend": backend})
    return pd.DataFrame([asdict(row) for row in rows], columns=list(LayerConversion.__dataclass_fields__))


# --------------------------------------------------------------------------------------------------
# Shapes


@dataclass(frozen=True)
class ProjectionShape:
    """One projection's weight shape [out_features, in_features], by role."""

    kind: str  # q, k, v, o, gate, up, down (GPT-2: qkv)
    out_features: int
    in_features: int


def projection_shapes(model: nn.Module, layer: int = 0) -> list[ProjectionShape]:
    """The attention and MLP projection shapes of decoder layer ``layer`` of ``model`` (via its adapter)."""
    adapter = get_adapter(model)
    parts = {**adapter.attention_projections(layer), **adapter.mlp_projections(layer)}
    return [ProjectionShape(kind, *adapter.weight(module).shape) for kind, module in parts.items()]


def config_projection_shapes(
    hidden_size: int,
    intermediate_size: int,
    num_attention_heads: int,
    num_key_value_heads: int | None = None,
    head_dim: int | None = None,
) -> list[ProjectionShape]:
    """q/k/v/o/gate/up/down shapes of a Llama-family layer from its config numbers (no weights needed)."""
    num_key_value_heads = num_key_value_heads or num_attention_heads
    head_dim = head_dim or hidden_size // num_attention_heads
    q, kv = num_attention_heads * head_dim, num_key_value_heads * head_dim
    return [
        ProjectionShape("q", q, hidden_size), ProjectionShape("k", kv, hidden_size),
        ProjectionShape("v", kv, hidden_size), ProjectionShape("o", hidden_size, q),
        ProjectionShape("gate", intermediate_size, hidden_size), ProjectionShape("up", intermediate_size, hidden_size),
        ProjectionShape("down", hidden_size, intermediate_size),
    ]


# The seed's model (its speedup table); random weights of these shapes stand in for the real ones.
SHAPE_SETS: dict[str, dict[str, int]] = {
    "codellama-13b": {"hidden_size": 5120, "intermediate_size": 13824, "num_attention_heads": 40,
                      "num_key_value_heads": 40},
}


def shape_set(name: str, model: nn.Module | None = None) -> list[ProjectionShape]:
    """``"model"``: the projection shapes of ``model``; or a named set of :data:`SHAPE_SETS`."""
    if name == "model":
        if model is None:
            raise ValueError("shape_set('model') needs the model whose shapes to use: shape_set('model', model).")
        return projection_shapes(model)
    if name not in SHAPE_SETS:
        raise ValueError(f"Unknown shape set {name!r}; allowed: model, {', '.join(SHAPE_SETS)}.")
    return config_projection_shapes(**SHAPE_SETS[name])


def sparse_copy(model: nn.Module, fmt: str, backend: str = "torch") -> tuple[nn.Module, pd.DataFrame]:
    """A deep copy of ``model`` converted with :func:`sparsify_model` (the original stays dense)."""
    sparse_model = copy.deepcopy(model)
    report = sparsify_model(sparse_model, fmt, backend)
    return sparse_model, report


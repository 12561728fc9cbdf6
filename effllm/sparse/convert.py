"""Converting weights and models: CSRLinear (torch sparse CSR, any device), 2:4 semi-structured tensors
(CUDA), ``sparsify_model`` and ``sparse_copy`` with a report of what each layer became and why."""

from __future__ import annotations

import copy
import warnings
from dataclasses import asdict, dataclass

import pandas as pd
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from effllm import records
from effllm.adapters import get_adapter
from effllm.sparse.machine import (
    BACKENDS,
    SEMI_STRUCTURED_DTYPES,
    SparseFormatUnavailableError,
    check_format,
    semi_structured_backend,
    semi_structured_class,
    semi_structured_shape_reason,
    semi_structured_unavailable_reason,
    torchao_version,
)
from effllm.sparse.patterns import as_matrix, check_2_4

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
        weight = as_matrix(weight, "CSRLinear weight")
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
    weight = as_matrix(weight, name)
    reason = semi_structured_unavailable_reason(weight.device)
    if reason is not None:
        raise SparseFormatUnavailableError(f"{name}: {reason}.")
    backend = backend or semi_structured_backend()
    reason = semi_structured_shape_reason(*weight.shape, weight.dtype, backend)
    if reason is not None:
        raise ValueError(f"{name}: {reason}.")
    check_2_4(weight, name)
    return semi_structured_class(backend).from_dense(weight.contiguous())


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
def sparsify_model(model: nn.Module, fmt: str, backend: str = "torch") -> pd.DataFrame:  # noqa: C901, PLR0912 -- to split further
    """Convert every attention and MLP projection of ``model`` (in place) to the sparse format ``fmt``.

    ``fmt="semi-structured"``: 2:4 semi-structured tensors (CUDA, compute capability >= 8.0, fp16/bf16
    weights that are 2:4 sparse), through torch (``backend="torch"``) or torchao's ``sparsify_``
    (``backend="torchao"``, the optional ``sparse`` extra). A layer whose shape the kernel does not take stays
    dense, with the reason in the report. ``fmt="csr"``: :class:`CSRLinear` (torch sparse CSR), any device,
    any mask. Everything is checked before the first layer changes, so a bad request leaves the model as it
    was. Returns one row per linear (:class:`LayerConversion`). The converted model is for inference.
    """
    check_format(fmt)
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




def sparse_copy(model: nn.Module, fmt: str, backend: str = "torch") -> tuple[nn.Module, pd.DataFrame]:
    """A deep copy of ``model`` converted with :func:`sparsify_model` (the original stays dense)."""
    sparse_model = copy.deepcopy(model)
    report = sparsify_model(sparse_model, fmt, backend)
    return sparse_model, report


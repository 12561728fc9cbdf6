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

    patterns.py   find_pattern_violation, check_2_4, is_2_4; SparsePatternError
    machine.py    what this machine has: resolve_device, semi_structured_* facts, the defaults, environment
    convert.py    CSRLinear, to_semi_structured, sparsify_model, sparse_copy
    shapes.py     ProjectionShape, projection_shapes, shape_set (the seed's model), SEED_SPEEDUPS
"""

from effllm.sparse.convert import CSRLinear, LayerConversion, sparse_copy, sparsify_model, to_semi_structured
from effllm.sparse.machine import (
    BACKENDS,
    CPU_NOTE,
    FORMATS,
    MIN_COMPUTE_CAPABILITY,
    SEMI_STRUCTURED_DTYPES,
    SparseFormatUnavailableError,
    check_format,
    default_dtype,
    default_format,
    default_pattern,
    device_name,
    environment,
    resolve_device,
    semi_structured_backend,
    semi_structured_class,
    semi_structured_constraints,
    semi_structured_shape_reason,
    semi_structured_unavailable_reason,
    torchao_version,
)
from effllm.sparse.patterns import SparsePatternError, as_matrix, check_2_4, find_pattern_violation, is_2_4
from effllm.sparse.shapes import (
    PROJECTION_KINDS,
    SEED_SPEEDUPS,
    SHAPE_SETS,
    TOKEN_COUNTS,
    ProjectionShape,
    config_projection_shapes,
    projection_shapes,
    shape_set,
)

__all__ = [
    "BACKENDS", "CPU_NOTE", "FORMATS", "MIN_COMPUTE_CAPABILITY", "PROJECTION_KINDS", "SEED_SPEEDUPS",
    "SEMI_STRUCTURED_DTYPES", "SHAPE_SETS", "TOKEN_COUNTS", "CSRLinear", "LayerConversion", "ProjectionShape",
    "SparseFormatUnavailableError", "SparsePatternError", "as_matrix", "check_2_4", "check_format",
    "config_projection_shapes", "default_dtype", "default_format", "default_pattern", "device_name",
    "environment", "find_pattern_violation", "is_2_4", "projection_shapes", "resolve_device",
    "semi_structured_backend", "semi_structured_class", "semi_structured_constraints",
    "semi_structured_shape_reason", "semi_structured_unavailable_reason", "shape_set", "sparse_copy",
    "sparsify_model", "to_semi_structured", "torchao_version",
]

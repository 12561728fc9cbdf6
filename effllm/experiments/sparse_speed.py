"""Sparse inference speed (seed 002's 2:4 speedup claim): dense against sparse matmuls at a model's projection
shapes, and end to end (prefill and decoding) on a pruned model converted with :mod:`effllm.sparse`.

    table = projection_timings(shape_set("codellama-13b"), [1, 16, 2048], "csr")
    table = end_to_end_timings(dense_model, sparse_model, prompt_ids, decode_tokens=16)

Dense and sparse are measured alternately in ``rounds`` (each a ``torch.utils.benchmark`` median); ``speedup`` is the
median over rounds of the per-round ratio dense time / sparse time, and ``speedup_min`` / ``speedup_max`` its
spread, so a ratio is always taken within one round, under the same load of a shared machine; ``dense_ms`` and
``sparse_ms`` are the medians over rounds. :func:`projection_rounds` gives every round.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from effllm.decoding import Full, decode
from effllm.experiments.stats import ratio_summary
from effllm.experiments.timing import (
    num_threads,
    seconds_by_label,
    self_timed,
    time_call,
    time_pair_rounds,
    time_rounds,
)
from effllm.pruning import magnitude_mask, parse_pattern
from effllm.sparse import (
    TOKEN_COUNTS,
    CSRLinear,
    ProjectionShape,
    SparseFormatUnavailableError,
    check_format,
    default_dtype,
    default_format,
    default_pattern,
    resolve_device,
    semi_structured_backend,
    semi_structured_shape_reason,
    semi_structured_unavailable_reason,
    to_semi_structured,
)


def pruned_random_weight(
    shape: ProjectionShape, pattern: str = "2:4", sparsity: float = 0.5, seed: int = 0,
    dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
) -> torch.Tensor:
    """A random weight [out, in] (N(0, 1/in)) of ``shape``, magnitude-pruned with ``pattern`` (per row, as
    effllm.pruning does): the stand-in for a pruned model's weight when only its shape matters."""
    n_m = parse_pattern(pattern)
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(shape.out_features, shape.in_features, generator=generator) / math.sqrt(shape.in_features)
    weight[magnitude_mask(weight, n_m[0] / n_m[1] if n_m else sparsity, n_m)] = 0
    return weight.to(device=device, dtype=dtype)


def _sparse_operator(weight: torch.Tensor, fmt: str, backend: str | None) -> Callable[[torch.Tensor], torch.Tensor]:
    if fmt == "csr":
        return CSRLinear(weight)
    sparse_weight = to_semi_structured(weight, backend)
    return lambda x: nn.functional.linear(x, sparse_weight)


@torch.no_grad()
def projection_timings(
    shapes: Sequence[ProjectionShape],
    token_counts: Sequence[int] = TOKEN_COUNTS,
    fmt: str | None = None,
    device: str | torch.device | None = "auto",
    dtype: torch.dtype | None = None,
    min_run_time: float = 0.2,
    rounds: int = 2,
    seed: int = 0,
    progress: bool = True,
    threads: int | None = None,
) -> pd.DataFrame:
    """Dense against sparse ``y = x W^T`` for every shape and token count: one row each with ``dense_ms``,
    ``sparse_ms`` (medians over rounds), ``speedup`` (median over rounds of dense / sparse), ``speedup_min``,
    ``speedup_max``, ``rounds``, the per-round times (``dense_rounds_ms``, ``sparse_rounds_ms``: lists) and
    ``max_abs_error`` of the sparse output against dense.

    Weights are random of each shape, pruned by magnitude with the format's pattern (2:4 for semi-structured,
    50% unstructured for CSR); inputs are random [tokens, in]. ``fmt`` defaults to what ``device`` has;
    ``threads``: intra-op threads while timing (None: torch's setting; see :func:`num_threads`).
    """
    device = resolve_device(device)
    fmt = fmt or default_format(device)
    check_format(fmt)
    dtype = dtype or default_dtype(device)
    if fmt == "semi-structured":
        reason = semi_structured_unavailable_reason(device)
        if reason is not None:
            raise SparseFormatUnavailableError(f"format 'semi-structured' on {device}: {reason}. Use fmt='csr'.")
    bad_tokens = [t for t in token_counts if not isinstance(t, int) or t < 1]
    if bad_tokens or not token_counts:
        raise ValueError(f"token_counts must be positive integers; got {list(token_counts)}.")
    pattern, sparsity = default_pattern(fmt)
    backend = semi_structured_backend() if fmt == "semi-structured" else None
    rows = []
    bar = tqdm(total=len(shapes) * len(token_counts), desc=f"dense vs {fmt}", unit="matmul", disable=not progress)
    setup = _Setup(fmt, backend, pattern, sparsity, device, dtype, min_run_time, rounds, seed)
    with num_threads(threads):
        for index, shape in enumerate(shapes):
            rows.extend(_shape_timings(index, shape, token_counts, setup, bar))
    bar.close()
    return pd.DataFrame(rows)


@dataclass(frozen=True)
class _Setup:
    """What every shape of one :func:`projection_timings` call is timed with."""

    fmt: str
    backend: str | None
    pattern: str
    sparsity: float
    device: torch.device
    dtype: torch.dtype
    min_run_time: float
    rounds: int
    seed: int


def _shape_timings(index: int, shape: ProjectionShape, token_counts: Sequence[int], setup: _Setup, bar: Any
                   ) -> list[dict[str, Any]]:
    """The rows of :func:`projection_timings` for one shape (its weight is built and converted once)."""
    fmt, backend, pattern, sparsity = setup.fmt, setup.backend, setup.pattern, setup.sparsity
    device, dtype, min_run_time, rounds, seed = setup.device, setup.dtype, setup.min_run_time, setup.rounds, setup.seed
    rows = []
    weight = pruned_random_weight(shape, pattern, sparsity, seed + index, dtype, device)
    reason = semi_structured_shape_reason(shape.out_features, shape.in_features, dtype, backend) \
        if fmt == "semi-structured" else None
    sparse = None if reason else _sparse_operator(weight, fmt, backend)
    generator = torch.Generator().manual_seed(seed + 1000 + index)
    for tokens in token_counts:
        x = torch.randn(tokens, shape.in_features, generator=generator).to(device=device, dtype=dtype)
        row = {"kind": shape.kind, "out_features": shape.out_features, "in_features": shape.in_features,
               "tokens": tokens, "format": fmt if sparse is not None else "dense", "pattern": pattern,
               "dtype": str(dtype).replace("torch.", ""), "dense_ms": None, "sparse_ms": None, "speedup": None,
               "speedup_min": None, "speedup_max": None, "rounds": 0, "dense_rounds_ms": None,
               "sparse_rounds_ms": None, "max_abs_error": None, "reason": reason}

        def run_dense(x=x, weight=weight):
            return nn.functional.linear(x, weight)

        reference = run_dense()
        if sparse is not None:
            output = sparse(x)
            row["max_abs_error"] = float((output.float() - reference.float()).abs().max())

            def run_sparse(x=x, sparse=sparse):
                return sparse(x)

            row.update(_round_columns(*time_pair_rounds(run_dense, run_sparse, min_run_time, rounds)))
        else:
            row["dense_ms"] = time_call(run_dense, min_run_time) * 1e3
        rows.append(row)
        bar.update()
    return rows


def _round_columns(dense_s: list[float], sparse_s: list[float]) -> dict[str, Any]:
    """Median times and the median and spread of the per-round speed ratio (dense / sparse)."""
    ratio = ratio_summary([d / s for d, s in zip(dense_s, sparse_s, strict=True)])
    return {"dense_ms": float(np.median(dense_s)) * 1e3, "sparse_ms": float(np.median(sparse_s)) * 1e3,
            "speedup": ratio["median"], "speedup_min": ratio["min"], "speedup_max": ratio["max"],
            "rounds": len(dense_s), "dense_rounds_ms": [t * 1e3 for t in dense_s],
            "sparse_rounds_ms": [t * 1e3 for t in sparse_s]}


def projection_rounds(timings: pd.DataFrame) -> pd.DataFrame:
    """One row per (row of :func:`projection_timings`, round): its identifying columns, ``round``, ``dense_ms``,
    ``sparse_ms`` and ``speedup`` of that round: the points behind each median (for plots of the spread)."""
    keys = [c for c in ("shapes", "kind", "tokens", "format", "device") if c in timings]
    rows = []
    for _, row in timings.iterrows():
        if not isinstance(row.get("dense_rounds_ms"), list):
            continue
        for index, (dense, sparse) in enumerate(zip(row.dense_rounds_ms, row.sparse_rounds_ms, strict=True)):
            rows.append({**{k: row[k] for k in keys}, "round": index, "dense_ms": dense, "sparse_ms": sparse,
                         "speedup": dense / sparse})
    return pd.DataFrame(rows, columns=[*keys, "round", "dense_ms", "sparse_ms", "speedup"])


def _forward_kwargs(model: nn.Module) -> dict[str, Any]:
    """Prefill computes the logits of the last position only (as ``generate`` does), where the model allows."""
    import inspect

    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}


@torch.no_grad()
def greedy_step_seconds(model: nn.Module, input_ids: torch.LongTensor, new_tokens: int
                        ) -> tuple[torch.LongTensor, float]:
    """Greedy decoding of ``new_tokens`` tokens after ``input_ids`` [1, n] with the decoding core: (the new
    tokens [new_tokens], seconds per decoding step after the first token, which comes from the prefill)."""
    out = decode(model, input_ids, new_tokens, Full(), eos_token_id=[])
    return out.sequences[0, input_ids.shape[1]:], out.decode_seconds / max(new_tokens - 1, 1)


@torch.no_grad()
def end_to_end_timings(
    dense_model: nn.Module,
    sparse_model: nn.Module,
    input_ids: torch.LongTensor,
    decode_tokens: int = 16,
    min_run_time: float = 0.2,
    rounds: int = 2,
    threads: int | None = None,
) -> pd.DataFrame:
    """Prefill of ``input_ids`` [1, P] and greedy decoding of ``decode_tokens`` tokens, dense against sparse:
    rows ``phase`` (prefill / decode), ``tokens``, ``dense_ms``, ``sparse_ms`` (per prefill; per decoded
    token; medians over rounds), ``speedup`` (median over rounds of dense / sparse), ``speedup_min``,
    ``speedup_max``, ``rounds``, the per-round times and tokens per second. Measured alternately, ``rounds``
    times (prefill: Timer medians; decode: the mean step time of each run, after one warm-up run).
    ``threads``: intra-op threads while timing (None: torch's setting)."""
    if decode_tokens < 2:
        raise ValueError(f"decode_tokens must be >= 2 (the first token comes from the prefill); got {decode_tokens}.")
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"input_ids must be one prompt [1, tokens]; got shape {tuple(input_ids.shape)}.")
    with num_threads(threads):
        return _end_to_end_timings(dense_model, sparse_model, input_ids, decode_tokens, min_run_time, rounds)


def _end_to_end_timings(dense_model, sparse_model, input_ids, decode_tokens, min_run_time, rounds) -> pd.DataFrame:
    prefill = time_pair_rounds(lambda: dense_model(input_ids, use_cache=True, **_forward_kwargs(dense_model)),
                               lambda: sparse_model(input_ids, use_cache=True, **_forward_kwargs(sparse_model)),
                               min_run_time, rounds)
    steps = time_rounds({"dense": lambda: greedy_step_seconds(dense_model, input_ids, decode_tokens)[1],
                         "sparse": lambda: greedy_step_seconds(sparse_model, input_ids, decode_tokens)[1]},
                        max(rounds, 1) + 1, measure=self_timed)
    per_round = seconds_by_label([t for t in steps if t.round > 0])  # the first round is a warm-up
    decode = per_round["dense"], per_round["sparse"]
    rows = []
    for phase, tokens, (dense_s, sparse_s) in (("prefill", input_ids.shape[1], prefill),
                                               ("decode", decode_tokens, decode)):
        per = input_ids.shape[1] if phase == "prefill" else 1
        columns = _round_columns(dense_s, sparse_s)
        rows.append({"phase": phase, "tokens": tokens, **columns,
                     "dense_tokens_per_s": per * 1e3 / columns["dense_ms"],
                     "sparse_tokens_per_s": per * 1e3 / columns["sparse_ms"]})
    return pd.DataFrame(rows)


@torch.no_grad()
def output_agreement(dense_model: nn.Module, sparse_model: nn.Module, input_ids: torch.LongTensor,
                     new_tokens: int = 16) -> dict[str, float]:
    """How far the sparse model's outputs are from the dense model's: the largest absolute difference of the
    logits over ``input_ids`` (relative to the largest dense logit), and the share of ``new_tokens`` greedy
    tokens that agree position by position."""
    dense_logits = dense_model(input_ids).logits.float()
    sparse_logits = sparse_model(input_ids).logits.float()
    difference = float((dense_logits - sparse_logits).abs().max())
    dense_tokens, _ = greedy_step_seconds(dense_model, input_ids, new_tokens)
    sparse_tokens, _ = greedy_step_seconds(sparse_model, input_ids, new_tokens)
    return {"max_abs_logit_difference": difference,
            "relative_logit_difference": difference / max(float(dense_logits.abs().max()), 1e-12),
            "greedy_token_agreement": float((dense_tokens == sparse_tokens).float().mean())}


def benchmark_prompt(tokenizer: Any, tokens: int, corpus: str = "python-code") -> torch.LongTensor:
    """The first ``tokens`` tokens [1, tokens] of a fixed slice of a built-in corpus (effllm.data), tokenized
    from a few hundred kilobytes only: what is timed does not depend on the text, and the whole corpus
    would take longer to tokenize than the benchmark takes to run."""
    from effllm import data

    ids = data.calibration_tokens(corpus, tokenizer, max_chars=max(200_000, 50 * tokens))
    if len(ids) < tokens:
        raise ValueError(f"Corpus {corpus!r} gives {len(ids)} tokens with this tokenizer, fewer than the "
                         f"{tokens} asked for; use fewer prompt tokens or a larger corpus (e.g. 'python-code').")
    return ids[:tokens].unsqueeze(0)



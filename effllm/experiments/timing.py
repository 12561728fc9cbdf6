"""Timing on a shared machine: thread control, median timings, and the bounds a measurement is read against.

    with num_threads(1):
        seconds = time_call(lambda: model(ids))               # torch.utils.benchmark, blocked autorange median
    floor = weight_read_floor(model)                          # reading every weight once: the decode-speed bound
    ms = 1e3 * prefill_seconds(model, ids)

Speed is always a ratio measured within one run; these helpers give the numbers the ratios are made of.
"""

from __future__ import annotations

import contextlib
import math
import platform
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.benchmark import Timer

from effllm.adapters import get_adapter


def device_description() -> str:
    """The machine a number was measured on, as written into every result."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def num_threads(threads: int | None) -> Iterator[int]:
    """Run the block with ``threads`` intra-op threads (None: leave torch's setting); yields the count.

    One thread makes ratios reproducible on a shared machine, where a multi-threaded kernel waits at every
    barrier for a thread that another process has descheduled."""
    previous = torch.get_num_threads()
    if threads is not None:
        if not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads must be a positive integer or None (torch's default); got {threads!r}.")
        torch.set_num_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(previous)


def time_call(fn: Callable[[], Any], min_run_time: float = 0.2) -> float:
    """Median seconds of one ``fn()`` call (torch.utils.benchmark.Timer, blocked autorange, this process's
    thread count; CUDA is synchronised by the Timer)."""
    timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return float(timer.blocked_autorange(min_run_time=min_run_time).median)


def time_pair(dense: Callable[[], Any], sparse: Callable[[], Any], min_run_time: float = 0.2,
              rounds: int = 2) -> tuple[float, float]:
    """(dense, sparse) seconds: measured alternately ``rounds`` times, the fastest median of each kept."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1; got {rounds}.")
    dense_times, sparse_times = [], []
    for _ in range(rounds):
        dense_times.append(time_call(dense, min_run_time))
        sparse_times.append(time_call(sparse, min_run_time))
    return min(dense_times), min(sparse_times)


def time_pair_rounds(dense: Callable[[], Any], sparse: Callable[[], Any], min_run_time: float = 0.2,
                     rounds: int = 5) -> tuple[list[float], list[float]]:
    """(dense seconds per round, sparse seconds per round): each round times ``dense`` then ``sparse``
    (:func:`time_call` medians), so the two of one round saw the same machine; report the median of the per-round
    ratios and their spread (:func:`effllm.experiments.stats.ratio_summary`)."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1; got {rounds}.")
    dense_times, sparse_times = [], []
    for _ in range(rounds):
        dense_times.append(time_call(dense, min_run_time))
        sparse_times.append(time_call(sparse, min_run_time))
    return dense_times, sparse_times


def weight_read_floor(model: nn.Module, dtype: torch.dtype | None = None, repeats: int = 10) -> dict[str, Any]:
    """The fastest a full-depth decoder could go on this machine: the time of one token's products with every
    decoder linear and the LM head (each weight read once, nothing else), best of ``repeats``, in the model's
    dtype or ``dtype`` (then on converted copies of the weights). Decoding one token at batch 1 is memory-bound,
    so an engine that reads these weights can approach this time but not go much below it (a fused kernel saves
    call overhead, not bytes)."""
    adapter = get_adapter(model)
    weights = [adapter.weight(m) for i in range(adapter.num_layers) for m in adapter.linears(i).values()]
    weights.append(adapter.lm_head.weight)
    if dtype is not None and dtype != weights[0].dtype:
        weights = [w.detach().to(dtype) for w in weights]
    inputs = {(w.shape[1], w.dtype, w.device): torch.randn(1, w.shape[1], dtype=w.dtype, device=w.device)
              for w in weights}
    best = math.inf
    with torch.inference_mode():
        for _ in range(repeats):
            _synchronize(weights[0].device)
            start = time.perf_counter()
            for w in weights:
                torch.nn.functional.linear(inputs[(w.shape[1], w.dtype, w.device)], w)
            _synchronize(weights[0].device)
            best = min(best, time.perf_counter() - start)
    return {"ms_per_token": 1e3 * best, "tokens_per_s": 1 / best,
            "bytes_per_token": sum(w.numel() * w.element_size() for w in weights),
            "dtype": str(weights[0].dtype).removeprefix("torch.")}


def prefill_seconds(model: nn.Module, input_ids: torch.LongTensor, min_run_time: float = 0.5) -> float:
    """Median seconds of one forward pass over ``input_ids`` [batch, p] (no cache): the prefill cost."""
    with torch.inference_mode():
        return time_call(lambda: model(input_ids, use_cache=False), min_run_time=min_run_time)

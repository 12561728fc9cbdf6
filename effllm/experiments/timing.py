"""Timing on a shared machine: thread control, median timings, and the bounds a measurement is read against.

    with num_threads(1):
        seconds = time_call(lambda: model(ids))               # torch.utils.benchmark, blocked autorange median
    floor = weight_read_floor(model)                          # reading every weight once: the decode-speed bound
    ms = 1e3 * prefill_seconds(model, ids)
    timed = time_rounds({"dense": run_dense, "sparse": run_sparse}, rounds=5)   # interleaved rounds
    per_round = seconds_by_label(timed)                       # label -> seconds of each round

Speed is always a ratio measured within one run; these helpers give the numbers the ratios are made of.
"""

from __future__ import annotations

import contextlib
import math
import platform
import random
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.benchmark import Timer
from tqdm.auto import tqdm

from effllm.adapters import get_adapter


def device_description(device: str | torch.device | None = None) -> str:
    """The machine a number was measured on, as written into every result: the GPU's name, or the CPU's with this
    process's thread count. ``device`` (where the work runs): None, the GPU if there is one."""
    kind = torch.device(device).type if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    if kind == "cuda":
        return torch.cuda.get_device_name(device)
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


# --------------------------------------------------------------------------------------------------
# Interleaved rounds: the one timing loop behind every speed ratio


@dataclass(frozen=True)
class RoundTiming:
    """One timed call of :func:`time_rounds`: its round, its label, its seconds and what the call returned."""

    round: int
    label: str
    seconds: float
    value: Any = None


Measure = Callable[[Callable[[], Any]], tuple[float, Any]]


def wall_time(fn: Callable[[], Any]) -> tuple[float, Any]:
    """(wall seconds of one ``fn()`` call, what it returned): the default measure of :func:`time_rounds`."""
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


def median_time(min_run_time: float = 0.2) -> Measure:
    """A measure for :func:`time_rounds`: the :func:`time_call` median of many ``fn()`` calls (value None)."""
    return lambda fn: (time_call(fn, min_run_time), None)


def self_timed(fn: Callable[[], float]) -> tuple[float, Any]:
    """A measure for :func:`time_rounds` whose call returns its own seconds (e.g. a decoder's step time)."""
    return float(fn()), None


def time_rounds(calls: Mapping[str, Callable[[], Any]], rounds: int, *, seed: int = 0, measure: Measure = wall_time,
                progress: bool = False, desc: str = "time") -> list[RoundTiming]:
    """Time every call of ``calls`` (label -> zero-argument callable) once per round, ``rounds`` rounds, the order of
    the labels shuffled afresh each round (``random.Random(seed)``): drift of a shared machine falls on every label
    alike, and a ratio of two labels taken within one round cancels it. For paired speed ratios over prompts, key
    one call per (setting, prompt) (e.g. the label and the prompt's index joined by a NUL character) and
    summarise the per-prompt ratios with :func:`effllm.experiments.stats.paired_ratio_summary` (a bootstrap over
    prompts); for one call per setting,
    report the median of per-round ratios and their range (:func:`effllm.experiments.stats.ratio_summary`).
    ``measure(fn)`` -> (seconds, value) times one call (:func:`wall_time`, :func:`median_time`,
    :func:`self_timed`). Returns one :class:`RoundTiming` per (round, label), in the order they ran."""
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds must be >= 1; got {rounds}.")
    if not calls:
        raise ValueError("calls is empty; give at least one label -> callable")
    order, shuffle = list(calls), random.Random(seed).shuffle
    jobs = []
    for r in range(rounds):
        shuffle(order)
        jobs.extend((r, label) for label in order)
    timings = []
    for r, label in tqdm(jobs, desc=desc, disable=not progress):
        seconds, value = measure(calls[label])
        timings.append(RoundTiming(r, label, seconds, value))
    return timings


def seconds_by_label(timings: list[RoundTiming]) -> dict[str, list[float]]:
    """label -> the seconds of each round, in round order (labels in the order of their first call)."""
    out: dict[str, list[float]] = {}
    for t in sorted(timings, key=lambda t: t.round):
        out.setdefault(t.label, []).append(t.seconds)
    return out


def time_pair_rounds(dense: Callable[[], Any], sparse: Callable[[], Any], min_run_time: float = 0.2,
                     rounds: int = 5, seed: int = 0) -> tuple[list[float], list[float]]:
    """(dense seconds per round, sparse seconds per round): :func:`time_rounds` of the two with :func:`time_call`
    medians, so the two of one round saw the same machine; report the median of the per-round ratios and their
    spread (:func:`effllm.experiments.stats.ratio_summary`)."""
    per_round = seconds_by_label(time_rounds({"dense": dense, "sparse": sparse}, rounds, seed=seed,
                                             measure=median_time(min_run_time)))
    return per_round["dense"], per_round["sparse"]


# --------------------------------------------------------------------------------------------------
# Bounds and profiles


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


# aten operators by where a decode step spends its time (their self time; a composite such as aten::linear only
# dispatches to aten::addmm / aten::mm, which carry the time)
OP_GROUPS: dict[str, tuple[str, ...]] = {
    "matmul (linear layers and head)": ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear",
                                        "aten::_addmm_activation"),
    "attention kernel": ("scaled_dot_product", "flash_attention", "aten::_softmax", "aten::softmax"),
}


def _op_group(name: str) -> str:
    for group, names in OP_GROUPS.items():
        if any(name == n or (not n.startswith("aten::") and n in name) for n in names):
            return group
    return "other operators (norms, rotary, cache, copies, argmax)" if name.startswith("aten::") else "other"


def decode_step_profile(model: nn.Module, input_ids: torch.LongTensor, steps: int = 16, repeats: int = 3
                        ) -> dict[str, Any]:
    """Where the time of one full-depth decode step of :func:`effllm.decoding.decode` goes, by torch.profiler:
    the self time of every aten operator over ``steps`` greedy tokens, minus a run that only makes the first token
    (the prompt pass), per token, grouped (:data:`OP_GROUPS`); the rest of the wall time, outside any aten operator,
    is Python, dispatch and the profiler itself. Best (lowest-total) of ``repeats``. Profiling slows every operator
    call a little, so compare the groups with one another and with the weight-read floor, not with unprofiled
    tokens/s. Returns ``{"ms_per_token", "groups": {group: ms per token}, "steps", "profiled": True, "seconds"}``
    (``seconds``: the two profiled runs' wall and group seconds, from which the per-token numbers are made; a
    difference that noise makes negative counts as 0)."""
    from torch.profiler import ProfilerActivity, profile

    from effllm.decoding import Full, decode

    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer; got {steps!r}")

    def measure(new_tokens: int) -> tuple[float, dict[str, float]]:
        with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            decode(model, input_ids, new_tokens, Full(), eos_token_id=[])
            wall = time.perf_counter() - start
        groups: dict[str, float] = {}
        for event in prof.key_averages():
            group = _op_group(event.key)
            if group != "other":
                groups[group] = groups.get(group, 0.0) + event.self_cpu_time_total / 1e6
        return wall, groups

    best: dict[str, Any] | None = None
    with torch.inference_mode():
        decode(model, input_ids, 2, Full(), eos_token_id=[])  # first-call allocations
    for _ in range(repeats):
        prompt_wall, prompt_groups = measure(1)
        wall, groups = measure(1 + steps)
        per_token = {g: 1e3 * max(0.0, groups.get(g, 0.0) - prompt_groups.get(g, 0.0)) / steps
                     for g in sorted(set(groups) | set(prompt_groups))}
        total = 1e3 * max(0.0, wall - prompt_wall) / steps
        per_token["outside aten operators (Python, dispatch, profiler)"] = max(0.0, total - sum(per_token.values()))
        if best is None or total < best["ms_per_token"]:
            best = {"ms_per_token": total, "groups": per_token, "steps": steps, "profiled": True,
                    "seconds": {"prompt pass": {"wall": prompt_wall, **prompt_groups},
                                f"prompt pass + {steps} steps": {"wall": wall, **groups}}}
    assert best is not None
    return best


def forward_cost(model: nn.Module, context_tokens: int = 128, token_counts: tuple[int, ...] = (1, 2, 4, 8, 16),
                 min_run_time: float = 0.2, seed: int = 0) -> list[dict[str, Any]]:
    """Milliseconds of one full-depth forward over k new tokens after a cache of ``context_tokens``: what verifying
    k drafted tokens costs (self-speculation) and what FREE's synchronized pass over k deferred tokens costs. Each
    call's new entries are cropped from the cache again, so every call sees the same context; the median of repeated
    calls (torch.utils.benchmark). Rows ``{"tokens", "ms", "x_one_token"}``."""
    from transformers import DynamicCache

    from effllm.decoding.early_exit import allow_crop, crop_cache

    checks_ok = all(isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in token_counts)
    if not token_counts or not checks_ok or isinstance(context_tokens, bool) or context_tokens < 1:
        raise ValueError(f"token_counts must be positive integers and context_tokens >= 1; got {token_counts!r} and "
                         f"{context_tokens!r}")
    device = next(model.parameters()).device
    vocab = model.get_input_embeddings().weight.shape[0]
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (1, context_tokens + max(token_counts)), generator=generator).to(device)
    rows = []
    with torch.inference_mode():
        cache = DynamicCache(config=model.config)
        allow_crop(cache)
        model(ids[:, :context_tokens], cache=cache, use_cache=True)  # transformers 5 names the KV cache `cache`
        for k in token_counts:
            new = ids[:, context_tokens: context_tokens + k]

            def step(new: torch.LongTensor = new) -> None:
                model(new, cache=cache, use_cache=True)
                crop_cache(cache, context_tokens)

            rows.append({"tokens": k, "ms": 1e3 * time_call(step, min_run_time)})
    one = next((r["ms"] for r in rows if r["tokens"] == 1), rows[0]["ms"] / rows[0]["tokens"])
    return [{**row, "x_one_token": row["ms"] / one} for row in rows]

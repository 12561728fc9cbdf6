"""Model-level compression measured in one run: pruning time, memory and quality against one forward pass.

    rows, forward_s = prune_rows(model, tokenizer, calibration, ["magnitude", "wanda"], ["unstructured", "2:4"],
                                 0.5, batch_size=8, eval_windows=8)

Per method and pattern: seconds to prune the whole model, the seconds of one plain forward pass of the dense
model over the same calibration tokens in the same run (same batches, no KV cache), their ratio (Wanda's goal:
within 2.5x of that forward pass), the achieved sparsity of the pruned linears, peak memory, and perplexity on
held-out English prose (python-docs validation + test). Peak memory is the process's resident set size (RSS,
psutil), sampled every 5 ms by a thread while the method runs (tracemalloc does not see torch's allocations).
Every method starts from the same dense weights.
"""

from __future__ import annotations

import gc
import threading
import time
from typing import Any

import torch

from effllm.data import held_out_text
from effllm.domains import SubModelBank
from effllm.metrics import perplexity

WANDA_GOAL = 2.5  # Wanda's pruning time within this many forward passes over the calibration tokens


class PeakRSS:
    """Samples this process's RSS every ``interval`` seconds in a thread; ``peak`` and ``start`` in bytes."""

    def __init__(self, interval: float = 0.005):
        import psutil

        self._process = psutil.Process()
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self.start = self.peak = 0

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._process.memory_info().rss)
            self._stop.wait(self._interval)

    def __enter__(self) -> PeakRSS:
        gc.collect()
        self.start = self.peak = self._process.memory_info().rss
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._process.memory_info().rss)


@torch.no_grad()
def forward_seconds(model: torch.nn.Module, calibration: torch.Tensor, batch_size: int) -> float:
    """Seconds of one plain forward pass over ``calibration`` [n, seq_len] in batches (after a warm-up)."""
    device = next(model.parameters()).device
    model(calibration[:1, :8].to(device), use_cache=False)  # first-call allocations
    _sync(device)
    start = time.perf_counter()
    for batch in calibration.split(batch_size):
        model(batch.to(device), use_cache=False)
    _sync(device)
    return time.perf_counter() - start


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def achieved_sparsity(model: torch.nn.Module, masks: dict[str, torch.Tensor]) -> float:
    """Share of exactly-zero weights over every masked linear."""
    modules = dict(model.named_modules())
    zeros = sum(int((modules[name].weight == 0).sum()) for name in masks)
    return zeros / sum(modules[name].weight.numel() for name in masks)


def prune_rows(
    model: torch.nn.Module, tokenizer: Any, calibration: torch.Tensor, methods: list[str], patterns: list[str],
    sparsity: float, batch_size: int, eval_windows: int | None, progress: bool = False,
) -> tuple[list[dict[str, Any]], float]:
    """One row per (method, pattern) plus a dense row; also returns the forward-pass seconds."""
    seq_len = calibration.shape[1]
    prose = tokenizer(held_out_text("python-docs"), return_tensors="pt", add_special_tokens=False).input_ids

    def prose_ppl() -> float:
        return perplexity(model, prose, seq_len, batch_size=batch_size, max_windows=eval_windows)

    bank = SubModelBank(model)
    forward = forward_seconds(model, calibration, batch_size)
    rows = [{"method": "dense", "pattern": None, "seconds": None, "forward_seconds": forward,
             "ratio_to_forward": None, "sparsity": 0.0, "peak_rss_mb": None, "extra_rss_mb": None,
             "ppl_prose": prose_ppl()}]
    device = next(model.parameters()).device
    for pattern in patterns:
        for method in methods:
            bank.restore_dense()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            with PeakRSS() as memory:
                start = time.perf_counter()
                masks = bank.prune(f"{method} {pattern}", calibration, method,
                                   sparsity if pattern == "unstructured" else None, pattern, progress=progress)
                _sync(device)
                seconds = time.perf_counter() - start
            row = {"method": method, "pattern": pattern, "seconds": seconds, "forward_seconds": forward,
                   "ratio_to_forward": seconds / forward, "sparsity": achieved_sparsity(model, masks),
                   "peak_rss_mb": memory.peak / 2**20, "extra_rss_mb": (memory.peak - memory.start) / 2**20,
                   "ppl_prose": prose_ppl()}
            if device.type == "cuda":
                row["peak_cuda_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
            rows.append(row)
            bank.masks.clear()  # keep one sub-model's masks at a time
    bank.restore_dense()
    return rows, forward

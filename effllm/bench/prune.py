"""Pruning speed, memory and quality: magnitude, Wanda and SparseGPT, unstructured and 2:4.

    python -m effllm.bench prune [--model smollm2-135m] [--samples 64] [--seq-len 256]
                                 [--out results/prune_smollm2-135m.json]

Per method and pattern: seconds to prune the whole model on ``samples x seq-len`` calibration tokens
(train split of ``--calibration``), the seconds of one plain forward pass of the dense model over the
same calibration tokens in the same run (same batches, no KV cache), their ratio (the issue's goal:
Wanda within 2.5x of that forward pass), the achieved sparsity of the pruned linears, peak memory, and
perplexity on held-out English prose (python-docs validation + test, windows of ``seq-len``).

Peak memory is the process's resident set size (RSS, psutil), sampled every 5 ms by a thread while the
method runs: ``peak_rss_mb`` is the highest RSS seen, ``extra_rss_mb`` that peak minus the RSS just before
the method started (tracemalloc does not see torch's allocations, so it cannot be used). On CUDA the
torch allocator's peak is reported as well. Every method starts from the same dense weights.
"""

from __future__ import annotations

import gc
import threading
import time
from pathlib import Path
from typing import Any

import torch

from effllm import data
from effllm.bench import device_description, print_table, write_result
from effllm.data import held_out_text
from effllm.domains import SubModelBank
from effllm.metrics import perplexity
from effllm.models import load_model
from effllm.pruning import METHODS, parse_pattern

NAME = "prune"
HELP = "seconds, peak memory and prose perplexity of magnitude / Wanda / SparseGPT against one forward pass"
WANDA_GOAL = 2.5  # Wanda's pruning time within this many forward passes over the calibration tokens
COLUMNS = ["method", "pattern", "seconds", "forward_seconds", "ratio_to_forward", "sparsity", "peak_rss_mb",
           "extra_rss_mb", "ppl_prose"]


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


def add_arguments(parser) -> None:
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--samples", type=int, default=64, help="calibration sequences")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per calibration sequence (and eval window)")
    parser.add_argument("--calibration", default="python-docs", help="built-in corpus (train split) to calibrate on")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated, from " + ", ".join(METHODS))
    parser.add_argument("--patterns", default="unstructured,2:4", help="comma-separated: unstructured, N:M")
    parser.add_argument("--sparsity", type=float, default=0.5, help="for unstructured (N:M sets its own)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--eval-windows", type=int, default=16, help="held-out prose windows for perplexity")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)


def run(args) -> int:
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    patterns = [p.strip() for p in args.patterns.split(",") if p.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        args._parser.error(f"--methods must name some of {', '.join(METHODS)}; got {args.methods!r}")
    for pattern in patterns:
        try:
            parse_pattern(pattern)
        except ValueError as error:
            args._parser.error(str(error))
    if not patterns:
        args._parser.error("--patterns is empty; give 'unstructured' and/or N:M patterns such as '2:4'")
    if args.samples < 1 or args.seq_len < 2 or args.batch_size < 1 or args.eval_windows < 1:
        args._parser.error(f"--samples, --batch-size and --eval-windows must be >= 1 and --seq-len >= 2; got "
                           f"{args.samples}, {args.batch_size}, {args.eval_windows}, {args.seq_len}")
    if not 0 <= args.sparsity < 1:
        args._parser.error(f"--sparsity must be in [0, 1); got {args.sparsity}")
    torch.manual_seed(args.seed)
    model, tokenizer = load_model(args.model)
    calibration = data.calibration(args.calibration, tokenizer, args.samples, args.seq_len, seed=args.seed,
                                   split="train")
    rows, forward = prune_rows(model, tokenizer, calibration, methods, patterns, args.sparsity, args.batch_size,
                               args.eval_windows)
    wanda = {row["pattern"]: row["ratio_to_forward"] for row in rows if row["method"] == "wanda"}
    result = {
        "model": args.model, "device": device_description(), "torch": torch.__version__,
        "samples": args.samples, "seq_len": args.seq_len, "calibration": f"{args.calibration} (train split)",
        "batch_size": args.batch_size, "sparsity": args.sparsity, "forward_seconds": forward,
        "eval": f"perplexity on python-docs validation + test, {args.eval_windows} windows of {args.seq_len} tokens",
        "memory": "peak RSS of the process (psutil, sampled every 5 ms); extra = peak minus RSS at the method's start",
        "goal": {"wanda_ratio_to_forward_at_most": WANDA_GOAL,
                 "met": {pattern: ratio <= WANDA_GOAL for pattern, ratio in wanda.items()}},
        "rows": rows,
    }
    print_table(rows, COLUMNS, width=12)
    write_result(result, args.out, f"prune_{args.model.replace('/', '--')}.json")
    return 0

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

from pathlib import Path

import torch

from effllm import data
from effllm.bench import device_description, print_table, write_result
from effllm.experiments.compression import WANDA_GOAL, prune_rows
from effllm.models import load_model
from effllm.pruning import METHODS, parse_pattern

NAME = "prune"
HELP = "seconds, peak memory and prose perplexity of magnitude / Wanda / SparseGPT against one forward pass"
COLUMNS = ["method", "pattern", "seconds", "forward_seconds", "ratio_to_forward", "sparsity", "peak_rss_mb",
           "extra_rss_mb", "ppl_prose"]


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

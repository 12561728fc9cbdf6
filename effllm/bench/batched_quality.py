"""Quality in batches against batch 1: the same prompts, the same policies, one run.

    python -m effllm.bench batched-quality [--model smollm2-135m] [--prompts 32] [--max-new-tokens 48]
                                           [--batch-size 16] [--rounds 2] [--out results/batched_quality.json]

A quality table needs every prompt's tokens, not its speed. This benchmark decodes ``--prompts`` prompts of the
built-in tasks to their end of sequence (answer limit ``--max-new-tokens``) with each policy twice: one prompt at
a time (``decode`` in a loop) and ``--batch-size`` at a time (``effllm.decoding.batched.decode_rows``: lock step
for the per-token policies). The two are timed in interleaved rounds (the order shuffled each round) and the row
gives their ratio (``batched_speedup`` = batch-1 seconds / batched seconds, the median over rounds, with the
range over rounds) and how many prompts came out token for token the same (``identical``: every one in
float32; in bfloat16 a batched product may round differently and flip a near-tie).
"""

from __future__ import annotations

import statistics
from pathlib import Path

import torch

from effllm.bench import device_description, print_table, write_result
from effllm.decoding import Calm, Free, Full, Policy, SelfSpec, Skip, decode
from effllm.decoding.batched import decode_rows
from effllm.experiments.prompts import prompt_format, task_prompts
from effllm.experiments.timing import time_rounds
from effllm.models import load_model

NAME = "batched-quality"
HELP = "decode_rows (batches, lock step) against decoding each prompt alone: time ratio and identical tokens"

COLUMNS = ["policy", "prompts", "new_tokens", "batch1_s", "batched_s", "batched_speedup", "speedup_min",
           "speedup_max", "identical"]


def add_arguments(parser) -> None:
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtype", default=None, help="float32 | bfloat16 (default: load_model's choice)")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)


def policies(n_layers: int) -> dict[str, Policy]:
    """One setting per decoding family, at the depths the notebooks use (2 L / 3)."""
    late = (2 * n_layers) // 3
    return {"full": Full(), f"calm 0.9 from {late}": Calm(threshold=0.9, candidate_layer=late),
            f"free@{late} 0.9": Free(shallow_exit_layer=late, threshold=0.9),
            "skip random 0.5": Skip(skip_mode="random", budget=0.5),
            f"self-spec@{late}x4": SelfSpec(draft_exit_layer=late, num_draft_tokens=4)}


def run(args) -> int:
    model, tokenizer = load_model(args.model, dtype=args.dtype)
    prompts = [p.input_ids for p in task_prompts(tokenizer, "builtin", args.prompts,
                                                 fmt=prompt_format(model, tokenizer, args.model))]
    n_layers = model.config.num_hidden_layers
    rows = []
    with torch.inference_mode():
        for label, policy in policies(n_layers).items():
            calls = {"batch 1": lambda policy=policy: [decode(model, p, args.max_new_tokens, policy) for p in prompts],
                     "batched": lambda policy=policy: decode_rows(model, prompts, args.max_new_tokens, policy,
                                                                  batch_size=args.batch_size)}
            timed = time_rounds(calls, args.rounds, desc=label)
            seconds = {"batch 1": [], "batched": []}
            outputs = {}
            for t in timed:
                seconds[t.label].append(t.seconds)
                outputs.setdefault(t.label, t.value)
            ratios = [a / b for a, b in zip(seconds["batch 1"], seconds["batched"], strict=True)]
            same = sum(torch.equal(a.sequences, b.sequences)
                       for a, b in zip(outputs["batch 1"], outputs["batched"], strict=True))
            rows.append({"policy": label, "prompts": len(prompts),
                         "new_tokens": sum(o.new_tokens().shape[1] for o in outputs["batch 1"]),
                         "batch1_s": statistics.median(seconds["batch 1"]),
                         "batched_s": statistics.median(seconds["batched"]),
                         "batched_speedup": statistics.median(ratios), "speedup_min": min(ratios),
                         "speedup_max": max(ratios), "identical": f"{same}/{len(prompts)}"})
    print(f"{args.model}, {next(model.parameters()).dtype}, {device_description()}: decoded to the end of sequence "
          f"(answer limit {args.max_new_tokens}), batch size {args.batch_size}, {args.rounds} interleaved rounds")
    print_table(rows, COLUMNS)
    write_result({"benchmark": NAME, "model": args.model, "dtype": str(next(model.parameters()).dtype),
                  "device": device_description(), "max_new_tokens": args.max_new_tokens,
                  "batch_size": args.batch_size, "rounds": args.rounds, "rows": rows},
                 args.out, f"batched_quality_{args.model}.json")
    return 0

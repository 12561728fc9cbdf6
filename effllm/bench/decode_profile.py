"""Where a full-depth decode step's time goes, against the weight-read floor.

    python -m effllm.bench decode-profile --model smollm2-135m [--dtype bfloat16] [--steps 16]

One greedy decode step of effllm's engine at batch 1 is profiled (torch.profiler, effllm.experiments.timing.
decode_step_profile): milliseconds per token in the matmuls of the linear layers and the head, in the attention
kernel, in every other aten operator, and outside aten operators (Python and dispatch), beside the weight-read floor
(the same matmuls alone, back to back) in the same run. It says why the engine runs at a fraction of the floor's
speed: the matmuls inside a step take longer than alone, or time goes elsewhere. Then the cost of one forward over
k new tokens after a cache (``--token-counts``): what verifying k drafted tokens (self-speculation) or FREE's
synchronized pass over k deferred tokens costs against decoding one. Writes
results/decode_profile_<model>_<dtype>.json.
"""

from __future__ import annotations

from pathlib import Path

import torch

from effllm import models
from effllm.bench import print_table, write_result
from effllm.experiments.prompts import prompt_format, task_prompts
from effllm.experiments.timing import decode_step_profile, device_description, forward_cost, weight_read_floor

NAME = "decode-profile"
HELP = "where a full-depth decode step's time goes (torch.profiler), against the weight-read floor"


def add_arguments(parser) -> None:
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: load_model's choice)")
    parser.add_argument("--steps", type=int, default=16, help="decode steps profiled (after the prompt pass)")
    parser.add_argument("--repeats", type=int, default=3, help="profiled runs; the fastest is kept")
    parser.add_argument("--token-counts", default="1,2,4,8,16",
                        help="k of the forward-cost table: one forward over k new tokens after --context tokens")
    parser.add_argument("--context", type=int, default=128, help="cached tokens before the k new ones")
    parser.add_argument("--out", type=Path, default=None)


def run(args) -> int:
    if args.steps < 1 or args.repeats < 1 or args.context < 1:
        args._parser.error(f"--steps, --repeats and --context must be >= 1; got {args.steps}, {args.repeats} and "
                           f"{args.context}")
    try:
        counts = tuple(int(k) for k in args.token_counts.split(","))
    except ValueError:
        counts = ()
    if not counts or min(counts) < 1:
        args._parser.error(f"--token-counts must be positive integers separated by commas; got {args.token_counts!r}")
    model, tokenizer = models.load_model(args.model, dtype=args.dtype)
    model.eval()
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    prompt = task_prompts(tokenizer, "builtin", 1, fmt=prompt_format(model, tokenizer, args.model))[0].input_ids
    floor = weight_read_floor(model)
    profiled = decode_step_profile(model, prompt, steps=args.steps, repeats=args.repeats)
    total = profiled["ms_per_token"]

    def share(ms: float) -> float:  # a tiny model's step can vanish in the noise of a busy machine
        return ms / total if total > 0 else float("nan")

    rows = [{"where": group, "ms_per_token": ms, "share": share(ms)} for group, ms in profiled["groups"].items()]
    rows.append({"where": "whole step (profiled)", "ms_per_token": total, "share": share(total)})
    rows.append({"where": "weight-read floor (matmuls alone)", "ms_per_token": floor["ms_per_token"],
                 "share": share(floor["ms_per_token"])})
    print(f"{args.model} ({dtype}), {args.steps} steps after a {prompt.shape[1]}-token prompt, best of "
          f"{args.repeats}; {device_description()}")
    print_table(rows, ["where", "ms_per_token", "share"], width=16)
    cost = forward_cost(model, args.context, counts)
    print(f"one full-depth forward over k new tokens after {args.context} cached tokens (median of repeated calls):")
    print_table(cost, ["tokens", "ms", "x_one_token"])
    result = {"model": args.model, "dtype": dtype, "device": device_description(),
              "threads": torch.get_num_threads(), "prompt_tokens": int(prompt.shape[1]), "repeats": args.repeats,
              **profiled, "weight_read_floor": floor, "rows": rows,
              "forward_cost": {"context_tokens": args.context, "rows": cost}}
    write_result(result, args.out, f"decode_profile_{args.model}_{dtype}.json")
    return 0

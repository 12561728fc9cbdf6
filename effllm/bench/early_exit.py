"""Early-exit decoding: speed and quality of full / static / CALM / FREE (with and without a pruned vocabulary),
self-speculation, layer skipping, and CALM at a Learn-then-Test calibrated threshold, against HF ``generate``.

    python -m effllm.bench early-exit [--model smollm2-135m] [--dtype bfloat16] [--prompts 32] [--max-new-tokens 64]
                                      [--rounds 5] [--speed-prompts 8] [--batch-size 16] [--fixed-length]
                                      [--methods calm,free] [--calibration-prompts 16]
                                      [--out results/early_exit_smollm2-135m_bfloat16.json]

A thin front end over :func:`effllm.experiments.runs.run_policies`: greedy, prompts from the built-in tasks
(arithmetic questions and HumanEval prompts, alternating; chat turns for chat models, plain text for base models
such as gemma3-270m). Every row decodes the same prompts to the end of each answer (the end of sequence, or
``--max-new-tokens``); ``--fixed-length`` decodes exactly ``--max-new-tokens`` tokens instead (end of sequence
ignored, so that rows do the same amount of work: a micro-benchmark), and the table's title and the JSON's
``decoded_to`` say so. Speed is timed at batch 1 on the first ``--speed-prompts`` prompts, one call per (row,
prompt) in each of ``--rounds`` rounds, the calls of a round shuffled: ``speedup_vs_hf`` is the paired ratio to HF
``generate`` on the same model, in the same dtype, in the same run (per prompt the median over rounds of the
ratio of tokens/s on that prompt in that round, then the mean over prompts), with a 95% bootstrap interval over
prompts (``_ci_low`` / ``_ci_high``) and the range over rounds (``_round_min`` / ``_round_max``). Quality comes
from every prompt, decoded in batches of ``--batch-size`` (each row as decoded alone), against the engine's own
full-depth output (ROUGE-L over token ids with a 95% bootstrap interval over prompts, per-position token
agreement, and the share of prompts whose output is identical).

The JSON also holds the cost of one confidence check over the full and the pruned vocabulary
(``confidence_check``), the weight-read floor in float32 and bfloat16 (``weight_read_floor``: one token's products
with every decoder linear and the LM head, nothing else; the bound on any full-depth decoder here) and, with
``--calibration-prompts``, the Learn-then-Test table. ``--methods`` keeps the rows whose label matches one of its
comma-separated patterns (a prefix or an fnmatch pattern); ``hf_generate`` and ``full`` always run.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from effllm import records
from effllm.adapters import get_adapter
from effllm.bench import device_description, print_table, write_result
from effllm.decoding import LOGIT_LENS, Calm, Free, Policy, SelfSpec, Skip, StaticExit, VocabPruning
from effllm.decoding.plans import PAPER_BUDGETS, budget_layer_count

LTT_LABEL = "calm-softmax-ltt"
LTT_CANDIDATES = (0.99, 0.97, 0.95, 0.9, 0.8, 0.6)
COLUMNS = ["label", "method", "threshold", "tokens_per_s", "speedup_vs_hf", "speedup_vs_hf_ci_low",
           "speedup_vs_hf_ci_high", "new_tokens", "avg_layers", "rougeL_vs_full", "rougeL_vs_full_ci_low", "rougeL_vs_full_ci_high", "identical_to_full",
           "acceptance_rate", "confidence_ms_per_token"]

NAME = "early-exit"
HELP = ("decoding speed and quality of full / static / CALM / FREE / vocabulary pruning / self-speculation / "
        "skipping against HF generate")


def threshold_of(policy: Policy | None) -> float | None:
    """The confidence threshold of a CALM or FREE policy (None for the others)."""
    return policy.threshold if isinstance(policy, (Calm, Free)) else None


def default_settings(n_layers: int, k: int = 256, include_skipping: bool = True,
                     trained_layer: int | None = None) -> dict[str, Policy]:
    """The benchmark's rows besides hf_generate and full: label -> policy. ``trained_layer``: the layer of a
    trained exit (``records.EXITS.get(model).layers``); CALM then checks from it and FREE exits there, since the
    other layers have no exit of their own."""
    mid, late = n_layers // 2, (2 * n_layers) // 3
    if trained_layer is not None:
        mid = late = trained_layer
    vocab = VocabPruning("fixed", k)
    settings: dict[str, Policy] = {f"static@{e}": StaticExit(e) for e in sorted({late, n_layers - 2})}
    for t in (0.9, 0.7):
        settings[f"calm-softmax {t}"] = Calm("softmax", t, mid)
    for t in (0.99, 0.95):
        settings[f"calm-state {t}"] = Calm("state", t, mid)
    for reduct in ("fixed", "decaying", "adaptive"):
        settings[f"calm-softmax-{reduct}{k} 0.9"] = Calm("softmax", 0.9, mid, vocab=VocabPruning(reduct, k))
    for t in (0.9, 0.7):
        settings[f"free@{late} {t}"] = Free(late, t)
    if late > 1:  # the candidates are picked at a layer below the shallow exit
        settings[f"free@{late}-fixed{k} 0.9"] = Free(late, 0.9, vocab=vocab, candidate_layer=min(mid, late - 1))
    settings[f"free@{late}-adaptive"] = Free(late, 0.9, use_adapt_threshold=True)
    for draft in sorted({max(1, n_layers // 3), max(1, mid), late}):
        if draft < n_layers:
            settings[f"self-spec@{draft}x4"] = SelfSpec(draft, 4)
    if include_skipping:
        for b in PAPER_BUDGETS[:-1]:
            settings[f"skip@{budget_layer_count(n_layers, b)}/{n_layers}"] = Skip("static", budget=b)
    return settings


def select_settings(settings: Mapping[str, Policy], patterns: str | Sequence[str] | None) -> dict[str, Policy]:
    """The settings whose label matches one of ``patterns`` (comma-separated or a list; each a prefix or an
    fnmatch pattern). ``None`` keeps all. A pattern that matches nothing is an error listing the labels."""
    if patterns is None:
        return dict(settings)
    if isinstance(patterns, str):
        patterns = [p.strip() for p in patterns.split(",") if p.strip()]

    def matches(label: str, pattern: str) -> bool:
        return label.startswith(pattern) or fnmatch.fnmatch(label, pattern)

    unmatched = [p for p in patterns if p not in ("hf_generate", "full") and not any(matches(s, p) for s in settings)]
    if unmatched or not patterns:
        raise ValueError(f"--methods pattern(s) {unmatched or patterns!r} match no row; rows: hf_generate, full, "
                         f"{', '.join(settings)}")
    return {label: policy for label, policy in settings.items() if any(matches(label, p) for p in patterns)}


def add_arguments(parser) -> None:
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: load_model's choice)")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5,
                        help="interleaved timing rounds (a prompt's speed ratio: the median over them)")
    parser.add_argument("--speed-prompts", type=int, default=8,
                        help="the first N prompts are timed at batch 1 in every round (quality: every prompt)")
    parser.add_argument("--batch-size", type=int, default=16, help="prompts per batch of the quality decoding")
    parser.add_argument("--fixed-length", action="store_true",
                        help="decode exactly --max-new-tokens tokens, the end of sequence ignored (a micro-benchmark; "
                             "default: to the end of sequence or --max-new-tokens)")
    parser.add_argument("--k", type=int, default=256, help="candidate-set size of the pruned-vocabulary rows")
    parser.add_argument("--methods", default=None,
                        help="comma-separated label prefixes or fnmatch patterns of the rows to run (default: all)")
    parser.add_argument("--calibration-prompts", type=int, default=16,
                        help="prompts for the Learn-then-Test row, disjoint from the timed ones (0: no LTT row)")
    parser.add_argument("--calibration-tokens", type=int, default=16, help="new tokens per calibration prompt")
    parser.add_argument("--ltt-delta", type=float, default=0.25, help="allowed mean disagreement (1 - ROUGE-L)")
    parser.add_argument("--ltt-epsilon", type=float, default=0.1, help="allowed probability of exceeding delta")
    parser.add_argument("--no-fitted-exits", action="store_true",
                        help="use the plain logit lens at exits (neither fitted nor trained exits)")
    parser.add_argument("--out", type=Path, default=None)


def _check(args) -> None:
    if args.prompts < 1 or args.max_new_tokens < 1 or args.calibration_prompts < 0 or args.calibration_tokens < 1 \
            or args.rounds < 1 or args.speed_prompts < 1 or args.batch_size < 1:
        args._parser.error(f"--prompts, --max-new-tokens, --rounds, --speed-prompts, --batch-size and "
                           f"--calibration-tokens must be >= 1 and --calibration-prompts >= 0; got {args.prompts}, "
                           f"{args.max_new_tokens}, {args.rounds}, {args.speed_prompts}, {args.batch_size}, "
                           f"{args.calibration_tokens} and {args.calibration_prompts}")
    if not (0 < args.ltt_delta < 1 and 0 < args.ltt_epsilon < 1):
        args._parser.error(f"--ltt-delta and --ltt-epsilon must lie in (0, 1); got {args.ltt_delta}, {args.ltt_epsilon}")


def _exit_maps(model, tokenizer, args) -> tuple[Any, str]:
    """(exit_transform for decode, its description): trained exits attached to the model, else fitted linear
    exits, else (``--no-fitted-exits``, T5) the logit lens."""
    from effllm.lens import cached_linear_exits

    if args.no_fitted_exits:
        return LOGIT_LENS, "logit lens"
    if records.EXITS.get(model) is not None:
        return None, "trained (attached to the model)"
    if getattr(model.config, "is_encoder_decoder", False):
        return LOGIT_LENS, "logit lens"
    return cached_linear_exits(model, tokenizer, args.model), "fitted (least squares)"


def floors(model: torch.nn.Module) -> dict[str, dict[str, Any]]:
    """The weight-read floor in float32 and bfloat16 (and the model's own dtype if it is neither)."""
    from effllm.experiments.timing import weight_read_floor

    dtypes = {next(model.parameters()).dtype, torch.float32, torch.bfloat16}
    return {str(d).removeprefix("torch."): weight_read_floor(model, d) for d in sorted(dtypes, key=str)}


def _print_costs(check, own: dict[str, Any], k: int, vocab_size: int, dtype: str) -> None:
    """The cost of one confidence check (full vocabulary vs k) and the weight-read floor, printed under the table."""
    pruned = check[check.k == k].iloc[0]
    print(f"one confidence check: full vocabulary ({vocab_size}) {check.ms.max():.3f} ms, k={k} "
          f"{pruned.ms:.3f} ms ({pruned.speedup:.1f}x faster, {pruned.flops_ratio:.0f}x fewer FLOPs)")
    print(f"weight-read floor in {dtype} (every decoder linear and the LM head once, {own['bytes_per_token'] / 1e6:.0f} "
          f"MB): {own['ms_per_token']:.1f} ms/token; the full-depth engine runs at "
          f"{own['full_engine_fraction_of_floor']:.2f} of it; at most {own['max_full_depth_speedup_vs_hf']:.2f}x HF "
          "generate at full depth")


def run(args) -> int:
    from effllm import vocab
    from effllm.experiments.prompts import prompt_budget, prompt_format, task_prompts
    from effllm.experiments.runs import decoded_to, run_policies
    from effllm.ltt import calibrate_threshold
    from effllm.models import load_model

    _check(args)
    torch.manual_seed(0)
    model, tokenizer = load_model(args.model, **({"dtype": args.dtype} if args.dtype else {}))
    adapter = get_adapter(model)
    n_layers = adapter.num_layers
    if not 2 <= args.k <= adapter.vocab_size:
        args._parser.error(f"--k must lie in [2, {adapter.vocab_size}] (the vocabulary size); got {args.k}")
    trained = getattr(records.EXITS.get(model), "layers", None)
    settings = default_settings(n_layers, k=args.k, trained_layer=min(trained) if trained else None)
    ltt_base = Calm("softmax", 0.9, min(trained) if trained else n_layers // 2)
    try:
        selected = select_settings({**settings, LTT_LABEL: ltt_base}, args.methods)
    except ValueError as error:
        args._parser.error(str(error))
    transform, exits_used = _exit_maps(model, tokenizer, args)
    fmt = prompt_format(model, tokenizer, args.model)
    budget = prompt_budget(model, max(args.max_new_tokens, args.calibration_tokens))
    prompts = task_prompts(tokenizer, "builtin", args.prompts, fmt=fmt, max_tokens=budget)
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    result: dict[str, Any] = {
        "model": args.model, "device": device_description(), "dtype": dtype, "prompts": args.prompts,
        "max_new_tokens": args.max_new_tokens, "decoded_to": decoded_to(not args.fixed_length), "rounds": args.rounds,
        "speed_prompts": min(args.speed_prompts, args.prompts), "batch_size": args.batch_size,
        "prompt_format": fmt, "exits": exits_used,
        "fitted_exits": exits_used.startswith("fitted"), "torch": torch.__version__}
    with torch.inference_mode():
        if LTT_LABEL in selected:
            selected.pop(LTT_LABEL)
            if args.calibration_prompts:
                calibration = [p.input_ids for p in task_prompts(tokenizer, "builtin", args.calibration_prompts,
                                                                 offset=args.prompts, fmt=fmt, max_tokens=budget)]
                ltt = calibrate_threshold(model, calibration, args.calibration_tokens, LTT_CANDIDATES, args.ltt_delta,
                                          args.ltt_epsilon, ltt_base, distance="rougeL", decode=tokenizer.decode,
                                          exit_transform=transform, eos_token_id=[] if args.fixed_length else None,
                                          progress=False)
                result["calibration"] = {"delta": ltt.delta, "epsilon": ltt.epsilon, "n": ltt.n,
                                         "max_new_tokens": args.calibration_tokens, "distance": "1 - ROUGE-L",
                                         "threshold": ltt.threshold, "table": ltt.table.to_dict("records")}
                print(f"Learn-then-Test on {ltt.n} calibration prompts (delta={ltt.delta}, epsilon={ltt.epsilon}): "
                      f"threshold {ltt.threshold}")
                if ltt.threshold is not None:
                    selected[LTT_LABEL] = dataclasses.replace(ltt_base, threshold=ltt.threshold)
        run_result = run_policies(model, tokenizer, prompts, selected, args.max_new_tokens, exit_transform=transform,
                                  rounds=args.rounds, speed_prompts=args.speed_prompts, batch_size=args.batch_size,
                                  stop_at_eos=not args.fixed_length, progress=False)
        check = vocab.confidence_check_cost(model, [args.k, None])
        floor = floors(model)
    policies = {"full": None, **selected}
    rows = run_result.summary.to_dict("records")
    for row in rows:
        row["threshold"] = threshold_of(policies.get(row["label"]))
    rate = {r["label"]: r["tokens_per_s"] for r in rows}
    hf_rate, full_rate = rate["hf_generate"], rate["full"]
    for f in floor.values():
        f["max_full_depth_speedup_vs_hf"] = f["tokens_per_s"] / hf_rate
    floor[dtype]["full_engine_fraction_of_floor"] = full_rate / floor[dtype]["tokens_per_s"]
    result["weight_read_floor"] = floor
    result["rows"] = [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}
                      for row in rows]  # JSON has no NaN: a missing value is null
    result["confidence_check"] = check.to_dict("records")
    length = (f"fixed length: exactly {args.max_new_tokens} tokens per prompt (end of sequence ignored)"
              if args.fixed_length else f"decoded to the end of sequence (at most {args.max_new_tokens} tokens)")
    print(f"{args.model} ({dtype}), {args.prompts} prompts, {length}; speed: paired ratio vs HF generate at batch 1 "
          f"on {result['speed_prompts']} prompts x {args.rounds} rounds, 95% CI over prompts")
    print_table(rows, COLUMNS, width=11)
    _print_costs(check, floor[dtype], args.k, adapter.vocab_size, dtype)
    write_result(result, args.out, f"early_exit_{args.model.replace('/', '--')}_{dtype}.json")
    return 0

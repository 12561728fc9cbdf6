"""Slicing: cost of slicing, size, held-out perplexity and speed of sliced models against the dense one.

    python -m effllm.bench slice [--model smollm2-135m] [--mean 0.25] [--amplitude 0.1] [--samples 16]
                                 [--seq-len 256] [--out results/slice_smollm2-135m.json]

Rows, all from the same dense model in the same run:

- ``dense``: the model as loaded (the reference of every ratio);
- ``slicegpt-constant``: SliceGPT, every layer sliced by ``--mean``;
- ``slicegpt-dynamic``: slice fractions from layer redundancy, mean exactly ``--mean``, amplitude ``--amplitude``;
- ``shortgpt-equal-params``: ShortGPT removing the number of layers that comes closest to the constant
  SliceGPT model's parameter count (``effllm.slicing.equal_parameter_shortgpt_layers``; can be 0);
- ``shortgpt-mean-layers``: ShortGPT removing round(mean * L) layers (the ShortGPT paper's own setting).

SliceGPT keeps the last layer's output and the LM head at the full width D, as the authors run it
(``do_slice_head=False``); ``--slice-head`` slices them to the last layer's width (``slice_model(slice_head=True)``).

``slice_s`` is the time to slice (including the layer-score pass where the method needs one) and
``slice_vs_forward`` that time over one dense forward pass over the same calibration tokens. Perplexity
is on the held-out split (``--eval-data``, ``--eval-split``) in windows of ``--seq-len``. Speed is HF
``generate``, greedy, batch 1, on a ``--prompt-len``-token prompt: prefill tokens/s from generating one
token, decode tokens/s from the extra time of ``--new-tokens`` tokens. Models are timed in turn, round
after round (``--repeats``), and the median is kept, so that load on the machine hits every row alike.
"""

from __future__ import annotations

import copy
import statistics
import time
from pathlib import Path

import torch

from effllm import data, metrics, records
from effllm.adapters import get_adapter
from effllm.bench import device_description, print_table, write_result
from effllm.experiments.timing import time_rounds, wall_time
from effllm.models import load_model
from effllm.slicing import equal_parameter_shortgpt_layers, slice_model

NAME = "slice"
HELP = "SliceGPT (constant, dynamic) and ShortGPT against the dense model: slicing time, size, perplexity, speed"

COLUMNS = ["variant", "layers", "parameters", "params_ratio", "slice_s", "slice_vs_forward", "perplexity",
           "ppl_ratio", "prefill_tok_s", "decode_tok_s", "prefill_speedup", "decode_speedup"]


def add_arguments(parser) -> None:
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--mean", type=float, default=0.25, help="mean slice fraction M (default 0.25)")
    parser.add_argument("--amplitude", type=float, default=0.1, help="dynamic slicing amplitude A (default 0.1)")
    parser.add_argument("--samples", type=int, default=16, help="calibration windows (default 16)")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per calibration / evaluation window")
    parser.add_argument("--data", default="python-docs", help="calibration corpus (train split)")
    parser.add_argument("--eval-data", default="python-docs", help="held-out corpus for perplexity")
    parser.add_argument("--eval-split", default="test", choices=["validation", "test"])
    parser.add_argument("--eval-windows", type=int, default=16, help="perplexity windows of --seq-len tokens")
    parser.add_argument("--prompt-len", type=int, default=128, help="prompt tokens for the speed rows")
    parser.add_argument("--new-tokens", type=int, default=32, help="generated tokens for decode speed")
    parser.add_argument("--repeats", type=int, default=3, help="timing rounds (median kept)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--slice-head", action="store_true",
                        help="slice the last layer's output and the LM head too (default: full width, as SliceGPT)")
    parser.add_argument("--out", type=Path, default=None)


def _check(args) -> None:
    positive = {"--samples": args.samples, "--seq-len": args.seq_len, "--eval-windows": args.eval_windows,
                "--prompt-len": args.prompt_len, "--repeats": args.repeats, "--batch-size": args.batch_size}
    bad = {k: v for k, v in positive.items() if v < 1}
    if bad:
        args._parser.error(f"these must be >= 1: {bad}")
    if args.seq_len < 2:
        args._parser.error(f"--seq-len must be >= 2 (one context token and one predicted); got {args.seq_len}")
    if args.new_tokens < 2:
        args._parser.error(f"--new-tokens must be >= 2 (decode speed is measured beyond the first); got {args.new_tokens}")
    if not 0 < args.mean < 1:
        args._parser.error(f"--mean must be in (0, 1); got {args.mean}")
    if args.amplitude < 0:
        args._parser.error(f"--amplitude must be >= 0; got {args.amplitude}")


def _n_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def _forward_seconds(model: torch.nn.Module, calibration: torch.Tensor, batch_size: int, repeats: int) -> float:
    """One dense forward pass over the calibration tokens, in the batches slicing uses (median of repeats)."""
    model(calibration[:1, :8], use_cache=False)  # warm-up: first-call allocations

    def forward() -> None:
        for batch in calibration.split(batch_size):
            model(batch, use_cache=False)

    return statistics.median(t.seconds for t in time_rounds({"forward": forward}, repeats))


@torch.no_grad()
def _generate_seconds(model: torch.nn.Module, prompt: torch.Tensor, new_tokens: int, pad_token_id: int) -> float:
    start = time.perf_counter()
    model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                   min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad_token_id)
    return time.perf_counter() - start


def slice_variants(model, calibration, mean: float, amplitude: float, batch_size: int, slice_head: bool = False):
    """(label, sliced copy, seconds to slice) for each compared method; ``model`` stays dense."""
    n_layers = get_adapter(model).num_layers
    n_equal = equal_parameter_shortgpt_layers(model, mean=mean, slice_head=slice_head)
    plans = [
        ("slicegpt-constant", dict(mean=mean, slice_head=slice_head)),
        ("slicegpt-dynamic", dict(mean=mean, amplitude=amplitude, slice_head=slice_head)),
        ("shortgpt-equal-params", dict(mean=n_equal / n_layers, method="shortgpt")),
        ("shortgpt-mean-layers", dict(mean=mean, method="shortgpt")),
    ]
    variants = []
    for label, kwargs in plans:
        copied = copy.deepcopy(model)
        seconds, _ = wall_time(lambda c=copied, k=kwargs: slice_model(c, calibration, batch_size=batch_size, **k))
        variants.append((label, copied, seconds))
    return variants


def slice_rows(model, tokenizer, calibration, eval_tokens, args) -> tuple[list[dict], float]:
    """The benchmark's rows (see the module docstring) and the dense forward time over the calibration."""
    forward_s = _forward_seconds(model, calibration, args.batch_size, args.repeats)
    variants = [("dense", model, None)] + slice_variants(model, calibration, args.mean, args.amplitude,
                                                         args.batch_size, args.slice_head)
    prompt = eval_tokens[: args.prompt_len].unsqueeze(0)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for _, variant, _ in variants:  # warm-up
        _generate_seconds(variant, prompt[:, :8], 2, pad)
    prefill = {label: [] for label, _, _ in variants}
    decode = {label: [] for label, _, _ in variants}
    calls = {label: (lambda v=variant: (_generate_seconds(v, prompt, 1, pad),
                                        _generate_seconds(v, prompt, args.new_tokens, pad)))
             for label, variant, _ in variants}
    # interleaved rounds, the order shuffled each round: machine load hits every variant alike
    for timing in time_rounds(calls, args.repeats):
        one, many = timing.value
        prefill[timing.label].append(prompt.shape[1] / one)
        decode[timing.label].append((args.new_tokens - 1) / max(many - one, 1e-9))

    rows = []
    for label, variant, seconds in variants:
        ppl = metrics.perplexity(variant, eval_tokens, seq_len=args.seq_len, batch_size=args.batch_size,
                                 max_windows=args.eval_windows)
        settings = records.SLICING.get(variant) or {}
        rows.append({
            "variant": label,
            "layers": get_adapter(variant).num_layers,
            "mean_slice": None if label == "dense" else args.mean,
            "removed_layers": settings.get("removed_layers"),
            "dims": settings.get("dims"),
            "parameters": _n_parameters(variant),
            "slice_s": seconds,
            "slice_vs_forward": None if seconds is None else seconds / forward_s,
            "perplexity": ppl,
            "prefill_tok_s": statistics.median(prefill[label]),
            "decode_tok_s": statistics.median(decode[label]),
        })
    dense = rows[0]
    for row in rows:
        row["params_ratio"] = row["parameters"] / dense["parameters"]
        row["ppl_ratio"] = row["perplexity"] / dense["perplexity"]
        row["prefill_speedup"] = row["prefill_tok_s"] / dense["prefill_tok_s"]
        row["decode_speedup"] = row["decode_tok_s"] / dense["decode_tok_s"]
    return rows, forward_s


def run(args) -> int:
    _check(args)
    torch.manual_seed(0)
    model, tokenizer = load_model(args.model)
    calibration = data.calibration(args.data, tokenizer, n_samples=args.samples, seq_len=args.seq_len, seed=0,
                                   split="train")
    eval_tokens = data.calibration_tokens(args.eval_data, tokenizer, split=args.eval_split)
    needed = max(args.prompt_len, args.seq_len)
    if len(eval_tokens) < needed:
        args._parser.error(f"{args.eval_data} ({args.eval_split}) has {len(eval_tokens)} tokens; need >= {needed}")
    with torch.no_grad():  # not inference_mode: slicing makes new Parameters from these tensors
        rows, forward_s = slice_rows(model, tokenizer, calibration, eval_tokens, args)
    result = {
        "model": args.model, "device": device_description(), "torch": torch.__version__,
        "mean": args.mean, "amplitude": args.amplitude, "slice_head": args.slice_head,
        "calibration": {"data": args.data, "split": "train", "samples": args.samples, "seq_len": args.seq_len,
                        "tokens": args.samples * args.seq_len},
        "evaluation": {"data": args.eval_data, "split": args.eval_split, "windows": args.eval_windows,
                       "seq_len": args.seq_len},
        "speed": {"prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "repeats": args.repeats,
                  "batch_size": 1, "decoding": "HF generate, greedy"},
        "dense_forward_s": forward_s,
        "rows": rows,
    }
    print_table(rows, COLUMNS, width=12)
    write_result(result, args.out, f"slice_{args.model.replace('/', '--')}.json")
    return 0

"""Early-exit decoding: speed and quality of full / static / CALM / FREE (with and without a pruned
vocabulary), layer skipping, and CALM at a Learn-then-Test calibrated threshold, against HF ``generate``.

    python -m effllm.bench early-exit [--model smollm2-135m] [--prompts 8] [--max-new-tokens 64]
                                      [--methods calm,free] [--calibration-prompts 24]
                                      [--out results/early_exit_smollm2-135m.json]

Batch 1, greedy, prompts from the built-in tasks (arithmetic questions and HumanEval prompts; arithmetic as
chat turns for chat models, as plain "Question: ... Answer:" text for base models such as gemma3-270m).
Every row decodes the same prompts for exactly ``max-new-tokens`` tokens (end-of-sequence ignored, so that
rows do the same amount of work); ``speedup_vs_hf`` is against HF ``generate`` on the same prompts in the
same run, and quality is measured against the engine's own full-depth output (ROUGE-L, per-position token
agreement). ``confidence_flops_per_token`` / ``confidence_ms_per_token`` are the FLOPs ((2d - 1) per
vocabulary row of each LM-head product, Vincenti et al.) and the measured time of the exit decisions,
averaged over generated tokens (None for HF). The ``calm-softmax-ltt`` row uses the threshold that
Learn-then-Test certifies on separate calibration prompts (``--calibration-prompts 0`` skips it), and the
JSON's ``confidence_check`` holds the cost of one confidence check over the full and the pruned vocabulary, and
``weight_read_floor`` the time of reading every decoder weight once (one token's linear products and nothing
else): the bound on any full-depth decoder's speed on the machine, measured in the same run.

Row labels: ``full``, ``static@E``, ``calm-softmax``, ``calm-state``, ``calm-softmax-{fixed,decaying,
adaptive}256``, ``calm-softmax-ltt``, ``free@S``, ``free@S-fixed256``, ``skip@N/L`` (when effllm.skipping
provides ``skipping_bench_settings``). ``--methods`` keeps the rows whose label matches one of its
comma-separated patterns (a prefix or an fnmatch pattern); ``hf_generate`` and ``full`` always run, they are
the references.
"""

from __future__ import annotations

import fnmatch
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from effllm import data, exits
from effllm.adapters import get_adapter
from effllm.bench import device_description, print_table, write_result
from effllm.metrics import rouge_l
from effllm.models import chat_input_ids

# Embedded models without instruction tuning: prompted with plain text, not a chat template (README).
PLAIN_TEXT_MODELS = ("gemma3-270m",)
PROMPT_FORMATS = ("chat", "plain", "t5")
PROMPT_DATA = ("builtin", "arithmetic", "humaneval", "squad", "samsum")
MAX_PROMPT_TOKENS = 512  # as the seeds' --max_seq_length 512


def prompt_format(model: torch.nn.Module, tokenizer: Any, model_name: str) -> str:
    """``t5`` for encoder-decoder models (task prefixes), ``plain`` for base models, else ``chat``."""
    if getattr(model.config, "is_encoder_decoder", False):
        return "t5"
    if model_name in PLAIN_TEXT_MODELS or not getattr(tokenizer, "chat_template", None):
        return "plain"
    return "chat"


def _encode(tokenizer: Any, text: str, fmt: str, chat: bool, max_tokens: int) -> torch.LongTensor:
    if fmt == "chat" and chat:
        ids = chat_input_ids(tokenizer, text)
    else:
        ids = tokenizer(text, return_tensors="pt").input_ids
    return ids[:, -max_tokens:]  # keep the end: the question and the generation prompt


def task_prompts(tokenizer: Any, data_name: str, n: int, offset: int = 0, fmt: str = "chat",
                 max_tokens: int = MAX_PROMPT_TOKENS) -> list[torch.LongTensor]:
    """``n`` prompts [1, p <= max_tokens] of ``data_name``, items ``offset``.. ``offset + n - 1`` (use disjoint
    offsets for calibration and evaluation prompts). ``builtin`` alternates arithmetic questions and HumanEval
    prompts; ``squad`` / ``samsum`` are the papers' hub sets (validation / test split), with T5's task
    prefixes when ``fmt="t5"``. HumanEval prompts are always plain code to complete. Longer prompts keep
    their last ``max_tokens`` tokens."""
    if data_name not in PROMPT_DATA:
        raise ValueError(f"unknown prompt data {data_name!r}; allowed: {', '.join(PROMPT_DATA)}")
    if fmt not in PROMPT_FORMATS:
        raise ValueError(f"unknown prompt format {fmt!r}; allowed: {', '.join(PROMPT_FORMATS)}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1 or offset < 0:
        raise ValueError(f"n must be an integer >= 1 and offset >= 0; got n={n!r}, offset={offset!r}")
    if data_name == "builtin":  # item i: arithmetic i // 2 (i even) or HumanEval i // 2 (i odd)
        items = range(offset, offset + n)
        picked = {}
        for name, parity in (("arithmetic", 0), ("humaneval", 1)):
            index = [i // 2 for i in items if i % 2 == parity]
            picked[parity] = iter(task_prompts(tokenizer, name, len(index), index[0], fmt, max_tokens)
                                  if index else [])
        return [next(picked[i % 2]) for i in items]
    split = {"arithmetic": "test", "humaneval": "test", "squad": "validation", "samsum": "test"}[data_name]
    rows = data.load(data_name, split)
    if offset + n > len(rows):
        raise ValueError(f"{data_name} ({split}) has {len(rows)} items; asked for items {offset}..{offset + n - 1}")
    rows = rows.select(range(offset, offset + n))
    prompts = []
    for row in rows:
        if data_name == "arithmetic":
            text = {"chat": row["question"], "plain": f"Question: {row['question']}\nAnswer:",
                    "t5": f"question: {row['question']}"}[fmt]
            prompts.append(_encode(tokenizer, text, fmt, True, max_tokens))
        elif data_name == "humaneval":
            prompts.append(_encode(tokenizer, row["prompt"], fmt, False, max_tokens))
        elif data_name == "squad":
            if fmt == "t5":
                text = f"question: {row['question']} context: {row['context']}"
            else:
                text = f"{row['context']}\n\nQuestion: {row['question']}\nAnswer:"
            prompts.append(_encode(tokenizer, text, fmt, True, max_tokens))
        else:
            text = f"summarize: {row['dialogue']}" if fmt == "t5" else f"Summarize this dialogue:\n{row['dialogue']}\n"
            prompts.append(_encode(tokenizer, text, fmt, True, max_tokens))
    return prompts


def bench_prompts(tokenizer: Any, n_prompts: int, offset: int = 0, fmt: str = "chat",
                  max_tokens: int = MAX_PROMPT_TOKENS) -> list[torch.LongTensor]:
    """The benchmark's prompts: half arithmetic questions, half HumanEval prompts (see :func:`task_prompts`)."""
    return task_prompts(tokenizer, "builtin", n_prompts, offset=offset, fmt=fmt, max_tokens=max_tokens)


def prompt_budget(model: torch.nn.Module, max_new_tokens: int) -> int:
    """Longest prompt that leaves room for ``max_new_tokens`` within the model's positions (at most 512)."""
    positions = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    if positions is None:
        return MAX_PROMPT_TOKENS
    return max(1, min(MAX_PROMPT_TOKENS, positions - max_new_tokens - 1))


def generated_ids(model: torch.nn.Module, sequences: torch.LongTensor, prompt: torch.LongTensor) -> torch.LongTensor:
    """The new ids of one output [1, ...]: after the prompt (decoder-only) or the decoder start token (T5)."""
    start = 1 if getattr(model.config, "is_encoder_decoder", False) else prompt.shape[1]
    return sequences[0, start:]


def _timed(fn: Callable, prompts: Sequence[torch.LongTensor]) -> tuple[list, float]:
    outputs, start = [], time.perf_counter()
    for ids in prompts:
        outputs.append(fn(ids))
    return outputs, time.perf_counter() - start


def _json_params(params: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in params.items() if isinstance(v, (int, float, str, bool, type(None), list, tuple))}


def _threshold(params: dict[str, Any]) -> float | None:
    if params.get("method") == "calm":
        return params.get("exit_conf_threshold", 0.9)
    if params.get("method") == "free":
        return params.get("shallow2deep_conf_threshold", 0.9)
    return None


def decode_setting(model: torch.nn.Module, prompts: Sequence[torch.LongTensor], max_new_tokens: int,
                   params: dict[str, Any], exit_transform: Callable | None = None) -> tuple[list[exits.ExitOutput], float]:
    """Decode every prompt with :func:`effllm.exits.generate` and ``params`` (no EOS stop); (outputs, seconds)."""
    kwargs = dict(params)
    if kwargs.get("method") != "skip":  # layer skipping runs the plain head
        kwargs["exit_transform"] = exit_transform
    return _timed(lambda ids: exits.generate(model, ids, max_new_tokens, eos_token_id=[], **kwargs), prompts)


def weight_read_floor(model: torch.nn.Module, repeats: int = 10) -> dict[str, float]:
    """The fastest a full-depth decoder could go on this machine: the time of one token's products with every
    decoder linear and the LM head (each weight read once, nothing else), best of ``repeats``. Decoding one
    token at batch 1 is memory-bound, so an engine that reads these weights in their dtype can approach this time
    but not go much below it (a fused kernel saves call overhead, not bytes)."""
    adapter = get_adapter(model)
    weights = [adapter.weight(m) for i in range(adapter.num_layers) for m in adapter.linears(i).values()]
    weights.append(adapter.lm_head.weight)
    inputs = {w.shape[1]: torch.randn(1, w.shape[1], dtype=w.dtype, device=w.device) for w in weights}
    best = math.inf
    with torch.inference_mode():
        for _ in range(repeats):
            start = time.perf_counter()
            for w in weights:
                torch.nn.functional.linear(inputs[w.shape[1]], w)
            best = min(best, time.perf_counter() - start)
    return {"ms_per_token": 1e3 * best, "tokens_per_s": 1 / best,
            "bytes_per_token": sum(w.numel() * w.element_size() for w in weights)}


def early_exit_rows(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: Sequence[torch.LongTensor],
    max_new_tokens: int,
    settings: Sequence[dict[str, Any]],
    exit_transform: Callable | None = None,
    return_outputs: bool = False,
) -> list[dict[str, Any]] | tuple[list[dict[str, Any]], list[list[exits.ExitOutput] | None]]:
    """One row per setting in ``settings`` (dicts of generate() parameters with a "label"), after the two
    reference rows ``hf_generate`` (HF ``generate``, the speed reference) and ``full`` (the engine at full
    depth, the quality reference; settings with ``method="full"`` are not decoded again).

    ``return_outputs``: also return, aligned with the rows, each row's ExitOutputs (None for HF).
    """
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def hf(ids):
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                              min_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)

    warm = prompts[0][:, :4]  # first-call allocations out of the timings
    hf(warm)
    exits.generate(model, warm, 2, method="full", eos_token_id=[])
    hf_out, hf_seconds = _timed(hf, prompts)
    hf_rate = sum(len(generated_ids(model, o, p)) for o, p in zip(hf_out, prompts, strict=True)) / hf_seconds
    n_layers = float(get_adapter(model).num_layers)
    rows = [{"method": "hf_generate", "threshold": None, "tokens_per_s": hf_rate, "speedup_vs_hf": 1.0,
             "avg_layers": n_layers, "rougeL_vs_full": None, "token_agreement_vs_full": None,
             "confidence_flops_per_token": None, "confidence_ms_per_token": None, "params": {}}]
    all_outputs: list[list[exits.ExitOutput] | None] = [None]
    full_new = full_text = None
    for setting in [{"label": "full", "method": "full"}, *[s for s in settings if s.get("method") != "full"]]:
        params = {k: v for k, v in setting.items() if k != "label"}
        outputs, seconds = decode_setting(model, prompts, max_new_tokens, params, exit_transform)
        produced = [generated_ids(model, o.sequences, p) for o, p in zip(outputs, prompts, strict=True)]
        if full_new is None:
            full_new, full_text = produced, [tokenizer.decode(t) for t in produced]
        n_tokens = sum(len(t) for t in produced)
        agree = sum(int((a[: len(b)] == b[: len(a)]).sum()) for a, b in zip(produced, full_new, strict=True))
        rows.append({
            "method": setting["label"],
            "threshold": _threshold(params),
            "tokens_per_s": n_tokens / seconds,
            "speedup_vs_hf": (n_tokens / seconds) / hf_rate,
            "avg_layers": sum(float(o.exit_layers.double().sum()) for o in outputs) / n_tokens,
            "rougeL_vs_full": rouge_l([tokenizer.decode(t) for t in produced], full_text),
            "token_agreement_vs_full": agree / n_tokens,
            "confidence_flops_per_token": sum(sum(o.confidence_flops) for o in outputs) / n_tokens,
            "confidence_ms_per_token": 1e3 * sum(sum(o.confidence_seconds) for o in outputs) / n_tokens,
            "params": _json_params(params),
        })
        all_outputs.append(outputs)
    return (rows, all_outputs) if return_outputs else rows


def default_early_exit_settings(n_layers: int, k: int = 256, include_skipping: bool = True) -> list[dict[str, Any]]:
    """The benchmark's rows (besides hf_generate and full), as a "label" plus generate() parameters."""
    mid, late = n_layers // 2, (2 * n_layers) // 3
    calm = {"method": "calm", "exit_conf_type": "softmax", "exit_min_layer": mid}
    settings = [{"label": f"static@{e}", "method": "static", "static_exit_layer": e} for e in (late, n_layers - 2)]
    settings += [{"label": "calm-softmax", **calm, "exit_conf_threshold": t} for t in (0.9, 0.7)]
    settings += [{"label": "calm-state", "method": "calm", "exit_conf_type": "state", "exit_conf_threshold": t,
                  "exit_min_layer": mid} for t in (0.99, 0.95)]
    settings += [{"label": f"calm-softmax-{reduct}{k}", **calm, "exit_conf_threshold": 0.9, "type_vocab_reduct": reduct,
                  "k": k} for reduct in ("fixed", "decaying", "adaptive")]
    settings += [{"label": f"free@{late}", "method": "free", "shallow_exit_layer": late,
                  "shallow2deep_conf_threshold": t} for t in (0.9, 0.7)]
    if late > 1:  # the candidates are picked at a layer below the shallow exit
        settings += [{"label": f"free@{late}-fixed{k}", "method": "free", "shallow_exit_layer": late,
                      "shallow2deep_conf_threshold": 0.9, "exit_min_layer": min(mid, late - 1),
                      "type_vocab_reduct": "fixed", "k": k}]
    if include_skipping:
        settings += skipping_settings(n_layers)
    return settings


def skipping_settings(n_layers: int) -> list[dict[str, Any]]:
    """Layer-skipping rows from ``effllm.skipping.skipping_bench_settings`` when that module provides it."""
    try:
        from effllm.skipping import skipping_bench_settings
    except ImportError:
        return []
    return [{**s, "method": "skip"} for s in skipping_bench_settings(n_layers)]


def select_settings(settings: Sequence[dict[str, Any]], patterns: str | Sequence[str] | None) -> list[dict[str, Any]]:
    """The settings whose label matches one of ``patterns`` (comma-separated or a list; each a prefix or an
    fnmatch pattern). ``None`` keeps all. A pattern that matches nothing is an error listing the labels."""
    if patterns is None:
        return list(settings)
    if isinstance(patterns, str):
        patterns = [p.strip() for p in patterns.split(",") if p.strip()]
    labels = list(dict.fromkeys(s["label"] for s in settings))
    unmatched = [p for p in patterns if p not in ("hf_generate", "full")
                 and not any(label.startswith(p) or fnmatch.fnmatch(label, p) for label in labels)]
    if unmatched or not patterns:
        raise ValueError(f"--methods pattern(s) {unmatched or patterns!r} match no row; rows: "
                         f"hf_generate, full, {', '.join(labels)}")
    return [s for s in settings if any(s["label"].startswith(p) or fnmatch.fnmatch(s["label"], p) for p in patterns)]


COLUMNS = ["method", "threshold", "tokens_per_s", "speedup_vs_hf", "avg_layers", "rougeL_vs_full",
           "token_agreement_vs_full", "confidence_flops_per_token", "confidence_ms_per_token"]
LTT_LABEL = "calm-softmax-ltt"
LTT_CANDIDATES = (0.99, 0.97, 0.95, 0.9, 0.8, 0.6)

NAME = "early-exit"
HELP = "decoding speed and quality of full / static / CALM / FREE / vocabulary pruning / skipping against HF generate"


def add_arguments(parser) -> None:
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--k", type=int, default=256, help="candidate-set size of the pruned-vocabulary rows")
    parser.add_argument("--methods", default=None,
                        help="comma-separated label prefixes or fnmatch patterns of the rows to run (default: all)")
    parser.add_argument("--calibration-prompts", type=int, default=16,
                        help="prompts for the Learn-then-Test row, disjoint from the timed ones (0: no LTT row)")
    parser.add_argument("--calibration-tokens", type=int, default=16, help="new tokens per calibration prompt")
    parser.add_argument("--ltt-delta", type=float, default=0.25, help="allowed mean disagreement (1 - ROUGE-L)")
    parser.add_argument("--ltt-epsilon", type=float, default=0.1, help="allowed probability of exceeding delta")
    parser.add_argument("--no-fitted-exits", action="store_true", help="use the plain logit lens at exits")
    parser.add_argument("--out", type=Path, default=None)


def calibrated_setting(model, tokenizer, prompts, max_new_tokens, base: dict[str, Any], delta: float, epsilon: float,
                       exit_transform=None, candidates: Sequence[float] = LTT_CANDIDATES):
    """Learn-then-Test (ROUGE-L distance to the full model) for CALM ``base``; (setting or None, LTTResult)."""
    from effllm.calibration import calibrate_threshold

    params = {k: v for k, v in base.items() if k not in ("label", "method", "exit_conf_threshold")}
    result = calibrate_threshold(model, prompts, max_new_tokens, candidates, delta, epsilon, method="calm",
                                 distance="rougeL", decode=tokenizer.decode, eos_token_id=[],
                                 exit_transform=exit_transform, progress=False, **params)
    if result.threshold is None:
        return None, result
    return {**base, "label": LTT_LABEL, "exit_conf_threshold": result.threshold}, result


def run(args) -> int:
    from effllm import vocab
    from effllm.lens import cached_linear_exits
    from effllm.models import load_model

    if args.prompts < 1 or args.max_new_tokens < 1 or args.calibration_prompts < 0 or args.calibration_tokens < 1:
        args._parser.error(f"--prompts, --max-new-tokens and --calibration-tokens must be >= 1 and "
                           f"--calibration-prompts >= 0; got {args.prompts}, {args.max_new_tokens}, "
                           f"{args.calibration_tokens} and {args.calibration_prompts}")
    if not (0 < args.ltt_delta < 1 and 0 < args.ltt_epsilon < 1):
        args._parser.error(f"--ltt-delta and --ltt-epsilon must lie in (0, 1); got {args.ltt_delta}, {args.ltt_epsilon}")
    torch.manual_seed(0)
    model, tokenizer = load_model(args.model)
    adapter = get_adapter(model)
    n_layers = adapter.num_layers
    if not 2 <= args.k <= adapter.vocab_size:
        args._parser.error(f"--k must lie in [2, {adapter.vocab_size}] (the vocabulary size); got {args.k}")
    settings = default_early_exit_settings(n_layers, k=args.k)
    ltt_base = {"label": LTT_LABEL, "method": "calm", "exit_conf_type": "softmax", "exit_min_layer": n_layers // 2}
    try:
        selected = select_settings([*settings, ltt_base], args.methods)
    except ValueError as error:
        args._parser.error(str(error))
    transform = None if args.no_fitted_exits else cached_linear_exits(model, tokenizer, args.model)
    fmt = prompt_format(model, tokenizer, args.model)
    budget = prompt_budget(model, max(args.max_new_tokens, args.calibration_tokens))
    prompts = bench_prompts(tokenizer, args.prompts, fmt=fmt, max_tokens=budget)
    result = {"model": args.model, "device": device_description(), "prompts": args.prompts,
              "max_new_tokens": args.max_new_tokens, "prompt_format": fmt, "fitted_exits": transform is not None,
              "torch": torch.__version__}
    with torch.inference_mode():
        if any(s["label"] == LTT_LABEL for s in selected):
            selected = [s for s in selected if s["label"] != LTT_LABEL]
            if args.calibration_prompts:
                calibration = bench_prompts(tokenizer, args.calibration_prompts, offset=args.prompts, fmt=fmt,
                                            max_tokens=budget)
                setting, ltt = calibrated_setting(model, tokenizer, calibration, args.calibration_tokens, ltt_base,
                                                  args.ltt_delta, args.ltt_epsilon, exit_transform=transform)
                result["calibration"] = {"delta": ltt.delta, "epsilon": ltt.epsilon, "n": ltt.n,
                                         "max_new_tokens": args.calibration_tokens, "distance": "1 - ROUGE-L",
                                         "threshold": ltt.threshold, "table": ltt.table.to_dict("records")}
                print(f"Learn-then-Test on {ltt.n} calibration prompts (delta={ltt.delta}, epsilon={ltt.epsilon}): "
                      f"threshold {ltt.threshold}")
                if setting is not None:
                    selected.append(setting)
        rows = early_exit_rows(model, tokenizer, prompts, args.max_new_tokens, selected, exit_transform=transform)
        check = vocab.confidence_check_cost(model, [args.k, None])
        floor = weight_read_floor(model)
    floor["max_full_depth_speedup_vs_hf"] = floor["tokens_per_s"] / rows[0]["tokens_per_s"]
    result["weight_read_floor"] = floor
    result["rows"] = rows
    result["confidence_check"] = check.to_dict("records")
    print_table(rows, COLUMNS, width=12)
    pruned = check[check.k == args.k].iloc[0]
    print(f"one confidence check: full vocabulary ({adapter.vocab_size}) {check.ms.max():.3f} ms, k={args.k} "
          f"{pruned.ms:.3f} ms ({pruned.speedup:.1f}x faster, {pruned.flops_ratio:.0f}x fewer FLOPs)")
    print(f"weight-read floor (every decoder linear and the LM head once, {floor['bytes_per_token'] / 1e6:.0f} MB): "
          f"{floor['ms_per_token']:.1f} ms/token, at most {floor['max_full_depth_speedup_vs_hf']:.2f}x HF generate "
          f"at full depth")
    write_result(result, args.out, f"early_exit_{args.model.replace('/', '--')}.json")
    return 0

"""Early-exit decoding: speed and quality of full / static / CALM / FREE against HF ``generate``.

    python -m effllm.bench early-exit [--model smollm2-135m] [--prompts 8] [--max-new-tokens 64]
                                      [--out results/early_exit_smollm2-135m.json]

Batch 1, greedy, prompts from the built-in tasks (arithmetic questions as chat turns and
HumanEval prompts as code completion). Every row decodes the same prompts for exactly
``max-new-tokens`` tokens (end-of-sequence ignored, so that rows do the same amount of work);
``speedup_vs_hf`` is against HF ``generate`` on the same prompts in the same run, and quality is
measured against the engine's own full-depth output (ROUGE-L, per-position token agreement).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from effllm import data, exits
from effllm.adapters import get_adapter
from effllm.bench import device_description, print_table, write_result
from effllm.lens import cached_linear_exits
from effllm.metrics import rouge_l
from effllm.models import chat_input_ids, load_model


def bench_prompts(tokenizer, n_prompts: int) -> list[torch.LongTensor]:
    """Half arithmetic questions (chat format), half HumanEval prompts (plain completion)."""
    questions = data.load("arithmetic", split="test")["question"]
    problems = data.load("humaneval")["prompt"]
    prompts = []
    for k in range(n_prompts):
        if k % 2 == 0:
            prompts.append(chat_input_ids(tokenizer, questions[k // 2]))
        else:
            prompts.append(tokenizer(problems[k // 2], return_tensors="pt").input_ids)
    return prompts


def _timed(fn, prompts):
    outputs, start = [], time.perf_counter()
    for ids in prompts:
        outputs.append(fn(ids))
    return outputs, time.perf_counter() - start


def early_exit_rows(model, tokenizer, prompts, max_new_tokens: int, settings: list[dict], exit_transform=None):
    """One row per setting in ``settings`` (dicts of generate() parameters with a "label")."""
    def hf(ids):
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                              min_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)

    def engine(params):
        return lambda ids: exits.generate(model, ids, max_new_tokens, eos_token_id=[], exit_transform=exit_transform,
                                          **params)

    hf(prompts[0][:, :4])  # warm-up: first-call allocations
    hf_out, hf_seconds = _timed(hf, prompts)
    new_tokens = sum(o.shape[1] - p.shape[1] for o, p in zip(hf_out, prompts, strict=True))
    hf_rate = new_tokens / hf_seconds
    full_out, _ = _timed(engine({"method": "full"}), prompts)
    full_new = [o.sequences[0, p.shape[1]:] for o, p in zip(full_out, prompts, strict=True)]
    full_text = [tokenizer.decode(t) for t in full_new]
    rows = [{"method": "hf_generate", "threshold": None, "tokens_per_s": hf_rate, "speedup_vs_hf": 1.0,
             "avg_layers": float(len(get_adapter(model).layers)), "rougeL_vs_full": None,
             "token_agreement_vs_full": None}]
    for setting in settings:
        params = {k: v for k, v in setting.items() if k != "label"}
        outputs, seconds = _timed(engine(params), prompts)
        produced = [o.sequences[0, p.shape[1]:] for o, p in zip(outputs, prompts, strict=True)]
        n_tokens = sum(len(t) for t in produced)
        agree = sum(int((a[: len(b)] == b[: len(a)]).sum()) for a, b in zip(produced, full_new, strict=True))
        rows.append({
            "method": setting["label"],
            "threshold": params.get("exit_conf_threshold", params.get("shallow2deep_conf_threshold")),
            "tokens_per_s": n_tokens / seconds,
            "speedup_vs_hf": (n_tokens / seconds) / hf_rate,
            "avg_layers": sum(float(o.exit_layers.double().sum()) for o in outputs) / n_tokens,
            "rougeL_vs_full": rouge_l([tokenizer.decode(t) for t in produced], full_text),
            "token_agreement_vs_full": agree / n_tokens,
        })
    return rows


def default_early_exit_settings(n_layers: int) -> list[dict]:
    mid, late = n_layers // 2, (2 * n_layers) // 3
    settings = [{"label": "full", "method": "full"}]
    settings += [{"label": f"static@{e}", "method": "static", "static_exit_layer": e} for e in (late, n_layers - 2)]
    settings += [{"label": "calm-softmax", "method": "calm", "exit_conf_type": "softmax", "exit_conf_threshold": t,
                  "exit_min_layer": mid} for t in (0.9, 0.7)]
    settings += [{"label": "calm-state", "method": "calm", "exit_conf_type": "state", "exit_conf_threshold": t,
                  "exit_min_layer": mid} for t in (0.99, 0.95)]
    settings += [{"label": f"free@{late}", "method": "free", "shallow_exit_layer": late,
                  "shallow2deep_conf_threshold": t} for t in (0.9, 0.7)]
    return settings


COLUMNS = ["method", "threshold", "tokens_per_s", "speedup_vs_hf", "avg_layers", "rougeL_vs_full",
           "token_agreement_vs_full"]

NAME = "early-exit"
HELP = "decoding speed and quality of full / static / CALM / FREE against HF generate"


def add_arguments(parser) -> None:
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--no-fitted-exits", action="store_true", help="use the plain logit lens at exits")
    parser.add_argument("--out", type=Path, default=None)


def run(args) -> int:
    if args.prompts < 1 or args.max_new_tokens < 1:
        args._parser.error(f"--prompts and --max-new-tokens must be >= 1; got {args.prompts} and {args.max_new_tokens}")
    torch.manual_seed(0)
    model, tokenizer = load_model(args.model)
    transform = None if args.no_fitted_exits else cached_linear_exits(model, tokenizer, args.model)
    prompts = bench_prompts(tokenizer, args.prompts)
    n_layers = get_adapter(model).num_layers
    with torch.inference_mode():
        rows = early_exit_rows(model, tokenizer, prompts, args.max_new_tokens,
                               default_early_exit_settings(n_layers), exit_transform=transform)
    result = {"model": args.model, "device": device_description(), "prompts": args.prompts,
              "max_new_tokens": args.max_new_tokens, "fitted_exits": transform is not None,
              "torch": torch.__version__, "rows": rows}
    print_table(rows, COLUMNS)
    write_result(result, args.out, f"early_exit_{args.model.replace('/', '--')}.json")
    return 0

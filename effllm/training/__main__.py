"""``python -m effllm.training``: train a model's exits with a recipe (or load the cached result) and write
``results/exit_training_<model>.json`` (``_<task>`` added for task-trained exits, ``--recipe task``: held-out numbers
on the task's validation answers): minutes, configuration, held-out perplexity of the last layer before
and after, top-1 agreement with the untouched last layer per layer before and after, the loss per exit over
the steps and the agreement-vs-minutes curve."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from effllm import io, stamps
from effllm.paths import REPO_ROOT


def _override(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (a JSON value, e.g. steps=300 or exit_layers=[15,20]); "
                                         f"got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def main(argv: list[str] | None = None) -> int:
    from effllm.bench import device_description
    from effllm.training import RECIPES, recipe, train_exits

    parser = argparse.ArgumentParser(prog="python -m effllm.training", description=__doc__)
    parser.add_argument("--model", default="smollm2-135m", help="model name (load_model); default smollm2-135m")
    parser.add_argument("--recipe", default="default", choices=sorted(RECIPES), help="training recipe")
    parser.add_argument("--set", dest="overrides", action="append", type=_override, default=[], metavar="KEY=VALUE",
                        help="override a configuration field (repeatable), e.g. --set steps=300")
    parser.add_argument("--retrain", action="store_true", help="train even when a cached result exists")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default results/exit_training_<model>.json)")
    args = parser.parse_args(argv)
    try:
        config = recipe(args.recipe, model=args.model, **dict(args.overrides))
    except (TypeError, ValueError) as error:
        parser.error(str(error))
    name = args.model.replace("/", "--") + (f"_{config.task}" if config.task else "")
    out = io.check_writable(args.out or REPO_ROOT / "results" / f"exit_training_{name}.json")
    started = time.perf_counter()
    _, _, exits, result = train_exits(config, retrain=args.retrain)
    summary = {
        "recipe": args.recipe,
        "machine": device_description(),
        "loaded_from_cache": time.perf_counter() - started < 60 and not args.retrain,
        "total_minutes": result["teacher_pass_minutes"] + result["training_minutes"],
        "total_cpu_minutes": result["teacher_pass_cpu_minutes"] + result["training_cpu_minutes"],
        **result,
    }
    io.write_json(out, {**summary, "stamp": stamps.run_stamp()})
    print(f"wrote {out}")
    for layer in config.exit_layers:
        print(f"layer {layer}: agreement with the last layer {result['agreement_before'][str(layer)]:.3f} -> "
              f"{result['agreement_after'][str(layer)]:.3f}")
    print(f"last-layer perplexity {result['perplexity_before']:.3f} -> {result['perplexity_after']:.3f} "
          f"(ratio {result['perplexity_ratio']:.4f}); {summary['total_minutes']:.1f} min "
          f"({summary['total_cpu_minutes']:.1f} CPU min on {result['threads']} threads)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

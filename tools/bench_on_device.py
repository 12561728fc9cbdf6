"""``python -m effllm.bench ...`` with the benchmark's models and prompts on a device of your choice.

    python tools/bench_on_device.py --device cuda early-exit --model smollm2-135m --dtype bfloat16 --prompts 4

A stopgap for benchmarks without a ``--device`` option of their own. ``early-exit`` loads its model with
``load_model``'s default device, the CPU (effllm/bench/early_exit.py, ``run``), so on a GPU machine it would
measure the CPU. This wraps ``effllm.models.load_model`` so that every model the benchmark loads goes to
``--device`` (unless the benchmark names a device itself), and ``effllm.experiments.prompts.task_prompts`` so
that the prompts follow the model: ``effllm.decoding.decode`` synchronises and times on the device of its input
ids, so CUDA weights with CPU prompts would be timed without waiting for the GPU. Everything else is the
benchmark's own code, and its JSON records the device (``torch.cuda.get_device_name()``). The ``sparse``
benchmark has ``--device`` and needs no wrapper. Once early-exit has ``--device``, call it directly.

The wrapping works because the benchmarks import ``load_model`` and ``task_prompts`` inside ``run``, after this
script has replaced them; tests/test_gpu_check.py checks that the model and the prompts land on the device.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import sys
from collections.abc import Sequence
from pathlib import Path

# Run as a script from anywhere: the repository's effllm, not an installed copy elsewhere.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def place_on(device: str) -> None:
    """Make every later ``load_model`` (without a device of its own) and ``task_prompts`` use ``device``."""
    import effllm.models
    from effllm.experiments import prompts

    load_model, task_prompts = effllm.models.load_model, prompts.task_prompts
    load_signature = inspect.signature(load_model)

    @functools.wraps(load_model)
    def load_on_device(*args, **kwargs):
        bound = load_signature.bind(*args, **kwargs)
        if bound.arguments.get("device") is None and bound.arguments.get("device_map") is None:
            bound.arguments["device"] = device
        return load_model(*bound.args, **bound.kwargs)

    @functools.wraps(task_prompts)
    def prompts_on_device(*args, **kwargs):
        return [prompt.to(device) for prompt in task_prompts(*args, **kwargs)]

    effllm.models.load_model = load_on_device
    prompts.task_prompts = prompts_on_device


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python tools/bench_on_device.py",
        description="python -m effllm.bench BENCHMARK ... with models and prompts on --device (for benchmarks "
        "without a --device option: early-exit).")
    parser.add_argument("--device", required=True, help="cuda, cuda:N or cpu")
    parser.add_argument("benchmark", nargs=argparse.REMAINDER, help="the arguments of python -m effllm.bench")
    args = parser.parse_args(argv)
    if not args.benchmark:
        parser.error("give the benchmark and its arguments, e.g. early-exit --model smollm2-135m")
    import torch

    try:
        device = torch.device(args.device)
    except RuntimeError as error:
        parser.error(f"--device {args.device!r} is not a torch device ({error}); give cuda, cuda:N or cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: torch {torch.__version__} sees no CUDA GPU here (a CPU build, or no "
                     "driver); install a CUDA build of torch (tools/install_torch.sh on the GPU machine)")
    place_on(str(device))
    from effllm.bench import main as bench_main

    return bench_main(args.benchmark)


if __name__ == "__main__":
    sys.exit(main())

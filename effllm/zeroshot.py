"""Zero-shot multiple-choice accuracy through lm-evaluation-harness, on local data (no hub).

    result = zero_shot_accuracy(model, tokenizer, "prose-mc", limit=100)
    # {"task": "prose-mc", "accuracy": 0.62, "accuracy_norm": 0.60, "n": 100, "chance": 0.25, ...}

The built-in tasks (``TASKS``) are multiple-choice sets that effllm.data generates with a fixed seed
(``arithmetic-mc``: a word problem's answer among four numbers; ``prose-mc``: the true end of a
sentence of English prose among four). Their test split is written as plain JSONL and handed to
lm-eval as a task config with ``dataset_path: json`` and ``dataset_kwargs: {data_files: ...}``, the same
as a task YAML file (``task_config`` returns it). lm-eval scores each choice by the summed
log-likelihood of ``" " + choice`` after the prompt (``accuracy``) and by that sum divided by the
choice's length in characters (``accuracy_norm``), and takes the argmax.

The model is any ``nn.Module`` with the Hugging Face causal-LM call signature
(``model(input_ids).logits``): a ``PreTrainedModel`` or a pruned / sliced module. It is wrapped in a small
module that gives lm-eval's ``HFLM`` the attributes it reads (``config``, ``device``, ``tie_weights``), so
HFLM never re-ties or moves the model's own weights; its training flag is restored afterwards. The
tokenizer is always passed, so nothing is looked up on the hub.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from effllm import data
from effllm.paths import cache_dir, write_atomic

# Built-in task name -> how lm-eval reads one record: the prompt (a Jinja template over the record's fields).
TASK_PROMPTS: dict[str, str] = {
    "arithmetic-mc": "Question: {{question}}\nAnswer:",
    "prose-mc": "{{context}}",
}
TASKS: tuple[str, ...] = tuple(TASK_PROMPTS)
SPLIT = "test"  # the multiple-choice sets are evaluation-only
# lm-eval's own tasks on hub data: the zero-shot suite of Wanda and of seed 002 (the `paper` profile).
HUB_TASKS: tuple[str, ...] = ("boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")


def _check_task(task: str, hub_allowed: bool = False) -> None:
    if task in TASK_PROMPTS or (hub_allowed and task in HUB_TASKS):
        return
    raise ValueError(
        f"Unknown zero-shot task {task!r}; built-in tasks: {', '.join(TASKS)} (generated offline by "
        f"effllm.data, scored with lm-eval); lm-eval hub tasks (need the hub): {', '.join(HUB_TASKS)}."
    )


def task_records(task: str) -> list[dict[str, Any]]:
    """The evaluation records of ``task`` (its test split): prompt fields, ``choices`` and ``label``."""
    _check_task(task)
    return data.load(task, split=SPLIT).to_list()


def task_jsonl(task: str) -> Path:
    """The test split of ``task`` as plain JSONL for lm-eval's json loader (one record a line).

    The file name carries a hash of its content, so a rebuilt data set gets a new file and processes
    that run at the same time never write one another's file (each write is atomic)."""
    body = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in task_records(task)).encode()
    digest = hashlib.sha256(body).hexdigest()[:16]
    path = cache_dir() / "data" / "lm-eval" / f"{task}-{SPLIT}-{digest}.jsonl"
    if not path.is_file() or path.stat().st_size != len(body):
        write_atomic(path, body)
    return path


def task_config(task: str) -> dict[str, Any]:
    """lm-eval's task config for ``task`` (what a task YAML file would hold), reading :func:`task_jsonl`."""
    _check_task(task)
    return {
        "task": f"effllm_{task.replace('-', '_')}",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {SPLIT: str(task_jsonl(task))}},
        "test_split": SPLIT,
        "output_type": "multiple_choice",
        "doc_to_text": TASK_PROMPTS[task],
        "doc_to_choice": "choices",
        "doc_to_target": "label",
        "target_delimiter": " ",
        "num_fewshot": 0,
        "metric_list": [
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
        ],
        "metadata": {"version": 1.0},
    }


class _CausalLMView(nn.Module):
    """What lm-eval's HFLM needs of a model, around any module with the HF causal-LM call signature."""

    def __init__(self, model: nn.Module, config: Any):
        super().__init__()
        self.model = model
        self.config = config

    @property
    def device(self) -> torch.device:
        for tensor in self.model.parameters():
            return tensor.device
        return torch.device("cpu")

    def tie_weights(self) -> None:
        """HFLM calls this; the wrapped model's weights are left exactly as they are."""

    def forward(self, input_ids: torch.Tensor, **kwargs: Any) -> Any:
        return self.model(input_ids, **kwargs)


def _model_config(model: nn.Module) -> Any:
    config = getattr(model, "config", None)
    if config is not None:
        return config
    from transformers import PretrainedConfig

    return PretrainedConfig()  # lm-eval only reads optional fields of it (max length, quantization)


def _check_model(model: Any) -> None:
    if not isinstance(model, nn.Module) or not callable(model):
        raise TypeError(
            f"model must be a torch nn.Module called as model(input_ids) -> output with .logits; got "
            f"{type(model).__name__}."
        )


def zero_shot_accuracy(
    model: nn.Module,
    tokenizer: Any,
    task: str = "arithmetic-mc",
    limit: int | None = None,
    batch_size: int = 8,
) -> dict[str, Any]:
    """Zero-shot accuracy of ``model`` on the built-in multiple-choice ``task``, scored by lm-eval.

    ``task`` is a built-in task (``TASKS``, offline) or one of lm-eval's ``HUB_TASKS`` (hub data; offline
    they raise :class:`effllm.data.DataNotAvailableError`). ``limit`` keeps the first ``limit`` items
    (None: all). Returns ``{"task", "accuracy", "accuracy_norm", "n", "chance", "choices"}`` (chance and
    choices for built-in tasks): ``accuracy`` takes the choice with the
    highest summed log-likelihood, ``accuracy_norm`` the highest per character; ``chance`` is 1 / choices.
    """
    _check_task(task, hub_allowed=True)
    _check_model(model)
    if task in HUB_TASKS and data._hub_offline():
        raise data.DataNotAvailableError(
            f"Zero-shot task {task!r} is lm-eval's, on hub data, and HF_HUB_OFFLINE or HF_DATASETS_OFFLINE is "
            f"set. Built-in tasks that work offline: {', '.join(TASKS)}."
        )
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive number of items or None (all); got {limit!r}.")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer; got {batch_size!r}.")
    if tokenizer is None:
        raise ValueError("Pass the model's tokenizer: without one lm-eval would look it up on the hub.")

    from lm_eval.evaluator import evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    quiet = [logging.getLogger(name) for name in ("lm_eval", "lm-eval")]
    levels = [logger.level for logger in quiet]
    for logger in quiet:
        logger.setLevel(logging.ERROR)
    was_training = model.training
    try:
        view = _CausalLMView(model, _model_config(model))
        lm = HFLM(pretrained=view, tokenizer=tokenizer, backend="causal", batch_size=batch_size)
        # lm-eval's evaluate(), not simple_evaluate(): the latter also reseeds the global random generators
        # and collects environment information (pip, GPUs) in subprocesses, seconds per call on a small CPU.
        if task in HUB_TASKS:
            tasks = TaskManager().load([task])
        else:
            tasks = TaskManager(include_defaults=False).load([task_config(task)])  # no index of lm-eval's tasks
        results = evaluate(lm=lm, task_dict=tasks, limit=limit, bootstrap_iters=0, log_samples=False)
    finally:
        model.train(was_training)
        for logger, level in zip(quiet, levels, strict=True):
            logger.setLevel(level)
    name = task if task in HUB_TASKS else task_config(task)["task"]
    metrics = results["results"][name]
    n = int(results["n-samples"][name]["effective"])
    result = {"task": task, "accuracy": float(metrics["acc,none"]), "n": n}
    if task in TASK_PROMPTS:
        scored = task_records(task)[:n]
        result["chance"] = sum(1 / len(record["choices"]) for record in scored) / n
        result["choices"] = max(len(record["choices"]) for record in scored)
    if "acc_norm,none" in metrics:
        result["accuracy_norm"] = float(metrics["acc_norm,none"])
    return result

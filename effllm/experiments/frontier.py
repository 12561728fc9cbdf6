"""Every method on one model (notebook 07): one row per model-level method (pruning, slicing, layer removal) or
decode-time method (early exit, skipping, self-speculation, or a combination), all measured the same way.

    table = FrontierTable(dense, tokenizer, prompts, max_new_tokens=48, prefill_ids=ids, eval_tokens=tokens,
                          settings=FrontierSettings(rounds=5, speed_prompts=8))
    table.add_model("Wanda 50%", "wanda", pruned_model)                         # a model-level method
    table.add_decoder("CALM 0.9", "calm", dense, Calm(...), base="dense")        # a decode-time method
    table.frame()                                                                # the tidy table

Every row decodes to the end of its answer (each prompt stops at the end of sequence or at ``max_new_tokens``;
``FrontierSettings(stop_at_eos=False)``: exactly ``max_new_tokens``, for micro-benchmarks; the ``decoded_to``
column says which). Quality: ROUGE-L over token ids (and per-position token agreement) of every prompt's
generation against the dense model's, with a 95% bootstrap interval over prompts, the generations decoded in
left-padded batches (:func:`effllm.decoding.batched.decode_rows`: each row as decoded alone); a model-level row
also gets held-out perplexity, optionally HumanEval pass@1 and a zero-shot task. Speed: the row and the dense
model decode each of the first ``speed_prompts`` prompts at batch 1, once per round for ``rounds`` rounds, every
call of a round in a shuffled order. By default (``FrontierSettings(time_together=True)``) every row is timed in
one interleaved run when the table is read (:meth:`FrontierTable.frame`, or :meth:`FrontierTable.time`): the dense
model is timed once against all rows, and every row's calls share its rounds (a row's model is kept until then);
``time_together=False`` times each row against the dense model as it is added (its model can be freed at once:
the ``paper`` profile's 7B copies). ``FrontierSettings(timed=...)`` (label prefixes or fnmatch patterns) times only
the rows it names, the others keep NaN speed columns and ``n_speed_prompts`` 0 (their counted costs and quality
still stand). ``speedup_vs_dense`` is the paired ratio (per prompt the median over rounds of
the row's tokens/s over the dense model's on that prompt in that round, then the mean over prompts), with a 95%
bootstrap interval over prompts (``speedup_vs_dense_ci_low`` / ``_ci_high``) and the range over rounds of the
pooled ratio (``speedup_vs_dense_round_min`` / ``_round_max``; a range, not an interval)
(:func:`effllm.experiments.stats.paired_ratio_summary`). ``tokens_per_s`` / ``dense_tokens_per_s`` (absolute,
median over rounds) and ``prefill_ms`` (single-shot) are extra columns for reading against the machine, not for
ranking. Costs that are counted rather than measured (parameters, matmul FLOPs per generated token) come from
:mod:`effllm.frontier`.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from effllm import frontier, metrics, zeroshot
from effllm.decoding import DecodeOutput, Full, Policy, decode
from effllm.decoding.batched import decode_rows
from effllm.execution import require_code_execution
from effllm.experiments.evaluate import humaneval_pass_at_1
from effllm.experiments.prompts import Prompt, as_ids
from effllm.experiments.runs import decoded_to, names_label
from effllm.experiments.stats import mean_ci, paired_ratio_summary
from effllm.experiments.timing import prefill_seconds, time_rounds

TABLE_EXITS: Any = object()  # a row that names no exits of its own reads the table's (``exit_transform=``)
DENSE_SIDE = "\x00dense"  # the dense model's calls in a timing run (no row label can be this)
# the speed columns of a row not (yet) timed
UNTIMED: dict[str, Any] = {**{f"speedup_vs_dense{key}": math.nan for key in ("", "_ci_low", "_ci_high", "_round_min",
                                                                               "_round_max")},
                           "n_speed_prompts": 0, "rounds": 0, "tokens_per_s": math.nan, "dense_tokens_per_s": math.nan}

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

    Perplexity over ``eval_windows`` windows of ``eval_seq_len`` tokens in batches of ``batch_size``; quality
    generations in batches of ``decode_batch_size``, to the end of sequence (``stop_at_eos=False``: exactly
    ``max_new_tokens``, fixed length); speed over the first ``speed_prompts`` prompts at batch 1 in ``rounds``
    interleaved rounds (order shuffled by ``seed``); prefill time the median over ``prefill_min_run_time`` seconds;
    optionally a zero-shot task (``zero_shot_task``, its first ``zero_shot_limit`` items) and HumanEval pass@1
    (``humaneval_problems`` problems, ``humaneval_max_new_tokens`` tokens each; needs ``allow_code_execution``);
    ``transform_flops``: FLOPs of one exit check of the table's exit map; ``progress``: print each row as it is
    added; ``time_together``: time every row in one interleaved run when the table is read (True) or each row as
    it is added (False); ``timed``: the rows timed (label prefixes or fnmatch patterns, ``"!pattern"`` excludes;
    None: every row)."""

    eval_seq_len: int = 256
    eval_windows: int | None = 4
    batch_size: int = 8
    speed_prompts: int = 8
    rounds: int = 5
    prefill_min_run_time: float = 0.5
    zero_shot_task: str | None = None
    zero_shot_limit: int | None = None
    humaneval_problems: int = 0
    humaneval_max_new_tokens: int = 96
    allow_code_execution: bool = False
    transform_flops: int = 0
    progress: bool = True
    seed: int = 0
    decode_batch_size: int = 32
    stop_at_eos: bool = True
    time_together: bool = True
    timed: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.timed, str):
            object.__setattr__(self, "timed", (self.timed,))
        elif self.timed is not None:
            object.__setattr__(self, "timed", tuple(str(t) for t in self.timed))


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
        self.pending: list[tuple[dict[str, Any], nn.Module, Policy, Any]] = []  # rows to time together
        self.eos = None if settings.stop_at_eos else []
        with torch.inference_mode():
            decode(dense, self.prompts[0][:, :4], 2, Full(), eos_token_id=[])  # first-call allocations
            self.reference = [o.new_tokens()[0] for o in self._decode(dense, Full())]

    def _exits(self, exit_transform: Any) -> Any:
        return self.exit_transform if exit_transform is TABLE_EXITS else exit_transform

    def _decode(self, model: nn.Module, policy: Policy, exit_transform: Any = TABLE_EXITS) -> list[DecodeOutput]:
        """Every prompt's output (quality), decoded in left-padded batches of ``decode_batch_size``."""
        return decode_rows(model, self.prompts, self.max_new_tokens, policy, batch_size=self.settings.decode_batch_size,
                           eos_token_id=self.eos, exit_transform=self._exits(exit_transform))

    def _timed(self, label: str) -> bool:
        """Whether ``settings.timed`` names the row: a label prefix or fnmatch pattern matches it and no
        ``"!pattern"`` excludes it (None: every row)."""
        return names_label(label, self.settings.timed)

    def _speeds(self, sides: dict[str, tuple[nn.Module, Policy, Any]]) -> dict[str, dict[str, float]]:
        """The paired speed of every side (label -> (model, policy, exits)) against the dense model, all timed in
        one run: one batch-1 call per (side or dense, prompt) of the first ``speed_prompts`` prompts in every
        round, the calls of a round shuffled together."""
        # a side that is the dense model at full depth (the "dense" row) reads the dense calls: its ratio is 1
        same = {side: DENSE_SIDE if m is self.dense and isinstance(p, Full) else side for side, (m, p, _) in sides.items()}
        everyone = {DENSE_SIDE: (self.dense, Full(), None), **{s: sides[s] for s in sides if same[s] == s}}
        calls, keys = {}, {}
        for side, (m, p, exits) in everyone.items():
            for k, ids in enumerate(self.prompts[: self.speed_prompts]):
                key = f"{side}\x00{k}"
                keys[key] = (side, k)
                calls[key] = (lambda m=m, p=p, ids=ids, exits=exits: decode(
                    m, ids, self.max_new_tokens, p, eos_token_id=self.eos, exit_transform=exits))
        shape = (self.speed_prompts, self.settings.rounds)
        grids = {(side, what): np.full(shape, np.nan) for side in everyone for what in ("tokens", "seconds")}
        for t in time_rounds(calls, self.settings.rounds, seed=self.settings.seed):
            side, k = keys[t.label]
            grids[(side, "tokens")][k, t.round] = t.value.exit_layers.shape[1]
            grids[(side, "seconds")][k, t.round] = t.seconds

        def rate(side: str) -> float:
            return float(np.median(grids[(side, "tokens")].sum(axis=0) / grids[(side, "seconds")].sum(axis=0)))

        speeds = {}
        for label, side in same.items():
            paired = paired_ratio_summary(grids[(side, "tokens")], grids[(side, "seconds")],
                                          grids[(DENSE_SIDE, "tokens")], grids[(DENSE_SIDE, "seconds")],
                                          seed=self.settings.seed)
            speeds[label] = {"speedup_vs_dense": paired["mean"], "speedup_vs_dense_ci_low": paired["ci_low"],
                            "speedup_vs_dense_ci_high": paired["ci_high"],
                            "speedup_vs_dense_round_min": paired["round_min"],
                            "speedup_vs_dense_round_max": paired["round_max"], "n_speed_prompts": paired["n_prompts"],
                            "rounds": paired["rounds"], "tokens_per_s": rate(side),
                            "dense_tokens_per_s": rate(DENSE_SIDE)}
        return speeds

    def time(self) -> None:
        """Time every row added since the last call in one interleaved run (``time_together``) and fill in their
        speed columns; :meth:`frame` calls it. The rows' models are released afterwards."""
        if not self.pending:
            return
        with torch.inference_mode():
            speeds = self._speeds({row["method"]: (model, policy, exits) for row, model, policy, exits in self.pending})
        for row, *_ in self.pending:
            row.update(speeds[row["method"]])
            self._report(row)
        self.pending.clear()

    def _row(self, label: str, family: str, model: nn.Module, policy: Policy, exit_transform: Any = TABLE_EXITS,
             transform_flops: int | None = None) -> dict[str, Any]:
        if any(r["method"] == label for r in self.rows):
            raise ValueError(f"a row labelled {label!r} is already in the table; give each row its own label")
        with torch.inference_mode():
            outputs = self._decode(model, policy, exit_transform=exit_transform)
        speed: dict[str, Any] = dict(UNTIMED)
        if self._timed(label) and not self.settings.time_together:
            with torch.inference_mode():
                speed = self._speeds({label: (model, policy, self._exits(exit_transform))})[label]
        new = [o.new_tokens()[0] for o in outputs]
        rouge = [metrics.token_rouge_l(a.tolist(), b.tolist()) for a, b in zip(new, self.reference, strict=True)]
        agree = sum(int((a[: len(b)] == b[: len(a)]).sum()) for a, b in zip(new, self.reference, strict=True))
        mean, low, high = mean_ci(rouge)
        kv = policy_kv_mode(policy)
        per_check = self.settings.transform_flops if transform_flops is None else transform_flops
        checks = per_check if policy.method in ("calm", "free", "static") else 0
        return {"method": label, "family": family, "policy": policy.method, "decoded_to": decoded_to(self.eos is None),
                **speed,
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
            result = humaneval_pass_at_1(model, self.tokenizer, settings.humaneval_problems,
                                         settings.humaneval_max_new_tokens, settings.batch_size, policy=policy,
                                         exit_transform=self._exits(exit_transform), allow_code_execution=settings.allow_code_execution)
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
        return self._add(row, extra, model, Full())

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
        return self._add(row, extra, model, policy, exit_transform)

    def _add(self, row: dict[str, Any], extra: dict[str, Any], model: nn.Module, policy: Policy,
             exit_transform: Any = TABLE_EXITS) -> dict[str, Any]:
        """Append ``row``; with ``time_together`` a row to be timed waits (with its model) for :meth:`time`."""
        row.update(extra)
        self.rows.append(row)
        if self.settings.time_together and self._timed(row["method"]):
            self.pending.append((row, model, policy, self._exits(exit_transform)))
            if self.settings.progress:
                print(f"{row['method']:<30} ROUGE-L {row['rougeL_vs_dense']:.3f}  {row['gflops_per_token']:.3f} "
                      f"GFLOPs/token  ppl {row['perplexity']:.2f}  (timed with the other rows when the table is read)")
        else:
            self._report(row)
        return row

    def _report(self, row: dict[str, Any]) -> None:
        if self.settings.progress:
            speed = (f"{row['speedup_vs_dense']:5.2f}x dense [{row['speedup_vs_dense_ci_low']:.2f}, "
                     f"{row['speedup_vs_dense_ci_high']:.2f}]" if row["n_speed_prompts"] else "not timed")
            print(f"{row['method']:<30} {speed}  ROUGE-L {row['rougeL_vs_dense']:.3f}  "
                  f"{row['gflops_per_token']:.3f} GFLOPs/token  ppl {row['perplexity']:.2f}")

    def frame(self) -> pd.DataFrame:
        """The tidy table, one row per method (the rows still to be timed are timed first: :meth:`time`)."""
        self.time()
        return pd.DataFrame(self.rows)

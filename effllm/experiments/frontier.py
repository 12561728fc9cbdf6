"""Every method on one model (notebook 07): one row per model-level method (pruning, slicing, layer removal) or
decode-time method (early exit, skipping, self-speculation, or a combination), all measured the same way.

    table = FrontierTable(dense, tokenizer, prompts, max_new_tokens=32, prefill_ids=ids, eval_tokens=tokens)
    table.add_model("Wanda 50%", "wanda", pruned_model)                         # a model-level method
    table.add_decoder("CALM 0.9", "calm", dense, Calm(...), base="dense")        # a decode-time method
    table.frame()                                                                # the tidy table

Quality: ROUGE-L over token ids (and per-position token agreement) of every prompt's generation against the
dense model's, with a 95% bootstrap interval over prompts; a model-level row also gets held-out perplexity,
optionally HumanEval pass@1 and a zero-shot task. Speed: tokens/s over the first ``speed_prompts`` prompts in
``rounds`` rounds, each round timing the row and then the dense model, so that ``speedup_vs_dense`` is the
median of per-round ratios measured back to back. Costs that are counted rather than measured (parameters,
matmul FLOPs per generated token) come from :mod:`effllm.frontier`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
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
from effllm.experiments.timing import prefill_seconds

TABLE_EXITS: Any = object()  # a row that names no exits of its own reads the table's (``exit_transform=``)

KV_POLICIES = {"full": "propagate", "static": "propagate", "calm": "propagate", "skip": "propagate",
               "free": "deferred", "self-spec": "deferred"}


class FrontierTable:
    """Rows of the efficiency frontier, measured against the dense model ``dense`` (see the module docstring)."""

    def __init__(self, dense: nn.Module, tokenizer: Any, prompts: Sequence[Prompt | torch.LongTensor],
                 max_new_tokens: int, *, prefill_ids: torch.LongTensor, eval_tokens: torch.LongTensor,
                 eval_seq_len: int = 256, eval_windows: int | None = 4, batch_size: int = 8, speed_prompts: int = 4,
                 rounds: int = 3, prefill_min_run_time: float = 0.5, zero_shot_task: str | None = None,
                 zero_shot_limit: int | None = None, humaneval_problems: int = 0, humaneval_max_new_tokens: int = 96,
                 allow_code_execution: bool = False, exit_transform: Any = None, transform_flops: int = 0,
                 progress: bool = True):
        self.dense, self.tokenizer = dense, tokenizer
        self.prompts = as_ids(prompts)
        self.max_new_tokens = max_new_tokens
        self.prefill_ids, self.eval_tokens = prefill_ids, eval_tokens
        self.eval_seq_len, self.eval_windows, self.batch_size = eval_seq_len, eval_windows, batch_size
        self.speed_prompts, self.rounds = max(1, min(speed_prompts, len(self.prompts))), rounds
        self.prefill_min_run_time = prefill_min_run_time
        self.zero_shot_task, self.zero_shot_limit = zero_shot_task, zero_shot_limit
        self.humaneval_problems, self.humaneval_max_new_tokens = humaneval_problems, humaneval_max_new_tokens
        self.allow_code_execution = allow_code_execution
        if humaneval_problems:
            require_code_execution(allow_code_execution)  # before any slow work
        self.exit_transform, self.transform_flops = exit_transform, transform_flops
        self.progress = progress
        self.rows: list[dict[str, Any]] = []
        with torch.inference_mode():
            decode(dense, self.prompts[0][:, :4], 2, Full(), eos_token_id=[])  # first-call allocations
            self.reference = [o.new_tokens(0)[0] for o in self._decode(dense, Full())]

    def _decode(self, model: nn.Module, policy: Policy, prompts: Sequence[torch.LongTensor] | None = None,
                exit_transform: Any = TABLE_EXITS) -> list[DecodeOutput]:
        exits = self.exit_transform if exit_transform is TABLE_EXITS else exit_transform
        return [decode(model, ids, self.max_new_tokens, policy, eos_token_id=[], exit_transform=exits)
                for ids in (self.prompts if prompts is None else prompts)]

    def _speed(self, model: nn.Module, policy: Policy, exit_transform: Any = TABLE_EXITS) -> dict[str, float]:
        """tokens/s of (model, policy) and its ratio to the dense model's, round by round, back to back."""
        timed = self.prompts[: self.speed_prompts]
        rates, ratios = [], []
        for _ in range(self.rounds):
            seconds = []
            for m, p in ((model, policy), (self.dense, Full())):
                start = time.perf_counter()
                outputs = self._decode(m, p, timed, exit_transform)
                seconds.append((time.perf_counter() - start, sum(o.exit_layers.shape[1] for o in outputs)))
            (row_s, row_n), (dense_s, dense_n) = seconds
            rates.append(row_n / row_s)
            ratios.append((row_n / row_s) / (dense_n / dense_s))
        spread = ratio_summary(ratios)
        return {"tokens_per_s": float(pd.Series(rates).median()), "speedup_vs_dense": spread["median"],
                "speedup_vs_dense_min": spread["min"], "speedup_vs_dense_max": spread["max"]}

    def _row(self, label: str, family: str, model: nn.Module, policy: Policy, exit_transform: Any = TABLE_EXITS,
             transform_flops: int | None = None) -> dict[str, Any]:
        with torch.inference_mode():
            outputs = self._decode(model, policy, exit_transform=exit_transform)
            speed = self._speed(model, policy, exit_transform)
        new = [o.new_tokens(0)[0] for o in outputs]
        rouge = [metrics.token_rouge_l(a.tolist(), b.tolist()) for a, b in zip(new, self.reference, strict=True)]
        agree = sum(int((a[: len(b)] == b[: len(a)]).sum()) for a, b in zip(new, self.reference, strict=True))
        mean, low, high = mean_ci(rouge)
        kv = KV_POLICIES.get(policy.method, "propagate")
        per_check = self.transform_flops if transform_flops is None else transform_flops
        checks = per_check if policy.method in ("calm", "free", "static") else 0
        return {"method": label, "family": family, "policy": policy.method, **speed,
                "gflops_per_token": frontier.decode_flops(model, outputs, self.prompts, kv, checks) / 1e9,
                "avg_layers": sum(float(o.exit_layers.double().sum()) for o in outputs)
                / sum(o.exit_layers.numel() for o in outputs),
                "rougeL_vs_dense": mean, "rougeL_vs_dense_ci_low": low, "rougeL_vs_dense_ci_high": high,
                "token_agreement": agree / max(1, sum(len(t) for t in new)), "n_prompts": len(new),
                "identical_to_dense": sum(torch.equal(a, b) for a, b in zip(new, self.reference, strict=True)) / len(new)}

    def _task_quality(self, model: nn.Module, policy: Policy | None, row: dict[str, Any],
                      exit_transform: Any = TABLE_EXITS) -> None:
        if self.humaneval_problems:
            exits = self.exit_transform if exit_transform is TABLE_EXITS else exit_transform
            result = humaneval_pass_at_1(model, self.tokenizer, self.humaneval_problems, self.humaneval_max_new_tokens,
                                         self.batch_size, policy=policy, exit_transform=exits,
                                         allow_code_execution=self.allow_code_execution)
            mean, low, high = mean_ci([float(p) for p in result["passed"]])
            row.update({"humaneval_pass@1": mean, "humaneval_ci_low": low, "humaneval_ci_high": high,
                        "humaneval_n": result["n"]})

    def add_model(self, label: str, family: str, model: nn.Module, **extra: Any) -> dict[str, Any]:
        """A model-level method: decode with every layer, and measure the model itself."""
        row = self._row(label, family, model, Full())
        stored = {p.data_ptr(): p for p in model.parameters()}.values()
        with torch.inference_mode():
            row.update(parameters_M=frontier.parameter_count(model) / 1e6,
                       nonzero_parameters_M=sum(int(torch.count_nonzero(p)) for p in stored) / 1e6,
                       prefill_ms=1e3 * prefill_seconds(model, self.prefill_ids, self.prefill_min_run_time),
                       perplexity=metrics.perplexity(model, self.eval_tokens, seq_len=self.eval_seq_len,
                                                     batch_size=self.batch_size, max_windows=self.eval_windows))
        if self.zero_shot_task:
            scores = zeroshot.zero_shot_accuracy(model, self.tokenizer, self.zero_shot_task,
                                                 limit=self.zero_shot_limit, batch_size=self.batch_size)
            row[f"accuracy_{self.zero_shot_task}"] = scores["accuracy"]
            row["zero_shot_n"] = scores.get("n", self.zero_shot_limit)
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
        if self.progress:
            print(f"{row['method']:<30} {row['speedup_vs_dense']:5.2f}x dense  ROUGE-L {row['rougeL_vs_dense']:.3f}  "
                  f"{row['gflops_per_token']:.3f} GFLOPs/token  ppl {row['perplexity']:.2f}")
        return row

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows)

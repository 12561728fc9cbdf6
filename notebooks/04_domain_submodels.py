# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.7
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 04 · Domain-specific sub-models: Wanda pruning with domain calibration data
#
# Wanda (Sun et al., 2023) prunes a language model without retraining: each weight is scored by
# |W_ij| · ||X_j||, its magnitude times the norm of its input feature over a few calibration sequences, and
# the lowest-scoring half of every output row is zeroed, layer by layer. Because the scores depend on the
# calibration data, the thesis behind seed 002 ("Building Domain-Specific Sub-Models from Large Language
# Models using Pruning") asks whether pruning with **in-domain** calibration data (code, commonsense,
# translation, math) yields **domain-specific sub-models**. It prunes Gemma-1.1-7b-it and CodeLlama with 14
# calibration sets, evaluates every sub-model on every domain (in-domain calibration wins its own domain),
# compares the sub-models' masks with the Jaccard similarity (same-domain masks overlap more), and looks at
# the weights of one attention projection. This notebook runs that pipeline on the embedded model with two
# calibration sets per domain (code, English prose, math) plus the model's own text: build the calibration
# sets, prune one sub-model per set, evaluate all of them on every domain with per-window and per-item
# outcomes (so every difference gets a paired 95% interval), compare masks within and across domains, view
# weights, and time the pruning methods. The `paper` profile runs the seed's hub sets and tasks (HumanEval,
# MBPP, 8-shot GSM8K, translation scored by METEOR on the best of 5 samples, lm-eval's zero-shot suite).

# %%
import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from IPython.display import display
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from effllm import domains, execution, plots, pruning
from effllm.adapters import get_adapter
from effllm.experiments import claims, evaluate
from effllm.experiments.compression import WANDA_GOAL, prune_rows
from effllm.experiments.masks import three_way_view
from effllm.experiments.session import open_session
from effllm.experiments.stats import mean_ci
from effllm.pruning import jaccard_matrix, linear_roles, pairwise_jaccard, random_mask_jaccard

# %% tags=["parameters"]
profile = "default"  # smoke | default | paper (set by run_all.py)
model_name = "smollm2-135m"  # an embedded model, tiny-FAMILY, a local folder or a hub id
seed = 0
figures_dir = None  # None: the repository's figures/ folder
device = "auto"  # auto (a CUDA GPU if there is one, else the CPU) | cpu | cuda
dtype = None  # None: EFFLLM_DTYPE (run_all.py --dtype), else bfloat16 where the hardware computes in it, else float32
# domains.CALIBRATION_SETS (two per domain) or hub names (effllm.data.HUB, domains.HUB_CALIBRATION_DOMAINS)
calibration_sets = ["python-code", "humaneval", "python-docs", "docstrings", "arithmetic", "arithmetic-mc",
                    "self-generated"]
prune_method = "wanda"  # wanda | magnitude | sparsegpt
sparsity = 0.5
pattern = "unstructured"  # or "2:4", "4:8"
calibration_samples = 16  # Wanda's paper: 128 sequences of the model's context length
calibration_seq_len = 128
# eval domain -> held-out corpus; a domain named like a calibration domain is that domain's perplexity
perplexity_domains = {"code": "python-code", "prose": "python-docs", "math": "arithmetic"}
perplexity_windows = 16  # per domain (None: every window of the held-out text)
perplexity_seq_len = 128
humaneval_problems = 40  # the first N of 164: greedy generation is slow on a CPU
humaneval_max_new_tokens = 96
# HumanEval and MBPP run the model's programs on this machine (confined; README "Running model-written code"):
# opt in with True, as the default profile does (or EFFLLM_ALLOW_CODE_EXECUTION=1); without the opt-in the
# notebook stops here.
allow_code_execution = True
mbpp_problems = 0  # the first N of MBPP's test split (hub data); 0 skips MBPP
mbpp_max_new_tokens = 256
math_task = "arithmetic"  # or "gsm8k" (hub)
math_shots = 0  # 0: zero-shot chat prompt; 8: the seed's 8-shot GSM8K
arithmetic_problems = 16
arithmetic_max_new_tokens = 40
translation_task = None  # wmt14 | opus_books | song_translation (hub data); None skips translation
translation_problems = 0
translation_samples = 5  # the seed scores the best of 5 samples
translation_max_new_tokens = 128
zero_shot_tasks = []  # effllm.zeroshot.TASKS, or lm-eval hub tasks (paper)
zero_shot_limit = 200  # the first N items of each task (None: all)
# Which sub-models the task metrics (generation and zero-shot) run on, besides the dense model: None = all.
# Perplexity and masks are always measured for every sub-model.
task_submodels = ["python-code"]
batch_size = 8
weight_view_layer = None  # None: the middle layer
weight_view_pair = ["python-code", "python-docs"]
# the seed's three-way mask comparison (math_qa / math_orca / opus_books): two sets of one domain and one of another
weight_view_triple = ["arithmetic", "arithmetic-mc", "python-docs"]
speed_samples = 8  # a small in-notebook timing; `python -m effllm.bench prune` measures 64 x 256
speed_seq_len = 128
speed_patterns = ["unstructured"]
# False: skip the mask comparison and weight views, which need two sub-models (a sweep run prunes one; the
# sweep's summary compares the runs: sweeps/wanda_calibration_sets.yaml).
compare_submodels = True
save_submodel_masks = False  # True: each sub-model's masks to <figures_dir>/masks/<set>.safetensors

# %%
if humaneval_problems or mbpp_problems:  # refuse now, not after the calibration and pruning
    execution.require_code_execution(allow_code_execution)
domains.check_held_out(list(calibration_sets), {
    "humaneval": humaneval_problems,
    "arithmetic-mc": zero_shot_limit if "arithmetic-mc" in zero_shot_tasks else 0,
})
torch.manual_seed(seed)
plots.set_figures_dir(figures_dir)
model, tokenizer, device, machine = open_session(model_name, device, dtype, profile=profile)
adapter = get_adapter(model)
settings = evaluate.EvaluationSettings(
    perplexity_seq_len=perplexity_seq_len, perplexity_windows=perplexity_windows,
    humaneval_problems=humaneval_problems, humaneval_max_new_tokens=humaneval_max_new_tokens,
    arithmetic_problems=arithmetic_problems, arithmetic_max_new_tokens=arithmetic_max_new_tokens,
    math_task=math_task, math_shots=math_shots, zero_shot_tasks=tuple(zero_shot_tasks),
    zero_shot_limit=zero_shot_limit, batch_size=batch_size, perplexity_domains=dict(perplexity_domains),
    allow_code_execution=allow_code_execution, mbpp_problems=mbpp_problems, mbpp_max_new_tokens=mbpp_max_new_tokens,
    translation_task=translation_task, translation_problems=translation_problems,
    translation_samples=translation_samples, translation_max_new_tokens=translation_max_new_tokens, seed=seed,
)
perplexity_only = evaluate.EvaluationSettings(
    perplexity_seq_len=perplexity_seq_len, perplexity_windows=perplexity_windows, humaneval_problems=0,
    arithmetic_problems=0, zero_shot_tasks=(), batch_size=batch_size, perplexity_domains=dict(perplexity_domains))


def calibration_domain(name):
    """code / prose / math / self-generated (built-in sets), the seed's domains (hub sets), or dense."""
    if name == domains.DENSE:
        return domains.DENSE
    return domains.CALIBRATION_SETS.get(name, (domains.HUB_CALIBRATION_DOMAINS.get(name, "other"),))[0]


print(f"{model_name}: {adapter.num_layers} layers; {prune_method} {pattern} at sparsity {sparsity}; {machine}")

# %% [markdown]
# ## 1. Calibration sets
#
# Two sets per domain, each `calibration_samples` windows of `calibration_seq_len` tokens: code (`python-code`,
# the standard library, and `humaneval`, problem + canonical solution), English prose (`python-docs`, the
# reference manual, and `docstrings`, the standard library's docstrings), math (`arithmetic`, word problems with
# worked solutions, and `arithmetic-mc`, a question with its right answer), and **self-generated** text: sequences
# the dense model samples itself from its begin-of-text token (a calibration source that needs no data at all).
# No set draws from what is evaluated: corpora calibrate on their train split, and `humaneval` / `arithmetic-mc`
# on their second half while the evaluation scores the first items (`domains.check_held_out` refused otherwise).

# %%
calibration = {name: domains.calibration_set(name, model, tokenizer, calibration_samples, calibration_seq_len, seed)
               for name in calibration_sets}
examples = pd.DataFrame(
    {"calibration set": name, "domain": calibration_domain(name), "tokens": tuple(ids.shape),
     "first window starts with": tokenizer.decode(ids[0, :40]).replace("\n", "⏎")[:100]}
    for name, ids in calibration.items()
)
with pd.option_context("display.max_colwidth", None):
    display(examples)

# %% [markdown]
# ## 2. One sub-model per calibration set, evaluated on every domain
#
# `SubModelBank` keeps the dense weights, prunes a sub-model per set and switches between them. Every
# sub-model and the dense model are evaluated on held-out data (validation + test splits): perplexity per
# domain, window by window; HumanEval pass@1 (greedy, the first problems); exact match on the math task; and
# zero-shot multiple-choice accuracy through lm-eval, item by item (`evaluate.evaluate_submodel_items`). The
# task metrics run on the dense model and on the sub-models in `task_submodels` (all of them when None); the
# `paper` profile adds MBPP pass@1 (3-shot, confined execution), 8-shot GSM8K, and translation (WMT14 en-fr)
# scored by METEOR on the best of 5 samples. nltk's METEOR normally also matches WordNet synonyms; WordNet's data
# is a separate download that cannot be packaged, so without it METEOR matches exact words and Porter stems only
# (for French output English synonyms would rarely apply anyway), and chrF and sentence BLEU (sacrebleu, no data
# needed; the best of the same samples) are reported beside it.

# %%
bank = domains.SubModelBank(model)
wanted = set(calibration_sets) if task_submodels is None else set(task_submodels)
evaluations = {domains.DENSE: evaluate.evaluate_submodel_items(model, tokenizer, settings)}
for name, ids in calibration.items():
    bank.prune(name, ids, prune_method, sparsity if pattern == "unstructured" else None, pattern)
    evaluations[name] = evaluate.evaluate_submodel_items(model, tokenizer,
                                                         settings if name in wanted else perplexity_only)
bank.restore_dense()
if save_submodel_masks:  # checksummed and bound to this model's weights (effllm.pruning.save_masks)
    for name, masks in bank.masks.items():
        pruning.save_masks(masks, plots.current_figures_dir() / "masks" / f"{name.replace('/', '--')}.safetensors",
                           model)
table = domains.domain_table({name: e.summary for name, e in evaluations.items()})
table.insert(2, "prune_seconds", [bank.seconds.get(name) for name in table.calibration])

windows = pd.concat([e.windows.assign(calibration=name, calibration_domain=calibration_domain(name))
                     for name, e in evaluations.items()], ignore_index=True)
windows = windows[["calibration", "calibration_domain", "eval_domain", "window", "nll"]]
plots.save_table(windows, "04_domain_windows")
task_items = pd.concat([e.items.assign(calibration=name, calibration_domain=calibration_domain(name))
                        for name, e in evaluations.items()], ignore_index=True)
task_items = task_items[["calibration", "calibration_domain", "metric", "item", "value"]]
plots.save_table(task_items, "04_task_items")
display(table.round(3))
if any(column in domains.TASK_METRIC_DOMAINS for column in table.columns):
    # the seed's headline table: per domain the mean over its benchmarks (benchmarks_<domain>: how many the row had)
    means = domains.domain_means(table)
    plots.save_table(means, "04_domain_means")
    display(means.round(3))

# %%
# Every metric with its 95% interval over windows (perplexity: exp of the mean NLL's interval) or items.
interval_rows = []
for (name, domain), group in windows.groupby(["calibration", "eval_domain"], sort=False):
    mean, low, high = mean_ci(group.nll.to_numpy())
    interval_rows.append({"calibration": name, "metric": f"ppl_{domain}", "value": float(np.exp(mean)),
                          "low": float(np.exp(low)), "high": float(np.exp(high)), "n": len(group)})
for (name, metric), group in task_items.groupby(["calibration", "metric"], sort=False):
    mean, low, high = mean_ci(group.value.to_numpy())
    interval_rows.append({"calibration": name, "metric": metric, "value": mean, "low": low, "high": high,
                          "n": len(group)})
intervals = pd.DataFrame(interval_rows)
intervals["calibration_domain"] = intervals.calibration.map(calibration_domain)


def metric_label(metric, n):
    """A column name as a reader says it, with its n."""
    if metric.startswith("ppl_"):
        return f"{metric[4:]} perplexity\n({n} windows)"
    names = {"humaneval_pass@1": "HumanEval pass@1", "mbpp_pass@1": "MBPP pass@1",
             f"{math_task}_em": f"{math_task} exact match"}
    if metric in names:
        return f"{names[metric]}\n({n} problems)"
    if metric.startswith("zs_"):
        task = metric[3:].removesuffix("_norm")
        return f"{task} accuracy{' (per char)' if metric.endswith('_norm') else ''}\n({n} items)"
    return f"{metric.replace('_', ' ')}\n({n} items)"


shown = [m for m in dict.fromkeys(intervals.metric) if not m.endswith("_norm")]
n_of = intervals.groupby("metric").n.max()
rows_order = list(table.calibration)
values = intervals.pivot(index="calibration", columns="metric", values="value").reindex(index=rows_order,
                                                                                         columns=shown)
dense_values = values.loc[domains.DENSE]
# Colour: change against dense in the direction that is worse (perplexity up, accuracy down), in percent / points.
change = pd.DataFrame({m: (values[m] / dense_values[m] - 1) * 100 if m.startswith("ppl_")
                       else (dense_values[m] - values[m]) * 100 for m in shown})
fig, ax = plots.new_figure(figsize=(1.35 * len(shown) + 2.5, 0.45 * len(values) + 2))
image = ax.imshow(change.values, cmap="Reds", aspect="auto", vmin=0)
dark = np.nan_to_num(change.values) > 0.6 * max(float(np.nanmax(change.values)), 1e-9)
for (i, j), value in np.ndenumerate(values.values):
    if np.isfinite(value):
        ax.text(j, i, f"{value:.3g}", ha="center", va="center", fontsize=8, color="white" if dark[i, j] else "black")
ax.set_xticks(range(len(shown)), [metric_label(m, int(n_of[m])) for m in shown], rotation=30, ha="right")
ax.set_yticks(range(len(values)), [name if name == domains.DENSE else f"{name} ({calibration_domain(name)})"
                                   for name in values.index])
ax.set_ylabel("calibration set (domain)")
ax.grid(False)
fig.colorbar(image, ax=ax, label="worse than dense\n(perplexity: % up; accuracy: points down)")
ax.set_title(f"{prune_method} {pattern} {sparsity:.0%} sub-models on every domain (blank: not measured)\n"
             + plots.provenance(model=model_name, data=f"held-out {' / '.join(perplexity_domains)} and the tasks",
                                extra=f"calibration {calibration_samples} x {calibration_seq_len} tokens, {machine}"))
plots.save_figure(fig, "04_domain_table", table=table)

best = domains.best_per_column(table.drop(columns="prune_seconds"))
for column, winner in best.items():
    print(f"best pruned sub-model on {column}: {winner} ({calibration_domain(winner)})")

# %% [markdown]
# Each cell holds the metric itself; the colour shows how much worse than the dense model a sub-model is on that
# column (perplexity: percent up; accuracies: points down). The column labels give each metric's n. The printed
# lines name the best pruned sub-model per column: the seed's claim is that a set of a domain wins that domain's
# column. Whether a win is more than noise is the next figure's question.

# %%
panels = [m for m in shown if m in set(intervals.metric)]
fig, axes = plots.new_figure(1, len(panels), squeeze=False, sharey=True, figsize=(2.6 * len(panels) + 1.5,
                                                                                  0.32 * len(rows_order) + 1.8))
for ax, metric in zip(axes[0], panels, strict=True):
    part = intervals[intervals.metric == metric].set_index("calibration").reindex(rows_order)
    for y, (name, row) in enumerate(part.iterrows()):
        if pd.isna(row.value):
            continue
        low, high = (row.low, row.high) if np.isfinite(row.low) else (row.value, row.value)
        ax.errorbar(row.value, y, xerr=[[row.value - low], [high - row.value]], marker="o", markersize=4,
                    capsize=2, color=plots.colour(calibration_domain(name)), linestyle="none")
    ax.axvline(part.loc[domains.DENSE].value, color=plots.colour("dense"), linestyle="--", linewidth=0.8)
    ax.set_xlabel(metric_label(metric, int(n_of[metric])).replace("\n", " "), fontsize=7)
    ax.xaxis.set_major_locator(MaxNLocator(4))
axes[0][0].set_yticks(range(len(rows_order)), rows_order)
axes[0][0].invert_yaxis()
axes[0][0].set_ylabel("calibration set")
domain_names = list(dict.fromkeys(calibration_domain(name) for name in rows_order))
fig.legend([Line2D([], [], color=plots.colour(d), marker="o", linestyle="none") for d in domain_names],
           domain_names, loc="outside lower center", ncol=len(domain_names), title="calibration domain")
fig.suptitle("Every sub-model on every metric, with 95% bootstrap intervals (dashed: dense model)\n"
             + plots.provenance(model=model_name, extra=f"{prune_method} {pattern} {sparsity:.0%}, {machine}"),
             fontsize="small")
plots.save_figure(fig, "04_domain_intervals", table=intervals)

# %%
verdicts = pd.DataFrame([vars(c) for c in claims.in_domain_claims(windows)])
display(verdicts[["claim", "measured", "ci_low", "ci_high", "n", "verdict", "source"]].round(4))

# %% [markdown]
# The intervals panel shows every metric with its 95% bootstrap interval over windows or items. The verdict table
# is what the claims report (`python -m effllm.experiments.claims`) computes from `04_domain_windows.csv`: per
# evaluation domain, the held-out log-perplexity of the best in-domain sub-model minus that of the best other
# sub-model, paired over the same windows. An interval wholly below 0 means in-domain calibration wins that
# domain at this n; one wholly above 0 means another set wins it.

# %% [markdown]
# ## 3. Mask similarity: Jaccard of the pruned positions
#
# For every pair of sub-models, J = |A ∩ B| / |A ∪ B| over the pruned positions, per linear, per layer and
# for the whole model. Two independent random masks at 50% give J = 1/3: the baseline drawn in the plots. The
# seed's second claim is that sub-models of the same domain share more of their pruned weights: with two sets
# per domain, same-domain pairs can be compared with cross-domain pairs layer by layer.

# %%
roles = linear_roles(model)
n_m = pruning.parse_pattern(pattern)
baseline = random_mask_jaccard(sparsity if n_m is None else n_m[0] / n_m[1])
if not compare_submodels:
    print("compare_submodels=False: no mask comparison or weight views here (a sweep's summary step compares runs)")
elif len(bank.masks) < 2:
    print(f"one calibration set ({', '.join(bank.masks)}): no pair of masks to compare; sections 3 and 4 need two.")
else:
    pairwise = pairwise_jaccard(bank.masks, roles)
    matrix = jaccard_matrix(pairwise, "model")
    fig, ax = plots.new_figure(figsize=(0.6 * len(matrix) + 2.5, 0.55 * len(matrix) + 1.8))
    image = ax.imshow(matrix.values, cmap="viridis", vmin=baseline, vmax=1)
    for (i, j), value in np.ndenumerate(matrix.values):
        ax.text(j, i, f"{value:.3f}", ha="center", va="center", color="white" if value < 0.8 else "black", fontsize=7)
    ax.set_xticks(range(len(matrix)), matrix.columns, rotation=30, ha="right")
    ax.set_yticks(range(len(matrix)), [f"{n} ({calibration_domain(n)})" for n in matrix.index])
    ax.grid(False)
    fig.colorbar(image, ax=ax, label=f"Jaccard (colour scale starts at the random baseline {baseline:.3f})")
    ax.set_title("Whole-model Jaccard of pruned positions\n" + plots.provenance(
        model=model_name, extra=f"{prune_method} {pattern} {sparsity:.0%}, {machine}"))
    plots.save_figure(fig, "04_jaccard_model", table=matrix.reset_index(names="calibration"))

# %%
if compare_submodels and len(bank.masks) >= 2:
    layers = pairwise[pairwise.level == "layer"]
    pairs = pd.DataFrame({"set_a": layers.a, "set_b": layers.b, "layer": layers.layer.astype(int),
                          "jaccard": layers.jaccard})
    pairs["same_domain"] = [calibration_domain(a) == calibration_domain(b) and calibration_domain(a) != "self-generated"
                            for a, b in zip(pairs.set_a, pairs.set_b, strict=True)]
    plots.save_table(pairs, "04_jaccard_pairs")
    fig, ax = plots.new_figure(figsize=(6.5, 3.6))
    cross = pairs[~pairs.same_domain].groupby("layer").jaccard
    ax.fill_between(cross.min().index, cross.min(), cross.max(), color="0.85",
                    label=f"cross-domain pairs ({pairs[~pairs.same_domain].groupby(['set_a', 'set_b']).ngroups}): "
                          "range")
    ax.plot(cross.mean().index, cross.mean(), color="0.4", linewidth=1.5, label="cross-domain pairs: mean")
    for (a, b), group in pairs[pairs.same_domain].groupby(["set_a", "set_b"], sort=False):
        ax.plot(group.layer, group.jaccard, marker="o", markersize=2.5, color=plots.colour(calibration_domain(a)),
                label=f"{a} / {b} ({calibration_domain(a)})")
    ax.axhline(baseline, color="black", linestyle="--", linewidth=1, label=f"random masks ({baseline:.3f})")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("layer")
    ax.set_ylabel("Jaccard of pruned positions")
    ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.set_title("Per-layer mask similarity: same-domain pairs against cross-domain pairs\n" + plots.provenance(
        model=model_name, extra=f"{prune_method} {pattern} {sparsity:.0%}, {pairs.layer.nunique()} layers, {machine}"),
        fontsize="small")
    plots.save_figure(fig, "04_jaccard_layers", table=pairs)

    kinds = (pairwise[pairwise.level == "linear"].groupby(["a", "b", "kind"], as_index=False)[["intersection", "union"]]
             .sum().assign(jaccard=lambda t: t.intersection / t.union))
    display(kinds.pivot_table(index=["a", "b"], columns="kind", values="jaccard").round(3))
    model_level = pairwise[pairwise.level == "model"]
    closest = model_level.loc[model_level.jaccard.idxmax()]
    farthest = model_level.loc[model_level.jaccard.idxmin()]
    print(f"whole-model Jaccard from {model_level.jaccard.min():.3f} ({farthest.a} / {farthest.b}) to "
          f"{model_level.jaccard.max():.3f} ({closest.a} / {closest.b}); random baseline {baseline:.3f}; "
          f"every pair above the baseline: {bool((model_level.jaccard > baseline).all())}")
    mask_verdict = claims.same_domain_claim(pairs)
    display(pd.DataFrame([vars(mask_verdict)])[["claim", "measured", "ci_low", "ci_high", "n", "verdict",
                                               "source"]].round(4))

# %% [markdown]
# The shaded band is the range of every cross-domain pair at each layer and the grey line its mean; each coloured
# line is one same-domain pair. Same-domain masks that are more alike lie above the band's mean, layer after
# layer: the verdict table is the claims report's statistic, each pair's mean Jaccard over layers, same-domain pairs
# minus cross-domain pairs, with its 95% interval over pairs (one calibration set decides every layer of a pair, so
# the pair is the unit, and with few same-domain pairs the interval is wide). The further every pair lies above the random baseline, the
# more the weight magnitudes (shared by every sub-model) decide the mask rather than the calibration data. The
# table by projection kind shows which linears depend on the data most.

# %% [markdown]
# ## 4. Weight views: one attention projection of two sub-models
#
# The seed shows `q_proj` of layer 12 of two Gemma sub-models and where their masks differ. Here: the
# `q` projection of the middle layer (or `weight_view_layer`), as a static figure of the whole matrix, and an
# interactive treescope render (HTML; hover over a cell for its value) of the 64 x 64 block where the two masks
# differ most. Then the seed's three-way comparison (`weight_view_triple`: two sets of one domain and one of
# another): which of the three sub-models prune each weight of the same projection, and how many weights only one
# or two of them prune.

# %%
if compare_submodels and len(bank.masks) >= 2:
    layer = adapter.num_layers // 2 if weight_view_layer is None else weight_view_layer
    linear = next(name for name, (i, kind) in roles.items() if i == layer and kind in ("q", "qkv"))
    first, second = (weight_view_pair if set(weight_view_pair) <= set(bank.masks) else list(bank.masks)[:2])
    weight_a, weight_b = bank.weight(first, linear), bank.weight(second, linear)
    mask_a, mask_b = bank.masks[first][linear], bank.masks[second][linear]
    if adapter.weight(dict(model.named_modules())[linear]) is not dict(model.named_modules())[linear].weight:
        weight_a, weight_b, mask_a, mask_b = weight_a.t(), weight_b.t(), mask_a.t(), mask_b.t()  # GPT-2 Conv1D
    fig = plots.plot_weight_views(
        weight_a, weight_b, mask_a, mask_b, (first, second),
        f"{linear}: sub-models calibrated on {first} and {second} · "
        + plots.provenance(model=model_name, extra=machine))
    difference = pruning.mask_difference(mask_a, mask_b)
    view_table = pd.DataFrame({"code": range(4), "meaning": ["kept by both", f"pruned only in {first}",
                                                            f"pruned only in {second}", "pruned in both"],
                               "weights": [int((difference == k).sum()) for k in range(4)]})
    plots.save_figure(fig, "04_weight_views", table=view_table)
    rows, columns = plots.difference_block(mask_a, mask_b, 64, 64)
    html_path = plots.save_html(plots.treescope_weight_views(weight_a[rows, columns], weight_b[rows, columns],
                                                             mask_a[rows, columns], mask_b[rows, columns],
                                                             (first, second), pixels_per_cell=6),
                                "04_weight_views_treescope")
    display(view_table)
    block = int((mask_a[rows, columns] != mask_b[rows, columns]).sum())
    print(f"interactive view: {html_path.name} ({html_path.stat().st_size / 1e3:.0f} kB): rows {rows.start}-"
          f"{rows.stop - 1}, columns {columns.start}-{columns.stop - 1} of {tuple(mask_a.shape)}, where the masks "
          f"differ at {block} of {mask_a[rows, columns].numel()} weights")

# %%
if compare_submodels and weight_view_triple and set(weight_view_triple) <= set(bank.masks):
    fig, three_way = three_way_view(model, weight_view_layer, bank.masks, tuple(weight_view_triple),
                                    plots.provenance(model=model_name, extra=machine))
    plots.save_figure(fig, "04_weight_views_three_way", table=three_way)
    display(three_way)
elif compare_submodels and weight_view_triple:
    print("three-way view skipped:", ", ".join(sorted(set(weight_view_triple) - set(bank.masks))),
          "not among the calibration sets")

# %% [markdown]
# Pruned weights are white in the first two panels. Look for vertical stripes: the input norm multiplies
# every weight of a column, so a low-norm input feature loses most of its column. The third panel marks the
# weights that only one of the two sub-models prunes, and the table counts them: their share (in the panel
# title) is the room the calibration data has to make a sub-model domain-specific. The interactive view crops
# to the block where the masks differ most (the printed line gives where), so its cells can be inspected one by
# one.

# %% [markdown]
# ## 5. Pruning speed against one forward pass
#
# The goal: Wanda prunes within 2.5x the time of one plain forward pass over the same calibration
# tokens. A small measurement here (`speed_samples` x `speed_seq_len`); `python -m effllm.bench prune`
# measures 64 x 256 tokens and writes `results/prune_<model>.json`, shown below when present.

# %%
speed_calibration = domains.calibration_set("python-docs", model, tokenizer, speed_samples, speed_seq_len, seed)
speed_rows, forward = prune_rows(model, tokenizer, speed_calibration, ["magnitude", "wanda", "sparsegpt"],
                                 list(speed_patterns), sparsity, batch_size, eval_windows=2)
speed = pd.DataFrame(speed_rows)
display(speed.round(3))
timed = speed[speed.method != "dense"].assign(label=lambda t: t.method + "\n" + t.pattern)
fig, ax = plots.new_figure()
ax.bar(timed.label, timed.ratio_to_forward, color=[plots.colour(m) for m in timed.method])
ax.axhline(WANDA_GOAL, color="black", linestyle="--", linewidth=1, label=f"goal for Wanda: {WANDA_GOAL}x")
ax.axhline(1, color="0.5", linewidth=0.8, label=f"one forward pass ({forward:.2f} s)")
ax.set_xlabel("pruning method and pattern")
ax.set_ylabel("pruning time / forward-pass time")
fig.legend(loc="outside lower center", ncol=2)  # below the axes: never over a bar
ax.set_title("Time to prune the whole model (one run each)\n" + plots.provenance(
    model=model_name, data=f"python-docs, {speed_samples} x {speed_seq_len} tokens", extra=machine))
plots.save_figure(fig, "04_pruning_speed", table=speed)

bench_json = Path("../results") / f"prune_{model_name.replace('/', '--')}.json"
if bench_json.is_file():
    bench = json.loads(bench_json.read_text())
    print(f"{bench_json}: {bench['samples']} x {bench['seq_len']} tokens on {bench['device']}")
    display(pd.DataFrame(bench["rows"]).round(3))
wanda_ratio = timed[timed.method == "wanda"].ratio_to_forward
print(f"Wanda took {', '.join(f'{r:.2f}x' for r in wanda_ratio)} of a forward pass here (goal <= {WANDA_GOAL}x)")

# %% [markdown]
# Magnitude pruning needs no data and is the cheapest. Wanda runs every layer twice (once to collect input
# norms, once to pass the pruned layer's outputs on) and sorts each row once; SparseGPT also inverts a
# Hessian per linear and updates the kept weights column by column: compare its bar with Wanda's.
# The printed line compares Wanda's ratio with the goal; timings on a shared CPU are noisy (one run each here;
# the benchmark measures more), so read ratios, not seconds.

# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
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
# the weights of one attention projection. This notebook runs that pipeline on the embedded model: build
# calibration sets, prune one sub-model per set, evaluate all of them on every domain, compare masks, view
# weights, and time the pruning methods.

# %%
import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from IPython.display import display
from matplotlib.ticker import MaxNLocator

from effllm import domains, execution, models, plots, pruning
from effllm.adapters import get_adapter
from effllm.experiments import evaluate
from effllm.experiments.compression import WANDA_GOAL, prune_rows
from effllm.pruning import jaccard_matrix, linear_roles, pairwise_jaccard, random_mask_jaccard

# %% tags=["parameters"]
profile = "default"  # smoke | default | paper (set by run_all.py)
model_name = "smollm2-135m"  # an embedded model, tiny-FAMILY, a local folder or a hub id
seed = 0
figures_dir = None  # None: the repository's figures/ folder
device = None  # None: CPU; "cuda" or "auto" for the paper profile
dtype = None  # None: float32 (embedded) or the checkpoint's own
calibration_sets = ["python-code", "python-docs", "arithmetic", "self-generated"]  # domains.CALIBRATION_SETS
method = "wanda"  # wanda | magnitude | sparsegpt
sparsity = 0.5
pattern = "unstructured"  # or "2:4", "4:8"
calibration_samples = 32  # Wanda's paper: 128 sequences of the model's context length
calibration_seq_len = 128
perplexity_domains = {"code": "python-code", "prose": "python-docs", "math": "arithmetic"}  # held-out splits
perplexity_windows = 4
perplexity_seq_len = 256
humaneval_problems = 4  # the first N of 164: greedy generation is slow on a CPU
humaneval_max_new_tokens = 96
# HumanEval runs the model's programs on this machine (confined; README "Running model-written code"): opt in
# with True (or EFFLLM_ALLOW_CODE_EXECUTION=1); with humaneval_problems > 0 and no opt-in the notebook stops here.
allow_code_execution = False
math_task = "arithmetic"  # or "gsm8k" (hub)
arithmetic_problems = 16
arithmetic_max_new_tokens = 40
zero_shot_tasks = ["arithmetic-mc", "prose-mc"]  # effllm.zeroshot.TASKS, or lm-eval hub tasks (paper)
zero_shot_limit = 24
batch_size = 8
weight_view_layer = None  # None: the middle layer
weight_view_pair = ["python-code", "python-docs"]
speed_samples = 8  # a small in-notebook timing; `python -m effllm.bench prune` measures 64 x 256
speed_seq_len = 128
speed_patterns = ["unstructured"]
# False: skip the mask comparison and weight views, which need two sub-models (a sweep run prunes one; the
# sweep's summary compares the runs: sweeps/wanda_calibration_sets.yaml).
compare_submodels = True
save_submodel_masks = False  # True: each sub-model's masks to <figures_dir>/masks/<set>.safetensors

# %%
if humaneval_problems:  # refuse now, not after the calibration and pruning
    execution.require_code_execution(allow_code_execution)
torch.manual_seed(seed)
plots.set_figures_dir(figures_dir)
model, tokenizer = models.load_model(model_name, dtype=dtype, device=device)
adapter = get_adapter(model)
machine = torch.cuda.get_device_name() if next(model.parameters()).is_cuda else "CPU"
settings = evaluate.EvaluationSettings(
    perplexity_seq_len=perplexity_seq_len, perplexity_windows=perplexity_windows,
    humaneval_problems=humaneval_problems, humaneval_max_new_tokens=humaneval_max_new_tokens,
    arithmetic_problems=arithmetic_problems, arithmetic_max_new_tokens=arithmetic_max_new_tokens,
    math_task=math_task, zero_shot_tasks=tuple(zero_shot_tasks), zero_shot_limit=zero_shot_limit,
    batch_size=batch_size, perplexity_domains=dict(perplexity_domains), allow_code_execution=allow_code_execution,
)
print(f"{model_name}: {adapter.num_layers} layers; {method} {pattern} at sparsity {sparsity}; {machine}")

# %% [markdown]
# ## 1. Calibration sets
#
# One set per domain, each `calibration_samples` windows of `calibration_seq_len` tokens from the train
# split: code (`python-code`, the standard library), English prose (`python-docs`, the reference manual),
# math (`arithmetic`, word problems with worked solutions), and **self-generated** text: sequences the dense
# model samples itself from its begin-of-text token (a calibration source that needs no data at all).

# %%
calibration = {name: domains.calibration_set(name, model, tokenizer, calibration_samples, calibration_seq_len, seed)
               for name in calibration_sets}
examples = pd.DataFrame(
    {"calibration set": name, "tokens": tuple(ids.shape), "first window starts with":
     tokenizer.decode(ids[0, :40]).replace("\n", "⏎")[:100]}
    for name, ids in calibration.items()
)
with pd.option_context("display.max_colwidth", None):
    display(examples)

# %% [markdown]
# ## 2. One sub-model per calibration set, evaluated on every domain
#
# `SubModelBank` keeps the dense weights, prunes a sub-model per set and switches between them. Every
# sub-model and the dense model are evaluated on held-out data (validation + test splits): perplexity per
# domain, HumanEval pass@1 (greedy, a subset of the problems), exact match on the math task, and zero-shot
# multiple-choice accuracy through lm-eval.

# %%
bank = domains.SubModelBank(model)
results = {domains.DENSE: evaluate.evaluate_submodel(model, tokenizer, settings)}
for name, ids in calibration.items():
    bank.prune(name, ids, method, sparsity if pattern == "unstructured" else None, pattern)
    results[name] = evaluate.evaluate_submodel(model, tokenizer, settings)
bank.restore_dense()
if save_submodel_masks:  # checksummed and bound to this model's weights (effllm.pruning.save_masks)
    for name, masks in bank.masks.items():
        pruning.save_masks(masks, plots.current_figures_dir() / "masks" / f"{name.replace('/', '--')}.safetensors",
                           model)
table = domains.domain_table(results)
table.insert(2, "prune_seconds", [bank.seconds.get(name) for name in table.calibration])
display(table.round(3))

# %%
metric_columns = [c for c in table.columns if c not in ("calibration", "domain", "prune_seconds")]
dense_row = table.set_index("calibration").loc[domains.DENSE, metric_columns].astype(float)
relative = table.set_index("calibration")[metric_columns].astype(float)
# Colour: change against dense in the direction that is worse (perplexity up, accuracy down), in percent.
change = pd.DataFrame({c: (relative[c] / dense_row[c] - 1) * 100 if c.startswith("ppl_")
                       else (dense_row[c] - relative[c]) * 100 for c in metric_columns})
fig, ax = plots.new_figure(figsize=(1.25 * len(metric_columns) + 2, 0.5 * len(relative) + 1.5))
image = ax.imshow(change.values, cmap="Reds", aspect="auto", vmin=0)
dark = np.nan_to_num(change.values) > 0.6 * max(float(np.nanmax(change.values)), 1e-9)
for (i, j), value in np.ndenumerate(relative.values):
    ax.text(j, i, f"{value:.3g}", ha="center", va="center", fontsize=8, color="white" if dark[i, j] else "black")
ax.set_xticks(range(len(metric_columns)), metric_columns, rotation=30, ha="right")
ax.set_yticks(range(len(relative)), relative.index)
ax.grid(False)
fig.colorbar(image, ax=ax, label="worse than dense (ppl: % up; accuracy: points down)")
ax.set_title(f"{method} {pattern} {sparsity:.0%} sub-models on every domain\n" + plots.provenance(
    model=model_name, data="held-out python-code / python-docs / arithmetic, HumanEval, lm-eval MC",
    extra=f"calibration {calibration_samples} x {calibration_seq_len} tokens, {machine}"))
plots.save_figure(fig, "04_domain_table", table=table)

best = domains.best_per_column(table.drop(columns="prune_seconds"))
for column, winner in best.items():
    print(f"best pruned sub-model on {column}: {winner}")

# %% [markdown]
# Each cell holds the metric itself; the colour shows how much worse than the dense model a sub-model is
# on that column (perplexity: percent up; accuracies: points down). The printed lines name the best pruned
# sub-model per column: the seed's claim is that the set from a domain wins that domain's column (code
# perplexity for `python-code`, prose for `python-docs`, math for `arithmetic`). Check it against the
# lines above; with a subset of HumanEval and a few dozen multiple-choice items the accuracy columns are
# coarse (one item is several points).

# %% [markdown]
# ## 3. Mask similarity: Jaccard of the pruned positions
#
# For every pair of sub-models, J = |A ∩ B| / |A ∪ B| over the pruned positions, per linear, per layer and
# for the whole model. Two independent random masks at 50% give J = 1/3: the baseline drawn in the plots.

# %%
if compare_submodels:
    roles = linear_roles(model)
    pairwise = pairwise_jaccard(bank.masks, roles)
    baseline = random_mask_jaccard(sparsity)
    matrix = jaccard_matrix(pairwise, "model")
    fig, ax = plots.new_figure(figsize=(4.8, 4))
    image = ax.imshow(matrix.values, cmap="viridis", vmin=baseline, vmax=1)
    for (i, j), value in np.ndenumerate(matrix.values):
        ax.text(j, i, f"{value:.3f}", ha="center", va="center", color="white" if value < 0.8 else "black", fontsize=8)
    ax.set_xticks(range(len(matrix)), matrix.columns, rotation=30, ha="right")
    ax.set_yticks(range(len(matrix)), matrix.index)
    ax.grid(False)
    fig.colorbar(image, ax=ax, label=f"Jaccard (colour scale starts at the random baseline {baseline:.3f})")
    ax.set_title("Whole-model Jaccard of pruned positions\n" + plots.provenance(
        model=model_name, extra=f"{method} {pattern} {sparsity:.0%}, {machine}"))
    plots.save_figure(fig, "04_jaccard_model", table=matrix.reset_index(names="calibration"))

# %%
if compare_submodels:
    layers = pairwise[pairwise.level == "layer"].assign(pair=lambda t: t.a + " / " + t.b)
    fig, ax = plots.new_figure(figsize=(6.5, 3.6))
    for pair, group in layers.groupby("pair", sort=False):
        ax.plot(group.layer, group.jaccard, marker="o", markersize=2.5, label=pair)
    ax.axhline(baseline, color="black", linestyle="--", linewidth=1, label=f"random masks ({baseline:.3f})")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("layer")
    ax.set_ylabel("Jaccard of pruned positions")
    ax.legend(fontsize=6, ncol=2)
    ax.set_title("Per-layer mask similarity between sub-models\n" + plots.provenance(
        model=model_name, extra=f"{method} {pattern} {sparsity:.0%}, {machine}"))
    plots.save_figure(fig, "04_jaccard_layers", table=layers)

    kinds = (pairwise[pairwise.level == "linear"].groupby(["a", "b", "kind"], as_index=False)[["intersection", "union"]]
             .sum().assign(jaccard=lambda t: t.intersection / t.union))
    display(kinds.pivot_table(index=["a", "b"], columns="kind", values="jaccard").round(3))
    model_level = pairwise[pairwise.level == "model"]
    closest = model_level.loc[model_level.jaccard.idxmax()]
    farthest = model_level.loc[model_level.jaccard.idxmin()]
    print(f"whole-model Jaccard from {model_level.jaccard.min():.3f} ({farthest.a} / {farthest.b}) to "
          f"{model_level.jaccard.max():.3f} ({closest.a} / {closest.b}); random baseline {baseline:.3f}; "
          f"every pair above the baseline: {bool((model_level.jaccard > baseline).all())}")

# %% [markdown]
# The printed line gives the closest and the farthest pair and whether every pair lies above the random
# baseline. The further above it, the more the weight magnitudes, shared by every sub-model, decide the
# mask, and the less the calibration data moves it. The per-layer curves show at which depth the calibration
# data changes the masks most (the lowest points), and the table by projection kind which linears depend
# on it most; the seed expects same-domain pairs to be the closest.

# %% [markdown]
# ## 4. Weight views: one attention projection of two sub-models
#
# The seed shows `q_proj` of layer 12 of two Gemma sub-models and where their masks differ. Here: the
# `q` projection of the middle layer (or `weight_view_layer`), as a static figure and as an interactive
# treescope render (HTML; hover over a cell for its value).

# %%
if compare_submodels:
    layer = adapter.num_layers // 2 if weight_view_layer is None else weight_view_layer
    linear = next(name for name, (i, kind) in roles.items() if i == layer and kind in ("q", "qkv"))
    first, second = weight_view_pair
    weight_a, weight_b = bank.weight(first, linear), bank.weight(second, linear)
    mask_a, mask_b = bank.masks[first][linear], bank.masks[second][linear]
    if adapter.weight(dict(model.named_modules())[linear]) is not dict(model.named_modules())[linear].weight:
        weight_a, weight_b, mask_a, mask_b = weight_a.t(), weight_b.t(), mask_a.t(), mask_b.t()  # GPT-2 Conv1D
    fig = plots.plot_weight_views(
        weight_a, weight_b, mask_a, mask_b, (first, second),
        f"{linear}: sub-models calibrated on {first} and {second} · " + plots.provenance(model=model_name, extra=machine))
    difference = pruning.mask_difference(mask_a, mask_b)
    view_table = pd.DataFrame({"code": range(4), "meaning": ["kept by both", f"pruned only in {first}",
                                                            f"pruned only in {second}", "pruned in both"],
                               "weights": [int((difference == k).sum()) for k in range(4)]})
    plots.save_figure(fig, "04_weight_views", table=view_table)
    html_path = plots.save_html(plots.treescope_weight_views(weight_a, weight_b, mask_a, mask_b, (first, second)),
                                "04_weight_views_treescope")
    display(view_table)
    print(f"interactive view: {html_path.name} ({html_path.stat().st_size / 1e6:.1f} MB)")

# %% [markdown]
# Pruned weights are white in the first two panels. Look for vertical stripes: the input norm multiplies
# every weight of a column, so a low-norm input feature loses most of its column. The third panel marks the
# weights that only one of the two sub-models prunes, and the table counts them: their share (in the panel
# title) is the room the calibration data has to make a sub-model domain-specific.

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
ax.bar(timed.label, timed.ratio_to_forward, color=["tab:green" if m == "wanda" else "tab:grey" for m in timed.method])
ax.axhline(WANDA_GOAL, color="tab:red", linestyle="--", linewidth=1, label=f"goal for Wanda: {WANDA_GOAL}x")
ax.axhline(1, color="black", linewidth=0.8, label=f"one forward pass ({forward:.2f} s)")
ax.set_ylabel("pruning time / forward-pass time")
ax.legend()
ax.set_title("Time to prune the whole model\n" + plots.provenance(
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
# The printed line compares Wanda's ratio with the goal; timings on a shared CPU are noisy, so read ratios,
# not seconds.

# ---
# jupyter:
#   jupytext:
#     cell_metadata_filter: tags,-all
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
# # 06 · Dynamic slicing by layer redundancy, against constant SliceGPT and ShortGPT
#
# **SliceGPT** (Ashkboos et al., ICLR 2024) makes a model smaller without retraining: it folds every
# norm's scale into the next linears, rotates each layer's signal into its principal components (PCA of
# calibration activations), and deletes the least important directions, so every weight matrix loses rows
# or columns; small shortcut matrices carry the residual stream from one layer's basis to the next. SliceGPT
# removes the same fraction from every layer. **Dynamic slicing** (Dumitru et al., EMNLP Findings 2024,
# "Change Is the Only Constant") slices each layer by how redundant it is: the *Layer Redundancy* score
# LR_i measures how little layer i changes its input (cosine between input and output), and the per-layer
# fractions p_i = (M - A) + A · u_i / mean(u) keep the mean exactly M while slicing redundant layers more.
# The paper reports up to 5% higher accuracy and 7% lower perplexity than constant slicing at the same mean
# on Llama-3-8B and Mistral-7B. The natural baseline on the same scores is **ShortGPT** (Men et al. 2024),
# which removes whole layers of lowest *Block Influence*; here it removes as many layers as give the same
# parameter count as the sliced model. This notebook computes LR and BI per layer, shows the slicing
# vectors, and compares the three methods' perplexity and zero-shot accuracy against the mean slice M.

# %%
import numpy as np
import pandas as pd
import torch
from IPython.display import display
from matplotlib.ticker import MaxNLocator

from effllm import data, metrics, plots, zeroshot
from effllm.adapters import get_adapter
from effllm.experiments.session import open_session
from effllm.experiments.slicing_compare import CompareSettings, compare_methods
from effllm.experiments.stats import mean_ci, paired_difference_ci
from effllm.slicing import (
    amplitude_grid,
    equal_parameter_constant_fraction,
    equal_parameter_shortgpt_layers,
    layer_scores,
    slice_fractions,
    sliced_dims,
    sliced_parameter_count,
)

# %% tags=["parameters"]
profile = "default"  # smoke | default | paper (set by run_all.py)
model_name = "smollm2-135m"  # an embedded model, tiny-FAMILY, a local folder or a hub id
seed = 0
figures_dir = None  # None: the repository's figures/ folder
device = "auto"  # auto (a CUDA GPU if there is one, else the CPU) | cpu | cuda
dtype = None  # None: EFFLLM_DTYPE (run_all.py --dtype), else bfloat16 where the hardware computes in it, else float32
calibration_data = "python-docs"  # built-in corpus (train split) or a hub name such as wikitext2
calibration_samples = 8  # calibration windows (SliceGPT: 128 x 2048 tokens of wikitext2)
calibration_seq_len = 256  # tokens per calibration window
# The corpus the layer scores (LR, and BI for ShortGPT) are computed on, apart from SliceGPT's calibration set: the
# authors' --source-for-vector (calculate_LR.py reads pg19). None: the calibration windows themselves.
vector_data = "docstrings"
vector_samples = 8  # windows of vector_seq_len tokens (train split)
vector_seq_len = 256
vector_split = "train"  # the authors read pg19's validation split
eval_data = "python-docs"  # held-out perplexity corpus
eval_split = "test"
eval_windows = 16  # perplexity windows of eval_seq_len tokens (None: every window of the split)
eval_seq_len = 256
means = [0.2, 0.3, 0.4]  # mean slice fractions M to compare
amplitude = 0.1  # A of dynamic slicing in the comparison
# levels M (among means) also sliced at every A of the authors' grid amplitude_grid(M) = np.arange(0, M + 0.01, 0.02)
# (perplexity only; 14 more slicings at M = 0.3); [] keeps A fixed
amplitude_sweep_means = []
vector_mean = 0.25  # M of the slicing-vector figure
vector_amplitudes = None  # amplitudes of the slicing-vector figure; None: the authors' grid amplitude_grid(vector_mean)
# Multiple-choice tasks scored per item through lm-eval: built-in (effllm.zeroshot.TASKS) or lm-eval's hub tasks
# (effllm.zeroshot.HUB_TASKS; the paper profile runs seed 004's suite). [] skips zero-shot accuracy.
zero_shot_tasks = ["prose-mc"]
zero_shot_limit = 200  # items per task (None: all; prose-mc has 227)
zero_shot_means = [0.3]  # the levels M scored on zero-shot (with the dense model); None: every level
batch_size = 8

# %%
torch.manual_seed(seed)
plots.set_figures_dir(figures_dir)
model, tokenizer, device, machine = open_session(model_name, device, dtype, profile=profile)
adapter = get_adapter(model)
n_layers = adapter.num_layers
calibration = data.calibration(calibration_data, tokenizer, n_samples=calibration_samples,
                               seq_len=calibration_seq_len, seed=seed, split="train")
vector_windows = calibration if vector_data is None else data.calibration(
    vector_data, tokenizer, n_samples=vector_samples, seq_len=vector_seq_len, seed=seed, split=vector_split)
vector_source = calibration_data if vector_data is None else vector_data
eval_tokens = data.calibration_tokens(eval_data, tokenizer, split=eval_split)
setting = (f"calibration: {calibration_data} {calibration_samples}x{calibration_seq_len} tokens; layer scores: "
           f"{vector_source} {vector_windows.shape[0]}x{vector_windows.shape[1]} · {machine}")
print(f"{model_name}: {n_layers} layers, d = {adapter.hidden_size}; {setting}")

# %% [markdown]
# ## Step 1: layer scores
#
# One pass over the windows of `vector_data` (a corpus apart from SliceGPT's calibration set, as the authors compute
# their slicing vector from another source than the one they calibrate on), layer by layer (`effllm.capture.LayerByLayer`, the loop pruning
# and slicing share). **LR** (layer redundancy): v_i = 1 - minmax(sum over tokens of (1 - cos(h_{i-1}, h_i))),
# so 1 marks the layer that changes its input least. **BI** (ShortGPT's block influence):
# 1 - mean cos(h_{i-1}, h_i), so low BI marks a layer that is cheap to remove. Both come from the same cosine;
# LR is rescaled and inverted. For the last layer, LR compares its input with its output after the final norm, as
# the authors' code does (it reads HF's hidden states, whose last one is normed); BI compares the raw output.

# %%
lr = layer_scores(model, vector_windows, "lr", batch_size=batch_size)
bi = layer_scores(model, vector_windows, "bi", batch_size=batch_size)
scores = pd.DataFrame({"layer": range(n_layers), "layer_redundancy": lr.numpy(), "block_influence": bi.numpy()})

fig, (ax_lr, ax_bi) = plots.new_figure(1, 2)
ax_lr.bar(scores.layer, scores.layer_redundancy, color=plots.colour("dynamic"))
ax_lr.set(xlabel="layer", ylabel="LR (1 = most redundant)", title="Layer redundancy")
ax_bi.bar(scores.layer, scores.block_influence, color=plots.colour("shortgpt"))
ax_bi.set(xlabel="layer", ylabel="BI = 1 - mean cos", title="Block influence (ShortGPT)", yscale="log")
for ax in (ax_lr, ax_bi):
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
fig.suptitle(plots.provenance(model=model_name, data=vector_source, extra=setting), fontsize="small")
plots.save_figure(fig, "06_layer_scores", table=scores)
most_redundant = scores.nlargest(3, "layer_redundancy").layer.tolist()
print(f"most redundant layers (highest LR): {most_redundant}; least redundant: {scores.layer_redundancy.idxmin()}")
print(f"lowest block influence (ShortGPT removes first): {scores.nsmallest(3, 'block_influence').layer.tolist()}")

# %% [markdown]
# The two panels are one measurement seen two ways: a high LR bar is a low BI bar. Look at where the
# redundant layers sit: in most pretrained decoders the first layer (and often the last) changes the
# residual stream most, and those layers are protected by both dynamic slicing and ShortGPT. The printed
# lists name the layers each method will cut first on this model.

# %% [markdown]
# ## Step 2: slicing vectors
#
# Dynamic fractions p_i = (M - A) + A · u_i / mean(u) with u = minmax(LR): their mean is exactly M for any
# amplitude A, the least redundant layer gets M - A, and A = 0 is constant SliceGPT. The kept width of
# layer i is d_i = round((1 - p_i) · D). Slicing also unties the LM head and adds shortcut matrices, so
# the parameter count is not (1 - M) times the dense one; `sliced_parameter_count` gives it exactly. The
# amplitudes are the authors' sweep, A = 0, 0.02, ..., up to M (`amplitude_grid`).

# %%
amplitudes = amplitude_grid(vector_mean) if vector_amplitudes is None else [0.0, *vector_amplitudes]
vectors = []
for a in amplitudes:
    fractions = slice_fractions(lr, vector_mean, a)
    dims = sliced_dims(fractions, adapter.hidden_size)
    count = sliced_parameter_count(model, fractions)
    for layer, (p, d) in enumerate(zip(fractions.tolist(), dims, strict=True)):
        vectors.append({"amplitude": a, "layer": layer, "fraction": p, "kept_dims": d, "parameters": count})
vectors = pd.DataFrame(vectors)
summary = vectors.groupby("amplitude").agg(mean_fraction=("fraction", "mean"), min_fraction=("fraction", "min"),
                                           max_fraction=("fraction", "max"), parameters=("parameters", "first"))
display(summary)

fig, ax = plots.new_figure()
for a, group in vectors.groupby("amplitude"):
    shade = 0.35 + 0.65 * a / max(amplitudes)  # one colour per method; darker = larger amplitude
    ax.plot(group.layer, group.fraction, marker="o", markersize=3, label="constant" if a == 0 else f"dynamic, A = {a}",
            color=plots.colour("constant" if a == 0 else "dynamic"), alpha=1 if a == 0 else shade)
ax.set(xlabel="layer", ylabel="slice fraction p_i", ylim=(0, None))
ax.xaxis.set_major_locator(MaxNLocator(integer=True))
ax.legend(title=f"M = {vector_mean}", ncol=2 if len(amplitudes) > 6 else 1, fontsize="x-small")
ax.set_title("Slicing vectors: constant vs dynamic (LR)\n" + plots.provenance(model=model_name, data=vector_source))
plots.save_figure(fig, "06_slicing_vectors", table=vectors)
assert (summary.mean_fraction - vector_mean).abs().max() < 1e-12  # the defining property of dynamic slicing

# %% [markdown]
# Every curve averages exactly M (the table's `mean_fraction` column, checked by the `assert`). Larger A
# moves width from redundant layers to the layers that change the signal most. The `parameters` column shows
# that the same mean gives nearly, not exactly, the same size: the shortcut matrices are quadratic in d_i, and
# the embeddings follow the first layer's width (the LM head keeps the full width D, as in SliceGPT's code).

# %% [markdown]
# ## Step 3: size at equal mean, and the like-for-like baselines
#
# For each M: the parameter count of constant and of dynamic slicing, whether the sliced model is smaller than
# the dense one at all, the constant slice fraction that gives the dynamic model's parameter count
# (`equal_parameter_constant_fraction`: the "equal parameters" comparison of Step 4), and how many whole layers
# ShortGPT must remove to come closest to the constant model (`equal_parameter_shortgpt_layers`).

# %%
dense_parameters = sum(p.numel() for p in model.parameters())
size_rows = []
for m in means:
    dynamic_fractions = slice_fractions(lr, m, amplitude)
    size_rows.append({
        "mean": m,
        "constant_parameters": sliced_parameter_count(model, [m] * n_layers),
        "dynamic_parameters": sliced_parameter_count(model, dynamic_fractions),
        "equal_parameter_constant_fraction": equal_parameter_constant_fraction(model, dynamic_fractions),
        "shortgpt_layers_removed": equal_parameter_shortgpt_layers(model, mean=m),
    })
sizes = pd.DataFrame(size_rows)
sizes["constant_vs_dense"] = sizes.constant_parameters / dense_parameters
sizes["dynamic_vs_dense"] = sizes.dynamic_parameters / dense_parameters
sizes["dynamic_vs_constant"] = sizes.dynamic_parameters / sizes.constant_parameters
sizes["shrinks"] = (sizes.constant_parameters < dense_parameters) & (sizes.dynamic_parameters < dense_parameters)
display(sizes.round(4))
grows = sizes[~sizes.shrinks]["mean"].tolist()
shrinks = sizes[sizes.shrinks]["mean"].tolist()
print(f"dense: {dense_parameters / 1e6:.1f} M parameters. Levels that make the model smaller: M = {shrinks}. "
      + (f"At M = {grows} SliceGPT makes it larger (untied LM head + shortcut matrices), so ShortGPT 'at equal "
         "size' removes no layer there: it is the dense model." if grows else "Every level makes it smaller."))
print("dynamic vs constant at the same mean: " + ", ".join(
    f"M={r.mean}: {100 * (r.dynamic_vs_constant - 1):+.1f}% parameters" for r in sizes.itertuples()))

fig, ax = plots.new_figure(figsize=(5, 3.4))
ax.plot(sizes["mean"], sizes.constant_parameters / 1e6, marker="o", color=plots.colour("constant"),
        label="SliceGPT constant")
ax.plot(sizes["mean"], sizes.dynamic_parameters / 1e6, marker="s", color=plots.colour("dynamic"),
        label=f"dynamic (LR), A = {amplitude}")
ax.axhline(dense_parameters / 1e6, color=plots.colour("dense"), linestyle="--", label="dense model")
ax.set(xlabel="mean slice fraction M", ylabel="parameters (millions)", xticks=means)
ax.legend(loc="upper right")
ax.set_title("Model size after slicing: below the dashed line it shrinks\n"
             + plots.provenance(model=model_name, extra="exact counts (sliced_parameter_count)"), fontsize="small")
plots.save_figure(fig, "06_model_size", table=sizes)

# %% [markdown]
# On a small model with a large vocabulary, slicing pays a fixed price before it saves anything: a second
# V x D matrix once the LM head is untied (SliceGPT keeps it at full width), and 2 d_i^2 of shortcuts per
# layer. The printed lines say at which M the sliced model is smaller than the dense one here, and how many
# more parameters dynamic slicing keeps than constant slicing at the same mean (its widest layers cost more
# shortcut parameters than its narrowest save).
# That difference is why Step 4 also compares dynamic slicing with constant slicing **at the same parameter
# count**, not only at the same M. On 7-8 B models the fixed price is a few percent.

# %% [markdown]
# ## Step 4: perplexity and zero-shot accuracy, like for like
#
# For every M: constant SliceGPT at M, dynamic slicing (amplitude A) at M, constant SliceGPT at the fraction that
# gives the dynamic model's parameter count, and ShortGPT at the constant model's parameter count; each on a
# fresh copy of the model, calibrated on the same windows. Perplexity is scored per held-out window
# (`metrics.window_losses`), so every comparison is paired over the same windows, with a bootstrap 95% interval
# (`effllm.experiments.stats`). Zero-shot multiple-choice accuracy (lm-eval through `effllm.zeroshot`) is scored
# per item on the dense model and at the levels in `zero_shot_means` (lm-eval costs most of this notebook's time
# on a CPU).

# %%
def zero_shot_wanted(row):
    """The dense model, and at the zero-shot levels every variant but the equal-parameter constant one."""
    if row["method"] == "dense":
        return True
    levels = means if zero_shot_means is None else zero_shot_means
    return row["mean"] in levels and row["matched"] != "sweep" and not (
        row["method"] == "constant" and row["matched"] == "parameters")


dense_result = {}


def evaluate(sliced, row):
    if row["method"] == "shortgpt" and get_adapter(sliced).num_layers == n_layers and dense_result:
        # ShortGPT removing no layer is the dense model: its numbers, not a re-run
        return {k: v for k, v in dense_result.items() if k != "zero_shot" or zero_shot_wanted(row)}
    losses = metrics.window_losses(sliced, eval_tokens, eval_seq_len, batch_size=batch_size, max_windows=eval_windows)
    result = {"perplexity": float(torch.exp(losses.mean())), "window_nll": losses.tolist()}
    if zero_shot_tasks and zero_shot_wanted(row):
        result["zero_shot"] = {task: zeroshot.zero_shot_accuracy(sliced, tokenizer, task, limit=zero_shot_limit,
                                                                 batch_size=batch_size)
                               for task in zero_shot_tasks}
    if row["method"] == "dense":
        dense_result.update(result)
    return result


settings = CompareSettings(batch_size=batch_size, match_parameters=True, pass_row=True,
                           sweep_means=tuple(amplitude_sweep_means))
results = compare_methods(model, calibration, means, amplitude, evaluate, lr_scores=lr, bi_scores=bi,
                          settings=settings)
results["variant"] = [f"{m} (equal parameters)" if m == "constant" and k == "parameters" else
                      "dynamic (amplitude sweep)" if k == "sweep" else m
                      for m, k in zip(results.method, results.matched, strict=True)]
n_windows = len(results.window_nll.iloc[0])
intervals = [mean_ci(nll) for nll in results.window_nll]
results["ppl_low"] = [float(np.exp(low)) for _, low, _ in intervals]
results["ppl_high"] = [float(np.exp(high)) for _, _, high in intervals]
display(results[["mean", "variant", "slice_fraction", "layers", "parameters", "params_ratio", "perplexity",
                 "ppl_low", "ppl_high"]].round(4))

# %%
# The tables the claims report reads: per-window NLL of dynamic vs constant, matched two ways, and per-item
# zero-shot outcomes.
window_rows = []
for m in means:
    level = results[results["mean"] == m]
    dynamic_row = level[(level.method == "dynamic") & (level.matched == "mean")].iloc[0]
    for matched in ("mean", "parameters"):
        constant_row = level[(level.method == "constant") & (level.matched == matched)].iloc[0]
        for variant, row in (("constant", constant_row), ("dynamic", dynamic_row)):
            window_rows += [{"level": m, "matched": matched, "variant": variant, "window": w, "nll": nll,
                             "parameters": int(row.parameters)} for w, nll in enumerate(row.window_nll)]
    shortgpt_row = level[level.method == "shortgpt"]
    if len(shortgpt_row) and int(shortgpt_row.layers.iloc[0]) < n_layers:  # removing no layer is the dense model
        window_rows += [{"level": m, "matched": "parameters", "variant": "shortgpt", "window": w, "nll": nll,
                         "parameters": int(shortgpt_row.parameters.iloc[0])}
                        for w, nll in enumerate(shortgpt_row.window_nll.iloc[0])]
slicing_windows = pd.DataFrame(window_rows)
plots.save_table(slicing_windows, "06_slicing_windows")

item_rows = []
for row in results.itertuples():
    if not isinstance(getattr(row, "zero_shot", None), dict):
        continue
    for task, scores in row.zero_shot.items():
        item_rows += [{"level": row.mean, "variant": row.method, "task": task, "item": f"{task}/{item['item']}",
                       "correct": int(item["correct"])} for item in scores["items"]]
zero_shot_items = pd.DataFrame(item_rows, columns=["level", "variant", "task", "item", "correct"])
if not zero_shot_items.empty:
    plots.save_table(zero_shot_items, "06_zero_shot_items")

differences = []
for (m, matched), group in slicing_windows[slicing_windows.variant != "shortgpt"].groupby(["level", "matched"],
                                                                                          sort=True):
    pivot = group.pivot(index="window", columns="variant", values="nll")
    diff, low, high = paired_difference_ci(pivot.dynamic, pivot.constant)
    sizes_at = group.groupby("variant").parameters.first()
    differences.append({"level": m, "matched": matched, "metric": "log-perplexity", "dynamic_minus_constant": diff,
                        "ci_low": low, "ci_high": high, "n": len(pivot),
                        "dynamic_parameters": sizes_at.dynamic, "constant_parameters": sizes_at.constant})
for (m, task), group in zero_shot_items[zero_shot_items.variant.isin(["dynamic", "constant"])].groupby(
        ["level", "task"], sort=True):
    pivot = group.pivot(index="item", columns="variant", values="correct")
    diff, low, high = paired_difference_ci(pivot.dynamic, pivot.constant)
    differences.append({"level": m, "matched": "mean", "metric": f"accuracy: {task}", "dynamic_minus_constant": diff,
                        "ci_low": low, "ci_high": high, "n": len(pivot)})
differences = pd.DataFrame(differences)
display(differences.round(4))

# %%
styles = {"constant": ("o", "-"), "dynamic": ("s", "-"), "constant (equal parameters)": ("D", ":"),
          "shortgpt": ("^", "-")}
labels = {"constant": "SliceGPT constant, same M", "dynamic": f"dynamic (LR), A = {amplitude}",
          "constant (equal parameters)": "SliceGPT constant, dynamic's size", "shortgpt": "ShortGPT, constant's size"}
dense_row = results[results.method == "dense"].iloc[0]
fig, (ax_m, ax_p) = plots.new_figure(1, 2, figsize=(10, 3.8))
compared = results[(results.method != "dense") & (results.matched != "sweep")]  # the sweep has its own figure
for variant, group in compared.groupby("variant", sort=False):
    marker, line = styles[variant]
    errors = [group.perplexity - group.ppl_low, group.ppl_high - group.perplexity]
    kwargs = {"marker": marker, "linestyle": line, "color": plots.colour(variant), "label": labels[variant],
              "capsize": 2, "markersize": 4}
    if variant != "constant (equal parameters)":  # its M is the dynamic model's; it belongs on the size axis
        ax_m.errorbar(group["mean"], group.perplexity, yerr=errors, **kwargs)
    ax_p.errorbar(group.parameters / 1e6, group.perplexity, yerr=errors, **kwargs)
for ax in (ax_m, ax_p):
    ax.axhline(dense_row.perplexity, color=plots.colour("dense"), linestyle="--", linewidth=1, label="dense model")
    ax.set_yscale("log")
    ax.set_ylabel("held-out perplexity (log scale)")
ax_p.axvline(dense_parameters / 1e6, color=plots.colour("dense"), linestyle=":", linewidth=1)
ax_m.set(xlabel="mean slice fraction M", xticks=means, title="against the mean slice fraction")
ax_p.set(xlabel="parameters (millions; dotted: the dense model's)", title="against the parameter count")
handles = {label: handle for ax in (ax_m, ax_p) for handle, label in zip(*ax.get_legend_handles_labels(), strict=True)}
fig.legend(handles.values(), handles.keys(), loc="outside lower center", ncol=3)
fig.suptitle(f"Constant vs dynamic slicing vs ShortGPT: perplexity with 95% intervals over {n_windows} windows\n"
             f"{plots.provenance(model=model_name, data=f'{eval_data} ({eval_split}, {n_windows} x {eval_seq_len} tokens)')}"
             f" · {setting}", fontsize="small")
plots.save_figure(fig, "06_slicing_comparison",
                  table=results.drop(columns=["window_nll", "zero_shot", "dims"], errors="ignore"))

# %%
sweep = results[(results.method == "constant") & (results.matched == "mean") | (results.method == "dynamic")]
sweep = sweep[sweep["mean"].isin(amplitude_sweep_means)].sort_values(["mean", "amplitude"])
if not sweep.empty:  # the authors' amplitude sweep: perplexity against A at each swept M (A = 0: constant)
    fig, ax = plots.new_figure(figsize=(6, 3.4))
    for m, group in sweep.groupby("mean"):
        ax.errorbar(group.amplitude, group.perplexity, marker="o", markersize=3, capsize=2, label=f"M = {m}",
                    yerr=[group.perplexity - group.ppl_low, group.ppl_high - group.perplexity])
    ax.axhline(dense_row.perplexity, color=plots.colour("dense"), linestyle="--", linewidth=1, label="dense model")
    ax.set(xlabel="amplitude A (0 = constant SliceGPT)", ylabel="held-out perplexity", yscale="log")
    ax.legend(loc="best")
    ax.set_title("Dynamic slicing over the authors' amplitude grid, A = 0, 0.02, ..., M (95% intervals)\n"
                 + plots.provenance(model=model_name, data=f"{eval_data} ({eval_split})"), fontsize="small")
    plots.save_figure(fig, "06_amplitude_sweep", table=sweep.drop(columns=["window_nll", "zero_shot", "dims"],
                                                                  errors="ignore"))

# %%
fig, ax = plots.new_figure(figsize=(6, 3.4))
offsets = {"mean": -0.008, "parameters": 0.008}
for matched, group in differences[differences.metric == "log-perplexity"].groupby("matched"):
    ax.errorbar(group.level + offsets[matched], group.dynamic_minus_constant,
                yerr=[group.dynamic_minus_constant - group.ci_low, group.ci_high - group.dynamic_minus_constant],
                marker="s" if matched == "mean" else "D", linestyle="none", capsize=3, color=plots.colour("dynamic"),
                markerfacecolor="white" if matched == "parameters" else None,
                label="at the same mean M" if matched == "mean" else "at the same parameter count")
ax.axhline(0, color="black", linewidth=0.8)
ax.set(xlabel="mean slice fraction M of the dynamic model", xticks=means,
       ylabel="log-perplexity, dynamic - constant\n(below 0: dynamic is better)")
ax.legend(loc="best")
ax.set_title(f"Dynamic minus constant slicing, paired over {n_windows} windows (95% bootstrap intervals)\n"
             + plots.provenance(model=model_name, data=f"{eval_data} ({eval_split})"), fontsize="small")
plots.save_figure(fig, "06_dynamic_vs_constant", table=differences)

# %%
for row in differences.itertuples():
    side = ("better" if row.ci_high < 0 else "worse" if row.ci_low > 0 else "not resolved") \
        if row.metric == "log-perplexity" else \
        ("better" if row.ci_low > 0 else "worse" if row.ci_high < 0 else "not resolved")
    print(f"M = {row.level}, {row.metric}, same {row.matched}: dynamic - constant = {row.dynamic_minus_constant:+.4f} "
          f"[{row.ci_low:+.4f}, {row.ci_high:+.4f}] (n = {row.n}): dynamic {side}")

# %% [markdown]
# The left panel is the paper's comparison (same M); the right one puts every model on its parameter count, where
# dynamic slicing sits slightly to the right of constant slicing at the same M (Step 3). The second figure holds
# the verdict: the paired difference in log-perplexity (log of the perplexity ratio) between dynamic and constant
# slicing, once at the same M and once at the same parameter count; an interval wholly below 0 means dynamic
# slicing is better at that level. The printed lines state each comparison with its interval and n. ShortGPT's
# curve is the dense model where equal size means removing no layer (Step 3), and jumps once it removes layers.

# %%
if not zero_shot_items.empty:
    accuracy_rows = []
    for (task, level, variant), group in zero_shot_items.groupby(["task", "level", "variant"], sort=False):
        mean, low, high = mean_ci(group.correct.to_numpy())
        accuracy_rows.append({"task": task, "level": level, "variant": variant, "accuracy": mean, "low": low,
                              "high": high, "n": len(group)})
    accuracy = pd.DataFrame(accuracy_rows)
    tasks = list(dict.fromkeys(accuracy.task))
    fig, axes = plots.new_figure(1, len(tasks), squeeze=False, figsize=(5.5 * len(tasks), 3.4))
    for ax, task in zip(axes[0], tasks, strict=True):
        part = accuracy[accuracy.task == task].reset_index(drop=True)
        positions = range(len(part))
        for i, row in part.iterrows():
            ax.errorbar(i, row.accuracy, yerr=[[row.accuracy - row.low], [row.high - row.accuracy]], marker="o",
                        capsize=3, color=plots.colour(row.variant), linestyle="none")
        ax.set_xticks(list(positions), [("dense" if r.variant == "dense" else f"{r.variant}\nM = {r.level:g}")
                                        for r in part.itertuples()])
        ax.set(xlabel="model (variant and level)", ylabel=f"accuracy on {task} (n = {int(part.n.max())} items)",
               ylim=(0, 1))
        ax.axhline(part[part.variant == "dense"].accuracy.iloc[0], color=plots.colour("dense"), linestyle="--",
                   linewidth=1)
    fig.suptitle("Zero-shot accuracy with 95% bootstrap intervals over items (dashed: dense)\n"
                 + plots.provenance(model=model_name, extra="lm-eval, effllm.zeroshot"), fontsize="small")
    plots.save_figure(fig, "06_zero_shot", table=accuracy)
    display(accuracy.round(4))

# %% [markdown]
# Accuracy is measured per item, so the intervals show how many items separate the variants; the paired
# differences (dynamic minus constant over the same items) are in the table of the verdict figure above. On a
# 135 M model the multiple-choice tasks move little until the model is sliced hard.

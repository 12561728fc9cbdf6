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
# # 02 · Dynamic vocabulary pruning of the early-exit confidence check
#
# CALM's softmax confidence needs the full LM head at every checked layer: one product with a V x d matrix,
# which on a small model costs as much as many decoder layers. Vincenti et al. (NeurIPS ENLSP 2024; seed
# 000) observe that the final token is almost always among the top candidates of an early layer already.
# They compute the full head once, at `exit_min_layer`, keep its top-k ids (k = 256), and at every later
# layer compute the confidence on those k rows only; an exit emits the best candidate's full-vocabulary id.
# The candidate set can stay **fixed**, **decay** with depth, or **adapt** to the previous confidence
# (k = V (1 - 0.9 c)). This notebook measures what the paper plots (confidence per layer with and without
# pruning, the rank of the final token at the pruning layer and how often it survives the top-k), the
# FLOPs and measured time of a confidence check against k, and the quality and speed of generation with
# each variant, on both embedded models: SmolLM2-135M (V = 49152) and Gemma-3-270M (V = 262144, where the
# head is 63% of the parameters).

# %%
import pandas as pd
import torch
from IPython.display import display

from effllm import plots, records, vocab
from effllm.adapters import get_adapter
from effllm.data import calibration as calibration_windows
from effllm.decoding import Calm, Full, VocabPruning, decode
from effllm.experiments.prompts import prompt_budget, prompt_format, task_prompts
from effllm.experiments.runs import run_policies
from effllm.experiments.session import open_session
from effllm.experiments.stats import paired_speedup
from effllm.lens import cached_linear_exits

# %% tags=["parameters"]
profile = "default"  # smoke | default | paper (set by run_all.py)
model_name = "smollm2-135m"  # the model when model_names is None (run_all's common parameter)
seed = 0
figures_dir = None  # None: the repository's figures/ folder
dtype = None  # None: EFFLLM_DTYPE (run_all.py --dtype), else bfloat16 where the hardware computes in it, else float32
device = "auto"  # auto (a CUDA GPU if there is one, else the CPU) | cpu | cuda
# every model analysed side by side (a "<model>-ee" name: that model with its trained exit); None: [model_name]
model_names = ["smollm2-135m"]
prompt_data = ["arithmetic+humaneval+docstrings"]  # per model (or one for all): builtin (arithmetic + HumanEval), tasks joined by "+" | squad | samsum
use_fitted_exits = True  # least-squares exits (decoder-only models); False: the plain logit lens
exit_min_layer = None  # the pruning layer j (1-based); None: 0.6 L of each model (the paper: 19 of 24)
k = 256  # candidates kept at the pruning layer
threshold = 0.9  # CALM softmax threshold (the paper's)
ks = [16, 64, 256, 1024, 4096]  # candidate-set sizes for the cost of one check against k
generation_ks = [256]  # fixed-k sizes decoded with CALM (each is one more generation run per model)
analysis_corpora = ["python-docs", "python-code"]  # text for the teacher-forced confidence analysis
analysis_sequences = 1  # windows per corpus
analysis_seq_len = 128
n_prompts = 102  # generation prompts per model
max_new_tokens = 48
rounds = 5  # interleaved timing rounds; a speed ratio is their median
speed_prompts = 8  # the first prompts are timed at batch 1 in every round (quality: every prompt, in batches)
timed_settings = ["none", "fixed"]  # the settings timed at batch 1 (label prefixes); None: all; the rest: quality only
timed_models = ["smollm2-135m"]  # the models whose settings are timed (None: every model); the others: quality only
cost_min_run_time = 0.2  # seconds per timing of one confidence check

# %%
torch.manual_seed(seed)
plots.set_figures_dir(figures_dir)
model_names = list(model_names or [model_name])
prompt_data = list(prompt_data) * len(model_names) if len(prompt_data) == 1 else list(prompt_data)
if len(prompt_data) != len(model_names):
    raise ValueError(f"prompt_data needs one entry per model: {len(model_names)} models {model_names}, "
                     f"{len(prompt_data)} entries {prompt_data}")
loaded = {}
facts = []
for name in model_names:
    model, tokenizer, device, machine = open_session(name, device, dtype, profile=profile)
    adapter = get_adapter(model)
    encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
    trained = records.EXITS.get(model)  # load_model("<model>-ee"): exits trained by effllm.training
    if trained is not None and trained.layers:
        transform = trained  # (layer, hidden) -> hidden like the fitted exits; the identity at untrained layers
        layer = exit_min_layer or min(trained.layers)  # checks start where the trained exit is
    else:
        transform = cached_linear_exits(model, tokenizer, name) if use_fitted_exits and not encoder_decoder else None
        layer = exit_min_layer or max(1, round(0.6 * adapter.num_layers))
    loaded[name] = {"model": model, "tokenizer": tokenizer, "adapter": adapter, "transform": transform,
                    "prune_layer": min(layer, adapter.num_layers - 1), "encoder_decoder": encoder_decoder}
    head_share = adapter.lm_head.weight.numel() / sum(p.numel() for p in model.parameters())
    facts.append({"model": name, "layers": adapter.num_layers, "d": adapter.hidden_size, "V": adapter.vocab_size,
                  "head share of parameters": round(head_share, 3), "pruning layer j": loaded[name]["prune_layer"],
                  "exits": (f"trained at layer {min(trained.layers)}" if trained is not None and trained.layers
                            else "fitted" if transform is not None else "logit lens")})
facts = pd.DataFrame(facts)
display(facts)
print(machine)

# %% [markdown]
# ## 1. Confidence per layer, with and without pruning
#
# Teacher-forced on windows of built-in text: at every position and layer, the softmax gap p1 - p2 over the
# full vocabulary, and over the k candidates picked at the pruning layer j (at j itself the check is the
# full one that picks them). The final token is the model's own greedy prediction at layer L.

# %%
analyses = []
for name, item in loaded.items():
    if item["encoder_decoder"]:
        # T5: the decoder reads the reference answers of the task (teacher forcing), the encoder the prompt
        sources = task_prompts(item["tokenizer"], prompt_data[model_names.index(name)], 2 * analysis_sequences,
                               fmt="t5")
        length = min(p.input_ids.shape[1] for p in sources)
        encoder_ids = torch.cat([p.input_ids[:, :length] for p in sources]).to(item["model"].device)
        with torch.inference_mode():  # the full model's own greedy output as the decoder input
            targets = decode(item["model"], encoder_ids, analysis_seq_len, Full(), eos_token_id=[])
        decoder_ids = targets.sequences[:, :-1]  # starts with the decoder start token
    else:
        encoder_ids = None
        decoder_ids = torch.cat([calibration_windows(c, item["tokenizer"], analysis_sequences, analysis_seq_len, seed=seed)
                                 for c in analysis_corpora])
    table = vocab.layer_analysis(item["model"], decoder_ids, prune_layer=item["prune_layer"], k=k,
                                 exit_transform=item["transform"], encoder_input_ids=encoder_ids, progress=False)
    analyses.append(table.assign(model=name))
analysis = pd.concat(analyses, ignore_index=True)
per_layer = analysis.groupby(["model", "layer"], sort=False).agg(
    confidence=("confidence", "mean"), confidence_pruned=("confidence_pruned", "mean"),
    agreement=("agrees", "mean"), agreement_pruned=("agrees_pruned", "mean"), tokens=("confidence", "size"),
).reset_index()

fig, axes = plots.new_figure(1, len(loaded), squeeze=False)
for ax, (name, group) in zip(axes[0], per_layer.groupby("model", sort=False), strict=True):
    j = loaded[name]["prune_layer"]
    ax.plot(group.layer, group.confidence, marker="o", markersize=3, label="confidence, full vocabulary")
    ax.plot(group.layer, group.confidence_pruned, marker="o", markersize=3, label=f"confidence, top-{k} from layer {j}")
    ax.plot(group.layer, group.agreement, ls="--", color="C0", lw=1, label="argmax = final token (full)")
    ax.plot(group.layer, group.agreement_pruned, ls="--", color="C1", lw=1, label="argmax = final token (pruned)")
    ax.axvline(j, color="0.6", ls=":", lw=1)
    ax.set_title(name, fontsize=9)
    plots.layer_axis(ax)
    ax.set_ylim(0, 1.02)
axes[0][0].set_ylabel("mean over tokens")
axes[0][0].legend(fontsize=6)
fig.suptitle("Softmax confidence (p1 - p2) per layer, with and without vocabulary pruning")
plots.caption(fig, data=", ".join(analysis_corpora),
              extra=f"{int(per_layer.tokens.iloc[0])} tokens per model, teacher-forced · fitted exits: {use_fitted_exits}")
plots.save_figure(fig, "02_confidence_per_layer", table=per_layer)

# %%
above = per_layer[per_layer.layer > per_layer.model.map({n: i["prune_layer"] for n, i in loaded.items()})]
gap = above.groupby("model", sort=False).apply(
    lambda g: pd.Series({"confidence gain from pruning": (g.confidence_pruned - g.confidence).mean(),
                         "agreement change": (g.agreement_pruned - g.agreement).mean()}), include_groups=False)
display(gap.round(3))

# %% [markdown]
# Renormalising the softmax over k candidates removes the probability mass of the long tail: whenever the
# layer's top two ids are among the candidates, the pruned gap p1 - p2 is the full gap divided by the
# candidates' share of the mass, hence larger (the table gives the mean gain above j). At a fixed threshold,
# pruned CALM therefore tends to exit earlier. The dashed lines show how often the argmax is the final
# token: the pruned one can fall below the full one only where the final token was cut at layer j, and can
# rise above it where a wrong argmax was cut.

# %% [markdown]
# ## 2. The rank of the final token at the pruning layer, and how often it survives the top-k

# %%
at_prune = analysis[analysis.layer == analysis.model.map({n: i["prune_layer"] for n, i in loaded.items()})]
survival_ks = sorted({1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096, 16384, *ks})
survival = pd.concat([vocab.survival_rate(group.final_rank, [s for s in survival_ks if s <= loaded[name]["adapter"].vocab_size])
                      .assign(model=name) for name, group in at_prune.groupby("model", sort=False)], ignore_index=True)
fig, axes = plots.new_figure(1, 2)
for name, group in at_prune.groupby("model", sort=False):
    axes[0].hist(group.final_rank + 1, bins=[2**i for i in range(0, 19)], histtype="step", lw=1.5,
                 label=f"{name} (j = {loaded[name]['prune_layer']})", density=False)
    curve = survival[survival.model == name]
    axes[1].plot(curve.k, curve.survival, marker="o", markersize=3, label=name)
axes[0].set_xscale("log")
axes[0].set_xlabel("rank of the final token at layer j (1 = top)")
axes[0].set_ylabel("tokens")
axes[0].legend(fontsize=7)
axes[1].axvline(k, color="0.6", ls=":", lw=1)
axes[1].set_xscale("log")
axes[1].set_xlabel("k (candidates kept)")
axes[1].set_ylabel("final token among the top-k at layer j")
axes[1].set_ylim(0, 1.02)
fig.suptitle("Does the final token survive pruning at the pruning layer?")
plots.caption(fig, data=", ".join(analysis_corpora), extra="teacher-forced; rank over the full vocabulary")
plots.save_figure(fig, "02_final_token_rank", table=survival)

# %%
print("final token among the top-k at layer j:", "; ".join(
    f"{row.model} {row.survival:.1%} at k = {row.k}" for row in survival[survival.k == k].itertuples()))

# %% [markdown]
# The histogram counts how far down the layer-j ranking the final token sits; the curve is the fraction of
# tokens whose final token would survive pruning to k candidates. Where it is below 1 at the chosen k, an
# exit can emit a token the full model would not, however confident it is.

# %% [markdown]
# ## 3. Cost of one confidence check against k: FLOPs and measured time
#
# One check = LM head over the candidate rows of the normed state, softmax, p1 - p2; FLOPs are
# (2d - 1)·k (the paper's count), time is the median of repeated runs on this machine, batch 1.

# %%
costs = pd.concat([vocab.confidence_check_cost(item["model"], [*ks, None], min_run_time=cost_min_run_time)
                   .assign(model=name) for name, item in loaded.items()], ignore_index=True)
display(costs.round(4))
fig, axes = plots.new_figure(1, 2)
for name, group in costs.groupby("model", sort=False):
    axes[0].plot(group.k, group.flops, marker="o", markersize=3, label=name)
    axes[1].plot(group.k, group.ms, marker="o", markersize=3, label=name)
for ax, label in zip(axes, ("FLOPs per check", "measured ms per check"), strict=True):
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("k (vocabulary rows; the last point is the full vocabulary)")
    ax.set_ylabel(label)
    ax.axvline(k, color="0.6", ls=":", lw=1)
axes[0].legend(fontsize=7)
fig.suptitle("Cost of one exit-confidence check against the vocabulary size")
plots.caption(fig, extra=f"batch 1, float32 · {machine}")
plots.save_figure(fig, "02_confidence_cost", table=costs)

# %%
for row in costs[costs.k == k].itertuples():
    print(f"{row.model}: k = {k} is {row.flops_ratio:.0f}x fewer FLOPs and {row.speedup:.1f}x faster measured "
          f"than the full vocabulary ({row.ms:.3f} ms per check)")

# %% [markdown]
# FLOPs fall in proportion to k. Measured time follows them only while the matrix product dominates; at
# small k fixed costs (gathering the rows, the softmax call, Python) take over, so compare the two ratios
# that the printout gives at the chosen k for each model.

# %% [markdown]
# ## 4. Generation: quality and speed against k, and fixed vs decaying vs adaptive
#
# CALM with softmax confidence from layer j at threshold 0.9, decoding the same prompts per model: no
# pruning, fixed k for every k, and decaying and adaptive k as the authors' scripts run them (k unset: the first
# check keeps the decaying size, 35000 / (1 + 139 i / L) and at least 250, of layer i). Quality is ROUGE-L
# and token agreement with the full-depth output, every prompt decoded to its end of sequence (at most
# `max_new_tokens`) in batches; speed is timed at batch 1 on the first `speed_prompts` prompts in interleaved
# rounds and compared paired (same prompt, same round; the mean over prompts of each prompt's median ratio, with a
# 95% bootstrap interval over prompts) against unpruned CALM, on the models in `timed_models` (the others are
# scored for quality only: batch-1 timing is what costs on 2 cores).

# %%
generation, generation_items, generation_timings = [], [], []
for (name, item), data_name in zip(loaded.items(), prompt_data, strict=True):
    model, tokenizer = item["model"], item["tokenizer"]
    fmt = prompt_format(model, tokenizer, name)
    prompts = [p.to(model.device) for p in task_prompts(tokenizer, data_name, n_prompts, fmt=fmt,
                                                        max_tokens=prompt_budget(model, max_new_tokens))]
    base = {"exit_conf_type": "softmax", "threshold": threshold, "candidate_layer": item["prune_layer"]}
    settings = {"none": Calm(**base)}
    settings |= {f"fixed k={size}": Calm(**base, vocab=VocabPruning("fixed", size))
                 for size in generation_ks if size <= item["adapter"].vocab_size}
    # decaying and adaptive as the authors' scripts run them: --k unset, so the first check keeps the decaying
    # size (35000 / (1 + 139 i / L), at least 250) and later checks follow each schedule (effllm.decoding.vocab_schedule)
    settings |= {reduct: Calm(**base, vocab=VocabPruning(reduct, None)) for reduct in ("decaying", "adaptive")}
    timed_here = timed_models is None or name in timed_models
    # speed against unpruned CALM on the same prompts and rounds (the claim's ratio); no HF generate reference
    run = run_policies(model, tokenizer, prompts, settings, max_new_tokens, exit_transform=item["transform"],
                       rounds=rounds, speed_prompts=speed_prompts if timed_here else 0, timed=timed_settings, hf=False,
                       time_full=False)
    vs_none = [{"label": label, "speedup_vs_unpruned": paired["mean"], "speedup_vs_unpruned_ci_low": paired["ci_low"],
                "speedup_vs_unpruned_ci_high": paired["ci_high"]}
               for label in settings for paired in [paired_speedup(run.timings, label, "none")]]
    generation.append(run.summary.merge(pd.DataFrame(vs_none), on="label").assign(model=name))  # not hf / full
    generation_items.append(run.items.drop(columns="text").assign(model=name))
    generation_timings.append(run.timings.assign(model=name))
generation = pd.concat(generation, ignore_index=True)
# the per-prompt and per-round tables behind the comparisons below (and the claims report)
plots.save_table(pd.concat(generation_items, ignore_index=True), "02_generation_items")
plots.save_table(pd.concat(generation_timings, ignore_index=True), "02_generation_timings")
generation["reduction"] = generation.type_vocab_reduct.fillna("none")
display(generation[["model", "label", "reduction", "k", "speedup_vs_unpruned", "speedup_vs_unpruned_ci_low", "speedup_vs_unpruned_ci_high",
                    "avg_layers", "rougeL_vs_full", "rougeL_vs_full_ci_low", "rougeL_vs_full_ci_high",
                    "rougeL_vs_reference", "rougeL_vs_reference_ci_low", "rougeL_vs_reference_ci_high",
                    "speedup_ceiling", "confidence_flops_per_token",
                    "confidence_ms_per_token", "n_prompts"]].round(3))

# %%
fig, axes = plots.new_figure(1, 3, figsize=(12, 3.2))
for i, (name, group) in enumerate(generation.groupby("model", sort=False)):
    fixed = group[group.reduction == "fixed"].sort_values("k")
    unpruned = group[group.label == "none"].iloc[0]
    colour = f"C{i}"
    axes[0].plot(fixed.k, fixed.rougeL_vs_full, marker="o", markersize=3, color=colour, label=f"{name}, fixed k")
    axes[0].axhline(unpruned.rougeL_vs_full, color=colour, ls=":", lw=1, label=f"{name}, no pruning")
    axes[1].errorbar(fixed.k, fixed.speedup_vs_unpruned, yerr=[fixed.speedup_vs_unpruned - fixed.speedup_vs_unpruned_ci_low,
                                                              fixed.speedup_vs_unpruned_ci_high - fixed.speedup_vs_unpruned],
                     marker="o", markersize=3, capsize=2, lw=0.8, color=colour, label=name)
    axes[2].plot(fixed.k, fixed.confidence_flops_per_token / unpruned.confidence_flops_per_token, marker="o",
                 markersize=3, color=colour, label=name)
axes[0].set_ylabel("ROUGE-L vs full-depth output")
axes[1].set_ylabel("paired speed ratio vs unpruned CALM (x),\n95% CI over prompts", fontsize=8)
axes[1].axhline(1.0, color="0.6", ls=":", lw=1)
axes[2].set_ylabel("confidence FLOPs/token / unpruned")
axes[2].set_yscale("log")
for ax in axes:
    ax.set_xscale("log")
    ax.set_xlabel("k (fixed)")
axes[0].legend(fontsize=6)
axes[1].legend(fontsize=6)
fig.suptitle(f"CALM with a pruned vocabulary against k (threshold {threshold})")
plots.caption(fig, data=", ".join(dict.fromkeys(prompt_data)),
              extra=f"n = {n_prompts} prompts per model, decoded to {generation.decoded_to.iloc[0]} (at most "
                    f"{max_new_tokens} tokens), batched; speed: {speed_prompts} prompts x {rounds} rounds at batch 1, "
                    f"paired, greedy · {machine}")
plots.save_figure(fig, "02_quality_vs_k", table=generation)

# %%
variants = generation[generation.reduction.isin(["none", "decaying", "adaptive"])
                      | ((generation.reduction == "fixed") & (generation.k == k))].copy()
variants["variant"] = variants.reduction + variants.k.map(lambda v: "" if pd.isna(v) else f" (k = {int(v)})")
columns = {"speedup_vs_unpruned": "paired speed ratio vs unpruned CALM (x),\n95% CI over prompts",
           "rougeL_vs_full": "ROUGE-L vs full depth",
           "rougeL_vs_reference": "ROUGE-L vs reference\n(the seed's metric)",
           "avg_layers": "layers per token", "confidence_flops_per_token": "check FLOPs per token",
           "confidence_ms_per_token": "check time per token (ms)"}
fig, axes = plots.new_figure(1, len(columns), figsize=(2.6 * len(columns), 3.0))
for ax, (column, title) in zip(axes, columns.items(), strict=True):
    order = list(dict.fromkeys(variants.variant))
    table = variants.pivot(index="variant", columns="model", values=column).reindex(order)
    yerr = None
    if f"{column}_ci_low" in variants:  # whiskers: the 95% interval over prompts
        low, high = (variants.pivot(index="variant", columns="model", values=f"{column}_ci_{end}").reindex(order)
                     for end in ("low", "high"))
        below, above = (table - low).clip(lower=0), (high - table).clip(lower=0)
        yerr = [[below[m].to_numpy(), above[m].to_numpy()] for m in table.columns]
    table.plot.bar(ax=ax, legend=False, rot=60, fontsize=7, yerr=yerr, capsize=2)
    ax.set_title(title, fontsize=8)
    ax.set_xlabel("")
    if column.startswith("confidence"):
        ax.set_yscale("log")
handles, labels = axes[0].get_legend_handles_labels()
fig.legend(handles, labels, loc="outside upper right", fontsize=7)
fig.suptitle("Fixed vs decaying vs adaptive candidate sets (CALM softmax, threshold 0.9)")
plots.caption(fig, extra=f"{n_prompts} prompts per model, decoded to {variants.decoded_to.iloc[0]} (at most "
                         f"{max_new_tokens} tokens); speed: {speed_prompts} prompts x {rounds} rounds, batch 1, paired "
                         f"· {machine}")
plots.save_figure(fig, "02_fixed_decaying_adaptive", table=variants)

# %%
for name, group in variants.groupby("model", sort=False):
    unpruned = group[group.reduction == "none"].iloc[0]
    for row in group[group.reduction != "none"].itertuples():
        print(f"{name}, {row.variant}: {row.speedup_vs_unpruned:.2f}x the speed of CALM without pruning (paired, 95% "
              f"CI over prompts {row.speedup_vs_unpruned_ci_low:.2f}-{row.speedup_vs_unpruned_ci_high:.2f}), ROUGE-L {row.rougeL_vs_full:.3f} (unpruned {unpruned.rougeL_vs_full:.3f}), confidence cost "
              f"{row.confidence_flops_per_token / unpruned.confidence_flops_per_token:.3f}x the FLOPs")

# %% [markdown]
# The printout compares each variant with unpruned CALM on the same model and prompts. Pruning can save
# the most where the head is the largest share of a token's work (Gemma-3-270M's 262k rows) and where many
# layers are checked per token (add `gemma3-270m` to `model_names` to compare: the default profile runs SmolLM2
# only, since Gemma-3's full-vocabulary checks make its quality table the slowest of the run). Because the pruned confidence tends
# to be higher at a fixed threshold, tokens may also exit earlier (see `avg_layers`), which adds speed and
# can cost ROUGE-L. Decaying k shrinks the candidates further with depth; adaptive k shrinks them at each check
# by (1 - 0.9 c) of the previous check's confidence, so it prunes fastest where the model is sure.

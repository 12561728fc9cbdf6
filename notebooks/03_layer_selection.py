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
# # 03 · Dynamic layer selection: early exit versus layer skipping, learned controllers, the oracle
#
# Glavas et al. ("Dynamic layer selection in decoder-only transformers", NeurIPS ENLSP 2024) ask which
# layers a decoder-only model can leave out per generated token. **Early exit** runs the first layers and
# skips every layer above them; **layer skipping** runs layers spread over the whole depth (keep every
# k-th layer, first and last kept), and a skipped layer's state is copied to the next one. They find a
# pretrained decoder far more robust to skipping than to early exit at the same number of layers; that
# per-token **controllers** (Linear(d, 2) + hard Gumbel-softmax, trained with the cost-aware loss
# CE + alpha * fraction of executed layers) on the hidden state barely beat controllers on a fixed input
# (learned per-layer skip rates); and that a **per-sequence oracle**, picking for each sequence one of the
# 4 / 8 / 12 / 24-layer models under an average budget (a multiple-choice knapsack), matches the full
# model with 23.3% of the layers on average. This notebook repeats each analysis with effllm's decoding core
# (`effllm.decoding.Skip`), whose skipped layers are really not computed.

# %%
import pandas as pd
import torch
from IPython.display import display

from effllm import controllers, data, models, oracle, plots, records
from effllm.adapters import get_adapter
from effllm.decoding import Skip, StaticExit, plans
from effllm.experiments.analyses import hidden_similarity
from effllm.experiments.prompts import answer_examples, prompt_format, task_prompts
from effllm.experiments.runs import run_policies
from effllm.experiments.session import open_session
from effllm.paths import cache_dir

# %% tags=["parameters"]
profile = "default"  # smoke | default | paper (set by run_all.py)
model_name = "smollm2-135m"  # an embedded model, tiny-FAMILY, a local folder or a hub id
seed = 0
figures_dir = None  # None: the repository's figures/ folder
dtype = None  # None: EFFLLM_DTYPE (run_all.py --dtype), else bfloat16 where the hardware computes in it, else float32
device = "auto"  # auto (a CUDA GPU if there is one, else the CPU) | cpu | cuda
task = "arithmetic+humaneval+docstrings"  # prompts with reference answers: arithmetic | humaneval | docstrings, joined by "+" | alpaca (the paper's, hub)
budgets = [4 / 24, 8 / 24, 12 / 24, 1.0]  # the paper's 4 / 8 / 12 / 24 of 24 layers, as fractions of the depth
n_prompts = 102  # test prompts decoded with every setting
max_new_tokens = 48  # new tokens per prompt
similarity_corpus = "python-docs"  # windows for the hidden-state comparison (effllm.data)
similarity_windows = 4  # windows of similarity_seq_len tokens
similarity_seq_len = 128
similarity_prompt_len = 32  # the first tokens of a window run at full depth, like a prompt
similarity_points = 10  # layer counts compared between skipping and early exit
controller_examples = 48  # training examples (task's train split) for the skip controllers
controller_steps = 30  # one example per step, frozen backbone
controller_alpha = 1.0  # weight of the layer cost in CE + alpha * fraction of executed layers
controller_lr = 0.1
rounds = 5  # interleaved timing rounds (speed: paired per prompt, median over rounds)
speed_prompts = 0  # the first prompts timed at batch 1 in every round (0: quality only, as the seed's claims are)
timed_settings = []  # the settings timed at batch 1 (label prefixes); None: all; the rest: quality only
# The same model with an exit trained by effllm.training (load_model("<model>-ee")): at its exit layer, skipping,
# early exit through the plain head and early exit through the trained exit side by side (None: skip)
trained_model = "smollm2-135m-ee"

# %%
torch.manual_seed(seed)
plots.set_figures_dir(figures_dir)
model, tokenizer, device, machine = open_session(model_name, device, dtype, profile=profile)
adapter = get_adapter(model)
n_layers = adapter.num_layers
fmt = prompt_format(model, tokenizer, model_name)
items = [p.to(model.device) for p in task_prompts(tokenizer, task, n_prompts, fmt=fmt)]
budget_table = pd.DataFrame({
    "budget": budgets,
    "layers run": [plans.budget_layer_count(n_layers, b) for b in budgets],
    "skipping keeps (0-based)": [plans.static_layers(n_layers, budget=b) for b in budgets],
    "early exit keeps": [f"0..{plans.budget_layer_count(n_layers, b) - 1}" for b in budgets],
})
print(f"{model_name}: {n_layers} layers; {len(items)} {task} test prompts (items 0..{len(items) - 1}); {machine}")
with pd.option_context("display.max_colwidth", None):
    display(budget_table)

# %% [markdown]
# ## 1. Hidden states under skipping and under early exit
#
# Teacher forcing on `similarity_windows` windows of the corpus: the first `similarity_prompt_len` tokens
# run at full depth (the prompt), the rest run n layers, either spread over the depth (skipping) or the
# first n (early exit). We compare each token's last state with the full model's (cosine similarity,
# before and after the final norm).

# %%
windows = data.calibration(similarity_corpus, tokenizer, n_samples=similarity_windows,
                           seq_len=similarity_seq_len, seed=seed)
counts = sorted({*torch.linspace(1, n_layers, similarity_points).round().int().tolist(),
                 *budget_table["layers run"]})
similarity = hidden_similarity(model, windows, similarity_prompt_len, counts)
display(similarity.pivot(index="layers_run", columns="method", values=["cosine", "cosine_normed"]).round(3).T)

# %%
fig, axes = plots.new_figure(1, 2, sharey=True)
for ax, column, name in zip(axes, ["cosine", "cosine_normed"], ["before the final norm", "after the final norm"],
                            strict=True):
    for method, group in similarity.groupby("method"):
        ax.plot(group.layer_fraction, group[column], marker="o", markersize=3, label=method,
                color=plots.colour("skip" if method == "skipping" else "early-exit"))
    ax.set_xlabel("fraction of layers run per token")
    ax.set_title(f"last state {name}")
axes[0].set_ylabel("cosine similarity to the full model")
axes[0].legend()
fig.suptitle("Skipping vs early exit at equal layer counts (teacher forced)")
plots.caption(fig, model=model_name, data=similarity_corpus,
              extra=f"{int(similarity.tokens.iloc[0])} tokens after a {similarity_prompt_len}-token full-depth prompt")
plots.save_figure(fig, "03_hidden_similarity", table=similarity)

# %%
at_budgets = similarity[similarity.layers_run.isin(budget_table["layers run"])].pivot(
    index="layers_run", columns="method", values="cosine")
closer = int((at_budgets["skipping"] > at_budgets["early exit"]).sum())
print(f"At {closer} of the {len(at_budgets)} budgets' layer counts, skipping keeps the last state closer to the "
      "full model's than early exit does.")

# %% [markdown]
# Where the skipping curve lies above the early-exit curve, the states that reach the LM head under
# skipping point in a direction closer to the full model's: the top layers, which early exit drops, do
# work that the intermediate layers cannot stand in for. Read the gap at the budgets' layer counts
# (printed above); at full depth both are 1 by construction.

# %% [markdown]
# ## 2. Generation quality at the four budgets
#
# Greedy decoding of the prompts with static skipping and with early exit at each budget. The prompt
# runs at full depth (as in the paper), so the first new token always comes from all layers. ROUGE-L is
# measured against the task's reference answer and against the full model's own output; speed is
# relative to the full-depth run of the same engine, measured in the same run.

# %%
layer_counts = {"full": n_layers}
settings = {}
for b in budgets:
    n = plans.budget_layer_count(n_layers, b)
    if n < n_layers:
        settings[f"skipping {n}/{n_layers}"] = Skip("static", budget=b)
        settings[f"early exit {n}/{n_layers}"] = Skip("early-exit", budget=b)
        layer_counts |= {f"skipping {n}/{n_layers}": n, f"early exit {n}/{n_layers}": n}
run = run_policies(model, tokenizer, items, settings, max_new_tokens, rounds=rounds, timed=timed_settings,
                   speed_prompts=speed_prompts)
generations = run.items[run.items.label != "hf_generate"].copy()
generations["layers"] = generations.label.map(layer_counts)
generations["mode"] = generations.label.str.extract(r"^(skipping|early exit|full)")[0]
plots.save_table(generations.drop(columns="text"), "03_generation_items")  # per prompt: behind the claims report
quality = run.summary[run.summary.label != "hf_generate"].copy()
quality["layers"] = quality.label.map(layer_counts)
quality["mode"] = quality.label.str.extract(r"^(skipping|early exit|full)")[0]
display(quality[["label", "layers", "avg_layers", "rougeL_vs_reference", "rougeL_vs_reference_ci_low",
                 "rougeL_vs_reference_ci_high", "rougeL_vs_full", "rougeL_vs_full_ci_low", "rougeL_vs_full_ci_high",
                 "speedup_vs_full", "n_prompts"]].round(3))
with pd.option_context("display.max_colwidth", 120):
    display(generations[generations.prompt == 0][["label", "text"]])

# %%
fig, axes = plots.new_figure(1, 2, sharey=True)
full_row = quality[quality.label == "full"].iloc[0]
for ax, column, name in zip(axes, ["rougeL_vs_reference", "rougeL_vs_full"], ["the reference answer", "the full model"],
                            strict=True):
    for mode, family in [("skipping", "skip"), ("early exit", "early-exit")]:
        # each curve: its budgets, then the full model once as its right end (no duplicate point)
        group = pd.concat([quality[quality["mode"] == mode], quality[quality.label == "full"]]).sort_values("layers")
        ax.errorbar(group.layers / n_layers, group[column],
                    yerr=[group[column] - group[f"{column}_ci_low"], group[f"{column}_ci_high"] - group[column]],
                    marker="o", capsize=2, label=mode, color=plots.colour(family))
    ax.set_xlabel("fraction of layers run per generated token")
    ax.set_title(f"ROUGE-L against {name}")
axes[0].set_ylabel("mean ROUGE-L F (95% CI over prompts)")
axes[0].legend()
fig.suptitle(f"Static skipping vs early exit: {task}, greedy, {max_new_tokens} new tokens")
plots.caption(fig, model=model_name, data=f"{task} (n = {len(items)} prompts)",
              extra=f"CPU, {torch.get_num_threads()} threads")
plots.save_figure(fig, "03_generation_quality", table=quality)

# %%
best = quality[quality.label != "full"].sort_values("rougeL_vs_full", ascending=False).iloc[0]
print(f"Full model: ROUGE-L {full_row.rougeL_vs_reference:.3f} against the references (n = {full_row.n_prompts}). "
      f"Closest to it below full depth: {best.label} (ROUGE-L {best.rougeL_vs_reference:.3f} against the references, "
      f"{best.rougeL_vs_full:.3f} [{best.rougeL_vs_full_ci_low:.3f}, {best.rougeL_vs_full_ci_high:.3f}] against the "
      f"full model" + (f", {best.speedup_vs_full:.2f}x its decoding speed)." if best.n_speed_prompts else
                         "; speed not timed: speed_prompts = 0)."))

# %% [markdown]
# ### Early exit with a trained exit
#
# The early exit above reads an intermediate layer through the model's own final norm and head, which the model
# was never trained for. `trained_model` is this model with an exit trained at one layer (effllm.training, notebook
# 08; the backbone is unchanged). At that layer's budget: static skipping, early exit through the plain head, and
# early exit through the trained exit, on the same prompts.

# %%
if trained_model:
    ee, _ = models.load_model(trained_model, dtype=dtype, device=device)
    trained_layers = list(getattr(records.EXITS.get(ee), "layers", []))
    if not trained_layers:
        raise ValueError(f"{trained_model!r} carries no trained exit modules to compare")
    at = max(layer for layer in trained_layers if layer < n_layers)
    share = at / n_layers
    trained_settings = {f"skipping {at}/{n_layers}": Skip("static", budget=share),
                        f"early exit {at}/{n_layers}": Skip("early-exit", budget=share),
                        f"early exit {at}/{n_layers}, trained exit": StaticExit(at)}
    trained_quality = run_policies(ee, tokenizer, items, trained_settings, max_new_tokens, hf=False,
                                   rounds=rounds, speed_prompts=speed_prompts).summary  # exit_transform None: the model's trained exit
    trained_quality = trained_quality[trained_quality.label != "full"]
    display(trained_quality[["label", "avg_layers", "rougeL_vs_reference", "rougeL_vs_reference_ci_low",
                             "rougeL_vs_reference_ci_high", "rougeL_vs_full", "rougeL_vs_full_ci_low",
                             "rougeL_vs_full_ci_high", "speedup_vs_full", "n_prompts"]].round(3))
    fig, axes = plots.new_figure(1, 2, sharey=True, figsize=(9, 3.2))
    for ax, column, name in zip(axes, ["rougeL_vs_reference", "rougeL_vs_full"], ["the reference answer",
                                                                                  "the full model"], strict=True):
        colours = [plots.colour("skip"), plots.colour("early-exit"), plots.colour("static")]
        ax.bar(range(len(trained_quality)), trained_quality[column], color=colours[: len(trained_quality)],
               yerr=[trained_quality[column] - trained_quality[f"{column}_ci_low"],
                     trained_quality[f"{column}_ci_high"] - trained_quality[column]], capsize=3)
        ax.axhline(full_row[column], color="0.4", ls=":", lw=1, label="full model")
        ax.set_xticks(range(len(trained_quality)), [label.replace(", ", ",\n") for label in trained_quality.label],
                      fontsize=7)
        ax.set_title(f"ROUGE-L against {name}")
    axes[0].set_ylabel("mean ROUGE-L F (95% CI over prompts)")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"At {at} of {n_layers} layers: skipping, early exit, early exit through a trained exit")
    plots.caption(fig, model=f"{model_name} | {trained_model}", data=f"{task} (n = {len(items)} prompts)",
                  extra=f"{max_new_tokens} new tokens, greedy, CPU, {torch.get_num_threads()} threads")
    plots.save_figure(fig, "03_trained_exit", table=trained_quality)
    del ee

# %% [markdown]
# Each curve shows how fast quality falls as layers are removed; the right panel isolates how far each
# method drifts from the model it approximates, the left how much of the task is left. The speed column
# is the real saving: skipped layers are not computed (a test hooks every skipped attention and MLP and
# checks they are never called).

# %% [markdown]
# ## 3. Learned per-token controllers: hidden state vs fixed input
#
# One Linear(d, 2) per layer and a hard Gumbel-softmax decide keep / skip for every decoded token. The
# backbone is frozen; only the controllers learn, with CE + `controller_alpha` * (mean fraction of
# executed layers) on `controller_examples` prompt + answer pairs of the task's train split. The
# fixed-input variant sees a constant vector instead of the hidden state, so it can only learn a skip
# rate per layer. Both are saved beside the model cache and reloaded (the file records the model they
# belong to), then decode the same test prompts; random skipping at the same layer budget is the
# baseline.

# %%
# Training examples come from the items after the test prompts: the same split for tasks that have only one
# (Alpaca), never the same item.
examples = answer_examples(tokenizer, task, controller_examples, offset=n_prompts, fmt=fmt)
controller_paths, histories = {}, []
for kind, fixed in [("hidden state", False), ("fixed input", True)]:
    trained, history = controllers.train_controllers(
        model, examples, with_fixed_input=fixed, alpha=controller_alpha, steps=controller_steps, lr=controller_lr,
        seed=seed, model_name=model_name)
    name = f"{'fixed' if fixed else 'hidden'}-alpha{controller_alpha}-steps{controller_steps}-seed{seed}.safetensors"
    controller_paths[kind] = trained.save(cache_dir() / "skip_controllers" / model_name.replace("/", "--") / name)
    histories.append(history.assign(controller=kind))
histories = pd.concat(histories, ignore_index=True)
reloaded = {kind: controllers.SkipControllers.load(path, model) for kind, path in controller_paths.items()}
keep_rates = pd.DataFrame({"layer": range(n_layers),
                           "keep_probability": reloaded["fixed input"].keep_probabilities().numpy()})

# %%
fig, axes = plots.new_figure(1, 3)
for kind, group in histories.groupby("controller"):
    smooth = group[["ce", "layer_fraction"]].rolling(5, min_periods=1).mean()
    colour = plots.colour("controller" if kind == "hidden state" else "random")
    axes[0].plot(group.step, smooth.ce, label=kind, color=colour)
    axes[1].plot(group.step, smooth.layer_fraction, label=kind, color=colour)
axes[0].set(xlabel="step", ylabel="cross-entropy on answers (5-step mean)")
axes[1].set(xlabel="step", ylabel="fraction of layers executed (5-step mean)")
axes[0].legend()
axes[2].bar(keep_rates.layer, keep_rates.keep_probability, color=plots.colour("random"))
plots.layer_axis(axes[2], label="layer (0-based)")
axes[2].set(xlabel="layer (0-based)", ylabel="keep probability", title="fixed-input controller")
fig.suptitle(f"Controller training: CE + {controller_alpha} x layer fraction, frozen backbone")
plots.caption(fig, model=model_name, data=f"{task} train ({len(examples)} examples)",
              extra=f"{controller_steps} steps, CPU")
plots.save_figure(fig, "03_controller_training", table=histories)

# %%
controller_settings = {f"controller ({kind})": Skip("controller", controller=reloaded[kind], seed=seed)
                       for kind in reloaded}
controlled = run_policies(model, tokenizer, items, controller_settings, max_new_tokens, hf=False, rounds=rounds,
                          timed=timed_settings, speed_prompts=speed_prompts)
fractions = controlled.summary.set_index("label").avg_layers / n_layers
random_settings = {f"random at {kind} budget": Skip("random", budget=min(1.0, max(1 / n_layers,
                                                                                   float(fractions[f"controller ({kind})"]))),
                                                    seed=seed)
                   for kind in reloaded}
randomised = run_policies(model, tokenizer, items, random_settings, max_new_tokens, hf=False, rounds=rounds,
                          timed=timed_settings, speed_prompts=speed_prompts)
controller_quality = pd.concat([controlled.summary, randomised.summary[randomised.summary.label != "full"]],
                               ignore_index=True)
controller_items = pd.concat([controlled.items, randomised.items[randomised.items.label != "full"]], ignore_index=True)
plots.save_table(controller_items.drop(columns="text", errors="ignore"), "03_controller_items")  # the claims' pairs
controller_quality["layer_fraction"] = controller_quality.avg_layers / n_layers
display(controller_quality[["label", "layer_fraction", "rougeL_vs_reference", "rougeL_vs_full",
                            "rougeL_vs_full_ci_low", "rougeL_vs_full_ci_high", "n_prompts"]].round(3))

# %%
fig, ax = plots.new_figure()
static = quality[quality["mode"].isin(["skipping", "full"])].sort_values("layers")
ax.plot(static.layers / n_layers, static.rougeL_vs_full, color=plots.colour("skip"), marker="o",
        label="static skipping (section 2)")
for row in controller_quality[controller_quality.label != "full"].itertuples():
    family = "random" if row.label.startswith("random") else "controller"
    ax.errorbar(row.layer_fraction, row.rougeL_vs_full,
                yerr=[[row.rougeL_vs_full - row.rougeL_vs_full_ci_low], [row.rougeL_vs_full_ci_high - row.rougeL_vs_full]],
                marker="s" if family == "random" else ("D" if "hidden" in row.label else "^"), markersize=6, capsize=2,
                ls="none", label=row.label, color=plots.colour(family), zorder=3)
ax.set_xlabel("fraction of layers run per generated token")
ax.set_ylabel("mean ROUGE-L F against the full model (95% CI)")
ax.legend(fontsize="small")
ax.set_title("Controllers on the hidden state vs a fixed input\n"
             + plots.provenance(model=model_name, data=f"{task} (n = {len(items)} prompts)", extra="CPU"))
plots.save_figure(fig, "03_controllers", table=controller_quality)

# %%
by_label = controller_quality.set_index("label")
hidden_row, fixed_row = (by_label.loc[f"controller ({k})"] for k in reloaded)
print(f"Hidden-state controller: {hidden_row.layer_fraction:.2f} of the layers, ROUGE-L vs full "
      f"{hidden_row.rougeL_vs_full:.3f}; fixed-input controller: {fixed_row.layer_fraction:.2f}, "
      f"{fixed_row.rougeL_vs_full:.3f} (n = {int(hidden_row.n_prompts)} prompts).")

# %% [markdown]
# A hidden-state controller that is worth its input should sit above the fixed-input one at a similar
# layer fraction; the random points show what the same budget gives with no learning at all. The bar
# chart above shows which layers the fixed-input controller learned to skip most often.

# %% [markdown]
# ## 4. The per-sequence oracle
#
# For each test prompt, the oracle may pick one of the budget models (static skipping with
# `budgets`, the last being the full model) and must keep the average number of layers under a budget.
# That is a multiple-choice knapsack; the costs are integer layer counts, so dynamic programming over the
# total layer count solves it exactly for every budget at once (`effllm.oracle.oracle_frontier`, costs and qualities paired by label). Quality is
# ROUGE-L against the reference answer.

# %%
# Quality per prompt and budget model, and each model's layer cost, both keyed by label: the oracle pairs them by
# label (effllm.oracle), so the order of the columns cannot mispair them.
budget_costs = {label: n for label, n in layer_counts.items() if label == "full" or label.startswith("skipping")}
per_item = generations[generations.label.isin(budget_costs)].pivot(index="prompt", columns="label",
                                                                  values="rougeL_vs_reference")
frontier = oracle.oracle_frontier(per_item, budget_costs, n_layers)
plots.save_table(per_item.reset_index(), "03_oracle_items")
plots.save_table(pd.DataFrame({"label": list(budget_costs), "layers": list(budget_costs.values())}), "03_oracle_costs")
full_quality = float(per_item["full"].mean())
needed = oracle.oracle_fraction_to_match(per_item, budget_costs, full_quality, n_layers)
display(per_item.round(3))

# %%
means = per_item.mean()
fig, ax = plots.new_figure()
ax.plot(frontier.layer_fraction, frontier.mean_quality, drawstyle="steps-post", color=plots.colour("controller"),
        label="per-sequence oracle")
ax.scatter([budget_costs[c] / n_layers for c in means.index], means.to_numpy(), color=plots.colour("skip"), zorder=3,
           label="one budget model for every sequence")
ax.axhline(full_quality, color="0.5", linestyle="--", linewidth=1, label="full model")
ax.axvline(needed, color=plots.colour("self-spec"), linestyle=":", linewidth=1, label=f"oracle matches full at {needed:.1%}")
ax.set_xlabel("average fraction of layers per sequence")
ax.set_ylabel("mean ROUGE-L F against references")
ax.legend(fontsize="small")
ax.set_title("Per-sequence oracle over the budget models (exact knapsack)\n"
             + plots.provenance(model=model_name, data=f"{task} (n = {len(per_item)} prompts)"))
plots.save_figure(fig, "03_oracle", table=frontier)

# %%
# A second, independent count: for each sequence, the cheapest budget model at least as good as the full model
# on that sequence (a per-sequence bound; the oracle may trade quality between sequences and need less).
cheapest = [min((budget_costs[c] for c in per_item.columns if row[c] >= row["full"]), default=n_layers)
            for _, row in per_item.iterrows()]
print(f"The oracle matches the full model's mean ROUGE-L ({full_quality:.3f}, n = {len(per_item)} prompts) with "
      f"{needed:.1%} of the layers on average (the paper: 23.3% on OPT-IML-1.3b / Alpaca); taking for each sequence "
      f"the cheapest budget model that is as good as the full model on it needs "
      f"{sum(cheapest) / len(cheapest) / n_layers:.1%}.")

# %% [markdown]
# The step curve is the best mean quality any per-sequence assignment reaches under each average budget;
# the dots are the same budget for every sequence. The gap between them is what a perfect per-sequence
# router could gain, an upper bound for learned controllers. Where the cheap models fail on almost
# every sequence, the oracle needs close to the full depth to match the full model.

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

# %%

# %% [markdown]
# # 08 · Models trained to exit, and lossless self-speculation
#
# The early-exit papers' speedups come from models **trained to exit**: CALM and static exiting fine-tune with
# `weighted_ce` (every layer's loss through the shared head), FREE (seed 001) with `shallowdeep_kd_dyna` (the
# shallow model distilled from the deep one), and LayerSkip with layer dropout and an early-exit loss, after
# which it decodes **self-speculatively**: the first layers draft a few tokens, one full-depth pass verifies them
# all, and the output is exactly the full model's. This notebook trains the embedded model's exit
# (`load_model("<model>-ee")`: a frozen model with a small exit module at layer 20, self-distilled from the
# model's own outputs; `effllm.training`), shows what the training buys (agreement of the exit with the last
# layer, per layer and over training), and measures static exit, CALM, FREE and self-speculation before and
# after, against HF `generate` on the same model in the same run. Self-speculation's speed hinges on its
# acceptance rate, measured last against the draft layer and the draft length.

# %%
import pandas as pd
import torch
from IPython.display import display

from effllm import plots, records
from effllm.adapters import get_adapter
from effllm.data import calibration as calibration_windows
from effllm.decoding import Calm, Free, SelfSpec, StaticExit
from effllm.decoding.ceilings import WeightReads, self_spec_bound
from effllm.decoding.speculative import expected_speedup, speedup_at_acceptance_rate
from effllm.experiments.prompts import prompt_budget, prompt_format, task_prompts
from effllm.experiments.runs import lightest_keeping, run_policies
from effllm.experiments.session import open_session
from effllm.lens import cached_linear_exits, logit_lens_agreement
from effllm.training import recipe, train_exits

# %% tags=["parameters"]
profile = "default"  # smoke | default | paper (set by run_all.py)
model_name = "smollm2-135m"  # the base model (its default exit-trained version is load_model(model_name + "-ee"))
seed = 0
figures_dir = None  # None: the repository's figures/ folder
dtype = None  # None: EFFLLM_DTYPE (run_all.py --dtype), else bfloat16 where the hardware computes in it, else float32
device = "auto"  # auto (a CUDA GPU if there is one, else the CPU) | cpu | cuda
recipe_name = "default"  # effllm.training recipe (`paper`: the seeds' data sets, hub)
training_overrides = {}  # ExitTrainingConfig fields over the recipe (e.g. {"steps": 300}); part of its cache key
exit_layer = None  # the trained exit's layer (1-based); None: 2 L // 3 (layer 20 of SmolLM2's 30)
prompt_data = "arithmetic+humaneval+docstrings"  # arithmetic + HumanEval prompts; tasks joined by "+" take turns
n_prompts = 102  # prompts decoded by every setting (quality)
speed_prompts = 8  # of which the first are timed, in every round
rounds = 5  # interleaved timing rounds; a speed ratio is paired per prompt (median over rounds), then averaged
timed_settings = None  # the settings timed at batch 1 (label prefixes); None: all; the rest: quality only
# A number: instead of timed_settings, time per method the setting with the fewest layers per token whose ROUGE-L
# vs full depth (the low end of its 95% interval) reaches it, chosen from the quality results before any timing:
# the rows the claims read (the fastest setting keeping quality), and only those cost batch-1 time
timed_quality_bar = 0.9
time_fitted_exits = False  # False: the fitted-exit ("before") rows get quality only (the claims read the trained ones)
fitted_prompts = 24  # the first prompts the fitted-exit ("before") rows decode; None: all n_prompts
max_new_tokens = 48
thresholds = [0.9, 0.7]  # CALM / FREE confidence thresholds
draft_lengths = [4]  # self-speculation: tokens drafted per verification
draft_layers = None  # None: the trained exit's layer and two lower ones
spec_prompts = 34  # prompts for the acceptance-rate grid (decoded in batches)
spec_speed_prompts = 0  # of which the first are timed at batch 1 (0: acceptance and its bound only)
agreement_windows = 2  # held-out windows per corpus for the per-layer agreement (fitted exits)
agreement_seq_len = 128

# %%
torch.manual_seed(seed)
plots.set_figures_dir(figures_dir)
model, tokenizer, device, machine = open_session(model_name, device, dtype, profile=profile)
adapter = get_adapter(model)
L = adapter.num_layers
exit_layer = exit_layer or (2 * L) // 3
# Trained on first use (minutes on the embedded model), then loaded from the cache: the same result as
# load_model(model_name + "-ee") for the default recipe.
model, tokenizer, trained_exits, training = train_exits(recipe(recipe_name, model=model_name,
                                                               **{"exit_layers": (exit_layer,), **training_overrides}),
                                                        model=model, tokenizer=tokenizer)
records.EXITS.set(model, trained_exits)  # decoding reads the model's exits by default
minutes = training["teacher_pass_minutes"] + training["training_minutes"]
fitted = cached_linear_exits(model, tokenizer, model_name)  # the untrained baseline: least-squares exits
print(f"{model_name}: {L} layers, trained exit at layer {exit_layer} ({training['config']['exit_module']}, "
      f"{training['config']['backbone']} backbone, {minutes:.1f} min of training"
      f"{', loaded from the cache' if training.get('loaded_from_cache') else ''}); {machine}")

# %% [markdown]
# ## 1. Training: the exit's loss and its agreement with the last layer over time
#
# The exit is trained on windows of the built-in corpora and on the model's own greedy answers to built-in
# prompts (self-distillation: no hub data). Agreement is top-1 agreement of the exit's prediction with the
# untouched model's last layer on held-out windows, measured every few steps.

# %%
history = pd.DataFrame(training["loss_history"])
curve = pd.DataFrame(training["agreement_curve"])
fig, axes = plots.new_figure(1, 2, figsize=(9, 3.2))
loss_columns = [c for c in history.columns if c.startswith("exit_")]
for column in loss_columns:
    axes[0].plot(history.step, history[column].rolling(10, min_periods=1).mean(), label=f"layer {column[5:]} exit",
                 color=plots.colour("free"))
axes[0].set(xlabel="training step", ylabel="distillation loss (10-step mean)")
axes[0].legend()
axes[1].plot(curve.minutes, curve[f"agreement_{exit_layer}"], marker="o", color=plots.colour("free"),
             label="held-out windows")
if f"train_agreement_{exit_layer}" in curve:
    axes[1].plot(curve.minutes, curve[f"train_agreement_{exit_layer}"], marker="o", ls="--", color="0.5",
                 label="training windows")
axes[1].set(xlabel="wall minutes of training (teacher pass included)", ylabel=f"layer-{exit_layer} top-1 agreement",
            ylim=(0, 1))
axes[1].legend()
fig.suptitle(f"Training the layer-{exit_layer} exit ({training['config']['exit_module']}, frozen model)")
plots.caption(fig, model=model_name, data=", ".join(training["config"]["corpora"]) + " + self-distilled answers",
              extra=f"n = {training['heldout_tokens']} held-out tokens · {training['compute_dtype']} · {machine}")
plots.save_figure(fig, "08_training", table=history.merge(curve, on="step", how="left"))

# %%
print(f"held-out agreement of the layer-{exit_layer} exit: {training['agreement_before'][str(exit_layer)]:.3f} before "
      f"(logit lens) -> {training['agreement_after'][str(exit_layer)]:.3f} after; last-layer perplexity "
      f"{training['perplexity_before']:.2f} -> {training['perplexity_after']:.2f} (ratio {training['perplexity_ratio']:.4f}; "
      f"n = {training['heldout_tokens']} tokens)")

# %% [markdown]
# Where the held-out curve flattens while the training-windows curve keeps rising, the exit is fitting its
# training text rather than learning to generalise: more (teacher-labelled) data, not more steps, is what would
# move it.

# %% [markdown]
# ## 2. Agreement with the last layer, per layer: logit lens, fitted linear exits, trained exit

# %%
windows = torch.cat([calibration_windows(c, tokenizer, agreement_windows, agreement_seq_len, seed=seed, split="validation")
                     for c in training["config"]["corpora"]])
agreement = pd.concat([
    logit_lens_agreement(model, windows, progress=False).assign(exits="logit lens"),
    logit_lens_agreement(model, windows, progress=False, exit_transform=fitted).assign(exits="fitted linear (least squares)"),
    logit_lens_agreement(model, windows, progress=False, exit_transform=trained_exits).assign(exits="trained exit"),
], ignore_index=True)
fig, ax = plots.new_figure()
for (name, group), colour in zip(agreement.groupby("exits", sort=False), ("0.6", plots.colour("calm"),
                                                                             plots.colour("free")), strict=True):
    ax.plot(group.layer, group.agreement, marker="o", markersize=3, label=name, color=colour)
ax.set(ylabel="top-1 agreement with the last layer", ylim=(0, 1.02))
plots.layer_axis(ax)
ax.legend()
ax.set_title("What each kind of exit predicts, layer by layer\n" + plots.provenance(
    model=model_name, data=", ".join(training["config"]["corpora"]) + " (validation)",
    extra=f"n = {windows.numel()} tokens"))
plots.save_figure(fig, "08_agreement", table=agreement)
display(agreement[agreement.layer == exit_layer].set_index("exits").agreement.round(3))

# %% [markdown]
# ## 3. Static exit, CALM, FREE and self-speculation, before and after training
#
# The same settings on the same model: "before" reads the intermediate layers through fitted linear exits,
# "after" through the trained exit (the model's attached exits). Every prompt decodes to its end of sequence (at
# most `max_new_tokens`). Speed is timed at batch 1 and paired against HF `generate` on this model in the same
# run (per prompt the median over interleaved rounds of the ratio on that prompt, then the mean over prompts; bars:
# the 95% bootstrap interval over prompts), quality is ROUGE-L against the engine's
# full-depth output (mean over prompts with its 95% interval). Self-speculation's output is the full model's by
# construction: its quality is 1 and only its speed can move. The dashed line is the weight-read ceiling of an exit
# at this layer (`effllm.decoding.ceilings`): decoding at batch 1 is memory-bound, and a token that leaves at layer E
# still reads layers 1..E and the whole LM head (21% of SmolLM2's weights), so no setting here can pass it; a claim
# whose bar lies beyond it is reported as "cannot hold on this model".

# %%
fmt = prompt_format(model, tokenizer, model_name)
prompts = [p.to(device) for p in task_prompts(tokenizer, prompt_data, n_prompts, fmt=fmt,
                                              max_tokens=prompt_budget(model, max_new_tokens))]
settings = {f"static@{exit_layer}": StaticExit(exit_layer)}
settings |= {f"CALM {t}": Calm("softmax", t, exit_layer) for t in thresholds}
settings |= {f"FREE {t}": Free(exit_layer, t) for t in thresholds}
# FREE's adaptive threshold from the first threshold, one estimator over the prompts in order (each batch calibrating
# on the batches before): the claim compares it with the fixed threshold nearest it in layers per token
settings["FREE adaptive"] = Free(exit_layer, thresholds[0], use_adapt_threshold=True)
settings[f"self-spec@{exit_layer}x4"] = SelfSpec(exit_layer, 4)
runs, summaries, timings = {}, [], []
for exits, transform in (("before: fitted linear", fitted), ("after: trained", None)):
    chosen = lightest_keeping(timed_quality_bar) if timed_quality_bar is not None else timed_settings
    timed_here = exits == "after: trained" or time_fitted_exits
    # the speed reference is HF generate (the claims' ratio); the engine's own full depth is scored, not timed here
    # (python -m effllm.bench early-exit times it against HF generate)
    decoded = prompts if exits == "after: trained" or fitted_prompts is None else prompts[:fitted_prompts]
    runs[exits] = run_policies(model, tokenizer, decoded, settings, max_new_tokens, exit_transform=transform,
                               rounds=rounds, speed_prompts=speed_prompts if timed_here else 0, timed=chosen,
                               time_full=False)
    print(f"{exits}: timed at batch 1:", ", ".join(sorted(set(runs[exits].timings.label))) or "nothing")
    summaries.append(runs[exits].summary.assign(exits=exits))
    timings.append(runs[exits].timings.assign(exits=exits))
speed_quality = pd.concat(summaries, ignore_index=True)
plots.save_table(pd.concat(timings, ignore_index=True), "08_timings")
plots.save_table(pd.concat([run.items.assign(exits=exits) for exits, run in runs.items()], ignore_index=True)
                 .drop(columns="text", errors="ignore"), "08_generation_items")  # per prompt: the claims' pairs
display(speed_quality[["exits", "label", "speedup_vs_hf", "speedup_vs_hf_ci_low", "speedup_vs_hf_ci_high", "avg_layers",
                       "rougeL_vs_full", "rougeL_vs_full_ci_low", "rougeL_vs_full_ci_high", "identical_to_full",
                       "acceptance_rate", "speedup_ceiling", "n_prompts"]].round(3))

# %%
before_n = len(prompts) if fitted_prompts is None else min(fitted_prompts, len(prompts))
fig, axes = plots.new_figure(1, 2, figsize=(10, 3.8), sharex=True, sharey=True)  # one scale: the panels compare
for ax, (exits, group) in zip(axes, speed_quality[speed_quality.method != "hf"].groupby("exits", sort=False),
                              strict=True):
    plots.speed_quality(ax, group)
    # the most an exit at this layer could give: every token leaving there (the weights read, ceilings module)
    ceiling = group.loc[group.method == "static", "speedup_ceiling"].max()
    ax.axvline(ceiling, color="0.5", ls="--", lw=0.8, label=f"weight-read ceiling at layer {exit_layer}: {ceiling:.2f}x")
    ax.set(xlabel="paired speed ratio vs HF generate (x), 95% CI over prompts", title=exits)
axes[0].set(ylabel="ROUGE-L vs full-depth output (95% CI)", ylim=(-0.02, 1.05))
axes[1].legend(fontsize=7)
fig.suptitle(f"Early exit at layer {exit_layer} before and after exit training")
plots.caption(fig, model=model_name, data=prompt_data,
              extra=f"n = {before_n} (before) / {n_prompts} (after) prompts, decoded to {speed_quality.decoded_to.iloc[0]} (at most {max_new_tokens} "
                    f"tokens), batched; speed: {speed_prompts} prompts x {rounds} rounds at batch 1, paired, greedy "
                    f"· {machine}")
plots.save_figure(fig, "08_speed_quality", table=speed_quality)

# %%
after = speed_quality[speed_quality.exits == "after: trained"].set_index("label")
keeps = after[(after.rougeL_vs_full_ci_low >= 0.9) & (after.method != "hf")]
best = keeps.speedup_vs_hf.idxmax() if len(keeps) else None
print("after training: fastest setting whose ROUGE-L interval stays above 0.9: "
      + (f"{best} at {keeps.loc[best].speedup_vs_hf:.2f}x HF generate (paired, 95% CI over prompts "
         f"{keeps.loc[best].speedup_vs_hf_ci_low:.2f}-{keeps.loc[best].speedup_vs_hf_ci_high:.2f}), ROUGE-L "
         f"{keeps.loc[best].rougeL_vs_full:.3f}"
         if best is not None else "none"))
spec = after.loc[f"self-spec@{exit_layer}x4"]
print(f"self-speculation at layer {exit_layer}: identical to full depth on {spec.identical_to_full:.0%} of "
      f"{int(spec.n_prompts)} prompts, acceptance {spec.acceptance_rate:.2f}, {spec.speedup_vs_hf:.2f}x HF generate")

# %% [markdown]
# ## 4. Self-speculation: acceptance against the draft layer and the draft length
#
# A round drafts g tokens at layer E and verifies them in one full pass; with acceptance rate a and a draft that
# costs c of a full token per drafted token, the expected speedup is (1 - a^(g+1)) / ((1 - a)(g c + 1)). Below,
# the trained exit's layer and two lower layers (read through the trained exit where it exists, else the fitted
# linear exits) at several draft lengths.

# %%
draft_layers = draft_layers or sorted({max(1, exit_layer // 2), max(1, (3 * exit_layer) // 4), exit_layer})
grid_settings = {f"self-spec@{e}x{g}": SelfSpec(e, g) for e in draft_layers for g in draft_lengths if e < L}


def exit_map(layer, hidden):
    """The trained exit where it was trained, else the fitted linear exit."""
    return trained_exits(layer, hidden) if layer == exit_layer else fitted(layer, hidden)


grid = run_policies(model, tokenizer, prompts[:spec_prompts], grid_settings, max_new_tokens, exit_transform=exit_map,
                    rounds=rounds, speed_prompts=spec_speed_prompts, hf=bool(spec_speed_prompts)).summary
for column in ("speedup_vs_hf", "speedup_vs_hf_ci_low", "speedup_vs_hf_ci_high"):
    grid[column] = grid.get(column, float("nan"))  # not timed (spec_speed_prompts = 0): the bound stands alone
grid = grid[grid.method == "self-spec"].copy()
# what the measured acceptance allows with verification as cheap as one token (the bound of this round structure)
grid["bound_at_this_acceptance"] = [speedup_at_acceptance_rate(r.acceptance_rate, int(r.num_draft_tokens),
                                                                int(r.draft_exit_layer), L) for r in grid.itertuples()]
# the same in weights read (each draft also reads the whole LM head: at batch 1 the bound that speed is read against)
reads = WeightReads.of(model, trained_exits)  # the fitted linear exits' d x d maps are left out (small)
grid["weight_read_bound_at_this_acceptance"] = [
    self_spec_bound(reads, r.acceptance_rate, int(r.num_draft_tokens), int(r.draft_exit_layer))
    for r in grid.itertuples()]
display(grid[["label", "draft_exit_layer", "num_draft_tokens", "acceptance_rate", "bound_at_this_acceptance",
              "weight_read_bound_at_this_acceptance",
              "speedup_vs_hf", "speedup_vs_hf_ci_low", "speedup_vs_hf_ci_high", "identical_to_full", "n_prompts"]].round(3))
fig, axes = plots.new_figure(1, 2, figsize=(9, 3.2))
for layer, rows in grid.groupby("draft_exit_layer"):
    rows = rows.sort_values("num_draft_tokens")
    axes[0].plot(rows.num_draft_tokens, rows.acceptance_rate, marker="o", label=f"draft at layer {layer}")
    line = axes[1].plot(rows.num_draft_tokens, rows.weight_read_bound_at_this_acceptance, marker="x", ls="--",
                        lw=0.8, label=f"layer {layer}: bound at its acceptance (weights read)")[0]
    if rows.speedup_vs_hf.notna().any():
        axes[1].errorbar(rows.num_draft_tokens, rows.speedup_vs_hf,
                         yerr=[rows.speedup_vs_hf - rows.speedup_vs_hf_ci_low,
                               rows.speedup_vs_hf_ci_high - rows.speedup_vs_hf],
                         marker="o", capsize=2, color=line.get_color(), label=f"layer {layer}: measured vs HF")
axes[0].set(xlabel="draft length g (tokens per verification)", ylabel="acceptance rate", ylim=(0, 1))
axes[1].set(xlabel="draft length g (tokens per verification)",
            ylabel="speed-up (x): bound vs full depth,\nmeasured: paired vs HF generate (95% CI)")
axes[1].legend(fontsize=6)
axes[1].axhline(1.0, color="0.6", ls=":", lw=1)
for ax in axes:
    ax.xaxis.get_major_locator().set_params(integer=True)
axes[0].legend(fontsize=7)
fig.suptitle("Self-speculative decoding: acceptance and speed against the draft layer and length")
plots.caption(fig, model=f"{model_name}-ee", data=prompt_data,
              extra=f"n = {int(grid.n_prompts.iloc[0])} prompts, decoded to {grid.decoded_to.iloc[0]} (at most "
                    f"{max_new_tokens} tokens), batched; " + (
                        f"speed: {int(grid.n_speed_prompts.iloc[0])} prompts x {rounds} rounds, batch 1, paired"
                        if spec_speed_prompts else "speed not timed (the main table times the trained layer's)")
                    + f" · {machine}")
plots.save_figure(fig, "08_acceptance", table=grid)

# %%
for layer in draft_layers:
    if layer < L:
        best = max(expected_speedup(1.0, g, layer, L) for g in draft_lengths)
        weights = max(self_spec_bound(reads, 1.0, g, layer) for g in draft_lengths)
        print(f"drafts at layer {layer}: even with every draft accepted and verification as cheap as one token, at "
              f"most {best:.2f}x full-depth decoding counting layers, {weights:.2f}x counting the weights read (each "
              f"draft reads the LM head too; draft lengths {draft_lengths})")

# %% [markdown]
# Every row's `identical_to_full` is 1: self-speculation never changes the output, whatever its drafts. Whether it
# is faster is the acceptance rate against the draft's cost: a deeper draft is accepted more often but costs more
# per drafted token, and a longer draft pays off only while the acceptance stays high. `bound_at_this_acceptance` is
# the speed-up over full-depth decoding that the measured acceptance allows if verifying g + 1 tokens cost what one
# token costs (`effllm.decoding.speculative.speedup_at_acceptance_rate`: 1 + rate x g tokens a round, costs in
# layers); `weight_read_bound_at_this_acceptance` (plotted) counts the weights each round reads instead, the LM head
# of every draft included (`effllm.decoding.ceilings.self_spec_bound`), which is what bounds batch-1 decoding here.
# The measured speed falls below it by what
# verification and the draft's own bookkeeping really cost on this machine (`python -m effllm.bench decode-profile`).
